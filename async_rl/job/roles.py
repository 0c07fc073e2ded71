"""Ray actor classes, one per role. Each is a thin shell: it sets its process up and calls the
role's plain code, so the same code also runs outside Ray (tests, ``learners.launch``).
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from async_rl.records import (
        ActorLaunch,
        ActorResult,
        EvaluatorLaunch,
        EvaluatorResult,
        HeldoutRecord,
        LearnerLaunch,
        LearnerResult,
    )


class LearnerRank:
    """One learner rank: sets the torch.distributed variables, then runs the learner loop."""

    def run(self, env: dict[str, str], launch: LearnerLaunch) -> LearnerResult:
        os.environ.update(env)
        from async_rl.job.learner_role import learner_main

        return learner_main(launch)

    def pid(self) -> int:
        return os.getpid()


class ActorRole:
    """One vLLM actor (threaded Ray actor: ``run`` blocks while the others are served). Its engine
    starts inside ``run``, not in the constructor, so ``pid`` answers as soon as Ray has placed
    and started the process: an actor without a pid is one still waiting for a place."""

    def __init__(self, launch: ActorLaunch):
        self.launch = launch
        self.worker = None
        self.stopped = False
        self._lock = threading.Lock()

    def run(self) -> ActorResult:
        from async_rl.job.actor_role import ActorWorker
        from async_rl.records import ActorResult

        worker = ActorWorker(self.launch)
        with self._lock:
            self.worker, stopped = worker, self.stopped
        if stopped:  # asked to stop while its engine started: it never leased a prompt
            worker.close()
            return ActorResult(actor=worker.actor_id, groups=0)
        return worker.run()

    def stop(self) -> None:
        with self._lock:
            self.stopped, worker = True, self.worker
        if worker is not None:
            worker.stop()

    def pid(self) -> int:
        return os.getpid()


class EvaluatorRole:
    """Held-out evaluation at exact versions (threaded: ``run`` blocks while the others are served)."""

    def __init__(self, launch: EvaluatorLaunch):
        from async_rl.job.eval_role import EvaluatorWorker

        self.worker = EvaluatorWorker(launch)

    def run(self) -> EvaluatorResult:
        return self.worker.run()

    def evaluate_exported(self, version: int, model_dir: str) -> HeldoutRecord | None:
        return self.worker.evaluate_exported(version, model_dir)

    def evaluate_deferred(self) -> list[int]:
        return self.worker.evaluate_deferred()

    def evaluated(self) -> list[int]:
        return self.worker.evaluated()

    def stop(self) -> None:
        self.worker.stop()

    def pid(self) -> int:
        return os.getpid()


def kill_roles(handles: list) -> None:
    """End role processes at once (after their graceful stop, or when they are past one)."""
    import ray

    for handle in handles:
        try:
            ray.kill(handle, no_restart=True)
        except Exception:  # already gone
            pass
