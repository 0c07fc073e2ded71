"""Off-policy correction for asynchronous samples (ALGORITHMS.md §3, DESIGN §3.3).

Decoupled mode (AReaL, Hilton 2021): the clip centre is the proximal policy recomputed by the
learner at the start of the batch, and each token carries a constant behaviour weight
``w = π_prox/μ = exp(lp_prox − lp_beh)``, truncated at C (TIS, Yao et al.), optionally masked
outside [α, β] (IcePop, Ring-1T) or by the M2PO second-moment rule (arXiv 2510.01161).
Masked tokens leave the gradient but stay in the normaliser: the caller keeps its original mask
as ``denom_mask``. Coupled mode clips π_θ/μ directly and uses w = 1. Mode ``none`` is no
correction at all: the proximal policy as the clip centre and w = 1, so a stale row is trained
as if the policy at the start of the batch had sampled it (the control arm of the staleness study).
"""

from __future__ import annotations

import torch
from torch import Tensor

from async_rl.config import OffPolicyConfig

# Keeps exp() finite under a large train/inference mismatch.
MAX_LOG_WEIGHT = 20.0


def clip_centre(logp_prox: Tensor | None, logp_behavior: Tensor, cfg: OffPolicyConfig) -> Tensor:
    """``lp_old`` of the objective: proximal logprobs (decoupled, none) or behaviour logprobs (coupled)."""
    if cfg.mode != "coupled":
        if logp_prox is None:
            raise ValueError(f"off_policy.mode={cfg.mode}: proximal logprobs are required")
        return logp_prox.detach()
    return logp_behavior.detach()


def m2po_mask(log_w: Tensor, mask: Tensor, tau: float) -> Tensor:
    """M2PO: drop the tokens with the largest (log w)² until the mean over the rest is < τ.

    log_w, mask: [B, T]. Returns the kept mask [B, T]. The mean of the m smallest values is
    non-decreasing in m, so the kept set is the longest prefix of the ascending order whose mean
    is below τ (ties broken by sort order); no host sync.
    """
    sq = torch.where(mask, log_w.square(), torch.full_like(log_w, float("inf"))).flatten()
    order = torch.argsort(sq, stable=True)
    ranked = sq[order]
    prefix = torch.cumsum(torch.where(torch.isfinite(ranked), ranked, torch.zeros_like(ranked)), 0)
    sizes = torch.arange(1, ranked.numel() + 1, device=sq.device, dtype=sq.dtype)
    below = (prefix / sizes < tau) & (sizes <= mask.sum())
    kept_count = below.sum()
    keep = torch.zeros_like(mask).flatten()
    keep[order] = torch.arange(ranked.numel(), device=sq.device) < kept_count
    return keep.view_as(mask) & mask


def masked_stats(x: Tensor, mask: Tensor, prefix: str) -> dict[str, Tensor]:
    count = mask.sum().clamp(min=1)
    zero = torch.zeros_like(x)
    return {
        f"{prefix}/mean": torch.where(mask, x, zero).sum() / count,
        f"{prefix}/max": torch.where(mask, x, zero).amax(),
    }


def behavior_weights(
    logp_prox: Tensor | None, logp_behavior: Tensor, mask: Tensor, cfg: OffPolicyConfig
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(w, mask, metrics) for the objective's ``behavior_weight`` and gradient ``mask``.

    logp_prox, logp_behavior: [B, T]; mask: [B, T] bool (response tokens). Call it once on the
    whole mini-batch (M2PO's mask depends on every token). ``w`` is 0 outside the returned
    mask and carries no gradient. Coupled mode returns ones and the mask unchanged, and so does
    mode ``none``.
    """
    if cfg.mode in ("coupled", "none"):
        ones = torch.where(mask, torch.ones_like(logp_behavior), torch.zeros_like(logp_behavior))
        return ones.detach(), mask, {}
    with torch.no_grad():
        diff = torch.where(mask, clip_centre(logp_prox, logp_behavior, cfg) - logp_behavior, 0.0)
        log_w = diff.clamp(-MAX_LOG_WEIGHT, MAX_LOG_WEIGHT)
        raw = log_w.exp()
        keep = mask
        metrics = masked_stats(raw, mask, "weight_raw")
        if cfg.icepop is not None:
            keep = keep & (raw >= cfg.icepop[0]) & (raw <= cfg.icepop[1])
            metrics["tokens/masked_icepop"] = (mask & ~keep).sum()
        if cfg.m2po_tau is not None:
            before = keep
            keep = m2po_mask(log_w, keep, cfg.m2po_tau)
            metrics["tokens/masked_m2po"] = (before & ~keep).sum()
        cap = float("inf") if cfg.tis_cap is None else cfg.tis_cap
        w = torch.where(keep, raw.clamp(max=cap), torch.zeros_like(raw))
        metrics["weight/truncated_frac"] = ((raw > cap) & keep).sum() / keep.sum().clamp(min=1)
    return w, keep, metrics
