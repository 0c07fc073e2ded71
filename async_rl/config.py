"""The typed configuration tree: one pydantic model per component.

Every field is declared and documented once, next to its default, with its bounds.
A component receives only its own section (``cfg.buffer``, ``cfg.learner`` …), never the
whole tree. Loading (YAML + dotted overrides, one-line errors, the table of moved keys) lives
in ``config_io.py``. ``algorithm.loss`` is a union discriminated on ``type``: each objective
declares its own config class next to its loss in ``learners/objectives/`` (torch-free to import).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from buffer.samplers import SAMPLERS
from learners.objectives import LossConfig, default_loss


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches: 127.0.0.0/8, ::1 or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name or a wildcard: reachable from elsewhere
        return False


WILDCARDS = frozenset({"0.0.0.0", "::", "[::]", "*", ""})
AUTO_HOST = "auto"  # cluster.bind_host: the address Ray knows for the driver's node


def is_wildcard(host: str) -> bool:
    """True for an address that binds every interface and so means nothing to a peer."""
    return host.strip() in WILDCARDS


def tcp_host(endpoint: str | None) -> str | None:
    """The host of a ``tcp://HOST:PORT`` endpoint; None for other transports."""
    if not (endpoint or "").startswith("tcp://"):
        return None
    return endpoint[len("tcp://") :].rsplit(":", 1)[0]


class Section(BaseModel):
    """Base of every section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- model


class ModelConfig(Section):
    path: str | None = Field(
        None,
        description="HF-format model directory. None builds the tiny local model "
        "(`async-rl init-model`) into the run folder and reuses it on later runs.",
    )
    size: Literal["tiny", "small"] = Field("tiny", description="Size of the built local model.")
    seed: int = Field(0, ge=0, description="Seed of the built local model's random init.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Compute dtype of actors and learner (float32 is the fast CPU setting)."
    )
    max_model_len: int = Field(1024, gt=0, description="Longest prompt+response the actors serve.")
    rope_scaling: dict | None = Field(
        None,
        description='RoPE scaling passed to vLLM, e.g. {"rope_type": "yarn", "factor": 2.5, '
        '"original_max_position_embeddings": 32768}.',
    )


# --------------------------------------------------------------------------- data


class SynthConfig(Section):
    task: Literal["arith"] = Field("arith", description="Built-in synthetic task family.")
    n_train: int = Field(2000, gt=0, description="Training prompts generated.")
    n_heldout: int = Field(200, gt=0, description="Held-out prompts (disjoint seed stream).")
    n_sft: int = Field(2000, gt=0, description="SFT rows (prompt + worked solution).")
    min_digits: int = Field(1, ge=1, le=12, description="Fewest digits in an operand.")
    max_digits: int = Field(2, ge=1, le=12, description="Most digits in an operand.")
    min_terms: int = Field(2, ge=2, le=8, description="Fewest operands in an expression.")
    max_terms: int = Field(2, ge=2, le=8, description="Most operands in an expression.")
    ops: list[Literal["+", "-", "*"]] = Field(["+", "-"], min_length=1, description="Operators used.")
    slip_rate: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Share of SFT solutions to problems with a minus that misread every '-' as "
        "'+' (a systematic slip RL must learn to avoid; see tasks/arith.py). 0 = all correct.",
    )

    @model_validator(mode="after")
    def _ranges(self) -> SynthConfig:
        if self.min_digits > self.max_digits:
            raise ValueError(
                f"min_digits={self.min_digits} > max_digits={self.max_digits}: min must be <= max"
            )
        if self.min_terms > self.max_terms:
            raise ValueError(
                f"min_terms={self.min_terms} > max_terms={self.max_terms}: min must be <= max"
            )
        return self


class DataConfig(Section):
    train: str = Field(
        "synthetic",
        description="Training prompts: 'synthetic' (built-in task, see `synth`) or a "
        ".parquet/.jsonl file in the verl/Klear row format.",
    )
    heldout: str = Field(
        "synthetic", description="Held-out prompts for evaluation: 'synthetic' or a file."
    )
    synth: SynthConfig = Field(default_factory=SynthConfig)
    seed: int = Field(0, ge=0, description="Seed of the synthetic streams and of prompt order.")
    system_prompt: str | None = Field(None, description="Optional system message prepended to prompts.")


# --------------------------------------------------------------------------- reward


class MathRewardConfig(Section):
    require_think_format: bool = Field(
        False, description="Apply the Klear think-format penalties below."
    )
    missing_think_close: float = Field(
        -0.5, description="Reward when `</think>` is missing (only if require_think_format)."
    )
    missing_think_open: float = Field(
        -2.0, description="Reward when `<think>` is missing (only if require_think_format)."
    )


class CodeRewardConfig(Section):
    max_tests: int = Field(16, ge=1, description="Tests sampled per program (K).")
    soft: bool = Field(True, description="passed/total (soft) instead of all-pass.")
    test_timeout_s: float = Field(
        2.0, gt=0, le=60, description="Wall-clock (and CPU) limit of one test run."
    )
    time_budget_s: float = Field(
        3.0,
        gt=0,
        description="Wall-clock for all of one program's tests (tests past it score as timeouts); "
        "capped at reward.timeout_s minus 2 s for sandbox start-up and clean-up.",
    )
    memory_mb: int = Field(1024, ge=64, le=65536, description="Address-space limit of a test run (MiB).")
    output_bytes: int = Field(
        1 << 20, ge=1024, le=64 << 20, description="Most stdout bytes one test may print."
    )
    float_tol: float = Field(
        0.0, ge=0, lt=1, description="Relative/absolute tolerance of numeric tokens (0 = exact)."
    )
    isolation: Literal["auto", "firejail", "bwrap", "rlimits"] = Field(
        "auto",
        description="Sandbox: 'auto' picks the strongest isolating level that works "
        "(firejail > bwrap > unshare as root) and refuses to score code when none does; "
        "'rlimits' (no network or filesystem isolation) runs only when named; naming a level "
        "makes its absence an error instead of a fallback.",
    )
    sandbox_user: str = Field(
        "asyncrl-sandbox",
        description="Unprivileged user the programs run as when the trainer runs as root "
        "(created by scripts/install.sh); untrusted code never runs as root.",
    )


# Rows whose data_source starts with a key are scored by that reward (async_rl/rewards/NAME.py).
CODE_SOURCES = {"code": "code", "livecodebench": "code", "taco": "code", "apps": "code"}


class RewardConfig(Section):
    correct: float = Field(1.0, description="Reward of a verified correct answer.")
    wrong: float = Field(
        -1.0, description="Reward of a wrong or missing answer, and of a reward call that failed."
    )
    workers: int = Field(2, ge=1, le=256, description="Reward worker processes (pebble pool).")
    timeout_s: float = Field(5.0, gt=0, description="Per-call timeout; a timeout scores as wrong.")
    by_data_source: dict[str, str] = Field(
        default_factory=lambda: dict(CODE_SOURCES),
        description="Which reward (a module async_rl/rewards/NAME.py) scores a row: the longest key "
        "its data_source starts with (case-insensitive), e.g. {aime: math, livecodebench: code}.",
    )
    default: str | None = Field(
        "math",
        description="Reward of a data_source no by_data_source key matches (null = such a row is "
        "an error).",
    )
    math: MathRewardConfig = Field(default_factory=MathRewardConfig)
    code: CodeRewardConfig = Field(default_factory=CodeRewardConfig)

    @field_validator("by_data_source")
    @classmethod
    def _rewards_exist(cls, rewards: dict[str, str]) -> dict[str, str]:
        from async_rl.rewards.base import load_reward

        for source, name in rewards.items():
            try:
                load_reward(name)
            except ValueError as err:
                raise ValueError(f"{source}: {err}") from None
        return rewards

    @field_validator("default")
    @classmethod
    def _default_exists(cls, name: str | None) -> str | None:
        from async_rl.rewards.base import load_reward

        if name is not None:
            load_reward(name)
        return name

    def reward_for(self, data_source: str) -> str:
        """The reward that scores rows of ``data_source``: the longest ``by_data_source`` key it
        starts with (case-insensitive), else ``default``; a ValueError when neither applies."""
        lowered = data_source.lower()
        keys = [key for key in self.by_data_source if lowered.startswith(key.lower())]
        if keys:
            return self.by_data_source[max(keys, key=len)]
        if self.default is None:
            raise ValueError(
                f"data_source={data_source!r}: no reward.by_data_source key matches it and "
                "reward.default is null; map it, e.g. reward.by_data_source: {" + data_source + ": math}"
            )
        return self.default


# --------------------------------------------------------------------------- actors


class ActorsConfig(Section):
    count: int = Field(1, ge=0, description="vLLM actors (engines) generating concurrently.")
    n_samples_per_prompt: int = Field(8, ge=1, description="Responses per prompt (the group size n).")
    prompts_in_flight: int = Field(16, ge=1, description="Prompts each actor keeps submitted.")
    temperature: float = Field(1.0, ge=0, description="Rollout sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Rollout nucleus sampling.")
    top_k: int = Field(-1, ge=-1, description="Rollout top-k (-1 = off).")
    max_tokens: int = Field(64, gt=0, description="Longest response generated.")
    stop: list[str] = Field(default_factory=list, description="Extra stop strings.")
    seed: int | None = Field(0, description="Sampling seed (None = nondeterministic).")
    enforce_eager: bool = Field(True, description="No CUDA graphs / compilation (fast on CPU).")
    kv_cache_gib: float = Field(1.0, gt=0, description="vLLM-CPU KV cache (VLLM_CPU_KVCACHE_SPACE).")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vLLM GPU memory share.")
    multiprocess_engine: bool = Field(
        False, description="vLLM's multi-process engine (slow start on CPU) instead of in-process."
    )
    recompute_kv_on_update: bool = Field(
        True, description="After a weight update, recompute running requests' KV under new weights."
    )
    cpus: float = Field(1.0, gt=0, description="Ray CPUs reserved per actor.")
    gpus: float = Field(0.0, ge=0, description="Ray GPUs reserved per actor.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each actor needs, e.g. {actor_node: 1}: actors go only to "
        "nodes started with `ray start --resources '{\"actor_node\": N}'`.",
    )


# --------------------------------------------------------------------------- buffer


class BufferConfig(Section):
    capacity_rows: int = Field(1_000_000, gt=0, description="Most rows kept; oldest evicted first.")
    capacity_bytes: int = Field(8 << 30, gt=0, description="Most bytes on disk; oldest evicted first.")
    segment_bytes: int = Field(64 << 20, gt=0, description="An Arrow IPC segment rolls past this size.")
    fsync: Literal["batch", "interval", "never"] = Field(
        "batch",
        description="batch = an insert ack (and a sample reply) is sent only after an fsync that "
        "covers it; concurrent requests share fsyncs (group commit). interval = acknowledge at "
        "once and fsync every fsync_interval_s: a power loss may lose up to that long of "
        "acknowledged rows and sample counts (a crash of the buffer process alone loses nothing). "
        "never = leave it to the OS.",
    )
    fsync_interval_s: float = Field(
        1.0, gt=0, description="fsync: interval — how often, so the most a power loss may lose."
    )
    sampler: Literal[tuple(SAMPLERS)] = Field(
        "fifo",
        description="Which groups a sample returns first (buffer/samplers.py): "
        + "; ".join(f"{name} = {fn.__doc__.split(':')[0].lower()}" for name, fn in SAMPLERS.items()),
    )
    max_times_sampled: int = Field(1, ge=1, description="Times a group may be returned (1 = once).")
    min_size_to_sample: int = Field(4, ge=1, description="Groups stored before sampling starts.")
    samples_per_insert: float | None = Field(
        None, gt=0, description="Rate limiter: target groups sampled per group inserted (None = off)."
    )
    spi_tolerance: float = Field(
        8.0, ge=0, description="Rate limiter slack, in groups, around samples_per_insert."
    )
    filter_zero_advantage: bool = Field(
        True, description="Skip groups whose rewards are all equal (their advantages are 0)."
    )
    host: str = Field("127.0.0.1", description="Service bind address.")
    port: int = Field(0, ge=0, le=65535, description="Service port (0 = pick a free one).")
    max_message_bytes: int = Field(256 << 20, gt=0, description="Largest request the service accepts.")


# --------------------------------------------------------------------------- learner


class OptimizerConfig(Section):
    lr: float = Field(1e-4, gt=0, description="Peak learning rate.")
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="After warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine floor as a share of lr.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    grad_clip: float = Field(1.0, gt=0, description="Max global gradient norm.")


class BatchConfig(Section):
    groups_per_step: int = Field(8, ge=1, description="Prompt groups sampled per learner step.")
    mini_batches_per_step: int = Field(
        1, ge=1, description="Optimizer steps per sampled batch (Klear: 8 for math)."
    )
    micro_batch_tokens: int = Field(4096, gt=0, description="Token budget of a packed micro-batch.")
    micro_batch_layout: Literal["packed", "padded", "shared_prompt"] = Field(
        "packed",
        description="packed: a micro-batch's sequences end to end in one row (no padding; attention "
        "over the whole row is masked block by block, O(L^2) in the row unless the attention kernel "
        "skips masked blocks); padded: one right-padded row per sequence, plain causal attention "
        "(the fast choice on CPU, where short sequences would otherwise pay for the whole row); "
        "shared_prompt: padded rows whose prompt runs once per group and micro-batch, its keys and "
        "values read by every response of the group (a group of G responses computes its prompt "
        "once instead of G times).",
    )
    logprob_chunk_tokens: int = Field(
        1024, gt=0, description="Tokens per chunk when computing logprobs from hidden states."
    )
    fused_logprobs: bool = Field(
        True,
        description="Token-local objectives (all but GSPO): apply the loss gradient while each "
        "logprob chunk is computed (3 LM-head matmuls, no recompute in backward).",
    )


class CheckpointConfig(Section):
    every: int = Field(50, ge=0, description="Learner steps between checkpoints (0 = off).")
    keep: int = Field(2, ge=1, description="Checkpoints kept (newest).")


class EvalConfig(Section):
    every: int = Field(10, ge=0, description="Learner steps between held-out evaluations (0 = off).")
    prompts: int = Field(200, ge=1, description="Held-out prompts per evaluation.")
    defer: bool = Field(
        False,
        description="Keep each due version's weights (RUN/eval/pending) and evaluate them when the "
        "job ends, before the final policy: evaluation then takes no cores from training (on a "
        "small machine the evaluator's engine competes with the actors and the learner), and the "
        "accuracies arrive at the end, still one exact version each.",
    )


class SFTConfig(Section):
    epochs: float = Field(0.0, ge=0, description="SFT warm-start epochs before RL (0 = none).")
    lr: float = Field(
        1e-3, gt=0,
        description="SFT learning rate; the rest of learner.optimizer applies, with a cosine decay "
        "over the SFT steps.",
    )
    batch_size: int = Field(32, ge=1, description="SFT rows per optimizer step.")


class LearnerConfig(Section):
    ranks: int = Field(1, ge=1, description="Data-parallel learner ranks (one DeepSpeed group).")
    zero_stage: int = Field(0, description="DeepSpeed ZeRO stage.")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="torch.distributed backend.")
    max_steps: int = Field(200, ge=0, description="Learner steps to run (0 = until stopped).")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    cpus: float = Field(1.0, gt=0, description="Ray CPUs reserved per learner rank.")
    gpus: float = Field(0.0, ge=0, description="Ray GPUs reserved per learner rank.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each learner rank needs (its placement bundle), e.g. "
        "{learner_node: 1}.",
    )

    @field_validator("zero_stage")
    @classmethod
    def _zero(cls, stage: int) -> int:
        if stage not in (0, 1, 2, 3):
            raise ValueError("must be 0, 1, 2 or 3")
        return stage

    @property
    def sft_optimizer(self) -> OptimizerConfig:
        """The SFT warm start's optimizer: ``optimizer`` with ``sft.lr``, decayed by cosine."""
        return OptimizerConfig.model_validate(
            {**self.optimizer.model_dump(), "lr": self.sft.lr, "lr_schedule": "cosine"}
        )


# --------------------------------------------------------------------------- algorithm


class StalenessScheduleConfig(Section):
    type: Literal["constant", "linear", "inverse"] = Field(
        "constant", description="How clip bounds move with staleness s: ε0, ε0(1+κs), ε0/(1+κs)."
    )
    kappa: float = Field(0.25, ge=0, description="Schedule slope κ.")
    eps_min: float = Field(0.01, ge=0, description="Clamp floor of ε(s).")
    eps_max: float = Field(0.9, gt=0, description="Clamp ceiling of ε(s); ε_l(s) stays below 1.")

    @model_validator(mode="after")
    def _range(self) -> StalenessScheduleConfig:
        if self.eps_min > self.eps_max:
            raise ValueError(f"eps_min={self.eps_min} > eps_max={self.eps_max}: min must be <= max")
        return self


class StalenessConfig(Section):
    max_staleness: int = Field(
        4, ge=0,
        description="Rows older than this many policy versions are never trained on: the buffer "
        "does not hand them out, the learner masks them, and actors pause rather than produce them.",
    )
    schedule: StalenessScheduleConfig = Field(default_factory=StalenessScheduleConfig)


class OffPolicyConfig(Section):
    mode: Literal["decoupled", "coupled", "none"] = Field(
        "decoupled", description="Clip centre: recomputed proximal logprobs, or behaviour logprobs; "
        "none: proximal centre without the behaviour weight (no correction: the study's control arm)."
    )
    tis_cap: float | None = Field(2.0, gt=0, description="Truncate the behaviour weight w at C.")
    icepop: tuple[float, float] | None = Field(
        None, description="Mask tokens whose w lies outside [α, β] (IcePop, e.g. [0.5, 5])."
    )
    m2po_tau: float | None = Field(None, gt=0, description="M2PO second-moment threshold τ.")

    @field_validator("icepop")
    @classmethod
    def _icepop(cls, bounds: tuple[float, float] | None) -> tuple[float, float] | None:
        if bounds is not None and not 0 <= bounds[0] < bounds[1]:
            raise ValueError(f"{list(bounds)}: need 0 <= α < β, e.g. [0.5, 5]")
        return bounds


class AdvantageConfig(Section):
    type: Literal["grpo", "drgrpo"] = Field("grpo", description="Group z-score, or mean-centred only.")
    std: Literal["unbiased", "population"] = Field("unbiased", description="Std estimator (GRPO).")
    eps: float = Field(1e-6, ge=0, description="Added to the std.")


class OverlongConfig(Section):
    shaping: bool = Field(False, description="DAPO soft overlong penalty.")
    buffer_tokens: int = Field(16, ge=1, description="L_cache: length of the penalty ramp.")
    penalty_factor: float = Field(1.0, ge=0, description="Penalty at the max length.")
    filter: bool = Field(False, description="Drop responses cut at max_tokens (no EOS).")


class AlgorithmConfig(Section):
    mode: Literal["async", "sync"] = Field("async", description="Asynchronous, or generate→train.")
    loss: LossConfig = Field(
        default_factory=default_loss,
        description="Objective, chosen by `type` (ALGORITHMS.md §1, §3); each type has its own fields "
        "(learners/objectives/TYPE.py).",
    )
    off_policy: OffPolicyConfig = Field(default_factory=OffPolicyConfig)
    staleness: StalenessConfig = Field(default_factory=StalenessConfig)
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = Field(
        "token-mean", description="Loss aggregation (token-mean uses the global token count)."
    )
    sum_norm_tokens: int = Field(
        1024, gt=0, description="Constant length L of seq-mean-token-sum-norm (Dr.GRPO), e.g. max_tokens."
    )
    advantage: AdvantageConfig = Field(default_factory=AdvantageConfig)
    overlong: OverlongConfig = Field(default_factory=OverlongConfig)
    sft_coef: float = Field(0.1, ge=0, description="Klear α: NLL on fully correct responses.")
    kl_coef: float = Field(0.0, ge=0, description="KL penalty: must be 0 (Klear and DAPO use 0).")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus (0 = logged only).")

    @field_validator("kl_coef")
    @classmethod
    def _no_kl(cls, coef: float) -> float:
        if coef > 0:
            raise ValueError(
                "a KL penalty needs reference-policy logprobs, which the learner does not compute; "
                "set it to 0 (Klear and DAPO use 0)"
            )
        return coef


# --------------------------------------------------------------------------- weights


class WeightsConfig(Section):
    publish_every: int = Field(1, ge=1, description="Learner steps between weight publishes.")
    host: str | None = Field(
        None,
        description="Publisher bind address, also the one actors are given. None = learner rank "
        "0's node: cluster.bind_host when that is the driver's node, else the address Ray knows "
        "for it (127.0.0.1 for a publisher outside a job).",
    )
    port: int = Field(0, ge=0, le=65535, description="Publisher port (0 = pick a free one).")
    chunk_bytes: int = Field(1 << 20, ge=4096, description="Payload chunk size.")
    wire_dtype: Literal["same", "bfloat16", "float16"] = Field(
        "same", description="Send fp32 masters as this dtype ('same' = unchanged)."
    )
    changed_only: bool = Field(False, description="Send only tensors that changed since the last publish.")
    curve_keys_dir: str | None = Field(
        None, description="ZeroMQ CURVE keys (`async-rl keys generate DIR`); required off loopback."
    )
    endpoint: str | None = Field(
        None,
        description="Full ZeroMQ endpoint to bind, e.g. 'ipc:///tmp/w.sock' (None = tcp on host:port).",
    )
    credit_chunks: int = Field(
        16, ge=1, le=1024, description="Chunks a subscriber lets the publisher have in flight to it."
    )
    transport: Literal["auto", "tcp", "shm"] = Field(
        "auto",
        description=(
            "How a version reaches a subscriber on the publisher's host: 'auto' = it maps the "
            "publisher's /dev/shm file (zero-copy, checksums verified), others stream over the "
            "socket; 'tcp' = everyone streams, no /dev/shm files; 'shm' = like auto, but a "
            "subscriber that cannot map a version drops it instead of streaming it."
        ),
    )
    heartbeat_s: float = Field(
        0.5, gt=0, le=60, description="Idle subscribers re-announce their version this often."
    )
    stall_timeout_s: float = Field(
        10.0, gt=0, description="A transfer or peer silent this long is dropped (and re-requested)."
    )


# --------------------------------------------------------------------------- cluster


class ClusterConfig(Section):
    ray_address: str | None = Field(
        None, description="None starts a private local Ray; 'auto' or HOST:PORT joins a cluster."
    )
    bind_host: str = Field(
        "127.0.0.1",
        description="Address the driver's node binds and gives to peers (buffer, control; loopback "
        "locally); localhost and ::1 become 127.0.0.1, so every stage (learner rendezvous "
        "included) knows it stays on this machine. 'auto' = the address Ray knows for this node "
        "(127.0.0.1 for a private local Ray). Never a wildcard: peers could not reach it.",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs given to a private local Ray.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement group strategy on clusters."
    )

    @field_validator("bind_host")
    @classmethod
    def _loopback_is_one_address(cls, host: str) -> str:
        return "127.0.0.1" if is_loopback(host) and not host.startswith("127.") else host

    @model_validator(mode="after")
    def _auto_is_loopback_without_a_cluster(self) -> ClusterConfig:
        if self.bind_host == AUTO_HOST and self.ray_address is None:
            self.bind_host = "127.0.0.1"  # a private Ray has one node: this machine's loopback
        return self


# --------------------------------------------------------------------------- logging / run


class LoggingConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    tensorboard: bool = Field(True, description="Write TensorBoard events to the run folder.")
    console: Literal["auto", "rich", "plain"] = Field(
        "auto", description="Live display: rich on a TTY, plain lines otherwise."
    )
    log_every: int = Field(1, ge=1, description="Learner steps between metric lines.")


class RunConfig(Section):
    dir: str = Field("runs/tiny", description="Run folder: config, metrics, checkpoints, buffer, model.")
    seed: int = Field(0, ge=0, description="Global seed.")
    resume: bool = Field(False, description="Continue the run in `dir` from its last checkpoint.")
    max_minutes: float | None = Field(None, gt=0, description="Stop after this much wall-clock.")


# --------------------------------------------------------------------------- root


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    actors: ActorsConfig = Field(default_factory=ActorsConfig)
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    weights: WeightsConfig = Field(default_factory=WeightsConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _cross_field(self) -> Config:
        if self.actors.max_tokens >= self.model.max_model_len:
            raise ValueError(
                f"actors.max_tokens={self.actors.max_tokens} must be below "
                f"model.max_model_len={self.model.max_model_len}"
            )
        batch = self.learner.batch
        if batch.groups_per_step % batch.mini_batches_per_step:
            raise ValueError(
                f"learner.batch.groups_per_step={batch.groups_per_step} must be a multiple of "
                f"learner.batch.mini_batches_per_step={batch.mini_batches_per_step}"
            )
        if self.learner.optimizer.lr_schedule == "cosine" and self.learner.max_steps == 0:
            raise ValueError(
                "learner.optimizer.lr_schedule=cosine needs learner.max_steps > 0 (the decay horizon)"
            )
        if self.algorithm.overlong.shaping and (
            self.algorithm.overlong.buffer_tokens >= self.actors.max_tokens
        ):
            raise ValueError(
                f"algorithm.overlong.buffer_tokens={self.algorithm.overlong.buffer_tokens} must be "
                f"below actors.max_tokens={self.actors.max_tokens}"
            )
        self._check_addresses_can_be_advertised()
        self._check_listeners_are_authenticated()
        return self

    def _listeners(self) -> dict[str, str]:
        """Every configured address a listener binds and peers are given, by its key."""
        listeners = {"cluster.bind_host": self.cluster.bind_host, "buffer.host": self.buffer.host}
        if self.weights.host is not None:
            listeners["weights.host"] = self.weights.host
        if (host := tcp_host(self.weights.endpoint)) is not None:
            listeners["weights.endpoint"] = host
        return listeners

    def _check_addresses_can_be_advertised(self) -> None:
        """A listener's address is also what its peers are told: a wildcard means nothing to them."""
        for name, host in self._listeners().items():
            if is_wildcard(host):
                raise ValueError(
                    f"{name}={host}: a wildcard binds every interface but cannot be given to peers; "
                    "set this node's address" + (" or 'auto'" if name == "cluster.bind_host" else "")
                )

    def _check_listeners_are_authenticated(self) -> None:
        """Off loopback every listener (buffer, control, weights, learner rendezvous) requires
        the job's CURVE keys, so a config that would open one without them is refused."""
        if self.weights.curve_keys_dir is not None:
            return
        for name, host in self._listeners().items():
            if not is_loopback(host):
                raise ValueError(
                    f"{name}={host}: off loopback every listener requires CURVE keys; set "
                    "weights.curve_keys_dir (`async-rl keys generate DIR`)"
                )

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir)

