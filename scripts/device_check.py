"""The GPU check (issue #20): one prepared run that proves the CUDA path on one GPU.

    scripts/device_check.sh OUTDIR             # on the GPU machine: ≤ 8 minutes
    scripts/device_check.sh --dry-run OUTDIR   # anywhere, in seconds: pins, imports, report

The steps (gpu_tests, learner, logprobs, weights) are in device_steps.py. Each runs in its own
process group under its own time limit, so a hung NCCL or CUDA call costs that step only; a
failed step records its error and the next one runs. Before them a preflight process imports
every step's modules and describes the machine. This process needs only the standard library.

OUTDIR/device_check.json: ``mode``, ``wheels``, ``preflight`` (machine, versions, per-step
imports, imported distributions nobody carries) and ``steps``: ``{name: {status, limit_s,
seconds, imports, figures, checks, error}}``. ``status`` is "ok", "failed", "timed out", or
"skipped: no GPU" (the dry run, or no CUDA). A step rewrites OUTDIR/steps/<name>.json as it
measures, so one stopped at its limit still reports what it had.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
for _path in (str(ROOT), str(SCRIPTS)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import device_steps  # noqa: E402
from device_steps import StepLog  # noqa: E402

SCHEMA_VERSION = 1
SKIPPED = "skipped: no GPU"
# The whole check fits the 8 minutes a device call leaves after the machine starts.
TOTAL_LIMIT_S = 450.0
PREFLIGHT_LIMIT_S = 60.0
# A step given less than this is skipped rather than started.
MIN_STEP_S = 20.0
# Distributions imported only when present, by the module named, which runs without them.
OPTIONAL_IMPORTS = {
    "cloudpickle": "torch.utils.data", "dill": "torch.utils.data",
    "pillow": "transformers.utils.import_utils", "sniffio": "httpcore (huggingface-hub's HTTP client)",
}
GIB = 1 << 30


# ----------------------------------------------------------------------------- the steps


@dataclass(frozen=True)
class Step:
    """One part of the check: ``run(log, work)`` in its own process within ``limit_s``;
    ``modules`` are what it imports (a path: a test file, imported from its folder)."""

    run: Callable[[StepLog, Path], None]
    limit_s: float
    modules: tuple[str, ...] = field(default=())


# Limits: estimates for one H200 (none measured yet) with about 2x headroom; TOTAL_LIMIT_S
# caps their sum.
STEPS = {
    "gpu_tests": Step(device_steps.gpu_tests, 90, ("pytest", "pytest_timeout", *map(str, device_steps.gpu_test_files()))),
    "learner": Step(device_steps.learner, 180, ("learners.launch", "learners.engine", "learners.trainer",
                                                "learners.checkpoint", "buffer.testing", "transformers")),
    "logprobs": Step(device_steps.logprobs, 90, ("benchmarks.logprob_bench", "learners.logprobs")),
    "weights": Step(device_steps.weights, 100, ("benchmarks.weights_bench", "async_rl.weights", "async_rl.config")),
}


def step_main(name: str, out: Path) -> int:
    """In a step's own process: run it, recording a failure before re-raising it."""
    log = StepLog(out / "steps" / f"{name}.json")
    work = Path(tempfile.mkdtemp(prefix=f"device-check-{name}-"))
    try:
        with log.recording():
            STEPS[name].run(log, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def run_step(command: list[str], log_path: Path, limit_s: float) -> dict:
    """Run one step's process within ``limit_s`` (its process group is killed at the limit)
    and read what it recorded."""
    log_path.unlink(missing_ok=True)
    start = time.monotonic()
    proc = subprocess.Popen(command, cwd=ROOT, start_new_session=True)
    try:
        code, timed_out = proc.wait(timeout=limit_s), False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group we created: the step and its children
        code, timed_out = proc.wait(), True
    recorded = StepLog(log_path).read()
    checks, error = recorded["checks"], recorded.get("error")
    if timed_out:
        status, error = "timed out", error or f"stopped at its {limit_s:.0f} s limit"
    elif code != 0:
        status, error = "failed", error or f"exited with code {code}"
    elif not all(checks.values()):
        status, error = "failed", "checks failed: " + "; ".join(k for k, v in checks.items() if not v)
    else:
        status = "ok"
    return {"status": status, "limit_s": limit_s, "seconds": round(time.monotonic() - start, 1),
            "figures": recorded["figures"], "checks": checks, "error": error}


# ----------------------------------------------------------------------------- preflight


def import_entry(entry: str) -> None:
    if entry.endswith(".py"):
        path = Path(entry)
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))  # as pytest's rootdir-relative import does
        importlib.import_module(path.stem)
    else:
        importlib.import_module(entry)


def preflight() -> dict:
    """Import every step's modules (this machine's Python and packages), then describe the
    machine and list the imported distributions that are neither carried nor on the image."""
    imports = {}
    for name, step in STEPS.items():
        try:
            for entry in step.modules:
                import_entry(entry)
            imports[name] = "ok"
        except Exception as err:
            imports[name] = f"{type(err).__name__}: {err}"
    report = {"imports": imports, "machine": {}, "uncarried_imports": []}
    try:
        report["machine"] = machine()
        report["uncarried_imports"] = uncarried_imports()
    except Exception as err:  # recorded: the report says what is missing, the steps skip
        report["error"] = f"{type(err).__name__}: {err}"
    return report


def uncarried_imports() -> list[str]:
    """Distributions of the modules imported so far that the GPU machine would lack."""
    import importlib.metadata as md

    import device_wheels
    from packaging.utils import canonicalize_name

    by_module = md.packages_distributions()
    used = {canonicalize_name(d) for top in {m.split(".")[0] for m in sys.modules} for d in by_module.get(top, [])}
    known = set(device_wheels.read_pins()) | device_wheels.image_closure() | set(OPTIONAL_IMPORTS) | {"async-rl"}
    return sorted(used - known)


def machine() -> dict:
    import importlib.metadata as md

    import torch

    shm = os.statvfs("/dev/shm") if os.path.isdir("/dev/shm") else None
    info = {
        "python": platform.python_version(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "dev_shm_free_gib": shm.f_bavail * shm.f_frsize / GIB if shm else None,
    }
    for dist in ("deepspeed", "transformers", "pyzmq", "pydantic"):
        with contextlib.suppress(md.PackageNotFoundError):
            info[dist] = md.version(dist)
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / GIB, gpus=torch.cuda.device_count(),
                    nccl=".".join(map(str, torch.cuda.nccl.version())))
    return info


# ----------------------------------------------------------------------------- the whole check


def run_preflight(out: Path) -> dict:
    path = out / "preflight.json"
    path.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--preflight", str(path)]
    try:
        subprocess.run(command, cwd=ROOT, timeout=PREFLIGHT_LIMIT_S, check=True)
        return json.loads(path.read_text())
    except (subprocess.SubprocessError, OSError, ValueError) as err:
        return {"error": f"{type(err).__name__}: {err}", "imports": {}, "machine": {}, "uncarried_imports": []}


def wheels_report(dry_run: bool) -> dict:
    """Dry run: the list against the project. On the GPU machine: the carried folder against
    the list (a failure here is recorded: the steps still run)."""
    try:
        import device_wheels

        pins = {name: str(version) for name, version in device_wheels.read_pins().items()}
        if dry_run:
            return {"pins": pins, "problems": device_wheels.list_problems()}
        problems, sizes = device_wheels.folder_problems(ROOT / ".device-wheels")
        return {"pins": pins, "problems": problems, "bytes": sum(size for _, size in sizes)}
    except Exception as err:
        return {"pins": {}, "problems": [f"{type(err).__name__}: {err}"]}


def check(out: Path, *, dry_run: bool, only: list[str] | None = None) -> int:
    """The whole check into ``out``; exit code 0 when everything it ran passed."""
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + TOTAL_LIMIT_S
    report: dict = {"schema": SCHEMA_VERSION, "mode": "dry-run" if dry_run else "gpu",
                    "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "limit_s": TOTAL_LIMIT_S}
    report["wheels"] = wheels_report(dry_run)
    report["preflight"] = run_preflight(out)
    gpu = not dry_run and report["preflight"]["machine"].get("cuda_available", False)
    report["steps"] = {}
    for name, step in STEPS.items():
        entry = {"status": SKIPPED, "limit_s": step.limit_s, "seconds": 0.0, "figures": {}, "checks": {}, "error": None}
        left = deadline - time.monotonic()
        if gpu and (only is None or name in only):
            if left < MIN_STEP_S:
                entry.update(status="skipped: no time left")
            else:
                print(f"device_check: step {name} (limit {min(step.limit_s, left):.0f} s)", flush=True)
                command = [sys.executable, __file__, "--step", name, str(out)]
                entry = run_step(command, out / "steps" / f"{name}.json", min(step.limit_s, left))
        elif gpu:
            entry.update(status="skipped: not selected")
        entry["imports"] = report["preflight"]["imports"].get(name, "not imported")
        report["steps"][name] = entry
        write_report(out, report)
        print(f"device_check: {name}: {entry['status']}" + (f" ({entry['error']})" if entry["error"] else ""), flush=True)
    report["seconds"] = round(TOTAL_LIMIT_S - (deadline - time.monotonic()), 1)
    write_report(out, report)
    return 0 if passed(report) else 1


def passed(report: dict) -> bool:
    """Dry run: the list resolves, every step imports, nothing imported is left uncarried.
    On the GPU: the carried folder matches the list and every selected step is ok (an
    uncarried import there is reported, and would have failed its step)."""
    pre, dry = report["preflight"], report["mode"] == "dry-run"
    ready = not report["wheels"]["problems"] and not pre.get("error") and all(
        status == "ok" for status in pre["imports"].values()
    ) and not (dry and pre["uncarried_imports"])
    wanted = {"ok", "skipped: not selected"} | ({SKIPPED} if dry else set())
    return ready and all(step["status"] in wanted for step in report["steps"].values())


def write_report(out: Path, report: dict) -> None:
    (out / "device_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output folder (device_check.json; the .sh adds the log)")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: check pins and imports, skip every step")
    parser.add_argument("--only", help=f"comma-separated steps to run (of {', '.join(STEPS)})")
    parser.add_argument("--step", choices=list(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--preflight", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:
        return step_main(args.step, args.out)
    if args.preflight:
        args.out.write_text(json.dumps(preflight(), indent=1, default=str))
        return 0
    only = args.only.split(",") if args.only else None
    unknown = sorted(set(only or []) - set(STEPS))
    if unknown:
        parser.error(f"--only {args.only}: unknown step(s) {', '.join(unknown)}; steps: {', '.join(STEPS)}")
    return check(args.out, dry_run=args.dry_run, only=only)


if __name__ == "__main__":
    sys.exit(main())
