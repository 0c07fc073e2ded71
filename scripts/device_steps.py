"""The GPU check's steps (scripts/device_check.py runs each in its own process, with a limit).

Each step is ``run(log, work)``: it measures on the GPU, adds figures and checks to ``log``
as it goes (so a step stopped at its limit still reports what it had) and raises on failure.
The measuring is the project's own code: the learner, the logprob and weight benchmarks.

* :func:`gpu_tests`: the ``gpu``-marked tests;
* :func:`learner`: one DeepSpeed rank over NCCL, a Qwen2-0.5B-shaped model built here, GPPO
  steps on synthetic trajectories in bf16 at ZeRO 1/2/3 against the same steps in fp32;
  checkpoint, reload, one more step, compared bit for bit with the uninterrupted run;
* :func:`logprobs`: the fused logprob path at vocab 151,936 and 8k–32k tokens, peak memory and
  time against the naive path (benchmarks/logprob_bench.py's workers, on cuda);
* :func:`weights`: weights published from CUDA tensors to a subscriber process over tcp and
  over /dev/shm, 1 and 4 GB: GB/s and the stall the learner sees (benchmarks/weights_bench.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_MARK = "pytest.mark.gpu"
GIB = 1 << 30
GB = 1e9


# ----------------------------------------------------------------------------- step records


class StepLog:
    """What one step has measured so far, in its JSON file (re-read before each write, since
    the step's rank process and the step process both write it, one after the other)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> dict:
        if self.path.is_file():
            return json.loads(self.path.read_text())
        return {"figures": {}, "checks": {}, "error": None}

    def _update(self, change: Callable[[dict], None]) -> None:
        data = self.read()
        change(data)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(data, indent=1, default=str))

    def add(self, key: str, value) -> None:
        self._update(lambda d: d["figures"].__setitem__(key, value))

    def check(self, name: str, passed: bool) -> None:
        self._update(lambda d: d["checks"].__setitem__(name, bool(passed)))

    def fail(self, error: BaseException) -> None:
        """Record ``error`` unless an earlier one is recorded (the first is the cause)."""
        text = "".join(traceback.format_exception_only(type(error), error)).strip()
        self._update(lambda d: d.__setitem__("error", d.get("error") or text))

    @contextlib.contextmanager
    def recording(self):
        try:
            yield self
        except BaseException as err:
            self.fail(err)
            raise


# ----------------------------------------------------------------------------- step 1: gpu tests


def gpu_test_files() -> list[Path]:
    return sorted(p for p in (ROOT / "tests").rglob("test_*.py") if GPU_MARK in p.read_text())


def gpu_tests(log: StepLog, work: Path) -> None:
    """The ``gpu``-marked tests, with pytest from the carried wheels."""
    files = [str(p.relative_to(ROOT)) for p in gpu_test_files()]
    junit = log.path.with_suffix(".xml")
    log.add("files", files)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", f"--junitxml={junit}", *files],
        cwd=ROOT,
    )
    counts = junit_counts(junit)
    log.add("tests", counts)
    log.check("every gpu test passed", done.returncode == 0 and counts["tests"] > 0 and counts["passed"] == counts["tests"])


def junit_counts(path: Path) -> dict[str, int]:
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if path.is_file():
        for suite in ET.parse(path).getroot().iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


# ----------------------------------------------------------------------------- step 2: learner

# Qwen2.5-0.5B's shape (494M parameters, Qwen's 151,936-token vocabulary), random weights.
QWEN2_0_5B = dict(
    vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32_768,
    rope_theta=1_000_000.0, tie_word_embeddings=True,
)
# buffer.testing.synthetic_batch draws token ids below this.
SYNTHETIC_VOCAB = 32_000
# bf16 against fp32 after a few steps: bf16 keeps 8 mantissa bits (0.4 %), compounded over
# the layers; larger gaps mean a dtype bug, not rounding.
BF16_GRAD_NORM_RTOL = 0.05
BF16_LOSS_ATOL = 0.02
# ZeRO 1/2/3 in the same dtype differ only in summation order.
ZERO_STAGE_RTOL = 0.01


@dataclass(frozen=True)
class LearnerPlan:
    """The learner step's sizes: ``steps`` GPPO steps of ``groups × group_size`` responses."""

    shape: dict
    groups: int = 4
    group_size: int = 4
    prompt_len: int = 128
    response_len: int = 384
    steps: int = 3
    micro_batch_tokens: int = 4096
    backend: str = "nccl"
    low_precision: str = "bfloat16"
    stages: tuple[int, ...] = (1, 2, 3)
    lr: float = 1e-5

    @property
    def tokens_per_step(self) -> int:
        return self.groups * self.group_size * (self.prompt_len + self.response_len)


PLANS = {
    "gpu": LearnerPlan(QWEN2_0_5B),
    # The same code on CPU in about a minute (gloo, fp32 twice): for trying the step here.
    "cpu-smoke": LearnerPlan(
        dict(QWEN2_0_5B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=SYNTHETIC_VOCAB),
        groups=2, group_size=2, prompt_len=8, response_len=16, backend="gloo", low_precision="float32",
    ),
}


def learner(log: StepLog, work: Path, plan: str = "gpu") -> None:
    """One learner rank (``learners.launch``), which writes its figures into ``log``."""
    from learners.launch import launch

    # cuBLAS is deterministic only with a fixed workspace (read when CUDA starts).
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    launch("device_steps:learner_rank", 1, {"log": str(log.path), "work": str(work), "plan": plan}, env=env)


def learner_rank(payload: dict) -> None:
    """The rank: fp32 reference, the low-precision runs at each ZeRO stage (the last one saves
    a checkpoint before its last step), then a fresh engine resumes it and repeats that step."""
    import torch

    log, plan, work = StepLog(Path(payload["log"])), PLANS[payload["plan"]], Path(payload["work"])
    with log.recording():
        torch.use_deterministic_algorithms(True, warn_only=True)
        model = build_model(plan, work / "model")
        tables = [device_batch(plan, step) for step in range(plan.steps)]
        log.add("plan", {**asdict(plan), "parameters": count_parameters(model), "deterministic_algorithms": True})
        reference, _ = train(model, plan, "float32", 1, tables)
        log.add("reference_float32_zero1", reference)
        runs, root = {}, work / "ckpt"
        for stage in plan.stages:
            resume_stage = stage == plan.stages[-1]
            runs[stage], states = train(model, plan, plan.low_precision, stage, tables,
                                        checkpoint_root=root if resume_stage else None)
            log.add(f"{plan.low_precision}_zero{stage}", runs[stage])
        judge_runs(log, plan, reference, runs)
        print_runs(plan, {"reference float32 zero1": reference, **{f"{plan.low_precision} zero{k}": v for k, v in runs.items()}})
        resumed = resume_and_step(model, plan, plan.stages[-1], tables, root, states)
        log.add("resume", resumed)
        log.check("reload restores fp32 masters and Adam moments bit for bit", resumed["reload_bit_identical"])
        log.check("resumed step bit-identical to the uninterrupted run", resumed["step_bit_identical"])


def build_model(plan: LearnerPlan, out_dir: Path) -> Path:
    """A random Qwen2 of ``plan.shape`` in HF format (seed 0), built on the GPU when there is one."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(Qwen2Config(**plan.shape))
    model.save_pretrained(str(out_dir))
    return out_dir


def count_parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in model_dir.glob("*.safetensors"):  # one file, or shards
        with safe_open(str(path), "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def device_batch(plan: LearnerPlan, step: int):
    """Trajectories for learner step ``step`` (all tokens at policy version ``step``), with
    behaviour logprobs of a uniform policy, −log V: what a random-init model's tokens have, so
    the importance weights start near 1 as in training."""
    import numpy as np
    import pyarrow as pa

    from buffer.testing import synthetic_batch

    if plan.shape["vocab_size"] < SYNTHETIC_VOCAB:
        raise ValueError(f"vocab_size={plan.shape['vocab_size']}: synthetic tokens reach {SYNTHETIC_VOCAB}")
    batch = synthetic_batch(
        groups=[f"step{step}-g{g}" for g in range(plan.groups)], group_size=plan.group_size, version=step,
        prompt_len=plan.prompt_len, response_len=plan.response_len, seed=step,
    )
    table = pa.Table.from_batches([batch])
    index = table.schema.get_field_index("behavior_logprobs")
    lists = table.column(index).combine_chunks()
    uniform = np.full(len(lists.values), -math.log(plan.shape["vocab_size"]), np.float32)
    return table.set_column(index, table.schema.field(index), pa.ListArray.from_arrays(lists.offsets, uniform))


def make_trainer(model_dir: Path, plan: LearnerPlan, dtype: str, stage: int):
    from async_rl.config import AlgorithmConfig, LearnerConfig
    from learners.engine import LearnerEngine
    from learners.trainer import Trainer

    cfg = LearnerConfig(zero_stage=stage, backend=plan.backend, optimizer={"lr": plan.lr},
                        batch={"micro_batch_tokens": plan.micro_batch_tokens}, max_steps=plan.steps)
    engine = LearnerEngine(model_dir, cfg, dtype=dtype)
    return Trainer(engine, AlgorithmConfig(), max_staleness=plan.steps, micro_batch_tokens=cfg.batch.micro_batch_tokens)


def train(model_dir: Path, plan: LearnerPlan, dtype: str, stage: int, tables, *,
          checkpoint_root: Path | None = None) -> tuple[dict, dict]:
    """(figures, states) of ``plan.steps`` GPPO steps on a fresh engine, released after. With
    ``checkpoint_root`` a checkpoint is saved before the last step, and ``states`` holds the
    portable state (fp32 masters and Adam moments) at the save and at the end."""
    import torch

    from learners import checkpoint

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.monotonic()
    trainer = make_trainer(model_dir, plan, dtype, stage)
    out, states = {"init_s": time.monotonic() - start, "loss": [], "grad_norm": [], "applied": [], "step_s": []}, {}
    for step, table in enumerate(tables):
        if checkpoint_root is not None and step == len(tables) - 1:
            start = time.monotonic()
            states["saved"] = checkpoint.portable_tensors(trainer.engine)
            checkpoint.save(trainer.engine, checkpoint_root, version=trainer.policy_version, keep=1)
            out["checkpoint_s"] = time.monotonic() - start
            out["checkpoint_gib"] = sum(p.stat().st_size for p in checkpoint_root.rglob("*") if p.is_file()) / GIB
        metrics = timed_step(trainer, table, step, out)
    out["tokens_per_s"] = plan.tokens_per_step / min(out["step_s"])
    if checkpoint_root is not None:
        states["end"] = checkpoint.portable_tensors(trainer.engine)
        states["end_metrics"] = metrics
    if cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    del trainer
    release_memory()
    return out, states


def timed_step(trainer, table, step: int, out: dict) -> dict:
    """One train step; appends its loss, grad norm, applied flag and seconds to ``out``."""
    start = time.monotonic()
    metrics = trainer.train_step(table, step)
    out["step_s"].append(time.monotonic() - start)
    out["loss"].append(metrics["loss"])
    out["grad_norm"].append(metrics["grad_norm"])
    out["applied"].append(metrics["optimizer_steps"] == 1.0)
    return metrics


def release_memory() -> None:
    """Collect a dropped engine (DeepSpeed holds reference cycles) and return its GPU memory."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def judge_runs(log: StepLog, plan: LearnerPlan, reference: dict, runs: dict[int, dict]) -> None:
    """Gaps of each low-precision run to fp32 and between ZeRO stages, and their checks."""
    gaps = {stage: gap(reference, run) for stage, run in runs.items()}
    first = min(runs)
    stage_gaps = {stage: gap(runs[first], run) for stage, run in runs.items() if stage != first}
    log.add(f"{plan.low_precision}_vs_float32", gaps)
    log.add(f"zero_stages_vs_zero{first}", stage_gaps)
    log.check("every step applied", all(all(r["applied"]) for r in [reference, *runs.values()]))
    log.check(f"{plan.low_precision} within tolerance of float32", all(
        g["grad_norm_rel"] <= BF16_GRAD_NORM_RTOL and g["loss_abs"] <= BF16_LOSS_ATOL for g in gaps.values()
    ))
    log.check("ZeRO stages agree", all(g["grad_norm_rel"] <= ZERO_STAGE_RTOL for g in stage_gaps.values()))


def print_runs(plan: LearnerPlan, runs: dict[str, dict]) -> None:
    from benchmarks._common import print_table

    rows = [[name, " ".join(f"{x:.4f}" for x in r["loss"]), " ".join(f"{x:.4f}" for x in r["grad_norm"]),
             min(r["step_s"]), r["tokens_per_s"], r.get("peak_gib", 0.0), r["init_s"]] for name, r in runs.items()]
    print_table(f"learner: Qwen2 {plan.shape['hidden_size']}x{plan.shape['num_hidden_layers']}, "
                f"{plan.tokens_per_step} tokens/step, 1 rank over {plan.backend}",
                ["run", "loss per step", "grad norm per step", "step s", "tokens/s", "peak GiB", "init s"], rows)


def gap(reference: dict, other: dict) -> dict:
    """Largest per-step gap in loss (absolute) and gradient norm (relative)."""
    pairs = list(zip(reference["loss"], other["loss"], strict=True))
    norms = list(zip(reference["grad_norm"], other["grad_norm"], strict=True))
    return {
        "loss_abs": max(abs(a - b) for a, b in pairs),
        "grad_norm_rel": max(abs(a - b) / max(abs(a), 1e-12) for a, b in norms),
    }


def resume_and_step(model_dir: Path, plan: LearnerPlan, stage: int, tables, root: Path, states: dict) -> dict:
    """A fresh engine resumes the checkpoint: its state is compared with the one saved, then it
    takes the last step, compared with the uninterrupted run; then it resumes and steps again,
    compared with itself (which tells nondeterministic kernels from a resume that misses state)."""
    from learners import checkpoint

    trainer = make_trainer(model_dir, plan, plan.low_precision, stage)
    last = len(tables) - 1
    state = checkpoint.resume(trainer.engine, root)
    trainer.policy_version = state.version
    reloaded = checkpoint.portable_tensors(trainer.engine)
    out = {"stage": stage, "resumed_version": state.version, "reload_bit_identical": identical(reloaded, states["saved"]),
           "reload_max_abs_diff": max_abs_diff(reloaded, states["saved"])}
    del reloaded
    metrics = trainer.train_step(tables[last], last)
    after = checkpoint.portable_tensors(trainer.engine)
    out.update(step_bit_identical=identical(after, states["end"]), step_max_abs_diff=max_abs_diff(after, states["end"]),
               loss=[states["end_metrics"]["loss"], metrics["loss"]],
               grad_norm=[states["end_metrics"]["grad_norm"], metrics["grad_norm"]])
    checkpoint.resume(trainer.engine, root)
    trainer.policy_version = state.version
    trainer.train_step(tables[last], last)
    again = checkpoint.portable_tensors(trainer.engine)
    out.update(repeat_bit_identical=identical(again, after), repeat_max_abs_diff=max_abs_diff(again, after))
    del trainer
    release_memory()
    return out


def identical(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def max_abs_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ----------------------------------------------------------------------------- step 3: logprobs

# Hidden size and chunk of benchmarks/RESULTS.md's CPU rows, so the GPU rows compare.
LOGPROB_HIDDEN = 1024
LOGPROB_CHUNK = 1024
LOGPROB_VOCAB = 151_936
# The ends first: a step stopped at its limit still has 8k and 32k.
LOGPROB_TOKENS = (8192, 32768, 16384)
# fp32 chunked/fused against naive: summation order only.
LOGPROB_RTOL = 1e-4


def logprobs(log: StepLog, work: Path, *, tokens=LOGPROB_TOKENS, hidden=LOGPROB_HIDDEN,
             vocab=LOGPROB_VOCAB, chunk=LOGPROB_CHUNK, device="cuda") -> None:
    """benchmarks/logprob_bench.py's measurement (its ``worker``) of the naive, chunked and
    fused paths, train and forward, at each token count. All rows run in this process: on CUDA
    the peak is the caching allocator's, reset before each row (the benchmark's process per
    row is for CPU RSS), and no row pays a process and CUDA start."""
    from benchmarks import logprob_bench as bench

    for count in tokens:
        args = argparse.Namespace(tokens=count, hidden=hidden, vocab=vocab, chunks=[chunk], entropy=False,
                                  threads=os.cpu_count() or 1, device=device)
        rows = []
        for mode in ("train", "forward"):
            for variant, size in bench.variants(args, mode):
                rows.append({"variant": variant, "mode": mode, "chunk": size,
                             **measure_logprobs(bench, args, variant, mode, size)})
                log.add(f"{count}_tokens", rows)
        judge_logprobs(log, bench, rows, f"{count} tokens, hidden {hidden}, vocab {vocab}, {device}")


def measure_logprobs(bench, args: argparse.Namespace, variant: str, mode: str, chunk: int) -> dict:
    """One row of the benchmark; a CUDA out-of-memory is a result (the naive path's, at 32k)."""
    import gc

    import torch

    try:
        return bench.worker(argparse.Namespace(**vars(args), variant=variant, mode=mode, chunk=chunk))
    except torch.OutOfMemoryError as err:
        return {"error": f"OutOfMemoryError: {str(err).splitlines()[0]}"}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def judge_logprobs(log: StepLog, bench, rows: list[dict], label: str) -> None:
    """The fused path's peak and time over naive's, and values against naive."""
    count = label.split()[0]
    if any("error" in r for r in rows):
        log.check(f"{count} tokens: every variant ran", False)
        return
    print(f"\nlogprobs, {label}:\n{bench.table(rows)}", flush=True)
    naive = {r["mode"]: r for r in rows if r["variant"] == "naive"}
    fused = next(r for r in rows if r["variant"] == "fused")
    log.add(f"{count}_tokens_fused_over_naive", {
        "peak": fused["peak_extra_bytes"] / naive["train"]["peak_extra_bytes"],
        "time": fused["seconds"] / naive["train"]["seconds"],
    })
    log.check(f"{count} tokens: fused peak below naive", fused["peak_extra_bytes"] < naive["train"]["peak_extra_bytes"])
    log.check(f"{count} tokens: values match naive",
              all(bench.relative_gap(r, naive[r["mode"]]) <= LOGPROB_RTOL for r in rows))


# ----------------------------------------------------------------------------- step 4: weights

WEIGHT_SIZES_GB = (1, 4)
WEIGHT_REPEATS = 3
WEIGHT_CHUNK_BYTES = 4 << 20


def weights(log: StepLog, work: Path, *, sizes_gb=WEIGHT_SIZES_GB, device="cuda", repeats=WEIGHT_REPEATS) -> None:
    """Publish ``device`` tensors to one subscriber process over tcp and over /dev/shm with
    benchmarks/weights_bench.py: end-to-end GB/s and the learner-side stall of ``publish``."""
    from async_rl.config import WeightsConfig
    from benchmarks import weights_bench as bench

    cfg = WeightsConfig(chunk_bytes=WEIGHT_CHUNK_BYTES, credit_chunks=32, transport="tcp")
    for size_gb in sizes_gb:
        nbytes = int(size_gb * GB)
        tensors = [(name, tensor.to(device)) for name, tensor in bench.make_payload(nbytes)]
        log.add(f"{size_gb:g}GB device_to_host_copy", with_rate(bench.bench_memcpy(tensors, repeats), size_gb))
        for transport in ("tcp", "shm"):
            key = f"{size_gb:g}GB {transport}"
            # the tensors' host copies: up to 3 send buffers and 1 receive buffer (shm: 3 files)
            if not bench.fits(nbytes, 4, shm_copies=3 if transport == "shm" else 0):
                log.add(key, {"skipped": "not enough free memory or /dev/shm space"})
                continue
            transport_cfg = cfg.model_copy(update={"transport": transport})
            log.add(key, with_rate(bench.bench_zmq(tensors, 1, transport_cfg, repeats), size_gb))
        del tensors
    figures = log.read()["figures"]
    print_weights(device, figures)
    log.check("a publish reached the subscriber", any("publish_stall_s" in v for v in figures.values()))


def print_weights(device: str, figures: dict[str, dict]) -> None:
    from benchmarks._common import print_table

    rows = [[key.split()[0], key.split()[1], r["gb_per_s"], r["seconds"], r.get("publish_stall_s", "-"), r["cold_s"]]
            for key, r in figures.items() if "seconds" in r]
    print_table(f"weights published from {device} tensors to 1 subscriber", ["size", "path", "GB/s", "seconds",
                                                                            "stall s", "cold s"], rows)


def with_rate(result: dict, size_gb: float) -> dict:
    return {**result, "gb_per_s": size_gb / result["seconds"]}
