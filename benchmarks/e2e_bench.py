"""Async vs sync on the tiny setup: the same job, the same SFT start, the same wall-clock budget.

    python benchmarks/e2e_bench.py [--quick] [--budget-min 4] [--root runs/e2e_bench]

``sync`` (the baseline, as AReaL and verl compare) alternates: the actor generates one
learner batch per policy version and waits for the next. ``async`` lets the actor run up to
``algorithm.staleness.max_staleness`` versions ahead. Reported per mode: trajectories/s, learner busy fraction
(time in train steps / wall), actor busy fraction (share of the actor's metric samples with
requests in flight), policy versions reached and versions per minute of training (first to
last learner step), and the last held-out greedy accuracy.
``--quick`` skips the SFT warm start and the zero-advantage filter and ends each mode at
``QUICK_VERSIONS`` policy versions instead of a wall-clock budget (~2 min in all, most of it the
two jobs' start-up): a half-minute budget left sync at 0 versions, the engine's start-up eating
it, so the quick run compared nothing. What it compares is versions per minute.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, write_result  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).with_name("async-rl")
SHARED = ("model", "data", "sft_model")
QUICK_VERSIONS = 4  # --quick: each mode trains this many versions (sync needs one generation round each)


def run_mode(root: Path, mode: str, budget_min: float, quick: bool, overrides: Sequence[str] = (),
             name: str | None = None) -> dict:
    """One ``async-rl train`` in ``mode`` from the shared start, for ``budget_min`` minutes (0: until
    ``learner.max_steps``, which ``overrides`` then set); its folder is ``root / (name or mode)``."""
    name = name or mode
    run_dir = root / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    for shared in SHARED:  # the same model, data and SFT start for every run
        if (root / "shared" / shared).exists():
            shutil.copytree(root / "shared" / shared, run_dir / shared)
    args = [f"run.dir={run_dir}", f"algorithm.mode={mode}", "learner.max_steps=0",
            "learner.checkpoint.every=0", "logging.console=plain", "logging.tensorboard=false"]
    if budget_min > 0:
        args.append(f"run.max_minutes={budget_min}")
    if quick:
        args += ["learner.sft.epochs=0", "buffer.filter_zero_advantage=false", "learner.eval.every=0",
                 "actors.max_tokens=16"]
    with open(root / f"{name}.log", "w") as log:
        code = subprocess.run([str(BIN), "train", *args, *overrides], stdout=log, stderr=subprocess.STDOUT,
                              cwd=REPO).returncode
    if code != 0:
        raise SystemExit(f"{name} run failed with exit code {code}; see {root / f'{name}.log'}")
    return summarize(run_dir, mode, budget_min)


def records(run_dir: Path, role: str) -> list[dict]:
    path = run_dir / "metrics" / f"{role}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def summarize(run_dir: Path, mode: str, budget_min: float) -> dict:
    learner, actor, evals = records(run_dir, "learner"), records(run_dir, "actor-0"), records(run_dir, "eval")
    span = (actor[-1]["time"] - actor[0]["time"]) if len(actor) > 1 else budget_min * 60
    rows = actor[-1]["rows_acked"] if actor else 0
    training_s = learner[-1]["time"] - learner[0]["time"] if len(learner) > 1 else 0.0
    return {
        "mode": mode,
        "versions": learner[-1]["version"] if learner else 0,
        # the learner's pace once both roles run (start-up excluded): steps 1..N span N-1 versions
        "versions_per_min": (len(learner) - 1) * 60 / training_s if training_s > 0 else 0.0,
        "trajectories_per_s": rows / max(span, 1e-9),
        "learner_busy": learner[-1]["busy_fraction"] if learner else 0.0,
        "actor_busy": sum(1 for r in actor if r["groups_in_flight"] > 0) / max(len(actor), 1),
        "heldout_accuracy": evals[-1]["accuracy"] if evals else None,
        "heldout_start": evals[0]["accuracy"] if evals else None,
        "staleness_mean": sum(r["staleness_mean"] for r in learner) / max(len(learner), 1),
    }


def warm_start(root: Path, overrides: Sequence[str] = ()) -> None:
    """One SFT warm start shared by both modes (cached under ROOT/shared); ``overrides`` are
    tiny.yaml ``KEY=VALUE`` settings."""
    shared = root / "shared"
    if (shared / "sft_model" / "config.json").is_file():
        return
    from rich.console import Console

    from async_rl.config_io import load_config
    from async_rl.job.driver import warm_start as sft
    from async_rl.prepare import prepare_run

    cfg = load_config("tiny", [*overrides, f"run.dir={shared}"])
    sft(cfg, prepare_run(cfg), Console())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"no SFT, {QUICK_VERSIONS} versions per mode instead of a wall-clock budget")
    parser.add_argument("--budget-min", type=float, default=4.0, help="wall-clock budget per mode")
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "e2e_bench")
    args = parser.parse_args()
    budget = 0 if args.quick else args.budget_min
    overrides = [f"learner.max_steps={QUICK_VERSIONS}"] if args.quick else []
    args.root.mkdir(parents=True, exist_ok=True)
    if not args.quick:
        warm_start(args.root)
    results = [run_mode(args.root, mode, budget, args.quick, overrides) for mode in ("sync", "async")]
    rows = [[r["mode"], r["versions"], r["versions_per_min"], r["trajectories_per_s"], r["learner_busy"],
             r["actor_busy"], r["staleness_mean"], r["heldout_start"], r["heldout_accuracy"]] for r in results]
    span = f"{QUICK_VERSIONS} versions" if args.quick else f"{budget:g} min"
    print_table(
        f"async vs sync, {span} each (sync is the baseline)",
        ["mode", "versions", "versions/min", "traj/s", "learner busy", "actor busy", "staleness", "held-out start",
         "held-out end"],
        rows,
    )
    write_result("e2e_bench" + ("_quick" if args.quick else ""),
                 {"quick": args.quick, "budget_min": budget, "versions": QUICK_VERSIONS if args.quick else None,
                  "modes": results})


if __name__ == "__main__":
    main()
