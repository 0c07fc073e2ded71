"""The DeepSpeed adapter: the one module of the project that imports DeepSpeed.

It wraps a transformers causal LM loaded from a local folder in a DeepSpeed engine
(ZeRO 0/1/2/3; fp32 on CPU, bf16 on GPU; gloo on CPU, nccl on GPU) whose forward returns
per-token logprobs of packed sequences computed from the final hidden states in chunks,
so no [tokens, vocab] tensor is ever materialised. Gradient accumulation is owned by the
caller: any number of ``backward`` calls, then one ``step`` (DeepSpeed's unmanaged mode),
because packed micro-batch counts change from step to step.

One optimizer step is :func:`accumulate_and_step`, shared by the RL trainer and SFT: each
micro-batch's loss (a pure function of its forward) is checked for finiteness and
back-propagated, then the engine steps once; the loss sums and the metrics stay tensors, so the
step reaches the host once, in :func:`to_host`.

Optimizer: torch AdamW as DeepSpeed's client optimizer, so nothing is compiled on CPU.
A step whose gradient is not finite is not applied: ZeRO 1/2/3 detect it in their global
norm, and stage 0 uses :class:`FiniteGuardAdamW`, which DeepSpeed consults through its
``overflow`` attribute. Either way ``StepResult.applied`` is False and the LR schedule
does not advance.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import torch
from torch import Tensor, nn

from async_rl.config import LearnerConfig, OptimizerConfig
from learners.logprobs import CoefficientFn, fused_token_objective, token_logprobs
from learners.profiling import PhaseTimer

# DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (about a minute) on first
# init. Training never uses it (only inference_all_reduce does), so on CPU it is declined.
SHM_COMM_OP = "deepspeed_shm_comm"
# Logged so a run shows DeepSpeed's own lines only when something goes wrong.
DS_LOG_LEVEL = "WARNING"
# Set by the launchers when every rank runs on this machine: the path of the rendezvous file.
RENDEZVOUS_ENV = "ASYNC_RL_RENDEZVOUS"
ADAM_EPS = 1e-8
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the data-parallel group (from the launcher's env)."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_env(cls) -> DistInfo:
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )


@dataclass(frozen=True)
class StepResult:
    applied: bool
    grad_norm: float  # inf when the step was skipped for a non-finite gradient
    lr: float


class FiniteGuardAdamW(torch.optim.AdamW):
    """AdamW that clips the global gradient norm and refuses a non-finite step (ZeRO stage 0
    in fp32, where DeepSpeed steps the client optimizer directly).

    DeepSpeed reads ``overflow`` after ``step()`` to count skipped steps and hold the LR
    schedule, and ``_global_grad_norm`` (pre-clip) for ``get_global_grad_norm()``. Gradients
    are already all-reduced here, so every rank takes the same decision.
    """

    def __init__(self, params, *, max_grad_norm: float, **kwargs):
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm
        self.overflow = False
        self._global_grad_norm = None

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm) if params else torch.zeros(())
        self._global_grad_norm = float(norm)
        self.overflow = not math.isfinite(self._global_grad_norm)
        if self.overflow:
            return None
        return super().step(closure)


class TokenLogprobModel(nn.Module):
    """A causal LM whose forward yields logprobs of chosen next tokens of a packed row.

    The LM head weight is read outside the head's own forward, so under ZeRO-3 it is
    registered as an external parameter of this module and gathered for its forward.
    """

    def __init__(self, causal_lm: nn.Module, *, chunk_tokens: int):
        super().__init__()
        self.causal_lm = causal_lm
        self.chunk_tokens = chunk_tokens

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        gather_index: Tensor,
        targets: Tensor,
        temperature: float = 1.0,
        with_entropy: bool = False,
        coefficients: CoefficientFn | None = None,
        on_proximal: Callable[[Tensor], CoefficientFn | None] | None = None,
        prefix_ids: Tensor | None = None,
        prefix_lengths: Tensor | None = None,
        prefix_index: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        """input_ids, position_ids: [1, L] (positions restart at 0 per packed sequence) or
        [B, L] (one right-padded sequence per row); gather_index: [N] flat positions whose next
        token is scored; targets: [N] those tokens.
        Returns logp [N] (and entropy [N] when asked), in fp32. With ``coefficients`` (a
        token-local loss's, see :func:`learners.logprobs.fused_token_objective`) returns
        (surrogate, logp, entropy): the loss gradients are formed inside this forward, where
        ZeRO-3 has the LM head gathered, and backward only hands them out.

        ``on_proximal`` receives the logprobs [N] of these weights exactly as a separate no-grad
        pass computes them (same hidden states, same :func:`token_logprobs` call) and returns
        the ``coefficients`` to use (None: return logp/entropy): while the policy has not moved,
        the training forward doubles as the proximal pass.

        ``prefix_*`` (the ``shared_prompt`` layout, :func:`learners.packing.build_shared_micro_batch`):
        the distinct prompts [U, P] run first, and ``input_ids`` [B, L] continue them, each row
        attending to the keys and values of its prompt (``prefix_index`` [B]); ``gather_index``
        then points into the prompts' [U * P] positions followed by the continuations' [B * L]."""
        if prefix_ids is None:
            out = self.causal_lm.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
            states = out.last_hidden_state.flatten(0, 1)
        else:
            states = shared_prompt_states(self.causal_lm.base_model, input_ids, position_ids, prefix_ids, prefix_lengths,
                                          prefix_index)
        hidden = states.index_select(0, gather_index)
        weight = self.causal_lm.get_output_embeddings().weight
        if on_proximal is not None:
            with torch.no_grad():
                proximal, _ = token_logprobs(
                    hidden.detach(), weight.detach(), targets,
                    chunk_tokens=self.chunk_tokens, temperature=temperature, with_entropy=False,
                )
            coefficients = on_proximal(proximal)
        if coefficients is not None:
            return fused_token_objective(
                hidden, weight, targets, coefficients,
                chunk_tokens=self.chunk_tokens, temperature=temperature, with_entropy=with_entropy,
            )
        return token_logprobs(
            hidden,
            weight,
            targets,
            chunk_tokens=self.chunk_tokens,
            temperature=temperature,
            with_entropy=with_entropy,
        )


def shared_prompt_states(
    base_model: nn.Module, input_ids: Tensor, position_ids: Tensor, prefix_ids: Tensor, prefix_lengths: Tensor,
    prefix_index: Tensor,
) -> Tensor:
    """Hidden states [U * P + B * L, H] of the ``shared_prompt`` layout: the prompts', then their
    continuations'. The prompts' keys and values are picked per row (an index, so their gradients
    sum over the rows that read them) and the continuations attend to them past each prompt's
    padding."""
    n_prompts, prompt_width = prefix_ids.shape
    positions = torch.arange(prompt_width, device=prefix_ids.device)
    prompts = base_model(input_ids=prefix_ids, position_ids=positions.expand(n_prompts, prompt_width), use_cache=True)
    cache = prompts.past_key_values
    cache.batch_select_indices(prefix_index)
    known = (positions.unsqueeze(0) < prefix_lengths.unsqueeze(1))[prefix_index]
    mask = torch.cat([known, torch.ones_like(input_ids, dtype=torch.bool)], dim=1).long()
    out = base_model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, past_key_values=cache,
                     use_cache=True)
    return torch.cat([prompts.last_hidden_state.flatten(0, 1), out.last_hidden_state.flatten(0, 1)])


def default_dtype() -> str:
    return "bfloat16" if torch.cuda.is_available() else "float32"


def default_backend(cfg: LearnerConfig) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(cfg: LearnerConfig) -> DistInfo:
    """Join the process group described by MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE."""
    info = DistInfo.from_env()
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("RANK", str(info.rank))
    os.environ.setdefault("WORLD_SIZE", str(info.world_size))
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    backend = default_backend(cfg)
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    else:
        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
    deepspeed.utils.logger.setLevel(DS_LOG_LEVEL)
    rendezvous = os.environ.get(RENDEZVOUS_ENV)
    if rendezvous and not torch.distributed.is_initialized():
        # A file store: torch's TCP store would listen on every interface, not just loopback.
        torch.distributed.init_process_group(
            backend, init_method=f"file://{rendezvous}", rank=info.rank, world_size=info.world_size,
            timeout=deepspeed.constants.default_pg_timeout,
        )
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return info


def lr_factor(step: int, cfg: OptimizerConfig, total_steps: int) -> float:
    """Multiplier of the peak lr after ``step`` optimizer steps: linear warmup, then constant or cosine."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; leave biases and norm scales (1-D tensors) undecayed, as is standard."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def ds_config(
    cfg: LearnerConfig, dtype: str, overrides: dict | None = None, *, clip_in_engine: bool = True,
    optimizer_cfg: OptimizerConfig | None = None,
) -> dict:
    zero: dict = {"stage": cfg.zero_stage, "overlap_comm": False}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # Packed micro-batch counts vary per step: the caller owns the boundary (step()).
        "managed_gradient_accumulation": False,
        "gradient_clipping": (optimizer_cfg or cfg.optimizer).grad_clip if clip_in_engine else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


class LearnerEngine:
    """A causal LM under DeepSpeed, with caller-owned gradient accumulation.

    ``total_steps`` (optimizer steps) sets the cosine horizon. ``optimizer_cfg`` replaces
    ``cfg.optimizer`` (the SFT warm start's). ``ds_overrides`` merges extra keys into the
    DeepSpeed config (tests use it to shard even tiny tensors).
    """

    def __init__(
        self,
        model_path: str | Path,
        cfg: LearnerConfig,
        *,
        dtype: str | None = None,
        total_steps: int | None = None,
        ds_overrides: dict | None = None,
        optimizer_cfg: OptimizerConfig | None = None,
    ):
        from transformers import AutoModelForCausalLM

        self.cfg = cfg
        self.dtype_name = dtype or default_dtype()
        self.dtype = DTYPES[self.dtype_name]
        self.dist = init_distributed(cfg)
        opt = optimizer_cfg or cfg.optimizer
        # The config refuses a cosine schedule without learner.max_steps (the decay horizon).
        total = total_steps or max(1, cfg.max_steps * cfg.batch.mini_batches_per_step)
        causal_lm = AutoModelForCausalLM.from_pretrained(
            str(model_path), dtype=self.dtype, attn_implementation="sdpa"
        )
        causal_lm.config.use_cache = False
        module = TokenLogprobModel(causal_lm, chunk_tokens=cfg.batch.logprob_chunk_tokens)
        self.guarded = cfg.zero_stage == 0 and self.dtype == torch.float32
        groups = param_groups(module, opt.weight_decay)
        adam = dict(lr=opt.lr, betas=tuple(opt.betas), eps=ADAM_EPS)
        if self.guarded:
            optimizer = FiniteGuardAdamW(groups, max_grad_norm=opt.grad_clip, **adam)
        else:
            optimizer = torch.optim.AdamW(groups, **adam)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, opt, total)
        )
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=ds_config(cfg, self.dtype_name, ds_overrides, clip_in_engine=not self.guarded, optimizer_cfg=opt),
        )
        if cfg.zero_stage == 3:
            deepspeed.zero.register_external_parameter(
                self.engine.module, causal_lm.get_output_embeddings().weight
            )
        self.model_path = Path(model_path)

    # ------------------------------------------------------------------ compute

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def hf_model(self) -> nn.Module:
        """The wrapped transformers model (its parameters are partitioned under ZeRO-3)."""
        return self.engine.module.causal_lm

    def forward(self, *args, **kwargs) -> tuple[Tensor, ...]:
        """:meth:`TokenLogprobModel.forward` under DeepSpeed."""
        return self.engine(*args, **kwargs)

    def backward(self, loss: Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> StepResult:
        lr = self.current_lr()
        self.engine.step()
        applied = bool(self.engine.was_step_applied())
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if applied and norm is not None else float("inf")
        return StepResult(applied=applied, grad_norm=norm, lr=lr)

    def current_lr(self) -> float:
        return float(self.engine.get_lr()[0])

    @property
    def skipped_steps(self) -> int:
        return int(self.engine.skipped_steps)

    @property
    def global_steps(self) -> int:
        return int(self.engine.global_steps)

    # ------------------------------------------------------------------ weights

    def named_weights(self) -> Iterator[tuple[str, Tensor]]:
        """(HF name, parameter) in the model's order; tied weights appear once."""
        return iter(self.hf_model.named_parameters())

    @contextlib.contextmanager
    def gathered(self, params: list[Tensor], *, modify: bool = False):
        """Full parameters inside the block on every rank (a no-op below ZeRO-3). With
        ``modify``, rank 0's in-place changes are broadcast and re-partitioned on exit."""
        if self.cfg.zero_stage == 3:
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
                yield
        else:
            yield

    def full_weights(self, dtype: torch.dtype | None = None) -> list[tuple[str, Tensor]]:
        """Every weight, gathered one tensor at a time under ZeRO-3, as CPU copies."""
        out = []
        for name, param in self.named_weights():
            with self.gathered([param]):
                out.append((name, param.detach().to("cpu", dtype or param.dtype).clone()))
        return out

    @contextlib.contextmanager
    def gathered_model(self):
        """The whole HF model with full parameters inside the block (HF export)."""
        with self.gathered(list(self.hf_model.parameters())):
            yield self.hf_model

    def link_optimizer_state(self) -> None:
        """Make every parameter's view of its Adam moments current (ZeRO-1/2).

        DeepSpeed links each parameter to its optimizer-state fragments once, after the first
        step; a param group whose state torch creates later (our no-decay group) stays linked
        to an empty fragment, and ``safe_get_full_optimizer_state`` then fails. Re-running
        DeepSpeed's own lazy linking on the now-complete state fixes the views.
        """
        opt = self.engine.optimizer
        self.ensure_optimizer_state()
        if self.cfg.zero_stage in (1, 2) and hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()

    def basic_optimizer(self) -> torch.optim.Optimizer:
        """The torch AdamW underneath DeepSpeed's ZeRO wrapper (or the client one at stage 0)."""
        inner = getattr(self.engine.optimizer, "optimizer", None)
        return inner if isinstance(inner, torch.optim.Optimizer) else self.engine.optimizer

    @torch.no_grad()
    def ensure_optimizer_state(self) -> None:
        """Create AdamW's state (zero moments, step 0) where torch has not yet, exactly as its
        first step would, so a resume can write moments before any step has run."""
        opt = self.basic_optimizer()
        params = [p for group in opt.param_groups for p in group["params"]]
        # ZeRO-3 keys the state by its flat fp32 partitions, swapped into the groups per step.
        params += list(getattr(self.engine.optimizer, "fp32_partitioned_groups_flat", []))
        for param in params:
            if not opt.state[param]:
                opt.state[param] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                }

    # ------------------------------------------------------------------ collectives

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        if self.dist.world_size == 1:
            return tensor
        reduce_op = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}
        torch.distributed.all_reduce(tensor, op=reduce_op[op])
        return tensor

    def barrier(self) -> None:
        if self.dist.world_size > 1:
            torch.distributed.barrier()

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, directory: Path, tag: str, client_state: dict) -> None:
        self.engine.save_checkpoint(str(directory), tag=tag, client_state=client_state)

    def load_checkpoint(self, directory: Path, tag: str) -> dict:
        _, client_state = self.engine.load_checkpoint(
            str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        return client_state or {}


# --------------------------------------------------------------------------- accumulate and step

# One micro-batch's (loss, metrics): the loss already carries the global normaliser, so the sum
# over micro-batches and ranks is the optimizer batch's loss; metrics are 0-d tensors.
MicroLoss = Callable[[Sequence[int]], tuple[Tensor, dict[str, Tensor]]]


@dataclass
class AccumulatedStep:
    """What one optimizer step over a rank's micro-batches produced (tensors not yet on the host)."""

    loss: Tensor  # 0-d float64: Σ of the finite micro-batch losses, all ranks
    nonfinite_micro_batches: Tensor  # 0-d float64: micro-batches whose loss was not finite, all ranks
    result: StepResult
    metrics: dict[str, Tensor] = field(default_factory=dict)  # this rank's, weighted (see accumulate)


def accumulate_and_step(
    engine, micro_batches: Sequence[Sequence[int]], micro_loss: MicroLoss, *, timer: PhaseTimer | None = None
) -> AccumulatedStep:
    """Forward, loss and backward of each of this rank's micro-batches (row lists; an empty one is a
    filler whose loss must be 0 with the same collectives), then one ``engine.step()``.

    A non-finite loss poisons the gradient with NaN so the engine refuses the update on every rank
    (the norm is global): weights, optimizer state and LR schedule stay untouched, and the count
    is returned. The loss is scaled by the world size because DeepSpeed averages gradients over
    ranks. A micro-batch's metrics are weighted by its share of this rank's rows.
    """
    timer = timer or PhaseTimer()
    world = engine.dist.world_size
    sums = torch.zeros(2, dtype=torch.float64, device=engine.device)  # loss, non-finite micro-batches
    metrics: dict[str, Tensor] = {}
    local_rows = max(1, sum(len(rows) for rows in micro_batches))
    for rows in micro_batches:
        with timer.phase("forward_backward"):
            loss, mb_metrics = micro_loss(rows)
            finite = torch.isfinite(loss.detach())
            sums[0] += torch.where(finite, loss.detach(), 0.0).double()
            sums[1] += (~finite).double()
            engine.backward(loss * torch.where(finite, 1.0, float("nan")) * world)
            accumulate(metrics, mb_metrics, weight=len(rows) / local_rows)
    with timer.phase("optimizer"):
        result = engine.step()
        sums = engine.all_reduce(sums, "sum")
    return AccumulatedStep(loss=sums[0], nonfinite_micro_batches=sums[1], result=result, metrics=metrics)


def accumulate(into: dict, new: dict, weight: float = 1.0) -> None:
    """Running metrics (floats or 0-d tensors, never synced here): ``/max`` keys keep the
    maximum, everything else sums (weighted)."""
    for key, value in new.items():
        if isinstance(value, Tensor):
            value = value.detach().to(torch.float64)
        if key.endswith("/max"):
            old = into.get(key, value)
            into[key] = torch.maximum(old, value) if isinstance(value, Tensor) else max(old, value)
        else:
            into[key] = into.get(key, 0.0) + weight * value


def to_host(metrics: dict[str, Tensor | float]) -> dict[str, float]:
    """Every metric as a float, the tensors in one device-to-host transfer."""
    keys = [k for k, v in metrics.items() if isinstance(v, Tensor)]
    out = {k: float(v) for k, v in metrics.items() if not isinstance(v, Tensor)}
    if keys:
        values = torch.stack([metrics[k].detach().to(torch.float64).reshape(()) for k in keys]).tolist()
        out.update(zip(keys, values, strict=True))
    return {k: out[k] for k in metrics}
