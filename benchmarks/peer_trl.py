"""The job against TRL's GRPOTrainer: same tiny SFT start, data, reward and batch, same machine,
one run after the other in one invocation.

    python benchmarks/peer_trl.py [--root runs/peer_trl] [--start RUN] [--budget-min 11] [--seeds 3]
                                  [--systems ours,ours-all-groups,trl] [--set KEY=VALUE ...] [--tag T] [--quick]
                                  [--reuse]

Issue #16 §3 (does replay pay) is ``--systems ours,ours-reuse2,ours-reuse4 --tag replay`` (accuracy
against generated tokens and against the clock); §4 (async vs sync, the real job) is ``--systems
ours-sync,ours,ours-2actors,trl --tag async``. Every finished run is appended to
``ROOT/peer_runs.jsonl``; with ``--reuse`` a run already there with the same system, seed, budget,
held-out size and ``--set`` is taken instead of run again (§4 after §3 at the same ``--root`` runs
``ours`` once; a study that stopped resumes).

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
rewards included, which is TRL's batch (16 prompts as sampled); ``trl`` is TRL. Two more job
systems on request: ``ours-sync`` (``algorithm.mode=sync``: the actor generates one learner
batch per version and waits, the baseline of AReaL's and verl's comparisons) and ``ours-2actors``
(two vLLM actors for one learner); ``ours-reuse2`` / ``ours-reuse4`` train every group up to 2 / 4
times, the prioritized sampler preferring fresh groups and decaying priority with age. Each system's
training seconds and generated tokens to a target are reported (mean ± sd, and per seed): the
target is ``TARGET_SHARE`` of the mean gain of ``ours-sync`` where it runs, else of the first system
listed. With ``ours-sync`` among them, the speedup that sync's measured learner busy fraction implies
for a cluster where the roles do not share cores is reported too (``implied_speedups``: its model is
in the docstring).

Reported per seed and system: policy updates per minute, groups with a learning signal (rewards
not all equal) trained per minute and completions per second over the
training wall-clock (the job's from the start of its first learner step, its start-up given on top
of the budget and the records past the budget dropped; TRL's from its first step), the learner's
and the actors' busy fractions, and held-out accuracy against that clock and against the response
tokens generated (plots ``docs/peer-trl[-TAG]-{walltime,tokens}.png``). Writes ``benchmarks/results/peer_trl.json``
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

from _common import (  # noqa: E402
    accuracy_axes,
    first_reaching,
    log_run,
    logged_runs,
    mean_sd,
    pm,
    print_table,
    save_figure,
    write_result,
)
from e2e_bench import SHARED, records, warm_start  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).with_name("async-rl")
EVAL_EVERY = 10  # policy updates between held-out evaluations (tiny.yaml's learner.eval.every)
STARTUP_MIN = 1.5  # the job's Ray, vLLM and evaluator start-up, given on top of its training budget
# The systems compared: the job's config overrides (None: TRL).
SYSTEMS = {
    "ours": [],
    "ours-all-groups": ["buffer.filter_zero_advantage=false"],  # TRL's batch: every generated group trained
    "ours-sync": ["algorithm.mode=sync"],  # the same job, generation and training alternating (#16 §4's baseline)
    "ours-2actors": ["actors.count=2"],  # two vLLM actors feeding one learner
    # Replay reuse (#16 §3): each group trained up to 2 or 4 times, fresher and less-used groups
    # first (buffer/samplers.py ``prioritized``: priority decays with age and with each use).
    "ours-reuse2": ["buffer.max_times_sampled=2", "buffer.sampler=prioritized"],
    "ours-reuse4": ["buffer.max_times_sampled=4", "buffer.sampler=prioritized"],
    "trl": None,
}
DEFAULT_SYSTEMS = ("ours", "ours-all-groups", "trl")
# The target: this share of the reference system's mean gain (its last held-out accuracy over its
# start; the sync job's in #16 §4), reached by each system on the training clock and in generated tokens.
TARGET_SHARE = 0.9
# Every finished run, one JSON line each, appended under --root (``--reuse`` reads it).
RUN_LOG = "peer_runs.jsonl"


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
    results = run_all(args)
    report(results, args)
    name = "peer_trl" + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    plots = plot(results, args.root if args.quick else REPO / "docs", name.replace("_", "-"))
    write_result(name, {
        "budget_min": args.budget_min, "seeds": args.seeds, "heldout": args.heldout, "systems": args.systems,
        "set": args.set, "runs": results, "summary": summary(results),
        "plots": [str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p) for p in plots],
    })


def run_all(args) -> dict[str, list[dict]]:
    """Every system x seed, seed-major; each finished run is appended to ``ROOT/peer_runs.jsonl``,
    and with ``--reuse`` one already there with the same system, seed and settings is not run again
    (so §3 and §4 share their ``ours`` runs, and a study that stopped resumes where it stopped)."""
    log, settings = args.root / RUN_LOG, run_settings(args)
    done = logged_runs(log, settings, "system") if args.reuse else {}
    todo = [(system, seed) for seed in range(args.seeds) for system in args.systems if (system, seed) not in done]
    print(f"{len(args.systems) * args.seeds} runs, {len(todo)} to run"
          + (f", {len(args.systems) * args.seeds - len(todo)} from {log}" if args.reuse else ""), flush=True)
    for system, seed in todo:
        run = run_trl(args, seed) if system == "trl" else run_ours(args, seed, system)
        done[(system, seed)] = {"system": system, "settings": settings, **run}
        log_run(log, done[(system, seed)])
    return {system: [done[(system, seed)] for seed in range(args.seeds)] for system in args.systems}


def run_settings(args) -> dict:
    """What makes two runs of one system and seed the same run (``--reuse``)."""
    return {"budget_min": args.budget_min, "heldout": args.heldout, "set": args.set, "quick": args.quick}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "peer_trl")
    parser.add_argument("--budget-min", type=float, default=11.0, help="training wall-clock per system and seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--start", type=Path, default=None, help="a run folder whose model/data/sft_model to start from")
    parser.add_argument("--heldout", type=int, default=500, help="held-out problems per evaluation")
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                        help=f"comma-separated, of {', '.join(SYSTEMS)} (default {','.join(DEFAULT_SYSTEMS)})")
    parser.add_argument("--quick", action="store_true", help="1 seed, 1.5 min each, 50 held-out problems")
    parser.add_argument("--tag", default="", help="names the result peer_trl_TAG.json and its plots docs/peer-trl-TAG-*.png")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for the job's systems (repeatable), e.g. learner.eval.every=1000")
    parser.add_argument("--reuse", action="store_true",
                        help=f"take runs already in ROOT/{RUN_LOG} with the same system, seed and settings")
    args = parser.parse_args(argv)
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
    return read_job(run_dir, seed, args.budget_min)


def read_job(run_dir: Path, seed: int, budget_min: float) -> dict:
    """One job's figures from its metrics files, over its first ``budget_min`` of training."""
    learner, evals = records(run_dir, "learner"), records(run_dir, "eval")
    actors = [records(run_dir, path.stem) for path in sorted((run_dir / "metrics").glob("actor-*.jsonl"))]
    start = learner[0]["time"] - learner[0]["step_s"] - learner[0]["sample_wait_s"]  # the first step's start
    learner = [r for r in learner if r["time"] - start <= budget_min * 60]  # the same training clock as TRL's
    evals = sorted((e for e in evals if e["version"] <= learner[-1]["version"]), key=lambda e: e["version"])
    published = {r["version"]: r["time"] - start for r in learner}  # a version's training clock
    span = learner[-1]["time"] - start
    completions = sum(r["rows"] for r in learner)
    within = [[a for a in actor if a["time"] <= learner[-1]["time"]] for actor in actors]
    return {
        "actors": len(actors), "learner_busy": learner[-1]["busy_fraction"],
        "actor_busy": sum(busy_share(a) for a in within) / max(len(within), 1),
        "tokens_generated": sum(tokens_by(a, learner[-1]["time"]) for a in actors),
        "seed": seed, "updates": learner[-1]["step"], "train_s": span,
        "updates_per_min": 60 * learner[-1]["step"] / span,
        "signal_groups_per_min": 60 * sum(r["groups"] - r["groups_all_equal"] for r in learner) / span,
        "groups_all_equal_share": sum(r["groups_all_equal"] for r in learner) / sum(r["groups"] for r in learner),
        "completions_per_s": sum(actor_rate(a) for a in within if a),
        "trained_completions_per_s": completions / span,
        "step_s_median": sorted(r["step_s"] for r in learner)[len(learner) // 2],
        "heldout": [{"t": published.get(e["version"], 0.0), "version": e["version"], "accuracy": e["accuracy"],
                     "tokens": sum(tokens_by(a, start + published.get(e["version"], 0.0)) for a in actors)}
                    for e in evals],
    }


def busy_share(actor: list[dict]) -> float:
    """The share of an actor's metric records with requests in flight (its busy fraction, sampled)."""
    return sum(1 for a in actor if a["groups_in_flight"] > 0) / max(len(actor), 1)


def tokens_by(actor: list[dict], when: float) -> int:
    """Response tokens the actor had generated by unix time ``when`` (its last record before)."""
    return max((a.get("tokens", 0) for a in actor if a["time"] <= when), default=0)


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
    batch = cfg.learner.batch.groups_per_step * n
    per_step = {h["step"]: h["completions/mean_length"] * batch for h in trainer.state.log_history
                if "completions/mean_length" in h}
    for point in clock.heldout:  # the tokens generated by the updates before each evaluation
        point["tokens"] = round(sum(t for step, t in per_step.items() if step <= point["version"]))
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
        "tokens_generated": round(sum(per_step.values())), "actors": 1,
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
    target = target_accuracy(results)
    for system, runs in results.items():
        keys = ("updates_per_min", "signal_groups_per_min", "completions_per_s", "groups_all_equal_share")
        out[system] = {key: mean_sd([r[key] for r in runs]) for key in keys}
        out[system]["heldout_last"] = mean_sd([r["heldout"][-1]["accuracy"] for r in runs])
        out[system]["heldout_start"] = mean_sd([r["heldout"][0]["accuracy"] for r in runs])
        for key in ("learner_busy", "actor_busy", "tokens_generated"):
            if all(key in r for r in runs):
                out[system][key] = mean_sd([r[key] for r in runs])
        if all("trained_completions_per_s" in r for r in runs):  # > 1: rows trained more than once (replay)
            out[system]["trained_per_generated"] = mean_sd(
                [r["trained_completions_per_s"] / max(r["completions_per_s"], 1e-9) for r in runs])
        if target is not None:
            for name, reach in (("time", time_to), ("tokens", tokens_to)):
                reached = [reach(r["heldout"], target) for r in runs]
                out[system][f"{name}_to_target_per_seed"] = reached
                if all(t is not None for t in reached):
                    out[system][f"{name}_to_target"] = mean_sd(reached)
            out[system]["seeds_reaching"] = sum(t is not None for t in out[system]["time_to_target_per_seed"])
    if target is not None:
        out["reference"], out["target"] = reference_system(results), target
    if "ours-sync" in results:
        out["implied_cluster_speedup"] = implied_speedups(results["ours-sync"])
    return out


def reference_system(results: dict) -> str:
    """The system whose gain sets the target: the sync job where it runs (§4's baseline), else the
    first system listed (§3's ``ours``, without reuse)."""
    return "ours-sync" if "ours-sync" in results else next(iter(results))


def target_accuracy(results: dict) -> float | None:
    """``TARGET_SHARE`` of the reference system's mean gain over its start (None without its runs)."""
    runs = [r for r in results.get(reference_system(results), []) if r["heldout"]]
    if not runs:
        return None
    start = sum(r["heldout"][0]["accuracy"] for r in runs) / len(runs)
    last = sum(r["heldout"][-1]["accuracy"] for r in runs) / len(runs)
    return start + TARGET_SHARE * (last - start)


def time_to(heldout: list[dict], target: float) -> float | None:
    """The training clock of the first evaluated version at or above ``target``."""
    return first_reaching([(h["t"], h["accuracy"]) for h in heldout], target)


def tokens_to(heldout: list[dict], target: float) -> float | None:
    """The response tokens generated by the first evaluated version at or above ``target``."""
    return first_reaching([(h["tokens"], h["accuracy"]) for h in heldout if "tokens" in h], target)


def implied_speedups(sync_runs: list[dict], actors: tuple[int, ...] = (1, 2, 4)) -> dict:
    """What async would gain where actors and learner do not share cores. Model: in sync mode a
    version costs generation g plus training t, measured with the whole machine each (the learner's
    busy fraction b = t / (g + t)); with dedicated hardware for each role and k actors of the same
    speed, async costs max(g / k, t) a version, so the speedup is 1 / max(b, (1 − b) / k)."""
    b, _ = mean_sd([r["learner_busy"] for r in sync_runs])
    return {"learner_busy_in_sync": b, **{f"actors_{k}": 1.0 / max(b, (1.0 - b) / k, 1e-9) for k in actors}}


def report(results: dict, args) -> None:
    rows = []
    for system, runs in results.items():
        for r in runs:
            rows.append([system, r["seed"], r["updates"], r["updates_per_min"], r["signal_groups_per_min"],
                         r["groups_all_equal_share"], r["completions_per_s"], r["step_s_median"],
                         r.get("learner_busy"), r.get("actor_busy"), r["heldout"][0]["accuracy"],
                         r["heldout"][-1]["accuracy"], r["heldout"][-1]["t"]])
    print_table(f"{', '.join(results)}: {args.budget_min:g} min of training each, {args.heldout} held-out",
                ["system", "seed", "updates", "updates/min", "signal groups/min", "all-equal share",
                 "completions/s", "s/update", "learner busy", "actor busy", "held-out start",
                 "held-out last", "at s"], rows)
    curve = [[system, r["seed"], " ".join(f"{h['t']:.0f}s:{h['accuracy']:.3f}" for h in r["heldout"])]
             for system, runs in results.items() for r in runs]
    print_table("held-out greedy accuracy against training wall-clock", ["system", "seed", "t:accuracy"], curve)
    summ = summary(results)
    target = summ.get("target")
    rows = []
    for system in results:
        row = summ[system]
        rows.append([system, len(results[system]), pm(row["updates_per_min"], 1), pm(row.get("learner_busy"), 2),
                     pm(row.get("actor_busy"), 2), pm(row.get("tokens_generated"), 0, 1e3),
                     pm(row.get("trained_per_generated"), 2), pm(row["heldout_last"], 3),
                     pm(row.get("time_to_target"), 0), pm(row.get("tokens_to_target"), 0, 1e3),
                     f"{row.get('seeds_reaching', 0)}/{len(results[system])}"])
    print_table(f"mean ± sd over seeds; target {target:.3f} held-out = start + {TARGET_SHARE:.0%} of "
                f"{reference_system(results)}'s mean gain" if target is not None else "mean ± sd over seeds",
                ["system", "seeds", "updates/min", "learner busy", "actor busy", "k tokens generated",
                 "trained / generated", "held-out last", "s to target", "k tokens to target", "seeds reaching"], rows)
    if "ours-sync" in results:
        speedups = summ["implied_cluster_speedup"]
        print(f"implied speedup of async where roles do not share cores (sync learner busy "
              f"{speedups['learner_busy_in_sync']:.2f}): 1 actor {speedups['actors_1']:.2f}x, "
              f"2 actors {speedups['actors_2']:.2f}x, 4 actors {speedups['actors_4']:.2f}x", flush=True)


def plot(results: dict, out_dir: Path, prefix: str) -> list[Path]:
    """Held-out accuracy of every system and seed against the training clock and against the
    response tokens generated (``PREFIX-{walltime,tokens}.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, name, label in (("t", "walltime", "training seconds"), ("tokens", "tokens", "response tokens generated")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (system, runs) in enumerate(results.items()):
            for j, r in enumerate(runs):
                points = [h for h in r["heldout"] if key in h]
                ax.plot([h[key] for h in points], [h["accuracy"] for h in points], color=f"C{i}", alpha=0.7,
                        marker="o", markersize=3, label=system if j == 0 else None)
        target = target_accuracy(results)
        if target is not None:
            ax.axhline(target, color="grey", linestyle="--", linewidth=1,
                       label=f"{TARGET_SHARE:.0%} of {reference_system(results)}'s gain")
        accuracy_axes(ax, label)
        paths.append(save_figure(fig, out_dir / f"{prefix}-{name}.png"))
    return paths


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--trl-child":
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        trl_child(int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
    else:
        main()
