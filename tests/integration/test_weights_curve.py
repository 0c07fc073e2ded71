"""CURVE on the weight wire: only clients holding an authorized key get weights."""

from __future__ import annotations

import shutil

import pytest
from weights_helpers import Recorder, assert_bit_exact, make_tensors

from async_rl.config import WeightsConfig
from async_rl.weights import WeightPublisher, WeightSubscriber
from async_rl.weights.keys import generate_keys

WAIT_S = 60.0
# How long a refused client is watched; the authorized one loads within this in practice.
REFUSED_WATCH_S = 2.0


@pytest.fixture(scope="module")
def key_dirs(tmp_path_factory):
    """The job's keys, and a stranger's keys for the same server (different client pair)."""
    job = generate_keys(tmp_path_factory.mktemp("job-keys"))
    stranger = generate_keys(tmp_path_factory.mktemp("stranger-keys"))
    for name in ("server.key", "server.key_secret"):  # knows the server, not authorized
        shutil.copyfile(job / name, stranger / name)
    return job, stranger


def test_authorized_client_loads_and_strangers_are_refused(key_dirs):
    job, stranger = key_dirs
    cfg = WeightsConfig(chunk_bytes=16 << 10, curve_keys_dir=str(job))
    tensors = make_tensors(1, 256 << 10)
    good, bad, plain = Recorder(), Recorder(), Recorder()
    with WeightPublisher(cfg) as publisher:
        publisher.publish(1, tensors)
        subs = [
            WeightSubscriber(publisher.address, bad, cfg.model_copy(update={"curve_keys_dir": str(stranger)})),
            WeightSubscriber(publisher.address, plain, cfg.model_copy(update={"curve_keys_dir": None})),
            WeightSubscriber(publisher.address, good, cfg),
        ]
        try:
            for sub in subs:
                sub.start()
            assert subs[2].wait_for(1, WAIT_S)
            assert not subs[0].wait_for(1, REFUSED_WATCH_S)
            assert not subs[1].wait_for(1, 0.1)
            assert len(publisher.stats()["peers"]) == 1  # the refused never reached the router
        finally:
            for sub in subs:
                sub.close()
    assert bad.calls == [] and plain.calls == []
    assert_bit_exact(good.calls[0][1], tensors)


def test_missing_keys_folder_fails_with_the_field_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights.curve_keys_dir"):
        WeightPublisher(WeightsConfig(curve_keys_dir=str(tmp_path / "nowhere")))
