"""One actor inside the job: the rollout loop plus its metrics file.

The Ray actor is threaded: ``run`` blocks one thread in the rollout loop (which lives on its
own asyncio thread), while ``metrics`` and ``stop`` arrive on others. Its prompts are leased
from the controller's data cursor (``buffer/cursor.py``), one per group, and reported settled
once the buffer acknowledged the group.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from async_rl.config import Config
from async_rl.job.metrics import MetricsWriter
from async_rl.records import ActorLaunch, ActorMetricsRecord, ActorResult

# Seconds between the actor's metric records.
METRICS_EVERY_S = 5.0


def train_prompts(cfg: Config, run_dir: Path) -> Path:
    """The prompt file of the run (the synthetic task is prepared into the run folder)."""
    return run_dir / "data" / "train.parquet" if cfg.data.train == "synthetic" else Path(cfg.data.train)


def _cursor_calls(holder: str):
    """``lease(n)`` and ``settle(group_ids, skipped)`` on the job's controller, which owns the
    data cursor; a lease is answered once the cursor is durable."""
    import ray

    from async_rl.job.placement import CONTROLLER_NAME, NAMESPACE

    controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)

    def lease(n: int):
        return controller.lease_prompts.remote(holder, n).future()

    def settle(group_ids: list[str], skipped: bool) -> None:
        controller.prompts_settled.remote(holder, group_ids, skipped)  # no wait: the buffer is the truth

    return lease, settle


class ActorWorker:
    def __init__(self, launch: ActorLaunch):
        from actors.runtime import ActorRuntime

        cfg = launch.config
        self.cfg = cfg
        self.actor_id = f"actor-{launch.actor_id}"
        run_dir = launch.run_dir
        prompts = train_prompts(cfg, run_dir)
        sync = cfg.algorithm.mode == "sync"
        lease, settle = _cursor_calls(self.actor_id)
        self.runtime = ActorRuntime.start(
            actor_id=self.actor_id,
            model_dir=launch.model_dir,
            prompts_path=prompts,
            buffer_address=launch.buffer_address,
            weights_address=launch.weights_address,
            actors=cfg.actors,
            model=cfg.model,
            reward=cfg.reward,
            weights=cfg.weights,
            work_dir=run_dir / "actors" / self.actor_id,
            # sync: generate one batch per policy version, then wait for the next version.
            max_staleness=0 if sync else cfg.algorithm.staleness.max_staleness,
            groups_per_version=cfg.learner.batch.groups_per_step / max(cfg.actors.count, 1),
            sampling_stream=launch.sampling_stream,
            release_uninformative=cfg.buffer.filter_zero_advantage,
            lease=lease, settle=settle, first_version=launch.first_version,
        )
        self.metrics = MetricsWriter(run_dir, self.actor_id)
        self._stop = threading.Event()
        self._reporter = threading.Thread(target=self._report, name=f"{self.actor_id}-metrics", daemon=True)

    def run(self) -> ActorResult:
        self._reporter.start()
        try:
            self.runtime.actor.run()
        finally:
            self._stop.set()
            self._write_metrics()
            self.close()
        return ActorResult(actor=self.actor_id, groups=self.runtime.actor.stats.groups_done)

    def close(self) -> None:
        """Stop the engine and close the metrics file (``run`` does this on its way out)."""
        self.runtime.close()
        self.metrics.close()

    def stop(self) -> None:
        self.runtime.actor.stop()

    def _report(self) -> None:
        while not self._stop.wait(METRICS_EVERY_S):
            self._write_metrics()

    def _write_metrics(self) -> None:
        record = ActorMetricsRecord.pick(self.runtime.actor.metrics(), **self._weight_deliveries(), time=time.time())
        self.metrics.write(record)

    def _weight_deliveries(self) -> dict:
        """How the versions this actor loaded arrived: streamed over the socket, or mapped from the
        publisher's /dev/shm (same node only)."""
        stats = self.runtime.subscriber.stats if self.runtime.subscriber is not None else {}
        shm = stats.get("delivered_shm", 0)
        return {"weights_streamed": stats.get("delivered", 0) - shm, "weights_from_shm": shm,
                "weights_bytes_streamed": stats.get("bytes_received", 0)}
