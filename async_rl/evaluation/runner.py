"""Sampling through the vLLM actor engine and scoring through the reward pool.

``evaluate_problems`` is the core: it needs only an engine (``await generate(ids, n=)``) and a
``Scoring`` (the reward pool's ``submit_for``), and rolls out each problem as one group with
``actors.group.rollout_group``, the same call the actors make. ``run_eval`` is the standalone path
behind ``async-rl eval``: it plans the context (prompt lengths, ``max_tokens``, RoPE scaling),
starts an engine with the evaluation sampling settings, evaluates every benchmark, and shuts
everything down (engine, its loop thread, reward workers) whatever happens.

Every prompt is submitted at once: vLLM's continuous batching keeps the batch full and
schedules by free KV cache, and each finished prompt's n responses go to the reward workers
while the rest still generate.
"""

from __future__ import annotations

import asyncio
import json
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from async_rl.config import ActorsConfig, ModelConfig, RewardConfig
from async_rl.evaluation.benchmarks import Benchmark, Problem, with_instruction
from async_rl.evaluation.metrics import ProblemResult, SampleResult, response_digest, summarize
from async_rl.records import EVAL_RESULT_FORMAT, BenchmarkResult, EvalResult

RESULT_FORMAT = EVAL_RESULT_FORMAT
# DeepSeek-R1's evaluation length; the default when the context allows it.
R1_MAX_TOKENS = 32_768
# RoPE types whose factor extends the usable context (as in actors/engine.rope_overrides).
CONTEXT_EXTENDING_ROPE = ("yarn", "longrope", "llama3", "linear", "dynamic")


class EvalInputError(ValueError):
    """Evaluation input that cannot work (too long for the context, bad RoPE spec …)."""


@dataclass(frozen=True)
class EvalSettings:
    """Sampling and engine settings of one evaluation (DeepSeek-R1 convention by default)."""

    n: int = 64
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    max_tokens: int | None = None  # None: R1's 32768, or what the context leaves
    seed: int | None = 0
    instruction: str | None = None
    dtype: str | None = None  # None: bfloat16 on a GPU, float32 on CPU (vLLM-CPU's fast path)
    max_model_len: int | None = None  # None: longest prompt + max_tokens
    rope_scaling: dict | None = None
    kv_cache_gib: float = 4.0
    gpu_memory_utilization: float = 0.9
    multiprocess_engine: bool = False
    reward_workers: int = 2
    reward_timeout_s: float = 10.0


@dataclass(frozen=True)
class Plan:
    """Prompts tokenised and the context sized: what the engine is started with."""

    prompts: list[list[list[int]]]  # per benchmark, per problem: prompt token ids
    max_tokens: int
    max_model_len: int
    context_limit: int


def parse_rope_scaling(spec: str | None, model_dir: Path) -> dict | None:
    """``yarn:2.5`` (or a JSON object) → the HF ``rope_scaling`` dict for this model."""
    if not spec:
        return None
    if spec.lstrip().startswith("{"):
        try:
            scaling = json.loads(spec)
        except json.JSONDecodeError as err:
            raise EvalInputError(f"--rope-scaling {spec!r}: invalid JSON ({err.msg})") from None
    else:
        kind, _, factor = spec.partition(":")
        try:
            scaling = {"rope_type": kind.strip(), "factor": float(factor)}
        except ValueError:
            raise EvalInputError(f"--rope-scaling {spec!r}: expected TYPE:FACTOR, e.g. yarn:2.5") from None
    if not isinstance(scaling, dict) or not scaling.get("rope_type") or not scaling.get("factor", 1) > 0:
        raise EvalInputError(f"--rope-scaling {spec!r}: expected TYPE:FACTOR with FACTOR > 0, e.g. yarn:2.5")
    hf_config = json.loads((model_dir / "config.json").read_text())
    scaling.setdefault("original_max_position_embeddings", hf_config.get("max_position_embeddings"))
    return scaling


def context_limit(model_dir: Path, rope_scaling: dict | None) -> int:
    """Longest prompt + response the model serves (its positions, times a RoPE extension)."""
    hf_config = json.loads((model_dir / "config.json").read_text())
    positions = int(hf_config.get("max_position_embeddings") or R1_MAX_TOKENS)
    if rope_scaling and rope_scaling.get("rope_type") in CONTEXT_EXTENDING_ROPE:
        original = int(rope_scaling.get("original_max_position_embeddings") or positions)
        return int(math.ceil(original * float(rope_scaling["factor"])))
    return positions


def plan(model_dir: Path, benchmarks: Sequence[Benchmark], settings: EvalSettings, tokenizer) -> Plan:
    """Tokenise every prompt and size ``max_tokens`` / ``max_model_len`` against the context."""
    from actors.prompts import encode_prompt

    prompts = [
        [encode_prompt(tokenizer, with_instruction(p.messages, settings.instruction)) for p in b.problems]
        for b in benchmarks
    ]
    longest = max(len(ids) for per in prompts for ids in per)
    limit = settings.max_model_len or context_limit(model_dir, settings.rope_scaling)
    room = limit - longest
    if room < 1:
        raise EvalInputError(f"the longest prompt has {longest} tokens: no room left in the {limit}-token context")
    max_tokens = settings.max_tokens or min(R1_MAX_TOKENS, room)
    if max_tokens > room:
        raise EvalInputError(
            f"--max-tokens {max_tokens} + the longest prompt ({longest} tokens) exceeds the "
            f"model's {limit}-token context; lower --max-tokens or extend it with --rope-scaling yarn:FACTOR"
        )
    return Plan(prompts, max_tokens, settings.max_model_len or longest + max_tokens, limit)


def request_seed(seed: int | None, *, on_gpu: bool) -> int | None:
    """The per-request sampling seed the engine may use.

    vLLM-CPU 0.32 crashes the engine ("CPU Generator does not use offset") when a seeded
    request is prefilled in chunks — certain with n=64 copies of a long prompt — because it
    rewinds the request's generator, which CPU generators cannot do. On CPU requests are
    therefore unseeded (``--seed`` does not apply; the result file records ``request_seed``).
    """
    return seed if on_gpu else None


def engine_configs(settings: EvalSettings, plan_: Plan, *, on_gpu: bool) -> tuple[ActorsConfig, ModelConfig]:
    """The actor-engine config sections for evaluation sampling."""
    actors = ActorsConfig(
        n_samples_per_prompt=settings.n, temperature=settings.temperature, top_p=settings.top_p,
        top_k=settings.top_k, max_tokens=plan_.max_tokens, seed=request_seed(settings.seed, on_gpu=on_gpu),
        enforce_eager=not on_gpu,  # CUDA graphs pay off over thousands of decode steps
        kv_cache_gib=settings.kv_cache_gib, gpu_memory_utilization=settings.gpu_memory_utilization,
        multiprocess_engine=settings.multiprocess_engine,
    )
    dtype = settings.dtype or ("bfloat16" if on_gpu else "float32")
    model = ModelConfig(dtype=dtype, max_model_len=plan_.max_model_len,
                        rope_scaling=settings.rope_scaling)
    return actors, model


async def evaluate_problems(
    engine, scoring, problems: Sequence[Problem], prompts: Sequence[Sequence[int]], *, n: int,
    on_done: Callable[[ProblemResult], None] | None = None, sampling: dict | None = None,
) -> list[ProblemResult]:
    """Sample ``n`` responses per problem on ``engine`` and score each (``scoring``: an
    ``actors.group.Scoring``; a reward call that fails or hangs scores as a failure record).

    ``prompts[i]`` are the token ids of ``problems[i]``; results come back in problem order.
    ``sampling`` is passed to ``engine.generate`` as keyword arguments, for an engine that
    takes per-call overrides (a training actor's engine samples with the rollout settings).
    """
    from actors.group import rollout_group

    async def one(problem: Problem, ids: Sequence[int]) -> ProblemResult:
        group = await rollout_group(engine, scoring, ids, data_source=problem.data_source, truth=problem.answer,
                                    extra_info=problem.extra_info, n=n, **(sampling or {}))
        result = ProblemResult(problem.problem_id, problem.answer, [
            SampleResult(len(s.token_ids), s.finish_reason, r.status, r.parsed, r.correct,
                         (min(s.versions), max(s.versions)) if s.versions else None,
                         response_digest(s.token_ids))
            for s, r in zip(group.samples, group.rewards, strict=True)
        ])
        if on_done is not None:
            on_done(result)
        return result

    return list(await asyncio.gather(*(one(p, ids) for p, ids in zip(problems, prompts, strict=True))))


def plan_for_model(model_dir: Path, benchmarks: Sequence[Benchmark], settings: EvalSettings) -> Plan:
    """``plan`` with the model's own tokenizer (checks the input before any engine starts)."""
    from transformers import AutoTokenizer

    return plan(model_dir, benchmarks, settings, AutoTokenizer.from_pretrained(str(model_dir)))


def run_eval(
    model_dir: Path, benchmarks: Sequence[Benchmark], settings: EvalSettings, ks: Sequence[int], *,
    plan_: Plan | None = None,
    on_start: Callable[[Plan], None] | None = None,
    on_done: Callable[[ProblemResult], None] | None = None,
) -> dict:
    """Evaluate ``model_dir`` on ``benchmarks``; returns the result document (see ``report``)."""
    import torch

    from actors.aio import BackgroundLoop
    from actors.engine import VllmEngine
    from actors.group import Scoring
    from async_rl.rewards.pool import RewardPool

    plan_ = plan_ or plan_for_model(model_dir, benchmarks, settings)
    actors, model = engine_configs(settings, plan_, on_gpu=torch.cuda.is_available())
    if on_start is not None:
        on_start(plan_)
    reward_cfg = RewardConfig(correct=1.0, wrong=0.0, workers=settings.reward_workers,
                              timeout_s=settings.reward_timeout_s)
    kinds = tuple(sorted({reward_cfg.reward_for(p.data_source) for b in benchmarks for p in b.problems}))
    start = time.monotonic()
    loop = BackgroundLoop(name="eval-loop")
    engine = None
    try:
        with tempfile.TemporaryDirectory(prefix="async-rl-eval-") as work, RewardPool(reward_cfg, kinds=kinds) as pool:
            engine = loop.run(VllmEngine.start(model_dir, actors, model, work_dir=work))
            ready = time.monotonic()
            scoring = Scoring.of(pool, reward_cfg)
            per_benchmark = loop.run(_all_benchmarks(engine, scoring, benchmarks, plan_, settings.n, on_done))
    finally:
        if engine is not None:
            engine.shutdown()
        loop.close()
    document = result_document(model_dir, benchmarks, per_benchmark, settings, plan_, ks,
                               time.monotonic() - start, dtype=model.dtype, request_seed=actors.seed)
    document["engine_start_s"] = ready - start
    return document


def votes_on(benchmark: Benchmark, rewards: RewardConfig | None = None) -> bool:
    """Majority voting needs comparable final answers: math yes, code (whole programs) no."""
    rewards = rewards or RewardConfig()
    return all(rewards.reward_for(p.data_source) == "math" for p in benchmark.problems)


async def _all_benchmarks(engine, scoring, benchmarks, plan_: Plan, n: int, on_done) -> list[list[ProblemResult]]:
    # One gather over every benchmark keeps the batch full across benchmark boundaries.
    return list(await asyncio.gather(*(
        evaluate_problems(engine, scoring, b.problems, ids, n=n, on_done=on_done)
        for b, ids in zip(benchmarks, plan_.prompts, strict=True)
    )))


def result_document(
    model_dir: Path, benchmarks: Sequence[Benchmark], per_benchmark: Sequence[Sequence[ProblemResult]],
    settings: EvalSettings, plan_: Plan, ks: Sequence[int], elapsed_s: float, *, dtype: str | None = None,
    request_seed: int | None = None,
) -> dict:
    """The JSON-ready result: settings, per-benchmark numbers and per-problem rows; built as an
    ``EvalResult`` record, so a misspelt or missing key fails here, naming it."""
    tokens = sum(s.tokens for results in per_benchmark for r in results for s in r.samples)
    used = {**asdict(settings), "max_tokens": plan_.max_tokens, "max_model_len": plan_.max_model_len,
            "dtype": dtype or settings.dtype, "request_seed": request_seed}
    return EvalResult(
        format=RESULT_FORMAT,
        model=str(model_dir),
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
        settings=used,
        ks=list(ks),
        elapsed_s=elapsed_s,
        generated_tokens=tokens,
        benchmarks=[
            BenchmarkResult.model_validate({"name": b.name, "file": b.path, "answer_field": b.answer_field,
                                            **summarize(results, ks, vote=votes_on(b))})
            for b, results in zip(benchmarks, per_benchmark, strict=True)
        ],
    ).document()
