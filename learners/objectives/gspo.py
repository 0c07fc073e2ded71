"""GSPO (Qwen, arXiv 2507.18071): s_i = exp(mean_t(lp − lp_old)) clips whole sequences.

Every token of row i carries the sequence loss ℓ_i·w_t, so ``seq-mean-token-mean`` gives the
paper's (1/G)Σ_i ℓ_i and an unclipped token gets ∂ℓ/∂lp_t = −A_i·s_i/|y_i| (per row). Not
token-local: the sequence ratio couples a row. Per-token arrays are [B, T]; torch is imported
on use (see ``learners/objectives/base.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from learners.objectives.base import HighClip, LowClip, ObjectiveSpec

if TYPE_CHECKING:
    from torch import Tensor

    from learners.objectives.base import TokenBatch


class GSPOConfig(HighClip, LowClip):
    type: Literal["gspo"] = "gspo"


def gspo_loss(tb: TokenBatch, cfg: GSPOConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token loss [B, T] and the sequence clip fractions ``clip/{high,low}_seq_frac``."""
    import torch

    from learners.ratios import gspo_clipped, gspo_metrics, masked_loss, sequence_log_ratio

    s = sequence_log_ratio(tb).exp()
    loss = gspo_clipped(s, tb).expand_as(tb.lp) * tb.w
    with torch.no_grad():
        metrics = gspo_metrics(s, tb)
    return masked_loss(loss, tb), metrics


SPEC = ObjectiveSpec(GSPOConfig, gspo_loss, token_local=False)
