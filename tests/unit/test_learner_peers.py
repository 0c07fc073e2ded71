"""ALGORITHMS.md §7 properties 11 (CISPO) and 12 (GSPO), plus REINFORCE-TIS and the registry."""

from __future__ import annotations

import typing

import pytest
import torch
from learner_cases import DT, algorithm, loss_inputs, objective_grad, token_grad

from async_rl.config import AlgorithmConfig
from learners.objectives import OBJECTIVES, TOKEN_LOCAL

RATIOS = torch.tensor([0.3, 0.5, 0.9, 1.0, 1.1, 1.5, 4.0, 30.0], dtype=DT)


# 11 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("adv", [-1.5, 1.5])
def test_two_sided_cispo_gradient_is_minus_a_times_the_clipped_ratio_for_both_signs(adv):
    _, g = token_grad("cispo", RATIOS, adv, cispo_two_sided=True)
    torch.testing.assert_close(g, -adv * RATIOS.clamp(0.8, 1.28), rtol=1e-12, atol=0)


def test_cispo_weight_carries_no_gradient_so_autograd_equals_the_analytic_value():
    lp = RATIOS.log().requires_grad_()
    loss, g = token_grad("cispo", RATIOS, 1.0)
    # With a differentiable weight the gradient would gain r·lp terms; it must not.
    torch.testing.assert_close(g, -RATIOS.clamp(max=1.28), rtol=1e-12, atol=0)
    torch.testing.assert_close(loss, -RATIOS.clamp(max=1.28) * lp.detach(), rtol=1e-12, atol=0)


def test_one_sided_cispo_has_no_lower_bound():
    _, g = token_grad("cispo", [0.5], -1.0)
    assert g.item() == pytest.approx(0.5, abs=1e-12)
    _, g_two = token_grad("cispo", [0.5], -1.0, cispo_two_sided=True)
    assert g_two.item() == pytest.approx(0.8, abs=1e-12)


def test_reinforce_tis_truncates_the_ratio_above_and_keeps_every_token():
    _, g = token_grad("reinforce_tis", RATIOS, -1.0, eps_high=0.02)
    torch.testing.assert_close(g, RATIOS.clamp(max=1.02), rtol=1e-12, atol=0)


# 12 ---------------------------------------------------------------------------------------
def gspo_case(kind: str, diffs: list[float], adv: float):
    """One sequence with per-token lp − lp_old = diffs, GSPO bounds 3e-4/4e-4, seq-mean-token-mean."""
    lp = torch.tensor([diffs], dtype=DT).requires_grad_()
    cfg = algorithm(
        loss={"type": kind, "eps_low": 3e-4, "eps_high": 4e-4},
        aggregation="seq-mean-token-mean",
    )
    return objective_grad(cfg, loss_inputs(lp, adv=[adv]))


@pytest.mark.parametrize("kind", ["gspo", "gspo_token"])
def test_gspo_unclipped_tokens_share_the_sequence_ratio_gradient(kind):
    diffs = [1e-4, -2e-4, 3e-4, 0.0]
    s = torch.tensor(diffs, dtype=DT).mean().exp()
    loss, g, _ = gspo_case(kind, diffs, 2.0)
    torch.testing.assert_close(g, torch.full((1, 4), -2.0 * s.item() / 4, dtype=DT), rtol=1e-12, atol=0)
    assert loss.item() == pytest.approx(-2.0 * s.item(), rel=1e-12)


@pytest.mark.parametrize("kind", ["gspo", "gspo_token"])
def test_gspo_clips_whole_sequences_on_the_pessimistic_side(kind):
    _, g_high, metrics = gspo_case(kind, [1e-3, 2e-3, 0.0], 1.0)  # s ≈ 1.001 > 1+4e-4, A>0
    _, g_low, _ = gspo_case(kind, [-1e-3, -2e-3, 0.0], -1.0)  # s ≈ 0.999 < 1−3e-4, A<0
    assert g_high.abs().max().item() == 0.0
    assert g_low.abs().max().item() == 0.0
    assert metrics["clip/high_seq_frac"].item() == 1.0


def test_gspo_sequence_ratio_is_the_geometric_mean_over_the_row():
    diffs = [0.1, -0.3, 0.05]
    lp = torch.tensor([diffs + [0.0]], dtype=DT).requires_grad_()
    mask = torch.tensor([[True, True, True, False]])
    cfg = algorithm(loss={"type": "gspo", "eps_low": 1.0 - 1e-9, "eps_high": 1e9}, aggregation="seq-mean-token-mean")
    loss, _, _ = objective_grad(cfg, loss_inputs(lp, adv=[1.0], mask=mask))
    assert loss.item() == pytest.approx(-torch.tensor(diffs).mean().exp().item(), rel=1e-6)


def test_every_configurable_loss_type_has_an_objective():
    members = typing.get_args(AlgorithmConfig.model_fields["loss"].annotation)
    names = [typing.get_args(member)[0].model_fields["type"].default for member in members]
    assert sorted(names) == sorted(OBJECTIVES)
    assert {"cispo", "dapo", "gppo", "gspo", "gspo_token", "ppo", "reinforce_tis"} <= set(OBJECTIVES)
    assert {"cispo", "dapo", "gppo", "ppo", "reinforce_tis"} <= TOKEN_LOCAL
    assert not {"gspo", "gspo_token"} & TOKEN_LOCAL


def test_each_objective_lives_in_the_module_named_by_its_type():
    for name, objective in OBJECTIVES.items():
        assert objective.config.__module__ == objective.loss.__module__ == f"learners.objectives.{name}"
