"""Code-reward sandbox throughput and start-up cost.

1. Programs checked per second — short programs with 16 stdin tests each, through a
   pebble pool — for the code reward (one jail per program, a forked child per test)
   against two naive runners in the same pool: a plain subprocess per test (no
   isolation at all) and a Firejail launch per test (same isolation, no harness).
2. Start-up cost per isolation level: wall-clock of checking a one-test program, against
   starting the bare system python.

    .venv/bin/python benchmarks/sandbox_bench.py [--quick]

Prints a table and writes benchmarks/results/sandbox_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from pebble import ProcessPool

from async_rl.config import RewardConfig
from async_rl.rewards import sandbox_levels as levels
from async_rl.rewards.code import score, warm_up
from async_rl.rewards.sandbox import SandboxLimits, run_program, select_isolation

RESULTS = Path(__file__).with_name("results") / "sandbox_bench.json"
PROGRAM = "a, b = map(int, input().split())\nprint(a + b)\n"
N_TESTS = 16
CFG = RewardConfig(
    timeout_s=30.0, code={"time_budget_s": 20.0, "test_timeout_s": 10.0}
)  # generous: the machine may be loaded


def ground_truth(seed: int) -> str:
    pairs = [(f"{seed} {i}\n", f"{seed + i}\n") for i in range(N_TESTS)]
    return json.dumps({"inputs": [p for p, _ in pairs], "outputs": [o for _, o in pairs]})


def response() -> str:
    return f"```python\n{PROGRAM}```"


def naive_check(truth: str, jailed: bool) -> float:
    """One subprocess per test, optionally each in its own Firejail; passed/total."""
    cases = json.loads(truth)
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=_base()))
    try:
        (workdir / "solution.py").write_text(PROGRAM)
        cmd = [levels.system_python(), "-I", "solution.py"]
        kwargs = {}
        if jailed:
            level, ident = select_isolation("firejail", CFG.code.sandbox_user)
            for path in (workdir, workdir / "solution.py"):
                os.chown(path, ident.uid, ident.gid) if ident.switches else None
            cmd = levels.command(level, workdir, _base(), ident)[:-1] + ["solution.py"]
            kwargs = (
                {"user": ident.uid, "group": ident.gid, "extra_groups": []}
                if ident.switches
                else {}
            )
        passed = 0
        for stdin, expected in zip(cases["inputs"], cases["outputs"], strict=True):
            run = subprocess.run(
                cmd, input=stdin, capture_output=True, text=True, timeout=CFG.code.test_timeout_s,
                cwd=workdir, env=dict(levels.SCRUBBED_ENV), start_new_session=True, **kwargs,
            )  # fmt: skip
            passed += run.stdout.strip() == expected.strip()
        return passed / len(cases["inputs"])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _base() -> Path:
    base = Path(tempfile.gettempdir()) / f"asyncrl-sandbox-{os.geteuid()}"
    base.mkdir(mode=0o711, exist_ok=True)
    return base


def reward_check(truth: str) -> float:
    return score(response(), truth, {}, CFG).score


def throughput(fn, args_list: list[tuple], workers: int) -> tuple[float, list[float]]:
    """Programs per second through a pebble pool (workers warmed up first)."""
    with ProcessPool(max_workers=workers, initializer=warm_up, initargs=(CFG,)) as pool:
        for f in [pool.schedule(fn, a) for a in args_list[:workers]]:
            f.result()
        start = time.perf_counter()
        scores = [f.result() for f in [pool.schedule(fn, a) for a in args_list]]
        elapsed = time.perf_counter() - start
    return len(args_list) / elapsed, scores


def startup_costs(reps: int) -> dict[str, float]:
    """Median wall-clock (ms) of checking a one-test program at each level."""
    costs = {
        "bare python3 (no sandbox, no harness)": _median_ms(
            lambda: subprocess.run([levels.system_python(), "-I", "-c", "pass"], check=True), reps
        )
    }
    limits = SandboxLimits.from_config(CFG)
    for level in levels.LEVELS:
        try:
            _, ident = select_isolation(level, CFG.code.sandbox_user)
        except levels.SandboxUnavailable as exc:
            costs[level] = float("nan")
            print(f"{level}: unavailable ({exc})")
            continue

        def once(level=level, ident=ident):
            run_program(
                PROGRAM,
                ["1 2\n"],
                mode="stdin",
                fn_name=None,
                limits=limits,
                level=level,
                ident=ident,
            )

        costs[level] = _median_ms(once, reps)
    return costs


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer programs and repetitions (< 1 min)"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    n_programs, reps = (12, 5) if args.quick else (48, 15)
    load_before = os.getloadavg()[0]
    truths = [ground_truth(seed) for seed in range(n_programs)]
    rows = {}
    for name, fn, extra in [
        ("code reward (firejail, one jail per program)", reward_check, ()),
        ("naive: subprocess per test, no isolation", naive_check, (False,)),
        ("naive: firejail per test", naive_check, (True,)),
    ]:
        rate, scores = throughput(fn, [(t, *extra) for t in truths], args.workers)
        assert all(s == 1.0 for s in scores), f"{name}: a correct program did not score 1.0"
        rows[name] = rate
    costs = startup_costs(reps)
    report(rows, costs, args, n_programs, load_before)


def report(rows: dict, costs: dict, args, n_programs: int, load_before: float) -> None:
    load_after = os.getloadavg()[0]
    contended = max(load_before, load_after) > (os.cpu_count() or 1) * 0.5
    print(
        f"\nPrograms checked per second ({n_programs} programs x {N_TESTS} stdin tests, pebble pool of {args.workers})"
    )
    print(f"{'runner':<48} {'programs/s':>10} {'tests/s':>9}")
    for name, rate in rows.items():
        print(f"{name:<48} {rate:>10.2f} {rate * N_TESTS:>9.1f}")
    print("\nStart-up cost: one 1-test program, median wall-clock")
    print(f"{'level':<48} {'ms':>10}")
    for name, ms in costs.items():
        print(f"{name:<48} {ms:>10.1f}")
    note = f"load average {load_before:.1f} -> {load_after:.1f} on {os.cpu_count()} cores"
    print(f"\n{note}{' (CONTENDED: other jobs share the machine)' if contended else ''}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "quick": args.quick, "workers": args.workers, "programs": n_programs, "tests_per_program": N_TESTS,
        "programs_per_s": rows, "startup_ms": costs, "load": note, "contended": contended,
    }, indent=2))  # fmt: skip
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
