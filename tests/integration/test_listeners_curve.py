"""The buffer service and the control endpoint with the job's CURVE keys, over real ZeroMQ on
loopback: a client without the job's client key can neither read, nor write, nor stop; the
job's own clients work. And the control endpoint answers hostile requests and keeps serving."""

from __future__ import annotations

import contextlib
import json
import shutil
import threading

import pytest
import zmq

from async_rl.config import BufferConfig
from async_rl.job.control import ControlServer, request
from async_rl.weights.keys import generate_keys
from buffer.client import BufferClient
from buffer.service import start_service
from buffer.testing import synthetic_batch

REFUSED_WAIT_S = 2.0  # how long a refused client waits for the answer that never comes


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """The job's keys, and a stranger's: it knows the server's public key, but its own client
    key is not authorized."""
    job = generate_keys(tmp_path_factory.mktemp("job-keys"))
    stranger = generate_keys(tmp_path_factory.mktemp("stranger-keys"))
    shutil.copyfile(job / "server.key", stranger / "server.key")
    return str(job), str(stranger)


def test_the_buffer_with_keys_serves_the_job_and_never_answers_others(tmp_path, keys):
    job, stranger = keys
    handle = start_service(tmp_path, BufferConfig(min_size_to_sample=1), max_staleness=4, curve_keys_dir=job)
    try:
        for outsider in (None, stranger):
            with BufferClient(handle.address, timeout_s=REFUSED_WAIT_S, curve_keys_dir=outsider) as client:
                with pytest.raises(TimeoutError):
                    client.insert(synthetic_batch(groups=["forged"]), retry_for_s=0)
                with pytest.raises(TimeoutError):
                    client.stats()
        with BufferClient(handle.address, curve_keys_dir=job) as client:
            assert client.insert(synthetic_batch(groups=["a"]))["accepted"] == 4
            assert client.stats()["rows"] == 4
            assert client.sample(1).column("group_id").unique().to_pylist() == ["a"]
    finally:
        assert handle.stop() == 0


@contextlib.contextmanager
def control_on_a_thread():
    """A ControlServer without keys served on a thread whose handler echoes the verb; yields
    (address, the requests the handler saw)."""
    server = ControlServer("127.0.0.1")
    seen, done = [], threading.Event()

    def handle(req):
        seen.append(req)
        return {"verb": req.verb}

    def serve():
        while not done.is_set():
            server.serve_pending(handle, timeout_ms=50)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield server.address, seen
    finally:
        done.set()
        thread.join()
        server.close()


@pytest.fixture
def control():
    with control_on_a_thread() as served:
        yield served


def test_control_with_keys_stops_only_for_the_job(keys):
    job, stranger = keys
    server = ControlServer("127.0.0.1", curve_keys_dir=job)
    seen, answers = [], []

    def send(keys_dir, timeout_s):
        try:
            answers.append(request(server.address, "stop", timeout_s=timeout_s, curve_keys_dir=keys_dir))
        except ConnectionError as err:
            answers.append(str(err))

    try:
        for outsider in (None, stranger):
            sender = threading.Thread(target=send, args=(outsider, REFUSED_WAIT_S))
            sender.start()
            server.serve_pending(seen.append, timeout_ms=int(REFUSED_WAIT_S * 1000))
            sender.join()
        assert seen == [] and all("did not answer" in a for a in answers)
        sender = threading.Thread(target=send, args=(job, 30))
        sender.start()
        server.serve_pending(lambda req: {"stopping": req.verb == "stop"}, timeout_ms=30_000)
        sender.join()
        assert answers[-1] == {"stopping": True}
    finally:
        server.close()


def _raw(address: str, payload: bytes) -> dict:
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send(payload)
        assert sock.poll(20_000), "no reply: the control endpoint stopped serving"
        return json.loads(sock.recv())
    finally:
        sock.close()


def test_control_answers_deeply_nested_json_and_keeps_serving(control):
    address, seen = control
    for payload in (b"[" * 30_000 + b"]" * 30_000, b'{"verb": ' + b"[" * 20_000, b"\xff\xfe"):
        reply = _raw(address, payload)
        assert reply["ok"] is False and "not JSON" in reply["error"]
    assert request(address, "status", timeout_s=20) == {"verb": "status"}
    assert [r.verb for r in seen] == ["status"]


@pytest.mark.parametrize(("verb", "count"), [
    ("scale_actors", 10**9), ("scale_actors", -1), ("scale_actors", 2.5), ("scale_actors", True),
    ("scale_learners", 0), ("scale_learners", "4"), ("scale_learners", None),
])
def test_control_refuses_scale_counts_out_of_bounds_without_calling_the_job(control, verb, count):
    address, seen = control
    reply = _raw(address, json.dumps({"verb": verb, "count": count}).encode())
    assert reply["ok"] is False and "count=" in reply["error"] and "must be an integer in" in reply["error"]
    assert seen == []
    assert request(address, verb, count=3, timeout_s=20) == {"verb": verb}


def test_the_stop_command_uses_the_keys_named_in_run_json(tmp_path, keys):
    import typer
    from typer.testing import CliRunner

    from async_rl.commands.job import stop
    from async_rl.job.runfolder import update_run_json

    app = typer.Typer()
    app.command()(stop)

    job, _ = keys
    server = ControlServer("127.0.0.1", curve_keys_dir=job)
    seen = []
    try:
        update_run_json(tmp_path, control_address=server.address, curve_keys_dir=job)
        result = {}
        cli = threading.Thread(target=lambda: result.update(r=CliRunner().invoke(app, [str(tmp_path)])))
        cli.start()
        server.serve_pending(lambda req: seen.append(req.verb) or {"stopping": True}, timeout_ms=30_000)
        cli.join()
        assert result["r"].exit_code == 0, result["r"].output
        assert "stop requested" in result["r"].output and seen == ["stop"]
    finally:
        server.close()


def test_the_buffer_cli_reads_a_keyed_live_buffer_with_the_keys_named_in_run_json(tmp_path, keys):
    from typer.testing import CliRunner

    from async_rl.commands.buffer import app as buffer_cli
    from async_rl.job.runfolder import update_run_json

    job, _ = keys
    handle = start_service(tmp_path / "buffer", BufferConfig(min_size_to_sample=1), max_staleness=4, curve_keys_dir=job)
    try:
        with BufferClient(handle.address, curve_keys_dir=job) as client:
            client.insert(synthetic_batch(groups=["a"]))
        update_run_json(tmp_path, curve_keys_dir=job)
        live = CliRunner().invoke(buffer_cli, ["stats", str(tmp_path), "--connect", handle.address, "--json"])
        assert live.exit_code == 0, live.output
        assert json.loads(live.output)["rows"] == 4
    finally:
        handle.stop()
