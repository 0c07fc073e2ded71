"""Synthetic trajectory batches for tests and benchmarks (no model involved)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from buffer.schema import TRAJECTORY_SCHEMA, validate_batch


def synthetic_batch(
    *,
    groups: list[str],
    group_size: int = 4,
    version: int = 0,
    response_len: int = 8,
    prompt_len: int = 4,
    rewards: list[float] | None = None,
    correct: list[bool] | None = None,
    actor_id: str = "actor-0",
    data_source: str = "synthetic",
    id_prefix: str = "",
    seed: int = 0,
) -> pa.RecordBatch:
    """``len(groups) * group_size`` rows: traj_id ``{prefix}{group}/{k}``; all tokens at ``version``.

    ``rewards`` gives one reward per row (default: alternating 1, 0 so no group is flat);
    ``correct`` one verdict per row (default: the rows rewarded 1.0).
    Built columnar with numpy so benchmarks can produce large batches quickly.
    """
    n = len(groups) * group_size
    rng = np.random.default_rng(seed)
    if rewards is None:
        rewards = [float(k % 2) for k in range(n)]
    if correct is None:
        correct = [r == 1.0 for r in rewards]
    traj = [f"{id_prefix}{g}/{k}" for g in groups for k in range(group_size)]
    gids = [g for g in groups for _ in range(group_size)]
    columns = {
        "traj_id": pa.array(traj),
        "group_id": pa.array(gids),
        "group_size": pa.array(np.full(n, group_size, np.int32)),
        "prompt_id": pa.array(gids),
        "data_source": pa.array([data_source] * n),
        "prompt_tokens": _lists(rng.integers(0, 32000, n * prompt_len, dtype=np.int32), n, pa.int32()),
        "response_tokens": _lists(
            rng.integers(0, 32000, n * response_len, dtype=np.int32), n, pa.int32()
        ),
        "behavior_logprobs": _lists(
            -rng.random(n * response_len, dtype=np.float32), n, pa.float32()
        ),
        "token_versions": _lists(np.full(n * response_len, version, np.int32), n, pa.int32()),
        "reward": pa.array(np.asarray(rewards, np.float32)),
        "correct": pa.array(correct, pa.bool_()),
        "reward_info": pa.array(["{}"] * n),
        "finish_reason": pa.array(["stop"] * n),
        "actor_id": pa.array([actor_id] * n),
        "created_at": pa.array(np.zeros(n, dtype="datetime64[us]"), pa.timestamp("us", tz="UTC")),
        "times_sampled": pa.array(np.zeros(n, np.int32)),
    }
    batch = pa.RecordBatch.from_arrays([columns[f.name] for f in TRAJECTORY_SCHEMA], schema=TRAJECTORY_SCHEMA)
    return validate_batch(batch)


def _lists(flat: np.ndarray, n: int, value_type: pa.DataType) -> pa.ListArray:
    width = len(flat) // n if n else 0
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * width)
    return pa.ListArray.from_arrays(offsets, pa.array(flat, type=value_type))


def with_broken_offsets(batch: pa.RecordBatch, column: str) -> pa.RecordBatch:
    """``batch`` with the string ``column`` replaced by one whose offsets go backwards (a
    crafted, hostile batch: it serializes and deserializes, and only full validation sees it)."""
    n = batch.num_rows
    offsets = np.arange(n + 1, dtype=np.int32)
    offsets[1], offsets[2] = 2, 1  # non-monotonic
    broken = pa.StringArray.from_buffers(n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"x" * n))
    at = batch.schema.get_field_index(column)
    arrays = [broken if k == at else c for k, c in enumerate(batch.columns)]
    return pa.RecordBatch.from_arrays(arrays, schema=batch.schema)
