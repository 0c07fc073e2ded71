"""Weight publishing over real ZeroMQ sockets (tcp loopback and ipc) and /dev/shm, in one process."""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path

import pytest
import torch
from weights_helpers import Recorder, assert_bit_exact, make_tensors

from async_rl.config import WeightsConfig
from async_rl.weights import WeightPublisher, WeightSubscriber

WAIT_S = 60.0


@pytest.fixture(scope="module")
def model_state() -> list[tuple[str, torch.Tensor]]:
    """A real (tiny) Qwen2 causal LM's state dict, plus bf16, int and bool tensors."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    state = list(Qwen2ForCausalLM(config).state_dict().items())
    return state + [
        ("extra.bf16", torch.randn(33, 7).to(torch.bfloat16)),
        ("extra.int64", torch.arange(-5, 6)),
        ("extra.bool", torch.tensor([True, False, True])),
        ("extra.scalar", torch.tensor(3.5)),
        ("extra.transposed", torch.randn(5, 9).t()),
    ]


@pytest.fixture(params=["tcp", "ipc", "shm"])
def cfg(request):
    if request.param != "ipc":
        yield WeightsConfig(chunk_bytes=64 << 10, transport=request.param)
        return
    with tempfile.TemporaryDirectory(dir="/tmp") as short:  # ipc paths must stay short
        yield WeightsConfig(chunk_bytes=64 << 10, transport="tcp", endpoint=f"ipc://{Path(short) / 'w.sock'}")


def test_real_model_state_dict_round_trips_bit_exact(model_state, cfg):
    got = Recorder()
    with WeightPublisher(cfg) as publisher, WeightSubscriber(publisher.address, got, cfg):
        publisher.publish(1, model_state)
        assert publisher.address.startswith(cfg.endpoint or "tcp://127.0.0.1:")
        with WeightSubscriber(publisher.address, got, cfg) as sub:
            assert sub.wait_for(1, WAIT_S)
    assert len(got.calls) >= 1
    for version, received in got.calls:
        assert version == 1
        assert_bit_exact(received, model_state)


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_late_joiner_gets_only_the_current_version(transport):
    cfg = WeightsConfig(chunk_bytes=16 << 10, transport=transport)
    got = Recorder()
    with WeightPublisher(cfg) as publisher:
        for version in (1, 2, 5):
            publisher.publish(version, make_tensors(version, 256 << 10))
        with WeightSubscriber(publisher.address, got, cfg) as sub:
            assert sub.wait_for(5, WAIT_S)
            assert sub.version == 5
        with pytest.raises(ValueError, match="must exceed"):
            publisher.publish(5, make_tensors(5, 1024))
    assert got.versions == [5]
    assert_bit_exact(got.calls[0][1], make_tensors(5, 256 << 10))


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_every_subscriber_follows_successive_versions(transport):
    cfg = WeightsConfig(chunk_bytes=16 << 10, heartbeat_s=0.1, transport=transport)
    gots = [Recorder(), Recorder()]
    with WeightPublisher(cfg) as publisher:
        subs = [WeightSubscriber(publisher.address, got, cfg).start() for got in gots]
        try:
            for version in (1, 2, 3):
                publisher.publish(version, make_tensors(version, 200 << 10))
                assert all(sub.wait_for(version, WAIT_S) for sub in subs)
        finally:
            for sub in subs:
                sub.close()
    for got in gots:
        assert got.versions == [1, 2, 3]  # each waited for, so none superseded
        assert_bit_exact(got.calls[-1][1], make_tensors(3, 200 << 10))


def test_changed_only_sends_changed_chunks_and_delivers_the_full_set():
    cfg = WeightsConfig(chunk_bytes=4096, changed_only=True, transport="tcp")
    tensors = [(f"t{i}", torch.randn(4096)) for i in range(8)]  # 16 KiB = 4 chunks each
    got = Recorder()
    with WeightPublisher(cfg) as publisher, WeightSubscriber(publisher.address, got, cfg) as sub:
        publisher.publish(1, tensors)
        assert sub.wait_for(1, WAIT_S)
        full = sub.stats["bytes_received"]
        tensors[3][1].add_(1.0)
        publisher.publish(2, tensors)
        assert sub.wait_for(2, WAIT_S)
        delta = sub.stats["bytes_received"] - full
    assert got.versions == [1, 2]
    assert_bit_exact(got.calls[1][1], tensors)
    # t3 spans chunks 8..11 plus alignment padding: at most 5 of the 33 chunks move.
    assert 4 * 4096 <= delta <= 5 * 4096 < full


def test_wire_dtype_sends_fp32_masters_as_bf16():
    cfg = WeightsConfig(chunk_bytes=4096, wire_dtype="bfloat16")
    tensors = [("w", torch.randn(1000)), ("ids", torch.arange(7))]
    got = Recorder()
    with WeightPublisher(cfg) as publisher, WeightSubscriber(publisher.address, got, cfg) as sub:
        publisher.publish(1, tensors)
        assert sub.wait_for(1, WAIT_S)
    (_, weight), (_, ids) = got.calls[0][1]
    assert weight.dtype == torch.bfloat16 and torch.equal(weight, tensors[0][1].to(torch.bfloat16))
    assert ids.dtype == torch.int64 and torch.equal(ids, tensors[1][1])


def test_a_transfer_never_unpickles(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle used on the weight wire")

    for name in ("loads", "load", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    cfg = WeightsConfig(chunk_bytes=4096)
    got = Recorder()
    with WeightPublisher(cfg) as publisher, WeightSubscriber(publisher.address, got, cfg) as sub:
        publisher.publish(7, make_tensors(7, 64 << 10))
        assert sub.wait_for(7, WAIT_S)
    assert got.versions == [7]
