"""The buffer's wire format: a msgpack header frame, then raw Arrow IPC bytes. No pickle.

Request:  ``[header, payload?]`` with header ``{"verb": str, "id": int, ...arguments}``.
Reply:    ``[header, payload?]`` with header ``{"id": int, "ok": bool, "error"?: str, ...}``.
A payload is one Arrow IPC *stream* (schema + batches), the same bytes a segment holds. The
client's insert sends one batch whose message carries the xxh3-64 of its body
(:func:`buffer.segments.encode_stream`); the service verifies it and appends those bytes.
A sample asked with ``"lease": true`` is answered with its ``"lease"`` id beside the payload;
``commit`` and ``resume_learner`` carry lease ids as a list of integers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import msgpack
import pyarrow as pa

VERBS = ("insert", "sample", "stats", "set_learner_version", "head", "ping", "durable_groups", "commit",
         "resume_learner")
MAX_LEASE_IDS = 1 << 16  # lease ids per commit / resume_learner request (a checkpoint's worth)


@dataclass(frozen=True)
class Lease:
    """Groups served to the learner whose use is final only once ``id`` is committed."""

    id: int
    table: pa.Table


def pack_header(header: dict) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def unpack_header(frame) -> dict:
    """Decode a header frame; raises ValueError for anything that is not a msgpack map."""
    try:
        header = msgpack.unpackb(bytes(frame), raw=False, strict_map_key=True)
    except Exception as err:  # msgpack raises several unrelated types on garbage
        raise ValueError(f"header is not msgpack: {type(err).__name__}") from None
    if not isinstance(header, dict):
        raise ValueError("header must be a msgpack map")
    return header


def int_arg(header: dict, name: str, default: int, *, lo: int, hi: int) -> int:
    """The integer argument ``name`` of a request, or ValueError naming it and its bounds."""
    value = header.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name}={value!r}: must be an integer in [{lo}, {hi}]")
    return value


def float_arg(header: dict, name: str, default: float, *, lo: float, hi: float) -> float:
    """The finite number argument ``name`` of a request, or ValueError naming its bounds."""
    value = header.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
        math.isfinite(value) and lo <= value <= hi
    ):
        raise ValueError(f"{name}={value!r}: must be a finite number in [{lo}, {hi}]")
    return float(value)


def lease_ids_arg(header: dict, name: str) -> list[int]:
    """The list of lease ids argument ``name`` of a request, or ValueError naming its bounds."""
    ids = header.get(name)
    if not isinstance(ids, list) or len(ids) > MAX_LEASE_IDS or not all(
        type(i) is int and 0 < i < 1 << 63 for i in ids
    ):
        raise ValueError(f"{name}: expected a list of at most {MAX_LEASE_IDS} positive integer lease ids")
    return ids


def table_to_ipc(data: pa.Table | pa.RecordBatch) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, data.schema) as writer:
        writer.write(data)
    return sink.getvalue()


def ipc_to_table(payload) -> pa.Table:
    """Decode an Arrow IPC stream; raises ValueError on malformed bytes."""
    try:
        return pa.ipc.open_stream(pa.py_buffer(payload)).read_all()
    except (pa.ArrowException, OSError) as err:  # garbled framing raises several kinds
        raise ValueError(f"payload is not an Arrow IPC stream: {err}") from None
