"""The publisher's send buffers: a snapshot of the weights the learner may overwrite next.

``publish`` copies the tensors into one contiguous uint8 buffer and checksums its chunks
(``copy_and_hash``), then returns; the publisher thread streams zero-copy views of it. The
buffer is a file in /dev/shm when same-host subscribers may map it (``shm.py``), else
host memory (pinned when the tensors live on a GPU).

Buffers are recycled because first-touch page faults cost several times a memcpy: a
buffer returns to the pool only when no transfer references it and ZeroMQ has released
every zero-copy frame sent from it (its MessageTrackers are done), so a frame still
queued in a socket never sees its bytes change; a /dev/shm file is reused only when no
subscriber holds its read lock either.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import xxhash
import zmq

from async_rl.weights.shm import CLAIM_POLL_S, CLAIM_WAIT_S, ShmFile, ShmStore
from async_rl.weights.wire import DTYPES, ChunkWorkers, TensorSpec, chunk_span, n_chunks

# Spare buffers kept for reuse; more would only hold memory the learner may need.
MAX_SPARE_BUFFERS = 2
# Bytes copied and then hashed while still in the core's cache: hashing them again from
# memory would cost about as much as the copy.
PIECE_BYTES = 256 << 10


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
    shm: ShmFile | None = None  # the /dev/shm file ``buffer`` maps, if any
    refs: int = 0  # transfers streaming from this snapshot (publisher thread only)
    trackers: list[zmq.MessageTracker] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.view = memoryview(self.buffer.numpy())[: self.total_bytes]

    @property
    def n_chunks(self) -> int:
        return n_chunks(self.total_bytes, self.chunk_bytes)

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


def copy_and_hash(
    snapshot: Snapshot, tensors: Sequence[torch.Tensor], workers: ChunkWorkers | None = None
) -> None:
    """Fill ``snapshot.buffer`` from ``tensors`` and set the checksum of every chunk.

    Tensors that are plain host bytes (CPU, contiguous, no dtype cast) are copied by the
    chunk workers piece by piece, each piece hashed while still in cache; the others (GPU
    tensors, casts, strided views) are copied by torch first and hashed from memory.
    """
    plain, other = [], []
    for spec, tensor in zip(snapshot.specs, tensors, strict=True):
        if spec.nbytes == 0:
            continue
        if tensor.device.type == "cpu" and tensor.is_contiguous() and spec.dtype == spec.source_dtype:
            plain.append((spec.offset, tensor.detach().reshape(-1).view(torch.uint8).numpy()))
        else:
            other.append((spec, tensor))
    copy_into(snapshot.buffer, [s for s, _ in other], [t for _, t in other])
    dest = snapshot.buffer.numpy()
    starts = [offset for offset, _ in plain]
    checksums = [0] * snapshot.n_chunks

    def one_chunk(index: int) -> None:
        start, stop = chunk_span(index, snapshot.chunk_bytes, snapshot.total_bytes)
        digest = xxhash.xxh3_64(seed=index)  # streaming equals wire.chunk_checksum of the chunk
        for low in range(start, stop, PIECE_BYTES):
            high = min(low + PIECE_BYTES, stop)
            _copy_range(dest, plain, starts, low, high)
            digest.update(snapshot.view[low:high])
        checksums[index] = digest.intdigest()

    (workers or ChunkWorkers(1)).run(snapshot.n_chunks, one_chunk)
    snapshot.checksums = checksums


def _copy_range(dest: np.ndarray, plain: list, starts: list[int], low: int, high: int) -> None:
    """Copy the parts of ``plain`` sources that fall in ``[low, high)`` of the payload."""
    k = max(bisect.bisect_right(starts, low) - 1, 0)
    while k < len(plain) and plain[k][0] < high:
        offset, source = plain[k]
        a, b = max(low, offset), min(high, offset + source.size)
        if a < b:
            np.copyto(dest[a:b], source[a - offset : b - offset])
        k += 1


@dataclass
class _Spare:
    buffer: torch.Tensor
    trackers: list[zmq.MessageTracker]
    shm: ShmFile | None


class BufferPool:
    """Thread-safe pool of send buffers, reused once ZeroMQ (and every reader) let go of them."""

    def __init__(self, shm: ShmStore | None = None) -> None:
        self._lock = threading.Lock()
        self._shm = shm
        self._draining: list[_Spare] = []

    def acquire(self, nbytes: int, pinned: bool, version: int) -> tuple[torch.Tensor, ShmFile | None]:
        """A buffer of at least ``nbytes`` for ``version``: a /dev/shm file when the pool has a
        store with room (write-locked until ``ShmFile.publish``), else host memory."""
        if self._shm is not None:
            file = self._claim_file(nbytes, version)
            if file is not None:
                return file.buffer, file
        with self._lock:
            for i, spare in enumerate(self._draining):
                if (spare.shm is None and spare.buffer.numel() >= nbytes
                        and spare.buffer.is_pinned() == pinned and _released(spare.trackers)):
                    del self._draining[i]
                    return spare.buffer, None
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pinned), None

    def _claim_file(self, nbytes: int, version: int) -> ShmFile | None:
        deadline = time.monotonic() + CLAIM_WAIT_S
        while True:
            with self._lock:
                candidates = [s for s in self._draining if s.shm is not None and s.shm.named
                              and s.shm.nbytes >= nbytes and _released(s.trackers)]
                for spare in candidates:
                    if self._shm.claim(spare.shm, version):
                        self._draining.remove(spare)
                        return spare.shm
                if not candidates or time.monotonic() >= deadline:
                    return self._shm.create(version, nbytes)
            time.sleep(CLAIM_POLL_S)  # a reader that just finished is about to drop its lock

    def release(self, snapshot: Snapshot) -> None:
        """Hand a snapshot's buffer back; it is reused after its frames are sent."""
        with self._lock:
            if snapshot.shm is not None:
                self._shm.retire(snapshot.shm)
            self._draining.append(_Spare(snapshot.buffer, snapshot.trackers, snapshot.shm))
            done = [s for s in self._draining if _released(s.trackers)]
            busy = [s for s in self._draining if not _released(s.trackers)]
            for spare in done:  # an unnamed file can never be offered again
                if spare.shm is not None and not spare.shm.named:
                    self._shm.discard(spare.shm)
            done = [s for s in done if s.shm is None or s.shm.named]
            files = [s for s in done if s.shm is not None]
            memory = [s for s in done if s.shm is None]
            self._draining = busy + files + memory[-MAX_SPARE_BUFFERS:]

    def retire(self, snapshot: Snapshot) -> None:
        """``snapshot`` is superseded: its /dev/shm file stops being readable by version name."""
        if snapshot.shm is not None:
            with self._lock:
                self._shm.retire(snapshot.shm)

    def close(self) -> None:
        with self._lock:
            for spare in self._draining:
                if spare.shm is not None:
                    spare.shm.close()
            self._draining.clear()
            if self._shm is not None:
                self._shm.close()


def _released(trackers: list[zmq.MessageTracker]) -> bool:
    return all(tracker.done for tracker in trackers)
