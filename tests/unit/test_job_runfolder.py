"""Run-folder records, metrics files, the plot, the display and the control endpoint."""

import json
import threading

import pytest
from pydantic import ValidationError

from async_rl.job.control import ControlServer, request
from async_rl.job.display import plain_line, snapshot
from async_rl.job.metrics import MetricsWriter, read_metrics
from async_rl.job.plot import plot_run
from async_rl.job.runfolder import (
    clear_stop,
    read_run_json,
    request_stop,
    stop_requested,
    update_run_json,
)
from async_rl.records import ActorMetricsRecord, HeldoutRecord, JobStatus, LearnerStepRecord


def fill_metrics(run_dir):
    learner = MetricsWriter(run_dir, "learner")
    for version in range(1, 6):
        learner.write(LearnerStepRecord(
            version=version, step=version, ranks=1, reward_mean=-1 + 0.3 * version, accuracy=0.1 * version,
            staleness_mean=0.5, staleness_max=2, response_tokens=64, groups=4, groups_all_equal=0, step_s=1.5, sample_wait_s=0.1,
            busy_fraction=0.8, publish_s=0.01, train={"loss": float("nan")}))
    learner.close()
    actor = MetricsWriter(run_dir, "actor-0")
    actor.write(ActorMetricsRecord(
        tokens_per_s=900.0, groups_done=3, weight_version=5, weight_update_s=0.05, reward_mean=0.1,
        groups_in_flight=2, rows_acked=12, reward_failures=0, staleness_gate_waits=1,
        buffer_batches_refused=2, buffer_stalled_s=42.0, weights_streamed=5, weights_from_shm=0,
        weights_bytes_streamed=1000, time=1.0))
    actor.close()
    evals = MetricsWriter(run_dir, "eval")
    for version, acc in ((0, 0.2), (5, 0.6)):
        evals.write(HeldoutRecord(version=version, accuracy=acc, prompts=8, no_answer=0.0, weights_from="publisher",
                                  eval_s=1.0, result=f"eval/v{version:06d}.json", time=2.0))
    evals.close()


def test_metrics_round_trip_with_roles_and_non_finite_values(tmp_path):
    fill_metrics(tmp_path)
    (tmp_path / "metrics" / "learner.jsonl").open("a").write('{"torn": ')  # a crash mid-line
    learner = read_metrics(tmp_path, "learner")
    assert [r["version"] for r in learner] == [1, 2, 3, 4, 5]
    assert learner[0]["role"] == "learner" and learner[0]["loss"] is None
    assert len(read_metrics(tmp_path)) == 5 + 1 + 2


def test_snapshot_and_plain_line_show_the_latest_figures(tmp_path):
    fill_metrics(tmp_path)
    status = JobStatus(pids={}, buffer_stats=None, actors=[0, 1], learner_ranks=1, finished=False, failure=None,
                       restarts={}, events=["x"], buffer_address=None, weights_address="", buffer_pid=None)
    snap = snapshot(tmp_path, status)
    assert snap.version == 5
    assert snap.heldout_accuracy == 0.6 and snap.first_heldout_accuracy == 0.2
    assert snap.tokens_per_s == 900.0 and snap.actors_alive == 2
    assert (snap.buffer_batches_refused, snap.buffer_stalled_s) == (2, 42.0)
    assert (snap.train_accuracy, snap.learner_busy, snap.weight_update_s) == (0.5, 0.8, 0.05)
    line = plain_line(snap, 90.0)
    assert line.startswith("[  1.5 min] v5 reward=0.500 heldout=0.600")


def test_status_shows_the_groups_leased_to_the_learner(tmp_path):
    from rich.console import Console

    from async_rl.job.display import render
    from async_rl.records import BufferSummary

    buffer = BufferSummary(rows=64, groups=8, groups_live=8, groups_sampleable=3, bytes=1, learner_version=2,
                           groups_sampled_total=5, evicted_rows={}, prompts=None,
                           leases={"outstanding": 2, "groups": 4})
    status = JobStatus(pids={}, buffer_stats=buffer, actors=[0], learner_ranks=1, finished=False, failure=None,
                       restarts={}, events=[], buffer_address=None, weights_address="", buffer_pid=None)
    console = Console(record=True, width=120)
    console.print(render(snapshot(tmp_path, status), 0.0))
    row = next(line for line in console.export_text().splitlines() if "leased to the learner" in line)
    assert row.split("│")[2].strip() == "4 groups in 2 leases"


def test_the_plain_view_prints_each_event_once_in_order(tmp_path):
    from rich.console import Console

    from async_rl.job.display import LiveView

    console = Console(record=True, width=40)  # narrower than an event: it must not wrap
    snap = snapshot(tmp_path)
    with LiveView(console, mode="plain") as view:
        view.update(snap, ["10:00:00 actor 0 started"])
        view.update(snap, ["10:00:00 actor 0 started", "10:00:07 node 10.0.0.2 (bbbb0001) lost: health check failed"])
    lines = console.export_text().splitlines()
    assert [line for line in lines if line.startswith("event ")] == [
        "event 10:00:00 actor 0 started", "event 10:00:07 node 10.0.0.2 (bbbb0001) lost: health check failed"]
    assert len([line for line in lines if line.startswith("[")]) == 1  # the figures did not change


def test_plot_writes_a_png(tmp_path):
    fill_metrics(tmp_path)
    out = plot_run(tmp_path)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="no metrics recorded"):
        plot_run(tmp_path / "empty")


def test_stop_requests_are_global_or_per_role(tmp_path):
    assert not stop_requested(tmp_path, "learner")
    request_stop(tmp_path, "learner")
    assert stop_requested(tmp_path, "learner") and not stop_requested(tmp_path)
    request_stop(tmp_path)
    assert stop_requested(tmp_path, "actor")
    clear_stop(tmp_path)
    clear_stop(tmp_path, "learner")
    assert not stop_requested(tmp_path, "learner")


def test_sigterm_and_ctrl_c_ask_for_the_graceful_stop_and_a_second_one_aborts(tmp_path):
    import os
    import signal

    from async_rl.job.driver import _install_interrupt

    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    previous = _install_interrupt(tmp_path)
    try:
        assert previous == before
        os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends before SIGKILL
        assert stop_requested(tmp_path)  # the same request as `async-rl stop`, not a dead driver
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    assert signal.getsignal(signal.SIGTERM) == before[signal.SIGTERM]


def test_run_json_updates_merge_and_missing_folder_is_explained(tmp_path):
    update_run_json(tmp_path, pid=1, control_address="tcp://127.0.0.1:1")
    update_run_json(tmp_path, buffer_address="tcp://127.0.0.1:2")
    info = read_run_json(tmp_path)
    assert info.pid == 1 and info.buffer_address.endswith(":2") and info.weights_address is None
    written = json.loads((tmp_path / "run.json").read_text())
    assert set(written) == {"pid", "control_address", "buffer_address", "updated_at"}
    with pytest.raises(ValidationError, match="control_adress"):
        update_run_json(tmp_path, control_adress="tcp://127.0.0.1:3")
    with pytest.raises(FileNotFoundError, match="no run.json"):
        read_run_json(tmp_path / "nope")


def test_control_endpoint_answers_json_and_survives_bad_requests():
    import zmq

    server = ControlServer("127.0.0.1")
    assert server.address.startswith("tcp://127.0.0.1:")
    calls = []

    def handle(req):
        calls.append(req)
        if req.verb == "scale_actors":
            raise ValueError("count=-1: expected a non-negative integer")
        return {"version": 3}

    stop = threading.Event()
    thread = threading.Thread(target=lambda: [server.serve_pending(handle, 50) for _ in iter(stop.is_set, True)])
    thread.start()
    try:
        assert request(server.address, "status") == {"version": 3}
        with pytest.raises(RuntimeError, match="ValueError: count=-1"):
            request(server.address, "scale_actors", count=-1)
        with pytest.raises(RuntimeError, match="unknown verb"):
            request(server.address, "reboot")
        with pytest.raises(RuntimeError, match="ControlRequest: cnt: Extra inputs are not permitted"):
            request(server.address, "status", cnt=3)
        raw = zmq.Context.instance().socket(zmq.REQ)
        raw.connect(server.address)
        raw.send(b"\x80not json")
        assert raw.poll(5000)
        assert json.loads(raw.recv()) == {"ok": False, "error": "request is not JSON (or nested too deeply)"}
        raw.close(linger=0)
        assert request(server.address, "status") == {"version": 3}
    finally:
        stop.set()
        thread.join()
        server.close()
    assert [c.verb for c in calls] == ["status", "status"]  # count=-1 never reaches the job


def test_request_to_a_dead_job_says_so():
    with pytest.raises(ConnectionError, match="did not answer"):
        request("tcp://127.0.0.1:9", "status", timeout_s=0.3)


def test_the_learner_log_counts_each_groups_tokens_and_the_groups_without_a_signal():
    from async_rl.job.learner_role import group_facts

    tokens, all_equal = group_facts(
        ["a", "a", "b", "b", "c", "c"], [[1, 2], [3], [4], [5, 6, 7], [8], [9]], [1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    assert tokens == {"a": 3, "b": 4, "c": 2}
    assert all_equal == 2  # a (all correct) and c (all wrong); b carries a signal
