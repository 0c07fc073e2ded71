"""The buffer's mutable state, persisted next to the segments as a JSON-lines journal.

Segments are immutable; what changes after an insert is kept here: the learner version the
buffer last served, how often each group was sampled, which groups were evicted and why,
the rate limiter's sample count, and the sample leases the learner has not committed yet
(``lease``: groups served provisionally; ``commit``: their use becomes final; ``release``:
they are given back, as if never served). Each change is one line written with ``os.write``
before the reply goes out, so it survives a crash of the buffer process (the page cache
outlives it); it is fsynced with the segments' fsync policy (under ``fsync: batch`` before
the reply, so a sample count also survives a power loss). On open the journal is
replayed and rewritten as a single snapshot line (write-to-temp, fsync, rename).
A torn last line (a crash mid-write) is ignored.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from buffer.schema import MAX_POLICY_VERSION
from buffer.segments import fsync_dir

log = logging.getLogger(__name__)

JOURNAL_NAME = "state.jsonl"
COMPACT_EVERY = 20_000  # lines appended before the journal is rewritten as one snapshot


@dataclass
class BufferState:
    learner_version: int = 0
    samples: int = 0  # groups returned by samples (rate limiter)
    times_sampled: dict[int, int] = field(default_factory=dict)  # group hash -> count
    evicted: dict[int, int] = field(default_factory=dict)  # group hash -> Status value
    evicted_rows: dict[str, int] = field(default_factory=dict)  # reason -> rows
    evicted_groups: dict[str, int] = field(default_factory=dict)  # reason -> groups
    leases: dict[int, list[int]] = field(default_factory=dict)  # lease id -> group hashes, uncommitted
    next_lease: int = 1  # lease ids are never reused, also across restarts

    def apply(self, entry: dict) -> None:
        op = entry["op"]
        if op == "version":
            self.learner_version = _version(entry["v"], self.learner_version)
        elif op == "sample":
            self.samples += len(entry["g"])
            for g in entry["g"]:
                self.times_sampled[g] = self.times_sampled.get(g, 0) + 1
        elif op == "lease":
            self.leases[entry["id"]] = entry["g"]
            self.next_lease = max(self.next_lease, entry["id"] + 1)
        elif op == "commit":
            for lease in entry["ids"]:
                groups = self.leases.pop(lease, [])
                self.samples += len(groups)
                for g in groups:
                    self.times_sampled[g] = self.times_sampled.get(g, 0) + 1
        elif op == "release":
            for lease in entry["ids"]:
                self.leases.pop(lease, None)
        elif op == "evict":
            reason = entry["reason"]
            for g in entry["g"]:
                self.evicted[g] = entry["status"]
            self.evicted_groups[reason] = self.evicted_groups.get(reason, 0) + len(entry["g"])
            self.evicted_rows[reason] = self.evicted_rows.get(reason, 0) + entry["rows"]
        elif op == "snapshot":
            self.__init__(**_decode_snapshot(entry))

    def prune(self, stored_groups: set[int]) -> None:
        """Forget per-group state of groups whose segments are gone."""
        self.times_sampled = {g: c for g, c in self.times_sampled.items() if g in stored_groups}
        self.evicted = {g: s for g, s in self.evicted.items() if g in stored_groups}


def _version(value, previous: int) -> int:
    """A journaled learner version, or ``previous`` for one outside the bound (written before
    the service checked it) that would break staleness arithmetic forever."""
    valid = type(value) is int and 0 <= value <= MAX_POLICY_VERSION
    if not valid:
        log.warning("buffer journal: learner version %r ignored (outside [0, %d])", value, MAX_POLICY_VERSION)
    return value if valid else previous


def _decode_snapshot(entry: dict) -> dict:
    return {
        "learner_version": _version(entry["learner_version"], 0),
        "samples": entry["samples"],
        "times_sampled": {int(k): v for k, v in entry["times_sampled"].items()},
        "evicted": {int(k): v for k, v in entry["evicted"].items()},
        "evicted_rows": entry["evicted_rows"],
        "evicted_groups": entry["evicted_groups"],
        "leases": {int(k): v for k, v in entry.get("leases", {}).items()},
        "next_lease": entry.get("next_lease", 1),
    }


def read_journal(directory: Path) -> BufferState:
    state = BufferState()
    path = directory / JOURNAL_NAME
    if not path.exists():
        return state
    for line in path.read_bytes().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a torn last line
        state.apply(entry)
    return state


class Journal:
    """Appends state changes; ``fsync()`` is called by the store under its fsync policy."""

    def __init__(self, directory: Path, state: BufferState, live_groups: set[int]) -> None:
        self.path = directory / JOURNAL_NAME
        self._write_snapshot(state, live_groups)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._lines = 0
        self._dirty = False

    def append(self, entry: dict) -> None:
        data = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        os.write(self._fd, data)
        self._lines += 1
        self._dirty = True

    @property
    def dirty(self) -> bool:
        """Lines were written since the last fsync (or duplicate handed out for one)."""
        return self._dirty

    @property
    def needs_compaction(self) -> bool:
        return self._lines >= COMPACT_EVERY

    def dup_fd(self) -> int:
        """A duplicate descriptor, for an fsync on another thread (see ReplayStore.sync_fds)."""
        self._dirty = False  # whoever holds the duplicate fsyncs what was written so far
        return os.dup(self._fd)

    def fsync(self) -> None:
        if self._dirty:
            os.fsync(self._fd)
            self._dirty = False

    def compact(self, state: BufferState, live_groups: set[int]) -> None:
        os.close(self._fd)
        self._write_snapshot(state, live_groups)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._lines = 0

    def close(self) -> None:
        if self._fd >= 0:
            self.fsync()
            os.close(self._fd)
            self._fd = -1

    def _write_snapshot(self, state: BufferState, live_groups: set[int]) -> None:
        """One line holding the whole state, restricted to groups still on disk."""
        entry = {
            "op": "snapshot",
            "learner_version": state.learner_version,
            "samples": state.samples,
            "times_sampled": {str(g): c for g, c in state.times_sampled.items() if g in live_groups},
            "evicted": {str(g): s for g, s in state.evicted.items() if g in live_groups},
            "evicted_rows": state.evicted_rows,
            "evicted_groups": state.evicted_groups,
            "leases": {str(k): g for k, g in state.leases.items()},
            "next_lease": state.next_lease,
        }
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as handle:
            handle.write((json.dumps(entry, separators=(",", ":")) + "\n").encode())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)  # else a power loss may bring back the old file, and lose
        # the lines appended to the new one since (acknowledged sample counts)
