"""Result files of ``async-rl eval``: save, load, print as rich tables, compare two runs.

A result file is the JSON document ``runner.result_document`` builds, declared as the
``EvalResult`` record in ``async_rl/records.py`` (checked on write and on load):
``{"format": "async-rl-eval/1", "model", "created", "settings", "ks", "elapsed_s", "engine_start_s",
"generated_tokens", "benchmarks": [{"name", "file", "answer_field", "problems", "samples",
"avg@n", "pass@k": {"k": value}, "cons@n", "mean_response_tokens", "truncated_fraction",
"no_answer_fraction", "per_problem": [...]}]}``. Rates are fractions in [0, 1]; tables print
them as percentages.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pydantic import ValidationError
from rich.table import Table

from async_rl.evaluation.runner import RESULT_FORMAT, EvalInputError
from async_rl.records import EvalResult, one_line

# Settings that change the numbers: a comparison names those that differ.
COMPARED_SETTINGS = ("n", "temperature", "top_p", "top_k", "max_tokens", "rope_scaling", "instruction", "dtype")


def save_result(document: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, allow_nan=True) + "\n")
    return path


def load_result(path: str | Path) -> dict:
    """A result file written by ``async-rl eval --out``; one-line error for anything else."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvalInputError(f"{path}: no such result file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EvalInputError(f"{path}: not a readable JSON result file ({err})") from None
    if not isinstance(document, dict) or document.get("format") != RESULT_FORMAT:
        raise EvalInputError(f"{path}: not an async-rl eval result (expected format {RESULT_FORMAT!r})")
    try:
        EvalResult.model_validate(document)
    except ValidationError as err:
        raise EvalInputError(f"{path}: {one_line(err)}") from None
    return document


def percent(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{100 * value:.1f}"


def metric_columns(document: dict) -> list[tuple[str, str | None]]:
    """(header, k) per reported rate: avg@n, pass@k for each k, cons@n (k None = not pass@k)."""
    n = document["settings"]["n"]
    return [(f"avg@{n}", None), *((f"pass@{k}", str(k)) for k in document["ks"]), (f"cons@{n}", None)]


def metric_value(bench: dict, header: str, k: str | None) -> float:
    if k is not None:
        return bench["pass@k"][k]
    return bench["avg@n"] if header.startswith("avg@") else bench["cons@n"]


def summary_table(document: dict) -> Table:
    """One row per benchmark: the rates (in %), mean response length, share cut at max_tokens."""
    s = document["settings"]
    table = Table(title=f"{document['model']}  (n={s['n']}, T={s['temperature']}, top_p={s['top_p']}, "
                        f"top_k={s['top_k']}, max_tokens={s['max_tokens']})")
    columns = metric_columns(document)
    table.add_column("benchmark")
    table.add_column("problems", justify="right")
    for header, _ in columns:
        table.add_column(header, justify="right")
    table.add_column("mean tokens", justify="right")
    table.add_column("truncated %", justify="right")
    for bench in document["benchmarks"]:
        table.add_row(bench["name"], str(bench["problems"]),
                      *(percent(metric_value(bench, h, k)) for h, k in columns),
                      f"{bench['mean_response_tokens']:.0f}", percent(bench["truncated_fraction"]))
    return table


def problem_table(bench: dict, ks: list) -> Table:
    """Per-problem rows of one benchmark: correct/n, pass@max k, the majority answer and the reference."""
    top = str(max(ks))
    table = Table(title=bench["name"])
    for header in ("problem", "correct", f"pass@{top}", "majority answer", "votes", "reference", "mean tokens"):
        table.add_column(header, justify="left" if header in ("problem", "majority answer", "reference") else "right")
    for row in bench["per_problem"]:
        table.add_row(row["id"].removeprefix(f"{bench['name']}:"), f"{row['correct']}/{row['n']}", percent(row["pass@k"][top]),
                      _short(row["majority_answer"]), str(row["majority_votes"]), _short(row["answer"]),
                      f"{row['mean_tokens']:.0f}")
    return table


def _short(text: str | None, width: int = 24) -> str:
    if text is None:
        return "—"
    return text if len(text) <= width else text[: width - 1] + "…"


def settings_differences(a: dict, b: dict) -> list[str]:
    """``key: A → B`` for each setting that differs between two runs."""
    out = []
    for key in COMPARED_SETTINGS:
        left, right = a["settings"].get(key), b["settings"].get(key)
        if left != right:
            out.append(f"{key}: {left} → {right}")
    return out


def compare_table(a: dict, b: dict, *, names: tuple[str, str] = ("A", "B")) -> Table:
    """Benchmarks × rates of two runs side by side, with B − A in points and who solved what.

    Rates are matched by header (``pass@4`` with ``pass@4``); those only one run has show —.
    "only A / only B" count problems with at least one correct sample in one run but not the other.
    """
    table = Table(title=f"{names[0]} = {a['model']}   {names[1]} = {b['model']}")
    for header in ("benchmark", "metric", names[0], names[1], "Δ (points)"):
        table.add_column(header, justify="left" if header in ("benchmark", "metric") else "right")
    right = {bench["name"]: bench for bench in b["benchmarks"]}
    for bench in a["benchmarks"]:
        other = right.get(bench["name"])
        if other is None:
            table.add_row(bench["name"], "(only in A)", "", "", "")
            continue
        for header, left_value, right_value in _paired_metrics(a, bench, b, other):
            delta = "—" if left_value is None or right_value is None else f"{100 * (right_value - left_value):+.1f}"
            table.add_row(bench["name"], header, percent(left_value), percent(right_value), delta)
        only_a, only_b = solved_only(bench, other)
        table.add_row(bench["name"], "solved only by A / B", str(only_a), str(only_b), "", end_section=True)
    for name in right.keys() - {bench["name"] for bench in a["benchmarks"]}:
        table.add_row(name, "(only in B)", "", "", "")
    return table


def _paired_metrics(a: dict, bench_a: dict, b: dict, bench_b: dict):
    left = {h: metric_value(bench_a, h, k) for h, k in metric_columns(a)}
    right = {h: metric_value(bench_b, h, k) for h, k in metric_columns(b)}
    # Keep A's order, then B's extra columns; a different n gives avg@8 and avg@64 rows.
    for header in [*left, *(h for h in right if h not in left)]:
        yield header, left.get(header), right.get(header)


def solved_only(bench_a: dict, bench_b: dict) -> tuple[int, int]:
    """Problems (by id) with a correct sample in A but none in B, and the reverse."""
    solved_a = {row["id"] for row in bench_a["per_problem"] if row["correct"] > 0}
    solved_b = {row["id"] for row in bench_b["per_problem"] if row["correct"] > 0}
    return len(solved_a - solved_b), len(solved_b - solved_a)
