"""A Reverb-style rate limiter counted in groups: a minimum size and a samples-per-insert ratio.

With ratio ``spi`` and tolerance ``tol`` the buffer keeps ``diff = spi * inserted - sampled``
inside ``[min_size * spi - tol, min_size * spi + tol]``: a sample that would push ``diff``
below the floor waits (the learner is ahead of the actors), an insert while ``diff`` is above
the ceiling is refused (the actors are ahead of the learner and must retry).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RateLimiter:
    min_size_to_sample: int
    samples_per_insert: float | None = None
    tolerance: float = 0.0
    inserted: int = 0  # complete groups inserted
    sampled: int = 0  # groups returned by samples

    def sample_refusal(self, n_groups: int, available: int) -> str | None:
        """Why sampling ``n_groups`` must wait now, or None if it may proceed."""
        need = max(self.min_size_to_sample, n_groups)
        if available < need:
            return (
                f"not_enough_groups: {available} sampleable group(s), need {need} "
                f"(min_size_to_sample={self.min_size_to_sample}, requested {n_groups})"
            )
        if self.samples_per_insert is None:
            return None
        floor = self.min_size_to_sample * self.samples_per_insert - self.tolerance
        diff = self.samples_per_insert * self.inserted - (self.sampled + n_groups)
        if diff < floor:
            return (
                f"rate_limited: sampling {n_groups} more group(s) would exceed "
                f"samples_per_insert={self.samples_per_insert} (inserted {self.inserted}, "
                f"sampled {self.sampled}, tolerance {self.tolerance})"
            )
        return None

    def insert_refusal(self) -> str | None:
        """Why an insert must be retried later, or None if it may proceed."""
        if self.samples_per_insert is None:
            return None
        ceiling = self.min_size_to_sample * self.samples_per_insert + self.tolerance
        diff = self.samples_per_insert * self.inserted - self.sampled
        if diff > ceiling:
            return (
                f"rate_limited: actors are {diff:.0f} sampled group(s) ahead of the learner "
                f"(samples_per_insert={self.samples_per_insert}, tolerance {self.tolerance}); retry"
            )
        return None
