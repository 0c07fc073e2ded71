"""Delivering finished groups to the buffer: acknowledged, retried, never duplicated.

A group is forgotten only after the buffer acknowledged its batch (the ack comes once the rows
are durable). A lost ack or a restarted buffer makes the writer re-send the same batch; the
buffer drops rows whose ``traj_id`` it already holds, so nothing is stored twice. A refusal by
the buffer's rate limiter is retried inside ``BufferClient.insert``; while it lasts the
writer's queue fills and the actor stops taking new prompts (backpressure).

All buffer calls run on one dedicated thread, because a ZeroMQ socket must stay on one thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa

log = logging.getLogger(__name__)

# Pause between re-sends while the buffer is unreachable; short, since restarts are quick.
RETRY_BACKOFF_S = 0.5
# Per-request wait for an insert ack before the socket is replaced and the batch re-sent.
INSERT_TIMEOUT_S = 30.0


@dataclass
class WriterStats:
    batches_acked: int = 0
    rows_acked: int = 0
    rows_duplicate: int = 0
    retries: int = 0


class BufferWriter:
    """An asyncio queue of batches drained into ``BufferClient(address)`` by one thread."""

    def __init__(self, address: str, *, max_pending: int, insert_timeout_s: float = INSERT_TIMEOUT_S,
                 curve_keys_dir: str | None = None):
        self.address = address
        self._keys = curve_keys_dir  # the job's CURVE keys (a buffer off loopback requires them)
        self.stats = WriterStats()
        self._timeout = insert_timeout_s
        self._queue: asyncio.Queue[pa.RecordBatch] = asyncio.Queue(maxsize=max_pending)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="buffer-writer")
        self._client = None
        self._task: asyncio.Task | None = None
        self._closing = False

    def start(self) -> BufferWriter:
        """Start draining on the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._drain())
        return self

    async def put(self, batch: pa.RecordBatch) -> None:
        """Queue a batch; waits while ``max_pending`` batches are unacknowledged."""
        await self._queue.put(batch)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def flush(self, timeout_s: float) -> bool:
        """Wait until every queued batch is acknowledged; False if ``timeout_s`` passed."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        """Stop the drain task and the buffer thread (call ``flush`` first to keep rows)."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(self._thread, self._close_client)
        self._thread.shutdown(wait=True)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._queue.get()
            try:
                await loop.run_in_executor(self._thread, self._insert_until_acked, batch)
            finally:
                self._queue.task_done()

    def _insert_until_acked(self, batch: pa.RecordBatch) -> None:
        from buffer.client import BufferClient

        while not self._closing:
            if self._client is None:
                self._client = BufferClient(self.address, timeout_s=self._timeout, curve_keys_dir=self._keys)
            try:
                ack = self._client.insert(batch)
            except (TimeoutError, OSError) as err:  # unreachable or restarting: re-send
                log.warning("buffer insert of %d rows unacknowledged (%s); re-sending", batch.num_rows, err)
                self._close_client()
                self.stats.retries += 1
                time.sleep(RETRY_BACKOFF_S)
                continue
            self.stats.batches_acked += 1
            self.stats.rows_acked += int(ack["accepted"])
            self.stats.rows_duplicate += int(ack["duplicates"])
            return
        log.warning("writer closing: %d rows were never acknowledged", batch.num_rows)

    def _close_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
