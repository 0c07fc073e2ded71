"""ALGORITHMS.md §7 properties 8 (equal rewards → A≡0, filtered), 17 (advantages), 18 (SFT
term), 19 (overlong) and 20 (pass@k)."""

from __future__ import annotations

import pytest
import torch
from learner_cases import DT, algorithm, loss_inputs, objective_grad

from async_rl.config import AdvantageConfig, OverlongConfig
from async_rl.evaluation.metrics import pass_at_k, pass_at_k_binomial
from learners.advantages import (
    group_advantages,
    informative_rows,
    overlong_keep,
    overlong_penalty,
)

GROUPS = torch.tensor([0] * 8)


# 17 ---------------------------------------------------------------------------------------
def test_grpo_advantage_of_one_success_in_eight_with_unbiased_and_population_std():
    rewards = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0])
    unbiased = group_advantages(rewards, GROUPS, AdvantageConfig())
    population = group_advantages(rewards, GROUPS, AdvantageConfig(std="population"))
    assert unbiased[0].item() == pytest.approx(2.4749, abs=1e-4)
    assert population[0].item() == pytest.approx(2.6458, abs=1e-4)
    assert unbiased[1].item() == pytest.approx(-0.125 / (0.125**0.5 + 1e-6), abs=1e-6)


def test_soft_rewards_p_and_2p_minus_1_give_equal_grpo_advantages_and_double_drgrpo():
    gen = torch.Generator().manual_seed(0)
    p = torch.randint(0, 17, (24,), generator=gen).float() / 16
    groups = torch.arange(24) // 8
    a_p = group_advantages(p, groups, AdvantageConfig())
    a_q = group_advantages(2 * p - 1, groups, AdvantageConfig())
    torch.testing.assert_close(a_p, a_q, rtol=0, atol=1e-5)
    d_p = group_advantages(p, groups, AdvantageConfig(type="drgrpo"))
    d_q = group_advantages(2 * p - 1, groups, AdvantageConfig(type="drgrpo"))
    torch.testing.assert_close(d_q, 2 * d_p, rtol=0, atol=1e-6)


def test_groups_are_normalised_separately_and_singletons_get_zero():
    rewards = torch.tensor([1.0, 0.0, 5.0, 7.0, 3.0])
    groups = torch.tensor([10, 10, 42, 42, 99])
    adv = group_advantages(rewards, groups, AdvantageConfig(eps=0.0))
    std = 2**0.5 / 2  # unbiased std of {0, 1} and, scaled, of {5, 7} is √2/2 and √2
    torch.testing.assert_close(adv, torch.tensor([0.5 / std, -0.5 / std, -1 / (2 * std), 1 / (2 * std), 0.0]))


# 8 ----------------------------------------------------------------------------------------
def test_a_group_with_equal_rewards_has_exactly_zero_advantage_and_is_filtered():
    rewards = torch.tensor([0.5] * 4 + [1.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([0] * 4 + [1] * 4)
    for cfg in (AdvantageConfig(), AdvantageConfig(std="population"), AdvantageConfig(type="drgrpo")):
        adv = group_advantages(rewards, groups, cfg)
        assert adv[:4].tolist() == [0.0] * 4
        assert (adv[4:] != 0).all()
    assert informative_rows(rewards, groups).tolist() == [False] * 4 + [True] * 4


# 18 ---------------------------------------------------------------------------------------
def test_sft_term_trains_only_correct_rows_with_minus_alpha_over_n_pos():
    rows = torch.tensor([True, False, False, True])
    mask = torch.arange(3).unsqueeze(0) < torch.tensor([[3], [3], [2], [2]])
    logp = -torch.rand(4, 3, dtype=DT).requires_grad_()
    n_pos = mask[rows].sum()  # 5 tokens
    inp = loss_inputs(logp, adv=torch.zeros(4), mask=mask, sft_rows=rows, global_sft_tokens=n_pos)
    _, g, metrics = objective_grad(algorithm(sft_coef=0.1), inp)
    expected = torch.where(mask & rows.unsqueeze(1), torch.tensor(-0.1 / 5, dtype=DT), torch.tensor(0.0, dtype=DT))
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=0)
    assert metrics["loss/sft"].item() == pytest.approx(-logp[mask & rows.unsqueeze(1)].sum().item() / 5)


def test_sft_term_is_zero_without_a_correct_response():
    logp = -torch.rand(2, 3, dtype=DT).requires_grad_()
    rows = torch.tensor([False, False])
    inp = loss_inputs(logp, adv=torch.zeros(2), sft_rows=rows, global_sft_tokens=torch.tensor(0))
    loss, g, _ = objective_grad(algorithm(sft_coef=0.1), inp)
    assert loss.item() == 0.0 and g.abs().max().item() == 0.0


# 19 ---------------------------------------------------------------------------------------
def test_dapo_overlong_penalty_ramps_from_zero_to_minus_factor():
    cfg = OverlongConfig(shaping=True, buffer_tokens=4096)
    lengths = torch.tensor([100, 16384, 18432, 20480])
    penalty = overlong_penalty(lengths, max_tokens=20480, cfg=cfg)
    assert penalty.tolist() == [0.0, 0.0, -0.5, -1.0]
    half = overlong_penalty(lengths, max_tokens=20480, cfg=OverlongConfig(shaping=True, buffer_tokens=4096, penalty_factor=0.5))
    assert half.tolist() == [0.0, 0.0, -0.25, -0.5]
    assert overlong_penalty(lengths, max_tokens=20480, cfg=OverlongConfig()).tolist() == [0.0] * 4


def test_overlong_filter_drops_responses_not_ending_in_eos_or_pad():
    last = torch.tensor([2, 17, 0, 99])
    keep = overlong_keep(last, [2, 0], OverlongConfig(filter=True))
    assert keep.tolist() == [True, False, True, False]
    assert overlong_keep(last, [2, 0], OverlongConfig()).all()


# 20 ---------------------------------------------------------------------------------------
def test_pass_at_k_product_form_matches_binomial_and_known_values():
    for n, c, k, value in [(10, 3, 1, 0.3), (10, 3, 5, 0.916667), (64, 10, 8, 0.764928), (8, 0, 4, 0.0), (5, 1, 5, 1.0)]:
        assert pass_at_k(n, c, k) == pytest.approx(value, abs=1e-6)
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(pass_at_k_binomial(n, c, k), abs=1e-12)


def test_pass_at_one_is_c_over_n_and_is_one_when_too_few_failures():
    assert pass_at_k(64, 17, 1) == pytest.approx(17 / 64, abs=1e-15)
    assert pass_at_k(10, 8, 3) == 1.0
    assert (pass_at_k(4, 1, 1) + pass_at_k(4, 3, 1)) / 2 == pytest.approx(0.5)  # avg@4 of two problems
