"""The live view of a running job: rich on a terminal, one plain line per change otherwise."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from async_rl.job.metrics import read_metrics
from async_rl.records import (
    ActorMetricsRecord,
    HeldoutRecord,
    JobStatus,
    LearnerStepRecord,
    Snapshot,
)


def snapshot(run_dir: Path, status: JobStatus | None = None) -> Snapshot:
    """The figures the display and ``async-rl status`` show, from the run folder's metrics."""
    records = read_metrics(run_dir)
    learner = [LearnerStepRecord.read(r) for r in records if r.get("role") == "learner"]
    evals = [HeldoutRecord.read(r) for r in records if r.get("role") == "eval"]
    actors: dict[str, ActorMetricsRecord] = {}
    for record in records:
        if record.get("role", "").startswith("actor"):
            actors[record["role"]] = ActorMetricsRecord.read(record)
    last = learner[-1] if learner else LearnerStepRecord.read({})
    first_eval, last_eval = (evals[0], evals[-1]) if evals else (HeldoutRecord.read({}),) * 2
    figures = dict(
        version=last.version or 0,
        step_s=last.step_s,
        reward_mean=last.reward_mean,
        train_accuracy=last.accuracy,
        staleness_mean=last.staleness_mean,
        staleness_max=last.staleness_max,
        learner_busy=last.busy_fraction,
        publish_s=last.publish_s,
        heldout_accuracy=last_eval.accuracy,
        heldout_version=last_eval.version,
        first_heldout_accuracy=first_eval.accuracy,
        tokens_per_s=sum(a.tokens_per_s or 0 for a in actors.values()) or None,
        weight_update_s=max((a.weight_update_s or 0.0 for a in actors.values()), default=None),
        actor_versions={k: a.weight_version for k, a in actors.items()},
        buffer_batches_refused=sum(a.buffer_batches_refused or 0 for a in actors.values()),
        buffer_stalled_s=max((a.buffer_stalled_s or 0.0 for a in actors.values()), default=0.0),
    )
    if status:
        figures.update(
            actors_alive=len(status.actors),
            learner_ranks=status.learner_ranks,
            buffer=status.buffer_stats,
            events=status.events[-5:],
        )
    return Snapshot(**figures)


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def render(snap: Snapshot, elapsed_s: float):
    from rich.table import Table

    table = Table(title=f"async-rl — {elapsed_s / 60:.1f} min", show_header=False, expand=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    buffer = snap.buffer
    rows = [
        ("policy version", _fmt(snap.version)),
        ("learner step", f"{_fmt(snap.step_s, '.2f')} s (busy {_fmt(snap.learner_busy, '.0%')})"),
        ("actor tokens/s", _fmt(snap.tokens_per_s, ".0f")),
        ("train reward / accuracy", f"{_fmt(snap.reward_mean)} / {_fmt(snap.train_accuracy)}"),
        ("held-out accuracy", f"{_fmt(snap.heldout_accuracy)} (v{_fmt(snap.heldout_version)}; start {_fmt(snap.first_heldout_accuracy)})"),
        ("staleness mean / max", f"{_fmt(snap.staleness_mean, '.2f')} / {_fmt(snap.staleness_max, '.0f')}"),
        ("buffer rows / groups", f"{_fmt(buffer and buffer.rows)} / {_fmt(buffer and buffer.groups)}"),
        ("prompts of the epoch", _prompts(buffer and buffer.prompts)),
        ("leased to the learner", _leases(buffer and buffer.leases)),
        ("actors alive", _fmt(snap.actors_alive)),
        ("actor buffer writes", f"{_fmt(snap.buffer_batches_refused)} refused, "
                                f"stalled {_fmt(snap.buffer_stalled_s, '.0f')} s"),
        ("last weight sync", f"publish {_fmt(snap.publish_s, '.3f')} s, apply {_fmt(snap.weight_update_s, '.3f')} s"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    for event in snap.events or []:
        table.add_row("event", event)
    return table


def _prompts(p: dict | None) -> str:
    """The data cursor's figures (``buffer/cursor.py``) as one line."""
    if not p or "error" in p:
        return "-"
    return f"epoch {p['epoch']}: {p['done']} done / {p['in_flight']} in flight / {p['pending']} pending"


def _leases(leases: dict | None) -> str:
    """Groups the learner holds until a checkpoint covers their training (``buffer/store.py``)."""
    if not leases:
        return "-"
    return f"{leases['groups']} groups in {leases['outstanding']} leases"


def plain_line(snap: Snapshot, elapsed_s: float) -> str:
    return (
        f"[{elapsed_s / 60:5.1f} min] v{snap.version} reward={_fmt(snap.reward_mean)} "
        f"heldout={_fmt(snap.heldout_accuracy)} staleness={_fmt(snap.staleness_mean, '.2f')}"
        f"/{_fmt(snap.staleness_max, '.0f')} tok/s={_fmt(snap.tokens_per_s, '.0f')} "
        f"actors={_fmt(snap.actors_alive)}"
    )


class LiveView:
    """Context manager: ``update(snapshot)`` refreshes the screen or prints a changed line."""

    def __init__(self, console, *, mode: str = "auto"):
        self.console = console
        self.rich = mode == "rich" or (mode == "auto" and console.is_terminal)
        self.started = time.monotonic()
        self.live = None
        self.last_line = ""
        self.printed_events: set[str] = set()

    def __enter__(self) -> LiveView:
        if self.rich:
            from rich.live import Live

            self.live = Live(console=self.console, refresh_per_second=2, transient=False)
            self.live.__enter__()
        return self

    def update(self, snap: Snapshot, events: Sequence[str] = ()) -> None:
        """Show ``snap``; in plain mode also each of the controller's ``events`` not printed yet
        (a restart, a lost node), so the job's log has them in order."""
        elapsed = time.monotonic() - self.started
        if self.live is not None:
            self.live.update(render(snap, elapsed))
            return
        for event in events:
            if event not in self.printed_events:
                self.console.print(f"event {event}", highlight=False, soft_wrap=True)  # one line in a log
                self.printed_events.add(event)
        line = plain_line(snap, elapsed)
        key = line.split("]", 1)[1].split(" tok/s=")[0]
        if key != self.last_line:
            self.console.print(line, highlight=False)
            self.last_line = key

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)
