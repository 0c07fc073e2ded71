"""Klear's released stop-gradient GPPO forms, test oracles for ``learners.objectives.gppo``.

Both take constant ε and w = 1 and return the per-token loss [B, T] with autograd gradients.
They reproduce ``verl/trainer/ppo/core_algos.py`` of KlearReasoner without its defects
(ALGORITHMS.md §1.3 a–c): no ``only_higher`` NameError, no mixed scalar/tensor clamp, and the
dual clip uses c (not 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from learners.objectives.gppo import GPPOConfig


def _dual_clip(loss: Tensor, adv: Tensor, cfg: GPPOConfig) -> Tensor:
    c = float("inf") if cfg.dual_clip_c is None else cfg.dual_clip_c
    dual = torch.minimum(loss, -adv * torch.full_like(loss, c))
    return torch.where(adv < 0, dual, loss)


def gppo_clamp_oracle(lp: Tensor, lp_old: Tensor, adv: Tensor, cfg: GPPOConfig) -> Tensor:
    """``compute_gppo_loss``: −A·clamp(r, (1−ε_l)·r/sg(r), (1+ε_h)·r/sg(r)), pessimistic max with
    −A·r, then the dual clip. The tensor bounds route gradient b·∇lp to the active bound.
    adv: [B, 1]."""
    ratio = torch.exp(lp - lp_old)
    scale = ratio / ratio.detach()
    low = (1 - cfg.eps_low) * scale
    high = (1 + cfg.eps_high) * scale
    adv = adv.expand_as(ratio)
    loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, low, high))
    return _dual_clip(loss, adv, cfg)


def gppo_general_oracle(lp: Tensor, lp_old: Tensor, adv: Tensor, cfg: GPPOConfig) -> Tensor:
    """``compute_gppo_loss_general_beta``: explicit low/high masks, −β1(1−ε_l)·r/sg(r)·A below
    (0 with ``only_high``), −β2(1+ε_h)·r/sg(r)·A above, −r·A elsewhere, then the dual clip.
    Its forward on the clipped sides is β times PPO's value; gradients are Eq. 18. adv: [B, 1]."""
    ratio = torch.exp(lp - lp_old)
    scale = ratio / ratio.detach()
    adv = adv.expand_as(ratio)
    low_beta = 0.0 if cfg.only_high else cfg.beta1
    low_case = (ratio < 1 - cfg.eps_low) & (adv < 0)
    high_case = (ratio > 1 + cfg.eps_high) & (adv > 0)
    loss = torch.where(low_case, -adv * low_beta * (1 - cfg.eps_low) * scale, -adv * ratio)
    loss = torch.where(high_case, -adv * cfg.beta2 * (1 + cfg.eps_high) * scale, loss)
    return _dual_clip(loss, adv, cfg)
