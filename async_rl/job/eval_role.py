"""The job's evaluator: held-out greedy accuracy at exact policy versions.

It subscribes to the learner's weights like an actor, but loads only the versions due for
evaluation (0, every ``learner.eval.every``-th, the last) and evaluates each on an engine of its
own while its subscriber thread is held, so no other version loads meanwhile (see
``evaluation/versions.py``). Each evaluation appends one record to ``metrics/eval.jsonl`` naming
its version and writes the full result document to ``eval/vNNNNNN.json``.

The learner exits right after its last publish, which may never reach the subscriber; the
controller then hands over the exported policy (``final_model``) with ``evaluate_exported``.

With ``learner.eval.defer`` a due version's weights are written to ``eval/pending`` instead and
evaluated when the controller calls ``evaluate_deferred`` at the end of the job, in version order.

Threads: ``run`` blocks a Ray thread until ``stop``; weights arrive on the subscriber's thread;
``evaluate_exported`` and ``evaluated`` on others. One lock serialises load + evaluate.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from async_rl.evaluation.versions import EVAL_DIR, VersionEvaluator, accuracy, is_due
from async_rl.job.metrics import MetricsWriter
from async_rl.records import EvaluatorLaunch, EvaluatorResult, HeldoutRecord

log = logging.getLogger(__name__)


class EvaluatorWorker:
    def __init__(self, launch: EvaluatorLaunch | dict[str, Any]):
        launch = EvaluatorLaunch.model_validate(launch)
        self.cfg = cfg = launch.config
        self.run_dir = launch.run_dir
        self.weights_address = launch.weights_address
        # A resumed job's engine starts from the SFT policy, not from the learner's version: its
        # first evaluation waits for the learner's weights.
        self.evaluate_start = not launch.resume
        source = cfg.data.heldout
        heldout = self.run_dir / "data" / "heldout.parquet" if source == "synthetic" else Path(source)
        self.evaluator = VersionEvaluator.start(launch.model_dir, heldout, cfg, version=0,
                                                work_dir=self.run_dir / "actors" / "evaluator")
        self.metrics = MetricsWriter(self.run_dir, "eval")
        self.records: dict[int, HeldoutRecord] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._subscriber = None

    def run(self) -> EvaluatorResult:
        from async_rl.weights.subscriber import WeightSubscriber

        try:
            if self.evaluate_start:
                with self._lock:
                    self._evaluate("start")
            self._subscriber = WeightSubscriber(self.weights_address, self._on_weights, self.cfg.weights).start()
            self._stop.wait()
        finally:
            if self._subscriber is not None:
                self._subscriber.close()
            self.evaluator.close()
            self.metrics.close()
        return EvaluatorResult(evaluated=sorted(self.records))

    def stop(self) -> None:
        self._stop.set()

    def evaluated(self) -> list[int]:
        return sorted(self.records)

    def evaluate_exported(self, version: int, model_dir: str) -> HeldoutRecord | None:
        """Evaluate the policy exported at ``version`` unless that version was evaluated already."""
        from safetensors.torch import load_file

        with self._lock:
            if version not in self.records:
                tensors = {}
                for path in sorted(Path(model_dir).glob("*.safetensors")):
                    tensors.update(load_file(path))
                self.evaluator.load(version, list(tensors.items()))
                self._evaluate("exported")
            return self.records.get(version)

    def _on_weights(self, version: int, named_tensors) -> None:
        """The subscriber's callback: evaluate a due version (or keep it, deferred); the thread is
        held until done."""
        every, final = self.cfg.learner.eval.every, self.cfg.learner.max_steps
        if version in self.records or not is_due(version, every=every, final=final):
            return
        with self._lock:
            if version in self.records:  # the exported policy may have been evaluated meanwhile
                return
            if self.cfg.learner.eval.defer:
                keep_pending(self.run_dir, version, named_tensors)
                return
            self.evaluator.load(version, named_tensors)
            self._evaluate("publisher")

    def evaluate_deferred(self) -> list[int]:
        """Evaluate every kept version not evaluated yet, oldest first, removing each file after
        its record is written. Returns the versions evaluated."""
        from safetensors.torch import load_file

        done = []
        with self._lock:
            for version, path in pending_versions(self.run_dir):
                if version not in self.records:
                    self.evaluator.load(version, list(load_file(path).items()))
                    self._evaluate("deferred")
                    done.append(version)
                path.unlink()
        return done

    def _evaluate(self, source: str) -> None:
        import time

        document = self.evaluator.evaluate()
        version = document["policy_version"]
        out = self.run_dir / EVAL_DIR / f"v{version:06d}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(document, indent=1))
        record = HeldoutRecord(
            version=version, accuracy=accuracy(document), prompts=document["benchmarks"][0]["problems"],
            no_answer=document["benchmarks"][0]["no_answer_fraction"], weights_from=source,
            eval_s=document["elapsed_s"], result=str(out.relative_to(self.run_dir)), time=time.time(),
        )
        self.records[version] = record
        self.metrics.write(record)
        log.info("held-out v%d: %.3f (%s)", version, record.accuracy, source)


PENDING_DIR = "pending"


def keep_pending(run_dir: Path, version: int, named_tensors) -> Path:
    """Write a due version's weights for a deferred evaluation (atomically: a partial file is
    never taken for a version)."""
    from safetensors.torch import save_file

    out = run_dir / EVAL_DIR / PENDING_DIR / f"v{version:06d}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    save_file({name: tensor.contiguous() for name, tensor in named_tensors}, str(partial))
    partial.replace(out)
    return out


def pending_versions(run_dir: Path) -> list[tuple[int, Path]]:
    """The kept versions and their files, oldest first."""
    paths = (run_dir / EVAL_DIR / PENDING_DIR).glob("v*.safetensors")
    return sorted((int(path.stem[1:]), path) for path in paths)
