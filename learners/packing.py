"""Packing sequences into micro-batches by a token budget, and sharding rows across ranks.

A micro-batch is ONE packed row: the sequences' tokens laid end to end, position ids
restarting at 0 at each sequence start, which transformers turns into a block-diagonal
causal mask (no attention across sequences, no padding at all). A sequence contributes
``len(prompt) + len(response) - 1`` input tokens: its last token is never an input
because nothing after it is scored. A micro-batch holds at most ``budget`` input tokens
unless a single sequence alone is longer, which then travels alone.

The scored tokens (``targets``) are the response tokens; ``gather_index`` points at the
positions whose hidden state predicts them, and ``row``/``col`` place each back into the
padded ``[B, T]`` layout the objectives use.

The ``padded`` layout (``learner.batch.micro_batch_layout``) puts the same sequences one per row,
right-padded to the longest: ``[B, L]`` with positions ``0..L-1`` in every row, so the model runs
plain causal attention (a real token never attends to the padding after it) and no sequence pays
for the others' length. ``gather_index`` then points into the flattened ``[B * L]`` positions.
On CPU, where a packed row's block mask makes attention cost O(L^2) in the whole row, this is
the fast layout; with a varlen attention kernel packing wastes nothing.

The ``shared_prompt`` layout computes each distinct prompt of a micro-batch once: ``prefix_ids``
``[U, P]`` holds the U prompts right-padded, and ``input_ids`` ``[B, L]`` only what follows each
prompt (the response without its last token), one right-padded row per sequence, positions
continuing from its prompt's length. The model runs the prompts, then the continuations attending
to their prompt's keys and values (``prefix_index`` picks the prompt of each row). In a GRPO batch
the G responses of a group share one prompt, so the prompt tokens are computed once instead of G
times; :func:`plan_shared_micro_batches` keeps a group's rows together. ``gather_index`` then
points into the prompts' flattened ``[U * P]`` positions followed by the continuations' ``[B * L]``
(the first response token is predicted by its prompt's last position).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class MicroBatch:
    rows: list[int]  # batch-row indices of the B sequences, in packing order
    input_ids: Tensor  # [1, L] int64 (packed) or [B, L] (padded)
    position_ids: Tensor  # like input_ids: restarting at 0 per sequence
    gather_index: Tensor  # [N] int64: flat positions whose next token is a response token
    targets: Tensor  # [N] int64: those response tokens
    row: Tensor  # [N] int64 in [0, B): which sequence each scored token belongs to
    col: Tensor  # [N] int64 in [0, T): its index within the response
    width: int  # T = longest response in the micro-batch
    # The shared_prompt layout only: the distinct prompts [U, P] (right-padded), their lengths [U],
    # and the prompt of each of the B rows [B].
    prefix_ids: Tensor | None = None
    prefix_lengths: Tensor | None = None
    prefix_index: Tensor | None = None

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def num_tokens(self) -> int:
        prefix = 0 if self.prefix_ids is None else self.prefix_ids.numel()
        return int(self.input_ids.numel()) + int(prefix)

    def model_inputs(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The positional inputs of :meth:`learners.engine.TokenLogprobModel.forward`."""
        return self.input_ids, self.position_ids, self.gather_index, self.targets

    def prefix(self) -> dict[str, Tensor]:
        """The shared prompts as keyword inputs of the model's forward (none in other layouts)."""
        if self.prefix_ids is None:
            return {}
        return {"prefix_ids": self.prefix_ids, "prefix_lengths": self.prefix_lengths, "prefix_index": self.prefix_index}

    def to(self, device: torch.device | str) -> MicroBatch:
        names = ("input_ids", "position_ids", "gather_index", "targets", "row", "col",
                 "prefix_ids", "prefix_lengths", "prefix_index")
        move = {k: getattr(self, k).to(device) for k in names if getattr(self, k) is not None}
        return MicroBatch(rows=self.rows, width=self.width, **move)

    def scatter(self, values: Tensor, fill: float = 0.0) -> Tensor:
        """Per-scored-token values [N] → padded [B, T] (``fill`` outside the responses)."""
        out = values.new_full((self.num_rows, self.width), fill)
        return out.index_put((self.row, self.col), values)

    def padded(self, per_row: Sequence[np.ndarray], fill: float, dtype: torch.dtype) -> Tensor:
        """Per-row host arrays (one per response token) → padded [B, T] tensor."""
        out = torch.full((self.num_rows, self.width), fill, dtype=dtype)
        for b, row in enumerate(self.rows):
            values = per_row[row]
            out[b, : len(values)] = torch.as_tensor(np.asarray(values), dtype=dtype)
        return out

    def response_mask(self) -> Tensor:
        """[B, T] bool: real response tokens."""
        mask = torch.zeros((self.num_rows, self.width), dtype=torch.bool, device=self.row.device)
        return mask.index_put((self.row, self.col), torch.ones_like(self.row, dtype=torch.bool))


def input_length(prompt_len: int, response_len: int) -> int:
    return prompt_len + response_len - 1


def shard_rows(lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Rows → ranks, longest first onto the least-loaded rank (ties: lowest rank).

    Deterministic, so every rank computes every rank's share from the same batch.
    """
    loads = [0] * world_size
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for row in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        shards[rank].append(row)
        loads[rank] += lengths[row]
    return [sorted(shard) for shard in shards]


def pack_rows(rows: Sequence[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """First-fit decreasing of ``rows`` (by ``lengths[row]``) into bins of ``budget`` tokens."""
    bins: list[list[int]] = []
    room: list[int] = []
    for row in sorted(rows, key=lambda i: (-lengths[i], i)):
        slot = next((b for b, free in enumerate(room) if free >= lengths[row]), None)
        if slot is None:
            bins.append([row])
            room.append(budget - lengths[row])
        else:
            bins[slot].append(row)
            room[slot] -= lengths[row]
    return bins


def build_micro_batch(
    rows: Sequence[int], prompts: Sequence[np.ndarray], responses: Sequence[np.ndarray], layout: str = "packed"
) -> MicroBatch:
    """Lay the given rows end to end in one packed row (or one padded row each, ``layout``
    "padded"). Every prompt must be non-empty."""
    if layout == "padded":
        return build_padded_micro_batch(rows, prompts, responses)
    if layout == "shared_prompt":
        return build_shared_micro_batch(rows, prompts, responses)
    ids, pos, gather, targets, row_of, col_of = [], [], [], [], [], []
    offset, width = 0, 1
    for b, row in enumerate(rows):
        prompt, response = np.asarray(prompts[row]), np.asarray(responses[row])
        if len(prompt) == 0:
            raise ValueError(f"row {row}: empty prompt (the first response token needs a context)")
        seq = np.concatenate([prompt, response])[:-1] if len(response) else prompt
        ids.append(seq)
        pos.append(np.arange(len(seq)))
        n = len(response)
        gather.append(offset + len(prompt) - 1 + np.arange(n))
        targets.append(response)
        row_of.append(np.full(n, b))
        col_of.append(np.arange(n))
        offset += len(seq)
        width = max(width, n)
    return MicroBatch(
        rows=list(rows),
        input_ids=_long(ids).unsqueeze(0),
        position_ids=_long(pos).unsqueeze(0),
        gather_index=_long(gather),
        targets=_long(targets),
        row=_long(row_of),
        col=_long(col_of),
        width=width,
    )


def build_padded_micro_batch(
    rows: Sequence[int], prompts: Sequence[np.ndarray], responses: Sequence[np.ndarray], pad_id: int = 0
) -> MicroBatch:
    """One right-padded row per sequence: ``[B, L]``, L the longest input; the padding is never
    scored, and causal attention keeps it out of every real token's context."""
    packed = build_micro_batch(rows, prompts, responses)  # the targets and their row/col, as packed
    lengths = [input_length(len(prompts[r]), len(responses[r])) for r in rows]
    width = max(lengths)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    starts = np.cumsum([0, *lengths[:-1]])
    flat = packed.input_ids[0]
    for b, (start, n) in enumerate(zip(starts, lengths, strict=True)):
        ids[b, :n] = flat[start:start + n]
    row_start = torch.as_tensor([width * b - int(s) for b, s in enumerate(starts)], dtype=torch.long)
    return MicroBatch(
        rows=list(rows),
        input_ids=ids,
        position_ids=torch.arange(width).expand(len(rows), width).contiguous(),
        gather_index=packed.gather_index + row_start[packed.row],
        targets=packed.targets,
        row=packed.row,
        col=packed.col,
        width=packed.width,
    )


def build_shared_micro_batch(
    rows: Sequence[int], prompts: Sequence[np.ndarray], responses: Sequence[np.ndarray], pad_id: int = 0
) -> MicroBatch:
    """Each distinct prompt once (``prefix_ids`` [U, P], right-padded), and per row what follows
    it (``input_ids`` [B, L]: the response without its last token, right-padded, at least one
    column). The first response token is scored at its prompt's last position, the others at the
    continuation's; rows with equal prompt tokens share a prompt."""
    prompt_of: dict[bytes, int] = {}
    prefix_index = []
    for row in rows:
        prompt = np.asarray(prompts[row], dtype=np.int64)
        if len(prompt) == 0:
            raise ValueError(f"row {row}: empty prompt (the first response token needs a context)")
        prefix_index.append(prompt_of.setdefault(prompt.tobytes(), len(prompt_of)))
    distinct = [np.frombuffer(key, dtype=np.int64).copy() for key in prompt_of]
    n_prompts, prompt_width = len(distinct), max(len(p) for p in distinct)
    prefix_ids = torch.full((n_prompts, prompt_width), pad_id, dtype=torch.long)
    for u, prompt in enumerate(distinct):
        prefix_ids[u, : len(prompt)] = torch.as_tensor(prompt)
    prompt_lengths = np.asarray([len(p) for p in distinct], dtype=np.int64)
    follow = [max(len(responses[r]) - 1, 0) for r in rows]
    width = max(1, *follow)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    gather, targets, row_of, col_of = [], [], [], []
    base = n_prompts * prompt_width
    for b, (row, u, n_follow) in enumerate(zip(rows, prefix_index, follow, strict=True)):
        response = np.asarray(responses[row], dtype=np.int64)
        if len(response) == 0:
            continue
        ids[b, :n_follow] = torch.as_tensor(response[:-1])
        first = u * prompt_width + prompt_lengths[u] - 1
        gather.append(np.concatenate([[first], base + b * width + np.arange(n_follow)]))
        targets.append(response)
        row_of.append(np.full(len(response), b))
        col_of.append(np.arange(len(response)))
    index = torch.as_tensor(np.asarray(prefix_index, dtype=np.int64))
    return MicroBatch(
        rows=list(rows),
        input_ids=ids,
        position_ids=torch.as_tensor(prompt_lengths)[index].unsqueeze(1) + torch.arange(width),
        gather_index=_long(gather),
        targets=_long(targets),
        row=_long(row_of),
        col=_long(col_of),
        width=max([1, *(len(responses[r]) for r in rows)]),
        prefix_ids=prefix_ids,
        prefix_lengths=torch.as_tensor(prompt_lengths),
        prefix_index=index,
    )


def empty_micro_batch(token_id: int = 0) -> MicroBatch:
    """A one-token micro-batch with nothing scored: the rank with fewer micro-batches runs it
    so that every rank makes the same forward/backward collectives (ZeRO-2/3)."""
    return MicroBatch(
        rows=[],
        input_ids=torch.tensor([[token_id]]),
        position_ids=torch.zeros((1, 1), dtype=torch.long),
        gather_index=torch.zeros(1, dtype=torch.long),
        targets=torch.tensor([token_id]),
        row=torch.zeros(0, dtype=torch.long),
        col=torch.zeros(0, dtype=torch.long),
        width=1,
    )


def plan_micro_batches(
    rows: Sequence[int], lengths: Sequence[int], budget: int, world_size: int
) -> list[list[list[int]]]:
    """Per rank, its micro-batches (lists of rows), every rank with the same count."""
    shards = shard_rows([lengths[r] for r in rows], world_size)
    return _equal_counts([pack_rows([rows[i] for i in shard], lengths, budget) for shard in shards])


def _equal_counts(plans: list[list[list[int]]]) -> list[list[list[int]]]:
    """Pad every rank's micro-batches with empty ones (fillers) to the longest rank's count."""
    count = max(1, max(len(p) for p in plans))
    return [p + [[]] * (count - len(p)) for p in plans]


def plan_shared_micro_batches(
    rows: Sequence[int], groups: Sequence[int], prompt_lengths: Sequence[int], response_lengths: Sequence[int],
    budget: int, world_size: int,
) -> list[list[list[int]]]:
    """Per rank, its micro-batches for the ``shared_prompt`` layout, every rank with the same count.

    A group (``groups[row]``: rows sharing a prompt) costs its prompt once plus each row's
    continuation, and travels whole: groups are sharded across ranks and packed first-fit
    decreasing by that cost. A group costlier than ``budget`` is cut into pieces that fit (each
    piece pays the prompt again)."""
    members: dict[int, list[int]] = {}
    for row in rows:
        members.setdefault(int(groups[row]), []).append(row)
    units: list[list[int]] = []
    costs: list[int] = []
    for group_rows in members.values():
        prompt = prompt_lengths[group_rows[0]]
        piece, cost = [], prompt
        for row in group_rows:
            more = max(response_lengths[row] - 1, 1)
            if piece and cost + more > budget:
                units.append(piece)
                costs.append(cost)
                piece, cost = [], prompt
            piece.append(row)
            cost += more
        units.append(piece)
        costs.append(cost)
    shards = shard_rows(costs, world_size)
    return _equal_counts([[[row for unit in bin_ for row in units[unit]] for bin_ in pack_rows(shard, costs, budget)]
                          for shard in shards])


def plan_for_layout(
    layout: str, rows: Sequence[int], prompts: Sequence[np.ndarray], responses: Sequence[np.ndarray],
    groups: Sequence[int], budget: int, world_size: int,
) -> list[list[list[int]]]:
    """Per rank, its micro-batches of ``rows`` as the layout packs them: by input length, or
    (``shared_prompt``) by group."""
    if layout == "shared_prompt":
        return plan_shared_micro_batches(rows, groups, [len(p) for p in prompts], [len(r) for r in responses],
                                         budget, world_size)
    lengths = [input_length(len(p), len(r)) for p, r in zip(prompts, responses, strict=True)]
    return plan_micro_batches(rows, lengths, budget, world_size)


def _long(parts: list[np.ndarray]) -> Tensor:
    if not parts:
        return torch.zeros(0, dtype=torch.long)
    return torch.as_tensor(np.concatenate(parts).astype(np.int64))
