"""benchmarks/buffer_bench.py: the ceiling and every figure start from the same page-cache state."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("buffer_bench")


def test_the_page_cache_is_recycled_with_at_least_the_bytes_measured_and_nothing_stays(bench, tmp_path, monkeypatch):
    batches = bench._batches(3, response_len=64, prompt_len=16)
    real_write, written = os.write, []

    def write(fd, data):
        written.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    bench.recycle_page_cache(tmp_path, batches)
    assert sum(written) >= sum(b.nbytes for b in batches)
    assert list(tmp_path.iterdir()) == []


def test_the_ceiling_writes_a_new_file_each_time_and_deletes_it(bench, tmp_path):
    batches = bench._batches(2, response_len=64, prompt_len=16)
    payloads = bench.segment_messages(batches)
    assert bench.disk_ceiling(tmp_path, batches, payloads) > 0
    assert bench.disk_ceiling(tmp_path, batches, payloads) > 0  # O_EXCL: the first one's file is gone
    assert list(tmp_path.iterdir()) == []
