import json

import pytest
import torch

from async_rl.model import (
    IM_END,
    THINK_CLOSE,
    THINK_OPEN,
    build_tiny_model,
    ensure_model,
    model_fingerprint,
)


def test_model_folder_loads_offline_with_auto_classes(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "qwen2"
    assert 1_000_000 <= sum(p.numel() for p in model.parameters()) <= 5_000_000
    assert model.config.vocab_size >= len(tokenizer)
    assert tokenizer.eos_token == IM_END
    ids = tokenizer("What is 12+34?", return_tensors="pt").input_ids
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_tokenizer_round_trips_task_text_and_splits_digits(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "<think>\n12*34 = 408\n408-7 = 401\n</think>\n\\boxed{401}"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert THINK_OPEN in tokens and THINK_CLOSE in tokens
    assert [t for t in tokens if t.isdigit()][:3] == ["1", "2", "3"]
    # Unseen text still round-trips: the tokenizer is byte-level.
    odd = "Ünïcødé ∫ x² dx — 🙂"
    assert tokenizer.decode(tokenizer(odd, add_special_tokens=False).input_ids) == odd


def test_chat_template_with_and_without_thinking(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": "What is 1+1?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n"
    no_think = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_build_is_deterministic_and_seed_changes_weights(tmp_path, tiny_model_dir):
    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert model_fingerprint(again) == model_fingerprint(tiny_model_dir)
    assert model_fingerprint(other) != model_fingerprint(tiny_model_dir)


def test_run_folder_caches_the_model(tmp_path):
    first, built = ensure_model(None, tmp_path, size="tiny", seed=3)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    second, rebuilt = ensure_model(None, tmp_path, size="tiny", seed=3)
    assert built and not rebuilt and first == second
    assert (second / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((first / "async_rl_model.json").read_text())["seed"] == 3


def test_explicit_model_path_must_be_a_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model.path=.*no config.json"):
        ensure_model(str(tmp_path), tmp_path, size="tiny", seed=0)
