"""The weight publisher (learner rank 0): announces versions and streams them to actors.

Socket pattern: one ROUTER socket; every subscriber is a DEALER that pulls.

Invariant — no subscriber can silently miss a version: the publisher keeps, per
subscriber, the version it last confirmed (``have``, from its HELLO heartbeat or its DONE).
Whenever the latest version is newer than a subscriber's ``have`` and no transfer to it
is running, a transfer of the latest version starts. Nothing is broadcast and nothing is
sent without credit, so a slow subscriber only slows itself, a newly joined one gets the
latest version on its first HELLO, and a lost message costs one heartbeat, not a version.

A new version supersedes an older one for every subscriber that has not started it
(only the latest is ever announced); a transfer already under way finishes first, then
the subscriber gets the latest. A subscriber silent for ``stall_timeout_s`` is forgotten;
its next HELLO starts over. Flow control: a subscriber grants its ``credit_chunks``, then
one credit per chunk received, so at most that many chunks (never above
``wire.MAX_CREDITS``) per subscriber sit in socket queues and the send high-water mark
below is never reached.

Same host: with ``transport`` auto or shm the send buffer is a file in /dev/shm
(``shm.py``) and the HEADER says so; a subscriber that maps it grants no credit, so
nothing is streamed to it, and answers DONE as usual. Subscribers elsewhere stream it.

Threads: ``publish`` runs in the caller's thread (copy into a send buffer and checksum it
with a few chunk workers, then return); one background thread owns the socket
(announcing, streaming). Shutdown order in ``close``: stop the thread, close the socket,
stop the authenticator, end the context, remove the /dev/shm files.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import zmq

from async_rl.config import WeightsConfig, is_wildcard, tcp_host
from async_rl.weights import wire
from async_rl.weights.keys import secure_server
from async_rl.weights.sendbuffer import BufferPool, Snapshot, copy_and_hash
from async_rl.weights.shm import ShmStore, host_id

log = logging.getLogger(__name__)

# Idle poll period: bounds how late peer expiry runs when nothing else happens.
IDLE_POLL_MS = 100
# Messages drained per loop turn before sending again (keeps streaming fair to control traffic).
MAX_RECV_PER_TURN = 256
# Queue room per subscriber beyond its credit window, for control messages.
HWM_SLACK = 64


@dataclass
class _Transfer:
    xfer: int
    snapshot: Snapshot
    chunks: Sequence[int]
    position: int = 0
    credits: int = 0
    tracker: zmq.MessageTracker | None = None
    header_frames: list[bytes] | None = None


@dataclass
class _Peer:
    ident: bytes
    last_seen: float
    have: int = -1
    base_pub: int = 0
    base: int = -1
    layout: str = ""
    transfer: _Transfer | None = None


def _endpoint(cfg: WeightsConfig) -> str:
    if cfg.endpoint:
        host = tcp_host(cfg.endpoint)
        if host is not None and is_wildcard(host):
            raise ValueError(f"weights.endpoint={cfg.endpoint}: a wildcard cannot be given to subscribers")
        return cfg.endpoint
    host = _host(cfg)
    host = f"[{host}]" if ":" in host else host
    return f"tcp://{host}:{cfg.port or '*'}"


def _host(cfg: WeightsConfig) -> str:
    """The bind address: ``weights.host``, which a job sets to its learner node's address. Never a
    wildcard (the config refuses one too): subscribers are given the address that was bound."""
    host = cfg.host or "127.0.0.1"
    if is_wildcard(host):
        raise ValueError(f"weights.host={host}: a wildcard cannot be given to subscribers; bind this node's address")
    return host


class WeightPublisher:
    """Binds on construction; ``address`` is what subscribers connect to."""

    def __init__(self, cfg: WeightsConfig) -> None:
        self._cfg = cfg
        self._ctx = zmq.Context()  # its own context, so the CURVE authenticator covers only us
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._auth = None
        try:
            self._bind(cfg)
        except Exception:
            self._sock.close(linger=0)
            if self._auth is not None:
                self._auth.stop()
            self._ctx.term()
            raise
        self.address = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._pub = random.getrandbits(63)  # tells a restarted publisher's transfers apart
        self._xfer_ids = itertools.count(1)
        store = _shm_store(self._pub, cfg.transport)
        self._host = host_id() if store is not None else None
        self._pool = BufferPool(store)
        self._workers = wire.ChunkWorkers(min(wire.MAX_CHUNK_THREADS, os.cpu_count() or 1))
        self._lock = threading.Lock()
        self._pending: Snapshot | None = None
        self._last_version = -1
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        self._closing = threading.Event()
        self._latest: Snapshot | None = None
        self._changed_at: list[int] = []
        self._tracked_since = -1
        self._peers: dict[bytes, _Peer] = {}
        self._bytes_sent = 0
        self._thread = threading.Thread(target=self._run, name="weight-publisher", daemon=True)
        self._thread.start()

    def _bind(self, cfg: WeightsConfig) -> None:
        if cfg.curve_keys_dir:
            self._auth = secure_server(self._ctx, self._sock, cfg.curve_keys_dir)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.setsockopt(zmq.SNDHWM, wire.MAX_CREDITS + HWM_SLACK)
        self._sock.setsockopt(zmq.LINGER, 0)
        if ":" in _host(cfg) and not cfg.endpoint:
            self._sock.setsockopt(zmq.IPV6, 1)
        self._sock.bind(_endpoint(cfg))

    # ------------------------------------------------------------------ caller side

    def publish(self, version: int, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Snapshot ``named_tensors`` as ``version`` and return; streaming runs in the background.

        Versions must increase. The tensors may be modified as soon as this returns.
        """
        if version <= self._last_version:
            raise ValueError(f"publish version {version} must exceed the last one ({self._last_version})")
        if self._closing.is_set():
            raise RuntimeError("publish on a closed WeightPublisher")
        specs, total = wire.plan_layout(named_tensors, self._cfg.wire_dtype)
        tensors = [tensor for _, tensor in named_tensors]
        with self._lock:  # one not yet announced is superseded now; its buffer may serve this one
            superseded, self._pending = self._pending, None
        if superseded is not None:
            self._pool.release(superseded)
        pinned = any(t.is_cuda for t in tensors) and torch.cuda.is_available()
        buffer, shm_file = self._pool.acquire(total, pinned, version)
        snapshot = Snapshot(
            version, specs, wire.layout_id(specs), total, self._cfg.chunk_bytes, buffer, shm=shm_file
        )
        try:
            copy_and_hash(snapshot, tensors, self._workers)
        except BaseException:
            self._pool.release(snapshot)
            raise
        with self._lock:
            self._pending = snapshot
        self._last_version = version
        os.write(self._wake_write, b"\0")

    def stats(self) -> dict:
        """Latest hashed version, bytes streamed, and each subscriber's state (for status/tests)."""
        latest = self._latest
        peers = []
        for peer in list(self._peers.values()):
            transfer = peer.transfer
            peers.append(
                {
                    "have": peer.have,
                    "version": transfer.snapshot.version if transfer else None,
                    "sent": transfer.position if transfer else 0,
                    "chunks": len(transfer.chunks) if transfer else 0,
                }
            )
        return {
            "latest": latest.version if latest else None,
            "shm": str(latest.shm.path) if latest and latest.shm else None,
            "bytes_sent": self._bytes_sent,
            "peers": peers,
        }

    def close(self) -> None:
        """Stop streaming and release the socket (idempotent)."""
        if self._closing.is_set():
            return
        self._closing.set()
        os.write(self._wake_write, b"\0")
        self._thread.join()
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()
        self._workers.close()
        self._pending = self._latest = None
        self._pool.close()
        os.close(self._wake_read)
        os.close(self._wake_write)

    def __enter__(self) -> WeightPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ publisher thread

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        try:
            while not self._closing.is_set():
                events = dict(poller.poll(0 if self._sendable() else IDLE_POLL_MS))
                if self._wake_read in events:
                    self._drain_wake()
                self._receive()
                self._adopt_pending()
                self._send_chunks()
                self._expire(time.monotonic())
        except Exception:
            log.exception("weight publisher thread failed; subscribers will stall and retry")
        finally:
            self._sock.close(linger=0)

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass

    def _adopt_pending(self) -> None:
        with self._lock:
            snapshot, self._pending = self._pending, None
        if snapshot is not None:
            self._install(snapshot)

    def _install(self, snapshot: Snapshot) -> None:
        """Make a snapshot the latest and offer it to every idle subscriber behind it."""
        if snapshot.shm is not None:
            snapshot.shm.publish()
        previous, self._latest = self._latest, snapshot
        if previous is not None:
            self._pool.retire(previous)
        if previous is not None and previous.layout == snapshot.layout:
            for index, (old, new) in enumerate(zip(previous.checksums, snapshot.checksums)):
                if old != new:
                    self._changed_at[index] = snapshot.version
        else:
            self._changed_at = [snapshot.version] * snapshot.n_chunks
            self._tracked_since = snapshot.version
        if previous is not None and previous.refs == 0:
            self._pool.release(previous)
        for peer in list(self._peers.values()):
            if peer.transfer is None and peer.have < snapshot.version:
                self._start_transfer(peer)

    # ------------------------------------------------------------------ messages in

    def _receive(self) -> None:
        for _ in range(MAX_RECV_PER_TURN):
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3 or frames[1] not in (wire.HELLO, wire.CREDIT, wire.DONE):
                log.warning("dropped a malformed message (%d frames) from a subscriber", len(frames))
                continue
            try:
                body = wire.unpack(frames[2])
            except wire.WireError as exc:
                log.warning("dropped an undecodable subscriber message: %s", exc)
                continue
            peer = self._peers.get(frames[0])
            if peer is None:
                peer = self._peers[frames[0]] = _Peer(frames[0], time.monotonic())
            peer.last_seen = time.monotonic()
            {wire.HELLO: self._on_hello, wire.CREDIT: self._on_credit, wire.DONE: self._on_done}[
                frames[1]
            ](peer, body)

    def _on_hello(self, peer: _Peer, body: dict) -> None:
        try:
            peer.have, peer.base_pub, peer.base, peer.layout = _hello_fields(body)
        except wire.WireError as exc:
            log.warning("dropped a bad HELLO: %s", exc)
            return
        transfer = peer.transfer
        if transfer is not None and transfer.position == 0 and transfer.snapshot is self._latest:
            # The HELLO crossed our HEADER in flight: repeat it (same xfer) rather than restart.
            self._send(peer, transfer.header_frames)
            return
        if transfer is not None:  # the subscriber gave the running transfer up
            self._end_transfer(peer)
        latest = self._latest
        if latest is not None and latest.version > peer.have:
            self._start_transfer(peer)
        else:
            self._send(peer, wire.pack(wire.IDLE, {"latest": latest.version if latest else -1}))

    def _on_credit(self, peer: _Peer, body: dict) -> None:
        transfer = peer.transfer
        if transfer is None or body.get("xfer") != transfer.xfer:
            self._send(peer, wire.pack(wire.ABORT, {"xfer": body.get("xfer")}))
            return
        granted = body.get("n")
        if type(granted) is int and granted > 0:
            transfer.credits = min(transfer.credits + granted, wire.MAX_CREDITS)

    def _on_done(self, peer: _Peer, body: dict) -> None:
        transfer = peer.transfer
        if transfer is None or body.get("xfer") != transfer.xfer:
            return
        snapshot = transfer.snapshot
        self._end_transfer(peer)
        if body.get("ok") is True:
            peer.have = snapshot.version
            if body.get("shm") is not True:  # a /dev/shm read leaves its receive buffer as it was
                peer.base_pub, peer.base, peer.layout = self._pub, snapshot.version, snapshot.layout
            if self._latest is not None and self._latest.version > peer.have:
                self._start_transfer(peer)

    # ------------------------------------------------------------------ messages out

    def _start_transfer(self, peer: _Peer) -> None:
        snapshot = self._latest
        send = self._delta_chunks(peer, snapshot)
        transfer = _Transfer(
            next(self._xfer_ids), snapshot, range(snapshot.n_chunks) if send is None else send
        )
        header = wire.Header(
            pub=self._pub, xfer=transfer.xfer, version=snapshot.version, tensors=snapshot.specs,
            total_bytes=snapshot.total_bytes, chunk_bytes=snapshot.chunk_bytes,
            checksums=tuple(snapshot.checksums), send=None if send is None else tuple(send),
            base=-1 if send is None else peer.base, layout=snapshot.layout,
            shm_host=self._host if snapshot.shm is not None else None,
        )
        snapshot.refs += 1
        peer.transfer = transfer
        transfer.header_frames = wire.pack(wire.HEADER, wire.header_body(header))
        self._send(peer, transfer.header_frames)

    def _delta_chunks(self, peer: _Peer, snapshot: Snapshot) -> list[int] | None:
        """Chunks changed since the subscriber's base version, or None for a full transfer."""
        usable = (
            self._cfg.changed_only and peer.base >= self._tracked_since >= 0
            and peer.base_pub == self._pub and peer.layout == snapshot.layout
        )
        if not usable:
            return None
        return [i for i, changed in enumerate(self._changed_at) if changed > peer.base]

    def _end_transfer(self, peer: _Peer) -> None:
        transfer, peer.transfer = peer.transfer, None
        snapshot = transfer.snapshot
        snapshot.refs -= 1
        if transfer.tracker is not None:
            snapshot.trackers.append(transfer.tracker)
        if snapshot.refs == 0 and snapshot is not self._latest:
            self._pool.release(snapshot)

    def _sendable(self) -> bool:
        return any(
            p.transfer is not None and p.transfer.credits > 0
            and p.transfer.position < len(p.transfer.chunks)
            for p in self._peers.values()
        )

    def _send_chunks(self) -> None:
        for peer in list(self._peers.values()):
            transfer = peer.transfer
            while transfer is not None and transfer.credits > 0 and transfer.position < len(transfer.chunks):
                index = transfer.chunks[transfer.position]
                meta = wire.pack(wire.CHUNK, {"xfer": transfer.xfer, "i": index})
                payload = transfer.snapshot.chunk(index)
                tracker = self._send(peer, [*meta, payload], zero_copy=True)
                if tracker is None:
                    break
                transfer.tracker = tracker
                transfer.position += 1
                transfer.credits -= 1
                self._bytes_sent += len(payload)
                transfer = peer.transfer  # a failed send may have dropped the peer

    def _send(self, peer: _Peer, frames: list, zero_copy: bool = False) -> zmq.MessageTracker | None:
        """Send to one subscriber without blocking; an unreachable one is forgotten."""
        try:
            return self._sock.send_multipart(
                [peer.ident, *frames], flags=zmq.NOBLOCK, copy=not zero_copy, track=zero_copy
            ) or zmq.MessageTracker()
        except zmq.Again:
            return None
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                raise
            self._forget(peer)
            return None

    def _forget(self, peer: _Peer) -> None:
        if peer.transfer is not None:
            self._end_transfer(peer)
        self._peers.pop(peer.ident, None)

    def _expire(self, now: float) -> None:
        for peer in list(self._peers.values()):
            if now - peer.last_seen > self._cfg.stall_timeout_s:
                log.info("forgot a weight subscriber silent for %.1fs", now - peer.last_seen)
                self._forget(peer)


def _shm_store(pub: int, transport: str) -> ShmStore | None:
    """Where this publisher keeps /dev/shm send buffers; None streams only."""
    if transport == "tcp":
        return None
    if host_id() is None:
        log.log(logging.WARNING if transport == "shm" else logging.DEBUG,
                "weights: no /dev/shm on this host; every subscriber streams")
        return None
    try:
        return ShmStore(pub)
    except OSError as exc:
        log.warning("weights: cannot use /dev/shm (%s); every subscriber streams", exc)
        return None


def _hello_fields(body: dict) -> tuple[int, int, int, str]:
    """(have, base_pub, base, layout) from a HELLO body."""
    if body.get("proto") != wire.PROTO:
        raise wire.WireError(f"protocol {body.get('proto')!r} is not {wire.PROTO}")
    have, base_pub, base, layout = (body.get(k) for k in ("have", "base_pub", "base", "layout"))
    if not all(type(v) is int for v in (have, base_pub, base)) or not isinstance(layout, str):
        raise wire.WireError("HELLO fields have, base_pub, base must be ints and layout a string")
    return have, base_pub, base, layout
