"""Append-only Arrow IPC segment files: writing, fsync, and recovery of a torn tail.

A segment is a plain Arrow IPC *stream* file (``seg-000001.arrows``): one schema message, then
one encapsulated record-batch message per acknowledged insert, and the end-of-stream marker
once the segment is closed. It opens with ``pyarrow.ipc.open_stream`` and with DuckDB's
Arrow reader. A segment is never reopened for writing: after a restart the store starts a
new one, so a torn tail only ever sits at the end of a file that nobody appends to.
"""

from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

SEGMENT_GLOB = "seg-*.arrows"
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
        self._write(b"\xff\xff\xff\xff\x00\x00\x00\x00")
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
class SegmentScan:
    """What a segment file holds: its complete batches and whether its tail was torn."""

    path: Path
    batches: list[pa.RecordBatch] = field(default_factory=list)
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
        scan.good_bytes = source.tell()
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
        batch = pa.ipc.read_record_batch(message, schema)
        batch.validate(full=False)
        scan.batches.append(batch)
        scan.good_bytes = source.tell()


def truncate_segment(path: Path, good_bytes: int) -> None:
    """Cut a torn tail off and fsync, so the file ends after its last complete batch."""
    with open(path, "r+b") as handle:
        handle.truncate(good_bytes)
        handle.flush()
        os.fsync(handle.fileno())
