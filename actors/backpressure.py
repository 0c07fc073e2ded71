"""How far an actor may run ahead of the learner (the AReaL capacity rule).

The learner consumes ``groups_per_version`` of this actor's groups per policy version. If an
actor has submitted N groups since it first served version v0 and now serves version v, the
next submission is allowed only while

    N + 1 <= (v - v0 + max_staleness + 1) * groups_per_version

so no group can be trained more than ``max_staleness`` versions after the version it was
sampled with: compute is not spent on samples the buffer would drop as too stale. A group the
learner will never consume (all rewards equal under the zero-advantage filter, or skipped)
gives its slot back; otherwise the gate would wait for a learner that waits for groups.
(AReaL, Fu et al. 2025, §5.1 "staleness-aware training".)

Across a learner restart the gate needs nothing of its own: the restored weights arrive under
a version above any published before (``ReplayStore.resume_learner``), so the actor loads them
and its capacity grows by the jump at once, instead of waiting for the learner to pass a version
number the lost lineage used. The lead this adds is the jump plus the released batches the
learner trains again, and it drains back to the bound above; after a resume of the whole job a
new actor's gate starts from the first version it serves (``tests/unit/test_actor_gate.py``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StalenessGate:
    """``max_staleness`` or ``groups_per_version`` None turns the gate off."""

    max_staleness: int | None
    groups_per_version: float | None
    start_version: int | None = None
    submitted: int = 0

    def capacity(self, version: int) -> float:
        """Groups that may have been submitted in total while serving ``version``."""
        if self.max_staleness is None or self.groups_per_version is None:
            return float("inf")
        if self.start_version is None:
            self.start_version = version
        return (version - self.start_version + self.max_staleness + 1) * self.groups_per_version

    def may_submit(self, version: int) -> bool:
        return self.submitted + 1 <= self.capacity(version)

    def record_submit(self) -> None:
        self.submitted += 1

    def release(self) -> None:
        """A submitted group that the learner will not consume returns its slot."""
        self.submitted = max(0, self.submitted - 1)
