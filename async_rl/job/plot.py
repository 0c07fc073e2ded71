"""``async-rl plot RUN_DIR``: reward, accuracy, staleness and throughput in one PNG."""

from __future__ import annotations

from pathlib import Path

from async_rl.job.metrics import read_metrics

PANELS = [
    # (title, role prefix, x key, y keys)
    ("train reward (learner batches)", "learner", "version", ["reward_mean"]),
    ("held-out accuracy", "eval", "version", ["accuracy"]),
    ("staleness of trained rows", "learner", "version", ["staleness_mean", "staleness_max"]),
    ("actor throughput (tokens/s)", "actor", "elapsed_min", ["tokens_per_s"]),
]


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"{run_dir}/metrics: no metrics recorded (is it a run folder?)")
    start = min(r["time"] for r in records if "time" in r)
    for record in records:
        record["elapsed_min"] = (record.get("time", start) - start) / 60
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (title, role, x_key, y_keys) in zip(axes.flat, PANELS, strict=True):
        rows = [r for r in records if r.get("role", "").startswith(role)]
        for key in y_keys:
            points = [(r[x_key], r[key]) for r in rows if r.get(key) is not None and x_key in r]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="." if len(points) < 50 else None, label=key)
        ax.set_title(title)
        ax.set_xlabel("policy version" if x_key == "version" else "minutes")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"async-rl run {run_dir.name}")
    fig.tight_layout()
    out = out or run_dir / "plot.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
