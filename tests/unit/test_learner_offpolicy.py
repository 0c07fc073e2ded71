"""ALGORITHMS.md §7 properties 14 (decoupled/TIS), 15 (masking conventions, staleness) and
16 (M2PO), plus the ε(s) schedules and per-row staleness."""

from __future__ import annotations

import math

import pytest
import torch
from learner_cases import DT, algorithm, loss_inputs, objective_grad

from async_rl.config import OffPolicyConfig, StalenessScheduleConfig
from learners.objectives.gppo import GPPOConfig
from learners.offpolicy import behavior_weights, clip_centre, m2po_mask
from learners.staleness import clip_bounds, eps_schedule


def ragged(seed: int):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.arange(5).unsqueeze(0) < torch.tensor([[5], [3], [4]])
    logp = -torch.rand(3, 5, generator=gen, dtype=DT) * 2
    behavior = logp + 0.4 * torch.randn(3, 5, generator=gen, dtype=DT)
    prox = logp + 0.2 * torch.randn(3, 5, generator=gen, dtype=DT)
    adv = torch.tensor([1.0, -0.7, 0.4], dtype=DT)
    return logp, prox, behavior, adv, mask


def run(mode: str, logp, prox, behavior, adv, mask, **off):
    """Loss and gradient of GPPO after the off-policy step of ``mode``."""
    cfg = OffPolicyConfig(mode=mode, **off)
    w, keep, _ = behavior_weights(prox, behavior, mask, cfg)
    leaf = logp.clone().requires_grad_()
    inp = loss_inputs(leaf, logp_old=clip_centre(prox, behavior, cfg), w=w, adv=adv, mask=keep, denom_mask=mask)
    return objective_grad(algorithm(sft_coef=0.0), inp)


# 14 ---------------------------------------------------------------------------------------
def test_decoupled_with_proximal_equal_to_behaviour_is_exactly_coupled_gppo():
    logp, _, behavior, adv, mask = ragged(0)
    loss_d, g_d, _ = run("decoupled", logp, behavior.clone(), behavior, adv, mask)
    loss_c, g_c, _ = run("coupled", logp, None, behavior, adv, mask)
    assert loss_d.item() == loss_c.item()
    assert torch.equal(g_d, g_c)


def test_no_correction_is_decoupled_gppo_with_the_behaviour_weight_left_out():
    logp, prox, behavior, adv, mask = ragged(3)
    assert not torch.allclose(prox[mask], behavior[mask])  # stale rows: the weight would not be 1
    loss_n, g_n, _ = run("none", logp, prox, behavior, adv, mask)
    leaf = logp.clone().requires_grad_()
    ones = torch.where(mask, torch.ones_like(prox), torch.zeros_like(prox))
    loss_u, g_u, _ = objective_grad(algorithm(sft_coef=0.0), loss_inputs(leaf, logp_old=prox, w=ones, adv=adv, mask=mask,
                                                                              denom_mask=mask))
    assert loss_n.item() == loss_u.item()
    assert torch.equal(g_n, g_u)
    _, g_d, _ = run("decoupled", logp, prox, behavior, adv, mask)
    assert not torch.allclose(g_n, g_d)  # the correction changes the gradient of stale rows
    with pytest.raises(ValueError, match="off_policy.mode=none: proximal logprobs are required"):
        clip_centre(None, behavior, OffPolicyConfig(mode="none"))


def test_loss_is_linear_in_the_behaviour_weight():
    logp, prox, _, adv, mask = ragged(1)
    w = torch.rand(3, 5, dtype=DT) + 0.5
    results = []
    for scale in (1.0, 3.0):
        leaf = logp.clone().requires_grad_()
        results.append(objective_grad(algorithm(sft_coef=0.0), loss_inputs(leaf, logp_old=prox, w=scale * w, adv=adv, mask=mask)))
    assert results[1][0].item() == pytest.approx(3 * results[0][0].item(), rel=1e-12)
    torch.testing.assert_close(results[1][1], 3 * results[0][1], rtol=1e-12, atol=0)


def test_behaviour_weight_is_constant_for_autograd():
    logp, prox, behavior, _, mask = ragged(2)
    prox = prox.clone().requires_grad_()
    w, _, _ = behavior_weights(prox, behavior, mask, OffPolicyConfig())
    assert not w.requires_grad


def test_tis_truncates_the_weight_at_c_and_gives_one_when_behaviour_equals_proximal():
    behavior = torch.zeros(1, 4, dtype=DT)
    prox = torch.tensor([[math.log(3.0), math.log(1.5), 0.0, math.log(0.25)]], dtype=DT)
    mask = torch.ones(1, 4, dtype=torch.bool)
    w, keep, metrics = behavior_weights(prox, behavior, mask, OffPolicyConfig(tis_cap=2.0))
    torch.testing.assert_close(w, torch.tensor([[2.0, 1.5, 1.0, 0.25]], dtype=DT))
    assert keep.all()
    assert metrics["weight/truncated_frac"].item() == pytest.approx(0.25)


# 15 ---------------------------------------------------------------------------------------
def test_icepop_masked_tokens_get_no_gradient_but_stay_in_the_denominator():
    behavior = torch.zeros(1, 4, dtype=DT)
    prox = torch.tensor([[math.log(0.4), 0.0, math.log(6.0), math.log(2.0)]], dtype=DT)
    mask = torch.ones(1, 4, dtype=torch.bool)
    logp = prox.clone()  # on-policy w.r.t. the proximal policy: r = 1
    _, g, metrics = run("decoupled", logp, prox, behavior, [1.0], mask, icepop=(0.5, 5.0), tis_cap=None)
    # Kept tokens: g = −A·r·w / N with N = 4 (the masked two still count).
    torch.testing.assert_close(g, torch.tensor([[0.0, -1.0 / 4, 0.0, -2.0 / 4]], dtype=DT))
    assert metrics["tokens/masked_offpolicy"].item() == 2


def test_rows_staler_than_the_cap_never_contribute():
    logp, prox, _, adv, mask = ragged(3)
    cfg = algorithm(sft_coef=0.1)
    results = []
    for noise in (0.0, 5.0):
        leaf = (logp + noise * torch.tensor([[0.0], [1.0], [0.0]], dtype=DT)).requires_grad_()
        inp = loss_inputs(
            leaf, logp_old=prox, adv=adv, mask=mask, staleness=torch.tensor([0, 5, 4]),
            sft_rows=torch.tensor([True, True, False]), global_sft_tokens=mask[:2].sum(),
        )
        results.append(objective_grad(cfg, inp, max_staleness=4))
    (loss_a, g_a, metrics), (loss_b, g_b, _) = results
    assert (g_a[1] == 0).all() and (g_b[1] == 0).all()
    assert loss_a.item() == loss_b.item()
    assert (g_a[0] != 0).any() and (g_a[2] != 0).any()
    assert metrics["tokens/masked_stale"].item() == 3


@pytest.mark.parametrize("schedule", ["linear", "inverse"])
def test_every_schedule_at_zero_staleness_equals_the_constant_schedule_exactly(schedule):
    logp, prox, _, adv, mask = ragged(4)
    outs = []
    for kind in ("constant", schedule):
        leaf = (3 * logp).clone().requires_grad_()  # ratios far outside the band
        cfg = algorithm(staleness={"schedule": {"type": kind, "kappa": 0.5}}, sft_coef=0.0)
        outs.append(objective_grad(cfg, loss_inputs(leaf, logp_old=prox, adv=adv, mask=mask)))
    assert outs[0][0].item() == outs[1][0].item()
    assert torch.equal(outs[0][1], outs[1][1])
    for dtype in (torch.float32, DT):
        low, high = clip_bounds(GPPOConfig(), StalenessScheduleConfig(type=schedule), torch.zeros(3, dtype=torch.int64), dtype)
        c_low, c_high = clip_bounds(GPPOConfig(), StalenessScheduleConfig(), torch.zeros(3, dtype=torch.int64), dtype)
        assert torch.equal(low, c_low) and torch.equal(high, c_high)


def test_linear_widens_and_inverse_tightens_within_the_clamp():
    s = torch.tensor([0, 4, 100])
    linear = eps_schedule(0.2, s, StalenessScheduleConfig(type="linear", kappa=0.25, eps_max=0.5), ceiling=1.0, dtype=DT)
    inverse = eps_schedule(0.2, s, StalenessScheduleConfig(type="inverse", kappa=0.25, eps_min=0.05), ceiling=1.0, dtype=DT)
    torch.testing.assert_close(linear, torch.tensor([0.2, 0.4, 0.5], dtype=DT))
    torch.testing.assert_close(inverse, torch.tensor([0.2, 0.1, 0.05], dtype=DT))
    low, _ = clip_bounds(GPPOConfig(eps_low=0.5), StalenessScheduleConfig(type="linear", kappa=10, eps_max=5.0), s, DT)
    assert (low < 1).all()


# 16 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_m2po_removes_exactly_the_largest_second_moments_until_the_mean_is_below_tau(seed):
    gen = torch.Generator().manual_seed(seed)
    log_w = 0.4 * torch.randn(4, 9, generator=gen, dtype=DT)
    mask = torch.rand(4, 9, generator=gen) < 0.8
    tau = 0.04
    keep = m2po_mask(log_w, mask, tau)
    sq = log_w.square()
    assert not (keep & ~mask).any()
    assert sq[keep].mean().item() < tau
    removed = mask & ~keep
    assert removed.any()
    assert sq[removed].min() >= sq[keep].max()
    # Minimal: putting back the smallest removed token breaks the bound.
    back = torch.cat([sq[keep], sq[removed].min().reshape(1)])
    assert back.mean().item() >= tau


def test_m2po_masks_nothing_when_the_mean_is_already_below_tau():
    log_w = torch.tensor([[0.1, -0.1, 0.05, 0.0]], dtype=DT)
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert torch.equal(m2po_mask(log_w, mask, 0.04), mask)
    w, keep, metrics = behavior_weights(log_w, torch.zeros_like(log_w), mask, OffPolicyConfig(m2po_tau=0.04))
    assert keep.all() and metrics["tokens/masked_m2po"].item() == 0
