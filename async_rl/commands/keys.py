"""``async-rl keys``: CURVE key pairs that authenticate and encrypt weight publishing."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    help="ZeroMQ CURVE keys for weight publishing across machines.", no_args_is_help=True
)


@app.callback()
def keys() -> None:
    """Keys for `weights.curve_keys_dir`: the publisher admits only authorized client keys."""


@app.command()
def generate(
    directory: Path = typer.Argument(..., help="Folder to write the server and client key pairs into."),
    force: bool = typer.Option(False, "--force", help="Overwrite keys already in the folder."),
) -> None:
    """Write server and client key pairs; point weights.curve_keys_dir at the folder."""
    from async_rl.weights.keys import generate_keys

    if (directory / "server.key_secret").exists() and not force:
        typer.echo(f"keys: {directory} already holds keys (use --force to replace them)", err=True)
        raise typer.Exit(code=2)
    generate_keys(directory)
    typer.echo(f"wrote CURVE keys to {directory}; set weights.curve_keys_dir={directory}")
