"""One group: n samples of one prompt from the engine, each with its reward record.

Every rollout is made of groups: the actor's loop (``actors/rollout.py``), held-out evaluation
(``async_rl/evaluation/runner.py``) and the single-process reference step
(``async_rl/reference.py``) all call :func:`rollout_group`.

The engine call is the first thing it does, before any await: groups started in one order draw
the engine's sampling seeds (``async_rl/seeds.py``) in that order. Every sample gets a record: a
reward call that raises, or that has not answered ``Scoring.wait_s`` after it was made, becomes a
failure record (status ``error`` or ``timeout``) scored ``Scoring.failure_score``, so a broken
or stuck scorer never takes the caller down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from actors.engine import Sample
from async_rl.rewards.base import RewardRecord, failure

# A reward future unresolved this long after the pool's own timeout is abandoned: the pool
# should have answered, so something below it is stuck; the caller must not be.
REWARD_GRACE_S = 10.0

Scorer = Callable[[str, str, str, dict], Future]  # (data_source, response, truth, extra) -> Future[RewardRecord]


@dataclass(frozen=True)
class Scoring:
    """How samples are scored: the reward call, and what a call that fails or hangs is worth."""

    submit: Scorer
    wait_s: float
    failure_score: float

    @classmethod
    def of(cls, pool, cfg) -> Scoring:
        """A ``RewardPool`` started with ``cfg`` (a ``RewardConfig``): the reward its config names
        for each data source, waited on for the pool's own timeout plus grace."""
        return cls(pool.submit_for, cfg.timeout_s + REWARD_GRACE_S, cfg.wrong)


@dataclass(frozen=True)
class Group:
    """The samples of one prompt and their reward records (``rewards[i]`` scores ``samples[i]``)."""

    prompt_ids: list[int]
    samples: list[Sample]
    rewards: list[RewardRecord]

    @property
    def complete(self) -> bool:
        """Every sample has at least one token (an empty one cannot be stored or trained on)."""
        return all(s.token_ids for s in self.samples)

    @property
    def informative(self) -> bool:
        """The rewards differ, so the group's advantages are not all zero."""
        return len({r.score for r in self.rewards}) > 1


async def rollout_group(
    engine, scoring: Scoring, prompt_ids: Sequence[int], *, data_source: str, truth: str,
    extra_info: dict | None = None, n: int | None = None, **sampling,
) -> Group:
    """``n`` samples of ``prompt_ids`` on ``engine`` (``sampling``: its per-call overrides, e.g.
    ``greedy``, ``max_tokens``), each scored against ``truth`` by the reward of ``data_source``."""
    samples = await engine.generate(prompt_ids, n=n, **sampling)
    rewards = await asyncio.gather(*(score(scoring, data_source, s.text, truth, extra_info or {}) for s in samples))
    return Group(list(prompt_ids), list(samples), list(rewards))


async def score(scoring: Scoring, data_source: str, text: str, truth: str, extra_info: dict) -> RewardRecord:
    """One reward record; a call that raises or does not answer becomes a failure record."""
    try:
        future = scoring.submit(data_source, text, truth, extra_info)
        return await asyncio.wait_for(asyncio.wrap_future(future), scoring.wait_s)
    except TimeoutError:
        return failure(scoring.failure_score, "timeout", f"no reward after {scoring.wait_s:g} s")
    except Exception as err:  # a broken scorer must not take the caller down
        return failure(scoring.failure_score, "error", f"{type(err).__name__}: {err}")
