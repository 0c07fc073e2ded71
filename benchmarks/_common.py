"""Shared by the benchmark scripts: a printed table and a JSON result file."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "load_1min": load}


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [header] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(str(r[i])) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))


def write_result(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {path.relative_to(RESULTS_DIR.parent.parent)}")
    return path


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def first_reaching(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """The x of the first (x, accuracy) point with accuracy >= target, else None."""
    for x, accuracy in points:
        if accuracy >= target - 1e-12:
            return x
    return None


def logged_runs(path: Path, settings: dict, key: str) -> dict[tuple[str, int], dict]:
    """The runs an append-only JSON-lines log at ``path`` holds with these ``settings``, by
    (``run[key]``, seed); the last line wins. What a study's ``--reuse`` takes instead of running."""
    if not path.exists():
        return {}
    settings = json.loads(json.dumps(settings))  # tuples compare as JSON lists
    out = {}
    for line in path.read_text().splitlines():
        run = json.loads(line)
        if run.get("settings") == settings:
            out[(run[key], run["seed"])] = run
    return out


def log_run(path: Path, run: dict) -> None:
    """Append one finished run to the log at ``path`` (one write per run: parallel studies may share it)."""
    with path.open("a") as log:
        log.write(json.dumps(run) + "\n")


def pm(value: tuple[float, float] | None, digits: int, scale: float = 1.0) -> str:
    """A (mean, sd) pair as "m ± sd" in units of ``scale``; "—" when absent."""
    if value is None:
        return "—"
    mean, sd = value
    return f"{mean / scale:.{digits}f} ± {sd / scale:.{digits}f}"


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (0 for a single value)."""
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0



def accuracy_axes(ax, xlabel: str) -> None:
    """Label, grid and legend one panel of held-out accuracy against ``xlabel``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out greedy accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (its folder made) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
