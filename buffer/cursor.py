"""The data cursor: which prompts of an epoch were handed out, and which of those are done.

Definitions (the contract a resume relies on):

- The training file's valid rows are numbered ``0 .. n_prompts-1`` (``tasks/dataset.py`` order).
  Epoch ``e`` hands every row out once, in a permutation derived from ``seed`` (epoch after
  epoch the same ``random.Random(seed)`` reshuffles the previous order, so one actor sees the
  order a local ``actors.prompts.prompt_stream(rows, seed=seed)`` would give).
- A hand-out is named by its key ``(e, i)`` and becomes the buffer's ``group_id``
  ``e{e}-{i}-{cursor_id}``: the same prompt of the same epoch always has the same group id, so
  the buffer stores at most one group for it (inserts are idempotent on ``traj_id`` =
  ``{group_id}:{k}``, and on the group ids of retired segments).
- A prompt is **done** when its group is durable in the buffer (acknowledged, so fsynced).
  It is **in flight** when it was handed out and is not done; **pending** when its epoch has
  not reached it yet. An actor may also *skip* a prompt (longer than the context): it counts
  as settled, never as done.

The durable record is ``BUFFER_DIR/cursor.json`` (write-to-temp, fsync, rename, fsync the
folder), rewritten *before* any key is handed out: ``epoch``, ``handed`` (positions of the
current epoch's order given out so far), ``outstanding`` (keys handed out and not yet known
to be done) and ``skipped``. Invariant: every key ever handed out is durable in the buffer,
or listed in ``outstanding`` or ``skipped`` of the record on disk. Done reports only shrink
the in-memory set (the next write drops them), so losing one costs nothing: on open, the
owner checks ``outstanding`` against the buffer (``durable_groups``) and drops what is done.

On resume every outstanding key that is not done is handed out again, first and in epoch
order, before the cursor moves on; no done key is ever handed out again. The same happens
within a job for the keys of an actor that died (``release``).

Not thread-safe by itself: the owner (the controller) calls it under one lock.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import tempfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from buffer.segments import fsync_dir

CURSOR_FILE = "cursor.json"
FORMAT = 1

Key = tuple[int, int]  # (epoch, row index)


def group_id(cursor_id: str, key: Key) -> str:
    return f"e{key[0]}-{key[1]}-{cursor_id}"


def parse_group_id(cursor_id: str, gid: str) -> Key | None:
    """The key of a group id this cursor made, or None for any other group id."""
    head, _, tail = gid.rpartition("-")
    epoch, _, index = head.partition("-")
    if tail != cursor_id or not epoch.startswith("e") or not epoch[1:].isdigit() or not index.isdigit():
        return None
    return int(epoch[1:]), int(index)


class CursorMismatch(ValueError):
    """The record was made for another dataset or seed."""


@dataclass
class CursorRecord:
    cursor_id: str
    n_prompts: int
    seed: int
    epoch: int = 0
    handed: int = 0
    outstanding: list[Key] = field(default_factory=list)
    skipped: list[Key] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"format": FORMAT, "cursor_id": self.cursor_id, "n_prompts": self.n_prompts,
                "seed": self.seed, "epoch": self.epoch, "handed": self.handed,
                "outstanding": [list(k) for k in self.outstanding],
                "skipped": [list(k) for k in self.skipped]}

    @classmethod
    def from_json(cls, data: dict, path: Path) -> CursorRecord:
        try:
            if data.get("format") != FORMAT:
                raise ValueError(f"format={data.get('format')!r}, expected {FORMAT}")
            return cls(
                cursor_id=str(data["cursor_id"]), n_prompts=int(data["n_prompts"]), seed=int(data["seed"]),
                epoch=int(data["epoch"]), handed=int(data["handed"]),
                outstanding=[(int(e), int(i)) for e, i in data["outstanding"]],
                skipped=[(int(e), int(i)) for e, i in data["skipped"]],
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a prompt cursor record ({type(err).__name__}: {err})") from None


def read_record(directory: Path) -> CursorRecord | None:
    """The cursor record of a buffer folder, or None when the job never handed out a prompt."""
    path = Path(directory) / CURSOR_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path}: not JSON ({err})") from None
    return CursorRecord.from_json(data, path)


def check_record(directory: Path, *, n_prompts: int, seed: int) -> CursorRecord | None:
    """The folder's record if it was made for ``n_prompts`` rows in order ``seed`` (None if
    there is none); CursorMismatch, naming both, if it was made for other data."""
    record = read_record(directory)
    if record is not None and (record.n_prompts, record.seed) != (n_prompts, seed):
        raise CursorMismatch(
            f"{Path(directory) / CURSOR_FILE}: made for {record.n_prompts} prompts in order seed "
            f"{record.seed}, but the job has {n_prompts} prompts and seed {seed}; resume with the same "
            "data and run.seed/data.seed, or start a new run.dir"
        )
    return record


def progress(record: CursorRecord, durable) -> dict:
    """Prompts done / in flight / pending of the record's current epoch.

    ``durable(group_ids) -> list[bool]`` says which groups the buffer holds (or retired)."""
    keys = list(record.outstanding)
    present = durable([group_id(record.cursor_id, k) for k in keys]) if keys else []
    in_flight = [k for k, done in zip(keys, present, strict=True) if not done]
    now = sum(1 for e, _ in in_flight if e == record.epoch)
    skipped = sum(1 for e, _ in record.skipped if e == record.epoch)
    return {
        "epoch": record.epoch, "prompts": record.n_prompts,
        "done": record.handed - now - skipped, "in_flight": now, "pending": record.n_prompts - record.handed,
        "skipped": skipped, "in_flight_earlier_epochs": len(in_flight) - now,
    }


class PromptCursor:
    """Hands out prompt keys (``lease``), takes done/skip reports, persists before handing out."""

    def __init__(self, directory: Path, record: CursorRecord) -> None:
        self.path = Path(directory) / CURSOR_FILE
        self.record = record
        self._rng, self._order = epoch_order(record.n_prompts, record.seed, record.epoch)
        # Outstanding keys and their holder (None: nobody holds it, hand it out again first).
        self._holder: dict[Key, str | None] = {k: None for k in record.outstanding}
        self._again: deque[Key] = deque(sorted(record.outstanding))
        self._skipped: set[Key] = set(record.skipped)

    @classmethod
    def open(cls, directory: Path, *, n_prompts: int, seed: int) -> PromptCursor:
        """The folder's cursor (every outstanding key to be handed out again), or a new one."""
        if n_prompts < 1:
            raise ValueError(f"n_prompts={n_prompts}: the training data has no valid rows")
        record = check_record(directory, n_prompts=n_prompts, seed=seed)
        if record is None:
            record = CursorRecord(cursor_id=secrets.token_hex(4), n_prompts=n_prompts, seed=seed)
        cursor = cls(directory, record)
        cursor.save()
        return cursor

    # ------------------------------------------------------------------ hand out

    @property
    def cursor_id(self) -> str:
        return self.record.cursor_id

    def lease(self, holder: str, n: int) -> list[tuple[str, int]]:
        """``n`` prompts for ``holder`` as ``(group_id, row index)``, durable before returned:
        first keys to hand out again, then the next positions of the epoch's order."""
        keys = []
        while len(keys) < n and self._again:
            key = self._again.popleft()
            if key in self._holder and self._holder[key] is None:
                keys.append(key)
        while len(keys) < n:
            keys.append(self._advance())
        for key in keys:
            self._holder[key] = holder
        self.save()
        return [(group_id(self.cursor_id, k), k[1]) for k in keys]

    def _advance(self) -> Key:
        rec = self.record
        if rec.handed == rec.n_prompts:
            rec.epoch, rec.handed = rec.epoch + 1, 0
            self._rng.shuffle(self._order)
            self._skipped = {k for k in self._skipped if k[0] >= rec.epoch - 1}
        key = (rec.epoch, self._order[rec.handed])
        rec.handed += 1
        return key

    # ------------------------------------------------------------------ reports

    def settle(self, group_ids: list[str], *, skipped: bool = False) -> int:
        """Forget keys whose group is durable (or that were skipped); returns how many were known.
        Takes effect on disk with the next write."""
        settled = 0
        for gid in group_ids:
            key = parse_group_id(self.cursor_id, gid)
            if key in self._holder:
                del self._holder[key]
                settled += 1
                if skipped:
                    self._skipped.add(key)
        return settled

    def outstanding(self, holder: str | None = None) -> list[str]:
        """Group ids handed out and not reported done (of one holder, or all)."""
        return [group_id(self.cursor_id, k) for k, h in sorted(self._holder.items())
                if holder is None or h == holder]

    def release(self, group_ids: list[str]) -> None:
        """These outstanding keys are held by nobody any more (their actor died or stopped):
        they are handed out again before anything new, in epoch order."""
        keys = [k for k in (parse_group_id(self.cursor_id, g) for g in group_ids) if k in self._holder]
        for key in keys:
            self._holder[key] = None
        self._again = deque(sorted(set(self._again) | set(keys)))
        self.save()

    def in_flight(self) -> int:
        return len(self._holder)

    # ------------------------------------------------------------------ durability

    def save(self) -> None:
        rec = self.record
        rec.outstanding = sorted(self._holder)
        rec.skipped = sorted(self._skipped)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        with os.fdopen(fd, "w") as handle:
            json.dump(rec.to_json(), handle, separators=(",", ":"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)


def epoch_order(n: int, seed: int, epoch: int) -> tuple[random.Random, list[int]]:
    """Row indices in the order epoch ``epoch`` hands them out, and the generator that shuffles
    the next epoch's: one ``random.Random(seed)`` reshuffles the previous order in place, epoch
    after epoch (as ``actors.prompts.prompt_stream`` does)."""
    rng = random.Random(seed)
    order = list(range(n))
    for _ in range(epoch + 1):
        rng.shuffle(order)
    return rng, order
