"""Faults on the weight wire: bad transfers are dropped, dead peers are survived.

A scripted publisher (a raw ROUTER socket speaking ``wire.py``) produces the corrupted,
truncated, stalled, old and duplicated transfers a real publisher never sends; killed
peers are real processes started here and killed by PID.
"""

from __future__ import annotations

import socket
import tempfile

import pytest
import torch
import zmq
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
from async_rl.weights import WeightPublisher, WeightSubscriber, wire
from async_rl.weights.sendbuffer import Snapshot, copy_and_hash

WAIT_S = 60.0
CHUNK = 4096
# Slow streamed transfers (one chunk in flight, 4 KiB chunks) leave time to kill a peer mid-way.
SLOW = {"chunk_bytes": CHUNK, "credit_chunks": 1, "transport": "tcp"}


class ScriptedPublisher:
    """Sends whatever transfer a test scripts, whether or not the subscriber asked for it."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.address = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.peer = None
        self.xfer = 0

    def wait_hello(self) -> dict:
        while True:
            assert self.sock.poll(int(WAIT_S * 1000)), "no HELLO from the subscriber"
            ident, kind, body = self.sock.recv_multipart()
            if kind == wire.HELLO:
                self.peer = ident
                return wire.unpack(body)

    def header(self, version: int, tensors) -> tuple[wire.Header, Snapshot]:
        specs, total = wire.plan_layout(tensors)
        buffer = torch.empty(total, dtype=torch.uint8)
        snap = Snapshot(version, specs, wire.layout_id(specs), total, CHUNK, buffer)
        copy_and_hash(snap, [t for _, t in tensors])
        self.xfer += 1
        header = wire.Header(
            pub=1, xfer=self.xfer, version=version, tensors=specs, total_bytes=total,
            chunk_bytes=CHUNK, checksums=tuple(snap.checksums), send=None, base=-1,
            layout=snap.layout,
        )
        return header, snap

    def transfer(self, version: int, tensors, *, chunks=None, tamper=None) -> None:
        """Announce ``version`` and send ``chunks`` (default all), ``tamper(i, bytes)`` applied."""
        header, snap = self.header(version, tensors)
        self.sock.send_multipart([self.peer, *wire.pack(wire.HEADER, wire.header_body(header))])
        for index in range(snap.n_chunks) if chunks is None else chunks:
            payload = bytes(snap.chunk(index))
            if tamper is not None:
                payload = tamper(index, payload)
            meta = wire.pack(wire.CHUNK, {"xfer": header.xfer, "i": index})
            self.sock.send_multipart([self.peer, *meta, payload])

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def scripted():
    publisher = ScriptedPublisher()
    yield publisher
    publisher.close()


def subscribe(address: str, **overrides) -> tuple[WeightSubscriber, Recorder]:
    got = Recorder()
    cfg = WeightsConfig(**{"heartbeat_s": 0.2, **overrides})
    return WeightSubscriber(address, got, cfg).start(), got


def then_a_good_transfer_loads(scripted, sub, got, version: int, tensors) -> None:
    """After whatever went before, a good transfer of ``version`` loads, and only it."""
    scripted.transfer(version, tensors)
    assert sub.wait_for(version, WAIT_S)
    sub.close()
    assert got.versions == [version]
    assert_bit_exact(got.calls[0][1], tensors)


def test_corrupted_chunk_is_rejected_and_a_good_transfer_still_loads(scripted):
    sub, got = subscribe(scripted.address)
    try:
        scripted.wait_hello()
        tensors = make_tensors(1, 64 << 10)

        def flip_a_bit(index: int, payload: bytes) -> bytes:
            return payload[:100] + bytes([payload[100] ^ 1]) + payload[101:] if index == 5 else payload

        scripted.transfer(1, tensors, tamper=flip_a_bit)
        assert wait_until(lambda: sub.stats["rejected_corrupt"] == 1, WAIT_S)
        then_a_good_transfer_loads(scripted, sub, got, 2, tensors)
    finally:
        sub.close()


def test_truncated_chunk_and_unfinished_transfer_are_rejected(scripted):
    sub, got = subscribe(scripted.address, stall_timeout_s=0.5)
    try:
        scripted.wait_hello()
        tensors = make_tensors(1, 64 << 10)
        scripted.transfer(1, tensors, tamper=lambda i, p: p[:-10] if i == 3 else p)
        assert wait_until(lambda: sub.stats["rejected_truncated"] == 1, WAIT_S)
        scripted.transfer(2, tensors, chunks=range(4))  # then the publisher goes quiet
        assert wait_until(lambda: sub.stats["dropped_stalled"] == 1, WAIT_S)
        then_a_good_transfer_loads(scripted, sub, got, 3, tensors)
    finally:
        sub.close()


def test_older_and_duplicate_versions_are_ignored(scripted):
    sub, got = subscribe(scripted.address)
    try:
        scripted.wait_hello()
        scripted.transfer(5, make_tensors(5, 32 << 10))
        assert sub.wait_for(5, WAIT_S)
        scripted.transfer(3, make_tensors(3, 32 << 10))
        scripted.transfer(5, make_tensors(6, 32 << 10))
        assert wait_until(lambda: sub.stats["rejected_old"] == 2, WAIT_S)
        scripted.transfer(6, make_tensors(6, 32 << 10))
        assert sub.wait_for(6, WAIT_S)
    finally:
        sub.close()
    assert got.versions == [5, 6]
    assert sub.stats["rejected_old"] == 2
    assert_bit_exact(got.calls[0][1], make_tensors(5, 32 << 10))


def test_subscriber_killed_mid_transfer_restarts_and_catches_up():
    with tempfile.TemporaryDirectory(dir="/tmp") as short:  # ipc; the restart test covers tcp
        cfg = WeightsConfig(**SLOW, stall_timeout_s=2.0, endpoint=f"ipc://{short}/w.sock")
        tensors = make_tensors(1, 1 << 20)
        with WeightPublisher(cfg) as publisher:
            publisher.publish(1, tensors)
            first = spawn("subscriber", publisher.address, cfg.model_dump_json())
            try:
                assert wait_until(lambda: _mid_transfer(publisher), WAIT_S)
            finally:
                kill(first)
            # The restarted subscriber runs in this process (one child start is enough).
            restarted, got = subscribe(publisher.address)
            try:
                assert restarted.wait_for(1, WAIT_S)
                newer = make_tensors(2, 1 << 20)
                publisher.publish(2, newer)
                assert restarted.wait_for(2, WAIT_S)
            finally:
                restarted.close()
    assert got.versions == [1, 2]
    assert_bit_exact(got.calls[0][1], tensors)
    assert_bit_exact(got.calls[1][1], newer)


def _mid_transfer(publisher: WeightPublisher) -> bool:
    return any(0 < p["sent"] < p["chunks"] // 2 for p in publisher.stats()["peers"])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_publisher_restarted_mid_transfer_is_survived():
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    cfg = WeightsConfig(**SLOW, endpoint=endpoint)
    sub, got = subscribe(endpoint, credit_chunks=1, stall_timeout_s=1.0)
    try:
        first = spawn("publisher", cfg.model_dump_json(), "1", "1", str(1 << 20))
        try:
            read_json_line(first)
            assert wait_until(lambda: sub.stats["bytes_received"] > 0, WAIT_S)
        finally:
            kill(first)
        assert sub.version is None
        # The restarted publisher runs in this process, bound to the same address.
        with WeightPublisher(WeightsConfig(endpoint=endpoint, chunk_bytes=64 << 10)) as second:
            second.publish(2, make_tensors(2, 1 << 20))
            assert sub.wait_for(2, WAIT_S)
    finally:
        sub.close()
    assert got.versions == [2]
    assert sub.stats["dropped_stalled"] + sub.stats["dropped_aborted"] >= 1
    assert_bit_exact(got.calls[0][1], make_tensors(2, 1 << 20))


def test_decodable_but_wrong_messages_are_dropped_and_later_versions_still_load(scripted):
    sub, got = subscribe(scripted.address)
    try:
        scripted.wait_hello()
        tensors = make_tensors(1, 64 << 10)
        header, snap = scripted.header(1, tensors)
        scripted.sock.send_multipart([scripted.peer, *wire.pack(wire.HEADER, wire.header_body(header))])
        for index in (1.0, [1], "1", None, 2**64 - 1):  # chunk indexes of the wrong type or range
            meta = wire.pack(wire.CHUNK, {"xfer": header.xfer, "i": index})
            scripted.sock.send_multipart([scripted.peer, *meta, bytes(snap.chunk(1))])
        assert wait_until(lambda: sub.stats["rejected_malformed"] == 4, WAIT_S)
        assert wait_until(lambda: sub.stats["duplicate_chunks"] == 1, WAIT_S)  # 2**64-1: not one we miss
        total, chunk = (1 << 40) - wire.ALIGN, wire.MAX_CHUNK_BYTES  # a well-formed 1 TiB announcement
        spec = wire.TensorSpec("w", "uint8", (total,), 0, total, "uint8")
        huge = wire.Header(pub=1, xfer=99, version=2, tensors=(spec,), total_bytes=total, chunk_bytes=chunk,
                           checksums=(0,) * wire.n_chunks(total, chunk), send=None, base=-1,
                           layout=wire.layout_id([spec]))
        scripted.sock.send_multipart([scripted.peer, *wire.pack(wire.HEADER, wire.header_body(huge))])
        assert wait_until(lambda: sub.stats["rejected_malformed"] == 5, WAIT_S)
        assert sub.alive
        then_a_good_transfer_loads(scripted, sub, got, 3, tensors)
    finally:
        sub.close()
