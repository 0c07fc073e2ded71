"""Shared by the sandbox integration tests: configs, fenced responses, stray-process checks."""

from __future__ import annotations

import json
import os
import time

import psutil

from async_rl.config import RewardConfig

DAEMON_TAG = "987.6543"  # a daemon's `sleep` argument, unique enough to find it on the host


def fast_config() -> RewardConfig:
    """Short limits so adversarial programs time out quickly."""
    return RewardConfig(timeout_s=4.5, code={"test_timeout_s": 1.0, "time_budget_s": 2.5, "memory_mb": 256})


def with_code(cfg: RewardConfig, **code) -> RewardConfig:
    """``cfg`` with some ``reward.code`` fields changed."""
    return cfg.model_copy(update={"code": cfg.code.model_copy(update=code)})


def fenced(program: str) -> str:
    return f"<think>I will write it.</think>\nHere it is:\n```python\n{program}\n```\n"


def stdin_cases(pairs: list[tuple[str, str]]) -> str:
    return json.dumps({"inputs": [i for i, _ in pairs], "outputs": [o for _, o in pairs]})


def sandbox_uids() -> set[int]:
    """The uids programs run as (the leased pool), when they differ from ours (the trainer is root)."""
    if os.geteuid() != 0:
        return set()
    from async_rl.rewards.sandbox_levels import pool, sandbox_identity

    return {member.uid for member in pool(sandbox_identity(RewardConfig().code.sandbox_user))}


# The kernel tears a pid namespace down asynchronously after its init dies (bwrap, unshare):
# a fork bomb's hundreds of children take a moment to go. Only what outlives this is a leak.
STRAY_GRACE_S = 10.0


def stray_processes(grace_s: float = STRAY_GRACE_S) -> list[str]:
    """Processes a sandboxed program left on the host after ``grace_s``: anything running as
    the sandbox user, or any harness/daemon by command line. The tests run one program at a time."""
    deadline = time.monotonic() + grace_s
    while True:
        strays = _strays_now()
        if not strays or time.monotonic() > deadline:
            return strays
        time.sleep(0.2)


def _strays_now() -> list[str]:
    uids = sandbox_uids()
    strays = []
    for proc in psutil.process_iter(["uids", "cmdline", "status"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if (
                proc.info["uids"].real in uids
                or "harness.py" in cmdline
                or DAEMON_TAG in cmdline
            ):
                strays.append(f"{proc.pid}: {cmdline[:80]}")
        except (psutil.Error, TypeError):
            continue
    return strays
