"""``async-rl sft``: supervised fine-tuning of the configured model on prompt/response rows."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Supervised fine-tuning with the DeepSpeed learner.", no_args_is_help=False)


def split_data_arg(args: list[str] | None) -> tuple[str | None, list[str]]:
    """Pull ``data=FILE`` out of the ``key=value`` arguments (``data`` alone is not a config key)."""
    data, rest = None, []
    for arg in args or []:
        key, sep, value = arg.partition("=")
        if sep and key == "data":
            data = value
        else:
            rest.append(arg)
    return data, rest


@app.command("sft")
def sft(
    args: list[str] = typer.Argument(None, help="data=FILE, then [CONFIG] and key.path=value overrides."),
    config: str = typer.Option(None, "--config", "-c", help="Config file or recipe name (default: tiny)."),
    out: Path = typer.Option(None, "--out", help="Where the fine-tuned HF model goes (default: RUN_DIR/sft_model)."),
    epochs: float = typer.Option(None, "--epochs", min=0.0, help="Epochs (default: learner.sft.epochs, or 1)."),
) -> None:
    """Fine-tune on rows with a `response` (verl/Klear format, .parquet or .jsonl) and export HF."""
    from async_rl.cli import UserError, _load
    from async_rl.model import ensure_model
    from async_rl.tasks.dataset import load_rows

    data, rest = split_data_arg(args)
    if data is None:
        raise UserError("sft: give the rows as data=FILE (.parquet or .jsonl with a `response` field)")
    cfg = _load(config, rest)
    _, report = load_rows(data, require_response=True)
    typer.echo(report.summary())
    model_dir, _ = ensure_model(cfg.model.path, cfg.run_dir, size=cfg.model.size, seed=cfg.model.seed)
    run_epochs = epochs if epochs is not None else (cfg.learner.sft.epochs or 1.0)
    if run_epochs <= 0:
        raise UserError(f"--epochs={run_epochs}: must be > 0")
    out_dir = out or cfg.run_dir / "sft_model"
    from learners.sft import run_sft

    run_sft(cfg, model_dir=model_dir, data=Path(data), out_dir=out_dir, epochs=run_epochs)
    typer.echo(f"sft: fine-tuned model written to {out_dir}")
