"""Fault injection for tests and drills: a role's process dies as in a crash (SIGKILL), by the
PID that ``async-rl status`` reports for it; supervision then restarts the role."""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping


def kill_role(pids: Mapping[str, int], role: str) -> int:
    """SIGKILL ``role`` ("actor-0", "learner-0", "evaluator"; a key of ``JobStatus.pids``), run
    on the role's machine; returns the PID."""
    if role not in pids:
        raise KeyError(f"role {role!r}: no live process (live: {', '.join(sorted(pids)) or 'none'})")
    pid = pids[role]
    os.kill(pid, signal.SIGKILL)
    return pid
