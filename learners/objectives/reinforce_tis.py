"""REINFORCE with truncated importance sampling (PipelineRL ``rl_step``, ``policy_loss:
reinforce``): ℓ = −A·lp·sg(clamp(r, 0, 1+ε_h)·w). Numerically one-sided CISPO; PipelineRL runs
it coupled. Per-token arrays are [B, T]; torch is imported on use (see
``learners/objectives/base.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from learners.objectives.base import HighClip, ObjectiveSpec

if TYPE_CHECKING:
    from torch import Tensor

    from learners.objectives.base import TokenBatch


class ReinforceTISConfig(HighClip):
    type: Literal["reinforce_tis"] = "reinforce_tis"


def reinforce_tis_loss(tb: TokenBatch, cfg: ReinforceTISConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token loss [B, T] and the truncation fraction ``clip/high_frac``."""
    import torch

    from learners.ratios import clip_metrics, log_ratio, masked_loss

    with torch.no_grad():
        ratio = log_ratio(tb).exp()
        coef = torch.minimum(ratio, 1 + tb.eps_high)
        metrics = clip_metrics({"high": (ratio > 1 + tb.eps_high) & tb.mask}, tb.mask)
    return masked_loss(-tb.adv * (coef * tb.w).detach() * tb.lp, tb), metrics


SPEC = ObjectiveSpec(ReinforceTISConfig, reinforce_tis_loss, token_local=True)
