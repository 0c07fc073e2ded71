"""Seeds derived from a job's seed: every random stream of a job gets its own.

A job has one ``run.seed``. The job's prompt order (one for all its actors), the sampling of each
actor and each seed of a study are derived from it by hashing the stream's name, so two streams never share a
seed by construction and different ``run.seed`` values give independent streams (not shifted
copies of one another, as ``seed + i`` schemes give).
"""

from __future__ import annotations

import hashlib

# Seeds handed to vLLM must fit a signed 32-bit int on every backend.
SEED_MODULUS = 2**31 - 1


def derive_seed(*parts: object) -> int:
    """A seed in [0, 2^63) determined by ``parts`` (ints and strings), e.g.
    ``derive_seed("sampling", run_seed, "actor-0")``."""
    text = "\x1f".join(f"{type(p).__name__}:{p}" for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def prompt_order_seed(run_seed: int, data_seed: int) -> int:
    """The seed of a job's prompt order (one order for all its actors: ``buffer/cursor.py``).
    The stream is named like the one a lone actor 0 draws, so a one-actor job and a local
    ``prompt_stream`` of actor 0 hand prompts out in the same order."""
    return derive_seed("prompts", run_seed, data_seed, 0)


class SeedWindows:
    """Per-request sampling seeds whose samples never share a random stream.

    vLLM seeds sample ``i`` of a request seeded ``s`` with ``s + i``
    (``vllm/v1/engine/parallel_sampling.py``), so a request of ``n`` samples occupies the
    window ``[s, s + n)``. Windows are handed out back to back from a start derived from
    ``key``: consecutive requests never overlap (a counter seed ``base + r`` would make
    request r+1 reuse n−1 of request r's streams), and a window never runs past the
    largest seed.
    """

    def __init__(self, key: int):
        self._next = key % SEED_MODULUS

    def take(self, n: int) -> int:
        """The seed of the next request of ``n`` samples."""
        if n < 1 or n > SEED_MODULUS:
            raise ValueError(f"n={n}: a request samples between 1 and {SEED_MODULUS} responses")
        if self._next + n > SEED_MODULUS:
            self._next = 0
        start = self._next
        self._next += n
        return start
