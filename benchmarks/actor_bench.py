"""Actor throughput and weight-apply latency on the tiny model.

Generated tokens/s of the vLLM actor (AsyncLLM, continuous batching, all prompts submitted
at once) against the baseline ``transformers.generate`` (one padded batch, same prompts,
same sampling settings, same max_tokens), and the time to apply a full weight set in flight
(verified set in hand → serving new weights), with requests running.

    python benchmarks/actor_bench.py            # 64 prompts × 64 tokens, 5 updates
    python benchmarks/actor_bench.py --quick    # 16 prompts × 32 tokens, 3 updates (< 1 min warm)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from benchmarks._common import machine, print_table, write_result  # noqa: E402

QUESTIONS = "What is {a}+{b}? Put the final answer in \\boxed{{}}."


def prompts(tokenizer, n: int) -> list[list[int]]:
    from actors.prompts import encode_prompt

    return [encode_prompt(tokenizer, [{"role": "user", "content": QUESTIONS.format(a=i, b=3 * i + 1)}])
            for i in range(n)]


def bench_transformers(model_dir: Path, prompt_ids: list[list[int]], max_tokens: int) -> dict:
    """One left-padded batch through ``generate``; every row runs to ``max_tokens`` (vLLM counts
    the tokens it actually generated, so an early EOS there only lowers its token count)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    width = max(len(p) for p in prompt_ids)
    ids = torch.zeros(len(prompt_ids), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                             max_new_tokens=max_tokens, min_new_tokens=max_tokens, pad_token_id=0)
    seconds = time.perf_counter() - start
    tokens = (out.shape[1] - width) * len(prompt_ids)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


async def bench_vllm(engine, prompt_ids: list[list[int]]) -> dict:
    start = time.perf_counter()
    groups = await asyncio.gather(*(engine.generate(p, n=1) for p in prompt_ids))
    seconds = time.perf_counter() - start
    tokens = sum(len(s.token_ids) for g in groups for s in g)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


async def bench_updates(engine, weight_sets, prompt_ids, updates: int) -> dict:
    """Apply alternating weight sets while the prompts generate; per-update timings."""
    running = [asyncio.ensure_future(engine.generate(p, n=1)) for p in prompt_ids]
    await asyncio.sleep(0.2)
    reports = []
    for i in range(updates):
        reports.append(await engine.update_weights(engine.version + 1, weight_sets[i % 2]))
    results = await asyncio.gather(*running)
    spanning = sum(len(set(s.versions)) > 1 for g in results for s in g)
    total = [r.total_s * 1e3 for r in reports]
    paused = [r.paused_s * 1e3 for r in reports]
    return {"updates": updates, "total_ms_median": statistics.median(total), "total_ms_max": max(total),
            "paused_ms_median": statistics.median(paused), "staged_ms_median": statistics.median(
                [r.staged_s * 1e3 for r in reports]), "requests_spanning_updates": spanning,
            "requests_completed": sum(len(g) for g in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n_prompts, max_tokens, updates = (16, 32, 3) if args.quick else (64, 64, 5)

    from actors.aio import BackgroundLoop
    from actors.engine import VllmEngine
    from async_rl.config import ActorsConfig, ModelConfig
    from async_rl.model import build_tiny_model

    load_before = machine()["load_1min"]
    with tempfile.TemporaryDirectory(prefix="actor-bench-") as tmp:
        seed0 = build_tiny_model(Path(tmp) / "m0", seed=0)
        seed1 = build_tiny_model(Path(tmp) / "m1", seed=1)
        weight_sets = [list(load_file(str(m / "model.safetensors")).items()) for m in (seed1, seed0)]
        cfg = ActorsConfig(max_tokens=max_tokens, temperature=1.0, n_samples_per_prompt=1, stop=[])
        loop = BackgroundLoop()
        started = time.perf_counter()
        engine = loop.run(VllmEngine.start(seed0, cfg, ModelConfig(max_model_len=256), work_dir=Path(tmp) / "w"))
        start_s = time.perf_counter() - started
        try:
            ids = prompts(engine.tokenizer, n_prompts)
            loop.run(bench_vllm(engine, ids[:4]))  # warm-up
            vllm = loop.run(bench_vllm(engine, ids))
            update = loop.run(bench_updates(engine, weight_sets, ids, updates))
        finally:
            engine.shutdown()
            loop.close()
        hf = bench_transformers(seed0, ids, max_tokens)

    rows = [
        ["vLLM AsyncLLM (in-process engine)", n_prompts, vllm["tokens"], vllm["seconds"], vllm["tokens_per_s"]],
        ["transformers.generate (one batch)", n_prompts, hf["tokens"], hf["seconds"], hf["tokens_per_s"]],
    ]
    print_table(f"Actor generation, tiny model, {max_tokens} new tokens/prompt, fp32 CPU",
                ["engine", "prompts", "tokens", "seconds", "tokens/s"], rows)
    print_table("In-flight weight update (full set, requests running)",
                ["updates", "total ms (median)", "total ms (max)", "paused ms (median)", "staged ms (median)",
                 "requests spanning updates"],
                [[update["updates"], update["total_ms_median"], update["total_ms_max"], update["paused_ms_median"],
                  update["staged_ms_median"], update["requests_spanning_updates"]]])
    contended = max(load_before or 0, machine()["load_1min"] or 0) > (machine()["cpus"] or 1)
    print(f"\nengine start {start_s:.1f} s; speedup {vllm['tokens_per_s'] / hf['tokens_per_s']:.2f}x"
          + ("; taken under CPU contention (load above core count)" if contended else ""))
    write_result("actor_bench_quick" if args.quick else "actor_bench", {
        "quick": args.quick, "prompts": n_prompts, "max_tokens": max_tokens, "engine_start_s": start_s,
        "vllm": vllm, "transformers": hf, "speedup": vllm["tokens_per_s"] / hf["tokens_per_s"],
        "weight_update": update, "load_1min_before": load_before, "contended": contended,
    })


if __name__ == "__main__":
    main()
