"""Learner checkpoints: save, keep the newest k, resume (on any number of ranks), HF export.

Layout under the checkpoint root::

    latest                      the newest complete tag (replaced atomically)
    step_00000040/
        ds/                     DeepSpeed's own checkpoint (exact resume, same ranks and stage)
        portable.safetensors    full fp32 master weights and Adam moments, by HF name
        learner_state.json      version, optimizer step, LR schedule, counters, caller's extra
                                state (the buffer cursor), world size and ZeRO stage

A tag is written into ``.incoming-<tag>`` and renamed into place only once every rank has
finished, so a crash mid-save never leaves a half checkpoint where resume would find it.
Resume uses DeepSpeed's checkpoint when the world size and ZeRO stage match, and otherwise
re-shards the portable state: every rank reads the full tensors and keeps its partition
(``safe_set_full_*``), so scaling learners from M to M' ranks keeps weights, moments,
step count and LR schedule. Nothing here unpickles data we wrote ourselves except through
DeepSpeed's own loader.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from safetensors.torch import load_file, save_file

from learners.engine import LearnerEngine

LATEST = "latest"
STATE_FILE = "learner_state.json"
PORTABLE_FILE = "portable.safetensors"
DS_DIR = "ds"
INCOMING = ".incoming-"
MOMENTS = ("exp_avg", "exp_avg_sq")
# Files of the source model folder that describe its tokenizer, copied into an HF export.
TOKENIZER_PREFIXES = ("tokenizer", "special_tokens_map", "chat_template", "vocab", "merges", "added_tokens")


@dataclass
class LearnerState:
    """What a resume restores besides tensors."""

    version: int
    optimizer_step: int = 0
    global_steps: int = 0
    skipped_steps: int = 0
    scheduler: dict = field(default_factory=dict)
    world_size: int = 1
    zero_stage: int = 0
    extra: dict = field(default_factory=dict)  # e.g. {"buffer_cursor": ...}


def tag_for(version: int) -> str:
    return f"step_{version:08d}"


def version_of(tag: str) -> int:
    """The inverse of :func:`tag_for`."""
    return int(tag.rsplit("_", 1)[1])


def latest_tag(root: Path) -> str | None:
    marker = Path(root) / LATEST
    if not marker.is_file():
        return None
    tag = marker.read_text().strip()
    return tag if (Path(root) / tag / STATE_FILE).is_file() else None


def save(engine: LearnerEngine, root: Path, *, version: int, extra: dict | None = None, keep: int = 2) -> Path:
    """Write a checkpoint of ``engine`` at policy ``version`` (collective: every rank calls)."""
    root = Path(root)
    tag = tag_for(version)
    incoming = root / f"{INCOMING}{tag}"
    if engine.dist.rank == 0:
        shutil.rmtree(incoming, ignore_errors=True)
        incoming.mkdir(parents=True)
    engine.barrier()
    state = capture_state(engine, version, extra or {})
    tensors = portable_tensors(engine)
    engine.save_checkpoint(incoming / DS_DIR, "ds", client_state={"learner_version": version})
    if engine.dist.rank == 0:
        save_file(tensors, str(incoming / PORTABLE_FILE))
        write_json_atomic(incoming / STATE_FILE, state.__dict__)
    engine.barrier()
    if engine.dist.rank == 0:
        publish(root, incoming, tag)
        prune(root, keep)
    engine.barrier()
    return root / tag


def publish(root: Path, incoming: Path, tag: str) -> None:
    final = root / tag
    if final.exists():
        shutil.rmtree(final)
    os.replace(incoming, final)
    write_text_atomic(root / LATEST, tag)
    fsync_dir(root)


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete tags (never the one ``latest`` names)."""
    current = latest_tag(root)
    tags = sorted(p.name for p in root.glob("step_*") if (p / STATE_FILE).is_file())
    for name in tags[: max(0, len(tags) - keep)]:
        if name != current:
            shutil.rmtree(root / name, ignore_errors=True)


def capture_state(engine: LearnerEngine, version: int, extra: dict) -> LearnerState:
    return LearnerState(
        version=version,
        optimizer_step=optimizer_step(engine),
        global_steps=engine.global_steps,
        skipped_steps=engine.skipped_steps,
        scheduler=json_safe(engine.scheduler.state_dict()),
        world_size=engine.dist.world_size,
        zero_stage=engine.cfg.zero_stage,
        extra=extra,
    )


# ----------------------------------------------------------------------------- resume


def resume(engine: LearnerEngine, root: Path, tag: str | None = None) -> LearnerState | None:
    """Restore the newest (or the given) checkpoint into ``engine``; None if there is none."""
    root = Path(root)
    tag = tag or latest_tag(root)
    if tag is None:
        return None
    state = LearnerState(**json.loads((root / tag / STATE_FILE).read_text()))
    same_layout = state.world_size == engine.dist.world_size and state.zero_stage == engine.cfg.zero_stage
    if same_layout:
        engine.load_checkpoint(root / tag / DS_DIR, "ds")
    else:
        load_portable(engine, root / tag / PORTABLE_FILE, state)
    engine.engine.global_steps = state.global_steps
    engine.engine.skipped_steps = state.skipped_steps
    engine.barrier()
    return state


def load_portable(engine: LearnerEngine, path: Path, state: LearnerState) -> None:
    """Re-shard full fp32 weights and Adam moments onto this engine's ranks and stage."""
    tensors = load_file(str(path))
    opt = basic_optimizer(engine)
    engine.link_optimizer_state()
    for name, param in engine.named_weights():
        master = tensors[f"master/{name}"]
        with engine.gathered([param], modify=True):
            param.data.copy_(master.to(param.device, param.dtype))
        moments = {k: tensors[f"{k}/{name}"] for k in MOMENTS}
        if safe_get_full_fp32_param(param) is not None:
            safe_set_full_fp32_param(param, master.to(engine.device))
            for key, value in moments.items():
                safe_set_full_optimizer_state(param, value.to(engine.device), key)
        else:  # ZeRO-0: the client optimizer holds full tensors itself
            opt.state[param] = {k: v.to(param.device) for k, v in moments.items()}
    set_optimizer_step(opt, state.optimizer_step)
    engine.scheduler.load_state_dict(state.scheduler)
    for group, lr in zip(opt.param_groups, engine.scheduler.get_last_lr(), strict=True):
        group["lr"] = lr


# ----------------------------------------------------------------------------- portable tensors


def portable_tensors(engine: LearnerEngine) -> dict[str, torch.Tensor]:
    """Full fp32 master weights and Adam moments by HF name (collective under ZeRO-3)."""
    opt = basic_optimizer(engine)
    engine.link_optimizer_state()
    out: dict[str, torch.Tensor] = {}
    for name, param in engine.named_weights():
        master = safe_get_full_fp32_param(param)
        if master is None:
            state = opt.state.get(param, {})
            master = param.detach().float()
            moments = {k: state.get(k, torch.zeros_like(master)) for k in MOMENTS}
        else:
            moments = {k: safe_get_full_optimizer_state(param, k) for k in MOMENTS}
        out[f"master/{name}"] = master.detach().float().cpu().contiguous()
        for key, value in moments.items():
            value = torch.zeros_like(master) if value is None else value
            out[f"{key}/{name}"] = value.detach().float().cpu().contiguous()
    return out


def basic_optimizer(engine: LearnerEngine) -> torch.optim.Optimizer:
    return engine.basic_optimizer()


def optimizer_step(engine: LearnerEngine) -> int:
    for state in basic_optimizer(engine).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def set_optimizer_step(opt: torch.optim.Optimizer, step: int) -> None:
    for state in opt.state.values():
        state["step"] = torch.tensor(float(step))


# ----------------------------------------------------------------------------- HF export


def export_hf(engine: LearnerEngine, out_dir: Path) -> Path:
    """``save_pretrained`` of the current weights plus the source folder's tokenizer files, so
    transformers and vLLM load the result (collective: every rank calls, rank 0 writes)."""
    out_dir = Path(out_dir)
    incoming = out_dir.with_name(f"{INCOMING}{out_dir.name}")
    with engine.gathered_model() as model:
        if engine.dist.rank == 0:
            shutil.rmtree(incoming, ignore_errors=True)
            model.save_pretrained(str(incoming), safe_serialization=True)
    if engine.dist.rank == 0:
        copy_side_files(engine.model_path, incoming)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(incoming, out_dir)
    engine.barrier()
    return out_dir


def copy_side_files(src: Path, dst: Path) -> None:
    for item in Path(src).iterdir():
        if item.is_file() and item.name.startswith(TOKENIZER_PREFIXES) and not (dst / item.name).exists():
            shutil.copy2(item, dst / item.name)


# ----------------------------------------------------------------------------- files


def json_safe(value):
    """Scheduler state → JSON (tensors become numbers, callables are not state)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return None


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
