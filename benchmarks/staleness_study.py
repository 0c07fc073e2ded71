"""The staleness cap in the live job: held-out accuracy at exact versions per cap, over seeds.

    python benchmarks/staleness_study.py [--caps 0,1,4,8] [--seeds 3] [--steps 40] [--set KEY=VALUE ...]
                                         [--tag T] [--quick] [--reuse]

Every run is the real ``async-rl train`` (async mode, tiny.yaml) from one shared SFT start, with
``algorithm.staleness.max_staleness`` set to the cap and ``run.seed`` to the seed (prompt order and sampling),
for the same number of learner steps. The job's evaluator scores the held-out set at versions 0,
every ``--eval-every``, and the last, each at exactly one version. Reported per cap: the final
accuracy and the gain over the start (mean ± sd over seeds), the mean staleness the learner
trained at, and the learner's busy fraction; each seed's curve is in the JSON and drawn, with each
cap's mean, in ``docs/staleness-live[-TAG].png``. ``--set KEY=VALUE``
changes every run's job (e.g. more prompts in flight, so the learner rather than generation is the
bottleneck and a high cap can bind at all). The lockstep
counterpart (rows exactly s versions stale) is ``learning_study.py --section staleness``. Every
finished run is appended to ``ROOT/live_runs.jsonl``; ``--reuse`` takes a run already there with the
same cap, seed, steps, evaluation cadence, held-out size and ``--set`` instead of running it again.

``--quick``: caps 0 and 1, one seed, 4 steps, 100 held-out problems, no SFT (plumbing only, the
random model learns nothing); writes ``staleness_study_quick.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    accuracy_axes,
    log_run,
    logged_runs,
    mean_sd,
    print_table,
    save_figure,
    write_result,
)
from e2e_bench import records, run_mode, warm_start  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# Every finished run, one JSON line each, appended under --root (``--reuse`` reads it).
RUN_LOG = "live_runs.jsonl"
# What makes two runs of one cap and seed the same run (``--reuse``).
RUN_SETTINGS = ("steps", "eval_every", "heldout", "quick")


def run_settings(args: argparse.Namespace) -> dict:
    """What a logged run must share with this sweep to be reused (``--set`` only when given, so
    runs logged before the option existed still match a sweep without it)."""
    settings = {key: getattr(args, key) for key in RUN_SETTINGS}
    return {**settings, "set": args.set} if args.set else settings


def run_cap(root: Path, cap: int, seed: int, args) -> dict:
    """One live job at staleness cap ``cap`` and ``run.seed`` ``seed``; its curve and costs."""
    name = f"cap{cap}-seed{seed}"
    overrides = [f"algorithm.staleness.max_staleness={cap}", f"run.seed={seed}", f"learner.max_steps={args.steps}",
                 f"learner.eval.every={args.eval_every}", f"learner.eval.prompts={args.heldout}"]
    if args.quick:
        overrides += ["learner.batch.groups_per_step=4", "actors.prompts_in_flight=4"]
    overrides += args.set
    started = time.monotonic()
    summary = run_mode(root, "async", 0, args.quick, overrides, name=name)
    curve = [{"version": e["version"], "accuracy": e["accuracy"]} for e in records(root / name, "eval")]
    learner = records(root / name, "learner")
    return {**summary, "cap": cap, "seed": seed, "curve": curve, "wall_s": time.monotonic() - started,
            "staleness_max": max((r["staleness_max"] for r in learner), default=None)}


def summarize_cap(cap: int, runs: Sequence[dict]) -> dict:
    finals = [r["curve"][-1]["accuracy"] for r in runs if r["curve"]]
    gains = [r["curve"][-1]["accuracy"] - r["curve"][0]["accuracy"] for r in runs if len(r["curve"]) > 1]
    final, final_sd = mean_sd(finals) if finals else (float("nan"), 0.0)
    gain, gain_sd = mean_sd(gains) if gains else (float("nan"), 0.0)
    return {"cap": cap, "seeds": len(runs), "final": final, "final_sd": final_sd, "gain": gain, "gain_sd": gain_sd,
            "staleness_mean": statistics.fmean(r["staleness_mean"] for r in runs),
            "learner_busy": statistics.fmean(r["learner_busy"] for r in runs),
            "wall_s": statistics.fmean(r["wall_s"] for r in runs)}


def save(args, runs: Sequence[dict], started: float) -> list[dict]:
    """Write the JSON (per-cap summaries of the runs so far, and every run); returns the summaries."""
    caps = [summarize_cap(cap, [r for r in runs if r["cap"] == cap]) for cap in args.cap_list
            if any(r["cap"] == cap for r in runs)]
    settings = {k: v for k, v in vars(args).items() if k not in ("root", "cap_list")}
    write_result("staleness_study" + (f"_{args.tag}" if args.tag else "") + ("_quick" if args.quick else ""),
                 {"settings": settings, "caps": caps, "runs": list(runs), "total_s": time.monotonic() - started})
    return caps


def plot(runs: Sequence[dict], caps: Sequence[int], path: Path) -> Path:
    """Held-out accuracy against the learner version: each seed thin, each cap's mean bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, cap in enumerate(caps):
        mine = [r for r in runs if r["cap"] == cap and r["curve"]]
        for r in mine:
            ax.plot([p["version"] for p in r["curve"]], [p["accuracy"] for p in r["curve"]], color=f"C{i}",
                    alpha=0.3, linewidth=1)
        versions = sorted({p["version"] for r in mine for p in r["curve"]})
        means = [statistics.fmean(p["accuracy"] for r in mine for p in r["curve"] if p["version"] == v)
                 for v in versions]
        ax.plot(versions, means, color=f"C{i}", marker="o", linewidth=2, label=f"cap {cap} (mean of {len(mine)})")
    accuracy_axes(ax, "learner version")
    return save_figure(fig, path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caps", default="0,1,4,8", help="comma list of algorithm.staleness.max_staleness values")
    parser.add_argument("--seeds", type=int, default=3, help="run.seed 0 … N-1 per cap")
    parser.add_argument("--steps", type=int, default=40, help="learner steps per run")
    parser.add_argument("--eval-every", type=int, default=10, help="versions between held-out evaluations")
    parser.add_argument("--heldout", type=int, default=500, help="held-out problems per evaluation")
    parser.add_argument("--quick", action="store_true", help="plumbing only: caps 0,1, 1 seed, 4 steps, no SFT")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a tiny.yaml override for every run's job (repeatable)")
    parser.add_argument("--tag", default="", help="results/staleness_study_TAG.json (another sweep's file is kept)")
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "staleness_study")
    parser.add_argument("--reuse", action="store_true",
                        help=f"take runs already in ROOT/{RUN_LOG} with the same cap, seed and settings")
    args = parser.parse_args(argv)
    if args.quick:
        args.caps, args.seeds, args.steps, args.eval_every, args.heldout = "0,1", 1, 4, 2, 100
    try:
        args.cap_list = [int(c) for c in args.caps.split(",") if c.strip()]
    except ValueError:
        raise SystemExit(f"staleness_study: --caps={args.caps!r}: expected comma-separated integers") from None
    for name in ("seeds", "steps", "eval_every", "heldout"):
        if getattr(args, name) < 1:
            raise SystemExit(f"staleness_study: --{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    if not args.cap_list or min(args.cap_list) < 0:
        raise SystemExit(f"staleness_study: --caps={args.caps!r}: expected non-negative integers")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if not args.quick:
        warm_start(args.root)
    runs: list[dict] = []
    total, log = len(args.cap_list) * args.seeds, args.root / RUN_LOG
    settings = run_settings(args)
    done = logged_runs(log, settings, "cap") if args.reuse else {}
    for seed in range(args.seeds):  # seed-major: an interrupted sweep still covers every cap
        for cap in args.cap_list:
            if (cap, seed) in done:
                print(f"run {len(runs) + 1}/{total}: cap {cap}, seed {seed} from {log}", flush=True)
                runs.append(done[(cap, seed)])
                continue
            print(f"run {len(runs) + 1}/{total}: cap {cap}, seed {seed}", flush=True)
            runs.append({**run_cap(args.root, cap, seed, args), "settings": settings})
            log_run(log, runs[-1])
            curve = " ".join(f"v{p['version']}:{p['accuracy']:.3f}" for p in runs[-1]["curve"])
            print(f"  {curve} ({runs[-1]['wall_s']:.0f} s)", flush=True)
            save(args, runs, started)  # an interrupted sweep keeps every finished run
    caps = save(args, runs, started)
    if not args.quick:
        drawn = plot(runs, args.cap_list, REPO / "docs" / f"staleness-live{f'-{args.tag}' if args.tag else ''}.png")
        print(f"wrote {drawn}")
    print_table(
        f"live job, async, {args.steps} learner steps from one SFT start: held-out greedy accuracy at exact "
        f"versions ({args.heldout} problems), mean ± sd over {args.seeds} seed(s)",
        ["cap", "seeds", "final", "gain", "staleness mean", "learner busy", "s per run"],
        [[c["cap"], c["seeds"], f"{c['final']:.3f} ± {c['final_sd']:.3f}", f"{c['gain']:+.3f} ± {c['gain_sd']:.3f}",
          f"{c['staleness_mean']:.2f}", f"{c['learner_busy']:.2f}", f"{c['wall_s']:.0f}"] for c in caps],
    )


if __name__ == "__main__":
    main()
