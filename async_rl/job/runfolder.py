"""The run folder's layout and its small JSON records.

    RUN_DIR/config.yaml            resolved config
    RUN_DIR/run.json               addresses and PIDs for the operating commands (status, scale, stop)
    RUN_DIR/launches               how many times a job started in this folder (first start, resumes)
    RUN_DIR/metrics/ROLE.jsonl     one JSON object per line, per role (learner, actor-0, eval …)
    RUN_DIR/tensorboard/           TensorBoard events (learner)
    RUN_DIR/checkpoints/           learner checkpoints
    RUN_DIR/buffer/                replay buffer segments and state
    RUN_DIR/buffer/cursor.json     the data cursor: epoch, prompts handed out, those not yet stored
    RUN_DIR/logs/ROLE.log          logs per role
    RUN_DIR/logs/trained-groups.jsonl  the learner's sample log: per step, the groups it trained;
                                   per learner start, the checkpoint version it restored
    RUN_DIR/model/, data/, sft/    the prepared model, prompt data, SFT warm start
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from async_rl.records import RunInfo

RUN_JSON = "run.json"
STOP_FILE = "STOP"
LAUNCHES_FILE = "launches"


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write-then-rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=2)
    os.replace(tmp, path)


def read_run_json(run_dir: Path) -> RunInfo:
    path = Path(run_dir) / RUN_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no run.json (is {run_dir} a run folder of a started job?)")
    return RunInfo.read(json.loads(path.read_text()))


def update_run_json(run_dir: Path, **fields: Any) -> RunInfo:
    """Set some keys of run.json (a key ``RunInfo`` does not declare fails, naming it)."""
    path = Path(run_dir) / RUN_JSON
    current = RunInfo.read(json.loads(path.read_text())) if path.is_file() else RunInfo()
    info = RunInfo.model_validate({**current.model_dump(exclude_unset=True), **fields, "updated_at": time.time()})
    write_json_atomic(path, info.model_dump(mode="json", exclude_unset=True))
    return info


def next_launch(run_dir: Path) -> int:
    """Count one more job start in ``run_dir``; returns its number (0 for the first start).

    Random streams are keyed on it, so a resumed job does not replay the samples of the start
    it resumes from."""
    path = Path(run_dir) / LAUNCHES_FILE
    launch = int(path.read_text()) if path.is_file() else 0
    path.write_text(str(launch + 1))
    return launch


def _stop_path(run_dir: Path, role: str | None) -> Path:
    return Path(run_dir) / (STOP_FILE if role is None else f"{STOP_FILE}-{role}")


def request_stop(run_dir: Path, role: str | None = None) -> None:
    """Ask the whole job (role None) or one role to stop at its next safe point."""
    _stop_path(run_dir, role).write_text(str(time.time()))


def stop_requested(run_dir: Path, role: str | None = None) -> bool:
    """True when the job, or this role, was asked to stop."""
    return _stop_path(run_dir, None).exists() or (role is not None and _stop_path(run_dir, role).exists())


def clear_stop(run_dir: Path, role: str | None = None) -> None:
    _stop_path(run_dir, role).unlink(missing_ok=True)
