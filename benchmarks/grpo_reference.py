"""A plain GRPO loop in PyTorch + transformers, to tell the trainer's behaviour from the method's.

    python benchmarks/grpo_reference.py RUN_DIR [--lr 5e-5] [--temperature 0.7] [--steps 40]
                                        [--positive-only] [--quick]

No vLLM, no DeepSpeed, no buffer: ``transformers.generate`` samples 16 prompts x 8 responses of
the SFT'd tiny model in ``RUN_DIR/sft_model`` (prompts from ``RUN_DIR/data/train.parquet``), a
boxed-integer check scores them, group z-scored advantages weight a token-mean policy gradient,
and AdamW (clip 1.0) steps once per batch. Every 10 steps it answers 200 held-out problems
(``RUN_DIR/data/heldout.parquet``) greedily. If this loop and ``learning_study.py`` (the product's
trainer, lockstep) move held-out accuracy the same way at the same settings, what they show is the
method on this model, not a trainer defect. Writes ``benchmarks/results/grpo_reference.json``
(``_quick``: 4 steps, 32 held-out problems, plumbing only).
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import print_table, write_result  # noqa: E402

PROMPTS, SAMPLES, MAX_NEW_TOKENS, EVAL_EVERY = 16, 8, 40, 10
BOXED = re.compile(r"\\boxed\{(-?\d+)\}")


def correct(text: str, truth: str) -> float:
    found = BOXED.findall(text)
    return float(bool(found) and found[-1] == str(truth).strip())


class Loop:
    def __init__(self, run_dir: Path, args: argparse.Namespace):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from async_rl.tasks.dataset import load_rows

        torch.manual_seed(args.seed)
        self.rng = random.Random(args.seed)
        self.args = args
        self.tok = AutoTokenizer.from_pretrained(run_dir / "sft_model")
        self.model = AutoModelForCausalLM.from_pretrained(run_dir / "sft_model", dtype=torch.float32)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=0.0)
        self.train, _ = load_rows(run_dir / "data" / "train.parquet")
        heldout, _ = load_rows(run_dir / "data" / "heldout.parquet")
        self.heldout = heldout[: args.heldout]

    def generate(self, rows, n: int, greedy: bool) -> tuple[list[list[int]], list[list[int]]]:
        import torch

        from actors.prompts import encode_prompt

        tok = self.tok
        prompts = [encode_prompt(tok, r.messages) for r in rows for _ in range(n)]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left-padded
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": self.args.temperature,
                                                         "top_k": None, "top_p": None}
        self.model.eval()
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **sampling)
        responses = []
        for row in out[:, width:].tolist():
            responses.append(row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
        return prompts, responses

    def accuracy(self) -> float:
        _, responses = self.generate(self.heldout, 1, greedy=True)
        texts = self.tok.batch_decode(responses, skip_special_tokens=True)
        return sum(correct(t, r.ground_truth) for t, r in zip(texts, self.heldout, strict=True)) / len(texts)

    def step(self) -> float:
        """One batch: sample, score, one AdamW step; returns the rollout accuracy."""
        import torch

        rows = self.rng.sample(self.train, PROMPTS)
        prompts, responses = self.generate(rows, SAMPLES, greedy=False)
        texts = self.tok.batch_decode(responses, skip_special_tokens=True)
        rewards = torch.tensor([correct(t, rows[i // SAMPLES].ground_truth) for i, t in enumerate(texts)])
        grouped = rewards.view(PROMPTS, SAMPLES)
        adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-6)).view(-1)
        if self.args.positive_only:
            adv = adv.clamp(min=0)
        length = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
        ids = torch.full((len(prompts), length), self.tok.pad_token_id)
        attn = torch.zeros_like(ids)
        scored = torch.zeros(len(prompts), length)
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):  # right-padded
            ids[i, : len(p) + len(r)] = torch.tensor(p + r)
            attn[i, : len(p) + len(r)] = 1
            scored[i, len(p) : len(p) + len(r)] = 1
        self.model.train()
        logits = self.model(input_ids=ids, attention_mask=attn).logits[:, :-1].float() / self.args.temperature
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        mask = scored[:, 1:]
        loss = -(adv[:, None] * logp * mask).sum() / mask.sum()
        self.opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return float(rewards.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run folder with sft_model/ and data/ (async-rl train's)")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--heldout", type=int, default=200)
    parser.add_argument("--positive-only", action="store_true", help="clamp advantages at 0 (no negative gradient)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="4 steps, 32 held-out problems (plumbing only)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.heldout = 4, 32
    for name in ("sft_model/config.json", "data/train.parquet", "data/heldout.parquet"):
        if not (args.run_dir / name).is_file():
            raise SystemExit(f"grpo_reference: {args.run_dir / name} is missing; expected a run folder that "
                             "async-rl train has warm-started (e.g. runs/tiny)")
    if args.lr <= 0 or args.temperature <= 0 or args.steps < 1:
        raise SystemExit("grpo_reference: --lr and --temperature must be > 0 and --steps >= 1")
    import torch

    torch.set_num_threads(2)
    loop = Loop(args.run_dir, args)
    started = time.perf_counter()
    curve = [{"step": 0, "heldout": loop.accuracy(), "rollout_accuracy": None}]
    print(f"held-out start {curve[0]['heldout']:.3f}", flush=True)
    recent: list[float] = []
    for k in range(1, args.steps + 1):
        recent.append(loop.step())
        if k % EVAL_EVERY == 0 or k == args.steps:
            curve.append({"step": k, "heldout": loop.accuracy(), "rollout_accuracy": sum(recent) / len(recent)})
            recent = []
            print(f"step {k}: held-out {curve[-1]['heldout']:.3f}, rollout {curve[-1]['rollout_accuracy']:.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    print_table(
        f"plain GRPO: lr {args.lr:g}, T {args.temperature:g}{', positive only' if args.positive_only else ''}",
        ["step", "held-out", "rollout accuracy"],
        [[c["step"], c["heldout"], "-" if c["rollout_accuracy"] is None else c["rollout_accuracy"]] for c in curve],
    )
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_result("grpo_reference" + ("_quick" if args.quick else ""),
                 {"settings": settings, "curve": curve, "seconds": time.perf_counter() - started})


if __name__ == "__main__":
    main()
