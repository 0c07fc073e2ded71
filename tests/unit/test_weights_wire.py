"""The weight wire format: layout, checksums, header validation, and no pickle anywhere."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from async_rl.weights import sendbuffer, wire
from async_rl.weights.sendbuffer import BufferPool, Snapshot, copy_and_hash, copy_into

WEIGHTS_PKG = Path(wire.__file__).parent
KEYS_CLI = WEIGHTS_PKG.parent / "commands" / "keys.py"
UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
UNSAFE_CALLS = {"recv_pyobj", "send_pyobj", "load", "loads"}  # torch.load, np.load, pickle.loads


def sample_tensors():
    return [
        ("a", torch.randn(3, 5)),
        ("b.bf16", torch.randn(7).to(torch.bfloat16)),
        ("c.ids", torch.arange(11)),
        ("d.mask", torch.tensor([True, False])),
        ("e.scalar", torch.tensor(2.5)),
        ("f.empty", torch.empty(0, 4)),
        ("g.t", torch.randn(4, 6).t()),
    ]


def snapshot_of(tensors, chunk_bytes=4096, version=1):
    specs, total = wire.plan_layout(tensors)
    buffer = torch.empty(total, dtype=torch.uint8)
    snap = Snapshot(version, specs, wire.layout_id(specs), total, chunk_bytes, buffer)
    copy_and_hash(snap, [t for _, t in tensors])
    return snap


def header_of(snap, **changes):
    fields = dict(
        pub=9, xfer=1, version=snap.version, tensors=snap.specs, total_bytes=snap.total_bytes,
        chunk_bytes=snap.chunk_bytes, checksums=tuple(snap.checksums), send=None, base=-1,
        layout=snap.layout,
    )
    return wire.header_body(wire.Header(**{**fields, **changes}))


def test_layout_aligns_every_tensor_and_views_round_trip_every_dtype():
    tensors = sample_tensors()
    snap = snapshot_of(tensors)
    assert all(spec.offset % wire.ALIGN == 0 for spec in snap.specs)
    views = wire.tensor_views(snap.buffer, snap.specs)
    for (name, got), (_, want) in zip(views, tensors, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want), name


def test_wire_dtype_casts_only_fp32():
    specs, _ = wire.plan_layout(sample_tensors(), "float16")
    dtypes = {s.name: (s.dtype, s.source_dtype) for s in specs}
    assert dtypes["a"] == ("float16", "float32")
    assert dtypes["b.bf16"] == ("bfloat16", "bfloat16") and dtypes["c.ids"] == ("int64", "int64")


def test_duplicate_names_are_refused_at_publish():
    with pytest.raises(ValueError, match="twice"):
        wire.plan_layout([("x", torch.zeros(1)), ("x", torch.zeros(1))])


def test_checksum_depends_on_the_chunk_index():
    data = bytes(range(256)) * 16
    assert wire.chunk_checksum(data, 0) != wire.chunk_checksum(data, 1)
    assert wire.chunk_checksum(data, 3) == wire.chunk_checksum(bytearray(data), 3)


def test_header_round_trips_through_msgpack():
    snap = snapshot_of(sample_tensors(), chunk_bytes=4096)
    body = wire.unpack(wire.pack(wire.HEADER, header_of(snap))[1])
    header = wire.header_from_body(body)
    assert header.tensors == snap.specs and header.checksums == tuple(snap.checksums)
    assert header.chunks_sent() == tuple(range(snap.n_chunks))


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda b: b.update(proto=99), "protocol"),
        (lambda b: b.update(checksums=b["checksums"][:-1]), "checksums"),
        (lambda b: b.update(checksums=[-1] * len(b["checksums"])), "unsigned"),
        (lambda b: b["tensors"][1].__setitem__(3, 0), "alignment or order"),
        (lambda b: b["tensors"][0].__setitem__(1, "complex64"), "unknown dtype"),
        (lambda b: b["tensors"][0].__setitem__(4, 1), "nbytes"),
        (lambda b: b["tensors"][0].__setitem__(2, [3, -5]), "bad shape"),
        (lambda b: b["tensors"][1].__setitem__(0, "a"), "repeats a name"),
        (lambda b: b.update(total_bytes=10), "past total_bytes"),
        (lambda b: b.update(chunk_bytes=16), "chunk_bytes"),
        (lambda b: b.update(base=0), "must list"),
        (lambda b: b.update(base=0, send=[2, 1]), "sorted"),
        (lambda b: b.update(base=0, send=[10**6]), "range"),
        (lambda b: b.update(send=[0]), "only in a delta"),
        (lambda b: b.update(layout="0" * 32), "layout"),
        (lambda b: b.update(version="7"), "version"),
        (lambda b: b.update(shm=5), "shm"),
        (lambda b: b.update(shm=""), "shm"),
    ],
)
def test_inconsistent_headers_are_refused(tamper, message):
    body = header_of(snapshot_of(sample_tensors()))
    tamper(body)
    with pytest.raises(wire.WireError, match=message):
        wire.header_from_body(body)


def test_header_carries_the_shm_host_or_nil():
    snap = snapshot_of(sample_tensors())
    assert wire.header_from_body(header_of(snap, shm_host="boot:42")).shm_host == "boot:42"
    assert wire.header_from_body(header_of(snap)).shm_host is None


@pytest.mark.parametrize("threads", [1, 3])
def test_copy_and_hash_equals_a_plain_copy_and_one_shot_checksums(monkeypatch, threads):
    monkeypatch.setattr(sendbuffer, "PIECE_BYTES", 1000)  # pieces straddle tensors and chunks
    tensors = sample_tensors() + [("big", torch.randn(5000)), ("cast", torch.randn(300))]
    specs, total = wire.plan_layout(tensors, "bfloat16")
    snap = Snapshot(1, specs, wire.layout_id(specs), total, 4096, torch.full((total,), 7, dtype=torch.uint8))
    workers = wire.ChunkWorkers(threads)
    try:
        copy_and_hash(snap, [t for _, t in tensors], workers)
        expected = torch.full((total,), 7, dtype=torch.uint8)
        copy_into(expected, specs, [t for _, t in tensors])
        assert torch.equal(snap.buffer, expected)
        view = memoryview(expected.numpy())
        assert snap.checksums == [
            wire.chunk_checksum(view[slice(*wire.chunk_span(i, 4096, total))], i) for i in range(snap.n_chunks)
        ]
        assert wire.first_bad_chunk(view, snap.checksums, 4096, workers) is None
        expected[4096 * 2 + 5] ^= 1
        expected[4096 + 9] ^= 1
        assert wire.first_bad_chunk(view, snap.checksums, 4096, workers) == 1  # the lowest of 1 and 2
    finally:
        workers.close()


def test_undecodable_bodies_are_wire_errors():
    for frame in (b"\xc1", b"\x93\x01\x02\x03", b""):
        with pytest.raises(wire.WireError):
            wire.unpack(frame)


def test_buffer_pool_reuses_a_released_buffer():
    pool = BufferPool()
    snap = snapshot_of(sample_tensors())
    pool.release(snap)
    buffer, shm_file = pool.acquire(snap.total_bytes, pinned=False, version=2)
    assert buffer is snap.buffer and shm_file is None
    assert pool.acquire(snap.total_bytes, pinned=False, version=3)[0] is not snap.buffer


def test_no_weight_module_can_reach_pickle():
    for path in [*sorted(WEIGHTS_PKG.glob("*.py")), KEYS_CLI]:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            else:
                names = set()
            assert not names & UNSAFE_MODULES, f"{path.name} imports {names & UNSAFE_MODULES}"
            if isinstance(node, ast.Attribute):
                assert node.attr not in UNSAFE_CALLS, f"{path.name} calls .{node.attr}"
        imported = {
            n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
        }
        assert imported <= {"__future__", "async_rl", "collections", "dataclasses", "typing", "zmq",
                            "torch", "msgpack", "xxhash", "pathlib", "typer", "concurrent"}, path.name


def test_keys_generate_writes_private_secrets_and_refuses_to_overwrite(tmp_path):
    from async_rl.commands.keys import app

    runner = CliRunner()
    result = runner.invoke(app, ["generate", str(tmp_path / "k")])
    assert result.exit_code == 0, result.output
    for name in ("server.key", "server.key_secret", "client.key", "client.key_secret",
                 "authorized/client.key"):
        assert (tmp_path / "k" / name).is_file(), name
    assert (tmp_path / "k" / "server.key_secret").stat().st_mode & 0o077 == 0
    again = runner.invoke(app, ["generate", str(tmp_path / "k")])
    assert again.exit_code == 2 and "--force" in again.output
