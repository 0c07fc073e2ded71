"""The tiny local model: a tokenizer and a Qwen2-architecture causal LM built from scratch.

These machines reach no model hub, so the project builds its own. Both transformers
(``AutoModelForCausalLM`` / ``AutoTokenizer``) and vLLM load the result offline. Building is
deterministic: the same size and seed give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from async_rl.tasks import arith

PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END]
VOCAB_SIZE = 512
# vLLM and the learner both pad the embedding table; a multiple of 64 keeps kernels aligned.
VOCAB_MULTIPLE = 64
MARKER = "async_rl_model.json"

# Qwen-style chat template. enable_thinking=False pre-fills an empty think block (Qwen3
# convention); by default the model opens <think> itself.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}{% endif %}"
)


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


SIZES = {
    "tiny": ModelSize(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=688),
    "small": ModelSize(hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1376),
}


def build_tokenizer(out_dir: Path | str | None = None):
    """A byte-level BPE tokenizer trained on the synthetic task corpus (digits split one per token)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Think tags are plain (non-special) added tokens: they survive skip_special_tokens decoding.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK_OPEN, THINK_CLOSE)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        hf.save_pretrained(str(out_dir))
    return hf


def _corpus():
    """Deterministic training text: chat-formatted arithmetic problems with worked solutions."""
    specs = [
        arith.ArithSpec(1, 2, 2, 3, ("+", "-")),
        arith.ArithSpec(1, 4, 2, 4, ("+", "-", "*")),
        arith.ArithSpec(3, 6, 2, 3, ("+", "-", "*")),
    ]
    words = (
        "What is the answer Compute Calculate Solve Find value of sum difference product "
        "Let us think step by step first then so The final answer is Therefore"
    )
    for i, spec in enumerate(specs):
        for problem in _take(arith.problems(spec, seed=0, split=f"tokenizer{i}"), 2000):
            yield (
                f"{IM_START}user\n{problem.question}{IM_END}\n{IM_START}assistant\n"
                f"{problem.solution()}{IM_END}\n"
            )
            yield words


def _take(iterator, n):
    for _, item in zip(range(n), iterator, strict=False):
        yield item


def build_tiny_model(out_dir: Path | str, *, size: str = "tiny", seed: int = 0) -> Path:
    """Build tokenizer + random-initialised Qwen2 model in HF format into ``out_dir``."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    if size not in SIZES:
        raise ValueError(f"size={size!r}: must be one of {', '.join(SIZES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    dims = SIZES[size]
    vocab = -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(PAD)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=dims.hidden,
        intermediate_size=dims.intermediate,
        num_hidden_layers=dims.layers,
        num_attention_heads=dims.heads,
        num_key_value_heads=dims.kv_heads,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        torch_dtype="float32",
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = Qwen2ForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config = GenerationConfig(
        eos_token_id=[eos_id, pad_id], pad_token_id=pad_id, bos_token_id=pad_id
    )
    model.save_pretrained(str(out), safe_serialization=True)
    n_params = sum(p.numel() for p in model.parameters())
    (out / MARKER).write_text(json.dumps({"size": size, "seed": seed, "parameters": n_params}))
    return out


def ensure_model(path: str | None, run_dir: Path, *, size: str, seed: int) -> tuple[Path, bool]:
    """The model directory to use, building the tiny model into ``run_dir/model`` if needed.

    Returns ``(path, built)``; an explicit ``path`` must be an HF folder with config.json.
    """
    if path is not None:
        model_dir = Path(path)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"model.path={path}: no config.json there (expected a Hugging Face model folder)"
            )
        return model_dir, False
    model_dir = run_dir / "model"
    marker = model_dir / MARKER
    if marker.is_file():
        meta = json.loads(marker.read_text())
        if meta.get("size") == size and meta.get("seed") == seed:
            return model_dir, False
    return build_tiny_model(model_dir, size=size, seed=seed), True


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over the weights and tokenizer files: equal for equal builds."""
    digest = hashlib.sha256()
    for name in ("model.safetensors", "tokenizer.json"):
        digest.update((Path(model_dir) / name).read_bytes())
    return digest.hexdigest()[:16]
