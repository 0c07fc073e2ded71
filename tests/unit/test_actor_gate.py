from actors.backpressure import StalenessGate


def test_released_groups_give_their_slot_back():
    gate = StalenessGate(max_staleness=0, groups_per_version=2)
    gate.record_submit()
    gate.record_submit()
    assert not gate.may_submit(version=0)
    gate.release()  # e.g. a zero-advantage group the learner will never sample
    assert gate.may_submit(version=0)
    gate.release()
    gate.release()
    assert gate.submitted == 0


class _Job:
    """One actor (its real staleness gate) and one learner (leases, checkpoints, restarts) on a
    real buffer folder, in lockstep: the actor submits whatever its gate allows, then the learner
    trains one step and its weights reach the actor at once (a newer version only, as
    ``Actor.on_weights`` and the subscriber accept)."""

    def __init__(self, path, *, max_staleness: int, groups_per_step: int, checkpoint_every: int):
        from async_rl.config import BufferConfig
        from buffer.store import ReplayStore

        self.path, self.s, self.gpv, self.every = path, max_staleness, groups_per_step, checkpoint_every
        self.store = ReplayStore(path, BufferConfig(min_size_to_sample=1, filter_zero_advantage=False),
                                 max_staleness=max_staleness)
        self.gate = StalenessGate(max_staleness, groups_per_step)
        self.actor_version = self.version = self.step = self.groups = 0
        self.checkpoint = (0, 0, [])  # version, step, leases it covers
        self.uncommitted: list[int] = []
        self.log: list[tuple[int, list[str]]] = []  # (version, groups) per step, restarts drop steps
        self.backlog: list[int] = []  # groups stored and sampleable, after each actor turn

    def actor_turn(self) -> None:
        from buffer.testing import synthetic_batch

        while self.gate.may_submit(self.actor_version):
            self.store.insert(synthetic_batch(groups=[f"g{self.groups}"], version=self.actor_version))
            self.gate.record_submit()
            self.groups += 1
        self.backlog.append(self.store.sampleable_groups())

    def learner_step(self) -> None:
        lease, refusal = self.store.lease(self.gpv)
        assert lease is not None, f"deadlock at step {self.step}: {refusal}, the actor's gate is closed"
        self.version, self.step = self.version + 1, self.step + 1
        self.uncommitted.append(lease.id)
        self.log.append((self.version, sorted(set(lease.table.column("group_id").to_pylist()))))
        self.publish()
        if self.step % self.every == 0:
            self.checkpoint = (self.version, self.step, list(self.uncommitted))
            self.store.commit(self.uncommitted)
            self.uncommitted = []

    def publish(self) -> None:
        self.store.set_learner_version(self.version)
        self.actor_version = max(self.actor_version, self.version)

    def learner_restart(self) -> None:
        restored, self.step, covered = self.checkpoint
        self.version = self.store.resume_learner(restored, covered)
        self.uncommitted = []
        self.log = [(v, groups) for v, groups in self.log if v <= restored]
        self.publish()

    def job_restart(self) -> None:
        """``kill -9`` of everything, then ``--resume``: the buffer reopens from its folder, the
        actor starts over with a fresh gate, the learner from its checkpoint."""
        from async_rl.config import BufferConfig
        from buffer.store import ReplayStore

        del self.store
        self.store = ReplayStore(self.path, BufferConfig(min_size_to_sample=1, filter_zero_advantage=False),
                                 max_staleness=self.s)
        self.gate, self.actor_version = StalenessGate(self.s, self.gpv), 0
        self.learner_restart()

    def trained(self) -> list[str]:
        return [g for _, groups in self.log for g in groups]


def test_after_a_learner_rollback_the_gate_reopens_and_the_lead_stays_bounded(tmp_path):
    job = _Job(tmp_path, max_staleness=2, groups_per_step=2, checkpoint_every=4)
    for _ in range(10):
        job.actor_turn()
        job.learner_step()
    steady = max(job.backlog)
    assert steady == (2 + 1) * 2 and not job.store.state.evicted_groups  # max_staleness + 1 versions ahead
    announced = job.version
    job.learner_restart()  # back to the checkpoint at step 8: steps 9 and 10 are lost
    # The restored weights come under a version no other weights had, so the actor takes them
    # (a reused number, at or below the one it holds, would be skipped) and its gate reopens.
    assert job.version == announced + 1 and job.actor_version == job.version and job.step == 8
    stale_at_restart = job.store.state.evicted_groups["stale"]
    for _ in range(20):
        job.actor_turn()
        job.learner_step()
    assert job.step == 28 and max(job.backlog) == steady
    # The jump (10 announced, 8 restored, 11 now) makes every stored row 3 versions staler:
    # the released batches and one more version's groups age out at once, and nothing after.
    assert stale_at_restart == (11 - 8) * 2 == job.store.state.evicted_groups["stale"]
    trained = job.trained()
    assert len(trained) == len(set(trained))
    assert len(trained) + stale_at_restart + job.store.sampleable_groups() == job.groups


def test_after_a_job_resume_the_fresh_gate_neither_waits_forever_nor_runs_away(tmp_path):
    job = _Job(tmp_path, max_staleness=2, groups_per_step=2, checkpoint_every=3)
    for _ in range(7):
        job.actor_turn()
        job.learner_step()
    held = job.store.sampleable_groups() + job.gpv  # the killed step's batch comes back
    job.job_restart()  # back to the checkpoint at step 6, version 6 (7 was announced)
    assert (job.step, job.version) == (6, 8)
    for _ in range(20):
        job.actor_turn()
        job.learner_step()
    # The new actor's gate starts from nothing while the buffer still holds what the old one
    # made: the lead after the resume is at most that backlog plus one gate's worth, and it
    # drains back to the gate's bound.
    assert max(job.backlog[7:]) <= held + (2 + 1) * 2 and job.backlog[-1] == (2 + 1) * 2
    trained = job.trained()
    assert len(trained) == len(set(trained)) and job.step == 26
    assert len(trained) + job.store.state.evicted_groups.get("stale", 0) + job.store.sampleable_groups() == job.groups
