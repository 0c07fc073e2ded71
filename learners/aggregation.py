"""Loss aggregation over a mini-batch that may be split into micro-batches and DP ranks.

Each function returns this micro-batch's share of the mini-batch loss, already divided by the
GLOBAL normaliser, so Σ over micro-batches and ranks of the shares is the exact mini-batch loss
(Klear's released code divides by each micro-batch's own count instead, ALGORITHMS.md §1.3).
``per_token`` is [B, T] and already 0 outside the gradient mask.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import Tensor

Aggregation = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

# A row with no counted tokens has a zero loss; dividing it by 1 keeps it zero, not NaN.
MIN_ROW_TOKENS = 1.0


def token_mean(per_token: Tensor, denom_mask: Tensor, global_tokens: Tensor, global_seqs: Tensor) -> Tensor:
    """DAPO/Klear token-mean: Σ_{i,t} ℓ / N, N = Σ denom_mask over the whole mini-batch.
    A response twice as long carries twice the weight."""
    return per_token.sum() / global_tokens.to(per_token.dtype)


def seq_mean_token_mean(
    per_token: Tensor, denom_mask: Tensor, global_tokens: Tensor, global_seqs: Tensor
) -> Tensor:
    """GRPO: (1/G) Σ_i (1/|y_i|) Σ_t ℓ, |y_i| = Σ_t denom_mask_i (a row never spans micro-batches)."""
    lengths = denom_mask.sum(dim=1).to(per_token.dtype).clamp(min=MIN_ROW_TOKENS)
    return (per_token.sum(dim=1) / lengths).sum() / global_seqs.to(per_token.dtype)


def seq_mean_token_sum_norm(
    per_token: Tensor, denom_mask: Tensor, global_tokens: Tensor, global_seqs: Tensor, *, norm_tokens: int
) -> Tensor:
    """Dr.GRPO (arXiv 2503.20783): (1/G) Σ_i Σ_t ℓ / L with a constant L, so no length bias."""
    return per_token.sum() / (global_seqs.to(per_token.dtype) * norm_tokens)


def build_aggregation(mode: str, *, norm_tokens: int) -> Aggregation:
    """The aggregation named by ``algorithm.aggregation``."""
    table: dict[str, Aggregation] = {
        "token-mean": token_mean,
        "seq-mean-token-mean": seq_mean_token_mean,
        "seq-mean-token-sum-norm": partial(seq_mean_token_sum_norm, norm_tokens=norm_tokens),
    }
    return table[mode]

