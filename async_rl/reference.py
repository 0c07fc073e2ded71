"""The method in one process: every step generates, scores, trains and serves the new policy.

    serving = Serving.start(cfg, model_dir, work_dir=...)          # vLLM engine, reward pool
    reference = Reference.start(cfg, serving, model_dir, prompts)  # DeepSpeed learner, 1 rank
    for k in range(steps):
        step = reference.step(k)

or ``run(cfg, model_dir, rows, steps=...)``, or ``python -m async_rl.reference [--steps N]``.

The real components (the vLLM engine of ``actors/engine.py``, the DeepSpeed learner of
``learners/engine.py``, the reward pool) with no Ray, no ZeroMQ and no buffer: the groups
generated in step k are trained on in step k. The asynchronous job (``async-rl train``) is the
same step, distributed; each line of :meth:`Reference.step` is done there by:

    serving.serve(...)          the learner's WeightPublisher (ZeroMQ) → each actor's
                                WeightSubscriber → ``Actor.on_weights`` (actors/rollout.py)
    collect_groups(...)         every actor's loop: one ``rollout_group`` per prompt
                                (actors/group.py), generated and scored concurrently
    trajectory_table(...)       the actor's ``group_batch`` → the buffer, which hands the
                                learner whole groups, skipping all-equal ones (buffer/store.py)
    trainer.train_step(...)     every learner rank (async_rl/job/learner_role.py): advantages
                                per group, the objective, one optimizer step per mini-batch
    lagged.publish(...)         ``LearnerLoop.publish`` after each step

What the job adds is concurrency, so its rows are however many versions old the actors ran
ahead (at most ``algorithm.staleness.max_staleness``). Here they are exactly ``lag`` versions old: step k
generates with the weights of version max(0, k − lag); 0 unless a study sets it.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from async_rl.config import Config
from async_rl.seeds import derive_seed
from async_rl.tasks.dataset import PromptRow

# Rollout rounds per step before training on the informative groups found so far.
MAX_ROUNDS = 8
# Extra prompts per round when uninformative (all-equal reward) groups are filtered out.
OVERSAMPLE = 1.5


@dataclass(frozen=True)
class Step:
    """What one step did: the served ``version`` generated ``rollouts``; ``metrics`` are the
    learner's (empty when no group came back); times in seconds."""

    step: int
    version: int
    rollouts: Rollouts
    metrics: dict
    load_s: float
    rollout_s: float
    step_s: float


@dataclass
class Reference:
    """One training run on a ``Serving``: its learner, its prompts and its published weights."""

    cfg: Config
    serving: Serving
    trainer: object  # learners.trainer.Trainer
    prompts: Iterator[PromptRow]
    lagged: LaggedWeights
    run_id: str = "reference"

    @classmethod
    def start(cls, cfg: Config, serving: Serving, model_dir: Path, prompts: Iterator[PromptRow], *,
              lag: int = 0, run_id: str = "reference") -> Reference:
        trainer = build_trainer(cfg, model_dir, stop_token_ids=serving.stop_token_ids, max_staleness=lag)
        lagged = LaggedWeights(lag)
        lagged.publish(0, trainer.weights_for_publishing())
        serving.version = None  # no version of this run is served yet
        return cls(cfg, serving, trainer, prompts, lagged, run_id)

    def step(self, k: int) -> Step:
        """Learner step ``k``: serve the policy, generate and score groups, train, publish."""
        cfg, serving, started = self.cfg, self.serving, time.perf_counter()
        # The policy: version k, the one published by the last step (k − lag with a lag).
        version, weights = self.lagged.weights_for(k)
        load_s = serving.serve(version, weights) if serving.version != version else 0.0
        # Groups generated with it, every sample scored.
        rollouts = serving.loop.run(collect_groups(
            serving.engine, serving.scoring, self.prompts, groups=cfg.learner.batch.groups_per_step,
            n=cfg.actors.n_samples_per_prompt, informative_only=cfg.buffer.filter_zero_advantage))
        rollout_s = time.perf_counter() - started
        # One learner step on them: advantages per group, the objective, the optimizer step(s).
        table = trajectory_table(rollouts.kept, version=version, run_id=self.run_id, step=k) if rollouts.kept else None
        metrics = self.trainer.train_step(table, learner_version=k) if table is not None else {}
        # The new weights, published as version k + 1 for the next step to serve.
        self.lagged.publish(k + 1, self.trainer.weights_for_publishing())
        return Step(k, version, rollouts, metrics, load_s, rollout_s, time.perf_counter() - started)


def run(cfg: Config, model_dir: Path, rows: list[PromptRow], *, steps: int, work_dir: Path,
        seed: int = 0) -> list[Step]:
    """``steps`` reference steps from ``model_dir`` on ``rows`` (prompt order and samples from
    ``seed``); everything is shut down on return."""
    from actors.prompts import prompt_stream

    serving = Serving.start(cfg, model_dir, work_dir=work_dir)
    try:
        serving.engine.reseed("reference", seed)
        prompts = prompt_stream(rows, seed=derive_seed("prompts", seed))
        reference = Reference.start(cfg, serving, model_dir, prompts)
        return [log_step(reference.step(k)) for k in range(steps)]
    finally:
        serving.close()


def log_step(step: Step) -> Step:
    r, m = step.rollouts, step.metrics
    print(f"step {step.step}: v{step.version}, {len(r.kept)} groups, sample accuracy "
          f"{r.correct / max(r.samples, 1):.3f}, loss {m.get('loss', float('nan')):.4f}, "
          f"{step.step_s:.1f} s", flush=True)
    return step


# ---------------------------------------------------------------------- the parts


@dataclass
class Serving:
    """The actor side: one vLLM engine on its own event loop, the reward pool, and the policy
    version the engine serves (None: the weights it started from)."""

    loop: object  # actors.aio.BackgroundLoop
    engine: object  # actors.engine.VllmEngine
    pool: object  # async_rl.rewards.pool.RewardPool
    scoring: object  # actors.group.Scoring
    version: int | None = None

    @classmethod
    def start(cls, cfg: Config, model_dir: Path, *, work_dir: Path) -> Serving:
        from actors.aio import BackgroundLoop
        from actors.engine import VllmEngine
        from actors.group import Scoring
        from async_rl.rewards.pool import RewardPool

        loop = BackgroundLoop(name="reference-loop")
        engine = loop.run(VllmEngine.start(model_dir, cfg.actors, cfg.model, work_dir=work_dir))
        pool = RewardPool(cfg.reward)
        return cls(loop, engine, pool, Scoring.of(pool, cfg.reward))

    @property
    def stop_token_ids(self) -> list[int]:
        tokenizer = self.engine.tokenizer
        return sorted({tokenizer.eos_token_id, tokenizer.pad_token_id} - {None})

    def serve(self, version: int, weights) -> float:
        """Serve policy ``version`` from now on; returns seconds. The engine's label is a fresh,
        higher load counter, since a study may serve an older version again."""
        start = time.perf_counter()
        self.loop.run(self.engine.update_weights(self.engine.version + 1, weights))
        self.version = version
        return time.perf_counter() - start

    def close(self) -> None:
        self.engine.shutdown()
        self.pool.close()
        self.loop.close()


@dataclass
class Rollouts:
    """The groups one step trains on (``kept``: (prompt row, group)) and what it generated."""

    kept: list = field(default_factory=list)
    groups_generated: int = 0
    samples: int = 0
    correct: int = 0
    tokens: int = 0  # response tokens generated, discarded groups included (the cost of a step)


async def collect_groups(engine, scoring, prompts: Iterator[PromptRow], *, groups: int, n: int,
                         informative_only: bool) -> Rollouts:
    """``groups`` complete groups, generated concurrently; with ``informative_only`` groups whose
    rewards are all equal (zero advantage: the job's buffer never samples them) are replaced."""
    from actors.group import rollout_group
    from async_rl.tasks.encoding import encode_prompt

    out = Rollouts()
    for _ in range(MAX_ROUNDS):
        needed = groups - len(out.kept)
        if needed <= 0:
            break
        rows = [next(prompts) for _ in range(math.ceil(needed * OVERSAMPLE) if informative_only else needed)]
        results = await asyncio.gather(*(rollout_group(
            engine, scoring, encode_prompt(engine.tokenizer, row.messages), data_source=row.data_source,
            truth=row.ground_truth, extra_info=row.extra_info, n=n) for row in rows))
        for row, group in zip(rows, results, strict=True):
            out.tokens += sum(len(s.token_ids) for s in group.samples)
            if not group.complete:
                continue
            out.groups_generated += 1
            out.samples += len(group.rewards)
            out.correct += sum(r.correct for r in group.rewards)
            if len(out.kept) < groups and (group.informative or not informative_only):
                out.kept.append((row, group))
    return out


def trajectory_table(kept, *, version: int, run_id: str, step: int):
    """The buffer-schema table of one step; every token is labelled with the policy ``version``
    that generated it (the engine's own label counts weight loads, see ``Serving.serve``)."""
    import pyarrow as pa

    from actors.trajectories import group_batch

    batches = []
    for i, (row, group) in enumerate(kept):
        relabelled = [replace(s, versions=[version] * len(s.token_ids)) for s in group.samples]
        batches.append(group_batch(
            group_id=f"{run_id}-{step}-{i}", actor_id=run_id, row=row, prompt_tokens=group.prompt_ids,
            samples=relabelled, rewards=group.rewards, kv_on_update="recompute",
        ))
    return pa.Table.from_batches(batches)


class LaggedWeights:
    """The last ``lag + 1`` published weight sets: step k generates with version max(0, k − lag),
    and versions older than that are dropped."""

    def __init__(self, lag: int):
        if lag < 0:
            raise ValueError(f"lag={lag}: must be >= 0")
        self.lag = lag
        self._sets: dict[int, object] = {}

    def publish(self, version: int, weights) -> None:
        self._sets[version] = weights
        for old in [v for v in self._sets if v < version - self.lag]:
            del self._sets[old]

    def weights_for(self, step: int) -> tuple[int, object]:
        version = max(0, step - self.lag)
        if version not in self._sets:
            raise KeyError(f"step {step} needs weights v{version}; held: {sorted(self._sets)}")
        return version, self._sets[version]

    @property
    def latest(self) -> tuple[int, object]:
        version = max(self._sets)
        return version, self._sets[version]

    @property
    def held(self) -> list[int]:
        return sorted(self._sets)


def build_trainer(cfg: Config, model_dir: Path, *, stop_token_ids, max_staleness: int):
    """A world-size-1 DeepSpeed learner and its RL step, configured as a job's learner rank."""
    from learners.engine import LearnerEngine
    from learners.launch import free_port
    from learners.trainer import Trainer

    # The single-rank process group must not collide with another job's default port.
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    engine = LearnerEngine(model_dir, cfg.learner, dtype=cfg.model.dtype)
    return Trainer.for_job(engine, cfg, stop_token_ids=stop_token_ids, max_staleness=max_staleness)


def main(argv: list[str] | None = None) -> None:
    """``python -m async_rl.reference``: the reference loop on a config (tiny.yaml by default)."""
    from async_rl.config_io import load_config
    from async_rl.prepare import prepare_run
    from async_rl.tasks.dataset import load_rows

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    prepared = prepare_run(cfg)
    rows, _ = load_rows(prepared.data["train"])
    run(cfg, prepared.model_dir, rows, steps=args.steps, work_dir=prepared.run_dir / "reference", seed=cfg.run.seed)


if __name__ == "__main__":
    main()
