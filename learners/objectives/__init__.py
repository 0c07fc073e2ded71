"""The policy-gradient objectives, one module each (ALGORITHMS.md §1, §3).

A module declares its config class (discriminated on ``type``), its pure per-token loss
``(TokenBatch, config) -> (loss [B, T], metrics)`` with the formula and the paper cited, and
exports ``SPEC = ObjectiveSpec(config, loss, token_local=...)``. This package collects every
module but ``base`` into:

- ``LossConfig``: the union ``algorithm.loss`` takes, chosen by ``type`` (``gppo`` when unset);
- ``OBJECTIVES``: ``type`` -> spec, the learner's registry;
- ``TOKEN_LOCAL``: the types whose gradient the learner may fuse into the logprob chunks.

Adding an objective is adding a module here (and its test). Modules import torch inside their
functions: the config imports this package, and the buffer and reward workers load the config.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag

from learners.objectives.base import ObjectiveConfig, ObjectiveSpec, TokenBatch

DEFAULT_OBJECTIVE = "gppo"  # what ``algorithm.loss`` means without a ``type``


def _collect() -> dict[str, ObjectiveSpec]:
    modules = (m.name for m in pkgutil.iter_modules(__path__) if m.name != "base")
    specs = [importlib.import_module(f"{__name__}.{name}").SPEC for name in modules]
    return {spec.name: spec for spec in specs}


OBJECTIVES: dict[str, ObjectiveSpec] = _collect()
TOKEN_LOCAL = frozenset(name for name, spec in OBJECTIVES.items() if spec.token_local)


def _objective_type(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("type", DEFAULT_OBJECTIVE)
    return getattr(value, "type", None)


LossConfig = Annotated[
    Union[tuple(Annotated[spec.config, Tag(name)] for name, spec in OBJECTIVES.items())],  # noqa: UP007
    Discriminator(_objective_type),
]


def default_loss() -> ObjectiveConfig:
    return OBJECTIVES[DEFAULT_OBJECTIVE].config()


__all__ = ["DEFAULT_OBJECTIVE", "OBJECTIVES", "TOKEN_LOCAL", "LossConfig", "ObjectiveConfig",
           "ObjectiveSpec", "TokenBatch", "default_loss"]
