"""Group commit in the buffer service over loopback ZeroMQ: concurrent writers share fsyncs,
and every acknowledgement (insert or sample) comes after an fsync that covered it."""

import contextlib
import errno
import os
import threading
import time

import pyarrow as pa
import pytest

from async_rl.config import BufferConfig
from buffer.client import BufferClient, BufferRequestError, InsertsRefused
from buffer.service import BufferService
from buffer.store import ReplayStore
from buffer.testing import synthetic_batch, with_broken_offsets

WRITERS, BATCHES = 8, 4
SLOW_FSYNC_S = 0.05  # a slow disk: writes that arrive meanwhile must share the next fsync


@pytest.fixture
def durable(monkeypatch):
    """File name -> its size when an fsync of it last started (what that fsync covers), and
    the number of fsyncs of each file."""
    real_fsync, sizes, counts = os.fsync, {}, {}

    def fsync(fd):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        size = os.fstat(fd).st_size
        time.sleep(SLOW_FSYNC_S)
        real_fsync(fd)
        sizes[name] = max(sizes.get(name, 0), size)
        counts[name] = counts.get(name, 0) + 1

    monkeypatch.setattr(os, "fsync", fsync)
    return sizes, counts


@contextlib.contextmanager
def _serving(directory, **cfg):
    """A service loop on a thread of this process (so its fsyncs are patchable)."""
    cfg = BufferConfig(fsync="batch", min_size_to_sample=1, filter_zero_advantage=False, **cfg)
    service = BufferService(ReplayStore(directory, cfg, max_staleness=4), cfg, learner_token="t")
    service.bind("127.0.0.1", 0)
    loop = threading.Thread(target=service.serve)
    loop.start()
    try:
        yield service
    finally:
        service.stopping = True
        loop.join()
        service.close()


@pytest.fixture
def service(tmp_path):
    with _serving(tmp_path) as service:
        yield service


def _durable_traj_ids(path, size: int) -> set[str]:
    """traj_ids of the batches wholly inside the first ``size`` bytes of a segment."""
    ids = set()
    reader = pa.ipc.open_stream(pa.py_buffer(path.read_bytes()[:size]))
    while True:
        try:
            ids.update(reader.read_next_batch().column("traj_id").to_pylist())
        except (StopIteration, pa.ArrowInvalid, OSError):
            return ids


def test_concurrent_inserts_share_fsyncs_and_each_ack_follows_one_that_covered_it(
    service, durable, tmp_path
):
    sizes, counts = durable
    segment = tmp_path / "seg-000001.arrows"
    not_covered, errors = [], []

    def writer(w):
        try:
            with BufferClient(service.address) as client:
                for i in range(BATCHES):
                    batch = synthetic_batch(groups=[f"w{w}-{i}"], seed=i)
                    assert client.insert(batch) == {"accepted": 4, "duplicates": 0, "fsynced": True}
                    ids = set(batch.column("traj_id").to_pylist())
                    not_covered.extend(ids - _durable_traj_ids(segment, sizes[segment.name]))
        except Exception as err:  # surfaced by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and not_covered == []
    assert service.store.index.n_rows == WRITERS * BATCHES * 4
    # One fsync at creation, then rounds: far fewer than one per insert.
    assert counts[segment.name] - 1 <= WRITERS * BATCHES // 2


def test_a_sample_is_answered_after_its_journal_line_is_fsynced(service, durable, tmp_path):
    sizes, _ = durable
    with BufferClient(service.address) as client:
        client.insert(synthetic_batch(groups=["a"]))
        assert client.sample(1).num_rows == 4
        journal = tmp_path / "state.jsonl"
        assert sizes["state.jsonl"] == journal.stat().st_size
        assert journal.read_text().splitlines()[-1].startswith('{"op":"sample"')


def test_a_failed_append_reaches_the_writer_as_retryable_and_its_retry_is_stored(service, monkeypatch):
    real_write, failures = os.write, []

    def write(fd, data):  # the disk fills up in the middle of one batch
        if failures or not os.readlink(f"/proc/self/fd/{fd}").endswith(".arrows"):
            return real_write(fd, data)
        failures.append(len(data))
        real_write(fd, bytes(memoryview(data)[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with BufferClient(service.address) as client:
        client.insert(synthetic_batch(groups=["a"]))
        monkeypatch.setattr(os, "write", write)
        with pytest.raises(BufferRequestError, match="No space left on device") as refused:
            client.insert(synthetic_batch(groups=["b"]), retry_for_s=0)
        assert refused.value.retry and failures
        assert client.insert(synthetic_batch(groups=["b"]))["accepted"] == 4
        assert client.insert(synthetic_batch(groups=["c"]))["accepted"] == 4
    reopened = ReplayStore(service.store.dir, service.cfg, max_staleness=4, read_only=True)  # as after a crash
    assert reopened.recovery == [] and reopened.index.n_rows == 12


def _inserts_waiting_for_fsync(service, monkeypatch) -> list[int]:
    """Before each insert the service handles: how many replies already wait for an fsync."""
    real_on_insert, seen = service._on_insert, []

    def on_insert(identity, header, payload):
        seen.append(len(service.waiting))
        real_on_insert(identity, header, payload)

    monkeypatch.setattr(service, "_on_insert", on_insert)
    return seen


def test_one_writer_keeps_a_window_of_inserts_in_flight_and_each_ack_follows_an_fsync_that_covered_it(
    service, durable, tmp_path, monkeypatch
):
    sizes, counts = durable
    waiting = _inserts_waiting_for_fsync(service, monkeypatch)
    batches = [synthetic_batch(groups=[f"b{i}-{k}" for k in range(i + 1)], seed=i) for i in range(12)]
    with BufferClient(service.address) as client:
        acks = client.insert_many(batches, window=4)
    assert acks == [{"accepted": 4 * (i + 1), "duplicates": 0, "fsynced": True} for i in range(12)]
    segment = tmp_path / "seg-000001.arrows"
    acked = {t for batch in batches for t in batch.column("traj_id").to_pylist()}
    assert acked <= _durable_traj_ids(segment, sizes[segment.name])
    # Several inserts of the one writer met at the service: they waited for fsyncs together.
    assert 1 <= max(waiting) <= 3
    assert counts[segment.name] - 1 < len(batches)


def test_a_batch_refused_mid_window_names_itself_and_the_acks_in_flight_are_durable(service, durable, tmp_path):
    sizes, _ = durable
    batches = [synthetic_batch(groups=[f"g{i}"], seed=i) for i in range(5)]
    batches[1] = with_broken_offsets(batches[1], "traj_id")
    with BufferClient(service.address) as client, pytest.raises(InsertsRefused) as refused:
        client.insert_many(batches, window=4)
    assert str(refused.value).startswith("batch 1: SchemaError: malformed Arrow data")
    assert refused.value.index == 1 and not refused.value.retry
    acks = refused.value.acks
    assert acks[1] is None and all(acks[i] == {"accepted": 4, "duplicates": 0, "fsynced": True} for i in (0, 2, 3))
    segment = tmp_path / "seg-000001.arrows"
    acked = {t for i, ack in enumerate(acks) if ack for t in batches[i].column("traj_id").to_pylist()}
    assert acked <= _durable_traj_ids(segment, sizes[segment.name])
    assert service.store.index.n_rows == 4 * sum(ack is not None for ack in acks)


def test_duplicates_across_a_window_are_acknowledged_once_their_first_copy_is_durable(service, durable, tmp_path):
    a, b = synthetic_batch(groups=["a"]), synthetic_batch(groups=["b"])
    with BufferClient(service.address) as client:
        acks = client.insert_many([a, b, a, synthetic_batch(groups=["b", "c"]), a], window=8)
    assert [(ack["accepted"], ack["duplicates"]) for ack in acks] == [(4, 0), (4, 0), (0, 4), (4, 4), (0, 4)]
    assert all(ack["fsynced"] for ack in acks)
    assert service.store.index.n_rows == 12


def test_inserts_the_rate_limiter_refuses_within_a_window_are_retried_until_the_learner_catches_up(
    tmp_path, monkeypatch
):
    # samples_per_insert 1 with tolerance 1: an insert is refused while three groups wait unsampled.
    with _serving(tmp_path, samples_per_insert=1.0, spi_tolerance=1.0) as service:
        real_reply, refused = service._reply, threading.Event()

        def reply(identity, request, payload=None, **fields):
            if fields.get("retry"):
                refused.set()
            real_reply(identity, request, payload, **fields)

        monkeypatch.setattr(service, "_reply", reply)
        batches = [synthetic_batch(groups=[f"g{i}"], seed=i) for i in range(8)]
        sampled = []

        def learner():  # starts once an insert was refused, then samples every group
            refused.wait(30)
            with BufferClient(service.address) as client:
                while len(sampled) < len(batches):
                    table = client.sample(1, timeout_s=30)
                    sampled.extend(dict.fromkeys(table.column("group_id").to_pylist()))

        thread = threading.Thread(target=learner, daemon=True)
        with BufferClient(service.address) as client:
            for batch in batches[:3]:
                client.insert(batch)
            thread.start()
            acks = client.insert_many(batches[3:], window=4, retry_for_s=60)
        thread.join(60)
    assert refused.is_set()
    assert acks == [{"accepted": 4, "duplicates": 0, "fsynced": True}] * 5
    assert sorted(sampled) == sorted(f"g{i}" for i in range(8))


def _batch_ends(path) -> dict[str, int]:
    """traj_id -> the byte offset where the batch holding it ends in a segment file."""
    data = pa.py_buffer(path.read_bytes())
    source = pa.BufferReader(data)
    schema = pa.ipc.read_schema(pa.ipc.read_message(source))
    ends = {}
    while True:
        try:
            message = pa.ipc.read_message(source)
        except (EOFError, OSError, pa.ArrowInvalid):
            return ends
        batch = pa.ipc.read_record_batch(message, schema)
        ends.update(dict.fromkeys(batch.column("traj_id").to_pylist(), source.tell()))


def test_an_ack_in_a_rolled_to_segment_follows_the_fsyncs_of_its_name_and_of_the_rolled_tail(tmp_path, monkeypatch):
    """Under group commit a roll leaves its fsyncs (the rolled segment's tail, the folder
    holding the new segment's name) to the next round instead of the inserting thread: every
    ack must still come after both, for whichever segment holds its rows."""
    real_fsync, lock = os.fsync, threading.Lock()
    fsynced: dict[str, int] = {}  # segment -> bytes an fsync covered; "names" -> segments named

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        listed = {p for p in os.listdir(path) if p.endswith(".arrows")} if os.path.isdir(path) else None
        size = os.fstat(fd).st_size
        time.sleep(SLOW_FSYNC_S / 10)  # rounds in flight while segments roll
        real_fsync(fd)
        with lock:
            if listed is not None:
                fsynced.setdefault("names", set()).update(listed)
            else:
                fsynced[os.path.basename(path)] = max(fsynced.get(os.path.basename(path), 0), size)

    monkeypatch.setattr(os, "fsync", fsync)
    one = synthetic_batch(groups=["x"], response_len=64)
    acked: list[tuple[str, set, dict]] = []
    with _serving(tmp_path, segment_bytes=2 * one.nbytes) as service:

        def write(w):
            with BufferClient(service.address) as client:
                for i in range(6):
                    batch = synthetic_batch(groups=[f"w{w}-{i}"], response_len=64, seed=i)
                    assert client.insert(batch)["fsynced"] is True
                    with lock:
                        acked.append((batch.column("traj_id")[0].as_py(), set(fsynced.get("names", ())),
                                      {k: v for k, v in fsynced.items() if k != "names"}))

        threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    ends = {traj: (path.name, end) for path in tmp_path.glob("seg-*.arrows") for traj, end in _batch_ends(path).items()}
    assert len({segment for segment, _ in ends.values()}) >= 5  # it rolled, several times
    assert len(acked) == 24
    for traj, names, sizes in acked:
        segment, end = ends[traj]
        assert segment in names, f"{traj} acked before the name of {segment} was fsynced"
        assert sizes.get(segment, 0) >= end, f"{traj} acked before an fsync covered it in {segment}"
