"""The buffer service as a real process over loopback ZeroMQ: concurrency, bad requests,
blocking samples, `kill -9` mid-ingest, a corrupted segment tail, hostile requests, and the
CLI on a live job."""

import json
import threading
import time
from collections import Counter

import pyarrow as pa
import pytest
import zmq
from typer.testing import CliRunner

from async_rl.commands.buffer import app as buffer_cli
from async_rl.config import BufferConfig
from buffer.client import BufferClient, BufferRequestError
from buffer.schema import MAX_POLICY_VERSION
from buffer.segments import encode_stream
from buffer.service import MAX_SAMPLE_WAIT_S, start_service
from buffer.testing import synthetic_batch, with_broken_offsets
from buffer.wire import pack_header, table_to_ipc, unpack_header

SMALL_MESSAGES = 1 << 20  # max_message_bytes for the shared service: oversized is easy to hit


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    directory = tmp_path_factory.mktemp("buffer-service")
    cfg = BufferConfig(min_size_to_sample=1, max_message_bytes=SMALL_MESSAGES,
                       filter_zero_advantage=False)
    handle = start_service(directory, cfg, max_staleness=100)
    yield handle
    handle.stop()


def _writer(address, prefix, n_batches, acked, errors):
    try:
        with BufferClient(address) as client:
            for i in range(n_batches):
                batch = synthetic_batch(groups=[f"{prefix}-{i}-{k}" for k in range(4)], seed=i)
                ack = client.insert(batch)
                assert ack["accepted"] == 16
                acked.extend(batch.column("traj_id").to_pylist())
    except Exception as err:  # surfaced by the main thread's assertion
        errors.append(err)


def test_concurrent_writers_and_a_reader_get_every_row_exactly_once(service):
    acked, sampled, errors = [], [], []
    writers = [threading.Thread(target=_writer, args=(service.address, f"w{w}", 10, acked, errors))
               for w in range(3)]
    done = threading.Event()

    def reader():
        with BufferClient(service.address) as client:
            while not done.is_set():
                table = client.sample(2, timeout_s=0.2)
                if table is not None:
                    sampled.extend(table.column("traj_id").to_pylist())

    reading = threading.Thread(target=reader)
    reading.start()
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    done.set()
    reading.join()
    with BufferClient(service.address) as client:  # whatever the reader left
        while (table := client.sample(1)) is not None:
            sampled.extend(table.column("traj_id").to_pylist())
    assert not errors
    assert len(acked) == 3 * 10 * 16
    counts = Counter(sampled)
    assert set(counts) == set(acked) and set(counts.values()) == {1}


def test_bad_requests_get_error_replies_and_the_server_keeps_serving(service):
    client = BufferClient(service.address, timeout_s=20)
    with pytest.raises(BufferRequestError, match="unknown verb 'explode'"):
        client._call({"verb": "explode"})
    with pytest.raises(BufferRequestError, match="missing \\['reward'\\]"):
        client.insert(synthetic_batch(groups=["bad"]).drop_columns(["reward"]))
    with pytest.raises(BufferRequestError, match="exceeds max_message_bytes"):
        client.insert(synthetic_batch(groups=["big"], group_size=64, response_len=2048))
    with pytest.raises(BufferRequestError, match="exactly one Arrow IPC payload"):
        client._call({"verb": "insert"})
    with pytest.raises(BufferRequestError, match="not an Arrow IPC stream"):
        client._call({"verb": "insert"}, [b"not arrow"])
    with pytest.raises(BufferRequestError, match="n_groups=0"):
        client._call({"verb": "sample", "n_groups": 0})
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.connect(service.address)
    raw.send_multipart([b"\xc1 not msgpack"])
    assert raw.poll(20_000)
    assert "not msgpack" in unpack_header(raw.recv_multipart()[0])["error"]
    raw.close(linger=0)
    damaged = bytearray(encode_stream(synthetic_batch(groups=["flipped"]))[0].to_pybytes())
    damaged[-64] ^= 0xFF  # a bit flipped on the wire, inside the batch's body
    with pytest.raises(BufferRequestError, match="payload: checksum mismatch"):
        client._call({"verb": "insert"}, [bytes(damaged)])
    assert client.ping()["pid"] == service.pid
    assert client.insert(synthetic_batch(groups=["fine"]))["accepted"] == 4
    assert client.insert(pa.Table.from_batches([synthetic_batch(groups=["table"])]))["accepted"] == 4
    assert client.sample(1, peek=True) is not None
    client.close()


def test_a_blocked_sample_is_answered_when_groups_arrive(tmp_path):
    handle = start_service(tmp_path, BufferConfig(min_size_to_sample=2), max_staleness=4)
    try:
        with BufferClient(handle.address, learner_token=handle.learner_token) as learner, \
                BufferClient(handle.address) as actor:
            assert learner.sample(1, timeout_s=0.2) is None
            assert "0 sampleable group(s), need 2" in learner.last_refusal
            result = {}
            waiting = threading.Thread(target=lambda: result.update(t=learner.sample(2, timeout_s=60)))
            waiting.start()
            actor.insert(synthetic_batch(groups=["a"]))
            actor.insert(synthetic_batch(groups=["b"]))
            waiting.join(60)
            assert result["t"].column("group_id").unique().to_pylist() == ["a", "b"]
            assert learner.set_learner_version(3) == 3
            assert actor.stats()["learner_version"] == 3
    finally:
        handle.stop()


def _ingest_until_killed(address, acked, stop):
    client = BufferClient(address, timeout_s=5)
    i = 0
    while not stop.is_set():
        batch = synthetic_batch(groups=[f"k{i}-{k}" for k in range(8)], response_len=512, seed=i)
        try:
            client.insert(batch)
        except (TimeoutError, BufferRequestError):
            break
        acked.extend(batch.column("traj_id").to_pylist())
        i += 1
    client.close()


def test_kill_9_mid_ingest_then_restart_keeps_every_acknowledged_row_once(tmp_path):
    cfg = BufferConfig(min_size_to_sample=1, segment_bytes=1 << 20)
    handle = start_service(tmp_path, cfg, max_staleness=4)
    acked, stop = [], threading.Event()
    writers = [threading.Thread(target=_ingest_until_killed, args=(handle.address, acked, stop))
               for _ in range(2)]
    for thread in writers:
        thread.start()
    while len(acked) < 40 * 32 and any(t.is_alive() for t in writers):
        threading.Event().wait(0.05)
    assert len(acked) >= 40 * 32, "writers stopped before the kill"
    handle.kill()  # SIGKILL this service process only, mid-ingest
    stop.set()
    for thread in writers:
        thread.join(30)
    restarted = start_service(tmp_path, cfg, max_staleness=4)
    try:
        with BufferClient(restarted.address) as client:
            stored = client.head(100_000).column("traj_id").to_pylist()
            counts = Counter(stored)
            assert set(acked) <= set(counts)
            assert set(counts.values()) == {1}
            for report in client.stats()["recovery"]:
                assert report["truncated"] or report["bytes_dropped"] == 0
    finally:
        restarted.stop()
    # A corrupted tail on the newest segment: recovered with a report, nothing acked is lost.
    newest = max(tmp_path.glob("seg-*.arrows"))
    with open(newest, "ab") as handle_file:
        handle_file.write(synthetic_batch(groups=["torn"]).serialize().to_pybytes()[:-64])
    again = start_service(tmp_path, cfg, max_staleness=4)
    try:
        with BufferClient(again.address) as client:
            reports = client.stats()["recovery"]
            assert [r["segment"] for r in reports] == [newest.name]
            assert reports[0]["truncated"] and reports[0]["bytes_dropped"] > 0
            stored = Counter(client.head(100_000).column("traj_id").to_pylist())
            assert set(acked) <= set(stored) and set(stored.values()) == {1}
            assert not any(t.startswith("torn") for t in stored)
    finally:
        again.stop()
    assert "recovered segment" in (tmp_path / "service.log").read_text()


def test_the_cli_inspects_a_live_service_and_the_same_folder_offline(tmp_path):
    handle = start_service(tmp_path / "buffer", BufferConfig(min_size_to_sample=1), max_staleness=4)
    runner = CliRunner()
    try:
        with BufferClient(handle.address, learner_token=handle.learner_token) as client:
            client.insert(synthetic_batch(groups=["a", "b"], rewards=[1, -1, 1, -1, 0, 1, 0, 1]))
            client.set_learner_version(2)
        live = runner.invoke(buffer_cli, ["stats", "--connect", handle.address, "--json"])
        assert live.exit_code == 0, live.output
        assert json.loads(live.output)["rows"] == 8
        rows = runner.invoke(buffer_cli, ["head", "--connect", handle.address, "--json",
                                          "--where", "reward<0"])
        assert [r["traj_id"] for r in json.loads(rows.output)] == ["a/1", "a/3"]
        offline = runner.invoke(buffer_cli, ["staleness", str(tmp_path), "--json"])
        assert json.loads(offline.output) == {"learner_version": 2, "histogram": {"2": 8}}
        table = runner.invoke(buffer_cli, ["stats", str(tmp_path)])
        assert table.exit_code == 0 and "sampleable groups" in table.output
    finally:
        handle.stop()
    bad = runner.invoke(buffer_cli, ["stats", str(tmp_path / "nowhere")])
    assert bad.exit_code == 2 and "no replay buffer here" in bad.output


def test_a_crafted_batch_is_refused_and_the_service_serves_and_restarts_with_every_row(tmp_path):
    handle = start_service(tmp_path, BufferConfig(min_size_to_sample=1), max_staleness=4)
    try:
        with BufferClient(handle.address, timeout_s=20) as client:
            assert client.insert(synthetic_batch(groups=["a"]))["accepted"] == 4
            for column in ("traj_id", "group_id", "actor_id", "reward_info"):
                crafted = with_broken_offsets(synthetic_batch(groups=["x"]), column)
                with pytest.raises(BufferRequestError, match="non-monotonic offset"):
                    client.insert(crafted)
            assert client.ping()["pid"] == handle.pid
            assert client.insert(synthetic_batch(groups=["b"]))["accepted"] == 4
    finally:
        assert handle.stop() == 0
    again = start_service(tmp_path, BufferConfig(min_size_to_sample=1), max_staleness=4)
    try:
        with BufferClient(again.address) as client:
            stats = client.stats()
            assert (stats["rows"], stats["recovery"]) == (8, [])
            assert client.sample(2).column("group_id").unique().to_pylist() == ["a", "b"]
    finally:
        again.stop()


def test_only_the_learner_sets_the_version_and_only_upward(tmp_path):
    handle = start_service(tmp_path, BufferConfig(min_size_to_sample=1), max_staleness=4)
    try:
        with BufferClient(handle.address) as stranger, \
                BufferClient(handle.address, learner_token=handle.learner_token) as learner:
            for token in (None, "guess", 7):
                stranger.learner_token = token
                with pytest.raises(BufferRequestError, match="only the learner"):
                    stranger.set_learner_version(10**6)
            assert learner.set_learner_version(5) == 5
            with pytest.raises(BufferRequestError, match="learner version 4 < 5: it only moves up"):
                learner.set_learner_version(4)
            with pytest.raises(BufferRequestError, match=f"version=.*\\[0, {MAX_POLICY_VERSION}\\]"):
                learner.set_learner_version(2**64 - 1)
            # A learner group resumed from a checkpoint at 2 publishes it under a fresh number.
            assert learner.resume_learner(2, []) == 6
            assert stranger.stats()["learner_version"] == 6
    finally:
        handle.stop()
    assert (tmp_path / "learner.token").stat().st_mode & 0o777 == 0o600


def test_leases_travel_over_the_wire_and_only_the_learner_holds_them(tmp_path):
    handle = start_service(tmp_path, BufferConfig(min_size_to_sample=1, filter_zero_advantage=False),
                           max_staleness=4)
    try:
        with BufferClient(handle.address) as stranger, \
                BufferClient(handle.address, learner_token=handle.learner_token) as learner, \
                BufferClient(handle.address, learner_token=handle.learner_token) as dead:
            # A lease the group that died asked for is refused, not served to nobody.
            result = {}
            waiting = threading.Thread(target=lambda: result.update(lease=dead.lease(1, timeout_s=60)))
            waiting.start()
            while stranger.stats()["samples_waiting"] == 0:
                time.sleep(0.05)
            assert learner.resume_learner(0, []) == 0
            waiting.join(timeout=30)
            assert result == {"lease": None} and dead.last_refusal == "a learner group restarted"
            learner.insert(synthetic_batch(groups=["a", "b", "c"]))
            for call in (lambda: stranger.lease(1), lambda: stranger.commit([1]),
                         lambda: stranger.resume_learner(0, [])):
                with pytest.raises(BufferRequestError, match="only the learner"):
                    call()
            with pytest.raises(BufferRequestError, match="peek and lease exclude each other"):
                learner._call({"verb": "sample", "n_groups": 1, "peek": True, "lease": True,
                               "token": handle.learner_token})
            with pytest.raises(BufferRequestError, match="leases: expected a list"):
                learner._call({"verb": "commit", "leases": ["1"], "token": handle.learner_token})
            covered, lost = learner.lease(1), learner.lease(1)
            assert covered.table.column("group_id").unique().to_pylist() == ["a"] and lost.id == covered.id + 1
            assert stranger.stats()["leases"] == {"outstanding": 2, "groups": 2}
            assert learner.resume_learner(0, [covered.id]) == 0
            assert learner.commit([covered.id, lost.id]) == [covered.id, lost.id]  # settled already
            groups = learner.lease(2).table.column("group_id").unique().to_pylist()
            assert groups == ["b", "c"] and stranger.stats()["groups_sampled_total"] == 1
    finally:
        handle.stop()


def test_absurd_values_and_arguments_get_error_replies_and_stats_keep_working(service):
    client = BufferClient(service.address, timeout_s=20)
    for column, value, error in (("reward", float("nan"), "reward: must be finite"),
                                 ("group_size", 2**31 - 1, "group_size: must be in")):
        rows = synthetic_batch(groups=[column]).to_pydict()
        rows[column] = [value] * 4
        with pytest.raises(BufferRequestError, match=error):
            client._call({"verb": "insert"}, [table_to_ipc(pa.table(rows))])
    with pytest.raises(BufferRequestError, match="n=-5: must be an integer"):
        client.head(-5)
    for timeout in (float("nan"), 1e9, -1.0, "soon"):
        with pytest.raises(BufferRequestError, match="timeout_s=.*must be a finite number"):
            client._call({"verb": "sample", "n_groups": 1, "timeout_s": timeout})
    for n_groups in (1.5, True, [1], 2**64 - 1):
        with pytest.raises(BufferRequestError, match="n_groups=.*must be an integer"):
            client._call({"verb": "sample", "n_groups": n_groups})
    assert client.stats()["reward"]["mean"] is not None
    assert client.ping()["pid"] == service.pid
    client.close()


def test_parked_samples_are_capped_and_the_excess_is_refused(tmp_path, monkeypatch):
    handle = start_service(tmp_path, BufferConfig(min_size_to_sample=1), max_staleness=4)
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.connect(handle.address)
    try:
        waits = 1100  # above MAX_PARKED_SAMPLES (1024)
        for i in range(waits):
            request = {"verb": "sample", "id": i, "n_groups": 1, "timeout_s": MAX_SAMPLE_WAIT_S}
            raw.send_multipart([pack_header(request)])
        refused = []
        while len(refused) < waits - 1024 and raw.poll(20_000):
            refused.append(unpack_header(raw.recv_multipart()[0]))
        assert len(refused) == waits - 1024
        assert all("already wait" in r["error"] for r in refused)
        with BufferClient(handle.address) as client:
            assert client.ping()["pid"] == handle.pid
    finally:
        raw.close(linger=0)
        handle.stop()


def test_durable_groups_says_which_groups_are_stored_and_refuses_a_bad_list_in_one_line(service):
    with BufferClient(service.address, timeout_s=20) as client:
        client.insert(synthetic_batch(groups=["durable-a", "durable-b"]))
        assert client.durable_groups(["durable-a", "never-sent", "durable-b"]) == [True, False, True]
        assert client.durable_groups([]) == []
        for bad in ("durable-a", [1, 2], ["x" * 2000], None):
            with pytest.raises(BufferRequestError, match="group_ids: expected a list of at most"):
                client._call({"verb": "durable_groups", "group_ids": bad})
        assert client.ping()["pid"] == service.pid
