"""One in-process writer with several batches in flight (``ReplayStore.insert_many``): acks in
order, each only after an fsync that covered its rows, never more than ``window`` batches
written and not yet durable, and a refusal or a failed fsync mid-window acknowledging nothing
that is not durable."""

import errno
import os
import threading

import pytest
from ingest_probes import WriteOverlap

import buffer.segments
import buffer.store
from async_rl.config import BufferConfig
from buffer.store import InsertsStopped, ReplayStore
from buffer.testing import synthetic_batch, with_broken_offsets

GATE_TIMEOUT_S = 10.0  # a bug that never lets the writer wait fails the test instead of hanging it


def _store(path, **cfg):
    cfg.setdefault("min_size_to_sample", 1)
    return ReplayStore(path, BufferConfig(**cfg), max_staleness=4)


def _batches(n: int):
    """Batches of 1, 2, 3, ... groups of 4 rows: an ack's ``accepted`` says which batch it is."""
    return [synthetic_batch(groups=[f"b{i}-{k}" for k in range(i + 1)], seed=i) for i in range(n)]


class GatedDisk:
    """The fsync thread's fsyncs end only while the writer waits for one (its window is full, or
    it is draining), so every window fills; records the bytes of each file the fsyncs covered
    and, per batch written, how many batches were written and not yet covered."""

    def __init__(self, store, monkeypatch):
        self.store, self.covered, self.in_flight, self.ends = store, {}, [], []
        self.writer_waits = threading.Event()
        real_fsync, commit = os.fsync, store.start_group_commit()
        real_wait, real_insert = commit.wait, store.insert_prepared

        def fsync(fd):
            if threading.current_thread().name == "buffer-fsync":
                assert self.writer_waits.wait(GATE_TIMEOUT_S), "the writer never waited for a round"
            name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
            size = os.fstat(fd).st_size
            real_fsync(fd)
            self.covered[name] = max(self.covered.get(name, 0), size)

        def wait(timeout_s=None):
            self.writer_waits.set()
            real_wait(timeout_s)
            self.writer_waits.clear()

        def insert(batch, **kwargs):
            ack = real_insert(batch, **kwargs)
            self.ends.append(self.segment_size())
            self.in_flight.append(sum(end > self.durable_bytes() for end in self.ends))
            return ack

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(commit, "wait", wait)
        monkeypatch.setattr(store, "insert_prepared", insert)

    def segment_size(self) -> int:
        return (self.store.dir / "seg-000001.arrows").stat().st_size

    def durable_bytes(self) -> int:
        return self.covered.get("seg-000001.arrows", 0)


def test_pipelined_acks_come_in_order_and_the_window_of_undurable_batches_is_filled_not_exceeded(
    tmp_path, monkeypatch
):
    store = _store(tmp_path, fsync="batch")
    disk = GatedDisk(store, monkeypatch)
    acks = store.insert_many(_batches(10), window=3)
    assert [ack.accepted for ack in acks] == [4 * (i + 1) for i in range(10)]
    assert all(ack.fsynced and ack.duplicates == 0 for ack in acks)
    assert max(disk.in_flight) == 3
    assert disk.durable_bytes() == disk.segment_size()  # the last ack came after its fsync
    store.close()
    assert _store(tmp_path).index.n_rows == 4 * sum(range(1, 11))


def test_each_pipelined_ack_is_released_only_once_an_fsync_covered_its_batch(tmp_path, monkeypatch):
    store = _store(tmp_path, fsync="batch")
    disk = GatedDisk(store, monkeypatch)
    real_settled, early = store._settled, []

    def settled(pending, *, wait):
        acks = real_settled(pending, wait=wait)
        done = len(disk.ends) - len(pending)  # batches released so far, these included
        early.extend(end for end in disk.ends[:done] if end > disk.durable_bytes())
        return acks

    monkeypatch.setattr(store, "_settled", settled)
    assert len(store.insert_many(_batches(8), window=4)) == 8
    assert early == []


def test_a_batch_refused_mid_window_stops_the_writer_after_the_batches_before_it_are_durable(
    tmp_path, monkeypatch
):
    store = _store(tmp_path, fsync="batch")
    disk = GatedDisk(store, monkeypatch)
    good = _batches(4)
    batches = [good[0], good[1], with_broken_offsets(good[2], "traj_id"), good[3]]
    with pytest.raises(InsertsStopped, match=r"^batch 2: SchemaError: malformed Arrow data") as stopped:
        store.insert_many(batches, window=4)
    assert stopped.value.index == 2
    assert [None if ack is None else ack.accepted for ack in stopped.value.acks] == [4, 8, None, None]
    assert disk.durable_bytes() == disk.segment_size()
    del store  # a crash: what was acknowledged is on disk, nothing after the refused batch
    reopened = _store(tmp_path)
    assert reopened.index.n_rows == 12
    assert reopened.insert(good[3]).accepted == 16


def test_duplicates_across_a_window_are_acknowledged_as_duplicates_after_their_first_copy(tmp_path):
    store = _store(tmp_path, fsync="batch")
    a, b, c = (synthetic_batch(groups=[name]) for name in "abc")
    b_and_c = synthetic_batch(groups=["b", "c"])
    acks = store.insert_many([a, b, a, b_and_c, c], window=4)
    assert [(ack.accepted, ack.duplicates) for ack in acks] == [(4, 0), (4, 0), (0, 4), (4, 4), (0, 4)]
    assert all(ack.fsynced for ack in acks)
    store.close()
    assert _store(tmp_path).index.n_rows == 12


def test_a_failed_fsync_mid_window_acknowledges_nothing_and_the_store_nothing_more(tmp_path, monkeypatch):
    store = _store(tmp_path, fsync="batch")
    store.insert(synthetic_batch(groups=["first"]))  # its segment exists: the next fsyncs are rounds
    real_fsync = os.fsync

    def failing_fsync(fd):
        if threading.current_thread().name == "buffer-fsync":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        store.insert_many(_batches(4), window=2)
    monkeypatch.undo()  # the disk answers again, but what the failed fsync dropped is unknown
    with pytest.raises(OSError, match="Input/output error"):
        store.insert(synthetic_batch(groups=["after"]))


def test_insert_many_without_group_commit_inserts_in_order_and_a_bad_window_is_one_clear_error(tmp_path):
    store = _store(tmp_path, fsync="never")
    acks = store.insert_many(_batches(3), window=2)
    assert [ack.accepted for ack in acks] == [4, 8, 12]
    assert store.group_commit is None
    with pytest.raises(ValueError, match="window=0, must be at least 1"):
        store.insert_many(_batches(1), window=0)


def test_the_next_batch_is_prepared_on_the_writer_thread_while_the_batch_before_is_written(
    tmp_path, monkeypatch
):
    store = _store(tmp_path, fsync="batch")
    store.insert(synthetic_batch(groups=["first"]))  # its segment exists: the next writes append
    batches = _batches(4)
    probe = WriteOverlap(monkeypatch, buffer.store, len(batches))
    real_encode, encoders = buffer.segments.encode_batch, []

    def encode(batch):
        encoders.append(threading.current_thread().name)
        return real_encode(batch)

    monkeypatch.setattr(buffer.segments, "encode_batch", encode)
    acks = store.insert_many(batches, window=2)
    monkeypatch.undo()
    assert len(encoders) == 4 and all(name.startswith("buffer-append") for name in encoders)
    assert [ack.accepted for ack in acks] == [4, 8, 12, 16] and all(ack.fsynced for ack in acks)
    assert probe.prepared == batches  # each once, in order
    assert [overlapped for _, overlapped in probe.writes] == [True] * 4
    assert all(thread.startswith("buffer-append") for thread, _ in probe.writes)
    store.close()
    assert _store(tmp_path).index.n_rows == 4 + 40


def test_an_append_failing_while_the_next_batch_is_prepared_stops_the_writer_at_the_failed_batch(
    tmp_path, monkeypatch
):
    store = _store(tmp_path, fsync="batch")
    store.insert(synthetic_batch(groups=["first"]))
    size_before = store.segments[1].bytes
    fd, real_write, calls = store._writer._fd, os.write, []

    def write(target, data):
        if target == fd:
            calls.append(len(data))
            if len(calls) == 3:  # the third batch: part of it reaches the file, then the disk is full
                real_write(target, bytes(memoryview(data)[:100]))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(target, data)

    batches = _batches(5)
    with monkeypatch.context() as patch:
        patch.setattr(os, "write", write)
        with pytest.raises(InsertsStopped, match=r"^batch 2: AppendFailed: .*No space left") as stopped:
            store.insert_many(batches, window=4)
    acks = stopped.value.acks
    assert [None if ack is None else ack.accepted for ack in acks] == [4, 8, None, None, None]
    assert all(ack.fsynced for ack in acks[:2])
    # cut back to the end of batch 1; the batch prepared meanwhile (3) was never written
    assert (tmp_path / "seg-000001.arrows").stat().st_size == size_before + calls[0] + calls[1]
    assert store.index.n_rows == 4 + 12
    assert [ack.accepted for ack in store.insert_many(batches[2:], window=4)] == [12, 16, 20]
    del store  # a crash: every acknowledged row is on disk, nothing of the failed write
    reopened = _store(tmp_path)
    assert reopened.recovery == []
    assert reopened.index.n_rows == 4 + 60
