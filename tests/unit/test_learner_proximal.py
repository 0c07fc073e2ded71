"""The first mini-batch's training forward doubles as its proximal pass: exactly the loss, the
metrics and the gradients of a separate no-grad pass, with fewer forwards. And a step on padded
micro-batches (``learner.micro_batch_layout: padded``) equals the step on packed ones.

The trainer runs here on a plain-torch stand-in for ``LearnerEngine`` (one process, SGD), so the
test isolates the trainer's bookkeeping; the DeepSpeed path runs the same code in
``tests/integration/test_learner_deepspeed.py``.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pytest
import torch
from learner_cases import algorithm

from async_rl.config import LearnerConfig
from learners.engine import DistInfo, StepResult, TokenLogprobModel
from learners.trainer import RolloutBatch, Trainer, list_column

VOCAB = 64
SGD_LR = 0.05  # large enough that a proximal pass on moved weights would change the next mini-batch


class TorchEngine:
    """The part of ``LearnerEngine`` the trainer uses, in plain torch; ``step`` keeps the
    gradients it applied and counts forwards."""

    def __init__(self, seed: int, cfg: LearnerConfig):
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=True, eos_token_id=1, pad_token_id=0, bos_token_id=0,
        )
        torch.manual_seed(seed)
        self.module = TokenLogprobModel(Qwen2ForCausalLM(config), chunk_tokens=cfg.logprob_chunk_tokens)
        self.cfg = cfg
        self.dist = DistInfo(rank=0, world_size=1, local_rank=0)
        self.device = torch.device("cpu")
        self.grads: list[dict[str, torch.Tensor]] = []
        self.forwards = 0

    def forward(self, *args, **kwargs):
        self.forwards += 1
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    @torch.no_grad()
    def step(self) -> StepResult:
        params = dict(self.module.named_parameters())
        self.grads.append({n: p.grad.clone() for n, p in params.items() if p.grad is not None})
        for p in params.values():
            if p.grad is not None:
                p.sub_(SGD_LR * p.grad)
                p.grad = None
        return StepResult(applied=True, grad_norm=0.0, lr=SGD_LR)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return tensor


def make_table(seed: int, *, groups: int = 4, group_size: int = 4, version: int = 2) -> pa.Table:
    """Rows with varied lengths, rewards and staleness 0-2, behaviour logprobs far from the
    model's (behaviour weights away from 1, some truncated by TIS)."""
    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {k: [] for k in ("group_id", "prompt_tokens", "response_tokens",
                                             "behavior_logprobs", "token_versions", "reward")}
    for g in range(groups):
        prompt = rng.integers(2, VOCAB, size=int(rng.integers(3, 9))).tolist()
        for _ in range(group_size):
            n = int(rng.integers(2, 12))
            cols["group_id"].append(f"g{g}")
            cols["prompt_tokens"].append(prompt)
            cols["response_tokens"].append(rng.integers(2, VOCAB, size=n).tolist())
            cols["behavior_logprobs"].append((-rng.uniform(3.0, 5.5, size=n)).astype(np.float32).tolist())
            cols["token_versions"].append([version - int(rng.integers(0, 3))] * n)
            cols["reward"].append(float(rng.integers(0, 2)))
    schema = pa.schema([
        ("group_id", pa.string()), ("prompt_tokens", pa.list_(pa.int32())), ("response_tokens", pa.list_(pa.int32())),
        ("behavior_logprobs", pa.list_(pa.float32())), ("token_versions", pa.list_(pa.int32())), ("reward", pa.float32()),
    ])
    return pa.table(cols, schema=schema)


@functools.cache  # each configuration runs once per session; the tests only read the results
def run(*, from_forward: bool, fused: bool, mini_batches: int, m2po_tau: float | None = None, layout: str = "packed"):
    cfg = LearnerConfig(micro_batch_tokens=40, logprob_chunk_tokens=16, fused_logprobs=fused, micro_batch_layout=layout)
    engine = TorchEngine(seed=0, cfg=cfg)
    algo = algorithm(off_policy={"mode": "decoupled", "tis_cap": 1.5, "m2po_tau": m2po_tau}, sft_coef=0.1)
    trainer = Trainer(engine, algo, max_staleness=2, mini_batches=mini_batches, micro_batch_tokens=40,
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


def test_a_step_on_padded_micro_batches_equals_the_step_on_packed_ones():
    (_, packed, metrics), (_, padded, metrics2) = (run(from_forward=True, fused=True, mini_batches=2, layout=layout)
                                                   for layout in ("packed", "padded"))
    for before, after in zip(metrics, metrics2, strict=True):
        assert after.keys() == before.keys()
        for key, value in before.items():
            assert after[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    for grads, grads2 in zip(packed.grads, padded.grads, strict=True):
        for name, grad in grads.items():
            torch.testing.assert_close(grads2[name], grad, atol=1e-6, rtol=1e-4)


def test_list_columns_decode_to_the_rows_of_a_sliced_table():
    table = make_table(3).slice(3, 7)
    batch = RolloutBatch.from_arrow(table)
    expected = table.column("response_tokens").to_pylist()
    assert [r.tolist() for r in batch.responses] == expected and batch.responses[0].dtype == np.int64
    assert [p.tolist() for p in batch.prompts] == table.column("prompt_tokens").to_pylist()
    assert list_column(table.column("prompt_tokens").slice(0, 0), np.int64) == []
