"""learner.eval.defer: the evaluator keeps each due version's weights and evaluates them when the
job ends, oldest first, each on exactly the weights that version was published with."""

from __future__ import annotations

import json
import threading

import torch

from async_rl.config_io import load_config
from async_rl.job.eval_role import EvaluatorWorker, pending_versions
from async_rl.job.metrics import MetricsWriter


class RecordingEvaluator:
    """Stands in for the vLLM ``VersionEvaluator``: "accuracy" is the loaded weight's value."""

    def __init__(self):
        self.version, self.weight, self.loads = 0, None, []

    def load(self, version, named_tensors):
        tensors = dict(named_tensors)
        self.version, self.weight = version, float(tensors["w"].flatten()[0])
        self.loads.append(version)

    def evaluate(self):
        return {"policy_version": self.version, "elapsed_s": 0.1,
                "benchmarks": [{"problems": 4, "no_answer_fraction": 0.0, "pass@k": {"1": self.weight}}]}


def worker(tmp_path, *overrides):
    cfg = load_config("tiny", [f"run.dir={tmp_path}", "learner.eval.every=2", "learner.max_steps=0", *overrides])
    w = EvaluatorWorker.__new__(EvaluatorWorker)
    w.cfg, w.run_dir, w.evaluator = cfg, tmp_path, RecordingEvaluator()
    w.metrics, w.records, w._lock = MetricsWriter(tmp_path, "eval"), {}, threading.Lock()
    return w


def weights(value: float):
    return [("w", torch.full((3, 2), value)), ("b", torch.zeros(4))]


def test_deferred_versions_are_kept_then_evaluated_oldest_first_on_their_own_weights(tmp_path):
    w = worker(tmp_path, "learner.eval.defer=true")
    for version in range(1, 7):  # due: 2, 4, 6
        w._on_weights(version, weights(version / 8))
    assert w.evaluator.loads == [] and w.evaluated() == []
    assert [v for v, _ in pending_versions(tmp_path)] == [2, 4, 6]
    assert w.evaluate_deferred() == [2, 4, 6]
    assert w.evaluator.loads == [2, 4, 6] and pending_versions(tmp_path) == []
    assert {v: r.accuracy for v, r in w.records.items()} == {2: 0.25, 4: 0.5, 6: 0.75}
    assert all(r.weights_from == "deferred" for r in w.records.values())
    rows = [json.loads(line) for line in (tmp_path / "metrics" / "eval.jsonl").read_text().splitlines()]
    assert [r["version"] for r in rows] == [2, 4, 6]
    assert w.evaluate_deferred() == []  # nothing left


def test_without_defer_a_due_version_is_evaluated_as_it_arrives(tmp_path):
    w = worker(tmp_path)
    for version in range(1, 5):
        w._on_weights(version, weights(version / 8))
    assert w.evaluator.loads == [2, 4] and not (tmp_path / "eval" / "pending").exists()
    assert w.records[4].weights_from == "publisher" and w.records[4].accuracy == 0.5
