"""The math reward: extract the final answer and verify it with math-verify.

The answer is the last ``\\boxed{…}`` after ``</think>`` when the response has one, else the
last boxed expression or, failing that, the last number. math-verify decides equivalence
(fractions vs decimals, sets, intervals, surds, percentages).

math-verify enforces its timeouts with ``signal.alarm``, which works only in a main thread, so
this function is meant to run inside the pebble pool (:mod:`async_rl.rewards.pool`) whose
workers call it from their main thread; the pool adds its own hard timeout on top.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from async_rl.rewards.base import RewardRecord, failure

if TYPE_CHECKING:
    from async_rl.config import RewardConfig

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# Answers sit at the end; scanning only the tail bounds the work on enormous responses.
MAX_TAIL_CHARS = 20_000
# A boxed answer longer than this is not a final answer; parsing it only wastes the budget.
MAX_ANSWER_CHARS = 1_000
# math-verify's own (signal-based) limits, kept below the pool's hard timeout.
PARSE_TIMEOUT_S = 3
VERIFY_TIMEOUT_S = 3

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def warm_up(cfg: RewardConfig) -> None:
    """Imports math-verify (and its parsers) before any timed call."""
    import math_verify  # noqa: F401


def score(response: str, ground_truth: str, extra_info: dict | None, cfg: RewardConfig) -> RewardRecord:
    """Score one response against its ground truth (a LaTeX or plain answer string)."""
    penalty = _format_penalty(response, cfg)
    if penalty is not None:
        return penalty
    answer = extract_answer(response)
    if answer is None:
        return RewardRecord(score=cfg.wrong, status="no_answer")
    if len(answer) > MAX_ANSWER_CHARS:
        return failure(cfg.wrong, "no_answer", f"answer of {len(answer)} chars is too long")
    try:
        correct = verify_answer(answer, ground_truth)
    except Exception as err:  # math-verify raises many types on odd LaTeX; any is a wrong answer
        return RewardRecord(cfg.wrong, "error", parsed=answer, error=f"{type(err).__name__}: {err}"[:500])
    if correct:
        return RewardRecord(score=cfg.correct, status="correct", parsed=answer)
    return RewardRecord(score=cfg.wrong, status="wrong", parsed=answer)


def _format_penalty(response: str, cfg: RewardConfig) -> RewardRecord | None:
    if not cfg.math.require_think_format:
        return None
    if THINK_OPEN not in response:
        return RewardRecord(score=cfg.math.missing_think_open, status="format", error="missing <think>")
    if THINK_CLOSE not in response:
        return RewardRecord(score=cfg.math.missing_think_close, status="format", error="missing </think>")
    return None


def extract_answer(response: str) -> str | None:
    """The final answer text of a response, or None when it has none."""
    if not response:
        return None
    text = response.rsplit(THINK_CLOSE, 1)[1] if THINK_CLOSE in response else response
    text = text[-MAX_TAIL_CHARS:]
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` with balanced braces (None if unbalanced/absent)."""
    matches = list(_BOXED.finditer(text))
    for match in reversed(matches):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i]
    return None


def verify_answer(answer: str, ground_truth: str) -> bool:
    """math-verify equivalence of an extracted answer and the ground truth."""
    from math_verify import parse, verify

    gold = parse(f"${ground_truth}$", parsing_timeout=PARSE_TIMEOUT_S)
    if not gold:
        gold = parse(ground_truth, parsing_timeout=PARSE_TIMEOUT_S)
    guess = parse(f"\\boxed{{{answer}}}", parsing_timeout=PARSE_TIMEOUT_S)
    if not gold or not guess:
        return False
    return bool(verify(gold, guess, timeout_seconds=VERIFY_TIMEOUT_S))
