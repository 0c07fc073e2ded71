"""What every objective module builds on; importable without torch, since the config takes its
union of objective configs from this package and every process (buffer, reward workers) loads
the config.

``ObjectiveConfig`` is the base of each objective's config class. The clip fields are declared
once, in mixins an objective inherits only when its loss reads them, so a field of another
objective is an error in this one's section (list them last-first, ``(DualClip, HighClip,
LowClip)``: pydantic orders fields from the last base, so a dump reads ε_l, ε_h, c). ``TokenBatch`` is what a per-token loss sees.
``ObjectiveSpec`` is the one declaration an objective module exports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from torch import Tensor


class ObjectiveConfig(BaseModel):
    """Base of an objective's section (``algorithm.loss``); ``type`` names the objective."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    type: str

    @property
    def clip_eps(self) -> tuple[float, float]:
        """ε0 of the low and high clip bounds, which the staleness schedule moves per row; a
        bound the objective does not declare is 0 (its loss never reads it)."""
        return getattr(self, "eps_low", 0.0), getattr(self, "eps_high", 0.0)


class LowClip(ObjectiveConfig):
    eps_low: float = Field(0.2, ge=0, lt=1, description="Lower clip ε_l (ratio ≥ 1−ε_l).")


class HighClip(ObjectiveConfig):
    eps_high: float = Field(0.28, ge=0, description="Upper clip ε_h (ratio ≤ 1+ε_h).")


class DualClip(ObjectiveConfig):
    dual_clip_c: float | None = Field(10.0, gt=1, description="Dual clip c for A<0 (None = off).")


@dataclass(frozen=True)
class TokenBatch:
    """What a per-token objective sees: sanitised tensors, broadcastable to ``[B, T]``."""

    lp: Tensor  # [B, T] with grad; 0 outside mask
    lp_old: Tensor  # [B, T] no grad; 0 outside mask
    w: Tensor  # [B, T] no grad; 0 outside mask
    adv: Tensor  # [B, 1]
    mask: Tensor  # [B, T] bool
    eps_low: Tensor  # [B, 1] ε_l(s) per row
    eps_high: Tensor  # [B, 1] ε_h(s) per row


# (tokens, the objective's config) -> (per-token loss [B, T], 0 outside the mask; metrics)
TokenLoss = Callable[[TokenBatch, ObjectiveConfig], "tuple[Tensor, dict[str, Tensor]]"]


@dataclass(frozen=True)
class ObjectiveSpec:
    """An objective: its config class (whose ``type`` literal is its name), its per-token loss,
    and whether it is token-local (∂ℓ_t/∂lp_t depends on token t alone, so the learner may apply
    the gradient while each logprob chunk is computed)."""

    config: type[ObjectiveConfig]
    loss: TokenLoss
    token_local: bool

    @property
    def name(self) -> str:
        return self.config.model_fields["type"].default
