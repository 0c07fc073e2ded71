"""Packing sequences into micro-batches by a token budget, and sharding rows across ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learners.packing import (
    build_micro_batch,
    empty_micro_batch,
    input_length,
    pack_rows,
    plan_micro_batches,
    shard_rows,
)


def seqs(spec: list[tuple[int, int]], seed: int = 0):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(2, 100, size=p) for p, _ in spec]
    responses = [rng.integers(2, 100, size=r) for _, r in spec]
    return prompts, responses


def test_pack_rows_keeps_every_bin_within_the_budget_and_every_row_once():
    lengths = [30, 7, 22, 15, 9, 40, 3, 18]
    bins = pack_rows(range(len(lengths)), lengths, budget=40)
    assert sorted(r for b in bins for r in b) == list(range(len(lengths)))
    assert all(sum(lengths[r] for r in b) <= 40 for b in bins)
    assert len(bins) == 4  # 144 tokens need at least ceil(144/40) = 4 bins; FFD finds 4


def test_a_sequence_longer_than_the_budget_travels_alone():
    bins = pack_rows([0, 1, 2], [100, 5, 5], budget=20)
    assert [0] in bins and sorted(len(b) for b in bins) == [1, 2]


def test_shard_rows_balances_tokens_and_is_deterministic():
    lengths = [50, 40, 30, 20, 10, 10]
    shards = shard_rows(lengths, 2)
    assert shards == shard_rows(lengths, 2)
    loads = [sum(lengths[r] for r in s) for s in shards]
    assert loads == [80, 80]
    assert sorted(r for s in shards for r in s) == list(range(6))


def test_every_rank_gets_the_same_number_of_micro_batches():
    lengths = [60, 5, 5, 5, 5]
    plans = plan_micro_batches([0, 1, 2, 3, 4], lengths, budget=16, world_size=2)
    assert len(plans[0]) == len(plans[1])
    assert sorted(r for p in plans for mb in p for r in mb) == [0, 1, 2, 3, 4]
    assert [] in plans[0] or [] in plans[1]  # the shorter rank is padded with a filler


def test_a_micro_batch_restarts_positions_and_points_at_the_predicting_token():
    prompts, responses = seqs([(3, 4), (5, 2), (1, 3)])
    mb = build_micro_batch([2, 0, 1], prompts, responses)
    assert mb.num_tokens == sum(input_length(len(prompts[r]), len(responses[r])) for r in [2, 0, 1])
    pos = mb.position_ids[0].tolist()
    assert pos == [0, 1, 2] + [0, 1, 2, 3, 4, 5] + [0, 1, 2, 3, 4, 5]
    ids = mb.input_ids[0]
    full = [np.concatenate([prompts[r], responses[r]]) for r in [2, 0, 1]]
    # the token after each gathered position (within its own sequence) is the target
    flat = torch.as_tensor(np.concatenate(full))
    starts = np.cumsum([0] + [len(f) for f in full])[:-1]
    in_starts = np.cumsum([0] + [len(f) - 1 for f in full])[:-1]
    for g, t, b in zip(mb.gather_index.tolist(), mb.targets.tolist(), mb.row.tolist(), strict=True):
        assert int(ids[g]) == int(flat[starts[b] + g - in_starts[b]])
        assert t == int(flat[starts[b] + g - in_starts[b] + 1])
    assert mb.width == 4 and mb.targets.numel() == 9


def test_scatter_places_token_values_in_the_padded_layout():
    prompts, responses = seqs([(2, 3), (2, 1)])
    mb = build_micro_batch([0, 1], prompts, responses)
    out = mb.scatter(torch.arange(4, dtype=torch.float32), fill=-1.0)
    assert out.tolist() == [[0.0, 1.0, 2.0], [3.0, -1.0, -1.0]]
    assert mb.response_mask().tolist() == [[True, True, True], [True, False, False]]
    padded = mb.padded([np.array([7.0, 8.0, 9.0]), np.array([5.0])], 0.0, torch.float32)
    assert padded.tolist() == [[7.0, 8.0, 9.0], [5.0, 0.0, 0.0]]


def test_an_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="empty prompt"):
        build_micro_batch([0], [np.array([], dtype=np.int64)], [np.array([3])])


def test_a_filler_micro_batch_scores_nothing():
    mb = empty_micro_batch()
    assert mb.num_rows == 0 and mb.row.numel() == 0 and mb.num_tokens == 1


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).eval()


def test_packed_logprobs_equal_each_sequence_run_alone(tiny_lm):
    from learners.engine import TokenLogprobModel

    model = TokenLogprobModel(tiny_lm, chunk_tokens=4)
    prompts, responses = seqs([(4, 5), (2, 7), (6, 1)], seed=3)
    packed = build_micro_batch([0, 1, 2], prompts, responses)
    with torch.no_grad():
        logp, entropy = model(packed.input_ids, packed.position_ids, packed.gather_index, packed.targets, 1.0, True)
        for b in range(3):
            alone = build_micro_batch([b], prompts, responses)
            ref, ref_ent = model(alone.input_ids, alone.position_ids, alone.gather_index, alone.targets, 1.0, True)
            torch.testing.assert_close(logp[packed.row == b], ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(entropy[packed.row == b], ref_ent, atol=1e-5, rtol=1e-5)
    # and the naive full-vocabulary computation agrees
    full = torch.cat([torch.as_tensor(prompts[0]), torch.as_tensor(responses[0])]).unsqueeze(0)
    with torch.no_grad():
        naive = torch.log_softmax(tiny_lm(full).logits[0].float(), -1)
    p = len(prompts[0])
    expected = naive[p - 1 : -1].gather(1, full[0, p:].unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(logp[packed.row == 0], expected, atol=1e-5, rtol=1e-5)


def test_padded_logprobs_and_gradients_equal_the_packed_ones(tiny_lm):
    from learners.engine import TokenLogprobModel

    model = TokenLogprobModel(tiny_lm, chunk_tokens=4)
    prompts, responses = seqs([(4, 5), (2, 7), (6, 1), (3, 3)], seed=5)
    results = {}
    for layout in ("packed", "padded"):
        mb = build_micro_batch([2, 0, 3, 1], prompts, responses, layout)
        model.zero_grad()
        logp, entropy = model(mb.input_ids, mb.position_ids, mb.gather_index, mb.targets, 0.7, True)
        (logp.sum() + entropy.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[layout] = (mb, logp.detach(), entropy.detach(), grads)
    (packed, lp, ent, grads), (padded, lp2, ent2, grads2) = results["packed"], results["padded"]
    assert padded.input_ids.shape == (4, max(len(p) + len(r) - 1 for p, r in zip(prompts, responses, strict=True)))
    assert torch.equal(padded.targets, packed.targets) and torch.equal(padded.row, packed.row)
    torch.testing.assert_close(lp2, lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent2, ent, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grads2[name], grad, atol=1e-5, rtol=1e-4)
