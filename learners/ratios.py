"""The ratio maths the objectives in ``learners/objectives/`` share.

Notation (ALGORITHMS.md §0): ``lp`` current-policy logprobs, ``lp_old`` the clip centre
(proximal in decoupled mode, behaviour in coupled mode), ``r = exp(lp - lp_old)``, ``w`` the
constant behaviour weight, ``A`` the per-sequence advantage. Every token-ratio objective differs
only in its gradient coefficient ``F`` (``∂ℓ/∂lp = -A·F·w``), so each is written as the logged
surrogate value plus ``-A·sg(F·w)·(lp - sg(lp))``: the forward value is the paper's loss and the
gradient is exactly Eq. 12/18 of Klear (arXiv 2508.07629), with no max/clamp tie subtleties.
Per-token arrays are ``[B, T]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from learners.objectives.base import DualClip, TokenBatch

# Keeps exp() finite under a large train/inference mismatch (verl clamps to the same range).
MAX_LOG_RATIO = 20.0
# GSPO's sequence ratio is a geometric mean, so a smaller bound suffices (verl: log s ≤ 10).
MAX_LOG_SEQ_RATIO = 10.0
# Denominator floor for metric means over possibly empty masks.
MIN_COUNT = 1.0

# (r, tokens, config) -> a per-token quantity [B, T], no grad
RatioFn = Callable[[Tensor, TokenBatch, DualClip], Tensor]


def log_ratio(tb: TokenBatch) -> Tensor:
    """``log r = lp - lp_old``, clamped so ``exp`` stays finite. ``[B, T]``, carries grad."""
    return (tb.lp - tb.lp_old).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)


def dual_clip_c(cfg: DualClip) -> float:
    """The dual-clip constant c, or +inf when it is off."""
    return float("inf") if cfg.dual_clip_c is None else cfg.dual_clip_c


def coefficient_loss(value: Tensor, coef: Tensor, tb: TokenBatch) -> Tensor:
    """Per-token loss whose forward is ``value`` and whose ∂/∂lp is ``-A·coef·w``. ``[B, T]``.

    ``lp - sg(lp)`` is exactly 0 in the forward, so the logged value is untouched.
    """
    grad_part = -tb.adv * (coef * tb.w).detach() * (tb.lp - tb.lp.detach())
    return torch.where(tb.mask, value.detach() + grad_part, torch.zeros_like(grad_part))


def ppo_value(ratio: Tensor, tb: TokenBatch, cfg: DualClip) -> Tensor:
    """PPO clip-higher + dual-clip surrogate value ``w·ℓ`` (no grad needed). ``[B, T]``."""
    clipped = torch.minimum(torch.maximum(ratio, 1 - tb.eps_low), 1 + tb.eps_high)
    loss = torch.maximum(-tb.adv * ratio, -tb.adv * clipped)
    dual = torch.minimum(loss, -dual_clip_c(cfg) * tb.adv)
    return tb.w * torch.where(tb.adv < 0, dual, loss)


def side_masks(ratio: Tensor, tb: TokenBatch, cfg: DualClip) -> dict[str, Tensor]:
    """Boolean ``[B, T]`` masks of the clip cases of ALGORITHMS.md §1.2."""
    return {
        "high": (tb.adv > 0) & (ratio > 1 + tb.eps_high) & tb.mask,
        "low": (tb.adv < 0) & (ratio < 1 - tb.eps_low) & tb.mask,
        "dual": (tb.adv < 0) & (ratio > dual_clip_c(cfg)) & tb.mask,
    }


def clip_metrics(cases: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
    """Fractions of gradient tokens in each clip case."""
    count = mask.sum().clamp(min=MIN_COUNT)
    return {f"clip/{name}_frac": case.sum() / count for name, case in cases.items()}


def clipped_surrogate(
    tb: TokenBatch, cfg: DualClip, coefficient: RatioFn, value: RatioFn = ppo_value
) -> tuple[Tensor, dict[str, Tensor]]:
    """A PPO-shaped surrogate: the forward ``value`` (PPO's by default) with the gradient
    coefficient F chosen by ``coefficient`` (GPPO and PPO/DAPO differ only there)."""
    with torch.no_grad():
        ratio = log_ratio(tb).exp()
        coef = coefficient(ratio, tb, cfg)
        forward = value(ratio, tb, cfg)
        metrics = clip_metrics(side_masks(ratio, tb, cfg), tb.mask)
    return coefficient_loss(forward, coef, tb), metrics


def masked_loss(loss: Tensor, tb: TokenBatch) -> Tensor:
    """``loss`` on the gradient tokens, 0 elsewhere. ``[B, T]``."""
    return torch.where(tb.mask, loss, torch.zeros_like(loss))


# --------------------------------------------------------------------------- sequence ratios


def sequence_log_ratio(tb: TokenBatch) -> Tensor:
    """GSPO's log s_i = mean over the row's gradient tokens of (lp − lp_old). ``[B, 1]``, grad."""
    count = tb.mask.sum(dim=1, keepdim=True).clamp(min=MIN_COUNT)
    diff = torch.where(tb.mask, tb.lp - tb.lp_old, torch.zeros_like(tb.lp))
    return (diff.sum(dim=1, keepdim=True) / count).clamp(max=MAX_LOG_SEQ_RATIO)


def gspo_clipped(s: Tensor, tb: TokenBatch) -> Tensor:
    """Pessimistic clip of a sequence-level ratio: −min(s·A, clip(s, 1−ε_l, 1+ε_h)·A)."""
    bounded = torch.minimum(torch.maximum(s, 1 - tb.eps_low), 1 + tb.eps_high)
    return torch.maximum(-tb.adv * s, -tb.adv * bounded)


def gspo_metrics(s: Tensor, tb: TokenBatch) -> dict[str, Tensor]:
    rows = tb.mask.any(dim=1, keepdim=True)
    cases = {"high": (s > 1 + tb.eps_high) & rows, "low": (s < 1 - tb.eps_low) & rows}
    count = rows.sum().clamp(min=MIN_COUNT)
    return {f"clip/{name}_seq_frac": case.sum() / count for name, case in cases.items()}
