"""The controller's side of held-out evaluation: it starts the evaluator role, restarts it
when it dies, asks it for the final policy's evaluation and stops it. The evaluations
themselves run in the role (``job/eval_role.py``), at exact policy versions.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from async_rl.job import placement
from async_rl.job.roles import kill_roles
from async_rl.records import EvaluatorLaunch, HeldoutRecord

# The last held-out evaluation (the exported policy) gets this long before the job stops anyway.
FINAL_EVAL_TIMEOUT_S = 300.0


class HeldoutEvaluator:
    """The evaluator role as the controller sees it. ``event(text, detail)`` records what
    happened; ``allow_restart(role)`` says whether one more restart is within the budget."""

    def __init__(self, launch: EvaluatorLaunch, *, event: Callable[..., None],
                 allow_restart: Callable[[str], bool]):
        self.launch = launch
        self._event = event
        self._allow_restart = allow_restart
        self.handle = None
        self.ref = None  # the role's ``run``: ready once it returned or died
        self.pid_ref = None

    @property
    def running(self) -> bool:
        return self.handle is not None

    def start(self) -> None:
        self.handle = placement.start_evaluator(self.launch)
        self.ref = self.handle.run.remote()
        self.pid_ref = self.handle.pid.remote()
        self._event("evaluator started")

    def check(self) -> None:
        """Supervision: if the evaluator exited, record how, and restart it if it died."""
        import ray

        if self.ref is None or not ray.wait([self.ref], timeout=0)[0]:
            return
        ref, self.handle, self.ref = self.ref, None, None
        try:
            self._event(f"evaluator finished: {ray.get(ref).model_dump()}")
        except Exception as err:  # killed, or its engine failed
            self._event(f"evaluator died ({type(err).__name__}); restarting", detail=str(err))
            if self._allow_restart("evaluator"):
                self.start()

    def final(self, version: int, model_dir: Path, timeout_s: float = FINAL_EVAL_TIMEOUT_S) -> HeldoutRecord | None:
        """Evaluate the exported policy at ``version`` unless that version was evaluated from the
        wire already (the learner exits right after its last publish)."""
        import ray

        if self.handle is None:
            return None
        try:
            return ray.get(self.handle.evaluate_exported.remote(version, str(model_dir)), timeout=timeout_s)
        except Exception as err:  # the job's result stands without its last evaluation
            self._event(f"final evaluation failed ({type(err).__name__})", detail=str(err))
            return None

    def deferred(self, timeout_s: float) -> list[int]:
        """Have the evaluator evaluate the versions it kept (``learner.eval.defer``)."""
        import ray

        if self.handle is None:
            return []
        try:
            return ray.get(self.handle.evaluate_deferred.remote(), timeout=timeout_s)
        except Exception as err:  # the kept weights stay in eval/pending
            self._event(f"deferred evaluations failed ({type(err).__name__})", detail=str(err))
            return []

    def stop(self, grace_s: float) -> None:
        """Ask the evaluator to stop, give it ``grace_s``, then end its process."""
        import ray

        if self.handle is None:
            return
        handle, ref = self.handle, self.ref
        self.handle = self.ref = None
        try:
            handle.stop.remote()
            ray.wait([ref], timeout=grace_s)
        finally:
            kill_roles([handle])
