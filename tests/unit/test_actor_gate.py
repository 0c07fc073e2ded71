from actors.backpressure import StalenessGate


def test_gate_allows_max_staleness_plus_one_versions_of_groups():
    gate = StalenessGate(max_staleness=2, groups_per_version=4)
    admitted = 0
    while gate.may_submit(version=0):
        gate.record_submit()
        admitted += 1
    assert admitted == 12  # (0 - 0 + 2 + 1) * 4
    assert gate.may_submit(version=1)


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


def test_gate_is_off_without_a_staleness_bound():
    gate = StalenessGate(max_staleness=None, groups_per_version=2)
    for _ in range(1000):
        gate.record_submit()
    assert gate.may_submit(version=0)
