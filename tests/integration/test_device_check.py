"""The GPU check (scripts/device_check.sh) as far as a CPU machine can run it: the dry run
end to end, the wheel list against the project, the step runner's limits and failures, and
the learner step's trajectories."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import device_check  # noqa: E402
import device_steps  # noqa: E402
import device_wheels  # noqa: E402

STEP_NAMES = ["gpu_tests", "learner", "logprobs", "weights"]


def test_dry_run_skips_every_step_and_finds_the_wheel_list_and_imports_complete(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", "scripts/device_check.sh", "--dry-run", str(out)], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "PYTHON": sys.executable}, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "device_check.json").read_text())
    assert report["mode"] == "dry-run" and report["schema"] == device_check.SCHEMA_VERSION
    assert list(report["steps"]) == STEP_NAMES
    for name, step in report["steps"].items():
        assert step == {"status": "skipped: no GPU", "limit_s": device_check.STEPS[name].limit_s, "seconds": 0.0,
                        "figures": {}, "checks": {}, "error": None, "imports": "ok"}, name
    pins = {name: str(version) for name, version in device_wheels.read_pins().items()}
    assert report["wheels"] == {"pins": pins, "problems": []}
    assert {"deepspeed", "pyzmq", "pydantic", "pydantic-core", "pebble", "math-verify",
            "antlr4-python3-runtime", "pytest"} <= set(pins)
    assert report["preflight"]["uncarried_imports"] == []
    assert report["preflight"]["machine"]["cuda_available"] is torch.cuda.is_available()
    log = (out / "device_check.log").read_text()
    assert "device_check: weights: skipped: no GPU" in log and "device_check: exit 0" in log


def test_wheel_list_flags_a_pin_outside_the_project_and_a_dependency_left_behind():
    pins = device_wheels.read_pins()
    assert device_wheels.list_problems(pins) == []

    old_pydantic = {**pins, "pydantic": device_wheels.Version("1.10.0")}
    assert "pydantic==1.10.0 does not satisfy the project's pydantic<3,>=2.10" in device_wheels.list_problems(old_pydantic)

    no_antlr = {k: v for k, v in pins.items() if k != "antlr4-python3-runtime"}
    assert any(p.startswith("latex2sympy2-extended requires antlr4-python3-runtime")
               for p in device_wheels.list_problems(no_antlr))

    no_zmq = {k: v for k, v in pins.items() if k != "pyzmq"}
    assert device_wheels.list_problems(no_zmq) == [
        "pyzmq: a project dependency neither pinned, on the GPU image, nor in device_wheels.NOT_CARRIED"
    ]


def test_wheel_folder_must_hold_one_installable_wheel_per_pin(tmp_path):
    pins = device_wheels.read_pins()
    for name, version in pins.items():
        (tmp_path / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(b"")
    assert device_wheels.folder_problems(tmp_path, pins)[0] == []

    (tmp_path / f"pyzmq-{pins['pyzmq']}-py3-none-any.whl").unlink()
    (tmp_path / f"pyzmq-{pins['pyzmq']}-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    (tmp_path / "einops-0.8.2-py3-none-any.whl").unlink()
    (tmp_path / "ray-2.60.0-py3-none-any.whl").write_bytes(b"")
    with open(tmp_path / f"hjson-{pins['hjson']}-py3-none-any.whl", "wb") as f:
        f.truncate(device_wheels.MAX_TOTAL_BYTES + 1)
    problems, sizes = device_wheels.folder_problems(tmp_path, pins)
    assert sorted(problems) == sorted([
        f"pyzmq-{pins['pyzmq']}-cp311-cp311-manylinux_2_28_x86_64.whl: no tag installs on CPython 3.12 manylinux x86-64",
        "ray-2.60.0-py3-none-any.whl: not in the list (pinned: None)",
        f"einops=={pins['einops']}: no wheel in {tmp_path}",
        "32.0 MiB of wheels: over the 32 MiB budget",
    ])
    assert len(sizes) == len(pins)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def step_command(body: str) -> list[str]:
    """A stand-in step process: ``body`` runs with ``log``, a StepLog on sys.argv[1]."""
    prelude = f"import sys, subprocess, time\nsys.path.insert(0, {str(ROOT / 'scripts')!r})\n" \
              "from device_steps import StepLog\nlog = StepLog(sys.argv[1])\n"
    return [sys.executable, "-c", prelude + textwrap.dedent(body)]


def test_a_step_past_its_limit_is_killed_with_its_children_and_keeps_what_it_recorded(tmp_path):
    path = tmp_path / "steps" / "slow.json"
    command = step_command("""
        child = subprocess.Popen(["sleep", "120"])
        log.add("pids", [child.pid, __import__("os").getpid()])
        log.add("first", 1.5)
        time.sleep(120)
    """) + [str(path)]
    # room for a Python start on a loaded machine before the limit
    result = device_check.run_step(command, path, limit_s=15)
    assert result["status"] == "timed out" and result["error"] == "stopped at its 15 s limit"
    assert result["figures"]["first"] == 1.5
    # SIGKILL is delivered at once, but a loaded kernel may take a moment to tear the process down
    assert not any(alive(pid) for pid in gone_within(result["figures"]["pids"], 10.0))


def gone_within(pids: list[int], timeout_s: float) -> list[int]:
    """The pids still alive after up to ``timeout_s`` of waiting for them to die."""
    deadline = time.monotonic() + timeout_s
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return pids


def test_a_failing_step_records_its_first_error_and_a_failed_check_fails_the_step(tmp_path):
    path = tmp_path / "steps" / "bad.json"
    raising = step_command("""
        with log.recording():
            log.add("before", 2)
            raise RuntimeError("CUDA error: out of memory")
    """) + [str(path)]
    result = device_check.run_step(raising, path, limit_s=60)
    assert result["status"] == "failed" and result["error"] == "RuntimeError: CUDA error: out of memory"
    assert result["figures"] == {"before": 2}

    checked = step_command("""
        log.check("fused peak below naive", True)
        log.check("values match naive", False)
    """) + [str(path)]
    result = device_check.run_step(checked, path, limit_s=60)
    assert result["status"] == "failed" and result["error"] == "checks failed: values match naive"


def test_gpu_test_counts_come_from_the_junit_report(tmp_path):
    report = tmp_path / "gpu_tests.xml"
    report.write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1"/></testsuites>')
    assert device_steps.junit_counts(report) == {"tests": 3, "failures": 1, "errors": 0, "skipped": 1, "passed": 1}
    assert [p.name for p in device_steps.gpu_test_files()] == ["test_learner_gpu.py"]


def test_learner_batches_are_on_policy_with_uniform_behavior_logprobs():
    plan = device_steps.PLANS["gpu"]
    table = device_steps.device_batch(plan, 2)
    assert table.num_rows == plan.groups * plan.group_size
    assert {len(r) for r in table.column("prompt_tokens").to_pylist()} == {plan.prompt_len}
    responses = table.column("response_tokens").to_pylist()
    assert {len(r) for r in responses} == {plan.response_len}
    assert max(max(r) for r in responses) < plan.shape["vocab_size"]
    assert {v for r in table.column("token_versions").to_pylist() for v in r} == {2}
    logprobs = np.concatenate(table.column("behavior_logprobs").to_pylist())
    assert logprobs.shape == (plan.groups * plan.group_size * plan.response_len,)
    np.testing.assert_allclose(logprobs, -math.log(151_936), rtol=1e-6)
    assert plan.tokens_per_step == 8192
