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
    plan_shared_micro_batches,
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


def grouped(spec: list[tuple[int, list[int]]], seed: int = 0):
    """Groups of rows sharing a prompt: (prompt length, [response lengths]) per group."""
    rng = np.random.default_rng(seed)
    prompts, responses, groups = [], [], []
    for g, (p, lengths) in enumerate(spec):
        prompt = rng.integers(2, 100, size=p)
        for n in lengths:
            prompts.append(prompt.copy())
            responses.append(rng.integers(2, 100, size=n))
            groups.append(g)
    return prompts, responses, groups


def test_a_shared_prompt_micro_batch_runs_each_prompt_once_and_scores_the_same_tokens():
    prompts, responses, _ = grouped([(5, [4, 1, 6]), (3, [2, 5])], seed=1)
    rows = [3, 0, 4, 1, 2]
    shared = build_micro_batch(rows, prompts, responses, "shared_prompt")
    padded = build_micro_batch(rows, prompts, responses, "padded")
    assert shared.prefix_ids.shape == (2, 5) and shared.prefix_lengths.tolist() == [3, 5]
    assert shared.prefix_index.tolist() == [0, 1, 0, 1, 1]
    assert shared.input_ids.shape == (5, 5)  # the longest response (6) less its last token
    assert shared.num_tokens == 2 * 5 + 5 * 5 < padded.num_tokens == 5 * 10
    assert torch.equal(shared.targets, padded.targets) and torch.equal(shared.row, padded.row)
    assert torch.equal(shared.col, padded.col) and shared.width == padded.width == 6
    # Each scored token's position holds the token before it: its prompt's last, or its own previous.
    flat = torch.cat([shared.prefix_ids.flatten(), shared.input_ids.flatten()])
    for g, t, b, c in zip(shared.gather_index.tolist(), shared.targets.tolist(), shared.row.tolist(),
                          shared.col.tolist(), strict=True):
        row = rows[b]
        before = prompts[row][-1] if c == 0 else responses[row][c - 1]
        assert int(flat[g]) == int(before) and t == int(responses[row][c])
    # A continuation's positions follow its own prompt's length, not the padded width.
    assert shared.position_ids[0].tolist() == [3, 4, 5, 6, 7] and shared.position_ids[1].tolist() == [5, 6, 7, 8, 9]
    assert set(shared.prefix()) == {"prefix_ids", "prefix_lengths", "prefix_index"} and padded.prefix() == {}


def test_shared_prompt_logprobs_and_gradients_equal_the_padded_ones(tiny_lm):
    from learners.engine import TokenLogprobModel

    model = TokenLogprobModel(tiny_lm, chunk_tokens=4)
    prompts, responses, _ = grouped([(6, [5, 1, 7]), (2, [3, 4]), (4, [6])], seed=7)
    results = {}
    for layout in ("padded", "shared_prompt"):
        mb = build_micro_batch([5, 2, 0, 3, 1, 4], prompts, responses, layout)
        model.zero_grad()
        logp, entropy = model(*mb.model_inputs(), 0.7, True, **mb.prefix())
        (logp.sum() + entropy.sum()).backward()
        results[layout] = (logp.detach(), entropy.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (lp, ent, grads), (lp2, ent2, grads2) = results["padded"], results["shared_prompt"]
    assert lp.numel() == sum(len(r) for r in responses) and bool((lp < 0).all())
    torch.testing.assert_close(lp2, lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent2, ent, atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads2.keys() and all(g.abs().sum() > 0 for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grads2[name], grad, atol=1e-5, rtol=1e-4)


def test_the_shared_prompt_plan_keeps_groups_whole_and_cuts_only_a_group_over_the_budget():
    prompts, responses, groups = grouped([(10, [5, 5, 5]), (8, [20, 20, 20, 20]), (4, [3, 3]), (6, [9, 2])], seed=2)
    plens, rlens = [len(p) for p in prompts], [len(r) for r in responses]
    rows = list(range(len(responses)))
    plans = plan_shared_micro_batches(rows, groups, plens, rlens, budget=40, world_size=2)
    assert len(plans[0]) == len(plans[1])  # equal counts, a filler where a rank has fewer
    bins = [b for plan in plans for b in plan if b]
    assert sorted(r for b in bins for r in b) == rows
    for b in bins:
        cost = sum(plens[[r for r in b if groups[r] == g][0]] for g in {groups[r] for r in b})
        cost += sum(max(rlens[r] - 1, 1) for r in b)
        assert cost <= 40, b
    # Group 1 (8 + 4 x 19 tokens) exceeds the budget and is cut; every other group travels whole.
    holding = {g: [i for i, b in enumerate(bins) if any(groups[r] == g for r in b)] for g in set(groups)}
    assert len(holding[1]) == 4 and all(len(holding[g]) == 1 for g in (0, 2, 3))
