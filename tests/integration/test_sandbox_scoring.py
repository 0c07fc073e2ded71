"""The code reward's scores through the real sandbox: correctness cases, function calls,
the weaker isolation levels, and a real pebble pool that keeps serving."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pebble import ProcessPool
from sandbox_helpers import DAEMON_TAG, fast_config, fenced, stdin_cases, stray_processes, with_code

from async_rl.rewards.code import score, warm_up

PROJECT = Path(__file__).resolve().parents[2]
ADD = "a, b = map(int, input().split())\nprint(a + b)"
ADD_CASES = stdin_cases([("1 2\n", "3\n"), ("5 5\n", "10\n"), ("0 0\n", "0\n"), ("7 1\n", "8\n")])


@pytest.fixture(scope="module")
def cfg():
    return fast_config()


def test_a_program_passing_every_test_scores_one(cfg):
    record = score(fenced(ADD), ADD_CASES, {}, cfg)
    assert record.score == 1.0 and record.status == "correct"
    assert record.info["verdicts"] == ["passed"] * 4 and record.info["isolation"] == "firejail"


def test_a_program_passing_half_the_tests_scores_a_half(cfg):
    program = "a, b = map(int, input().split())\nprint(a + b if a < 5 else a * b)"
    record = score(fenced(program), ADD_CASES, {}, cfg)
    assert record.score == 0.5 and record.status == "wrong"
    assert record.info["verdicts"] == ["passed", "wrong_answer", "passed", "wrong_answer"]


def test_the_binary_variant_gives_nothing_for_half(cfg):
    program = "a, b = map(int, input().split())\nprint(a + b if a < 5 else a * b)"
    record = score(fenced(program), ADD_CASES, {}, with_code(cfg, soft=False))
    assert record.score == 0.0


def test_a_syntax_error_scores_zero_and_says_why(cfg):
    record = score(fenced("print(1"), ADD_CASES, {}, cfg)
    assert record.score == 0.0 and record.info["verdicts"] == ["runtime_error"] * 4
    assert "SyntaxError" in record.error


def test_a_response_without_a_code_block_scores_zero(cfg):
    record = score("<think>hmm</think> the answer is a+b", ADD_CASES, {}, cfg)
    assert record.score == 0.0 and record.status == "no_answer"


def test_a_runtime_error_reports_its_message(cfg):
    record = score(fenced("raise ValueError('bad input format')"), ADD_CASES, {}, cfg)
    assert record.score == 0.0 and "ValueError: bad input format" in record.info["first_error"]


def test_function_call_cases_compare_return_values(cfg):
    program = "class Solution:\n    def twoSum(self, nums, target):\n        return [0, 1] if nums[0] + nums[1] == target else [1, 2]"
    truth = json.dumps(
        {
            "fn_name": "twoSum",
            "inputs": [[[2, 7, 11], 9], [[3, 2, 4], 6]],
            "outputs": [[0, 1], [1, 2]],
        }
    )
    record = score(fenced(program), truth, {}, cfg)
    assert record.score == 1.0
    wrong = score(fenced("def twoSum(nums, target):\n    return (0, 1)"), truth, {}, cfg)
    assert wrong.score == 0.5 and wrong.info["verdicts"] == ["passed", "wrong_answer"]


def test_at_most_k_tests_are_run(cfg):
    cases = stdin_cases([(f"{i} 1\n", f"{i + 1}\n") for i in range(20)])
    record = score(fenced(ADD), cases, {}, with_code(cfg, max_tests=4))
    assert record.info["total"] == 4 and record.score == 1.0


def test_float_tolerance_accepts_close_answers_only_when_configured(cfg):
    truth = stdin_cases([("", "0.333333333\n")])
    program = "print(round(1 / 3, 7))"
    assert score(fenced(program), truth, {}, cfg).score == 0.0
    assert (
        score(fenced(program), truth, {}, with_code(cfg, float_tol=1e-6)).score
        == 1.0
    )


WEAK_CASES = {
    "infinite-loop": ("while True:\n    pass", stdin_cases([("1\n", "1\n")]), 0.0),
    "fork-bomb": (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        stdin_cases([("1\n", "1\n")]),
        0.0,
    ),
    "memory-bomb": ("x = bytearray(8 * 1024 ** 3)", stdin_cases([("1\n", "1\n")]), 0.0),
    "write-project": (
        f"open({str(PROJECT / 'asyncrl-weak-marker')!r}, 'w').write('x')\nprint(1)",
        stdin_cases([("", "1\n")]),
        0.0,
    ),
    "kill-parent": (
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
        stdin_cases([("1\n", "1\n")]),
        0.0,
    ),
    "daemon": (
        f"import os\nif os.fork() == 0:\n    os.setsid()\n    os.execv('/bin/sleep', ['sleep', '{DAEMON_TAG}'])\nprint(input())",
        stdin_cases([("5\n", "5\n")]),
        1.0,
    ),
    "correct": (ADD, ADD_CASES, 1.0),
}


@pytest.mark.parametrize("level", ["bwrap", "unshare", "rlimits"])
@pytest.mark.parametrize("case", sorted(WEAK_CASES))
def test_the_weaker_isolation_levels_still_contain_the_basic_attacks(cfg, level, case):
    program, truth, expected = WEAK_CASES[case]
    record = score(fenced(program), truth, {}, with_code(cfg, isolation=level))
    assert record.info["isolation"] == level
    assert record.score == expected, record.info
    assert stray_processes() == []
    assert not (PROJECT / "asyncrl-weak-marker").exists()


@pytest.mark.parametrize("level", ["bwrap", "unshare"])
def test_the_namespaced_levels_have_no_network(cfg, level):
    program = "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=0.5)\nprint(1)"
    record = score(
        fenced(program),
        stdin_cases([("", "1\n")]),
        {},
        with_code(cfg, isolation=level),
    )
    assert record.score == 0.0
    assert (
        "Connection refused" in record.info["first_error"]
        or "Network is unreachable" in record.info["first_error"]
    )


def _world_readable_file_outside_the_system() -> str:
    """A file any user may read that is not a system file (like a run folder's ground truth)."""
    for top in (str(PROJECT.parent), "/opt", "/srv", "/var"):  # beside the project first
        for folder, dirs, names in os.walk(top):
            dirs[:] = [d for d in dirs if Path(folder, d) != PROJECT]
            for name in names:
                path = Path(folder, name)
                if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o004:
                    return str(path)
    pytest.skip("no world-readable file outside the system directories here")


@pytest.mark.parametrize("level", ["firejail", "bwrap", "unshare"])
def test_the_isolating_levels_neither_read_nor_write_the_hosts_files(cfg, level, tmp_path):
    probe = f"asyncrl-probe-{level}-{tmp_path.name}"
    hidden = [str(PROJECT / "pyproject.toml"), _world_readable_file_outside_the_system()]
    if level != "firejail":  # firejail shows the system's /etc; the other two no /etc at all
        hidden.append("/etc/passwd")
    program = (
        "seen = []\n"
        f"for path in {hidden!r}:\n"
        "    try:\n        open(path).read(1)\n        seen.append(path)\n"
        "    except OSError:\n        pass\n"
        "for folder in ['/tmp', '/dev/shm', '/var/tmp']:\n"
        f"    try:\n        open(folder + '/{probe}', 'w').write('x')\n"
        "    except OSError:\n        pass\n"
        "print(seen or 'hidden')"
    )
    host = [Path(folder, probe) for folder in ("/tmp", "/dev/shm", "/var/tmp")]
    try:
        record = score(fenced(program), stdin_cases([("", "hidden\n")]), {},
                       with_code(cfg, isolation=level))
        written = [str(path) for path in host if path.exists()]  # a private /tmp leaves nothing
    finally:
        for path in host:
            path.unlink(missing_ok=True)
    assert record.info["isolation"] == level
    assert record.score == 1.0 and written == [], (record.info, written)


def test_a_pebble_pool_keeps_serving_after_hostile_programs(cfg):
    hostile = [
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "x = bytearray(8 * 1024 ** 3)",
    ]
    with ProcessPool(max_workers=1, initializer=warm_up, initargs=(cfg,)) as pool:
        futures = [
            pool.schedule(score, (fenced(p), ADD_CASES, {}, cfg), timeout=cfg.timeout_s)
            for p in hostile
        ]
        assert [f.result().score for f in futures] == [0.0, 0.0, 0.0]
        assert (
            pool.schedule(score, (fenced(ADD), ADD_CASES, {}, cfg), timeout=cfg.timeout_s)
            .result()
            .score
            == 1.0
        )
    assert stray_processes() == []
