"""Supervised fine-tuning on prompt/response rows with the same DeepSpeed engine.

Rows are the verl/Klear format with a ``response`` (``async_rl.tasks.dataset``). A row is
tokenised as the actors' prompt (:func:`async_rl.tasks.encoding.encode_prompt`: chat template
with the generation prompt) followed by the response and the end-of-turn token. The loss,
:func:`sft_objective`, is the token-mean NLL of the response tokens over the whole optimizer
batch on all ranks (the same global normaliser as the RL objectives); the micro-batches
(``learner.batch.micro_batch_tokens``) go through the same :func:`learners.engine.accumulate_and_step`
as an RL step.

``run_sft`` is what the job and ``async-rl sft`` call: it starts ``learner.ranks`` processes
with :mod:`learners.launch`; each runs :func:`sft_rank`, and rank 0 writes the HF export.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from async_rl.config import Config
from async_rl.tasks.encoding import encode_prompt
from learners.advantages import sft_nll
from learners.packing import build_micro_batch, empty_micro_batch, input_length, plan_micro_batches

# Rank 0 prints a progress line at most this often.
PROGRESS_EVERY_S = 10.0


@dataclass(frozen=True)
class SFTExample:
    prompt_tokens: np.ndarray  # [P] int64, P >= 1
    response_tokens: np.ndarray  # [T] int64, T >= 1, ends with the end-of-turn token


def encode_rows(rows, tokenizer, *, max_len: int) -> list[SFTExample]:
    """The actors' prompt ids + response + EOS; rows that do not fit ``max_len`` are cut at
    the end of the response (the prompt is always kept whole)."""
    out = []
    for row in rows:
        prompt = encode_prompt(tokenizer, row.messages)
        response = tokenizer(row.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        response = response[: max(1, max_len - len(prompt))]
        out.append(SFTExample(np.asarray(prompt, np.int64), np.asarray(response, np.int64)))
    return out


def sft_objective(logp: Tensor, global_tokens: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """One micro-batch's SFT loss: the token-mean NLL −Σ logp / N of its response tokens.

    logp: [N_mb] fp32 logprobs of the micro-batch's response tokens (flat); global_tokens: 0-d,
    N = the response tokens of the whole optimizer batch on all ranks, so the micro-batch losses
    sum to the batch's NLL. Returns (loss, metrics); the NLL itself is reported by the step.
    """
    return sft_nll(logp, torch.ones_like(logp, dtype=torch.bool), global_tokens), {}


class SFTTrainer:
    """Token-mean NLL steps on a :class:`learners.engine.LearnerEngine`. Every rank passes the
    same batch; each trains its share (see ``learners.trainer``)."""

    def __init__(self, engine, *, micro_batch_tokens: int):
        self.engine = engine
        self.micro_batch_tokens = micro_batch_tokens

    def train_step(self, batch: list[SFTExample]) -> dict[str, float]:
        """One optimizer step. Metrics: ``nll`` (the batch's, all ranks), ``nonfinite_micro_batches``,
        ``grad_norm``, ``lr`` and ``applied`` (0.0 when the engine refused a non-finite step)."""
        # The engine module imports DeepSpeed: only the ranks need it, not the launching process.
        from learners.engine import accumulate_and_step, to_host

        prompts = [ex.prompt_tokens for ex in batch]
        responses = [ex.response_tokens for ex in batch]
        lengths = [input_length(len(p), len(r)) for p, r in zip(prompts, responses, strict=True)]
        plan = plan_micro_batches(list(range(len(batch))), lengths, self.micro_batch_tokens, self.engine.dist.world_size)
        global_tokens = torch.tensor(float(sum(len(r) for r in responses)), device=self.engine.device)
        layout = self.engine.cfg.batch.micro_batch_layout
        if layout == "shared_prompt":  # SFT rows are no groups: each prompt has one response
            layout = "padded"

        def micro_loss(rows: list[int]) -> tuple[Tensor, dict[str, Tensor]]:
            mb = build_micro_batch(rows, prompts, responses, layout) if rows else empty_micro_batch()
            mb = mb.to(self.engine.device)
            logp, _ = self.engine.forward(*mb.model_inputs(), 1.0, False)
            if not rows:  # a filler micro-batch: same collectives, zero gradient
                return logp.sum() * 0.0, {}
            return sft_objective(logp, global_tokens)

        step = accumulate_and_step(self.engine, plan[self.engine.dist.rank], micro_loss)
        return to_host({
            "nll": step.loss, "nonfinite_micro_batches": step.nonfinite_micro_batches,
            "grad_norm": step.result.grad_norm, "lr": step.result.lr, "applied": float(step.result.applied),
        })


def batches(n: int, batch_size: int, epochs: float, seed: int) -> list[list[int]]:
    """Row indices per optimizer step: a fresh shuffle each epoch, ``epochs`` may be fractional."""
    steps_per_epoch = math.ceil(n / batch_size)
    total = max(1, round(epochs * steps_per_epoch))
    out: list[list[int]] = []
    epoch = 0
    while len(out) < total:
        order = list(range(n))
        random.Random(f"{seed}/{epoch}").shuffle(order)
        out += [order[i : i + batch_size] for i in range(0, n, batch_size)]
        epoch += 1
    return out[:total]


def sft_rank(payload: dict) -> None:
    """Rank entry point (``learners.launch``): train on the rows, then export (rank 0 writes)."""
    from transformers import AutoTokenizer

    from async_rl.records import SFTLaunch
    from async_rl.tasks.dataset import load_rows
    from learners.checkpoint import export_hf
    from learners.engine import LearnerEngine

    spec = SFTLaunch.model_validate(payload)
    cfg = spec.learner
    rows, _ = load_rows(spec.data, require_response=True)
    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    examples = encode_rows(rows, tokenizer, max_len=spec.max_len)
    plan = batches(len(examples), cfg.sft.batch_size, spec.epochs, spec.seed)
    engine = LearnerEngine(spec.model_dir, cfg, dtype=spec.dtype, total_steps=len(plan),
                           optimizer_cfg=cfg.sft_optimizer)
    trainer = SFTTrainer(engine, micro_batch_tokens=cfg.batch.micro_batch_tokens)
    history = run_steps(trainer, examples, plan, engine.dist.rank == 0)
    export_hf(engine, spec.out_dir)
    if engine.dist.rank == 0:
        (spec.out_dir / "sft_metrics.json").write_text(json.dumps(history))


def run_steps(trainer: SFTTrainer, examples: list[SFTExample], plan: list[list[int]], verbose: bool) -> list[dict]:
    history, last_print, start = [], 0.0, time.monotonic()
    for step, rows in enumerate(plan, start=1):
        metrics = trainer.train_step([examples[i] for i in rows])
        history.append({"step": step, **metrics})
        now = time.monotonic()
        if verbose and (now - last_print > PROGRESS_EVERY_S or step == len(plan)):
            print(f"sft: step {step}/{len(plan)} nll {metrics['nll']:.4f} lr {metrics['lr']:.2e} "
                  f"({now - start:.0f} s)", flush=True)
            last_print = now
    return history


def sft_launch(cfg: Config, *, model_dir: Path, data: Path, out_dir: Path, epochs: float | None = None):
    """The ranks' ``SFTLaunch``; ``learner.sft.epochs`` unless ``epochs`` is given (> 0)."""
    from async_rl.records import SFTLaunch

    epochs = cfg.learner.sft.epochs if epochs is None else epochs
    if epochs <= 0:
        raise ValueError(f"learner.sft.epochs={epochs}: must be > 0 to run SFT")
    return SFTLaunch(learner=cfg.learner, model_dir=model_dir, data=data, out_dir=out_dir,
                     max_len=cfg.model.max_model_len, epochs=epochs, seed=cfg.run.seed, dtype=cfg.model.dtype)


def run_sft(cfg: Config, *, model_dir: Path, data: Path, out_dir: Path, console=None, epochs: float | None = None) -> Path:
    """SFT ``model_dir`` on ``data`` with ``learner.ranks`` ranks; the HF export goes to ``out_dir``."""
    from learners.launch import launch

    spec = sft_launch(cfg, model_dir=model_dir, data=data, out_dir=out_dir, epochs=epochs)
    launch("learners.sft:sft_rank", cfg.learner.ranks, spec.model_dump(mode="json"))
    if console is not None:
        console.print(f"sft: model written to {out_dir}")
    return Path(out_dir)
