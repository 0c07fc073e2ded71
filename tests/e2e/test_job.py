"""The asynchronous job as a user runs it: `async-rl train` in a subprocess, operated with
`async-rl status | scale | stop` and `train --resume`, with faults injected by PID.

One job serves every check (starting vLLM, DeepSpeed and Ray costs minutes on CPU). The
policy is the random tiny model, so rewards carry no signal; the zero-advantage filter is off
so the learner still gets batches and the plumbing (versions, weights, buffer, checkpoints)
is exercised end to end.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from async_rl.job.faults import kill_role

BIN = Path(sys.executable).with_name("async-rl")
JOB_ARGS = [
    "learner.sft.epochs=0",
    "learner.max_steps=0",
    "learner.batch.groups_per_step=2",
    "learner.checkpoint.every=2",
    "learner.eval.every=0",
    "buffer.min_size_to_sample=2",
    "buffer.filter_zero_advantage=false",
    "algorithm.staleness.max_staleness=2",
    "actors.n_samples_per_prompt=4",
    "actors.prompts_in_flight=4",
    "actors.max_tokens=12",
    "actors.kv_cache_gib=0.5",
    "data.synth.n_train=200",
    "data.synth.n_heldout=20",
    "data.synth.n_sft=20",
    "logging.console=plain",
    "logging.tensorboard=false",
]
pytestmark = pytest.mark.slow


def cli(*args, timeout=120):
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=timeout)


def wait_for(what, predicate, timeout_s=420, every_s=2.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def metrics(run_dir: Path, role: str) -> list[dict]:
    path = run_dir / "metrics" / f"{role}.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def learner_version(run_dir: Path) -> int:
    records = metrics(run_dir, "learner")
    return records[-1]["version"] if records else 0


def status(run_dir: Path) -> dict:
    result = cli("status", str(run_dir), "--json", timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["live"] or {}


def start_job(run_dir: Path, *extra: str, resume: bool = False) -> subprocess.Popen:
    args = ["train", "--resume", str(run_dir)] if resume else ["train", f"run.dir={run_dir}"]
    log = open(run_dir.parent / f"{run_dir.name}-{'resume' if resume else 'train'}.log", "w")  # noqa: SIM115
    return subprocess.Popen([str(BIN), *args, *JOB_ARGS, *extra], stdout=log, stderr=subprocess.STDOUT)


def buffer_rows(run_dir: Path) -> int:
    result = cli("buffer", "stats", str(run_dir), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["rows"]


def checkpointed_version(run_dir: Path) -> int:
    """The version of the newest checkpoint, 0 (the initial weights) before the first one."""
    latest = run_dir / "checkpoints" / "latest"
    return int(latest.read_text().strip().split("_")[1]) if latest.is_file() else 0


def checkpointed_step(run_dir: Path) -> int:
    """The learner step of the newest checkpoint (its version until a restart made them differ)."""
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        return 0
    state = json.loads((run_dir / "checkpoints" / latest.read_text().strip() / "learner_state.json").read_text())
    return state["extra"].get("step", state["version"])


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("job") / "run"
    proc = start_job(run_dir)
    try:
        wait_for("the control endpoint", lambda: (run_dir / "run.json").is_file() and "control_address" in json.loads((run_dir / "run.json").read_text()))
        yield run_dir, proc
    finally:
        stop_job(proc)


def stop_job(proc: subprocess.Popen) -> None:
    """Stops a job this test started: SIGINT (the job's own orderly stop), SIGKILL after 240 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_policy_advances_weights_reach_the_actor_and_the_buffer_fills_and_drains(job):
    run_dir, _ = job
    wait_for("learner version 3", lambda: learner_version(run_dir) >= 3)
    wait_for("the actor serving a published version", lambda: any(
        (r.get("weight_version") or 0) >= 1 for r in metrics(run_dir, "actor-0")))
    live = status(run_dir)
    assert live["learner_ranks"] == 1 and live["actors"] == [0]
    # The controller refreshes buffer stats every 10 s.
    stats = wait_for("buffer stats showing sampled groups", lambda: (
        (s := status(run_dir).get("buffer_stats") or {}).get("groups_sampled_total", 0) >= 3 and s))
    assert stats["rows"] >= stats["groups_sampled_total"] * 4
    last = metrics(run_dir, "learner")[-1]
    assert last["rows"] == 2 * 4 and last["staleness_max"] <= 2
    assert last["groups"] == 2 and 0 <= last["groups_all_equal"] <= 2
    assert (run_dir / "checkpoints" / "latest").is_file()


def test_every_socket_of_a_local_job_listens_on_loopback_only(job, exposed_listeners):
    """Driver, private Ray, controller, buffer, learner rank (file rendezvous, gloo on lo),
    vLLM actor and its engine core: nothing is reachable from outside the machine."""
    run_dir, proc = job
    wait_for("learner version 1", lambda: learner_version(run_dir) >= 1)
    wait_for("the learner's and the actor's pids", lambda: {"learner-0", "actor-0"} <= set(status(run_dir).get("pids", {})))
    assert exposed_listeners(proc.pid) == {}


def test_scale_actors_up_then_down_while_training(job):
    run_dir, _ = job
    up = cli("scale", "actors", "2", "--run-dir", str(run_dir), timeout=300)
    assert up.returncode == 0, up.stderr
    assert "actors now: [0, 1]" in up.stdout
    wait_for("the new actor producing", lambda: any(r.get("groups_done", 0) > 0 for r in metrics(run_dir, "actor-1")))
    down = cli("scale", "actors", "1", "--run-dir", str(run_dir), timeout=300)
    assert down.returncode == 0, down.stderr
    assert "actors now: [0]" in down.stdout


def test_a_killed_actor_is_restarted_and_training_continues(job):
    run_dir, _ = job
    wait_for("the actor's pid", lambda: status(run_dir).get("pids", {}).get("actor-0"))
    version = learner_version(run_dir)
    pid = kill_role(status(run_dir)["pids"], "actor-0")
    wait_for("the restart event", lambda: any("actor 0 died" in e for e in status(run_dir)["events"]))
    wait_for("a new actor process", lambda: status(run_dir).get("pids", {}).get("actor-0") not in (None, pid))
    wait_for("training to continue", lambda: learner_version(run_dir) >= version + 2)


def test_a_killed_learner_resumes_from_its_checkpoint(job):
    """Also when it dies before its first checkpoint (this test run alone): it then restarts
    from the initial weights at step 0 and trains on from there. Its versions go on above every
    version the dead learner published: those numbers named weights that are gone."""
    run_dir, _ = job
    wait_for("the learner's pid", lambda: status(run_dir).get("pids", {}).get("learner-0"))
    steps_before = len(metrics(run_dir, "learner"))
    kill_role(status(run_dir)["pids"], "learner-0")
    wait_for("the learner restart event", lambda: any("learner group failed" in e for e in status(run_dir)["events"]))
    checkpointed = checkpointed_step(run_dir)  # the dead learner writes nothing more
    published = max([r["version"] for r in metrics(run_dir, "learner")], default=0)

    def resumed_there():  # a step the dead learner logged just before the kill may precede
        after = [(r["step"], r["version"]) for r in metrics(run_dir, "learner")[steps_before:]]
        pairs = [after[i : i + 2] for i in range(len(after))]
        return any([s for s, _ in pair] == [checkpointed + 1, checkpointed + 2]
                   and all(v > published for _, v in pair) for pair in pairs)

    wait_for("two steps on from the checkpoint", resumed_there)


def test_scale_learners_to_two_ranks_while_the_actor_keeps_running(job):
    run_dir, _ = job
    actor_pid = wait_for("the actor's pid", lambda: status(run_dir).get("pids", {}).get("actor-0"))
    wait_for("a checkpoint", lambda: (run_dir / "checkpoints" / "latest").is_file())
    version = learner_version(run_dir)
    scaled = cli("scale", "learners", "2", "--run-dir", str(run_dir), timeout=400)
    assert scaled.returncode == 0, scaled.stderr
    assert "learner ranks now: 2" in scaled.stdout
    # The new group resumes from the checkpoint the old one wrote on its way out, then trains on.
    resumed = checkpointed_version(run_dir)
    assert resumed >= version
    wait_for("steps by the 2-rank group", lambda: any(
        r["ranks"] == 2 and r["version"] >= resumed + 2 for r in metrics(run_dir, "learner")))
    live = status(run_dir)
    assert live["learner_ranks"] == 2 and {"learner-0", "learner-1"} <= set(live["pids"])
    assert live["pids"]["actor-0"] == actor_pid  # the actor was not restarted


def test_stop_then_resume_keeps_the_buffer_and_the_policy_version(job):
    run_dir, proc = job
    wait_for("a checkpoint at version 4", lambda: checkpointed_version(run_dir) >= 4)  # when alone
    stopped = cli("stop", str(run_dir))
    assert stopped.returncode == 0, stopped.stderr
    assert proc.wait(timeout=300) == 0
    rows = buffer_rows(run_dir)
    version, step = checkpointed_version(run_dir), checkpointed_step(run_dir)
    assert rows > 0 and version >= 4
    # The resumed job also evaluates (every version, 8 problems): at exact versions, the last one
    # included even though the learner exits right after publishing it. An orderly stop published
    # the checkpoint's version itself: the resumed learner goes on from it, two steps.
    resumed = start_job(run_dir, f"learner.max_steps={step + 2}", "learner.eval.every=1",
                        "learner.eval.prompts=8", resume=True)
    try:
        assert resumed.wait(timeout=600) == 0
    finally:
        if resumed.poll() is None:
            resumed.kill()
    # The restarted buffer came back with every stored row (rows past max_staleness are then
    # evicted as the learner's version is set, so the count afterwards is smaller).
    served = [line for line in (run_dir / "logs" / "buffer.log").read_text().splitlines() if " serving " in line]
    assert served[-1].endswith(f"({rows} rows stored)")
    after = [r["version"] for r in metrics(run_dir, "learner")]
    assert after[-1] == version + 2
    evals = metrics(run_dir, "eval")
    evaluated = [e["version"] for e in evals]
    assert evaluated == sorted(set(evaluated)) and evaluated[-1] == version + 2
    assert all(version <= v <= version + 2 for v in evaluated)
    for record in evals:
        document = json.loads((run_dir / record["result"]).read_text())
        assert document["policy_version"] == record["version"] and record["prompts"] == 8
    assert checkpointed_version(run_dir) == version + 2
