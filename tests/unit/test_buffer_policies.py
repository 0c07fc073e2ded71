"""Pure policy logic: samplers, rate limiter, wire format (no store, no files)."""

import ast
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from buffer.rate_limiter import RateLimiter
from buffer.samplers import fifo, freshest, prioritized, uniform
from buffer.testing import synthetic_batch
from buffer.wire import ipc_to_table, pack_header, table_to_ipc, unpack_header

BUFFER_DIR = Path(__file__).resolve().parents[2] / "buffer"


def test_fifo_takes_the_first_candidates_in_insertion_order():
    candidates = np.array([3, 5, 9, 12])
    picked = fifo(candidates, np.zeros(4), np.zeros(4), 0, 2, np.random.default_rng(0))
    assert picked.tolist() == [3, 5]


def test_freshest_takes_the_newest_versions_then_the_latest_stored():
    candidates = np.array([3, 5, 9, 12])
    versions = np.zeros(13)
    versions[[3, 5, 9, 12]] = [7, 8, 8, 6]
    rng = np.random.default_rng(0)
    assert freshest(candidates, versions, np.zeros(13), 8, 2, rng).tolist() == [5, 9]
    assert freshest(candidates, versions, np.zeros(13), 8, 3, rng).tolist() == [3, 5, 9]
    same = np.zeros(13)
    assert freshest(candidates, same, np.zeros(13), 0, 2, rng).tolist() == [9, 12]


def test_uniform_returns_n_distinct_candidates():
    rng = np.random.default_rng(0)
    candidates = np.arange(100)
    for _ in range(20):
        picked = uniform(candidates, np.zeros(100), np.zeros(100), 0, 10, rng)
        assert len(set(picked.tolist())) == 10 and set(picked) <= set(candidates)


def test_prioritized_prefers_groups_used_less_at_equal_freshness():
    rng = np.random.default_rng(1)
    candidates = np.array([0, 1])
    used = np.array([0, 9])
    wins = sum(int(prioritized(candidates, np.zeros(2), used, 0, 1, rng)[0] == 0) for _ in range(400))
    assert wins > 300  # weights 1 : 1/10


def test_prioritized_prefers_fresher_groups_at_equal_use():
    rng = np.random.default_rng(2)
    candidates = np.array([0, 1])
    versions = np.array([0, 3])  # learner at 3: staleness 3 vs 0
    wins = sum(int(prioritized(candidates, versions, np.zeros(2), 3, 1, rng)[0] == 1) for _ in range(400))
    assert wins > 300  # weights e^-2.1 : 1


def test_rate_limiter_without_ratio_only_needs_min_size():
    limiter = RateLimiter(min_size_to_sample=4)
    assert "3 sampleable group(s), need 4" in limiter.sample_refusal(1, 3)
    assert "need 6" in limiter.sample_refusal(6, 5)
    assert limiter.sample_refusal(4, 4) is None
    assert limiter.insert_refusal() is None


def test_rate_limiter_keeps_samples_per_insert_within_tolerance():
    limiter = RateLimiter(min_size_to_sample=2, samples_per_insert=2.0, tolerance=3.0,
                          inserted=2, sampled=0)
    # diff = 2*2 - sampled must stay >= 2*2 - 3 = 1 for samples, <= 2*2 + 3 = 7 for inserts
    assert limiter.sample_refusal(3, 10) is None  # diff after = 1
    assert limiter.sample_refusal(4, 10).startswith("rate_limited")
    limiter.inserted = 6  # diff = 12 > 7
    assert limiter.insert_refusal().startswith("rate_limited")
    limiter.sampled = 5  # diff = 7
    assert limiter.insert_refusal() is None


def test_headers_round_trip_and_garbage_is_a_value_error():
    header = {"verb": "sample", "id": 7, "n_groups": 3, "where": None, "h": 2**64 - 1}
    assert unpack_header(pack_header(header)) == header
    for garbage in (b"\xc1\xc1", b"", pack_header([1, 2])):
        with pytest.raises(ValueError):
            unpack_header(garbage)


def test_tables_travel_as_arrow_ipc_streams():
    batch = synthetic_batch(groups=["a", "b"])
    table = ipc_to_table(table_to_ipc(batch))
    assert table.equals(pa.Table.from_batches([batch]))
    with pytest.raises(ValueError, match="not an Arrow IPC stream"):
        ipc_to_table(b"definitely not arrow")


def test_no_buffer_module_imports_pickle():
    for path in BUFFER_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] in ("pickle", "cloudpickle", "dill") for n in names), path
