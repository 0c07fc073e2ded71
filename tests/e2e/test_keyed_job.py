"""A job whose listeners are off loopback, as on a cluster: `async-rl train` binds this machine's
network address with the job's CURVE keys (`async-rl keys generate`). Its own roles train through
the authenticated wires, and a client without the job's client key, even one that knows the
server's public key, can neither read nor write the buffer, nor receive weights, nor stop it.

The random tiny model and the same short settings as test_job.py: only the wiring is checked.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import psutil
import pytest
import zmq
from test_job import cli, learner_version, metrics, start_job, stop_job, wait_for

from async_rl.job.control import request
from async_rl.weights.keys import generate_keys
from buffer.client import BufferClient
from buffer.testing import synthetic_batch

pytestmark = pytest.mark.slow
REFUSED_WAIT_S = 3.0  # how long an outsider waits for the answer that never comes


def network_address() -> str:
    """An IPv4 address of this machine that is not loopback (the test's "cluster" address)."""
    for name, addresses in psutil.net_if_addrs().items():
        stats = psutil.net_if_stats().get(name)
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127.") and stats and stats.isup:
                return address.address
    pytest.fail("this machine has no non-loopback IPv4 address that is up; the off-loopback job needs one")


@pytest.fixture(scope="module")
def keyed_job(tmp_path_factory):
    root = tmp_path_factory.mktemp("keyed")
    keys = generate_keys(root / "keys")
    stranger = generate_keys(root / "stranger")  # knows the server's public key, is not authorized
    shutil.copyfile(keys / "server.key", stranger / "server.key")
    host = network_address()
    run_dir = root / "run"
    # weights.host unset: the publisher binds (and actors are given) the learner node's address
    proc = start_job(run_dir, f"cluster.bind_host={host}", f"weights.curve_keys_dir={keys}")
    try:
        run = wait_for("run.json with the job's addresses", lambda: _run_json(run_dir).get("weights_address") and _run_json(run_dir))
        yield {"run_dir": run_dir, "proc": proc, "host": host, "run": run, "outsiders": (None, str(stranger))}
    finally:
        stop_job(proc)


def _run_json(run_dir: Path) -> dict:
    path = run_dir / "run.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def test_the_jobs_listeners_are_on_the_network_address_and_its_own_roles_train_through_them(keyed_job, exposed_listeners):
    run_dir, host, run = keyed_job["run_dir"], keyed_job["host"], keyed_job["run"]
    for name in ("control_address", "buffer_address", "weights_address"):
        assert run[name].startswith(f"tcp://{host}:"), (name, run[name])
    wait_for("learner version 2", lambda: learner_version(run_dir) >= 2)
    wait_for("the actor serving a published version", lambda: any(
        (r.get("weight_version") or 0) >= 1 for r in metrics(run_dir, "actor-0")))
    exposed = exposed_listeners(keyed_job["proc"].pid)
    for name in ("control_address", "buffer_address", "weights_address"):
        assert run[name].removeprefix("tcp://") in exposed, (name, sorted(exposed))
    # The job's own CLI reads the keys folder from run.json.
    stats = cli("buffer", "stats", str(run_dir), "--json")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["rows"] > 0


def test_an_outsider_can_neither_write_nor_read_the_buffer(keyed_job):
    address = keyed_job["run"]["buffer_address"]
    for outsider in keyed_job["outsiders"]:
        with BufferClient(address, timeout_s=REFUSED_WAIT_S, curve_keys_dir=outsider) as client:
            with pytest.raises(TimeoutError):
                client.insert(synthetic_batch(groups=["forged"]), retry_for_s=0)
            with pytest.raises(TimeoutError):
                client.stats()
            with pytest.raises(TimeoutError):
                client.sample(1)


def test_an_outsider_receives_no_weights_while_the_actor_does(keyed_job):
    run_dir, address = keyed_job["run_dir"], keyed_job["run"]["weights_address"]
    ctx = zmq.Context.instance()
    subscribers = []
    for outsider in keyed_job["outsiders"]:
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        if outsider:
            from async_rl.weights.keys import secure_client

            secure_client(sock, outsider)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(address)
        subscribers.append(sock)
    try:
        before = learner_version(run_dir)
        wait_for("two more published versions", lambda: learner_version(run_dir) >= before + 2)
        assert [sock.poll(0) for sock in subscribers] == [0, 0]
        wait_for("the actor serving a version published while the outsiders listened", lambda: any(
            (r.get("weight_version") or 0) > before for r in metrics(run_dir, "actor-0")))
        assert [sock.poll(0) for sock in subscribers] == [0, 0]
    finally:
        for sock in subscribers:
            sock.close()


def test_an_outsider_cannot_stop_the_job_and_the_jobs_own_stop_does(keyed_job):
    run_dir, proc, address = keyed_job["run_dir"], keyed_job["proc"], keyed_job["run"]["control_address"]
    for outsider in keyed_job["outsiders"]:
        with pytest.raises(ConnectionError, match="did not answer"):
            request(address, "stop", timeout_s=REFUSED_WAIT_S, curve_keys_dir=outsider)
    before = learner_version(run_dir)
    wait_for("the learner still advancing", lambda: learner_version(run_dir) > before)
    assert proc.poll() is None
    result = cli("stop", str(run_dir))
    assert result.returncode == 0, result.stderr
    assert proc.wait(timeout=300) == 0
