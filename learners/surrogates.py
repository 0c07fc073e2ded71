"""Per-token surrogate losses: one pure function per objective, and the registry that names them.

Notation (ALGORITHMS.md §0): ``lp`` current-policy logprobs, ``lp_old`` the clip centre
(proximal in decoupled mode, behaviour in coupled mode), ``r = exp(lp - lp_old)``, ``w`` the
constant behaviour weight, ``A`` the per-sequence advantage. Every token-ratio objective differs
only in its gradient coefficient ``F`` (``∂ℓ/∂lp = -A·F·w``), so each is written as the logged
surrogate value plus ``-A·sg(F·w)·(lp - sg(lp))``: the forward value is the paper's loss and the
gradient is exactly Eq. 12/18 of Klear (arXiv 2508.07629), with no max/clamp tie subtleties.
Each function returns the per-token loss ``[B, T]`` (0 outside the mask) and clip metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from async_rl.config import LossConfig

# Keeps exp() finite under a large train/inference mismatch (verl clamps to the same range).
MAX_LOG_RATIO = 20.0
# GSPO's sequence ratio is a geometric mean, so a smaller bound suffices (verl: log s ≤ 10).
MAX_LOG_SEQ_RATIO = 10.0
# Denominator floor for metric means over possibly empty masks.
MIN_COUNT = 1.0


@dataclass(frozen=True)
class TokenBatch:
    """What a per-token objective sees: sanitised tensors, broadcastable to ``[B, T]``."""

    lp: Tensor  # [B, T] with grad; 0 outside mask
    lp_old: Tensor  # [B, T] no grad; 0 outside mask
    w: Tensor  # [B, T] no grad; 0 outside mask
    adv: Tensor  # [B, 1]
    mask: Tensor  # [B, T] bool
    eps_low: Tensor  # [B, 1] ε_l(s) per row
    eps_high: Tensor  # [B, 1] ε_h(s) per row


TokenLoss = Callable[[TokenBatch, LossConfig], tuple[Tensor, dict[str, Tensor]]]


# --------------------------------------------------------------------------- helpers


def log_ratio(tb: TokenBatch) -> Tensor:
    """``log r = lp - lp_old``, clamped so ``exp`` stays finite. ``[B, T]``, carries grad."""
    return (tb.lp - tb.lp_old).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)


def dual_clip_c(cfg: LossConfig) -> float:
    """The dual-clip constant c, or +inf when it is off."""
    return float("inf") if cfg.dual_clip_c is None else cfg.dual_clip_c


def coefficient_loss(value: Tensor, coef: Tensor, tb: TokenBatch) -> Tensor:
    """Per-token loss whose forward is ``value`` and whose ∂/∂lp is ``-A·coef·w``. ``[B, T]``.

    ``lp - sg(lp)`` is exactly 0 in the forward, so the logged value is untouched.
    """
    grad_part = -tb.adv * (coef * tb.w).detach() * (tb.lp - tb.lp.detach())
    return torch.where(tb.mask, value.detach() + grad_part, torch.zeros_like(grad_part))


def ppo_value(ratio: Tensor, tb: TokenBatch, cfg: LossConfig) -> Tensor:
    """PPO clip-higher + dual-clip surrogate value ``w·ℓ`` (no grad needed). ``[B, T]``."""
    clipped = torch.minimum(torch.maximum(ratio, 1 - tb.eps_low), 1 + tb.eps_high)
    loss = torch.maximum(-tb.adv * ratio, -tb.adv * clipped)
    dual = torch.minimum(loss, -dual_clip_c(cfg) * tb.adv)
    return tb.w * torch.where(tb.adv < 0, dual, loss)


def side_masks(ratio: Tensor, tb: TokenBatch, cfg: LossConfig) -> dict[str, Tensor]:
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


# --------------------------------------------------------------------------- objectives


def gppo_coefficient(ratio: Tensor, tb: TokenBatch, cfg: LossConfig) -> Tensor:
    """GPPO's F (Klear Eq. 12/18): r in band; β2(1+ε_h) above for A>0; β1(1−ε_l) below for
    A<0 (0 with ``only_high``); 0 past the dual clip for A<0. ``[B, T]``, no grad."""
    cases = side_masks(ratio, tb, cfg)
    low_coef = 0.0 if cfg.only_high else cfg.beta1
    coef = torch.where(cases["high"], cfg.beta2 * (1 + tb.eps_high), ratio)
    coef = torch.where(cases["low"], low_coef * (1 - tb.eps_low), coef)
    return torch.where(cases["dual"], torch.zeros_like(coef), coef)


def gppo_loss(tb: TokenBatch, cfg: LossConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """GPPO (Klear-Reasoner, arXiv 2508.07629 §3.2.2, App. A.2), coefficient form.

    ℓ value = w·PPO(clip-higher, dual clip); ∂ℓ/∂lp = −A·w·F with F from ``gppo_coefficient``:
    clipped tokens keep a bounded gradient instead of PPO's zero.
    """
    return clipped_surrogate(tb, cfg, gppo_coefficient)


def ppo_coefficient(ratio: Tensor, tb: TokenBatch, cfg: LossConfig) -> Tensor:
    """PPO's F = r·I(not clipped): zero above for A>0, below for A<0 and past the dual clip."""
    cases = side_masks(ratio, tb, cfg)
    clipped = cases["high"] | cases["low"] | cases["dual"]
    return torch.where(clipped, torch.zeros_like(ratio), ratio)


def dapo_loss(tb: TokenBatch, cfg: LossConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """DAPO clip-higher PPO (arXiv 2503.14476): −min(r·A, clip(r, 1−ε_l, 1+ε_h)·A), with the
    dual clip −c·A for A<0 (Ye et al. arXiv 1912.09729) when ``dual_clip_c`` is set."""
    return clipped_surrogate(tb, cfg, ppo_coefficient)


def clipped_surrogate(tb: TokenBatch, cfg: LossConfig, coefficient) -> tuple[Tensor, dict[str, Tensor]]:
    """The PPO surrogate's value with the gradient coefficient F chosen by ``coefficient``
    (GPPO and PPO/DAPO differ only there)."""
    with torch.no_grad():
        ratio = log_ratio(tb).exp()
        coef = coefficient(ratio, tb, cfg)
        value = ppo_value(ratio, tb, cfg)
        metrics = clip_metrics(side_masks(ratio, tb, cfg), tb.mask)
    return coefficient_loss(value, coef, tb), metrics


def ppo_loss(tb: TokenBatch, cfg: LossConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip (Schulman 2017), symmetric: ε = ``eps_low`` on both sides, plus the dual clip."""
    return dapo_loss(replace(tb, eps_high=tb.eps_low), cfg)


def cispo_loss(tb: TokenBatch, cfg: LossConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax-M1, arXiv 2506.13585 §3.1): ℓ = −sg(r̂·w)·A·lp, r̂ = clip(r, lo, 1+ε_h).

    One-sided (M1, the default) has no lower bound; ``cispo_two_sided`` adds lo = 1−ε_l.
    No token is dropped: F = r̂ for either sign of A.
    """
    with torch.no_grad():
        ratio = log_ratio(tb).exp()
        low = 1 - tb.eps_low if cfg.cispo_two_sided else torch.zeros_like(tb.eps_low)
        coef = torch.minimum(torch.maximum(ratio, low), 1 + tb.eps_high)
        metrics = clip_metrics(
            {"high": (ratio > 1 + tb.eps_high) & tb.mask, "low": (ratio < low) & tb.mask}, tb.mask
        )
    loss = -tb.adv * (coef * tb.w).detach() * tb.lp
    return torch.where(tb.mask, loss, torch.zeros_like(loss)), metrics


def reinforce_tis_loss(tb: TokenBatch, cfg: LossConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """REINFORCE with truncated IS (PipelineRL ``rl_step``, ``policy_loss: reinforce``):
    ℓ = −A·lp·sg(clamp(r, 0, 1+ε_h)·w). Numerically one-sided CISPO; PipelineRL runs it coupled."""
    with torch.no_grad():
        ratio = log_ratio(tb).exp()
        coef = torch.minimum(ratio, 1 + tb.eps_high)
        metrics = clip_metrics({"high": (ratio > 1 + tb.eps_high) & tb.mask}, tb.mask)
    loss = -tb.adv * (coef * tb.w).detach() * tb.lp
    return torch.where(tb.mask, loss, torch.zeros_like(loss)), metrics


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


def gspo_loss(tb: TokenBatch, cfg: LossConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (Qwen, arXiv 2507.18071): s_i = exp(mean_t(lp − lp_old)) clips whole sequences.

    Every token of row i carries the sequence loss ℓ_i·w_t, so ``seq-mean-token-mean`` gives the
    paper's (1/G)Σ_i ℓ_i and an unclipped token gets ∂ℓ/∂lp_t = −A_i·s_i/|y_i| (per row).
    """
    s = sequence_log_ratio(tb).exp()
    loss = gspo_clipped(s, tb).expand_as(tb.lp) * tb.w
    with torch.no_grad():
        metrics = gspo_metrics(s, tb)
    return torch.where(tb.mask, loss, torch.zeros_like(loss)), metrics


def gspo_token_loss(tb: TokenBatch, cfg: LossConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO-token (arXiv 2507.18071 §4.3, verl ``compute_policy_loss_gspo``):
    s_{i,t} = sg(s_i)·exp(lp_t − sg(lp_t)); same value and clipping as GSPO, per-token gradient
    −A_i·s_i (before aggregation) when the sequence is unclipped."""
    s_seq = sequence_log_ratio(tb).detach()
    s = (s_seq + tb.lp - tb.lp.detach()).exp()
    loss = gspo_clipped(s, tb) * tb.w
    with torch.no_grad():
        metrics = gspo_metrics(s_seq.exp(), tb)
    return torch.where(tb.mask, loss, torch.zeros_like(loss)), metrics


OBJECTIVES: dict[str, TokenLoss] = {
    "gppo": gppo_loss,
    "ppo": ppo_loss,
    "dapo": dapo_loss,
    "cispo": cispo_loss,
    "gspo": gspo_loss,
    "gspo_token": gspo_token_loss,
    "reinforce_tis": reinforce_tis_loss,
}

# Objectives whose ∂ℓ_t/∂lp_t depends on token t alone; GSPO's sequence ratio couples a row.
TOKEN_LOCAL = frozenset({"gppo", "ppo", "dapo", "cispo", "reinforce_tis"})
