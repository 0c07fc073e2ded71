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
"""

from __future__ import annotations

import os
import threading


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
