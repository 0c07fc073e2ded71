"""The first mini-batch's training forward doubles as its proximal pass: exactly the loss, the
metrics and the gradients of a separate no-grad pass, with fewer forwards. And a step on padded
micro-batches (``learner.batch.micro_batch_layout: padded``) equals the step on packed ones.

The trainer runs here on a plain-torch stand-in for ``LearnerEngine`` (one process, SGD,
``learner_cases.TorchEngine``), so the test isolates the trainer's bookkeeping; the DeepSpeed
path runs the same code in ``tests/integration/test_learner_deepspeed.py``.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from learner_cases import TorchEngine, algorithm
from learner_cases import trajectory_table as make_table

from async_rl.config import LearnerConfig
from learners.trainer import RolloutBatch, Trainer, list_column


@functools.cache  # each configuration runs once per session; the tests only read the results
def run(*, from_forward: bool, fused: bool, mini_batches: int, m2po_tau: float | None = None, layout: str = "packed",
        mode: str = "decoupled", budget: int = 40):
    cfg = LearnerConfig(batch={"micro_batch_tokens": budget, "logprob_chunk_tokens": 16, "fused_logprobs": fused,
                               "micro_batch_layout": layout})
    engine = TorchEngine(seed=0, cfg=cfg)
    algo = algorithm(off_policy={"mode": mode, "tis_cap": 1.5, "m2po_tau": m2po_tau}, sft_coef=0.1)
    trainer = Trainer(engine, algo, max_staleness=2, mini_batches=mini_batches, micro_batch_tokens=budget,
                      temperature=0.7, proximal_from_forward=from_forward)
    metrics = [trainer.train_step(make_table(seed), learner_version=2) for seed in (1, 2)]
    return trainer, engine, metrics


def assert_same_steps(a, b) -> None:
    (_, engine_a, metrics_a), (_, engine_b, metrics_b) = a, b
    assert metrics_a == metrics_b  # every value, exactly
    assert len(engine_a.grads) == len(engine_b.grads) >= 2
    for grads_a, grads_b in zip(engine_a.grads, engine_b.grads, strict=True):
        assert grads_a.keys() == grads_b.keys() and grads_a
        for name in grads_a:
            assert torch.equal(grads_a[name], grads_b[name]), name


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("mini_batches", [1, 2])
def test_the_proximal_logprobs_from_the_training_forward_give_identical_loss_and_gradients(fused, mini_batches):
    reused = run(from_forward=True, fused=fused, mini_batches=mini_batches)
    separate = run(from_forward=False, fused=fused, mini_batches=mini_batches)
    assert reused[0].proximal_from_forward and not separate[0].proximal_from_forward
    assert_same_steps(reused, separate)
    # The behaviour weights were not trivial: some tokens were truncated at the TIS cap.
    assert all(m["weight/max"] == 1.5 and m["weight/mean"] < 1.4 for m in reused[2])


def test_no_correction_keeps_the_proximal_centre_and_drops_the_behaviour_weight():
    reused = run(from_forward=True, fused=False, mini_batches=2, mode="none")
    separate = run(from_forward=False, fused=False, mini_batches=2, mode="none")
    assert reused[0].proximal_from_forward
    assert_same_steps(reused, separate)
    assert all(m["weight/max"] == 1.0 and m["weight/mean"] == 1.0 for m in reused[2])
    corrected = run(from_forward=True, fused=False, mini_batches=2)
    assert reused[2][0]["loss"] != corrected[2][0]["loss"]


def test_one_mini_batch_per_step_runs_no_proximal_pass():
    (_, reused, _), (_, separate, _) = (run(from_forward=f, fused=True, mini_batches=1) for f in (True, False))
    assert separate.forwards == 2 * reused.forwards > 0


def test_with_two_mini_batches_only_the_second_gets_a_proximal_pass():
    (_, reused, _), (_, separate, _) = (run(from_forward=f, fused=True, mini_batches=2) for f in (True, False))
    assert reused.forwards < separate.forwards < 2 * reused.forwards


def test_on_the_first_mini_batch_the_ratio_to_the_proximal_policy_is_one():
    _, _, unfused = run(from_forward=True, fused=False, mini_batches=1)
    assert all(m["ratio/min"] == m["ratio/max"] == 1.0 and m["approx_kl"] == 0.0 for m in unfused)
    # The fused path's logprobs come from its own chunked kernel: equal to the last bits only.
    _, _, fused = run(from_forward=True, fused=True, mini_batches=1)
    assert all(abs(m["ratio/min"] - 1) < 1e-6 and abs(m["ratio/max"] - 1) < 1e-6 for m in fused)


def test_m2po_keeps_the_separate_pass_because_its_mask_needs_the_whole_mini_batch():
    trainer, engine, _ = run(from_forward=True, fused=True, mini_batches=1, m2po_tau=0.5)
    assert not trainer.proximal_from_forward
    coupled = Trainer(engine, algorithm(off_policy={"mode": "coupled"}), max_staleness=2)
    assert not coupled.proximal_from_forward


@pytest.mark.parametrize(("layout", "budget"), [("padded", 40), ("shared_prompt", 1000)])
def test_a_step_on_padded_or_shared_prompt_micro_batches_equals_the_step_on_packed_ones(layout, budget):
    """Same micro-batches (a budget that holds a mini-batch whole for shared_prompt, whose plan
    keeps groups together), so even the row-weighted metrics agree."""
    (_, packed, metrics), (_, padded, metrics2) = (
        run(from_forward=True, fused=True, mini_batches=2, layout=name, budget=budget) for name in ("packed", layout))
    for before, after in zip(metrics, metrics2, strict=True):
        assert after.keys() == before.keys()
        for key, value in before.items():
            assert after[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    for grads, grads2 in zip(packed.grads, padded.grads, strict=True):
        for name, grad in grads.items():
            torch.testing.assert_close(grads2[name], grad, atol=1e-6, rtol=1e-4)


def test_shared_prompt_micro_batches_cut_differently_give_the_same_update():
    """With the small budget the shared_prompt plan groups rows unlike the packed one: the loss
    and gradients (globally normalised) still agree; only row-weighted metric means may not."""
    (_, packed, metrics), (_, shared, metrics2) = (run(from_forward=True, fused=True, mini_batches=2, layout=name)
                                                   for name in ("packed", "shared_prompt"))
    for before, after in zip(metrics, metrics2, strict=True):
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-5, abs=1e-7)
        assert after["grad_norm"] == pytest.approx(before["grad_norm"], rel=1e-4)
    for grads, grads2 in zip(packed.grads, shared.grads, strict=True):
        for name, grad in grads.items():
            torch.testing.assert_close(grads2[name], grad, atol=1e-6, rtol=1e-4)


def test_list_columns_decode_to_the_rows_of_a_sliced_table():
    table = make_table(3).slice(3, 7)
    batch = RolloutBatch.from_arrow(table)
    expected = table.column("response_tokens").to_pylist()
    assert [r.tolist() for r in batch.responses] == expected and batch.responses[0].dtype == np.int64
    assert [p.tolist() for p in batch.prompts] == table.column("prompt_tokens").to_pylist()
    assert list_column(table.column("prompt_tokens").slice(0, 0), np.int64) == []
