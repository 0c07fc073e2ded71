"""Builders shared by the tests/unit/test_learner_*.py files (no fixtures, plain functions)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from async_rl.config import AlgorithmConfig
from learners.loss import LossInputs
from learners.objectives import OBJECTIVES, TokenBatch

DT = torch.float64
ALL_TYPES = list(OBJECTIVES)


def token_grad(
    kind: str, ratios, adv, *, eps_low: float = 0.2, eps_high: float = 0.28, w=None, **loss_kw
) -> tuple[Tensor, Tensor]:
    """(per-token loss, g = ∂ℓ/∂lp) for one-token rows with lp_old = 0 and lp = log r."""
    r = torch.as_tensor(ratios, dtype=DT).reshape(-1, 1)
    lp = r.log().requires_grad_()
    adv_t = torch.as_tensor(adv, dtype=DT).reshape(-1, 1).expand_as(r)
    tb = TokenBatch(
        lp=lp,
        lp_old=torch.zeros_like(r),
        w=torch.ones_like(r) if w is None else torch.as_tensor(w, dtype=DT).reshape(-1, 1),
        adv=adv_t.clone(),
        mask=torch.ones_like(r, dtype=torch.bool),
        eps_low=torch.full_like(r, eps_low),
        eps_high=torch.full_like(r, eps_high),
    )
    objective = OBJECTIVES[kind]
    cfg = objective.config.model_construct(**{**objective.config().model_dump(), **loss_kw})
    loss, _ = objective.loss(tb, cfg)
    (grad,) = torch.autograd.grad(loss.sum(), lp)
    return loss.detach().flatten(), grad.flatten()


def algorithm(**kw) -> AlgorithmConfig:
    """AlgorithmConfig with nested sections given as dicts, e.g. loss={'type': 'ppo'}."""
    return AlgorithmConfig.model_validate(kw)


def loss_inputs(
    logp: Tensor, *, logp_old: Tensor | None = None, adv, w: Tensor | None = None,
    mask: Tensor | None = None, denom_mask: Tensor | None = None, staleness=None,
    global_tokens=None, global_seqs=None, **extra,
) -> LossInputs:
    """LossInputs for a [B, T] batch with sensible defaults (on-policy, all tokens, fresh)."""
    b = logp.shape[0]
    mask = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask
    denom = mask if denom_mask is None else denom_mask
    return LossInputs(
        logp=logp,
        logp_old=torch.zeros_like(logp) if logp_old is None else logp_old,
        behavior_weight=torch.ones_like(logp) if w is None else w,
        advantages=torch.as_tensor(adv, dtype=logp.dtype).reshape(b),
        mask=mask,
        denom_mask=denom,
        staleness=torch.zeros(b, dtype=torch.int64) if staleness is None else torch.as_tensor(staleness),
        global_tokens=torch.as_tensor(denom.sum() if global_tokens is None else global_tokens),
        global_seqs=torch.as_tensor(b if global_seqs is None else global_seqs),
        **extra,
    )


def objective_grad(cfg: AlgorithmConfig, inp: LossInputs, *, max_staleness: int = 4):
    """(loss, ∂loss/∂logp, metrics) of the built objective."""
    from learners.loss import build_objective

    loss, metrics = build_objective(cfg, max_staleness=max_staleness)(inp)
    (grad,) = torch.autograd.grad(loss, inp.logp)
    return loss.detach(), grad, metrics


# --------------------------------------------------------------------------- a trainer without DeepSpeed

VOCAB = 64
SGD_LR = 0.05  # large enough that a proximal pass on moved weights would change the next mini-batch


class TorchEngine:
    """The part of ``LearnerEngine`` the trainers use, in plain torch (one process, SGD); ``step``
    keeps the gradients it applied and counts forwards."""

    def __init__(self, seed: int, cfg):
        from transformers import Qwen2Config, Qwen2ForCausalLM

        from learners.engine import DistInfo, TokenLogprobModel

        config = Qwen2Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=True, eos_token_id=1, pad_token_id=0, bos_token_id=0,
        )
        torch.manual_seed(seed)
        self.module = TokenLogprobModel(Qwen2ForCausalLM(config), chunk_tokens=cfg.batch.logprob_chunk_tokens)
        self.cfg = cfg
        self.dist = DistInfo(rank=0, world_size=1, local_rank=0)
        self.device = torch.device("cpu")
        self.grads: list[dict[str, torch.Tensor]] = []
        self.forwards = 0

    def forward(self, *args, **kwargs):
        self.forwards += 1
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    @torch.no_grad()
    def step(self):
        from learners.engine import StepResult

        params = dict(self.module.named_parameters())
        self.grads.append({n: p.grad.clone() for n, p in params.items() if p.grad is not None})
        for p in params.values():
            if p.grad is not None:
                p.sub_(SGD_LR * p.grad)
                p.grad = None
        return StepResult(applied=True, grad_norm=0.0, lr=SGD_LR)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return tensor


def trajectory_table(
    seed: int, *, groups: int = 4, group_size: int = 4, version: int = 2, correct_reward: float = 1.0,
    wrong_reward: float = 0.0,
) -> pa.Table:
    """Learner input rows with varied lengths, verdicts and staleness 0-2, behaviour logprobs far
    from the model's (behaviour weights away from 1, some truncated by TIS). A correct row is
    rewarded ``correct_reward``, any other ``wrong_reward``."""
    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {k: [] for k in ("group_id", "prompt_tokens", "response_tokens",
                                             "behavior_logprobs", "token_versions", "reward", "correct")}
    for g in range(groups):
        prompt = rng.integers(2, VOCAB, size=int(rng.integers(3, 9))).tolist()
        for _ in range(group_size):
            n = int(rng.integers(2, 12))
            cols["group_id"].append(f"g{g}")
            cols["prompt_tokens"].append(prompt)
            cols["response_tokens"].append(rng.integers(2, VOCAB, size=n).tolist())
            cols["behavior_logprobs"].append((-rng.uniform(3.0, 5.5, size=n)).astype(np.float32).tolist())
            cols["token_versions"].append([version - int(rng.integers(0, 3))] * n)
            correct = bool(rng.integers(0, 2))
            cols["reward"].append(correct_reward if correct else wrong_reward)
            cols["correct"].append(correct)
    schema = pa.schema([
        ("group_id", pa.string()), ("prompt_tokens", pa.list_(pa.int32())), ("response_tokens", pa.list_(pa.int32())),
        ("behavior_logprobs", pa.list_(pa.float32())), ("token_versions", pa.list_(pa.int32())), ("reward", pa.float32()),
        ("correct", pa.bool_()),
    ])
    return pa.table(cols, schema=schema)
