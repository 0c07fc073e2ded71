"""Delivering finished groups to the buffer: acknowledged, retried, never duplicated.

A group is forgotten only after the buffer acknowledged its batch (the ack comes once the rows
are durable). A lost ack or a restarted buffer makes the writer re-send the same batch; the
buffer drops rows whose ``traj_id`` it already holds, so nothing is stored twice. A refusal by
the buffer's rate limiter is retried inside ``BufferClient.insert``; while it lasts the
writer's queue fills and the actor stops taking new prompts (backpressure). A batch the buffer
refuses for good (an error reply: oversized, breaks the contract) is dropped, counted and
logged, and the writer keeps draining; ``stalled_s`` says how long it has made no progress.

All buffer calls run on one dedicated thread, because a ZeroMQ socket must stay on one thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

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
    batches_refused: int = 0  # refused for good by the buffer, dropped
    rows_refused: int = 0
    last_refusal: str | None = None
    progress_at: float = field(default_factory=time.monotonic)  # last ack, refusal or idle queue


class BufferWriter:
    """An asyncio queue of batches drained into ``BufferClient(address)`` by one thread."""

    def __init__(self, address: str, *, max_pending: int, insert_timeout_s: float = INSERT_TIMEOUT_S,
                 curve_keys_dir: str | None = None):
        self.address = address
        self._keys = curve_keys_dir  # the job's CURVE keys (a buffer off loopback requires them)
        self.stats = WriterStats()
        self._timeout = insert_timeout_s
        self._queue: asyncio.Queue[tuple[pa.RecordBatch, Callable[[], None] | None]] = asyncio.Queue(maxsize=max_pending)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="buffer-writer")
        self._client = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._inserting = False

    def start(self) -> BufferWriter:
        """Start draining on the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._drain())
        return self

    async def put(self, batch: pa.RecordBatch, on_stored: Callable[[], None] | None = None) -> None:
        """Queue a batch; waits while ``max_pending`` batches are unacknowledged. ``on_stored``
        runs on the loop once the buffer acknowledged the batch (its rows are durable); never
        for a batch refused for good or dropped on close."""
        await self._queue.put((batch, on_stored))

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    @property
    def stalled_s(self) -> float:
        """Seconds without an ack or a refusal while batches wait (0 when none waits)."""
        busy = self._inserting or self._queue.qsize()
        return time.monotonic() - self.stats.progress_at if busy else 0.0

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
            if self._queue.empty():
                self.stats.progress_at = time.monotonic()  # idle is not stalled
            batch, on_stored = await self._queue.get()
            self._inserting = True
            try:
                stored = await loop.run_in_executor(self._thread, self._insert_until_acked, batch)
                if stored and on_stored is not None:
                    on_stored()
            finally:
                self._inserting = False
                self._queue.task_done()

    def _insert_until_acked(self, batch: pa.RecordBatch) -> bool:
        """Send until acknowledged (True); False when refused for good or closing."""
        from buffer.client import BufferClient, BufferRequestError

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
            except BufferRequestError as err:
                if err.retry:  # still rate limited: keep the batch, keep pushing back
                    self.stats.retries += 1
                    continue
                self._refused(batch, str(err))
                return False
            self.stats.progress_at = time.monotonic()
            self.stats.batches_acked += 1
            self.stats.rows_acked += int(ack["accepted"])
            self.stats.rows_duplicate += int(ack["duplicates"])
            return True
        log.warning("writer closing: %d rows were never acknowledged", batch.num_rows)
        return False

    def _refused(self, batch: pa.RecordBatch, why: str) -> None:
        log.error("buffer refused a batch of %d rows (dropped): %s", batch.num_rows, why)
        self.stats.batches_refused += 1
        self.stats.rows_refused += batch.num_rows
        self.stats.last_refusal = why
        self.stats.progress_at = time.monotonic()

    def _close_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
