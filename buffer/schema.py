"""The trajectory contract (DESIGN §3.1): one Arrow row per sampled response.

Actors build batches with :func:`build_batch`; the buffer checks every incoming batch with
:func:`validate_batch`; the learner reads sampled tables and computes staleness with
:func:`row_staleness`, the one definition of staleness. Nothing else about the buffer needs to
be imported by them.

``correct`` is the reward function's verdict (``RewardRecord.correct``), stored next to the
reward so that every stage means the same by "correct" whatever reward values are configured.

Length invariant: for every row, ``response_tokens``, ``behavior_logprobs`` and
``token_versions`` have the same length T >= 1 (one logprob and one policy version per
generated token). T >= 1 because staleness is defined through ``min(token_versions)``.

``group_size`` is the number of responses sampled for the prompt instance (n); the buffer
returns a group only once all ``group_size`` rows of it are stored.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

TRAJECTORY_SCHEMA = pa.schema(
    [
        pa.field("traj_id", pa.string(), nullable=False),
        pa.field("group_id", pa.string(), nullable=False),
        pa.field("group_size", pa.int32(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("data_source", pa.string(), nullable=False),
        pa.field("prompt_tokens", pa.list_(pa.int32()), nullable=False),
        pa.field("response_tokens", pa.list_(pa.int32()), nullable=False),
        pa.field("behavior_logprobs", pa.list_(pa.float32()), nullable=False),
        pa.field("token_versions", pa.list_(pa.int32()), nullable=False),
        pa.field("reward", pa.float32(), nullable=False),
        pa.field("correct", pa.bool_(), nullable=False),
        pa.field("reward_info", pa.string(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),
        pa.field("actor_id", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("times_sampled", pa.int32(), nullable=False),
    ]
)

# Segments written before the ``correct`` column existed; read back through add_correct_column.
SCHEMA_WITHOUT_CORRECT = pa.schema([f for f in TRAJECTORY_SCHEMA if f.name != "correct"])
# A status that says the reward function verified the response (``RewardRecord.correct``).
CORRECT_STATUS = "correct"

PER_TOKEN_COLUMNS = ("response_tokens", "behavior_logprobs", "token_versions")

MAX_GROUP_SIZE = 1 << 16  # far above any n of group-relative RL (8-64); a group must fit a sample
MAX_POLICY_VERSION = (1 << 31) - 1  # token_versions are int32: a larger version cannot be compared


class SchemaError(ValueError):
    """A batch that does not satisfy the trajectory contract; the message names the column."""


def validate_batch(data: pa.RecordBatch | pa.Table) -> pa.RecordBatch:
    """Return ``data`` as one record batch in exactly ``TRAJECTORY_SCHEMA``, or raise.

    Columns may come in any order and with castable types (e.g. int64 token ids); missing or
    extra columns, nulls, group sizes outside [1, MAX_GROUP_SIZE], negative token versions,
    non-finite rewards, NaN logprobs and unequal per-token lengths are errors. The Arrow data
    itself is validated in full first (offsets, UTF-8), so a crafted batch never reaches a
    kernel that trusts its buffers.
    """
    _check_arrow_structure(data)
    names = set(data.schema.names)
    expected = set(TRAJECTORY_SCHEMA.names)
    if names != expected:
        missing, extra = sorted(expected - names), sorted(names - expected)
        raise SchemaError(f"trajectory columns: missing {missing}, unexpected {extra}")
    if isinstance(data, pa.Table):
        data = data.combine_chunks().to_batches()[0] if data.num_rows else _empty_batch()
    if data.schema.equals(TRAJECTORY_SCHEMA):  # the common case: returned as it came
        batch = data
        _check_no_nulls(batch)
    else:
        data = data.select(TRAJECTORY_SCHEMA.names)
        _check_no_nulls(data)
        try:
            batch = data.cast(TRAJECTORY_SCHEMA)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, ValueError) as err:
            raise SchemaError(f"trajectory types: {err}") from None
    _check_token_lengths(batch)
    _check_values(batch)
    return batch


def _check_arrow_structure(data: pa.RecordBatch | pa.Table) -> None:
    """Full validation of the buffers (O(data)): offsets monotonic and in range, valid UTF-8."""
    try:
        data.validate(full=True)
    except (pa.ArrowInvalid, pa.ArrowException) as err:
        raise SchemaError(f"malformed Arrow data: {err}") from None


def _check_values(batch: pa.RecordBatch) -> None:
    """Bounds of the values the index and the statistics compute with."""
    if not batch.num_rows:
        return
    # numpy over the values (no nulls, checked before): several times faster than Arrow kernels
    sizes = batch.column("group_size").to_numpy()
    if sizes.min() < 1 or sizes.max() > MAX_GROUP_SIZE:
        raise SchemaError(f"group_size: must be in [1, {MAX_GROUP_SIZE}]")
    if _flat(batch, "token_versions").min() < 0:
        raise SchemaError("token_versions: policy versions must be >= 0")
    if not np.isfinite(batch.column("reward").to_numpy()).all():
        raise SchemaError("reward: must be finite (no NaN or infinity)")
    if np.isnan(_flat(batch, "behavior_logprobs").min()):  # min propagates NaN, allocates nothing
        raise SchemaError("behavior_logprobs: NaN; a logprob must be a number")


def _flat(batch: pa.RecordBatch, name: str) -> np.ndarray:
    """The values of a list column's rows (zero-copy; no nulls, checked before)."""
    return pc.list_flatten(batch.column(name)).to_numpy()


def _empty_batch() -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([], schema=TRAJECTORY_SCHEMA)


def _check_no_nulls(batch: pa.RecordBatch) -> None:
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        if column.null_count:
            raise SchemaError(f"{name}: {column.null_count} null value(s); every field is required")
        # A child with no null anywhere needs no flattening (the usual case: no validity buffer).
        if pa.types.is_list(column.type) and column.values.null_count and pc.list_flatten(column).null_count:
            raise SchemaError(f"{name}: null element inside a list")


def _check_token_lengths(batch: pa.RecordBatch) -> None:
    lengths = [pc.list_value_length(batch.column(c)).to_numpy() for c in PER_TOKEN_COLUMNS]
    for name, other in zip(PER_TOKEN_COLUMNS[1:], lengths[1:], strict=True):
        bad = np.flatnonzero(other != lengths[0])
        if bad.size:
            row = int(bad[0])
            raise SchemaError(
                f"{name}: row {row} (traj_id={batch.column('traj_id')[row].as_py()!r}) has "
                f"{other[row]} entries but response_tokens has {lengths[0][row]}; per-token "
                "columns must have equal lengths"
            )
    empty = np.flatnonzero(lengths[0] < 1)
    if empty.size:
        raise SchemaError(
            f"response_tokens: row {int(empty[0])} is empty; a trajectory has at least one token"
        )


def build_batch(
    *,
    traj_id: Sequence[str],
    group_id: Sequence[str],
    prompt_tokens: Sequence[Sequence[int]],
    response_tokens: Sequence[Sequence[int]],
    behavior_logprobs: Sequence[Sequence[float]],
    token_versions: Sequence[Sequence[int]],
    reward: Sequence[float],
    correct: Sequence[bool],
    prompt_id: Sequence[str] | None = None,
    data_source: Sequence[str] | str = "unknown",
    group_size: Sequence[int] | int | None = None,
    reward_info: Sequence[str] | None = None,
    finish_reason: Sequence[str] | str = "stop",
    actor_id: Sequence[str] | str = "",
    created_at: Sequence[dt.datetime] | dt.datetime | None = None,
) -> pa.RecordBatch:
    """Build a validated trajectory batch from Python lists (one entry per row).

    Scalars broadcast to every row. ``group_size`` defaults to the number of rows of each
    group in this batch (actors insert whole groups); ``prompt_id`` defaults to ``group_id``.
    """
    n = len(traj_id)
    sizes = Counter(group_id)
    columns = {
        "traj_id": list(traj_id),
        "group_id": list(group_id),
        "group_size": [sizes[g] for g in group_id] if group_size is None else _rows(group_size, n),
        "prompt_id": list(group_id if prompt_id is None else prompt_id),
        "data_source": _rows(data_source, n),
        "prompt_tokens": list(prompt_tokens),
        "response_tokens": list(response_tokens),
        "behavior_logprobs": list(behavior_logprobs),
        "token_versions": list(token_versions),
        "reward": list(reward),
        "correct": list(correct),
        "reward_info": ["{}"] * n if reward_info is None else list(reward_info),
        "finish_reason": _rows(finish_reason, n),
        "actor_id": _rows(actor_id, n),
        "created_at": _rows(created_at or dt.datetime.now(dt.UTC), n),
        "times_sampled": [0] * n,
    }
    arrays = [pa.array(columns[f.name], type=f.type) for f in TRAJECTORY_SCHEMA]
    return validate_batch(pa.RecordBatch.from_arrays(arrays, schema=TRAJECTORY_SCHEMA))


def warm_up() -> None:
    """Check a one-row batch once: pyarrow sets up its compute kernels on first use (a few
    hundred ms), which a service would otherwise charge to its first insert."""
    build_batch(traj_id=["warm-up"], group_id=["warm-up"], prompt_tokens=[[0]], response_tokens=[[0]],
                behavior_logprobs=[[0.0]], token_versions=[[0]], reward=[0.0], correct=[False])


def _rows(value, n: int) -> list:
    if isinstance(value, str | int | float | dt.datetime):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise SchemaError(f"column has {len(values)} entries, expected {n} (one per row)")
    return values


def add_correct_column(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A batch of :data:`SCHEMA_WITHOUT_CORRECT` in ``TRAJECTORY_SCHEMA``.

    ``correct`` is taken from ``reward_info``, where the actor stored its reward record: True
    when its ``status`` is ``"correct"`` (the verdict ``RewardRecord.correct`` reports), False
    for any other status and for reward_info without one (``"{}"``, not JSON).
    """
    correct = [_status(info) == CORRECT_STATUS for info in batch.column("reward_info").to_pylist()]
    columns = {name: batch.column(name) for name in batch.schema.names}
    columns["correct"] = pa.array(correct, pa.bool_())
    return pa.RecordBatch.from_arrays([columns[f.name] for f in TRAJECTORY_SCHEMA], schema=TRAJECTORY_SCHEMA)


def _status(reward_info: str) -> str | None:
    try:
        record = json.loads(reward_info)
    except ValueError:
        return None
    return record.get("status") if isinstance(record, dict) else None


def min_token_version(data: pa.RecordBatch | pa.Table) -> np.ndarray:
    """``[rows] int64``: the oldest policy version that produced any token of each row."""
    versions = data.column("token_versions")
    if isinstance(versions, pa.ChunkedArray):
        versions = versions.combine_chunks()
    if len(versions) == 0:
        return np.zeros(0, dtype=np.int64)
    flat = pc.list_flatten(versions).to_numpy()
    starts = versions.offsets.to_numpy()[:-1] - versions.offsets[0].as_py()
    return np.minimum.reduceat(flat, starts).astype(np.int64)


def staleness(learner_version: int, oldest_version: np.ndarray) -> np.ndarray:
    """``[rows] int64``: the policy lag s = learner_version − min(token_versions) (DESIGN §3.1),
    from each row's oldest token version (:func:`min_token_version`, or the buffer's index)."""
    return learner_version - np.asarray(oldest_version, dtype=np.int64)


def row_staleness(data: pa.RecordBatch | pa.Table, learner_version: int) -> np.ndarray:
    """``[rows] int64``: the staleness of each row of a trajectory table (see :func:`staleness`);
    a response that spans a weight update counts from its oldest token."""
    return staleness(learner_version, min_token_version(data))
