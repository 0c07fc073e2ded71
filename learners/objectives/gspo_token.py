"""GSPO-token (arXiv 2507.18071 §4.3, verl ``compute_policy_loss_gspo``):
s_{i,t} = sg(s_i)·exp(lp_t − sg(lp_t)); the same value and clipping as GSPO, per-token gradient
−A_i·s_i (before aggregation) when the sequence is unclipped. Not token-local: s_i couples a
row. Per-token arrays are [B, T]; torch is imported on use (see ``learners/objectives/base.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from learners.objectives.base import HighClip, LowClip, ObjectiveSpec

if TYPE_CHECKING:
    from torch import Tensor

    from learners.objectives.base import TokenBatch


class GSPOTokenConfig(HighClip, LowClip):
    type: Literal["gspo_token"] = "gspo_token"


def gspo_token_loss(tb: TokenBatch, cfg: GSPOTokenConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token loss [B, T] and the sequence clip fractions ``clip/{high,low}_seq_frac``."""
    import torch

    from learners.ratios import gspo_clipped, gspo_metrics, masked_loss, sequence_log_ratio

    s_seq = sequence_log_ratio(tb).detach()
    s = (s_seq + tb.lp - tb.lp.detach()).exp()
    loss = gspo_clipped(s, tb) * tb.w
    with torch.no_grad():
        metrics = gspo_metrics(s_seq.exp(), tb)
    return masked_loss(loss, tb), metrics


SPEC = ObjectiveSpec(GSPOTokenConfig, gspo_token_loss, token_local=False)
