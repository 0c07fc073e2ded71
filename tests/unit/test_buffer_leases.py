"""Sample leases: a group served to the learner is used for good only once the learner commits
the lease (its checkpoint covers the training); a learner group that restarts gives back every
lease its checkpoint does not cover; the journal reproduces all of it, and a restored learner
never publishes under a version number the lost lineage used."""

import json
import os

import pytest

from async_rl.config import BufferConfig
from buffer import inspection
from buffer.store import ReplayStore
from buffer.testing import synthetic_batch


def _store(path, *, max_staleness: int = 4, **cfg):
    cfg.setdefault("min_size_to_sample", 1)
    return ReplayStore(path, BufferConfig(**cfg), max_staleness=max_staleness)


def _groups(table):
    return list(dict.fromkeys(table.column("group_id").to_pylist()))


def _filled(path, groups="abcd", **cfg):
    store = _store(path, **cfg)
    store.insert(synthetic_batch(groups=list(groups)))
    return store


def _drain(store) -> list[str]:
    """Every group a plain sample still returns, one at a time."""
    out = []
    while (table := store.sample(1)[0]) is not None:
        out += _groups(table)
    return out


def _journal_ops(path) -> list[str]:
    return [json.loads(line)["op"] for line in (path / "state.jsonl").read_text().splitlines()]


def test_a_leased_group_is_not_served_again_and_a_commit_makes_its_use_final(tmp_path):
    store = _filled(tmp_path)
    lease, _ = store.lease(2)
    assert _groups(lease.table) == ["a", "b"] and lease.table.column("times_sampled").to_pylist() == [1] * 8
    assert _groups(store.lease(2)[0].table) == ["c", "d"]
    none, reason = store.lease(1)
    assert none is None and reason.startswith("not_enough_groups: 0 sampleable group(s)")
    assert store.commit([lease.id]) == []
    assert store.state.times_sampled == {h: 1 for h in store.index.group_hash.view[:2].tolist()}
    assert inspection.stats(store)["group_status"]["consumed"] == 2
    assert inspection.stats(store)["leases"] == {"outstanding": 1, "groups": 2}


def test_a_learner_restart_commits_what_its_checkpoint_covers_and_releases_the_rest(tmp_path):
    store = _filled(tmp_path)
    covered, lost = store.lease(2)[0], store.lease(2)[0]
    store.resume_learner(0, [covered.id])
    assert store.state.leases == {}
    assert _drain(store) == ["c", "d"]  # trained only by the lineage that died: served again
    assert store.commit([lost.id]) == [lost.id]  # a late commit from that lineage changes nothing
    assert store.sample(1)[0] is None and store.state.samples == 2 + 2


def test_uncommitted_leases_outlive_a_buffer_crash_and_are_released_by_the_next_learner(tmp_path):
    store = _filled(tmp_path)
    committed, held = store.lease(1)[0], store.lease(2)[0]
    store.commit([committed.id])
    del store  # a crash: no close
    store = _store(tmp_path)
    assert store.state.leases == {held.id: store.state.leases[held.id]} and store.leased_groups() == 2
    assert _drain(store) == ["d"]  # b and c stay with the live learner
    assert store.commit([held.id]) == []  # which commits them as if the buffer never died
    store.close()
    store = _store(tmp_path)
    assert store.lease(1)[0] is None and store.state.samples == 4
    # A lease after the reopen gets a new id: ids are never reused.
    store.insert(synthetic_batch(groups=["e"]))
    assert store.lease(1)[0].id == held.id + 1


def test_a_compacted_journal_keeps_the_leases(tmp_path, monkeypatch):
    import buffer.journal

    monkeypatch.setattr(buffer.journal, "COMPACT_EVERY", 2)
    store = _filled(tmp_path)
    held = store.lease(1)[0]
    store.insert(synthetic_batch(groups=["e"]))  # the journal compacts into one snapshot line
    store.insert(synthetic_batch(groups=["f"]))
    store.close()
    assert _journal_ops(tmp_path)[0] == "snapshot"
    store = _store(tmp_path)
    assert list(store.state.leases) == [held.id]
    store.resume_learner(0, [])
    assert _drain(store) == ["a", "b", "c", "d", "e", "f"]


def test_reopening_reproduces_the_state_of_every_lease(tmp_path):
    store = _filled(tmp_path, groups="abcdef", max_times_sampled=2)
    first, second = store.lease(3)[0], store.lease(3)[0]
    store.lease(3)
    store.commit([first.id])
    store.resume_learner(0, [second.id])  # the third lease released
    held = store.lease(2)[0]
    before = (dict(store.state.leases), dict(store.state.times_sampled), store.index.group_times_sampled.view.tolist(),
              store.index.group_status.view.tolist(), store.state.samples)
    store.close()
    store = _store(tmp_path, max_times_sampled=2)
    after = (dict(store.state.leases), dict(store.state.times_sampled), store.index.group_times_sampled.view.tolist(),
             store.index.group_status.view.tolist(), store.state.samples)
    assert after == before and list(store.state.leases) == [held.id]


def test_a_group_leased_twice_keeps_the_use_of_the_released_lease(tmp_path):
    store = _filled(tmp_path, groups="a", max_times_sampled=2)
    first, second = store.lease(1)[0], store.lease(1)[0]
    assert second.table.column("times_sampled")[0].as_py() == 2
    store.commit([first.id])  # one final use of two allowed: still LIVE though leased again
    assert inspection.stats(store)["group_status"]["live"] == 1
    store.resume_learner(0, [])
    again = store.lease(1)[0]
    assert _groups(again.table) == ["a"] and again.table.column("times_sampled")[0].as_py() == 2
    store.commit([again.id])
    assert inspection.stats(store)["group_status"]["consumed"] == 1


def test_a_released_group_past_the_staleness_cap_is_not_served_again(tmp_path):
    store = _store(tmp_path, max_staleness=1)
    store.insert(synthetic_batch(groups=["old"], version=0))
    store.insert(synthetic_batch(groups=["new"], version=3))
    store.set_learner_version(1)
    assert _groups(store.lease(2)[0].table) == ["old", "new"]
    store.set_learner_version(3)
    assert store.resume_learner(2, []) == 4  # 3 was announced by the lineage that died
    assert _drain(store) == ["new"] and store.state.evicted_groups == {"stale": 1}


def test_a_restored_learner_gets_a_version_number_no_other_weights_had(tmp_path):
    store = _filled(tmp_path)
    store.set_learner_version(7)
    assert store.resume_learner(5, []) == 8  # 6 and 7 named weights of a lineage that is gone
    assert store.resume_learner(8, []) == 8  # its own checkpoint at 8: the weights published as 8
    assert store.resume_learner(11, []) == 11  # trained past what it announced (publish_every > 1)
    with pytest.raises(ValueError, match="learner version 10 < 11: it only moves up"):
        store.set_learner_version(10)
    store.close()
    assert _store(tmp_path).learner_version == 11


def test_released_groups_are_given_back_to_the_rate_limiter(tmp_path):
    store = _filled(tmp_path, samples_per_insert=1.0, spi_tolerance=2.0)
    assert store.lease(4)[0] is not None and store.limiter.sampled == 4
    store.resume_learner(0, [])
    # Counted twice, the second lease would sample 8 groups for 4 inserted (past the tolerance).
    assert store.limiter.sampled == 0 and len(store.lease(4)[0].table) == 16


def test_a_lease_and_a_commit_are_fsynced_before_they_return(tmp_path, monkeypatch):
    store = _filled(tmp_path, fsync="batch")
    real_fsync, durable = os.fsync, {}

    def fsync(fd):
        real_fsync(fd)
        durable[os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))] = os.fstat(fd).st_size

    monkeypatch.setattr(os, "fsync", fsync)
    journal = tmp_path / "state.jsonl"
    lease = store.lease(1)[0]
    assert durable["state.jsonl"] == journal.stat().st_size and _journal_ops(tmp_path)[-1] == "lease"
    store.commit([lease.id])
    assert durable["state.jsonl"] == journal.stat().st_size and _journal_ops(tmp_path)[-1] == "commit"
    store.lease(1)
    store.resume_learner(0, [])
    assert durable["state.jsonl"] == journal.stat().st_size and _journal_ops(tmp_path)[-2:] == ["release", "version"]


def test_read_only_inspection_shows_the_leases_of_a_dead_job(tmp_path):
    store = _filled(tmp_path)
    store.lease(3)
    del store
    view = ReplayStore(tmp_path, BufferConfig(), max_staleness=4, read_only=True)
    stats = inspection.stats(view)
    assert stats["leases"] == {"outstanding": 1, "groups": 3} and stats["groups_sampleable"] == 1
