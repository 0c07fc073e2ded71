"""The live view of a running job: rich on a terminal, one plain line per change otherwise."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from async_rl.job.metrics import read_metrics


def snapshot(run_dir: Path, status: dict[str, Any] | None = None) -> dict[str, Any]:
    """The figures the display and ``async-rl status`` show, from the run folder's metrics."""
    records = read_metrics(run_dir)
    learner = [r for r in records if r.get("role") == "learner"]
    evals = [r for r in records if r.get("role") == "eval"]
    actors: dict[str, dict] = {}
    for record in records:
        if record.get("role", "").startswith("actor"):
            actors[record["role"]] = record
    last = learner[-1] if learner else {}
    out = {
        "version": last.get("version", 0),
        "step_s": last.get("step_s"),
        "reward_mean": last.get("reward_mean"),
        "train_accuracy": last.get("accuracy"),
        "staleness_mean": last.get("staleness_mean"),
        "staleness_max": last.get("staleness_max"),
        "learner_busy": last.get("busy_fraction"),
        "publish_s": last.get("publish_s"),
        "heldout_accuracy": evals[-1].get("accuracy") if evals else None,
        "heldout_version": evals[-1].get("version") if evals else None,
        "first_heldout_accuracy": evals[0].get("accuracy") if evals else None,
        "tokens_per_s": sum(a.get("tokens_per_s") or 0 for a in actors.values()) or None,
        "weight_update_s": max((a.get("weight_update_s") or 0 for a in actors.values()), default=None),
        "actor_versions": {k: a.get("weight_version") for k, a in actors.items()},
        "buffer_batches_refused": sum(a.get("buffer_batches_refused") or 0 for a in actors.values()),
        "buffer_stalled_s": max((a.get("buffer_stalled_s") or 0 for a in actors.values()), default=0),
    }
    if status:
        out.update(
            actors_alive=len(status.get("actors", [])),
            learner_ranks=status.get("learner_ranks"),
            buffer=status.get("buffer_stats"),
            events=status.get("events", [])[-5:],
        )
    return out


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def render(snap: dict[str, Any], elapsed_s: float):
    from rich.table import Table

    table = Table(title=f"async-rl — {elapsed_s / 60:.1f} min", show_header=False, expand=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    buffer = snap.get("buffer") or {}
    rows = [
        ("policy version", _fmt(snap["version"])),
        ("learner step", f"{_fmt(snap['step_s'], '.2f')} s (busy {_fmt(snap['learner_busy'], '.0%')})"),
        ("actor tokens/s", _fmt(snap["tokens_per_s"], ".0f")),
        ("train reward / accuracy", f"{_fmt(snap['reward_mean'])} / {_fmt(snap['train_accuracy'])}"),
        ("held-out accuracy", f"{_fmt(snap['heldout_accuracy'])} (v{_fmt(snap['heldout_version'])}; start {_fmt(snap['first_heldout_accuracy'])})"),
        ("staleness mean / max", f"{_fmt(snap['staleness_mean'], '.2f')} / {_fmt(snap['staleness_max'], '.0f')}"),
        ("buffer rows / groups", f"{_fmt(buffer.get('rows'))} / {_fmt(buffer.get('groups'))}"),
        ("prompts of the epoch", _prompts(buffer.get("prompts"))),
        ("actors alive", _fmt(snap.get("actors_alive"))),
        ("actor buffer writes", f"{_fmt(snap.get('buffer_batches_refused'))} refused, "
                                f"stalled {_fmt(snap.get('buffer_stalled_s'), '.0f')} s"),
        ("last weight sync", f"publish {_fmt(snap['publish_s'], '.3f')} s, apply {_fmt(snap['weight_update_s'], '.3f')} s"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    for event in snap.get("events") or []:
        table.add_row("event", event)
    return table


def _prompts(p: dict | None) -> str:
    """The data cursor's figures (``buffer/cursor.py``) as one line."""
    if not p or "error" in p:
        return "-"
    return f"epoch {p['epoch']}: {p['done']} done / {p['in_flight']} in flight / {p['pending']} pending"


def plain_line(snap: dict[str, Any], elapsed_s: float) -> str:
    return (
        f"[{elapsed_s / 60:5.1f} min] v{snap['version']} reward={_fmt(snap['reward_mean'])} "
        f"heldout={_fmt(snap['heldout_accuracy'])} staleness={_fmt(snap['staleness_mean'], '.2f')}"
        f"/{_fmt(snap['staleness_max'], '.0f')} tok/s={_fmt(snap['tokens_per_s'], '.0f')} "
        f"actors={_fmt(snap.get('actors_alive'))}"
    )


class LiveView:
    """Context manager: ``update(snapshot)`` refreshes the screen or prints a changed line."""

    def __init__(self, console, *, mode: str = "auto"):
        self.console = console
        self.rich = mode == "rich" or (mode == "auto" and console.is_terminal)
        self.started = time.monotonic()
        self.live = None
        self.last_line = ""

    def __enter__(self) -> LiveView:
        if self.rich:
            from rich.live import Live

            self.live = Live(console=self.console, refresh_per_second=2, transient=False)
            self.live.__enter__()
        return self

    def update(self, snap: dict[str, Any]) -> None:
        elapsed = time.monotonic() - self.started
        if self.live is not None:
            self.live.update(render(snap, elapsed))
            return
        line = plain_line(snap, elapsed)
        key = line.split("]", 1)[1].split(" tok/s=")[0]
        if key != self.last_line:
            self.console.print(line, highlight=False)
            self.last_line = key

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)
