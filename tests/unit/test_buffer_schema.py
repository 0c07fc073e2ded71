"""The trajectory contract: schema, length invariant, batch builder, staleness."""

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from buffer.schema import (
    MAX_GROUP_SIZE,
    SCHEMA_WITHOUT_CORRECT,
    TRAJECTORY_SCHEMA,
    SchemaError,
    add_correct_column,
    build_batch,
    min_token_version,
    row_staleness,
    staleness,
    validate_batch,
)
from buffer.testing import synthetic_batch, with_broken_offsets


def _batch(**overrides):
    args = dict(
        traj_id=["t0", "t1", "t2"],
        group_id=["g0", "g0", "g1"],
        prompt_tokens=[[1, 2], [1, 2], [3]],
        response_tokens=[[5, 6, 7], [8], [9, 9]],
        behavior_logprobs=[[-0.1, -0.2, -0.3], [-0.5], [-1.0, -2.0]],
        token_versions=[[3, 4, 4], [2], [5, 6]],
        reward=[1.0, 0.0, 1.0],
        correct=[True, False, True],
    )
    args.update(overrides)
    return build_batch(**args)


def test_build_batch_produces_exactly_the_trajectory_schema():
    batch = _batch(actor_id="actor-7", data_source="math")
    assert batch.schema.equals(TRAJECTORY_SCHEMA)
    assert batch.column("actor_id").to_pylist() == ["actor-7"] * 3
    assert batch.column("times_sampled").to_pylist() == [0, 0, 0]
    assert batch.column("correct").to_pylist() == [True, False, True]


def test_group_size_defaults_to_rows_of_the_group_in_the_batch():
    assert _batch().column("group_size").to_pylist() == [2, 2, 1]


def test_unequal_per_token_lengths_are_rejected_naming_column_and_row():
    with pytest.raises(SchemaError, match=r"behavior_logprobs: row 1 .*'t1'.* 2 entries"):
        _batch(behavior_logprobs=[[-0.1, -0.2, -0.3], [-0.5, -0.6], [-1.0, -2.0]])
    with pytest.raises(SchemaError, match="token_versions: row 2"):
        _batch(token_versions=[[3, 4, 4], [2], [5]])


def test_empty_response_is_rejected():
    with pytest.raises(SchemaError, match="response_tokens: row 1 is empty"):
        _batch(response_tokens=[[5, 6, 7], [], [9, 9]], behavior_logprobs=[[0.0] * 3, [], [0.0] * 2],
               token_versions=[[0] * 3, [], [0] * 2])


def test_missing_and_extra_columns_are_named():
    batch = _batch()
    with pytest.raises(SchemaError, match=r"missing \['reward'\]"):
        validate_batch(batch.drop_columns(["reward"]))
    with pytest.raises(SchemaError, match=r"unexpected \['extra'\]"):
        validate_batch(batch.append_column("extra", pa.array([1, 2, 3])))


def test_nulls_are_rejected():
    batch = _batch()
    rewards = pa.array([1.0, None, 0.0], pa.float32())
    bad = batch.set_column(batch.schema.get_field_index("reward"), "reward", rewards)
    with pytest.raises(SchemaError, match="reward: 1 null"):
        validate_batch(bad)


def test_a_null_token_is_rejected_but_a_null_outside_the_rows_is_not_read():
    batch = _batch()
    at = batch.schema.get_field_index("response_tokens")
    # Three rows over a child of 7 tokens; the null sits in row 1, or past the last row's end.
    inside = pa.ListArray.from_arrays(pa.array([0, 3, 4, 6], pa.int32()),
                                      pa.array([5, 6, 7, None, 9, 9, 0], pa.int32()))
    with pytest.raises(SchemaError, match="response_tokens: null element inside a list"):
        validate_batch(batch.set_column(at, TRAJECTORY_SCHEMA.field("response_tokens"), inside))
    outside = pa.ListArray.from_arrays(pa.array([0, 3, 4, 6], pa.int32()),
                                       pa.array([5, 6, 7, 8, 9, 9, None], pa.int32()))
    kept = validate_batch(batch.set_column(at, TRAJECTORY_SCHEMA.field("response_tokens"), outside))
    assert kept.column("response_tokens").to_pylist() == [[5, 6, 7], [8], [9, 9]]


def test_castable_types_and_column_order_are_normalised():
    table = pa.Table.from_batches([_batch()])
    tokens = pa.array([[5, 6, 7], [8], [9, 9]], pa.list_(pa.int64()))
    table = table.set_column(table.schema.get_field_index("response_tokens"), "response_tokens", tokens)
    table = table.select(list(reversed(table.schema.names)))
    batch = validate_batch(table)
    assert batch.schema.equals(TRAJECTORY_SCHEMA)
    assert batch.column("response_tokens").to_pylist() == [[5, 6, 7], [8], [9, 9]]


def test_staleness_is_learner_version_minus_oldest_token_version():
    batch = _batch()  # the first and third rows span a weight update: they count from the oldest token
    assert min_token_version(batch).tolist() == [3, 2, 5]
    assert row_staleness(batch, 7).tolist() == [4, 5, 2]
    table = pa.Table.from_batches([batch.slice(1, 2), batch.slice(0, 1)])
    assert row_staleness(table, 7).tolist() == [5, 2, 4]
    assert staleness(7, np.array([3, 2, 5], np.int32)).tolist() == [4, 5, 2]
    assert row_staleness(batch, 5).tolist() == [2, 3, 0]


def test_a_batch_without_the_correct_column_is_refused_and_an_old_segment_batch_gains_it():
    batch = _batch(reward_info=['{"status": "correct"}', '{"status": "wrong"}', '{"score": 1.0}'])
    with pytest.raises(SchemaError, match=r"missing \['correct'\]"):
        validate_batch(batch.drop_columns(["correct"]))
    old = batch.drop_columns(["correct"])
    assert old.schema.equals(SCHEMA_WITHOUT_CORRECT)
    upgraded = add_correct_column(old)
    assert upgraded.schema.equals(TRAJECTORY_SCHEMA)
    assert upgraded.column("correct").to_pylist() == [True, False, False]
    assert upgraded.drop_columns(["correct"]).equals(old)


def test_created_at_is_a_utc_timestamp():
    when = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    batch = _batch(created_at=when)
    assert batch.column("created_at")[0].as_py() == when
    assert np.all(batch.column("group_size").to_numpy() >= 1)


def test_a_string_column_with_backward_offsets_is_rejected_before_any_kernel_reads_it():
    crafted = with_broken_offsets(synthetic_batch(groups=["a"]), "actor_id")
    with pytest.raises(SchemaError, match="malformed Arrow data: .*non-monotonic offset"):
        validate_batch(crafted)
    with pytest.raises(SchemaError, match="malformed Arrow data"):
        validate_batch(pa.Table.from_batches([crafted]))


@pytest.mark.parametrize("reward", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_reward_is_rejected(reward):
    with pytest.raises(SchemaError, match="reward: must be finite"):
        _batch(reward=[1.0, reward, 0.0])


def test_a_nan_behavior_logprob_is_rejected():
    with pytest.raises(SchemaError, match="behavior_logprobs: NaN"):
        _batch(behavior_logprobs=[[-0.1, float("nan"), -0.3], [-0.5], [-1.0, -2.0]])
    with pytest.raises(SchemaError, match="behavior_logprobs: NaN"):  # not hidden by a smaller value
        _batch(behavior_logprobs=[[-0.1, -0.2, -0.3], [float("-inf")], [-1.0, float("nan")]])
    assert _batch(behavior_logprobs=[[-0.1, -0.2, -0.3], [float("-inf")], [-1.0, -2.0]]).num_rows == 3


def test_a_group_size_beyond_the_bound_is_rejected_and_the_bound_itself_accepted():
    assert _batch(group_size=MAX_GROUP_SIZE).column("group_size")[0].as_py() == MAX_GROUP_SIZE
    with pytest.raises(SchemaError, match=f"group_size: must be in \\[1, {MAX_GROUP_SIZE}\\]"):
        _batch(group_size=2**31 - 1)


def test_token_versions_must_be_non_negative_and_fit_int32():
    with pytest.raises(SchemaError, match="token_versions: policy versions must be >= 0"):
        _batch(token_versions=[[3, 4, 4], [-1], [5, 6]])
    table = pa.Table.from_batches([_batch()])
    versions = pa.array([[2**64 - 1] * 3, [0], [0, 0]], pa.list_(pa.uint64()))
    at = table.schema.get_field_index("token_versions")
    with pytest.raises(SchemaError, match="trajectory types"):
        validate_batch(table.set_column(at, "token_versions", versions))
