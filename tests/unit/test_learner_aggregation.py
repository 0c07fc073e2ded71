"""ALGORITHMS.md §7 properties 8 (A=0 for every objective) and 13 (aggregation)."""

from __future__ import annotations

import pytest
import torch
from learner_cases import ALL_TYPES, DT, algorithm, loss_inputs, objective_grad

from learners.loss import build_objective

AGGREGATIONS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def batch(seed: int = 0, rows: int = 6, width: int = 7):
    """A ragged batch: random logprobs, ratios near 1, varied lengths, ±advantages."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])[:rows]
    mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    logp = -torch.rand(rows, width, generator=gen, dtype=DT) * 3
    logp_old = logp + 0.3 * torch.randn(rows, width, generator=gen, dtype=DT)
    w = 0.5 + torch.rand(rows, width, generator=gen, dtype=DT)
    adv = torch.randn(rows, generator=gen, dtype=DT)
    return logp, logp_old, w, adv, mask


def split_grad(cfg, rows_per_part: list[list[int]]):
    """Gradient w.r.t. the full logp when the batch is processed in parts with global counts."""
    logp, logp_old, w, adv, mask = batch()
    leaf = logp.clone().requires_grad_()
    objective = build_objective(cfg, max_staleness=4)
    total = torch.zeros((), dtype=DT)
    for rows in rows_per_part:
        idx = torch.tensor(rows)
        inp = loss_inputs(
            leaf[idx], logp_old=logp_old[idx], w=w[idx], adv=adv[idx], mask=mask[idx],
            global_tokens=mask.sum(), global_seqs=len(adv),
        )
        total = total + objective(inp)[0]
    (grad,) = torch.autograd.grad(total, leaf)
    return total.detach(), grad


# 13 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("kind", ["gppo", "cispo", "gspo"])
def test_gradient_is_the_same_for_one_or_several_micro_batches_and_two_ranks(kind, agg):
    cfg = algorithm(loss={"type": kind}, aggregation=agg, sft_coef=0.0)
    whole_loss, whole = split_grad(cfg, [[0, 1, 2, 3, 4, 5]])
    micro_loss, micro = split_grad(cfg, [[0, 1], [2], [3, 4, 5]])
    # Two DP ranks, each with two micro-batches: the per-rank gradients sum to the whole.
    ranks_loss, ranks = split_grad(cfg, [[0, 4], [2], [1, 3], [5]])
    torch.testing.assert_close(micro, whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(ranks, whole, rtol=0, atol=1e-12)
    assert micro_loss.item() == pytest.approx(whole_loss.item(), abs=1e-12)
    assert ranks_loss.item() == pytest.approx(whole_loss.item(), abs=1e-12)


def test_token_mean_divides_by_the_global_token_count():
    logp = torch.zeros(1, 4, dtype=DT, requires_grad=True)
    loss, g, _ = objective_grad(algorithm(sft_coef=0.0), loss_inputs(logp, adv=[1.0], global_tokens=40))
    torch.testing.assert_close(g, torch.full((1, 4), -1.0 / 40, dtype=DT))


def test_a_response_twice_as_long_carries_twice_the_weight_under_token_mean():
    logp = torch.zeros(2, 6, dtype=DT, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    _, g, _ = objective_grad(algorithm(sft_coef=0.0), loss_inputs(logp, adv=[1.0, 1.0], mask=mask))
    row_weight = g.sum(dim=1)
    assert row_weight[1].item() == pytest.approx(2 * row_weight[0].item(), rel=1e-12)


def test_seq_mean_token_mean_gives_every_response_the_same_weight():
    logp = torch.zeros(2, 6, dtype=DT, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    cfg = algorithm(aggregation="seq-mean-token-mean", sft_coef=0.0)
    _, g, _ = objective_grad(cfg, loss_inputs(logp, adv=[1.0, 1.0], mask=mask))
    torch.testing.assert_close(g.sum(dim=1), torch.tensor([-0.5, -0.5], dtype=DT))


def test_seq_mean_token_sum_norm_uses_the_constant_length():
    logp = torch.zeros(2, 3, dtype=DT, requires_grad=True)
    cfg = algorithm(aggregation="seq-mean-token-sum-norm", sum_norm_tokens=10, sft_coef=0.0)
    _, g, _ = objective_grad(cfg, loss_inputs(logp, adv=[1.0, 1.0]))
    torch.testing.assert_close(g, torch.full((2, 3), -1.0 / 20, dtype=DT))


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("kind", ALL_TYPES)
def test_padding_contributes_exactly_zero_even_with_minus_infinity_logprobs(kind, agg):
    logp, logp_old, w, adv, mask = batch(seed=3)
    logp = torch.where(mask, logp, -torch.inf).requires_grad_()
    logp_old = torch.where(mask, logp_old, -torch.inf)
    w = torch.where(mask, w, torch.nan)
    cfg = algorithm(loss={"type": kind}, aggregation=agg)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    inp = loss_inputs(
        logp, logp_old=logp_old, w=w, adv=adv, mask=mask,
        sft_rows=rewards == 1.0, global_sft_tokens=mask[rewards == 1.0].sum(),
    )
    loss, g, metrics = objective_grad(cfg, inp)
    assert torch.isfinite(loss)
    assert torch.isfinite(g).all()
    assert (g[~mask] == 0).all()
    assert all(torch.isfinite(v).all() for v in metrics.values())


# 8 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ALL_TYPES)
def test_zero_advantage_gives_zero_loss_and_zero_gradient_for_every_objective(kind):
    logp, logp_old, w, _, mask = batch(seed=5)
    logp = logp.requires_grad_()
    loss = {"type": kind, **({"cispo_two_sided": True} if kind == "cispo" else {})}
    cfg = algorithm(loss=loss, sft_coef=0.0)
    loss, g, _ = objective_grad(cfg, loss_inputs(logp, logp_old=logp_old, w=w, adv=torch.zeros(6), mask=mask))
    assert loss.item() == 0.0
    assert g.abs().max().item() == 0.0


def test_entropy_bonus_pushes_entropy_up_with_its_coefficient_over_the_global_count():
    logp = torch.zeros(1, 4, dtype=DT, requires_grad=True)
    entropy = torch.rand(1, 4, dtype=DT).requires_grad_()
    inp = loss_inputs(logp, adv=[0.0], entropy=entropy, global_tokens=8)
    loss, metrics = build_objective(algorithm(entropy_coef=0.01, sft_coef=0.0), max_staleness=4)(inp)
    (g,) = torch.autograd.grad(loss, entropy)
    torch.testing.assert_close(g, torch.full((1, 4), -0.01 / 8, dtype=DT))
    assert metrics["entropy"].item() == pytest.approx(entropy.mean().item())
