"""Token logprobs and entropy from final hidden states, chunked over tokens.

The naive path materialises ``[tokens, vocab]`` fp32 logits, their log-softmax and, in the
backward, a gradient of the same size: for 8k tokens and Qwen's 151,936-token vocabulary that
is ~5 GB per copy. Here the forward keeps one ``[chunk, vocab]`` buffer at a time and saves only
the per-token log-normaliser; the backward recomputes each chunk's logits and turns them into
the logit gradient in place. Values and gradients equal the naive computation
``log_softmax((hidden @ W.T).float() / T).gather(targets)`` up to float rounding.

Recomputing costs a fourth LM-head matmul against the naive path's three. When the loss is
token-local (its gradient with respect to a token's logprob and entropy depends on that token
alone, given fixed per-token data), :func:`fused_token_objective` asks for those gradient
coefficients while each chunk's logits are still in memory and finishes the chunk's
hidden-state and LM-head gradients right there: three matmuls per chunk and nothing to
recompute.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

# (tokens, logp [c], entropy [c] | None) of one chunk → (∂L/∂logp [c], ∂L/∂entropy [c] | None).
CoefficientFn = Callable[[slice, Tensor, Tensor | None], tuple[Tensor, Tensor | None]]


def chunk_logits(hidden: Tensor, weight: Tensor, temperature: float, out: Tensor | None = None) -> Tensor:
    """fp32 logits [c, V] of one chunk, written into ``out`` [c, V] fp32 when given; the matmul
    runs in the model dtype, as the LM head does."""
    if out is None:
        logits = (hidden @ weight.T).float()
    elif weight.dtype == torch.float32:
        logits = torch.mm(hidden, weight.T, out=out)
    else:
        logits = out.copy_(hidden @ weight.T)
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


def fused_chunk(
    logits: Tensor, targets: Tensor, part: slice, coefficient_fn: CoefficientFn,
    temperature: float, probs_out: Tensor | None,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """(logp [c], entropy [c] | None, surrogate term (0-d), ∂L/∂(h·Wᵀ) [c, V]) of one chunk.

    ``logits`` [c, V] (already divided by T) is overwritten with the gradient; ``probs_out``
    [c, V] holds the softmax when the entropy is wanted (None: no entropy). With z' = z − max,
    p = softmax(z) and m = Σ p·z': log p_y = z'_y − log Σ e^z', H = log Σ e^z' − m and
    ∂L/∂z = g·(onehot_y − p) − g_H·p·(z' − m), where (g, g_H) come from ``coefficient_fn``.
    """
    picked = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    top = logits.amax(dim=1, keepdim=True)
    shifted = logits.sub_(top)
    if probs_out is not None:
        probs = torch.exp(shifted, out=probs_out)
        total = probs.sum(dim=1)
        probs.div_(total.unsqueeze(1))
        mean_shift = torch.bmm(probs.unsqueeze(1), shifted.unsqueeze(2)).view(-1)  # no [c, V] temporary
        entropy = total.log() - mean_shift
    else:
        probs = shifted.exp_()  # unnormalised: e^z'
        total = probs.sum(dim=1)
        entropy = None
    logp = picked - top.squeeze(1) - total.log()
    g_lp, g_ent = coefficient_fn(part, logp, entropy)
    g_lp = g_lp.float()
    term = (g_lp * logp).sum()
    if g_ent is not None:
        if entropy is None:
            raise ValueError("coefficient_fn returned an entropy coefficient but with_entropy=False")
        g_ent = g_ent.float()
        term = term + (g_ent * entropy).sum()
        scale, offset = -g_ent / temperature, (g_ent * mean_shift - g_lp) / temperature
        grad = shifted.mul_(scale.unsqueeze(1)).add_(offset.unsqueeze(1)).mul_(probs)
    elif entropy is not None:
        grad = probs.mul_((-g_lp / temperature).unsqueeze(1))
    else:
        grad = probs.mul_((-g_lp / (total * temperature)).unsqueeze(1))
    grad.scatter_add_(1, targets.unsqueeze(1), (g_lp / temperature).unsqueeze(1))
    return logp, entropy, term, grad


class FusedTokenObjective(torch.autograd.Function):
    """Forward: logprobs, entropies and, chunk by chunk, the caller's loss gradients with respect
    to ``hidden`` and ``weight`` (kept, [N, H] and [V, H]); backward: those gradients times the
    incoming scalar gradient. Nothing is recomputed."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, coefficient_fn, chunk_tokens, temperature, with_entropy):
        n, vocab = hidden.shape[0], weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dev = hidden.device
        logp = torch.empty(n, dtype=torch.float32, device=dev)
        entropy = torch.empty_like(logp) if with_entropy else logp.new_zeros(0)
        surrogate = logp.new_zeros(())
        grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=dev) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        # One logits buffer (and one softmax buffer) reused by every chunk.
        scratch = torch.empty((min(chunk_tokens, n), vocab), dtype=torch.float32, device=dev)
        probs_scratch = torch.empty_like(scratch) if with_entropy else None
        for start in range(0, n, chunk_tokens):
            part = slice(start, min(start + chunk_tokens, n))
            rows = part.stop - start
            logits = chunk_logits(hidden[part], weight, temperature, out=scratch[:rows])
            lp, ent, term, grad = fused_chunk(
                logits, targets[part], part, coefficient_fn, temperature,
                None if probs_scratch is None else probs_scratch[:rows],
            )
            logp[part] = lp
            if ent is not None:
                entropy[part] = ent
            surrogate += term
            if need_h:
                torch.mm(grad.to(weight.dtype), weight, out=grad_h[part])
            if need_w:
                grad_w.addmm_(grad.T, hidden[part].float())
        ctx.grads = (grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(logp, entropy)
        ctx.set_materialize_grads(False)
        return surrogate, logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_surrogate, grad_logp, grad_entropy):
        if ctx.grads is None:
            raise RuntimeError("fused_token_objective: its gradients are handed out once (no retain_graph)")
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        if grad_surrogate is None:
            return None, None, None, None, None, None, None
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_surrogate.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_surrogate).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None


def fused_token_objective(
    hidden: Tensor, lm_head_weight: Tensor, targets: Tensor, coefficient_fn: CoefficientFn, *,
    chunk_tokens: int, temperature: float = 1.0, with_entropy: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(surrogate, logp [N], entropy [N] | None) for a loss L that is token-local in (logp, entropy).

    ``coefficient_fn(tokens, logp, entropy)`` receives one chunk's fp32 values (entropy None
    unless ``with_entropy``), runs with autograd disabled, and returns ∂L/∂logp and ∂L/∂entropy
    for those tokens ([c] each; the second may be None = 0). ``surrogate`` is the 0-d fp32
    Σ_t ∂L/∂logp_t·logp_t + ∂L/∂H_t·H_t: its value is only the linearisation's, its gradient
    with respect to ``hidden`` [N, H] and ``lm_head_weight`` [V, H] is L's. A caller that knows
    L's value adds ``value + (surrogate − surrogate.detach())``. ``logp`` and ``entropy`` carry
    no gradient. Peak extra memory: one or two [chunk, V] fp32 buffers plus a [V, H] fp32
    gradient; three matmuls per chunk.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens={chunk_tokens}: must be positive")
    surrogate, logp, entropy = FusedTokenObjective.apply(
        hidden, lm_head_weight, targets.long(), coefficient_fn, chunk_tokens, float(temperature), with_entropy
    )
    return surrogate, logp, entropy if with_entropy else None


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
