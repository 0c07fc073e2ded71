"""``async-rl train``: prepare the run, warm-start with SFT, run the job under Ray, show it live.

Reads top to bottom:
1. prepare the run folder (config, model, data) — cached;
2. SFT warm start on the synthetic SFT split when ``learner.sft.epochs > 0`` (once per run);
3. Ray (private and loopback-bound, or the cluster at ``--ray-address``) and the controller;
4. the controller starts buffer → learner group → actors → evaluator;
5. until the learner group finishes or a stop arrives (Ctrl-C, ``async-rl stop``, STOP
   file): supervise, serve the control endpoint, refresh the view (the evaluator scores
   held-out problems at exact versions on its own, ``job/eval_role.py``); the final policy's
   evaluation;
6. stop in order (learners checkpoint → actors → buffer flushes), shut Ray down.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from async_rl.config import Config
from async_rl.job import placement
from async_rl.job.runfolder import clear_stop, request_stop, stop_requested, update_run_json
from async_rl.records import ControllerLaunch, ControlRequest, JobStatus

# How often the driver supervises, serves control requests and refreshes the display.
TICK_S = 1.0
DEFERRED_EVAL_TIMEOUT_S = 1800.0  # every kept version of a long job, evaluated at its end


def run_job(cfg: Config, console, *, resume: bool = False) -> int:
    from async_rl.prepare import prepare_run

    if not resume and (cfg.run_dir / "checkpoints" / "latest").is_file():
        raise FileExistsError(
            f"run.dir={cfg.run_dir}: holds a trained run; continue it with `async-rl train --resume "
            f"{cfg.run_dir}` or choose a new run.dir"
        )
    prepared = prepare_run(cfg)
    run_dir = prepared.run_dir
    _check_train_data(cfg, run_dir)
    clear_stop(run_dir)
    clear_stop(run_dir, "learner")
    policy_dir = warm_start(cfg, prepared, console)
    ray = placement.init_ray(cfg.cluster, num_cpus=_local_cpus(cfg))
    placement.resolve_bind_host(cfg.cluster, ray)
    controller = _start_controller(ray, cfg, run_dir, policy_dir)
    addresses = ray.get(controller.start.remote(resume)).model_dump(mode="json")
    from async_rl.job.control import ControlServer

    keys = cfg.weights.curve_keys_dir and str(Path(cfg.weights.curve_keys_dir).resolve())
    control = ControlServer(cfg.cluster.bind_host, curve_keys_dir=keys)
    update_run_json(
        run_dir, pid=os.getpid(), control_address=control.address, curve_keys_dir=keys, **addresses,
        policy_dir=str(policy_dir),
        ray_address=ray.get_runtime_context().gcs_address,
    )
    console.print(f"job: buffer {addresses['buffer_address']}, weights {addresses['weights_address']}, control {control.address}")
    interrupted = _install_interrupt(run_dir)
    try:
        status = _watch(cfg, run_dir, controller, control, console, ray)
    finally:
        console.print("stopping: learners checkpoint → actors → buffer")
        status = ray.get(controller.stop.remote())
        control.close()
        ray.shutdown()
        for signum, handler in interrupted.items():
            signal.signal(signum, handler)
    summary = _summary(run_dir)
    console.print(summary)
    return 1 if status.failure else 0


def _check_train_data(cfg: Config, run_dir: Path) -> None:
    """Every training row's data source has a reward, and a run folder's data cursor matches the
    data it continues with (one line if not)."""
    from async_rl.job.actor_role import train_prompts
    from async_rl.seeds import prompt_order_seed
    from async_rl.tasks.dataset import DatasetError, load_rows
    from buffer.cursor import check_record

    rows, _ = load_rows(train_prompts(cfg, run_dir))
    try:
        for source in sorted({row.data_source for row in rows}):
            cfg.reward.reward_for(source)
        check_record(run_dir / "buffer", n_prompts=len(rows), seed=prompt_order_seed(cfg.run.seed, cfg.data.seed))
    except ValueError as err:
        raise DatasetError(str(err)) from None


def warm_start(cfg: Config, prepared, console) -> Path:
    """The policy the job starts from: the SFT'd model when configured, else the base model."""
    sft_dir = prepared.run_dir / "sft_model"
    if cfg.learner.sft.epochs <= 0 or "sft" not in prepared.data:
        return prepared.model_dir
    if (sft_dir / "config.json").is_file():
        console.print(f"sft: reusing {sft_dir}")
        return sft_dir
    from learners.sft import run_sft

    console.print(f"sft: warm start, {cfg.learner.sft.epochs:g} epoch(s) on {prepared.data['sft']}")
    run_sft(cfg, model_dir=prepared.model_dir, data=prepared.data["sft"], out_dir=sft_dir, console=console)
    return sft_dir


def _local_cpus(cfg: Config) -> int:
    return placement.local_cpus(cfg.cluster, cfg.actors, cfg.learner, max_actors=max(cfg.actors.count, 1) + 2)


def _start_controller(ray, cfg: Config, run_dir: Path, policy_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(policy_dir))
    stop_ids = sorted({tokenizer.eos_token_id, tokenizer.pad_token_id} - {None})
    return placement.start_controller(
        ray, ControllerLaunch(config=cfg, run_dir=run_dir, model_dir=policy_dir, stop_token_ids=stop_ids))


def _watch(cfg: Config, run_dir: Path, controller, control, console, ray) -> JobStatus | None:
    from async_rl.job.display import LiveView, snapshot

    deadline = time.monotonic() + cfg.run.max_minutes * 60 if cfg.run.max_minutes else None
    status: JobStatus | None = None
    with LiveView(console, mode=cfg.logging.console) as view:
        while True:
            status = ray.get(controller.supervise.remote())
            control.serve_pending(lambda req: _handle(req, controller, ray, run_dir), timeout_ms=int(TICK_S * 1000))
            snap = snapshot(run_dir, status)
            view.update(snap, status.events)
            if status.finished or status.failure or stop_requested(run_dir):
                break
            if deadline is not None and time.monotonic() > deadline:
                console.print(f"run.max_minutes={cfg.run.max_minutes:g} reached")
                break
    if status is not None and not status.failure and cfg.learner.eval.every and cfg.learner.eval.defer:
        console.print("held-out evaluation of the versions kept for the end (learner.eval.defer)")
        ray.get(controller.deferred_evaluations.remote(DEFERRED_EVAL_TIMEOUT_S))
    if status is not None and status.finished and not status.failure:
        console.print("held-out evaluation of the final policy")
        ray.get(controller.final_evaluation.remote())
    return status


def _handle(request: ControlRequest, controller, ray, run_dir: Path) -> Any:
    """One control request; the reply is JSON (``JobStatus`` for status and scale)."""
    if request.verb == "status":
        return ray.get(controller.status.remote()).model_dump(mode="json")
    if request.verb == "stop":
        request_stop(run_dir)
        return {"stopping": True}
    count = request.count
    if not isinstance(count, int) or count < (0 if request.verb == "scale_actors" else 1):
        raise ValueError(f"count={count!r}: expected a non-negative integer "
                         f"({'>= 1 ' if request.verb == 'scale_learners' else ''}for {request.verb})")
    method = controller.scale_actors if request.verb == "scale_actors" else controller.scale_learners
    try:
        return ray.get(method.remote(count)).model_dump(mode="json")
    except ray.exceptions.RayTaskError as err:  # the controller's own one-line error, not Ray's traceback
        raise err.cause from None


def _install_interrupt(run_dir: Path) -> dict:
    """Ctrl-C, and SIGTERM (what a batch scheduler or `kill` sends before SIGKILL), ask for the
    same graceful stop as `async-rl stop`; a second one aborts. Returns the handlers replaced."""
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}

    def on_interrupt(signum, frame):
        if stop_requested(run_dir):
            raise KeyboardInterrupt
        request_stop(run_dir)

    for signum in previous:
        signal.signal(signum, on_interrupt)
    return previous


def _summary(run_dir: Path) -> str:
    from async_rl.job.display import snapshot

    snap = snapshot(run_dir)

    def accuracy(value) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = [
        f"run folder: {run_dir}",
        f"policy version {snap.version}; held-out accuracy {accuracy(snap.first_heldout_accuracy)} → "
        f"{accuracy(snap.heldout_accuracy)}",
        f"metrics: {run_dir / 'metrics'}; plot: async-rl plot {run_dir}",
    ]
    (run_dir / "summary.json").write_text(json.dumps(snap.shown(), indent=2, default=str))
    return "\n".join(lines)
