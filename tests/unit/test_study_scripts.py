"""Pure logic of benchmarks/staleness_study.py and benchmarks/default_run.py."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def staleness(load_benchmark):
    return load_benchmark("staleness_study")


@pytest.fixture(scope="module")
def e2e(load_benchmark):
    return load_benchmark("e2e_bench")


@pytest.fixture(scope="module")
def default_run(load_benchmark):
    return load_benchmark("default_run")


def run(cap: int, seed: int, curve: list[float], staleness_mean: float = 1.0) -> dict:
    return {"cap": cap, "seed": seed, "curve": [{"version": 10 * i, "accuracy": a} for i, a in enumerate(curve)],
            "staleness_mean": staleness_mean, "learner_busy": 0.8, "wall_s": 100.0}


def test_a_cap_summary_is_mean_and_sd_over_its_seeds(staleness):
    summary = staleness.summarize_cap(4, [run(4, 0, [0.3, 0.6]), run(4, 1, [0.3, 0.7]), run(4, 2, [0.2, 0.8])])
    assert summary["cap"] == 4 and summary["seeds"] == 3
    assert summary["final"] == pytest.approx(0.7) and summary["final_sd"] == pytest.approx(0.1)
    assert summary["gain"] == pytest.approx((0.3 + 0.4 + 0.6) / 3)


def test_staleness_study_flags_name_the_bad_value(staleness):
    with pytest.raises(SystemExit, match=r"--caps='1,-2'"):
        staleness.parse_args(["--caps", "1,-2"])
    with pytest.raises(SystemExit, match="--steps=0: must be >= 1"):
        staleness.parse_args(["--steps", "0"])
    quick = staleness.parse_args(["--quick"])
    assert quick.cap_list == [0, 1] and quick.seeds == 1 and quick.steps == 4


def test_staleness_study_reuses_logged_runs_of_the_same_settings(staleness, tmp_path, monkeypatch):
    ran, written = [], {}
    monkeypatch.setattr(staleness, "warm_start", lambda root: None)
    monkeypatch.setattr(staleness, "write_result", lambda name, payload: written.update(payload))
    monkeypatch.setattr(staleness, "plot", lambda runs, caps, path: path)  # not into the repo's docs/
    monkeypatch.setattr(staleness, "run_cap", lambda root, cap, seed, args: ran.append((cap, seed)) or run(cap, seed, [0.3, 0.6]))
    staleness.main(["--root", str(tmp_path), "--caps", "0,8", "--seeds", "2", "--steps", "16"])
    assert ran == [(0, 0), (8, 0), (0, 1), (8, 1)]
    ran.clear()
    staleness.main(["--root", str(tmp_path), "--caps", "0,8,16", "--seeds", "2", "--steps", "16", "--reuse"])
    assert ran == [(16, 0), (16, 1)]  # caps 0 and 8 come from the log
    assert [c["cap"] for c in written["caps"]] == [0, 8, 16] and len(written["runs"]) == 6
    ran.clear()
    staleness.main(["--root", str(tmp_path), "--caps", "0", "--seeds", "1", "--steps", "8", "--reuse"])
    assert ran == [(0, 0)]  # other steps: another run


def test_staleness_study_set_overrides_are_part_of_a_runs_identity(staleness, tmp_path, monkeypatch):
    ran, written = [], {}
    monkeypatch.setattr(staleness, "warm_start", lambda root: None)
    monkeypatch.setattr(staleness, "write_result", lambda name, payload: written.update({name: payload}))
    drawn = []
    monkeypatch.setattr(staleness, "plot", lambda runs, caps, path: drawn.append(path.name) or path)

    def run_cap(root, cap, seed, args):
        ran.append((cap, seed, tuple(args.set)))
        return run(cap, seed, [0.3, 0.6])

    monkeypatch.setattr(staleness, "run_cap", run_cap)
    base = ["--root", str(tmp_path), "--caps", "4", "--seeds", "1", "--steps", "16", "--reuse"]
    staleness.main(base)
    staleness.main([*base, "--set", "actors.count=2", "--tag", "two"])
    staleness.main([*base, "--set", "actors.count=2", "--tag", "two"])  # logged: not run again
    staleness.main(base)  # the run without --set is still in the log
    assert ran == [(4, 0, ()), (4, 0, ("actors.count=2",))]
    assert set(written) == {"staleness_study", "staleness_study_two"}
    assert written["staleness_study_two"]["settings"]["set"] == ["actors.count=2"]
    assert drawn == ["staleness-live.png", "staleness-live-two.png", "staleness-live-two.png", "staleness-live.png"]


def test_the_live_cap_plot_draws_every_seed_and_each_caps_mean(staleness, tmp_path, monkeypatch):
    runs = [run(0, 0, [0.3, 0.6]), run(0, 1, [0.3, 0.5]), run(16, 0, [0.3, 0.55])]
    path = staleness.plot(runs, [0, 16], tmp_path / "docs" / "live.png")
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figures = []
    monkeypatch.setattr(staleness, "save_figure", lambda fig, path: figures.append(fig) or path)
    staleness.plot(runs, [0, 16], tmp_path / "again.png")
    lines = figures[0].axes[0].get_lines()
    assert len(lines) == 5  # three seeds, two means
    means = {line.get_label(): list(line.get_ydata()) for line in lines if line.get_label().startswith("cap")}
    assert means == {"cap 0 (mean of 2)": [0.3, 0.55], "cap 16 (mean of 1)": [0.3, 0.55]}


def test_default_run_reads_a_finished_run_folder(default_run, tmp_path):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "config.yaml").write_text("run:\n  seed: 2\n")
    lines = [{"version": 0, "accuracy": 0.3}, {"version": 10, "accuracy": 0.55}, {"version": 20, "accuracy": 0.61}]
    (tmp_path / "metrics" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = default_run.run_summary(tmp_path, 123.0)
    assert summary["seed"] == 2 and summary["start"] == 0.3 and summary["final"] == 0.61
    assert summary["gain"] == pytest.approx(0.31) and summary["wall_s"] == 123.0
    (tmp_path / "metrics" / "eval.jsonl").write_text("")
    with pytest.raises(SystemExit, match="no held-out evaluations"):
        default_run.run_summary(tmp_path)


def test_e2e_summary_reports_the_learners_pace_from_its_first_step(e2e, tmp_path):
    """versions/min counts from the first learner step (engine start-up excluded), so a run that
    ends at N versions still compares the modes; a run with no step reports 0, not a division error."""
    metrics = tmp_path / "run" / "metrics"
    metrics.mkdir(parents=True)
    steps = [{"version": v, "time": 100.0 + 3.0 * (v - 1), "busy_fraction": 0.5, "staleness_mean": 0.0}
             for v in (1, 2, 3, 4)]  # 3 versions in 9 s after the first
    (metrics / "learner.jsonl").write_text("\n".join(json.dumps(r) for r in steps))
    actor = [{"time": 90.0 + 10 * i, "rows_acked": 64 * i, "groups_in_flight": i % 2} for i in range(3)]
    (metrics / "actor-0.jsonl").write_text("\n".join(json.dumps(r) for r in actor))
    summary = e2e.summarize(tmp_path / "run", "sync", 0)
    assert summary["versions"] == 4 and summary["versions_per_min"] == pytest.approx(20.0)
    assert summary["trajectories_per_s"] == pytest.approx(128 / 20)
    (metrics / "learner.jsonl").write_text("")
    assert e2e.summarize(tmp_path / "run", "sync", 0)["versions_per_min"] == 0.0
