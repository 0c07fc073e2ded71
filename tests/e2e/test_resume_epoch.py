"""A resume that loses nothing: one epoch of a tiny dataset through a learner killed before its
first checkpoint and a `kill -9` of the whole job (actors mid-generation, learner mid-step),
counted prompt by prompt from the buffer's journal and the learner's sample log.

The learner takes its batches as sample leases and commits them once the checkpoint covering the
step is written: the killed step's batch is released when the learner starts again and trained
once in the lineage that survives.

The data cursor (buffer/cursor.py) names every hand-out ``e{epoch}-{row}-{cursor id}``, the
group id its samples are stored under, so epoch 0's prompts are exactly the group ids of
epoch 0. ``max_times_sampled=1`` and no zero-advantage filter make "trained once" exact.
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path

import psutil
import pytest
from test_job import cli, metrics, start_job, status, wait_for

from async_rl.config import BufferConfig
from async_rl.job.learner_role import TRAINED_LOG
from async_rl.job.runfolder import read_run_json
from buffer.client import BufferClient
from buffer.cursor import group_id, read_record
from buffer.index import hash_ids
from buffer.journal import JOURNAL_NAME
from buffer.service import SERVICE_FILE
from buffer.store import ReplayStore

pytestmark = pytest.mark.slow
EPOCH = 24  # prompts in the training file
GROUPS_PER_STEP = 2
ARGS = [
    f"data.synth.n_train={EPOCH}",
    f"learner.batch.groups_per_step={GROUPS_PER_STEP}",
    "learner.checkpoint.every=1",  # the job's kill loses at most the step in progress
    "buffer.max_times_sampled=1",
    "buffer.filter_zero_advantage=false",
    # The actors run at most (5 + versions) x 2 groups ahead: the job dies inside epoch 0.
    "algorithm.staleness.max_staleness=4",
    "actors.prompts_in_flight=4",
    # The random model stops on "u" (in ~5% of its tokens): short and long responses in flight.
    "actors.stop=[u]",
    "actors.max_tokens=32",
]


def kill_tree(pid: int) -> list[int]:
    """SIGKILL ``pid`` and every process below it (this test's job only), all at once."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    gone, alive = psutil.wait_procs(procs, timeout=60)
    assert not alive, f"still alive after SIGKILL: {alive}"
    return [p.pid for p in procs]


def journal(run_dir: Path) -> list[dict]:
    """The buffer's journal since it last opened the folder (a snapshot line, then changes)."""
    out = []
    for line in (run_dir / "buffer" / JOURNAL_NAME).read_bytes().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a torn last line
    return out


def leases(entries: list[dict]) -> tuple[dict[int, list[int]], Counter]:
    """From journal entries in order: the leases still outstanding (id -> group hashes), and how
    often each group's use became final (a committed lease)."""
    outstanding, committed = {}, Counter()
    for entry in entries:
        op = entry.get("op")
        if op == "snapshot":
            outstanding.update({int(k): g for k, g in entry.get("leases", {}).items()})
        elif op == "lease":
            outstanding[entry["id"]] = entry["g"]
        elif op in ("commit", "release"):
            for lease in entry["ids"]:
                groups = outstanding.pop(lease)
                committed.update(groups if op == "commit" else [])
    return outstanding, committed


def trained(run_dir: Path) -> list[dict[str, int]]:
    """The learner's sample log reduced to the final lineage: per step, {group id: response
    tokens}. A learner start restores the checkpoint of a version k: the steps logged before it
    with a version above k died with the learner that trained them."""
    path = run_dir / "logs" / TRAINED_LOG
    steps: list[tuple[int, dict[str, int]]] = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line torn by a kill
        if "restored" in entry:
            steps = [(v, groups) for v, groups in steps if v <= entry["restored"]]
        else:
            steps.append((entry["version"], entry["groups"]))
    return [groups for _, groups in steps]


def restores(run_dir: Path) -> list[int]:
    """The checkpoint version each learner start restored (0: the initial weights)."""
    out = []
    for line in (run_dir / "logs" / TRAINED_LOG).read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        out += [entry["restored"]] if "restored" in entry else []
    return out


def in_flight(run_dir: Path) -> list[str]:
    """Group ids the cursor handed out that the buffer does not hold (read-only: job dead)."""
    record = read_record(run_dir / "buffer")
    ids = [group_id(record.cursor_id, key) for key in record.outstanding]
    store = ReplayStore(run_dir / "buffer", BufferConfig(), max_staleness=4, read_only=True)
    return [g for g, durable in zip(ids, store.holds_groups(ids).tolist(), strict=True) if not durable]


def buffer_stats(run_dir: Path) -> dict:
    result = cli("buffer", "stats", str(run_dir), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_one_epoch_through_a_learner_kill_and_a_job_kill_trains_every_prompt_once(tmp_path):
    run_dir = tmp_path / "run"
    job = start_job(run_dir, *ARGS)
    try:
        # 1. The learner dies before its first checkpoint, before any group exists to sample.
        wait_for("the control endpoint", lambda: (run_dir / "run.json").is_file()
                 and read_run_json(run_dir).control_address is not None, every_s=0.5)
        pid = wait_for("the learner's pid", lambda: status(run_dir).get("pids", {}).get("learner-0"), every_s=0.5)
        assert buffer_stats(run_dir)["rows"] == 0 and not (run_dir / "checkpoints" / "latest").exists()
        psutil.Process(pid).send_signal(signal.SIGKILL)
        wait_for("the learner restart", lambda: any("learner group failed" in e for e in status(run_dir)["events"]))
        # 2. Kill everything while the learner holds a sampled batch and prompts are in flight.
        wait_for("two learner steps", lambda: len(trained(run_dir)) >= 2, every_s=0.5)

        address = json.loads((run_dir / "buffer" / SERVICE_FILE).read_text())["address"]
        with BufferClient(address) as buffer:

            def mid_step():  # a step of the tiny model takes about a second
                done = set(hash_ids([g for step in trained(run_dir) for g in step]).tolist())
                held = [g for groups in leases(journal(run_dir))[0].values() for g in groups if g not in done]
                record = read_record(run_dir / "buffer")
                outstanding = [key for key in record.outstanding if key[0] == 0]
                if not (held and record.epoch == 0 and len(outstanding) >= 2):
                    return False
                # The record lists what was handed out and not yet *known* done (it is rewritten
                # only before a hand-out): ask the buffer which of those are durable already.
                durable = buffer.durable_groups([group_id(record.cursor_id, key) for key in outstanding])
                return durable.count(False) >= 2

            wait_for("the learner mid-step with prompts in flight", mid_step, every_s=0.05)
            killed = kill_tree(job.pid)
    finally:
        if job.poll() is None:
            kill_tree(job.pid)
    assert len(killed) > 5  # driver, Ray, controller, buffer, learner, actor, vLLM engine
    before, restored_before = journal(run_dir), restores(run_dir)
    # The batch the killed learner held is leased, not used: it goes out again after the resume.
    outstanding_at_kill = leases(before)[0]
    leased = [g for groups in outstanding_at_kill.values() for g in groups]
    lineage_at_kill = set(hash_ids([g for step in trained(run_dir) for g in step]).tolist())
    lost = set(leased) - lineage_at_kill
    stats = buffer_stats(run_dir)
    assert stats["leases"] == {"outstanding": len(outstanding_at_kill), "groups": len(leased)} and lost
    at_kill = stats["prompts"]
    again = in_flight(run_dir)
    assert at_kill["in_flight"] == len(again) >= 1 and at_kill["epoch"] == 0

    # 3. Resume; stop once the learner has trained all of epoch 0's groups in its lineage.
    # After the resume no group may age out: a group past the staleness cap is retired untrained
    # by design (the cap's doing, not the cursor's), and the learner of the tiny model makes
    # several versions a second, so at cap 4 a stored group can age out before its turn.
    resumed = start_job(run_dir, *ARGS, "algorithm.staleness.max_staleness=1000000", resume=True)
    try:
        cursor_id = read_record(run_dir / "buffer").cursor_id
        epoch0 = [group_id(cursor_id, (0, row)) for row in range(EPOCH)]
        hashes = dict(zip(epoch0, hash_ids(epoch0).tolist(), strict=True))
        wait_for("epoch 0 trained", lambda: len({g for s in trained(run_dir) for g in s} & set(epoch0)) >= EPOCH,
                 timeout_s=600, every_s=1.0)
        stopped = cli("stop", str(run_dir))
        assert stopped.returncode == 0, stopped.stderr
        assert resumed.wait(timeout=300) == 0
    finally:
        if resumed.poll() is None:
            kill_tree(resumed.pid)

    # Counted from the buffer: every prompt of epoch 0 was used once for good (one committed
    # lease each), the killed learner's batch included; the stop committed everything.
    outstanding, committed = leases(before + journal(run_dir))
    assert [committed[hashes[g]] for g in epoch0] == [1] * EPOCH and outstanding == {}
    # Counted from the learner: in the final lineage every group of epoch 0 was trained once.
    steps = trained(run_dir)
    trains = Counter(g for step in steps for g in step)
    assert [trains[g] for g in epoch0] == [1] * EPOCH
    # The learner killed before its first checkpoint restarted from the initial weights.
    # (The first learner may die before it logs its start: then only the restarted one did.)
    assert restored_before and set(restored_before) == {0}
    assert metrics(run_dir, "learner")[0]["version"] == 1
    # The prompts in flight at the kill went out again and were trained once, like the rest.
    assert all(trains[g] == 1 for g in again if g in hashes)
    tokens = {g: n for step in steps for g, n in step.items()}
    rehanded = [tokens[g] for g in again if g in tokens]
    rest = [tokens[g] for g in epoch0 if g in tokens and g not in again]
    print(f"\nepoch of {EPOCH}: trained once {sum(trains[g] == 1 for g in epoch0)}, leased by the killed step "
          f"{len(lost)}, in flight at the kill {len(again)} (re-handed and trained {len(rehanded)}); "
          f"restores {restores(run_dir)}; response tokens per group, re-handed {sorted(rehanded)} vs rest {sorted(rest)}")
