"""Pure logic of benchmarks/learning_study.py: curve arithmetic, arm parsing, the slip breakdown
(the lockstep step itself is ``async_rl/reference.py``, tested in test_reference.py)."""

from __future__ import annotations

import math

import pytest


@pytest.fixture(scope="module")
def study(load_benchmark):
    return load_benchmark("learning_study")


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
    assert study.parse_arm("gspo-s8") == study.Arm("gspo-s8", "gspo", 8)
    for bad in ("grpo", "gppo-sx", "gppo-s", "ppo-4", "+coupled"):
        with pytest.raises(ValueError, match="expected one of gppo, dapo, cispo, ppo, gspo"):
            study.parse_arm(bad)
    with pytest.raises(ValueError, match="unknown modifier 'tis'; expected one of coupled"):
        study.parse_arm("gppo-s8+tis")


def test_arm_modifiers_change_exactly_their_keys_of_the_arms_config(study):
    from types import SimpleNamespace

    from async_rl.config_io import load_config

    arm = study.parse_arm("gppo-s8+coupled+inverse+sft0+nofilter")
    assert (arm.loss, arm.staleness, arm.modifiers) == ("gppo", 8, ("coupled", "inverse", "sft0", "nofilter"))
    args = SimpleNamespace(lr=5e-5, groups=16, mini_batches=2, steps=4, filter_zero_advantage=True)
    base = study.run_config(SimpleNamespace(cfg=load_config("tiny")), study.parse_arm("gppo-s8"), args)
    cfg = study.run_config(SimpleNamespace(cfg=load_config("tiny")), arm, args)
    assert cfg.algorithm.off_policy.mode == "coupled" and base.algorithm.off_policy.mode == "decoupled"
    assert cfg.algorithm.staleness.schedule.type == "inverse" and base.algorithm.staleness.schedule.type == "constant"
    assert cfg.algorithm.sft_coef == 0.0 and base.algorithm.sft_coef == 0.1
    assert not cfg.buffer.filter_zero_advantage and base.buffer.filter_zero_advantage
    changed = {"off_policy", "staleness", "sft_coef"}
    assert {k: v for k, v in cfg.algorithm if k not in changed} == {k: v for k, v in base.algorithm if k not in changed}


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


def test_a_section_sets_its_arms_and_settings_as_defaults_and_an_explicit_flag_still_wins(study):
    args = study.parse_args(["--section", "staleness"])
    preset = study.SECTIONS["staleness"]
    assert [a.name for a in args.arm_list] == preset.arms.split(",")
    assert (args.steps, args.groups, args.mini_batches, args.eval_every, args.lr) == (16, 16, 4, 4, 2e-5)
    assert (args.tag, args.job_min) == ("staleness", 0.0)
    args = study.parse_args(["--section", "staleness-long", "--seeds", "5", "--arms", "gppo-s32"])
    assert (args.steps, args.eval_every, args.seeds) == (48, 8, 5)
    assert [a.name for a in args.arm_list] == ["gppo-s32"]
    for name in study.SECTIONS:  # every preset parses and fits its own step budget
        args = study.parse_args(["--section", name])
        assert args.groups % args.mini_batches == 0 and args.steps % args.eval_every == 0, name
        assert max(a.staleness for a in args.arm_list) < args.steps, name
    with pytest.raises(SystemExit):
        study.parse_args(["--section", "replay"])
    with pytest.raises(SystemExit):
        study.parse_args(["--section", "staleness", "--quick"])


def test_logged_runs_are_reused_only_with_the_same_arm_seed_and_settings(study, tmp_path):
    from _common import log_run, logged_runs

    args = study.parse_args(["--section", "objectives"])
    other = study.parse_args(["--section", "objectives", "--lr", "1e-5"])
    log = tmp_path / "lockstep_runs.jsonl"
    assert logged_runs(log, study.run_settings(args), "arm") == {}
    for run in [{"arm": "gppo", "seed": 0, "settings": study.run_settings(args), "curve": [], "n": 1},
                {"arm": "gppo", "seed": 1, "settings": study.run_settings(other), "curve": [], "n": 2},
                {"arm": "gppo", "seed": 0, "settings": study.run_settings(args), "curve": [], "n": 3}]:
        log_run(log, run)
    assert {k: r["n"] for k, r in logged_runs(log, study.run_settings(args), "arm").items()} == {("gppo", 0): 3}
    assert {k: r["n"] for k, r in logged_runs(log, study.run_settings(other), "arm").items()} == {("gppo", 1): 2}


def test_curves_average_generated_tokens_and_old_records_without_them_still_load(study):
    seed_a = [study.EvalPoint(0, 0.0, 0.2, 0), study.EvalPoint(4, 10.0, 0.4, 1000)]
    seed_b = [study.EvalPoint(0, 0.0, 0.2, 0), study.EvalPoint(4, 12.0, 0.2, 3000)]
    assert [p["tokens"] for p in study.mean_curve([seed_a, seed_b])] == [0, 2000]
    assert study.EvalPoint(**{"step": 4, "time_s": 1.0, "accuracy": 0.5}).tokens == 0


def test_plot_panels_compare_objectives_per_staleness_and_modified_arms_beside_their_base(study):
    def arm(name):
        a = study.parse_arm(name)
        return {"arm": a.name, "loss": a.loss, "staleness": a.staleness, "modifiers": list(a.modifiers)}

    objectives = [arm(n) for n in ("gppo", "ppo", "gppo-s8", "ppo-s8")]
    assert [(t, [a["arm"] for a in m]) for t, m in study.plot_panels(objectives)] == [
        ("objectives at staleness 0", ["gppo", "ppo"]), ("objectives at staleness 8", ["gppo-s8", "ppo-s8"])]
    staleness = [arm(n) for n in ("gppo", "gppo-s4", "gppo-s8", "gppo-s8+linear", "gppo-s8+coupled")]
    assert [(t, [a["arm"] for a in m]) for t, m in study.plot_panels(staleness)] == [
        ("GPPO over staleness", ["gppo", "gppo-s4", "gppo-s8"]),
        ("ablations and corrections", ["gppo", "gppo-s8", "gppo-s8+linear", "gppo-s8+coupled"])]


def test_plot_draws_accuracy_against_step_wallclock_and_tokens(study, tmp_path):
    curve = [{"step": s, "time_s": 3.0 * s, "tokens": 900 * s, "accuracy": 0.3 + 0.01 * s, "accuracy_std": 0.01}
             for s in (0, 4, 8)]
    arms = [{"arm": name, "loss": "gppo", "staleness": s, "modifiers": mods, "mean_curve": curve}
            for name, s, mods in (("gppo", 0, []), ("gppo-s8", 8, []), ("gppo-s8+coupled", 8, ["coupled"]))]
    paths = study.plot(arms, [], 0.35, tmp_path, "study-x")
    assert [p.name for p in paths] == ["study-x-steps.png", "study-x-walltime.png", "study-x-tokens.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
