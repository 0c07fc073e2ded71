"""The actor loop: generate continuously, score off the hot path, write acknowledged groups.

    prompts ──► [≤ prompts_in_flight groups on the engine] ──► rewards (process pool)
                     ▲ staleness gate                            │
                     │                                           ▼
    weight subscriber ──► engine.update_weights      BufferWriter ──► buffer (ack)

Each group is one asyncio task: take a prompt from the prompt source (in a job, a lease from
the data cursor), tokenise it, ``rollout_group`` (``actors/group.py``: n samples in one vLLM
request joining the continuous batch, each scored in the reward pool), build the Arrow batch under the
hand-out's group id, hand it to the writer; once the buffer acknowledged the batch the source
hears the prompt is settled (``actors/prompts.py``). Reward calls never block generation:
they run in worker processes while the engine keeps serving the other groups. A slot is freed only once the
writer accepted the batch, so a slow or rate-limited buffer throttles generation.

Weight sets arrive on the subscriber's thread; ``_on_weights`` runs the engine update on the
actor's loop and returns when the new weights serve, so the subscriber waits meanwhile.

Shutdown order (``stop`` then ``run`` returning): stop taking prompts → close the weight
subscriber → let running groups finish (``drain_s``) and cancel the rest → flush the writer
(acknowledged rows only) → close the writer. The engine and the reward pool belong to the
caller (``ActorRuntime.close`` shuts those down).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from actors.aio import BackgroundLoop
from actors.backpressure import StalenessGate
from actors.engine import VllmEngine
from actors.group import REWARD_GRACE_S, Group, Scorer, Scoring, rollout_group
from actors.prompts import Handout, PromptSource, StreamPrompts, encode_prompt
from actors.trajectories import group_batch
from actors.writer import BufferWriter
from async_rl.config import ActorsConfig
from async_rl.tasks.dataset import PromptRow

log = logging.getLogger(__name__)

# How often the loop re-checks the staleness gate and the stop flag while slots are full.
POLL_S = 0.05
# Running groups get this long to finish on stop before they are cancelled.
DRAIN_S = 30.0


@dataclass
class ActorMetrics:
    """Counters read by ``Actor.metrics()``; updated on the actor's loop only."""

    started_at: float = field(default_factory=time.monotonic)
    tokens: int = 0
    groups_done: int = 0
    groups_skipped: int = 0
    reward_sum: float = 0.0
    reward_count: int = 0
    reward_failures: int = 0
    finish_reasons: Counter = field(default_factory=Counter)
    updates: int = 0
    last_update_s: float | None = None
    gate_waits: int = 0


class Actor:
    """One vLLM actor: ``run()`` generates until ``stop()`` (or ``max_groups`` groups)."""

    def __init__(
        self, *, actor_id: str, engine: VllmEngine, loop: BackgroundLoop,
        prompts: PromptSource | Iterator[PromptRow],
        score: Scorer, buffer_address: str, cfg: ActorsConfig, reward_timeout_s: float,
        reward_failure_score: float = -1.0, gate: StalenessGate | None = None,
        reward_grace_s: float = REWARD_GRACE_S, release_uninformative: bool = False,
        curve_keys_dir: str | None = None, first_version: int = 0,
    ):
        self.actor_id = actor_id
        self.engine = engine
        self.loop = loop
        # A bare iterator (tests, studies) gets fresh group ids and no tracking.
        self._prompts = prompts if hasattr(prompts, "take") else StreamPrompts(prompts, actor_id=actor_id)
        self._scoring = Scoring(score, reward_timeout_s + reward_grace_s, reward_failure_score)
        self._buffer_address = buffer_address
        self._curve_keys_dir = curve_keys_dir
        self._cfg = cfg
        self._gate = gate or StalenessGate(None, None)
        # A resumed job's learner starts from a checkpoint: sampling before its weights arrive
        # would spend the first groups on a policy it has left behind (and age them out).
        self._first_version = first_version
        # With the buffer's zero-advantage filter on, groups whose rewards are all equal are
        # never sampled, so they must not use up the staleness gate's capacity.
        self._release_uninformative = release_uninformative
        self._kv_on_update = "recompute" if cfg.recompute_kv_on_update else "keep"
        self._stopping = asyncio.Event()
        self._in_flight: set[asyncio.Task] = set()
        self._writer: BufferWriter | None = None
        self.stats = ActorMetrics()

    # ------------------------------------------------------------------ control (any thread)

    def run(self, *, max_groups: int | None = None, timeout_s: float | None = None) -> ActorMetrics:
        """Generate until stopped (or ``max_groups`` groups were acknowledged); blocks."""
        return self.loop.run(self._run(max_groups), timeout_s)

    def stop(self) -> None:
        self.loop.loop.call_soon_threadsafe(self._stopping.set)

    def on_weights(self, version: int, named_tensors) -> None:
        """The subscriber's callback: returns once ``version`` serves (raises if it failed).

        A version not newer than the served one (the learner re-announcing the weights the
        engine started from) is skipped.
        """
        if version <= self.engine.version:
            log.info("weights v%d: already serving v%d, skipped", version, self.engine.version)
            return
        report = self.loop.run(self.engine.update_weights(version, named_tensors))
        self.stats.updates += 1
        self.stats.last_update_s = report.total_s

    def metrics(self) -> dict:
        """tokens/s, in-flight requests, weight version, update latency, rewards, finish reasons."""
        s = self.stats
        elapsed = max(time.monotonic() - s.started_at, 1e-9)
        return {
            "actor_id": self.actor_id,
            "tokens_per_s": s.tokens / elapsed,
            "tokens": s.tokens,
            "groups_in_flight": len(self._in_flight),
            "groups_done": s.groups_done,
            "groups_skipped": s.groups_skipped,
            "weight_version": self.engine.version,
            "weight_updates": s.updates,
            "weight_update_s": s.last_update_s,
            "reward_mean": s.reward_sum / s.reward_count if s.reward_count else None,
            "reward_failures": s.reward_failures,
            "finish_reasons": dict(s.finish_reasons),
            "staleness_gate_waits": s.gate_waits,
            "buffer_pending": self._writer.pending if self._writer else 0,
            "rows_acked": self._writer.stats.rows_acked if self._writer else 0,
            "buffer_batches_refused": self._writer.stats.batches_refused if self._writer else 0,
            "buffer_last_refusal": self._writer.stats.last_refusal if self._writer else None,
            "buffer_stalled_s": round(self._writer.stalled_s, 1) if self._writer else 0.0,
        }

    # ------------------------------------------------------------------ the loop (actor's loop)

    async def _run(self, max_groups: int | None) -> ActorMetrics:
        self._stopping.clear()
        self._writer = BufferWriter(self._buffer_address, max_pending=self._cfg.prompts_in_flight,
                                    curve_keys_dir=self._curve_keys_dir).start()
        submitted = 0
        try:
            while not self._stopping.is_set() and (max_groups is None or submitted < max_groups):
                if self.engine.version < self._first_version:
                    await asyncio.sleep(POLL_S)
                    continue
                if len(self._in_flight) < self._cfg.prompts_in_flight and self._gate.may_submit(self.engine.version):
                    self._launch(await self._prompts.take())
                    submitted += 1
                    continue
                if len(self._in_flight) < self._cfg.prompts_in_flight:
                    self.stats.gate_waits += 1
                await self._reap(POLL_S)
            await self._finish_running(DRAIN_S)
            await self._writer.flush(DRAIN_S)
        finally:
            for task in self._in_flight:
                task.cancel()
            await self._writer.close()
        return self.stats

    def _launch(self, handout: Handout) -> None:
        self._gate.record_submit()
        task = asyncio.get_running_loop().create_task(self._group(handout))
        self._in_flight.add(task)

    async def _reap(self, timeout: float) -> None:
        """Wait up to ``timeout`` for a group to finish; a failed group stops the actor."""
        if not self._in_flight:
            await asyncio.sleep(timeout)
            return
        done, _ = await asyncio.wait(self._in_flight, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            self._in_flight.discard(task)
            task.result()  # engine errors are fatal: the controller restarts the actor

    async def _finish_running(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._in_flight and time.monotonic() < deadline:
            await self._reap(min(1.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------ one group

    async def _group(self, handout: Handout) -> None:
        row = handout.row
        prompt_ids = encode_prompt(self.engine.tokenizer, row.messages)
        if len(prompt_ids) + self._cfg.max_tokens > self.engine.max_model_len:
            log.warning("prompt %s: %d tokens + max_tokens exceed max_model_len; skipped",
                        row.prompt_id, len(prompt_ids))
            self._skip(handout)
            return
        group = await rollout_group(self.engine, self._scoring, prompt_ids, data_source=row.data_source,
                                    truth=row.ground_truth, extra_info=row.extra_info,
                                    n=self._cfg.n_samples_per_prompt)
        if not group.complete:
            self._skip(handout)
            return
        if self._release_uninformative and not group.informative:
            self._gate.release()
        batch = group_batch(
            group_id=handout.group_id, actor_id=self.actor_id, row=row,
            prompt_tokens=prompt_ids, samples=group.samples, rewards=group.rewards, kv_on_update=self._kv_on_update,
        )
        await self._writer.put(batch, on_stored=lambda: self._prompts.settled(handout.group_id))
        self._count(group)

    def _skip(self, handout: Handout) -> None:
        """A group that will never be stored: its slot and its prompt are given up."""
        self.stats.groups_skipped += 1
        self._gate.release()
        self._prompts.settled(handout.group_id, skipped=True)

    def _count(self, group: Group) -> None:
        s, samples, rewards = self.stats, group.samples, group.rewards
        s.groups_done += 1
        s.tokens += sum(len(x.token_ids) for x in samples)
        s.finish_reasons.update(x.finish_reason for x in samples)
        s.reward_sum += sum(r.score for r in rewards)
        s.reward_count += len(rewards)
        s.reward_failures += sum(r.status in ("timeout", "error") for r in rewards)
