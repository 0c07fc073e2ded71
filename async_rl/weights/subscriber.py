"""The weight subscriber (one per actor): receives, verifies, and hands over weight sets.

A DEALER socket connected to the publisher's ROUTER (protocol in ``wire.py``). While idle
it sends HELLO every ``heartbeat_s`` with the version it holds, so a new or restarted
subscriber gets the latest version and a restarted publisher learns about it again.

Chunks are received straight into one preallocated receive buffer (``recv_into``), each
checked against its checksum on arrival. ``on_weights(version, named_tensors)`` is called
only with a complete set whose every chunk verified and whose version is newer than the
last one delivered; a corrupted, truncated, duplicated, stalled or older transfer is
dropped, counted in ``stats`` and logged, never handed over. The tensors are views of the
receive buffer, valid until ``on_weights`` returns (copy what you keep; vLLM's
``load_weights`` copies into its parameters). ``on_weights`` runs on the subscriber's
thread; transfers wait while it runs.

Same host (``transport`` auto or shm, and a HEADER whose ``shm`` host is ours): the
tensors are views of a private mapping of the publisher's /dev/shm file instead — no
receive buffer, no copy. The file's shared lock is held from before verification until
``on_weights`` returns, so the verified bytes cannot change under the callback, and
writes the callback makes stay in its own copy-on-write pages. If the file cannot be
mapped the transfer streams as above (with ``transport=shm`` it is dropped instead).

Shutdown order in ``close``: stop the thread, close the socket, end the context, unmap.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil
import torch
import zmq

from async_rl.config import WeightsConfig
from async_rl.weights import wire
from async_rl.weights.keys import secure_client
from async_rl.weights.shm import MappedFiles, Reading, host_id

log = logging.getLogger(__name__)

OnWeights = Callable[[int, list[tuple[str, torch.Tensor]]], None]

# Poll period while waiting: bounds how late heartbeats and stall checks run.
POLL_MS = 50
NO_VERSION = -1


@dataclass
class _Transfer:
    header: wire.Header
    missing: set[int]
    last_activity: float
    owed_credits: int = 0


@dataclass
class _Arena:
    """The receive buffer and what it holds: ``base`` = (publisher, version) or None."""

    buffer: torch.Tensor
    layout: str
    base: tuple[int, int] | None = None
    checksums: tuple[int, ...] = ()
    view: memoryview = field(init=False)

    def __post_init__(self) -> None:
        self.view = memoryview(self.buffer.numpy())


class WeightSubscriber:
    """Receives weight sets from ``address`` and passes each verified one to ``on_weights``."""

    def __init__(self, address: str, on_weights: OnWeights, cfg: WeightsConfig) -> None:
        self._address = address
        self._on_weights = on_weights
        self._cfg = cfg
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._delivered = threading.Condition()
        self._have = NO_VERSION
        self._arena: _Arena | None = None
        self._transfer: _Transfer | None = None
        self._last_header = (0, 0)  # (pub, xfer) of the last header acted on; xfer ids start at 1
        self._next_hello = 0.0
        self._host = host_id() if cfg.transport != "tcp" else None
        self._mapped = MappedFiles()
        self._workers: wire.ChunkWorkers | None = None
        self.stats = {
            "delivered": 0, "delivered_shm": 0, "bytes_received": 0, "rejected_corrupt": 0,
            "rejected_truncated": 0, "rejected_old": 0, "rejected_malformed": 0,
            "dropped_stalled": 0, "dropped_aborted": 0, "dropped_unmapped": 0,
            "duplicate_chunks": 0, "callback_errors": 0, "shm_fallbacks": 0, "message_errors": 0,
        }

    @property
    def version(self) -> int | None:
        """The last version handed to ``on_weights`` (None before the first)."""
        return None if self._have == NO_VERSION else self._have

    def start(self) -> WeightSubscriber:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        if self._cfg.curve_keys_dir:
            secure_client(self._sock, self._cfg.curve_keys_dir)
        self._sock.setsockopt(zmq.LINGER, 0)
        # Queue nothing for a publisher that is not connected: stale HELLOs and credits
        # would reach a restarted publisher late; the next heartbeat says the same, fresh.
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        self._sock.connect(self._address)
        self._thread = threading.Thread(target=self._run, name="weight-subscriber", daemon=True)
        self._thread.start()
        return self

    def wait_for(self, version: int, timeout: float) -> bool:
        """Block until ``version`` (or newer) was delivered; False on timeout."""
        with self._delivered:
            return self._delivered.wait_for(lambda: self._have >= version, timeout)

    def close(self) -> None:
        """Stop receiving and release the socket (idempotent)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._ctx.term()
        self._mapped.close()
        if self._workers is not None:
            self._workers.close()

    def __enter__(self) -> WeightSubscriber:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ subscriber thread

    @property
    def alive(self) -> bool:
        """The receiving thread runs (a bad message never stops it; only ``close`` does)."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._tick(time.monotonic())
                if self._sock.poll(POLL_MS, zmq.POLLIN):
                    self._receive_guarded()
        except Exception:
            log.exception("weight subscriber thread failed; no further weights will load")
        finally:
            self._sock.close(linger=0)

    def _receive_guarded(self) -> None:
        """One message; whatever it does wrong costs that message (and its transfer), never
        the thread: later versions must still load."""
        try:
            self._receive_one()
        except Exception:
            self.stats["message_errors"] += 1
            log.exception("dropped a weight message that could not be handled")
            self._discard_rest()
            if self._transfer is not None:
                self._drop("rejected_malformed", "a message of this transfer could not be handled")

    def _tick(self, now: float) -> None:
        transfer = self._transfer
        if transfer is not None and now - transfer.last_activity > self._cfg.stall_timeout_s:
            self._drop("dropped_stalled", f"transfer of v{transfer.header.version} stalled")
        if self._transfer is None and now >= self._next_hello:
            self._next_hello = now + self._cfg.heartbeat_s
            arena = self._arena
            base = arena.base if arena is not None and arena.base is not None else (0, NO_VERSION)
            sent = self._send(wire.HELLO, {
                "proto": wire.PROTO, "have": self._have, "base_pub": base[0], "base": base[1],
                "layout": arena.layout if arena is not None else "",
            })
            if not sent:  # not connected yet: try again soon rather than a heartbeat later
                self._next_hello = now + POLL_MS / 1000

    def _send(self, kind: bytes, body: dict) -> bool:
        try:
            self._sock.send_multipart(wire.pack(kind, body), flags=zmq.NOBLOCK)
            return True
        except zmq.Again:  # not connected right now; the heartbeat retries
            return False

    def _receive_one(self) -> None:
        kind = self._sock.recv()
        body_frame = self._sock.recv() if self._sock.rcvmore else None
        if kind == wire.CHUNK and body_frame is not None and self._sock.rcvmore:
            self._on_chunk(body_frame)
        elif kind in (wire.HEADER, wire.IDLE, wire.ABORT) and body_frame is not None:
            self._on_control(kind, body_frame)
        else:
            self.stats["rejected_malformed"] += 1
            log.warning("dropped a malformed message from the weight publisher (kind %r)", kind[:8])
        self._discard_rest()

    def _discard_rest(self) -> None:
        while self._sock.rcvmore:
            self._sock.recv(copy=False)

    def _on_control(self, kind: bytes, frame: bytes) -> None:
        try:
            body = wire.unpack(frame)
            if kind == wire.HEADER:
                self._on_header(wire.header_from_body(body))
        except wire.WireError as exc:
            self.stats["rejected_malformed"] += 1
            log.warning("dropped a bad weight header: %s", exc)
            return
        if kind == wire.ABORT and self._transfer is not None:
            if body.get("xfer") == self._transfer.header.xfer:
                self._drop("dropped_aborted", "publisher no longer has this transfer")

    # ------------------------------------------------------------------ a transfer

    def _on_header(self, header: wire.Header) -> None:
        if (header.pub, header.xfer) == self._last_header:
            return  # the publisher repeated a header our HELLO crossed (a /dev/shm read may be done)
        self._last_header = (header.pub, header.xfer)
        running = self._transfer
        if running is not None:
            self._drop("dropped_aborted", f"superseded by a new header (v{header.version})")
        if header.version <= self._have:
            self._reject(header, "rejected_old", f"v{header.version} is not newer than v{self._have}")
            return
        if self._host is not None and header.shm_host == self._host and self._read_shm(header):
            return
        if self._cfg.transport == "shm":
            self._reject(header, "dropped_unmapped", f"v{header.version} is not mappable from /dev/shm here")
            return
        if header.base >= 0 and not self._holds_base(header):
            self._reject(header, "rejected_malformed", f"delta on v{header.base} we do not hold")
            return
        arena = self._arena_for(header)
        arena.base = None  # about to be overwritten: not a delta base until complete
        self._transfer = _Transfer(header, set(header.chunks_sent()), time.monotonic())
        self._send(wire.CREDIT, {"xfer": header.xfer, "n": self._cfg.credit_chunks})
        if not self._transfer.missing:
            self._complete()

    def _holds_base(self, header: wire.Header) -> bool:
        arena = self._arena
        return (
            arena is not None and arena.base == (header.pub, header.base)
            and arena.layout == header.layout
        )

    def _arena_for(self, header: wire.Header) -> _Arena:
        """The receive buffer, reallocated only when the tensor table changes."""
        arena = self._arena
        if arena is None or arena.layout != header.layout:
            self._arena = None  # free the old buffer before allocating the new one
            if header.total_bytes > psutil.virtual_memory().total:  # overcommit would say yes
                raise wire.WireError(f"v{header.version}: {header.total_bytes} bytes exceed this host's memory")
            try:
                buffer = torch.empty(max(header.total_bytes, 1), dtype=torch.uint8)
            except (RuntimeError, MemoryError) as exc:  # a header announcing more than we have
                raise wire.WireError(f"v{header.version}: cannot hold {header.total_bytes} bytes ({exc})") from None
            arena = self._arena = _Arena(buffer, header.layout)
        return arena

    def _on_chunk(self, meta_frame: bytes) -> None:
        transfer = self._transfer
        try:
            meta = wire.unpack(meta_frame)
        except wire.WireError:
            meta = {}
        if transfer is None or meta.get("xfer") != transfer.header.xfer:
            return  # a leftover of a dropped transfer; _discard_rest eats the payload
        index = meta.get("i")
        if type(index) is not int:  # 1.0 == 1 would pass the set test, then slice with a float
            self.stats["rejected_malformed"] += 1
            return
        if index not in transfer.missing:
            self.stats["duplicate_chunks"] += 1
            return
        start, stop = transfer.header.chunk_span(index)
        received = self._sock.recv_into(self._arena.view[start:stop])
        transfer.last_activity = time.monotonic()
        if received != stop - start:
            self._drop("rejected_truncated", f"chunk {index}: {received} bytes, expected {stop - start}")
            return
        if wire.chunk_checksum(self._arena.view[start:stop], index) != transfer.header.checksums[index]:
            self._drop("rejected_corrupt", f"chunk {index} of v{transfer.header.version} failed its checksum")
            return
        transfer.missing.discard(index)
        self.stats["bytes_received"] += received
        self._grant_credit(transfer)
        if not transfer.missing:
            self._complete()

    def _read_shm(self, header: wire.Header) -> bool:
        """Verify and deliver ``header``'s version from the publisher's /dev/shm file.

        False (nothing sent) when the file cannot be mapped, so the caller streams it.
        """
        try:
            reading = self._mapped.open(header.pub, header.version, header.total_bytes)
        except OSError as exc:
            self.stats["shm_fallbacks"] += 1
            log.info("weights v%d: /dev/shm file not mappable (%s)", header.version, exc)
            return False
        with reading:  # holds the file's shared lock: the publisher cannot rewrite it meanwhile
            bad = self._first_bad_chunk(reading, header)
            if bad is not None and not reading.fresh:  # our copy-on-write pages, not the file
                self._mapped.remap(reading)
                bad = self._first_bad_chunk(reading, header)
            if bad is not None:
                self._reject(header, "rejected_corrupt", f"chunk {bad} of v{header.version} in /dev/shm "
                             "failed its checksum")
                return True
            ok = self._deliver(header, reading.buffer)
        self.stats["delivered_shm"] += ok
        self._send(wire.DONE, {"xfer": header.xfer, "version": header.version, "ok": ok, "shm": True})
        self._next_hello = time.monotonic() + self._cfg.heartbeat_s
        return True

    def _first_bad_chunk(self, reading: Reading, header: wire.Header) -> int | None:
        if self._workers is None:
            self._workers = wire.ChunkWorkers(min(wire.MAX_CHUNK_THREADS, os.cpu_count() or 1))
        return wire.first_bad_chunk(reading.view, header.checksums, header.chunk_bytes, self._workers)

    def _grant_credit(self, transfer: _Transfer) -> None:
        transfer.owed_credits += 1
        if transfer.owed_credits >= max(1, self._cfg.credit_chunks // 2) and transfer.missing:
            self._send(wire.CREDIT, {"xfer": transfer.header.xfer, "n": transfer.owed_credits})
            transfer.owed_credits = 0

    def _complete(self) -> None:
        header, arena = self._transfer.header, self._arena
        self._transfer = None
        if header.send is not None:
            kept = set(range(header.n_chunks)) - set(header.send)
            if any(arena.checksums[i] != header.checksums[i] for i in kept):
                self.stats["rejected_corrupt"] += 1
                log.warning("dropped delta v%d: chunks we kept differ from the publisher's", header.version)
                self._send(wire.DONE, {"xfer": header.xfer, "version": header.version, "ok": False})
                return
        arena.base, arena.checksums = (header.pub, header.version), header.checksums
        ok = self._deliver(header, arena.buffer)
        self._send(wire.DONE, {"xfer": header.xfer, "version": header.version, "ok": ok})
        self._next_hello = time.monotonic() + self._cfg.heartbeat_s

    def _deliver(self, header: wire.Header, buffer: torch.Tensor) -> bool:
        try:
            self._on_weights(header.version, wire.tensor_views(buffer, header.tensors))
        except Exception:
            self.stats["callback_errors"] += 1
            log.exception("on_weights failed for v%d; it stays unloaded", header.version)
            return False
        with self._delivered:
            self._have = header.version
            self.stats["delivered"] += 1
            self._delivered.notify_all()
        return True

    def _reject(self, header: wire.Header, reason: str, why: str) -> None:
        self.stats[reason] += 1
        log.warning("dropped weight transfer: %s", why)
        self._send(wire.DONE, {"xfer": header.xfer, "version": header.version, "ok": False})

    def _drop(self, reason: str, why: str) -> None:
        """Abandon the running transfer; the buffer holds no usable base until the next one."""
        transfer, self._transfer = self._transfer, None
        self.stats[reason] += 1
        log.warning("dropped weight transfer v%d: %s", transfer.header.version, why)
        self._send(wire.DONE, {"xfer": transfer.header.xfer, "version": transfer.header.version, "ok": False})
        self._next_hello = time.monotonic() + self._cfg.heartbeat_s
