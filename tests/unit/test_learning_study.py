"""Pure logic of benchmarks/learning_study.py: lagged weights, curve arithmetic, arm parsing,
the rows a lockstep step trains on, and the informative-group filter."""

from __future__ import annotations

import asyncio
import importlib.util
import math
import sys
from concurrent.futures import Future
from pathlib import Path

import pytest

from actors.engine import Sample
from async_rl.rewards.base import RewardRecord
from async_rl.tasks.dataset import PromptRow
from buffer.schema import row_staleness

STUDY_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "learning_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("learning_study", STUDY_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.mark.parametrize("staleness", [0, 2, 4, 8])
def test_lagged_weights_serve_version_k_minus_s_and_hold_at_most_s_plus_one_sets(study, staleness):
    lagged = study.LaggedWeights(staleness)
    lagged.publish(0, "w0")
    for k in range(12):
        version, weights = lagged.weights_for(k)
        assert version == max(0, k - staleness)
        assert weights == f"w{version}"
        lagged.publish(k + 1, f"w{k + 1}")
        assert len(lagged.held) <= staleness + 1
    assert lagged.latest == (12, "w12")
    assert lagged.held == list(range(12 - staleness, 13))


def test_lagged_weights_refuse_a_version_already_dropped(study):
    lagged = study.LaggedWeights(2)
    for version in range(6):
        lagged.publish(version, f"w{version}")
    with pytest.raises(KeyError, match="v1"):
        lagged.weights_for(3)
    with pytest.raises(ValueError, match="staleness=-1"):
        study.LaggedWeights(-1)


def test_first_reaching_returns_the_first_point_at_or_above_the_target(study):
    points = [(0, 0.27), (5, 0.30), (10, 0.33), (15, 0.31), (20, 0.40)]
    assert study.first_reaching(points, 0.32) == 10
    assert study.first_reaching(points, 0.30) == 5
    assert study.first_reaching(points, 0.41) is None
    assert study.first_reaching([(12.5, 0.5)], 0.5) == 12.5


def test_mean_curve_averages_seeds_with_the_sample_std(study):
    seed_a = [study.EvalPoint(0, 0.0, 0.2), study.EvalPoint(5, 10.0, 0.4)]
    seed_b = [study.EvalPoint(0, 0.0, 0.2), study.EvalPoint(5, 14.0, 0.2)]
    curve = study.mean_curve([seed_a, seed_b])
    assert [p["step"] for p in curve] == [0, 5]
    assert curve[0]["accuracy"] == pytest.approx(0.2) and curve[0]["accuracy_std"] == pytest.approx(0.0)
    assert curve[1]["accuracy"] == pytest.approx(0.3)
    assert curve[1]["accuracy_std"] == pytest.approx(math.sqrt(0.02))
    assert curve[1]["time_s"] == pytest.approx(12.0)
    with pytest.raises(ValueError, match="different steps"):
        study.mean_curve([seed_a, [study.EvalPoint(0, 0.0, 0.2), study.EvalPoint(4, 9.0, 0.3)]])


def test_summarize_arm_reports_targets_on_the_mean_curve_and_per_seed(study):
    def run(accuracies, clip):
        curve = [{"step": 5 * i, "time_s": 10.0 * i, "accuracy": a} for i, a in enumerate(accuracies)]
        return {"curve": curve, "diagnostics": {"clip_frac": clip}}

    arm = study.Arm("gppo-s2", "gppo", 2)
    summary = study.summarize_arm(arm, [run([0.3, 0.36, 0.40], 0.01), run([0.3, 0.30, 0.34], 0.03)], target=0.35)
    assert summary["steps_to_target_per_seed"] == [5, None]
    assert summary["steps_to_target"] == 10  # mean curve: 0.30, 0.33, 0.37
    assert summary["time_to_target_s"] == 20.0
    assert summary["final_accuracy"] == pytest.approx(0.37)
    assert summary["final_accuracy_std"] == pytest.approx(math.sqrt(0.0018))
    assert summary["best_mean_accuracy"] == pytest.approx(0.37)
    assert summary["diagnostics"]["clip_frac"] == pytest.approx(0.02)
    assert study.per_seed(summary["steps_to_target_per_seed"]) == "1/2 (5, —)"
    assert study.reached(None) == "not reached" and study.reached(12.4, " s") == "12 s"


def test_arms_parse_objective_and_staleness_and_reject_unknown_names(study):
    assert study.parse_arm("gppo-s4") == study.Arm("gppo-s4", "gppo", 4)
    assert study.parse_arm("cispo") == study.Arm("cispo", "cispo", 0)
    for bad in ("gspo", "gppo-sx", "gppo-s", "ppo-4"):
        with pytest.raises(ValueError, match="expected gppo, dapo, cispo or ppo"):
            study.parse_arm(bad)


def test_bad_flags_exit_with_one_line_naming_the_value(study):
    with pytest.raises(SystemExit, match=r"--groups=6: must be a multiple of --mini-batches=4"):
        study.parse_args(["--groups", "6", "--mini-batches", "4"])
    with pytest.raises(SystemExit, match=r"--arms: 'grpo'"):
        study.parse_args(["--arms", "gppo,grpo"])
    with pytest.raises(SystemExit, match=r"--target=1.5: expected an accuracy in \(0, 1\]"):
        study.parse_args(["--target", "1.5"])
    quick = study.parse_args(["--quick"])
    assert (quick.seeds, quick.steps, quick.job_min) == (1, 2, 0.0)
    assert [a.name for a in quick.arm_list] == ["gppo", "ppo"]


def sample(tokens, version):
    return Sample(list(tokens), [-0.5] * len(tokens), [version] * len(tokens), "stop", "x")


def test_step_rows_carry_the_lagged_policy_version_so_staleness_is_exact(study):
    row = PromptRow("arith:1", "synthetic/arith", [{"role": "user", "content": "1+1"}], "2")
    records = [RewardRecord(1.0, "correct"), RewardRecord(-1.0, "wrong")]
    engine_label = 17  # the engine's load counter, unrelated to the policy version
    kept = [(row, [1, 2, 3], [sample([4, 5], engine_label), sample([6], engine_label)], records)] * 2
    table = study.trajectory_table(kept, version=3, run_id="gppo-s4-0", step=7)
    assert table.num_rows == 4
    assert all(v == [3] * len(t) for v, t in zip(table.column("token_versions").to_pylist(),
                                                 table.column("response_tokens").to_pylist(), strict=True))
    assert len(set(table.column("group_id").to_pylist())) == 2
    assert row_staleness(table, learner_version=7).tolist() == [4, 4, 4, 4]


class FakeEngine:
    """Stands in for the vLLM engine: each prompt's samples answer as its ground truth says."""

    tokenizer = None

    async def generate(self, prompt_ids, n):
        return [sample([7, 8], 0) for _ in range(n)]


class FakeRewards:
    """All-correct for prompts whose truth is 'same', alternating otherwise."""

    def __init__(self):
        self.calls = 0

    def submit_for(self, data_source, text, truth, extra):
        future: Future = Future()
        self.calls += 1
        correct = truth == "same" or self.calls % 2 == 0
        future.set_result(RewardRecord(1.0 if correct else -1.0, "correct" if correct else "wrong"))
        return future


def test_collect_groups_replaces_zero_advantage_groups_when_filtering(study, monkeypatch):
    monkeypatch.setattr("actors.prompts.encode_prompt", lambda tokenizer, messages: [1, 2])
    truths = ["same", "mixed", "same", "same", "mixed", "same", "mixed", "mixed", "mixed"]
    rows = [PromptRow(f"p{i}", "synthetic/arith", [{"role": "user", "content": "q"}], t) for i, t in enumerate(truths)]

    kept, stats = asyncio.run(study.collect_groups(FakeEngine(), FakeRewards(), iter(rows), groups=3, n=2,
                                                   informative_only=True))
    assert [k[0].prompt_id for k in kept] == ["p1", "p4", "p6"]
    assert stats.groups_generated == 7  # ceil(3 × 1.5) = 5 prompts keep 2, then ceil(1 × 1.5) = 2
    assert stats.samples == 14 and stats.correct == 11

    kept, _ = asyncio.run(study.collect_groups(FakeEngine(), FakeRewards(), iter(rows), groups=3, n=2,
                                               informative_only=False))
    assert [k[0].prompt_id for k in kept] == ["p0", "p1", "p2"]


def test_slip_breakdown_splits_minus_answers_into_right_slipped_and_other(study):
    from types import SimpleNamespace

    from async_rl.evaluation.metrics import ProblemResult, SampleResult

    def case(expression: str, parsed: str, correct: bool):
        problem = SimpleNamespace(extra_info={"expression": expression})
        return problem, ProblemResult("p", "?", [SampleResult(3, "stop", "x", parsed, correct)])

    cases = [case("7-3", "4", True), case("7-3", "10", False), case("7-3", "5", False),
             case("7-3+2", "12", False), case("2+2", "4", True), case("2+5", "8", False)]
    problems, results = zip(*cases, strict=True)
    shares = study.slip_breakdown(problems, results)
    assert shares == {"minus_right": 0.25, "minus_slipped": 0.5, "minus_other": 0.25, "plus_accuracy": 0.5}
