"""The controller: a named Ray actor that places, supervises, scales and stops the roles.

Start order: buffer service → data cursor (``buffer/cursor.py``: prompts in flight when the
job last died and not durable in the buffer are handed out again first) → learner group (rank 0 binds the weight publisher on a port the
controller chose, so actors can connect before it is up) → actors → the held-out evaluator. Supervision restarts a dead
actor (its acknowledged trajectories are already durable in the buffer; the prompts it held and
had not stored go back to the cursor, to be handed out before anything new) and a dead learner group
(from its last checkpoint; the buffer is untouched). Stop order: learners (they checkpoint) →
evaluator → actors → buffer (it flushes) — so nothing acknowledged is lost and no trajectory is trained
twice.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from async_rl.config import Config
from async_rl.job import placement
from async_rl.job.runfolder import clear_stop, next_launch, request_stop

log = logging.getLogger("async_rl.controller")
# Restarts of one role within this window beyond MAX_RESTARTS stop the job instead of looping.
RESTART_WINDOW_S = 300.0
MAX_RESTARTS = 5
# The buffer's stats scan every stored row; the live view asks at most this often.
BUFFER_STATS_EVERY_S = 10.0
# How long a graceful stop waits for each role before killing it.
STOP_GRACE_S = 120.0
# How long a learner group may wait for its resources before the start fails.
PLACEMENT_TIMEOUT_S = 120.0
# The last held-out evaluation (the exported policy) gets this long before the job stops anyway.
FINAL_EVAL_TIMEOUT_S = 300.0


class PlacementError(RuntimeError):
    """The cluster cannot give a role the resources its config asks for."""


class Controller:
    def __init__(self, cfg: dict[str, Any], run_dir: str, model_dir: str, stop_token_ids: list[int]):
        self.cfg = Config.model_validate(cfg)
        self.run_dir = Path(run_dir)
        self.model_dir = model_dir
        self.stop_token_ids = stop_token_ids
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
        self.evaluator: tuple[Any, Any] | None = None  # (handle, run ref) of the held-out evaluator
        self.final_version: int | None = None
        self.rendezvous = ""  # the learner group's rendezvous file ("" when ranks span machines)
        self.cursor = None  # the data cursor: which prompts are handed out, to whom
        self._lock = threading.RLock()
        self._cursor_lock = threading.Lock()  # leases never wait for a scale or a stop

    # ------------------------------------------------------------------ start

    def start(self, resume: bool) -> dict[str, Any]:
        from buffer.service import start_service

        host = self.cfg.cluster.bind_host
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.launch = next_launch(self.run_dir)
        self.buffer = start_service(
            self.run_dir / "buffer", self.cfg.buffer, max_staleness=self.cfg.algorithm.staleness.max_staleness,
            host=host, seed=self.cfg.run.seed,
            log_file=self.run_dir / "logs" / "buffer.log", curve_keys_dir=self.cfg.weights.curve_keys_dir,
        )
        self._open_cursor()
        self.resume = resume
        self._start_learners(self.learner_ranks)
        for _ in range(self.cfg.actors.count):
            self._start_actor()
        if self.cfg.learner.eval.every > 0:
            self._start_evaluator()
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

    def addresses(self) -> dict[str, Any]:
        return {
            "buffer_address": self.buffer.address if self.buffer else None,
            "weights_address": self.weights_address,
            "buffer_pid": self.buffer.pid if self.buffer else None,
        }

    def _start_learners(self, ranks: int) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from async_rl.job.roles import LearnerRank
        from learners.launch import RENDEZVOUS_ENV, remove_rendezvous, rendezvous_file

        clear_stop(self.run_dir, "learner")
        cfg = self.cfg.model_copy(deep=True)
        cfg.learner.ranks = ranks
        group = placement.learner_placement_group(self.cfg.cluster, cfg.learner)
        try:
            ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(group)
            raise PlacementError(
                f"learner.ranks={ranks}: {ranks} bundle(s) of {cfg.learner.cpus:g} CPU / {cfg.learner.gpus:g} GPU "
                f"could not be placed within {PLACEMENT_TIMEOUT_S:.0f} s (free now: "
                f"{ray.available_resources().get('CPU', 0):g} CPU, {ray.available_resources().get('GPU', 0):g} GPU)"
            ) from None
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
        payload = {
            "config": cfg.model_dump(mode="json"),
            "run_dir": str(self.run_dir),
            "model_dir": self.model_dir,
            "buffer_address": self.buffer.address,
            "stop_token_ids": self.stop_token_ids,
            "resume": True,
        }
        resources = placement.learner_resources(cfg.learner)
        extra_env = {"GLOO_SOCKET_IFNAME": "lo"} if same_machine else {}  # else gloo listens on the node's address
        self.learners, self.learner_refs = [], []
        for rank in range(ranks):
            handle = ray.remote(LearnerRank).options(
                **resources.options(),
                max_concurrency=2,  # pid() is answered while run() trains
                runtime_env=placement.role_env(extra_env),
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank),
            ).remote()
            env = {
                "MASTER_ADDR": node_host, "MASTER_PORT": str(master_port),
                "RANK": str(rank), "WORLD_SIZE": str(ranks), "LOCAL_RANK": "0",
                **({RENDEZVOUS_ENV: self.rendezvous} if self.rendezvous else {}),
            }
            self.learners.append(handle)
            self.learner_refs.append(handle.run.remote(env, payload))
            self.pid_refs[f"learner-{rank}"] = handle.pid.remote()
        self.learner_group = group
        self.learner_ranks = ranks
        self._event(f"learner group started with {ranks} rank(s)")

    def _start_actor(self, actor_id: int | None = None) -> int:
        import ray

        from async_rl.job.roles import ActorRole

        if actor_id is None:
            actor_id, self.next_actor_id = self.next_actor_id, self.next_actor_id + 1
        incarnation = self.actor_starts.get(actor_id, 0)
        self.actor_starts[actor_id] = incarnation + 1
        payload = {
            "config": self.cfg.model_dump(mode="json"),
            "actor_id": actor_id,
            # A restarted or resumed actor samples new streams instead of replaying its last ones.
            "sampling_stream": [self.cfg.run.seed, actor_id, self.launch, incarnation],
            "run_dir": str(self.run_dir),
            "model_dir": self.model_dir,
            "buffer_address": self.buffer.address,
            "weights_address": self.weights_address,
            "first_version": self._checkpointed_version(),
        }
        handle = ray.remote(ActorRole).options(
            **placement.actor_resources(self.cfg.actors).options(),
            runtime_env=placement.role_env(),
            max_concurrency=4,
        ).remote(payload)
        self.actors[actor_id] = (handle, handle.run.remote())
        self.pid_refs[f"actor-{actor_id}"] = handle.pid.remote()
        self._event(f"actor {actor_id} started")
        return actor_id

    def _checkpointed_version(self) -> int:
        """The version a (re)started learner group resumes from: the newest checkpoint's, or 0."""
        from learners.checkpoint import latest_tag, version_of

        tag = latest_tag(self.run_dir / "checkpoints")
        return version_of(tag) if tag else 0

    def _start_evaluator(self) -> None:
        import ray

        from async_rl.job.roles import EvaluatorRole

        payload = {"config": self.cfg.model_dump(mode="json"), "run_dir": str(self.run_dir),
                   "model_dir": self.model_dir, "weights_address": self.weights_address, "resume": self.resume}
        handle = ray.remote(EvaluatorRole).options(
            **placement.SERVICE_RESOURCES.options(), runtime_env=placement.role_env(), max_concurrency=4,
        ).remote(payload)
        self.evaluator = (handle, handle.run.remote())
        self.pid_refs["evaluator"] = handle.pid.remote()
        self._event("evaluator started")

    # ------------------------------------------------------------------ supervise

    def supervise(self) -> dict[str, Any]:
        """One pass: restart what died; mark the job finished when the learner group is done."""
        import ray

        with self._lock:
            for actor_id, (_, ref) in list(self.actors.items()):
                done, _ = ray.wait([ref], timeout=0)
                if done:
                    self._actor_exited(actor_id, ref)
            done, _ = ray.wait(self.learner_refs, num_returns=len(self.learner_refs), timeout=0)
            if done and not self.finished:
                self._learners_exited(done)
            if self.evaluator is not None and ray.wait([self.evaluator[1]], timeout=0)[0]:
                self._evaluator_exited()
        return self.status()

    def _actor_exited(self, actor_id: int, ref) -> None:
        import ray

        del self.actors[actor_id]
        try:
            result = ray.get(ref)
            self._event(f"actor {actor_id} finished: {result}")
        except Exception as err:  # RayActorError when killed, or the loop raised
            self._event(f"actor {actor_id} died ({type(err).__name__}); restarting", detail=str(err))
            self._release_prompts(actor_id)
            if self._allow_restart(f"actor-{actor_id}"):
                self._start_actor(actor_id)

    def _evaluator_exited(self) -> None:
        import ray

        ref, self.evaluator = self.evaluator[1], None
        try:
            self._event(f"evaluator finished: {ray.get(ref)}")
        except Exception as err:  # killed, or its engine failed
            self._event(f"evaluator died ({type(err).__name__}); restarting", detail=str(err))
            if self._allow_restart("evaluator"):
                self._start_evaluator()

    def _learners_exited(self, done: list) -> None:
        import ray

        try:
            results = ray.get(done)
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
            self._event(f"learner group finished: {results[0]}")
            self.final_version = results[0].get("version")
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

    # ------------------------------------------------------------------ operate

    def pids(self) -> dict[str, int]:
        """PIDs of the live roles whose processes have started (for drills and status)."""
        import ray

        live = {f"actor-{i}" for i in self.actors} | {f"learner-{r}" for r in range(len(self.learners))}
        live |= {"evaluator"} if self.evaluator is not None else set()
        out = {}
        for role, ref in list(self.pid_refs.items()):
            if role not in live:
                continue
            done, _ = ray.wait([ref], timeout=0)
            if done:
                try:
                    out[role] = ray.get(ref)
                except Exception:  # died before answering
                    pass
        return out

    def buffer_stats(self) -> dict[str, Any] | None:
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
        keys = ("rows", "groups", "groups_live", "groups_sampleable", "bytes", "learner_version",
                "groups_sampled_total", "evicted_rows", "prompts")
        summary = {k: stats.get(k) for k in keys}
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

    def status(self) -> dict[str, Any]:
        return {
            "pids": self.pids(),
            "buffer_stats": self.buffer_stats(),
            "actors": sorted(self.actors),
            "learner_ranks": self.learner_ranks,
            "finished": self.finished,
            "failure": self.failure,
            "restarts": {k: len(v) for k, v in self.restarts.items()},
            "events": self.events[-20:],
            **self.addresses(),
        }

    def scale_actors(self, count: int) -> dict[str, Any]:
        import ray

        with self._lock:
            while len(self.actors) < count:
                self._start_actor()
            while len(self.actors) > count:
                actor_id = max(self.actors)
                handle, ref = self.actors.pop(actor_id)
                ray.get(handle.stop.remote(), timeout=STOP_GRACE_S)
                ray.wait([ref], timeout=STOP_GRACE_S)
                self._kill([handle])
                self._event(f"actor {actor_id} removed")
                self._release_prompts(actor_id)
        return self.status()

    def scale_learners(self, ranks: int) -> dict[str, Any]:
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

    def stop(self) -> dict[str, Any]:
        import ray

        with self._lock:
            request_stop(self.run_dir)
            ray.wait(self.learner_refs, num_returns=len(self.learner_refs), timeout=STOP_GRACE_S)
            self._stop_evaluator()
            for handle, ref in self.actors.values():
                try:
                    ray.get(handle.stop.remote(), timeout=STOP_GRACE_S)
                except Exception as err:  # an actor already dead needs no stopping
                    self._event(f"actor stop: {type(err).__name__}")
                ray.wait([ref], timeout=STOP_GRACE_S)
            self._kill([h for h, _ in self.actors.values()] + self.learners)
            self.actors.clear()
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

    def final_evaluation(self, timeout_s: float = FINAL_EVAL_TIMEOUT_S) -> dict[str, Any] | None:
        """Evaluate the finished learner's exported policy unless its version was evaluated from
        the wire already (the learner exits right after its last publish)."""
        import ray

        if self.evaluator is None or self.final_version is None:
            return None
        model = self.run_dir / "final_model"
        try:
            return ray.get(self.evaluator[0].evaluate_exported.remote(self.final_version, str(model)),
                           timeout=timeout_s)
        except Exception as err:  # the job's result stands without its last evaluation
            self._event(f"final evaluation failed ({type(err).__name__})", detail=str(err))
            return None

    def _stop_evaluator(self) -> None:
        import ray

        if self.evaluator is None:
            return
        handle, ref = self.evaluator
        self.evaluator = None
        try:
            handle.stop.remote()
            ray.wait([ref], timeout=STOP_GRACE_S)
        finally:
            self._kill([handle])

    def kill_role(self, role: str) -> int:
        """Fault injection for tests and drills: SIGKILL one role's process; returns its PID."""
        import os
        import signal

        import ray

        handle = self.learners[0] if role == "learner" else self.actors[int(role.split("-")[1])][0]
        pid = ray.get(handle.pid.remote())
        os.kill(pid, signal.SIGKILL)
        return pid

    def _release_learners(self) -> None:
        """Kill the learner ranks and free their placement group: the next group needs its CPUs."""
        import ray

        from learners.launch import remove_rendezvous

        self._kill(self.learners)
        if self.learner_group is not None:
            try:
                ray.util.remove_placement_group(self.learner_group)
            except Exception as err:  # already removed with a dead node
                self._event(f"placement group removal: {type(err).__name__}")
            self.learner_group = None
        remove_rendezvous(self.rendezvous)

    def _kill(self, handles: list) -> None:
        import ray

        for handle in handles:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:  # already gone
                pass

    def _event(self, text: str, detail: str = "") -> None:
        """Record an event for `status` and append it, with any detail, to logs/controller.log."""
        stamp = time.strftime("%H:%M:%S")
        self.events.append(f"{stamp} {text}")
        log.info(text)
        with open(self.run_dir / "logs" / "controller.log", "a") as out:
            out.write(f"{time.strftime('%Y-%m-%d')} {stamp} {text}\n{detail}{chr(10) if detail else ''}")
