"""Append-only Arrow IPC segment files: writing, fsync, recovery of a torn tail, quarantine.

A segment is a plain Arrow IPC *stream* file (``seg-000001.arrows``): one schema message, then
one encapsulated record-batch message per acknowledged insert, and the end-of-stream marker
once the segment is closed. It opens with ``pyarrow.ipc.open_stream`` and with DuckDB's
Arrow reader. A segment is never reopened for writing: after a restart the store starts a
new one, so a torn tail only ever sits at the end of a file that nobody appends to.

A complete message that is not a valid batch (crafted offsets, a row that breaks the
contract) is skipped by the scan; :func:`quarantine_messages` moves its bytes to
``quarantine/`` and rewrites the segment without it, so one bad batch never stops a restart.
"""

from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

SEGMENT_GLOB = "seg-*.arrows"
QUARANTINE_DIR = "quarantine"
END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"
_SEGMENT_RE = re.compile(r"seg-(\d+)\.arrows$")


def segment_path(directory: Path, seg_id: int) -> Path:
    return directory / f"seg-{seg_id:06d}.arrows"


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    """``(segment id, path)`` of every segment in ``directory``, oldest first."""
    found = []
    for path in directory.glob(SEGMENT_GLOB):
        match = _SEGMENT_RE.search(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


class SegmentWriter:
    """Appends record batches to one new segment file and fsyncs on request."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.size = 0
        self._write(schema.serialize())
        self.fsync()
        _fsync_dir(path.parent)  # the new file's name must survive a crash too

    def append(self, batch: pa.RecordBatch) -> tuple[int, int]:
        """Write one batch; returns ``(byte offset, byte length)`` of its message."""
        offset = self.size
        self._write(batch.serialize())
        return offset, self.size - offset

    def fsync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        """Write the end-of-stream marker so the file is a complete IPC stream."""
        if self._fd < 0:
            return
        self._write(END_OF_STREAM)
        self.fsync()
        os.close(self._fd)
        self._fd = -1

    def _write(self, data) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
            self.size += written


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class BadMessage:
    """A complete message of a segment that does not hold a valid batch."""

    start: int
    end: int
    error: str


@dataclass
class SegmentScan:
    """What a segment file holds: its complete batches and whether its tail was torn."""

    path: Path
    batches: list[pa.RecordBatch] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)  # (start, end) of each batch
    bad: list[BadMessage] = field(default_factory=list)  # complete messages that are no batch
    schema_bytes: int = 0
    good_bytes: int = 0
    file_bytes: int = 0
    error: str | None = None
    mapping: mmap.mmap | None = None  # what the batches point into; see release_pages()

    @property
    def torn_bytes(self) -> int:
        return self.file_bytes - self.good_bytes


def scan_segment(path: Path, schema: pa.Schema) -> SegmentScan:
    """Read every complete batch of a segment through a memory map (zero-copy: the batches'
    buffers point into ``scan.mapping``, which stays open as long as they are referenced).

    A batch that is cut short or garbled ends the scan; ``good_bytes`` is the offset just
    after the last complete message, so truncating to it leaves a valid stream.
    """
    scan = SegmentScan(path=path, file_bytes=path.stat().st_size)
    if scan.file_bytes == 0:
        scan.error = "empty file"
        return scan
    with open(path, "rb") as handle:
        scan.mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    source = pa.BufferReader(pa.py_buffer(scan.mapping))
    reader = pa.ipc.MessageReader.open_stream(source)
    try:
        file_schema = pa.ipc.read_schema(reader.read_next_message())
        if not file_schema.equals(schema):
            scan.error = "schema differs from the trajectory schema"
            return scan
        scan.good_bytes = scan.schema_bytes = source.tell()
        _read_batches(reader, source, schema, scan)
    except (pa.ArrowInvalid, OSError, StopIteration) as err:
        scan.error = scan.error or f"{type(err).__name__}: {err}"
    release_pages(scan.mapping)  # the scan touched every page; rows are read back on demand
    return scan


def release_pages(mapping: mmap.mmap | None) -> None:
    """Drop a segment's pages from this process's resident set.

    The mapping is read-only and file-backed, so nothing is lost: a later read faults the
    page back in from the page cache. This keeps resident memory independent of how much
    of the buffer has been scanned or sampled.
    """
    if mapping is not None and not mapping.closed:
        mapping.madvise(mmap.MADV_DONTNEED)


def _read_batches(reader, source, schema: pa.Schema, scan: SegmentScan) -> None:
    while True:
        try:
            message = reader.read_next_message()
        except StopIteration:
            scan.good_bytes = source.tell()  # end-of-stream marker, or a clean end of file
            return
        start, end = scan.good_bytes, source.tell()
        scan.good_bytes = end
        try:
            batch = pa.ipc.read_record_batch(message, schema)
            batch.validate(full=True)  # offsets and UTF-8: nothing downstream re-checks them
        except (pa.ArrowInvalid, pa.ArrowException) as err:
            scan.bad.append(BadMessage(start, end, f"{type(err).__name__}: {err}"))
            continue
        scan.batches.append(batch)
        scan.spans.append((start, end))


def truncate_segment(path: Path, good_bytes: int) -> None:
    """Cut a torn tail off and fsync, so the file ends after its last complete batch."""
    with open(path, "r+b") as handle:
        handle.truncate(good_bytes)
        handle.flush()
        os.fsync(handle.fileno())


def quarantine_messages(scan: SegmentScan) -> list[Path]:
    """Move ``scan.bad`` out of the segment: each message's bytes go to
    ``quarantine/<segment>@<offset>.msg``, then the segment is rewritten (atomically, fsynced)
    with its schema, its good batches and an end-of-stream marker. Returns the files written.
    """
    data = memoryview(scan.mapping)
    folder = scan.path.parent / QUARANTINE_DIR
    folder.mkdir(exist_ok=True)
    written = []
    for bad in scan.bad:
        target = folder / f"{scan.path.name}@{bad.start}.msg"
        _write_durably(target, [data[bad.start : bad.end]])
        written.append(target)
    kept = [data[: scan.schema_bytes]] + [data[s:e] for s, e in scan.spans] + [END_OF_STREAM]
    tmp = scan.path.with_name(scan.path.name + ".rewrite")
    _write_durably(tmp, kept)
    os.replace(tmp, scan.path)
    _fsync_dir(scan.path.parent)
    return written


def _write_durably(path: Path, parts: list) -> None:
    with open(path, "wb") as handle:
        for part in parts:
            handle.write(part)
        handle.flush()
        os.fsync(handle.fileno())
