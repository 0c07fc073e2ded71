"""The records that cross process boundaries, each key declared once.

Roles are started with a launch spec (``LearnerLaunch``, ``ActorLaunch``, ``EvaluatorLaunch``)
and end with a result; the controller reports a ``JobStatus``; every role appends its metrics
records to ``RUN_DIR/metrics/ROLE.jsonl``; the live view and ``async-rl status`` show a
``Snapshot``; the operating commands send a ``ControlRequest`` and find the job in ``RunInfo``
(``RUN_DIR/run.json``). A record refuses an unknown key and requires every key without a default, so a
misspelt key fails where it is written, naming the key, instead of being read back as a default.

Over Ray a record travels as itself; over any other wire (the control socket, the run folder,
``learners.launch``'s command line) it is JSON (``model_dump(mode="json")``) and is read back
with ``model_validate``, never pickle.

Metrics files outlive versions of the program, so their readers take rows with ``read``: the
declared keys a row lacks are None, the keys it has beyond them are dropped, and reading an
undeclared key is an ``AttributeError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from async_rl.config import Config, LearnerConfig


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def pick(cls, source: Mapping[str, Any], **more: Any) -> Self:
        """The record's fields out of a larger mapping (plus ``more``); each one is required."""
        return cls.model_validate({**{k: source[k] for k in cls.model_fields if k in source}, **more})

    @classmethod
    def read(cls, row: Mapping[str, Any]) -> Self:
        """A row of a file this record was written to, unvalidated (files outlive versions of the
        program): declared keys it lacks are None and stay unset, undeclared ones are dropped."""
        return cls.model_construct(_fields_set=set(row) & set(cls.model_fields),
                                   **{name: row.get(name) for name in cls.model_fields})

    def row(self) -> dict[str, Any]:
        """The record as one metrics-file row."""
        return self.model_dump()


def one_line(err: ValidationError) -> str:
    """A record's validation error as one line naming each bad key."""
    problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg']}" for e in err.errors())
    return f"{err.title}: {problems}"


# ---------------------------------------------------------------------- launch specs


class ControllerLaunch(Record):
    """What the controller starts with (``job/controller.Controller``)."""

    config: Config
    run_dir: Path
    model_dir: Path  # the policy the job starts from (the SFT'd model, or the base model)
    stop_token_ids: tuple[int, ...]  # the tokenizer's end tokens, for the learner's rollout length


class LearnerLaunch(Record):
    """What every learner rank starts with (``job/learner_role.learner_main``)."""

    config: Config
    run_dir: Path
    model_dir: Path
    buffer_address: str
    stop_token_ids: tuple[int, ...]
    resume: bool  # load the newest checkpoint of run_dir/checkpoints, if any


class ActorLaunch(Record):
    """What an actor starts with (``job/actor_role.ActorWorker``)."""

    config: Config
    actor_id: int
    # (run seed, actor id, launch, incarnation): a restarted or resumed actor samples new streams.
    sampling_stream: tuple[int, ...]
    run_dir: Path
    model_dir: Path
    buffer_address: str
    weights_address: str
    first_version: int  # sample only once the engine serves this version (the learner's checkpoint)


class EvaluatorLaunch(Record):
    """What the held-out evaluator starts with (``job/eval_role.EvaluatorWorker``)."""

    config: Config
    run_dir: Path
    model_dir: Path
    weights_address: str
    resume: bool  # a resumed job's first evaluation waits for the learner's weights


class SFTLaunch(Record):
    """What every SFT rank starts with (``learners/sft.sft_rank``, over ``learners.launch``'s
    command line as JSON)."""

    learner: LearnerConfig
    model_dir: Path
    data: Path  # SFT rows: the verl format with a response
    out_dir: Path  # the HF export (rank 0 writes it and sft_metrics.json)
    max_len: int  # model.max_model_len: longest prompt + response kept
    epochs: float = Field(gt=0)
    seed: int
    dtype: Literal["float32", "bfloat16", "float16"]


# ---------------------------------------------------------------------- role results


class LearnerResult(Record):
    version: int
    steps: int


class ActorResult(Record):
    actor: str
    groups: int


class EvaluatorResult(Record):
    evaluated: list[int]


# ---------------------------------------------------------------------- metrics rows


class LearnerStepRecord(Record):
    """``metrics/learner.jsonl``: one row per logged step; ``train`` holds the trainer's own
    figures (loss, clip fractions, phase times), written as keys of the row."""

    step: int
    version: int
    ranks: int
    reward_mean: float | None
    accuracy: float | None  # the share of the batch's rows whose stored verdict is correct
    staleness_mean: float | None
    staleness_max: float | None
    response_tokens: int
    groups: int  # groups in the batch
    groups_all_equal: int  # of them, groups whose rewards are all equal: no policy-gradient signal
    step_s: float
    sample_wait_s: float
    busy_fraction: float
    publish_s: float | None  # None until the first publish after the start
    train: dict[str, Any] = {}

    def row(self) -> dict[str, Any]:
        return {**self.model_dump(exclude={"train"}), **self.train}


class ActorMetricsRecord(Record):
    """``metrics/actor-N.jsonl``: one row every few seconds; most keys are ``Actor.metrics()``'s."""

    tokens_per_s: float
    tokens: int = 0  # response tokens generated since the actor started (the cost of its rows)
    groups_done: int
    weight_version: int
    weight_update_s: float | None  # the last weight update, from receipt to serving
    reward_mean: float | None
    groups_in_flight: int
    rows_acked: int
    reward_failures: int
    staleness_gate_waits: int
    buffer_batches_refused: int
    buffer_stalled_s: float
    weights_streamed: int
    weights_from_shm: int
    weights_bytes_streamed: int
    time: float


class HeldoutRecord(Record):
    """``metrics/eval.jsonl``: one row per evaluated version; ``result`` is the full result
    document's path in the run folder (``eval/vNNNNNN.json``)."""

    version: int
    accuracy: float
    prompts: int
    no_answer: float
    weights_from: Literal["start", "publisher", "exported", "deferred"]
    eval_s: float
    result: str
    time: float


# ---------------------------------------------------------------------- evaluation results

EVAL_RESULT_FORMAT = "async-rl-eval/1"


class EvalRecord(Record):
    """Keys with ``@`` in the file (``avg@n``) are fields with a plain name and that alias."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def document(self) -> dict[str, Any]:
        """The JSON-ready mapping, keys as the file spells them."""
        return self.model_dump(by_alias=True)


class ProblemRow(EvalRecord):
    """One problem of a benchmark: ``n`` samples, ``correct`` of them right."""

    id: str
    answer: Any
    n: int
    correct: int
    pass_at_k: dict[str, float] = Field(alias="pass@k")
    cons: float | None
    majority_answer: Any
    majority_votes: int
    mean_tokens: float
    truncated: int
    statuses: dict[str, int]
    digests: list[Any]


class BenchmarkResult(EvalRecord):
    """A benchmark's numbers (rates are fractions in [0, 1]) and its per-problem rows."""

    name: str
    file: str | None
    answer_field: str | None
    problems: int
    samples: int
    avg_at_n: float = Field(alias="avg@n")
    pass_at_k: dict[str, float] = Field(alias="pass@k")
    cons_at_n: float | None = Field(alias="cons@n")
    mean_response_tokens: float
    truncated_fraction: float
    no_answer_fraction: float
    per_problem: list[ProblemRow]


class EvalResult(EvalRecord):
    """An ``async-rl eval`` result file, also the job's ``eval/vNNNNNN.json``."""

    format: Literal["async-rl-eval/1"]
    model: str
    created: str
    settings: dict[str, Any]
    ks: list[int]
    elapsed_s: float
    engine_start_s: float | None = None
    generated_tokens: int
    benchmarks: list[BenchmarkResult]


# ---------------------------------------------------------------------- operating a job


Verb = Literal["status", "scale_actors", "scale_learners", "stop"]
VERBS: tuple[str, ...] = get_args(Verb)


class ControlRequest(Record):
    """One request to the job's control endpoint (``job/control.py``); ``count`` for scaling."""

    verb: Verb
    count: int | None = None


class RunInfo(Record):
    """``RUN_DIR/run.json``: where a started job listens, for the operating commands; written
    in parts (``runfolder.update_run_json``), so every key may be absent."""

    pid: int | None = None
    control_address: str | None = None
    curve_keys_dir: str | None = None
    buffer_address: str | None = None
    weights_address: str | None = None
    buffer_pid: int | None = None
    policy_dir: str | None = None
    ray_address: str | None = None
    updated_at: float | None = None


# ---------------------------------------------------------------------- status


class JobAddresses(Record):
    """Where the job's services listen (also in ``run.json``)."""

    buffer_address: str | None
    weights_address: str
    buffer_pid: int | None


class BufferSummary(Record):
    """The part of the buffer's ``stats`` that ``async-rl status`` shows."""

    rows: int
    groups: int
    groups_live: int
    groups_sampleable: int
    bytes: int
    learner_version: int
    groups_sampled_total: int
    evicted_rows: dict[str, int]
    prompts: dict[str, Any] | None  # the data cursor's progress, ``buffer/cursor.progress``
    leases: dict[str, int]  # held by the learner until its checkpoint covers them: outstanding, groups


class NodeState(Record):
    """A node of the Ray cluster as the job's controller last saw it: alive, or lost during the job."""

    node_id: str
    address: str
    alive: bool
    death: str = ""  # Ray's reason, for a lost node


class JobStatus(JobAddresses):
    """The controller's answer to ``async-rl status`` (and to every scale request)."""

    pids: dict[str, int]
    buffer_stats: BufferSummary | None
    actors: list[int]
    # Actors Ray has not placed and started yet (their process has not answered).
    actors_pending: list[int] = Field(default_factory=list)
    nodes: list[NodeState] = Field(default_factory=list)
    learner_ranks: int
    finished: bool
    failure: str | None
    restarts: dict[str, int]
    events: list[str]


class Snapshot(Record):
    """The figures the live view, ``async-rl status`` and ``summary.json`` show, from the run
    folder's metrics; the last four only when the job answered."""

    version: int
    step_s: float | None
    reward_mean: float | None
    train_accuracy: float | None
    staleness_mean: float | None
    staleness_max: float | None
    learner_busy: float | None
    publish_s: float | None
    heldout_accuracy: float | None
    heldout_version: int | None
    first_heldout_accuracy: float | None
    tokens_per_s: float | None
    weight_update_s: float | None
    actor_versions: dict[str, int | None]
    buffer_batches_refused: int
    buffer_stalled_s: float
    actors_alive: int | None = None
    learner_ranks: int | None = None
    buffer: BufferSummary | None = None
    events: list[str] | None = None

    def shown(self) -> dict[str, Any]:
        """As JSON: the job's figures only when it answered."""
        return self.model_dump(mode="json", exclude_unset=True)
