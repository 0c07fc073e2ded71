"""Advantages and reward-side shaping (ALGORITHMS.md §2, §3, §7 properties 8, 17–19).

GRPO group z-score (Shao 2024; unbiased std as verl/Klear, population std as paper Eq. 4),
Dr.GRPO mean-centring (arXiv 2503.20783), the zero-advantage group filter, DAPO overlong shaping
and the overlong filter (arXiv 2503.14476), and Klear's SFT term on correct rows (those the
reward function verified: the trajectory's ``correct``, whatever reward they scored).
"""

from __future__ import annotations

import torch
from torch import Tensor

from async_rl.config import AdvantageConfig, OverlongConfig

# A group of one has no baseline to compare against, so its advantage is 0 (verl uses mean 0,
# std 1, i.e. A = R; a pure REINFORCE term without baseline is the noisier choice).
MIN_GROUP_SIZE = 2


def group_moments(rewards: Tensor, group_index: Tensor, unbiased: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row (group mean, group std, group size), each [N] float64."""
    _, inverse = torch.unique(group_index, return_inverse=True)
    r = rewards.to(torch.float64)
    groups = int(inverse.max()) + 1 if r.numel() else 0
    size = torch.zeros(groups, dtype=torch.float64, device=r.device).index_add_(0, inverse, torch.ones_like(r))
    mean = torch.zeros_like(size).index_add_(0, inverse, r) / size
    sq = (r - mean[inverse]).square()
    dof = (size - 1).clamp(min=1) if unbiased else size
    std = (torch.zeros_like(size).index_add_(0, inverse, sq) / dof).sqrt()
    return mean[inverse], std[inverse], size[inverse]


def group_advantages(rewards: Tensor, group_index: Tensor, cfg: AdvantageConfig) -> Tensor:
    """Per-response advantages [N] (dtype of ``rewards``) from rewards [N] and int group ids [N].

    grpo: (R − mean_g)/(std_g + eps); drgrpo: R − mean_g. Groups of one get 0.
    """
    mean, std, size = group_moments(rewards, group_index, unbiased=cfg.std == "unbiased")
    centred = rewards.to(torch.float64) - mean
    adv = centred / (std + cfg.eps) if cfg.type == "grpo" else centred
    return torch.where(size >= MIN_GROUP_SIZE, adv, torch.zeros_like(adv)).to(rewards.dtype)


def informative_rows(rewards: Tensor, group_index: Tensor) -> Tensor:
    """[N] bool: rows of groups whose rewards are not all equal (the zero-advantage filter:
    equal rewards give A ≡ 0, so such groups only dilute the normaliser)."""
    _, inverse = torch.unique(group_index, return_inverse=True)
    groups = int(inverse.max()) + 1 if rewards.numel() else 0
    r = rewards.to(torch.float64)
    high = torch.full((groups,), -torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, inverse, r, "amax")
    low = torch.full((groups,), torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, inverse, r, "amin")
    return (high > low)[inverse]


def overlong_penalty(lengths: Tensor, *, max_tokens: int, cfg: OverlongConfig) -> Tensor:
    """DAPO soft overlong penalty [N]: 0 up to L_max−L_cache, then a linear ramp to −factor at
    L_max (L_max = ``max_tokens``, L_cache = ``cfg.buffer_tokens``); 0 when shaping is off."""
    if not cfg.shaping:
        return torch.zeros(lengths.shape, dtype=torch.float32, device=lengths.device)
    start = max_tokens - cfg.buffer_tokens
    ramp = (start - lengths.to(torch.float64)) / cfg.buffer_tokens
    return (ramp.clamp(-1.0, 0.0) * cfg.penalty_factor).to(torch.float32)


def overlong_keep(last_tokens: Tensor, stop_token_ids: list[int], cfg: OverlongConfig) -> Tensor:
    """[N] bool: rows the overlong filter keeps (last response token is EOS/pad, i.e. not cut
    at max_tokens); everything when the filter is off."""
    if not cfg.filter:
        return torch.ones(last_tokens.shape, dtype=torch.bool, device=last_tokens.device)
    stops = torch.tensor(stop_token_ids, dtype=last_tokens.dtype, device=last_tokens.device)
    return torch.isin(last_tokens, stops)


def sft_nll(logp: Tensor, mask: Tensor, global_sft_tokens: Tensor | None) -> Tensor:
    """Token-mean NLL −Σ lp / N_pos: Klear's SFT term (paper Eq. 13–14) over the correct rows,
    and the SFT warm start's loss over every row (``learners.sft``).

    logp: [B, T] (or [N]); mask: same shape, bool (the tokens counted); ``global_sft_tokens`` is N_pos
    over the whole mini-batch (None: this micro-batch's count). 0 when there is no such row.
    """
    nll = torch.where(mask, -logp, torch.zeros_like(logp)).sum()
    count = mask.sum() if global_sft_tokens is None else global_sft_tokens
    return nll / count.to(logp.dtype).clamp(min=1.0)
