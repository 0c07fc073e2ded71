"""Builders shared by the tests/unit/test_learner_*.py files (no fixtures, plain functions)."""

from __future__ import annotations

import torch
from torch import Tensor

from async_rl.config import AlgorithmConfig, LossConfig
from learners.objectives import LossInputs
from learners.surrogates import OBJECTIVES, TokenBatch

DT = torch.float64
ALL_TYPES = list(OBJECTIVES)


def token_grad(
    kind: str, ratios, adv, *, eps_low: float = 0.2, eps_high: float = 0.28, w=None, **loss_kw
) -> tuple[Tensor, Tensor]:
    """(per-token loss, g = ∂ℓ/∂lp) for one-token rows with lp_old = 0 and lp = log r."""
    r = torch.as_tensor(ratios, dtype=DT).reshape(-1, 1)
    lp = r.log().requires_grad_()
    adv_t = torch.as_tensor(adv, dtype=DT).reshape(-1, 1).expand_as(r)
    tb = TokenBatch(
        lp=lp,
        lp_old=torch.zeros_like(r),
        w=torch.ones_like(r) if w is None else torch.as_tensor(w, dtype=DT).reshape(-1, 1),
        adv=adv_t.clone(),
        mask=torch.ones_like(r, dtype=torch.bool),
        eps_low=torch.full_like(r, eps_low),
        eps_high=torch.full_like(r, eps_high),
    )
    cfg = LossConfig.model_construct(**{**LossConfig().model_dump(), "type": kind, **loss_kw})
    loss, _ = OBJECTIVES[kind](tb, cfg)
    (grad,) = torch.autograd.grad(loss.sum(), lp)
    return loss.detach().flatten(), grad.flatten()


def algorithm(**kw) -> AlgorithmConfig:
    """AlgorithmConfig with nested sections given as dicts, e.g. loss={'type': 'ppo'}."""
    return AlgorithmConfig.model_validate(kw)


def loss_inputs(
    logp: Tensor, *, logp_old: Tensor | None = None, adv, w: Tensor | None = None,
    mask: Tensor | None = None, denom_mask: Tensor | None = None, staleness=None,
    global_tokens=None, global_seqs=None, **extra,
) -> LossInputs:
    """LossInputs for a [B, T] batch with sensible defaults (on-policy, all tokens, fresh)."""
    b = logp.shape[0]
    mask = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask
    denom = mask if denom_mask is None else denom_mask
    return LossInputs(
        logp=logp,
        logp_old=torch.zeros_like(logp) if logp_old is None else logp_old,
        behavior_weight=torch.ones_like(logp) if w is None else w,
        advantages=torch.as_tensor(adv, dtype=logp.dtype).reshape(b),
        mask=mask,
        denom_mask=denom,
        staleness=torch.zeros(b, dtype=torch.int64) if staleness is None else torch.as_tensor(staleness),
        global_tokens=torch.as_tensor(denom.sum() if global_tokens is None else global_tokens),
        global_seqs=torch.as_tensor(b if global_seqs is None else global_seqs),
        **extra,
    )


def objective_grad(cfg: AlgorithmConfig, inp: LossInputs, *, max_staleness: int = 4):
    """(loss, ∂loss/∂logp, metrics) of the built objective."""
    from learners.objectives import build_objective

    loss, metrics = build_objective(cfg, max_staleness=max_staleness)(inp)
    (grad,) = torch.autograd.grad(loss, inp.logp)
    return loss.detach(), grad, metrics
