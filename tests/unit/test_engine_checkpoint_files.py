"""Checkpoint bookkeeping on disk: the latest marker, atomic publish, keep-last-k."""

from __future__ import annotations

import json

import torch

from learners.checkpoint import STATE_FILE, json_safe, latest_tag, prune, publish, tag_for


def fake_tag(root, version: int, *, complete: bool = True):
    path = root / tag_for(version)
    path.mkdir(parents=True)
    if complete:
        (path / STATE_FILE).write_text(json.dumps({"version": version}))
    return path


def test_publish_renames_the_incoming_folder_and_moves_latest(tmp_path):
    incoming = tmp_path / ".incoming-step_00000007"
    incoming.mkdir()
    (incoming / STATE_FILE).write_text("{}")
    publish(tmp_path, incoming, "step_00000007")
    assert not incoming.exists() and (tmp_path / "step_00000007" / STATE_FILE).is_file()
    assert latest_tag(tmp_path) == "step_00000007"
    assert not list(tmp_path.glob(".latest.tmp"))


def test_prune_keeps_the_newest_k_complete_checkpoints(tmp_path):
    for v in (10, 20, 30, 40):
        fake_tag(tmp_path, v)
    (tmp_path / "latest").write_text(tag_for(40))
    prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [tag_for(30), tag_for(40)]


def test_a_half_written_tag_is_never_the_latest(tmp_path):
    assert latest_tag(tmp_path) is None
    fake_tag(tmp_path, 5, complete=False)
    (tmp_path / "latest").write_text(tag_for(5))
    assert latest_tag(tmp_path) is None


def test_scheduler_state_becomes_plain_json():
    state = {"last_epoch": 3, "base_lrs": [0.1], "step": torch.tensor(2.0), "lr_lambdas": [lambda s: s]}
    assert json_safe(state) == {"last_epoch": 3, "base_lrs": [0.1], "step": 2.0, "lr_lambdas": [None]}
