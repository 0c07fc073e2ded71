"""One RL learner step: an Arrow batch of trajectories in, an optimizer update (or a counted
skip) and metrics out.

Every rank receives the SAME table (the whole sampled batch) and trains on its own share
(:func:`learners.packing.plan_micro_batches`), so the global normalisers (tokens, sequences,
SFT tokens of each optimizer mini-batch) are known on every rank without a collective, and a
batch trains identically on 1 or M ranks up to float summation order.

Order inside ``train_step``: rows past ``max_staleness`` (and, with the overlong filter,
truncated ones) are dropped; advantages are computed per group; the groups are split into
``mini_batches`` optimizer mini-batches; in decoupled mode the proximal logprobs of every row
are recomputed ONCE with the weights at the start of the batch; then per mini-batch each
micro-batch runs forward → objective → backward, and one ``engine.step()`` follows
(:func:`learners.engine.accumulate_and_step`). The first
mini-batch trains on the weights the proximal logprobs are taken from, so its own training
forward yields them (the same hidden states and logprob call as a separate no-grad pass; AReaL
skips that pass too): only later mini-batches need the extra forward, and with one mini-batch per
step (and no M2PO, whose mask needs the whole mini-batch first) none runs. Metrics stay tensors
until the end of the step and reach the host in one transfer. A non-finite loss makes the
engine refuse the update on every rank (weights, optimizer state and LR schedule untouched);
the skip is counted. Staleness is :func:`buffer.schema.row_staleness`; the Klear SFT term trains
on the rows the reward function verified (the trajectory's ``correct``). With
``learner.batch.fused_logprobs`` and a token-local objective (all but GSPO) the forward also forms the
loss gradient chunk by chunk, its coefficients taken from the objective itself
(:func:`learners.loss.chunk_coefficients`), so backward recomputes no logits.

Behaviour weights (TIS/IcePop/M2PO) are formed over this rank's rows of a mini-batch at
once; M2PO's second-moment mask is therefore per rank, not across ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from async_rl.config import AlgorithmConfig, Config
from buffer.schema import row_staleness
from learners.advantages import group_advantages, overlong_keep, overlong_penalty
from learners.engine import LearnerEngine, accumulate, accumulate_and_step, to_host
from learners.logprobs import CoefficientFn
from learners.loss import LossInputs, build_objective, chunk_coefficients, token_local
from learners.offpolicy import behavior_weights, clip_centre
from learners.packing import (
    MicroBatch,
    build_micro_batch,
    empty_micro_batch,
    input_length,
    plan_for_layout,
)
from learners.profiling import PhaseTimer
from learners.staleness import fresh_rows


@dataclass(frozen=True)
class RolloutBatch:
    """Host-side view of a trajectory table (DESIGN §3.1); per-token arrays have length T_i."""

    prompts: list[np.ndarray]
    responses: list[np.ndarray]
    behavior_logprobs: list[np.ndarray]
    token_versions: list[np.ndarray]
    rewards: np.ndarray  # [R] float32
    correct: np.ndarray  # [R] bool, the reward function's verdict
    group_index: np.ndarray  # [R] int64, groups numbered in order of first appearance

    @classmethod
    def from_arrow(cls, table: pa.Table | pa.RecordBatch) -> RolloutBatch:
        def lists(name: str, dtype) -> list[np.ndarray]:
            return list_column(table.column(name), dtype)

        groups: dict[str, int] = {}
        group_index = [groups.setdefault(g, len(groups)) for g in table.column("group_id").to_pylist()]
        return cls(
            prompts=lists("prompt_tokens", np.int64),
            responses=lists("response_tokens", np.int64),
            behavior_logprobs=lists("behavior_logprobs", np.float32),
            token_versions=lists("token_versions", np.int64),
            rewards=np.asarray(table.column("reward").to_pylist(), dtype=np.float32),
            correct=np.asarray(table.column("correct").to_pylist(), dtype=bool),
            group_index=np.asarray(group_index, dtype=np.int64),
        )

    @property
    def num_rows(self) -> int:
        return len(self.responses)

    def input_lengths(self) -> list[int]:
        return [input_length(len(p), len(r)) for p, r in zip(self.prompts, self.responses, strict=True)]


@dataclass
class RowState:
    """Per-row values the micro-batches draw from (host arrays, one entry per batch row)."""

    advantages: np.ndarray  # [R]
    staleness: np.ndarray  # [R]
    sft: np.ndarray  # [R] bool: rows of the Klear SFT term (verified correct)
    logp_old: list[np.ndarray | None]
    weight: list[np.ndarray | None]
    grad_mask: list[np.ndarray | None]


class Trainer:
    """The RL step on top of a :class:`LearnerEngine`.

    ``temperature`` is the actors' sampling temperature (logprobs are of π/T, as sampled);
    ``max_tokens`` and ``stop_token_ids`` serve DAPO overlong shaping and the overlong filter.
    ``policy_version`` counts applied updates; ``skipped_steps`` counts refused ones.
    """

    def __init__(
        self,
        engine: LearnerEngine,
        algorithm: AlgorithmConfig,
        *,
        max_staleness: int,
        mini_batches: int = 1,
        micro_batch_tokens: int = 4096,
        temperature: float = 1.0,
        max_tokens: int | None = None,
        stop_token_ids: Sequence[int] = (),
        policy_version: int = 0,
        proximal_from_forward: bool = True,
        timer: PhaseTimer | None = None,
    ):
        self.engine = engine
        self.algorithm = algorithm
        self.objective = build_objective(algorithm, max_staleness=max_staleness)
        self.fused = engine.cfg.batch.fused_logprobs and token_local(algorithm)
        self.max_staleness = max_staleness
        self.mini_batches = mini_batches
        self.micro_batch_tokens = micro_batch_tokens
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.stop_token_ids = list(stop_token_ids)
        self.policy_version = policy_version
        self.skipped_steps = 0
        # The first mini-batch's forward doubles as its proximal pass (exact; see the module doc).
        self.proximal_from_forward = (
            proximal_from_forward and algorithm.off_policy.mode != "coupled" and algorithm.off_policy.m2po_tau is None
        )
        self.timer = timer or PhaseTimer()

    @classmethod
    def for_job(cls, engine: LearnerEngine, cfg: Config, *, stop_token_ids: Sequence[int] = (),
                max_staleness: int | None = None, **overrides) -> Trainer:
        """The RL step as a job's learner rank runs it, from the job's config: the algorithm, the
        batch plan, and the sampling settings the actors' behaviour logprobs were taken at."""
        batch = cfg.learner.batch
        settings = {
            "mini_batches": batch.mini_batches_per_step, "micro_batch_tokens": batch.micro_batch_tokens,
            "temperature": cfg.actors.temperature, "max_tokens": cfg.actors.max_tokens,
            "stop_token_ids": stop_token_ids, **overrides,
        }
        cap = cfg.algorithm.staleness.max_staleness if max_staleness is None else max_staleness
        return cls(engine, cfg.algorithm, max_staleness=cap, **settings)

    # ------------------------------------------------------------------ the step

    def train_step(self, table: pa.Table | pa.RecordBatch, learner_version: int | None = None) -> dict[str, float]:
        """Train on one sampled batch. Returns metrics: ``loss``, ``grad_norm``, ``lr`` and the
        counters are global; the objective's metrics are this rank's row-weighted means."""
        version = self.policy_version if learner_version is None else learner_version
        with self.timer.phase("decode"):
            batch = RolloutBatch.from_arrow(table)
        with self.timer.phase("packing"):
            staleness = row_staleness(table, version)
            keep = self.kept_rows(batch, staleness)
            state = self.row_state(batch, staleness)
            minis = split_groups(np.flatnonzero(keep), batch.group_index, self.mini_batches)
            plans = [self.plan(batch, rows) for rows in minis]
        from_forward = 1 if self.proximal_from_forward else 0
        with self.timer.phase("proximal"):
            self.fill_clip_centre(batch, state, plans[from_forward:])
        totals: dict[str, Tensor] = {}
        applied = 0
        for i, (rows, plan) in enumerate(zip(minis, plans, strict=True)):
            result = self.optimize(batch, state, rows, plan, proximal_in_forward=i < from_forward)
            applied += int(result.pop("applied"))
            accumulate(totals, result, weight=1.0 / len(minis))
        if applied:
            self.policy_version = version + 1
        with self.timer.phase("metrics"):
            metrics = to_host(totals)
            metrics.update(self.step_counters(batch, keep, applied, len(minis)))
        return metrics

    def kept_rows(self, batch: RolloutBatch, staleness: np.ndarray) -> np.ndarray:
        """[R] bool: rows within max_staleness (and not truncated, with the overlong filter)."""
        keep = fresh_rows(staleness, self.max_staleness)
        if self.algorithm.overlong.filter:
            last = torch.as_tensor([int(r[-1]) for r in batch.responses])
            keep &= overlong_keep(last, self.stop_token_ids, self.algorithm.overlong).numpy()
        return keep

    def row_state(self, batch: RolloutBatch, staleness: np.ndarray) -> RowState:
        rewards = torch.as_tensor(batch.rewards)
        shaped = rewards
        if self.algorithm.overlong.shaping and self.max_tokens is not None:
            lengths = torch.as_tensor([len(r) for r in batch.responses])
            shaped = rewards + overlong_penalty(lengths, max_tokens=self.max_tokens, cfg=self.algorithm.overlong)
        adv = group_advantages(shaped, torch.as_tensor(batch.group_index), self.algorithm.advantage)
        empty = [None] * batch.num_rows
        return RowState(
            advantages=adv.numpy(),
            staleness=staleness,
            sft=batch.correct,
            logp_old=list(empty),
            weight=list(empty),
            grad_mask=list(empty),
        )

    def plan(self, batch: RolloutBatch, rows: np.ndarray) -> list[list[int]]:
        """This rank's micro-batches (row lists) for one mini-batch; equal counts on all ranks."""
        plans = plan_for_layout(self.engine.cfg.batch.micro_batch_layout, [int(r) for r in rows], batch.prompts,
                                batch.responses, batch.group_index, self.micro_batch_tokens, self.engine.dist.world_size)
        return plans[self.engine.dist.rank]

    # ------------------------------------------------------------------ clip centre

    @torch.no_grad()
    def fill_clip_centre(self, batch: RolloutBatch, state: RowState, plans: list[list[list[int]]]) -> None:
        """Per row of the given mini-batches: clip centre (proximal logprobs once per batch, or
        behaviour), behaviour weight and gradient mask; the weights are formed over each
        mini-batch's rows at once."""
        decoupled = self.algorithm.off_policy.mode != "coupled"  # decoupled or none: a proximal centre
        prox: dict[int, np.ndarray] = {}
        for plan in plans if decoupled else []:
            for rows in plan:  # filler micro-batches run too: ZeRO-3 gathers are collective
                mb = self.micro_batch(batch, rows)
                logp, _ = self.engine.forward(*mb.model_inputs(), self.temperature, False, **mb.prefix())
                prox.update(per_row(mb, logp))
        for plan in plans:
            rows = [r for mb_rows in plan for r in mb_rows]
            if rows:
                self.fill_weights(batch, state, rows, prox if decoupled else None)

    def fill_weights(self, batch: RolloutBatch, state: RowState, rows: list[int], prox) -> None:
        width = max(len(batch.responses[r]) for r in rows)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        beh = torch.zeros((len(rows), width))
        lp_prox = torch.zeros((len(rows), width)) if prox is not None else None
        for i, row in enumerate(rows):
            n = len(batch.responses[row])
            mask[i, :n] = True
            beh[i, :n] = torch.as_tensor(batch.behavior_logprobs[row])
            if lp_prox is not None:
                lp_prox[i, :n] = torch.as_tensor(prox[row])
        cfg = self.algorithm.off_policy
        w, keep, _ = behavior_weights(lp_prox, beh, mask, cfg)
        centre = clip_centre(lp_prox, beh, cfg)
        for i, row in enumerate(rows):
            n = len(batch.responses[row])
            state.logp_old[row] = centre[i, :n].numpy()
            state.weight[row] = w[i, :n].numpy()
            state.grad_mask[row] = keep[i, :n].numpy()

    # ------------------------------------------------------------------ optimize

    def optimize(
        self, batch: RolloutBatch, state: RowState, rows: np.ndarray, plan, *, proximal_in_forward: bool = False
    ) -> dict[str, Tensor | float]:
        """All micro-batches of one mini-batch, then one optimizer step. Metrics stay on the
        device (no host sync per micro-batch); ``applied``, ``grad_norm`` and ``lr`` are floats."""
        lengths = np.asarray([len(batch.responses[r]) for r in rows], dtype=np.float64)
        totals = {
            "global_tokens": torch.tensor(lengths.sum()),
            "global_seqs": torch.tensor(float(len(rows))),
            "global_sft_tokens": torch.tensor(lengths[state.sft[rows]].sum()),
        }

        def micro_loss(mb_rows: list[int]) -> tuple[Tensor, dict]:
            mb = self.micro_batch(batch, mb_rows)
            return self.micro_loss(batch, state, mb, totals, proximal_in_forward=proximal_in_forward)

        step = accumulate_and_step(self.engine, plan, micro_loss, timer=self.timer)
        if not step.result.applied:
            self.skipped_steps += 1
        out: dict[str, Tensor | float] = dict(step.metrics)
        out.update(
            loss=step.loss, nonfinite_micro_batches=step.nonfinite_micro_batches, grad_norm=step.result.grad_norm,
            lr=step.result.lr, applied=float(step.result.applied),
        )
        return out

    def micro_loss(
        self, batch: RolloutBatch, state: RowState, mb: MicroBatch, totals, *, proximal_in_forward: bool = False
    ) -> tuple[Tensor, dict]:
        if not mb.rows:  # a filler micro-batch: same collectives, zero gradient
            logp, _ = self.engine.forward(*mb.model_inputs(), self.temperature, False, **mb.prefix())
            return logp.sum() * 0.0, {}
        if proximal_in_forward:
            return self.micro_loss_with_proximal(batch, state, mb, totals)
        inputs = self.loss_inputs(state, mb, totals)
        coefficients = chunk_coefficients(self.objective, inputs, mb.row, mb.col) if self.fused else None
        outputs = self.engine.forward(*mb.model_inputs(), self.temperature, True, coefficients=coefficients, **mb.prefix())
        return self.finish_loss(mb, inputs, outputs)

    def micro_loss_with_proximal(
        self, batch: RolloutBatch, state: RowState, mb: MicroBatch, totals
    ) -> tuple[Tensor, dict]:
        """The training forward of a micro-batch whose weights are the proximal ones: the model
        hands over the proximal logprobs before the loss needs them, and this micro-batch's clip
        centre, behaviour weights and loss inputs are formed from them right there."""
        made: list[LossInputs] = []

        def on_proximal(proximal: Tensor) -> CoefficientFn | None:
            self.fill_weights(batch, state, mb.rows, per_row(mb, proximal))
            made.append(self.loss_inputs(state, mb, totals))
            return chunk_coefficients(self.objective, made[0], mb.row, mb.col) if self.fused else None

        outputs = self.engine.forward(*mb.model_inputs(), self.temperature, True, on_proximal=on_proximal, **mb.prefix())
        return self.finish_loss(mb, made[0], outputs)

    def finish_loss(self, mb: MicroBatch, inputs: LossInputs, outputs: tuple[Tensor, ...]) -> tuple[Tensor, dict]:
        """The objective on a forward's logprobs. On the fused path (token-local objectives,
        :func:`learners.logprobs.fused_token_objective`) the forward already formed the loss
        gradient chunk by chunk; the loss value and the metrics still come from the objective on
        the finished logprobs, exactly as on the unfused path."""
        if not self.fused:
            logp, entropy = outputs
            return self.objective(replace(inputs, logp=mb.scatter(logp), entropy=mb.scatter(entropy)))
        surrogate, logp, entropy = outputs
        with torch.no_grad():
            loss, metrics = self.objective(replace(inputs, logp=mb.scatter(logp), entropy=mb.scatter(entropy)))
        return loss + (surrogate - surrogate.detach()), metrics

    def loss_inputs(self, state: RowState, mb: MicroBatch, totals) -> LossInputs:
        """The objective's inputs for one micro-batch; ``logp``/``entropy`` are zero placeholders."""
        dev = self.engine.device
        denom = mb.response_mask()
        zeros = torch.zeros(denom.shape, dtype=torch.float32, device=dev)
        return LossInputs(
            logp=zeros,
            logp_old=mb.padded(state.logp_old, 0.0, torch.float32).to(dev),
            behavior_weight=mb.padded(state.weight, 0.0, torch.float32).to(dev),
            advantages=torch.as_tensor(state.advantages[mb.rows], dtype=torch.float32, device=dev),
            mask=mb.padded(state.grad_mask, False, torch.bool).to(dev) & denom,
            denom_mask=denom,
            staleness=torch.as_tensor(state.staleness[mb.rows], device=dev),
            global_tokens=totals["global_tokens"].to(dev),
            global_seqs=totals["global_seqs"].to(dev),
            entropy=zeros,
            sft_rows=torch.as_tensor(state.sft[mb.rows], device=dev),
            global_sft_tokens=totals["global_sft_tokens"].to(dev),
        )

    def micro_batch(self, batch: RolloutBatch, rows: list[int]) -> MicroBatch:
        layout = self.engine.cfg.batch.micro_batch_layout
        mb = build_micro_batch(rows, batch.prompts, batch.responses, layout) if rows else empty_micro_batch()
        return mb.to(self.engine.device)

    def step_counters(self, batch: RolloutBatch, keep: np.ndarray, applied: int, minis: int) -> dict[str, float]:
        return {
            "rows": float(batch.num_rows),
            "rows_dropped": float((~keep).sum()),
            "optimizer_steps": float(applied),
            "optimizer_steps_skipped": float(minis - applied),
            "skipped_steps_total": float(self.skipped_steps),
            "policy_version": float(self.policy_version),
        }

    # ------------------------------------------------------------------ publishing

    def weights_for_publishing(self, dtype: torch.dtype | None = None) -> list[tuple[str, Tensor]]:
        """Every weight as (HF name, CPU tensor) in model order, in the serving dtype (the
        model's own unless given), gathered under ZeRO-3. Collective: call on every rank."""
        return self.engine.full_weights(dtype)


def split_groups(rows: np.ndarray, group_index: np.ndarray, parts: int) -> list[np.ndarray]:
    """Rows → ``parts`` mini-batches of whole groups (groups in order of first appearance);
    empty mini-batches are dropped."""
    groups = list(dict.fromkeys(int(g) for g in group_index[rows]))
    chunks = np.array_split(np.asarray(groups, dtype=np.int64), parts) if groups else []
    out = [rows[np.isin(group_index[rows], chunk)] for chunk in chunks if len(chunk)]
    return out


def per_row(mb: MicroBatch, logp: Tensor) -> dict[int, np.ndarray]:
    """A micro-batch's flat per-token logprobs [N] → {batch row: its response's logprobs}."""
    values = logp.float().cpu().numpy()
    row = mb.row.cpu().numpy()
    return {r: values[row == b] for b, r in enumerate(mb.rows)}


def list_column(column: pa.ChunkedArray | pa.Array, dtype) -> list[np.ndarray]:
    """An Arrow list column → one numpy array per row (views of one flat buffer, no Python lists)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(array) == 0:
        return []
    offsets = array.offsets.to_numpy()
    values = array.flatten().to_numpy(zero_copy_only=False).astype(dtype)  # a writable copy
    start = offsets[0]
    return np.split(values, offsets[1:-1] - start)
