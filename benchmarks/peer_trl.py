"""The job against TRL's GRPOTrainer: same tiny SFT start, data, reward and batch, same machine,
one run after the other in one invocation.

    python benchmarks/peer_trl.py [--root runs/peer_trl] [--start RUN] [--budget-min 11] [--seeds 3]
                                  [--systems ours,ours-all-groups,trl] [--set KEY=VALUE ...] [--quick]

Needs the optional ``peer`` extra (``pip install -e '.[peer]'``: TRL, never on the product path).
Per seed: ``async-rl train`` from the shared SFT start for ``--budget-min`` minutes (tiny.yaml, no
SFT), then TRL's ``GRPOTrainer`` on the same model for the same training wall-clock: 16 prompts x
8 completions per policy update, T 0.7, at most 48 new tokens, lr 5e-5 with 10 warm-up steps,
clip 0.2/0.28, β 0 (TRL's DAPO loss), the task's math-verify reward (``async_rl/rewards/math.py``),
``transformers.generate`` for rollouts on the CPU. Both answer the held-out problems greedily
(the job's evaluator at versions 0, 10, 20, …, deferred to the end of the job with
``learner.eval.defer`` so that it takes no cores from training, each accuracy placed at the time
the learner published that version; TRL every 10 updates, its evaluation time left out of its
clock; ``--heldout`` problems, tiny.yaml's 500 by default). ``--set KEY=VALUE`` changes the job's
config for every job system.

Three systems: ``ours`` is tiny.yaml as it ships (the buffer's zero-advantage filter on: every
group a policy update trains has unequal rewards, so one update costs ~2.3 generated groups per
trained group on the tiny task); ``ours-all-groups`` is the same job with
``buffer.filter_zero_advantage=false``: every generated group is trained, groups with all-equal
rewards included, which is TRL's batch (16 prompts as sampled); ``trl`` is TRL.

Reported per seed and system: policy updates per minute, groups with a learning signal (rewards
not all equal) trained per minute and completions per second over the
training wall-clock (the job's from the start of its first learner step, its start-up given on top
of the budget and the records past the budget dropped; TRL's from its first step), and held-out
accuracy against that clock. Writes ``benchmarks/results/peer_trl.json``
(``_quick``: 1 seed, 1.5 min each, 50 held-out problems; the plumbing, and the rates already).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import mean_sd, print_table, write_result  # noqa: E402
from e2e_bench import SHARED, records, warm_start  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).with_name("async-rl")
EVAL_EVERY = 10  # policy updates between held-out evaluations (tiny.yaml's learner.eval.every)
STARTUP_MIN = 1.5  # the job's Ray, vLLM and evaluator start-up, given on top of its training budget
# The systems compared: the job's config overrides (None: TRL).
SYSTEMS = {
    "ours": [],
    "ours-all-groups": ["buffer.filter_zero_advantage=false"],  # TRL's batch: every generated group trained
    "trl": None,
}


def main() -> None:
    args = parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    if args.start:
        missing = [name for name in SHARED if not (args.start / name).is_dir()]
        if missing:
            raise SystemExit(f"--start {args.start}: no {', '.join(missing)} folder in it; expected a finished "
                             f"run folder (e.g. runs/tiny after make train) holding {', '.join(SHARED)}")
        for name in SHARED:  # a finished run's model, data and SFT start, instead of a new SFT
            if not (args.root / "shared" / name).exists():
                shutil.copytree(args.start / name, args.root / "shared" / name)
    warm_start(args.root)  # the shared SFT start (cached): model, data, sft_model
    results = {system: [] for system in args.systems}
    for seed in range(args.seeds):
        for system in args.systems:
            run = run_trl(args, seed) if system == "trl" else run_ours(args, seed, system)
            results[system].append(run)
    report(results, args)
    write_result("peer_trl" + ("_quick" if args.quick else ""), {
        "budget_min": args.budget_min, "seeds": args.seeds, "heldout": args.heldout, "runs": results,
        "summary": summary(results),
    })


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "peer_trl")
    parser.add_argument("--budget-min", type=float, default=11.0, help="training wall-clock per system and seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--start", type=Path, default=None, help="a run folder whose model/data/sft_model to start from")
    parser.add_argument("--heldout", type=int, default=500, help="held-out problems per evaluation")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    parser.add_argument("--quick", action="store_true", help="1 seed, 1.5 min each, 50 held-out problems")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for the job's systems (repeatable), e.g. learner.eval.every=1000")
    args = parser.parse_args()
    args.systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    unknown = [name for name in args.systems if name not in SYSTEMS]
    if unknown or not args.systems:
        parser.error(f"--systems {','.join(unknown) or '(empty)'}: expected names from {', '.join(SYSTEMS)}")
    if args.quick:
        args.budget_min, args.seeds, args.heldout = 1.5, 1, 50
    return args


# --------------------------------------------------------------------------- the job


def run_ours(args, seed: int, system: str = "ours") -> dict:
    name = f"{system}-s{seed}"
    run_dir = args.root / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [str(BIN), "train", f"run.dir={run_dir}", f"model.path={args.root / 'shared' / 'sft_model'}",
           "learner.sft.epochs=0", "learner.max_steps=0", f"run.max_minutes={args.budget_min + STARTUP_MIN}",
           f"run.seed={seed}",
           f"learner.eval.prompts={args.heldout}", "learner.eval.defer=true", "learner.checkpoint.every=0",
           "logging.console=plain",
           *SYSTEMS[system], *args.set]
    with open(args.root / f"{name}.log", "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if code != 0:
        raise SystemExit(f"{system} seed {seed} failed with exit code {code}; see {args.root / f'{name}.log'}")
    learner, actor, evals = records(run_dir, "learner"), records(run_dir, "actor-0"), records(run_dir, "eval")
    start = learner[0]["time"] - learner[0]["step_s"] - learner[0]["sample_wait_s"]  # the first step's start
    learner = [r for r in learner if r["time"] - start <= args.budget_min * 60]  # the same training clock as TRL's
    evals = sorted((e for e in evals if e["version"] <= learner[-1]["version"]), key=lambda e: e["version"])
    published = {r["version"]: r["time"] - start for r in learner}  # a version's training clock
    span = learner[-1]["time"] - start
    completions = sum(r["rows"] for r in learner)
    return {
        "seed": seed, "updates": learner[-1]["step"], "train_s": span,
        "updates_per_min": 60 * learner[-1]["step"] / span,
        "signal_groups_per_min": 60 * sum(r["groups"] - r["groups_all_equal"] for r in learner) / span,
        "groups_all_equal_share": sum(r["groups_all_equal"] for r in learner) / sum(r["groups"] for r in learner),
        "completions_per_s": actor_rate([a for a in actor if a["time"] <= learner[-1]["time"]]),
        "trained_completions_per_s": completions / span,
        "step_s_median": sorted(r["step_s"] for r in learner)[len(learner) // 2],
        "heldout": [{"t": published.get(e["version"], 0.0), "version": e["version"], "accuracy": e["accuracy"]}
                    for e in evals],
    }


def actor_rate(actor: list[dict]) -> float:
    """Completions the actor stored per second, from its first record that stored any."""
    busy = [a for a in actor if a["rows_acked"] > 0] or actor
    first, last = actor[max(0, actor.index(busy[0]) - 1)], actor[-1]
    return (last["rows_acked"] - first["rows_acked"]) / max(last["time"] - first["time"], 1e-9)


# --------------------------------------------------------------------------- TRL


def run_trl(args, seed: int) -> dict:
    """TRL in a child process (its own threads and memory), same budget; reads its JSON back."""
    out = args.root / f"trl-s{seed}.json"
    cmd = [sys.executable, __file__, "--trl-child", str(seed), str(args.budget_min), str(args.heldout), str(args.root)]
    with open(args.root / f"trl-s{seed}.log", "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if code != 0:
        raise SystemExit(f"TRL seed {seed} failed with exit code {code}; see {args.root / f'trl-s{seed}.log'}")
    return json.loads(out.read_text())


def trl_child(seed: int, budget_min: float, heldout: int, root: Path) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from async_rl.config_io import load_config
    from async_rl.rewards.math import score
    from async_rl.tasks.dataset import load_rows

    cfg = load_config("tiny")
    shared = root / "shared"
    tok = AutoTokenizer.from_pretrained(shared / "sft_model")
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(shared / "sft_model", dtype=torch.float32)
    train, _ = load_rows(shared / "data" / "train.parquet")
    held, _ = load_rows(shared / "data" / "heldout.parquet")
    held = held[:heldout]
    dataset = Dataset.from_list([{"prompt": r.messages, "ground_truth": r.ground_truth} for r in train])

    def reward(completions, ground_truth, **_):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [score(t, g, None, cfg.reward).score for t, g in zip(texts, ground_truth, strict=True)]

    n = cfg.actors.n_samples_per_prompt
    config = GRPOConfig(
        output_dir=str(root / f"trl-s{seed}"), seed=seed, use_cpu=True, bf16=False, report_to=[],
        save_strategy="no", logging_steps=1, max_steps=100_000,
        per_device_train_batch_size=cfg.learner.batch.groups_per_step * n, num_generations=n,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        learning_rate=cfg.learner.optimizer.lr, warmup_steps=cfg.learner.optimizer.warmup_steps, lr_scheduler_type="constant_with_warmup",
        weight_decay=0.0, max_grad_norm=cfg.learner.optimizer.grad_clip,
        temperature=cfg.actors.temperature, top_p=1.0, max_completion_length=cfg.actors.max_tokens,
        beta=0.0, loss_type="dapo", epsilon=cfg.algorithm.loss.eps_low, epsilon_high=cfg.algorithm.loss.eps_high,
    )
    clock = Clock(budget_min * 60)

    class Budget(TrainerCallback):
        def on_step_end(self, _args, state, control, **_kw):
            if state.global_step % EVAL_EVERY == 0:
                clock.pause()
                clock.heldout.append({"t": clock.elapsed(), "version": state.global_step,
                                      "accuracy": greedy_accuracy(model, tok, held, cfg)})
                clock.resume()
            control.should_training_stop = clock.elapsed() >= clock.budget_s
            return control

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tok, callbacks=[Budget()])
    clock.heldout.append({"t": 0.0, "version": 0, "accuracy": greedy_accuracy(model, tok, held, cfg)})
    clock.start()
    trainer.train()
    span = clock.elapsed()
    updates = trainer.state.global_step
    groups = cfg.learner.batch.groups_per_step
    zero_std = [h["frac_reward_zero_std"] for h in trainer.state.log_history if "frac_reward_zero_std" in h]
    all_equal_share = sum(zero_std) / max(len(zero_std), 1)
    result = {
        "seed": seed, "updates": updates, "train_s": span, "updates_per_min": 60 * updates / span,
        "signal_groups_per_min": 60 * updates * groups * (1 - all_equal_share) / span,
        "groups_all_equal_share": all_equal_share,
        "completions_per_s": updates * cfg.learner.batch.groups_per_step * n / span,
        "trained_completions_per_s": updates * cfg.learner.batch.groups_per_step * n / span,
        "step_s_median": span / max(updates, 1), "heldout": clock.heldout, "torch_threads": torch.get_num_threads(),
    }
    (root / f"trl-s{seed}.json").write_text(json.dumps(result, indent=1))


class Clock:
    """Training wall-clock with evaluation time left out."""

    def __init__(self, budget_s: float):
        self.budget_s, self.heldout = budget_s, []
        self.started = self.paused_at = None
        self.paused_s = 0.0

    def start(self) -> None:
        self.started = time.monotonic()

    def pause(self) -> None:
        self.paused_at = time.monotonic()

    def resume(self) -> None:
        self.paused_s += time.monotonic() - self.paused_at

    def elapsed(self) -> float:
        return time.monotonic() - self.started - self.paused_s


def greedy_accuracy(model, tok, rows, cfg, batch: int = 100) -> float:
    """Greedy answers to held-out problems, scored by the job's reward (its verdict, as the job's evaluator counts)."""
    import torch

    from actors.prompts import encode_prompt
    from async_rl.rewards.math import score

    correct = 0
    model.eval()
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        prompts = [encode_prompt(tok, r.messages) for r in chunk]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(prompts):
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=cfg.actors.max_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        texts = tok.batch_decode(out[:, width:], skip_special_tokens=True)
        correct += sum(score(t, r.ground_truth, None, cfg.reward).correct for t, r in zip(texts, chunk, strict=True))
    model.train()
    return correct / max(len(rows), 1)


# --------------------------------------------------------------------------- report


def summary(results: dict) -> dict:
    out = {}
    for system, runs in results.items():
        keys = ("updates_per_min", "signal_groups_per_min", "completions_per_s", "groups_all_equal_share")
        out[system] = {key: mean_sd([r[key] for r in runs]) for key in keys}
        out[system]["heldout_last"] = mean_sd([r["heldout"][-1]["accuracy"] for r in runs])
        out[system]["heldout_start"] = mean_sd([r["heldout"][0]["accuracy"] for r in runs])
    return out


def report(results: dict, args) -> None:
    rows = []
    for system, runs in results.items():
        for r in runs:
            rows.append([system, r["seed"], r["updates"], r["updates_per_min"], r["signal_groups_per_min"],
                         r["groups_all_equal_share"], r["completions_per_s"], r["step_s_median"], r["heldout"][0]["accuracy"], r["heldout"][-1]["accuracy"],
                         r["heldout"][-1]["t"]])
    print_table(f"async-rl vs TRL GRPOTrainer, {args.budget_min:g} min of training each, {args.heldout} held-out",
                ["system", "seed", "updates", "updates/min", "signal groups/min", "all-equal share",
                 "completions/s", "s/update", "held-out start",
                 "held-out last", "at s"], rows)
    curve = [[system, r["seed"], " ".join(f"{h['t']:.0f}s:{h['accuracy']:.3f}" for h in r["heldout"])]
             for system, runs in results.items() for r in runs]
    print_table("held-out greedy accuracy against training wall-clock", ["system", "seed", "t:accuracy"], curve)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--trl-child":
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        trl_child(int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
    else:
        main()
