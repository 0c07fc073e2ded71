"""The math reward against a table of real cases, through the pebble pool."""

from concurrent.futures import Future

import pytest

from async_rl.config import RewardConfig
from async_rl.rewards.math import extract_answer, last_boxed
from async_rl.rewards.pool import RewardPool

CASES = [
    # (response, ground truth, expected status)
    ("<think>\n12+34 = 46\n</think>\n\\boxed{46}", "46", "correct"),
    ("So the answer is \\boxed{\\frac{1}{2}}.", "0.5", "correct"),
    ("\\boxed{0.5}", "\\frac{1}{2}", "correct"),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", "correct"),
    ("\\boxed{\\{2, 1\\}}", "\\{1,2\\}", "correct"),
    ("\\boxed{(1, 2]}", "(1,2]", "correct"),
    ("\\boxed{50\\%}", "0.5", "correct"),
    ("\\boxed{-52}", "-52", "correct"),
    ("the total is 1,234", "1234", "correct"),
    ("\\boxed{3} at first, then \\boxed{4}", "4", "correct"),
    ("<think>maybe \\boxed{7}</think> final: \\boxed{8}", "8", "correct"),
    ("<think>\\boxed{8}</think> I give up", "8", "no_answer"),
    ("\\boxed{45}", "46", "wrong"),
    ("\\boxed{45^\\circ}", "\\frac{\\pi}{4}", "wrong"),
    ("\\boxed{(1, 2)}", "(1,2]", "wrong"),
    ("asdf qwerty", "46", "no_answer"),
    ("", "46", "no_answer"),
    ("\\boxed{" + "9" * 5000 + "}", "9", "no_answer"),
    ("blah " * 400_000 + "\\boxed{46}", "46", "correct"),
]


@pytest.fixture(scope="module")
def pool():
    with RewardPool(RewardConfig(workers=2, timeout_s=5.0)) as reward_pool:
        yield reward_pool


def test_reward_table(pool):
    records = pool.score_many([("math", response, truth, None) for response, truth, _ in CASES])
    got = [(truth, record.status) for (_, truth, _), record in zip(CASES, records, strict=True)]
    assert got == [(truth, status) for _, truth, status in CASES]
    assert {r.score for r, (_, _, s) in zip(records, CASES, strict=True) if s == "correct"} == {1.0}
    assert {r.score for r, (_, _, s) in zip(records, CASES, strict=True) if s != "correct"} == {-1.0}


def test_think_format_penalties_follow_the_klear_values():
    cfg = RewardConfig(math={"require_think_format": True}, workers=1)
    with RewardPool(cfg) as pool:
        no_open = pool.score("math", "\\boxed{46}", "46")
        no_close = pool.score("math", "<think> 12+34 \\boxed{46}", "46")
        good = pool.score("math", "<think>12+34</think>\\boxed{46}", "46")
    assert (no_open.score, no_open.status, no_open.error) == (-2.0, "format", "missing <think>")
    assert (no_close.score, no_close.status) == (-0.5, "format")
    assert (good.score, good.status) == (1.0, "correct")


def test_a_call_that_runs_past_the_timeout_gets_the_failure_reward_and_the_pool_keeps_serving():
    cfg = RewardConfig(workers=1, timeout_s=0.2, wrong=-1.0)
    slow = "\\boxed{2^{2^{2^{2^{2^{100}}}}}}"  # math-verify spends seconds on this tower
    with RewardPool(cfg) as pool:
        hung = pool.score("math", slow, "1")
        after = pool.score("math", "\\boxed{46}", "46")
    assert (hung.status, hung.score) == ("timeout", -1.0)
    assert "exceeded 0.2 s" in hung.error
    assert after.status == "correct"


def test_a_raising_or_dead_worker_resolves_to_the_failure_reward():
    from pebble import ProcessExpired

    pool = RewardPool.__new__(RewardPool)
    pool._cfg = RewardConfig(wrong=-3.0)
    raised, died = Future(), Future()
    raised.set_exception(RuntimeError("boom"))
    died.set_exception(ProcessExpired("gone", code=-9))
    assert (pool._resolve(raised).status, pool._resolve(raised).score) == ("error", -3.0)
    assert pool._resolve(raised).error == "RuntimeError: boom"
    assert pool._resolve(died).error == "reward worker died (exit code -9)"


def test_answer_extraction():
    assert extract_answer("<think>\\boxed{1}</think>\\boxed{2}") == "2"
    assert extract_answer("\\boxed{\\frac{1}{2}} and more") == "\\frac{1}{2}"
    assert extract_answer("no digits here") is None
    assert extract_answer("x = -3.5 or 7/2") == "7/2"
    assert last_boxed("\\boxed{unclosed") is None
    assert last_boxed("\\fbox{a{b}c}") == "a{b}c"


def test_record_serialises_to_reward_info_json():
    import json

    from async_rl.rewards.base import RewardRecord

    info = json.loads(RewardRecord(1.0, "correct", parsed="46", error="x" * 2000).to_json())
    assert info["status"] == "correct" and info["parsed"] == "46" and len(info["error"]) == 500

