"""Group commit in the buffer service over loopback ZeroMQ: concurrent writers share fsyncs,
and every acknowledgement (insert or sample) comes after an fsync that covered it."""

import errno
import os
import threading
import time

import pyarrow as pa
import pytest

from async_rl.config import BufferConfig
from buffer.client import BufferClient, BufferRequestError
from buffer.service import BufferService
from buffer.store import ReplayStore
from buffer.testing import synthetic_batch

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


@pytest.fixture
def service(tmp_path):
    cfg = BufferConfig(fsync="batch", min_size_to_sample=1, filter_zero_advantage=False)
    service = BufferService(ReplayStore(tmp_path, cfg, max_staleness=4), cfg, learner_token="t")
    service.bind("127.0.0.1", 0)
    loop = threading.Thread(target=service.serve)
    loop.start()
    yield service
    service.stopping = True
    loop.join()
    service.close()


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
