"""Append-only Arrow IPC segment files: writing, fsync, checksums, recovery, quarantine.

A segment is a plain Arrow IPC *stream* file (``seg-000001.arrows``): one schema message, then
one encapsulated record-batch message per acknowledged insert, and the end-of-stream marker
once the segment is closed. It opens with ``pyarrow.ipc.open_stream`` and with DuckDB's
Arrow reader. A segment is never reopened for writing: after a restart the store starts a
new one, so a torn tail only ever sits at the end of a file that nobody appends to.

Every batch message carries the xxh3-64 of its body in its custom metadata
(``xxh3_64: "xxh3:<16 hex>"``), and the schema message says so (``CHECKSUM_FLAG``); a scan
verifies it, so a flipped bit is a bad batch rather than a wrong reward. Segments written
before checksums existed have no flag and are read without the check. A batch is serialized
once: clients send the same checksummed message (:func:`encode_stream`), and the service
appends the bytes it received once the checksum verifies (:func:`decode_checksummed`).

A failed append (a short write, then ENOSPC) is cut back to the last good offset and fsynced
before the error is raised, so nothing appended later sits behind garbage.

A complete message that is not a valid batch (crafted offsets, a row that breaks the
contract, a checksum mismatch) is skipped by the scan; an unreadable message header in a
checksummed segment is skipped up to the next message whose checksum verifies.
:func:`quarantine_messages` moves such bytes to ``quarantine/`` and rewrites the segment
without them, so one bad batch never stops a restart. A segment whose schema is unreadable
or not the trajectory schema is not a torn tail: it is moved whole to ``quarantine/``.
"""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import xxhash

SEGMENT_GLOB = "seg-*.arrows"
QUARANTINE_DIR = "quarantine"
END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"
_SEGMENT_RE = re.compile(r"seg-(\d+)\.arrows$")
CHECKSUM_KEY = "xxh3_64"  # custom metadata of each batch message
CHECKSUM_FLAG = {b"async_rl.batch_checksum": b"xxh3_64"}  # schema metadata: batches carry one
_CHECKSUM_TAG = b"xxh3:"  # the value is this tag and 16 hex digits, patched in after hashing
_DIGITS = 16
_CONTINUATION = b"\xff\xff\xff\xff"  # starts every IPC message: where a resync may resume

# A schema segments were once written in, and how to bring its batches to the current one.
OlderSchema = tuple[pa.Schema, Callable[[pa.RecordBatch], pa.RecordBatch]]


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
    """Appends checksummed record batches to one new segment file and fsyncs on request.

    ``broken`` is set when a failed append could not be cut back: the file must not be
    appended to again (the store rolls to a new segment).
    """

    def __init__(self, path: Path, schema: pa.Schema, *, sync: bool = True) -> None:
        """``sync=False``: the caller has the header and the file's name in its directory
        fsynced before it acknowledges anything written here (a group commit's next round)."""
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.size = 0
        self.broken = False
        self._write(schema.with_metadata(CHECKSUM_FLAG).serialize())
        if sync:
            self.fsync()
            fsync_dir(path.parent)  # the new file's name must survive a crash too

    def append(self, batch: pa.RecordBatch | EncodedBatch) -> tuple[int, int]:
        """Write one batch (encoded here unless it comes encoded); returns ``(byte offset, byte
        length)`` of its message.

        On a write error the file is truncated back to where the batch started and fsynced
        before the error propagates, so the next append follows the last good batch.
        """
        encoded = batch if isinstance(batch, EncodedBatch) else encode_batch(batch)
        offset = self.size
        try:
            self._write(encoded.message)
        except OSError:
            self._cut_back(offset)
            raise
        return offset, self.size - offset

    def _cut_back(self, offset: int) -> None:
        try:
            os.ftruncate(self._fd, offset)
            os.lseek(self._fd, offset, os.SEEK_SET)
            os.fsync(self._fd)
            self.size = offset
        except OSError:
            self.broken = True

    def dup_fd(self) -> int:
        """A duplicate descriptor, for an fsync on another thread that may outlive this one."""
        return os.dup(self._fd)

    def fsync(self) -> None:
        os.fsync(self._fd)

    def abandon(self) -> None:
        """Fsync (the batches before the failed one may still wait for their ack), then close
        without the end-of-stream marker: recovery cuts the failed bytes off. An fsync error
        propagates: the caller must then acknowledge nothing more."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def close(self, *, sync: bool = True) -> None:
        """Write the end-of-stream marker so the file is a complete IPC stream; ``sync=False``:
        the caller fsyncs a duplicate descriptor (:meth:`dup_fd`) before acknowledging."""
        if self._fd < 0:
            return
        self._write(END_OF_STREAM)
        if sync:
            self.fsync()
        os.close(self._fd)
        self._fd = -1

    def _write(self, data) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
            self.size += written


@dataclass
class EncodedBatch:
    """One checksummed record-batch message as a segment holds it, and the batch it decodes to.

    ``message`` is contiguous: the IPC framing and flatbuffer header (whose custom metadata
    holds the body's xxh3-64), then the body; both lengths are multiples of 8, so appended
    after another message the body stays 8-byte aligned for a zero-copy memory map.
    """

    message: pa.Buffer
    batch: pa.RecordBatch


def encode_stream(batch: pa.RecordBatch) -> tuple[pa.Buffer, EncodedBatch]:
    """A one-batch Arrow IPC stream (schema, checksummed batch message, end-of-stream) and
    the message inside it, from a single serialization into one allocation: the digest is
    patched into a fixed-width placeholder in place, so the flatbuffer stays valid. The
    stream is what a client sends; the message is what a segment appends."""
    placeholder = {CHECKSUM_KEY: (_CHECKSUM_TAG + b"0" * _DIGITS).decode()}
    size = pa.MockOutputStream()  # sized first: one allocation, no regrowth copies
    with pa.ipc.new_stream(size, batch.schema) as writer:
        writer.write_batch(batch, custom_metadata=placeholder)
    stream = pa.allocate_buffer(size.size())
    with pa.ipc.new_stream(pa.FixedSizeBufferWriter(stream), batch.schema) as writer:
        writer.write_batch(batch, custom_metadata=placeholder)
    source = pa.BufferReader(stream)
    pa.ipc.read_message(source)  # the schema message
    start = source.tell()
    message = pa.ipc.read_message(source)
    end = source.tell()
    header = memoryview(stream).cast("B")[start : message.body.address - stream.address]
    at = bytes(header).index(_CHECKSUM_TAG) + len(_CHECKSUM_TAG)
    header[at : at + _DIGITS] = xxhash.xxh3_64_hexdigest(message.body).encode()
    return stream, EncodedBatch(stream.slice(start, end - start), batch)


def encode_batch(batch: pa.RecordBatch) -> EncodedBatch:
    """The checksummed message of ``batch`` (see :func:`encode_stream`)."""
    return encode_stream(batch)[1]


def decode_checksummed(payload, schema: pa.Schema) -> EncodedBatch | None:
    """The batch of a one-batch IPC stream in exactly ``schema`` whose message carries a
    checksum, with that message's bytes (zero-copy): they can be appended to a segment as
    they are. None for any other stream (several batches, another schema, no checksum,
    unaligned framing, anything unreadable): the caller decodes it in full and names what is
    wrong. Raises ValueError when the body does not match its checksum (damaged in transit).
    Only the stream reader parses untrusted bytes first: it verifies every flatbuffer."""
    whole = pa.py_buffer(payload)
    try:
        reader = pa.ipc.open_stream(whole)  # the stream reader verifies each flatbuffer
        if not reader.schema.equals(schema):
            return None
        batch = reader.read_next_batch()
        if _another_batch(reader):
            return None
        source = pa.BufferReader(whole)  # the same framing again, for where the batch lies
        pa.ipc.read_message(source)
        start = source.tell()
        message = pa.ipc.read_message(source)
        end = source.tell()
    except (pa.ArrowException, OSError, EOFError, StopIteration):
        return None  # the full decode names what is wrong
    if message.type != "record batch" or _CHECKSUM_TAG not in message.metadata.to_pybytes():
        return None
    body_at = message.body.address - whole.address
    if start % 8 or (body_at - start) % 8 or (end - body_at) % 8 or end - body_at != message.body.size:
        return None
    problem = _checksum_error(message)
    if problem:
        raise ValueError(f"payload: {problem} (damaged in transit)")
    return EncodedBatch(whole.slice(start, end - start), batch)


def _another_batch(reader) -> bool:
    try:
        reader.read_next_batch()
    except StopIteration:
        return False
    return True


def _checksum_error(message: pa.ipc.Message) -> str | None:
    """Why a message's body does not match its checksum, or None when it does."""
    metadata = message.metadata.to_pybytes()
    at = metadata.find(_CHECKSUM_TAG)
    if at < 0:
        return "checksum missing"
    stored = metadata[at + len(_CHECKSUM_TAG) : at + len(_CHECKSUM_TAG) + _DIGITS]
    if stored != xxhash.xxh3_64_hexdigest(message.body).encode():
        return "checksum mismatch: the batch's bytes changed after it was written"
    return None


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_dir(directory: Path) -> int:
    """A descriptor of ``directory``, for an fsync of the names in it made since (the caller
    fsyncs and closes it)."""
    return os.open(directory, os.O_RDONLY)


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
    unexpected: bool = False  # schema unreadable or not ours: quarantine whole, never truncate
    mapping: mmap.mmap | None = None  # what the batches point into; see release_pages()

    @property
    def torn_bytes(self) -> int:
        return self.file_bytes - self.good_bytes


def scan_segment(path: Path, schema: pa.Schema, older: Sequence[OlderSchema] = ()) -> SegmentScan:
    """Read every complete batch of a segment through a memory map (zero-copy: the batches'
    buffers point into ``scan.mapping``, which stays open as long as they are referenced).

    A segment written in one of the ``older`` schemas is read in it, and each batch is then
    brought to ``schema`` by that schema's conversion (only the added columns are new memory).

    A batch that is cut short or garbled with no verified batch after it ends the scan;
    ``good_bytes`` is the offset just after the last complete message, so truncating to it
    leaves a valid stream. A schema that cannot be read (past a torn creation) or is not
    ``schema`` marks the scan ``unexpected``: nothing in it is a torn tail.
    """
    scan = SegmentScan(path=path, file_bytes=path.stat().st_size)
    if scan.file_bytes == 0:
        scan.error = "empty file"
        return scan
    with open(path, "rb") as handle:
        scan.mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    source = pa.BufferReader(pa.py_buffer(scan.mapping))
    try:
        first = pa.ipc.read_message(source)
        if first.type != "schema":  # pyarrow's read_schema crashes on another message type
            raise pa.ArrowInvalid(f"the first message is no schema but {first.type!r}")
        file_schema = pa.ipc.read_schema(first)
    except (pa.ArrowInvalid, OSError) as err:
        scan.error = f"schema unreadable: {type(err).__name__}: {err}"
        # A crash while the file was created leaves at most a partial schema and no batch.
        scan.unexpected = scan.file_bytes > len(schema.with_metadata(CHECKSUM_FLAG).serialize())
        return scan
    written_in, convert = next(((old, fn) for old, fn in older if file_schema.equals(old)), (schema, None))
    if not file_schema.equals(written_in):
        scan.error = f"schema differs from the trajectory schema: {file_schema.names}"
        scan.unexpected = True
        return scan
    scan.good_bytes = scan.schema_bytes = source.tell()
    checksummed = (file_schema.metadata or {}).items() >= CHECKSUM_FLAG.items()
    _read_batches(source, written_in, scan, checksummed)
    if convert is not None:
        scan.batches = [convert(batch) for batch in scan.batches]
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


def _read_batches(source, schema: pa.Schema, scan: SegmentScan, checksummed: bool) -> None:
    reader = pa.ipc.MessageReader.open_stream(source)
    while True:
        start = scan.good_bytes
        try:
            message = reader.read_next_message()
        except StopIteration:
            scan.good_bytes = source.tell()  # end-of-stream marker, or a clean end of file
            return
        except (pa.ArrowInvalid, OSError) as err:
            resume = _next_verified_message(scan.mapping, start, schema) if checksummed else None
            if resume is None:  # a torn tail: good_bytes stays where the message began
                scan.error = f"{type(err).__name__}: {err}"
                return
            scan.bad.append(BadMessage(start, resume, f"unreadable message header: {err}"))
            scan.good_bytes = resume
            source.seek(resume)
            reader = pa.ipc.MessageReader.open_stream(source)
            continue
        end = source.tell()
        scan.good_bytes = end
        try:
            batch = pa.ipc.read_record_batch(message, schema)
            batch.validate(full=True)  # offsets and UTF-8: nothing downstream re-checks them
            problem = _checksum_error(message) if checksummed else None
        except (pa.ArrowInvalid, pa.ArrowException) as err:
            problem = f"{type(err).__name__}: {err}"
        if problem:
            scan.bad.append(BadMessage(start, end, problem))
            continue
        scan.batches.append(batch)
        scan.spans.append((start, end))


def _next_verified_message(data: mmap.mmap, after: int, schema: pa.Schema) -> int | None:
    """Offset of the first message past ``after`` that is a record batch whose checksum
    verifies (framing found again after a garbled header), or None."""
    whole = pa.py_buffer(data)
    at = data.find(_CONTINUATION, after + 1)
    while at >= 0:
        try:
            message = pa.ipc.read_message(pa.BufferReader(whole.slice(at)))
            if message.type == "record batch" and _checksum_error(message) is None:
                return at
        except (pa.ArrowInvalid, OSError, EOFError):  # not a message start, or end of stream
            pass
        at = data.find(_CONTINUATION, at + 1)
    return None


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
    fsync_dir(scan.path.parent)
    return written


def quarantine_segment(path: Path) -> Path:
    """Move a whole segment into ``quarantine/`` (renamed, fsynced: no byte is lost)."""
    folder = path.parent / QUARANTINE_DIR
    folder.mkdir(exist_ok=True)
    target = folder / path.name
    copy = 0
    while target.exists():
        copy += 1
        target = folder / f"{path.name}.{copy}"
    os.replace(path, target)
    fsync_dir(folder)
    fsync_dir(path.parent)
    return target


def _write_durably(path: Path, parts: list) -> None:
    with open(path, "wb") as handle:
        for part in parts:
            handle.write(part)
        handle.flush()
        os.fsync(handle.fileno())
