"""`async-rl buffer stats|head|sample|staleness|export`: look inside the replay buffer.

Works on a live service (``--connect tcp://127.0.0.1:PORT``) or on a run folder with no job
running (the folder is opened read-only: nothing is truncated, counted or written).
Heavy imports (pyarrow, the buffer, a tokenizer) happen inside the commands so that
``async-rl --help`` stays instant.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Inspect the replay buffer, live (--connect ADDR) or from a run folder.",
    no_args_is_help=True,
)
console = Console()

RunArg = typer.Argument(None, help="Run folder (or its buffer/ folder). Default: runs/tiny.")
ConnectOpt = typer.Option(
    None, "--connect",
    help="Address of a live buffer service (the job's CURVE keys, if any, come from RUN/run.json).",
)
JsonOpt = typer.Option(False, "--json", help="Print JSON for scripts instead of tables.")
DEFAULT_RUN = Path("runs/tiny")
TEXT_CHARS = 80  # characters of decoded prompt/response shown per table cell


class _Source:
    """Either a live client or a read-only store, behind the three calls the commands need."""

    def __init__(self, run: Path | None, connect: str | None) -> None:
        self.run_dir = None
        if connect:
            from buffer.client import BufferClient

            keys = _job_keys(run or DEFAULT_RUN)
            self.client, self.store = BufferClient(connect, timeout_s=30.0, curve_keys_dir=keys), None
        else:
            from buffer.store import ReplayStore

            buffer_dir, self.run_dir = _find_buffer_dir(run or DEFAULT_RUN)
            self.client = None
            cfg = _run_config(self.run_dir)
            self.store = ReplayStore(buffer_dir, cfg.buffer, max_staleness=cfg.algorithm.staleness.max_staleness,
                                     read_only=True)

    def stats(self) -> dict:
        if self.client:
            return self.client.stats()
        from buffer import inspection

        return inspection.stats(self.store)

    def rows(self, n: int, *, random: bool, **filters):
        if self.client:
            return self.client.head(n, random=random, **filters)
        from buffer import inspection

        return inspection.inspect_rows(self.store, n, random=random, **filters)


def _job_keys(path: Path) -> str | None:
    """The CURVE keys folder the job in run folder ``path`` (or its buffer/) was started with."""
    from async_rl.job.runfolder import read_run_json

    run_dir = path.parent if path.name == "buffer" else path
    try:
        return read_run_json(run_dir).curve_keys_dir
    except FileNotFoundError:
        return None


def _find_buffer_dir(path: Path) -> tuple[Path, Path]:
    for candidate in (path / "buffer", path):
        if (candidate / "state.jsonl").exists() or any(candidate.glob("seg-*.arrows")):
            run_dir = candidate.parent if candidate.name == "buffer" else candidate
            return candidate, run_dir
    _fail(f"{path}: no replay buffer here (expected {path}/buffer/seg-*.arrows or state.jsonl)")


def _run_config(run_dir: Path):
    """The run's config if the run folder holds it, else the defaults."""
    from async_rl.config import Config

    for name in ("config.yaml", "config.yml"):
        if (run_dir / name).exists():
            from async_rl.config_io import ConfigError, load_config

            try:
                return load_config(run_dir / name)
            except ConfigError as err:
                console.print(f"[yellow]ignoring {run_dir / name}: {err}[/yellow]")
    return Config()


def _fail(message: str) -> None:
    """One unwrapped line on stderr, exit code 2 (DESIGN §5)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _open(run: Path | None, connect: str | None) -> _Source:
    try:
        return _Source(run, connect)
    except (OSError, ValueError) as err:
        _fail(str(err))


@app.command()
def stats(run: Path = RunArg, connect: str = ConnectOpt, as_json: bool = JsonOpt) -> None:
    """Rows, groups, bytes, rewards, lengths, staleness, per-actor counts, evictions."""
    data = _open(run, connect).stats()
    if as_json:
        print(json.dumps(data, indent=2))
        return
    from async_rl.commands.buffer_view import print_stats

    print_stats(console, data)


@app.command()
def head(
    run: Path = RunArg, connect: str = ConnectOpt, as_json: bool = JsonOpt,
    n: int = typer.Option(10, "-n", help="Rows to show (the most recently stored)."),
    where: str = typer.Option(None, help="Filter like 'reward<0' (reward, staleness, "
                              "min_version, response_len, times_sampled, group_size)."),
    data_source: str = typer.Option(None, help="Only rows of this data source."),
    min_staleness: int = typer.Option(None, help="Only rows at least this many versions old."),
    tokenizer: Path = typer.Option(None, help="Tokenizer folder (default: RUN/model if present)."),
) -> None:
    """The newest stored trajectories, decoded with the run's tokenizer."""
    _show_rows(run, connect, as_json, n, False, where, data_source, min_staleness, tokenizer)


@app.command()
def sample(
    run: Path = RunArg, connect: str = ConnectOpt, as_json: bool = JsonOpt,
    n: int = typer.Option(10, "-n", help="Rows to show, drawn at random (not counted as use)."),
    where: str = typer.Option(None, help="Filter like 'reward<0'."),
    data_source: str = typer.Option(None, help="Only rows of this data source."),
    min_staleness: int = typer.Option(None, help="Only rows at least this many versions old."),
    tokenizer: Path = typer.Option(None, help="Tokenizer folder (default: RUN/model if present)."),
) -> None:
    """Random stored trajectories (inspection only: sample counts are not touched)."""
    _show_rows(run, connect, as_json, n, True, where, data_source, min_staleness, tokenizer)


def _show_rows(run, connect, as_json, n, random, where, data_source, min_staleness, tokenizer):
    source = _open(run, connect)
    try:
        table = source.rows(n, random=random, where=where, data_source=data_source,
                            min_staleness=min_staleness)
    except Exception as err:  # a bad --where from either side reads as one line
        _fail(str(err).removeprefix("ValueError: "))
    from async_rl.commands.buffer_view import load_decoder, print_rows, row_records

    decode = load_decoder(tokenizer, source.run_dir, console)
    records = row_records(table, decode)
    if as_json:
        print(json.dumps(records, indent=2, default=str))
    else:
        print_rows(console, records, TEXT_CHARS)


@app.command()
def staleness(run: Path = RunArg, connect: str = ConnectOpt, as_json: bool = JsonOpt) -> None:
    """Histogram of policy lag (learner version − min(token_versions)) over stored rows."""
    data = _open(run, connect).stats()
    hist = {int(k): v for k, v in data["staleness"].items()}
    if as_json:
        print(json.dumps({"learner_version": data["learner_version"], "histogram": hist}))
        return
    table = Table(title=f"staleness at learner version {data['learner_version']}")
    table.add_column("staleness", justify="right")
    table.add_column("rows", justify="right")
    table.add_column("")
    peak = max(hist.values(), default=1)
    for lag, count in sorted(hist.items()):
        table.add_row(str(lag), str(count), "█" * max(1, round(30 * count / peak)))
    console.print(table)


@app.command()
def export(
    out: Path = typer.Argument(..., help="Output file."),
    run: Path = typer.Option(None, "--run", help="Run folder (or its buffer/). Default: runs/tiny."),
    fmt: str = typer.Option("parquet", "--format", help="parquet or jsonl."),
    where: str = typer.Option(None, help="Filter like 'reward<0'."),
    data_source: str = typer.Option(None, help="Only rows of this data source."),
    min_staleness: int = typer.Option(None, help="Only rows at least this many versions old."),
) -> None:
    """Write stored trajectories to parquet or JSON lines (for pandas, DuckDB, Polars).

    Reads the run folder (read-only; safe while the job runs)."""
    if fmt not in ("parquet", "jsonl"):
        _fail(f"--format {fmt!r}: expected parquet or jsonl")
    source = _open(run, None)
    from buffer import inspection

    try:
        rows = inspection.select_rows(source.store, where=where, data_source=data_source,
                                      min_staleness=min_staleness)
    except ValueError as err:
        _fail(str(err))
    count = inspection.export(source.store, out, fmt, rows)
    console.print(f"wrote {count} rows to {out} ({fmt})")
