"""The publisher's send buffers: a snapshot of the weights the learner may overwrite next.

``publish`` copies the tensors into one contiguous uint8 buffer (pinned host memory when
they live on a GPU) and returns; the publisher thread streams zero-copy views of it.
Buffers are recycled because first-touch page faults cost several times a memcpy: a
buffer returns to the pool only when no transfer references it and ZeroMQ has released
every zero-copy frame sent from it (its MessageTrackers are done), so a frame still
queued in a socket never sees its bytes change.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import zmq

from async_rl.weights.wire import DTYPES, TensorSpec, chunk_checksum, chunk_span, n_chunks

# Spare buffers kept for reuse; more would only hold memory the learner may need.
MAX_SPARE_BUFFERS = 2


@dataclass
class Snapshot:
    """One published version: its table, its bytes, and the checksums of its chunks."""

    version: int
    specs: tuple[TensorSpec, ...]
    layout: str
    total_bytes: int
    chunk_bytes: int
    buffer: torch.Tensor  # uint8 [>= total_bytes]
    checksums: list[int] = field(default_factory=list)
    refs: int = 0  # transfers streaming from this snapshot (publisher thread only)
    trackers: list[zmq.MessageTracker] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.view = memoryview(self.buffer.numpy())[: self.total_bytes]

    @property
    def n_chunks(self) -> int:
        return n_chunks(self.total_bytes, self.chunk_bytes)

    @property
    def hashed(self) -> bool:
        return len(self.checksums) == self.n_chunks

    def hash_some(self, max_chunks: int) -> None:
        """Checksum up to ``max_chunks`` more chunks (xxhash releases the GIL)."""
        stop = min(self.n_chunks, len(self.checksums) + max_chunks)
        for index in range(len(self.checksums), stop):
            start, end = chunk_span(index, self.chunk_bytes, self.total_bytes)
            self.checksums.append(chunk_checksum(self.view[start:end], index))

    def chunk(self, index: int) -> memoryview:
        start, end = chunk_span(index, self.chunk_bytes, self.total_bytes)
        return self.view[start:end]


def copy_into(buffer: torch.Tensor, specs: Sequence[TensorSpec], tensors: Sequence[torch.Tensor]) -> None:
    """Copy (and cast to the wire dtype) each tensor into its slot of ``buffer``."""
    on_gpu = False
    for spec, tensor in zip(specs, tensors, strict=True):
        slot = buffer[spec.offset : spec.offset + spec.nbytes].view(DTYPES[spec.dtype])
        source = tensor.detach()
        on_gpu |= source.is_cuda
        slot.view(spec.shape).copy_(source, non_blocking=source.is_cuda)
    if on_gpu:
        torch.cuda.synchronize()


class BufferPool:
    """Thread-safe pool of uint8 send buffers, reused once ZeroMQ has let go of them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._draining: list[tuple[torch.Tensor, list[zmq.MessageTracker]]] = []

    def acquire(self, nbytes: int, pinned: bool) -> torch.Tensor:
        """A buffer of at least ``nbytes`` (a recycled one when a released one fits)."""
        with self._lock:
            for i, (buffer, trackers) in enumerate(self._draining):
                if buffer.numel() >= nbytes and buffer.is_pinned() == pinned and _released(trackers):
                    del self._draining[i]
                    return buffer
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pinned)

    def release(self, snapshot: Snapshot) -> None:
        """Hand a snapshot's buffer back; it is reused after its frames are sent."""
        with self._lock:
            self._draining.append((snapshot.buffer, snapshot.trackers))
            done = [entry for entry in self._draining if _released(entry[1])]
            busy = [entry for entry in self._draining if not _released(entry[1])]
            self._draining = busy + done[-MAX_SPARE_BUFFERS:]


def _released(trackers: list[zmq.MessageTracker]) -> bool:
    return all(tracker.done for tracker in trackers)
