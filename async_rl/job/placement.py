"""Where everything runs: the one module that talks to Ray about resources and placement.

Locally (``cluster.ray_address`` unset) a private Ray is started bound to loopback. On a
cluster, ``ray start --head`` / ``ray start --address …`` first, then ``--ray-address auto``:
learner ranks share one placement group (so the DeepSpeed group is gang-scheduled), actors
and the buffer are placed individually.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from async_rl.config import ActorsConfig, ClusterConfig, LearnerConfig

CONTROLLER_NAME = "async_rl_controller"
NAMESPACE = "async_rl"
# Roles set their own thread counts; oversubscribing 2 cores with OpenMP threads thrashes.
ROLE_THREADS = "1"


@dataclass(frozen=True)
class RoleResources:
    num_cpus: float
    num_gpus: float

    def options(self, **extra) -> dict:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, **extra}


def actor_resources(cfg: ActorsConfig) -> RoleResources:
    return RoleResources(num_cpus=cfg.cpus, num_gpus=cfg.gpus)


def learner_resources(cfg: LearnerConfig) -> RoleResources:
    return RoleResources(num_cpus=cfg.cpus, num_gpus=cfg.gpus)


# The buffer and the controller mostly wait on sockets; they reserve no CPU.
SERVICE_RESOURCES = RoleResources(num_cpus=0, num_gpus=0)


def role_env(extra: dict[str, str] | None = None) -> dict:
    """Ray runtime_env for a role process."""
    env = {"OMP_NUM_THREADS": ROLE_THREADS, "TOKENIZERS_PARALLELISM": "false", **(extra or {})}
    return {"env_vars": env}


def local_cpus(cluster: ClusterConfig, actors: ActorsConfig, learner: LearnerConfig, *, max_actors: int) -> int:
    """Logical CPUs for a private Ray: enough for every role, at least the machine's cores."""
    needed = learner.cpus * learner.ranks + actors.cpus * max_actors
    return max(cluster.num_cpus or 0, os.cpu_count() or 1, int(needed + 0.999))


def init_ray(cluster: ClusterConfig, *, num_cpus: int | None = None):
    """Start a private loopback Ray, or join the cluster at ``cluster.ray_address``."""
    # Without this Ray listens on every interface even with a loopback node address.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return ray
    if cluster.ray_address is None:
        ray.init(
            _node_ip_address=cluster.bind_host,
            num_cpus=num_cpus,
            include_dashboard=False,
            namespace=NAMESPACE,
            log_to_driver=False,
            configure_logging=False,
        )
    else:
        ray.init(address=cluster.ray_address, namespace=NAMESPACE, log_to_driver=False)
    return ray


def learner_placement_group(cluster: ClusterConfig, learner: LearnerConfig):
    """One bundle per learner rank, gang-scheduled with the configured strategy."""
    from ray.util.placement_group import placement_group

    bundles = [{"CPU": learner.cpus, **({"GPU": learner.gpus} if learner.gpus else {})}] * learner.ranks
    return placement_group(bundles, strategy=cluster.placement_strategy)
