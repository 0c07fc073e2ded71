"""Wall-clock time of a learner step's phases (decode, packing, proximal pass, forward+backward,
optimizer, metrics, publish, ...), summed per phase and read once per step.

The learner loop logs the sums as ``time/<phase>`` in its metrics. Phases are timed on the host
only: on a GPU a phase ends when its kernels are queued, not run, unless a ``sync`` is given
(``benchmarks/step_profile.py`` passes ``torch.cuda.synchronize``); the job passes none, so the
timer adds no host sync to the hot path.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator


class PhaseTimer:
    """Accumulates seconds per phase name until :meth:`take` hands them over and resets."""

    def __init__(self, sync: Callable[[], None] | None = None):
        self.sync = sync
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.sync is not None:
            self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync is not None:
                self.sync()
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.counts[name] = self.counts.get(name, 0) + 1

    def take(self) -> dict[str, float]:
        """The seconds per phase since the last call (``time/<phase>`` keys), then reset."""
        out = {f"time/{name}": value for name, value in self.seconds.items()}
        self.seconds, self.counts = {}, {}
        return out
