"""How M learner ranks start: one process per rank, joined by torch.distributed env vars.

Each rank runs a plain function ``entry(payload: dict)`` named as ``"module:function"``
after ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` are set;
:func:`run_rank` is that rank entry point, and a Ray actor calls it the same way after
setting the same variables. The payload crosses the process boundary as JSON (no pickle).

``launch`` starts the ranks as subprocesses of this interpreter, waits for all, and stops
the others (by their own handles) as soon as one fails, so a crashed rank never leaves
its peers hanging in a collective.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from async_rl.config import is_loopback

LOOPBACK = "127.0.0.1"
# The engine's rendezvous-file variable (learners.engine.RENDEZVOUS_ENV; not imported: that
# module imports DeepSpeed, which this launcher must not need).
RENDEZVOUS_ENV = "ASYNC_RL_RENDEZVOUS"
# How often the parent looks at its ranks while they run.
POLL_S = 0.2
# Grace given to the surviving ranks after one failed, before they are killed.
TERMINATE_GRACE_S = 10.0


class LaunchError(RuntimeError):
    """A rank exited non-zero or the launch timed out."""


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    master_addr: str
    master_port: int
    local_rank: int
    rendezvous: str = ""

    def variables(self) -> dict[str, str]:
        out = {
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
        }
        if self.rendezvous:
            out[RENDEZVOUS_ENV] = self.rendezvous
        return out


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free a moment ago (the rendezvous binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def rendezvous_file(master_addr: str, *, same_machine: bool = False) -> str:
    """A fresh rendezvous file for a group whose ranks all run on this machine (a loopback
    master, or ``same_machine``: a private local Ray, whatever address the job binds), else "".

    The ranks then meet through a file store instead of torch's TCP store, which listens on
    every interface without authentication. Each group gets its own file: a file left by a
    killed group must never be joined by the next one.
    """
    if not (same_machine or is_loopback(master_addr)):
        return ""
    return os.path.join(tempfile.gettempdir(), f"async-rl-rendezvous-{uuid.uuid4().hex}")


def remove_rendezvous(path: str) -> None:
    if path:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def resolve(entry: str) -> Callable[[dict], object]:
    """``"package.module:function"`` → the function."""
    module_name, sep, attr = entry.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"entry={entry!r}: expected 'module:function'")
    return getattr(importlib.import_module(module_name), attr)


def run_rank(entry: str, payload: dict) -> object:
    """The rank entry point: the distributed env is already set; call ``entry(payload)``."""
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE") if k not in os.environ]
    if missing:
        raise LaunchError(f"rank env incomplete: {', '.join(missing)} not set")
    return resolve(entry)(payload)


def rank_command(entry: str, payload: dict) -> list[str]:
    return [sys.executable, "-m", "learners.launch", entry, json.dumps(payload)]


def child_env(env: RankEnv, extra: dict[str, str] | None) -> dict[str, str]:
    """The parent's env plus the rank's variables; children import what the parent can, and
    share the cores instead of each starting one compute thread per core."""
    out = dict(os.environ)
    out.update(env.variables())
    if is_loopback(env.master_addr):
        out.setdefault("GLOO_SOCKET_IFNAME", "lo")  # else gloo listens on the host's address
    paths = [p for p in sys.path if p] + out.get("PYTHONPATH", "").split(os.pathsep)
    out["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    # Ranks share the machine's cores; more OpenMP threads than cores makes them spin-wait
    # (an SFT step ran 3.6x slower with torch's default thread count here).
    out.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // env.world_size)))
    out.update(extra or {})
    return out


def launch(
    entry: str,
    world_size: int,
    payload: dict | None = None,
    *,
    timeout_s: float | None = None,
    env: dict[str, str] | None = None,
    master_port: int | None = None,
) -> None:
    """Run ``entry(payload)`` on ``world_size`` local ranks; raise if any rank fails."""
    port = master_port or free_port()
    rendezvous = rendezvous_file(LOOPBACK)
    procs = []
    try:
        for rank in range(world_size):
            rank_env = RankEnv(rank, world_size, LOOPBACK, port, local_rank=rank, rendezvous=rendezvous)
            procs.append(
                subprocess.Popen(rank_command(entry, payload or {}), env=child_env(rank_env, env))
            )
        wait_all(procs, timeout_s)
    finally:
        stop(procs)
        remove_rendezvous(rendezvous)


def wait_all(procs: list[subprocess.Popen], timeout_s: float | None) -> None:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed:
                raise LaunchError(f"learner rank {failed[0]} exited with code {procs[failed[0]].returncode}")
            if deadline is not None and time.monotonic() > deadline:
                raise LaunchError(f"learner ranks still running after {timeout_s:.0f} s")
            time.sleep(POLL_S)
        codes = [p.returncode for p in procs]
        if any(codes):
            rank = next(i for i, c in enumerate(codes) if c)
            raise LaunchError(f"learner rank {rank} exited with code {codes[rank]}")
    finally:
        stop(procs)


def stop(procs: list[subprocess.Popen]) -> None:
    """Terminate ranks still running (ours only, by handle), then kill after a grace period."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=TERMINATE_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m learners.launch module:function PAYLOAD_JSON", file=sys.stderr)
        return 2
    run_rank(argv[0], json.loads(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
