"""``async_rl/job/placement.py`` is the one module that decides where things run: no other
module of the product passes Ray resources, a scheduling strategy or a placement group."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PLACEMENT = ROOT / "async_rl" / "job" / "placement.py"
PACKAGES = ("async_rl", "actors", "buffer", "learners")

# Keywords of a Ray ``.options(...)`` / ``ray.remote(...)`` call that decide where or how a role runs.
RAY_OPTIONS = {"num_cpus", "num_gpus", "resources", "memory", "scheduling_strategy", "placement_group",
               "placement_group_bundle_index", "max_concurrency", "runtime_env", "name", "lifetime"}
# Names that only placement code uses.
PLACEMENT_NAMES = {"PlacementGroupSchedulingStrategy", "NodeAffinitySchedulingStrategy", "NodeLabelSchedulingStrategy",
                   "placement_group", "remove_placement_group", "placement_group_table"}
PLACEMENT_MODULES = ("ray.util.scheduling_strategies", "ray.util.placement_group")


def _placement_uses(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("options", "remote"):
                found += [(node.lineno, f"{called}({kw.arg}=…)") for kw in node.keywords if kw.arg in RAY_OPTIONS]
        elif isinstance(node, ast.Attribute) and node.attr in PLACEMENT_NAMES:
            found.append((node.lineno, node.attr))
        elif isinstance(node, ast.Name) and node.id in PLACEMENT_NAMES:
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PLACEMENT_MODULES):
            found.append((node.lineno, f"from {node.module} import …"))
    return found


def test_no_module_but_placement_passes_ray_placement_options():
    files = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if p != PLACEMENT)
    offenders = [f"{path.relative_to(ROOT)}:{line}: {what}"
                 for path in files for line, what in _placement_uses(ast.parse(path.read_text()))]
    assert not offenders, "placement decided outside async_rl/job/placement.py:\n" + "\n".join(offenders)


def test_the_check_sees_the_placement_module_itself():
    found = {what for _, what in _placement_uses(ast.parse(PLACEMENT.read_text()))}
    assert {"options(scheduling_strategy=…)", "options(max_concurrency=…)", "PlacementGroupSchedulingStrategy",
            "NodeAffinitySchedulingStrategy", "remove_placement_group"} <= found


def _node(address: str, alive: bool = True, **resources: float):
    from async_rl.job.placement import ClusterNode

    return ClusterNode(node_id=f"id-{address}", address=address, alive=alive, resources=resources)


def test_a_role_is_unplaceable_only_when_no_live_node_has_all_it_asks_for():
    from async_rl.job.placement import RoleResources, unplaceable

    actor = RoleResources(num_cpus=1, num_gpus=0, custom=(("node_b", 0.01),))
    a, b = _node("10.0.0.1", CPU=2, node_a=1), _node("10.0.0.2", CPU=2, node_b=1)
    assert unplaceable(actor, [a, b]) is None
    lost_b = _node("10.0.0.2", alive=False, CPU=2, node_b=1)
    assert unplaceable(actor, [a, lost_b]) == "no live node has CPU 1, node_b 0.01 (live nodes: 10.0.0.1: CPU 2, node_b 0)"
    # Each resource on the same node: B's marker with A's CPUs is no place.
    busy_b = _node("10.0.0.2", CPU=0.5, node_b=1)
    assert unplaceable(actor, [a, busy_b]).startswith("no live node has CPU 1, node_b 0.01")
    assert unplaceable(actor, []) == "no live node has CPU 1, node_b 0.01 (live nodes: none)"
