"""The reward contract shared by every reward function (math, code) and the pool.

A reward is a module ``async_rl/rewards/NAME.py`` that satisfies :class:`Reward`; the config's
``reward.by_data_source`` names it for the data sources it scores. Adding a reward is adding
that module and one entry there.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from async_rl.config import RewardConfig

# reward_info strings are stored per trajectory; cap what one error message may add.
MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class RewardRecord:
    """The outcome of scoring one response.

    ``status`` is a short machine-readable word: ``correct``, ``wrong``, ``no_answer``,
    ``format`` (think-format penalty), ``timeout``, ``error`` — or, for code, the verdict
    summary. ``info`` holds reward-specific details (per-test verdicts for code).
    """

    score: float
    status: str
    parsed: str | None = None
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def correct(self) -> bool:
        return self.status == "correct"

    def to_json(self) -> str:
        """The trajectory's ``reward_info`` column."""
        record = asdict(self)
        if record["error"] is not None:
            record["error"] = record["error"][:MAX_ERROR_CHARS]
        return json.dumps(record, default=str)


def failure(score: float, status: str, error: str) -> RewardRecord:
    return RewardRecord(score=score, status=status, error=error[:MAX_ERROR_CHARS])


@runtime_checkable
class Reward(Protocol):
    """What the pool calls on a reward module. Both run inside a pool worker's main thread
    (math-verify's timeouts need ``signal.alarm``); the pool adds a hard timeout on top."""

    def score(self, response: str, ground_truth: str, extra_info: dict, cfg: RewardConfig) -> RewardRecord:
        """Score one response against its ground truth; never raises for a bad response."""

    def warm_up(self, cfg: RewardConfig) -> object:
        """Import and probe what the first call would otherwise pay for (a worker initializer)."""


def load_reward(name: str) -> Reward:
    """The reward module ``async_rl.rewards.NAME``; a ValueError naming the fix when there is none."""
    module = None
    if name.isidentifier():
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__package__}.{name}":
                raise
    if not isinstance(module, Reward):
        raise ValueError(
            f"{name!r} is not a reward: expected async_rl/rewards/{name}.py with score() and warm_up()"
        )
    return module
