"""Property: no sequence of inserts, samples, leases and their commits, learner restarts, version
bumps, evictions, clean restarts, crashes and torn tails loses an acknowledged row or returns a
row more than max_times_sampled times (uses under leases not yet committed included)."""

import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from async_rl.config import BufferConfig
from buffer.store import ReplayStore
from buffer.testing import synthetic_batch

MAX_TIMES = 1  # the default; reuse counts > 1 are covered in test_buffer_store.py
MAX_STALENESS = 2
CFG = BufferConfig(
    min_size_to_sample=1, max_times_sampled=MAX_TIMES,
    sampler="uniform", filter_zero_advantage=False, segment_bytes=6000,
)

ops = st.one_of(
    st.tuples(st.just("insert"), st.integers(1, 3), st.integers(0, 2), st.booleans()),
    st.tuples(st.just("resend")),
    st.tuples(st.just("sample"), st.integers(1, 3)),
    st.tuples(st.just("sample"), st.integers(1, 1)),  # listed twice: samples drive the property
    st.tuples(st.just("lease"), st.integers(1, 2)),
    st.tuples(st.just("commit")),
    st.tuples(st.just("learner_restart"), st.booleans()),
    st.tuples(st.just("version"), st.integers(1, 2)),
    st.tuples(st.just("restart")),
    st.tuples(st.just("crash"), st.booleans()),
)


class Model:
    """What the buffer has promised: acknowledged rows, their groups' versions, uses."""

    def __init__(self) -> None:
        self.acked: dict[str, str] = {}  # traj_id -> group_id
        self.group_version: dict[str, int] = {}
        self.returned: Counter = Counter()  # final uses: plain samples and committed leases
        self.held: dict[int, list[str]] = {}  # uncommitted lease id -> its rows
        self.learner_version = 0
        self.stale_floor = 0  # highest learner_version - max_staleness seen
        self.last_batch = None
        self.n_groups = 0

    def explained_missing(self, traj: str) -> bool:
        group = self.acked[traj]
        return self.returned[traj] >= MAX_TIMES or self.group_version[group] < self.stale_floor


def _apply(store: ReplayStore, model: Model, op: tuple, directory: Path) -> ReplayStore:
    kind = op[0]
    if kind == "insert":
        _, n_groups, ahead, partial = op
        names = [f"g{model.n_groups + i}" for i in range(n_groups)]
        model.n_groups += n_groups
        version = model.learner_version + ahead
        batch = synthetic_batch(groups=names, version=version, seed=model.n_groups)
        model.last_batch = batch
        if partial:  # the first 2 rows of the last group are held back until a resend
            batch = batch.slice(0, batch.num_rows - 2)
        _insert(store, model, batch, version)
    elif kind == "resend" and model.last_batch is not None:
        version = int(pa.compute.min(model.last_batch.column("token_versions").flatten()).as_py())
        _insert(store, model, model.last_batch, version)
    elif kind == "sample":
        _sample(store, model, op[1])
    elif kind == "lease":
        lease, _ = store.lease(op[1])
        if lease is not None:
            trajs = lease.table.column("traj_id").to_pylist()
            model.held[lease.id] = trajs
            _check_use(lease.table, model)
    elif kind == "commit":
        assert store.commit(list(model.held)) == []
        for trajs in model.held.values():
            model.returned.update(trajs)
        model.held.clear()
    elif kind == "learner_restart":  # its checkpoint covers the oldest lease, or none
        covered = sorted(model.held)[:1] if op[1] else []
        store.resume_learner(model.learner_version, covered)
        for lease in covered:
            model.returned.update(model.held[lease])
        model.held.clear()
    elif kind == "version":
        model.learner_version += op[1]
        model.stale_floor = max(model.stale_floor, model.learner_version - MAX_STALENESS)
        store.set_learner_version(model.learner_version)
    elif kind == "restart":
        store.close()
        store = ReplayStore(directory, CFG, max_staleness=MAX_STALENESS)
    elif kind == "crash":
        store = _crash(store, directory, torn=op[1])
    return store


def _insert(store, model, batch, version) -> None:
    ack = store.insert(batch)
    for traj, group in zip(batch.column("traj_id").to_pylist(),
                           batch.column("group_id").to_pylist(), strict=True):
        model.acked[traj] = group
        model.group_version[group] = version
    assert ack.accepted + ack.duplicates == batch.num_rows


def _sample(store, model, n) -> None:
    table, _ = store.sample(n)
    if table is None:
        return
    trajs = table.column("traj_id").to_pylist()
    assert len(set(trajs)) == len(trajs), "a row twice in one sample"
    for group, count in Counter(table.column("group_id").to_pylist()).items():
        assert count == 4, f"group {group} returned with {count} of 4 rows"
    model.returned.update(trajs)
    _check_use(table, model)


def _check_use(table, model) -> None:
    trajs = table.column("traj_id").to_pylist()
    in_hand = Counter(t for held in model.held.values() for t in held)
    over = [t for t in trajs if model.returned[t] + in_hand[t] > MAX_TIMES]
    assert not over, f"returned more than max_times_sampled: {over[:3]}"
    versions = table.column("token_versions").combine_chunks().flatten().to_numpy()
    assert versions.min() >= model.learner_version - MAX_STALENESS, "a stale row was returned"


def _crash(store, directory: Path, *, torn: bool) -> ReplayStore:
    """Drop the store without closing it; optionally leave a half-written batch behind."""
    newest = max(directory.glob("seg-*.arrows"), default=None)
    del store
    if torn and newest is not None:
        garbage = synthetic_batch(groups=["torn"]).serialize().to_pybytes()
        with open(newest, "ab") as handle:
            handle.write(garbage[: len(garbage) // 2])
    return ReplayStore(directory, CFG, max_staleness=MAX_STALENESS)


def _check_nothing_lost(store: ReplayStore, model: Model) -> None:
    stored = store.read_rows(store.stored_rows()).column("traj_id").to_pylist()
    counts = Counter(stored)
    assert all(c == 1 for c in counts.values()), "a row stored twice"
    missing = [t for t in model.acked if t not in counts and not model.explained_missing(t)]
    assert not missing, f"acknowledged rows lost: {missing[:5]}"


# Bounded so the buffer's tests stay within their CI budget; database=None keeps the repo clean.
@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, min_size=1, max_size=20))
def test_no_operation_sequence_loses_a_row_or_overuses_one(sequence):
    directory = Path(tempfile.mkdtemp(prefix="buffer-property-"))
    try:
        store = ReplayStore(directory, CFG, max_staleness=MAX_STALENESS)
        model = Model()
        for op in sequence:
            store = _apply(store, model, op, directory)
            _check_nothing_lost(store, model)
        store.close()
        _check_nothing_lost(ReplayStore(directory, CFG, max_staleness=MAX_STALENESS), model)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
