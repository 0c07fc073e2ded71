"""A two-node Ray cluster on one machine, across a real network boundary: node A is the host's
network namespace, node B a network namespace joined to it by a veth pair
(`scripts/two_nodes.sh`). Ray's head runs on A with token auth, a worker joins from B, and
`async-rl train --ray-address` places the learner on A and the actor on B by custom resources.

Checked: the job's listeners are off loopback, so a client without the job's client key (even
one holding the server's public key) is shown to get no buffer reply, no weights and no stop;
the actor on B receives every version over TCP (never through the /dev/shm both
namespaces share), its trajectories reach the buffer on A, `async-rl status` works from B with
the job's keys, and no listener of the cluster binds a wildcard. Then node B dies whole (every
process in its namespace killed): the job reports the lost node, keeps training from the buffer
and loses no acknowledged row; `scale actors` is refused while no node can hold an actor, and
places one on B again once B rejoins. Root only (as CI runs).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import zmq
from test_job import BIN, JOB_ARGS, cli, learner_version, metrics, stop_job, wait_for

from async_rl.job.control import request
from async_rl.weights.keys import generate_keys, secure_client
from buffer.client import BufferClient
from buffer.testing import synthetic_batch

pytestmark = pytest.mark.slow
RAY = Path(sys.executable).with_name("ray")
NODES = Path(__file__).resolve().parents[2] / "scripts" / "two_nodes.sh"
NAME = f"arl{os.getpid() % 100_000}"
SUBNET = f"10.231.{os.getpid() % 250}"
A, B = f"{SUBNET}.1", f"{SUBNET}.2"
# What the buffer holds when node B is lost must stay trainable. The tiny learner is as fast as
# the actors: with each group trained once, and rows aging out at a tight cap, the buffer holds
# next to nothing trainable at any moment. Here a group may be trained REUSE times and rows
# never age out during the test.
MAX_STALENESS = 1000
REUSE = 4


def on_b(*argv: str) -> list[str]:
    return ["bash", str(NODES), "exec", NAME, *argv]


@pytest.fixture(scope="module")
def nodes():
    assert os.geteuid() == 0, "the two-node test makes network namespaces: run it as root (CI does)"
    subprocess.run(["bash", str(NODES), "down", NAME], check=True)  # a namesake left by a killed run
    subprocess.run(["bash", str(NODES), "up", NAME, A, B], check=True)
    try:
        yield
    finally:
        subprocess.run(["bash", str(NODES), "down", NAME], check=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A user's shell whose `ray get-auth-token --generate` made the cluster's token, shared by
    both nodes (the home folder is on the shared filesystem, as the keys and run folder are)."""
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(home), RAY_AUTH_MODE="token")
    subprocess.run([str(RAY), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    return env


def _ray_start(argv: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            start_new_session=True, env=env)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def node_started(proc: subprocess.Popen, log: Path) -> bool:
    """`ray start` prints "Ray runtime started." once the control store lists its node."""
    assert proc.poll() is None, f"`ray start` exited: {log.read_text()[-2000:]}"
    return "Ray runtime started." in log.read_text()


RAY_WORKER_PORTS = range(10_002, 11_000)  # where Ray's worker processes listen (see RAY_SYSTEM)
RAY_COMMON = ["--block", "--num-cpus=2", "--disable-usage-stats", f"--min-worker-port={RAY_WORKER_PORTS.start}",
              f"--max-worker-port={RAY_WORKER_PORTS.stop - 1}"]


def join_node_b(cluster: dict, env: dict) -> None:
    """`ray start --address` on node B; the cluster's "worker" is then that process."""
    log = cluster["logs"] / f"worker-{cluster['joins']}.log"
    worker = _ray_start(on_b(str(RAY), "start", f"--address={A}:{cluster['port']}", f"--node-ip-address={B}",
                             "--resources={\"node_b\": 1}", *RAY_COMMON), log, env)
    cluster["worker"], cluster["joins"] = worker, cluster["joins"] + 1
    wait_for("node B joining", lambda: node_started(worker, log), timeout_s=120, every_s=0.5)


@pytest.fixture(scope="module")
def cluster(nodes, env, tmp_path_factory):
    logs = tmp_path_factory.mktemp("ray-logs")
    port = 6300 + os.getpid() % 500
    head = _ray_start([str(RAY), "start", "--head", f"--port={port}", f"--node-ip-address={A}",
                       "--include-dashboard=false", "--resources={\"node_a\": 1}", *RAY_COMMON], logs / "head.log", env)
    cluster = {"port": port, "head": head, "worker": None, "logs": logs, "joins": 0}
    try:
        wait_for("the Ray head", lambda: node_started(head, logs / "head.log"), timeout_s=120, every_s=0.5)
        join_node_b(cluster, env)
        yield cluster
    finally:
        if cluster["worker"] is not None:
            _stop(cluster["worker"])
        _stop(head)


@pytest.fixture(scope="module")
def job(cluster, env, tmp_path_factory):
    root = tmp_path_factory.mktemp("two-nodes")
    keys = generate_keys(root / "keys")
    stranger = generate_keys(root / "stranger")  # knows the server's public key, is not authorized
    shutil.copyfile(keys / "server.key", stranger / "server.key")
    run_dir = root / "run"
    log = open(root / "train.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(BIN), "train", f"run.dir={run_dir}", "--ray-address", f"{A}:{cluster['port']}", *JOB_ARGS,
         f"cluster.bind_host={A}", f"weights.curve_keys_dir={keys}",
         "learner.resources={node_a: 0.01}", "actors.resources={node_b: 0.01}", "actors.cpus=1", "learner.cpus=1",
         f"algorithm.staleness.max_staleness={MAX_STALENESS}", f"buffer.max_times_sampled={REUSE}",
         "learner.checkpoint.every=25"],  # (JOB_ARGS: 2) the learner makes hundreds of versions here
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    try:
        wait_for("run.json with the job's addresses", lambda: "weights_address" in _run_json(run_dir))
        yield {"run_dir": run_dir, "proc": proc, "run": _run_json(run_dir), "log": root / "train.log",
               "outsiders": (None, str(stranger))}
    finally:
        stop_job(proc)


def live(job: dict) -> dict:
    """The job's status, asked in-process with the job's keys (as `async-rl status --json` does)."""
    return request(job["run"]["control_address"], "status", timeout_s=60, curve_keys_dir=job["run"]["curve_keys_dir"])


def _run_json(run_dir: Path) -> dict:
    path = run_dir / "run.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def netns_inode(pid: int | str) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def role_processes(cluster: dict, name: str) -> list[psutil.Process]:
    """The cluster's Ray workers running role ``name`` (descendants of either node's `ray start`)."""
    found = []
    for root in (cluster["head"], cluster["worker"]):
        try:
            tree = psutil.Process(root.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for proc in tree:
            try:
                if proc.name().startswith(f"ray::{name}"):
                    found.append(proc)
            except psutil.NoSuchProcess:
                continue
    return found


def test_a_process_in_node_bs_namespace_is_another_host_to_the_weight_transport(nodes):
    """Both namespaces share this kernel and its /dev/shm, but node B must stream weights over TCP
    like a real second machine: the transport's host identity includes the network namespace."""
    from async_rl.weights.shm import host_id

    probe = "from async_rl.weights.shm import host_id; print(host_id())"
    theirs = subprocess.run(on_b(sys.executable, "-c", probe), capture_output=True, text=True, check=True).stdout.strip()
    ours = host_id()
    assert theirs != ours
    assert theirs.split(":")[:2] == ours.split(":")[:2]  # the same boot and /dev/shm mount: only the node differs


def test_the_actor_on_node_b_streams_every_version_over_tcp_and_fills_the_buffer_on_node_a(job, cluster):
    run_dir, run = job["run_dir"], job["run"]
    assert run["weights_address"].startswith(f"tcp://{A}:") and run["buffer_address"].startswith(f"tcp://{A}:")
    wait_for("learner version 3", lambda: learner_version(run_dir) >= 3, timeout_s=300)
    # A set counts as streamed when it arrives and the version moves when the engine serves it:
    # wait for a metrics row that shows both (a row between the two shows the older version).
    latest = wait_for("the actor on B serving a second streamed version", lambda: next(
        (r for r in reversed(metrics(run_dir, "actor-0"))
         if r.get("weights_streamed", 0) >= 2 and (r.get("weight_version") or 0) >= 2), None))
    assert latest["weights_from_shm"] == 0 and latest["weights_bytes_streamed"] > 0
    assert latest["rows_acked"] > 0
    b = os.stat(f"/run/netns/{NAME}").st_ino
    actors, learners = role_processes(cluster, "ActorRole"), role_processes(cluster, "LearnerRank")
    assert actors and all(netns_inode(p.pid) == b for p in actors)
    assert learners and all(netns_inode(p.pid) == netns_inode("self") for p in learners)
    stats = cli("buffer", "stats", str(run_dir), "--json")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["rows"] > 0


def test_status_works_from_node_b_with_the_jobs_keys(job, env):
    result = subprocess.run(on_b(str(BIN), "status", str(job["run_dir"]), "--json"), env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    live = json.loads(result.stdout)["live"]
    assert live["actors"] == [0] and live["learner_ranks"] == 1


# Ray 2.60's own servers on a cluster node listen on every interface, whatever --node-ip-address
# says (there is no option to bind one address): its system servers, and the core-worker server
# in every Ray process (workers and drivers), on ports from the range `ray start` is given. They
# are token-authenticated, and the README says so. Every other listener must be on the node's
# address or loopback.
RAY_SYSTEM = ("raylet", "gcs_server", "autoscaler/_private/monitor.py")
LISTENER = re.compile(r"^\S+\s+\d+\s+\d+\s+(\S+)\s+\S+\s+users:\(\(\"([^\"]*)\",pid=(\d+)")


def listeners(argv: list[str], pids: set[int] | None = None) -> list[tuple[str, int, str]]:
    """(host, port, process) of every TCP listener `ss` shows, of ``pids`` only when given; Ray's
    system servers are left out (RAY_SYSTEM)."""
    out = subprocess.run([*argv, "ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        match = LISTENER.match(line.strip())
        if not match or (pids is not None and int(match[3]) not in pids):
            continue
        try:
            cmdline = " ".join(psutil.Process(int(match[3])).cmdline())
        except psutil.NoSuchProcess:
            continue
        if not any(name in (match[2], cmdline) or name in cmdline for name in RAY_SYSTEM):
            host, port = match[1].rsplit(":", 1)
            found.append((host.strip("[]").removeprefix("::ffff:"), int(port), match[2]))
    return found


def tree(*roots: int) -> set[int]:
    pids = set()
    for root in roots:
        try:
            pids |= {root, *(p.pid for p in psutil.Process(root).children(recursive=True))}
        except psutil.NoSuchProcess:
            continue
    return pids


def test_every_listener_of_the_job_binds_its_nodes_address_or_loopback(job, cluster):
    wait_for("the publisher's first version", lambda: learner_version(job["run_dir"]) >= 1, timeout_s=300)
    for node, found in ((B, listeners(on_b())), (A, listeners([], tree(job["proc"].pid, cluster["head"].pid)))):
        ours = [(h, port, p) for h, port, p in found if port not in RAY_WORKER_PORTS]
        assert ours and [(h, port, p) for h, port, p in ours if h not in {node, "127.0.0.1", "::1"}] == []
    in_a = {f"{h}:{port}" for h, port, _ in listeners([], tree(job["proc"].pid, cluster["head"].pid))}
    for name in ("buffer_address", "control_address", "weights_address"):
        assert job["run"][name].removeprefix("tcp://") in in_a, (name, job["run"][name], sorted(in_a))


# An outsider reaches every listener of the job (they are off loopback) but holds no
# client key the job authorized: no buffer reply, no weights, no stop.
REFUSED_WAIT_S = 3.0


def answers(attempts: list) -> list[str]:
    """Each attempt run at once in its own thread (each waits REFUSED_WAIT_S for a reply that
    must not come): "answered", or the name of what it raised."""
    def attempt(call) -> str:
        try:
            call()
        except Exception as err:
            return type(err).__name__
        return "answered"

    with ThreadPoolExecutor(len(attempts)) as pool:
        return list(pool.map(attempt, attempts))


def test_an_outsider_can_neither_write_nor_read_the_buffer(job, monkeypatch):
    monkeypatch.setattr("buffer.client.REPLY_GRACE_S", REFUSED_WAIT_S)  # a sample's wait: as long as the others'
    def buffer_call(outsider, call):
        def run():
            with BufferClient(job["run"]["buffer_address"], timeout_s=REFUSED_WAIT_S, curve_keys_dir=outsider) as client:
                call(client)
        return run

    calls = (lambda c: c.insert(synthetic_batch(groups=["forged"]), retry_for_s=0), lambda c: c.stats(),
             lambda c: c.sample(1))
    got = answers([buffer_call(outsider, call) for outsider in job["outsiders"] for call in calls])
    assert got == ["TimeoutError"] * 6


def test_an_outsider_receives_no_weights_while_the_actor_does(job):
    run_dir, ctx, subscribers = job["run_dir"], zmq.Context.instance(), []
    for outsider in job["outsiders"]:
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        if outsider:
            secure_client(sock, outsider)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(job["run"]["weights_address"])
        subscribers.append(sock)
    try:
        before = learner_version(run_dir)
        wait_for("the actor loading a version published while the outsiders listened", lambda: any(
            (r.get("weight_version") or 0) > before for r in metrics(run_dir, "actor-0")))
        assert [sock.poll(0) for sock in subscribers] == [0, 0]
    finally:
        for sock in subscribers:
            sock.close()


def test_an_outsider_cannot_stop_the_job(job):
    run_dir = job["run_dir"]
    got = answers([lambda keys=outsider: request(job["run"]["control_address"], "stop", timeout_s=REFUSED_WAIT_S,
                                                 curve_keys_dir=keys) for outsider in job["outsiders"]])
    assert got == ["ConnectionError"] * 2
    before = learner_version(run_dir)
    wait_for("the learner still advancing", lambda: learner_version(run_dir) > before)
    assert job["proc"].poll() is None


def test_scale_places_a_second_actor_on_node_b_and_a_killed_one_restarts_there(job):
    run_dir, b = job["run_dir"], os.stat(f"/run/netns/{NAME}").st_ino
    up = cli("scale", "actors", "2", "--run-dir", str(run_dir), timeout=300)
    assert up.returncode == 0 and up.stdout.startswith("actors now: [0, 1]"), up.stdout + up.stderr
    second = wait_for("actor 1 placed", lambda: live(job)["pids"].get("actor-1"))
    assert netns_inode(second) == b
    first = live(job)["pids"]["actor-0"]
    os.kill(first, signal.SIGKILL)  # the actor that has been generating all along
    wait_for("the restart event", lambda: any("actor 0 died" in e and "restarting" in e for e in live(job)["events"]))
    again = wait_for("a new actor 0", lambda: live(job)["pids"].get("actor-0") not in (None, first)
                     and live(job)["pids"]["actor-0"])
    assert netns_inode(again) == b
    version = learner_version(run_dir)
    wait_for("training to continue", lambda: learner_version(run_dir) >= version + 2)


def stored_trajectories(run_dir: Path, out: Path) -> dict[str, str]:
    """traj_id → actor_id of every row the buffer holds on disk (`async-rl buffer export`)."""
    import pyarrow.parquet as pq

    result = cli("buffer", "export", str(out), "--run", str(run_dir))
    assert result.returncode == 0, result.stderr
    table = pq.read_table(out, columns=["traj_id", "actor_id"])
    return dict(zip(table["traj_id"].to_pylist(), table["actor_id"].to_pylist(), strict=True))


def sampleable_groups(job: dict) -> int:
    with BufferClient(job["run"]["buffer_address"], timeout_s=30, curve_keys_dir=job["run"]["curve_keys_dir"]) as client:
        return client.stats()["groups_sampleable"]


def last_word_on(actor_ids: list[int], events: list[str]) -> dict[int, str]:
    """The latest event about each actor ("" if none)."""
    return {i: ([e for e in events if f"actor {i} " in e] or [""])[-1] for i in actor_ids}


def test_node_b_lost_the_job_trains_on_and_scale_uses_b_again_once_it_rejoins(job, cluster, env, tmp_path):
    run_dir, b_netns = job["run_dir"], os.stat(f"/run/netns/{NAME}").st_ino
    on_b_now = live(job)["actors"]
    assert on_b_now == [0, 1] and live(job)["actors_pending"] == []
    before = stored_trajectories(run_dir, tmp_path / "before.parquet")
    wait_for("a backlog of ten learner steps", lambda: sampleable_groups(job) >= 20, every_s=0.5)
    subprocess.run(["bash", str(NODES), "crash", NAME], check=True)  # B dies whole: raylet, workers, actors
    crashed_at = time.time()
    cluster["worker"].wait(timeout=30)

    lost = wait_for("the lost node in status", lambda: [n for n in live(job)["nodes"] if n["address"] == B and not n["alive"]],
                    timeout_s=180)
    assert len(lost) == 1

    def verdict() -> dict | None:
        status = live(job)
        words = last_word_on(on_b_now, status["events"]).values()
        return status if all("no live node has CPU 1, node_b 0.01" in word for word in words) else None

    now = wait_for("the verdict on B's actors", verdict, timeout_s=180)
    assert now["actors"] == [] and any(f"node {B} " in e and " lost: " in e for e in now["events"])
    assert all("not restarted" in word or "given up while pending placement" in word
               for word in last_word_on(on_b_now, now["events"]).values())
    assert re.search(rf"event \d\d:\d\d:\d\d node {re.escape(B)} \(\w+\) lost: ", job["log"].read_text())
    # While no node can hold an actor, scale refuses in one line and starts none.
    refused = cli("scale", "actors", "1", "--run-dir", str(run_dir))
    assert refused.returncode == 2 and refused.stdout == "", refused.stdout + refused.stderr
    assert refused.stderr.count("\n") == 1 and "no live node has CPU 1, node_b 0.01" in refused.stderr
    assert live(job)["actors"] == []

    trained_since = [r["version"] for r in metrics(run_dir, "learner") if r["time"] > crashed_at]
    assert len(trained_since) >= 2, trained_since  # from the backlog: no actor has run since
    after = stored_trajectories(run_dir, tmp_path / "after.parquet")
    assert before.items() <= after.items()  # every row stored before the loss, still there
    reported = {f"actor-{i}": [r["rows_acked"] for r in metrics(run_dir, f"actor-{i}")] for i in on_b_now}
    assert reported["actor-0"]
    for role, acked in reported.items():  # every row an actor on B last reported acknowledged
        assert not acked or acked[-1] <= sum(1 for a in after.values() if a == role)

    join_node_b(cluster, env)
    wait_for("the rejoined node in status", lambda: any(n["address"] == B and n["alive"] for n in live(job)["nodes"]))
    up = cli("scale", "actors", "1", "--run-dir", str(run_dir), timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    [new] = live(job)["actors"]
    assert up.stdout.startswith(f"actors now: [{new}]") and new not in on_b_now
    pid = wait_for(f"actor {new} placed", lambda: live(job)["pids"].get(f"actor-{new}"))
    assert netns_inode(pid) == b_netns
    latest = wait_for(f"actor {new} loading a version and storing groups", lambda: next(
        (r for r in reversed(metrics(run_dir, f"actor-{new}")) if r.get("weights_streamed", 0) >= 1
         and r.get("rows_acked", 0) > 0), None))
    assert latest["weights_from_shm"] == 0 and latest["weights_bytes_streamed"] > 0
    assert live(job)["actors_pending"] == []


def test_the_job_stops_cleanly(job, cluster):
    result = cli("stop", str(job["run_dir"]))
    assert result.returncode == 0, result.stderr
    assert job["proc"].wait(timeout=300) == 0, job["log"].read_text()[-3000:]
    deadline = time.monotonic() + 30
    while role_processes(cluster, "ActorRole") and time.monotonic() < deadline:
        time.sleep(1)
    assert role_processes(cluster, "ActorRole") == []
