"""vLLM's default multi-process AsyncLLM (engine core and worker in their own processes):
generation and a weight update crossing two process boundaries through ``collective_rpc``."""

from __future__ import annotations

import psutil
from safetensors.torch import load_file

from actors.aio import BackgroundLoop
from actors.engine import VllmEngine
from actors.prompts import encode_prompt
from async_rl.config import ActorsConfig, ModelConfig
from async_rl.model import build_tiny_model


def test_multiprocess_engine_generates_and_reloads_weights_in_its_worker(tiny_model_dir, tmp_path):
    other = build_tiny_model(tmp_path / "seed1", size="tiny", seed=1)
    cfg = ActorsConfig(n_samples_per_prompt=1, max_tokens=8, temperature=0.0, multiprocess_engine=True)
    loop = BackgroundLoop()
    engine = loop.run(VllmEngine.start(tiny_model_dir, cfg, ModelConfig(max_model_len=128), work_dir=tmp_path / "w"))
    try:
        children = {p.name() for p in psutil.Process().children(recursive=True)}
        assert any("EngineCore" in name for name in children)
        assert any("Worker" in name for name in children)  # the worker runs apart from the core
        prompt = encode_prompt(engine.tokenizer, [{"role": "user", "content": "What is 2+2?"}])
        greedy_before = loop.run(engine.generate(prompt)) + loop.run(engine.generate(prompt))
        report = loop.run(engine.update_weights(1, list(load_file(str(other / "model.safetensors")).items())))
        greedy_after = loop.run(engine.generate(prompt))
        reload_back = loop.run(engine.update_weights(2, list(load_file(str(tiny_model_dir / "model.safetensors")).items())))
        greedy_back = loop.run(engine.generate(prompt))
    finally:
        engine.shutdown()
        loop.close()
    assert report.tensors == reload_back.tensors == 50
    assert greedy_before[0].token_ids == greedy_before[1].token_ids  # temperature 0: greedy
    assert greedy_after[0].token_ids != greedy_before[0].token_ids  # the new weights decide
    assert greedy_back[0].token_ids == greedy_before[0].token_ids  # and loading back restores
    assert greedy_after[0].versions == [1] * len(greedy_after[0].token_ids)
