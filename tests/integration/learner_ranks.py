"""Shared pieces of the learner integration tests: a small model, synthetic trajectory
tables, and the rank scenarios that ``learners.launch`` runs in real DeepSpeed processes.

A scenario runs on every rank, writes what it observed (weights as safetensors, numbers as
JSON) under ``payload["out"]``, and the pytest process asserts on those files.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

VOCAB = 128
# Every tensor is partitioned under ZeRO-3 (DeepSpeed keeps small ones whole by default).
SHARD_EVERYTHING = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}


def make_model(out_dir: Path, seed: int = 0) -> Path:
    """A 2-layer Qwen2 (hidden 64, vocab 128, tied embeddings) saved in HF format."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, eos_token_id=1, pad_token_id=0, bos_token_id=0,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(str(out_dir))
    return Path(out_dir)


def make_table(
    *, seed: int, groups: int = 4, group_size: int = 4, version: int = 0, nan_reward: bool = False
) -> pa.Table:
    """Trajectory rows (DESIGN §3.1 columns) with varied lengths, rewards and versions."""
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(groups):
        prompt = rng.integers(2, VOCAB, size=int(rng.integers(3, 9))).tolist()
        for k in range(group_size):
            n = int(rng.integers(2, 12))
            reward = float(rng.integers(0, 2)) if k else 1.0 - float(g % 2)
            rows.append({
                "traj_id": f"t{seed}-{g}-{k}",
                "group_id": f"g{seed}-{g}",
                "group_size": group_size,
                "prompt_id": f"p{g}",
                "data_source": "test",
                "prompt_tokens": prompt,
                "response_tokens": rng.integers(2, VOCAB, size=n).tolist(),
                "behavior_logprobs": (-rng.uniform(3.5, 6.0, size=n)).astype(np.float32).tolist(),
                "token_versions": [max(0, version - int(rng.integers(0, 2)))] * n,
                "reward": float("nan") if nan_reward and g == 0 and k == 0 else reward,
                "correct": reward == 1.0,
                "reward_info": "{}",
                "finish_reason": "stop",
                "actor_id": "a0",
                "created_at": dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
                "times_sampled": 0,
            })
    return pa.Table.from_pylist(rows)


def learner_config(zero_stage: int, *, fused_logprobs: bool = True, **overrides):
    from async_rl.config import LearnerConfig

    optimizer = dict(lr=1e-3, weight_decay=0.1, grad_clip=1.0, warmup_steps=2, lr_schedule="cosine")
    batch = dict(micro_batch_tokens=48, logprob_chunk_tokens=16, fused_logprobs=fused_logprobs)
    return LearnerConfig(zero_stage=zero_stage, max_steps=10, optimizer=optimizer, batch=batch, **overrides)


def build_trainer(model_dir: Path, zero_stage: int, *, mini_batches: int = 1, algorithm: dict | None = None,
                  **overrides):
    from async_rl.config import AlgorithmConfig
    from learners.engine import LearnerEngine
    from learners.trainer import Trainer

    cfg = learner_config(zero_stage, **overrides)
    engine = LearnerEngine(model_dir, cfg, ds_overrides=SHARD_EVERYTHING if zero_stage == 3 else None)
    return Trainer(engine, AlgorithmConfig.model_validate(algorithm or {}), max_staleness=4,
                   mini_batches=mini_batches, micro_batch_tokens=cfg.batch.micro_batch_tokens)


def save_weights(trainer, path: Path) -> None:
    from safetensors.torch import save_file

    weights = dict(trainer.weights_for_publishing())
    if trainer.engine.dist.rank == 0:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(path))


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True))


# ----------------------------------------------------------------------------- scenarios

TABLE_A = dict(seed=0, version=0)
# Objectives stepped with learner.batch.fused_logprobs on and off (the default one is the reference).
FUSED_CASES = {
    "gppo": {},
    "cispo_entropy": {"loss": {"type": "cispo"}, "entropy_coef": 0.05, "aggregation": "seq-mean-token-mean"},
}
TABLE_B = dict(seed=1, version=1)
CURSOR = {"buffer_cursor": {"segment": 3, "offset": 17}}


def multi_rank_scenario(payload: dict) -> None:
    """On every rank of a 2-rank group: one step at each ZeRO stage; the NaN skip (stage 2);
    save → step → resume → same step again (stages 2 and 3); a stage-3 checkpoint for the
    1-rank resume; ZeRO-3 gathered weights before any step."""
    import gc
    import os

    from learners import checkpoint

    out, model = Path(payload["out"]), Path(payload["model"])
    rank = int(os.environ["RANK"])
    report: dict = {"world_size": int(os.environ["WORLD_SIZE"])}
    for stage in payload["stages"]:
        trainer = build_trainer(model, stage)
        if stage == 3:
            save_weights(trainer, out / "z3_initial.safetensors")
        report[f"stage{stage}_step1"] = trainer.train_step(make_table(**TABLE_A), 0)
        save_weights(trainer, out / f"stage{stage}_step1.safetensors")
        if stage == 2:
            report["nan"] = trainer.train_step(make_table(seed=5, version=1, nan_reward=True), 1)
            save_weights(trainer, out / "stage2_after_nan.safetensors")
        if stage in (2, 3):
            root = out / f"ckpt{stage}"
            checkpoint.save(trainer.engine, root, version=trainer.policy_version, extra=CURSOR, keep=1)
            trainer.train_step(make_table(**TABLE_B), 1)
            save_weights(trainer, out / f"stage{stage}_step2.safetensors")
            state = checkpoint.resume(trainer.engine, root)
            trainer.policy_version = state.version
            report[f"stage{stage}_resumed_version"] = state.version
            trainer.train_step(make_table(**TABLE_B), 1)
            save_weights(trainer, out / f"stage{stage}_step2_resumed.safetensors")
        del trainer
        gc.collect()
    report["listening"] = listening_addresses()
    write_json(out / f"multi_rank{rank}.json", report)


def listening_addresses() -> list[str]:
    """The IPs this rank's process listens on (its share of the store and gloo's pairs)."""
    import psutil

    conns = psutil.Process().net_connections(kind="inet")
    return sorted({c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN})


def single_rank_scenario(payload: dict) -> None:
    """One rank: the reference steps (ZeRO-0), the NaN skip at stage 0, HF export, and a
    resume of the 2-rank ZeRO-3 checkpoint onto 1 rank at ZeRO-1."""
    from learners import checkpoint

    out, model = Path(payload["out"]), Path(payload["model"])
    report: dict = {}
    ref = build_trainer(model, 0)
    report["ref_step1"] = ref.train_step(make_table(**TABLE_A), 0)
    save_weights(ref, out / "ref_step1.safetensors")
    ref.train_step(make_table(**TABLE_B), 1)
    save_weights(ref, out / "ref_step2.safetensors")
    report["nan"] = ref.train_step(make_table(seed=5, version=2, nan_reward=True), 2)
    save_weights(ref, out / "ref_after_nan.safetensors")
    checkpoint.export_hf(ref.engine, out / "hf_export")
    del ref
    report["fused"] = fused_on_and_off(model, out)

    resumed = build_trainer(model, 1)
    state = checkpoint.resume(resumed.engine, out / "ckpt3")
    resumed.policy_version = state.version
    report["cross_resume"] = {"version": state.version, "extra": state.extra, "from_world": state.world_size}
    report["cross_step2"] = resumed.train_step(make_table(**TABLE_B), 1)
    save_weights(resumed, out / "cross_resume_step2.safetensors")
    write_json(out / "single_rank.json", report)


def fused_on_and_off(model: Path, out: Path) -> dict:
    """One step of each FUSED_CASES objective with the fused logprob path on and off (ZeRO-0)."""
    report = {}
    for name, algorithm in FUSED_CASES.items():
        for fused in (True, False):
            trainer = build_trainer(model, 0, algorithm=algorithm, fused_logprobs=fused)
            key = f"{name}_{'fused' if fused else 'unfused'}"
            report[key] = {"uses_fused": trainer.fused, "step": trainer.train_step(make_table(**TABLE_A), 0)}
            save_weights(trainer, out / f"{key}_step1.safetensors")
    return report


def gpu_scenario(payload: dict) -> None:
    """bf16 ZeRO-3 over nccl: a step moves the weights, a NaN batch is skipped, published
    weights come out in bf16 and a checkpoint resumes."""
    import torch

    from async_rl.config import AlgorithmConfig
    from learners import checkpoint
    from learners.engine import LearnerEngine
    from learners.trainer import Trainer

    out, model = Path(payload["out"]), Path(payload["model"])
    cfg = learner_config(3, backend="nccl")
    engine = LearnerEngine(model, cfg, dtype="bfloat16", ds_overrides=SHARD_EVERYTHING)
    trainer = Trainer(engine, AlgorithmConfig(), max_staleness=4, micro_batch_tokens=cfg.batch.micro_batch_tokens)
    before = dict(trainer.weights_for_publishing())
    step = trainer.train_step(make_table(**TABLE_A), 0)
    after = dict(trainer.weights_for_publishing())
    nan = trainer.train_step(make_table(seed=5, version=1, nan_reward=True), 1)
    after_nan = dict(trainer.weights_for_publishing())
    checkpoint.save(engine, out / "ckpt", version=trainer.policy_version)
    state = checkpoint.resume(engine, out / "ckpt")
    report = {
        "device": str(engine.device), "backend": torch.distributed.get_backend(),
        "dtypes": sorted({str(v.dtype) for v in after.values()}),
        "moved": max(float((after[k].float() - before[k].float()).abs().max()) for k in after),
        "nan_changed": max(float((after_nan[k].float() - after[k].float()).abs().max()) for k in after),
        "step": step, "nan": nan, "resumed_version": state.version,
    }
    if engine.dist.rank == 0:
        write_json(out / "gpu.json", report)
