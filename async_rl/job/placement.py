"""Where everything runs: the one module that talks to Ray about resources and placement.

Every Ray option a role is started with (CPUs, GPUs, custom resources, scheduling strategy,
placement group, concurrency, runtime env) is decided here; the controller and the driver call
the ``start_*`` functions below. ``tests/unit/test_placement.py`` keeps it that way.

Locally (``cluster.ray_address`` unset) a private Ray is started bound to loopback. On a
cluster, ``ray start --head`` / ``ray start --address …`` first, then ``--ray-address auto``:
learner ranks share one placement group (so the DeepSpeed group is gang-scheduled), actors
and the evaluator are placed individually; the controller runs on the driver's node, where it
starts the buffer service (a process of its own, bound to ``cluster.bind_host``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from async_rl.config import AUTO_HOST, ActorsConfig, ClusterConfig, LearnerConfig, is_loopback
from async_rl.job.roles import ActorRole, EvaluatorRole, LearnerRank

if TYPE_CHECKING:
    from async_rl.records import ActorLaunch, ControllerLaunch, EvaluatorLaunch

CONTROLLER_NAME = "async_rl_controller"
NAMESPACE = "async_rl"
# Roles set their own thread counts; oversubscribing 2 cores with OpenMP threads thrashes.
ROLE_THREADS = "1"
# How long a learner group may wait for its resources before the start fails.
PLACEMENT_TIMEOUT_S = 120.0
# Ray threads per role: calls answered while the role's ``run`` blocks one thread (``pid``,
# ``stop``, ``evaluate_exported``; the controller's scale and stop while the driver supervises).
CONCURRENCY = {"learner": 2, "actor": 4, "evaluator": 4, "controller": 8}


class PlacementError(RuntimeError):
    """The cluster cannot give a role the resources its config asks for."""


@dataclass(frozen=True)
class RoleResources:
    num_cpus: float
    num_gpus: float
    custom: tuple[tuple[str, float], ...] = ()  # Ray custom resources: which nodes may run the role

    def options(self, **extra) -> dict:
        custom = {"resources": dict(self.custom)} if self.custom else {}
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, **custom, **extra}

    def bundle(self) -> dict[str, float]:
        """The same as one placement-group bundle."""
        return {"CPU": self.num_cpus, **({"GPU": self.num_gpus} if self.num_gpus else {}), **dict(self.custom)}


def actor_resources(cfg: ActorsConfig) -> RoleResources:
    return RoleResources(num_cpus=cfg.cpus, num_gpus=cfg.gpus, custom=tuple(sorted(cfg.resources.items())))


def learner_resources(cfg: LearnerConfig) -> RoleResources:
    return RoleResources(num_cpus=cfg.cpus, num_gpus=cfg.gpus, custom=tuple(sorted(cfg.resources.items())))


# The buffer and the controller mostly wait on sockets; they reserve no CPU.
SERVICE_RESOURCES = RoleResources(num_cpus=0, num_gpus=0)


def role_env(extra: dict[str, str] | None = None) -> dict:
    """Ray runtime_env for a role process."""
    env = {"OMP_NUM_THREADS": ROLE_THREADS, "TOKENIZERS_PARALLELISM": "false", **(extra or {})}
    return {"env_vars": env}


def learner_threads(cfg: LearnerConfig) -> int:
    """Torch threads of a learner rank: its core budget, the CPUs it reserves (at least one)."""
    return max(1, int(cfg.cpus))


def local_cpus(cluster: ClusterConfig, actors: ActorsConfig, learner: LearnerConfig, *, max_actors: int) -> int:
    """Logical CPUs for a private Ray: enough for every role, at least the machine's cores."""
    needed = learner.cpus * learner.ranks + actors.cpus * max_actors
    return max(cluster.num_cpus or 0, os.cpu_count() or 1, int(needed + 0.999))


def init_ray(cluster: ClusterConfig, *, num_cpus: int | None = None):
    """Start a private loopback Ray, or join the cluster at ``cluster.ray_address``."""
    if cluster.ray_address is not None:
        _use_cluster_token()
    import ray

    if ray.is_initialized():
        return ray
    try:
        if cluster.ray_address is None:
            _keep_ray_on_loopback()
            ray.init(
                # "local": always a private Ray. With no address Ray joins a cluster that `ray start`
                # left on this machine (even a stale record of one), and its CPUs are not ours.
                address="local",
                _node_ip_address=cluster.bind_host,
                num_cpus=num_cpus,
                include_dashboard=False,
                namespace=NAMESPACE,
                log_to_driver=False,
                configure_logging=False,
            )
        else:
            ray.init(address=cluster.ray_address, namespace=NAMESPACE, log_to_driver=False)
    except (SystemExit, KeyboardInterrupt):
        _kill_started_ray()
        raise
    return ray


def _kill_started_ray() -> None:
    """A SIGTERM (``ray.init`` installs ``sys.exit`` as its handler) or Ctrl-C while Ray starts:
    kill every process this driver has started so far (Ray's GCS, raylet and the agents the
    raylet spawned), children first; ``ray.shutdown()`` alone leaves the agents running."""
    import psutil

    started = psutil.Process().children(recursive=True)
    for process in reversed(started):  # the deepest (the raylet's agents) before their parents
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(started, timeout=5)


def _keep_ray_on_loopback() -> None:
    """A private Ray must not listen beyond loopback.

    With Ray's "cluster" switch on (the default on Linux) its processes listen on every interface
    and the runtime-env agent on the host's address, whatever node address is given. Ray reads the
    switch from the environment once, when ``ray`` is first imported, and vLLM's engine imports
    ``ray`` on start-up: so the switch is set both in the environment (for Ray's child processes)
    and on the already-imported constant.
    """
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def _use_cluster_token() -> None:
    """Authenticate to a cluster whose head requires Ray's token.

    Ray 2.60 heads started with `ray start` require a token, while its clients default to no
    authentication and fail with "InvalidAuthToken". Unless the user chose ``RAY_AUTH_MODE``,
    token mode is used whenever a token is at hand (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``
    or ``~/.ray/auth_token``, which `ray start --head` writes). Ray reads the mode once; if it
    is already loaded, its config is re-read.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not (os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file()):
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    if "ray._raylet" in sys.modules:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def learner_placement_group(cluster: ClusterConfig, learner: LearnerConfig):
    """One bundle per learner rank, gang-scheduled with the configured strategy."""
    from ray.util.placement_group import placement_group

    bundles = [learner_resources(learner).bundle()] * learner.ranks
    return placement_group(bundles, strategy=cluster.placement_strategy)


def reserve_learner_group(cluster: ClusterConfig, learner: LearnerConfig, *, timeout_s: float = PLACEMENT_TIMEOUT_S):
    """The learner ranks' placement group once every bundle is placed; ``PlacementError`` (and
    nothing reserved) when the cluster cannot place them within ``timeout_s``."""
    import ray

    group = learner_placement_group(cluster, learner)
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(group)
        free = ray.available_resources()
        raise PlacementError(
            f"learner.ranks={learner.ranks}: {learner.ranks} bundle(s) of {learner.cpus:g} CPU / {learner.gpus:g} GPU "
            f"could not be placed within {timeout_s:.0f} s (free now: "
            f"{free.get('CPU', 0):g} CPU, {free.get('GPU', 0):g} GPU)"
        ) from None
    return group


def release_learner_group(group) -> None:
    """Free a learner group's resources (its ranks must be gone: the next group needs them)."""
    import ray

    ray.util.remove_placement_group(group)


def start_learner_rank(group, rank: int, learner: LearnerConfig, *, same_machine: bool):
    """Learner rank ``rank`` in bundle ``rank`` of ``group``; returns its Ray handle."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    extra_env = {"GLOO_SOCKET_IFNAME": "lo"} if same_machine else {}  # else gloo listens on the node's address
    return ray.remote(LearnerRank).options(
        **learner_resources(learner).options(),
        max_concurrency=CONCURRENCY["learner"],
        runtime_env=role_env(extra_env),
        scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank),
    ).remote()


def start_actor(actors: ActorsConfig, launch: ActorLaunch):
    """An actor anywhere its resources fit; returns its Ray handle."""
    import ray

    return ray.remote(ActorRole).options(
        **actor_resources(actors).options(), runtime_env=role_env(), max_concurrency=CONCURRENCY["actor"],
    ).remote(launch)


def start_evaluator(launch: EvaluatorLaunch):
    """The held-out evaluator (its engine takes no reserved CPU, like the services)."""
    import ray

    return ray.remote(EvaluatorRole).options(
        **SERVICE_RESOURCES.options(), runtime_env=role_env(), max_concurrency=CONCURRENCY["evaluator"],
    ).remote(launch)


def start_controller(ray, launch: ControllerLaunch):
    """The named controller actor, on this (the driver's) node: the buffer service it starts
    binds cluster.bind_host, an address of this node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from async_rl.job.controller import Controller

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(Controller).options(
        name=CONTROLLER_NAME, **SERVICE_RESOURCES.options(), max_concurrency=CONCURRENCY["controller"],
        runtime_env=role_env(), scheduling_strategy=here,
    ).remote(launch)


def bundle_nodes(group) -> list[str]:
    """The id of the node each bundle of a ready placement group is on, in bundle order."""
    from ray.util import placement_group_table

    placed = placement_group_table(group)["bundles_to_node_id"]
    return [placed[i] for i in range(len(placed))]


def node_ports(group, bundle: int, *, count: int, here: str) -> tuple[str, list[int]]:
    """The address of the node of ``bundle`` and ``count`` distinct ports free there, asked by a
    zero-CPU task in that bundle (so it is true of that node, not of the caller's). The address
    is ``here`` (cluster.bind_host) on the caller's own node, else the one Ray knows for the node."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ask = ray.remote(num_cpus=0)(_free_ports_here).options(
        scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle)
    )
    return ray.get(ask.remote(count, ray.get_runtime_context().get_node_id(), here), timeout=120)


def _free_ports_here(count: int, caller_node: str, caller_host: str) -> tuple[str, list[int]]:
    import socket

    import ray

    same = ray.get_runtime_context().get_node_id() == caller_node
    host = caller_host if same else ray.util.get_node_ip_address()
    sockets = [socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return host, [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass(frozen=True)
class ClusterNode:
    """A node of the Ray cluster as Ray's node table shows it."""

    node_id: str
    address: str
    alive: bool
    resources: dict[str, float]  # totals, custom resources included
    death: str = ""  # Ray's reason, once the node is dead


def cluster_nodes() -> list[ClusterNode]:
    """Every node Ray's control store lists, the dead ones included (Ray keeps them a while)."""
    import ray

    return [ClusterNode(node_id=n["NodeID"], address=n["NodeManagerAddress"], alive=bool(n["Alive"]),
                        resources=dict(n.get("Resources") or {}), death=n.get("DeathReasonMessage") or "")
            for n in ray.nodes()]


def unplaceable(needs: RoleResources, nodes: list[ClusterNode]) -> str | None:
    """Why no live node could ever hold a role asking for ``needs`` (None when one could): Ray
    would keep such a role waiting for a node that may never come."""
    want = {k: v for k, v in needs.bundle().items() if v > 0}
    live = [n for n in nodes if n.alive]
    if any(all(n.resources.get(k, 0.0) >= v for k, v in want.items()) for n in live):
        return None

    def amounts(values: dict[str, float]) -> str:
        return ", ".join(f"{k} {values.get(k, 0.0):g}" for k in sorted(want))

    offered = "; ".join(f"{n.address}: {amounts(n.resources)}" for n in live) or "none"
    return f"no live node has {amounts(want)} (live nodes: {offered})"


def resolve_bind_host(cluster: ClusterConfig, ray) -> None:
    """``cluster.bind_host: auto`` becomes the address Ray knows for this node. A loopback address
    is refused once the cluster has other nodes: roles there could not reach it."""
    if cluster.bind_host == AUTO_HOST:
        cluster.bind_host = ray.util.get_node_ip_address()
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if cluster.ray_address is not None and len(nodes) > 1 and is_loopback(cluster.bind_host):
        raise ValueError(
            f"cluster.bind_host={cluster.bind_host}: loopback, but the cluster at {cluster.ray_address} "
            f"has {len(nodes)} nodes whose roles could not reach it; set this node's address or 'auto'"
        )
