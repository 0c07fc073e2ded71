"""The fused logprob path (gradients formed while each chunk's logits exist) equals the naive
full log-softmax followed by the objective, in loss value, logprobs, entropy, metrics and the
gradients to the hidden states and the LM head."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from learner_cases import algorithm

from learners.logprobs import fused_token_objective, naive_token_logprobs
from learners.loss import (
    LossInputs,
    build_objective,
    chunk_coefficients,
    token_coefficients,
    token_local,
)
from learners.objectives import OBJECTIVES, TOKEN_LOCAL

LENGTHS = [13, 7, 20, 9]  # 49 tokens: chunks of 16 leave a ragged last chunk of 1
HIDDEN, VOCAB = 24, 500
MAX_STALENESS = 2
DUAL_CLIPPED = [2, 30]  # flat tokens whose ratio is set past the dual clip, in rows with A < 0


def layout() -> tuple[torch.Tensor, torch.Tensor]:
    """(row [N], col [N]) of the flat tokens in the padded [B, T] layout, rows end to end."""
    row = torch.cat([torch.full((n,), b) for b, n in enumerate(LENGTHS)])
    col = torch.cat([torch.arange(n) for n in LENGTHS])
    return row, col


def lm_inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(sum(LENGTHS), HIDDEN, generator=gen)
    w = 0.3 * torch.randn(VOCAB, HIDDEN, generator=gen)
    y = torch.randint(0, VOCAB, (sum(LENGTHS),), generator=gen)
    return h, w, y


def loss_inputs(logp_now: torch.Tensor, with_entropy: bool, seed: int = 1) -> LossInputs:
    """A micro-batch around the current logprobs: ratios spread over both clip sides and past
    the dual clip, two masked tokens (kept in the normaliser), a stale row, one SFT row."""
    gen = torch.Generator().manual_seed(seed)
    row, col = layout()
    shape = (len(LENGTHS), max(LENGTHS))
    denom = torch.zeros(shape, dtype=torch.bool).index_put((row, col), torch.ones_like(row, dtype=torch.bool))
    shift = torch.empty(len(row)).uniform_(-0.6, 0.6, generator=gen)
    shift[DUAL_CLIPPED] = -3.0  # ratio e³ ≈ 20: past the dual clip c = 10
    shift[15], shift[5] = -0.5, 0.5  # above 1 + ε_h with A > 0; below 1 − ε_l with A < 0
    old = torch.zeros(shape).index_put((row, col), logp_now.detach() + shift)
    mask = denom.clone()
    mask[0, 4] = mask[2, 11] = False
    zeros = torch.zeros(shape)
    return LossInputs(
        logp=zeros,
        logp_old=old,
        behavior_weight=torch.where(denom, torch.empty(shape).uniform_(0.5, 1.5, generator=gen), zeros),
        advantages=torch.tensor([-1.0, 0.7, -0.4, 1.3]),
        mask=mask,
        denom_mask=denom,
        staleness=torch.tensor([0, 1, 0, MAX_STALENESS + 1]),
        global_tokens=torch.tensor(float(sum(LENGTHS) + 11)),  # other micro-batches hold more
        global_seqs=torch.tensor(6.0),
        entropy=zeros if with_entropy else None,
        sft_rows=torch.tensor([False, True, False, False]),
        global_sft_tokens=torch.tensor(12.0),
    )


def with_values(inputs: LossInputs, logp: torch.Tensor, entropy: torch.Tensor | None) -> LossInputs:
    """``inputs`` with flat [N] logprobs (and entropies) placed into its [B, T] layout."""
    at = layout()
    place = torch.zeros_like(inputs.logp).index_put
    return replace(inputs, logp=place(at, logp), entropy=None if entropy is None else place(at, entropy))


def naive_run(objective, h, w, y, inputs, *, temperature, with_entropy):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    logp, entropy = naive_token_logprobs(h, w, y, temperature=temperature, with_entropy=with_entropy)
    loss, metrics = objective(with_values(inputs, logp, entropy))
    grad_h, grad_w = torch.autograd.grad(loss, (h, w))
    return loss.detach(), logp.detach(), entropy, grad_h, grad_w, metrics


def fused_run(objective, h, w, y, inputs, *, temperature, with_entropy, chunk):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    row, col = layout()
    surrogate, logp, entropy = fused_token_objective(
        h, w, y, chunk_coefficients(objective, inputs, row, col),
        chunk_tokens=chunk, temperature=temperature, with_entropy=with_entropy,
    )
    with torch.no_grad():
        value, metrics = objective(with_values(inputs, logp, entropy))
    loss = value + (surrogate - surrogate.detach())
    grad_h, grad_w = torch.autograd.grad(loss, (h, w))
    return loss.detach(), logp, entropy, grad_h, grad_w, metrics


@pytest.mark.parametrize(("loss", "aggregation"), [
    ({"type": "gppo"}, "token-mean"),
    ({"type": "cispo", "cispo_two_sided": True}, "seq-mean-token-mean"),
])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy", ["off", "logged", "bonus"])
@pytest.mark.parametrize("chunk", [16, 49])
def test_fused_objective_equals_naive_logprobs_then_objective(loss, aggregation, temperature, entropy, chunk):
    h, w, y = lm_inputs()
    with_entropy = entropy != "off"
    cfg = algorithm(loss=loss, aggregation=aggregation, entropy_coef=0.05 if entropy == "bonus" else 0.0)
    objective = build_objective(cfg, max_staleness=MAX_STALENESS)
    logp_now, _ = naive_token_logprobs(h, w, y, temperature=temperature)
    inputs = loss_inputs(logp_now, with_entropy)
    want = naive_run(objective, h, w, y, inputs, temperature=temperature, with_entropy=with_entropy)
    got = fused_run(objective, h, w, y, inputs, temperature=temperature, with_entropy=with_entropy, chunk=chunk)
    assert want[-1]["clip/high_frac"] > 0 and want[-1]["clip/low_frac"] > 0  # both sides exercised
    if loss["type"] == "gppo":
        assert want[-1]["clip/dual_frac"] > 0
    for name, g, e in zip(["loss", "logp", "entropy", "grad_hidden", "grad_weight"], got[:5], want[:5], strict=True):
        if e is None:
            assert g is None, name
        else:
            torch.testing.assert_close(g, e, rtol=1e-5, atol=2e-6, msg=name)
    assert got[-1].keys() == want[-1].keys()
    for key in want[-1]:
        torch.testing.assert_close(got[-1][key], want[-1][key], rtol=1e-5, atol=1e-6, msg=key)
    assert float(want[3].abs().max()) > 1e-3  # the gradient compared is not trivially zero


def test_masked_and_stale_tokens_get_no_gradient_on_the_fused_path():
    h, w, y = lm_inputs(seed=4)
    objective = build_objective(algorithm(sft_coef=0.0), max_staleness=MAX_STALENESS)
    logp_now, _ = naive_token_logprobs(h, w, y)
    inputs = loss_inputs(logp_now, False)
    _, _, _, grad_h, _, _ = fused_run(objective, h, w, y, inputs, temperature=1.0, with_entropy=False, chunk=16)
    row, col = layout()
    silent = ~inputs.mask[row, col] | (row == 3)  # masked tokens and the stale last row
    silent[DUAL_CLIPPED] = True  # GPPO's coefficient is 0 past the dual clip
    assert silent.sum() == 2 + LENGTHS[3] + len(DUAL_CLIPPED)
    assert (grad_h[silent] == 0).all() and (grad_h[~silent].abs().sum(dim=1) > 0).all()


@pytest.mark.parametrize("kind", list(OBJECTIVES))
def test_token_local_objectives_have_per_token_coefficients_and_gspo_does_not(kind):
    """Changing other tokens' logprobs leaves a token's coefficient unchanged exactly when the
    objective is declared token-local (what makes per-chunk coefficients valid)."""
    h, w, y = lm_inputs(seed=2)
    objective = build_objective(algorithm(loss={"type": kind}, entropy_coef=0.05), max_staleness=MAX_STALENESS)
    logp_now, entropy = naive_token_logprobs(h, w, y, with_entropy=True)
    row, col = layout()
    inputs = loss_inputs(logp_now, True)
    base = replace(inputs, logp=inputs.logp_old + 0.1, entropy=torch.ones_like(inputs.logp))
    moved = replace(base, logp=base.logp.clone())
    moved.logp[:, 1:] -= 0.3  # every token but the first of each row
    g_base, _ = token_coefficients(objective, base)
    g_moved, _ = token_coefficients(objective, moved)
    unchanged = torch.equal(g_base[:, 0], g_moved[:, 0])
    assert unchanged == (kind in TOKEN_LOCAL)
    assert token_local(algorithm(loss={"type": kind})) == (kind in TOKEN_LOCAL)


def test_fused_gradients_scale_with_the_incoming_gradient_and_are_handed_out_once():
    h, w, y = lm_inputs()
    coef = torch.linspace(-1, 1, len(y))
    fused_h = h.clone().requires_grad_()
    surrogate, logp, _ = fused_token_objective(fused_h, w, y, lambda part, lp, ent: (coef[part], None), chunk_tokens=10)
    (3.0 * surrogate).backward(retain_graph=True)
    naive_h = h.clone().requires_grad_()
    naive, _ = naive_token_logprobs(naive_h, w, y)
    (3.0 * (naive * coef).sum()).backward()
    torch.testing.assert_close(fused_h.grad, naive_h.grad, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(surrogate, (naive * coef).sum().detach(), rtol=1e-5, atol=1e-5)
    assert not logp.requires_grad
    with pytest.raises(RuntimeError, match="handed out once"):
        surrogate.backward()


@pytest.mark.parametrize("kind", list(OBJECTIVES))
def test_the_trainer_fuses_only_token_local_objectives_and_only_when_enabled(kind):
    from types import SimpleNamespace

    from async_rl.config import LearnerConfig
    from learners.trainer import Trainer

    for enabled in (True, False):
        engine = SimpleNamespace(cfg=LearnerConfig(batch={"fused_logprobs": enabled}))  # the flag is all it reads
        trainer = Trainer(engine, algorithm(loss={"type": kind}), max_staleness=1)
        assert trainer.fused == (enabled and kind in TOKEN_LOCAL)


def test_bfloat16_inputs_give_fp32_logprobs_and_gradients_in_the_model_dtype():
    h, w, y = (t.to(torch.bfloat16) if t.is_floating_point() else t for t in lm_inputs())
    coef = torch.linspace(-1, 1, len(y))
    fused_h, fused_w = h.clone().requires_grad_(), w.clone().requires_grad_()
    surrogate, logp, entropy = fused_token_objective(
        fused_h, fused_w, y, lambda part, lp, ent: (coef[part], ent), chunk_tokens=16, with_entropy=True
    )
    surrogate.backward()
    naive_h, naive_w = h.clone().requires_grad_(), w.clone().requires_grad_()
    naive, naive_entropy = naive_token_logprobs(naive_h, naive_w, y, with_entropy=True)
    ((naive * coef).sum() + (naive_entropy * naive_entropy.detach()).sum()).backward()
    assert logp.dtype == torch.float32 and fused_h.grad.dtype == fused_w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logp, naive.detach(), rtol=0, atol=1e-4)
    torch.testing.assert_close(entropy, naive_entropy.detach(), rtol=0, atol=1e-4)
    torch.testing.assert_close(fused_h.grad.float(), naive_h.grad.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fused_w.grad.float(), naive_w.grad.float(), rtol=2e-2, atol=2e-2)
