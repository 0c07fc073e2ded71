"""Operating a job: ``async-rl status``, ``scale``, ``stop``, ``plot``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

scale_app = typer.Typer(help="Scale a running job's actors or learner ranks.", no_args_is_help=True)

RUN_DIR_HELP = "Run folder of the job (holds run.json)."


def _target(run_dir: Path, address: str | None) -> dict[str, str | None]:
    """Where the job's control endpoint listens, and the job's CURVE keys (from run.json)."""
    if address:
        return {"address": address, "curve_keys_dir": None}
    from async_rl.job.runfolder import read_run_json

    info = read_run_json(run_dir)
    if info.control_address is None:
        raise FileNotFoundError(f"{run_dir}/run.json: no control address (the job never started)")
    return {"address": info.control_address, "curve_keys_dir": info.curve_keys_dir}


def status(
    run_dir: Path = typer.Argument(Path("runs/tiny"), help=RUN_DIR_HELP),
    address: str = typer.Option(None, "--address", help="Control address (tcp://HOST:PORT) instead of a run folder."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Roles, versions, throughput, staleness, buffer and health of a job (live or finished)."""
    from rich.console import Console

    from async_rl.job.control import request
    from async_rl.job.display import render, snapshot
    from async_rl.records import JobStatus

    live = None
    try:
        live = request(verb="status", timeout_s=10, **_target(run_dir, address))
    except (ConnectionError, FileNotFoundError) as err:
        if address:
            raise
        typer.echo(f"job not answering ({err}); showing the run folder's last figures", err=True)
    snap = snapshot(run_dir, JobStatus.model_validate(live) if live else None)
    if as_json:
        typer.echo(json.dumps({"live": live, "snapshot": snap.shown()}, default=str, indent=2))
        return
    Console().print(render(snap, 0.0))


@scale_app.command("actors")
def scale_actors(
    count: int = typer.Argument(..., min=0, help="Actors wanted."),
    run_dir: Path = typer.Option(Path("runs/tiny"), "--run-dir", help=RUN_DIR_HELP),
    address: str = typer.Option(None, "--address"),
) -> None:
    """Add or remove actors while training runs (new ones get the current weights on join).

    Refused, starting none, when no live node of the cluster has an actor's resources."""
    from async_rl.job.control import request
    from async_rl.records import JobStatus

    result = JobStatus.model_validate(request(verb="scale_actors", count=count, **_target(run_dir, address)))
    pending = f"; pending placement: {result.actors_pending} (Ray starts them once a node has room)"
    typer.echo(f"actors now: {result.actors}{pending if result.actors_pending else ''}")


@scale_app.command("learners")
def scale_learners(
    count: int = typer.Argument(..., min=1, help="Learner ranks wanted."),
    run_dir: Path = typer.Option(Path("runs/tiny"), "--run-dir", help=RUN_DIR_HELP),
    address: str = typer.Option(None, "--address"),
) -> None:
    """Checkpoint, restart the learner group with COUNT ranks, resume; actors keep generating."""
    from async_rl.job.control import request
    from async_rl.records import JobStatus

    result = JobStatus.model_validate(request(verb="scale_learners", count=count, timeout_s=900,
                                              **_target(run_dir, address)))
    typer.echo(f"learner ranks now: {result.learner_ranks}")


def stop(
    run_dir: Path = typer.Argument(Path("runs/tiny"), help=RUN_DIR_HELP),
    address: str = typer.Option(None, "--address"),
) -> None:
    """Stop a job gracefully (as Ctrl-C): checkpoint, flush the buffer, stop in order."""
    from async_rl.job.control import request

    request(verb="stop", timeout_s=30, **_target(run_dir, address))
    typer.echo("stop requested; the job checkpoints and exits")


def plot(
    run_dir: Path = typer.Argument(..., help=RUN_DIR_HELP),
    out: Path = typer.Option(None, "--out", help="PNG path (default RUN_DIR/plot.png)."),
) -> None:
    """Plot reward, held-out accuracy, staleness and throughput of a run to a PNG."""
    from async_rl.job.plot import plot_run

    typer.echo(f"wrote {plot_run(run_dir, out)}")
