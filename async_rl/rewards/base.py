"""The reward contract shared by every reward function (math, code) and the pool."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

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
