"""The ``async-rl`` command line.

Heavy libraries (torch, vLLM, Ray, DeepSpeed, pyarrow) are imported inside the commands so
``async-rl --help`` is instant. User errors print one line and exit with code 2.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import typer

app = typer.Typer(
    name="async-rl",
    help="Asynchronous off-policy RL for LLM reasoners (vLLM actors, Arrow buffer, DeepSpeed GPPO learner).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show or validate a resolved config.", no_args_is_help=True)
data_app = typer.Typer(help="Make and check prompt datasets.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")

# Command groups that live in their own modules (each exposes `app`).
COMMAND_GROUPS = {
    "buffer": "async_rl.commands.buffer",
    "keys": "async_rl.commands.keys",
}
# Groups defined as a typer app under another name inside a module.
SUB_APPS = {"scale": ("async_rl.commands.job", "scale_app")}
# Single commands that live in their own modules: name → (module, function).
COMMANDS = {
    "sft": ("async_rl.commands.sft", "sft"),
    "eval": ("async_rl.commands.eval", "eval_command"),
    "status": ("async_rl.commands.job", "status"),
    "stop": ("async_rl.commands.job", "stop"),
    "plot": ("async_rl.commands.job", "plot"),
}
USER_ERROR_EXIT = 2


class UserError(Exception):
    """Bad input worded for the user: printed as one line, exit code 2."""


def _split_args(args: list[str] | None) -> tuple[str | None, list[str]]:
    """``[CONFIG] [KEY=VALUE …]``: the one argument without '=' names the config."""
    config, overrides = None, []
    for arg in args or []:
        if "=" in arg:
            overrides.append(arg)
        elif config is None:
            config = arg
        else:
            raise UserError(f"unexpected argument {arg!r}: overrides look like key.path=value")
    return config, overrides


def _load(config: str | None, args: list[str] | None):
    from async_rl.config_io import load_config

    positional, overrides = _split_args(args)
    if config and positional:
        raise UserError(f"config given twice: --config {config} and {positional}")
    return load_config(config or positional, overrides)


@config_app.command("show")
def config_show(
    args: list[str] = typer.Argument(None, help="[CONFIG] then key.path=value overrides."),
) -> None:
    """Print the fully resolved config as YAML."""
    from async_rl.config_io import dump_config

    typer.echo(dump_config(_load(None, args)), nl=False)


@config_app.command("validate")
def config_validate(
    args: list[str] = typer.Argument(None, help="[CONFIG] then key.path=value overrides."),
) -> None:
    """Check a config; exit 2 with one line naming the bad key if it is wrong."""
    from async_rl.config_io import resolve_config_path

    positional, _ = _split_args(args)
    _load(None, args)
    typer.echo(f"{resolve_config_path(positional)}: valid")


@app.command("init-model")
def init_model(
    out: Path = typer.Option(..., "--out", help="Directory to write the model and tokenizer to."),
    size: str = typer.Option("tiny", help="tiny (~3M parameters) or small (~25M)."),
    seed: int = typer.Option(0, help="Seed of the random initialisation."),
) -> None:
    """Build the local tokenizer and a random-initialised Qwen2 model in HF format."""
    from async_rl.model import SIZES, build_tiny_model, model_fingerprint

    if size not in SIZES:
        raise UserError(f"--size={size}: must be one of {', '.join(SIZES)}")
    path = build_tiny_model(out, size=size, seed=seed)
    import json

    meta = json.loads((path / "async_rl_model.json").read_text())
    typer.echo(
        f"built {size} model ({meta['parameters'] / 1e6:.2f}M parameters, seed {seed}, "
        f"fingerprint {model_fingerprint(path)}) in {path}"
    )


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., "--out", help="Output file (.parquet or .jsonl)."),
    task: str = typer.Option("arith", help="Synthetic task family."),
    n: int = typer.Option(1000, min=1, help="Rows to write."),
    seed: int = typer.Option(0, help="Seed of the stream."),
    split: str = typer.Option("train", help="Split name; each split is its own seed stream."),
    sft: bool = typer.Option(False, "--sft", help="Add worked solutions (`response`) for SFT."),
    min_digits: int = typer.Option(1, min=1, max=12),
    max_digits: int = typer.Option(2, min=1, max=12),
    min_terms: int = typer.Option(2, min=2, max=8),
    max_terms: int = typer.Option(2, min=2, max=8),
    ops: str = typer.Option("+-", help="Operators to use, from '+-*'."),
) -> None:
    """Write synthetic arithmetic prompts in the verl/Klear row format."""
    from async_rl.tasks import arith
    from async_rl.tasks.dataset import write_rows

    if task != "arith":
        raise UserError(f"--task={task}: the built-in synthetic tasks are: arith")
    bad = sorted(set(ops) - set("+-*"))
    if not ops or bad:
        raise UserError(f"--ops={ops!r}: use characters from '+-*'")
    if min_digits > max_digits or min_terms > max_terms:
        raise UserError("--min-digits/--min-terms must not exceed --max-digits/--max-terms")
    spec = arith.ArithSpec(min_digits, max_digits, min_terms, max_terms, tuple(dict.fromkeys(ops)))
    rows = arith.make_rows(spec, n, seed=seed, split=split, with_solution=sft)
    write_rows(rows, out)
    short = f" (the spec admits only {len(rows)} distinct problems)" if len(rows) < n else ""
    typer.echo(f"wrote {len(rows)} {task} rows{' with solutions' if sft else ''} to {out}{short}")


@data_app.command("validate")
def data_validate(path: Path = typer.Argument(..., help="A .parquet or .jsonl dataset.")) -> None:
    """Check every row of a dataset; malformed rows are listed with their row numbers."""
    from async_rl.tasks.dataset import load_rows

    _, report = load_rows(path)
    typer.echo(report.summary(show=20))


@app.command()
def train(
    args: list[str] = typer.Argument(None, help="[CONFIG] then key.path=value overrides."),
    config: str = typer.Option(None, "--config", "-c", help="Config file or recipe name (default: tiny)."),
    resume: Path = typer.Option(None, "--resume", help="Continue the run in this folder (its config.yaml)."),
    ray_address: str = typer.Option(None, "--ray-address", help="Join a Ray cluster: auto or HOST:PORT."),
) -> None:
    """Train: validate, prepare the run folder (model, data, SFT warm start), run the async job."""
    from rich.console import Console

    if resume is not None:
        if config:
            raise UserError("--resume takes the run's own config.yaml; do not also pass --config")
        if not (resume / "config.yaml").is_file():
            raise UserError(f"--resume {resume}: no config.yaml there (expected a run folder)")
        config = str(resume / "config.yaml")
        args = [*(args or []), f"run.dir={resume}", "run.resume=true"]
    if ray_address:
        args = [*(args or []), f"cluster.ray_address={ray_address}"]
    cfg = _load(config, args)
    console = Console(highlight=False)
    console.print(f"config: valid — run folder {cfg.run_dir}")
    from async_rl.job.driver import run_job

    code = run_job(cfg, console, resume=cfg.run.resume)
    raise typer.Exit(code)


def _register_optional_commands() -> None:
    for name, module in COMMAND_GROUPS.items():
        if importlib.util.find_spec(module) is not None:
            app.add_typer(importlib.import_module(module).app, name=name)
    for name, (module, attr) in SUB_APPS.items():
        app.add_typer(getattr(importlib.import_module(module), attr), name=name)
    for name, (module, attr) in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            app.command(name)(getattr(importlib.import_module(module), attr))


def main() -> None:
    from async_rl.config_io import ConfigError
    from async_rl.job.control import RequestRefused
    from async_rl.tasks.dataset import DatasetError

    _register_optional_commands()
    try:
        app()
    except (UserError, ConfigError, DatasetError, FileNotFoundError, FileExistsError, RequestRefused) as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(USER_ERROR_EXIT)


if __name__ == "__main__":
    main()
