"""Pure logic of the code reward: program extraction, test parsing, comparison, sampling."""

import json

import pytest

from async_rl.config import RewardConfig
from async_rl.rewards.code import (
    _record,
    extract_program,
    judge,
    parse_tests,
    sample_indices,
    stdout_matches,
    value_matches,
)
from async_rl.rewards.sandbox import CaseRun, SandboxLimits, SandboxRun


def test_extract_program_takes_the_last_python_block_after_think():
    response = (
        "<think>```python\nprint('draft')\n```</think>\nFirst:\n```python\nprint(1)\n```\n"
        "Final:\n```python\nprint(2)\n```\n"
    )
    assert extract_program(response) == "print(2)\n"


def test_extract_program_prefers_tagged_blocks_over_bare_ones():
    response = "```python\nprint(1)\n```\n```\n$ run it\n```"
    assert extract_program(response) == "print(1)\n"


def test_extract_program_accepts_a_bare_block_when_none_is_tagged():
    assert extract_program("```\nprint(3)\n```") == "print(3)\n"


def test_extract_program_returns_none_without_a_block_or_with_an_unclosed_think():
    assert extract_program("the answer is print(1)") is None
    assert extract_program("<think>```python\nprint(1)\n```") is None
    assert extract_program("```python\n   \n```") is None


def test_parse_tests_reads_stdin_cases():
    suite = parse_tests(json.dumps({"inputs": ["1 2\n"], "outputs": ["3\n"]}))
    assert suite.mode == "stdin"
    assert suite.inputs == ["1 2\n"] and suite.outputs == ["3\n"]


def test_parse_tests_reads_function_call_cases_in_taco_and_livecodebench_forms():
    taco = parse_tests(json.dumps({"fn_name": "add", "inputs": [[1, 2]], "outputs": [[3]]}))
    assert taco.mode == "call" and taco.inputs == [[1, 2]] and taco.outputs == [[3]]
    lcb = parse_tests(json.dumps({"fn_name": "add", "inputs": ["1\n2"], "outputs": ["3"]}))
    assert lcb.inputs == [[1, 2]] and lcb.outputs == [3]


def test_parse_tests_unwraps_a_taco_input_output_field():
    inner = json.dumps({"inputs": ["x"], "outputs": ["y"]})
    assert parse_tests(json.dumps({"input_output": inner})).inputs == ["x"]


@pytest.mark.parametrize(
    "bad",
    [
        '{"inputs": ["1"]}',
        '{"inputs": [], "outputs": []}',
        '{"inputs": ["1"], "outputs": ["1", "2"]}',
        "[1]",
    ],
)
def test_parse_tests_rejects_malformed_ground_truth(bad):
    with pytest.raises(ValueError):
        parse_tests(bad)


def test_stdout_matches_ignores_trailing_whitespace_and_blank_lines_only():
    assert stdout_matches("3  \r\n4\n\n\n", "3\n4")
    assert not stdout_matches("3\n4", "3\n5")
    assert not stdout_matches(" 3", "3")  # leading whitespace is content
    assert not stdout_matches("3\n\n4", "3\n4")


def test_stdout_matches_compares_numbers_within_the_float_tolerance_when_asked():
    assert not stdout_matches("0.3333333", "0.333333333")
    assert stdout_matches("0.3333333 x", "0.333333333 x", float_tol=1e-6)
    assert not stdout_matches("0.34 x", "0.333333333 x", float_tol=1e-6)
    assert not stdout_matches("0.3333333 y", "0.333333333 x", float_tol=1e-6)


def test_value_matches_treats_tuples_as_lists_and_accepts_taco_wrapping():
    assert value_matches([1, [2, 3]], [1, [2, 3]])
    assert value_matches(5, [5])
    assert not value_matches(5, [6])
    assert not value_matches(True, 1)  # a bool is not the number 1
    assert value_matches(0.1 + 0.2, 0.3, float_tol=1e-9)
    assert not value_matches(0.1 + 0.2, 0.3)


def test_sample_indices_takes_at_most_k_tests_and_the_same_ones_for_the_same_problem():
    first = sample_indices(40, 16, '{"p": 1}')
    assert len(first) == 16 and len(set(first)) == 16 and first == sorted(first)
    assert sample_indices(40, 16, '{"p": 1}') == first
    assert sample_indices(40, 16, '{"p": 2}') != first
    assert sample_indices(5, 16, "x") == [0, 1, 2, 3, 4]


def test_judge_maps_sandbox_statuses_to_verdicts():
    suite = parse_tests(json.dumps({"inputs": ["1"], "outputs": ["1"]}))
    assert judge(CaseRun("ok", stdout="1\n"), "1", suite, 0.0) == "passed"
    assert judge(CaseRun("ok", stdout="2\n"), "1", suite, 0.0) == "wrong_answer"
    for status in ("timeout", "runtime_error", "memory_limit", "output_limit"):
        assert judge(CaseRun(status), "1", suite, 0.0) == status


def test_record_scores_passed_over_total_or_all_or_nothing():
    run = SandboxRun([CaseRun("ok"), CaseRun("runtime_error", error="Boom" * 500)], "firejail")
    soft = _record("print(1)", ["passed", "runtime_error"], run, [0, 3], soft=True)
    assert soft.score == 0.5 and soft.status == "wrong"
    assert soft.info["verdicts"] == ["passed", "runtime_error"] and soft.info["tests"] == [0, 3]
    assert soft.info["first_error"].startswith("Boom") and len(soft.info["first_error"]) == 500
    binary = _record("print(1)", ["passed", "runtime_error"], run, [0, 3], soft=False)
    assert binary.score == 0.0
    assert _record("p", ["passed", "passed"], run, [0, 1], soft=False).score == 1.0


def test_limits_leave_the_pool_timeout_room_for_sandbox_start_up():
    limits = SandboxLimits.from_config(RewardConfig(timeout_s=3.0, code={"time_budget_s": 10.0}))
    assert limits.budget_s == pytest.approx(1.0)
    assert limits.test_timeout_s <= limits.budget_s
    default = SandboxLimits.from_config(RewardConfig())
    assert default.budget_s == pytest.approx(3.0)
