"""The vLLM adapter: the only module of the project that imports vLLM.

``VllmEngine`` wraps vLLM's ``AsyncLLM`` (continuous batching: every ``generate`` call is one
request joining the running batch) and adds what RL needs:

* **Behaviour logprobs.** vLLM runs with ``logprobs_mode="processed_logprobs"``: the logprob
  of each sampled token under the distribution it was actually sampled from — logits divided
  by the temperature, then top-k/top-p masking, then log-softmax. With the default
  ``top_p=1, top_k=-1`` that is exactly the learner's ``log_softmax(logits / T)``
  (``learners/logprobs.py``); with truncation it is the truncated μ, which the importance
  ratio needs. fp32 on CPU matches a transformers forward to ~1e-6.
* **Per-token weight versions.** The engine labels every step with its weight version
  (``update_weight_version``); a finished completion carries version spans, expanded here to
  one version per token, so a response generated across an update carries both versions.
* **In-flight weight updates.** ``update_weights`` stages the set as a safetensors file, then
  ``pause_generation(mode="keep")`` → ``collective_rpc("load_weights_file", path)`` (the
  worker extension in ``worker_ext.py``) → new version label → ``resume_generation()``.
  Running requests are frozen, not dropped. ``recompute_kv_on_update`` chooses whether their
  KV cache is recomputed under the new weights (``clear_cache=True``) or kept. Requests carry
  ``cache_salt = weight version``, so a request submitted after an update never reuses
  prefix-cache blocks computed by older weights, and the prefix cache is reset after a load.
* **Long context.** ``max_model_len`` and RoPE scaling (YaRN …) go to vLLM as HF overrides.

An engine belongs to the asyncio loop that started it: call its coroutines on that loop
(``actors/aio.py`` runs one in a thread for synchronous callers).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from actors.weight_file import check_weight_set, checkpoint_names, write_safetensors
from async_rl.config import ActorsConfig, ModelConfig
from async_rl.seeds import SeedWindows, derive_seed

log = logging.getLogger(__name__)

WORKER_EXTENSION = "actors.worker_ext.WeightReloadExtension"
# The learner's logprobs are log_softmax(logits / T); vLLM's processed logprobs are the same
# distribution (plus top-k/top-p truncation when configured), see the module docstring.
LOGPROBS_MODE = "processed_logprobs"
GIB = 1 << 30
# Staging weight files in RAM avoids a disk round-trip; fall back to the work folder.
SHM_DIR = Path("/dev/shm")
# Staged weight files: PREFIX + "<actor pid>-<8 hex>.safetensors", deleted after each load; an
# actor killed mid-update leaves its file behind, and the next engine on the machine removes it.
STAGING_PREFIX = "async-rl-weights-"
STAGING_NAME = re.compile(re.escape(STAGING_PREFIX) + r"(\d+)-[0-9a-f]{8}\.safetensors")
# A unix socket path must fit sockaddr_un.sun_path (108 bytes with the NUL); vLLM appends
# "/<uuid4>" (37 characters) to VLLM_RPC_BASE_PATH for each IPC socket.
MAX_RPC_DIR_CHARS = 107 - 37


@dataclass(frozen=True)
class Sample:
    """One generated response. ``token_ids``, ``logprobs`` and ``versions`` have equal length T."""

    token_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: str
    text: str


@dataclass(frozen=True)
class UpdateReport:
    """Timings of one weight update, in seconds (``total_s`` = verified → serving new weights)."""

    version: int
    tensors: int
    staged_s: float
    paused_s: float
    total_s: float


def rpc_dir_for(work_dir: Path) -> tuple[Path, bool]:
    """Where vLLM's IPC sockets go: ``work_dir/vllm-rpc``, or a short temporary folder when
    that path is too long for a unix socket. Returns ``(path, is_temporary)``."""
    preferred = Path(work_dir).resolve() / "vllm-rpc"
    if len(str(preferred)) <= MAX_RPC_DIR_CHARS:
        return preferred, False
    return Path(tempfile.mkdtemp(prefix="arl-rpc-")), True


def configure_vllm_env(cfg: ActorsConfig, rpc_dir: Path) -> None:
    """Set the environment vLLM reads at engine start (users never set these themselves)."""
    os.environ["VLLM_HOST_IP"] = "127.0.0.1"
    rpc_dir.mkdir(parents=True, exist_ok=True)
    os.environ["VLLM_RPC_BASE_PATH"] = str(rpc_dir)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if cfg.multiprocess_engine else "0"
    # The legacy variable holds whole GiB and overrides the engine argument; a fractional
    # size is passed as kv_cache_memory_bytes only.
    if float(cfg.kv_cache_gib).is_integer():
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(cfg.kv_cache_gib))
    else:
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")


def rope_overrides(hf_config: dict, rope_scaling: dict | None) -> dict:
    """HF config overrides that turn on ``rope_scaling`` (YaRN, linear, dynamic …).

    The base ``rope_theta`` is kept. For YaRN-style types ``max_position_embeddings`` becomes
    ``original × factor`` (vLLM and transformers expect it already scaled), e.g. 32768 × 2.5
    = 81920 for the Klear evaluation.
    """
    if not rope_scaling:
        return {}
    base = dict(hf_config.get("rope_parameters") or {})
    theta = base.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    params = {"rope_theta": theta, **rope_scaling}
    params.setdefault("rope_type", params.pop("type", "default"))
    overrides: dict = {"rope_parameters": params}
    factor = params.get("factor")
    if params["rope_type"] in ("yarn", "longrope", "llama3") and factor:
        original = params.setdefault(
            "original_max_position_embeddings", hf_config.get("max_position_embeddings")
        )
        overrides["max_position_embeddings"] = int(math.ceil(original * factor))
    return overrides


def engine_args(model_dir: Path, actors: ActorsConfig, model: ModelConfig):
    """vLLM ``AsyncEngineArgs`` for one actor."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    hf_config = json.loads((Path(model_dir) / "config.json").read_text())
    on_gpu = torch.cuda.is_available()
    return AsyncEngineArgs(
        model=str(model_dir),
        dtype=model.dtype,
        max_model_len=model.max_model_len,
        hf_overrides=rope_overrides(hf_config, model.rope_scaling),
        enforce_eager=actors.enforce_eager,
        seed=actors.seed if actors.seed is not None else 0,
        enable_prefix_caching=True,
        # vLLM-CPU crashes ("CPU Generator does not use offset") when a partially prefilled
        # request with a seeded generator is discarded; without chunked prefill none is.
        enable_chunked_prefill=False,
        logprobs_mode=LOGPROBS_MODE,
        worker_extension_cls=WORKER_EXTENSION,
        gpu_memory_utilization=actors.gpu_memory_utilization,
        kv_cache_memory_bytes=None if on_gpu else int(actors.kv_cache_gib * GIB),
        disable_log_stats=True,
    )


def expand_versions(spans, n_tokens: int, fallback: int) -> list[int]:
    """One int version per token from vLLM's ``WeightVersionSpan`` list (None → ``fallback``)."""
    versions = [fallback] * n_tokens
    for span in spans or ():
        try:
            label = int(span.version)
        except ValueError:  # "default": produced before the first label was set
            label = fallback
        versions[span.start : min(span.end, n_tokens)] = [label] * (min(span.end, n_tokens) - span.start)
    return versions


def sampled_logprobs(token_ids: Sequence[int], steps) -> list[float]:
    """The logprob of each sampled token from vLLM's per-step logprobs: a list of per-step maps,
    or (``flat_logprobs``) a ``FlatLogprobs`` whose step i spans ``start_indices[i]:end_indices[i]``
    of its flat lists."""
    if steps is None or len(steps) != len(token_ids):
        raise RuntimeError("vLLM returned no logprob for some sampled tokens (logprobs=0 not honoured)")
    if not hasattr(steps, "start_indices"):
        return [float(step[token].logprob) for token, step in zip(token_ids, steps, strict=True)]
    ids, values, out = steps.token_ids, steps.logprobs, []
    for token, start, end in zip(token_ids, steps.start_indices, steps.end_indices, strict=True):
        at = next((j for j in range(start, end) if ids[j] == token), None)
        if at is None:
            raise RuntimeError(f"vLLM returned no logprob for sampled token {token}")
        out.append(float(values[at]))
    return out


def sweep_stale_staging(staging_dir: Path) -> list[Path]:
    """Remove staged weight files whose actor process is gone; returns what was removed."""
    removed = []
    for path in Path(staging_dir).glob(f"{STAGING_PREFIX}*.safetensors"):
        match = STAGING_NAME.fullmatch(path.name)
        if match and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.info("removed %d staged weight file(s) of dead actors from %s", len(removed), staging_dir)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class VllmEngine:
    """An ``AsyncLLM`` with behaviour logprobs, weight versions and in-flight weight updates."""

    def __init__(self, llm, actors: ActorsConfig, model_dir: Path, staging_dir: Path, version: int):
        self._llm = llm
        self._cfg = actors
        self.model_dir = Path(model_dir)
        self._staging_dir = staging_dir
        sweep_stale_staging(staging_dir)
        self._reference_names = checkpoint_names(self.model_dir)
        self._seeds: SeedWindows | None = None
        self.reseed()
        self._update_lock = asyncio.Lock()
        self._temporary_dirs: list[Path] = []
        self._loop = asyncio.get_running_loop()
        self.version = version
        self.tokenizer = llm.get_tokenizer()

    @classmethod
    async def start(
        cls, model_dir: Path | str, actors: ActorsConfig, model: ModelConfig, *,
        work_dir: Path | str | None = None, version: int = 0,
    ) -> VllmEngine:
        """Start vLLM on the running event loop (blocks it for the engine start)."""
        work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="async-rl-vllm-"))
        rpc_dir, temporary = rpc_dir_for(work)
        configure_vllm_env(actors, rpc_dir)
        from vllm.v1.engine.async_llm import AsyncLLM

        llm = AsyncLLM.from_engine_args(engine_args(Path(model_dir), actors, model))
        staging = SHM_DIR if SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK) else work / "weights"
        engine = cls(llm, actors, Path(model_dir), staging, version)
        engine._temporary_dirs = [rpc_dir] if temporary else []
        await llm.update_weight_version(str(version))
        return engine

    # ------------------------------------------------------------------ generation

    async def generate(
        self, prompt_token_ids: Sequence[int], *, n: int | None = None, max_tokens: int | None = None,
        greedy: bool = False,
    ) -> list[Sample]:
        """Sample ``n`` responses to one tokenised prompt (defaults: ``n_samples_per_prompt``,
        ``max_tokens`` of the config); ``greedy`` decodes at temperature 0 (held-out evaluation)."""
        from vllm.sampling_params import RequestOutputKind

        params = self.sampling_params(n or self._cfg.n_samples_per_prompt)
        if max_tokens is not None:
            params.max_tokens = max_tokens
        if greedy:
            params.temperature, params.top_p, params.top_k = 0.0, 1.0, -1
        params.output_kind = RequestOutputKind.FINAL_ONLY
        prompt = {"prompt_token_ids": list(prompt_token_ids), "cache_salt": f"w{self.version}"}
        submitted_at = self.version
        final = None
        async for output in self._llm.generate(prompt, params, request_id=uuid.uuid4().hex):
            final = output
        if final is None:
            raise RuntimeError("vLLM finished a request without output")
        return [self._sample(c, submitted_at, params.detokenize) for c in sorted(final.outputs, key=lambda c: c.index)]

    def reseed(self, *stream: object) -> None:
        """Sample from the stream named by ``stream`` from now on (e.g. the job's seed and the
        actor's id); without a configured ``actors.seed`` sampling stays unseeded."""
        if self._cfg.seed is not None:
            self._seeds = SeedWindows(derive_seed("sampling", self._cfg.seed, *stream))

    def sampling_params(self, n: int):
        """vLLM ``SamplingParams`` from the config: one logprob per sampled token; every sample
        draws from its own seed (``SeedWindows``)."""
        from vllm import SamplingParams

        cfg = self._cfg
        seed = self._seeds.take(n) if self._seeds is not None else None
        # Without stop strings vLLM need not detokenize token by token (nor decode each logprob's
        # token): the text is decoded once per finished sample (``_sample``), and the logprobs come
        # flat, a few lists per request instead of a dict and an object per token.
        stop = list(cfg.stop) or None
        return SamplingParams(
            n=n, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
            max_tokens=cfg.max_tokens, stop=stop, seed=seed, logprobs=0, flat_logprobs=True,
            detokenize=stop is not None,
        )

    def _sample(self, completion, submitted_at: int, detokenized: bool) -> Sample:
        tokens = list(completion.token_ids)
        text = completion.text if detokenized else self.decode(tokens)
        return Sample(
            token_ids=tokens,
            logprobs=sampled_logprobs(tokens, completion.logprobs),
            versions=expand_versions(completion.weight_versions, len(tokens), submitted_at),
            finish_reason=str(completion.finish_reason),
            text=text,
        )

    def decode(self, token_ids: Sequence[int]) -> str:
        """A sample's text: its tokens decoded at once, special tokens skipped. vLLM's
        incremental detokenizer gives the same text, except for a tail that does not decode to
        whole characters, which it drops at the end and this keeps as U+FFFD."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    @property
    def max_model_len(self) -> int:
        return self._llm.model_config.max_model_len

    def num_unfinished(self) -> int:
        """Requests the engine holds (running, waiting or paused)."""
        return self._llm.get_num_unfinished_requests()

    # ------------------------------------------------------------------ weights

    async def update_weights(
        self, version: int, named_tensors: Sequence[tuple[str, torch.Tensor]]
    ) -> UpdateReport:
        """Load a verified weight set as ``version`` without stopping running requests.

        ``named_tensors`` is one complete set, or whole fused groups of it; the tensors are
        copied before this returns (they may be views of a receive buffer).
        """
        if version <= self.version:
            raise ValueError(f"weight version {version} must exceed the loaded one ({self.version})")
        start = time.perf_counter()
        check_weight_set((name for name, _ in named_tensors), self._reference_names)
        path = self._staging_dir / f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors"
        await asyncio.to_thread(write_safetensors, path, named_tensors)
        staged = time.perf_counter()
        try:
            async with self._update_lock:
                reply = await self._load_paused(str(path), version)
        finally:
            path.unlink(missing_ok=True)
        done = time.perf_counter()
        report = UpdateReport(version, reply["tensors"], staged - start, done - staged, done - start)
        log.info("weights v%d serving: %d tensors, staged %.1f ms, paused %.1f ms, total %.1f ms",
                 version, report.tensors, 1e3 * report.staged_s, 1e3 * report.paused_s, 1e3 * report.total_s)
        return report

    async def _load_paused(self, path: str, version: int) -> dict:
        recompute = self._cfg.recompute_kv_on_update
        await self._llm.pause_generation(mode="keep", clear_cache=recompute)
        try:
            replies = await self._llm.collective_rpc("load_weights_file", args=(path,))
            await self._llm.update_weight_version(str(version))
            self.version = version
            if not recompute:
                # Frees old-weight prefix blocks when nothing is running; the cache salt keeps
                # new requests off them either way.
                await self._llm.reset_prefix_cache()
        finally:
            await self._llm.resume_generation()
        return replies[0]

    async def weight_checksums(self) -> list[dict[str, str]]:
        """vLLM's per-parameter checksums of the loaded weights (tests and diagnostics)."""
        return await self._llm.compute_weight_checksums()

    # ------------------------------------------------------------------ lifecycle

    def shutdown(self) -> None:
        """Stop the engine-core process(es) and remove their socket folder; safe to call twice."""
        if self._llm is not None:
            # Stop reading outputs first, so the engine-core exit is not reported as a crash.
            handler = getattr(self._llm, "output_handler", None)
            if handler is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(handler.cancel)
            self._llm.shutdown()
            self._llm = None
        for folder in self._temporary_dirs:
            shutil.rmtree(folder, ignore_errors=True)
        self._temporary_dirs = []
