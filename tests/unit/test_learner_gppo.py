"""ALGORITHMS.md §7 properties 1–7, 9 and 10: GPPO against PPO/DAPO and its oracles.

ε_l=0.2, ε_h=0.28, c=10, β=1 unless stated; lp_old=0 so lp = log r; g = ∂ℓ/∂lp = −A·F.
"""

from __future__ import annotations

import pytest
import torch
from learner_cases import ALL_TYPES, DT, token_grad
from objective_oracles import gppo_clamp_oracle, gppo_general_oracle

from learners.objectives.gppo import GPPOConfig

RATIOS = torch.logspace(-3, 3, 241, dtype=DT)
ADVS = (-2.0, -0.5, 0.0, 0.5, 2.0)


def ppo_reference(r: torch.Tensor, a: float, c: float = 10.0) -> torch.Tensor:
    """Textbook clip-higher PPO with dual clip, written independently of learners/."""
    loss = torch.maximum(-a * r, -a * r.clamp(0.8, 1.28))
    return torch.minimum(loss, torch.full_like(loss, -c * a)) if a < 0 else loss


# 1 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("adv", ADVS)
def test_gppo_loss_value_equals_clip_higher_dual_clip_ppo_value_elementwise(adv):
    gppo, _ = token_grad("gppo", RATIOS, adv)
    dapo, _ = token_grad("dapo", RATIOS, adv)
    reference = ppo_reference(RATIOS, adv)
    torch.testing.assert_close(gppo, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dapo, reference, rtol=1e-12, atol=1e-12)


# 2 ----------------------------------------------------------------------------------------
def test_in_band_gradient_is_minus_a_times_r_for_gppo_and_ppo():
    for kind in ("gppo", "dapo"):
        _, g = token_grad(kind, [1.2], 1.0)
        assert g.item() == pytest.approx(-1.2, abs=1e-12)
    _, g = token_grad("gppo", [0.85, 1.0, 1.25], -2.0)
    torch.testing.assert_close(g, torch.tensor([1.7, 2.0, 2.5], dtype=DT))


# 3 ----------------------------------------------------------------------------------------
def test_high_side_gppo_keeps_a_constant_gradient_where_ppo_has_none():
    ratios = [1.5, 3.0, 12.0]
    _, g_ppo = token_grad("dapo", ratios, 1.0)
    _, g_gppo = token_grad("gppo", ratios, 1.0)
    _, g_beta = token_grad("gppo", ratios, 1.0, beta2=0.5)
    assert g_ppo.tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(g_gppo, torch.full((3,), -1.28, dtype=DT))
    torch.testing.assert_close(g_beta, torch.full((3,), -0.5 * 1.28, dtype=DT))


# 4 ----------------------------------------------------------------------------------------
def test_low_side_gppo_keeps_a_constant_gradient_scaled_by_beta1_or_zero_with_only_high():
    _, g_ppo = token_grad("dapo", [0.5], -1.0)
    _, g_gppo = token_grad("gppo", [0.5], -1.0)
    _, g_beta = token_grad("gppo", [0.5], -1.0, beta1=0.25)
    _, g_high = token_grad("gppo", [0.5], -1.0, only_high=True)
    assert g_ppo.item() == 0.0
    assert g_gppo.item() == pytest.approx(0.8, abs=1e-12)
    assert g_beta.item() == pytest.approx(0.2, abs=1e-12)
    assert g_high.item() == 0.0


# 5 ----------------------------------------------------------------------------------------
def test_pessimistic_sides_keep_the_plain_ratio_gradient():
    for kind in ("gppo", "dapo"):
        _, g_pos = token_grad(kind, [0.5], 1.0)
        _, g_neg = token_grad(kind, [3.0], -1.0)
        assert g_pos.item() == pytest.approx(-0.5, abs=1e-12)
        assert g_neg.item() == pytest.approx(3.0, abs=1e-12)


# 6 ----------------------------------------------------------------------------------------
def test_dual_clip_caps_the_loss_at_minus_c_a_with_zero_gradient():
    for kind in ("gppo", "dapo"):
        loss, g = token_grad(kind, [12.0, 50.0], -1.0)
        torch.testing.assert_close(loss, torch.tensor([10.0, 10.0], dtype=DT))
        assert g.tolist() == [0.0, 0.0]


# 7 ----------------------------------------------------------------------------------------
def test_gppo_coefficient_is_continuous_at_both_clip_bounds_while_ppo_jumps_to_zero():
    step = 1e-9
    for bound, adv in ((0.8, -1.0), (1.28, 1.0)):
        _, g = token_grad("gppo", [bound - step, bound + step], adv)
        _, g_ppo = token_grad("dapo", [bound - step, bound + step], adv)
        assert abs(g[0] - g[1]).item() < 1e-8
        assert abs(g_ppo[0] - g_ppo[1]).item() == pytest.approx(bound, abs=1e-8)


@pytest.mark.parametrize("adv", ADVS)
def test_gppo_gradient_is_bounded_by_a_times_max_of_upper_bound_and_c(adv):
    ratios = torch.logspace(-4, 4, 801, dtype=DT)
    _, g = token_grad("gppo", ratios, adv)
    assert (g.abs() <= abs(adv) * max(1.28, 10.0) + 1e-12).all()


# 9 ----------------------------------------------------------------------------------------
def oracle_grad(oracle, ratios: torch.Tensor, adv: torch.Tensor, cfg: GPPOConfig):
    lp = ratios.log().reshape(-1, 1).requires_grad_()
    loss = oracle(lp, torch.zeros_like(lp), adv.reshape(-1, 1), cfg)
    (g,) = torch.autograd.grad(loss.sum(), lp)
    return loss.detach().flatten(), g.flatten()


def random_cases(seed: int, n: int = 4000):
    gen = torch.Generator().manual_seed(seed)
    ratios = 0.05 + (20 - 0.05) * torch.rand(n, generator=gen, dtype=DT)
    adv = torch.tensor([0.5, -0.5, 2.0, -2.0], dtype=DT)[torch.randint(0, 4, (n,), generator=gen)]
    return ratios, adv


def test_coefficient_form_gradient_equals_the_stop_gradient_clamp_oracle():
    ratios, adv = random_cases(0)
    cfg = GPPOConfig()
    _, g = token_grad("gppo", ratios, adv)
    value_oracle, g_oracle = oracle_grad(gppo_clamp_oracle, ratios, adv, cfg)
    torch.testing.assert_close(g, g_oracle, rtol=0, atol=1e-6)
    value, _ = token_grad("gppo", ratios, adv)
    torch.testing.assert_close(value, value_oracle, rtol=0, atol=1e-9)


def test_general_form_with_unit_betas_equals_plain_gppo_in_value_and_gradient():
    ratios, adv = random_cases(1)
    cfg = GPPOConfig()
    v_plain, g_plain = oracle_grad(gppo_clamp_oracle, ratios, adv, cfg)
    v_general, g_general = oracle_grad(gppo_general_oracle, ratios, adv, cfg)
    torch.testing.assert_close(v_general, v_plain, rtol=0, atol=1e-9)
    torch.testing.assert_close(g_general, g_plain, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kw", [{"beta1": 0.25}, {"beta1": 0.5, "beta2": 0.75}, {"only_high": True}])
def test_coefficient_form_gradient_equals_the_general_beta_oracle(kw):
    ratios, adv = random_cases(2)
    cfg = GPPOConfig(**kw)
    _, g = token_grad("gppo", ratios, adv, **kw)
    _, g_oracle = oracle_grad(gppo_general_oracle, ratios, adv, cfg)
    torch.testing.assert_close(g, g_oracle, rtol=0, atol=1e-6)


def test_gppo_logged_value_scales_the_clipped_sides_by_beta_as_eq_17_and_klears_general_form():
    ratios, adv = random_cases(3)
    kw = {"beta1": 0.25, "beta2": 0.75}
    value, g = token_grad("gppo", ratios, adv, **kw)
    v_oracle, g_oracle = oracle_grad(gppo_general_oracle, ratios, adv, GPPOConfig(**kw))
    torch.testing.assert_close(value, v_oracle, rtol=0, atol=1e-9)
    torch.testing.assert_close(g, g_oracle, rtol=0, atol=1e-6)
    low, _ = token_grad("gppo", [0.5], -1.0, beta1=0.25)  # PPO's value here is 0.8
    high, _ = token_grad("gppo", [2.0], 1.0, beta2=0.75)  # PPO's value here is -1.28
    assert low.item() == pytest.approx(0.25 * 0.8, abs=1e-12)
    assert high.item() == pytest.approx(0.75 * -1.28, abs=1e-12)


def test_only_high_keeps_ppos_value_on_the_low_side_as_klears_clamp_form():
    value, g = token_grad("gppo", [0.5], -1.0, beta1=0.25, only_high=True)
    assert value.item() == pytest.approx(0.8, abs=1e-12) and g.item() == 0.0


# 10 ---------------------------------------------------------------------------------------
def test_infinite_clip_range_and_no_dual_clip_give_the_vanilla_importance_sampling_gradient():
    ratios = torch.logspace(-3, 3, 61, dtype=DT)
    for kind in ("gppo", "dapo", "ppo", "cispo"):
        for adv in (-1.5, 1.5):
            _, g = token_grad(kind, ratios, adv, eps_low=1e9, eps_high=1e9, dual_clip_c=None)
            torch.testing.assert_close(g, -adv * ratios, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_every_objective_gives_minus_a_at_the_first_on_policy_step(kind):
    adv = torch.tensor([-2.0, -0.5, 0.5, 2.0], dtype=DT)
    _, g = token_grad(kind, torch.ones(4, dtype=DT), adv, cispo_two_sided=True)
    torch.testing.assert_close(g, -adv, rtol=0, atol=1e-12)
