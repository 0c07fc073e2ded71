"""Rendering for `async-rl buffer`: rich tables of stats and decoded trajectories."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

Decoder = Callable[[list[int]], str]


def load_decoder(tokenizer: Path | None, run_dir: Path | None, console: Console) -> Decoder:
    """Token ids → text with the run's tokenizer; falls back to showing the ids."""
    path = tokenizer or (run_dir / "model" if run_dir is not None else None)
    if path is not None and path.exists():
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path))
            return lambda ids: tok.decode(ids, skip_special_tokens=False)
        except Exception as err:  # any tokenizer problem: still show the rows, as ids
            console.print(f"[yellow]tokenizer at {path} not usable ({err}); showing ids[/yellow]")
    return lambda ids: " ".join(map(str, ids))


def row_records(table, decode: Decoder) -> list[dict]:
    """One JSON-able dict per row: ids, reward, versions, status and decoded text."""
    records = []
    for row in table.to_pylist():
        versions = row["token_versions"]
        records.append({
            "traj_id": row["traj_id"], "group_id": row["group_id"],
            "data_source": row["data_source"], "actor_id": row["actor_id"],
            "reward": row["reward"], "staleness": row["staleness"],
            "min_version": min(versions), "max_version": max(versions),
            "times_sampled": row["times_sampled"], "status": row["status"],
            "finish_reason": row["finish_reason"], "response_len": len(row["response_tokens"]),
            "prompt": decode(row["prompt_tokens"]), "response": decode(row["response_tokens"]),
        })
    return records


def print_rows(console: Console, records: list[dict], chars: int) -> None:
    table = Table(title=f"{len(records)} trajectories")
    for name in ("traj_id", "reward", "versions", "stale", "used", "status", "prompt", "response"):
        table.add_column(name, overflow="fold")
    for r in records:
        table.add_row(
            r["traj_id"], f"{r['reward']:.3g}", f"{r['min_version']}–{r['max_version']}",
            str(r["staleness"]), str(r["times_sampled"]), r["status"],
            _clip(r["prompt"], chars), _clip(r["response"], chars),
        )
    console.print(table)


def _clip(text: str, chars: int) -> str:
    return text if len(text) <= chars else "…" + text[-chars:]


def print_stats(console: Console, s: dict) -> None:
    overview = Table(title=f"replay buffer {s['dir']}", show_header=False)
    reward, length = s["reward"], s["response_length"]
    for key, value in [
        ("learner version", s["learner_version"]),
        ("rows / groups stored", f"{s['rows']} / {s['groups']}"),
        ("live rows / groups", f"{s['rows_live']} / {s['groups_live']}"),
        ("sampleable groups", s["groups_sampleable"]),
        ("bytes / segments", f"{s['bytes']:,} / {s['segments']}"),
        ("reward mean ± std", _pm(reward)),
        ("accuracy (correct)", "-" if s["accuracy"] is None else f"{s['accuracy']:.3f}"),
        ("response length mean / p50 / p90 / max",
         "-" if length["mean"] is None
         else f"{length['mean']:.1f} / {length['p50']:.0f} / {length['p90']:.0f} / {length['max']:.0f}"),
        ("groups sampled (total)", s["groups_sampled_total"]),
        *_lease_rows(s.get("leases")),
        *([("sample requests waiting", s["samples_waiting"])] if "samples_waiting" in s else []),
        *_prompt_rows(s.get("prompts")),
    ]:
        overview.add_row(key, str(value))
    console.print(overview)
    for title, counts in [
        ("staleness (rows)", s["staleness"]), ("times sampled (groups)", s["times_sampled"]),
        ("per actor (rows)", s["per_actor"]), ("per data source (rows)", s["per_data_source"]),
        ("group status", s["group_status"]), ("evicted rows", s["evicted_rows"]),
        ("reward histogram", _hist(reward["histogram"])),
    ]:
        console.print(_counts_table(title, counts))
    for report in s["recovery"]:
        console.print(f"[yellow]recovered {report['segment']}: {report}[/yellow]")


def _lease_rows(leases: dict | None) -> list[tuple[str, str]]:
    """Groups the learner holds under leases it has not committed (its checkpoint is not written yet)."""
    if leases is None:
        return []
    return [("groups leased, uncommitted", f"{leases['groups']} in {leases['outstanding']} lease(s)")]


def _prompt_rows(p: dict | None) -> list[tuple[str, str]]:
    """The data cursor's lines: done / in flight / pending of the current epoch."""
    if p is None:
        return []
    if "error" in p:
        return [("prompts", f"cursor unreadable: {p['error']}")]
    rows = [(f"prompts of epoch {p['epoch']} ({p['prompts']})",
             f"{p['done']} done / {p['in_flight']} in flight / {p['pending']} pending")]
    if p["skipped"]:
        rows.append(("prompts skipped (too long)", str(p["skipped"])))
    if p["in_flight_earlier_epochs"]:
        rows.append(("prompts in flight from earlier epochs", str(p["in_flight_earlier_epochs"])))
    return rows


def _pm(summary: dict) -> str:
    return "-" if summary["mean"] is None else f"{summary['mean']:.3f} ± {summary['std']:.3f}"


def _hist(histogram: dict) -> dict:
    edges, counts = histogram["edges"], histogram["counts"]
    return {f"[{lo:.3g}, {hi:.3g})": c for lo, hi, c in zip(edges, edges[1:], counts, strict=False)}


def _counts_table(title: str, counts: dict) -> Table:
    table = Table(title=title)
    table.add_column("key")
    table.add_column("count", justify="right")
    table.add_column("")
    peak = max(counts.values(), default=1) or 1
    for key, count in counts.items():
        table.add_row(str(key), str(count), "█" * round(20 * count / peak))
    return table
