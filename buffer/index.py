"""The in-memory index over stored trajectories: small numpy columns, no row data.

Row data stays in memory-mapped segments; per row the index keeps ~40 bytes (ids as 64-bit
hashes, where the row lives, its oldest policy version, reward, response length, actor and
data-source codes) and per group its state (size, oldest version, reward range, times
sampled, status). Sampling, eviction and statistics are vectorised over these columns.

traj_id and group_id are keyed by 64-bit xxh3 hashes: a collision drops a row as a duplicate
with probability ~N²/2⁶⁵ (about 3e-8 at a million rows), which keeps the index a few numpy
arrays instead of a dict of a million Python strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash


class Status(IntEnum):
    """A group's state; everything but LIVE is terminal (never sampled again)."""

    LIVE = 0
    CONSUMED = 1  # returned max_times_sampled times
    ZERO_ADVANTAGE = 2  # all rewards equal: every advantage would be 0
    STALE = 3  # older than max_staleness policy versions
    CAPACITY = 4  # evicted oldest-first to respect capacity_rows / capacity_bytes


EVICTION_REASONS = {s: s.name.lower() for s in Status if s is not Status.LIVE}


def hash_ids(ids: list[str]) -> np.ndarray:
    """``[n] uint64`` xxh3 hashes of id strings."""
    digest = xxhash.xxh3_64_intdigest
    return np.fromiter((digest(i.encode()) for i in ids), dtype=np.uint64, count=len(ids))


def hash_repeated_ids(ids: pa.Array) -> np.ndarray:
    """:func:`hash_ids` of a string column whose values repeat (a batch's group ids: one per
    response), hashing each distinct value once."""
    encoded = pc.dictionary_encode(ids)
    return hash_ids(encoded.dictionary.to_pylist())[encoded.indices.to_numpy(zero_copy_only=False)]


class Column:
    """A growable 1-D numpy array (amortised O(1) append of a block)."""

    def __init__(self, dtype, fill=0) -> None:
        self._data = np.full(1024, fill, dtype=dtype)
        self._fill = fill
        self.size = 0

    def extend(self, values: np.ndarray) -> None:
        end = self.size + len(values)
        if end > len(self._data):
            grown = np.full(max(end, 2 * len(self._data)), self._fill, dtype=self._data.dtype)
            grown[: self.size] = self._data[: self.size]
            self._data = grown
        self._data[self.size : end] = values
        self.size = end

    @property
    def view(self) -> np.ndarray:
        return self._data[: self.size]


class HashSet:
    """Membership of uint64 hashes: a sorted array plus a small set of recent additions."""

    MERGE_AT = 1 << 16  # recent additions merged into the sorted array past this many

    def __init__(self) -> None:
        self._sorted = np.zeros(0, dtype=np.uint64)
        self._recent: set[int] = set()

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """``[n] bool``: which hashes are already present."""
        pos = np.searchsorted(self._sorted, hashes)
        found = self._sorted[np.minimum(pos, len(self._sorted) - 1)] == hashes if len(
            self._sorted
        ) else np.zeros(len(hashes), dtype=bool)
        as_ints = hashes.tolist()  # Python ints at C speed: numpy scalars hash slowly
        if self._recent and not self._recent.isdisjoint(as_ints):  # new ids: the usual case
            found |= np.fromiter((h in self._recent for h in as_ints), bool, len(as_ints))
        return found

    def add(self, hashes: np.ndarray) -> None:
        self._recent.update(hashes.tolist())
        if len(self._recent) >= self.MERGE_AT:
            merged = np.concatenate([self._sorted, np.fromiter(self._recent, np.uint64)])
            self._sorted = np.sort(merged)
            self._recent.clear()


class Codes:
    """Small dictionary encoding of repeated strings (actor ids, data sources)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._codes: dict[str, int] = {}

    def encode(self, values: pa.Array) -> np.ndarray:
        """``[n] int32`` codes of a string array (dictionary-encoded, so cheap per row)."""
        encoded = pc.dictionary_encode(values)
        table = np.fromiter(
            (self._code(v) for v in encoded.dictionary.to_pylist()), np.int32, len(encoded.dictionary)
        )
        return table[encoded.indices.to_numpy(zero_copy_only=False)]

    def _code(self, value: str) -> int:
        code = self._codes.get(value)
        if code is None:
            code = self._codes[value] = len(self.names)
            self.names.append(value)
        return code


class TrajectoryIndex:
    """Row and group columns; row i is the i-th row stored since the store was opened."""

    def __init__(self) -> None:
        self.traj_hashes = HashSet()
        self.row_group = Column(np.int32)
        self.row_batch = Column(np.int32)
        self.row_offset = Column(np.int32)  # row number inside its record batch
        self.row_min_version = Column(np.int64)
        self.row_reward = Column(np.float32)
        self.row_correct = Column(np.bool_)
        self.row_resp_len = Column(np.int32)
        self.row_actor = Column(np.int32)
        self.row_source = Column(np.int32)
        self.group_hash = Column(np.uint64)
        self.group_size = Column(np.int32)
        self.group_count = Column(np.int32)
        self.group_first_row = Column(np.int64)
        self.group_min_version = Column(np.int64)
        self.group_reward_min = Column(np.float32)
        self.group_reward_max = Column(np.float32)
        self.group_times_sampled = Column(np.int32)
        self.group_status = Column(np.int8)
        self.group_of_hash: dict[int, int] = {}
        self.scattered: dict[int, list[int]] = {}  # groups whose rows are not contiguous
        self.actors = Codes()
        self.sources = Codes()
        self.completed_groups = 0  # groups whose last row arrived (rate limiter's inserts)

    @property
    def n_rows(self) -> int:
        return self.row_group.size

    @property
    def n_groups(self) -> int:
        return self.group_hash.size

    def add_rows(self, batch_id: int, rows: RowFacts) -> None:
        """Index rows of one stored record batch (new ones only: the caller deduplicates)."""
        start = self.n_rows
        n = len(rows.traj_hashes)
        self.traj_hashes.add(rows.traj_hashes)
        groups = self._group_ids(rows, start)
        self.row_group.extend(groups)
        self.row_batch.extend(np.full(n, batch_id, dtype=np.int32))
        self.row_offset.extend(rows.offsets)
        self.row_min_version.extend(rows.min_versions)
        self.row_reward.extend(rows.rewards)
        self.row_correct.extend(rows.correct)
        self.row_resp_len.extend(rows.resp_lens)
        self.row_actor.extend(self.actors.encode(rows.actor_ids))
        self.row_source.extend(self.sources.encode(rows.data_sources))

    def _group_ids(self, rows: RowFacts, start: int) -> np.ndarray:
        """Group number of every row; creates new groups (numbered in order of first
        appearance, so group numbers follow insertion order) and updates aggregates."""
        uniq, first, inverse, counts = np.unique(
            rows.group_hashes, return_index=True, return_inverse=True, return_counts=True
        )
        lookup = self.group_of_hash.get
        gids = np.fromiter((lookup(h, -1) for h in uniq.tolist()), np.int64, len(uniq))
        for k in np.flatnonzero(gids >= 0).tolist():  # more rows of an already stored group
            members = np.flatnonzero(inverse == k)
            self._extend_group(int(gids[k]), members + start, rows, members)
        new = np.argsort(first)
        new = new[gids[new] < 0]
        if len(new):
            gids[new] = self._new_groups(rows, start, uniq, first, inverse, counts, new)
        return gids[inverse].astype(np.int32)

    def _new_groups(self, rows: RowFacts, start, uniq, first, inverse, counts, new) -> np.ndarray:
        """Create the groups ``uniq[new]`` in bulk; returns their group numbers."""
        gids = np.arange(self.n_groups, self.n_groups + len(new))
        vmin = np.full(len(uniq), np.iinfo(np.int64).max)
        np.minimum.at(vmin, inverse, rows.min_versions)
        rmin = np.full(len(uniq), np.inf, np.float32)
        np.minimum.at(rmin, inverse, rows.rewards)
        rmax = np.full(len(uniq), -np.inf, np.float32)
        np.maximum.at(rmax, inverse, rows.rewards)
        last = np.zeros(len(uniq), np.int64)
        np.maximum.at(last, inverse, np.arange(len(inverse)))
        sizes = rows.group_sizes[first[new]]
        self.group_of_hash.update(zip(uniq[new].tolist(), gids.tolist(), strict=True))
        self.group_hash.extend(uniq[new])
        self.group_size.extend(sizes)
        self.group_count.extend(counts[new])
        self.group_first_row.extend(first[new] + start)
        self.group_min_version.extend(vmin[new])
        self.group_reward_min.extend(rmin[new])
        self.group_reward_max.extend(rmax[new])
        self.group_times_sampled.extend(np.zeros(len(new)))
        self.group_status.extend(np.full(len(new), Status.LIVE))
        self.completed_groups += int((counts[new] >= sizes).sum())
        for k, gid in zip(new.tolist(), gids.tolist(), strict=True):
            if last[k] - first[k] + 1 != counts[k]:  # interleaved with other groups' rows
                self.scattered[gid] = (np.flatnonzero(inverse == k) + start).tolist()
        return gids

    def _extend_group(self, gid: int, members: np.ndarray, rows: RowFacts, local: np.ndarray) -> None:
        count = self.group_count.view
        first = int(self.group_first_row.view[gid])
        contiguous = gid not in self.scattered and first + count[gid] == members[0]
        contiguous = contiguous and bool(np.all(np.diff(members) == 1))
        if not contiguous:
            existing = self.scattered.get(gid) or list(range(first, first + int(count[gid])))
            self.scattered[gid] = existing + members.tolist()
        was_complete = count[gid] >= self.group_size.view[gid]
        count[gid] += len(members)
        if not was_complete and count[gid] >= self.group_size.view[gid]:
            self.completed_groups += 1
        vmin = self.group_min_version.view
        vmin[gid] = min(vmin[gid], rows.min_versions[local].min())
        rmin, rmax = self.group_reward_min.view, self.group_reward_max.view
        rmin[gid] = min(rmin[gid], rows.rewards[local].min())
        rmax[gid] = max(rmax[gid], rows.rewards[local].max())

    def group_rows(self, gid: int) -> np.ndarray:
        """Row numbers of a group, in insertion order."""
        rows = self.scattered.get(gid)
        if rows is not None:
            return np.asarray(rows, dtype=np.int64)
        first = int(self.group_first_row.view[gid])
        return np.arange(first, first + int(self.group_count.view[gid]))

    def complete(self) -> np.ndarray:
        """``[groups] bool``: every response of the group is stored."""
        return self.group_count.view >= self.group_size.view


@dataclass
class RowFacts:
    """What the index keeps of the rows of one batch (all arrays are ``[n]``)."""

    offsets: np.ndarray  # the rows' positions inside their record batch
    traj_hashes: np.ndarray
    group_hashes: np.ndarray
    group_sizes: np.ndarray
    min_versions: np.ndarray
    rewards: np.ndarray
    correct: np.ndarray
    resp_lens: np.ndarray
    actor_ids: pa.Array
    data_sources: pa.Array
