"""SFT rows → token sequences: the actors' prompt ids, response, end-of-turn token."""

from __future__ import annotations

import pytest

from actors.prompts import encode_prompt as actor_encode_prompt
from async_rl.model import build_tokenizer
from async_rl.tasks import arith
from async_rl.tasks.dataset import parse_row
from learners.sft import encode_rows


@pytest.fixture(scope="module")
def rows_and_tokenizer():
    raw = arith.make_rows(arith.ArithSpec(1, 2, 2, 3, ("+", "-")), 3, seed=0, split="sft", with_solution=True)
    raw += arith.make_rows(arith.ArithSpec(1, 2, 2, 3, ("+", "-")), 2, seed=1, split="sft", with_solution=True,
                           system_prompt="Answer in a box.")
    rows = [parse_row(r, number=i + 1, require_response=True) for i, r in enumerate(raw)]
    return rows, build_tokenizer()


def test_a_row_becomes_templated_prompt_then_response_then_eos(rows_and_tokenizer):
    rows, tok = rows_and_tokenizer
    (ex, *_) = encode_rows(rows, tok, max_len=256)
    assert tok.decode(ex.prompt_tokens).endswith("<|im_start|>assistant\n")
    assert rows[0].messages[-1]["content"] in tok.decode(ex.prompt_tokens)
    assert ex.response_tokens[-1] == tok.eos_token_id
    assert tok.decode(ex.response_tokens[:-1]) == rows[0].response


def test_a_long_row_is_cut_at_the_end_of_its_response(rows_and_tokenizer):
    rows, tok = rows_and_tokenizer
    full = encode_rows(rows[:1], tok, max_len=256)[0]
    cut = encode_rows(rows[:1], tok, max_len=len(full.prompt_tokens) + 5)[0]
    assert list(cut.prompt_tokens) == list(full.prompt_tokens)
    assert list(cut.response_tokens) == list(full.response_tokens[:5])


def test_the_sft_prompt_ids_are_the_ids_an_actor_sends_for_that_prompt(rows_and_tokenizer):
    rows, tok = rows_and_tokenizer
    examples = encode_rows(rows, tok, max_len=256)
    assert rows[-1].messages[0]["role"] == "system"
    for row, ex in zip(rows, examples, strict=True):
        assert list(ex.prompt_tokens) == actor_encode_prompt(tok, row.messages)
        # and what the tokenizer's own templating gives, which SFT used before
        templated = tok.apply_chat_template(row.messages, add_generation_prompt=True)
        assert list(ex.prompt_tokens) == list(templated["input_ids"])
