"""PPO-clip (Schulman et al. 2017, arXiv 1707.06347), symmetric: ε = ``eps_low`` on both sides,
plus the dual clip; DAPO's loss with ε_h = ε_l. Per-token arrays are [B, T]."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Literal

from learners.objectives.base import DualClip, LowClip, ObjectiveSpec
from learners.objectives.dapo import dapo_loss

if TYPE_CHECKING:
    from torch import Tensor

    from learners.objectives.base import TokenBatch


class PPOConfig(DualClip, LowClip):
    type: Literal["ppo"] = "ppo"


def ppo_loss(tb: TokenBatch, cfg: PPOConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token loss [B, T] and the clip fractions ``clip/{high,low,dual}_frac``."""
    return dapo_loss(replace(tb, eps_high=tb.eps_low), cfg)


SPEC = ObjectiveSpec(PPOConfig, ppo_loss, token_local=True)
