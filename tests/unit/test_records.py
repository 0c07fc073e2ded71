"""The records crossing process boundaries refuse misspelt and missing keys, name them, and
keep the JSON users read (metrics rows, status) as it was."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from async_rl.config_io import load_config
from async_rl.job.plot import PANELS
from async_rl.records import (
    ActorMetricsRecord,
    BufferSummary,
    HeldoutRecord,
    JobStatus,
    LearnerLaunch,
    LearnerStepRecord,
)


def learner_launch(**changes):
    fields = dict(config=load_config("tiny", []), run_dir="/tmp/run", model_dir="/tmp/run/model",
                  buffer_address="tcp://127.0.0.1:5555", stop_token_ids=[0, 2], resume=True)
    return {**fields, **changes}


def test_a_launch_spec_with_a_misspelt_key_fails_naming_it():
    fields = learner_launch()
    fields["resum"] = fields.pop("resume")
    with pytest.raises(ValidationError) as err:
        LearnerLaunch.model_validate(fields)
    message = str(err.value)
    assert "resum\n" in message and "Extra inputs are not permitted" in message
    assert "resume\n" in message and "Field required" in message


def test_a_launch_spec_crosses_a_json_wire_and_comes_back_equal():
    launch = LearnerLaunch(**learner_launch())
    wire = json.dumps(launch.model_dump(mode="json"))  # learners.launch's command line
    back = LearnerLaunch.model_validate(json.loads(wire))
    assert back == launch and back.stop_token_ids == (0, 2) and back.resume is True
    assert LearnerLaunch.model_validate(launch) is launch  # a Ray actor gets the record itself


def test_pick_takes_a_records_keys_out_of_a_larger_mapping_and_names_a_missing_one():
    stats = {"rows": 8, "groups": 2, "groups_live": 2, "groups_sampleable": 1, "bytes": 100, "learner_version": 3,
             "groups_sampled_total": 4, "evicted_rows": {"stale": 1}, "prompts": None, "segments": 1, "dir": "/x",
             "leases": {"outstanding": 1, "groups": 2}}
    summary = BufferSummary.pick(stats)
    assert summary.model_dump() == {k: v for k, v in stats.items() if k not in ("segments", "dir")}
    del stats["groups_live"]
    with pytest.raises(ValidationError, match="groups_live\n  Field required"):
        BufferSummary.pick(stats)


def test_the_actors_metrics_carry_every_key_of_its_metrics_row():
    from actors.rollout import Actor
    from async_rl.config import ActorsConfig

    actor = Actor(actor_id="actor-0", engine=SimpleNamespace(version=3), loop=None, prompts=iter([]), score=None,
                  buffer_address="", cfg=ActorsConfig(), reward_timeout_s=1.0)
    row = ActorMetricsRecord.pick(actor.metrics(), weights_streamed=1, weights_from_shm=0,
                                  weights_bytes_streamed=10, time=5.0).row()
    assert row["weight_version"] == 3 and row["weight_update_s"] is None and row["time"] == 5.0


def test_a_learner_row_keeps_its_keys_with_the_trainers_figures_beside_them():
    record = LearnerStepRecord(step=4, version=4, ranks=2, reward_mean=0.5, accuracy=0.25, staleness_mean=1.0,
                               staleness_max=2.0, response_tokens=96, groups=2, groups_all_equal=1, step_s=1.5, sample_wait_s=0.2,
                               busy_fraction=0.9, publish_s=None, train={"loss": 0.1, "clip_low": 0.0})
    assert list(record.row()) == [
        "step", "version", "ranks", "reward_mean", "accuracy", "staleness_mean", "staleness_max",
        "response_tokens", "groups", "groups_all_equal", "step_s", "sample_wait_s", "busy_fraction", "publish_s", "loss", "clip_low"]
    with pytest.raises(ValidationError, match="busy\n  Extra inputs"):
        LearnerStepRecord(**{**record.model_dump(), "busy": 0.9})


def test_reading_a_metrics_row_tolerates_old_files_but_not_an_undeclared_key():
    view = HeldoutRecord.read({"version": 5, "accuracy": 0.6, "role": "eval", "extra": 1})
    assert (view.version, view.accuracy, view.eval_s) == (5, 0.6, None)
    with pytest.raises(AttributeError):
        _ = view.heldout_accuracy


def test_the_status_json_a_user_reads_keeps_its_keys():
    status = JobStatus(pids={"actor-0": 11}, buffer_stats=None, actors=[0], learner_ranks=1, finished=False,
                       failure=None, restarts={"actor-0": 1}, events=["10:00:00 stopped"],
                       buffer_address="tcp://127.0.0.1:1", weights_address="tcp://127.0.0.1:2", buffer_pid=7)
    shown = status.model_dump(mode="json")
    assert set(shown) == {"pids", "buffer_stats", "actors", "actors_pending", "nodes", "learner_ranks", "finished",
                          "failure", "restarts", "events", "buffer_address", "weights_address", "buffer_pid"}
    assert JobStatus.model_validate(json.loads(json.dumps(shown))) == status


def test_every_key_the_plot_draws_is_declared_by_its_roles_record():
    records = {"learner": LearnerStepRecord, "eval": HeldoutRecord, "actor": ActorMetricsRecord}
    for _, role, x_key, y_keys in PANELS:
        declared = set(records[role].model_fields) | {"elapsed_min"}
        assert {x_key, *y_keys} <= declared, (role, x_key, y_keys)
