"""Token logprobs and entropy from final hidden states, chunked over tokens.

The naive path materialises ``[tokens, vocab]`` fp32 logits, their log-softmax and, in the
backward, a gradient of the same size: for 8k tokens and Qwen's 151,936-token vocabulary that
is ~5 GB per copy. Here the forward keeps one ``[chunk, vocab]`` buffer at a time and saves only
the per-token log-normaliser; the backward recomputes each chunk's logits and turns them into
the logit gradient in place. Values and gradients equal the naive computation
``log_softmax((hidden @ W.T).float() / T).gather(targets)`` up to float rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor


def chunk_logits(hidden: Tensor, weight: Tensor, temperature: float) -> Tensor:
    """fp32 logits [c, V] of one chunk; the matmul runs in the model dtype, as the LM head does."""
    logits = (hidden @ weight.T).float()
    if temperature != 1.0:
        logits.div_(temperature)
    return logits


def chunk_forward(logits: Tensor, targets: Tensor, with_entropy: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(logp [c], lse [c], entropy [c] | None) from logits [c, V]; overwrites ``logits``."""
    picked = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    top = logits.amax(dim=1, keepdim=True)
    shifted = logits.sub_(top)
    if with_entropy:
        probs = shifted.exp()
        total = probs.sum(dim=1)
        mean_shift = probs.mul_(shifted).sum(dim=1) / total  # Σ p·(z − max)
        entropy = total.log() - mean_shift
    else:
        total = shifted.exp_().sum(dim=1)
        entropy = None
    lse = top.squeeze(1) + total.log()
    return picked - lse, lse, entropy


def logit_grad(
    logits: Tensor, targets: Tensor, lse: Tensor, entropy: Tensor | None,
    grad_logp: Tensor | None, grad_entropy: Tensor | None, temperature: float,
) -> Tensor:
    """∂L/∂logits [c, V] in place of ``logits``.

    With log p = z − lse and p = softmax(z): ∂log p_y/∂z = onehot_y − p and
    ∂H/∂z = −p·(log p + H), so ∂L/∂z = g_lp·onehot − p·(g_lp + g_H·(log p + H)); z = logits/T.
    """
    log_p = logits.sub_(lse.unsqueeze(1))
    g_lp = torch.zeros_like(lse) if grad_logp is None else grad_logp.float()
    if grad_entropy is not None and entropy is not None:
        probs = log_p.exp()
        scale = log_p.add_(entropy.unsqueeze(1)).mul_(grad_entropy.float().unsqueeze(1))
        grad = scale.add_(g_lp.unsqueeze(1)).mul_(probs).neg_()
    else:
        grad = log_p.exp_().mul_(-g_lp.unsqueeze(1))
    grad.scatter_add_(1, targets.unsqueeze(1), g_lp.unsqueeze(1))
    if temperature != 1.0:
        grad.div_(temperature)
    return grad


class ChunkedTokenLogprobs(torch.autograd.Function):
    """Autograd function: forward saves (hidden, weight, targets, lse[, entropy]); the backward
    recomputes logits chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens, temperature, with_entropy):
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        entropy = torch.zeros_like(logp) if with_entropy else torch.zeros(0, device=hidden.device)
        for start in range(0, n, chunk_tokens):
            end = min(start + chunk_tokens, n)
            logits = chunk_logits(hidden[start:end], weight, temperature)
            lp, ls, ent = chunk_forward(logits, targets[start:end], with_entropy)
            logp[start:end], lse[start:end] = lp, ls
            if ent is not None:
                entropy[start:end] = ent
            del logits
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.chunk_tokens, ctx.temperature, ctx.with_entropy = chunk_tokens, temperature, with_entropy
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None, None
        for start in range(0, hidden.shape[0], ctx.chunk_tokens):
            end = min(start + ctx.chunk_tokens, hidden.shape[0])
            part = slice(start, end)
            logits = chunk_logits(hidden[part], weight, ctx.temperature)
            grad = logit_grad(
                logits, targets[part], lse[part], entropy[part] if ctx.with_entropy else None,
                None if grad_logp is None else grad_logp[part],
                None if grad_entropy is None else grad_entropy[part], ctx.temperature,
            ).to(weight.dtype)
            if need_h:
                grad_h[part] = grad @ weight
            if need_w:
                grad_w.addmm_(grad.T.float(), hidden[part].float())
            del logits, grad
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None


def token_logprobs(
    hidden: Tensor, lm_head_weight: Tensor, targets: Tensor, *,
    chunk_tokens: int, temperature: float = 1.0, with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """log π(targets | hidden) and optionally the entropy of π, both [N] fp32, with gradients
    to ``hidden`` [N, H] and ``lm_head_weight`` [V, H]; ``targets`` [N] int64.

    Peak extra memory is O(chunk_tokens · V) instead of O(N · V).
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens={chunk_tokens}: must be positive")
    logp, entropy = ChunkedTokenLogprobs.apply(
        hidden, lm_head_weight, targets.long(), chunk_tokens, float(temperature), with_entropy
    )
    return logp, entropy if with_entropy else None


def naive_token_logprobs(
    hidden: Tensor, lm_head_weight: Tensor, targets: Tensor, *, temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The reference the chunked path must equal: full [N, V] fp32 log-softmax (tests, benchmark)."""
    logits = (hidden @ lm_head_weight.T).float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(1, targets.long().unsqueeze(1)).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(dim=-1) if with_entropy else None
    return logp, entropy
