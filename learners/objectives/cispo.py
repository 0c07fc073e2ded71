"""CISPO (MiniMax-M1, arXiv 2506.13585 §3.1): ℓ = −sg(r̂·w)·A·lp, r̂ = clip(r, lo, 1+ε_h).

One-sided (M1, the default) has no lower bound; ``cispo_two_sided`` adds lo = 1−ε_l. No token
is dropped: F = r̂ for either sign of A. Per-token arrays are [B, T]; torch is imported on use
(see ``learners/objectives/base.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from learners.objectives.base import HighClip, LowClip, ObjectiveSpec

if TYPE_CHECKING:
    from torch import Tensor

    from learners.objectives.base import TokenBatch


class CISPOConfig(HighClip, LowClip):
    type: Literal["cispo"] = "cispo"
    cispo_two_sided: bool = Field(False, description="Also bound the weight below by 1−ε_l.")


def cispo_loss(tb: TokenBatch, cfg: CISPOConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token loss [B, T] and the clip fractions ``clip/{high,low}_frac``."""
    import torch

    from learners.ratios import clip_metrics, log_ratio, masked_loss

    with torch.no_grad():
        ratio = log_ratio(tb).exp()
        low = 1 - tb.eps_low if cfg.cispo_two_sided else torch.zeros_like(tb.eps_low)
        coef = torch.minimum(torch.maximum(ratio, low), 1 + tb.eps_high)
        metrics = clip_metrics(
            {"high": (ratio > 1 + tb.eps_high) & tb.mask, "low": (ratio < low) & tb.mask}, tb.mask
        )
    return masked_loss(-tb.adv * (coef * tb.w).detach() * tb.lp, tb), metrics


SPEC = ObjectiveSpec(CISPOConfig, cispo_loss, token_local=True)
