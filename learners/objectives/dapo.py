"""DAPO clip-higher PPO (arXiv 2503.14476): ℓ = −min(r·A, clip(r, 1−ε_l, 1+ε_h)·A), with the dual
clip −c·A for A<0 (Ye et al. arXiv 1912.09729) when ``dual_clip_c`` is set.

Gradient coefficient F = r·I(not clipped): zero above for A>0, below for A<0 and past the dual
clip. Per-token arrays are [B, T]; torch is imported on use (see ``learners/objectives/base.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from learners.objectives.base import DualClip, HighClip, LowClip, ObjectiveSpec

if TYPE_CHECKING:
    from torch import Tensor

    from learners.objectives.base import TokenBatch


class DAPOConfig(DualClip, HighClip, LowClip):
    type: Literal["dapo"] = "dapo"


def ppo_coefficient(ratio: Tensor, tb: TokenBatch, cfg: DualClip) -> Tensor:
    """PPO's F = r·I(not clipped), [B, T], no grad."""
    import torch

    from learners.ratios import side_masks

    cases = side_masks(ratio, tb, cfg)
    clipped = cases["high"] | cases["low"] | cases["dual"]
    return torch.where(clipped, torch.zeros_like(ratio), ratio)


def dapo_loss(tb: TokenBatch, cfg: DualClip) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token loss [B, T] and the clip fractions ``clip/{high,low,dual}_frac``."""
    from learners.ratios import clipped_surrogate

    return clipped_surrogate(tb, cfg, ppo_coefficient)


SPEC = ObjectiveSpec(DAPOConfig, dapo_loss, token_local=True)
