"""Where an actor's prompts come from: a prepared dataset file, reshuffled every epoch.

Synthetic tasks are written to ``RUN_DIR/data/train.parquet`` by ``async_rl/prepare.py``, so
an actor only ever reads a file (``tasks/dataset.py`` row format).

An actor takes ``Handout``s (a prompt row and the group id its samples go under) from a
prompt source and reports each one settled once its group is acknowledged by the buffer (or
skipped). In a job the source is ``LeasedPrompts``: rows named by the job's data cursor
(``buffer/cursor.py``), so every prompt of an epoch goes to one actor once and a resume
re-hands what was in flight. Alone (tests, studies) it is ``StreamPrompts`` over a local
stream, with fresh group ids.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from async_rl.tasks.dataset import PromptRow, load_rows
from async_rl.tasks.encoding import encode_prompt as encode_prompt  # the actors' prompt ids


@dataclass(frozen=True)
class Handout:
    group_id: str  # the buffer group its samples are stored under
    row: PromptRow


class PromptSource(Protocol):
    async def take(self) -> Handout: ...

    def settled(self, group_id: str, *, skipped: bool = False) -> None: ...


class StreamPrompts:
    """A local prompt iterator; every hand-out gets a fresh group id, nothing is tracked."""

    def __init__(self, rows: Iterator[PromptRow], *, actor_id: str):
        self._rows = rows
        self._actor_id = actor_id

    async def take(self) -> Handout:
        return Handout(f"{self._actor_id}-{uuid.uuid4().hex[:16]}", next(self._rows))

    def settled(self, group_id: str, *, skipped: bool = False) -> None:
        pass


# lease(n) -> Future[[(group_id, row index), ...]]; settle(group_ids, skipped) -> None (no wait)
Lease = Callable[[int], Future]
Settle = Callable[[list[str], bool], None]


class LeasedPrompts:
    """Prompts handed out by the job's data cursor, one lease per group taken."""

    def __init__(self, rows: Sequence[PromptRow], *, lease: Lease, settle: Settle):
        self._rows = rows
        self._lease = lease
        self._settle = settle

    async def take(self) -> Handout:
        leased = await asyncio.wrap_future(self._lease(1))
        (group_id, index), = leased
        if not 0 <= index < len(self._rows):
            raise ValueError(f"prompt cursor: row index {index} outside the {len(self._rows)} rows of this dataset")
        return Handout(group_id, self._rows[index])

    def settled(self, group_id: str, *, skipped: bool = False) -> None:
        self._settle([group_id], skipped)


def prompt_stream(rows: Sequence[PromptRow], *, seed: int) -> Iterator[PromptRow]:
    """Endless stream over ``rows``: each epoch is a fresh permutation (reproducible by seed)."""
    if not rows:
        raise ValueError("prompt_stream: no prompt rows")
    rng = random.Random(seed)
    order = list(range(len(rows)))
    while True:
        rng.shuffle(order)
        for index in order:
            yield rows[index]


def file_prompts(path: str | Path, *, seed: int) -> Iterator[PromptRow]:
    rows, _ = load_rows(path)
    return prompt_stream(rows, seed=seed)
