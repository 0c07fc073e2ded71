"""`async-rl eval` input checks (one line, exit 2, before any engine) and `--compare`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from async_rl.commands.eval import eval_command
from async_rl.evaluation.benchmarks import Benchmark, Problem
from async_rl.evaluation.metrics import ProblemResult, SampleResult
from async_rl.evaluation.report import compare_table, save_result, settings_differences
from async_rl.evaluation.runner import EvalSettings, Plan, result_document

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
AIME24 = str(SHARED_DATA / "aime24.qs.jsonl")


@pytest.fixture(scope="module")
def cli():
    app = typer.Typer()
    app.command()(eval_command)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    return folder


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0]


def test_a_missing_model_folder_is_one_line_and_exit_2(cli, tmp_path):
    assert_one_line_error(cli("--model", tmp_path / "nope", "--data", AIME24), "no config.json")


def test_an_unreadable_data_file_is_one_line_and_exit_2(cli, model_dir, tmp_path):
    assert_one_line_error(cli("--model", model_dir, "--data", tmp_path / "absent.jsonl"), "absent.jsonl")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"answer": 1, "messages": [{"role": "user", "content": "q"}]}\n{nope\n')
    assert_one_line_error(cli("--model", model_dir, "--data", AIME24, "--data", broken), "broken.jsonl:2")


def test_k_above_n_is_one_line_and_exit_2(cli, model_dir):
    assert_one_line_error(cli("--model", model_dir, "--data", AIME24, "--n", 8, "--k", "1,16"),
                          "pass@16 needs at least 16 samples", "--n is 8")
    assert_one_line_error(cli("--model", model_dir, "--data", AIME24, "--k", "1,x"), "comma-separated")


def test_a_bad_rope_spec_and_no_data_are_one_line_and_exit_2(cli, model_dir):
    assert_one_line_error(cli("--model", model_dir, "--data", AIME24, "--rope-scaling", "yarn"), "TYPE:FACTOR")
    assert_one_line_error(cli("--model", model_dir), "--data")


def run_document(model: str, verdicts: dict[str, list[bool]], *, n: int = 4, temperature: float = 0.6) -> dict:
    problems = [Problem(pid, [{"role": "user", "content": "q"}], "1", "aime24") for pid in verdicts]
    results = [ProblemResult(pid, "1", [SampleResult(10, "stop", "correct" if ok else "wrong", "1" if ok else "2", ok)
                                        for ok in oks]) for pid, oks in verdicts.items()]
    bench = Benchmark("aime24", "aime24.qs.jsonl", "meta.answer", problems)
    return result_document(model, [bench], [results], EvalSettings(n=n, temperature=temperature),
                           Plan([], 32, 64, 2048), [1, n], 2.0, dtype="float32")


def test_compare_puts_two_runs_side_by_side_with_deltas_and_differing_settings(cli, tmp_path):
    before = run_document("sft", {"p0": [True, False, False, False], "p1": [False] * 4})
    after = run_document("rl", {"p0": [True, True, True, False], "p1": [False, False, False, True]}, temperature=1.0)
    a, b = save_result(before, tmp_path / "a.json"), save_result(after, tmp_path / "b.json")
    result = cli("--compare", a, b)
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[2].strip(): [c.strip() for c in line.split("│")[3:6]]
            for line in result.output.splitlines() if line.count("│") >= 6 and "aime24" in line}
    assert rows["avg@4"] == ["12.5", "50.0", "+37.5"]
    assert rows["pass@4"] == ["50.0", "100.0", "+50.0"]
    assert rows["solved only by A / B"][:2] == ["0", "1"]
    assert "settings differ — temperature: 0.6 → 1.0" in result.output


def test_compare_matches_metrics_by_name_when_n_differs():
    table = compare_table(run_document("a", {"p": [True] * 4}), run_document("b", {"p": [True] * 8}, n=8))
    metrics = list(table.columns[1].cells)
    assert metrics[:4] == ["avg@4", "pass@1", "pass@4", "cons@4"] and "avg@8" in metrics and "pass@8" in metrics
    assert settings_differences(run_document("a", {"p": [True] * 4}), run_document("b", {"p": [True] * 4})) == []


def test_compare_refuses_a_file_that_is_not_a_result(cli, tmp_path):
    other = tmp_path / "other.json"
    other.write_text('{"benchmark": "x"}')
    assert_one_line_error(cli("--compare", other, other), "not an async-rl eval result")
    assert_one_line_error(cli("--compare", other, tmp_path / "missing.json"), "not an async-rl eval result")


def test_an_out_path_that_is_a_folder_is_refused_before_any_work(cli, model_dir, tmp_path):
    assert_one_line_error(cli("--model", model_dir, "--data", AIME24, "--out", tmp_path), "is a folder")


def test_a_result_file_with_a_misspelt_or_missing_key_is_refused_naming_it(tmp_path):
    from async_rl.evaluation.report import load_result
    from async_rl.evaluation.runner import EvalInputError

    good = run_document("m", {"p0": [True, False, False, False]})
    assert load_result(save_result(good, tmp_path / "good.json"))["benchmarks"][0]["avg@n"] == 0.25
    misspelt = json.loads(json.dumps(good))
    misspelt["benchmarks"][0]["avg@m"] = misspelt["benchmarks"][0].pop("avg@n")
    with pytest.raises(EvalInputError, match=r"bad\.json: .*benchmarks\.0\.avg@n: Field required"):
        load_result(save_result(misspelt, tmp_path / "bad.json"))
    extra = json.loads(json.dumps(good))
    extra["benchmarks"][0]["per_problem"][0]["corect"] = 1
    with pytest.raises(EvalInputError, match=r"per_problem\.0\.corect: Extra inputs are not permitted"):
        load_result(save_result(extra, tmp_path / "extra.json"))
