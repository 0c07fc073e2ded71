"""The embedded default (`make train`) over independent seeds: held-out accuracy at exact versions.

    python benchmarks/default_run.py [--seeds 3] [--root runs/default_run]   # runs `async-rl train`
    python benchmarks/default_run.py --collect runs/tiny-s0 runs/tiny-s1 … [--wall-s 638 …]   # finished runs

Each run is `async-rl train` with tiny.yaml and `run.seed=SEED` from a clean run folder (its own
SFT warm start, prompt order and sampling). Reported per seed: the SFT start, each evaluated
version and the gain (last − start), then mean ± sd over seeds; the wall-clock of each run.
Writes ``benchmarks/results/default_run.json`` and ``docs/tiny-seeds.png``. ``--quick`` runs one
seed for 4 learner steps without SFT (plumbing only: the random model learns nothing).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import mean_sd, pm, print_table, write_result  # noqa: E402
from e2e_bench import records  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).with_name("async-rl")
QUICK_ARGS = ["learner.sft.epochs=0", "learner.max_steps=4", "learner.eval.every=2", "learner.eval.prompts=50",
              "buffer.filter_zero_advantage=false"]


def train(run_dir: Path, seed: int, quick: bool) -> float:
    """One `async-rl train` from a clean folder; returns its wall-clock in seconds."""
    args = [f"run.dir={run_dir}", f"run.seed={seed}", "logging.console=plain", *(QUICK_ARGS if quick else [])]
    started = time.monotonic()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        code = subprocess.run([str(BIN), "train", *args], stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if code != 0:
        raise SystemExit(f"default_run: seed {seed} failed with exit code {code}; see {run_dir}.log")
    return time.monotonic() - started


def run_summary(run_dir: Path, wall_s: float | None = None) -> dict:
    from async_rl.config_io import load_config

    cfg = load_config(str(run_dir / "config.yaml"), [])
    curve = [{"version": e["version"], "accuracy": e["accuracy"]} for e in records(run_dir, "eval")]
    if not curve:
        raise SystemExit(f"default_run: {run_dir}: no held-out evaluations in metrics/eval.jsonl")
    return {"run_dir": str(run_dir), "seed": cfg.run.seed, "curve": curve, "start": curve[0]["accuracy"],
            "final": curve[-1]["accuracy"], "gain": curve[-1]["accuracy"] - curve[0]["accuracy"], "wall_s": wall_s}


def mean_sd_text(values: Sequence[float]) -> str:
    return pm(mean_sd(values), 3)


def report(runs: Sequence[dict]) -> None:
    versions = [p["version"] for p in runs[0]["curve"]]
    rows = [[r["seed"], *[f"{p['accuracy']:.3f}" for p in r["curve"]], f"{r['gain']:+.3f}",
             f"{r['wall_s']:.0f}" if r["wall_s"] else "—"] for r in runs]
    if all([p["version"] for p in r["curve"]] == versions for r in runs):
        rows.append(["mean ± sd", *[mean_sd_text([r["curve"][i]["accuracy"] for r in runs]) for i in range(len(versions))],
                     mean_sd_text([r["gain"] for r in runs]), ""])
    print_table("held-out greedy accuracy at exact versions, tiny.yaml (`make train`), one row per run.seed",
                ["seed", *[f"v{v}" for v in versions], "gain", "wall s"], rows)


def plot(runs: Sequence[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        ax.plot([p["version"] for p in r["curve"]], [p["accuracy"] for p in r["curve"]], marker="o",
                label=f"run.seed={r['seed']}: {r['start']:.3f} → {r['final']:.3f}")
    ax.set_xlabel("policy version (learner step)")
    ax.set_ylabel("held-out greedy accuracy (500 problems)")
    ax.set_title("make train: async GPPO from the SFT start, per seed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="run.seed 0 … N-1")
    parser.add_argument("--quick", action="store_true", help="one seed, 4 steps, no SFT (plumbing only)")
    parser.add_argument("--collect", type=Path, nargs="+", help="tabulate these finished run folders instead")
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "default_run")
    parser.add_argument("--wall-s", type=float, nargs="+", help="with --collect: each run's measured wall-clock")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        raise SystemExit(f"default_run: --seeds={args.seeds}: must be >= 1")
    if args.collect:
        walls = args.wall_s or [None] * len(args.collect)
        if len(walls) != len(args.collect):
            raise SystemExit(f"default_run: --wall-s gives {len(walls)} values for {len(args.collect)} runs")
        runs = [run_summary(path, wall) for path, wall in zip(args.collect, walls, strict=True)]
    else:
        runs = []
        for seed in range(1 if args.quick else args.seeds):
            run_dir = args.root / f"seed{seed}"
            if run_dir.exists():
                raise SystemExit(f"default_run: {run_dir} exists; remove it or choose another --root")
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            print(f"seed {seed}: async-rl train → {run_dir}", flush=True)
            runs.append(run_summary(run_dir, train(run_dir, seed, args.quick)))
    report(runs)
    name = "default_run" + ("_quick" if args.quick else "")
    figure = plot(runs, REPO / "docs" / "tiny-seeds.png" if not args.quick else args.root / "seeds.png")
    write_result(name, {"quick": args.quick, "runs": runs, "plot": str(figure.relative_to(REPO))})


if __name__ == "__main__":
    main()
