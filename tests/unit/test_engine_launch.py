"""Starting learner ranks: env per rank, failure propagation, no leftovers."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from async_rl.commands.sft import split_data_arg
from learners.launch import RENDEZVOUS_ENV, LaunchError, launch, rendezvous_file, resolve, run_rank


def write_env(payload: dict) -> None:
    keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", RENDEZVOUS_ENV, "GLOO_SOCKET_IFNAME")
    out = Path(payload["out"]) / f"rank{os.environ['RANK']}.json"
    out.write_text(json.dumps({k: os.environ[k] for k in keys}))


def fail_on_rank_one(payload: dict) -> None:
    if os.environ["RANK"] == "1":
        raise SystemExit(3)
    time.sleep(60)  # rank 0 would wait forever in a collective; the launcher must stop it


def test_each_rank_gets_its_own_distributed_env(tmp_path):
    launch("test_engine_launch:write_env", 3, {"out": str(tmp_path)}, timeout_s=120)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert [s["RANK"] for s in seen] == ["0", "1", "2"]
    assert [s["LOCAL_RANK"] for s in seen] == ["0", "1", "2"]
    assert {s["WORLD_SIZE"] for s in seen} == {"3"}
    assert {s["MASTER_ADDR"] for s in seen} == {"127.0.0.1"}
    assert len({s["MASTER_PORT"] for s in seen}) == 1
    # One rendezvous file for the group (torch's TCP store would listen on every interface),
    # removed when the group is done; gloo pinned to loopback.
    assert len({s[RENDEZVOUS_ENV] for s in seen}) == 1
    assert not Path(seen[0][RENDEZVOUS_ENV]).exists()
    assert {s["GLOO_SOCKET_IFNAME"] for s in seen} == {"lo"}


def test_only_a_group_on_one_machine_meets_through_a_fresh_file():
    first, second = rendezvous_file("127.0.0.1"), rendezvous_file("127.0.0.1")
    assert first != second and os.path.isabs(first)
    assert rendezvous_file("10.0.0.5") == ""
    assert os.path.isabs(rendezvous_file("10.0.0.5", same_machine=True))  # a private local Ray


def test_a_failing_rank_fails_the_launch_and_stops_its_peers():
    start = time.monotonic()
    with pytest.raises(LaunchError, match="rank 1 exited with code 3"):
        launch("test_engine_launch:fail_on_rank_one", 2, {}, timeout_s=120)
    assert time.monotonic() - start < 50


def test_the_rank_entry_point_needs_the_distributed_env(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(LaunchError, match="MASTER_ADDR"):
        run_rank("test_engine_launch:write_env", {})
    with pytest.raises(ValueError, match="module:function"):
        resolve("no_colon_here")


def test_sft_command_takes_data_apart_from_the_config_overrides():
    assert split_data_arg(["data=rows.jsonl", "learner.sft.lr=0.01", "tiny"]) == (
        "rows.jsonl", ["learner.sft.lr=0.01", "tiny"])
    assert split_data_arg(["data.seed=3"]) == (None, ["data.seed=3"])
