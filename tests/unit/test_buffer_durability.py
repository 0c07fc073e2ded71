"""What an acknowledgement promises survives a failed write, a foreign segment, flipped bits and
a power loss between a sample and its journal line (issue #19's audit)."""

import errno
import os
import time

import numpy as np
import pyarrow as pa
import pytest

from async_rl.config import BufferConfig
from buffer.schema import SCHEMA_WITHOUT_CORRECT, TRAJECTORY_SCHEMA
from buffer.segments import SegmentWriter, decode_checksummed, encode_stream, segment_path
from buffer.store import ReplayStore
from buffer.testing import synthetic_batch
from buffer.wire import ipc_to_table

ONE, THOUSAND = np.float32(1.0).tobytes(), np.float32(1000.0).tobytes()


def _store(path, **cfg):
    cfg.setdefault("min_size_to_sample", 1)
    return ReplayStore(path, BufferConfig(**cfg), max_staleness=4)


def _groups(table):
    return list(dict.fromkeys(table.column("group_id").to_pylist()))


def _fail_segment_writes(monkeypatch, store, *, short_bytes: int):
    """The next write to the active segment stores ``short_bytes`` and the one after fails
    with ENOSPC (a disk filling up mid-batch); every other write goes through."""
    real_write, fd, calls = os.write, store._writer._fd, []

    def write(target, data):
        if target != fd:
            return real_write(target, data)
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(target, bytes(memoryview(data)[:short_bytes]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write)


def test_a_failed_partial_append_loses_no_acknowledged_row_written_after_it(tmp_path, monkeypatch):
    store = _store(tmp_path)
    store.insert(synthetic_batch(groups=["a"]))
    size = store.segments[1].bytes
    with monkeypatch.context() as patch:
        _fail_segment_writes(patch, store, short_bytes=100)
        with pytest.raises(Exception, match="No space left on device"):
            store.insert(synthetic_batch(groups=["b"]))
    assert (tmp_path / "seg-000001.arrows").stat().st_size == size  # cut back to the last batch
    for name in ["c", "d", "e"]:
        assert store.insert(synthetic_batch(groups=[name])).accepted == 4
    assert store.insert(synthetic_batch(groups=["b"])).accepted == 4  # the writer's retry
    del store  # a crash: no end-of-stream marker
    reopened = _store(tmp_path)
    assert reopened.recovery == []
    assert reopened.index.n_rows == 20
    assert _groups(reopened.sample(5)[0]) == ["a", "c", "d", "e", "b"]


def _foreign_segment(path, rows: int) -> bytes:
    """An intact Arrow stream whose schema is not the trajectory schema (another version)."""
    table = pa.table({"traj_id": [f"t{i}" for i in range(rows)], "reward": [1.0] * rows})
    with pa.ipc.new_stream(str(path), table.schema) as writer:
        writer.write_table(table)
    return path.read_bytes()


def test_a_segment_with_another_schema_is_set_aside_whole_never_truncated(tmp_path):
    data = _foreign_segment(tmp_path / "seg-000001.arrows", rows=12)
    store = _store(tmp_path)
    report = store.recovery[0]
    assert report["segment"] == "seg-000001.arrows" and report["segment_quarantined"]
    assert "schema differs" in report["error"]
    assert (tmp_path / "quarantine" / "seg-000001.arrows").read_bytes() == data
    store.insert(synthetic_batch(groups=["a"]))
    assert (tmp_path / "seg-000002.arrows").exists()  # the set-aside number is not reused
    store.close()
    assert _store(tmp_path).index.n_rows == 4


def test_read_only_recovery_leaves_a_foreign_segment_where_it_is(tmp_path):
    data = _foreign_segment(tmp_path / "seg-000001.arrows", rows=3)
    store = ReplayStore(tmp_path, BufferConfig(), max_staleness=4, read_only=True)
    assert store.recovery[0]["segment_quarantined"] and store.recovery[0]["moved_to"] is None
    assert (tmp_path / "seg-000001.arrows").read_bytes() == data


def test_a_reward_flipped_on_disk_fails_its_checksum_and_only_that_batch_is_set_aside(tmp_path):
    store = _store(tmp_path)
    store.insert(synthetic_batch(groups=["a"], rewards=[1, 0, 1, 0]))
    store.insert(synthetic_batch(groups=["b"], rewards=[0, 1, 0, 1]))
    store.close()
    segment = tmp_path / "seg-000001.arrows"
    data = bytearray(segment.read_bytes())
    at = data.index(ONE + bytes(4) + ONE)  # a's reward column
    data[at : at + 4] = THOUSAND
    segment.write_bytes(bytes(data))
    store = _store(tmp_path)
    report = store.recovery[0]
    assert report["batches_quarantined"] == 1
    assert any("checksum mismatch" in e for e in report["errors"])
    assert store.index.n_rows == 4
    table = store.sample(1)[0]
    assert _groups(table) == ["b"] and max(table.column("reward").to_pylist()) == 1.0


def test_a_segment_written_before_checksums_still_opens(tmp_path):
    rows = synthetic_batch(groups=["a"])
    with pa.ipc.new_stream(str(tmp_path / "seg-000001.arrows"), TRAJECTORY_SCHEMA) as writer:
        writer.write_batch(rows)
    store = _store(tmp_path)
    assert store.recovery == [] and _groups(store.sample(1)[0]) == ["a"]


def test_a_segment_written_before_the_correct_column_opens_with_the_verdict_of_its_reward_record(tmp_path):
    infos = ['{"score": 0.3, "status": "correct"}', '{"score": 1.0, "status": "wrong"}', "{}", "not json"]
    old = synthetic_batch(groups=["old"]).drop_columns(["correct"])
    at = old.schema.get_field_index("reward_info")
    old = old.set_column(at, old.schema.field(at), pa.array(infos))
    assert old.schema.equals(SCHEMA_WITHOUT_CORRECT)
    writer = SegmentWriter(segment_path(tmp_path, 1), SCHEMA_WITHOUT_CORRECT)
    writer.append(old)
    writer.close()
    store = _store(tmp_path)
    assert store.recovery == []
    store.insert(synthetic_batch(groups=["new"], rewards=[1.0, 0.0, 1.0, 0.0], correct=[False, True, True, False]))
    assert sorted(p.name for p in tmp_path.glob("seg-*")) == ["seg-000001.arrows", "seg-000002.arrows"]
    table = store.sample(2)[0]
    assert table.schema.equals(TRAJECTORY_SCHEMA) and _groups(table) == ["old", "new"]
    assert table.column("correct").to_pylist() == [True, False, False, False, False, True, True, False]
    assert table.column("reward_info").to_pylist()[:4] == infos


def _record_fsyncs(monkeypatch) -> dict:
    """File name -> size at its last fsync (what a power loss would keep)."""
    real_fsync, durable = os.fsync, {}

    def fsync(fd):
        real_fsync(fd)
        durable[os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))] = os.fstat(fd).st_size

    monkeypatch.setattr(os, "fsync", fsync)
    return durable


def test_a_sample_is_fsynced_in_the_journal_before_it_is_returned(tmp_path, monkeypatch):
    store = _store(tmp_path, fsync="batch")
    store.insert(synthetic_batch(groups=["a"]))
    store.insert(synthetic_batch(groups=["b"]))
    durable = _record_fsyncs(monkeypatch)
    assert _groups(store.sample(1)[0]) == ["a"]
    journal = tmp_path / "state.jsonl"
    assert durable.get("state.jsonl") == journal.stat().st_size  # the sample line included
    assert journal.read_text().splitlines()[-1].startswith('{"op":"sample"')


def test_a_segment_corrupted_before_it_rolls_keeps_serving_its_rows_from_memory(tmp_path):
    store = _store(tmp_path, segment_bytes=1)  # every insert rolls the previous segment
    store.insert(synthetic_batch(groups=["a"], rewards=[1, 0, 1, 0]))
    segment = tmp_path / "seg-000001.arrows"
    data = bytearray(segment.read_bytes())
    at = data.index(ONE + bytes(4) + ONE)
    data[at : at + 4] = THOUSAND
    segment.write_bytes(bytes(data))  # flipped on disk while still the active segment
    store.insert(synthetic_batch(groups=["b"]))
    table = store.sample(2)[0]
    assert _groups(table) == ["a", "b"] and max(table.column("reward").to_pylist()) == 1.0


def test_a_compacted_journal_is_renamed_durably_before_lines_go_to_it(tmp_path, monkeypatch):
    import buffer.journal

    monkeypatch.setattr(buffer.journal, "COMPACT_EVERY", 2)
    store = _store(tmp_path, fsync="batch")
    store.insert(synthetic_batch(groups=["a"]))
    store.insert(synthetic_batch(groups=["b"]))
    store.set_learner_version(1)
    durable = _record_fsyncs(monkeypatch)
    store.sample(1)  # the second line since the last snapshot: compaction at the next insert
    durable.clear()
    store.insert(synthetic_batch(groups=["c"]))
    assert tmp_path.name in durable  # the folder, after the snapshot's rename


def test_an_append_that_cannot_be_cut_back_rolls_to_a_new_segment(tmp_path, monkeypatch):
    store = _store(tmp_path)
    store.insert(synthetic_batch(groups=["a"]))
    with monkeypatch.context() as patch:
        _fail_segment_writes(patch, store, short_bytes=100)
        patch.setattr(os, "ftruncate", lambda fd, size: (_ for _ in ()).throw(OSError(errno.EIO, "EIO")))
        with pytest.raises(Exception, match="No space left on device"):
            store.insert(synthetic_batch(groups=["b"]))
    store.insert(synthetic_batch(groups=["c"]))
    assert (tmp_path / "seg-000002.arrows").exists()
    del store
    reopened = _store(tmp_path)
    assert [r["segment"] for r in reopened.recovery] == ["seg-000001.arrows"]
    assert reopened.recovery[0]["truncated"] and reopened.recovery[0]["batches_kept"] == 1
    assert _groups(reopened.sample(2)[0]) == ["a", "c"]


def test_an_insert_returns_only_after_an_fsync_that_covered_its_rows(tmp_path, monkeypatch):
    store = _store(tmp_path, fsync="batch")
    real_fsync, covered = os.fsync, {}

    def slow_fsync(fd):  # a slow disk: an ack sent before the fsync ends would be caught
        size = os.fstat(fd).st_size
        time.sleep(0.02)
        real_fsync(fd)
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        covered[name] = max(covered.get(name, 0), size)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    segment = tmp_path / "seg-000001.arrows"
    for name in ["a", "b", "c"]:
        assert store.insert(synthetic_batch(groups=[name])).fsynced
        assert covered[segment.name] == segment.stat().st_size
    assert store.insert(synthetic_batch(groups=["c"])).duplicates == 4  # a duplicate waits too
    assert covered[segment.name] == segment.stat().st_size


def test_after_a_failed_fsync_the_store_acknowledges_nothing_more(tmp_path, monkeypatch):
    store = _store(tmp_path, fsync="batch")
    store.insert(synthetic_batch(groups=["a"]))

    def failing_fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        store.insert(synthetic_batch(groups=["b"]))
    monkeypatch.undo()  # the disk answers again, but what the failed fsync dropped is unknown
    with pytest.raises(OSError, match="Input/output error"):
        store.insert(synthetic_batch(groups=["c"]))


def test_a_checksummed_batch_from_a_client_is_appended_byte_for_byte_and_recovers(tmp_path):
    store = _store(tmp_path)
    stream, message = encode_stream(synthetic_batch(groups=["a", "b"]))
    received = decode_checksummed(stream.to_pybytes(), TRAJECTORY_SCHEMA)  # as off the wire
    assert received.message.to_pybytes() == message.message.to_pybytes()
    assert store.insert(received.batch, encoded=received).accepted == 8
    store.close()
    assert message.message.to_pybytes() in (tmp_path / "seg-000001.arrows").read_bytes()
    reopened = _store(tmp_path)
    assert reopened.recovery == [] and _groups(reopened.sample(2)[0]) == ["a", "b"]


def test_a_partly_duplicate_client_batch_is_stored_with_a_checksum_of_its_new_rows(tmp_path):
    store = _store(tmp_path)
    store.insert(synthetic_batch(groups=["a"]))
    received = decode_checksummed(encode_stream(synthetic_batch(groups=["a", "b"]))[0], TRAJECTORY_SCHEMA)
    ack = store.insert(received.batch, encoded=received)
    assert (ack.accepted, ack.duplicates) == (4, 4)
    store.close()
    assert received.message.to_pybytes() not in (tmp_path / "seg-000001.arrows").read_bytes()
    reopened = _store(tmp_path)
    assert reopened.recovery == [] and reopened.index.n_rows == 8


def test_a_batch_damaged_in_transit_is_refused_by_its_checksum_and_a_plain_stream_decoded_in_full(tmp_path):
    stream = bytearray(encode_stream(synthetic_batch(groups=["a"], rewards=[1, 0, 1, 0]))[0].to_pybytes())
    at = stream.index(ONE + bytes(4) + ONE)
    stream[at : at + 4] = THOUSAND
    with pytest.raises(ValueError, match="payload: checksum mismatch"):
        decode_checksummed(bytes(stream), TRAJECTORY_SCHEMA)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, TRAJECTORY_SCHEMA) as writer:  # no checksum: not appended as is
        writer.write_batch(synthetic_batch(groups=["a"]))
    assert decode_checksummed(sink.getvalue(), TRAJECTORY_SCHEMA) is None


def test_a_segment_whose_schema_header_is_garbled_into_another_message_type_is_set_aside(tmp_path):
    garbled = bytearray(encode_stream(synthetic_batch(groups=["a"]))[0].to_pybytes())
    garbled[29], garbled[254] = 0xC3, 0xAB  # the header's type tag, and a byte of the schema
    assert pa.ipc.read_message(pa.BufferReader(pa.py_buffer(bytes(garbled)))).type == "unknown"
    segment = tmp_path / "seg-000001.arrows"
    segment.write_bytes(bytes(garbled))
    store = _store(tmp_path)  # pyarrow's read_schema of that message crashes the process
    assert store.recovery[0]["segment_quarantined"] and "no schema" in store.recovery[0]["error"]
    assert (tmp_path / "quarantine" / "seg-000001.arrows").read_bytes() == garbled


def test_a_payload_garbled_into_another_message_type_is_refused_in_one_line_not_a_crash():
    garbled = bytearray(encode_stream(synthetic_batch(groups=["a"]))[0].to_pybytes())
    garbled[29], garbled[254] = 0xC3, 0xAB
    assert decode_checksummed(bytes(garbled), TRAJECTORY_SCHEMA) is None
    with pytest.raises(ValueError, match="payload is not an Arrow IPC stream"):
        ipc_to_table(bytes(garbled))
