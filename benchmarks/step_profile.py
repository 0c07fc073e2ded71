"""One learner step taken apart, beside its compute bound, and the local job's core budget.

    python benchmarks/step_profile.py [--run-dir RUN] [--steps 6] [--threads 1] [--job] [--quick] [--before KEY=VALUE] [--tag T] [KEY=VALUE ...]

1. The learner step, offline (this process, one DeepSpeed rank, ``--threads`` torch threads):
   batches of ``learner.batch.groups_per_step`` groups (``RUN/buffer`` segments and ``RUN/sft_model`` of
   a finished ``make train`` when given, else the tiny model and tokenised SFT solutions of the
   task) through ``Trainer.train_step`` with its phase timer (learners/profiling.py): Arrow
   encode+decode (what a broadcast to other ranks costs), decode into rows, packing, the proximal
   pass, forward+backward per micro-batch, optimizer, metrics, then the weights gathered and
   handed to a ZeroMQ publisher. Two settings: ``before`` (packed micro-batches of 1,024 tokens
   and a separate proximal pass, as ``tiny.yaml`` ran before issue #15) and ``now`` (the config as
   it is: its micro-batch size and layout, the proximal logprobs from the training forward).
2. The compute bound of the same step, in the same run: forward and backward of the very same
   micro-batches in plain torch (the HF model, log-softmax, gather, a token-mean loss, no
   DeepSpeed, no objective, no proximal pass, no optimizer), at the same thread count.
3. The core budget: the thread counts each role gets (learner torch threads, the OMP variables
   of the roles, the reward workers) and, with ``--job``, a short live ``async-rl train`` from
   ``RUN/sft_model`` with every process of the job sampled from /proc twice a second: cores used
   per role, and the learner's logged phases (``time/*`` in learner.jsonl) with the sample wait.

Prints a table per part and writes ``benchmarks/results/step_profile.json`` (``--tag T``:
``step_profile_T.json``; ``--before KEY=VALUE`` changes the ``before`` setting; ``_quick``: one
timed step of each setting, no live job; under a minute, still the same measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import print_table, write_result  # noqa: E402

BEFORE = {"micro_batch_tokens": 1024, "micro_batch_layout": "packed", "proximal_from_forward": False}
STEP_PHASES = ["arrow_ipc", "decode", "packing", "proximal", "forward_backward", "optimizer", "metrics", "publish"]
SAMPLE_S = 0.5  # /proc sampling period of the live job


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    from async_rl.config_io import load_config

    cfg = load_config("tiny", args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, batches = load_batches(args, cfg, Path(tmp))
        os.environ["ASYNC_RL_RENDEZVOUS"] = str(Path(tmp) / "rendezvous")  # no TCP store
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        settings = {"before": args.before_setting, "now": {"micro_batch_tokens": cfg.learner.batch.micro_batch_tokens,
                                              "micro_batch_layout": cfg.learner.batch.micro_batch_layout,
                                              "proximal_from_forward": True}}
        result = {"threads": args.threads, "source": args.run_dir or "synthetic", "settings": settings,
                  "rows_per_step": batches[0].num_rows, "steps": {}, "bound": {}}
        steps = {name: StepRunner(cfg, model_dir, setting) for name, setting in settings.items()}
        bounds = {name: BoundRunner(model_dir, setting) for name, setting in settings.items()}
        for table in batches:  # settings interleaved step by step: shared cores drift alike
            for name in settings:
                steps[name].step(table)
                bounds[name].step(table)
        result["steps"] = {name: runner.summary() for name, runner in steps.items()}
        result["bound"] = {name: runner.summary() for name, runner in bounds.items()}
    result["response_tokens_per_step"] = statistics.fmean(
        sum(len(r) for r in b.column("response_tokens").to_pylist()) for b in batches[1:])
    result["core_budget"] = core_budget(cfg)
    if args.job:
        result["job"] = live_job(args)
    report(result)
    write_result("step_profile" + (f"_{args.tag}" if args.tag else "") + ("_quick" if args.quick else ""), result)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default=None, help="a finished run: its buffer rows and sft_model")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per setting (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the job's learner uses learner.threads)")
    parser.add_argument("--job", action="store_true", help="also run a short live job and sample its cores")
    parser.add_argument("--job-steps", type=int, default=12)
    parser.add_argument("--before", action="append", default=[], metavar="KEY=VALUE",
                        help=f"change the `before` setting ({', '.join(BEFORE)}), e.g. micro_batch_layout=padded")
    parser.add_argument("overrides", nargs="*", help="tiny.yaml KEY=VALUE settings for `now` (and the live job)")
    parser.add_argument("--quick", action="store_true", help="1 timed step per setting, no live job (< 1 min)")
    parser.add_argument("--tag", default="", help="write benchmarks/results/step_profile_TAG.json (keeps other runs')")
    args = parser.parse_args()
    args.before_setting = dict(BEFORE)
    for item in args.before:
        key, _, value = item.partition("=")
        if key not in BEFORE or not value:
            parser.error(f"--before {item}: expected KEY=VALUE with KEY one of {', '.join(BEFORE)}")
        kind = type(BEFORE[key])
        args.before_setting[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    if args.quick:
        args.steps, args.job = 1, False
    if args.job and not args.run_dir:
        parser.error("--job needs --run-dir (a run with an sft_model to start from)")
    return args


# --------------------------------------------------------------------------- batches


def load_batches(args, cfg, tmp: Path):
    """(model dir, [steps + 1] Arrow tables of ``groups_per_step`` groups each)."""
    import pyarrow as pa

    groups = cfg.learner.batch.groups_per_step
    if args.run_dir:
        run = Path(args.run_dir)
        segments = sorted((run / "buffer").glob("seg-*.arrows"))
        table = pa.concat_tables(pa.ipc.open_stream(s).read_all() for s in segments[:1])
        model_dir = run / "sft_model"
    else:
        model_dir, table = synthetic_rows(cfg, tmp, groups * (args.steps + 1))
    ids = table.column("group_id").to_pylist()
    order = list(dict.fromkeys(ids))
    out = []
    for step in range(args.steps + 1):
        want = set(order[step * groups:(step + 1) * groups])
        out.append(table.take([i for i, g in enumerate(ids) if g in want]))
    return model_dir, out


def synthetic_rows(cfg, tmp: Path, n_groups: int):
    """The tiny model, and rows whose prompts and responses are the task's tokenised prompts and
    worked solutions (the lengths the SFT'd policy samples), 8 per group, random rewards."""
    import random

    import numpy as np
    import pyarrow as pa
    from transformers import AutoTokenizer

    from actors.prompts import encode_prompt
    from async_rl.model import build_tiny_model
    from async_rl.prepare import synth_spec
    from async_rl.tasks import arith

    model_dir = build_tiny_model(tmp / "model", size=cfg.model.size, seed=cfg.model.seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    n = cfg.actors.n_samples_per_prompt
    rows = arith.make_rows(synth_spec(cfg.data), n_groups * n, seed=0, split="sft", with_solution=True)
    rng = random.Random(0)
    cols: dict[str, list] = {k: [] for k in ("group_id", "prompt_tokens", "response_tokens",
                                             "behavior_logprobs", "token_versions", "reward", "correct")}
    for i, row in enumerate(rows):
        group = rows[i - i % n]
        response = tok(row["response"], add_special_tokens=False).input_ids[: cfg.actors.max_tokens - 1]
        response = response + [tok.eos_token_id]
        cols["group_id"].append(f"g{i // n}")
        cols["prompt_tokens"].append(encode_prompt(tok, group["prompt"]))
        cols["response_tokens"].append(response)
        cols["behavior_logprobs"].append((-np.abs(np.random.default_rng(i).normal(0, 0.3, len(response)))).tolist())
        cols["token_versions"].append([0] * len(response))
        cols["reward"].append(rng.choice([1.0, -1.0]))
        cols["correct"].append(cols["reward"][-1] == 1.0)
    return model_dir, pa.table(cols, schema=pa.schema([
        ("group_id", pa.string()), ("prompt_tokens", pa.list_(pa.int32())),
        ("response_tokens", pa.list_(pa.int32())), ("behavior_logprobs", pa.list_(pa.float32())),
        ("token_versions", pa.list_(pa.int32())), ("reward", pa.float32()), ("correct", pa.bool_()),
    ]))


# --------------------------------------------------------------------------- the step


class StepRunner:
    """One setting's learner (engine, trainer, publisher); ``step`` times one batch by phase."""

    def __init__(self, cfg, model_dir: Path, setting: dict):
        from async_rl.weights.publisher import WeightPublisher
        from learners.engine import LearnerEngine
        from learners.profiling import PhaseTimer
        from learners.trainer import Trainer

        batch = cfg.learner.batch.model_copy(update={k: setting[k] for k in ("micro_batch_tokens", "micro_batch_layout")})
        learner = cfg.learner.model_copy(update={"batch": batch})
        self.timer = PhaseTimer()
        self.trainer = Trainer.for_job(LearnerEngine(model_dir, learner, dtype=cfg.model.dtype), cfg,
                                       max_staleness=1 << 20, micro_batch_tokens=learner.batch.micro_batch_tokens,
                                       proximal_from_forward=setting["proximal_from_forward"], timer=self.timer)
        self.publisher = WeightPublisher(cfg.weights)
        self.steps: list[dict] = []
        self.micro_batches = 0

    def step(self, table) -> None:
        import pyarrow as pa

        start = time.perf_counter()
        with self.timer.phase("arrow_ipc"):  # rank 0 → other ranks: encode, then decode
            table = pa.ipc.open_stream(to_ipc(table)).read_all()
        self.trainer.train_step(table, learner_version=0)
        with self.timer.phase("publish"):
            self.publisher.publish(len(self.steps) + 1, self.trainer.weights_for_publishing())
        total = time.perf_counter() - start
        self.micro_batches = self.timer.counts.get("forward_backward", 0)
        phases = {k.removeprefix("time/"): v for k, v in self.timer.take().items()}
        self.steps.append({**phases, "total": total})

    def summary(self) -> dict:
        """Per phase: mean seconds over the timed steps (the first one warms up)."""
        self.publisher.close()
        timed = self.steps[1:]
        mean = {k: statistics.fmean(s.get(k, 0.0) for s in timed) for k in [*STEP_PHASES, "total"]}
        return {"mean_s": mean, "steps": self.steps, "micro_batches": self.micro_batches}


def to_ipc(table) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


class BoundRunner:
    """The compute bound: forward+backward of a step's micro-batches (the setting's size and
    layout) in plain torch — the HF model, log-softmax, gather, a token-mean loss."""

    def __init__(self, model_dir: Path, setting: dict):
        import torch
        from transformers import AutoModelForCausalLM

        self.setting = setting
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                          attn_implementation="sdpa")
        self.times: list[float] = []
        self.micro_batches = 0

    def step(self, table) -> None:
        import torch

        from learners.engine import shared_prompt_states
        from learners.packing import build_micro_batch, plan_for_layout
        from learners.trainer import RolloutBatch

        batch = RolloutBatch.from_arrow(table)
        budget, layout = self.setting["micro_batch_tokens"], self.setting["micro_batch_layout"]
        plan = plan_for_layout(layout, list(range(batch.num_rows)), batch.prompts, batch.responses,
                               batch.group_index, budget, 1)[0]
        mbs = [build_micro_batch(rows, batch.prompts, batch.responses, layout) for rows in plan]
        tokens = sum(len(r) for r in batch.responses)
        start = time.perf_counter()
        for mb in mbs:
            if mb.prefix_ids is None:
                out = self.model.model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False)
                states = out.last_hidden_state.flatten(0, 1)
            else:  # the same two HF forwards as the learner's (the prompts once, then what follows them)
                states = shared_prompt_states(self.model.model, mb.input_ids, mb.position_ids, **mb.prefix())
            hidden = states.index_select(0, mb.gather_index)
            logp = torch.log_softmax(self.model.lm_head(hidden).float(), dim=-1).gather(1, mb.targets.unsqueeze(1))
            (-logp.sum() / tokens).backward()
        self.times.append(time.perf_counter() - start)
        self.model.zero_grad(set_to_none=True)
        self.micro_batches = len(mbs)

    def summary(self) -> dict:
        return {"mean_s": statistics.fmean(self.times[1:]), "micro_batches": self.micro_batches}


# --------------------------------------------------------------------------- cores


def core_budget(cfg) -> dict:
    """The thread counts the local job gives each role (from the config and placement)."""
    from async_rl.job import placement

    env = placement.role_env()["env_vars"]
    return {
        "machine_cores": os.cpu_count(),
        "learner_torch_threads": placement.learner_threads(cfg.learner),
        "learner_ranks": cfg.learner.ranks,
        "role_env": env,
        "actors": cfg.actors.count,
        "actor_vllm_omp_threads": env.get("OMP_NUM_THREADS"),
        "reward_workers_per_actor": cfg.reward.workers,
        "evaluator": cfg.learner.eval.every > 0,
    }


ROLES = [("learner", "LearnerRank"), ("actor", "ActorRole"), ("evaluator", "EvaluatorRole"),
         ("buffer", "buffer.service"), ("driver", "async-rl train")]


def role_of(proc) -> str:
    """The role of a process of the job: its own or its nearest ancestor's (a vLLM engine core
    or a reward worker counts for the actor or evaluator that started it); Ray's own otherwise."""
    import psutil

    own = " ".join(proc.cmdline())
    suffix = " engine" if "EngineCore" in own else " rewards" if "spawn_main" in own else ""
    try:
        for p in [proc, *proc.parents()]:
            cmdline = " ".join(p.cmdline())
            role = next((role for role, key in ROLES if key in cmdline), None)
            if role is not None:
                return role + suffix if role in ("actor", "evaluator") else role
    except psutil.Error:
        pass
    return "ray/other"


def live_job(args) -> dict:
    """A short ``async-rl train`` from RUN/sft_model; cores per role sampled from /proc."""
    import psutil

    run_dir = Path(tempfile.mkdtemp(prefix="step-profile-"))
    cmd = [sys.executable, "-m", "async_rl.cli", "train", f"run.dir={run_dir}",
           f"model.path={Path(args.run_dir) / 'sft_model'}", "learner.sft.epochs=0",
           f"learner.max_steps={args.job_steps}", "learner.checkpoint.every=0", "logging.console=plain",
           *args.overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent)
    root = psutil.Process(proc.pid)
    cpu: dict[str, float] = {}
    threads: dict[str, int] = {}
    last: dict[int, float] = {}
    timeline = []
    started = time.time()  # wall clock, as the job's metric records
    while proc.poll() is None:
        time.sleep(SAMPLE_S)
        sample = {}
        for p in [root, *safe_children(root)]:
            try:
                used = sum(p.cpu_times()[:2])
                role = role_of(p)
                threads[role] = max(threads.get(role, 0), p.num_threads())
            except psutil.Error:
                continue
            delta = used - last.get(p.pid, used)
            last[p.pid] = used
            sample[role] = sample.get(role, 0.0) + delta / SAMPLE_S
        timeline.append({"t": round(time.time() - started, 1), **{k: round(v, 2) for k, v in sample.items()}})
        for role, cores in sample.items():
            cpu[role] = cpu.get(role, 0.0) + cores * SAMPLE_S
    records = [json.loads(line) for line in (run_dir / "metrics" / "learner.jsonl").read_text().splitlines()]
    first = records[0]  # the RL window: from the start of the first learner step to the last record
    rl_start = first["time"] - first["step_s"] - first["sample_wait_s"] - started
    window = [t for t in timeline if rl_start <= t["t"] <= records[-1]["time"] - started] or timeline
    cores = {role: statistics.fmean(t.get(role, 0.0) for t in window) for role in {k for t in window for k in t} - {"t"}}
    steady = records[2:] or records
    phases = sorted({k for r in steady for k in r if k.startswith("time/")})
    return {
        "run_dir": str(run_dir), "exit_code": proc.returncode, "steps": len(records),
        "step_s_median": statistics.median(r["step_s"] for r in steady),
        "phases_mean_s": {k.removeprefix("time/"): statistics.fmean(r.get(k, 0.0) for r in steady) for k in phases},
        "cores_mean_during_rl": cores, "max_threads": threads, "timeline": timeline,
        "versions_per_minute": 60 * len(records) / max(1e-9, sum(r["step_s"] + r["sample_wait_s"] for r in records)),
    }


def safe_children(root):
    import psutil

    try:
        return root.children(recursive=True)
    except psutil.Error:
        return []


# --------------------------------------------------------------------------- report


def report(result: dict) -> None:
    rows = []
    for phase in [*STEP_PHASES, "total"]:
        rows.append([phase, *[result["steps"][name]["mean_s"][phase] for name in result["steps"]]])
    rows.append(["micro-batches", *[result["steps"][n]["micro_batches"] for n in result["steps"]]])
    rows.append(["compute bound (plain torch fwd+bwd)", *[result["bound"][n]["mean_s"] for n in result["bound"]]])
    rows.append(["step / bound", *[result["steps"][n]["mean_s"]["total"] / result["bound"][n]["mean_s"]
                                   for n in result["steps"]]])
    print_table(f"learner step, s ({result['rows_per_step']} rows, {result['threads']} torch thread(s), "
                f"{result['source']})", ["phase", *result["steps"]], rows)
    print_table("core budget of the local job", ["what", "value"], [[k, v] for k, v in result["core_budget"].items()])
    job = result.get("job")
    if job:
        print_table(f"live job ({job['steps']} steps, median step {job['step_s_median']:.2f} s, "
                    f"{job['versions_per_minute']:.1f} versions/min)", ["phase", "mean s"],
                    [[k, v] for k, v in job["phases_mean_s"].items()])
        print_table("cores used per role during RL (mean)", ["role", "cores", "max threads"],
                    [[k, v, job["max_threads"].get(k)] for k, v in sorted(job["cores_mean_during_rl"].items())])


if __name__ == "__main__":
    main()
