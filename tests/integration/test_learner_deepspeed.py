"""The DeepSpeed learner for real: gloo on CPU, ranks started by ``learners.launch`` exactly
as the product starts them. Two launches (2 ranks, then 1 rank) run every scenario of
``learner_ranks.py``; the tests below assert on what the ranks wrote.

Tolerance for "same weights": fp32 sums over a different split of tokens across ranks and
micro-batches differ in the last bits; after one AdamW step (update ≈ 5e-4 here) the
weights agree to ~1e-6, so 1e-5 is asserted — 50× below the size of the update itself
(checked too: the step must move the weights by more than 10× the tolerance).
"""

from __future__ import annotations

import json
from pathlib import Path

import learner_ranks
import pytest
import torch
from conftest import is_loopback
from safetensors.torch import load_file

from learners.launch import launch

SAME_WEIGHTS_ATOL = 1e-5
LAUNCH_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("learner")
    model = learner_ranks.make_model(out / "model")
    payload = {"out": str(out), "model": str(model), "stages": [1, 2, 3]}
    launch("learner_ranks:multi_rank_scenario", 2, payload, timeout_s=LAUNCH_TIMEOUT_S)
    launch("learner_ranks:single_rank_scenario", 1, payload, timeout_s=LAUNCH_TIMEOUT_S)
    return out


def weights(runs: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(runs / f"{name}.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def report(runs: Path, name: str) -> dict:
    return json.loads((runs / f"{name}.json").read_text())


def initial_weights(runs: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(runs / "model"))
    return {k: v.detach() for k, v in model.named_parameters()}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_rank_zero_step_matches_the_single_process_reference(runs, stage):
    reference = weights(runs, "ref_step1")
    assert max_diff(reference, initial_weights(runs)) > 10 * SAME_WEIGHTS_ATOL  # the step moved
    assert max_diff(weights(runs, f"stage{stage}_step1"), reference) < SAME_WEIGHTS_ATOL
    two, one = report(runs, "multi_rank0")[f"stage{stage}_step1"], report(runs, "single_rank")["ref_step1"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    assert two["optimizer_steps"] == 1 and two["policy_version"] == 1


@pytest.mark.parametrize("case", list(learner_ranks.FUSED_CASES))
def test_a_step_with_fused_logprobs_equals_the_step_without(runs, case):
    fused, unfused = (report(runs, "single_rank")["fused"][f"{case}_{k}"] for k in ("fused", "unfused"))
    assert fused["uses_fused"] and not unfused["uses_fused"]
    after = weights(runs, f"{case}_fused_step1")
    assert max_diff(after, initial_weights(runs)) > 10 * SAME_WEIGHTS_ATOL
    assert max_diff(after, weights(runs, f"{case}_unfused_step1")) < SAME_WEIGHTS_ATOL
    assert fused["step"].keys() == unfused["step"].keys()
    for key, value in unfused["step"].items():
        assert fused["step"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_zero3_gathered_weights_equal_the_unsharded_ones(runs):
    assert max_diff(weights(runs, "z3_initial"), initial_weights(runs)) == 0.0
    (portable,) = (runs / "ckpt3").glob("step_*/portable.safetensors")
    masters = {k.removeprefix("master/"): v for k, v in load_file(str(portable)).items() if k.startswith("master/")}
    assert max_diff(weights(runs, "stage3_step1"), masters) == 0.0


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_from_a_checkpoint_reproduces_the_next_step_exactly(runs, stage):
    assert max_diff(weights(runs, f"stage{stage}_step2_resumed"), weights(runs, f"stage{stage}_step2")) == 0.0
    assert report(runs, "multi_rank0")[f"stage{stage}_resumed_version"] == 1


def test_resume_on_a_different_rank_count_continues_the_same_run(runs):
    single = report(runs, "single_rank")
    assert single["cross_resume"] == {"version": 1, "extra": learner_ranks.CURSOR, "from_world": 2}
    resumed = weights(runs, "cross_resume_step2")
    assert max_diff(resumed, weights(runs, "stage3_step2")) < SAME_WEIGHTS_ATOL
    assert max_diff(resumed, weights(runs, "ref_step2")) < SAME_WEIGHTS_ATOL
    assert max_diff(resumed, weights(runs, "stage3_step1")) > 10 * SAME_WEIGHTS_ATOL
    assert single["cross_step2"]["policy_version"] == 2


@pytest.mark.parametrize(("name", "before", "after"), [
    ("multi_rank0", "stage2_step1", "stage2_after_nan"),
    ("single_rank", "ref_step2", "ref_after_nan"),
])
def test_a_nan_batch_is_skipped_without_touching_the_weights(runs, name, before, after):
    assert max_diff(weights(runs, after), weights(runs, before)) == 0.0
    nan = report(runs, name)["nan"]
    assert nan["optimizer_steps"] == 0 and nan["optimizer_steps_skipped"] == 1
    assert nan["skipped_steps_total"] == 1 and nan["nonfinite_micro_batches"] >= 1
    assert nan["policy_version"] == (1 if name == "multi_rank0" else 2)  # not bumped


def test_hf_export_loads_in_transformers_with_the_trained_weights(runs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(runs / "hf_export"))
    exported = {k: v.detach() for k, v in model.named_parameters()}
    assert max_diff(exported, weights(runs, "ref_after_nan")) == 0.0
    assert not list(runs.glob(".incoming-*"))


@pytest.mark.parametrize("rank", [0, 1])
def test_a_local_group_listens_on_loopback_only(runs, rank):
    """The ranks meet through a file store (torch's TCP store would listen on every interface)
    and gloo is pinned to loopback."""
    listening = report(runs, f"multi_rank{rank}")["listening"]
    assert [ip for ip in listening if not is_loopback(ip)] == []
