"""Group commit: one fsync acknowledges every request written before it started.

The service loop writes a request's bytes (segment batch, journal line) at once and parks its
reply on the round it needs: the first round that *starts* after the write. A round fsyncs
duplicates of the store's descriptors on a background thread (``os.fsync`` releases the GIL),
so while one fsync is in flight the loop keeps appending arriving batches, and all of them
wait for the next round. An acknowledgement therefore still means an fsync covered the row;
with many writers one fsync covers many batches (as databases and Kafka do).

When a round ends the thread writes a byte to a pipe that the loop polls beside its socket.
An fsync that fails leaves the page cache in an unknown state: ``error`` is set and the
owner must stop and recover from disk rather than acknowledge anything more.

:class:`CommitQueue` is what an owner holds acknowledgements in until their round has ended:
the service loop's replies, and a single in-process writer's acks (``ReplayStore.insert_many``),
which keeps several batches in flight so that its next batch's work runs while the fsync of
the ones before runs.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable


class GroupCommit:
    def __init__(self) -> None:
        self.wake_fd, self._wake_tx = os.pipe()
        os.set_blocking(self.wake_fd, False)
        self.started = 0  # rounds handed to the thread
        self.completed = 0  # rounds whose fsyncs returned (read on the loop's thread)
        self.error: OSError | None = None
        self._ready = threading.Condition()
        self._fds: list[int] | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="buffer-fsync", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self.started > self.completed

    @property
    def next_round(self) -> int:
        """The round a write made now is covered by."""
        return self.started + 1

    def start(self, fds: list[int]) -> None:
        """Fsync (then close) ``fds`` as the next round; only when not ``busy``."""
        assert not self.busy, "one round at a time: a round covers all writes before it starts"
        with self._ready:
            self._fds = fds
            self.started += 1
            self._ready.notify()

    def poll(self) -> None:
        """Take the thread's wake-ups (call when ``wake_fd`` is readable)."""
        try:
            while os.read(self.wake_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until the thread has ended a round since the last :meth:`poll` (or the timeout)."""
        select.select([self.wake_fd], [], [], timeout_s)

    def _run(self) -> None:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: self._fds is not None or self._closing)
                if self._fds is None:
                    return
                fds, self._fds = self._fds, None
            error = None
            for fd in fds:
                try:
                    if error is None:
                        os.fsync(fd)
                except OSError as err:
                    error = err
                finally:
                    os.close(fd)
            with self._ready:
                self.error = self.error or error
                self.completed += 1
            os.write(self._wake_tx, b"\0")

    def close(self) -> None:
        """Wait for a round in flight, then stop the thread (a second call does nothing)."""
        if self._closing:
            return
        with self._ready:
            self._closing = True
            self._ready.notify()
        self._thread.join()
        os.close(self.wake_fd)
        os.close(self._wake_tx)


class CommitQueue:
    """Acknowledgements held until the group-commit round that covers them has ended.

    Rounds only grow in the order things are held, so :meth:`settle` releases them in that
    order. It also keeps the fsync thread busy: when a round ends and something still waits,
    the next round starts at once (it covers every write made meanwhile); a write made while
    the thread is idle starts its own round (``ReplayStore._covering_round``).
    """

    def __init__(self, commit: GroupCommit, sync_fds: Callable[[], list[int]]) -> None:
        self.commit = commit
        self._sync_fds = sync_fds  # what a round must fsync, taken when it starts
        self._held: list[tuple[int, object]] = []

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, round_: int, item) -> None:
        """Keep ``item`` until round ``round_`` has ended."""
        self._held.append((round_, item))

    def settle(self) -> list:
        """The items whose round has ended, in the order held; starts the next round when
        items still wait and the thread is idle. Raises the ``OSError`` of a failed fsync:
        nothing held may then be acknowledged (see :meth:`drop`)."""
        self.commit.poll()
        if self.commit.error is not None:
            raise self.commit.error
        done = self.commit.completed
        ready = [item for round_, item in self._held if round_ <= done]
        self._held = [(round_, item) for round_, item in self._held if round_ > done]
        if self._held and not self.commit.busy:
            self.commit.start(self._sync_fds())
        return ready

    def drop(self) -> list:
        """Everything still held, released unacknowledged (after a failed fsync)."""
        items = [item for _, item in self._held]
        self._held.clear()
        return items
