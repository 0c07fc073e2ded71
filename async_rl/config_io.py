"""Loading the config: a YAML file plus dotted ``key=value`` overrides, env-free.

Every failure is a :class:`ConfigError` whose message is one line naming the key path,
the bad value and what is expected; the CLI prints it and exits with code 2 before
anything starts.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from async_rl.config import Config

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "tiny"


class ConfigError(ValueError):
    """A config problem, worded for the user in a single line."""


# Keys that moved, old dotted path -> new one; a config that still sets one is refused with
# "OLD moved to NEW" (a moved section moves every key under it).
MOVED_KEYS = {
    "buffer.max_staleness": "algorithm.staleness.max_staleness",
    "algorithm.staleness_schedule": "algorithm.staleness.schedule",
    **{f"learner.{key}": f"learner.optimizer.{key}" for key in (
        "lr", "lr_schedule", "warmup_steps", "min_lr_ratio", "weight_decay", "betas", "grad_clip")},
    **{f"learner.{key}": f"learner.batch.{key}" for key in (
        "groups_per_step", "mini_batches_per_step", "micro_batch_tokens", "micro_batch_layout",
        "logprob_chunk_tokens", "fused_logprobs")},
    "learner.checkpoint_every": "learner.checkpoint.every",
    "learner.keep_checkpoints": "learner.checkpoint.keep",
    "learner.eval_every": "learner.eval.every",
    "learner.eval_prompts": "learner.eval.prompts",
    "learner.sft_epochs": "learner.sft.epochs",
    "learner.sft_lr": "learner.sft.lr",
    "learner.sft_batch_size": "learner.sft.batch_size",
    **{f"reward.{key}": f"reward.math.{key}" for key in (
        "require_think_format", "missing_think_close", "missing_think_open")},
    **{f"reward.code_{key}": f"reward.code.{key}" for key in (
        "max_tests", "soft", "test_timeout_s", "time_budget_s", "memory_mb", "output_bytes",
        "float_tol", "isolation", "sandbox_user")},
}


def resolve_config_path(name_or_path: str | Path | None) -> Path:
    """A path as given, or a recipe name from ``configs/`` (``tiny``, ``klear-math-8b``)."""
    if name_or_path is None:
        name_or_path = DEFAULT_CONFIG
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (CONFIGS_DIR / f"{name_or_path}.yaml", CONFIGS_DIR / str(name_or_path)):
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
    raise ConfigError(f"config {str(name_or_path)!r}: no such file or recipe (recipes: {known})")


def load_config(name_or_path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``a.b=value`` overrides and validate the whole tree."""
    path = resolve_config_path(name_or_path)
    raw = _read_yaml(path)
    for item in overrides or []:
        _apply_override(raw, item)
    return validate_config(raw, source=str(path))


def validate_config(raw: dict[str, Any], *, source: str = "config") -> Config:
    check_moved_keys(raw)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source=source)) from None


def check_moved_keys(raw: dict[str, Any]) -> None:
    """Refuse a key that moved, naming its new place."""
    for old, new in MOVED_KEYS.items():
        *sections, key = old.split(".")
        node: Any = raw
        for part in sections:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and key in node:
            raise ConfigError(f"{old} moved to {new}")


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=None)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: expected KEY.PATH=VALUE, e.g. learner.lr=1e-6")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"override {item!r}: {where} is a value, not a section")
        node = child
    node[parts[-1]] = value


def format_validation_error(err: ValidationError, *, source: str) -> str:
    """The first error as one line: ``learner.zero_stage=4: must be 0, 1, 2 or 3``."""
    first = err.errors()[0]
    loc, variant = _field_path(first["loc"])
    path = ".".join(loc)
    value = first.get("input")
    if first["type"] == "extra_forbidden" and variant is not None:
        section = ".".join(loc[:-1])
        return (f"{path}: not a field of the {variant} objective (its fields: "
                f"{', '.join(_known_keys(loc[:-1], variant))}); to switch objectives give the "
                f"section whole, e.g. {section}='{{type: {variant}}}'")
    if first["type"] == "extra_forbidden":
        expected = _known_keys(loc[:-1])
        close = difflib.get_close_matches(loc[-1], expected, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"expected one of: {', '.join(expected)}"
        return f"{path}: unknown key in {source} ({hint})"
    if first["type"] == "union_tag_invalid":
        ctx = first.get("ctx") or {}
        return f"{path}.type={_show(ctx.get('tag'))}: must be one of {ctx.get('expected_tags')}"
    message = first["msg"].removeprefix("Value error, ")
    extra = f" ({len(err.errors()) - 1} more error(s))" if len(err.errors()) > 1 else ""
    if isinstance(value, dict) or not path:
        prefix = f"{path}: " if path else ""
        return f"{prefix}{message}{extra}"
    return f"{path}={_show(value)}: {_expected(first, message)}{extra}"


def _expected(error: dict[str, Any], message: str) -> str:
    ctx = error.get("ctx") or {}
    kind = error["type"]
    bounds = {
        "greater_than": "must be > {gt}",
        "greater_than_equal": "must be >= {ge}",
        "less_than": "must be < {lt}",
        "less_than_equal": "must be <= {le}",
    }
    if kind in bounds:
        return bounds[kind].format(**{k: f"{v:g}" if isinstance(v, float) else v for k, v in ctx.items()})
    if kind in ("model_type", "dict_type"):
        return "expected a section (a mapping of keys), not a single value"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', message)}"
    return message[0].lower() + message[1:] if message else kind


def _union_members(annotation: Any) -> dict[str, type[BaseModel]]:
    """A discriminated union's members by tag (``algorithm.loss``); {} for any other type."""
    members = {}
    for member in typing.get_args(annotation):
        for arg in (member, *typing.get_args(member)):
            if isinstance(arg, type) and issubclass(arg, BaseModel) and "type" in arg.model_fields:
                members[arg.model_fields["type"].default] = arg
    return members


def _field_path(loc: tuple) -> tuple[list[str], str | None]:
    """The error's key path without the union tags pydantic inserts, and the last tag passed
    (the chosen objective), e.g. ('algorithm', 'loss', 'gppo', 'x') -> (['algorithm', 'loss', 'x'],
    'gppo')."""
    path: list[str] = []
    variant = None
    model: type[BaseModel] | None = Config
    parts = [str(part) for part in loc]
    while parts:
        part = parts.pop(0)
        path.append(part)
        field = model.model_fields.get(part) if model is not None else None
        annotation = getattr(field, "annotation", None)
        members = _union_members(annotation)
        if members and parts and parts[0] in members:
            variant = parts.pop(0)
            model = members[variant]
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            model = None
    return path, variant


def _known_keys(loc: list[str], variant: str | None = None) -> list[str]:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        members = _union_members(annotation)
        if members and variant in members:
            model = members[variant]
            continue
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."
