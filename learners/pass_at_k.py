"""Unbiased pass@k (Chen et al. 2021, the Codex paper) and avg@k (ALGORITHMS.md §4).

pass@k = 1 − C(n−c, k)/C(n, k) for n samples of which c are correct (n ≥ k). The product form
1 − Π_{i=n−c+1}^{n} (1 − k/i) avoids huge binomials; it is 1 when n − c < k.
"""

from __future__ import annotations

from math import comb, prod


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k(n={n}, c={c}, k={k}): need 0 <= c <= n and 1 <= k <= n")
    if n - c < k:
        return 1.0
    return 1.0 - prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k_binomial(n: int, c: int, k: int) -> float:
    """The same estimator from exact binomials (reference for tests; slow for large n)."""
    return 1.0 - comb(n - c, k) / comb(n, k)


def mean_pass_at_k(samples: list[tuple[int, int]], k: int) -> float:
    """Average of pass@k over problems given (n, c) per problem; k=1 gives avg@n."""
    return sum(pass_at_k(n, c, k) for n, c in samples) / len(samples)
