"""The CLI as a user runs it: the installed `async-rl` entry point in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

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


def test_config_validate_names_the_new_place_of_a_moved_key_and_refuses_what_the_learner_would():
    moved = run("config", "validate", "tiny", "buffer.max_staleness=2")
    assert (moved.returncode, moved.stderr.strip()) == (
        2, "error: buffer.max_staleness moved to algorithm.staleness.max_staleness")
    kl = run("config", "validate", "tiny", "algorithm.kl_coef=0.1")
    assert kl.returncode == 2 and kl.stderr.startswith("error: algorithm.kl_coef=0.1: a KL penalty needs")
    field = run("config", "validate", "tiny", "algorithm.loss.cispo_two_sided=true")
    assert field.returncode == 2
    assert field.stderr.startswith("error: algorithm.loss.cispo_two_sided: not a field of the gppo objective")


def test_config_show_prints_the_resolved_yaml():
    import yaml

    result = run("config", "show", "klear-math-8b", "learner.optimizer.lr=2e-6")
    assert result.returncode == 0
    resolved = yaml.safe_load(result.stdout)
    assert resolved["learner"]["optimizer"]["lr"] == 2e-6 and resolved["algorithm"]["loss"]["type"] == "gppo"


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


def test_train_with_a_bad_override_starts_nothing(tmp_path):
    result = run("train", f"run.dir={tmp_path / 'run'}", "actors.count=-1")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: actors.count=-1: must be >= 0"
    assert not (tmp_path / "run").exists()


def test_train_with_a_missing_model_path_starts_nothing(tmp_path):
    result = run("train", f"run.dir={tmp_path / 'run'}", f"model.path={tmp_path / 'nope'}")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: model.path={tmp_path / 'nope'}: no config.json there (expected a Hugging Face model folder)"
    assert not (tmp_path / "run" / "run.json").exists()


def test_resume_of_a_folder_that_is_not_a_run_is_refused(tmp_path):
    result = run("train", "--resume", str(tmp_path))
    assert result.returncode == 2
    assert "no config.yaml there" in result.stderr


def test_train_refuses_a_run_folder_whose_data_cursor_counts_other_data(tmp_path):
    from buffer.cursor import PromptCursor

    PromptCursor.open(tmp_path / "run" / "buffer", n_prompts=7, seed=1)
    result = run("train", f"run.dir={tmp_path / 'run'}", "data.synth.n_train=20", "learner.sft.epochs=0")
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line
    assert "made for 7 prompts in order seed 1, but the job has 20 prompts" in line
    assert not (tmp_path / "run" / "run.json").exists()
