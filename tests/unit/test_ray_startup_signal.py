"""A SIGTERM or Ctrl-C while ``ray.init`` runs (it installs ``sys.exit`` as the SIGTERM handler)
must leave nothing of Ray running: ``ray.shutdown()`` alone leaves the agents the raylet spawned.
Each check runs in a child interpreter, since the helper kills every process its caller started
(here the test session's own engine and Ray would be among them)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str) -> dict:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_driver_interrupted_while_ray_starts_kills_what_it_started_and_exits():
    out = _run("""
        import json, subprocess, sys, time
        import ray
        from async_rl.config import ClusterConfig
        from async_rl.job import placement

        # Stands in for Ray's start-up: a child (the raylet) with a child of its own (an agent).
        raylet = subprocess.Popen([sys.executable, "-c",
            "import subprocess, sys, time; subprocess.Popen(['sleep', '20']); time.sleep(20)"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # this test reads our stdout
        time.sleep(1.0)
        import psutil
        tree = [raylet.pid] + [p.pid for p in psutil.Process(raylet.pid).children()]

        def interrupted_init(**kwargs):
            raise SystemExit(15)  # what ray.init's own SIGTERM handler raises

        ray.init = interrupted_init
        try:
            placement.init_ray(ClusterConfig())
            exited = None
        except SystemExit as err:
            exited = err.code
        try:
            raylet.wait(5)
        except subprocess.TimeoutExpired:
            pass  # still running: the assertion below names it
        print(json.dumps({"exited": exited, "tree": tree}))
    """)
    assert out["exited"] == 15  # the interrupt still ends the driver
    assert len(out["tree"]) == 2
    alive = [pid for pid in out["tree"] if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert alive == []
