"""Shared fixtures: one tiny model per test session, the benchmark scripts as modules; GPU-marked
tests skip without CUDA."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


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


def listening_ips(root_pid: int) -> dict[str, str]:
    """{"ip:port": process name} of every listening TCP socket of ``root_pid`` and its descendants."""
    import psutil

    root = psutil.Process(root_pid)
    procs = {p.pid: p for p in [root, *root.children(recursive=True)]}
    out = {}
    for conn in psutil.net_connections("inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in procs:
            try:
                name = procs[conn.pid].name()
            except psutil.NoSuchProcess:
                name = "?"
            out[f"{conn.laddr.ip}:{conn.laddr.port}"] = name
    return out


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, and IPv4-mapped loopback (::ffff:127.0.0.1)."""
    import ipaddress

    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


@pytest.fixture
def exposed_listeners():
    """``exposed_listeners(pid)``: the listening sockets under ``pid`` bound beyond loopback."""

    def exposed(root_pid: int) -> dict[str, str]:
        return {addr: name for addr, name in listening_ips(root_pid).items() if not is_loopback(addr.rsplit(":", 1)[0])}

    return exposed


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark(name)``: ``benchmarks/NAME.py`` as a module (loaded once per session), for
    tests of a benchmark's pure logic; its sibling modules (``_common``) import as they do there."""
    loaded: dict[str, object] = {}
    sys.path.insert(0, str(BENCHMARKS))

    def load(name: str):
        if name not in loaded:
            spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses resolve their annotations through it
            spec.loader.exec_module(module)
            loaded[name] = module
        return loaded[name]

    yield load
    for name in loaded:
        sys.modules.pop(name, None)
