"""Looking inside a store: statistics, filtered rows, export. Read-only, never counts a sample.

Used by the service (``stats`` and ``head`` verbs) and by ``async-rl buffer`` on a run folder
opened with ``ReplayStore(..., read_only=True)``. Everything is computed from the index
except the rows that are shown, which are read from the memory-mapped segments.
"""

from __future__ import annotations

import json
import re
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pyarrow as pa

from buffer import cursor
from buffer.index import Status
from buffer.schema import TRAJECTORY_SCHEMA, staleness
from buffer.store import ReplayStore

HISTOGRAM_BINS = 10
_TIMES = TRAJECTORY_SCHEMA.field("times_sampled")
_WHERE = re.compile(r"^\s*([a-z_]+)\s*(<=|>=|==|!=|<|>|=)\s*(-?[0-9.]+(?:e-?[0-9]+)?)\s*$")
_OPS = {
    "<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal,
    "==": np.equal, "=": np.equal, "!=": np.not_equal,
}


def row_columns(store: ReplayStore, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Per-row index columns that filters and statistics use (``[rows]`` each)."""
    idx = store.index
    gids = idx.row_group.view[rows]
    return {
        "reward": idx.row_reward.view[rows],
        "staleness": staleness(store.learner_version, idx.row_min_version.view[rows]),
        "min_version": idx.row_min_version.view[rows],
        "response_len": idx.row_resp_len.view[rows],
        "times_sampled": idx.group_times_sampled.view[gids],
        "group_size": idx.group_size.view[gids],
    }


def select_rows(
    store: ReplayStore,
    *,
    where: str | None = None,
    data_source: str | None = None,
    min_staleness: int | None = None,
) -> np.ndarray:
    """Row numbers of stored rows passing every filter, oldest first.

    ``where`` is ``COLUMN OP NUMBER`` over reward, staleness, min_version, response_len,
    times_sampled, group_size (e.g. ``reward<0``).
    """
    rows = store.stored_rows()
    cols = row_columns(store, rows)
    keep = np.ones(len(rows), dtype=bool)
    if where:
        column, op, value = parse_where(where)
        keep &= _OPS[op](cols[column], float(value))
    if data_source is not None:
        names = store.index.sources.names
        code = names.index(data_source) if data_source in names else -1
        keep &= store.index.row_source.view[rows] == code
    if min_staleness is not None:
        keep &= cols["staleness"] >= min_staleness
    return rows[keep]


def parse_where(expr: str) -> tuple[str, str, str]:
    match = _WHERE.match(expr)
    allowed = ("reward", "staleness", "min_version", "response_len", "times_sampled", "group_size")
    if not match or match.group(1) not in allowed:
        raise ValueError(
            f"--where {expr!r}: expected COLUMN OP NUMBER with COLUMN one of {', '.join(allowed)} "
            "and OP one of < <= > >= == !="
        )
    return match.group(1), match.group(2), match.group(3)


def inspect_rows(store: ReplayStore, n: int, *, random: bool = False, seed: int = 0, **filters):
    """The ``n`` newest (or ``n`` random) rows passing the filters, with status and staleness."""
    if n < 0:
        raise ValueError(f"n={n}: the number of rows must be >= 0")
    rows = select_rows(store, **filters)
    if random and len(rows) > n:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=n, replace=False))
    else:
        rows = rows[-n:] if n else rows[:0]
    table = store.read_rows(rows)
    gids = store.index.row_group.view[rows]
    status = [Status(s).name.lower() for s in store.index.group_status.view[gids].tolist()]
    times = store.index.group_times_sampled.view[gids].astype(np.int32)
    table = table.set_column(table.schema.get_field_index("times_sampled"), _TIMES, pa.array(times))
    table = table.append_column("staleness", pa.array(row_columns(store, rows)["staleness"]))
    return table.append_column("status", pa.array(status, pa.string()))


def stats(store: ReplayStore) -> dict:
    """Everything `async-rl buffer stats` shows, as plain JSON-able values."""
    idx = store.index
    rows = store.stored_rows()
    cols = row_columns(store, rows)
    gids = np.unique(idx.row_group.view[rows])
    status = idx.group_status.view
    return {
        "dir": str(store.dir),
        "learner_version": store.learner_version,
        "rows": int(len(rows)),
        "groups": int(len(gids)),
        "rows_live": int(idx.group_count.view[status == Status.LIVE].sum()),
        "groups_live": int((status == Status.LIVE).sum()),
        "groups_sampleable": store.sampleable_groups(),
        "bytes": int(sum(seg.bytes for seg in store.segments.values())),
        "segments": len(store.segments),
        "reward": _summary(cols["reward"]),
        "accuracy": float(idx.row_correct.view[rows].mean()) if len(rows) else None,
        "response_length": _summary(cols["response_len"]),
        "staleness": _counts(cols["staleness"]),
        "times_sampled": _counts(idx.group_times_sampled.view[gids]),
        "per_actor": _named_counts(idx.actors.names, idx.row_actor.view[rows]),
        "per_data_source": _named_counts(idx.sources.names, idx.row_source.view[rows]),
        "group_status": {s.name.lower(): int((status == s).sum()) for s in Status},
        "evicted_rows": dict(store.state.evicted_rows),
        "evicted_groups": dict(store.state.evicted_groups),
        "groups_sampled_total": store.state.samples,
        "leases": {"outstanding": len(store.state.leases), "groups": store.leased_groups()},
        "rate_limiter": {"inserted": store.limiter.inserted, "sampled": store.limiter.sampled},
        "recovery": store.recovery,
        "prompts": prompt_progress(store),
    }


def prompt_progress(store: ReplayStore) -> dict | None:
    """Prompts done / in flight / pending of the current epoch (``buffer/cursor.py``), or None
    when no job handed prompts out through a cursor in this folder."""
    try:
        record = cursor.read_record(store.dir)
    except ValueError as err:
        return {"error": str(err)}
    if record is None:
        return None
    return cursor.progress(record, lambda ids: store.holds_groups(ids).tolist())


def _summary(values: np.ndarray) -> dict:
    if not len(values):
        return {"mean": None, "std": None, "min": None, "max": None, "p50": None, "p90": None,
                "histogram": {"edges": [], "counts": []}}
    values = values.astype(np.float64)
    counts, edges = np.histogram(values, bins=HISTOGRAM_BINS)
    return {
        "mean": float(values.mean()), "std": float(values.std()),
        "min": float(values.min()), "max": float(values.max()),
        "p50": float(np.percentile(values, 50)), "p90": float(np.percentile(values, 90)),
        "histogram": {"edges": edges.round(6).tolist(), "counts": counts.tolist()},
    }


def _counts(values: np.ndarray) -> dict[str, int]:
    keys, counts = np.unique(values, return_counts=True)
    return {str(int(k)): int(c) for k, c in zip(keys, counts, strict=True)}


def _named_counts(names: list[str], codes: np.ndarray) -> dict[str, int]:
    counts = np.bincount(codes, minlength=len(names)) if len(codes) else np.zeros(len(names), int)
    return {name: int(c) for name, c in zip(names, counts, strict=True) if c}


def export(store: ReplayStore, out: Path, fmt: str, rows: np.ndarray | None = None) -> int:
    """Write stored rows (with current times_sampled) as parquet or JSON lines; returns rows."""
    rows = store.stored_rows() if rows is None else rows
    chunk = 4096  # rows per write: bounded memory whatever the buffer's size
    writer = None
    with open(out, "w") if fmt == "jsonl" else nullcontext() as text:
        for start in range(0, len(rows), chunk):
            table = _with_counts(store, rows[start : start + chunk])
            if fmt == "parquet":
                import pyarrow.parquet as pq

                writer = writer or pq.ParquetWriter(out, table.schema)
                writer.write_table(table)
            else:
                for record in table.to_pylist():
                    text.write(json.dumps(record, default=str) + "\n")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        writer = writer or pq.ParquetWriter(out, store.read_rows(rows[:0]).schema)
        writer.close()
    return int(len(rows))


def _with_counts(store: ReplayStore, rows: np.ndarray) -> pa.Table:
    table = store.read_rows(rows)
    gids = store.index.row_group.view[rows]
    times = pa.array(store.index.group_times_sampled.view[gids].astype(np.int32))
    return table.set_column(table.schema.get_field_index("times_sampled"), _TIMES, times)
