"""Chat messages → prompt token ids: the one prompt encoder of the project.

The actors send exactly these ids to vLLM, and the SFT warm start trains on prompts encoded by
this same function, so the prompt the policy is fine-tuned on is the prompt it is later asked.
"""

from __future__ import annotations


def encode_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the chat-formatted prompt, ending with the assistant turn's opening."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(text, add_special_tokens=False))
