"""Weight sets on their way into vLLM: a safetensors file, and the rule for partial sets.

Weights cross vLLM's ``collective_rpc`` as a *file path* (never tensors: the engine-core
channel would have to pickle them). The file is plain safetensors — an 8-byte little-endian
header length, a JSON header ``{name: {dtype, shape, data_offsets}}``, then raw bytes — written
here tensor by tensor so no second in-memory copy of the model is made (the subscriber hands
out views of one receive buffer, which ``safetensors.torch.save`` refuses as shared storage).

vLLM reloads in place layer by layer: a layer is processed once every tensor it owns has
arrived, and a layer that got only part of its tensors is rebuilt with the rest
*uninitialised*. A fused layer (``qkv_proj`` ← q/k/v, ``gate_up_proj`` ← gate/up) therefore
needs all of its checkpoint tensors in the same call; :func:`check_weight_set` enforces that.
"""

from __future__ import annotations

import json
import re
import struct
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
# safetensors requires the data section to start 8-byte aligned; the header is space-padded.
HEADER_ALIGN = 8
# Checkpoint projections vLLM fuses into one layer: (pattern, fused layer name).
FUSED_PROJECTIONS = (
    (re.compile(r"\.(q_proj|k_proj|v_proj)\."), ".qkv_proj."),
    (re.compile(r"\.(gate_proj|up_proj)\."), ".gate_up_proj."),
)
# Tied-embedding models have no separate LM head in vLLM; a learner's state_dict may still
# list it, and vLLM's loader skips it.
TIED_HEAD = "lm_head.weight"


def write_safetensors(path: Path, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> Path:
    """Write ``named_tensors`` (CPU or GPU, any strides) as one safetensors file at ``path``."""
    header: dict[str, dict] = {}
    offset = 0
    for name, tensor in named_tensors:
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"weight {name}: dtype {tensor.dtype} has no safetensors code")
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % HEADER_ALIGN)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for _, tensor in named_tensors:
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            out.write(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return path


def read_tensor_names(path: Path) -> list[str]:
    """Tensor names in a safetensors file (header only)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return [name for name in header if name != "__metadata__"]


def checkpoint_names(model_dir: Path) -> list[str]:
    """Every tensor name of an HF model folder's safetensors shards."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files (expected an HF model folder)")
    return [name for file in files for name in read_tensor_names(file)]


def fused_layer(name: str) -> str:
    """The vLLM layer a checkpoint tensor loads into: ``...q_proj.weight`` → ``...qkv_proj``."""
    module = name.rsplit(".", 1)[0]
    for pattern, fused in FUSED_PROJECTIONS:
        module = pattern.sub(fused, module + ".").rstrip(".")
    return module


def check_weight_set(names: Iterable[str], reference: Iterable[str]) -> None:
    """Raise ValueError unless ``names`` is a loadable update of a model with ``reference`` names.

    A loadable update names only known tensors (plus a tied LM head) and, for every vLLM layer
    it touches, every checkpoint tensor of that layer (whole fused groups).
    """
    names, reference = set(names), set(reference)
    unknown = sorted(names - reference - {TIED_HEAD})
    if unknown:
        raise ValueError(f"weight set: unknown tensor(s) {unknown[:5]} (not in the model checkpoint)")
    members: dict[str, set[str]] = defaultdict(set)
    for name in reference:
        members[fused_layer(name)].add(name)
    touched = {fused_layer(name) for name in names if name in reference}
    partial = {layer: sorted(members[layer] - names) for layer in touched if members[layer] - names}
    if partial:
        layer, missing = sorted(partial.items())[0]
        raise ValueError(
            f"weight set: layer {layer} is only partly updated (missing {missing}); vLLM reloads a "
            "layer from all of its tensors, so send whole fused groups (q/k/v, gate/up, weight+bias)"
        )
    if not touched:
        raise ValueError("weight set: no tensor of the model")
