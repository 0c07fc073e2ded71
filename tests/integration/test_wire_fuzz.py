"""Property: hostile messages on every wire of a job (buffer requests, control requests, weight
stream messages) get an error reply or are dropped; the service keeps answering, and every
acknowledged row (or delivered version) stays intact. Real services over loopback ZeroMQ."""

from __future__ import annotations

import json

import msgpack
import pyarrow as pa
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_listeners_curve import control_on_a_thread
from test_weights_faults import ScriptedPublisher, subscribe
from weights_helpers import assert_bit_exact, make_tensors

from async_rl.config import BufferConfig
from async_rl.job.control import VERBS as CONTROL_VERBS
from async_rl.job.control import request
from async_rl.weights import wire
from buffer.client import BufferClient
from buffer.service import start_service
from buffer.testing import synthetic_batch, with_broken_offsets
from buffer.wire import VERBS as BUFFER_VERBS
from buffer.wire import pack_header, table_to_ipc, unpack_header

REPLY_WAIT_MS = 20_000  # far above a reply's time: only a service that stopped answering trips it
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True),
    st.text(max_size=20), st.binary(max_size=20),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)


# ---------------------------------------------------------------------- buffer requests


def _hostile_payload(kind: str, seed: int) -> bytes:
    batch = synthetic_batch(groups=[f"hostile{seed}"], seed=seed)
    if kind == "bytes":
        return bytes(table_to_ipc(batch))[: 50 + seed]
    if kind == "offsets":
        column = ("traj_id", "group_id", "actor_id", "data_source", "reward_info")[seed % 5]
        return bytes(table_to_ipc(with_broken_offsets(batch, column)))
    rows = batch.to_pydict()
    rows[("reward", "group_size", "times_sampled")[seed % 3]] = [(float("nan"), 2**31 - 1, -5)[seed % 3]] * 4
    return bytes(table_to_ipc(pa.table(rows)))


buffer_requests = st.tuples(
    st.dictionaries(st.text(max_size=12), values, max_size=5),
    st.one_of(st.sampled_from(BUFFER_VERBS), st.text(max_size=10)),
    st.lists(st.one_of(st.binary(max_size=64), st.tuples(
        st.sampled_from(["bytes", "offsets", "values"]), st.integers(0, 30))), max_size=2),
)


@pytest.fixture(scope="module")
def buffer_service(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzzed-buffer")
    cfg = BufferConfig(min_size_to_sample=1, max_times_sampled=10**6, filter_zero_advantage=False)
    handle = start_service(directory, cfg, max_staleness=4)
    with BufferClient(handle.address) as client:
        acked = synthetic_batch(groups=["kept-a", "kept-b"], seed=7)
        assert client.insert(acked)["accepted"] == 8
    yield handle, cfg, acked
    handle.stop()


@FUZZ
@given(request_=buffer_requests)
def test_any_buffer_request_gets_one_reply_naming_what_is_wrong(buffer_service, request_):
    handle, _, acked = buffer_service
    fields, verb, payload = request_
    frames = [pack_header({**fields, "verb": verb, "id": 1})]
    frames += [p if isinstance(p, bytes) else _hostile_payload(*p) for p in payload]
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(handle.address)
    try:
        sock.send_multipart(frames)
        assert sock.poll(REPLY_WAIT_MS), f"no reply to {verb!r}: the buffer stopped serving"
        reply = unpack_header(sock.recv_multipart()[0])
    finally:
        sock.close()
    assert isinstance(reply["ok"], bool) and (reply["ok"] or isinstance(reply["error"], str))
    assert "internal error" not in reply.get("error", "")  # every refusal is a named one


def test_after_the_fuzz_the_buffer_restarts_with_every_acknowledged_row(buffer_service):
    handle, cfg, acked = buffer_service
    with BufferClient(handle.address) as client:
        assert client.ping()["pid"] == handle.pid
    assert handle.stop() == 0
    again = start_service(handle.directory, cfg, max_staleness=4)
    try:
        with BufferClient(again.address) as client:
            assert client.stats()["recovery"] == []
            rows = client.head(10_000).to_pydict()
    finally:
        again.stop()
    stored = dict(zip(rows["traj_id"], rows["reward"], strict=True))
    expected = dict(zip(acked.column("traj_id").to_pylist(), acked.column("reward").to_pylist(), strict=True))
    assert {t: stored.get(t) for t in expected} == expected


# ---------------------------------------------------------------------- control requests


@pytest.fixture(scope="module")
def control_server():
    with control_on_a_thread() as served:
        yield served


control_requests = st.one_of(
    st.binary(max_size=200),
    values.map(lambda v: json.dumps(v, default=repr).encode()),
    st.builds(lambda verb, count, extra: json.dumps({"verb": verb, "count": count, **extra}, default=repr).encode(),
              st.sampled_from(CONTROL_VERBS), values, st.dictionaries(st.text(max_size=8), values, max_size=3)),
    st.integers(1, 30_000).map(lambda depth: b"[" * depth + b"]" * depth),
)


@FUZZ
@given(raw=control_requests)
def test_any_control_request_gets_one_reply_and_only_bounded_requests_reach_the_job(control_server, raw):
    address, seen = control_server
    before = len(seen)
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send(raw)
        assert sock.poll(REPLY_WAIT_MS), "no reply: the control endpoint stopped serving"
        reply = json.loads(sock.recv())
    finally:
        sock.close()
    assert isinstance(reply["ok"], bool)
    for req in seen[before:]:
        if req.verb.startswith("scale"):
            assert type(req.count) is int and 0 <= req.count <= 1024
    assert request(address, "status", timeout_s=20) == {"verb": "status"}


# ---------------------------------------------------------------------- weight stream


weight_messages = st.tuples(
    st.one_of(st.sampled_from(sorted(wire.KINDS)), st.binary(max_size=3)),
    st.one_of(st.binary(max_size=64), st.dictionaries(st.text(max_size=10), values, max_size=6).map(
        lambda body: msgpack.packb(body, use_bin_type=True))),
    st.lists(st.binary(max_size=64), max_size=2),
)


@pytest.fixture(scope="module")
def fuzzed_subscriber():
    publisher = ScriptedPublisher()
    sub, got = subscribe(publisher.address)
    publisher.wait_hello()
    yield publisher, sub, got
    sub.close()
    publisher.close()


@FUZZ
@given(message=weight_messages)
def test_any_weight_message_is_dropped_or_handled_and_the_subscriber_lives(fuzzed_subscriber, message):
    publisher, sub, _ = fuzzed_subscriber
    kind, body, extra = message
    publisher.sock.send_multipart([publisher.peer, kind, body, *extra])
    assert sub.alive


def test_after_the_fuzz_a_good_version_still_loads(fuzzed_subscriber):
    publisher, sub, got = fuzzed_subscriber
    tensors = make_tensors(1, 64 << 10)
    publisher.transfer(10**6, tensors)
    assert sub.wait_for(10**6, 60)
    assert sub.alive and got.versions[-1] == 10**6
    assert_bit_exact(got.calls[-1][1], tensors)
