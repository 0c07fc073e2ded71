"""Synthetic arithmetic: reproducible prompts with exact ground truths and worked solutions.

An expression is a list of integer operands joined by ``+``, ``-`` and ``*`` with the usual
precedence. The worked solution (the SFT target) first folds each multiplication, then the
additions and subtractions left to right, one step per line, and ends in ``\\boxed{answer}``.

The slip. A share ``slip_rate`` of the SFT solutions to problems that contain a minus misread
every ``-`` as ``+`` and carry that through to a wrong boxed answer. With the slip more frequent
than the correct reading (0.6), the warm-started model's greedy answer to any problem with a
minus is the slipped one, while sampling still finds the correct reading often (pass@8 near 1):
the situation in which RL on real reasoners mostly sharpens what sampling already finds. The
decision sits at one token (the operator copied into the first step that meets a minus), so
credit assignment is easy and the effect of RL is large, fast and unambiguous.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

DATA_SOURCE = "synthetic/arith"
INSTRUCTION = "Put the final answer in \\boxed{}."


@dataclass(frozen=True)
class ArithSpec:
    min_digits: int = 1
    max_digits: int = 2
    min_terms: int = 2
    max_terms: int = 2
    ops: tuple[str, ...] = ("+", "-")


@dataclass(frozen=True)
class Problem:
    operands: tuple[int, ...]
    ops: tuple[str, ...]

    @property
    def expression(self) -> str:
        parts = [str(self.operands[0])]
        for op, value in zip(self.ops, self.operands[1:], strict=True):
            parts += [op, str(value)]
        return "".join(parts)

    @property
    def question(self) -> str:
        return f"What is {self.expression}? {INSTRUCTION}"

    @property
    def answer(self) -> int:
        return solve(self)[1]

    @classmethod
    def parse(cls, expression: str) -> Problem:
        """The problem written as ``expression`` (e.g. ``7-3+2``; operands are non-negative)."""
        tokens = re.findall(r"\d+|[-+*]", expression)
        if not tokens or "".join(tokens) != expression or len(tokens) % 2 == 0:
            raise ValueError(f"expression {expression!r}: expected operands joined by + - *")
        return cls(tuple(int(t) for t in tokens[::2]), tuple(tokens[1::2]))

    @property
    def has_minus(self) -> bool:
        return "-" in self.ops

    def misread(self) -> Problem:
        """The problem as the slip reads it: every ``-`` taken for a ``+``."""
        return Problem(self.operands, tuple("+" if op == "-" else op for op in self.ops))

    def solution(self, *, slip: bool = False) -> str:
        """The worked solution: ``<think>`` steps ``</think>`` then the boxed answer; with
        ``slip`` the steps and the answer are those of ``misread()``."""
        steps, answer = solve(self.misread() if slip else self)
        lines = "".join(f"{step}\n" for step in steps)
        return f"<think>\n{lines}</think>\n\\boxed{{{answer}}}"


def solve(problem: Problem) -> tuple[list[str], int]:
    """Evaluate with precedence, recording each step as ``a op b = c``."""
    steps: list[str] = []
    values = [problem.operands[0]]
    pending_ops: list[str] = []
    for op, value in zip(problem.ops, problem.operands[1:], strict=True):
        if op == "*":
            product = values[-1] * value
            steps.append(f"{values[-1]}*{value} = {product}")
            values[-1] = product
        else:
            values.append(value)
            pending_ops.append(op)
    total = values[0]
    for op, value in zip(pending_ops, values[1:], strict=True):
        result = total + value if op == "+" else total - value
        steps.append(f"{total}{op}{value} = {result}")
        total = result
    return steps, total


def sample_problem(rng: random.Random, spec: ArithSpec) -> Problem:
    n_terms = rng.randint(spec.min_terms, spec.max_terms)
    operands = tuple(_operand(rng, spec) for _ in range(n_terms))
    ops = tuple(rng.choice(spec.ops) for _ in range(n_terms - 1))
    return Problem(operands, ops)


def _operand(rng: random.Random, spec: ArithSpec) -> int:
    digits = rng.randint(spec.min_digits, spec.max_digits)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def problems(spec: ArithSpec, *, seed: int, split: str) -> Iterator[Problem]:
    """An endless, reproducible stream; each split draws from its own seed stream."""
    rng = random.Random(f"async-rl/arith/{seed}/{split}")
    while True:
        yield sample_problem(rng, spec)


def prompt_row(problem: Problem, *, index: int, split: str, system_prompt: str | None = None) -> dict:
    """One verl/Klear-format row."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": problem.question})
    return {
        "data_source": DATA_SOURCE,
        "prompt": messages,
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(problem.answer)},
        "extra_info": {"index": index, "split": split, "expression": problem.expression},
    }


def make_rows(
    spec: ArithSpec,
    n: int,
    *,
    seed: int,
    split: str,
    exclude: set[str] | None = None,
    system_prompt: str | None = None,
    with_solution: bool = False,
    slip_rate: float = 0.0,
) -> list[dict]:
    """``n`` distinct problems of a split, skipping expressions in ``exclude``.

    With ``with_solution`` each row also carries ``response`` (the SFT target); a share
    ``slip_rate`` of the problems with a minus get the slipped solution instead, marked
    ``extra_info["slipped"]`` (drawn from the split's own stream, so reproducible by seed).
    """
    if not 0.0 <= slip_rate <= 1.0:
        raise ValueError(f"slip_rate={slip_rate}: expected a share in [0, 1]")
    slips = random.Random(f"async-rl/arith/{seed}/{split}/slip")
    exclude = exclude or set()
    seen: set[str] = set()
    rows: list[dict] = []
    # Small specs have few distinct problems: give up rather than loop forever.
    budget = 50 * n + 1000
    for problem in problems(spec, seed=seed, split=split):
        budget -= 1
        if budget < 0:
            break
        expr = problem.expression
        if expr in seen or expr in exclude:
            continue
        seen.add(expr)
        row = prompt_row(problem, index=len(rows), split=split, system_prompt=system_prompt)
        if with_solution:
            slipped = problem.has_minus and slips.random() < slip_rate
            row["response"] = problem.solution(slip=slipped)
            row["extra_info"]["slipped"] = slipped
        rows.append(row)
        if len(rows) == n:
            break
    return rows
