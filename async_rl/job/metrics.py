"""Metrics: one JSONL file per role, plus TensorBoard events for the learner.

Each role writes its record type of ``async_rl/records.py`` (``LearnerStepRecord``,
``ActorMetricsRecord``, ``HeldoutRecord``); every row also carries ``time`` (unix seconds) and the
writer's ``role``. Readers (the live display, ``async-rl status``, ``async-rl
plot``) only read these files, so they work on a live job and on a dead job's folder alike.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from async_rl.records import Record


class MetricsWriter:
    def __init__(self, run_dir: Path, role: str, *, tensorboard: bool = False):
        self.role = role
        self.path = Path(run_dir) / "metrics" / f"{role}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = self.path.open("a", buffering=1)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard" / role))

    def write(self, record: Record, *, step: int | None = None) -> dict[str, Any]:
        clean = {k: _plain(v) for k, v in record.row().items()}
        clean.setdefault("time", time.time())
        clean["role"] = self.role
        self._handle.write(json.dumps(clean) + "\n")
        if self._tb is not None and step is not None:
            for key, value in clean.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        return clean

    def close(self) -> None:
        self._handle.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path, role: str | None = None) -> list[dict[str, Any]]:
    """Every record of one role (or all roles), in file order; torn last lines are skipped."""
    folder = Path(run_dir) / "metrics"
    paths = [folder / f"{role}.jsonl"] if role else sorted(folder.glob("*.jsonl"))
    records = []
    for path in paths:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def last_record(run_dir: Path, role: str) -> dict[str, Any] | None:
    records = read_metrics(run_dir, role)
    return records[-1] if records else None


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
