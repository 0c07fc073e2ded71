"""Turning one finished group (n samples of one prompt + their rewards) into trajectory rows."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pyarrow as pa

from actors.engine import Sample
from async_rl.rewards.base import RewardRecord
from async_rl.tasks.dataset import PromptRow
from buffer.schema import build_batch


def reward_info(record: RewardRecord, *, kv_on_update: str) -> str:
    """The ``reward_info`` JSON: the reward record plus how the sample was generated.

    ``rollout.kv_on_update`` says whether a response spanning a weight update had its KV
    cache recomputed under the new weights ("recompute") or kept ("keep").
    """
    info = json.loads(record.to_json())
    info["rollout"] = {"kv_on_update": kv_on_update}
    return json.dumps(info)


def group_batch(
    *, group_id: str, actor_id: str, row: PromptRow, prompt_tokens: Sequence[int],
    samples: Sequence[Sample], rewards: Sequence[RewardRecord], kv_on_update: str,
) -> pa.RecordBatch:
    """One validated Arrow batch (schema DESIGN §3.1) holding the whole group.

    ``traj_id`` = ``{group_id}:{i}``: re-sending the same batch after a lost ack is a no-op
    on the buffer (inserts are idempotent on traj_id).
    """
    n = len(samples)
    return build_batch(
        traj_id=[f"{group_id}:{i}" for i in range(n)],
        group_id=[group_id] * n,
        group_size=n,
        prompt_id=[row.prompt_id] * n,
        data_source=row.data_source,
        prompt_tokens=[list(prompt_tokens)] * n,
        response_tokens=[s.token_ids for s in samples],
        behavior_logprobs=[s.logprobs for s in samples],
        token_versions=[s.versions for s in samples],
        reward=[r.score for r in rewards],
        correct=[r.correct for r in rewards],
        reward_info=[reward_info(r, kv_on_update=kv_on_update) for r in rewards],
        finish_reason=[s.finish_reason for s in samples],
        actor_id=actor_id,
    )
