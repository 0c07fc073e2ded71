"""Preparing a run folder: resolved config, the model, and the prompt data.

Everything here is cached in the run folder so a second run reuses it:

    RUN_DIR/config.yaml          the resolved config
    RUN_DIR/model/               the tiny model + tokenizer (when model.path is null)
    RUN_DIR/data/train.parquet   prompts (synthetic) — or the user's file, validated
    RUN_DIR/data/heldout.parquet
    RUN_DIR/data/sft.parquet     prompt + worked solution rows for the SFT warm start
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from async_rl.config import Config, DataConfig
from async_rl.config_io import dump_config
from async_rl.model import ensure_model
from async_rl.tasks import arith
from async_rl.tasks.dataset import LoadReport, load_rows, write_rows

SPEC_FILE = "synth_spec.json"


@dataclass
class PreparedRun:
    run_dir: Path
    model_dir: Path
    model_built: bool
    data: dict[str, Path] = field(default_factory=dict)
    reports: dict[str, LoadReport] = field(default_factory=dict)
    data_built: bool = False


def prepare_run(cfg: Config) -> PreparedRun:
    """Everything the job needs on disk; user errors (a missing model or data file) are
    raised before the run folder is created or touched."""
    run_dir = cfg.run_dir
    if cfg.model.path is not None:
        ensure_model(cfg.model.path, run_dir, size=cfg.model.size, seed=cfg.model.seed)
    for split in ("train", "heldout"):
        source = getattr(cfg.data, split)
        if source != "synthetic" and not Path(source).is_file():
            raise FileNotFoundError(f"data.{split}={source}: no such file (expected .parquet or .jsonl)")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    model_dir, built = ensure_model(cfg.model.path, run_dir, size=cfg.model.size, seed=cfg.model.seed)
    prepared = PreparedRun(run_dir=run_dir, model_dir=model_dir, model_built=built)
    prepared.data_built = _prepare_synthetic(cfg.data, run_dir / "data")
    for split in ("train", "heldout"):
        source = getattr(cfg.data, split)
        path = run_dir / "data" / f"{split}.parquet" if source == "synthetic" else Path(source)
        _, report = load_rows(path)
        prepared.data[split] = path
        prepared.reports[split] = report
    if cfg.data.train == "synthetic":
        prepared.data["sft"] = run_dir / "data" / "sft.parquet"
    return prepared


def synth_spec(data: DataConfig) -> arith.ArithSpec:
    s = data.synth
    return arith.ArithSpec(s.min_digits, s.max_digits, s.min_terms, s.max_terms, tuple(s.ops))


def _prepare_synthetic(data: DataConfig, out: Path) -> bool:
    """Write the synthetic splits unless the folder already holds the same spec."""
    if "synthetic" not in (data.train, data.heldout):
        return False
    key = _spec_key(data)
    marker = out / SPEC_FILE
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        return False
    spec, s = synth_spec(data), data.synth
    train = arith.make_rows(spec, s.n_train, seed=data.seed, split="train", system_prompt=data.system_prompt)
    seen = {row["extra_info"]["expression"] for row in train}
    heldout = arith.make_rows(
        spec, s.n_heldout, seed=data.seed, split="heldout", exclude=seen, system_prompt=data.system_prompt
    )
    seen |= {row["extra_info"]["expression"] for row in heldout}
    sft = arith.make_rows(
        spec, s.n_sft, seed=data.seed, split="sft", exclude={r["extra_info"]["expression"] for r in heldout},
        system_prompt=data.system_prompt, with_solution=True, slip_rate=s.slip_rate,
    )
    for name, rows in (("train", train), ("heldout", heldout), ("sft", sft)):
        if not rows:
            raise ValueError(f"data.synth: the spec admits no {name} problems; widen digits or terms")
        write_rows(rows, out / f"{name}.parquet")
    marker.write_text(json.dumps({"key": key, "spec": data.synth.model_dump(), "seed": data.seed}))
    return True


def _spec_key(data: DataConfig) -> str:
    payload = json.dumps([data.synth.model_dump(), data.seed, data.system_prompt], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
