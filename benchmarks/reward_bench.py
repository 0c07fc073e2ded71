"""Math reward throughput: verifications/s through the pebble pool vs math-verify in-process.

    python benchmarks/reward_bench.py [--quick] [--workers N]

The pool pays for inter-process transfer but isolates hangs and crashes and scales with
workers; the direct call is the single-core ceiling and has no timeout protection outside a
main thread. Both score the same mix of responses (equivalent forms, wrong answers, garbage).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, write_result  # noqa: E402

from async_rl.config import RewardConfig  # noqa: E402
from async_rl.rewards.pool import RewardPool, score_direct  # noqa: E402

MIX = [
    ("<think>\n12+34 = 46\n</think>\n\\boxed{46}", "46"),
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}"),
    ("\\boxed{45}", "46"),
    ("the answer is 1,234", "1234"),
    ("\\boxed{\\{1, 2\\}}", "\\{2,1\\}"),
    ("no answer at all", "7"),
    ("<think>17-9 = 8\n8+3 = 11\n</think>\n\\boxed{11}", "11"),
]


def run_direct(items, cfg) -> float:
    start = time.perf_counter()
    for response, truth in items:
        score_direct("math", response, truth, None, cfg)
    return len(items) / (time.perf_counter() - start)


def run_pool(items, cfg) -> float:
    with RewardPool(cfg) as pool:
        pool.score_many([("math", r, t, None) for r, t in items[: cfg.workers * 4]])  # warm workers
        start = time.perf_counter()
        pool.score_many([("math", r, t, None) for r, t in items])
        return len(items) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a run under a minute")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    n = 400 if args.quick else 4000
    items = [MIX[i % len(MIX)] for i in range(n)]
    cfg = RewardConfig(workers=args.workers, timeout_s=5.0)
    score_direct("math", *MIX[0], None, cfg)  # import math-verify before timing
    direct = run_direct(items, cfg)
    pooled = run_pool(items, cfg)
    rows = [
        ["math-verify in-process (baseline)", n, direct, 1.0],
        [f"RewardPool, {args.workers} workers", n, pooled, pooled / direct],
    ]
    print_table("Math reward verifications per second", ["path", "calls", "verif/s", "vs baseline"], rows)
    write_result(
        "reward_bench",
        {"quick": args.quick, "calls": n, "workers": args.workers, "direct_per_s": direct, "pool_per_s": pooled},
    )


if __name__ == "__main__":
    main()
