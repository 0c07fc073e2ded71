"""The one-group rollout (actors/group.py) and the reference step's pure parts
(async_rl/reference.py): failure records, lagged weights, the rows a step trains on, and the
informative-group filter — on a scripted engine and scorer."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future

import pytest

from actors.engine import Sample
from actors.group import Group, Scoring, rollout_group
from async_rl.reference import LaggedWeights, collect_groups, trajectory_table
from async_rl.rewards.base import RewardRecord
from async_rl.tasks.dataset import PromptRow
from buffer.schema import row_staleness


def sample(tokens, version):
    return Sample(list(tokens), [-0.5] * len(tokens), [version] * len(tokens), "stop", "x")


class FakeEngine:
    """Stands in for the vLLM engine: ``n`` two-token samples, or ``empty`` ones for prompt [0]."""

    tokenizer = None

    def __init__(self):
        self.calls: list[tuple] = []

    async def generate(self, prompt_ids, *, n, **sampling):
        self.calls.append((tuple(prompt_ids), n, sampling))
        tokens = [] if list(prompt_ids) == [0] else [7, 8]
        return [Sample(tokens, [-0.5] * len(tokens), [0] * len(tokens), "stop", f"s{i}") for i in range(n)]


def scoring(submit, wait_s=0.2) -> Scoring:
    return Scoring(submit, wait_s, failure_score=-3.0)


def resolved(record: RewardRecord) -> Future:
    future: Future = Future()
    future.set_result(record)
    return future


def test_a_group_has_one_record_per_sample_and_passes_sampling_overrides_to_the_engine():
    engine, seen = FakeEngine(), []

    def submit(kind, text, truth, extra):
        seen.append((kind, text, truth, extra))
        return resolved(RewardRecord(1.0 if text == "s1" else 0.0, "correct" if text == "s1" else "wrong"))

    group = asyncio.run(rollout_group(engine, scoring(submit), [1, 2], data_source="livecodebench",
                                      truth="t", extra_info={"k": 1}, n=3, greedy=True))
    assert isinstance(group, Group) and group.prompt_ids == [1, 2]
    assert [r.score for r in group.rewards] == [0.0, 1.0, 0.0]
    assert group.complete and group.informative
    assert engine.calls == [((1, 2), 3, {"greedy": True})]
    assert seen == [("livecodebench", f"s{i}", "t", {"k": 1}) for i in range(3)]


def test_a_scorer_that_raises_fails_or_hangs_gives_failure_records_not_an_exception():
    calls = iter(["raise", "fail", "hang"])

    def submit(kind, text, truth, extra):
        what = next(calls)
        if what == "raise":
            raise RuntimeError("scorer exploded")
        future: Future = Future()
        if what == "fail":
            future.set_exception(ValueError("bad reward"))
        return future  # "hang": never resolves

    group = asyncio.run(rollout_group(FakeEngine(), scoring(submit), [1], data_source="synthetic/arith",
                                      truth="2", n=3))
    assert [r.status for r in group.rewards] == ["error", "error", "timeout"]
    assert [r.score for r in group.rewards] == [-3.0] * 3
    assert "exploded" in group.rewards[0].error and "bad reward" in group.rewards[1].error
    assert "0.2 s" in group.rewards[2].error
    assert not group.informative


def test_a_group_with_an_empty_sample_is_not_complete():
    group = asyncio.run(rollout_group(FakeEngine(), scoring(lambda *a: resolved(RewardRecord(0.0, "wrong"))),
                                      [0], data_source="synthetic/arith", truth="2", n=2))
    assert not group.complete and len(group.rewards) == 2


@pytest.mark.parametrize("lag", [0, 2, 4, 8])
def test_lagged_weights_serve_version_k_minus_lag_and_hold_at_most_lag_plus_one_sets(lag):
    lagged = LaggedWeights(lag)
    lagged.publish(0, "w0")
    for k in range(12):
        version, weights = lagged.weights_for(k)
        assert version == max(0, k - lag)
        assert weights == f"w{version}"
        lagged.publish(k + 1, f"w{k + 1}")
        assert len(lagged.held) <= lag + 1
    assert lagged.latest == (12, "w12")
    assert lagged.held == list(range(12 - lag, 13))


def test_lagged_weights_refuse_a_version_already_dropped():
    lagged = LaggedWeights(2)
    for version in range(6):
        lagged.publish(version, f"w{version}")
    with pytest.raises(KeyError, match="v1"):
        lagged.weights_for(3)
    with pytest.raises(ValueError, match="lag=-1"):
        LaggedWeights(-1)


def test_step_rows_carry_the_served_policy_version_so_staleness_is_exact():
    row = PromptRow("arith:1", "synthetic/arith", [{"role": "user", "content": "1+1"}], "2")
    records = [RewardRecord(1.0, "correct"), RewardRecord(-1.0, "wrong")]
    engine_label = 17  # the engine's load counter, unrelated to the policy version
    group = Group([1, 2, 3], [sample([4, 5], engine_label), sample([6], engine_label)], records)
    table = trajectory_table([(row, group)] * 2, version=3, run_id="gppo-s4-0", step=7)
    assert table.num_rows == 4
    assert all(v == [3] * len(t) for v, t in zip(table.column("token_versions").to_pylist(),
                                                 table.column("response_tokens").to_pylist(), strict=True))
    assert len(set(table.column("group_id").to_pylist())) == 2
    assert row_staleness(table, learner_version=7).tolist() == [4, 4, 4, 4]
    assert table.column("correct").to_pylist() == [True, False, True, False]


class AlternatingRewards:
    """All-correct for prompts whose truth is 'same', alternating otherwise."""

    def __init__(self):
        self.calls = 0

    def __call__(self, kind, text, truth, extra):
        self.calls += 1
        correct = truth == "same" or self.calls % 2 == 0
        return resolved(RewardRecord(1.0 if correct else -1.0, "correct" if correct else "wrong"))


def test_collect_groups_replaces_zero_advantage_groups_when_filtering(monkeypatch):
    monkeypatch.setattr("async_rl.tasks.encoding.encode_prompt", lambda tokenizer, messages: [1, 2])
    truths = ["same", "mixed", "same", "same", "mixed", "same", "mixed", "mixed", "mixed"]
    rows = [PromptRow(f"p{i}", "synthetic/arith", [{"role": "user", "content": "q"}], t) for i, t in enumerate(truths)]

    out = asyncio.run(collect_groups(FakeEngine(), scoring(AlternatingRewards()), iter(rows), groups=3, n=2,
                                     informative_only=True))
    assert [row.prompt_id for row, _ in out.kept] == ["p1", "p4", "p6"]
    assert out.groups_generated == 7  # ceil(3 × 1.5) = 5 prompts keep 2, then ceil(1 × 1.5) = 2
    assert out.samples == 14 and out.correct == 11
    assert out.tokens == 14 * 2  # every generated sample's tokens count, discarded groups' included

    out = asyncio.run(collect_groups(FakeEngine(), scoring(AlternatingRewards()), iter(rows), groups=3, n=2,
                                     informative_only=False))
    assert [row.prompt_id for row, _ in out.kept] == ["p0", "p1", "p2"]
