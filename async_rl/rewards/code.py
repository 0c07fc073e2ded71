"""Code reward: run the response's program against test cases in a sandbox.

Ground truth (``ground_truth``, a JSON string) — two formats, as in LiveCodeBench/TACO:

* stdin/stdout cases: ``{"inputs": ["1 2\\n", ...], "outputs": ["3\\n", ...]}``; the
  program reads stdin and its stdout is compared line by line, ignoring trailing
  whitespace and trailing blank lines, numeric tokens within ``reward.code.float_tol``.
* function-call cases: ``{"fn_name": "add", "inputs": [[1, 2], ...], "outputs": [3, ...]}``;
  the program defines ``add`` (top level, or as a method of a LeetCode-style
  ``Solution`` class), each input is the argument list, and the return value is compared
  as JSON (tuples as lists, floats within ``reward.code.float_tol``). An input may also be a
  string of newline-separated JSON arguments and an output a JSON string (LiveCodeBench
  "functional"); an output ``[v]`` also accepts ``v`` (TACO wraps return values).

A TACO row's ``{"input_output": "<json of the above>"}`` is unwrapped.

The program is the last fenced ```python block after ``</think>`` (the whole response when
there is no think block; none when the think block never closes).

Reward (Klear): at most ``reward.code.max_tests`` tests are sampled — the same ones for every
response to a problem, so a group's rewards are comparable — and the score is
passed/total (``reward.code.soft``) or 1.0 only if all pass. ``info`` holds the per-test verdicts
(passed, wrong_answer, timeout, runtime_error, memory_limit, output_limit), the counts,
the isolation level and the first error, truncated.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from typing import Any

import xxhash

from async_rl.rewards.base import MAX_ERROR_CHARS, RewardRecord, failure
from async_rl.rewards.sandbox import (
    CaseRun,
    SandboxLimits,
    SandboxRun,
    run_program,
    select_isolation,
)
from async_rl.rewards.sandbox_levels import SandboxUnavailable

FENCE = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
MAX_PARSED_CHARS = 2000  # the program kept in reward_info, for debugging; the tokens hold it all
VERDICT_BY_STATUS = {
    "timeout": "timeout",
    "runtime_error": "runtime_error",
    "memory_limit": "memory_limit",
    "output_limit": "output_limit",
}


@dataclass(frozen=True)
class CaseSet:
    """Parsed test cases: ``inputs[i]`` is stdin text (``fn_name`` None) or an argument list."""

    inputs: list
    outputs: list
    fn_name: str | None = None

    @property
    def mode(self) -> str:
        return "stdin" if self.fn_name is None else "call"


def extract_program(response: str) -> str | None:
    """The last fenced python block after ``</think>`` (a bare ``` block counts when no
    block is tagged python)."""
    if "</think>" in response:
        response = response.rsplit("</think>", 1)[1]
    elif "<think>" in response:
        return None
    blocks = FENCE.findall(response)
    tagged = [body for tag, body in blocks if tag]
    chosen = tagged or [body for _, body in blocks]
    return chosen[-1] if chosen and chosen[-1].strip() else None


def parse_tests(ground_truth: str) -> CaseSet:
    """Raises ValueError naming what is wrong with the ground truth."""
    data = json.loads(ground_truth)
    if isinstance(data, dict) and "input_output" in data:
        data = (
            json.loads(data["input_output"])
            if isinstance(data["input_output"], str)
            else data["input_output"]
        )
    if not isinstance(data, dict) or not isinstance(data.get("inputs"), list):
        raise ValueError('expected {"inputs": [...], "outputs": [...]} (optionally "fn_name")')
    inputs, outputs = data["inputs"], data.get("outputs")
    if not isinstance(outputs, list) or len(outputs) != len(inputs) or not inputs:
        raise ValueError(f"need as many outputs as inputs (>0), got {len(inputs)} inputs")
    fn_name = data.get("fn_name") or None
    if fn_name is None:
        return CaseSet([_as_text(x) for x in inputs], [_as_text(y) for y in outputs])
    return CaseSet([_as_args(x) for x in inputs], [_as_value(y) for y in outputs], str(fn_name))


def _as_text(value: Any) -> str:
    if isinstance(value, list):  # some TACO rows split stdin into lines
        return "\n".join(map(str, value)) + "\n"
    return str(value)


def _as_args(value: Any) -> list:
    if isinstance(value, str):
        return [json.loads(line) for line in value.splitlines() if line.strip()]
    return list(value) if isinstance(value, list | tuple) else [value]


def _as_value(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def sample_indices(n: int, k: int, ground_truth: str) -> list[int]:
    """At most ``k`` of ``n`` tests, seeded by the ground truth so every response to one
    problem is judged on the same tests."""
    if n <= k:
        return list(range(n))
    return sorted(random.Random(xxhash.xxh64_intdigest(ground_truth.encode())).sample(range(n), k))


def stdout_matches(actual: str, expected: str, float_tol: float = 0.0) -> bool:
    """Line-wise equality ignoring trailing whitespace, \\r and trailing blank lines;
    with ``float_tol`` > 0, numeric tokens compare within that relative/absolute tolerance."""
    got, want = _lines(actual), _lines(expected)
    if got == want:
        return True
    if float_tol <= 0 or len(got) != len(want):
        return False
    return all(
        _tokens_match(g.split(), w.split(), float_tol) for g, w in zip(got, want, strict=True)
    )


def _lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _tokens_match(got: list[str], want: list[str], tol: float) -> bool:
    if len(got) != len(want):
        return False
    return all(
        g == w or _close(_number(g), _number(w), tol) for g, w in zip(got, want, strict=True)
    )


def _number(token: str) -> float | None:
    try:
        value = float(token)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _close(a: float | None, b: float | None, tol: float) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=tol, abs_tol=tol)


def value_matches(actual: Any, expected: Any, float_tol: float = 0.0) -> bool:
    """JSON-value equality (tuples are lists), floats within ``float_tol``; TACO's ``[v]``
    wrapping of a return value also accepts ``v``."""
    if _values_equal(actual, expected, float_tol):
        return True
    return (
        isinstance(expected, list)
        and len(expected) == 1
        and _values_equal(actual, expected[0], float_tol)
    )


def _values_equal(a: Any, b: Any, tol: float) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b or (tol > 0 and math.isclose(a, b, rel_tol=tol, abs_tol=tol))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_values_equal(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_values_equal(a[k], b[k], tol) for k in a)
    return a == b


def judge(run: CaseRun, expected: Any, suite: CaseSet, float_tol: float) -> str:
    """The verdict of one test: ``passed``, ``wrong_answer`` or the sandbox's status."""
    if run.status != "ok":
        return VERDICT_BY_STATUS[run.status]
    if suite.mode == "stdin":
        return "passed" if stdout_matches(run.stdout, expected, float_tol) else "wrong_answer"
    try:
        actual = json.loads(run.result) if run.result is not None else None
    except ValueError:
        return "wrong_answer"
    return "passed" if value_matches(actual, expected, float_tol) else "wrong_answer"


def warm_up(cfg) -> str:
    """Chooses (and reports) the isolation level now; a pool worker initializer calls it so
    the first scored program does not pay the probe. Returns the level."""
    return select_isolation(cfg.code.isolation, cfg.code.sandbox_user)[0]


def score(response: str, ground_truth: str, extra_info: dict, cfg) -> RewardRecord:
    """Scores one response (``cfg`` is the ``RewardConfig``). Bounded wall-clock: see
    :func:`async_rl.rewards.sandbox.run_program`."""
    program = extract_program(response)
    if program is None:
        return failure(0.0, "no_answer", "no ```python code block after </think>")
    try:
        suite = parse_tests(ground_truth)
    except (ValueError, TypeError) as exc:
        return failure(0.0, "error", f"bad code ground truth: {exc}")
    chosen = sample_indices(len(suite.inputs), cfg.code.max_tests, ground_truth)
    try:
        level, ident = select_isolation(cfg.code.isolation, cfg.code.sandbox_user)
        run = run_program(
            program,
            [suite.inputs[i] for i in chosen],
            mode=suite.mode,
            fn_name=suite.fn_name,
            limits=SandboxLimits.from_config(cfg),
            level=level,
            ident=ident,
        )
    except SandboxUnavailable as exc:
        return failure(0.0, "error", str(exc))
    verdicts = [
        judge(r, suite.outputs[i], suite, cfg.code.float_tol)
        for r, i in zip(run.runs, chosen, strict=True)
    ]
    return _record(program, verdicts, run, chosen, cfg.code.soft)


def _record(
    program: str, verdicts: list[str], run: SandboxRun, chosen: list[int], soft: bool
) -> RewardRecord:
    passed = verdicts.count("passed")
    total = len(verdicts)
    all_passed = passed == total
    first_error = next((r.error for r in run.runs if r.error), None)
    info = {
        "passed": passed,
        "total": total,
        "tests": chosen,
        "verdicts": verdicts,
        "isolation": run.isolation,
        "first_error": first_error[:MAX_ERROR_CHARS] if first_error else None,
    }
    return RewardRecord(
        score=passed / total if soft else float(all_passed),
        status="correct" if all_passed else "wrong",
        parsed=program[:MAX_PARSED_CHARS],
        error=info["first_error"],
        info=info,
    )
