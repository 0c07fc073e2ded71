"""Peak memory and time of token logprobs from hidden states: naive vs chunked vs fused, on CPU.

Each (variant, mode) runs in its own process so peak RSS is its own: the worker builds the
inputs, records its RSS, resets the kernel's high-water mark (/proc/self/clear_refs), runs once
and reports VmHWM − RSS before the run. Modes: ``train`` (forward + backward of Σ c·logp, grads
to hidden and LM head) and ``forward`` (no_grad, the proximal-logprob pass). Variants: ``naive``
(full log-softmax), ``chunked`` (recomputes each chunk's logits in backward) and, in train mode,
``fused`` (the loss coefficient c applied while each chunk's logits exist; no recompute). The
default sizes are the issue's: 8,192 tokens, hidden 1,024, vocab 151,936, fp32, one run each.

    python benchmarks/logprob_bench.py            # full sizes (20-30 minutes on 2 busy cores)
    python benchmarks/logprob_bench.py --quick    # small sizes, under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 1 << 30
# Naive training peaks at about three [tokens, vocab] fp32 buffers (log-softmax output, the
# gathered gradient, the log-softmax gradient; measured 3.0 at the quick size); keep headroom.
NAIVE_BUFFERS = 3.3
RAM_HEADROOM = 2 * GIB
# glibc serves blocks below a dynamic threshold (up to 32 MiB) from arenas it rarely returns to
# the OS, so RSS would count freed chunk buffers; a fixed small threshold makes RSS track live
# memory for both variants.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
# Tokens run once before measuring.
WARM_UP_TOKENS = 16


def proc_status(field: str) -> int:
    """A ``kB`` field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.manual_seed(0)
    dev = torch.device(args.device)
    hidden = (torch.randn(args.tokens, args.hidden) / args.hidden**0.5).to(dev)
    weight = (torch.randn(args.vocab, args.hidden) * 0.02).to(dev)
    targets = torch.randint(0, args.vocab, (args.tokens,)).to(dev)
    coef = torch.randn(args.tokens).to(dev)
    train = args.mode == "train"
    hidden.requires_grad_(train)
    weight.requires_grad_(train)
    few = slice(0, WARM_UP_TOKENS)
    run_once(args, hidden[few].detach().requires_grad_(train), weight, targets[few], coef[few], train)
    weight.grad = None
    cuda = dev.type == "cuda"
    if cuda:  # GPU: the caching allocator's peak, not RSS
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else proc_status("VmRSS")
    exact_peak = True if cuda else reset_peak()
    start = time.perf_counter()
    logp = run_once(args, hidden, weight, targets, coef, train)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else proc_status("VmHWM")
    out = {
        "seconds": seconds,
        "peak_extra_bytes": peak - before,
        "peak_is_since_reset": exact_peak,
        "logp_sum": float(logp.double().sum()),
    }
    if train:
        out["grad_hidden_norm"] = float(hidden.grad.double().norm())
        out["grad_weight_norm"] = float(weight.grad.double().norm())
    return out


def run_once(args: argparse.Namespace, hidden, weight, targets, coef, train: bool):
    """The measured work: logprobs of ``targets`` and, in train mode, the backward of Σ c·logp.
    (The warm-up runs it on a few tokens first, so thread pools and BLAS buffers exist.)"""
    import torch

    from learners.logprobs import fused_token_objective, naive_token_logprobs, token_logprobs

    if args.variant == "fused":
        surrogate, logp, _ = fused_token_objective(
            hidden, weight, targets, lambda part, lp, ent: (coef[part], None),
            chunk_tokens=args.chunk, with_entropy=args.entropy,
        )
        surrogate.backward()
        return logp
    fn = naive_token_logprobs if args.variant == "naive" else token_logprobs
    kw = {} if args.variant == "naive" else {"chunk_tokens": args.chunk}
    with torch.set_grad_enabled(train):
        logp, _ = fn(hidden, weight, targets, with_entropy=args.entropy, **kw)
        if train:
            (logp * coef).sum().backward()
    return logp.detach()


def run_worker(args: argparse.Namespace, variant: str, mode: str, chunk: int) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", "--variant", variant, "--mode", mode,
        "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--vocab", str(args.vocab),
        "--chunk", str(chunk), "--threads", str(args.threads), "--device", args.device,
    ] + (["--entropy"] if args.entropy else [])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **MALLOC_ENV}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def fit_tokens(args: argparse.Namespace) -> int | None:
    """Halve the token count until naive training fits in free RAM; returns the original if cut."""
    import psutil

    wanted = args.tokens
    if args.device != "cpu":
        return None
    while int(NAIVE_BUFFERS * args.tokens * args.vocab * 4) + RAM_HEADROOM > psutil.virtual_memory().available:
        args.tokens //= 2
    return wanted if args.tokens != wanted else None


def relative_gap(row: dict, base: dict) -> float:
    """Largest relative difference from naive of Σ logp and (train) the two gradient norms."""
    keys = [k for k in ("logp_sum", "grad_hidden_norm", "grad_weight_norm") if k in base]
    return max(abs(row[k] - base[k]) / abs(base[k]) for k in keys)


def table(rows: list[dict]) -> str:
    naive = {r["mode"]: r for r in rows if r["variant"] == "naive"}
    lines = [
        "| variant | mode | chunk | time s | peak extra GiB | peak / naive | time / naive | Δ vs naive |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = naive[r["mode"]]
        lines.append(
            f"| {r['variant']} | {r['mode']} | {r['chunk'] or '-'} | {r['seconds']:.2f} | "
            f"{r['peak_extra_bytes'] / GIB:.3f} | {r['peak_extra_bytes'] / base['peak_extra_bytes']:.3f} | "
            f"{r['seconds'] / base['seconds']:.2f} | {relative_gap(r, base):.1e} |"
        )
    return "\n".join(lines)


def variants(args: argparse.Namespace, mode: str) -> list[tuple[str, int]]:
    """(variant, chunk) runs of one mode; fused only trains (a no-grad pass has nothing to fuse)."""
    out = [("naive", 0)] + [("chunked", c) for c in args.chunks]
    if mode == "train":
        out += [("fused", c) for c in args.chunks]
    return out


def main(args: argparse.Namespace) -> None:
    if args.quick:
        args.tokens, args.hidden, args.vocab = 1024, 256, 32_000
        args.chunks = [args.chunks[0] // 4]
    reduced_from = fit_tokens(args)
    load_before = os.getloadavg()[0]
    rows = []
    for mode in args.modes:
        for variant, chunk in variants(args, mode):
            result = run_worker(args, variant, mode, chunk)
            rows.append({"variant": variant, "mode": mode, "chunk": chunk, **result})
            print(f"{variant:8s} {mode:8s} chunk={chunk:5d} {result['seconds']:8.2f}s "
                  f"{result['peak_extra_bytes'] / GIB:7.3f} GiB", flush=True)
    load_after = os.getloadavg()[0]
    report = {
        "benchmark": "logprob_bench",
        "device": args.device,
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "tokens": args.tokens,
        "tokens_reduced_from": reduced_from,
        "hidden": args.hidden,
        "vocab": args.vocab,
        "dtype": "float32",
        "with_entropy": args.entropy,
        "quick": args.quick,
        "malloc_env": MALLOC_ENV,
        "load_avg_1m": [load_before, load_after],
        "contended": max(load_before, load_after) > 0.75 * (os.cpu_count() or 1),
        "rows": rows,
    }
    print(table(rows))
    if report["contended"]:
        print(f"note: measured under contention (1-min load {load_before:.1f} → {load_after:.1f} on "
              f"{os.cpu_count()} cores); times are indicative, memory is not affected")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "logprob_bench" + ("" if args.device == "cpu" else f"_{args.device}") + ("_quick" if args.quick else "")
    name += ".json"
    (RESULTS / name).write_text(json.dumps(report, indent=2) + "\n")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--chunks", type=int, nargs="+", default=[1024], help="chunk sizes to compare")
    p.add_argument("--modes", nargs="+", default=["train", "forward"], choices=["train", "forward"])
    p.add_argument("--entropy", action="store_true", help="also compute the entropy")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="cpu", help="cpu (peak RSS) or cuda (peak allocated)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=["naive", "chunked", "fused"], help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["train", "forward"], help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=1024, help=argparse.SUPPRESS)
    return p.parse_args()


if __name__ == "__main__":
    cli = parse()
    if cli.worker:
        import torch

        torch.set_num_threads(cli.threads)
        print(json.dumps(worker(cli)))
    else:
        main(cli)
