"""Synthetic arithmetic: reproducible prompts with exact ground truths and worked solutions.

An expression is a list of integer operands joined by ``+``, ``-`` and ``*`` with the usual
precedence. The worked solution (the SFT target) first folds each multiplication, then the
additions and subtractions left to right, one step per line, and ends in ``\\boxed{answer}``.
"""

from __future__ import annotations

import random
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

    def solution(self) -> str:
        """The worked solution: ``<think>`` steps ``</think>`` then the boxed answer."""
        steps, answer = solve(self)
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
) -> list[dict]:
    """``n`` distinct problems of a split, skipping expressions in ``exclude``.

    With ``with_solution`` each row also carries ``response`` (the SFT target).
    """
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
            row["response"] = problem.solution()
        rows.append(row)
        if len(rows) == n:
            break
    return rows
