"""SFT of the tiny model on the synthetic arithmetic SFT split: held-out accuracy before
(the baseline, a random-initialised model) and after, with the DeepSpeed learner on CPU.

Accuracy is strict: the greedy completion must contain ``\\boxed{N}`` with N the exact
answer (no fallback to the last number, which would credit chance). Held-out problems are
disjoint from the SFT rows. Writes ``benchmarks/results/sft_bench.json``.

    python benchmarks/sft_bench.py            # the tiny.yaml spec, 2 epochs (a few minutes)
    python benchmarks/sft_bench.py --quick    # fewer rows and one short epoch (under a minute)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import machine, print_table, write_result  # noqa: E402

MAX_NEW_TOKENS = 64


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Small run (under a minute).")
    parser.add_argument("--rows", type=int, default=None, help="SFT rows (default 3000, quick 600).")
    parser.add_argument("--epochs", type=float, default=None, help="Epochs (default 2, quick 1).")
    parser.add_argument("--heldout", type=int, default=200, help="Held-out prompts evaluated.")
    parser.add_argument("--ranks", type=int, default=1, help="Learner ranks.")
    parser.add_argument("--batch-size", type=int, default=None, help="Rows per step (default: tiny.yaml's).")
    parser.add_argument("--lr", type=float, default=None, help="Peak LR (default: tiny.yaml's learner.sft.lr).")
    return parser.parse_args()


def make_data(tmp: Path, n_sft: int, n_heldout: int):
    from async_rl.tasks import arith
    from async_rl.tasks.dataset import load_rows, write_rows

    spec = arith.ArithSpec(1, 2, 2, 3, ("+", "-"))  # configs/tiny.yaml
    heldout = arith.make_rows(spec, n_heldout, seed=0, split="heldout")
    seen = {r["extra_info"]["expression"] for r in heldout}
    sft = arith.make_rows(spec, n_sft, seed=0, split="sft", exclude=seen, with_solution=True)
    write_rows(sft, tmp / "sft.parquet")
    write_rows(heldout, tmp / "heldout.parquet")
    return tmp / "sft.parquet", load_rows(tmp / "heldout.parquet")[0]


def accuracy(model_dir: Path, rows) -> tuple[float, str]:
    """Greedy held-out accuracy (strict boxed match) and one sample completion."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from async_rl.rewards.math import last_boxed

    tok = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    prompts = [tok.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=False) for r in rows]
    correct, sample = 0, ""
    for start in range(0, len(prompts), 100):
        enc = tok(prompts[start : start + 100], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for text, row in zip(texts, rows[start : start + 100], strict=True):
            boxed = last_boxed(text)
            correct += int(boxed is not None and boxed.strip() == row.ground_truth)
        sample = sample or texts[0]
    return correct / len(rows), sample


def main() -> None:
    args = parse_args()
    n_sft = args.rows or (600 if args.quick else 3000)
    epochs = args.epochs or (1.0 if args.quick else 2.0)
    heldout_n = min(args.heldout, 100) if args.quick else args.heldout
    from async_rl.config_io import load_config
    from async_rl.model import build_tiny_model
    from learners.sft import run_sft

    overrides = [f"learner.ranks={args.ranks}"]
    overrides += [f"learner.sft.batch_size={args.batch_size}"] if args.batch_size else []
    overrides += [f"learner.sft.lr={args.lr}"] if args.lr else []
    cfg = load_config("tiny", overrides)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        model_dir = build_tiny_model(tmp / "model", size="tiny", seed=0)
        sft_file, heldout = make_data(tmp, n_sft, heldout_n)
        before, _ = accuracy(model_dir, heldout)
        start = time.monotonic()
        run_sft(cfg, model_dir=model_dir, data=sft_file, out_dir=tmp / "sft", epochs=epochs)
        seconds = time.monotonic() - start
        after, sample = accuracy(tmp / "sft", heldout)
    steps = round(epochs * -(-n_sft // cfg.learner.sft.batch_size))
    rows = [
        ["random init (baseline)", heldout_n, f"{before:.1%}", "-", "-"],
        [f"after SFT ({epochs:g} ep, {n_sft} rows)", heldout_n, f"{after:.1%}", steps, f"{seconds:.0f}"],
    ]
    print_table("SFT on synthetic arithmetic (tiny model, CPU, greedy, strict \\boxed match)",
                ["model", "held-out prompts", "accuracy", "optimizer steps", "SFT wall s"], rows)
    print(f"\nsample completion after SFT: {sample!r}")
    contended = (machine()["load_1min"] or 0) > (machine()["cpus"] or 1)
    write_result("sft_bench", {
        "quick": args.quick, "sft_rows": n_sft, "epochs": epochs, "heldout": heldout_n, "ranks": args.ranks,
        "accuracy_before": before, "accuracy_after": after, "optimizer_steps": steps,
        "sft_seconds": seconds, "lr": cfg.learner.sft.lr, "batch_size": cfg.learner.sft.batch_size,
        "micro_batch_tokens": cfg.learner.batch.micro_batch_tokens, "under_contention": contended,
        "sample_completion": sample,
    })


if __name__ == "__main__":
    main()
