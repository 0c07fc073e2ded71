"""The staleness policy and the staleness-aware clip schedules ε(s) (DESIGN §3.3, ALGORITHMS §3).

A row's staleness ``s = learner_version − min(token_versions)`` is defined once, by the
trajectory contract (:func:`buffer.schema.row_staleness`). Rows with ``s > max_staleness``
never contribute.
Schedules map the configured ε0 to ε(s): constant ε0, linear widening ε0·(1+κs), inverse
tightening ε0/(1+κs), clamped to [eps_min, eps_max]; ε(0) == ε0 exactly for every schedule.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from async_rl.config import StalenessScheduleConfig
from learners.objectives import ObjectiveConfig

# ε_l(s) must stay below 1 so the low bound 1−ε_l remains a positive ratio.
MAX_EPS_LOW = 0.999
def fresh_rows(staleness: Tensor | np.ndarray, max_staleness: int) -> Tensor | np.ndarray:
    """[B] bool: rows that may contribute (``s ≤ max_staleness``)."""
    return staleness <= max_staleness


def _constant(eps0: float, s: Tensor, kappa: float) -> Tensor:
    return torch.full_like(s, eps0)


def _linear(eps0: float, s: Tensor, kappa: float) -> Tensor:
    return eps0 * (1 + kappa * s)


def _inverse(eps0: float, s: Tensor, kappa: float) -> Tensor:
    return eps0 / (1 + kappa * s)


SCHEDULES: dict[str, Callable[[float, Tensor, float], Tensor]] = {
    "constant": _constant,
    "linear": _linear,
    "inverse": _inverse,
}


def eps_schedule(
    eps0: float, staleness: Tensor, cfg: StalenessScheduleConfig, *, ceiling: float, dtype: torch.dtype
) -> Tensor:
    """ε(s) per row, [B] of ``dtype``. The clamp range is widened to contain ε0 itself so that
    ε(0) == ε0 bit-for-bit and the schedule stays monotone in s."""
    s = staleness.to(dtype).clamp(min=0)
    floor = min(cfg.eps_min, eps0)
    top = max(min(cfg.eps_max, ceiling), eps0)
    eps = SCHEDULES[cfg.type](eps0, s, cfg.kappa).clamp(floor, top)
    return torch.where(s == 0, torch.full_like(s, eps0), eps)


def clip_bounds(
    loss: ObjectiveConfig, cfg: StalenessScheduleConfig, staleness: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """(ε_l(s), ε_h(s)), each [B] of ``dtype``; ε_l(s) < 1 always."""
    eps_low, eps_high = loss.clip_eps
    low = eps_schedule(eps_low, staleness, cfg, ceiling=MAX_EPS_LOW, dtype=dtype)
    high = eps_schedule(eps_high, staleness, cfg, ceiling=float("inf"), dtype=dtype)
    return low, high
