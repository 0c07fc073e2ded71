"""The durable replay store: segments on disk, an index in memory, group-aware sampling.

Life of a batch: ``insert`` validates it against the trajectory schema, drops rows whose
``traj_id`` is already stored (inserts are idempotent), appends the rest to the active
segment (serialized once, with its checksum; a client's message as it came), fsyncs under
the ``fsync`` policy (or, under group commit, starts the round that covers it), indexes the
rows (while that round runs) and returns the ack. What depends on the batch alone (validation,
hashes, row facts: :func:`prepare_batch`) comes first, so a single writer with more batches
(``insert_many``) prepares the next one while this one is encoded and written on the append
thread. A segment that rolls is read back on another thread (:meth:`ReplayStore._roll_segment`);
under group commit its last fsync and the one of the new segment's name are left to the next
round, which every ack of rows in either segment waits for.
``sample`` returns whole groups that are complete, fresh enough (staleness ≤ max_staleness),
not yet used ``max_times_sampled`` times and not zero-advantage; every sample is journaled
(and under ``fsync: batch`` fsynced) before it is returned, so a restart, even after a power
loss, never hands a group out more often than allowed.

The learner takes its batches as leases (``lease``): the groups count as used while leased
(never served twice at once), but the use becomes final only when the learner ``commit``s
the lease, once the training on it is durable (its checkpoint is written). A learner group
that (re)starts from a checkpoint calls ``resume_learner``: the leases that checkpoint covers
are committed and every other one is released, its groups sampleable again, because only
the lineage that died trained on them. Leases outlive a restart of the buffer itself (the
journal replays them): a live learner still trains and commits what it holds, so releasing
them then would train those groups twice.

Durability, per ``fsync`` policy: ``batch`` acknowledges an insert or returns a sample only
after an fsync that covers it; ``interval`` acknowledges at once and fsyncs every
``fsync_interval_s`` (a power loss may lose that long of acknowledged rows and samples; a
crash of the process alone loses nothing, the page cache outlives it); ``never`` leaves it to
the OS. Callers that share fsyncs between requests (the service's group commit) pass
``sync=False`` and reply once the round in ``Ack.round`` (or, for a sample or a version, a
round started after the call) has ended; see :meth:`ReplayStore.start_group_commit`. One
in-process writer does the same with :meth:`ReplayStore.insert_many`, keeping a window of
batches in flight so that one batch's work overlaps the fsync of the ones before. After a
failed fsync the store acknowledges nothing more: what the kernel dropped is unknown.
A group that can never be sampled again is retired with a reason; a closed segment whose
groups are all retired is deleted.

Opening a folder recovers it: every complete batch of every segment is indexed again (torn
tails are truncated and reported), then the journal restores times-sampled counts,
evictions and the learner version. ``read_only=True`` recovers in memory without touching
the folder (inspection of a live or dead job). Segments written before the ``correct`` column
existed open too: their rows get it from the stored reward record
(:func:`buffer.schema.add_correct_column`).

Not thread-safe: one owner (the service loop, or a test) calls it.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from async_rl.config import BufferConfig
from buffer.commit import CommitQueue, GroupCommit
from buffer.index import (
    EVICTION_REASONS,
    Column,
    RowFacts,
    Status,
    TrajectoryIndex,
    hash_ids,
    hash_repeated_ids,
)
from buffer.journal import Journal, read_journal
from buffer.rate_limiter import RateLimiter
from buffer.samplers import SAMPLERS
from buffer.schema import (
    MAX_POLICY_VERSION,
    SCHEMA_WITHOUT_CORRECT,
    TRAJECTORY_SCHEMA,
    SchemaError,
    add_correct_column,
    min_token_version,
    validate_batch,
)
from buffer.segments import (
    BadMessage,
    EncodedBatch,
    SegmentScan,
    SegmentWriter,
    list_segments,
    open_dir,
    quarantine_messages,
    quarantine_segment,
    release_pages,
    scan_segment,
    segment_path,
    truncate_segment,
)
from buffer.wire import Lease

log = logging.getLogger(__name__)

RELEASE_PAGES_S = 10.0  # how often sampled rows' mapped pages are dropped from RSS
# Segments of earlier versions still open: their batches gain the columns added since.
OLDER_SCHEMAS = ((SCHEMA_WITHOUT_CORRECT, add_correct_column),)


class RateLimited(RuntimeError):
    """An insert refused by the rate limiter; the message says why. Retry later."""


class AppendFailed(RuntimeError):
    """Writing a batch to its segment failed (a full disk, an I/O error). Nothing of the batch
    is stored and the segment was cut back to its last good batch; retry later."""


class InsertsStopped(RuntimeError):
    """``insert_many`` stopped at batch ``index``, refused (the cause says why: SchemaError,
    RateLimited, AppendFailed); nothing from it on was stored. ``acks`` has one entry per
    batch: the ack of each batch before it, durable, and None from it on."""

    def __init__(self, message: str, *, index: int, acks: list[Ack | None]) -> None:
        super().__init__(message)
        self.index = index
        self.acks = acks


@dataclass
class Segment:
    path: Path
    bytes: int
    rows: int = 0
    pending: int = 0  # rows whose group is still LIVE: the segment is kept while > 0
    mapping: object = None  # the read-only memory map its batches point into (closed segments)


@dataclass
class Ack:
    accepted: int
    duplicates: int
    fsynced: bool
    round: int = 0  # fsync: batch: the group-commit round that covers the rows (not on the wire)

    def as_dict(self) -> dict:
        return {"accepted": self.accepted, "duplicates": self.duplicates, "fsynced": self.fsynced}


class ReplayStore:
    def __init__(
        self, directory: str | Path, cfg: BufferConfig, *, max_staleness: int, read_only: bool = False,
        seed: int = 0,
    ) -> None:
        """``max_staleness`` is the job's ``algorithm.staleness.max_staleness``: groups older than
        that many policy versions are never sampled, and are retired as stale."""
        self.dir = Path(directory)
        self.cfg = cfg
        self.max_staleness = max_staleness
        self.read_only = read_only
        if not read_only:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.index = TrajectoryIndex()
        self.batches: list[pa.RecordBatch | None] = []
        self.batch_segment = Column(np.int32)
        self.segments: dict[int, Segment] = {}
        self.recovery: list[dict] = []
        self.rng = np.random.default_rng(seed)
        self._writer: SegmentWriter | None = None
        self._writer_id = 0
        self._live_from = 0  # no group before this one is LIVE
        self._stale_checked: tuple[int, int] | None = None  # (learner version, rows) last scanned
        self._flat_checked = -1  # rows stored when zero-advantage groups were last filtered
        self.state = read_journal(self.dir)
        self.retired = RetiredGroups(self.dir, writable=not read_only)
        self._recover_segments()
        # The next segment gets a new number (_recover_segments keeps the highest seen), also
        # past segments that _restore_state deletes now: batch_segment keeps their (retired)
        # batches, and quarantined ones keep their name, so a number must never come back.
        self._restore_state()
        # The ratio is enforced from the moment the store opens, like a fresh Reverb table.
        self.limiter = RateLimiter(cfg.min_size_to_sample, cfg.samples_per_insert, cfg.spi_tolerance)
        self._last_fsync = self._last_release = time.monotonic()
        self.journal = None if read_only else Journal(self.dir, self.state, self._stored_groups())
        self.group_commit: GroupCommit | None = None  # see start_group_commit
        self._appender: ThreadPoolExecutor | None = None  # see _append
        self._scanner: ThreadPoolExecutor | None = None  # see _roll_segment
        self._roll_scans: dict[int, Future] = {}  # segment id -> its read-back, running
        self._fsync_error: OSError | None = None
        # Under group commit, what a roll leaves for the next fsync instead of fsyncing on the
        # inserting thread: the rolled segment's tail (a duplicate descriptor) and the folder,
        # for the new segment's name. Every later fsync (round or inline) takes them first.
        self._unsynced_fds: list[int] = []

    # ------------------------------------------------------------------ recovery

    def _recover_segments(self) -> None:
        for seg_id, path in list_segments(self.dir):
            self._writer_id = max(self._writer_id, seg_id)  # never reused, even if set aside
            scan = self._scan_checked(path)
            if scan.unexpected:
                self._set_aside(scan)
                continue
            if scan.torn_bytes or scan.error:
                self._report_torn(seg_id, scan)
            self.segments[seg_id] = Segment(path=path, bytes=scan.good_bytes, mapping=scan.mapping)
            for batch in scan.batches:
                self._index_batch(batch, seg_id, self._recovered_facts(batch))

    def _scan_checked(self, path: Path) -> SegmentScan:
        """Scan a segment and set aside every batch that breaks the contract: reported, and
        (when writable) quarantined so the segment holds only batches that index cleanly."""
        scan = scan_segment(path, TRAJECTORY_SCHEMA, OLDER_SCHEMAS)
        for k in reversed(range(len(scan.batches))):
            try:
                validate_batch(scan.batches[k])
            except SchemaError as err:
                start, end = scan.spans.pop(k)
                scan.batches.pop(k)
                scan.bad.append(BadMessage(start, end, str(err)))
        if not scan.bad:
            return scan
        moved = [] if self.read_only else quarantine_messages(scan)
        report = {"segment": path.name, "batches_quarantined": len(scan.bad),
                  "errors": sorted({bad.error for bad in scan.bad}),
                  "moved_to": [str(p) for p in moved]}
        self.recovery.append(report)
        log.warning("buffer recovery: unreadable batches set aside: %s", report)
        return scan if self.read_only else scan_segment(path, TRAJECTORY_SCHEMA, OLDER_SCHEMAS)

    def _set_aside(self, scan: SegmentScan) -> None:
        """A segment that is intact but not ours (another schema) or whose schema is garbled
        holds rows that may have been acknowledged: moved whole, never truncated."""
        moved = None if self.read_only else quarantine_segment(scan.path)
        report = {"segment": scan.path.name, "segment_quarantined": True, "error": scan.error,
                  "moved_to": str(moved) if moved else None}
        self.recovery.append(report)
        log.error("buffer recovery: segment set aside unread: %s", report)

    def _report_torn(self, seg_id: int, scan) -> None:
        report = {
            "segment": scan.path.name,
            "batches_kept": len(scan.batches),
            "bytes_kept": scan.good_bytes,
            "bytes_dropped": scan.torn_bytes,
            "error": scan.error,
            "truncated": not self.read_only and scan.torn_bytes > 0,
        }
        self.recovery.append(report)
        log.warning("buffer recovery: %s", report)
        if report["truncated"]:
            truncate_segment(scan.path, scan.good_bytes)

    def _restore_state(self) -> None:
        """Re-apply journaled sample counts and evictions to the freshly built index."""
        idx = self.index
        ts = idx.group_times_sampled.view
        status = idx.group_status.view
        for ghash, count in self.state.times_sampled.items():
            gid = idx.group_of_hash.get(ghash)
            if gid is not None:
                ts[gid] = count
        for ghash, code in self.state.evicted.items():
            gid = idx.group_of_hash.get(ghash)
            if gid is not None:
                status[gid] = code
        consumed = (status == Status.LIVE) & (ts >= self.cfg.max_times_sampled)
        status[consumed] = Status.CONSUMED
        self._held = self._gids([g for groups in self.state.leases.values() for g in groups])
        np.add.at(ts, self._held, 1)  # counted as used while leased, final only once committed
        for seg in self.segments.values():
            seg.pending = 0
        self._count_pending(np.flatnonzero(status == Status.LIVE), +1)
        if not self.read_only:
            self._delete_dead_segments()

    def _stored_groups(self) -> set[int]:
        """Hashes of the groups with rows in a segment still on disk."""
        gids = np.unique(self.index.row_group.view[self.stored_rows()])
        return set(self.index.group_hash.view[gids].tolist())

    # ------------------------------------------------------------------ insert

    def insert(self, data: pa.RecordBatch | pa.Table, *, sync: bool = True,
               encoded: EncodedBatch | None = None) -> Ack:
        """Store a batch durably (under the fsync policy) and return what was accepted.

        Raises ``SchemaError`` for a batch that breaks the contract, ``RateLimited`` when the
        actors are too far ahead of the learner and ``AppendFailed`` when the disk refused
        the write (nothing is stored then). ``sync=False``: the caller waits for the fsync
        (group commit: ``Ack.round`` is the round that covers the rows). ``encoded``: the
        checksummed message ``data`` was decoded from (``encoded.batch is data``), appended
        as it is when every row is new and the schema exact, instead of encoding again.
        """
        self._require_writable()
        return self.insert_prepared(prepare_batch(data, encoded), sync=sync)

    def insert_prepared(self, prepared: PreparedBatch, *, sync: bool,
                         while_writing: Callable[[], None] | None = None) -> Ack:
        """:meth:`insert` of a batch made ready by :func:`prepare_batch`; ``while_writing``
        runs while its bytes are written (see :meth:`_append`)."""
        batch = prepared.batch
        fresh = self._fresh_rows(batch, prepared.traj_hashes)
        duplicates = batch.num_rows - len(fresh)
        if not len(fresh):  # the first copy may still wait for its fsync: so does this ack
            return self._durable(Ack(0, duplicates, False), sync)
        refusal = self.limiter.insert_refusal()
        if refusal:
            raise RateLimited(refusal)
        if len(fresh) < batch.num_rows:
            prepared = prepared.rows(fresh)
        seg_id = self._append(prepared.segment_bytes, while_writing)
        self.segments[seg_id].bytes = self._writer.size
        ack = self._durable(Ack(prepared.batch.num_rows, duplicates, False), sync)
        completed_before = self.index.completed_groups
        self._index_batch(prepared.batch, seg_id, prepared.facts)  # under group commit, while the fsync runs
        self.limiter.inserted += self.index.completed_groups - completed_before
        self._after_insert()
        return ack

    def insert_many(self, batches: Iterable[pa.RecordBatch | pa.Table], *, window: int = 4) -> list[Ack]:
        """Store the batches of one writer in order and return their acks, each given only once
        an fsync covered its rows (as :meth:`insert`), with up to ``window`` batches written but
        not yet durable (as a Kafka producer's ``max.in.flight``).

        Under ``fsync: batch`` the fsyncs run on the group-commit thread (started here), so the
        next batch is validated, encoded, written and indexed while the fsync of the ones before
        runs (``os.fsync`` releases the GIL); one round covers every batch written before it
        started. Other policies insert one batch after another. Under every policy a batch is
        encoded and written on the append thread while the next one is prepared (validated,
        hashed, its row facts taken) here; what preparing it raised is raised at its own
        turn, so the batches before it are stored as they would be. A batch refused raises
        :class:`InsertsStopped` once the batches before it are durable; an fsync that fails
        raises its ``OSError`` and the store acknowledges nothing more.
        """
        if window < 1:
            raise ValueError(f"insert_many: window={window}, must be at least 1")
        self._require_writable()
        commit = self.start_group_commit()
        pending = CommitQueue(commit, self.sync_fds) if commit is not None else None
        acks: list[Ack] = []
        batches = list(batches)
        prepared: dict[int, PreparedBatch | Exception] = {}  # or what preparing it raised

        def prepare(index: int) -> None:
            if index < len(batches) and index not in prepared:
                try:
                    prepared[index] = prepare_batch(batches[index])
                except Exception as err:  # raised at the batch's own turn, as insert would
                    prepared[index] = err

        for index in range(len(batches)):
            while pending is not None and len(pending) >= window:
                acks += self._settled(pending, wait=True)
            prepare(index)  # unless it was prepared while the batch before was written
            try:
                ready = prepared.pop(index)
                if isinstance(ready, Exception):
                    raise ready
                ack = self.insert_prepared(ready, sync=pending is None,
                                            while_writing=functools.partial(prepare, index + 1))
            except (SchemaError, RateLimited, AppendFailed) as err:
                while pending:
                    acks += self._settled(pending, wait=True)
                missing = [None] * (len(batches) - len(acks))
                raise InsertsStopped(f"batch {index}: {type(err).__name__}: {err}", index=index,
                                     acks=acks + missing) from err
            if pending is None:
                acks.append(ack)
            else:
                pending.hold(ack.round, ack)
                acks += self._settled(pending, wait=False)
        while pending:
            acks += self._settled(pending, wait=True)
        return acks

    def _settled(self, pending: CommitQueue, *, wait: bool) -> list[Ack]:
        """The acks of ``pending`` whose group-commit round has ended (after waiting for the
        thread to end one, with ``wait``), marked fsynced."""
        if wait:
            pending.commit.wait()
        try:
            acks = pending.settle()
        except OSError as err:
            self._fsync_error = err  # nothing more is acknowledged: see _maybe_fsync
            raise
        for ack in acks:
            ack.fsynced = True
        return acks

    def _durable(self, ack: Ack, sync: bool) -> Ack:
        """Make what ``ack`` promises durable under the fsync policy: here (``sync``), or by
        the group-commit round it names (``ack.round``), started now when the fsync thread
        is idle so that it runs while the caller goes on."""
        if sync or self.group_commit is None:
            ack.fsynced = self._maybe_fsync(force=sync and self.cfg.fsync == "batch")
        else:
            ack.round = self._covering_round()
        return ack

    def start_group_commit(self) -> GroupCommit | None:
        """Under ``fsync: batch``, start the thread that runs fsyncs while the owner goes on
        (``buffer/commit.py``); ``insert(sync=False)`` then starts a round right after its
        append. For a loop serving many writers, or one writer that keeps several batches in
        flight (:meth:`insert_many`): a writer that waits for each fsync before its next batch
        gains nothing from the thread (``insert`` fsyncs inline)."""
        if self.cfg.fsync == "batch" and not self.read_only and self.group_commit is None:
            self.group_commit = GroupCommit()
            weakref.finalize(self, self.group_commit.close)  # also when collected unclosed (a crash)
        return self.group_commit

    def _covering_round(self) -> int:
        """The group-commit round that covers every byte written so far: started now if the
        fsync thread is idle, else the next one (the owner starts it when this one ends)."""
        if not self.group_commit.busy:
            self.group_commit.start(self.sync_fds())
            return self.group_commit.started
        return self.group_commit.next_round

    def _fresh_rows(self, batch: pa.RecordBatch, hashes: np.ndarray) -> np.ndarray:
        """Row numbers of the batch whose traj_id (hashed: ``hashes``) is new (first
        occurrence within the batch)."""
        _, first = np.unique(hashes, return_index=True)
        first.sort()
        fresh = first[~self.index.traj_hashes.contains(hashes[first])]
        if len(fresh) and len(self.retired):
            groups = hash_repeated_ids(batch.column("group_id").take(pa.array(fresh)))
            fresh = fresh[~self.retired.contains(groups)]
        return fresh

    def _append(self, batch: EncodedBatch | pa.RecordBatch,
                while_writing: Callable[[], None] | None = None) -> int:
        """Write a batch (encoded here unless it comes encoded) to the active segment; returns
        the segment id.

        ``while_writing`` (work that touches nothing of the store's) runs on this thread while
        the batch is encoded and written on the append thread: Arrow's serialization, xxh3 and
        ``os.write`` release the GIL, so a single writer prepares its next batch meanwhile. It
        must not raise (the batch is written either way): callers keep what preparing a batch
        raised for that batch's turn. The append has ended, and its error is raised here,
        before this returns.
        """
        seg_id = self._active_writer()
        try:
            if while_writing is None:
                self._writer.append(batch)
            else:
                if self._appender is None:
                    self._appender = ThreadPoolExecutor(1, thread_name_prefix="buffer-append")
                written = self._appender.submit(self._writer.append, batch)
                try:
                    while_writing()
                finally:
                    written.result()
        except OSError as err:
            if self._writer.broken:  # could not cut the failed bytes off: never append there
                writer, self._writer = self._writer, None
                writer.abandon()  # an OSError here is an fsync failure, not an AppendFailed
            log.error("buffer: append to %s failed: %s", segment_path(self.dir, seg_id).name, err)
            raise AppendFailed(
                f"append to {segment_path(self.dir, seg_id).name} failed ({err}); "
                "nothing of this batch is stored, retry"
            ) from err
        return seg_id

    def _active_writer(self) -> int:
        if self._roll_scans:
            self._finish_rolls()
        if self._writer is not None and self._writer.size >= self.cfg.segment_bytes:
            self._roll_segment()
        if self._writer is None:
            self._writer_id += 1
            path = segment_path(self.dir, self._writer_id)
            deferred = self.group_commit is not None  # the next fsync covers header and name
            self._writer = SegmentWriter(path, TRAJECTORY_SCHEMA, sync=not deferred)
            if deferred:
                self._unsynced_fds.append(open_dir(self.dir))
            self.segments[self._writer_id] = Segment(path=path, bytes=self._writer.size)
        return self._writer_id

    def _roll_segment(self) -> None:
        """Close the active segment; a background thread reads it back (every checksum) and
        :meth:`_finish_rolls` then swaps its in-memory batches for memory-mapped ones. Until
        then the rows are served from memory, as they were while it was active."""
        seg_id, writer = self._writer_id, self._writer
        if self.group_commit is not None:  # its tail is fsynced by the next round, not here
            self._unsynced_fds.append(writer.dup_fd())
            writer.close(sync=False)
        else:
            writer.close()
        self._writer = None
        if self._scanner is None:
            self._scanner = ThreadPoolExecutor(1, thread_name_prefix="buffer-roll-scan")
        # Reading 64 MB back and hashing it (xxh3 releases the GIL) no longer stalls inserts.
        self._roll_scans[seg_id] = self._scanner.submit(scan_segment, writer.path, TRAJECTORY_SCHEMA)
        self._delete_dead_segments()

    def _finish_rolls(self, *, wait: bool = False) -> None:
        """Swap in the memory-mapped batches of every rolled segment whose read-back has
        ended (all of them, waiting, with ``wait``)."""
        for seg_id, scanning in list(self._roll_scans.items()):
            if not (wait or scanning.done()):
                continue
            del self._roll_scans[seg_id]
            try:
                scan = scanning.result()
            except OSError as err:
                scan = SegmentScan(path=segment_path(self.dir, seg_id), file_bytes=0, error=str(err))
            self._swap_in(seg_id, scan)

    def _swap_in(self, seg_id: int, scan: SegmentScan) -> None:
        if seg_id not in self.segments:  # deleted while it was read back: nothing to serve
            return  # (the map closes with its last reference)
        ids = np.flatnonzero(self.batch_segment.view == seg_id)
        if scan.bad or scan.error or len(scan.batches) != len(ids):
            # The file no longer reads back as written (a checksum failed): keep serving the
            # rows from memory; the next recovery quarantines what is bad.
            log.error("buffer: %s does not read back as written: %s", scan.path.name,
                      [bad.error for bad in scan.bad] or scan.error)
            return
        self.segments[seg_id].mapping = scan.mapping
        for batch_id, batch in zip(ids.tolist(), scan.batches, strict=True):
            if self.batches[batch_id] is not None:
                self.batches[batch_id] = batch

    def _maybe_fsync(self, *, force: bool) -> bool:
        due = self.cfg.fsync == "interval" and (
            time.monotonic() - self._last_fsync >= self.cfg.fsync_interval_s
        )
        if not (force or due):
            return False
        if self._fsync_error is not None:  # what that fsync failed to write may be gone
            raise self._fsync_error
        try:
            self._fsync_unsynced()
            if self._writer is not None:
                self._writer.fsync()
            self.journal.fsync()
        except OSError as err:
            self._fsync_error = err
            raise
        self._last_fsync = time.monotonic()
        return True

    def sync_fds(self) -> list[int]:
        """Duplicates of the descriptors an fsync must cover now (active segment, journal),
        for a group commit on another thread; the caller fsyncs and closes them. Everything
        written before this call is durable once they are fsynced."""
        if self.read_only:
            return []
        self._last_fsync = time.monotonic()
        # A clean journal is left out: an fsync with nothing to write still flushes the disk.
        fds = [self.journal.dup_fd()] if self.journal.dirty else []
        fds += self._unsynced_fds  # handed over: the round fsyncs and closes them
        self._unsynced_fds = []
        if self._writer is not None:
            fds.append(self._writer.dup_fd())
        return fds

    def _fsync_unsynced(self) -> None:
        """Fsync here what rolls left for the next fsync (see ``_unsynced_fds``)."""
        while self._unsynced_fds:
            fd = self._unsynced_fds[0]
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
                self._unsynced_fds.pop(0)

    def tick(self) -> None:
        """Periodic work for the service loop: the interval fsync, releasing mapped pages."""
        if not self.read_only:
            self._maybe_fsync(force=False)
        if self._roll_scans:
            self._finish_rolls()
        if time.monotonic() - self._last_release >= RELEASE_PAGES_S:
            self.release_pages()

    def release_pages(self) -> None:
        """Drop sampled rows' pages from resident memory (they stay in the page cache)."""
        for seg in self.segments.values():
            release_pages(seg.mapping)
        self._last_release = time.monotonic()

    def _recovered_facts(self, batch: pa.RecordBatch) -> RowFacts:
        """Row facts of a checked batch read back from disk, without the rows already
        indexed (a duplicate on disk)."""
        traj = hash_ids(batch.column("traj_id").to_pylist())
        keep = np.flatnonzero(~self.index.traj_hashes.contains(traj))
        return _row_facts(batch, traj, keep)

    def _index_batch(self, batch: pa.RecordBatch, seg_id: int, facts: RowFacts) -> None:
        """Index a stored batch whose new rows (``facts.offsets``) are already deduplicated."""
        batch_id = len(self.batches)
        keep = facts.offsets
        self.batches.append(batch)
        self.batch_segment.extend(np.array([seg_id]))
        self.index.add_rows(batch_id, facts)
        seg = self.segments[seg_id]
        seg.rows += len(keep)
        gids = self.index.row_group.view[self.index.n_rows - len(keep) :]
        seg.pending += int((self.index.group_status.view[gids] == Status.LIVE).sum())

    def _after_insert(self) -> None:
        self._evict_to_capacity()
        if self.journal.needs_compaction:
            stored = self._stored_groups()
            self.state.prune(stored)
            self.journal.compact(self.state, stored)

    # ------------------------------------------------------------------ sample

    def set_learner_version(self, version: int, *, sync: bool = True) -> None:
        """Record the learner's policy version (journaled) and evict what became too stale.

        The learner announces a version before it publishes weights under it, and the version
        only moves up (a learner resumed from an older checkpoint gets a fresh number from
        :meth:`resume_learner`), so a version number never names two different weight sets
        and no request can make retired rows' peers look fresh.
        """
        self._require_writable()
        if not 0 <= version <= MAX_POLICY_VERSION:
            raise ValueError(f"learner version {version}: must be in [0, {MAX_POLICY_VERSION}]")
        if version < self.learner_version:
            raise ValueError(
                f"learner version {version} < {self.learner_version}: it only moves up "
                "(a learner resumed from a checkpoint asks resume_learner for its version)"
            )
        self._record({"op": "version", "v": int(version)})
        self._evict_stale()
        self._maybe_fsync(force=sync and self.cfg.fsync == "batch")

    def resume_learner(self, version: int, trained: list[int], *, sync: bool = True) -> int:
        """A learner group starts from weights of ``version`` (its checkpoint's, 0 for the
        initial weights) whose training covers the leases ``trained``: those are committed,
        every other lease is released (the groups become sampleable again, subject to the
        staleness cap and ``max_times_sampled``), and the version the restored weights are
        published under is returned and recorded: ``version`` when no newer one was ever
        announced, else one past the newest, since those numbers named weights of a lineage
        that is gone (rows in the buffer carry them). Staleness stays a version difference:
        rows made before the checkpoint then count as staler than they are by the jump (so
        they may age out early), rows the lost lineage made as fresher than their distance
        to the restored weights; their importance ratios are exact either way (behaviour
        logprobs)."""
        self._require_writable()
        if not 0 <= version <= MAX_POLICY_VERSION:
            raise ValueError(f"learner version {version}: must be in [0, {MAX_POLICY_VERSION}]")
        fresh = version if version >= self.learner_version else self.learner_version + 1
        if fresh > MAX_POLICY_VERSION:
            raise ValueError(f"learner version {fresh}: must be in [0, {MAX_POLICY_VERSION}]")
        self.commit(trained, sync=False)
        self._release(list(self.state.leases))
        self._record({"op": "version", "v": fresh})
        self._evict_stale()
        self._maybe_fsync(force=sync and self.cfg.fsync == "batch")
        return fresh

    @property
    def learner_version(self) -> int:
        return self.state.learner_version

    def sample(self, n_groups: int, *, peek: bool = False,
               sync: bool = True) -> tuple[pa.Table | None, str | None]:
        """Up to ``n_groups`` whole groups as one table, or ``(None, reason)`` if refused.

        ``peek`` looks without counting the sample (inspection): no times-sampled update, no
        rate limiting, nothing journaled, no eviction. Under ``fsync: batch`` the journaled
        count is fsynced before the table is returned (``sync=False``: the caller does it).
        """
        if not peek:
            self._require_writable()
        picked, refusal = self._choose(n_groups, peek=peek)
        if picked is None:
            return None, refusal
        counts = self.index.group_times_sampled.view[picked] + (0 if peek else 1)
        table = self._read_groups(picked, counts)  # before counting: that may delete segments
        if not peek:
            self._count_sample(picked)
            self._maybe_fsync(force=sync and self.cfg.fsync == "batch")
        return table, None

    def lease(self, n_groups: int, *, sync: bool = True) -> tuple[Lease | None, str | None]:
        """Like :meth:`sample`, but the use is provisional until :meth:`commit`: the lease is
        journaled (and under ``fsync: batch`` fsynced) before it is returned."""
        self._require_writable()
        picked, refusal = self._choose(n_groups)
        if picked is None:
            return None, refusal
        ts = self.index.group_times_sampled.view
        table = self._read_groups(picked, ts[picked] + 1)
        lease = Lease(self.state.next_lease, table)
        self._record({"op": "lease", "id": lease.id, "g": self.index.group_hash.view[picked].tolist()})
        ts[picked] += 1
        self._held = np.concatenate([self._held, picked])
        self.limiter.sampled += len(picked)
        self._maybe_fsync(force=sync and self.cfg.fsync == "batch")
        return lease, None

    def commit(self, lease_ids: list[int], *, sync: bool = True) -> list[int]:
        """Make the uses of these leases final (journaled; fsynced under ``fsync: batch``);
        groups used ``max_times_sampled`` times retire. Returns the ids that were not
        outstanding (already committed, or released by a learner restart): nothing changes
        for them."""
        self._require_writable()
        known = [i for i in dict.fromkeys(lease_ids) if i in self.state.leases]
        if known:
            gids = self._gids([g for i in known for g in self.state.leases[i]])
            self._record({"op": "commit", "ids": known})
            self._held = self._gids([g for groups in self.state.leases.values() for g in groups])
            self._retire(self._used_up(gids), Status.CONSUMED)
        self._maybe_fsync(force=sync and self.cfg.fsync == "batch")
        return [i for i in lease_ids if i not in known]

    def _release(self, lease_ids: list[int]) -> None:
        """Give leased groups back: they count as never served by these leases."""
        if not lease_ids:
            return
        gids = self._gids([g for i in lease_ids for g in self.state.leases[i]])
        self._record({"op": "release", "ids": lease_ids})
        np.subtract.at(self.index.group_times_sampled.view, gids, 1)  # a group may be in several
        self._held = self._gids([g for groups in self.state.leases.values() for g in groups])
        self._stale_checked = None  # given back, they may be too stale now
        self.limiter.sampled = max(0, self.limiter.sampled - len(gids))

    def leased_groups(self) -> int:
        """Groups served under leases the learner has not committed yet."""
        return sum(len(groups) for groups in self.state.leases.values())

    def _gids(self, hashes: list[int]) -> np.ndarray:
        """Group numbers of the group hashes still indexed here."""
        lookup = self.index.group_of_hash.get
        return np.array([g for g in (lookup(h) for h in hashes) if g is not None], dtype=np.int64)

    def holds_groups(self, group_ids: list[str]) -> np.ndarray:
        """Per group id: is the whole group durable here (stored complete, or retired after it
        was stored)?"""
        hashes = hash_ids(group_ids)
        idx = self.index
        gids = np.array([idx.group_of_hash.get(h, -1) for h in hashes.tolist()], dtype=np.int64)
        known = gids >= 0
        complete = np.zeros(len(gids), dtype=bool)
        complete[known] = idx.group_count.view[gids[known]] >= idx.group_size.view[gids[known]]
        return complete | self.retired.contains(hashes)

    def sampleable_groups(self) -> int:
        """How many groups a sample could return right now."""
        return int(len(self._candidates()))

    def _live_slice(self) -> int:
        """First group number that may still be LIVE: groups only ever leave LIVE, so the
        oldest LIVE group bounds every scan (old, retired groups are never looked at). Looked
        for from the last answer on: usually it is the first group looked at."""
        first = next((live for live in self._live_groups_from(self._live_from, 64) if len(live)), None)
        self._live_from = int(first[0]) if first is not None else self.index.n_groups
        return self._live_from

    def _live_groups_from(self, start: int, chunk: int) -> Iterator[np.ndarray]:
        """The LIVE group numbers from ``start`` on, in chunks that double in size (the callers
        usually stop at the first): a scan costs what it looks at, not what is stored."""
        status = self.index.group_status.view
        while start < len(status):
            yield np.flatnonzero(status[start : start + chunk] == Status.LIVE) + start
            start, chunk = start + chunk, chunk * 2

    def _candidates(self) -> np.ndarray:
        idx, lo = self.index, self._live_slice()
        mask = idx.group_status.view[lo:] == Status.LIVE
        mask &= idx.group_count.view[lo:] >= idx.group_size.view[lo:]
        mask &= idx.group_times_sampled.view[lo:] < self.cfg.max_times_sampled
        mask &= idx.group_min_version.view[lo:] >= self.learner_version - self.max_staleness
        if self.cfg.filter_zero_advantage:
            mask &= idx.group_reward_min.view[lo:] != idx.group_reward_max.view[lo:]
        return np.flatnonzero(mask) + lo

    def _pick(self, candidates: np.ndarray, n: int) -> np.ndarray:
        sampler = SAMPLERS[self.cfg.sampler]
        idx = self.index
        return sampler(candidates, idx.group_min_version.view, idx.group_times_sampled.view,
                       self.learner_version, n, self.rng)

    def _choose(self, n_groups: int, *, peek: bool = False) -> tuple[np.ndarray | None, str | None]:
        """The groups a sample returns, or ``(None, reason)``; ``peek`` evicts nothing and is
        not rate limited."""
        if not peek:
            self._evict_stale()
            self._filter_zero_advantage()
        candidates = self._candidates()
        if not peek:
            refusal = self.limiter.sample_refusal(n_groups, len(candidates))
            if refusal:
                return None, refusal
        elif not len(candidates):
            return None, "empty: no sampleable group"
        return self._pick(candidates, n_groups), None

    def _count_sample(self, picked: np.ndarray) -> None:
        hashes = self.index.group_hash.view[picked]
        self._record({"op": "sample", "g": hashes.tolist()})
        self.index.group_times_sampled.view[picked] += 1
        self.limiter.sampled += len(picked)
        self._retire(self._used_up(picked), Status.CONSUMED)

    def _used_up(self, gids: np.ndarray) -> np.ndarray:
        """The LIVE groups among ``gids`` whose final (journaled, committed) uses reached
        ``max_times_sampled``; uses still leased do not count: a release gives them back."""
        gids = np.unique(gids)
        gids = gids[self.index.group_status.view[gids] == Status.LIVE]
        final = self.state.times_sampled.get
        done = [final(h, 0) >= self.cfg.max_times_sampled for h in self.index.group_hash.view[gids].tolist()]
        return gids[np.asarray(done, dtype=bool)]

    def _read_groups(self, gids: np.ndarray, times_sampled: np.ndarray) -> pa.Table:
        """The rows of the given groups, group by group, with ``times_sampled`` filled in."""
        rows, sizes = self._rows_of_groups(gids)
        table = self.read_rows(rows)
        per_row = np.repeat(times_sampled, sizes).astype(np.int32)
        col = table.schema.get_field_index("times_sampled")
        return table.set_column(col, TRAJECTORY_SCHEMA.field("times_sampled"), pa.array(per_row))

    def _rows_of_groups(self, gids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row numbers of the groups, group after group, and each group's row count."""
        idx = self.index
        if any(g in idx.scattered for g in gids.tolist()):
            parts = [idx.group_rows(g) for g in gids.tolist()]
            rows = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            return rows, np.array([len(p) for p in parts], dtype=np.int64)
        sizes = idx.group_count.view[gids].astype(np.int64)
        starts = idx.group_first_row.view[gids]
        within = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        return np.repeat(starts, sizes) + within, sizes

    def read_rows(self, rows: np.ndarray) -> pa.Table:
        """Stored rows by row number, in that order, sliced zero-copy from their batches."""
        if not len(rows):
            return TRAJECTORY_SCHEMA.empty_table()
        batch_of = self.index.row_batch.view[rows]
        offset = self.index.row_offset.view[rows]
        breaks = np.flatnonzero((np.diff(batch_of) != 0) | (np.diff(offset) != 1)) + 1
        starts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [len(rows)]])
        pieces = [
            self.batches[int(batch_of[s])].slice(int(offset[s]), e - s)
            for s, e in zip(starts.tolist(), ends.tolist(), strict=True)
        ]
        return pa.Table.from_batches(pieces, schema=TRAJECTORY_SCHEMA)

    # ------------------------------------------------------------------ eviction

    def _evict_stale(self) -> None:
        key = (self.learner_version, self.index.n_rows)
        if key == self._stale_checked:  # nothing changed since the last pass
            return
        self._stale_checked = key
        idx, lo = self.index, self._live_slice()
        floor = self.learner_version - self.max_staleness
        stale = (idx.group_status.view[lo:] == Status.LIVE) & (idx.group_min_version.view[lo:] < floor)
        stale = np.flatnonzero(stale) + lo
        # A leased group is being trained: it retires as consumed once committed, or goes
        # stale here once released.
        self._retire(stale[~np.isin(stale, self._held)], Status.STALE)

    def _filter_zero_advantage(self) -> None:
        if not self.cfg.filter_zero_advantage or self._flat_checked == self.index.n_rows:
            return
        self._flat_checked = self.index.n_rows
        idx, lo = self.index, self._live_slice()
        flat = idx.group_status.view[lo:] == Status.LIVE
        flat &= idx.group_count.view[lo:] >= idx.group_size.view[lo:]
        flat &= idx.group_reward_min.view[lo:] == idx.group_reward_max.view[lo:]
        self._retire(np.flatnonzero(flat) + lo, Status.ZERO_ADVANTAGE)

    def _evict_to_capacity(self) -> None:
        idx = self.index
        excess = self._live_rows() - self.cfg.capacity_rows
        if excess > 0:
            self._retire(self._oldest_live_groups(excess), Status.CAPACITY)
        while self._disk_bytes() > self.cfg.capacity_bytes and len(self.segments) > 1:
            oldest = min(self.segments)
            if oldest == self._writer_id and self._writer is not None:
                break
            in_oldest = np.flatnonzero(self.batch_segment.view == oldest)
            rows = np.flatnonzero(np.isin(idx.row_batch.view, in_oldest))
            gids = np.unique(idx.row_group.view[rows])
            self._retire(gids[idx.group_status.view[gids] == Status.LIVE], Status.CAPACITY)
            if oldest in self.segments:
                self._delete_segment(oldest)

    def _live_rows(self) -> int:
        """Rows of LIVE groups, what ``capacity_rows`` bounds: each segment counts its own
        (``Segment.pending``), so this costs one term per segment, not one per group."""
        return sum(seg.pending for seg in self.segments.values())

    def _oldest_live_groups(self, rows: int) -> np.ndarray:
        """The fewest oldest LIVE groups holding at least ``rows`` rows (group numbers follow
        insertion order): the work is proportional to what is evicted, not to what is stored."""
        count, held, picked = self.index.group_count.view, 0, []
        for live in self._live_groups_from(self._live_slice(), 1024):
            reached = np.cumsum(count[live]) + held
            enough = int(np.searchsorted(reached, rows))  # first group at which `rows` is reached
            if enough < len(live):
                picked.append(live[: enough + 1])
                break
            picked.append(live)
            held = int(reached[-1]) if len(live) else held
        return np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)

    def _disk_bytes(self) -> int:
        return sum(seg.bytes for seg in self.segments.values())

    def _retire(self, gids: np.ndarray, status: Status) -> None:
        """Make LIVE groups terminal with a reason: counted, journaled, segments freed."""
        if not len(gids):
            return
        rows = int(self.index.group_count.view[gids].sum())
        self.index.group_status.view[gids] = status
        self._count_pending(gids, -1)
        if status is not Status.CONSUMED:
            reason = EVICTION_REASONS[status]
            hashes = self.index.group_hash.view[gids].tolist()
            self._record({"op": "evict", "reason": reason, "status": int(status), "g": hashes,
                          "rows": rows})
        self._delete_dead_segments()

    def _count_pending(self, gids: np.ndarray, sign: int) -> None:
        if not len(gids):
            return
        rows = np.concatenate([self.index.group_rows(g) for g in gids.tolist()])
        segs = self.batch_segment.view[self.index.row_batch.view[rows]]
        for seg_id, count in zip(*np.unique(segs, return_counts=True), strict=True):
            if int(seg_id) in self.segments:
                self.segments[int(seg_id)].pending += sign * int(count)

    def _delete_dead_segments(self) -> None:
        if self.read_only:
            return
        for seg_id in [s for s, seg in self.segments.items() if seg.pending <= 0]:
            if seg_id != self._writer_id or self._writer is None:
                self._delete_segment(seg_id)

    def _delete_segment(self, seg_id: int) -> None:
        seg = self.segments.pop(seg_id)
        batch_ids = np.flatnonzero(self.batch_segment.view == seg_id)
        rows = np.flatnonzero(np.isin(self.index.row_batch.view, batch_ids))
        # Before the file goes: after a restart the index no longer knows these rows, and a
        # resend of them must still be a duplicate.
        self.retired.add(self.index.group_hash.view[np.unique(self.index.row_group.view[rows])])
        for batch_id in batch_ids.tolist():
            self.batches[batch_id] = None
        seg.path.unlink(missing_ok=True)
        log.info("buffer: deleted segment %s (%d rows, all retired)", seg.path.name, seg.rows)

    # ------------------------------------------------------------------ state

    def _record(self, entry: dict) -> None:
        self.state.apply(entry)
        if self.journal is not None:
            self.journal.append(entry)

    def _require_writable(self) -> None:
        if self.read_only:
            raise PermissionError(f"buffer at {self.dir} was opened read-only (inspection)")

    def stored_rows(self) -> np.ndarray:
        """Row numbers whose segment is still on disk, oldest first."""
        present = np.fromiter((b is not None for b in self.batches), bool, len(self.batches))
        return np.flatnonzero(present[self.index.row_batch.view]) if len(present) else present

    def close(self) -> None:
        if self.group_commit is not None:
            self.group_commit.close()  # a round in flight ends first
        if self._appender is not None:
            self._appender.shutdown()
            self._appender = None
        if self._scanner is not None:
            self._finish_rolls(wait=True)
            self._scanner.shutdown()
            self._scanner = None
        try:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            self._fsync_unsynced()
        finally:
            if self.journal is not None:
                self.journal.close()
            self.retired.close()


class RetiredGroups:
    """Hashes of the groups whose rows were all retired and their segment deleted, kept in
    ``retired-groups.u64`` (8 bytes a group, appended and fsynced before the segment goes), so
    an insert stays idempotent on traj_id across restarts. A torn last entry is ignored."""

    FILE = "retired-groups.u64"

    def __init__(self, directory: Path, *, writable: bool) -> None:
        self.path = Path(directory) / self.FILE
        raw = self.path.read_bytes() if self.path.is_file() else b""
        whole = len(raw) - len(raw) % 8
        self._sorted = np.unique(np.frombuffer(raw[:whole], dtype=np.uint64))
        self._fd = -1
        if writable:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
            os.ftruncate(self._fd, whole)
            os.lseek(self._fd, whole, os.SEEK_SET)

    def __len__(self) -> int:
        return len(self._sorted)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        at = np.searchsorted(self._sorted, hashes).clip(max=max(len(self._sorted) - 1, 0))
        return self._sorted[at] == hashes if len(self._sorted) else np.zeros(len(hashes), bool)

    def add(self, hashes: np.ndarray) -> None:
        hashes = np.asarray(hashes, dtype=np.uint64)
        if not len(hashes) or self._fd < 0:
            return
        os.write(self._fd, hashes.tobytes())
        os.fsync(self._fd)
        self._sorted = np.union1d(self._sorted, hashes)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass
class PreparedBatch:
    """A batch checked against the contract and the facts the index keeps of its rows: the
    work of an insert that depends on the batch alone, done before the first byte is written
    (a batch that cannot be indexed must never reach a segment: recovery would replay it).
    ``encoded``: the checksummed message a client sent, appended as it came; without one the
    batch is encoded (serialized and hashed, both without the GIL) where it is appended."""

    batch: pa.RecordBatch
    traj_hashes: np.ndarray  # [rows] uint64
    facts: RowFacts
    encoded: EncodedBatch | None = None

    @property
    def segment_bytes(self) -> EncodedBatch | pa.RecordBatch:
        """What the segment writer appends (it encodes a plain batch)."""
        return self.encoded if self.encoded is not None else self.batch

    def rows(self, keep: np.ndarray) -> PreparedBatch:
        """The same for the rows ``keep`` (sorted) only: a new batch, so no message yet."""
        batch = self.batch.take(pa.array(keep))
        traj = self.traj_hashes[keep]
        return PreparedBatch(batch, traj, _row_facts(batch, traj, np.arange(len(keep))))


def prepare_batch(data: pa.RecordBatch | pa.Table, encoded: EncodedBatch | None = None) -> PreparedBatch:
    """Validate, hash and extract the row facts of a batch (it may come ``encoded``: the
    checksummed message it was decoded from, kept when validation returns it as it came)."""
    batch = validate_batch(data)
    if encoded is not None and encoded.batch is not batch:  # changed by validation
        encoded = None
    traj = hash_ids(batch.column("traj_id").to_pylist())
    return PreparedBatch(batch, traj, _row_facts(batch, traj, np.arange(batch.num_rows)), encoded)


def _row_facts(batch: pa.RecordBatch, traj: np.ndarray, keep: np.ndarray) -> RowFacts:
    every_row = len(keep) == batch.num_rows  # keep is sorted and unique: then it is all rows
    rows = None if every_row else pa.array(keep)

    def pick(name):
        return batch.column(name).to_numpy(zero_copy_only=False)[keep]

    def take(name):
        return batch.column(name) if every_row else batch.column(name).take(rows)

    return RowFacts(
        offsets=keep,
        traj_hashes=traj[keep],
        group_hashes=hash_repeated_ids(take("group_id")),
        group_sizes=pick("group_size"),
        min_versions=min_token_version(batch)[keep],
        rewards=pick("reward"),
        correct=pick("correct"),
        resp_lens=pc.list_value_length(batch.column("response_tokens")).to_numpy()[keep],
        actor_ids=take("actor_id"),
        data_sources=take("data_source"),
    )
