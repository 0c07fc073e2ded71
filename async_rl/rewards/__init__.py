"""Reward functions. Each scores one response against its ground truth and returns a
:class:`RewardRecord`; :mod:`async_rl.rewards.pool` runs them in a pebble process pool."""

from async_rl.rewards.base import RewardRecord

__all__ = ["RewardRecord"]
