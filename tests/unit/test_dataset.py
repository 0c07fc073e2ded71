import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from async_rl.tasks.dataset import DatasetError, load_rows, write_rows

GOOD = {
    "data_source": "aime",
    "prompt": [{"role": "user", "content": "Find x."}],
    "reward_model": {"style": "rule", "ground_truth": "42"},
    "extra_info": {"index": 7},
}


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_malformed_rows_are_counted_reported_by_row_number_and_skipped(tmp_path):
    lines = [
        GOOD,
        {**GOOD, "data_source": ""},
        "{not json",
        {**GOOD, "prompt": []},
        {**GOOD, "prompt": [{"role": "robot", "content": "x"}]},
        {**GOOD, "reward_model": {}},
        {**GOOD, "extra_info": [1]},
        {**GOOD, "reward_model": {"ground_truth": 3}},
    ]
    rows, report = load_rows(write_jsonl(tmp_path / "d.jsonl", lines))
    assert report.total == 8 and report.valid == 2 and len(rows) == 2
    assert [n for n, _ in report.skipped] == [2, 3, 4, 5, 6, 7]
    reasons = dict(report.skipped)
    assert reasons[2] == "data_source: missing or not a string"
    assert reasons[3].startswith("invalid JSON")
    assert reasons[5] == "prompt[0].role='robot': expected one of ['assistant', 'system', 'user']"
    assert reasons[6] == "reward_model.ground_truth: missing"
    assert rows[0].prompt_id == "d:7" and rows[0].ground_truth == "42"
    assert rows[1].ground_truth == "3"
    assert "2 valid rows of 8, 6 skipped — row 2:" in report.summary()


def test_blank_lines_are_ignored_and_row_numbers_are_line_numbers(tmp_path):
    _, report = load_rows(write_jsonl(tmp_path / "d.jsonl", [GOOD, "", {"x": 1}]))
    assert report.total == 2 and report.skipped[0][0] == 3


def test_parquet_rows_load(tmp_path):
    path = write_rows([GOOD, {**GOOD, "extra_info": {"index": 8}}], tmp_path / "d.parquet")
    rows, report = load_rows(path)
    assert report.valid == 2 and [r.prompt_id for r in rows] == ["d:7", "d:8"]
    assert rows[0].messages == [{"role": "user", "content": "Find x."}]


def test_file_with_no_valid_rows_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match=r"no valid rows among 2 \(row 1: "):
        load_rows(write_jsonl(tmp_path / "d.jsonl", [{"a": 1}, {"b": 2}]))


def test_missing_unknown_and_corrupt_files_are_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such dataset file"):
        load_rows(tmp_path / "missing.parquet")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match="unknown format"):
        load_rows(tmp_path / "d.csv")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DatasetError, match="not a readable parquet file"):
        load_rows(tmp_path / "bad.parquet")


def test_sft_rows_require_a_response(tmp_path):
    path = write_rows([GOOD, {**GOOD, "response": "<think>\n</think>\n\\boxed{42}"}], tmp_path / "s.parquet")
    rows, report = load_rows(path, require_response=True)
    assert report.skipped == [(1, "response: missing (required for SFT rows)")]
    assert rows[0].response.endswith("\\boxed{42}")


def test_prompt_given_as_a_json_string_is_accepted(tmp_path):
    table = pa.Table.from_pylist([{**GOOD, "prompt": json.dumps(GOOD["prompt"])}])
    pq.write_table(table, tmp_path / "s.parquet")
    rows, _ = load_rows(tmp_path / "s.parquet")
    assert rows[0].messages[0]["content"] == "Find x."
