"""Shared fixtures: one tiny model per test session; GPU-marked tests skip without CUDA."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # the install check test reports a missing torch loudly
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU (CUDA not available)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny local model (seed 0), built once per test session."""
    from async_rl.model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), size="tiny", seed=0)
