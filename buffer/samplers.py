"""Which sampleable groups a sample returns: pure functions of the index columns.

Each sampler gets the candidate group numbers (ascending = insertion order), the per-group
columns of oldest policy version and times sampled (indexed by group number, so a sampler
that ignores them costs nothing per group), and returns at most ``n`` distinct group numbers.
Adding a sampler is a function here and its entry in ``SAMPLERS``: ``buffer.sampler`` takes
its choices (and their descriptions, from each docstring's first clause) from that map.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from buffer.schema import staleness

# Prioritized weight = exp(-FRESHNESS_DECAY * staleness) / (1 + times_sampled) ** REUSE_PENALTY:
# one policy version of lag roughly halves a group's chance, as does each previous use.
FRESHNESS_DECAY = 0.7
REUSE_PENALTY = 1.0

Sampler = Callable[[np.ndarray, np.ndarray, np.ndarray, int, int, np.random.Generator], np.ndarray]


def fifo(candidates, min_versions, times_sampled, learner_version, n, rng) -> np.ndarray:
    """First in, first out: the oldest stored groups that are still fresh enough."""
    return candidates[:n]


def freshest(candidates, min_versions, times_sampled, learner_version, n, rng) -> np.ndarray:
    """Newest policy version first (last in, first out): the groups of the newest policy version, the most
    recently stored first among equals. Older groups wait and age out at ``max_staleness``."""
    order = np.lexsort((-candidates, -min_versions[candidates]))
    return np.sort(candidates[order[:n]])


def uniform(candidates, min_versions, times_sampled, learner_version, n, rng) -> np.ndarray:
    """Uniformly: every candidate group equally likely, without replacement."""
    if len(candidates) <= n:
        return candidates
    return np.sort(rng.choice(candidates, size=n, replace=False))


def prioritized(candidates, min_versions, times_sampled, learner_version, n, rng) -> np.ndarray:
    """By freshness and reuse: fresher and less-reused groups are likelier, without replacement."""
    if len(candidates) <= n:
        return candidates
    lag = np.maximum(staleness(learner_version, min_versions[candidates]), 0)
    weight = np.exp(-FRESHNESS_DECAY * lag) / (1.0 + times_sampled[candidates]) ** REUSE_PENALTY
    picked = rng.choice(candidates, size=n, replace=False, p=weight / weight.sum())
    return np.sort(picked)


SAMPLERS: dict[str, Sampler] = {
    "fifo": fifo, "freshest": freshest, "uniform": uniform, "prioritized": prioritized,
}
