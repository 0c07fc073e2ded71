"""Where an actor's prompts come from: a prepared dataset file, reshuffled every epoch.

Synthetic tasks are written to ``RUN_DIR/data/train.parquet`` by ``async_rl/prepare.py``, so
an actor only ever reads a file (``tasks/dataset.py`` row format).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path

from async_rl.tasks.dataset import PromptRow, load_rows


def prompt_stream(rows: Sequence[PromptRow], *, seed: int) -> Iterator[PromptRow]:
    """Endless stream over ``rows``: each epoch is a fresh permutation (reproducible by seed)."""
    if not rows:
        raise ValueError("prompt_stream: no prompt rows")
    rng = random.Random(seed)
    order = list(range(len(rows)))
    while True:
        rng.shuffle(order)
        for index in order:
            yield rows[index]


def file_prompts(path: str | Path, *, seed: int) -> Iterator[PromptRow]:
    rows, _ = load_rows(path)
    return prompt_stream(rows, seed=seed)


def encode_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the chat-formatted prompt, ending with the assistant turn's opening."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(text, add_special_tokens=False))
