"""The controller: a named Ray actor that starts, supervises, scales, stops and reports on the
roles. Where each role runs is ``placement.py``'s; the held-out evaluator's handling is
``heldout.py``'s; fault injection for drills is ``faults.py``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from async_rl.job import placement
from async_rl.job.heldout import HeldoutEvaluator
from async_rl.job.placement import PlacementError
from async_rl.job.roles import kill_roles
from async_rl.job.runfolder import clear_stop, next_launch, request_stop
from async_rl.records import (
    ActorLaunch,
    BufferSummary,
    ControllerLaunch,
    EvaluatorLaunch,
    HeldoutRecord,
    JobAddresses,
    JobStatus,
    LearnerLaunch,
    LearnerResult,
    NodeState,
)

log = logging.getLogger("async_rl.controller")
# Restarts of one role within this window beyond MAX_RESTARTS stop the job instead of looping.
RESTART_WINDOW_S = 300.0
MAX_RESTARTS = 5
# The buffer's stats scan every stored row; the live view asks at most this often.
BUFFER_STATS_EVERY_S = 10.0
# How long a graceful stop waits for each role before killing it.
STOP_GRACE_S = 120.0
# How long `scale actors` waits for new actors to be placed before answering (those still
# waiting are reported pending: Ray starts them when a node has room).
PLACE_WAIT_S = 30.0
# How often supervision reads Ray's node table (a lost node is noticed by Ray's health check first).
NODES_EVERY_S = 5.0
# An actor Ray reports unreachable may be on a node that is dying; Ray's health check declares
# such a node dead well within this (about 15-30 s at Ray's defaults), so its restart waits for that
# verdict instead of placing it on the dying node again.
UNREACHABLE_WAIT_S = 60.0


class Controller:
    """Start: buffer service → data cursor (``buffer/cursor.py``: prompts in flight when the job
    last died and not durable in the buffer are handed out again first) → learner group (rank 0
    binds the weight publisher on a port the controller chose, so actors can connect before it
    is up) → actors → the held-out evaluator.

    Supervise: a dead actor is restarted (its acknowledged trajectories are already durable in
    the buffer; the prompts it held and had not stored go back to the cursor, to be handed out
    before anything new), unless no live node has its resources (its node was lost): then the
    fleet is one smaller until ``scale actors`` asks again. An actor Ray reports unreachable is
    replaced only once Ray has said whether its node is lost (or UNREACHABLE_WAIT_S passed). A dead learner group restarts from
    its last checkpoint (the buffer is untouched), a dead evaluator restarts. A node Ray declares
    dead, or one that joins, is one event; the learner keeps training on what the buffer holds.

    Stop, in this order: learners (asked through the STOP file; they checkpoint and export) →
    evaluator → actors (each drains its groups and flushes acknowledged rows) → their processes
    end → the data cursor is saved → the buffer service flushes and stops. So nothing
    acknowledged is lost and no trajectory is trained twice.
    """

    def __init__(self, launch: ControllerLaunch):
        self.cfg = launch.config.model_copy(deep=True)  # the weights' address is filled in at start
        self.run_dir = launch.run_dir
        self.model_dir = launch.model_dir
        self.stop_token_ids = launch.stop_token_ids
        self.buffer = None
        self.weights_address = ""
        self.learners: list = []
        self.learner_refs: list = []
        self.learner_ranks = self.cfg.learner.ranks
        self.actors: dict[int, tuple[Any, Any]] = {}
        self.next_actor_id = 0
        self.actor_starts: dict[int, int] = {}  # per actor id: starts in this launch (restarts + 1)
        self.launch = 0
        self.restarts: dict[str, list[float]] = {}
        self.events: list[str] = []
        self.pid_refs: dict[str, Any] = {}
        self.finished = False
        self.failure: str | None = None
        self.learner_group = None  # the learner ranks' placement group
        self.heldout: HeldoutEvaluator | None = None
        self.final_version: int | None = None
        self.rendezvous = ""  # the learner group's rendezvous file ("" when ranks span machines)
        self.cursor = None  # the data cursor: which prompts are handed out, to whom
        self.nodes: dict[str, NodeState] = {}  # by Ray node id: alive, or lost during the job
        self._nodes_read_at = 0.0
        self._node_lost_at = float("-inf")  # when the node table last showed a node lost
        self.unreachable: dict[int, tuple[Any, float]] = {}  # actor id → (handle, since when)
        self._lock = threading.RLock()
        self._cursor_lock = threading.Lock()  # leases never wait for a scale or a stop

    # ------------------------------------------------------------------ start

    def start(self, resume: bool) -> JobAddresses:
        from buffer.service import start_service

        host = self.cfg.cluster.bind_host
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.launch = next_launch(self.run_dir)
        self._read_nodes()
        self.buffer = start_service(
            self.run_dir / "buffer", self.cfg.buffer, max_staleness=self.cfg.algorithm.staleness.max_staleness,
            host=host, seed=self.cfg.run.seed,
            log_file=self.run_dir / "logs" / "buffer.log", curve_keys_dir=self.cfg.weights.curve_keys_dir,
        )
        self._open_cursor()
        self._start_learners(self.learner_ranks)
        for _ in range(self.cfg.actors.count):
            self._start_actor()
        if self.cfg.learner.eval.every > 0:
            self.heldout = HeldoutEvaluator(
                EvaluatorLaunch(config=self.cfg, run_dir=self.run_dir, model_dir=self.model_dir,
                                weights_address=self.weights_address, resume=resume),
                event=self._event, allow_restart=self._allow_restart,
            )
            self.heldout.start()
        return self.addresses()

    def _open_cursor(self) -> None:
        """Open the run's data cursor; what it lists as in flight and the buffer holds is done."""
        from async_rl.job.actor_role import train_prompts
        from async_rl.seeds import prompt_order_seed
        from async_rl.tasks.dataset import load_rows
        from buffer.cursor import PromptCursor

        rows, _ = load_rows(train_prompts(self.cfg, self.run_dir))
        seed = prompt_order_seed(self.cfg.run.seed, self.cfg.data.seed)
        self.cursor = PromptCursor.open(self.run_dir / "buffer", n_prompts=len(rows), seed=seed)
        again = self._not_durable(self.cursor.outstanding())
        rec = self.cursor.record
        self._event(f"prompt cursor: epoch {rec.epoch}, {rec.handed}/{rec.n_prompts} handed out, "
                    f"{len(again)} in flight to hand out again first")

    def _not_durable(self, group_ids: list[str]) -> list[str]:
        """Settle the groups the buffer holds; returns the others (still to be trained)."""
        if not group_ids:
            return []
        with self._lock:
            durable = self._buffer_client_open().durable_groups(group_ids)
        with self._cursor_lock:
            self.cursor.settle([g for g, d in zip(group_ids, durable, strict=True) if d])
            self.cursor.save()
        return [g for g, d in zip(group_ids, durable, strict=True) if not d]

    def lease_prompts(self, holder: str, n: int) -> list[list]:
        """``n`` prompts for an actor as ``[group_id, row index]``; the cursor is on disk first."""
        with self._cursor_lock:
            return [[gid, index] for gid, index in self.cursor.lease(holder, n)]

    def prompts_settled(self, holder: str, group_ids: list[str], skipped: bool = False) -> None:
        """An actor's groups the buffer acknowledged (or that it skipped)."""
        with self._cursor_lock:
            self.cursor.settle(group_ids, skipped=skipped)

    def _release_prompts(self, actor_id: int) -> None:
        """The prompts a gone actor held and did not store go to the front of the cursor."""
        with self._cursor_lock:
            held = self.cursor.outstanding(f"actor-{actor_id}")
        try:
            again = self._not_durable(held)
        except Exception as err:  # no answer: hand all out again (the buffer drops a second copy)
            self._drop_buffer_client()
            self._event(f"actor {actor_id}: buffer did not say which prompts it stored ({type(err).__name__})")
            again = held
        if again:
            with self._cursor_lock:
                self.cursor.release(again)
            self._event(f"actor {actor_id}: {len(again)} prompt(s) it held go out again first")

    def addresses(self) -> JobAddresses:
        return JobAddresses(**self._address_fields())

    def _address_fields(self) -> dict[str, Any]:
        return {
            "buffer_address": self.buffer.address if self.buffer else None,
            "weights_address": self.weights_address,
            "buffer_pid": self.buffer.pid if self.buffer else None,
        }

    def _start_learners(self, ranks: int) -> None:
        from learners.launch import RENDEZVOUS_ENV, remove_rendezvous, rendezvous_file

        clear_stop(self.run_dir, "learner")
        cfg = self.cfg.model_copy(deep=True)
        cfg.learner.ranks = ranks
        group = placement.reserve_learner_group(self.cfg.cluster, cfg.learner)
        # Rank 0's node: the learner group's master, and (the first group's) weight publisher.
        node_host, (master_port, weights_port) = placement.node_ports(
            group, 0, count=2, here=self.cfg.cluster.bind_host)
        if not self.weights_address:  # fixed for the job: actors keep subscribing to it
            self.cfg.weights.host = self.cfg.weights.host or node_host
            self.cfg.weights.port = self.cfg.weights.port or weights_port
            self.weights_address = f"tcp://{self.cfg.weights.host}:{self.cfg.weights.port}"
        cfg.weights = self.cfg.weights.model_copy()
        remove_rendezvous(self.rendezvous)  # the previous group's, if it was killed
        same_machine = len(set(placement.bundle_nodes(group))) == 1  # every rank on one node
        self.rendezvous = rendezvous_file(node_host, same_machine=same_machine)
        launch = LearnerLaunch(config=cfg, run_dir=self.run_dir, model_dir=self.model_dir,
                               buffer_address=self.buffer.address, stop_token_ids=self.stop_token_ids,
                               resume=True)
        self.learners, self.learner_refs = [], []
        for rank in range(ranks):
            handle = placement.start_learner_rank(group, rank, cfg.learner, same_machine=same_machine)
            env = {
                "MASTER_ADDR": node_host, "MASTER_PORT": str(master_port),
                "RANK": str(rank), "WORLD_SIZE": str(ranks), "LOCAL_RANK": "0",
                **({RENDEZVOUS_ENV: self.rendezvous} if self.rendezvous else {}),
            }
            self.learners.append(handle)
            self.learner_refs.append(handle.run.remote(env, launch))
            self.pid_refs[f"learner-{rank}"] = handle.pid.remote()
        self.learner_group = group
        self.learner_ranks = ranks
        self._event(f"learner group started with {ranks} rank(s)")

    def _start_actor(self, actor_id: int | None = None) -> int:
        if actor_id is None:
            actor_id, self.next_actor_id = self.next_actor_id, self.next_actor_id + 1
        incarnation = self.actor_starts.get(actor_id, 0)
        self.actor_starts[actor_id] = incarnation + 1
        launch = ActorLaunch(
            config=self.cfg, actor_id=actor_id,
            sampling_stream=(self.cfg.run.seed, actor_id, self.launch, incarnation),
            run_dir=self.run_dir, model_dir=self.model_dir, buffer_address=self.buffer.address,
            weights_address=self.weights_address, first_version=self._checkpointed_version(),
        )
        handle = placement.start_actor(self.cfg.actors, launch)
        self.actors[actor_id] = (handle, handle.run.remote())
        self.pid_refs[f"actor-{actor_id}"] = handle.pid.remote()
        self._event(f"actor {actor_id} started")
        return actor_id

    def _checkpointed_version(self) -> int:
        """The version a (re)started learner group resumes from: the newest checkpoint's, or 0."""
        from learners.checkpoint import latest_tag, version_of

        tag = latest_tag(self.run_dir / "checkpoints")
        return version_of(tag) if tag else 0

    # ------------------------------------------------------------------ supervise

    def supervise(self) -> JobStatus:
        """One pass: restart what died; mark the job finished when the learner group is done."""
        import ray

        with self._lock:
            if time.monotonic() - self._nodes_read_at >= NODES_EVERY_S:
                self._read_nodes()
            for actor_id, (_, ref) in list(self.actors.items()):
                if actor_id in self.actors and ray.wait([ref], timeout=0)[0]:  # not given up meanwhile
                    self._actor_exited(actor_id, ref)
            self._settle_unreachable()
            done, _ = ray.wait(self.learner_refs, num_returns=len(self.learner_refs), timeout=0)
            if done and not self.finished:
                self._learners_exited(done)
            if self.heldout is not None:
                self.heldout.check()
        return self.status()

    def _actor_exited(self, actor_id: int, ref) -> None:
        import ray

        handle, _ = self.actors.pop(actor_id)
        try:
            result = ray.get(ref)
        except ray.exceptions.ActorUnavailableError:  # its node may be dying: wait for Ray's verdict
            self.unreachable[actor_id] = (handle, time.monotonic())
            self._event(f"actor {actor_id} unreachable; waiting up to {UNREACHABLE_WAIT_S:.0f} s for Ray "
                        "to say whether its node is alive")
        except Exception as err:  # RayActorError when killed or its node died, or the loop raised
            self._replace_actor(actor_id, handle, f"actor {actor_id} died ({type(err).__name__})", detail=str(err))
        else:
            self._event(f"actor {actor_id} finished: {result.model_dump()}")

    def _settle_unreachable(self) -> None:
        """Replace each unreachable actor once a node was lost after it went silent, or its wait is over."""
        for actor_id, (handle, since) in list(self.unreachable.items()):
            node_lost = self._node_lost_at >= since
            if not node_lost and time.monotonic() - since < UNREACHABLE_WAIT_S:
                continue
            del self.unreachable[actor_id]
            why = "its node was lost" if node_lost else f"unreachable for {UNREACHABLE_WAIT_S:.0f} s"
            self._replace_actor(actor_id, handle, f"actor {actor_id} gone ({why})")

    def _replace_actor(self, actor_id: int, handle, gone: str, detail: str = "") -> None:
        """A dead or lost actor's prompts go out again; it restarts unless no live node could hold it."""
        kill_roles([handle])  # an unreachable actor may still run: never two of one id
        nowhere = self._no_place_for_actors(self._read_nodes())
        if nowhere:
            self._event(f"{gone}; not restarted: {nowhere}; `async-rl scale actors N` starts actors "
                        "again once a node has them", detail=detail)
        else:
            self._event(f"{gone}; restarting", detail=detail)
        self._release_prompts(actor_id)
        if not nowhere and self._allow_restart(f"actor-{actor_id}"):
            self._start_actor(actor_id)

    def _read_nodes(self) -> list[placement.ClusterNode]:
        """Ray's node table; a node lost or joined since the last read is one event. Actors still
        waiting to be placed when no live node has their resources any more are given up."""
        nodes = placement.cluster_nodes()
        self._nodes_read_at = time.monotonic()
        first, lost = not self.nodes, False
        listed = {node.node_id: node for node in nodes}
        for node_id, seen in list(self.nodes.items()):
            now = listed.get(node_id)
            if seen.alive and (now is None or not now.alive):
                death = (now and now.death) or "Ray marks it dead"
                self.nodes[node_id] = seen.model_copy(update={"alive": False, "death": death})
                self._event(f"node {seen.address} ({node_id[:8]}) lost: {death}")
                lost, self._node_lost_at = True, time.monotonic()
        for node in nodes:
            if node.alive and node.node_id not in self.nodes:
                self.nodes[node.node_id] = NodeState(node_id=node.node_id, address=node.address, alive=True)
                if not first:
                    self._event(f"node {node.address} ({node.node_id[:8]}) joined")
        if first:
            self._event(f"Ray cluster: {len(self.nodes)} live node(s): "
                        + ", ".join(sorted(n.address for n in self.nodes.values())))
        if lost:
            self._give_up_unplaceable_actors(nodes)
        return nodes

    def _give_up_unplaceable_actors(self, nodes: list[placement.ClusterNode]) -> None:
        """Actors pending placement when no live node has their resources would wait forever."""
        nowhere = self._no_place_for_actors(nodes)
        if nowhere is None:
            return
        for actor_id in self._pending_actors(self.pids()):
            handle, _ = self.actors.pop(actor_id)
            kill_roles([handle])
            self._event(f"actor {actor_id} given up while pending placement: {nowhere}")
            self._release_prompts(actor_id)

    def _learners_exited(self, done: list) -> None:
        import ray

        try:
            results: list[LearnerResult] = ray.get(done)
        except Exception as err:
            self._event(
                f"learner group failed ({type(err).__name__}: {str(err)[:200]}); restarting from checkpoint",
                detail=str(err),
            )
            self._release_learners()
            if self._allow_restart("learner"):
                self._start_learners(self.learner_ranks)
            return
        if len(done) == len(self.learner_refs):
            self._event(f"learner group finished: {results[0].model_dump()}")
            self.final_version = results[0].version
            self.finished = True

    def _allow_restart(self, role: str) -> bool:
        now = time.time()
        recent = [t for t in self.restarts.get(role, []) if now - t < RESTART_WINDOW_S] + [now]
        self.restarts[role] = recent
        if len(recent) > MAX_RESTARTS:
            self.failure = f"{role} died {len(recent)} times in {RESTART_WINDOW_S:.0f} s; giving up"
            self._event(self.failure)
            return False
        return True

    # ------------------------------------------------------------------ report

    def pids(self) -> dict[str, int]:
        """PIDs of the live roles whose processes have started (for drills and status)."""
        import ray

        live = {f"actor-{i}" for i in self.actors} | {f"learner-{r}" for r in range(len(self.learners))}
        refs = dict(self.pid_refs)
        if self.heldout is not None and self.heldout.running:
            live.add("evaluator")
            refs["evaluator"] = self.heldout.pid_ref
        out = {}
        for role, ref in refs.items():
            if role not in live:
                continue
            done, _ = ray.wait([ref], timeout=0)
            if done:
                try:
                    out[role] = ray.get(ref)
                except Exception:  # died before answering
                    pass
        return out

    def buffer_stats(self) -> BufferSummary | None:
        """The buffer service's summary (rows, groups, …), or None if it does not answer."""
        if self.buffer is None:
            return None
        cached = getattr(self, "_buffer_stats", None)
        if cached is not None and time.monotonic() - cached[0] < BUFFER_STATS_EVERY_S:
            return cached[1]
        with self._lock:
            try:
                stats = self._buffer_client_open().stats()
            except Exception:  # a restarting buffer; the next tick asks again
                self._drop_buffer_client()
                return None
        summary = BufferSummary.pick(stats)
        self._buffer_stats = (time.monotonic(), summary)
        return summary

    def _buffer_client_open(self):
        """The controller's buffer client (call under ``_lock``: a ZMQ socket has one user)."""
        from buffer.client import BufferClient

        if getattr(self, "_buffer_client", None) is None:
            self._buffer_client = BufferClient(self.buffer.address, timeout_s=5.0,
                                               curve_keys_dir=self.cfg.weights.curve_keys_dir)
        return self._buffer_client

    def _drop_buffer_client(self) -> None:
        if getattr(self, "_buffer_client", None) is not None:
            self._buffer_client.close()
            self._buffer_client = None

    def _no_place_for_actors(self, nodes: list[placement.ClusterNode]) -> str | None:
        """Why no live node could hold an actor now (``placement.unplaceable``), else None."""
        return placement.unplaceable(placement.actor_resources(self.cfg.actors), nodes)

    def _pending_actors(self, pids: dict[str, int]) -> list[int]:
        """Actors whose process has not answered yet: Ray has not placed (and started) them."""
        return sorted(i for i in self.actors if f"actor-{i}" not in pids)

    def status(self) -> JobStatus:
        pids = self.pids()
        return JobStatus(
            pids=pids,
            buffer_stats=self.buffer_stats(),
            actors=sorted(self.actors),
            actors_pending=self._pending_actors(pids),
            nodes=list(self.nodes.values()),
            learner_ranks=self.learner_ranks,
            finished=self.finished,
            failure=self.failure,
            restarts={k: len(v) for k, v in self.restarts.items()},
            events=self.events[-20:],
            **self._address_fields(),
        )

    # ------------------------------------------------------------------ scale

    def scale_actors(self, count: int) -> JobStatus:
        """Start or stop actors until ``count`` remain. New ones are given up to PLACE_WAIT_S to
        be placed; the reply lists those still waiting in ``actors_pending``. Refused, starting
        none, when no live node has an actor's resources."""
        import ray

        with self._lock:
            if len(self.actors) < count:
                nowhere = self._no_place_for_actors(self._read_nodes())
                if nowhere:
                    raise PlacementError(f"scale actors {count}: an actor (actors.cpus, actors.gpus, "
                                         f"actors.resources) cannot be placed: {nowhere}; none started")
            started = [self._start_actor() for _ in range(count - len(self.actors))]
            pid_refs = [self.pid_refs[f"actor-{i}"] for i in started]
            while len(self.actors) > count:
                actor_id = max(self.actors)
                handle, ref = self.actors.pop(actor_id)
                ray.get(handle.stop.remote(), timeout=STOP_GRACE_S)
                ray.wait([ref], timeout=STOP_GRACE_S)
                kill_roles([handle])
                self._event(f"actor {actor_id} removed")
                self._release_prompts(actor_id)
        if pid_refs:  # outside the lock: supervision goes on meanwhile
            ray.wait(pid_refs, num_returns=len(pid_refs), timeout=PLACE_WAIT_S)
        return self.status()

    def scale_learners(self, ranks: int) -> JobStatus:
        """Checkpoint, stop the group, restart it with ``ranks`` ranks from that checkpoint."""
        import ray

        with self._lock:
            request_stop(self.run_dir, "learner")
            ray.wait(self.learner_refs, num_returns=len(self.learner_refs), timeout=STOP_GRACE_S)
            self._release_learners()
            previous = self.learner_ranks
            try:
                self._start_learners(ranks)
            except PlacementError as err:
                self._event(f"{err}; restarting with {previous} rank(s)")
                self._start_learners(previous)
                raise
        return self.status()

    # ------------------------------------------------------------------ stop

    def stop(self) -> JobStatus:
        """Stop everything in the order of the class docstring; returns the last status."""
        import ray

        with self._lock:
            request_stop(self.run_dir)
            ray.wait(self.learner_refs, num_returns=len(self.learner_refs), timeout=STOP_GRACE_S)
            if self.heldout is not None:
                self.heldout.stop(STOP_GRACE_S)
            for handle, ref in self.actors.values():
                try:
                    ray.get(handle.stop.remote(), timeout=STOP_GRACE_S)
                except Exception as err:  # an actor already dead needs no stopping
                    self._event(f"actor stop: {type(err).__name__}")
                ray.wait([ref], timeout=STOP_GRACE_S)
            kill_roles([h for h, _ in self.actors.values()] + [h for h, _ in self.unreachable.values()] + self.learners)
            self.actors.clear()
            self.unreachable.clear()
            if self.cursor is not None:  # what the actors reported stored leaves the record
                with self._cursor_lock:
                    self.cursor.save()
            self._drop_buffer_client()
            if self.buffer is not None:
                self.buffer.stop()
            from learners.launch import remove_rendezvous

            remove_rendezvous(self.rendezvous)
            self.finished = True
            self._event("stopped")
        return self.status()

    def deferred_evaluations(self, timeout_s: float) -> list[int]:
        """The held-out evaluations kept for the end of the job (``learner.eval.defer``)."""
        if self.heldout is None:
            return []
        done = self.heldout.deferred(timeout_s)
        if done:
            self._event(f"deferred evaluations done: {len(done)} versions")
        return done

    def final_evaluation(self) -> HeldoutRecord | None:
        """The held-out evaluation of the finished learner's exported policy (``heldout.py``)."""
        if self.heldout is None or self.final_version is None:
            return None
        return self.heldout.final(self.final_version, self.run_dir / "final_model")

    def _release_learners(self) -> None:
        """Kill the learner ranks and free their placement group: the next group needs its CPUs."""
        from learners.launch import remove_rendezvous

        kill_roles(self.learners)
        if self.learner_group is not None:
            try:
                placement.release_learner_group(self.learner_group)
            except Exception as err:  # already removed with a dead node
                self._event(f"placement group removal: {type(err).__name__}")
            self.learner_group = None
        remove_rendezvous(self.rendezvous)

    def _event(self, text: str, detail: str = "") -> None:
        """Record an event for `status` and append it, with any detail, to logs/controller.log."""
        stamp = time.strftime("%H:%M:%S")
        self.events.append(f"{stamp} {text}")
        log.info(text)
        with open(self.run_dir / "logs" / "controller.log", "a") as out:
            out.write(f"{time.strftime('%Y-%m-%d')} {stamp} {text}\n{detail}{chr(10) if detail else ''}")
