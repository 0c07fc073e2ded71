"""`async-rl train --ray-address HOST:PORT` joins a Ray cluster started separately with
`ray start --head`, as on a real cluster (one node here), with Ray's default token auth on."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_job import BIN, JOB_ARGS, metrics

RAY = Path(sys.executable).with_name("ray")
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def user_env(tmp_path):
    """A user's shell on a node where `ray get-auth-token --generate` made the cluster's token
    (so `ray start --head` turns token authentication on); no RAY_AUTH_* variables set."""
    (tmp_path / "home").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path / "home")
    subprocess.run([str(RAY), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    return env


@pytest.fixture
def ray_head(tmp_path, user_env):
    """A Ray head in its own process group, stopped by its handle (SIGTERM drains, then kill)."""
    port = free_port()
    log = open(tmp_path / "ray-head.log", "w")  # noqa: SIM115
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", f"--port={port}", "--num-cpus=4",
         "--include-dashboard=false", "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=user_env,
    )
    try:
        yield port
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        log.close()


def test_train_joins_a_cluster_started_with_ray_start(ray_head, user_env, tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [str(BIN), "train", f"run.dir={run_dir}", "--ray-address", f"127.0.0.1:{ray_head}",
         *JOB_ARGS, "learner.max_steps=2", "learner.checkpoint.every=0"],
        capture_output=True, text=True, timeout=600, env=user_env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["ray_address"].endswith(f":{ray_head}")  # the head's GCS, not a private Ray
    assert [r["version"] for r in metrics(run_dir, "learner")][-1] == 2
    assert (run_dir / "final_model" / "config.json").is_file()
    head_log = (tmp_path / "ray-head.log").read_text()
    assert "Token authentication is enabled" in head_log  # the client had to authenticate
