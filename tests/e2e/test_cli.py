"""The CLI as a user runs it: the installed `async-rl` entry point in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

BIN = Path(sys.executable).with_name("async-rl")


def run(*args, cwd=None, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


def test_help_lists_the_commands():
    result = run("--help")
    assert result.returncode == 0
    for command in ("train", "config", "init-model", "data"):
        assert command in result.stdout


def test_config_errors_exit_2_with_one_line():
    result = run("config", "validate", "tiny", "learner.zero_stage=4")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: learner.zero_stage=4: must be 0, 1, 2 or 3"
    assert result.stdout == ""


def test_config_show_prints_the_resolved_yaml():
    import yaml

    result = run("config", "show", "klear-math-8b", "learner.lr=2e-6")
    assert result.returncode == 0
    resolved = yaml.safe_load(result.stdout)
    assert resolved["learner"]["lr"] == 2e-6 and resolved["algorithm"]["loss"]["type"] == "gppo"


def test_data_synth_writes_valid_rows_and_validate_reports_them(tmp_path):
    out = tmp_path / "arith.parquet"
    result = run("data", "synth", "--task", "arith", "--n", "50", "--out", str(out), "--sft", "--ops", "+-*")
    assert result.returncode == 0, result.stderr
    table = pq.read_table(out)
    assert table.num_rows == 50
    assert {"data_source", "prompt", "reward_model", "extra_info", "response"} <= set(table.column_names)
    check = run("data", "validate", str(out))
    assert check.returncode == 0 and "50 valid rows of 50" in check.stdout


def test_bad_dataset_input_names_the_file(tmp_path):
    result = run("data", "validate", str(tmp_path / "none.jsonl"))
    assert result.returncode == 2
    assert "none.jsonl: no such dataset file" in result.stderr
    assert run("data", "synth", "--out", str(tmp_path / "x.parquet"), "--ops", "/").returncode == 2


def test_init_model_builds_a_loadable_model(tmp_path):
    result = run("init-model", "--out", str(tmp_path / "m"), "--seed", "2")
    assert result.returncode == 0, result.stderr
    assert "built tiny model (3.00M parameters, seed 2" in result.stdout
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "qwen2"


@pytest.mark.slow
def test_train_prepares_the_run_folder_and_says_what_is_missing(tmp_path):
    run_dir = tmp_path / "run"
    args = ("train", f"run.dir={run_dir}", "data.synth.n_train=300", "data.synth.n_sft=100")
    first = run(*args)
    assert first.returncode == 0, first.stderr
    assert "model: built" in first.stdout and "not yet available" in first.stdout
    assert pq.read_table(run_dir / "data" / "train.parquet").num_rows == 300
    assert pq.read_table(run_dir / "data" / "sft.parquet").num_rows == 100
    assert (run_dir / "config.yaml").is_file() and (run_dir / "model" / "model.safetensors").is_file()
    second = run(*args)
    assert "model: reused" in second.stdout and "(reused)" in second.stdout


def test_train_with_a_bad_override_starts_nothing(tmp_path):
    result = run("train", f"run.dir={tmp_path / 'run'}", "actors.count=-1")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: actors.count=-1: must be >= 0"
    assert not (tmp_path / "run").exists()
