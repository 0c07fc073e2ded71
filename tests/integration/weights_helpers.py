"""Helpers for the weight transport tests: payloads, digests, and child processes.

Run as a script it is one side of a transfer in its own process, so a test can kill it
by PID mid-transfer:

    python weights_helpers.py subscriber ADDRESS CFG_JSON [hold]   # one JSON line per delivery;
                                                                   # hold: never return from it
    python weights_helpers.py publisher CFG_JSON VERSION SEED NBYTES   # prints its address
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import xxhash

HELPER = Path(__file__).resolve()
ROOT = HELPER.parents[2]


class Recorder:
    """An ``on_weights`` that keeps a copy of every set it is handed."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[tuple[str, torch.Tensor]]]] = []

    def __call__(self, version: int, named_tensors) -> None:
        self.calls.append((version, [(n, t.clone()) for n, t in named_tensors]))

    @property
    def versions(self) -> list[int]:
        return [v for v, _ in self.calls]


def assert_bit_exact(received, sent) -> None:
    assert [n for n, _ in received] == [n for n, _ in sent]
    for (name, got), (_, want) in zip(received, sent, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), name


def make_tensors(seed: int, nbytes: int, n_tensors: int = 8) -> list[tuple[str, torch.Tensor]]:
    """``n_tensors`` fp32 tensors of ``nbytes`` in total, determined by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    per = max(1, nbytes // 4 // n_tensors)
    return [(f"layer{i}.weight", torch.randn(per, generator=gen)) for i in range(n_tensors)]


def digest(named_tensors) -> str:
    """One hash over names, dtypes, shapes and bytes, in order."""
    h = xxhash.xxh3_128()
    for name, tensor in named_tensors:
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def spawn(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        [sys.executable, str(HELPER), *args], stdout=subprocess.PIPE, stdin=subprocess.PIPE,
        text=True, env=env,
    )


def read_json_line(proc: subprocess.Popen, timeout: float = 60.0) -> dict:
    """The child's next stdout line as JSON (the child flushes after each)."""
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError(f"child {proc.pid} printed nothing in {timeout}s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"child {proc.pid} exited with {proc.wait()}")
    return json.loads(line)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL a child this test started and reap it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def wait_until(predicate, timeout: float, interval: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def _emit(record: dict) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def _subscriber_main(address: str, cfg_json: str, mode: str = "") -> None:
    from async_rl.config import WeightsConfig
    from async_rl.weights import WeightSubscriber

    def on_weights(version, named_tensors):
        _emit({"version": version, "digest": digest(named_tensors)})
        if mode == "hold":  # keeps the version's /dev/shm file locked until we are killed
            time.sleep(3600)

    cfg = WeightsConfig.model_validate_json(cfg_json)
    with WeightSubscriber(address, on_weights, cfg):
        sys.stdin.read()  # until the test closes our stdin or kills us


def _publisher_main(cfg_json: str, version: str, seed: str, nbytes: str) -> None:
    from async_rl.config import WeightsConfig
    from async_rl.weights import WeightPublisher

    cfg = WeightsConfig.model_validate_json(cfg_json)
    tensors = make_tensors(int(seed), int(nbytes))
    with WeightPublisher(cfg) as publisher:
        publisher.publish(int(version), tensors)
        wait_until(lambda: publisher.stats()["latest"] == int(version), 60.0)
        _emit({"address": publisher.address, "digest": digest(tensors), "shm": publisher.stats()["shm"]})
        sys.stdin.read()


if __name__ == "__main__":
    role, *rest = sys.argv[1:]
    {"subscriber": _subscriber_main, "publisher": _publisher_main}[role](*rest)
