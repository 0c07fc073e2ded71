"""Runs one untrusted program against a list of test inputs in a sandbox.

One sandbox launch per program: the in-sandbox harness (``sandbox_harness.py``) forks
one child per test with its own rlimits, wall-clock timeout, output cap and fresh empty
directory, and reports what each test printed. Expected outputs never enter the sandbox;
:mod:`async_rl.rewards.code` compares on the host.

Whatever the isolation level (``sandbox_levels.py``): a fresh working directory per
program, a scrubbed environment, a non-root user, per-test CPU/address-space/process/
file-size/open-file rlimits, a per-test wall-clock timeout, a cap on output, and a host
deadline after which the launcher's whole process group is SIGKILLed — so the wall-clock
of :func:`run_program` is bounded by ``budget_s + START_SLACK_S + EXIT_GRACE_S`` (plus
the time to SIGKILL and reap) whatever
the program does. It is safe to call from a pebble worker: it only starts subprocesses
and reaps every one of them before returning.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from async_rl.rewards import sandbox_levels as levels
from async_rl.rewards.sandbox_levels import Identity, SandboxUnavailable

log = logging.getLogger(__name__)

START_SLACK_S = 1.0  # firejail starts in ~60 ms idle; leave room for a loaded machine
EXIT_GRACE_S = 0.5  # after the harness says done, time for the jail to exit on its own
REAP_MARGIN_S = 0.5  # killing and reaping a jail full of processes (a fork bomb) under load
STDERR_TAIL_BYTES = 2048  # launcher diagnostics (firejail/bwrap errors) kept for the report
JSON_ESCAPE_FACTOR = 6  # json.dumps turns one undecodable byte into "\ufffd" (6 bytes)
RESULT_OVERHEAD_BYTES = 8192  # one result line's fields besides stdout (error tail, etc.)
HARNESS_SOURCE = Path(__file__).with_name("sandbox_harness.py")
STALE_AFTER_S = 600.0  # far longer than any run's bounded wall-clock
RUN_MARKER_ENV = "ASYNCRL_SANDBOX_RUN"  # finds an rlimits-level run's stragglers
TEST_STATUSES = ("ok", "timeout", "runtime_error", "memory_limit", "output_limit")


@dataclass(frozen=True)
class SandboxLimits:
    """Per-test limits and the program's overall wall-clock budget."""

    test_timeout_s: float = 2.0
    budget_s: float = 3.0
    memory_bytes: int = 1 << 30
    output_bytes: int = 1 << 20

    @classmethod
    def from_config(cls, cfg) -> SandboxLimits:
        """From a ``RewardConfig``; the budget leaves the pool's timeout room for the jail's
        start-up, exit and clean-up, so the pool never has to kill a worker mid-run."""
        overhead = START_SLACK_S + EXIT_GRACE_S + REAP_MARGIN_S
        budget = min(cfg.code.time_budget_s, max(cfg.timeout_s - overhead, 0.1))
        return cls(
            test_timeout_s=min(cfg.code.test_timeout_s, budget),
            budget_s=budget,
            memory_bytes=cfg.code.memory_mb << 20,
            output_bytes=cfg.code.output_bytes,
        )


@dataclass(frozen=True)
class CaseRun:
    """What one test did. ``status`` is one of TEST_STATUSES; ``result`` is the JSON text
    of a function call's return value (call mode, status ``ok`` only)."""

    status: str
    stdout: str = ""
    result: str | None = None
    error: str | None = None
    time_s: float = 0.0


@dataclass(frozen=True)
class SandboxRun:
    """One program's runs, one per input in order, and the level that isolated them."""

    runs: list[CaseRun]
    isolation: str
    compile_error: str | None = None


def run_program(
    source: str,
    inputs: list,
    *,
    mode: str,
    fn_name: str | None,
    limits: SandboxLimits,
    level: str,
    ident: Identity,
) -> SandboxRun:
    """Runs ``source`` on every input (stdin text, or a list of call arguments)."""
    base = _workdir_base()
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=base))
    marker = secrets.token_hex(8)
    try:
        with levels.lease(ident, base / "users") as user:
            job = _job(inputs, mode, fn_name, limits, level)
            _stage(workdir, source, job, user)
            cmd = levels.command(level, workdir, base, user)
            lines, failure = _launch(cmd, workdir, level, user, limits, len(inputs), marker)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return _collect(lines, len(inputs), level, failure)


def _job(inputs: list, mode: str, fn_name: str | None, limits: SandboxLimits, level: str) -> dict:
    return {
        "mode": mode,
        "fn_name": fn_name,
        "inputs": inputs,
        "timeout_s": limits.test_timeout_s,
        "cpu_s": max(1, int(limits.test_timeout_s + 0.999)),
        "memory_bytes": limits.memory_bytes,
        "output_bytes": limits.output_bytes,
        "fsize_bytes": levels.MAX_FILE_BYTES,
        "nproc": levels.MAX_PROCESSES,
        "budget_s": limits.budget_s,
        "kill_all_on_exit": level in levels.PID_NAMESPACED,
    }


def _workdir_base() -> Path:
    """A directory others may traverse but not list, so a program cannot find the
    working directories of programs being checked beside it (firejail also hides it)."""
    base = Path(tempfile.gettempdir()) / f"asyncrl-sandbox-{os.geteuid()}"
    base.mkdir(mode=0o711, exist_ok=True)
    if base.is_symlink() or base.stat().st_uid != os.geteuid():
        raise SandboxUnavailable(f"{base} is not ours; remove it")
    os.chmod(base, 0o711)
    return base


def sweep_stale_workdirs() -> int:
    """Removes run directories older than STALE_AFTER_S: a worker killed mid-run (a pool
    timeout) cannot clean its own. Live runs are far younger. Returns how many went."""
    removed = 0
    for path in _workdir_base().glob("run-*"):
        try:
            if time.time() - path.stat().st_mtime > STALE_AFTER_S:
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
        except OSError:
            continue
    return removed


def _stage(workdir: Path, source: str, job: dict, ident: Identity) -> None:
    shutil.copyfile(HARNESS_SOURCE, workdir / "harness.py")
    (workdir / "solution.py").write_text(source, encoding="utf-8", errors="replace")
    (workdir / "job.json").write_text(json.dumps(job), encoding="utf-8")
    if ident.switches:
        for path in (workdir, *workdir.iterdir()):
            os.chown(path, ident.uid, ident.gid)
    os.chmod(workdir, 0o700)


def _launch(
    cmd: list[str],
    workdir: Path,
    level: str,
    ident: Identity,
    limits: SandboxLimits,
    n: int,
    marker: str,
) -> tuple[list[dict], str | None]:
    """Starts the jail in its own session, reads result lines until ``done`` or the
    deadline, then makes sure nothing it started is left running."""
    runner = levels.launch_identity(level, ident)
    switch = (
        {"user": runner.uid, "group": runner.gid, "extra_groups": []} if runner.switches else {}
    )
    proc = subprocess.Popen(
        cmd,
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**levels.launch_env(level, workdir, ident), RUN_MARKER_ENV: marker},
        start_new_session=True,
        close_fds=True,
        **switch,
    )
    cap = (
        n * (limits.output_bytes * JSON_ESCAPE_FACTOR + RESULT_OVERHEAD_BYTES)
        + RESULT_OVERHEAD_BYTES
    )
    deadline = time.monotonic() + limits.budget_s + START_SLACK_S
    try:
        lines, failure, stderr = _read_results(proc, deadline, cap)
    finally:
        _finish(proc, level, ident, marker)
    if failure and stderr:
        failure = f"{failure}; launcher said: {stderr}"
    return lines, failure


def _read_results(
    proc: subprocess.Popen, deadline: float, cap: int
) -> tuple[list[dict], str | None, str]:
    """Result lines from the harness; ``failure`` says why they stopped early, if they did."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    sel.register(proc.stderr, selectors.EVENT_READ)
    out, err, lines, total = bytearray(), bytearray(), [], 0
    failure = "the sandbox exited before reporting every test"
    while sel.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            failure = "host deadline reached"
            break
        for key, _ in sel.select(left):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fileobj)
            elif key.fileobj is proc.stderr:
                err = (err + chunk)[-STDERR_TAIL_BYTES:]
            else:
                total += len(chunk)
                out += chunk
                *complete, out = out.split(b"\n")
                out = bytearray(out)
                lines += [_parse_line(line) for line in complete if line.strip()]
        if lines and lines[-1].get("done"):
            failure = None
            break
        if total > cap:
            failure = "the sandbox wrote more than its output cap"
            break
    sel.close()
    return lines, failure, err.decode("utf-8", "replace").strip()


def _parse_line(line: bytes) -> dict:
    try:
        parsed = json.loads(line)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _finish(proc: subprocess.Popen, level: str, ident: Identity, marker: str) -> None:
    """Gives the jail EXIT_GRACE_S to exit, then SIGKILLs its process group (for the
    namespaced levels that takes the whole PID namespace down with it)."""
    try:
        proc.wait(timeout=EXIT_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    if level not in levels.PID_NAMESPACED:
        _kill_stragglers(ident, marker)


def _kill_stragglers(ident: Identity, marker: str) -> None:
    """Without a PID namespace, a daemon that left the session is found by the run
    marker in its environment (a program that rewrites its environ escapes this: the
    rlimits level is announced as weak)."""
    uid = ident.uid if ident.switches else os.geteuid()
    for proc in psutil.process_iter(["uids"]):
        try:
            if proc.info["uids"].real == uid and proc.environ().get(RUN_MARKER_ENV) == marker:
                proc.kill()
        except (psutil.Error, AttributeError):
            continue


def _collect(lines: list[dict], n: int, level: str, failure: str | None) -> SandboxRun:
    compile_error = next((line["compile_error"] for line in lines if "compile_error" in line), None)
    if compile_error is not None:
        return SandboxRun([CaseRun("runtime_error", error=compile_error)] * n, level, compile_error)
    by_index = {line["i"]: line for line in lines if isinstance(line.get("i"), int)}
    missing_status = "timeout" if failure == "host deadline reached" else "runtime_error"
    runs = []
    for i in range(n):
        line = by_index.get(i)
        if line is None or line.get("status") not in TEST_STATUSES:
            runs.append(CaseRun(missing_status, error=failure or "no result from the sandbox"))
            continue
        runs.append(
            CaseRun(
                status=line["status"],
                stdout=line.get("stdout") or "",
                result=line.get("result"),
                error=line.get("error"),
                time_s=float(line.get("time_s") or 0.0),
            )
        )
    return SandboxRun(runs, level)


# --------------------------------------------------------------------------- level choice

@dataclass(frozen=True)
class Choice:
    level: str
    ident: Identity
    at: float  # time.monotonic() of the probe
    strongest: bool  # the strongest candidate worked: never probed again in this process


_CHOSEN: dict[tuple[str, str], Choice] = {}
_REFUSED: dict[tuple[str, str], tuple[str, float]] = {}  # why no level works, and since when
PROBE_SOURCE = "print(sum(map(int, input().split())))"
# A probe that times out is retried with more time: on a loaded machine a sandbox start can
# take seconds, and a slow start must not lock a worker into a weaker level.
PROBE_TIMEOUTS_S = (5.0, 15.0, 45.0)
REPROBE_STRONGER_S = 300.0  # a worker on a weaker level than the best installed retries it


def select_isolation(
    preference: str = "auto", user: str = "asyncrl-sandbox"
) -> tuple[str, Identity]:
    """The strongest level that really runs a program here, probed once per process and
    reported once (loudly when weak). ``auto`` picks only isolating levels and refuses when
    none works; a named level that fails is an error, never a fallback."""
    key = (preference, user)
    chosen = _CHOSEN.get(key)
    if chosen and (chosen.strongest or time.monotonic() - chosen.at < REPROBE_STRONGER_S):
        return chosen.level, chosen.ident
    refused = _REFUSED.get(key)
    if refused and time.monotonic() - refused[1] < REPROBE_STRONGER_S:
        raise SandboxUnavailable(refused[0])  # every program refused fast, probed again later
    ident = levels.sandbox_identity(user)
    sweep_stale_workdirs()
    failures: dict[str, str] = {}
    order = levels.candidates(preference, ident)
    for level in order:
        why = probe_until_conclusive(level, ident)
        if why is None:
            if chosen is None or chosen.level != level:
                levels.report(level, failures)
            _CHOSEN[key] = Choice(level, ident, time.monotonic(), strongest=level == order[0])
            return level, ident
        failures[level] = why
    message = _no_sandbox_message(preference, failures)
    if key not in _REFUSED:
        log.error("code sandbox: %s", message)
    _REFUSED[key] = (message, time.monotonic())
    raise SandboxUnavailable(message)


def _no_sandbox_message(preference: str, failures: dict[str, str]) -> str:
    tried = "; ".join(f"{lvl}: {why}" for lvl, why in failures.items()) or "none installed"
    if preference != "auto":
        return f"reward.code.isolation={preference!r} does not work here ({tried})"
    return (
        f"reward.code.isolation='auto': no isolating sandbox works here ({tried}); untrusted "
        "code is not run. Install firejail or bubblewrap (scripts/install.sh, as root), or "
        "set reward.code.isolation=rlimits to accept programs with network and file access"
    )


def probe_until_conclusive(level: str, ident: Identity) -> str | None:
    """:func:`probe`, retried with more time while it only times out (a loaded machine)."""
    why = None
    for timeout_s in PROBE_TIMEOUTS_S:
        why = probe(level, ident, timeout_s=timeout_s)
        if why is None or not why.startswith("timeout"):
            return why
    return why


def probe(level: str, ident: Identity, *, timeout_s: float = PROBE_TIMEOUTS_S[0]) -> str | None:
    """None when ``level`` runs a trivial program correctly, else why not."""
    limits = SandboxLimits(test_timeout_s=timeout_s, budget_s=timeout_s)
    try:
        run = run_program(
            PROBE_SOURCE,
            ["2 3\n"],
            mode="stdin",
            fn_name=None,
            limits=limits,
            level=level,
            ident=ident,
        )
    except (OSError, SandboxUnavailable, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"[:300]
    first = run.runs[0]
    if first.status == "ok" and first.stdout.strip() == "5":
        return None
    return f"{first.status}: {first.error or first.stdout!r}"[:300]
