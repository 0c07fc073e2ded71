"""Reward workers: a pebble process pool with a hard per-call timeout.

A reward call may hang (pathological LaTeX, a program that never ends) or crash its process;
neither may reach the caller. pebble kills a worker whose call passes its timeout and starts a
fresh one, so the pool keeps serving. Every future this module returns resolves to a
:class:`RewardRecord` — a timeout or crash becomes the failure reward with a reason.

Workers are spawned, not forked: the parent (an actor) runs vLLM and ZMQ threads, and forking a
threaded process can deadlock the child.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from async_rl.config import RewardConfig
from async_rl.rewards.base import RewardRecord, failure, load_reward

# Replace each worker after this many calls to bound slow leaks in parser caches.
MAX_TASKS_PER_WORKER = 2000
# The hard timeout sits above the reward function's own limits so those fire first.
HARD_TIMEOUT_MARGIN_S = 1.0


def score_direct(kind: str, response: str, ground_truth: str, extra_info: dict | None, cfg: RewardConfig) -> RewardRecord:
    """Call a reward function in this process (no timeout protection)."""
    return load_reward(kind).score(response, ground_truth, extra_info or {}, cfg)


def _warm_up(cfg: RewardConfig, kinds: tuple[str, ...]) -> None:
    # Import the heavy parsers (and probe the code sandbox) before any timed call, so the first
    # call is not charged for them.
    for kind in kinds:
        load_reward(kind).warm_up(cfg)


class RewardPool:
    """Scores responses in worker processes; ``submit`` never raises for a bad response."""

    def __init__(self, cfg: RewardConfig, *, kinds: tuple[str, ...] = ("math",)):
        """``kinds``: reward functions each worker prepares at start (the rest load on first use)."""
        import pebble

        self._cfg = cfg
        self._pool = pebble.ProcessPool(
            max_workers=cfg.workers,
            max_tasks=MAX_TASKS_PER_WORKER,
            initializer=_warm_up,
            initargs=(cfg, tuple(kinds)),
            context=multiprocessing.get_context("spawn"),
        )

    def submit(self, kind: str, response: str, ground_truth: str, extra_info: dict | None = None) -> Future:
        """Score with the reward named ``kind`` (``async_rl/rewards/KIND.py``)."""
        load_reward(kind)
        inner = self._pool.schedule(
            score_direct,
            args=(kind, response, ground_truth, extra_info or {}, self._cfg),
            timeout=self._cfg.timeout_s + HARD_TIMEOUT_MARGIN_S,
        )
        outer: Future = Future()
        inner.add_done_callback(lambda done: outer.set_result(self._resolve(done)))
        return outer

    def submit_for(self, data_source: str, response: str, ground_truth: str, extra_info: dict | None = None) -> Future:
        """Score with the reward ``reward.by_data_source`` names for ``data_source``."""
        return self.submit(self._cfg.reward_for(data_source), response, ground_truth, extra_info)

    def score(self, kind: str, response: str, ground_truth: str, extra_info: dict | None = None) -> RewardRecord:
        return self.submit(kind, response, ground_truth, extra_info).result()

    def score_many(self, items: list[tuple[str, str, str, dict | None]]) -> list[RewardRecord]:
        futures = [self.submit(*item) for item in items]
        return [future.result() for future in futures]

    def _resolve(self, done: Any) -> RewardRecord:
        from pebble import ProcessExpired

        try:
            return done.result()
        except FutureTimeout:
            return failure(self._cfg.wrong, "timeout", f"reward call exceeded {self._cfg.timeout_s:g} s")
        except ProcessExpired as err:
            return failure(self._cfg.wrong, "error", f"reward worker died (exit code {err.exitcode})")
        except Exception as err:  # the reward function itself raised: a bug, not a bad response
            return failure(self._cfg.wrong, "error", f"{type(err).__name__}: {err}")

    def close(self) -> None:
        self._pool.stop()
        self._pool.join(timeout=10)

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
