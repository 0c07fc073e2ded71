"""Prompt datasets in the verl/Klear row format (parquet or JSONL).

A row: ``data_source`` (str), ``prompt`` (a non-empty list of ``{role, content}`` chat
messages), ``reward_model.ground_truth`` (str or number), optional ``extra_info`` (mapping) and,
for SFT files, ``response`` (str). Malformed rows are counted, reported with their 1-based row
numbers and skipped; a file with no valid rows is an error.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = frozenset({"system", "user", "assistant"})


class DatasetError(ValueError):
    """A dataset file that cannot be used at all (missing, unreadable, no valid rows)."""


@dataclass(frozen=True)
class PromptRow:
    prompt_id: str
    data_source: str
    messages: list[dict[str, str]]
    ground_truth: str
    extra_info: dict[str, Any] = field(default_factory=dict)
    response: str | None = None


@dataclass
class LoadReport:
    path: str
    total: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)

    @property
    def valid(self) -> int:
        return self.total - len(self.skipped)

    def summary(self, show: int = 5) -> str:
        text = f"{self.path}: {self.valid} valid rows of {self.total}"
        if self.skipped:
            shown = "; ".join(f"row {n}: {why}" for n, why in self.skipped[:show])
            more = f" (+{len(self.skipped) - show} more)" if len(self.skipped) > show else ""
            text += f", {len(self.skipped)} skipped — {shown}{more}"
        return text


def load_rows(path: str | Path, *, require_response: bool = False) -> tuple[list[PromptRow], LoadReport]:
    """Read and validate every row of a .parquet or .jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such dataset file (expected .parquet or .jsonl)")
    report = LoadReport(str(path))
    rows: list[PromptRow] = []
    for number, raw in _read_records(path):
        report.total += 1
        try:
            rows.append(parse_row(raw, number=number, stem=path.stem, require_response=require_response))
        except ValueError as err:
            report.skipped.append((number, str(err)))
    if not rows:
        first = f" (row {report.skipped[0][0]}: {report.skipped[0][1]})" if report.skipped else ""
        raise DatasetError(f"{path}: no valid rows among {report.total}{first}")
    return rows, report


@dataclass(frozen=True)
class _InvalidJson:
    reason: str


def parse_row(raw: Any, *, number: int, stem: str = "data", require_response: bool = False) -> PromptRow:
    if isinstance(raw, _InvalidJson):
        raise ValueError(f"invalid JSON ({raw.reason})")
    if not isinstance(raw, dict):
        raise ValueError(f"expected an object, got {type(raw).__name__}")
    source = raw.get("data_source")
    if not isinstance(source, str) or not source:
        raise ValueError("data_source: missing or not a string")
    messages = _messages(raw.get("prompt"))
    reward_model = raw.get("reward_model")
    if not isinstance(reward_model, dict) or "ground_truth" not in reward_model:
        raise ValueError("reward_model.ground_truth: missing")
    truth = reward_model["ground_truth"]
    if isinstance(truth, bool) or not isinstance(truth, (str, int, float, list, dict)):
        raise ValueError(f"reward_model.ground_truth: unsupported type {type(truth).__name__}")
    truth_text = truth if isinstance(truth, str) else json.dumps(truth)
    extra = raw.get("extra_info") or {}
    if not isinstance(extra, dict):
        raise ValueError("extra_info: expected a mapping")
    response = raw.get("response")
    if require_response and (not isinstance(response, str) or not response):
        raise ValueError("response: missing (required for SFT rows)")
    index = extra.get("index", number - 1)
    return PromptRow(
        prompt_id=f"{stem}:{index}",
        data_source=source,
        messages=messages,
        ground_truth=truth_text,
        extra_info=extra,
        response=response if isinstance(response, str) else None,
    )


def _messages(prompt: Any) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        prompt = json.loads(prompt) if prompt.lstrip().startswith("[") else None
    if not isinstance(prompt, list) or not prompt:
        raise ValueError("prompt: expected a non-empty list of chat messages")
    out = []
    for i, message in enumerate(prompt):
        if not isinstance(message, dict):
            raise ValueError(f"prompt[{i}]: expected {{role, content}}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"prompt[{i}].role={role!r}: expected one of {sorted(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"prompt[{i}].content: expected a string")
        out.append({"role": role, "content": content})
    return out


def _read_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(1-based row number, record) pairs; JSONL rows are numbered by line."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises several types for corrupt files
            raise DatasetError(f"{path}: not a readable parquet file ({err})") from None
        yield from enumerate(table.to_pylist(), start=1)
    else:
        raise DatasetError(f"{path}: unknown format {suffix!r} (expected .parquet or .jsonl)")


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                yield number, _InvalidJson(err.msg)


def write_rows(rows: Iterable[dict], path: str | Path) -> Path:
    """Write verl-format rows as .parquet or .jsonl (by suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    if path.suffix.lower() == ".jsonl":
        with path.open("w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    elif path.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        # from_pylist infers columns from the first row only; give every row every key.
        keys = list(dict.fromkeys(key for row in rows for key in row))
        pq.write_table(pa.Table.from_pylist([{k: row.get(k) for k in keys} for row in rows]), path)
    else:
        raise DatasetError(f"{path}: unknown format (expected .parquet or .jsonl)")
    return path
