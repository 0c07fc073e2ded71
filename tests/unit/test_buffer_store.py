"""The durable store: idempotent inserts, group-aware sampling, every policy, restarts."""

import json
import os
import threading
from collections import Counter

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from async_rl.config import BufferConfig
from buffer import inspection
from buffer.index import Status, hash_ids, hash_repeated_ids
from buffer.schema import TRAJECTORY_SCHEMA, SchemaError
from buffer.segments import SegmentWriter, segment_path
from buffer.store import RateLimited, ReplayStore
from buffer.testing import synthetic_batch, with_broken_offsets


def _store(path, *, max_staleness: int = 4, **cfg):
    cfg.setdefault("min_size_to_sample", 1)
    return ReplayStore(path, BufferConfig(**cfg), max_staleness=max_staleness)


def _groups(table):
    """Group ids of a sampled table, in order, once each."""
    return list(dict.fromkeys(table.column("group_id").to_pylist()))


def test_inserts_are_idempotent_on_traj_id(tmp_path):
    store = _store(tmp_path)
    first = store.insert(synthetic_batch(groups=["a", "b"]))
    again = store.insert(synthetic_batch(groups=["b", "c"]))
    assert (first.accepted, first.duplicates) == (8, 0)
    assert (again.accepted, again.duplicates) == (4, 4)
    table = store.read_rows(store.stored_rows())
    assert sorted(Counter(table.column("traj_id").to_pylist()).values()) == [1] * 12


def test_duplicates_inside_one_batch_are_stored_once(tmp_path):
    store = _store(tmp_path)
    batch = synthetic_batch(groups=["a"])
    both = pa.Table.from_batches([batch, batch])
    ack = store.insert(both)
    assert (ack.accepted, ack.duplicates) == (4, 4)


def test_a_bad_batch_stores_nothing(tmp_path):
    store = _store(tmp_path)
    with pytest.raises(SchemaError):
        store.insert(synthetic_batch(groups=["a"]).drop_columns(["token_versions"]))
    assert store.index.n_rows == 0


def test_fifo_returns_whole_groups_oldest_first_each_once(tmp_path):
    store = _store(tmp_path, sampler="fifo")
    store.insert(synthetic_batch(groups=["a", "b", "c"]))
    store.insert(synthetic_batch(groups=["d"]))
    first, _ = store.sample(2)
    assert _groups(first) == ["a", "b"]
    assert first.num_rows == 8 and first.schema.equals(TRAJECTORY_SCHEMA)
    assert first.column("times_sampled").to_pylist() == [1] * 8
    second, _ = store.sample(2)
    assert _groups(second) == ["c", "d"]
    third, reason = store.sample(1)
    assert third is None and reason.startswith("not_enough_groups")


def test_freshest_returns_the_newest_policy_versions_first_each_once(tmp_path):
    store = _store(tmp_path, sampler="freshest", max_staleness=10)
    store.insert(synthetic_batch(groups=["a"], version=3))
    store.insert(synthetic_batch(groups=["b", "c"], version=5))
    store.insert(synthetic_batch(groups=["d"], version=4))
    store.set_learner_version(5)
    first, _ = store.sample(2)
    assert sorted(_groups(first)) == ["b", "c"]
    second, _ = store.sample(1)
    assert _groups(second) == ["d"]
    third, _ = store.sample(1)
    assert _groups(third) == ["a"]


def test_a_segment_retired_at_restart_never_lends_its_number_to_a_new_one(tmp_path):
    """Found by the property test: the segment a restart deletes (every group used) had its
    number handed out again, and the next roll mixed its retired batches with the new ones."""
    cfg = dict(segment_bytes=6000, sampler="uniform", filter_zero_advantage=False)
    store = _store(tmp_path, **cfg)
    store.insert(synthetic_batch(groups=["a", "b", "c"], seed=1))
    assert _groups(store.sample(3)[0]) == ["a", "b", "c"]
    store.close()
    store = _store(tmp_path, **cfg)
    assert not (tmp_path / "seg-000001.arrows").exists()
    for i, groups in enumerate((["d"], ["e", "f", "g"], ["h"], ["i", "j"])):
        store.insert(synthetic_batch(groups=groups, seed=10 + i))
    assert sorted(store.sample(7)[0].column("group_id").unique().to_pylist()) == list("defghij")


def test_a_resend_of_a_group_retired_before_a_restart_is_a_duplicate(tmp_path):
    """Found by the property test: once the retired group's segment was deleted, a restarted
    store no longer knew its traj_ids and trained on the resent group a second time."""
    batch = synthetic_batch(groups=["g0"], seed=3)
    store = _store(tmp_path)
    store.insert(batch)
    assert _groups(store.sample(1)[0]) == ["g0"]
    store.close()
    store = _store(tmp_path)  # g0 was used max_times_sampled times: its segment is deleted
    store.close()
    store = _store(tmp_path)
    ack = store.insert(batch)
    assert (ack.accepted, ack.duplicates) == (0, 4)
    assert store.sample(1)[0] is None
    # a torn last entry of the record (a crash mid-append) is ignored, the rest still counts
    with open(tmp_path / "retired-groups.u64", "ab") as out:
        out.write(b"\x01\x02\x03")
    store.close()
    store = _store(tmp_path)
    assert store.insert(batch).duplicates == 4
    assert (tmp_path / "retired-groups.u64").stat().st_size % 8 == 0


def test_an_incomplete_group_is_not_returned_until_its_last_row_arrives(tmp_path):
    store = _store(tmp_path)
    full = synthetic_batch(groups=["g"], group_size=4)
    store.insert(full.slice(0, 3))
    assert store.sample(1) == (None, store.sample(1)[1])
    store.insert(full.slice(3, 1))
    table, _ = store.sample(1)
    assert sorted(table.column("traj_id").to_pylist()) == ["g/0", "g/1", "g/2", "g/3"]


def test_interleaved_groups_are_returned_whole(tmp_path):
    store = _store(tmp_path)
    batch = synthetic_batch(groups=["a", "b"], group_size=2)
    store.insert(batch.take(pa.array([0, 2, 1, 3])))  # a/0 b/0 a/1 b/1
    table, _ = store.sample(1)
    assert table.column("traj_id").to_pylist() == ["a/0", "a/1"]


def test_uniform_sampler_draws_distinct_groups_covering_all(tmp_path):
    store = _store(tmp_path, sampler="uniform", max_times_sampled=1000)
    store.insert(synthetic_batch(groups=[f"g{i}" for i in range(10)]))
    seen = Counter()
    for _ in range(50):
        table, _ = store.sample(3)
        groups = _groups(table)
        assert len(groups) == 3 and table.num_rows == 12
        seen.update(groups)
    assert set(seen) == {f"g{i}" for i in range(10)}
    assert max(seen.values()) < 30  # not stuck on the oldest groups like FIFO


def test_prioritized_sampler_prefers_fresh_and_unused_groups(tmp_path):
    store = _store(tmp_path, sampler="prioritized", max_times_sampled=10_000, max_staleness=10)
    store.insert(synthetic_batch(groups=[f"old{i}" for i in range(5)], version=0))
    store.insert(synthetic_batch(groups=[f"new{i}" for i in range(5)], version=4))
    store.set_learner_version(4)
    picks = Counter()
    for _ in range(200):
        picks.update(g[:3] for g in _groups(store.sample(1)[0]))
    assert picks["new"] > 3 * picks["old"] > 0  # reuse of the fresh ones narrows the gap


def test_stale_groups_are_never_returned_and_are_evicted_with_a_reason(tmp_path):
    store = _store(tmp_path, max_staleness=2)
    store.insert(synthetic_batch(groups=["v0"], version=0))
    store.insert(synthetic_batch(groups=["v2"], version=2))
    store.set_learner_version(3)  # v0 has staleness 3 > 2
    table, _ = store.sample(1)
    assert _groups(table) == ["v2"]
    assert store.sample(1)[0] is None
    assert store.state.evicted_rows == {"stale": 4}
    assert store.state.evicted_groups == {"stale": 1}


def test_a_group_spanning_a_weight_update_is_as_stale_as_its_oldest_token(tmp_path):
    store = _store(tmp_path, max_staleness=1)
    batch = synthetic_batch(groups=["g"], version=5)
    versions = pa.array([[3] + [5] * 7] + [[5] * 8] * 3, pa.list_(pa.int32()))
    batch = batch.set_column(batch.schema.get_field_index("token_versions"),
                             TRAJECTORY_SCHEMA.field("token_versions"), versions)
    store.insert(batch)
    store.set_learner_version(5)  # row g/0 started at version 3: staleness 2
    assert store.sample(1)[0] is None
    assert store.state.evicted_rows == {"stale": 4}


def test_max_times_sampled_allows_exactly_that_many_uses(tmp_path):
    store = _store(tmp_path, max_times_sampled=3)
    store.insert(synthetic_batch(groups=["a"]))
    uses = [store.sample(1)[0] for _ in range(4)]
    assert [u.column("times_sampled")[0].as_py() for u in uses[:3]] == [1, 2, 3]
    assert uses[3] is None


def test_min_size_to_sample_refuses_with_a_reason(tmp_path):
    store = _store(tmp_path, min_size_to_sample=3)
    store.insert(synthetic_batch(groups=["a", "b"]))
    table, reason = store.sample(1)
    assert table is None
    assert "2 sampleable group(s), need 3" in reason
    store.insert(synthetic_batch(groups=["c"]))
    assert store.sample(1)[0] is not None


def test_samples_per_insert_limits_the_learner_and_the_actors(tmp_path):
    # Reverb semantics: diff = spi * inserted - sampled stays in [min_size*spi - tol, min_size*spi + tol]
    store = _store(tmp_path, min_size_to_sample=1, samples_per_insert=1.0, spi_tolerance=1.0,
                   max_times_sampled=100)
    store.insert(synthetic_batch(groups=["a"]))
    assert store.sample(1)[0] is not None  # diff 0, floor 0
    table, reason = store.sample(1)  # would make diff -1
    assert table is None and reason.startswith("rate_limited")
    store.insert(synthetic_batch(groups=["b", "c", "d"]))  # inserted 4, sampled 1: diff 3
    with pytest.raises(RateLimited, match="ahead of the learner"):
        store.insert(synthetic_batch(groups=["e"]))  # diff 3 > ceiling 2
    assert store.index.n_groups == 4
    assert store.sample(1)[0] is not None  # diff 2
    store.insert(synthetic_batch(groups=["e"]))
    assert store.index.n_groups == 5


def test_zero_advantage_groups_are_filtered_and_counted(tmp_path):
    store = _store(tmp_path)
    store.insert(synthetic_batch(groups=["flat"], rewards=[1.0] * 4))
    store.insert(synthetic_batch(groups=["mixed"], rewards=[1.0, 0.0, 0.0, 0.0]))
    table, _ = store.sample(1)
    assert _groups(table) == ["mixed"]
    assert store.state.evicted_groups == {"zero_advantage": 1}
    assert store.state.evicted_rows == {"zero_advantage": 4}


def test_zero_advantage_filter_can_be_switched_off(tmp_path):
    store = _store(tmp_path, filter_zero_advantage=False)
    store.insert(synthetic_batch(groups=["flat"], rewards=[0.0] * 4))
    assert _groups(store.sample(1)[0]) == ["flat"]


def test_capacity_in_rows_evicts_oldest_groups_first(tmp_path):
    store = _store(tmp_path, capacity_rows=8)
    for name in ["a", "b", "c"]:
        store.insert(synthetic_batch(groups=[name]))
    assert store.state.evicted_rows == {"capacity": 4}
    assert _groups(store.sample(5, peek=True)[0]) == ["b", "c"]


def test_capacity_eviction_takes_the_fewest_oldest_live_groups_as_the_buffer_churns(tmp_path):
    """The running count of live rows (one term per segment) stays equal to the index's, and
    each insert past capacity_rows retires a prefix of the LIVE groups in age order, no longer
    than needed, whatever samples, staleness and rolling segments did before."""
    rng = np.random.default_rng(0)
    store = _store(tmp_path, capacity_rows=40, max_times_sampled=1, segment_bytes=20_000, max_staleness=2)
    idx = store.index
    for step in range(60):
        before = idx.group_status.view.copy()
        sizes = rng.integers(1, 4, size=rng.integers(1, 4))
        for k, size in enumerate(sizes):
            store.insert(synthetic_batch(groups=[f"s{step}-{k}"], group_size=int(size), version=step // 8))
        status = idx.group_status.view
        live = status == Status.LIVE
        assert store._live_rows() == int(idx.group_count.view[live].sum()) <= 40
        evicted = np.flatnonzero((status[: len(before)] == Status.CAPACITY) & (before == Status.LIVE))
        if len(evicted):
            assert evicted.max() < np.flatnonzero(live).min()  # the oldest went first
            assert store._live_rows() + idx.group_count.view[evicted.max()] > 40  # and no more than needed
        if step % 5 == 4:
            store.sample(2)
            store.set_learner_version(step // 6)
            assert store._live_rows() == int(idx.group_count.view[idx.group_status.view == Status.LIVE].sum())
    assert store.state.evicted_groups["capacity"] > 10


def test_capacity_in_bytes_deletes_the_oldest_segments(tmp_path):
    one = synthetic_batch(groups=["x"], response_len=256)
    seg_bytes = one.nbytes  # roll after every batch
    store = _store(tmp_path, segment_bytes=seg_bytes, capacity_bytes=3 * seg_bytes)
    for i in range(8):
        store.insert(synthetic_batch(groups=[f"g{i}"], response_len=256))
    files = sorted(p.name for p in tmp_path.glob("seg-*.arrows"))
    assert 2 <= len(files) <= 4
    assert "seg-000001.arrows" not in files
    assert sum(p.stat().st_size for p in tmp_path.glob("seg-*.arrows")) <= 4 * seg_bytes
    assert store.state.evicted_groups["capacity"] >= 4
    assert _groups(store.sample(1, peek=True)[0])[0] != "g0"


def test_consumed_segments_are_deleted_once_closed(tmp_path):
    store = _store(tmp_path, segment_bytes=1)  # every insert starts a new segment
    store.insert(synthetic_batch(groups=["a"]))
    store.insert(synthetic_batch(groups=["b"]))
    store.insert(synthetic_batch(groups=["c"]))
    store.sample(2)
    assert sorted(p.name for p in tmp_path.glob("seg-*")) == ["seg-000003.arrows"]


def test_rows_read_back_after_a_segment_rolls_are_identical(tmp_path):
    store = _store(tmp_path, segment_bytes=1, max_times_sampled=5)
    batches = [synthetic_batch(groups=[f"g{i}"], seed=i) for i in range(4)]
    for b in batches:
        store.insert(b)
    table, _ = store.sample(4)
    expected = pa.Table.from_batches(batches).drop_columns(["times_sampled"])
    assert table.drop_columns(["times_sampled"]).equals(expected)


def test_a_rolled_segment_is_read_back_off_the_inserting_thread(tmp_path, monkeypatch):
    import buffer.store as store_module

    release, readers = threading.Event(), []
    real_scan = store_module.scan_segment

    def slow_scan(path, schema):
        readers.append(threading.current_thread().name)
        assert release.wait(10)
        return real_scan(path, schema)

    monkeypatch.setattr(store_module, "scan_segment", slow_scan)
    store = _store(tmp_path, segment_bytes=1)  # every insert rolls the previous segment
    batches = [synthetic_batch(groups=[f"g{i}"], seed=i) for i in range(2)]
    for batch in batches:
        store.insert(batch)  # the second rolls segment 1; its read-back waits for `release`
    store.insert(synthetic_batch(groups=["g2"]))  # inserts go on meanwhile
    assert store.segments[1].mapping is None
    table, _ = store.sample(2, peek=True)  # served from memory until the read-back ends
    assert _groups(table) == ["g0", "g1"]
    release.set()
    store._finish_rolls(wait=True)
    assert readers and all(name.startswith("buffer-roll-scan") for name in readers)
    assert store.segments[1].mapping is not None  # now memory-mapped
    table, _ = store.sample(2)
    expected = pa.Table.from_batches(batches).drop_columns(["times_sampled"])
    assert table.drop_columns(["times_sampled"]).equals(expected)
    store.close()


def test_state_survives_a_restart(tmp_path):
    store = _store(tmp_path, max_times_sampled=2, max_staleness=3)
    store.insert(synthetic_batch(groups=["a", "b"], version=0))
    store.insert(synthetic_batch(groups=["c"], version=4))
    store.set_learner_version(4)  # a, b stale
    store.insert(synthetic_batch(groups=["d"], version=4))
    store.sample(1)  # c once
    store.close()
    store = _store(tmp_path, max_times_sampled=2, max_staleness=3)
    assert store.learner_version == 4
    assert store.state.evicted_groups == {"stale": 2}
    first, _ = store.sample(1)
    assert _groups(first) == ["c"] and first.column("times_sampled")[0].as_py() == 2
    assert _groups(store.sample(1)[0]) == ["d"]


def test_a_crash_without_close_keeps_every_acknowledged_row(tmp_path):
    store = _store(tmp_path)
    store.insert(synthetic_batch(groups=["a"]))
    store.insert(synthetic_batch(groups=["b"]))
    store.sample(1)
    del store  # no end-of-stream marker, journal not closed
    store = _store(tmp_path)
    assert store.recovery == []
    assert _groups(store.sample(1)[0]) == ["b"]
    assert store.sample(1)[0] is None


def test_a_torn_segment_tail_is_truncated_and_reported(tmp_path):
    store = _store(tmp_path)
    store.insert(synthetic_batch(groups=["a"]))
    store.insert(synthetic_batch(groups=["b"]))
    store.close()
    segment = tmp_path / "seg-000001.arrows"
    good = segment.stat().st_size
    with open(segment, "ab") as handle:
        handle.write(synthetic_batch(groups=["c"]).serialize().to_pybytes()[:-100])
    store = _store(tmp_path)
    assert len(store.recovery) == 1
    report = store.recovery[0]
    assert report["segment"] == "seg-000001.arrows" and report["truncated"]
    assert report["batches_kept"] == 2 and report["bytes_dropped"] > 0
    assert segment.stat().st_size == report["bytes_kept"] <= good
    assert _groups(store.sample(2)[0]) == ["a", "b"]


def _garbled_header(tmp_path, names, *, garble: int) -> tuple[list[int], bytes]:
    """Store one batch per name, then overwrite the header of batch ``garble`` (not the
    first) with junk; returns where each batch ends and the garbled file."""
    store = _store(tmp_path)
    ends = []
    for name in names:
        store.insert(synthetic_batch(groups=[name]))
        ends.append(store.segments[1].bytes)
    store.close()
    segment = tmp_path / "seg-000001.arrows"
    data = bytearray(segment.read_bytes())
    data[ends[garble - 1] : ends[garble - 1] + 64] = b"\x7f" * 64
    segment.write_bytes(bytes(data))
    return ends, bytes(data)


def test_a_garbled_batch_header_keeps_the_batches_before_it(tmp_path):
    (second, _), _ = _garbled_header(tmp_path, ["a", "b"], garble=1)
    store = _store(tmp_path)
    assert store.recovery[0]["batches_kept"] == 1
    assert store.recovery[0]["bytes_kept"] == second
    assert _groups(store.sample(1)[0]) == ["a"]
    assert store.sample(1)[0] is None


def test_a_garbled_header_mid_segment_loses_only_its_own_batch(tmp_path):
    (second, third, _), data = _garbled_header(tmp_path, ["a", "b", "c"], garble=1)
    store = _store(tmp_path)
    report = store.recovery[0]
    assert report["batches_quarantined"] == 1 and "unreadable message header" in report["errors"][0]
    quarantined = tmp_path / "quarantine" / f"seg-000001.arrows@{second}.msg"
    assert quarantined.read_bytes() == data[second:third]
    assert _groups(store.sample(2)[0]) == ["a", "c"]
    store.close()
    assert _store(tmp_path).recovery == []  # rewritten without it


def test_read_only_open_changes_no_file(tmp_path):
    store = _store(tmp_path)
    store.insert(synthetic_batch(groups=["a"]))
    del store
    segment = tmp_path / "seg-000001.arrows"
    with open(segment, "ab") as handle:
        handle.write(b"torn")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    store = ReplayStore(tmp_path, BufferConfig(), max_staleness=4, read_only=True)
    assert store.recovery[0]["truncated"] is False
    assert store.index.n_rows == 4
    with pytest.raises(PermissionError):
        store.insert(synthetic_batch(groups=["b"]))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_segment_opens_with_plain_pyarrow_and_duckdb(tmp_path):
    store = _store(tmp_path)
    store.insert(synthetic_batch(groups=["a", "b"], rewards=[1, 0, 0, 0, 1, 1, 1, 0]))
    store.close()
    path = str(tmp_path / "seg-000001.arrows")
    table = pa.ipc.open_stream(pa.memory_map(path)).read_all()
    assert table.schema.equals(TRAJECTORY_SCHEMA) and table.num_rows == 8
    con = duckdb.connect()
    con.register("segment", pa.ipc.open_stream(pa.memory_map(path)))  # streamed, not copied
    rows = con.sql(
        "SELECT group_id, sum(reward) AS r, max(len(response_tokens)) AS n FROM segment "
        "GROUP BY group_id ORDER BY group_id"
    ).fetchall()
    assert rows == [("a", 1.0, 8), ("b", 3.0, 8)]


def test_fsync_never_and_interval_still_store_rows(tmp_path):
    for policy in ("never", "interval"):
        store = _store(tmp_path / policy, fsync=policy)
        ack = store.insert(synthetic_batch(groups=["a"]))
        assert ack.accepted == 4 and ack.fsynced is False
        store.close()
        assert _store(tmp_path / policy).index.n_rows == 4


def test_the_journal_is_plain_json_lines(tmp_path):
    store = _store(tmp_path)
    store.insert(synthetic_batch(groups=["a"]))
    store.set_learner_version(2)
    store.sample(1)
    store.close()
    entries = [json.loads(line) for line in (tmp_path / "state.jsonl").read_text().splitlines()]
    assert [e["op"] for e in entries] == ["snapshot", "version", "sample"]
    assert np.uint64(entries[2]["g"][0]) == store.index.group_hash.view[0]


def test_the_journal_compacts_and_forgets_groups_whose_segments_are_gone(tmp_path, monkeypatch):
    import buffer.journal

    monkeypatch.setattr(buffer.journal, "COMPACT_EVERY", 3)
    store = _store(tmp_path, segment_bytes=1, max_times_sampled=2)
    for name in ["a", "b", "c"]:
        store.insert(synthetic_batch(groups=[name]))
    store.sample(1), store.sample(1)  # a used up: its segment is deleted
    store.sample(1)  # b once
    store.insert(synthetic_batch(groups=["d"]))  # 3 journal lines since open: compaction
    lines = (tmp_path / "state.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["op"] == "snapshot"
    hashes = {int(h) for h in json.loads(lines[0])["times_sampled"]}
    assert hashes == {int(store.index.group_hash.view[1])}  # b only: a's rows are gone
    store.close()
    store = _store(tmp_path, max_times_sampled=2)
    table, _ = store.sample(1)
    assert _groups(table) == ["b"] and table.column("times_sampled")[0].as_py() == 2


def test_a_crafted_batch_is_refused_before_a_byte_is_written_and_the_store_keeps_working(tmp_path):
    store = _store(tmp_path)
    store.insert(synthetic_batch(groups=["a"]))
    size = store.segments[1].bytes
    for column in ("traj_id", "group_id", "actor_id", "data_source"):
        crafted = with_broken_offsets(synthetic_batch(groups=["x"]), column)
        with pytest.raises(SchemaError, match="non-monotonic offset"):
            store.insert(crafted)
    assert (tmp_path / "seg-000001.arrows").stat().st_size == size == store.segments[1].bytes
    assert store.insert(synthetic_batch(groups=["b"])).accepted == 4
    assert _groups(store.sample(2)[0]) == ["a", "b"]


def _with_reward(batch, value):
    at = batch.schema.get_field_index("reward")
    rewards = pa.array(np.full(batch.num_rows, value, np.float32))
    return pa.RecordBatch.from_arrays(
        [rewards if k == at else c for k, c in enumerate(batch.columns)], schema=batch.schema)


def test_recovery_quarantines_unreadable_batches_and_keeps_the_ones_around_them(tmp_path):
    writer = SegmentWriter(segment_path(tmp_path, 1), TRAJECTORY_SCHEMA)
    writer.append(synthetic_batch(groups=["a"]))
    writer.append(with_broken_offsets(synthetic_batch(groups=["x"]), "traj_id"))
    writer.append(_with_reward(synthetic_batch(groups=["y"]), float("nan")))
    writer.append(synthetic_batch(groups=["b"]))
    writer.close()
    store = _store(tmp_path)
    report = store.recovery[0]
    assert report["segment"] == "seg-000001.arrows" and report["batches_quarantined"] == 2
    assert any("non-monotonic" in e for e in report["errors"])
    assert any("reward: must be finite" in e for e in report["errors"])
    assert sorted(p.name for p in (tmp_path / "quarantine").iterdir()) == sorted(
        p.rsplit("/", 1)[-1] for p in report["moved_to"])
    assert store.index.n_rows == 8
    store.close()
    reopened = _store(tmp_path)
    assert reopened.recovery == []  # the segment was rewritten without the bad batches
    assert _groups(reopened.sample(2)[0]) == ["a", "b"]


def test_read_only_recovery_skips_a_bad_batch_and_changes_no_file(tmp_path):
    writer = SegmentWriter(segment_path(tmp_path, 1), TRAJECTORY_SCHEMA)
    writer.append(with_broken_offsets(synthetic_batch(groups=["x"]), "group_id"))
    writer.append(synthetic_batch(groups=["a"]))
    writer.close()
    before = (tmp_path / "seg-000001.arrows").read_bytes()
    store = ReplayStore(tmp_path, BufferConfig(), max_staleness=4, read_only=True)
    assert store.recovery[0]["batches_quarantined"] == 1 and store.recovery[0]["moved_to"] == []
    assert store.index.n_rows == 4
    assert (tmp_path / "seg-000001.arrows").read_bytes() == before
    assert not (tmp_path / "quarantine").exists()


def test_an_absurd_learner_version_in_an_old_journal_is_ignored_and_stats_work(tmp_path):
    store = _store(tmp_path)
    store.insert(synthetic_batch(groups=["a"], version=3))
    store.set_learner_version(4)
    store.close()
    with open(tmp_path / "state.jsonl", "a") as journal:  # what a service before the bound wrote
        journal.write(json.dumps({"op": "version", "v": 2**64 - 1}) + "\n")
    reopened = _store(tmp_path)
    assert reopened.learner_version == 4
    assert inspection.stats(reopened)["staleness"] == {"1": 4}


def test_repeated_ids_hash_once_per_value_to_the_same_hashes():
    ids = pa.array(["g1", "g0", "g1", "g2", "g0", "g1"])
    assert hash_repeated_ids(ids).tolist() == hash_ids(ids.to_pylist()).tolist()
    assert len(set(hash_repeated_ids(ids).tolist())) == 3
    taken = ids.take(pa.array([5, 3]))  # a slice of another batch, as dedup takes it
    assert hash_repeated_ids(taken).tolist() == hash_ids(["g1", "g2"]).tolist()
    assert hash_repeated_ids(pa.array([], pa.string())).tolist() == []


def test_under_group_commit_a_roll_leaves_the_rolled_tail_and_the_new_name_to_the_next_round(tmp_path, monkeypatch):
    """The inserting thread does not fsync when a segment rolls under group commit: the round
    that covers the first rows of the new segment fsyncs the rolled segment (its last batches
    may still wait for their round) and the folder (the new segment's name)."""
    one = synthetic_batch(groups=["x"])
    store = _store(tmp_path, fsync="batch", segment_bytes=one.nbytes)  # rolls after every batch
    commit = store.start_group_commit()
    rounds, real_start, inline = [], commit.start, []
    monkeypatch.setattr(commit, "start", lambda fds: (rounds.append(
        sorted(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) for fd in fds)), real_start(fds))[1])
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (inline.append(threading.current_thread().name), real_fsync(fd))[1])
    for name in ["a", "b", "c"]:
        ack = store.insert(synthetic_batch(groups=[name]), sync=False)
        assert ack.round == commit.started  # the thread was idle: the insert started its round
        while commit.busy:  # that round ends before the next insert
            commit.wait(1.0)
            commit.poll()
    fsynced_on = set(inline)
    store.close()
    assert rounds[0] == ["seg-000001.arrows", tmp_path.name]  # the first segment's name, too
    assert rounds[1] == ["seg-000001.arrows", "seg-000002.arrows", tmp_path.name]
    assert rounds[2] == ["seg-000002.arrows", "seg-000003.arrows", tmp_path.name]
    assert fsynced_on == {"buffer-fsync"}  # nothing on the inserting thread
