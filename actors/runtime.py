"""Wiring one actor from config sections: engine, reward pool, weight subscriber, loop.

    runtime = ActorRuntime.start(actor_id="actor-0", model_dir=..., prompts_path=...,
                                 buffer_address=..., weights_address=..., actors=cfg.actors,
                                 model=cfg.model, reward=cfg.reward, weights=cfg.weights,
                                 work_dir=run_dir / "actors" / "actor-0")
    runtime.actor.run()            # until runtime.actor.stop()
    runtime.close()

Close order: stop the actor loop → close the weight subscriber (no update can start) → shut the
engine down → close the reward pool → stop the event loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from actors.aio import BackgroundLoop
from actors.backpressure import StalenessGate
from actors.engine import VllmEngine
from actors.prompts import Lease, LeasedPrompts, Settle, file_prompts
from actors.rollout import Actor
from async_rl.config import ActorsConfig, ModelConfig, RewardConfig, WeightsConfig

log = logging.getLogger(__name__)


@dataclass
class ActorRuntime:
    actor: Actor
    loop: BackgroundLoop
    engine: VllmEngine
    rewards: object
    subscriber: object | None

    @classmethod
    def start(
        cls, *, actor_id: str, model_dir: Path, prompts_path: Path, buffer_address: str,
        weights_address: str | None, actors: ActorsConfig, model: ModelConfig, reward: RewardConfig,
        weights: WeightsConfig, work_dir: Path, max_staleness: int | None = None,
        groups_per_version: float | None = None, prompt_seed: int = 0, initial_version: int = 0,
        release_uninformative: bool = False, sampling_stream: tuple = (),
        lease: Lease | None = None, settle: Settle | None = None, first_version: int = 0,
    ) -> ActorRuntime:
        """Start everything one actor needs; ``run()`` on the returned actor generates.
        ``prompt_seed`` orders the prompts, ``sampling_stream`` names the sampling seeds' stream;
        with ``lease``/``settle`` the prompts come from the job's data cursor instead; no group
        is started before weights of ``first_version`` (a resumed learner's) serve."""
        from async_rl.rewards.pool import RewardPool
        from async_rl.tasks.dataset import load_rows

        if lease is not None and settle is not None:
            prompts = LeasedPrompts(load_rows(prompts_path)[0], lease=lease, settle=settle)
        else:
            prompts = file_prompts(prompts_path, seed=prompt_seed)

        loop = BackgroundLoop(name=f"{actor_id}-loop")
        engine = loop.run(VllmEngine.start(model_dir, actors, model, work_dir=work_dir, version=initial_version))
        engine.reseed(*sampling_stream)
        rewards = RewardPool(reward)
        actor = Actor(
            actor_id=actor_id, engine=engine, loop=loop, prompts=prompts,
            score=rewards.submit_for, buffer_address=buffer_address, cfg=actors, reward_timeout_s=reward.timeout_s,
            reward_failure_score=reward.wrong, gate=StalenessGate(max_staleness, groups_per_version),
            release_uninformative=release_uninformative, curve_keys_dir=weights.curve_keys_dir,
            first_version=first_version,
        )
        subscriber = None
        if weights_address is not None:
            from async_rl.weights.subscriber import WeightSubscriber

            subscriber = WeightSubscriber(weights_address, actor.on_weights, weights).start()
        return cls(actor, loop, engine, rewards, subscriber)

    def close(self) -> None:
        self.actor.stop()
        if self.subscriber is not None:
            self.subscriber.close()
        self.engine.shutdown()
        self.rewards.close()
        self.loop.close()
