"""The benchmark files as the ecosystem ships them, read from ../shared/data as they are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from async_rl.evaluation.benchmarks import BenchmarkError, load_benchmark, with_instruction
from async_rl.tasks.dataset import write_rows

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
LAYOUTS = [("aime24.qs.jsonl", "meta.answer", "73"),
           ("aime25.qs.jsonl", "meta.solution", "70"),
           ("HMMT-202502.jsonl", "answer", "103")]


@pytest.mark.parametrize(("name", "field", "first_answer"), LAYOUTS)
def test_each_klear_layout_reads_thirty_problems_with_answers(name, field, first_answer):
    bench = load_benchmark(SHARED_DATA / name)
    assert bench.answer_field == field
    assert len(bench.problems) == 30
    assert bench.problems[0].answer == first_answer
    assert all(p.answer.strip() for p in bench.problems)
    assert all(p.messages[0]["role"] == "user" and len(p.messages[0]["content"]) > 40 for p in bench.problems)
    assert len({p.problem_id for p in bench.problems}) == 30
    assert {p.data_source for p in bench.problems} == {name.split(".")[0]}


def test_answers_are_the_final_answers_not_worked_solutions():
    hmmt = load_benchmark(SHARED_DATA / "HMMT-202502.jsonl")
    assert hmmt.problems[2].answer == "\\frac{1}{576}"  # `solution` holds "\\boxed{...}"
    aime25 = load_benchmark(SHARED_DATA / "aime25.qs.jsonl")
    assert all(p.answer.isdigit() and 0 <= int(p.answer) <= 999 for p in aime25.problems)


def test_an_explicit_answer_field_overrides_detection_and_limit_takes_the_first_rows():
    bench = load_benchmark(SHARED_DATA / "HMMT-202502.jsonl", answer_field="solution", limit=3)
    assert [p.answer for p in bench.problems] == ["\\boxed{103}", "\\boxed{3375}", "\\boxed{\\frac{1}{576}}"]


def test_verl_parquet_rows_read_like_training_rows(tmp_path):
    rows = [{"data_source": "math_dapo", "prompt": [{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": f"What is {i}+1?"}],
             "reward_model": {"ground_truth": str(i + 1)}, "extra_info": {"index": 100 + i}} for i in range(3)]
    bench = load_benchmark(write_rows(rows, tmp_path / "heldout.parquet"))
    assert bench.answer_field == "reward_model.ground_truth"
    assert [p.answer for p in bench.problems] == ["1", "2", "3"]
    assert bench.problems[0].messages[0] == {"role": "system", "content": "Be brief."}
    assert bench.problems[0].problem_id == "heldout:100" and bench.problems[0].data_source == "math_dapo"


def test_a_plain_question_field_becomes_one_user_message(tmp_path):
    path = tmp_path / "plain.json"
    path.write_text(json.dumps([{"problem": "Find x.", "final_answer": 5}]))
    problem = load_benchmark(path).problems[0]
    assert problem.messages == [{"role": "user", "content": "Find x."}] and problem.answer == "5"


@pytest.mark.parametrize(
    ("lines", "message"),
    [(['{"messages": [{"role": "user", "content": "q"}]}'], "no answer field found"),
     (['{"answer": "1", "messages": [{"role": "user", "content": "q"}]}', '{"answer": "2"}'],
      "bad.jsonl:2: no question"),
     (['{"answer": "1", "messages": [{"role": "user", "content": "q"}]}', "{oops"], "bad.jsonl:2: invalid JSON"),
     (['{"answer": "1", "messages": [{"role": "user", "content": "q"}]}', '{"messages": [{"role": "user", "content": "q"}]}'],
      "bad.jsonl:2: no answer at 'answer'")],
)
def test_malformed_files_fail_with_one_line_naming_the_row(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BenchmarkError, match=message) as err:
        load_benchmark(path)
    assert "\n" not in str(err.value)


def test_missing_and_unknown_files_are_errors(tmp_path):
    with pytest.raises(BenchmarkError, match="no such benchmark file"):
        load_benchmark(tmp_path / "absent.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(BenchmarkError, match="unknown format '.csv'"):
        load_benchmark(tmp_path / "data.csv")


def test_the_instruction_is_appended_to_the_last_user_message_only():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    out = with_instruction(messages, "Box it.")
    assert out == [{"role": "system", "content": "s"}, {"role": "user", "content": "q\nBox it."}]
    assert messages[1]["content"] == "q"


def test_training_rows_convert_to_problems_for_held_out_evaluation(tmp_path):
    from async_rl.evaluation.benchmarks import problem_from_row
    from async_rl.tasks.dataset import load_rows

    row = {"data_source": "arith", "prompt": [{"role": "user", "content": "2+2?"}],
           "reward_model": {"ground_truth": 4}, "extra_info": {"index": 3}}
    rows, _ = load_rows(write_rows([row], tmp_path / "heldout.jsonl"))
    problem = problem_from_row(rows[0])
    assert (problem.problem_id, problem.answer, problem.data_source) == ("heldout:3", "4", "arith")
    assert problem.messages == [{"role": "user", "content": "2+2?"}]
