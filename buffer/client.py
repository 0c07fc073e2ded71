"""The buffer client used by actors, the learner and the CLI.

    client = BufferClient("tcp://127.0.0.1:5555")
    client.insert(batch)                  # returns once the rows are durable (the ack)
    client.insert_many(batches, window=8)  # the same, with up to 8 inserts in flight
    table = client.sample(8, timeout_s=30)  # whole groups, or None (see client.last_refusal)

The learner leases instead (``lease``, then ``commit`` once its checkpoint covers the training,
``resume_learner`` when a learner group starts): the same calls as ``buffer/store.py``'s.

One client per thread (a ZeroMQ socket is not thread-safe). Requests carry an id; a reply
to a request that already timed out is discarded.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable

import pyarrow as pa
import zmq

from async_rl.weights.keys import secure_client
from buffer.segments import encode_stream
from buffer.wire import Lease, ipc_to_table, pack_header, table_to_ipc, unpack_header

REPLY_GRACE_S = 30.0  # added to a sample's blocking timeout: the server answers at the deadline
RATE_LIMIT_BACKOFF_S = 0.05  # pause between retries of an insert the rate limiter refused


class BufferRequestError(RuntimeError):
    """The service answered with an error (bad request); the message is the server's.
    ``retry``: the refusal is temporary (the rate limiter), the same request may succeed later."""

    def __init__(self, message: str, *, retry: bool = False) -> None:
        super().__init__(message)
        self.retry = retry


class InsertsRefused(BufferRequestError):
    """``insert_many``: the service refused batch ``index`` (the message is the server's). The
    inserts then in flight were answered first: ``acks`` has one entry per batch, the ack of
    each batch acknowledged (durable) and None for each that was not."""

    def __init__(self, message: str, *, retry: bool, index: int, acks: list[dict | None]) -> None:
        super().__init__(message, retry=retry)
        self.index = index
        self.acks = acks


class BufferClient:
    def __init__(self, address: str, *, timeout_s: float = 60.0, learner_token: str | None = None,
                 curve_keys_dir: str | None = None) -> None:
        """``curve_keys_dir``: the job's CURVE keys, needed when the service was started with
        them (off loopback); without them its requests are never answered."""
        self.address = address
        self.timeout_s = timeout_s
        self.learner_token = learner_token  # the learner's secret: lets it set the version
        self.last_refusal: str | None = None
        self._ids = itertools.count(1)
        self._ctx = zmq.Context.instance()
        self._socket = self._ctx.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        # A send blocks while no peer is connected (a refused CURVE handshake, a restart).
        self._socket.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
        if curve_keys_dir:
            secure_client(self._socket, curve_keys_dir)
        self._socket.connect(address)

    # ------------------------------------------------------------------ verbs

    def insert(self, batch: pa.RecordBatch | pa.Table, *, retry_for_s: float = 600.0) -> dict:
        """Send a trajectory batch; returns the ack ``{accepted, duplicates, fsynced}``.

        Inserts are idempotent on traj_id, so re-sending after a timeout is safe. A refusal by
        the rate limiter is retried for ``retry_for_s`` before raising BufferRequestError.
        """
        payload = _insert_payload(batch)
        deadline = time.monotonic() + retry_for_s
        while True:
            header, _ = self._call({"verb": "insert"}, [payload], raise_error=False)
            if header["ok"]:
                return _ack(header)
            if not header.get("retry") or time.monotonic() > deadline:
                raise BufferRequestError(header["error"], retry=bool(header.get("retry")))
            time.sleep(RATE_LIMIT_BACKOFF_S)

    def insert_many(self, batches: Iterable[pa.RecordBatch | pa.Table], *, window: int = 8,
                    retry_for_s: float = 600.0) -> list[dict]:
        """Send the batches with up to ``window`` inserts in flight (a Kafka producer's
        ``max.in.flight``); returns their acks in the order of ``batches``, each meaning what
        :meth:`insert`'s means (the rows are durable).

        The service appends and indexes a batch while the fsync of the ones before runs, and
        this client encodes the next batch meanwhile. A refusal by the rate limiter is retried
        (for ``retry_for_s``) by sending that batch again, so it may be stored after later
        ones: inserts are idempotent on traj_id and a batch's place in the buffer means
        nothing. A batch refused for good stops the sending: the replies in flight are awaited,
        then :class:`InsertsRefused` names the batch and carries the acks received.
        """
        if window < 1:
            raise ValueError(f"insert_many: window={window}, must be at least 1")
        batches = list(batches)
        acks: list[dict | None] = [None] * len(batches)
        upcoming = iter(enumerate(batches))
        in_flight: dict[int, tuple[int, pa.Buffer, float]] = {}  # request id: batch, payload, deadline
        retry_until = time.monotonic() + retry_for_s
        refused: dict | None = None
        while True:
            if refused is None:
                for index, batch in itertools.islice(upcoming, window - len(in_flight)):
                    self._send_insert(in_flight, index, _insert_payload(batch))
            if not in_flight:
                break
            request_id, reply, _ = self._receive({i: d for i, (_, _, d) in in_flight.items()}, "insert")
            index, payload, _ = in_flight.pop(request_id)
            if reply["ok"]:
                acks[index] = _ack(reply)
            elif refused is None and reply.get("retry") and time.monotonic() <= retry_until:
                time.sleep(RATE_LIMIT_BACKOFF_S)
                self._send_insert(in_flight, index, payload)
            elif refused is None:
                refused = {**reply, "index": index}
        if refused is not None:
            raise InsertsRefused(f"batch {refused['index']}: {refused['error']}", retry=bool(refused.get("retry")),
                                 index=refused["index"], acks=acks)
        return acks

    def _send_insert(self, in_flight: dict, index: int, payload: pa.Buffer) -> None:
        request_id = self._send({"verb": "insert"}, [payload])
        in_flight[request_id] = (index, payload, time.monotonic() + self.timeout_s)

    def sample(self, n_groups: int, *, timeout_s: float = 0.0, peek: bool = False) -> pa.Table | None:
        """Up to ``n_groups`` whole groups, waiting up to ``timeout_s`` for them; None if refused
        (the reason is in ``last_refusal``). ``peek`` does not count as a use."""
        header, frames = self._sample(n_groups, timeout_s, peek=peek)
        return ipc_to_table(frames[0]) if frames else None

    def lease(self, n_groups: int, *, timeout_s: float = 0.0) -> Lease | None:
        """Like :meth:`sample`, but the use is provisional until :meth:`commit` (needs
        ``learner_token``)."""
        header, frames = self._sample(n_groups, timeout_s, lease=True, token=self.learner_token)
        return Lease(header["lease"], ipc_to_table(frames[0])) if frames else None

    def _sample(self, n_groups: int, timeout_s: float, **arguments):
        """One ``sample`` request; its refusal reason, if any, is kept in ``last_refusal``."""
        request = {"verb": "sample", "n_groups": int(n_groups), "timeout_s": float(timeout_s), **arguments}
        header, frames = self._call(request, wait_s=timeout_s + REPLY_GRACE_S)
        self.last_refusal = header.get("refused")
        return header, frames

    def commit(self, lease_ids: list[int]) -> list[int]:
        """Make the leases' uses final; returns the ids that were not outstanding."""
        request = {"verb": "commit", "leases": [int(i) for i in lease_ids], "token": self.learner_token}
        return self._call(request)[0]["unknown"]

    def resume_learner(self, version: int, trained: list[int]) -> int:
        """A learner group starts from weights of ``version`` covering the leases ``trained``:
        those are committed, the rest released; returns the version to publish under."""
        request = {"verb": "resume_learner", "version": int(version), "trained": [int(i) for i in trained],
                   "token": self.learner_token}
        return self._call(request)[0]["learner_version"]

    def stats(self) -> dict:
        return self._call({"verb": "stats"})[0]["stats"]

    def set_learner_version(self, version: int) -> int:
        """Announce the learner's policy version before weights are published under it (needs
        ``learner_token``). It only moves up."""
        request = {"verb": "set_learner_version", "version": int(version), "token": self.learner_token}
        return self._call(request)[0]["learner_version"]

    def head(self, n: int = 10, *, random: bool = False, where: str | None = None,
             data_source: str | None = None, min_staleness: int | None = None) -> pa.Table:
        """The newest ``n`` stored rows (or ``n`` random ones) passing the filters; inspection
        only, with ``staleness`` and ``status`` columns added."""
        request = {"verb": "head", "n": n, "random": random, "where": where,
                   "data_source": data_source, "min_staleness": min_staleness}
        return ipc_to_table(self._call(request)[1][0])

    def durable_groups(self, group_ids: list[str]) -> list[bool]:
        """Per group id: is that whole group durable in the buffer (stored or retired)?"""
        return self._call({"verb": "durable_groups", "group_ids": list(group_ids)})[0]["durable"]

    def ping(self) -> dict:
        return self._call({"verb": "ping"})[0]

    def close(self) -> None:
        self._socket.close()

    def __enter__(self) -> BufferClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ transport

    def _call(self, header: dict, payload: list | None = None, *, wait_s: float | None = None,
              raise_error: bool = True) -> tuple[dict, list]:
        request_id = self._send(header, payload)
        deadline = time.monotonic() + (self.timeout_s if wait_s is None else wait_s)
        _, reply, frames = self._receive({request_id: deadline}, header["verb"])
        if raise_error and not reply["ok"]:
            raise BufferRequestError(reply["error"])
        return reply, frames

    def _send(self, header: dict, payload: list | None = None) -> int:
        """Send a request; returns its id."""
        request_id = next(self._ids)
        try:
            self._socket.send_multipart([pack_header({**header, "id": request_id}), *(payload or [])],
                                        copy=False)
        except zmq.Again:
            raise TimeoutError(f"buffer at {self.address}: not connected ({header['verb']!r})") from None
        return request_id

    def _receive(self, deadlines: dict[int, float], verb: str) -> tuple[int, dict, list]:
        """The next reply to one of the requests in ``deadlines`` (request id: when its reply
        is overdue): ``(request id, header, payload frames)``."""
        while True:
            remaining_ms = int(max(0.0, min(deadlines.values()) - time.monotonic()) * 1000)
            if not self._socket.poll(remaining_ms):
                raise TimeoutError(f"buffer at {self.address}: no reply to {verb!r}")
            frames = self._socket.recv_multipart(copy=False)
            reply = unpack_header(frames[0].buffer)
            if reply.get("id") in deadlines:
                return reply["id"], reply, [f.buffer for f in frames[1:]]
            # else the late answer to a request that already timed out


def _insert_payload(batch: pa.RecordBatch | pa.Table) -> pa.Buffer:
    """A record batch goes checksummed, in the bytes a segment holds: the service appends them
    as they came (a table, maybe chunked, is decoded and encoded again there)."""
    return encode_stream(batch)[0] if isinstance(batch, pa.RecordBatch) else table_to_ipc(batch)


def _ack(reply: dict) -> dict:
    return {k: reply[k] for k in ("accepted", "duplicates", "fsynced")}
