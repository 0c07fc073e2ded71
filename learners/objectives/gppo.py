"""GPPO (Klear-Reasoner, arXiv 2508.07629 §3.2.2, App. A.2, Eq. 11/12 and the β form Eq. 17/18).

Coefficient form (ALGORITHMS.md §1.4): ∂ℓ/∂lp = −A·w·F with F = r in band; β2(1+ε_h) above
for A>0; β1(1−ε_l) below for A<0 (0 with ``only_high``); 0 past the dual clip for A<0, so a
clipped token keeps a bounded gradient instead of PPO's zero. The logged value is w·PPO
(clip-higher, dual clip), its clipped sides scaled by β as in Eq. 17: β1 times PPO's value
below, β2 times above (``only_high`` keeps PPO's value below, as Klear's clamp form does).
Per-token arrays are [B, T]; torch is imported on use (see ``learners/objectives/base.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from learners.objectives.base import DualClip, HighClip, LowClip, ObjectiveSpec

if TYPE_CHECKING:
    from torch import Tensor

    from learners.objectives.base import TokenBatch


class GPPOConfig(DualClip, HighClip, LowClip):
    type: Literal["gppo"] = "gppo"
    beta1: float = Field(1.0, ge=0, description="Low-side gradient (and value) scale β1.")
    beta2: float = Field(1.0, ge=0, description="High-side gradient (and value) scale β2.")
    only_high: bool = Field(False, description="Keep only the high-side gradient.")


def low_beta(cfg: GPPOConfig) -> float:
    """β of the low side's gradient: β1, or 0 with ``only_high``."""
    return 0.0 if cfg.only_high else cfg.beta1


def gppo_coefficient(ratio: Tensor, tb: TokenBatch, cfg: GPPOConfig) -> Tensor:
    """F of Eq. 12/18 per token, [B, T], no grad."""
    import torch

    from learners.ratios import side_masks

    cases = side_masks(ratio, tb, cfg)
    coef = torch.where(cases["high"], cfg.beta2 * (1 + tb.eps_high), ratio)
    coef = torch.where(cases["low"], low_beta(cfg) * (1 - tb.eps_low), coef)
    return torch.where(cases["dual"], torch.zeros_like(coef), coef)


def gppo_value(ratio: Tensor, tb: TokenBatch, cfg: GPPOConfig) -> Tensor:
    """Eq. 17's forward value per token, [B, T]: w·PPO, times β1 below and β2 above."""
    import torch

    from learners.ratios import ppo_value, side_masks

    cases = side_masks(ratio, tb, cfg)
    value = ppo_value(ratio, tb, cfg)
    value = torch.where(cases["high"], cfg.beta2 * value, value)
    return value if cfg.only_high else torch.where(cases["low"], cfg.beta1 * value, value)


def gppo_loss(tb: TokenBatch, cfg: GPPOConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token GPPO loss [B, T] and the clip fractions ``clip/{high,low,dual}_frac``."""
    from learners.ratios import clipped_surrogate

    return clipped_surrogate(tb, cfg, gppo_coefficient, gppo_value)


SPEC = ObjectiveSpec(GPPOConfig, gppo_loss, token_local=True)
