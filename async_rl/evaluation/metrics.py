"""The numbers an evaluation reports (ALGORITHMS.md §4, DeepSeek-R1 convention).

For one problem with n samples of which c are correct:

* **avg@n** = c / n (= pass@1 estimated from n samples), averaged over problems.
* **pass@k** (Chen et al. 2021, arXiv 2107.03374 §2.1, unbiased) = 1 − C(n−c, k) / C(n, k),
  computed in the stable product form 1 − Π_{i=n−c+1}^{n} (1 − k/i), which is 1 when n − c < k.
* **cons@n** (majority vote): the most frequent extracted answer decides the problem. On a tie
  the problem scores the fraction of tied answers that are correct — the expected value of a
  uniformly random tie-break, so the number never depends on sample order. Samples without an
  extracted answer do not vote; a problem where none has one scores 0.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from math import comb, prod


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem: probability that k of the n samples include a correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k(n={n}, c={c}, k={k}): need 0 <= c <= n and 1 <= k <= n")
    if n - c < k:
        return 1.0
    return 1.0 - prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k_binomial(n: int, c: int, k: int) -> float:
    """The same estimator from exact binomials (the reference the product form is tested against)."""
    return 1.0 - comb(n - c, k) / comb(n, k)


# Surface differences that do not change a final answer: spacing, sizing commands, $…$,
# a trailing full stop. Deeper equivalence (1/2 vs \frac12) is the verifier's job; voting
# only needs identical answers to land in one bucket.
_VOTE_NOISE = re.compile(r"\s+|\\left|\\right|\\!|\\,|\\;|\$")


def vote_key(answer: str) -> str:
    """The bucket an extracted answer votes in."""
    return _VOTE_NOISE.sub("", answer).rstrip(".")


@dataclass(frozen=True)
class Vote:
    """The majority-vote outcome of one problem: the winning answer(s) and the credit (0 … 1)."""

    answer: str | None
    votes: int
    tied: int
    credit: float


def majority_vote(answers: Sequence[str | None], correct: Sequence[bool]) -> Vote:
    """cons@n of one problem from each sample's extracted answer and verdict.

    ``answers[i]`` is None when sample i has no extracted answer. A bucket counts as correct
    when most of its samples were verified correct (equal keys almost always agree).
    """
    if len(answers) != len(correct):
        raise ValueError(f"majority_vote: {len(answers)} answers but {len(correct)} verdicts")
    keys = [vote_key(a) if a is not None else None for a in answers]
    counts = Counter(key for key in keys if key)
    if not counts:
        return Vote(answer=None, votes=0, tied=0, credit=0.0)
    top = max(counts.values())
    winners = [key for key, count in counts.items() if count == top]  # first-seen order
    right = 0
    for key in winners:
        verdicts = [ok for k, ok in zip(keys, correct) if k == key]
        right += int(2 * sum(verdicts) > len(verdicts))
    return Vote(answer=winners[0], votes=top, tied=len(winners), credit=right / len(winners))


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean; NaN for no values (an empty benchmark has no score, not 0)."""
    return sum(values) / len(values) if values else float("nan")


def default_ks(n: int) -> list[int]:
    """pass@k reported by default: 1, 4, 16, 64 … up to n, and n itself."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 4
    return ks if ks[-1] == n else [*ks, n]


# --------------------------------------------------------------------------- aggregation


@dataclass(frozen=True)
class SampleResult:
    """The verdict on one sampled response (its text is not kept: 64 × 32K tokens per problem)."""

    tokens: int
    finish_reason: str
    status: str
    parsed: str | None
    correct: bool
    # (lowest, highest) engine weight version among the response's tokens; None when unknown.
    weight_versions: tuple[int, int] | None = None
    # A short hash of the response's token ids: two evaluations that agree on it generated the
    # same tokens (the exact-reproduction check of the job's evaluations).
    digest: str | None = None


@dataclass(frozen=True)
class ProblemResult:
    problem_id: str
    answer: str
    samples: list[SampleResult]

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def c(self) -> int:
        return sum(s.correct for s in self.samples)


def response_digest(token_ids: Sequence[int]) -> str:
    """16 hex digits identifying a token sequence."""
    import hashlib

    return hashlib.blake2b(",".join(map(str, token_ids)).encode(), digest_size=8).hexdigest()


def problem_row(result: ProblemResult, ks: Sequence[int], *, vote: bool = True) -> dict:
    """The per-problem line of a result file (``vote=False``: no majority vote, e.g. for code)."""
    outcome = Vote(answer=None, votes=0, tied=0, credit=0.0)
    if vote:
        outcome = majority_vote([s.parsed for s in result.samples], [s.correct for s in result.samples])
    return {
        "id": result.problem_id,
        "answer": result.answer,
        "n": result.n,
        "correct": result.c,
        "pass@k": {str(k): pass_at_k(result.n, result.c, k) for k in ks},
        "cons": outcome.credit if vote else None,
        "majority_answer": outcome.answer,
        "majority_votes": outcome.votes,
        "mean_tokens": mean([s.tokens for s in result.samples]),
        "truncated": sum(s.finish_reason == "length" for s in result.samples),
        "statuses": dict(Counter(s.status for s in result.samples)),
        "digests": [s.digest for s in result.samples],
    }


def summarize(results: Sequence[ProblemResult], ks: Sequence[int], *, vote: bool = True) -> dict:
    """A benchmark's numbers: avg@n, pass@k per k, cons@n, response length, per-problem rows.

    Every problem must have at least ``max(ks)`` samples (pass@k needs n ≥ k). ``vote=False``
    reports cons@n as None: a majority vote over distinct programs means nothing.
    """
    rows = [problem_row(r, ks, vote=vote) for r in results]
    samples = [s for r in results for s in r.samples]
    return {
        "problems": len(rows),
        "samples": len(samples),
        "avg@n": mean([r.c / r.n for r in results]),
        "pass@k": {str(k): mean([row["pass@k"][str(k)] for row in rows]) for k in ks},
        "cons@n": mean([row["cons"] for row in rows]) if vote else None,
        "mean_response_tokens": mean([s.tokens for s in samples]),
        "truncated_fraction": mean([s.finish_reason == "length" for s in samples]),
        "no_answer_fraction": mean([s.parsed is None for s in samples]),
        "per_problem": rows,
    }
