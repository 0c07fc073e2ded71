"""The GPU path of the learner: bf16 ZeRO-3 over nccl (skips without CUDA)."""

from __future__ import annotations

import json

import learner_ranks
import pytest
import torch

from learners.launch import launch

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_bf16_zero3_over_nccl_steps_skips_nan_and_publishes_bf16(tmp_path):
    model = learner_ranks.make_model(tmp_path / "model")
    ranks = max(1, min(2, torch.cuda.device_count()))
    launch("learner_ranks:gpu_scenario", ranks, {"out": str(tmp_path), "model": str(model)}, timeout_s=600)
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["backend"] == "nccl" and report["device"].startswith("cuda")
    assert report["dtypes"] == ["torch.bfloat16"]
    assert report["moved"] > 0 and report["step"]["optimizer_steps"] == 1
    assert report["nan_changed"] == 0.0 and report["nan"]["optimizer_steps_skipped"] == 1
    assert report["resumed_version"] == 1
