"""Chunked token logprobs/entropy equal the naive full log-softmax, in value and gradient."""

from __future__ import annotations

import pytest
import torch

from learners.logprobs import naive_token_logprobs, token_logprobs


def inputs(n: int = 150, hidden: int = 24, vocab: int = 700, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen, dtype=dtype)
    w = 0.3 * torch.randn(vocab, hidden, generator=gen, dtype=dtype)
    y = torch.randint(0, vocab, (n,), generator=gen)
    return h, w, y


def value_and_grads(fn, h, w, y, *, with_entropy, temperature, **kw):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    logp, ent = fn(h, w, y, temperature=temperature, with_entropy=with_entropy, **kw)
    gen = torch.Generator().manual_seed(1)
    total = (logp * torch.randn(logp.shape, generator=gen)).sum()
    if with_entropy:
        total = total + (ent * torch.randn(ent.shape, generator=gen)).sum()
    grad_h, grad_w = torch.autograd.grad(total, (h, w))
    return logp.detach(), None if ent is None else ent.detach(), grad_h, grad_w


@pytest.mark.parametrize("chunk", [1, 64, 150, 4096])
@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_and_entropy_equal_the_naive_values_and_gradients(chunk, with_entropy, temperature):
    h, w, y = inputs()
    fast = value_and_grads(token_logprobs, h, w, y, with_entropy=with_entropy, temperature=temperature, chunk_tokens=chunk)
    slow = value_and_grads(naive_token_logprobs, h, w, y, with_entropy=with_entropy, temperature=temperature)
    for got, want in zip(fast, slow, strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def test_chunked_logprobs_match_in_double_precision_to_rounding():
    h, w, y = inputs(dtype=torch.float64, seed=3)
    fast = value_and_grads(token_logprobs, h, w, y, with_entropy=True, temperature=1.0, chunk_tokens=32)
    slow = value_and_grads(naive_token_logprobs, h, w, y, with_entropy=True, temperature=1.0)
    for got, want in zip(fast, slow, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_logprobs_are_normalised_and_entropy_is_within_its_bounds():
    h, w, y = inputs(n=40, vocab=50)
    every = torch.arange(50).repeat_interleave(40)
    logp, ent = token_logprobs(h.repeat(50, 1), w, every, chunk_tokens=333, with_entropy=True)
    total = logp.view(50, 40).exp().sum(dim=0)
    torch.testing.assert_close(total, torch.ones(40), rtol=0, atol=1e-5)
    assert ((ent >= 0) & (ent <= torch.log(torch.tensor(50.0)) + 1e-5)).all()


def test_gradient_flows_only_where_needed_and_no_grad_mode_works():
    h, w, y = inputs(n=30)
    frozen = w.clone()
    h_leaf = h.clone().requires_grad_()
    logp, _ = token_logprobs(h_leaf, frozen, y, chunk_tokens=8)
    (grad_h,) = torch.autograd.grad(logp.sum(), h_leaf)
    assert torch.isfinite(grad_h).all() and frozen.grad is None
    with torch.no_grad():
        cold, _ = token_logprobs(h, w, y, chunk_tokens=8)
    naive, _ = naive_token_logprobs(h, w, y)
    torch.testing.assert_close(cold, naive, rtol=1e-5, atol=2e-5)
    assert not cold.requires_grad


def test_entropy_only_gradient_matches_naive():
    h, w, y = inputs(n=20, vocab=90)
    grads = []
    for fn, kw in ((token_logprobs, {"chunk_tokens": 7}), (naive_token_logprobs, {})):
        h_leaf = h.clone().requires_grad_()
        _, ent = fn(h_leaf, w, y, with_entropy=True, **kw)
        grads.append(torch.autograd.grad(ent.sum(), h_leaf)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=2e-5)


def test_bfloat16_inputs_follow_the_lm_head_dtype_and_return_fp32():
    h, w, y = inputs(n=64, dtype=torch.bfloat16)
    fast = value_and_grads(token_logprobs, h, w, y, with_entropy=True, temperature=1.0, chunk_tokens=16)
    slow = value_and_grads(naive_token_logprobs, h, w, y, with_entropy=True, temperature=1.0)
    assert fast[0].dtype == torch.float32 and fast[2].dtype == torch.bfloat16
    torch.testing.assert_close(fast[0], slow[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(fast[1], slow[1], rtol=0, atol=1e-4)
    torch.testing.assert_close(fast[2].float(), slow[2].float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fast[3].float(), slow[3].float(), rtol=2e-2, atol=2e-2)
