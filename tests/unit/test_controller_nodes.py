"""The controller's view of the cluster's nodes: a node lost or joined is one event, a role
waiting for a place no live node has is given up, and ``status`` lists the nodes. Ray's node
table and the actors are stand-ins: the logic is the controller's own."""

from __future__ import annotations

import pytest

from async_rl.config import Config
from async_rl.job import controller as controller_module
from async_rl.job.controller import Controller
from async_rl.job.placement import ClusterNode
from async_rl.records import ControllerLaunch


def node(address: str, node_id: str, alive: bool = True, death: str = "", **resources: float) -> ClusterNode:
    return ClusterNode(node_id=node_id, address=address, alive=alive, resources=resources, death=death)


@pytest.fixture
def ctl(tmp_path, monkeypatch):
    cfg = Config()
    cfg.actors.resources = {"node_b": 0.01}
    cfg.actors.cpus = 1
    ctl = Controller(ControllerLaunch(config=cfg, run_dir=tmp_path, model_dir=tmp_path, stop_token_ids=(0,)))
    (tmp_path / "logs").mkdir()
    ctl.table = []
    ctl.killed, ctl.released = [], []
    monkeypatch.setattr(controller_module.placement, "cluster_nodes", lambda: list(ctl.table))
    monkeypatch.setattr(controller_module, "kill_roles", lambda handles: ctl.killed.extend(handles))
    monkeypatch.setattr(Controller, "pids", lambda self: {"actor-0": 100})  # actor 0 is placed, actor 1 waits
    monkeypatch.setattr(Controller, "_release_prompts", lambda self, actor_id: self.released.append(actor_id))
    return ctl


def texts(ctl: Controller) -> list[str]:
    return [event.split(" ", 1)[1] for event in ctl.events]


def test_a_lost_node_is_one_event_and_an_actor_waiting_for_it_is_given_up(ctl):
    a, b = node("10.0.0.1", "aaaa0001", CPU=2, node_a=1), node("10.0.0.2", "bbbb0001", CPU=2, node_b=1)
    ctl.table = [a, b]
    ctl._read_nodes()
    assert texts(ctl) == ["Ray cluster: 2 live node(s): 10.0.0.1, 10.0.0.2"]
    ctl.actors = {0: ("running", None), 1: ("waiting", None)}

    ctl.table = [a, node("10.0.0.2", "bbbb0001", alive=False, death="health check failed", CPU=2, node_b=1)]
    ctl._read_nodes()
    ctl._read_nodes()  # a second read says nothing new
    assert texts(ctl)[1:] == [
        "node 10.0.0.2 (bbbb0001) lost: health check failed",
        "actor 1 given up while pending placement: no live node has CPU 1, node_b 0.01 (live nodes: 10.0.0.1: CPU 2, node_b 0)",
    ]
    # The placed actor is left to its own death report (its ref fails); the pending one is cancelled.
    assert ctl.killed == ["waiting"] and ctl.released == [1] and list(ctl.actors) == [0]
    assert [(n.address, n.alive, n.death) for n in ctl.nodes.values()] == [
        ("10.0.0.1", True, ""), ("10.0.0.2", False, "health check failed")]


def test_a_rejoined_node_is_a_new_node_and_a_vanished_one_counts_as_lost(ctl):
    a, b = node("10.0.0.1", "aaaa0001", CPU=2), node("10.0.0.2", "bbbb0001", CPU=2, node_b=1)
    ctl.table = [a, b]
    ctl._read_nodes()
    ctl.table = [a]  # Ray dropped B from its table
    ctl._read_nodes()
    ctl.table = [a, node("10.0.0.2", "bbbb0002", CPU=2, node_b=1)]
    ctl._read_nodes()
    assert texts(ctl)[1:] == ["node 10.0.0.2 (bbbb0001) lost: Ray marks it dead", "node 10.0.0.2 (bbbb0002) joined"]
    assert [(n.node_id, n.alive) for n in ctl.nodes.values()] == [
        ("aaaa0001", True), ("bbbb0001", False), ("bbbb0002", True)]
    assert ctl.killed == []  # no actor was waiting


def test_scale_refuses_in_one_line_when_no_live_node_can_hold_an_actor(ctl):
    ctl.table = [node("10.0.0.1", "aaaa0001", CPU=2, node_a=1)]
    with pytest.raises(controller_module.PlacementError) as refused:
        ctl.scale_actors(2)
    assert str(refused.value) == (
        "scale actors 2: an actor (actors.cpus, actors.gpus, actors.resources) cannot be placed: no live node "
        "has CPU 1, node_b 0.01 (live nodes: 10.0.0.1: CPU 2, node_b 0); none started")
    assert ctl.actors == {}


def test_an_unreachable_actor_is_replaced_only_once_ray_has_a_verdict_on_its_node(ctl, monkeypatch):
    import time

    started = []
    monkeypatch.setattr(Controller, "_start_actor", lambda self, actor_id=None: started.append(actor_id))
    a, b = node("10.0.0.1", "aaaa0001", CPU=2, node_a=1), node("10.0.0.2", "bbbb0001", CPU=2, node_b=1)
    ctl.table = [a, b]
    ctl._read_nodes()
    ctl.unreachable = {0: ("silent", time.monotonic())}
    ctl._settle_unreachable()
    assert list(ctl.unreachable) == [0] and ctl.killed == []  # no verdict yet: B is still alive to Ray

    ctl.table = [a, node("10.0.0.2", "bbbb0001", alive=False, death="health check failed", CPU=2, node_b=1)]
    ctl._read_nodes()
    ctl._settle_unreachable()
    assert texts(ctl)[-1] == ("actor 0 gone (its node was lost); not restarted: no live node has CPU 1, node_b 0.01 "
                              "(live nodes: 10.0.0.1: CPU 2, node_b 0); `async-rl scale actors N` starts actors again "
                              "once a node has them")
    assert ctl.unreachable == {} and ctl.killed == ["silent"] and ctl.released == [0] and started == []


def test_an_actor_silent_past_the_wait_with_no_node_lost_is_replaced_where_it_fits(ctl, monkeypatch):
    import time

    started = []
    monkeypatch.setattr(Controller, "_start_actor", lambda self, actor_id=None: started.append(actor_id))
    ctl.table = [node("10.0.0.1", "aaaa0001", CPU=2, node_a=1), node("10.0.0.3", "cccc0001", CPU=2, node_b=1)]
    ctl._read_nodes()
    ctl.unreachable = {1: ("silent", time.monotonic() - controller_module.UNREACHABLE_WAIT_S - 1)}
    ctl._settle_unreachable()
    assert texts(ctl)[-1] == "actor 1 gone (unreachable for 60 s); restarting"
    assert ctl.killed == ["silent"] and ctl.released == [1] and started == [1]
