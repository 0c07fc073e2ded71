"""The SFT warm start for real: ``run_sft`` launches a DeepSpeed rank (gloo on CPU) with an
``SFTLaunch`` record, trains on arithmetic rows with worked solutions and exports the model.
The e2e job tests run with ``learner.sft.epochs=0``; this is where the warm start is tested."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from async_rl.config_io import load_config
from async_rl.records import SFTLaunch
from async_rl.tasks import arith
from async_rl.tasks.dataset import write_rows
from learners.sft import run_sft, sft_launch

ROWS, BATCH = 24, 8  # one epoch = 3 optimizer steps


@pytest.fixture(scope="module")
def sft_rows(tmp_path_factory):
    spec = arith.ArithSpec(1, 2, 2, 2, ("+", "-"))
    rows = arith.make_rows(spec, ROWS, seed=0, split="sft", with_solution=True)
    return write_rows(rows, tmp_path_factory.mktemp("sft-data") / "sft.parquet")


def test_run_sft_trains_and_exports_a_model_that_differs_from_the_start(tiny_model_dir, sft_rows, tmp_path):
    cfg = load_config("tiny", [f"learner.sft.batch_size={BATCH}", "learner.sft.lr=1e-3"])
    out = run_sft(cfg, model_dir=tiny_model_dir, data=sft_rows, out_dir=tmp_path / "sft", epochs=1.0)

    history = json.loads((out / "sft_metrics.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(h["nll"])) and h["nll"] > 0 for h in history)
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    trained = load_file(str(out / "model.safetensors"))
    assert trained.keys() == start.keys()
    moved = max((trained[k].float() - start[k].float()).abs().max().item() for k in start)
    assert moved > 1e-4  # three AdamW steps at lr 1e-3 move the weights


def test_the_sft_launch_record_refuses_a_misspelt_key_and_zero_epochs(tiny_model_dir, sft_rows, tmp_path):
    cfg = load_config("tiny", [])
    spec = sft_launch(cfg, model_dir=tiny_model_dir, data=sft_rows, out_dir=tmp_path, epochs=0.5)
    payload = spec.model_dump(mode="json")
    assert SFTLaunch.model_validate(payload) == spec  # what the rank reads is what was sent
    with pytest.raises(ValidationError, match="epoch"):
        SFTLaunch.model_validate({**{k: v for k, v in payload.items() if k != "epochs"}, "epoch": 1.0})
    with pytest.raises(ValueError, match=r"learner\.sft\.epochs=0: must be > 0 to run SFT"):
        sft_launch(cfg, model_dir=tiny_model_dir, data=sft_rows, out_dir=tmp_path, epochs=0)
