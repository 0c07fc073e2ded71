"""Pure logic of benchmarks/peer_trl.py's async-vs-sync report (issue #16 §4): the target sync
sets, time to it, the implied cluster speedup, and the per-actor counters read from metrics."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def peer(load_benchmark):
    return load_benchmark("peer_trl")


def run(points, busy=0.4):
    return {"heldout": [{"t": t, "accuracy": a} for t, a in points], "learner_busy": busy}


def test_the_target_is_a_share_of_syncs_mean_gain_and_time_to_it_is_the_first_version_there(peer):
    results = {"ours-sync": [run([(0, 0.30), (60, 0.50), (120, 0.60)]), run([(0, 0.30), (60, 0.55), (120, 0.50)])],
               "ours": [run([(0, 0.30), (30, 0.56), (90, 0.62)])]}
    target = peer.target_accuracy(results)
    assert peer.reference_system(results) == "ours-sync"
    assert target == pytest.approx(0.30 + peer.TARGET_SHARE * (0.55 - 0.30))
    assert peer.time_to(results["ours"][0]["heldout"], target) == 30
    assert [peer.time_to(r["heldout"], target) for r in results["ours-sync"]] == [120, 60]
    assert peer.time_to(run([(0, 0.30), (60, 0.52)])["heldout"], target) is None
    # Without sync (§3) the first system listed sets it: here ours, gain 0.32.
    assert peer.reference_system({"ours": results["ours"]}) == "ours"
    assert peer.target_accuracy({"ours": results["ours"]}) == pytest.approx(0.30 + peer.TARGET_SHARE * 0.32)


def test_replay_is_compared_by_tokens_to_target_and_rows_trained_per_row_generated(peer, capsys):
    def job(points, trained, generated):
        return {"seed": 0, "heldout": [{"t": t, "tokens": k, "accuracy": a} for t, k, a in points],
                "updates_per_min": 20.0, "signal_groups_per_min": 300.0, "completions_per_s": generated,
                "groups_all_equal_share": 0.0, "trained_completions_per_s": trained, "tokens_generated": 9000,
                "updates": 40, "step_s_median": 1.0}
    results = {"ours": [job([(0, 0, 0.3), (60, 6000, 0.5), (120, 12000, 0.6)], 50.0, 50.0)],
               "ours-reuse2": [job([(0, 0, 0.3), (60, 3000, 0.58), (120, 6000, 0.61)], 100.0, 50.0)]}
    summary = peer.summary(results)
    assert summary["reference"] == "ours" and summary["target"] == pytest.approx(0.3 + peer.TARGET_SHARE * 0.3)
    assert summary["ours"]["tokens_to_target_per_seed"] == [12000]
    assert summary["ours-reuse2"]["tokens_to_target"] == (3000, 0.0)  # half the generation to the same accuracy
    assert summary["ours-reuse2"]["trained_per_generated"] == (2.0, 0.0)
    assert "implied_cluster_speedup" not in summary  # only with sync among the systems
    peer.report(results, peer.parse_args(["--systems", "ours,ours-reuse2", "--seeds", "1"]))
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ours-reuse2 ")][-1]
    assert row.split()[-7:] == ["60", "±", "0", "3", "±", "0", "1/1"]  # 60 s and 3k tokens to target, 1 of 1 seed


def test_implied_speedup_is_bounded_by_the_slower_role(peer):
    # Training 40% of a sync version: one actor bounds async at 1 / 0.6; two actors at 1 / 0.4.
    speedups = peer.implied_speedups([run([], busy=0.38), run([], busy=0.42)])
    assert speedups["learner_busy_in_sync"] == pytest.approx(0.40)
    assert speedups["actors_1"] == pytest.approx(1 / 0.6)
    assert speedups["actors_2"] == pytest.approx(1 / 0.4)
    assert speedups["actors_4"] == pytest.approx(1 / 0.4)  # the learner is now the bound
    assert peer.implied_speedups([run([], busy=0.5)])["actors_1"] == pytest.approx(2.0)


def test_actor_counters_are_read_at_a_time_and_busy_is_the_share_of_records_in_flight(peer):
    actor = [{"time": 10.0, "tokens": 0, "groups_in_flight": 0}, {"time": 20.0, "tokens": 500, "groups_in_flight": 4},
             {"time": 30.0, "tokens": 900, "groups_in_flight": 2}, {"time": 40.0, "tokens": 1200, "groups_in_flight": 0}]
    assert [peer.tokens_by(actor, t) for t in (5.0, 20.0, 35.0, 99.0)] == [0, 500, 900, 1200]
    assert peer.busy_share(actor) == 0.5
    assert peer.tokens_by([{"time": 1.0}], 2.0) == 0  # records written before the counter existed


def test_plot_draws_every_seed_against_wallclock_and_tokens(peer, tmp_path):
    results = {"ours-sync": [{"heldout": [{"t": 0, "tokens": 0, "accuracy": 0.3}, {"t": 60, "tokens": 5000, "accuracy": 0.5}]}],
               "trl": [{"heldout": [{"t": 0, "tokens": 0, "accuracy": 0.3}, {"t": 50, "tokens": 4000, "accuracy": 0.4}]}]}
    paths = peer.plot(results, tmp_path, "peer-trl-x")
    assert [p.name for p in paths] == ["peer-trl-x-walltime.png", "peer-trl-x-tokens.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_read_job_sums_actors_and_cuts_at_the_budget(peer, tmp_path):
    import json

    metrics = tmp_path / "metrics"
    metrics.mkdir()

    def write(role, rows):
        (metrics / f"{role}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def step(i, t):  # the first step starts at t = 100 (its end 102 minus 2 s of work and wait)
        return {"time": t, "step": i, "version": i, "step_s": 1.5, "sample_wait_s": 0.5, "rows": 128, "groups": 16,
                "groups_all_equal": 4, "busy_fraction": 0.5 + 0.01 * i}

    write("learner", [step(1, 102.0), step(2, 130.0), step(3, 170.0)])  # step 3 lies past a 0.5 min budget
    for k in (0, 1):
        write(f"actor-{k}", [{"time": 100.0, "tokens": 0, "rows_acked": 0, "groups_in_flight": 8},
                             {"time": 125.0, "tokens": 1000 * (k + 1), "rows_acked": 64, "groups_in_flight": 8},
                             {"time": 160.0, "tokens": 3000 * (k + 1), "rows_acked": 128, "groups_in_flight": 0}])
    write("eval", [{"version": 0, "accuracy": 0.3}, {"version": 2, "accuracy": 0.5}, {"version": 3, "accuracy": 0.6}])
    job = peer.read_job(tmp_path, seed=7, budget_min=0.5)
    assert (job["seed"], job["updates"], job["actors"]) == (7, 2, 2)
    assert job["train_s"] == pytest.approx(30.0) and job["updates_per_min"] == pytest.approx(4.0)
    assert job["learner_busy"] == pytest.approx(0.52)  # the last step within the budget
    assert job["tokens_generated"] == 1000 + 2000  # both actors, by the last step within the budget
    assert job["actor_busy"] == 1.0  # the records after it are not counted
    assert [(h["version"], h["t"], h["tokens"]) for h in job["heldout"]] == [(0, 0.0, 0), (2, 30.0, 3000)]


def test_reuse_takes_logged_runs_with_the_same_settings_and_runs_only_the_rest(peer, tmp_path, monkeypatch):
    calls = []

    def fake(args, seed, system="trl"):
        calls.append((system, seed))
        return {"seed": seed, "heldout": [], "n": len(calls)}

    monkeypatch.setattr(peer, "run_ours", fake)
    monkeypatch.setattr(peer, "run_trl", fake)
    first = peer.parse_args(["--root", str(tmp_path), "--systems", "ours,ours-reuse2", "--seeds", "2"])
    peer.run_all(first)
    assert calls == [("ours", 0), ("ours-reuse2", 0), ("ours", 1), ("ours-reuse2", 1)]
    calls.clear()
    second = peer.parse_args(["--root", str(tmp_path), "--systems", "ours-sync,ours", "--seeds", "2", "--reuse"])
    results = peer.run_all(second)
    assert calls == [("ours-sync", 0), ("ours-sync", 1)]  # ours comes from the log
    assert [r["n"] for r in results["ours"]] == [1, 3] and [r["seed"] for r in results["ours-sync"]] == [0, 1]
    calls.clear()
    other = peer.parse_args(["--root", str(tmp_path), "--systems", "ours", "--seeds", "1", "--reuse",
                             "--set", "learner.eval.every=5"])
    peer.run_all(other)
    assert calls == [("ours", 0)]  # another --set is another run
    calls.clear()
    peer.run_all(first)  # without --reuse everything runs again
    assert len(calls) == 4
