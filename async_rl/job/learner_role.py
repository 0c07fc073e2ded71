"""The learner loop, run on every learner rank (one DeepSpeed group).

Per step: rank 0 leases a batch of whole groups from the buffer (blocking on the buffer's
``min_size_to_sample`` and rate limiter) and broadcasts it as Arrow IPC bytes to the other
ranks (every rank trains on its share of the SAME table); all ranks train; every
``publish_every`` steps all ranks gather the weights and rank 0 tells the buffer the new policy
version, then publishes them over ZeroMQ; every ``learner.checkpoint.every`` steps all ranks
checkpoint.

Nothing trained is lost or trained twice across a learner restart: a batch's lease is
committed once the checkpoint covering its step is written (with checkpointing off, at the
end of the step: nothing later makes it durable), and the checkpoint names the leases it
covers. A starting group tells the buffer which checkpoint it restored (``resume_learner``):
those leases are committed (the group may have died between the checkpoint and the commit),
every other one is released, and the buffer answers with the version to publish the restored
weights under, one past any the lost lineage announced, so a version number never names two
weight sets. ``step`` counts the updates of the surviving lineage (``learner.max_steps`` and the
cadences count it); ``version`` may jump at a restart.

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
# In RUN_DIR/logs/: per step, the groups trained and their tokens; per learner start, a line
# {"restored": checkpoint version, "version", "step"}: steps logged before it with a version above
# the restored one belong to a lineage that died.
TRAINED_LOG = "trained-groups.jsonl"


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
        self.restored = self.version = state.version if state else 0
        self.step = int(state.extra.get("step", state.version)) if state else 0
        self.covered: list[int] = list(state.extra.get("leases", [])) if state else []  # by the checkpoint
        self.uncommitted: list[int] = []  # leases trained on since the last checkpoint (rank 0)
        self.lease_id: int | None = None
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
        path = self.run_dir / "logs" / TRAINED_LOG
        torn = path.is_file() and path.stat().st_size > 0 and not _ends_with_newline(path)
        self.trained = path.open("a", buffering=1)
        if torn:  # a learner killed mid-line: the next line must not be glued to it
            self.trained.write("\n")

    # ------------------------------------------------------------------ loop

    def run(self) -> LearnerResult:
        self.resume_lineage()
        self.publish()  # actors may hold other weights (a resume, a restarted learner)
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
            self.step += self.trainer.policy_version - self.version
            self.version = self.trainer.policy_version
            if self.rank == 0:
                self.record_trained(table)
            if self.step % self.cfg.weights.publish_every == 0:
                with self.timer.phase("publish"):
                    self.publish()
            every = self.cfg.learner.checkpoint.every
            if every and self.step % every == 0:
                with self.timer.phase("checkpoint"):
                    self.save()
            elif not every:
                self.commit()
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
                lease = self.client.lease(self.cfg.learner.batch.groups_per_step, timeout_s=SAMPLE_POLL_S)
            if lease is None or lease.table.num_rows == 0:
                return self.broadcast_bytes(None, IDLE)
            self.lease_id, table = lease.id, lease.table
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
        length = self.broadcast_int(len(data) if data is not None else (code if code is not None else 0))
        if length <= 0:
            return length
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == 0 else torch.empty(length, dtype=torch.uint8)
        torch.distributed.broadcast(buf, src=0)
        return data if self.rank == 0 else buf.numpy().tobytes()

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        import torch

        if self.engine.dist.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        torch.distributed.broadcast(tensor, src=0)
        return int(tensor)

    def should_stop(self) -> bool:
        budget = self.cfg.learner.max_steps
        return stop_requested(self.run_dir, "learner") or (budget > 0 and self.step >= budget)

    # ------------------------------------------------------------------ side effects

    def resume_lineage(self) -> None:
        """Settle the leases of the lineage this group continues (see the module docstring) and
        take the version the buffer gives the restored weights, on every rank."""
        fresh = 0
        if self.rank == 0:
            fresh = self.client.resume_learner(self.restored, self.covered)
            self.trained.write(json.dumps({"restored": self.restored, "version": fresh, "step": self.step}) + "\n")
            if fresh != self.restored:
                log.info("restored checkpoint v%d publishes as v%d (v%d..v%d were a lost lineage's)",
                         self.restored, fresh, self.restored + 1, fresh - 1)
        self.version = self.trainer.policy_version = self.broadcast_int(fresh)

    def publish(self) -> None:
        weights = self.trainer.weights_for_publishing()  # collective under ZeRO-3
        if self.rank == 0:
            start = time.monotonic()
            # Announced first: the buffer's version is then never below one an actor may hold,
            # which is what keeps a restarted learner's version numbers fresh.
            self.client.set_learner_version(self.version)
            self.publisher.publish(self.version, weights)
            self.last_publish_s = time.monotonic() - start

    def save(self) -> None:
        """Checkpoint (collective), then commit the leases the checkpoint covers."""
        from learners import checkpoint

        checkpoint.save(
            self.engine,
            self.run_dir / "checkpoints",
            version=self.version,
            extra={"step": self.step, "leases": list(self.uncommitted)},
            keep=self.cfg.learner.checkpoint.keep,
        )
        self.commit()

    def commit(self) -> None:
        """Make the uses of the leases trained on so far final in the buffer (rank 0)."""
        if self.rank != 0 or not self.uncommitted:
            return
        unknown = self.client.commit(self.uncommitted)
        if unknown:
            log.warning("buffer: leases %s were no longer outstanding at commit", unknown)
        self.uncommitted = []

    def record_trained(self, table) -> None:
        """The sample log line of a step (rank 0), written before anything makes it durable."""
        self.uncommitted.append(self.lease_id)
        groups, _ = group_facts(table.column("group_id").to_pylist(), table.column("response_tokens").to_pylist(),
                                table.column("reward").to_pylist())
        self.trained.write(json.dumps({"version": self.version, "step": self.step, "lease": self.lease_id,
                                       "groups": groups}) + "\n")

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
            step=self.step,
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
        if self.step % self.cfg.logging.log_every == 0:
            self.metrics.write(record, step=self.step)

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


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(-1, 2)
        return handle.read(1) == b"\n"


def _to_ipc(table) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()
