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
