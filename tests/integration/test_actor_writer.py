"""The actor's buffer writer against a real buffer service that crashes and comes back."""

from __future__ import annotations

import socket
import threading
import time

from actors.aio import BackgroundLoop
from actors.writer import BufferWriter
from async_rl.config import BufferConfig
from buffer.client import BufferClient
from buffer.schema import build_batch
from buffer.service import start_service


def group(group_id: str, n: int = 4):
    return build_batch(
        traj_id=[f"{group_id}:{i}" for i in range(n)], group_id=[group_id] * n,
        prompt_tokens=[[1, 2]] * n, response_tokens=[[3, 4, 5]] * n,
        behavior_logprobs=[[-0.1, -0.2, -0.3]] * n, token_versions=[[0, 0, 1]] * n,
        reward=[1.0] * n, correct=[True] * n, actor_id="actor-w",
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_writer_resends_to_a_restarted_buffer_and_nothing_is_stored_twice(tmp_path):
    port, cfg = free_port(), BufferConfig(min_size_to_sample=1)
    service = start_service(tmp_path / "buf", cfg, max_staleness=4, port=port)
    loop = BackgroundLoop()
    writer = loop.run(_started(BufferWriter(service.address, max_pending=4, insert_timeout_s=1.0)))
    try:
        loop.run(writer.put(group("g1")))
        assert loop.run(writer.flush(60))
        service.kill()  # a crash: g2 goes unacknowledged until the service is back
        loop.run(writer.put(group("g2")))
        restarted = {}
        threading.Timer(2.0, lambda: restarted.update(
            handle=start_service(tmp_path / "buf", cfg, max_staleness=4, port=port))).start()
        assert loop.run(writer.flush(120))
        loop.run(writer.put(group("g1")))  # a re-send after a lost ack
        assert loop.run(writer.flush(60))
        with BufferClient(service.address) as client:
            rows = client.head(100).to_pylist()
    finally:
        loop.run(writer.close())
        loop.close()
        if "handle" in restarted:
            restarted["handle"].stop()
    assert sorted(r["traj_id"] for r in rows) == sorted([f"g1:{i}" for i in range(4)] + [f"g2:{i}" for i in range(4)])
    assert writer.stats.retries >= 1
    assert writer.stats.rows_acked == 8 and writer.stats.rows_duplicate == 4


async def _started(writer: BufferWriter) -> BufferWriter:
    return writer.start()


def test_writer_blocks_producers_while_batches_are_unacknowledged(tmp_path):
    service = start_service(tmp_path / "buf", BufferConfig(min_size_to_sample=1), max_staleness=4)
    service.kill()  # nothing acknowledges: the queue must fill and hold the producer
    loop = BackgroundLoop()
    writer = loop.run(_started(BufferWriter(service.address, max_pending=1, insert_timeout_s=0.5)))
    try:
        loop.run(writer.put(group("a")))  # taken by the drain task
        time.sleep(0.2)
        loop.run(writer.put(group("b")))  # fills the one pending slot
        third = loop.submit(writer.put(group("c")))
        time.sleep(1.0)
        assert not third.done()  # backpressure: the producer waits
        assert writer.stalled_s >= 1.0  # and the stall shows in the actor's status
    finally:
        loop.run(writer.close())
        loop.close()


def test_writer_drops_a_refused_batch_reports_it_keeps_draining_and_reports_only_acks_stored(tmp_path):
    service = start_service(tmp_path / "buf", BufferConfig(min_size_to_sample=1, max_message_bytes=64 << 10), max_staleness=4)
    loop = BackgroundLoop()
    writer = loop.run(_started(BufferWriter(service.address, max_pending=2, insert_timeout_s=5.0)))
    try:
        oversized = build_batch(
            traj_id=["big:0"], group_id=["big"], prompt_tokens=[[1]], response_tokens=[[3] * 40_000],
            behavior_logprobs=[[-0.1] * 40_000], token_versions=[[0] * 40_000], reward=[1.0], correct=[True],
        )
        stored = []  # what the actor reports settled to the data cursor: acknowledged groups only
        loop.run(writer.put(oversized, on_stored=lambda: stored.append("big")))
        loop.run(writer.put(group("after"), on_stored=lambda: stored.append("after")))
        assert loop.run(writer.flush(60))
        assert stored == ["after"]
        assert (writer.stats.batches_refused, writer.stats.rows_refused) == (1, 1)
        assert "exceeds max_message_bytes" in writer.stats.last_refusal
        assert writer.stats.rows_acked == 4 and writer.stalled_s == 0.0
        with BufferClient(service.address) as client:
            assert client.stats()["rows"] == 4
    finally:
        loop.run(writer.close())
        loop.close()
        service.stop()
