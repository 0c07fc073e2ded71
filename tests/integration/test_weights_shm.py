"""The same-host path: subscribers map the publisher's /dev/shm file (real sockets, real files).

Child processes are started here and killed by PID; every file is looked up by the
publisher's own id, so files of other jobs on the machine are never touched.
"""

from __future__ import annotations

import stat
from pathlib import Path

import torch
from weights_helpers import (
    Recorder,
    assert_bit_exact,
    kill,
    make_tensors,
    read_json_line,
    spawn,
    wait_until,
)

from async_rl.config import WeightsConfig
from async_rl.weights import WeightPublisher, WeightSubscriber, shm

WAIT_S = 60.0
CHUNK = 16 << 10



def mixed_tensors(seed: int) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        ("w", torch.randn(300, 70, generator=gen)),
        ("b.bf16", torch.randn(33, 7, generator=gen).to(torch.bfloat16)),
        ("ids", torch.arange(-5, 6) * seed),
        ("mask", torch.tensor([True, False, True])),
        ("scalar", torch.tensor(3.5 * seed)),
        ("empty", torch.empty(0, 4)),
        ("transposed", torch.randn(50, 90, generator=gen).t()),
    ]


def data_files(publisher: WeightPublisher) -> list[Path]:
    """This publisher's data files in /dev/shm (its version and spare files, not its lock)."""
    prefix = Path(publisher.stats()["shm"]).name.rsplit("-v", 1)[0]
    return sorted(p for p in shm.SHM_DIR.glob(f"{prefix}-*"))


def installed(publisher: WeightPublisher, version: int) -> bool:
    return wait_until(lambda: publisher.stats()["latest"] == version, WAIT_S)


def test_same_host_subscriber_maps_the_version_bit_exact_without_streaming():
    cfg = WeightsConfig(chunk_bytes=CHUNK)
    tensors = mixed_tensors(1)
    got = Recorder()
    with WeightPublisher(cfg) as publisher, WeightSubscriber(publisher.address, got, cfg) as sub:
        publisher.publish(1, tensors)
        assert sub.wait_for(1, WAIT_S)
        path = Path(publisher.stats()["shm"])
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.parent == shm.SHM_DIR and path.name.endswith("-v1")
        sent = publisher.stats()["bytes_sent"]
    assert got.versions == [1]
    assert_bit_exact(got.calls[0][1], tensors)
    assert sub.stats["delivered_shm"] == 1 and sub.stats["bytes_received"] == 0 and sent == 0


def test_tcp_transport_streams_even_on_the_same_host():
    tensors = make_tensors(3, 256 << 10)
    got = Recorder()
    with WeightPublisher(WeightsConfig(chunk_bytes=CHUNK)) as publisher:
        stream_cfg = WeightsConfig(chunk_bytes=CHUNK, transport="tcp")
        with WeightSubscriber(publisher.address, got, stream_cfg) as sub:
            publisher.publish(1, tensors)
            assert sub.wait_for(1, WAIT_S)
    assert sub.stats["delivered_shm"] == 0 and sub.stats["bytes_received"] >= 256 << 10
    assert_bit_exact(got.calls[0][1], tensors)

    cfg = WeightsConfig(chunk_bytes=CHUNK, transport="tcp")  # a tcp publisher makes no files
    with WeightPublisher(cfg) as publisher, WeightSubscriber(publisher.address, Recorder(), cfg) as sub:
        publisher.publish(1, tensors)
        assert sub.wait_for(1, WAIT_S)
        assert publisher.stats()["shm"] is None
    assert sub.stats["delivered_shm"] == 0


def test_corrupted_shm_file_is_rejected_and_the_next_version_loads():
    cfg = WeightsConfig(chunk_bytes=CHUNK, heartbeat_s=0.1)
    got = Recorder()
    with WeightPublisher(cfg) as publisher:
        publisher.publish(1, make_tensors(1, 256 << 10))
        assert installed(publisher, 1)
        with open(publisher.stats()["shm"], "r+b") as file:  # flip one bit in chunk 5
            file.seek(5 * CHUNK + 100)
            byte = file.read(1)[0]
            file.seek(5 * CHUNK + 100)
            file.write(bytes([byte ^ 1]))
        with WeightSubscriber(publisher.address, got, cfg) as sub:
            assert wait_until(lambda: sub.stats["rejected_corrupt"] >= 1, WAIT_S)
            assert sub.version is None
            publisher.publish(2, make_tensors(2, 256 << 10))
            assert sub.wait_for(2, WAIT_S)
    assert got.versions == [2]
    assert_bit_exact(got.calls[0][1], make_tensors(2, 256 << 10))


def test_superseded_file_is_renamed_away_and_recycled_two_files_at_most():
    cfg = WeightsConfig(chunk_bytes=CHUNK)
    got = Recorder()
    with WeightPublisher(cfg) as publisher, WeightSubscriber(publisher.address, got, cfg) as sub:
        paths, inodes = {}, {}
        for version in (1, 2, 3):
            publisher.publish(version, make_tensors(version, 256 << 10))
            assert sub.wait_for(version, WAIT_S)
            paths[version] = Path(publisher.stats()["shm"])
            inodes[version] = paths[version].stat().st_ino
            assert len(data_files(publisher)) <= shm.MAX_NAMED_FILES
            assert not paths[version - 1].exists() if version > 1 else True
    assert inodes[3] == inodes[1] != inodes[2]  # v3 was written into v1's file, not a new one
    assert got.versions == [1, 2, 3]
    assert_bit_exact(got.calls[2][1], make_tensors(3, 256 << 10))


def test_unmappable_file_streams_under_auto_and_is_dropped_under_shm():
    tensors = make_tensors(1, 256 << 10)
    with WeightPublisher(WeightsConfig(chunk_bytes=CHUNK)) as publisher:
        publisher.publish(1, tensors)
        assert installed(publisher, 1)
        Path(publisher.stats()["shm"]).unlink()  # as if our /dev/shm were another one
        strict, auto = Recorder(), Recorder()
        shm_only = WeightsConfig(chunk_bytes=CHUNK, transport="shm", heartbeat_s=0.1)
        with WeightSubscriber(publisher.address, strict, shm_only) as strict_sub:
            assert wait_until(lambda: strict_sub.stats["dropped_unmapped"] >= 2, WAIT_S)
        with WeightSubscriber(publisher.address, auto, WeightsConfig(chunk_bytes=CHUNK)) as sub:
            assert sub.wait_for(1, WAIT_S)
    assert strict.versions == [] and strict_sub.stats["bytes_received"] == 0
    assert sub.stats["shm_fallbacks"] == 1 and sub.stats["bytes_received"] >= 256 << 10
    assert_bit_exact(auto.calls[0][1], tensors)


def test_writes_by_a_callback_stay_private_and_a_recycled_file_still_verifies():
    cfg = WeightsConfig(chunk_bytes=CHUNK)
    writer, reader = Recorder(), Recorder()

    def scribble(version, named_tensors):
        writer(version, named_tensors)
        for _, tensor in named_tensors:
            tensor.zero_()  # allowed: it only changes this subscriber's copy-on-write pages

    with WeightPublisher(cfg) as publisher:
        with WeightSubscriber(publisher.address, scribble, cfg) as sub:
            publisher.publish(1, make_tensors(1, 256 << 10))
            assert sub.wait_for(1, WAIT_S)
            first = Path(publisher.stats()["shm"]).stat().st_ino
            with WeightSubscriber(publisher.address, reader, cfg) as other:
                assert other.wait_for(1, WAIT_S)
            for version in (2, 3):
                publisher.publish(version, make_tensors(version, 256 << 10))
                assert sub.wait_for(version, WAIT_S)
            assert Path(publisher.stats()["shm"]).stat().st_ino == first  # the file we scribbled on
    assert_bit_exact(reader.calls[0][1], make_tensors(1, 256 << 10))
    assert writer.versions == [1, 2, 3] and sub.stats["rejected_corrupt"] == 0
    for version, received in writer.calls:
        assert_bit_exact(received, make_tensors(version, 256 << 10))


def test_no_files_left_after_a_subscriber_is_killed_and_the_publisher_closes():
    cfg = WeightsConfig(chunk_bytes=CHUNK)
    with WeightPublisher(cfg) as publisher:
        publisher.publish(1, make_tensors(1, 256 << 10))
        child = spawn("subscriber", publisher.address, cfg.model_dump_json(), "hold")
        try:
            assert read_json_line(child)["version"] == 1  # inside its callback: v1 stays locked
            publisher.publish(2, make_tensors(2, 256 << 10))
            assert installed(publisher, 2)
        finally:
            kill(child)
        publisher.publish(3, make_tensors(3, 256 << 10))
        assert installed(publisher, 3)
        files = data_files(publisher)
        assert len(files) <= shm.MAX_NAMED_FILES
        lock = files[0].parent / f"{files[0].name.rsplit('-', 1)[0]}.lock"
        assert lock.exists()
    assert not any(path.exists() for path in [*files, lock])


def test_files_of_a_killed_publisher_are_removed_by_the_next_one():
    cfg = WeightsConfig(chunk_bytes=CHUNK)
    child = spawn("publisher", cfg.model_dump_json(), "1", "1", str(256 << 10))
    try:
        path = Path(read_json_line(child)["shm"])
    finally:
        kill(child)
    lock = path.parent / f"{path.name.rsplit('-', 1)[0]}.lock"
    assert path.exists() and lock.exists()  # SIGKILL leaves them behind
    with WeightPublisher(cfg):
        assert not path.exists() and not lock.exists()


def test_a_live_publishers_files_survive_another_publishers_sweep():
    cfg = WeightsConfig(chunk_bytes=CHUNK)
    with WeightPublisher(cfg) as first:
        first.publish(1, make_tensors(1, 64 << 10))
        assert installed(first, 1)
        with WeightPublisher(cfg):
            assert Path(first.stats()["shm"]).exists()


def test_a_forgotten_reader_keeps_its_verified_bytes_until_its_callback_returns():
    import threading

    cfg = WeightsConfig(chunk_bytes=CHUNK, stall_timeout_s=0.3)
    entered, release, seen = threading.Event(), threading.Event(), Recorder()

    def slow(version, named_tensors):
        if version == 1:
            entered.set()
            assert release.wait(WAIT_S)  # meanwhile the publisher forgets us and moves on
        seen(version, named_tensors)

    with WeightPublisher(cfg) as publisher, WeightSubscriber(publisher.address, slow, cfg) as sub:
        publisher.publish(1, make_tensors(1, 256 << 10))
        assert entered.wait(WAIT_S)
        assert wait_until(lambda: not publisher.stats()["peers"], WAIT_S)
        first = Path(publisher.stats()["shm"]).stat().st_ino
        for version in (2, 3):
            publisher.publish(version, make_tensors(version, 256 << 10))
            assert installed(publisher, version)
        assert Path(publisher.stats()["shm"]).stat().st_ino != first  # v1's file was still locked
        assert len(data_files(publisher)) <= shm.MAX_NAMED_FILES
        release.set()
        assert sub.wait_for(3, WAIT_S)
    assert seen.versions == [1, 3]
    assert_bit_exact(seen.calls[0][1], make_tensors(1, 256 << 10))
    assert_bit_exact(seen.calls[1][1], make_tensors(3, 256 << 10))


def test_a_version_that_does_not_fit_in_dev_shm_streams_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setattr(shm, "HEADROOM_BYTES", 1 << 60)  # as if /dev/shm were full
    cfg = WeightsConfig(chunk_bytes=CHUNK)
    got = Recorder()
    with caplog.at_level("WARNING", logger="async_rl.weights.shm"):
        with WeightPublisher(cfg) as publisher, WeightSubscriber(publisher.address, got, cfg) as sub:
            for version in (1, 2):
                publisher.publish(version, make_tensors(version, 256 << 10))
                assert sub.wait_for(version, WAIT_S)
            assert publisher.stats()["shm"] is None
    assert sub.stats["delivered_shm"] == 0 and sub.stats["bytes_received"] >= 2 * (256 << 10)
    assert_bit_exact(got.calls[1][1], make_tensors(2, 256 << 10))
    assert sum("cannot place" in r.getMessage() for r in caplog.records) == 1
