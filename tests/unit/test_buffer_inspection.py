"""Inspection of a store: statistics, filters, export (read-only, never counts a sample)."""

import json

import duckdb
import pyarrow.parquet as pq
import pytest

from async_rl.config import BufferConfig
from buffer import inspection
from buffer.store import ReplayStore
from buffer.testing import synthetic_batch


@pytest.fixture
def store(tmp_path):
    store = ReplayStore(tmp_path, BufferConfig(min_size_to_sample=1), max_staleness=5)
    store.insert(synthetic_batch(groups=["a", "b"], version=0, rewards=[1, 0, 0, 0, -1, -1, 1, 1],
                                 actor_id="actor-0", data_source="math"))
    store.insert(synthetic_batch(groups=["c"], version=2, rewards=[1, 1, 1, 0], correct=[True, False, False, False],
                                 actor_id="actor-1", data_source="code", response_len=16))
    store.set_learner_version(3)
    store.sample(1)  # group a
    return store


def test_stats_counts_rows_rewards_lengths_staleness_and_sources(store):
    s = inspection.stats(store)
    assert (s["rows"], s["groups"], s["segments"], s["learner_version"]) == (12, 3, 1, 3)
    assert (s["rows_live"], s["groups_live"]) == (8, 2)
    assert s["reward"]["mean"] == pytest.approx(4 / 12)
    assert s["accuracy"] == pytest.approx(4 / 12)  # verdicts: two of group c's rewarded rows are not correct
    assert s["response_length"]["max"] == 16 and s["response_length"]["p50"] == 8
    assert s["staleness"] == {"1": 4, "3": 8}
    assert s["times_sampled"] == {"0": 2, "1": 1}
    assert s["per_actor"] == {"actor-0": 8, "actor-1": 4}
    assert s["per_data_source"] == {"math": 8, "code": 4}
    assert s["group_status"]["consumed"] == 1
    assert sum(s["reward"]["histogram"]["counts"]) == 12
    json.dumps(s)  # JSON-able as the service sends it


def test_filters_select_rows_by_reward_source_and_staleness(store):
    def trajs(**filters):
        rows = inspection.select_rows(store, **filters)
        return store.read_rows(rows).column("traj_id").to_pylist()

    assert trajs(where="reward<0") == ["b/0", "b/1"]
    assert trajs(data_source="code") == ["c/0", "c/1", "c/2", "c/3"]
    assert trajs(min_staleness=3, where="reward >= 1") == ["a/0", "b/2", "b/3"]
    assert trajs(data_source="nope") == []
    with pytest.raises(ValueError, match="COLUMN OP NUMBER"):
        trajs(where="prompt == 3")


def test_inspecting_rows_adds_status_and_staleness_and_counts_nothing(store):
    before = store.index.group_times_sampled.view.copy()
    table = inspection.inspect_rows(store, 3)
    assert table.column("traj_id").to_pylist() == ["c/1", "c/2", "c/3"]
    assert table.column("staleness").to_pylist() == [1, 1, 1]
    assert table.column("status").to_pylist() == ["live"] * 3
    random = inspection.inspect_rows(store, 5, random=True)
    assert random.num_rows == 5
    assert (store.index.group_times_sampled.view == before).all()


def test_export_parquet_and_jsonl_open_with_duckdb(store, tmp_path):
    parquet, jsonl = tmp_path / "out.parquet", tmp_path / "out.jsonl"
    assert inspection.export(store, parquet, "parquet") == 12
    assert inspection.export(store, jsonl, "jsonl") == 12
    table = pq.read_table(parquet)
    assert table.num_rows == 12 and table.column("times_sampled").to_pylist().count(1) == 4
    rows = duckdb.sql(f"SELECT data_source, count(*) FROM read_parquet('{parquet}') "
                      "GROUP BY 1 ORDER BY 1").fetchall()
    assert rows == [("code", 4), ("math", 8)]
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["traj_id"] for r in lines[:2]] == ["a/0", "a/1"]
    assert len(lines[-1]["response_tokens"]) == 16
