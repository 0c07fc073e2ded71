"""Pure logic of the actors: weight sets, version spans, RoPE overrides, gates, rows."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from actors.backpressure import StalenessGate
from actors.engine import (
    Sample,
    configure_vllm_env,
    expand_versions,
    rope_overrides,
    sampled_logprobs,
    sweep_stale_staging,
)
from actors.prompts import prompt_stream
from actors.trajectories import group_batch
from actors.weight_file import check_weight_set, fused_layer, read_tensor_names, write_safetensors
from async_rl.config import ActorsConfig
from async_rl.rewards.base import RewardRecord, failure
from async_rl.tasks.dataset import PromptRow

LAYER = "model.layers.0"
REFERENCE = [
    "model.embed_tokens.weight", "model.norm.weight",
    *(f"{LAYER}.self_attn.{p}_proj.{k}" for p in "qkv" for k in ("weight", "bias")),
    f"{LAYER}.self_attn.o_proj.weight",
    f"{LAYER}.mlp.gate_proj.weight", f"{LAYER}.mlp.up_proj.weight", f"{LAYER}.mlp.down_proj.weight",
]


def test_fused_layer_maps_projections_to_the_vllm_layer_they_load_into():
    assert fused_layer(f"{LAYER}.self_attn.k_proj.bias") == f"{LAYER}.self_attn.qkv_proj"
    assert fused_layer(f"{LAYER}.mlp.up_proj.weight") == f"{LAYER}.mlp.gate_up_proj"
    assert fused_layer(f"{LAYER}.mlp.down_proj.weight") == f"{LAYER}.mlp.down_proj"


def test_check_weight_set_accepts_the_full_set_and_whole_fused_groups():
    check_weight_set(REFERENCE, REFERENCE)
    check_weight_set([n for n in REFERENCE if "self_attn" in n and "o_proj" not in n], REFERENCE)
    check_weight_set([*REFERENCE, "lm_head.weight"], REFERENCE)  # tied head in a state_dict


def test_check_weight_set_rejects_a_fused_group_sent_in_part():
    with pytest.raises(ValueError, match=r"qkv_proj is only partly updated.*v_proj"):
        check_weight_set([n for n in REFERENCE if "v_proj" not in n], REFERENCE)
    with pytest.raises(ValueError, match="gate_up_proj"):
        check_weight_set([f"{LAYER}.mlp.gate_proj.weight"], REFERENCE)


def test_check_weight_set_rejects_unknown_names_and_empty_sets():
    with pytest.raises(ValueError, match="unknown tensor"):
        check_weight_set([*REFERENCE, "model.extra.weight"], REFERENCE)
    with pytest.raises(ValueError, match="no tensor"):
        check_weight_set([], REFERENCE)


def test_write_safetensors_round_trips_views_of_one_buffer(tmp_path):
    buffer = torch.arange(40, dtype=torch.float32)
    named = [
        ("a", buffer[:12].view(3, 4)),
        ("b", buffer[12:20].view(2, 4).t()),  # non-contiguous view
        ("c", torch.tensor([1.5, -2.25], dtype=torch.bfloat16)),
    ]
    path = write_safetensors(tmp_path / "w.safetensors", named)
    loaded = load_file(str(path))
    assert read_tensor_names(path) == ["a", "b", "c"]
    for name, tensor in named:
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)


def test_expand_versions_gives_one_version_per_token_across_an_update():
    spans = [SimpleNamespace(version="3", start=0, end=2), SimpleNamespace(version="4", start=2, end=5)]
    assert expand_versions(spans, 5, fallback=9) == [3, 3, 4, 4, 4]
    assert expand_versions(None, 3, fallback=7) == [7, 7, 7]
    assert expand_versions([SimpleNamespace(version="default", start=0, end=2)], 2, fallback=0) == [0, 0]


def test_sampled_logprobs_reads_the_sampled_token_of_each_step():
    steps = [{5: SimpleNamespace(logprob=-0.5)}, {9: SimpleNamespace(logprob=-1.25), 2: None}]
    assert sampled_logprobs([5, 9], steps) == [-0.5, -1.25]
    with pytest.raises(RuntimeError, match="no logprob"):
        sampled_logprobs([5, 9], None)


def test_sampled_logprobs_reads_flat_logprobs():
    from vllm.logprobs import FlatLogprobs, Logprob

    flat = FlatLogprobs()
    flat.append({5: Logprob(-0.5, rank=1)})
    flat.append({2: Logprob(-3.0, rank=2), 9: Logprob(-1.25, rank=1)})
    assert sampled_logprobs([5, 9], flat) == [-0.5, -1.25]
    with pytest.raises(RuntimeError, match="sampled token 4"):
        sampled_logprobs([5, 4], flat)


def test_rope_overrides_turn_on_yarn_and_scale_the_position_limit():
    hf = {"max_position_embeddings": 32768, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}
    out = rope_overrides(hf, {"rope_type": "yarn", "factor": 2.5, "original_max_position_embeddings": 32768})
    assert out["rope_parameters"] == {
        "rope_theta": 1e6, "rope_type": "yarn", "factor": 2.5, "original_max_position_embeddings": 32768,
    }
    assert out["max_position_embeddings"] == 81920
    assert rope_overrides(hf, None) == {}
    linear = rope_overrides({"rope_theta": 500.0}, {"type": "linear", "factor": 2.0})
    assert linear == {"rope_parameters": {"rope_theta": 500.0, "rope_type": "linear", "factor": 2.0}}


def test_configure_vllm_env_sets_what_vllm_reads(tmp_path, monkeypatch):
    for key in ("VLLM_HOST_IP", "VLLM_RPC_BASE_PATH", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE"):
        monkeypatch.delenv(key, raising=False)
    configure_vllm_env(ActorsConfig(kv_cache_gib=1.0), tmp_path / "rpc")
    assert os.environ["VLLM_HOST_IP"] == "127.0.0.1"
    assert os.environ["VLLM_RPC_BASE_PATH"] == str(tmp_path / "rpc") and (tmp_path / "rpc").is_dir()
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"
    configure_vllm_env(ActorsConfig(kv_cache_gib=0.5, multiprocess_engine=True), tmp_path / "rpc")
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ  # fractional: passed as bytes instead


def test_staleness_gate_follows_the_areal_capacity_rule():
    gate = StalenessGate(max_staleness=1, groups_per_version=2)
    allowed = 0
    while gate.may_submit(version=5):
        gate.record_submit()
        allowed += 1
    assert allowed == 4  # (0 + 1 + 1) * 2 groups at the starting version
    assert gate.may_submit(version=6)  # one new version buys two more groups
    assert StalenessGate(None, None).may_submit(0)


def test_prompt_stream_visits_every_row_once_per_epoch():
    rows = [PromptRow(f"p{i}", "synthetic/arith", [{"role": "user", "content": str(i)}], str(i)) for i in range(5)]
    stream = prompt_stream(rows, seed=3)
    first, second = [next(stream).prompt_id for _ in range(5)], [next(stream).prompt_id for _ in range(5)]
    assert sorted(first) == sorted(second) == [f"p{i}" for i in range(5)]
    again = prompt_stream(rows, seed=3)
    assert [next(again).prompt_id for _ in range(5)] == first


def test_group_batch_builds_one_row_per_sample_with_idempotent_ids():
    row = PromptRow("arith:7", "synthetic/arith", [{"role": "user", "content": "1+1"}], "2")
    samples = [
        Sample([4, 5], [-0.1, -0.2], [0, 1], "stop", "2"),
        Sample([6], [-0.3], [1], "length", "3"),
    ]
    rewards = [RewardRecord(1.0, "correct", "2"), failure(-1.0, "timeout", "slow")]
    batch = group_batch(group_id="a0-g", actor_id="a0", row=row, prompt_tokens=[1, 2, 3],
                        samples=samples, rewards=rewards, kv_on_update="keep")
    rows = batch.to_pylist()
    assert [r["traj_id"] for r in rows] == ["a0-g:0", "a0-g:1"]
    assert all(r["group_size"] == 2 and r["prompt_id"] == "arith:7" for r in rows)
    assert rows[0]["token_versions"] == [0, 1] and rows[1]["finish_reason"] == "length"
    assert rows[1]["reward"] == -1.0
    info = json.loads(rows[1]["reward_info"])
    assert info["status"] == "timeout" and info["rollout"] == {"kv_on_update": "keep"}


def test_group_batch_stores_the_reward_records_verdict_whatever_the_reward_values():
    row = PromptRow("arith:7", "synthetic/arith", [{"role": "user", "content": "1+1"}], "2")
    samples = [Sample([4], [-0.1], [0], "stop", "2"), Sample([5], [-0.2], [0], "stop", "3"),
               Sample([6], [-0.3], [0], "stop", "2")]
    rewards = [RewardRecord(0.5, "correct", "2"), RewardRecord(1.0, "wrong", "3"), failure(1.0, "timeout", "slow")]
    batch = group_batch(group_id="g", actor_id="a0", row=row, prompt_tokens=[1],
                        samples=samples, rewards=rewards, kv_on_update="keep")
    assert batch.column("correct").to_pylist() == [True, False, False]
    assert batch.column("reward").to_pylist() == [0.5, 1.0, 1.0]


def test_weight_path_into_vllm_never_imports_pickle():
    import ast
    from pathlib import Path

    import actors

    for name in ("weight_file.py", "worker_ext.py", "engine.py"):
        tree = ast.parse((Path(actors.__file__).parent / name).read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
                    for alias in node.names} | {node.module for node in ast.walk(tree)
                                                if isinstance(node, ast.ImportFrom) and node.module}
        assert not {m for m in imported if "pickle" in m}, name


def test_staged_weight_files_of_dead_actors_are_swept_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = tmp_path / f"async-rl-weights-{gone.pid}-0123abcd.safetensors"
    live = tmp_path / f"async-rl-weights-{os.getpid()}-89abcdef.safetensors"
    other = tmp_path / f"async-rl-weights-{gone.pid}-v3"  # a publisher's file: not the actor's to remove
    for path in (dead, live, other):
        path.write_bytes(b"x")
    assert sweep_stale_staging(tmp_path) == [dead]
    assert not dead.exists() and live.exists() and other.exists()
