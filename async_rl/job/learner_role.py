"""The learner loop, run on every learner rank (one DeepSpeed group).

Per step: rank 0 samples a batch of whole groups from the buffer (blocking on the buffer's
``min_size_to_sample`` and rate limiter) and broadcasts it as Arrow IPC bytes to the other
ranks (every rank trains on its share of the SAME table); all ranks train; every
``publish_every`` steps all ranks gather the weights and rank 0 publishes them over ZeroMQ and
tells the buffer the new policy version; every ``learner.checkpoint.every`` steps all ranks checkpoint.

Shutdown order: rank 0 sees the stop request (STOP file or step budget) and broadcasts it in
place of a batch; every rank checkpoints, rank 0 exports the HF model, closes the publisher
(after its last transfer), then the buffer client.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from async_rl.config import Config
from async_rl.job.metrics import MetricsWriter
from async_rl.job.runfolder import stop_requested
from async_rl.records import LearnerLaunch, LearnerResult, LearnerStepRecord

log = logging.getLogger("async_rl.learner")
# How long rank 0 waits for a batch before re-checking the stop request.
SAMPLE_POLL_S = 2.0
STOP = -1
IDLE = 0
TRAINED_LOG = "trained-groups.jsonl"  # in RUN_DIR/logs/: per step, the groups trained and their tokens


def learner_main(launch: LearnerLaunch | dict[str, Any]) -> LearnerResult:
    """Rank entry point (a Ray actor, or ``learners.launch`` with the launch spec as JSON)."""
    import torch

    from async_rl.job.placement import learner_threads

    launch = LearnerLaunch.model_validate(launch)
    cfg = launch.config
    torch.set_num_threads(learner_threads(cfg.learner))
    loop = LearnerLoop(cfg, launch.run_dir, launch.model_dir, launch)
    try:
        return loop.run()
    finally:
        loop.close()


class LearnerLoop:
    def __init__(self, cfg: Config, run_dir: Path, model_dir: Path, launch: LearnerLaunch):
        from learners import checkpoint
        from learners.engine import LearnerEngine
        from learners.profiling import PhaseTimer
        from learners.trainer import Trainer

        self.cfg, self.run_dir = cfg, run_dir
        self.engine = LearnerEngine(model_dir, cfg.learner, dtype=cfg.model.dtype)
        self.rank = self.engine.dist.rank
        state = checkpoint.resume(self.engine, run_dir / "checkpoints") if launch.resume else None
        self.version = state.version if state else 0
        self.timer = PhaseTimer()  # host-side only: adds no device sync (learners/profiling.py)
        self.trainer = Trainer.for_job(self.engine, cfg, stop_token_ids=launch.stop_token_ids,
                                       policy_version=self.version, timer=self.timer)
        self.client = self.publisher = self.metrics = self.trained = None
        if self.rank == 0:
            self._open_rank0(launch.buffer_address)
        self.busy_s = 0.0
        self.started = time.monotonic()

    def _open_rank0(self, buffer_address: str) -> None:
        from async_rl.weights.publisher import WeightPublisher
        from buffer.client import BufferClient
        from buffer.service import learner_token

        token = learner_token(self.run_dir / "buffer")  # the folder the controller started it on
        self.client = BufferClient(buffer_address, learner_token=token,
                                   curve_keys_dir=self.cfg.weights.curve_keys_dir)
        self.publisher = WeightPublisher(self.cfg.weights)
        self.metrics = MetricsWriter(self.run_dir, "learner", tensorboard=self.cfg.logging.tensorboard)
        # The learner's sample log: the groups each step trained on (what a resume must not lose).
        self.trained = (self.run_dir / "logs" / TRAINED_LOG).open("a", buffering=1)

    # ------------------------------------------------------------------ loop

    def run(self) -> LearnerResult:
        self.publish(restart=True)  # actors may hold older weights (a resume, a restarted learner)
        steps = 0
        while True:
            wait_start = time.monotonic()
            table = self.next_batch()
            if table is STOP:
                break
            if table is IDLE:
                continue
            waited = time.monotonic() - wait_start
            start, trained_at = time.monotonic(), self.version
            metrics = self.trainer.train_step(table)
            self.version = self.trainer.policy_version
            if self.version % self.cfg.weights.publish_every == 0:
                with self.timer.phase("publish"):
                    self.publish()
            if self.cfg.learner.checkpoint.every and self.version % self.cfg.learner.checkpoint.every == 0:
                with self.timer.phase("checkpoint"):
                    self.save()
            step_s = time.monotonic() - start
            self.busy_s += step_s
            steps += 1
            phases = self.timer.take()
            if self.rank == 0:
                self.log_step(table, {**metrics, **phases}, trained_at=trained_at, step_s=step_s, wait_s=waited)
        self.save()
        self.export()
        return LearnerResult(version=self.version, steps=steps)

    def next_batch(self):
        """Rank 0 samples; the batch (or STOP/IDLE) is broadcast so all ranks agree."""
        import pyarrow as pa

        table = None
        if self.rank == 0:
            if self.should_stop():
                return self.broadcast_bytes(None, STOP)
            with self.timer.phase("sample_wait"):
                table = self.client.sample(self.cfg.learner.batch.groups_per_step, timeout_s=SAMPLE_POLL_S)
            if table is None or table.num_rows == 0:
                return self.broadcast_bytes(None, IDLE)
        with self.timer.phase("broadcast"):
            if self.engine.dist.world_size == 1:
                return table
            data = None if table is None else _to_ipc(table)
            received = self.broadcast_bytes(data, None)
            if received in (STOP, IDLE):
                return received
            return table if self.rank == 0 else pa.ipc.open_stream(received).read_all()

    def broadcast_bytes(self, data: bytes | None, code: int | None):
        """Length-prefixed raw bytes from rank 0 (no pickle); a negative/zero length is a code."""
        import torch

        if self.engine.dist.world_size == 1:
            return code if code is not None else data
        # Rank 0 sends the length (or the code); the other ranks' value is overwritten.
        value = len(data) if data is not None else (code if code is not None else 0)
        length = torch.tensor([value], dtype=torch.int64)
        torch.distributed.broadcast(length, src=0)
        if int(length) <= 0:
            return int(length)
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == 0 else torch.empty(int(length), dtype=torch.uint8)
        torch.distributed.broadcast(buf, src=0)
        return data if self.rank == 0 else buf.numpy().tobytes()

    def should_stop(self) -> bool:
        budget = self.cfg.learner.max_steps
        return stop_requested(self.run_dir, "learner") or (budget > 0 and self.version >= budget)

    # ------------------------------------------------------------------ side effects

    def publish(self, *, restart: bool = False) -> None:
        weights = self.trainer.weights_for_publishing()  # collective under ZeRO-3
        if self.rank == 0:
            start = time.monotonic()
            self.publisher.publish(self.version, weights)
            self.client.set_learner_version(self.version, restart=restart)
            self.last_publish_s = time.monotonic() - start

    def save(self) -> None:
        from learners import checkpoint

        checkpoint.save(
            self.engine,
            self.run_dir / "checkpoints",
            version=self.version,
            keep=self.cfg.learner.checkpoint.keep,
        )

    def export(self) -> None:
        """The final policy as an HF folder that transformers and vLLM load (collective)."""
        from learners import checkpoint

        checkpoint.export_hf(self.engine, self.run_dir / "final_model")

    def log_step(self, table, metrics: dict[str, float], *, trained_at: int, step_s: float, wait_s: float) -> None:
        from buffer.schema import row_staleness

        rewards = np.asarray(table.column("reward").to_pylist(), dtype=np.float64)
        staleness = row_staleness(table, trained_at).astype(np.float64)
        responses = table.column("response_tokens").to_pylist()
        tokens = sum(len(r) for r in responses)
        groups, all_equal = group_facts(table.column("group_id").to_pylist(), responses, rewards.tolist())
        elapsed = time.monotonic() - self.started
        record = LearnerStepRecord(
            step=self.version,
            version=self.version,
            ranks=self.engine.dist.world_size,
            reward_mean=float(rewards.mean()),
            accuracy=float(np.mean(table.column("correct").to_pylist())),
            staleness_mean=float(staleness.mean()),
            staleness_max=float(staleness.max()),
            response_tokens=tokens,
            groups=len(groups),
            groups_all_equal=all_equal,
            step_s=step_s,
            sample_wait_s=wait_s,
            busy_fraction=self.busy_s / max(elapsed, 1e-9),
            publish_s=getattr(self, "last_publish_s", None),
            train=metrics,
        )
        if self.version % self.cfg.logging.log_every == 0:
            self.metrics.write(record, step=self.version)
        self.trained.write(json.dumps({"version": self.version, "groups": groups}) + "\n")

    def close(self) -> None:
        for resource in (self.publisher, self.client, self.metrics, self.trained):
            if resource is not None:
                resource.close()


def group_facts(group_ids: list[str], responses: list[list[int]], rewards: list[float]) -> tuple[dict[str, int], int]:
    """Per group of a batch its response tokens, and how many groups have all-equal rewards
    (no policy-gradient signal: what the zero-advantage filter keeps out)."""
    tokens: dict[str, int] = {}
    seen: dict[str, set[float]] = {}
    for gid, response, reward in zip(group_ids, responses, rewards, strict=True):
        tokens[gid] = tokens.get(gid, 0) + len(response)
        seen.setdefault(gid, set()).add(reward)
    return tokens, sum(len(values) == 1 for values in seen.values())


def _to_ipc(table) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()
