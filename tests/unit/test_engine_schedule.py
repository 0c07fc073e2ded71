"""The engine's pure parts: LR schedule, weight-decay groups, DeepSpeed config, the
non-finite guard of the ZeRO-0 optimizer, and SFT batching."""

from __future__ import annotations

import math

import pytest
import torch

from async_rl.config import LearnerConfig, OptimizerConfig
from learners.engine import FiniteGuardAdamW, ds_config, lr_factor, param_groups
from learners.sft import batches


def test_warmup_is_linear_then_constant():
    cfg = OptimizerConfig(warmup_steps=4, lr_schedule="constant")
    assert [lr_factor(s, cfg, 100) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_decays_from_one_to_the_floor_after_warmup():
    cfg = OptimizerConfig(warmup_steps=2, lr_schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(2, cfg, 12) == pytest.approx(1.0)
    assert lr_factor(7, cfg, 12) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(12, cfg, 12) == pytest.approx(0.1)
    assert lr_factor(50, cfg, 12) == pytest.approx(0.1)


def test_matrices_decay_and_biases_and_norms_do_not():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [tuple(p.shape) for p in decay["params"]] == [(4, 3)]
    assert len(no_decay["params"]) == 3


def test_deepspeed_config_lets_the_caller_own_accumulation():
    cfg = LearnerConfig(zero_stage=3, optimizer={"grad_clip": 0.5})
    ds = ds_config(cfg, "bfloat16", {"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    assert ds["managed_gradient_accumulation"] is False
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": False,
                                       "stage3_gather_16bit_weights_on_model_save": False,
                                       "stage3_param_persistence_threshold": 0}
    assert ds["bf16"] == {"enabled": True} and ds["gradient_clipping"] == 0.5
    assert ds_config(cfg, "float32", clip_in_engine=False)["gradient_clipping"] == 0.0


def test_finite_guard_refuses_a_nan_gradient_and_leaves_the_weights():
    w = torch.nn.Parameter(torch.ones(3))
    opt = FiniteGuardAdamW([w], max_grad_norm=1.0, lr=0.1)
    w.grad = torch.tensor([1.0, float("nan"), 0.0])
    opt.step()
    assert opt.overflow and not math.isfinite(opt._global_grad_norm)
    assert w.detach().tolist() == [1.0, 1.0, 1.0] and not opt.state


def test_finite_guard_clips_and_reports_the_pre_clip_norm():
    w = torch.nn.Parameter(torch.zeros(2))
    opt = FiniteGuardAdamW([w], max_grad_norm=1.0, lr=0.1, weight_decay=0.0)
    w.grad = torch.tensor([3.0, 4.0])
    opt.step()
    assert not opt.overflow and opt._global_grad_norm == pytest.approx(5.0)
    assert w.grad.tolist() == pytest.approx([0.6, 0.8])
    assert w.detach().tolist() == pytest.approx([-0.1, -0.1], abs=1e-6)  # Adam's first step: −lr·sign


def test_sft_batches_cover_each_epoch_once_in_a_fresh_order():
    plan = batches(10, 4, 2.0, seed=1)
    assert len(plan) == 6
    first, second = plan[:3], plan[3:]
    assert sorted(i for b in first for i in b) == list(range(10))
    assert sorted(i for b in second for i in b) == list(range(10))
    assert first != second
    assert len(batches(10, 4, 0.5, seed=1)) == 2
