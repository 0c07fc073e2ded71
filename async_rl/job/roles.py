"""Ray actor classes, one per role. Each is a thin shell: it sets its process up and calls the
role's plain code, so the same code also runs outside Ray (tests, ``learners.launch``).
"""

from __future__ import annotations

import os
from typing import Any


class LearnerRank:
    """One learner rank: sets the torch.distributed variables, then runs the learner loop."""

    def run(self, env: dict[str, str], payload: dict[str, Any]) -> dict[str, Any]:
        os.environ.update(env)
        from async_rl.job.learner_role import learner_main

        return learner_main(payload)

    def pid(self) -> int:
        return os.getpid()


class ActorRole:
    """One vLLM actor (threaded Ray actor: ``run`` blocks while the others are served)."""

    def __init__(self, payload: dict[str, Any]):
        from async_rl.job.actor_role import ActorWorker

        self.worker = ActorWorker(payload)

    def run(self) -> dict[str, Any]:
        return self.worker.run()

    def stop(self) -> None:
        self.worker.stop()

    def pid(self) -> int:
        return os.getpid()


class EvaluatorRole:
    """Held-out evaluation at exact versions (threaded: ``run`` blocks while the others are served)."""

    def __init__(self, payload: dict[str, Any]):
        from async_rl.job.eval_role import EvaluatorWorker

        self.worker = EvaluatorWorker(payload)

    def run(self) -> dict[str, Any]:
        return self.worker.run()

    def evaluate_exported(self, version: int, model_dir: str) -> dict[str, Any] | None:
        return self.worker.evaluate_exported(version, model_dir)

    def evaluated(self) -> list[int]:
        return self.worker.evaluated()

    def stop(self) -> None:
        self.worker.stop()

    def pid(self) -> int:
        return os.getpid()
