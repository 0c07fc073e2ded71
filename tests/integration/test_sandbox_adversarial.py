"""Hostile programs through the real code reward and the real sandbox (Firejail here).

Each case asserts the reward the program gets AND that the host is unaffected: no
process left behind, no file written, no secret seen, no connection accepted.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from sandbox_helpers import DAEMON_TAG, fast_config, fenced, stdin_cases, stray_processes, with_code

from async_rl.rewards.code import score
from async_rl.rewards.sandbox import select_isolation, sweep_stale_workdirs

PROJECT = Path(__file__).resolve().parents[2]
ONE_CASE = stdin_cases([("1\n", "1\n")])
HOST_BOUND_S = 30  # far above budget + start-up: only a hang (unbounded wall-clock) trips it


@pytest.fixture(scope="module")
def cfg():
    return fast_config()


@pytest.fixture(autouse=True)
def host_is_clean_after():
    yield
    assert stray_processes() == []


def check(program: str, cfg, ground_truth: str = ONE_CASE):
    start = time.monotonic()
    record = score(fenced(program), ground_truth, {}, cfg)
    assert time.monotonic() - start < HOST_BOUND_S
    return record


def test_the_strongest_isolation_is_firejail_on_a_machine_set_up_by_install(cfg):
    level, _ = select_isolation(cfg.code.isolation, cfg.code.sandbox_user)
    assert level == "firejail"


def test_an_infinite_loop_times_out(cfg):
    record = check("while True:\n    pass", cfg)
    assert record.score == 0.0 and record.info["verdicts"] == ["timeout"]


def test_sleeping_past_the_timeout_times_out_and_the_call_stays_bounded(cfg):
    record = check("import time\ntime.sleep(60)\nprint(1)", cfg, stdin_cases([("1\n", "1\n")] * 4))
    assert record.score == 0.0
    assert set(record.info["verdicts"]) == {"timeout"} and record.info["total"] == 4


def test_a_fork_bomb_is_contained_and_reaped(cfg):
    program = (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    )
    record = check(program, cfg)
    assert record.score == 0.0 and record.info["verdicts"][0] in ("timeout", "runtime_error")
    assert subprocess.run(["true"], check=False).returncode == 0  # the host can still fork


def test_a_program_holding_the_process_limit_does_not_starve_one_checked_beside_it(cfg):
    """RLIMIT_NPROC counts per user: each run leases its own sandbox user, so a program that
    holds all of its processes cannot make a program checked at the same time fail."""
    from concurrent.futures import ThreadPoolExecutor

    from async_rl.rewards.sandbox_levels import MAX_PROCESSES

    hog = (
        "import os, time\nfor _ in range(100000):\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(60)\n        os._exit(0)\n"
        "time.sleep(60)"
    )
    slow = with_code(cfg, test_timeout_s=25.0, time_budget_s=25.0).model_copy(update={"timeout_s": 30.0})
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(score, fenced(hog), ONE_CASE, {}, slow)
        busiest = wait_for_a_user_with(MAX_PROCESSES - 16)
        beside = check("print(input())", cfg)
        still = processes_per_user().get(busiest, 0)
        assert held.result().score == 0.0
    assert still >= MAX_PROCESSES - 16  # the hog held its limit while the other program ran
    assert beside.score == 1.0, beside.info


def processes_per_user() -> dict[int, int]:
    from sandbox_helpers import sandbox_uids

    uids, counts = sandbox_uids() or {os.geteuid()}, {}
    for proc in psutil.process_iter(["uids"]):
        try:
            uid = proc.info["uids"].real
        except (psutil.Error, AttributeError):
            continue
        if uid in uids:
            counts[uid] = counts.get(uid, 0) + 1
    return counts


def wait_for_a_user_with(n: int, timeout_s: float = 60.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        counts = processes_per_user()
        busiest = max(counts, key=counts.get, default=None)
        if busiest is not None and counts[busiest] >= n:
            return busiest
        time.sleep(0.2)
    raise AssertionError(f"no sandbox user reached {n} processes in {timeout_s} s: {processes_per_user()}")


@pytest.mark.parametrize(
    "program",
    [
        "x = bytearray(8 * 1024 ** 3)\nprint(1)",
        "keep = []\nwhile True:\n    keep.append(bytearray(10 ** 7))",
    ],
    ids=["at-once", "gradual"],
)
def test_a_memory_bomb_hits_the_memory_limit(cfg, program):
    record = check(program, cfg)
    assert record.score == 0.0 and record.info["verdicts"] == ["memory_limit"]


def test_giant_output_hits_the_output_cap_and_the_record_stays_small(cfg):
    record = check("while True:\n    print('x' * 10000)", cfg)
    assert record.score == 0.0 and record.info["verdicts"] == ["output_limit"]
    assert len(record.to_json()) < 10_000


def test_unbounded_recursion_is_a_runtime_error(cfg):
    record = check("def f(n):\n    return f(n + 1) + 1\nprint(f(0))", cfg)
    assert record.score == 0.0 and record.info["verdicts"] == ["runtime_error"]
    assert "RecursionError" in record.info["first_error"]


def test_recursion_with_the_limit_lifted_fails_without_harming_the_host(cfg):
    program = "import sys\nsys.setrecursionlimit(10 ** 8)\ndef f(n):\n    return f(n + 1) + 1\nprint(f(0))"
    record = check(program, cfg)
    assert record.score == 0.0
    assert record.info["verdicts"][0] in ("runtime_error", "memory_limit", "timeout")


def test_a_planted_secret_is_not_in_the_programs_environment(cfg, monkeypatch):
    secret = "tok-" + secrets.token_hex(12)
    monkeypatch.setenv("ASYNCRL_PLANTED_SECRET", secret)
    program = f"""
import glob, os
seen = " ".join(os.environ.values())
for path in glob.glob("/proc/*/environ"):
    try:
        seen += open(path, "rb").read().decode("latin-1")
    except OSError:
        pass
print("LEAK" if {secret!r} in seen or "ASYNCRL_PLANTED_SECRET" in seen else "clean")
"""
    record = check(program, cfg, stdin_cases([("", "clean\n")]))
    assert record.info["verdicts"] == ["passed"] and record.score == 1.0


@pytest.mark.parametrize("where", ["home", "project"])
def test_writing_to_the_host_home_or_the_project_folder_fails(cfg, where):
    target = (
        Path.home() if where == "home" else PROJECT
    ) / f"asyncrl-marker-{secrets.token_hex(6)}"
    program = f"open({str(target)!r}, 'w').write('pwned')\nprint(1)"
    try:
        record = check(program, cfg)
        assert record.score == 0.0 and record.info["verdicts"] == ["runtime_error"]
        assert not target.exists()
    finally:
        target.unlink(missing_ok=True)


def test_writing_to_the_programs_own_home_stays_inside_the_sandbox(cfg):
    name = f"asyncrl-marker-{secrets.token_hex(6)}"
    program = f"import os\nopen(os.path.expanduser('~/{name}'), 'w').write('x')\nprint(1)"
    record = check(program, cfg)
    assert record.score == 1.0
    assert not (Path.home() / name).exists()
    assert not list(Path("/home").glob(f"*/{name}"))


def test_opening_a_network_socket_to_the_host_fails(cfg):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        program = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=0.5)\ns.sendall(b'hi')\nprint(1)"
        record = check(program, cfg)
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()
    assert record.score == 0.0 and record.info["verdicts"] == ["runtime_error"]


@pytest.mark.parametrize(
    "kill",
    [
        "os.kill(os.getppid(), signal.SIGKILL)",
        "os.kill(-1, signal.SIGKILL)",
        "os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
    ],
    ids=["parent", "everything", "parent-group"],
)
def test_killing_the_parent_process_only_loses_the_programs_own_tests(cfg, kill):
    record = check(f"import os, signal\n{kill}\nprint(1)", cfg, stdin_cases([("1\n", "1\n")] * 2))
    assert record.score == 0.0 and set(record.info["verdicts"]) <= {"runtime_error", "timeout"}
    again = check("print(input())", cfg, stdin_cases([("7\n", "7\n")] * 2))
    assert again.score == 1.0


def test_a_daemon_that_outlives_its_test_is_killed(cfg):
    program = f"""
import os
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv("/bin/sleep", ["sleep", "{DAEMON_TAG}"])
    os._exit(0)
print(input())
"""
    record = check(program, cfg, stdin_cases([("5\n", "5\n")]))
    assert record.score == 1.0 and record.info["verdicts"] == ["passed"]
    # the autouse fixture asserts no `sleep 987.6543` is left on the host


def test_reading_etc_shadow_fails(cfg):
    record = check("print(open('/etc/shadow').read())", cfg)
    assert record.score == 0.0 and record.info["verdicts"] == ["runtime_error"]
    assert "shadow" in record.info["first_error"] or "Permission" in record.info["first_error"]


def test_etc_holds_only_the_loader_cache(cfg):
    program = "import os\nprint(' '.join(sorted(os.listdir('/etc'))))"
    record = check(program, cfg, stdin_cases([("", "ld.so.cache\n")]))
    assert record.score == 1.0, record.info


def test_the_expected_outputs_are_not_visible_to_the_program(cfg):
    program = """
import glob, os
found = []
for path in glob.glob(os.path.expanduser("~") + "/**", recursive=True) + glob.glob("/tmp/**", recursive=True):
    try:
        if "expected-9f3a" in open(path, errors="ignore").read(1 << 16):
            found.append(path)
    except OSError:
        pass
print("found" if found else "hidden")
"""
    record = check(program, cfg, json.dumps({"inputs": [""], "outputs": ["hidden expected-9f3a"]}))
    assert record.info["verdicts"] == ["wrong_answer"]  # it printed "hidden", not the expected text


def test_a_sandbox_run_leaves_no_working_directory_behind(cfg):
    base = Path(tempfile.gettempdir()) / f"asyncrl-sandbox-{os.geteuid()}"
    before = set(base.iterdir())
    check("open('left-behind', 'w').write('x')\nprint(1)", cfg)
    assert set(base.iterdir()) == before


def test_working_directories_of_killed_workers_are_swept_once_stale(cfg):
    base = Path(tempfile.gettempdir()) / f"asyncrl-sandbox-{os.geteuid()}"
    stale, fresh = base / "run-stale-test", base / "run-fresh-test"
    for path in (stale, fresh):
        path.mkdir()
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    try:
        assert sweep_stale_workdirs() >= 1
        assert not stale.exists() and fresh.exists()
    finally:
        fresh.rmdir()
