"""Held-out evaluation at exact policy versions, on an engine that serves nothing else.

An actor's engine takes weight updates in flight, so an evaluation on it can mix the version it
started at with later ones. The ``VersionEvaluator`` owns an engine of its own and loads weights
only between evaluations: a caller loads version v, evaluates, and loads nothing else meanwhile
(the job's evaluator holds its weight subscriber's thread for the whole evaluation). Every
sample's token versions are checked against v before the result is returned.

Each evaluation is the computation ``async-rl eval`` makes with ``eval_settings(cfg)`` (greedy,
one response per problem, the same engine settings, every problem submitted at once), so
scoring an exported policy offline with ``reproduce_args`` gives the same answers.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from async_rl.config import Config
from async_rl.evaluation.benchmarks import Benchmark, load_benchmark
from async_rl.evaluation.runner import (
    EvalSettings,
    Plan,
    engine_configs,
    evaluate_problems,
    plan,
    result_document,
)

# Per evaluated version: RUN_DIR/eval/v000060.json, an `async-rl eval` result document.
EVAL_DIR = "eval"
KS = (1,)


class MixedVersionError(RuntimeError):
    """Some response was generated (in part) by weights other than the evaluated version."""


def eval_settings(cfg: Config) -> EvalSettings:
    """Greedy decoding of one response per held-out problem, as the rollouts are bounded."""
    return EvalSettings(
        n=1, temperature=0.0, top_p=1.0, top_k=-1, max_tokens=cfg.actors.max_tokens, seed=None,
        dtype=cfg.model.dtype, kv_cache_gib=cfg.actors.kv_cache_gib, reward_workers=1,
        reward_timeout_s=cfg.reward.timeout_s,
    )


def reproduce_args(cfg: Config, model_dir: Path | str, heldout: Path | str) -> list[str]:
    """``async-rl eval`` arguments that re-score ``model_dir`` exactly as the job evaluated it."""
    s = eval_settings(cfg)
    return ["eval", "--model", str(model_dir), "--data", str(heldout), "--n", "1", "--temperature", "0",
            "--top-p", "1", "--top-k", "-1", "--max-tokens", str(s.max_tokens), "--dtype", str(s.dtype),
            "--kv-cache-gib", f"{s.kv_cache_gib:g}", "--reward-workers", "1",
            "--limit", str(cfg.learner.eval.prompts)]


def is_due(version: int, *, every: int, final: int) -> bool:
    """Versions evaluated: 0, every ``every``-th, and the last one (``final``; 0 = no budget)."""
    return version == 0 or (every > 0 and version % every == 0) or (final > 0 and version == final)


@dataclass
class VersionEvaluator:
    """An engine, a reward pool and the held-out set; ``load`` then ``evaluate`` one version."""

    engine: object  # actors.engine.VllmEngine
    loop: object  # actors.aio.BackgroundLoop
    rewards: object  # async_rl.rewards.pool.RewardPool
    scoring: object  # actors.group.Scoring of ``rewards``
    benchmark: Benchmark
    plan: Plan
    settings: EvalSettings
    model_dir: Path

    @classmethod
    def start(cls, model_dir: Path, heldout: Path, cfg: Config, *, version: int,
              work_dir: Path | None = None) -> VersionEvaluator:
        """Start an engine on ``model_dir`` (labelled ``version``) for the first
        ``learner.eval.prompts`` problems of ``heldout``."""
        import torch
        from transformers import AutoTokenizer

        from actors.aio import BackgroundLoop
        from actors.engine import VllmEngine
        from actors.group import Scoring
        from async_rl.config import RewardConfig
        from async_rl.rewards.pool import RewardPool

        settings = eval_settings(cfg)
        benchmark = load_benchmark(heldout, limit=cfg.learner.eval.prompts)
        plan_ = plan(model_dir, [benchmark], settings, AutoTokenizer.from_pretrained(str(model_dir)))
        actors, model = engine_configs(settings, plan_, on_gpu=torch.cuda.is_available())
        work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="async-rl-evaluator-"))
        loop = BackgroundLoop(name="evaluator-loop")
        engine = loop.run(VllmEngine.start(model_dir, actors, model, work_dir=work, version=version))
        reward_cfg = RewardConfig(correct=1.0, wrong=0.0, workers=settings.reward_workers,
                                  timeout_s=settings.reward_timeout_s,
                                  by_data_source=cfg.reward.by_data_source, default=cfg.reward.default)
        rewards = RewardPool(reward_cfg)
        return cls(engine, loop, rewards, Scoring.of(rewards, reward_cfg), benchmark, plan_, settings,
                   Path(model_dir))

    @property
    def version(self) -> int:
        return self.engine.version

    def load(self, version: int, named_tensors) -> None:
        """Serve ``version`` from now on (``named_tensors``: the published weight set)."""
        self.loop.run(self.engine.update_weights(version, named_tensors))

    def evaluate(self) -> dict:
        """The result document of the version the engine serves, ``policy_version`` naming it;
        raises ``MixedVersionError`` if any response saw another version."""
        version, start = self.engine.version, time.monotonic()
        results = self.loop.run(evaluate_problems(
            self.engine, self.scoring, self.benchmark.problems, self.plan.prompts[0], n=self.settings.n))
        seen = {v for r in results for s in r.samples for v in (s.weight_versions or (None,))}
        if seen != {version}:
            raise MixedVersionError(f"evaluation of v{version} saw weight versions {sorted(seen, key=str)}")
        document = result_document(self.model_dir, [self.benchmark], [results], self.settings, self.plan, KS,
                                   time.monotonic() - start, dtype=self.settings.dtype)
        document["policy_version"] = version
        return document

    def close(self) -> None:
        self.engine.shutdown()
        self.rewards.close()
        self.loop.close()


def accuracy(document: dict) -> float:
    """Greedy accuracy (avg@1) of a result document."""
    return document["benchmarks"][0]["pass@k"]["1"]


def answers(document: dict) -> list[tuple[str, str | None, tuple[str, ...]]]:
    """(problem id, parsed answer, response digests) per problem: what two evaluations of one
    policy share, down to the generated tokens."""
    return [(row["id"], row["majority_answer"], tuple(row.get("digests") or ()))
            for row in document["benchmarks"][0]["per_problem"]]
