"""The weight wire format (DESIGN.md §3.2): message kinds, the header, chunk checksums.

Every message is a list of ZeroMQ frames ``[kind, body]`` where ``kind`` is one byte and
``body`` is msgpack of plain types (ints, strings, lists, maps). A CHUNK has a third
frame: the raw bytes of one chunk, sent zero-copy from the publisher's send buffer.
Nothing on this wire is pickled: a pickle from the network is remote code execution.

One publish of version v to one subscriber (a *transfer*):

    subscriber → HELLO  {proto, have, base_pub, base, layout}      (also the heartbeat)
    publisher  → HEADER {proto, pub, xfer, version, tensors, total_bytes, chunk_bytes,
                         hash, checksums, send, base, layout}
    subscriber → CREDIT {xfer, n}                                  (n more chunks allowed)
    publisher  → CHUNK  {xfer, i} + raw bytes of chunk i           (only against credit)
    subscriber → DONE   {xfer, version, ok, shm}
    publisher  → IDLE   {latest}   (HELLO answered when nothing newer exists)
    publisher  → ABORT  {xfer}     (a CREDIT for a transfer the publisher no longer has)

The payload of version v is one contiguous byte range of ``total_bytes``: tensor k
occupies ``[offset_k, offset_k + nbytes_k)`` (offsets aligned to ``ALIGN``), and chunk i
is ``[i * chunk_bytes, min((i + 1) * chunk_bytes, total_bytes))``. ``checksums[i]`` is
``xxh3_64(chunk i, seed=i)`` for every chunk of the full payload, so a chunk checked at
the wrong index fails. ``send`` lists the chunks this transfer carries (None = all of
them); a delta (``base`` ≥ 0) carries only chunks that changed since version ``base``
of the same publisher ``pub`` and the subscriber already holds the others.

Same-host path (``shm.py``): when the publisher's send buffer is a file in /dev/shm, the
HEADER's ``shm`` names the publisher's host (boot id + /dev/shm mount). A subscriber on
that host maps the file ``shm.version_name(pub, version)`` instead of asking for chunks
(no CREDIT), verifies every checksum on the mapping, and answers DONE with ``shm: true``;
one that cannot map it grants credit and the transfer streams as usual.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import msgpack
import torch
import xxhash

PROTO = 1
HASH_NAME = "xxh3_64"

HELLO = b"H"
CREDIT = b"C"
DONE = b"D"
HEADER = b"A"
CHUNK = b"K"
IDLE = b"I"
ABORT = b"X"
KINDS = frozenset({HELLO, CREDIT, DONE, HEADER, CHUNK, IDLE, ABORT})

# Tensor offsets are aligned so every dtype view of the byte buffer is legal and
# each tensor starts on its own cache line.
ALIGN = 64
MIN_CHUNK_BYTES = 4096
MAX_CHUNK_BYTES = 1 << 30
# A header from the network is refused above these sizes before it is trusted further.
MAX_BODY_BYTES = 64 << 20
MAX_TOTAL_BYTES = 1 << 40
# Most chunks one subscriber may have in flight (matches WeightsConfig.credit_chunks' bound).
MAX_CREDITS = 1024
U64 = 1 << 64
MAX_HOST_CHARS = 256
# Threads that copy and checksum chunks in parallel (memcpy and xxhash release the GIL);
# more than this only contends for memory bandwidth.
MAX_CHUNK_THREADS = 4

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class WireError(ValueError):
    """A message that does not follow this format; it is dropped, never loaded."""


@dataclass(frozen=True)
class TensorSpec:
    """Where one named tensor lives in the payload.

    ``dtype`` is the dtype on the wire (what the subscriber delivers); ``source_dtype``
    is the publisher's dtype before an optional ``wire_dtype`` cast.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    source_dtype: str


@dataclass(frozen=True)
class Header:
    """The announcement of one transfer (see the module docstring for the fields)."""

    pub: int
    xfer: int
    version: int
    tensors: tuple[TensorSpec, ...]
    total_bytes: int
    chunk_bytes: int
    checksums: tuple[int, ...]
    send: tuple[int, ...] | None
    base: int
    layout: str
    shm_host: str | None = None  # the payload is also readable from /dev/shm on this host

    @property
    def n_chunks(self) -> int:
        return len(self.checksums)

    def chunk_span(self, index: int) -> tuple[int, int]:
        """Byte range ``[start, stop)`` of chunk ``index`` in the payload."""
        return chunk_span(index, self.chunk_bytes, self.total_bytes)

    def chunks_sent(self) -> tuple[int, ...]:
        return tuple(range(self.n_chunks)) if self.send is None else self.send


# --------------------------------------------------------------------------- layout


def _aligned(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


def wire_dtype_of(dtype: torch.dtype, wire_dtype: str) -> torch.dtype:
    """fp32 tensors travel as ``wire_dtype`` ('same' keeps them); other dtypes are unchanged."""
    if wire_dtype == "same" or dtype != torch.float32:
        return dtype
    return DTYPES[wire_dtype]


def plan_layout(
    named_tensors: Sequence[tuple[str, torch.Tensor]], wire_dtype: str = "same"
) -> tuple[tuple[TensorSpec, ...], int]:
    """The tensor table and total payload bytes for ``named_tensors`` in the given order."""
    specs, offset, seen = [], 0, set()
    for name, tensor in named_tensors:
        if name in seen:
            raise ValueError(f"tensor name {name!r} appears twice in one publish")
        seen.add(name)
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} is not sendable")
        dtype = wire_dtype_of(tensor.dtype, wire_dtype)
        nbytes = tensor.numel() * dtype.itemsize
        offset = _aligned(offset)
        specs.append(
            TensorSpec(
                name, DTYPE_NAMES[dtype], tuple(tensor.shape), offset, nbytes,
                DTYPE_NAMES[tensor.dtype],
            )
        )
        offset += nbytes
    return tuple(specs), offset


def layout_id(specs: Sequence[TensorSpec]) -> str:
    """A fingerprint of the table: equal ids mean equal names, dtypes, shapes and offsets."""
    digest = xxhash.xxh3_128()
    for spec in specs:
        digest.update(f"{spec.name}\0{spec.dtype}\0{spec.shape}\0{spec.offset}\n".encode())
    return digest.hexdigest()


def chunk_span(index: int, chunk_bytes: int, total_bytes: int) -> tuple[int, int]:
    start = index * chunk_bytes
    return start, min(start + chunk_bytes, total_bytes)


def n_chunks(total_bytes: int, chunk_bytes: int) -> int:
    return math.ceil(total_bytes / chunk_bytes)


def chunk_checksum(data: memoryview | bytes, index: int) -> int:
    """The checksum of chunk ``index``; seeding with the index catches misplaced chunks."""
    return xxhash.xxh3_64_intdigest(data, seed=index)


def first_bad_chunk(
    view: memoryview, checksums: Sequence[int], chunk_bytes: int, workers: ChunkWorkers | None = None
) -> int | None:
    """The lowest chunk index of ``view`` whose checksum differs from ``checksums``, or None."""
    bad: list[int] = []

    def check(index: int) -> None:
        start, stop = chunk_span(index, chunk_bytes, len(view))
        if chunk_checksum(view[start:stop], index) != checksums[index]:
            bad.append(index)

    (workers or ChunkWorkers(1)).run(len(checksums), check)
    return min(bad) if bad else None


class ChunkWorkers:
    """A few threads that process chunk indices in parallel; ``run`` returns when all are done."""

    def __init__(self, threads: int) -> None:
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(self.threads, "weight-chunks") if self.threads > 1 else None

    def run(self, n_chunks: int, work: Callable[[int], None]) -> None:
        if self._pool is None or n_chunks < 2:
            for index in range(n_chunks):
                work(index)
            return
        next_index = itertools.count().__next__  # atomic under the GIL

        def drain() -> None:
            while (index := next_index()) < n_chunks:
                work(index)

        for future in [self._pool.submit(drain) for _ in range(self.threads)]:
            future.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def tensor_views(arena: torch.Tensor, specs: Sequence[TensorSpec]) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) views of a uint8 payload buffer ``arena: [total_bytes]``, in table order."""
    views = []
    for spec in specs:
        raw = arena[spec.offset : spec.offset + spec.nbytes]
        views.append((spec.name, raw.view(DTYPES[spec.dtype]).view(spec.shape)))
    return views


# --------------------------------------------------------------------------- messages


def pack(kind: bytes, body: dict[str, Any]) -> list[bytes]:
    return [kind, msgpack.packb(body, use_bin_type=True)]


def unpack(frame: bytes | memoryview) -> dict[str, Any]:
    """A message body as a dict; anything else is a :class:`WireError`."""
    if len(frame) > MAX_BODY_BYTES:
        raise WireError(f"message body of {len(frame)} bytes exceeds {MAX_BODY_BYTES}")
    try:
        body = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise WireError(f"undecodable message body: {exc}") from exc
    if not isinstance(body, dict):
        raise WireError("message body is not a map")
    return body


def header_body(header: Header) -> dict[str, Any]:
    return {
        "proto": PROTO,
        "pub": header.pub,
        "xfer": header.xfer,
        "version": header.version,
        "tensors": [
            [s.name, s.dtype, list(s.shape), s.offset, s.nbytes, s.source_dtype]
            for s in header.tensors
        ],
        "total_bytes": header.total_bytes,
        "chunk_bytes": header.chunk_bytes,
        "hash": HASH_NAME,
        "checksums": list(header.checksums),
        "send": None if header.send is None else list(header.send),
        "base": header.base,
        "layout": header.layout,
        "shm": header.shm_host,
    }


def _int(body: dict[str, Any], key: str, low: int, high: int) -> int:
    value = body.get(key)
    if type(value) is not int or not low <= value < high:
        raise WireError(f"header field {key}={value!r}: expected an int in [{low}, {high})")
    return value


def _spec(row: Any, total_bytes: int, min_offset: int) -> TensorSpec:
    if not (isinstance(row, list) and len(row) == 6):
        raise WireError(f"tensor table row {row!r}: expected 6 fields")
    name, dtype, shape, offset, nbytes, source_dtype = row
    if not isinstance(name, str) or not name:
        raise WireError(f"tensor name {name!r}: expected a non-empty string")
    if dtype not in DTYPES or source_dtype not in DTYPES:
        raise WireError(f"tensor {name}: unknown dtype {dtype!r}/{source_dtype!r}")
    if not isinstance(shape, list) or any(type(d) is not int or d < 0 for d in shape):
        raise WireError(f"tensor {name}: bad shape {shape!r}")
    if type(offset) is not int or type(nbytes) is not int:
        raise WireError(f"tensor {name}: offset and nbytes must be ints")
    itemsize = DTYPES[dtype].itemsize
    if nbytes != math.prod(shape) * itemsize or offset % ALIGN or offset < min_offset:
        raise WireError(f"tensor {name}: nbytes/offset do not match shape, alignment or order")
    if offset + nbytes > total_bytes:
        raise WireError(f"tensor {name}: ends past total_bytes={total_bytes}")
    return TensorSpec(name, dtype, tuple(shape), offset, nbytes, source_dtype)


def header_from_body(body: dict[str, Any]) -> Header:
    """Validate a HEADER body from the network; every inconsistency is a :class:`WireError`."""
    if body.get("proto") != PROTO or body.get("hash") != HASH_NAME:
        raise WireError(f"protocol {body.get('proto')!r}/{body.get('hash')!r} is not {PROTO}/{HASH_NAME}")
    total = _int(body, "total_bytes", 0, MAX_TOTAL_BYTES + 1)
    chunk = _int(body, "chunk_bytes", MIN_CHUNK_BYTES, MAX_CHUNK_BYTES + 1)
    rows = body.get("tensors")
    if not isinstance(rows, list):
        raise WireError("header field tensors: expected a list")
    specs, end = [], 0
    for row in rows:
        spec = _spec(row, total, end)
        specs.append(spec)
        end = spec.offset + spec.nbytes
    if len({s.name for s in specs}) != len(specs):
        raise WireError("tensor table repeats a name")
    checksums = body.get("checksums")
    if not isinstance(checksums, list) or len(checksums) != n_chunks(total, chunk):
        raise WireError(f"checksums: expected {n_chunks(total, chunk)} of them")
    if any(type(c) is not int or not 0 <= c < U64 for c in checksums):
        raise WireError("checksums: expected unsigned 64-bit ints")
    base = _int(body, "base", -1, 1 << 62)
    send = body.get("send")
    if send is not None:
        if base < 0 or not isinstance(send, list) or any(type(i) is not int for i in send):
            raise WireError("send: a list of chunk indices, only in a delta")
        if send != sorted(set(send)) or (send and (send[0] < 0 or send[-1] >= len(checksums))):
            raise WireError("send: chunk indices must be sorted, distinct and in range")
    elif base >= 0:
        raise WireError("a delta (base >= 0) must list the chunks it sends")
    layout = body.get("layout")
    if not isinstance(layout, str) or layout != layout_id(specs):
        raise WireError("layout id does not match the tensor table")
    shm_host = body.get("shm")
    if shm_host is not None and not (isinstance(shm_host, str) and 0 < len(shm_host) <= MAX_HOST_CHARS):
        raise WireError(f"shm: expected a host id of at most {MAX_HOST_CHARS} characters or nil")
    return Header(
        pub=_int(body, "pub", 0, U64), xfer=_int(body, "xfer", 0, U64),
        version=_int(body, "version", 0, 1 << 62), tensors=tuple(specs), total_bytes=total,
        chunk_bytes=chunk, checksums=tuple(checksums),
        send=None if send is None else tuple(send), base=base, layout=layout, shm_host=shm_host,
    )
