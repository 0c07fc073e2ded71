"""The evaluation core on a scripted engine and reward pool: sampling, scoring, context sizing."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import Future
from types import SimpleNamespace

import pytest

from actors.group import Scoring
from async_rl.config import RewardConfig
from async_rl.evaluation.benchmarks import Benchmark, Problem
from async_rl.evaluation.runner import (
    EvalInputError,
    EvalSettings,
    Plan,
    context_limit,
    engine_configs,
    evaluate_problems,
    parse_rope_scaling,
    plan,
    result_document,
)
from async_rl.rewards.base import RewardRecord


class ScriptedEngine:
    """Answers each prompt (keyed by its first token) with a fixed list of response texts."""

    def __init__(self, texts_by_prompt: dict[int, list[str]]):
        self.texts = texts_by_prompt
        self.calls: list[tuple[int, int]] = []

    async def generate(self, ids, *, n, **overrides):
        self.calls.append((ids[0], n, *overrides.values()))
        await asyncio.sleep(0.01 * (3 - ids[0]))  # finish out of submission order
        return [SimpleNamespace(token_ids=list(range(len(t))), text=t, finish_reason="stop",
                                versions=[ids[0]] * len(t))
                for t in self.texts[ids[0]][:n]]


class ExactMatchRewards:
    """The reward pool's contract: submit_for → Future[RewardRecord]; correct iff text == answer."""

    scoring = property(lambda self: Scoring(self.submit_for, wait_s=5.0, failure_score=0.0))

    def __init__(self):
        self.kinds: list[str] = []

    def submit_for(self, data_source, text, answer, extra_info):
        self.kinds.append(RewardConfig().reward_for(data_source))
        future: Future = Future()
        future.set_result(RewardRecord(1.0 if text == answer else 0.0,
                                       "correct" if text == answer else "wrong", parsed=text or None))
        return future


def problem(i: int, answer: str, source: str = "aime24") -> Problem:
    return Problem(f"b:{i}", [{"role": "user", "content": f"q{i}"}], answer, source)


def test_each_problem_gets_n_scored_samples_in_problem_order():
    engine = ScriptedEngine({0: ["7", "7", "8"], 1: ["1", "2", "3"], 2: ["x", "x", "x"]})
    problems = [problem(0, "7"), problem(1, "3"), problem(2, "y", source="livecodebench")]
    finished = []
    rewards = ExactMatchRewards()
    results = asyncio.run(evaluate_problems(engine, rewards.scoring, problems, [[0], [1], [2]], n=3,
                                            on_done=lambda r: finished.append(r.problem_id),
                                            sampling={"temperature": 0.6}))
    assert [r.problem_id for r in results] == ["b:0", "b:1", "b:2"]
    assert [r.c for r in results] == [2, 1, 0]
    assert [s.tokens for s in results[1].samples] == [1, 1, 1]
    assert [s.weight_versions for s in results[1].samples] == [(1, 1)] * 3
    assert len({s.digest for s in results[0].samples}) == 1  # same tokens, same digest
    assert sorted(engine.calls) == [(0, 3, 0.6), (1, 3, 0.6), (2, 3, 0.6)]
    assert finished == ["b:2", "b:1", "b:0"]  # progress as problems finish, not in order
    assert rewards.kinds.count("code") == 3 and rewards.kinds.count("math") == 6


def test_result_document_carries_settings_numbers_and_per_problem_rows():
    engine = ScriptedEngine({0: ["7", "7", "8", "7"], 1: ["1", "2", "3", "4"]})
    problems = [problem(0, "7"), problem(1, "3")]
    results = asyncio.run(evaluate_problems(engine, ExactMatchRewards().scoring, problems, [[0], [1]], n=4))
    bench = Benchmark("aime24", "aime24.qs.jsonl", "meta.answer", problems)
    doc = result_document("m", [bench], [results], EvalSettings(n=4), Plan([[[0], [1]]], 16, 20, 2048),
                          [1, 4], 1.5, dtype="float32")
    assert doc["settings"]["max_tokens"] == 16 and doc["settings"]["dtype"] == "float32"
    (summary,) = doc["benchmarks"]
    assert summary["avg@n"] == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert summary["pass@k"] == {"1": pytest.approx(0.5), "4": 1.0}
    assert summary["cons@n"] == pytest.approx((1 + 1 / 4) / 2)  # problem 1: a four-way tie, one right
    assert doc["generated_tokens"] == 8
    assert json.loads(json.dumps(doc)) == doc


class CharTokenizer:
    """One token per character of the chat-formatted prompt."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def encode(self, text, add_special_tokens=False):
        return [ord(ch) for ch in text]


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 100}))
    return tmp_path


def bench_of(*questions: str) -> Benchmark:
    return Benchmark("b", "b.jsonl", "answer",
                     [Problem(f"b:{i}", [{"role": "user", "content": q}], "1", "b") for i, q in enumerate(questions)])


def test_max_tokens_defaults_to_what_the_context_leaves_after_the_longest_prompt(model_dir):
    # "<user>" + question + "<assistant>" = 17 + len(question) tokens
    sized = plan(model_dir, [bench_of("abc", "abcdefghij")], EvalSettings(), CharTokenizer())
    assert sized.max_tokens == 100 - 27 and sized.max_model_len == 100
    given = plan(model_dir, [bench_of("abc")], EvalSettings(max_tokens=50), CharTokenizer())
    assert (given.max_tokens, given.max_model_len) == (50, 70)


def test_a_response_budget_past_the_context_is_refused_with_the_fix(model_dir):
    with pytest.raises(EvalInputError, match="exceeds the model's 100-token context.*--rope-scaling"):
        plan(model_dir, [bench_of("abc")], EvalSettings(max_tokens=90), CharTokenizer())


def test_yarn_scaling_extends_the_context_by_its_factor(model_dir):
    scaling = parse_rope_scaling("yarn:2.5", model_dir)
    assert scaling == {"rope_type": "yarn", "factor": 2.5, "original_max_position_embeddings": 100}
    assert context_limit(model_dir, scaling) == 250
    sized = plan(model_dir, [bench_of("abc")], EvalSettings(max_tokens=200, rope_scaling=scaling), CharTokenizer())
    assert sized.max_model_len == 220


@pytest.mark.parametrize("spec", ["yarn", "yarn:x", ":2", "yarn:-1", "{broken"])
def test_malformed_rope_specs_are_refused(model_dir, spec):
    with pytest.raises(EvalInputError, match="--rope-scaling"):
        parse_rope_scaling(spec, model_dir)


def test_engine_configs_carry_the_evaluation_sampling_settings(model_dir):
    sized = plan(model_dir, [bench_of("abc")], EvalSettings(max_tokens=40), CharTokenizer())
    actors, model = engine_configs(EvalSettings(n=16, max_tokens=40, kv_cache_gib=0.5), sized, on_gpu=False)
    assert (actors.n_samples_per_prompt, actors.temperature, actors.top_p, actors.top_k) == (16, 0.6, 0.95, 20)
    assert (actors.max_tokens, actors.kv_cache_gib, actors.enforce_eager) == (40, 0.5, True)
    assert (model.max_model_len, model.dtype, model.rope_scaling) == (60, "float32", None)


def test_only_math_benchmarks_get_a_majority_vote():
    from async_rl.evaluation.runner import votes_on

    assert votes_on(Benchmark("aime24", "f", "answer", [problem(0, "1")]))
    assert not votes_on(Benchmark("lcb", "f", "answer", [problem(0, "1"), problem(1, "[]", source="livecodebench_v5")]))


def test_result_document_refuses_a_benchmark_number_it_does_not_declare(monkeypatch):
    from pydantic import ValidationError

    import async_rl.evaluation.runner as runner

    real = runner.summarize
    monkeypatch.setattr(runner, "summarize", lambda *a, **k: {**real(*a, **k), "pass@K": {}})
    problems = [problem(0, "7")]
    results = asyncio.run(evaluate_problems(ScriptedEngine({0: ["7"]}), ExactMatchRewards().scoring,
                                            problems, [[0]], n=1))
    bench = Benchmark("aime24", "aime24.qs.jsonl", "meta.answer", problems)
    with pytest.raises(ValidationError, match="pass@K"):
        result_document("m", [bench], [results], EvalSettings(n=1), Plan([[[0]]], 16, 20, 2048), [1], 1.0)
