"""The learner's loss: sanitise a micro-batch, apply staleness and clip schedules, run the
configured objective (``learners/objectives/``), aggregate with the global normaliser, add the
Klear SFT term and the entropy bonus, and report metrics. Chosen once from config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from async_rl.config import AlgorithmConfig
from learners.advantages import sft_nll
from learners.aggregation import Aggregation, build_aggregation
from learners.logprobs import CoefficientFn
from learners.objectives import OBJECTIVES, TOKEN_LOCAL, TokenBatch
from learners.ratios import MIN_COUNT, log_ratio
from learners.staleness import clip_bounds, fresh_rows


@dataclass(frozen=True)
class LossInputs:
    """One micro-batch of response tokens, padded to ``[B, T]``.

    Per-token arrays share the shape ``[B, T]``; positions outside ``mask`` may hold anything,
    including ``-inf`` (they are replaced before any arithmetic, so no NaN reaches a gradient).
    """

    logp: Tensor  # [B, T] current-policy logprobs of the response tokens (requires grad)
    logp_old: Tensor  # [B, T] clip centre, no grad: proximal (decoupled) or behaviour (coupled)
    behavior_weight: Tensor  # [B, T] w after TIS/IcePop/M2PO (ones in coupled mode), no grad
    advantages: Tensor  # [B] per sequence (broadcast over tokens)
    mask: Tensor  # [B, T] bool: tokens that get gradient
    denom_mask: Tensor  # [B, T] bool: tokens counted in the normaliser (IcePop-masked stay in)
    staleness: Tensor  # [B] int64
    global_tokens: Tensor  # scalar: Σ denom_mask over the whole mini-batch, all micro-batches and ranks
    global_seqs: Tensor  # scalar: sequences in the whole mini-batch, all ranks
    entropy: Tensor | None = None  # [B, T] per-token entropy (logged; bonus if entropy_coef > 0)
    sft_rows: Tensor | None = None  # [B] bool: verified-correct rows (trajectory ``correct``), Klear SFT term
    global_sft_tokens: Tensor | None = None  # scalar: Σ denom_mask over sft rows, whole mini-batch


Objective = Callable[[LossInputs], tuple[Tensor, dict[str, Tensor]]]


# --------------------------------------------------------------------------- assembly


def token_batch(inp: LossInputs, keep: Tensor, cfg: AlgorithmConfig) -> TokenBatch:
    """Sanitise one micro-batch: values outside ``keep`` become 0 (``where``, never multiply,
    so a ``-inf`` padding logprob cannot turn into a NaN gradient)."""
    zero = torch.zeros_like(inp.logp).detach()
    eps_low, eps_high = clip_bounds(cfg.loss, cfg.staleness.schedule, inp.staleness, inp.logp.dtype)
    return TokenBatch(
        lp=torch.where(keep, inp.logp, zero),
        lp_old=torch.where(keep, inp.logp_old.detach().to(zero.dtype), zero),
        w=torch.where(keep, inp.behavior_weight.detach().to(zero.dtype), zero),
        adv=inp.advantages.detach().to(zero.dtype).unsqueeze(1),
        mask=keep,
        eps_low=eps_low.unsqueeze(1),
        eps_high=eps_high.unsqueeze(1),
    )


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, x, torch.zeros_like(x)).sum() / mask.sum().clamp(min=MIN_COUNT)


def batch_metrics(inp: LossInputs, tb: TokenBatch, fresh: Tensor) -> dict[str, Tensor]:
    """Ratio and weight statistics, approx KL (k3 = r − 1 − log r), staleness, masked tokens."""
    log_r = log_ratio(tb)
    ratio = log_r.exp()
    zero = torch.zeros_like(ratio)
    metrics = {
        "ratio/mean": masked_mean(ratio, tb.mask),
        "ratio/max": torch.where(tb.mask, ratio, zero).amax(),
        "ratio/min": torch.where(tb.mask, ratio, torch.full_like(ratio, float("inf"))).amin().nan_to_num(posinf=0.0),
        "weight/mean": masked_mean(tb.w, tb.mask),
        "weight/max": torch.where(tb.mask, tb.w, zero).amax(),
        "approx_kl": masked_mean(ratio - 1 - log_r, tb.mask),
        "staleness/mean": inp.staleness.to(torch.float64).mean(),
        "staleness/max": inp.staleness.amax(),
        "tokens/grad": tb.mask.sum(),
        "tokens/masked_stale": (inp.mask & ~fresh.unsqueeze(1)).sum(),
        "tokens/masked_offpolicy": (inp.denom_mask & ~inp.mask).sum(),
    }
    if inp.entropy is not None:
        metrics["entropy"] = masked_mean(inp.entropy.detach(), inp.denom_mask)
    return metrics


def extra_terms(
    inp: LossInputs, fresh: Tensor, cfg: AlgorithmConfig, aggregate: Aggregation
) -> tuple[Tensor, dict[str, Tensor]]:
    """Klear's SFT term α·NLL on correct rows (paper Eq. 13–14) and the entropy bonus."""
    extra = torch.zeros((), dtype=inp.logp.dtype, device=inp.logp.device)
    metrics: dict[str, Tensor] = {}
    if cfg.sft_coef > 0 and inp.sft_rows is not None:
        rows = (inp.sft_rows & fresh).unsqueeze(1)
        sft = sft_nll(inp.logp, inp.denom_mask & rows, inp.global_sft_tokens)
        extra = extra + cfg.sft_coef * sft
        metrics["loss/sft"] = sft.detach()
    if cfg.entropy_coef > 0 and inp.entropy is not None:
        keep = inp.denom_mask & fresh.unsqueeze(1)
        ent = torch.where(keep, inp.entropy, torch.zeros_like(inp.entropy))
        bonus = aggregate(ent, inp.denom_mask, inp.global_tokens, inp.global_seqs)
        extra = extra - cfg.entropy_coef * bonus
    return extra, metrics


def build_objective(cfg: AlgorithmConfig, *, max_staleness: int) -> Objective:
    """Choose the objective, aggregation and clip schedule once; return ``objective(inp)``.

    ``objective`` returns ``(loss, metrics)``: the loss is already normalised by the global
    counts, so the SUM of the micro-batch losses over micro-batches and DP ranks is the exact
    mini-batch loss (an engine that averages gradients over ranks, as DeepSpeed does, must scale
    each rank's loss by the world size). Rows with staleness > ``max_staleness`` never contribute.

    Metrics (0-d tensors, this micro-batch): ``loss/pg``, ``loss/sft``, ``clip/{high,low,dual}_frac``
    (GSPO: ``clip/{high,low}_seq_frac``), ``ratio/{mean,min,max}``, ``weight/{mean,max}``,
    ``approx_kl`` (k3), ``entropy``, ``staleness/{mean,max}``, ``tokens/grad``,
    ``tokens/masked_stale``, ``tokens/masked_offpolicy`` (IcePop/M2PO-masked, still counted in N).
    """
    token_loss = OBJECTIVES[cfg.loss.type].loss
    aggregate = build_aggregation(cfg.aggregation, norm_tokens=cfg.sum_norm_tokens)

    def objective(inp: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        fresh = fresh_rows(inp.staleness, max_staleness)
        tb = token_batch(inp, inp.mask & fresh.unsqueeze(1), cfg)
        per_token, metrics = token_loss(tb, cfg.loss)
        pg = aggregate(per_token, inp.denom_mask, inp.global_tokens, inp.global_seqs)
        extra, extra_metrics = extra_terms(inp, fresh, cfg, aggregate)
        with torch.no_grad():
            metrics.update(batch_metrics(inp, tb, fresh), **extra_metrics)
            metrics["loss/pg"] = pg.detach()
        return pg + extra, metrics

    return objective


# --------------------------------------------------------------------------- fused logprobs


def token_local(cfg: AlgorithmConfig) -> bool:
    """Whether the configured objective is token-local: ∂loss/∂logp_t and ∂loss/∂entropy_t depend
    on token t's own values alone (given the per-token and per-row data). True for the per-token
    ratio surrogates, since every aggregation, the SFT term and the entropy bonus are linear with
    weights that do not depend on logp; false for GSPO, whose sequence ratio couples a row."""
    return cfg.loss.type in TOKEN_LOCAL


def token_coefficients(objective: Objective, inp: LossInputs) -> tuple[Tensor, Tensor | None]:
    """(∂loss/∂logp [B, T], ∂loss/∂entropy [B, T] | None) at ``inp``, by autograd through the
    objective itself, so each formula keeps its one definition. None: the loss ignores entropy."""
    with torch.enable_grad():
        logp = inp.logp.detach().requires_grad_()
        entropy = None if inp.entropy is None else inp.entropy.detach().requires_grad_()
        loss, _ = objective(replace(inp, logp=logp, entropy=entropy))
        leaves = [logp] if entropy is None else [logp, entropy]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad else [None] * len(leaves)
    g_logp = torch.zeros_like(logp) if grads[0] is None else grads[0]
    return g_logp, grads[1] if len(grads) > 1 else None


def chunk_coefficients(objective: Objective, inp: LossInputs, row: Tensor, col: Tensor) -> CoefficientFn:
    """The ``coefficient_fn`` of :func:`learners.logprobs.fused_token_objective` for a token-local
    objective. Token k of the flat order sits at ``(row[k], col[k])`` of ``inp``'s [B, T] layout
    (``inp.logp``/``inp.entropy`` are placeholders). A chunk's values are placed there, every other
    token holds 0, which token locality makes irrelevant to this chunk's coefficients."""

    def coefficients(tokens: slice, logp: Tensor, entropy: Tensor | None) -> tuple[Tensor, Tensor | None]:
        at = (row[tokens], col[tokens])
        zeros = torch.zeros(inp.logp.shape, dtype=inp.logp.dtype, device=logp.device)
        chunk = replace(
            inp, logp=zeros.index_put(at, logp.to(zeros.dtype)),
            entropy=None if entropy is None else zeros.index_put(at, entropy.to(zeros.dtype)),
        )
        g_logp, g_entropy = token_coefficients(objective, chunk)
        return g_logp[at], None if g_entropy is None else g_entropy[at]

    return coefficients
