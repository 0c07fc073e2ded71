"""The folders are the architecture: every import in the tree obeys the layering that
``async_rl/__init__.py`` states. Imports inside functions count as much as top-level ones."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("async_rl", "actors", "buffer", "learners")

# The parts of async_rl the stages may use; the rest of async_rl is the wiring.
LIBRARY = ("async_rl.config", "async_rl.config_io", "async_rl.seeds", "async_rl.model",
           "async_rl.records", "async_rl.rewards", "async_rl.tasks", "async_rl.weights")
# What a stage may take from another stage: the buffer's contracts (its schema and its client).
BUFFER_CONTRACTS = ("buffer.schema", "buffer.client", "buffer.wire")
# The config takes its choice sets from where each choice is implemented, so one is declared
# once: algorithm.loss's union from the objectives (each beside its loss, torch-free to import)
# and buffer.sampler's names from the samplers. The only stage code a library part may import.
CONFIG_FROM_STAGES = {"async_rl.config": ("learners.objectives", "buffer.samplers")}

# module prefix -> import prefixes it must never use (checked after the library rule).
FORBIDDEN = {
    "actors": ("learners", "deepspeed"),
    "learners": ("actors", "vllm"),
    "buffer": ("actors", "learners", "vllm", "deepspeed", "torch"),
    "async_rl": ("vllm", "deepspeed"),  # only through the actors' and learners' adapters
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every absolute module name the file imports, with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _violation(module: str, imported: str) -> str | None:
    """Why ``module`` must not import ``imported``; None when the import is allowed."""
    stage = module.split(".")[0]
    is_library = _within(module, LIBRARY)
    if stage in ("actors", "buffer", "learners") or is_library:
        if _within(imported, ("async_rl",)) and not _within(imported, LIBRARY):
            return "a stage or library part imports the wiring of async_rl"
    if is_library and _within(imported, ("actors", "buffer", "learners")):
        if not _within(imported, CONFIG_FROM_STAGES.get(module, ())):
            return "a library part imports a stage"
    if stage in ("actors", "learners"):
        other = ("actors", "buffer", "learners")
        if _within(imported, other) and not _within(imported, (stage, *BUFFER_CONTRACTS)):
            return "a stage imports another stage beyond the buffer's contracts"
    if stage == "buffer" and _within(imported, ("actors", "learners")):
        return "the buffer imports a stage"
    forbidden = FORBIDDEN.get(stage, ())
    if _within(imported, forbidden):
        return f"{stage} must not import {imported.split('.')[0]}"
    return None


def _source_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_every_import_in_the_tree_obeys_the_layering():
    broken = [
        f"{path.relative_to(ROOT)}:{line}: {_module_name(path)} imports {name} ({why})"
        for path in _source_files()
        for line, name in _imports(path)
        if (why := _violation(_module_name(path), name)) is not None
    ]
    assert not broken, "\n".join(broken)


def test_the_walk_sees_every_stage_and_function_level_imports():
    files = {_module_name(p) for p in _source_files()}
    assert {"actors.engine", "buffer.store", "learners.engine", "async_rl.config"} <= files
    # actors.engine imports vLLM only inside functions (lazily); the walk must still see it.
    assert any(name.startswith("vllm") for _, name in _imports(ROOT / "actors" / "engine.py"))


@pytest.mark.parametrize(
    ("module", "imported", "allowed"),
    [
        ("learners.engine", "vllm", False),
        ("learners.engine", "actors.prompts", False),
        ("actors.engine", "deepspeed", False),
        ("actors.writer", "learners.advantages", False),
        ("actors.writer", "buffer.client", True),
        ("actors.writer", "buffer.store", False),
        ("buffer.store", "learners.staleness", False),
        ("buffer.service", "async_rl.weights.keys", True),
        ("learners.sft", "async_rl.tasks.dataset", True),
        ("learners.trainer", "async_rl.job.metrics", False),
        ("async_rl.rewards.math", "async_rl.evaluation.runner", False),
        ("async_rl.job.controller", "learners.launch", True),
        ("async_rl.evaluation.runner", "actors.engine", True),
        ("async_rl.job.controller", "vllm", False),
        ("async_rl.config", "learners.objectives", True),
        ("async_rl.config", "learners.engine", False),
        ("async_rl.config", "buffer.samplers", True),
        ("async_rl.config", "buffer.store", False),
        ("async_rl.rewards.math", "learners.objectives", False),
    ],
)
def test_the_rules_allow_and_refuse_the_imports_the_layering_names(module, imported, allowed):
    assert (_violation(module, imported) is None) is allowed
