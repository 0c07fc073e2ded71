"""The data cursor (buffer/cursor.py): every prompt of an epoch is handed out once; after a
crash the prompts handed out and not durable go out again first; done ones never again."""

from __future__ import annotations

import json
import random

import pytest

from actors.prompts import prompt_stream
from async_rl.config import BufferConfig
from buffer import inspection
from buffer.cursor import CURSOR_FILE, CursorMismatch, PromptCursor, parse_group_id, read_record
from buffer.store import ReplayStore
from buffer.testing import synthetic_batch

N = 10


def lease_all(cursor: PromptCursor, holder: str, n: int) -> list[str]:
    return [gid for gid, _ in cursor.lease(holder, n)]


def test_an_epoch_hands_every_prompt_out_once_across_actors_in_the_order_of_a_lone_stream(tmp_path):
    cursor = PromptCursor.open(tmp_path, n_prompts=N, seed=7)
    handed = []
    for k in range(N):
        handed += cursor.lease(f"actor-{k % 3}", 1)
    indices = [index for _, index in handed]
    assert sorted(indices) == list(range(N))
    # The order is the one a lone actor's local stream over the same rows follows.
    stream = prompt_stream(list(range(N)), seed=7)
    assert indices == [next(stream) for _ in range(N)]
    # The next epoch starts over with a new order and new group ids.
    second = cursor.lease("actor-0", N)
    assert sorted(i for _, i in second) == list(range(N))
    assert [i for _, i in second] == [next(stream) for _ in range(N)]
    assert {parse_group_id(cursor.cursor_id, g)[0] for g, _ in second} == {1}


def test_after_a_crash_what_was_in_flight_goes_out_again_first_and_nothing_done_repeats(tmp_path):
    cursor = PromptCursor.open(tmp_path, n_prompts=N, seed=1)
    first = lease_all(cursor, "actor-0", 6)
    cursor.settle(first[:2])  # acknowledged by the buffer; the process dies before another write
    # Reopened from disk alone: all six are listed, the owner drops what the buffer holds.
    again = PromptCursor.open(tmp_path, n_prompts=N, seed=1)
    assert again.outstanding() == sorted(first, key=lambda g: parse_group_id(again.cursor_id, g))
    again.settle(first[:2])  # what durable_groups answers for them
    resumed = lease_all(again, "actor-0", N)
    assert resumed[:4] == sorted(first[2:], key=lambda g: parse_group_id(again.cursor_id, g))
    rest = resumed[4:]
    assert not set(rest) & set(first)
    epoch0 = [g for g in first + rest if parse_group_id(again.cursor_id, g)[0] == 0]
    assert sorted(parse_group_id(again.cursor_id, g)[1] for g in epoch0) == list(range(N))


def test_the_record_on_disk_covers_every_handed_out_prompt_that_is_not_durable(tmp_path):
    """Random leases, acks and actor deaths: at every instant, a crash loses no prompt."""
    rng = random.Random(0)
    cursor = PromptCursor.open(tmp_path, n_prompts=N, seed=3)
    durable, held = set(), {}
    for _ in range(200):
        action = rng.random()
        if action < 0.5:
            holder = f"actor-{rng.randrange(3)}"
            for gid in lease_all(cursor, holder, rng.randint(1, 3)):
                assert gid not in durable
                held[gid] = holder
        elif action < 0.9 and held:
            gid = rng.choice(sorted(held))
            durable.add(gid)
            del held[gid]
            cursor.settle([gid])
        elif held:
            dead = rng.choice(sorted(set(held.values())))
            released = cursor.outstanding(dead)
            cursor.release(released)
            held = {g: h for g, h in held.items() if h != dead}
        on_disk = set(read_record(tmp_path).outstanding)
        keys = {parse_group_id(cursor.cursor_id, g) for g in held}
        assert keys <= on_disk


def test_a_released_prompt_goes_out_before_the_next_new_one(tmp_path):
    cursor = PromptCursor.open(tmp_path, n_prompts=N, seed=2)
    a = lease_all(cursor, "actor-0", 2)
    lease_all(cursor, "actor-1", 1)
    cursor.release(cursor.outstanding("actor-0"))
    assert lease_all(cursor, "actor-1", 3)[:2] == sorted(a, key=lambda g: parse_group_id(cursor.cursor_id, g))


def test_a_cursor_made_for_other_data_is_refused_with_one_line(tmp_path):
    PromptCursor.open(tmp_path, n_prompts=N, seed=2)
    with pytest.raises(CursorMismatch, match=f"made for {N} prompts.*has 11 prompts.*new run.dir"):
        PromptCursor.open(tmp_path, n_prompts=11, seed=2)
    (tmp_path / CURSOR_FILE).write_text(json.dumps({"format": 1, "cursor_id": "x"}))
    with pytest.raises(ValueError, match="not a prompt cursor record"):
        PromptCursor.open(tmp_path, n_prompts=N, seed=2)


def test_buffer_stats_count_prompts_done_in_flight_and_pending_from_the_durable_groups(tmp_path):
    cursor = PromptCursor.open(tmp_path, n_prompts=N, seed=4)
    handed = lease_all(cursor, "actor-0", 7)
    skipped = handed[6]
    cursor.settle([skipped], skipped=True)
    cursor.save()
    store = ReplayStore(tmp_path, BufferConfig(min_size_to_sample=1), max_staleness=4)
    # Three groups stored; the actor's reports for them were lost (the record still lists them).
    store.insert(synthetic_batch(groups=handed[:3]))
    assert store.holds_groups(handed).tolist() == [True] * 3 + [False] * 4
    # A group that was sampled and whose segment is gone still counts as durable.
    store.sample(3)
    store._roll_segment()
    assert not store.segments  # its rows are gone from disk
    assert store.holds_groups(handed[:3]).tolist() == [True] * 3
    prompts = inspection.stats(store)["prompts"]
    assert prompts == {"epoch": 0, "prompts": N, "done": 3, "in_flight": 3, "pending": 3,
                       "skipped": 1, "in_flight_earlier_epochs": 0}
    store.close()
    # The same counts from the folder opened read-only, as `async-rl buffer stats RUN` does.
    reader = ReplayStore(tmp_path, BufferConfig(), max_staleness=4, read_only=True)
    assert inspection.stats(reader)["prompts"] == prompts


def test_buffer_stats_cli_prints_the_epochs_prompts_done_in_flight_and_pending(tmp_path):
    from typer.testing import CliRunner

    from async_rl.commands.buffer import app as buffer_cli

    run = tmp_path / "run"
    cursor = PromptCursor.open(run / "buffer", n_prompts=N, seed=4)
    handed = lease_all(cursor, "actor-0", 4)
    store = ReplayStore(run / "buffer", BufferConfig(), max_staleness=4)
    store.insert(synthetic_batch(groups=handed[:1]))
    store.close()
    shown = CliRunner().invoke(buffer_cli, ["stats", str(run)])
    assert shown.exit_code == 0, shown.output
    assert "prompts of epoch 0 (10)" in shown.output and "1 done / 3 in flight / 6 pending" in shown.output
    (run / "buffer" / CURSOR_FILE).write_text("{")
    broken = CliRunner().invoke(buffer_cli, ["stats", str(run), "--json"])
    assert broken.exit_code == 0 and "cursor.json: not JSON" in json.loads(broken.output)["prompts"]["error"]
