"""Benchmark files as they are shipped: verl rows and the Klear-release JSONL layouts.

One reader for every layout. Per record:

* **question** — ``messages`` or ``prompt`` (a chat list), or a plain string field
  (``problem``, ``question``); ``question_field`` names another dotted path.
* **answer** — ``answer_field`` (a dotted path such as ``meta.solution``) or, by default, the
  first of :data:`ANSWER_FIELDS` present in the file's first record. The same path must then
  hold an answer in every record. A top-level ``solution`` is never guessed: in many datasets
  it is a worked solution, not a final answer.
* **data source** — ``data_source`` when present, else the benchmark name; it picks the
  reward function (``reward.by_data_source``: math unless the name starts with a code source's).

The three files in ``../shared/data`` read as: ``aime24.qs.jsonl`` → ``meta.answer``,
``aime25.qs.jsonl`` → ``meta.solution``, ``HMMT-202502.jsonl`` → ``answer``. Malformed
records are errors naming the file and the 1-based line; an evaluation never silently
drops problems.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from async_rl.tasks.dataset import DatasetError, PromptRow

# Tried in order when no answer field is given.
ANSWER_FIELDS = (
    "reward_model.ground_truth",
    "answer",
    "meta.answer",
    "final_answer",
    "ground_truth",
    "meta.solution",
)
QUESTION_FIELDS = ("messages", "prompt", "problem", "question")
ID_FIELDS = ("id", "meta.unique_id", "unique_id", "extra_info.index")
ROLES = frozenset({"system", "user", "assistant"})
SUFFIXES = (".jsonl", ".json", ".parquet")


class BenchmarkError(DatasetError):
    """A benchmark file that cannot be evaluated as asked (one line, names file and row)."""


@dataclass(frozen=True)
class Problem:
    """One question with its reference answer (a string; code tests are JSON text)."""

    problem_id: str
    messages: list[dict[str, str]]
    answer: str
    data_source: str
    extra_info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Benchmark:
    name: str
    path: str
    answer_field: str
    problems: list[Problem]


def benchmark_name(path: Path) -> str:
    """``aime24.qs.jsonl`` → ``aime24``; ``HMMT-202502.jsonl`` → ``HMMT-202502``."""
    return path.name.split(".", 1)[0]


def load_benchmark(
    path: str | Path, *, answer_field: str | None = None, question_field: str | None = None,
    limit: int | None = None,
) -> Benchmark:
    """Read every problem of a .jsonl/.json/.parquet benchmark file (the first ``limit`` if set)."""
    path = Path(path)
    records = read_records(path)
    if not records:
        raise BenchmarkError(f"{path}: no records")
    if limit is not None:
        records = records[:limit]
    name = benchmark_name(path)
    answer_path = answer_field or detect_answer_field(path, records[0][1])
    problems = [
        parse_problem(raw, number=number, name=name, path=path, answer_field=answer_path,
                      question_field=question_field)
        for number, raw in records
    ]
    return Benchmark(name=name, path=str(path), answer_field=answer_path,
                     problems=_unique_ids(problems, name))


def read_records(path: Path) -> list[tuple[int, Any]]:
    """(1-based line or row number, record) for each record of the file."""
    if not path.is_file():
        raise BenchmarkError(f"{path}: no such benchmark file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise BenchmarkError(f"{path}: a .json benchmark must hold a list of records")
            return list(enumerate(data, start=1))
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return list(enumerate(pq.read_table(path).to_pylist(), start=1))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BenchmarkError(f"{path}: unreadable ({err})") from None
    except BenchmarkError:
        raise
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise BenchmarkError(f"{path}: not a readable parquet file ({err})") from None
    raise BenchmarkError(f"{path}: unknown format {suffix!r} (expected one of {', '.join(SUFFIXES)})")


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    out = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                out.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise BenchmarkError(f"{path}:{number}: invalid JSON ({err.msg})") from None
    return out


def lookup(record: Any, dotted: str) -> Any:
    """The value at a dotted path (``meta.answer``; list items by index), None when absent."""
    value = record
    for part in dotted.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def detect_answer_field(path: Path, first: Any) -> str:
    for candidate in ANSWER_FIELDS:
        if _present(lookup(first, candidate)):
            return candidate
    raise BenchmarkError(
        f"{path}: no answer field found (tried {', '.join(ANSWER_FIELDS)}); "
        "name it with --answer-field, e.g. --answer-field meta.answer"
    )


def parse_problem(
    raw: Any, *, number: int, name: str, path: Path, answer_field: str, question_field: str | None,
) -> Problem:
    where = f"{path}:{number}"
    if not isinstance(raw, dict):
        raise BenchmarkError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    answer = lookup(raw, answer_field)
    if not _present(answer):
        raise BenchmarkError(f"{where}: no answer at {answer_field!r}")
    source = raw.get("data_source")
    extra = raw.get("extra_info")
    ident = next((lookup(raw, f) for f in ID_FIELDS if _present(lookup(raw, f))), number - 1)
    return Problem(
        problem_id=f"{name}:{ident}",
        messages=_question(raw, where, question_field),
        answer=answer if isinstance(answer, str) else json.dumps(answer),
        data_source=source if isinstance(source, str) and source else name,
        extra_info=extra if isinstance(extra, dict) else {},
    )


def _question(raw: dict, where: str, question_field: str | None) -> list[dict[str, str]]:
    fields = (question_field,) if question_field else QUESTION_FIELDS
    for dotted in fields:
        value = lookup(raw, dotted)
        if isinstance(value, str) and value.lstrip().startswith("[") and dotted in ("prompt", "messages"):
            value = json.loads(value)  # verl parquet sometimes stores the chat as JSON text
        if isinstance(value, str) and value.strip():
            return [{"role": "user", "content": value}]
        if isinstance(value, list) and value:
            return _messages(value, where, dotted)
    raise BenchmarkError(f"{where}: no question (tried {', '.join(fields)}); name it with --question-field")


def _messages(value: list, where: str, dotted: str) -> list[dict[str, str]]:
    out = []
    for i, message in enumerate(value):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise BenchmarkError(f"{where}: {dotted}[{i}] is not a {{role, content}} chat message")
        out.append({"role": role, "content": content})
    return out


def _present(value: Any) -> bool:
    return value is not None and not isinstance(value, bool) and value != ""


def _unique_ids(problems: list[Problem], name: str) -> list[Problem]:
    """Keep the files' own ids when they are unique, else number the problems 0, 1, …"""
    if len({p.problem_id for p in problems}) == len(problems):
        return problems
    return [_renamed(p, f"{name}:{i}") for i, p in enumerate(problems)]


def _renamed(problem: Problem, problem_id: str) -> Problem:
    return Problem(problem_id, problem.messages, problem.answer, problem.data_source, problem.extra_info)


def problem_from_row(row: PromptRow) -> Problem:
    """A training-format row (``tasks/dataset.py``) as a problem, e.g. for held-out evaluation."""
    return Problem(row.prompt_id, row.messages, row.ground_truth, row.data_source, dict(row.extra_info))


def with_instruction(messages: list[dict[str, str]], instruction: str | None) -> list[dict[str, str]]:
    """Append an instruction to the last user message (e.g. DeepSeek-R1's boxed-answer request)."""
    if not instruction:
        return messages
    out = [dict(m) for m in messages]
    for message in reversed(out):
        if message["role"] == "user":
            message["content"] = f"{message['content']}\n{instruction}"
            return out
    return [*out, {"role": "user", "content": instruction}]
