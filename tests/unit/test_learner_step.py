"""One optimizer step, shared by RL and SFT (``learners.engine.accumulate_and_step``): the Klear
SFT term follows the trajectory's verdict, not a reward value; the SFT warm start logs and
applies exactly what its own micro-batch loop did; metrics reach the host once per step with
the values a per-micro-batch conversion gives.

The trainers run on ``learner_cases.TorchEngine`` (plain torch, one process, SGD).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from learner_cases import TorchEngine, algorithm, trajectory_table

from async_rl.config import LearnerConfig
from learners.engine import accumulate, to_host
from learners.packing import build_micro_batch, empty_micro_batch, input_length, plan_micro_batches
from learners.sft import SFTExample, SFTTrainer
from learners.trainer import Trainer

CFG = LearnerConfig(batch={"micro_batch_tokens": 40, "logprob_chunk_tokens": 16})


def rl_step(table, *, sft_coef: float = 0.1) -> dict[str, float]:
    trainer = Trainer(TorchEngine(seed=0, cfg=CFG), algorithm(sft_coef=sft_coef), max_staleness=2,
                      micro_batch_tokens=40)
    return trainer.train_step(table, learner_version=2)


def test_the_sft_term_trains_on_the_correct_rows_whatever_reward_they_score():
    # reward.correct = 0.5 and reward.wrong = -1: the verdicts are the same as with 1 and 0.
    half = rl_step(trajectory_table(1, correct_reward=0.5, wrong_reward=-1.0))
    unit = rl_step(trajectory_table(1, correct_reward=1.0, wrong_reward=0.0))
    assert half["loss/sft"] > 0.5
    assert half["loss/sft"] == unit["loss/sft"]  # same rows, same weights: the same NLL


def test_without_a_correct_row_the_sft_term_is_zero_even_for_rows_rewarded_one():
    table = trajectory_table(1)
    table = table.set_column(table.schema.get_field_index("correct"), "correct", pa.array([False] * table.num_rows))
    metrics = rl_step(table)
    assert max(table.column("reward").to_pylist()) == 1.0 and metrics["loss/sft"] == 0.0


def sft_examples(seed: int, n: int = 10) -> list[SFTExample]:
    rng = np.random.default_rng(seed)
    return [SFTExample(rng.integers(2, 64, size=int(rng.integers(2, 9))),
                       rng.integers(2, 64, size=int(rng.integers(1, 12)))) for _ in range(n)]


def per_micro_batch_sft_step(engine, batch: list[SFTExample], micro_batch_tokens: int) -> dict[str, float]:
    """The SFT step as its own loop wrote it: each micro-batch's loss converted on the host."""
    prompts = [ex.prompt_tokens for ex in batch]
    responses = [ex.response_tokens for ex in batch]
    lengths = [input_length(len(p), len(r)) for p, r in zip(prompts, responses, strict=True)]
    plan = plan_micro_batches(list(range(len(batch))), lengths, micro_batch_tokens, 1)
    global_tokens = float(sum(len(r) for r in responses))
    stats = torch.zeros(2, dtype=torch.float64)
    for rows in plan[0]:
        mb = build_micro_batch(rows, prompts, responses, engine.cfg.batch.micro_batch_layout) if rows else empty_micro_batch()
        logp, _ = engine.forward(mb.input_ids, mb.position_ids, mb.gather_index, mb.targets, 1.0, False)
        loss = -logp.sum() / global_tokens if rows else logp.sum() * 0.0
        finite = bool(torch.isfinite(loss))
        stats += torch.tensor([float(loss.detach()) if finite else 0.0, 0.0 if finite else 1.0])
        engine.backward(loss if finite else loss * float("nan"))
    result = engine.step()
    return {"nll": float(stats[0]), "nonfinite_micro_batches": float(stats[1]),
            "grad_norm": result.grad_norm, "lr": result.lr, "applied": float(result.applied)}


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_an_sft_step_logs_and_applies_exactly_what_its_per_micro_batch_loop_did(layout):
    cfg = LearnerConfig(batch={"micro_batch_tokens": 24, "logprob_chunk_tokens": 16, "micro_batch_layout": layout})
    shared, own = TorchEngine(seed=0, cfg=cfg), TorchEngine(seed=0, cfg=cfg)
    trainer = SFTTrainer(shared, micro_batch_tokens=24)
    for seed in (1, 2):
        batch = sft_examples(seed)
        assert trainer.train_step(batch) == per_micro_batch_sft_step(own, batch, 24)
    assert shared.forwards == own.forwards > 4  # several micro-batches per step
    for grads, reference in zip(shared.grads, own.grads, strict=True):
        assert grads.keys() == reference.keys() and grads
        for name in grads:
            assert torch.equal(grads[name], reference[name]), name


def test_step_metrics_stay_tensors_and_convert_once_to_the_per_micro_batch_values():
    rng = np.random.default_rng(0)
    micro = [{"loss/pg": torch.tensor(rng.normal(), dtype=torch.float32),
              "tokens/grad": torch.tensor(int(rng.integers(1, 50))),
              "ratio/max": torch.tensor(rng.uniform(0.5, 2.0), dtype=torch.float32)} for _ in range(5)]
    weights = [0.1, 0.3, 0.2, 0.25, 0.15]
    totals: dict = {}
    for metrics, weight in zip(micro, weights, strict=True):
        accumulate(totals, metrics, weight=weight)
    assert all(isinstance(v, torch.Tensor) for v in totals.values())
    expected = {
        "loss/pg": sum(w * float(m["loss/pg"]) for m, w in zip(micro, weights, strict=True)),
        "tokens/grad": sum(w * float(m["tokens/grad"]) for m, w in zip(micro, weights, strict=True)),
        "ratio/max": max(float(m["ratio/max"]) for m in micro),
    }
    assert to_host({**totals, "lr": 0.5}) == {**expected, "lr": 0.5}


def test_the_learner_loop_logs_staleness_and_accuracy_of_the_trajectory_contract():
    import io
    import time
    from types import SimpleNamespace

    from async_rl.job.learner_role import LearnerLoop

    table = trajectory_table(3, correct_reward=0.5, wrong_reward=-1.0)
    written: list[dict] = []
    loop = SimpleNamespace(
        version=3, step=3, started=time.monotonic(), busy_s=0.0, trained=io.StringIO(),
        engine=SimpleNamespace(dist=SimpleNamespace(world_size=1)), cfg=SimpleNamespace(logging=SimpleNamespace(log_every=1)),
        metrics=SimpleNamespace(write=lambda record, step: written.append(record.row())),
    )
    LearnerLoop.log_step(loop, table, {"loss": 0.25}, trained_at=2, step_s=1.0, wait_s=0.0)
    (record,) = written
    oldest = [min(v) for v in table.column("token_versions").to_pylist()]
    correct = table.column("correct").to_pylist()
    assert 0 < sum(correct) < len(correct) and min(oldest) < max(oldest) <= 2
    assert record["staleness_mean"] == pytest.approx(np.mean([2 - v for v in oldest]))
    assert record["staleness_max"] == 2 - min(oldest)
    assert record["accuracy"] == pytest.approx(np.mean(correct))
    assert record["reward_mean"] == pytest.approx(np.mean(table.column("reward").to_pylist()))
    assert record["loss"] == 0.25


def test_a_jobs_trainer_takes_every_setting_from_the_jobs_config():
    from async_rl.config_io import load_config

    cfg = load_config("tiny", ["algorithm.staleness.max_staleness=3", "learner.batch.mini_batches_per_step=2",
                               "learner.batch.micro_batch_tokens=512", "actors.temperature=0.9", "actors.max_tokens=40"])
    trainer = Trainer.for_job(TorchEngine(seed=0, cfg=CFG), cfg, stop_token_ids=[7], policy_version=5)
    assert (trainer.max_staleness, trainer.mini_batches, trainer.micro_batch_tokens) == (3, 2, 512)
    assert (trainer.temperature, trainer.max_tokens, trainer.stop_token_ids, trainer.policy_version) == (0.9, 40, [7], 5)
    assert trainer.algorithm == cfg.algorithm
    assert Trainer.for_job(TorchEngine(seed=0, cfg=CFG), cfg, max_staleness=9).max_staleness == 9
