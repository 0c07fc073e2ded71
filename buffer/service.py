"""The buffer as its own process behind one ZeroMQ ROUTER socket.

    python -m buffer.service --dir RUN_DIR/buffer [--host 127.0.0.1] [--port 0] [--config-json '{...}']

Actors send ``insert`` requests from DEALER sockets and may keep several in flight (a push
stream with an acknowledgement per batch: an ack means the rows are durable under the fsync
policy). Under ``fsync: batch`` replies that promise durability (insert acks, samples, the
learner version) wait for a group commit (``buffer/commit.py``): one fsync, running on its own
thread while the loop keeps appending, covers every request written before it started. A
failed append is answered with a retryable error; a failed fsync stops the service, which
then recovers from disk on restart. The learner and tools send ``sample``, ``stats``,
``set_learner_version`` and ``head``; the learner samples with ``lease`` and later sends
``commit`` (its checkpoint covers the leases) and, when a learner group starts,
``resume_learner`` (``buffer/store.py``); the controller asks ``durable_groups`` (which of these
group ids are durable here) to reconcile the prompt cursor (``buffer/cursor.py``). Only the
learner may set the learner version, lease, commit or resume: the request must carry the secret
of ``DIR/learner.token`` (mode 0600), and the version only moves up. Wire format:
``buffer/wire.py`` (msgpack header + Arrow IPC bytes, never pickle). With the
job's CURVE keys (required off loopback) every byte is encrypted and only clients holding the
job's client key are admitted.

One thread owns the store. A ``sample`` that the rate limiter refuses is parked until it can
be served or its ``timeout_s`` passes, so a blocked learner never stalls the actors.
Bad requests (unknown verb, bad header, wrong schema, oversized) get an error reply and the
loop keeps serving. On start the bound address is written to ``DIR/service.json``.

Shutdown order: SIGTERM/SIGINT sets a flag → the loop answers parked samples with a refusal
→ replies waiting for a group commit get it → the fsync thread stops → the store closes (active segment gets its end-of-stream marker, journal fsynced) → the
socket closes → ``service.json`` is removed.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hmac
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from async_rl.config import BufferConfig
from async_rl.weights.keys import secure_server
from buffer import inspection
from buffer.commit import CommitQueue
from buffer.schema import MAX_POLICY_VERSION, TRAJECTORY_SCHEMA, SchemaError, warm_up
from buffer.segments import decode_checksummed
from buffer.store import AppendFailed, RateLimited, ReplayStore
from buffer.wire import (
    VERBS,
    float_arg,
    int_arg,
    ipc_to_table,
    lease_ids_arg,
    pack_header,
    table_to_ipc,
    unpack_header,
)

log = logging.getLogger("buffer.service")

SERVICE_FILE = "service.json"
LEARNER_TOKEN_FILE = "learner.token"  # mode 0600: only the job's user (its learner) can read it
POLL_MS = 50  # loop wake-up for parked samples, interval fsync and the stop flag
MAX_HEAD_ROWS = 10_000  # bounds a `head` reply
MAX_SAMPLE_WAIT_S = 3600.0  # a parked sample is answered within an hour, whatever it asked for
MAX_PARKED_SAMPLES = 1024  # far above learner ranks x requests in flight; bounds memory and work
MAX_SAMPLE_GROUPS = 1 << 20  # more groups than a buffer of capacity_rows=1e6 could ever hold
MAX_GROUP_QUERY = 1 << 16  # group ids per durable_groups request (the cursor's in-flight keys)
MAX_GROUP_ID_CHARS = 1024
FSYNC_THREAD_SWITCH_S = 0.0005  # GIL switch interval of the service process (default 5 ms)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
HEAP_MMAP_THRESHOLD = 32 << 20  # glibc's largest: requests below it come from the heap
HEAP_TRIM_THRESHOLD = 64 << 20  # free heap kept for the next messages (~24 of 2.6 MB)


@dataclass
class ParkedSample:
    identity: bytes
    header: dict
    deadline: float


@dataclass
class DurableReply:
    """A reply held back (in a ``CommitQueue``) until a group commit has fsynced what it promises."""

    identity: bytes
    header: dict
    payload: list | None
    fields: dict


@dataclass
class BufferService:
    store: ReplayStore
    cfg: BufferConfig
    learner_token: str  # what a set_learner_version request must carry
    curve_keys_dir: str | None = None  # the job's CURVE keys: only their clients get through
    parked: list[ParkedSample] = field(default_factory=list)
    stopping: bool = False
    parent_pid: int | None = None  # stop when this process is gone (no orphaned services)
    waiting: CommitQueue | None = None  # replies held for their group commit (fsync: batch)
    failed: bool = False  # an fsync failed: stop, and let a restart recover from disk

    def bind(self, host: str, port: int) -> str:
        self.ctx = zmq.Context()  # its own: the CURVE authenticator covers only this socket
        self.socket = self.ctx.socket(zmq.ROUTER)
        self.auth = secure_server(self.ctx, self.socket, self.curve_keys_dir) if self.curve_keys_dir else None
        self.socket.setsockopt(zmq.LINGER, 1000)
        # A hard cap well above max_message_bytes: ZMQ drops the peer past it, while messages
        # between the two get a readable error reply from handle().
        self.socket.setsockopt(zmq.MAXMSGSIZE, 2 * self.cfg.max_message_bytes + (1 << 20))
        if port:
            self.socket.bind(f"tcp://{host}:{port}")
        else:
            self.socket.bind_to_random_port(f"tcp://{host}")
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.commit = self.store.start_group_commit()  # None unless fsync: batch
        if self.commit is not None:
            self.waiting = CommitQueue(self.commit, self.store.sync_fds)
        warm_up()
        return self.address

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        if self.commit is not None:
            poller.register(self.commit.wake_fd, zmq.POLLIN)
        while not self.stopping:
            if poller.poll(POLL_MS):
                self._receive_all()
            self._serve_parked()
            self._group_commit()
            self.store.tick()
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                log.warning("parent process %d is gone: stopping", self.parent_pid)
                self.stopping = True
        for parked in self.parked:
            self._reply(parked.identity, parked.header, ok=False, error="shutting down")
        self.parked.clear()
        while self.waiting and not self.failed:
            self.commit.wait(POLL_MS / 1000)
            self._group_commit()

    def _group_commit(self) -> None:
        """Send the replies whose round has fsynced; start the next round if one is needed."""
        if self.commit is None or self.failed:
            return
        try:
            ready = self.waiting.settle()
        except OSError as err:
            self._fsync_failed(err)
            return
        for reply in ready:
            self._reply(reply.identity, reply.header, reply.payload, **reply.fields)

    def _fsync_failed(self, error: OSError) -> None:
        log.critical("fsync failed (%s): nothing more is acknowledged; stopping so that a "
                     "restart recovers from what is on disk", error)
        for reply in self.waiting.drop():
            self._reply(reply.identity, reply.header, ok=False, retry=True,
                        error=f"AppendFailed: fsync failed ({error}); the buffer restarts, retry")
        self.failed = self.stopping = True

    def _reply_durable(self, identity: bytes, request: dict, payload: list | None = None, *,
                       covered_by: int = 0, **fields) -> None:
        """Reply once what the request wrote is fsynced (at once unless ``fsync: batch``):
        after round ``covered_by`` when the store started it, else after the next one."""
        if self.commit is None:
            self._reply(identity, request, payload, **fields)
            return
        if "fsynced" in fields:
            fields["fsynced"] = True  # the reply waits for the round that covers the rows
        self.waiting.hold(covered_by or self.commit.next_round, DurableReply(identity, request, payload, fields))

    def _receive_all(self) -> None:
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.handle(frames[0].bytes, frames[1:])
            self._group_commit()  # replies whose fsync ended go out between requests

    def handle(self, identity: bytes, frames: list) -> None:
        header: dict = {}
        try:
            if not frames:
                raise ValueError("empty request")
            header = unpack_header(frames[0].buffer)  # first: the error reply needs its id
            size = sum(len(f.buffer) for f in frames)
            if size > self.cfg.max_message_bytes:
                raise ValueError(
                    f"message of {size} bytes exceeds max_message_bytes={self.cfg.max_message_bytes}"
                )
            verb = header.get("verb")
            if verb not in VERBS:
                raise ValueError(f"unknown verb {verb!r}; expected one of {', '.join(VERBS)}")
            getattr(self, f"_on_{verb}")(identity, header, frames[1:])
        except (ValueError, SchemaError, RateLimited, AppendFailed, TypeError, KeyError,
                PermissionError) as err:
            self._reply(identity, header, ok=False, error=f"{type(err).__name__}: {err}",
                        retry=isinstance(err, RateLimited | AppendFailed))
        except OSError as err:  # an fsync failed: the disk's state is unknown
            self._reply(identity, header, ok=False, retry=True, error=f"OSError: {err}")
            if self.commit is not None:
                self._fsync_failed(err)
        except Exception as err:  # a bug must not take ingest down: answer, log, keep serving
            log.exception("request %r failed", header.get("verb"))
            self._reply(identity, header, ok=False, error=f"internal error: {type(err).__name__}: {err}")

    def _on_ping(self, identity, header, payload) -> None:
        self._reply(identity, header, pid=os.getpid())

    def _on_insert(self, identity, header, payload) -> None:
        if len(payload) != 1:
            raise ValueError("insert needs exactly one Arrow IPC payload frame")
        # A client's checksummed batch is appended as it came; anything else is decoded in full.
        encoded = decode_checksummed(payload[0].buffer, TRAJECTORY_SCHEMA)
        data = encoded.batch if encoded is not None else ipc_to_table(payload[0].buffer)
        ack = self.store.insert(data, sync=False, encoded=encoded)
        self._reply_durable(identity, header, covered_by=ack.round, **ack.as_dict())

    def _on_sample(self, identity, header, payload) -> None:
        timeout_s = float_arg(header, "timeout_s", 0.0, lo=0.0, hi=MAX_SAMPLE_WAIT_S)
        int_arg(header, "n_groups", None, lo=1, hi=MAX_SAMPLE_GROUPS)
        if header.get("lease") is True:
            if header.get("peek"):
                raise ValueError("sample: peek and lease exclude each other")
            self._check_learner(header, "lease")
        parked = ParkedSample(identity, header, time.monotonic() + timeout_s)
        final = timeout_s <= 0
        if not final and len(self.parked) >= MAX_PARKED_SAMPLES:
            raise ValueError(f"{len(self.parked)} sample requests already wait; retry later")
        if not self._try_sample(parked, final=final):
            self.parked.append(parked)

    def _try_sample(self, parked: ParkedSample, *, final: bool) -> bool:
        """Serve a sample if possible (or refuse it when ``final``); True when answered."""
        n_groups = parked.header["n_groups"]  # checked by _on_sample
        peek = bool(parked.header.get("peek"))
        if parked.header.get("lease") is True:
            lease, reason = self.store.lease(n_groups, sync=False)
            if lease is not None:
                self._reply_durable(parked.identity, parked.header, [table_to_ipc(lease.table)],
                                    rows=lease.table.num_rows, lease=lease.id)
                return True
        else:
            table, reason = self.store.sample(n_groups, peek=peek, sync=False)
            if table is not None:
                reply = self._reply if peek else self._reply_durable  # a sample's count is journaled
                reply(parked.identity, parked.header, [table_to_ipc(table)], rows=table.num_rows)
                return True
        if final:
            self._reply(parked.identity, parked.header, refused=reason)
        return final

    def _serve_parked(self) -> None:
        now = time.monotonic()
        waiting = self.parked
        self.parked = []
        for parked in waiting:
            if not self._try_sample(parked, final=now >= parked.deadline):
                self.parked.append(parked)

    def _on_stats(self, identity, header, payload) -> None:
        self._reply(identity, header, stats={**inspection.stats(self.store), "samples_waiting": len(self.parked)})

    def _check_learner(self, header: dict, verb: str) -> None:
        token = header.get("token")
        if not isinstance(token, str) or not hmac.compare_digest(token, self.learner_token):
            raise PermissionError(f"{verb}: only the learner (it holds {LEARNER_TOKEN_FILE})")

    def _on_set_learner_version(self, identity, header, payload) -> None:
        self._check_learner(header, "set_learner_version")
        version = int_arg(header, "version", None, lo=0, hi=MAX_POLICY_VERSION)
        self.store.set_learner_version(version, sync=False)
        self._reply_durable(identity, header, learner_version=self.store.learner_version)

    def _on_commit(self, identity, header, payload) -> None:
        self._check_learner(header, "commit")
        unknown = self.store.commit(lease_ids_arg(header, "leases"), sync=False)
        self._reply_durable(identity, header, unknown=unknown)

    def _on_resume_learner(self, identity, header, payload) -> None:
        self._check_learner(header, "resume_learner")
        version = int_arg(header, "version", None, lo=0, hi=MAX_POLICY_VERSION)
        fresh = self.store.resume_learner(version, lease_ids_arg(header, "trained"), sync=False)
        # A lease asked for by the group that died would be held by nobody until the next restart.
        for parked in [p for p in self.parked if p.header.get("lease") is True]:
            self.parked.remove(parked)
            self._reply(parked.identity, parked.header, refused="a learner group restarted")
        self._reply_durable(identity, header, learner_version=fresh)

    def _on_durable_groups(self, identity, header, payload) -> None:
        ids = header.get("group_ids")
        if (not isinstance(ids, list) or len(ids) > MAX_GROUP_QUERY
                or not all(isinstance(g, str) and len(g) <= MAX_GROUP_ID_CHARS for g in ids)):
            raise ValueError(f"group_ids: expected a list of at most {MAX_GROUP_QUERY} strings of at most "
                             f"{MAX_GROUP_ID_CHARS} characters")
        self._reply(identity, header, durable=self.store.holds_groups(ids).tolist())

    def _on_head(self, identity, header, payload) -> None:
        n = min(int_arg(header, "n", 10, lo=0, hi=1 << 62), MAX_HEAD_ROWS)
        seed = int_arg(header, "seed", 0, lo=0, hi=(1 << 64) - 1)
        filters = {k: header.get(k) for k in ("where", "data_source", "min_staleness")}
        table = inspection.inspect_rows(self.store, n, random=bool(header.get("random")),
                                        seed=seed, **filters)
        self._reply(identity, header, [table_to_ipc(table)], rows=table.num_rows)

    def _reply(self, identity: bytes, request: dict, payload: list | None = None, *,
               ok: bool = True, **fields) -> None:
        header = {"id": request.get("id"), "ok": ok, **fields}
        self.socket.send_multipart([identity, pack_header(header), *(payload or [])], copy=False)

    def close(self) -> None:
        if self.commit is not None:
            self.commit.close()
        try:
            self.store.close()
        except OSError as err:
            if not self.failed:
                raise
            log.error("closing the store after a failed fsync: %s", err)
        self.socket.close()
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()


# ---------------------------------------------------------------------- process entry point


def keep_message_buffers() -> bool:
    """Have glibc serve the ZeroMQ message buffers of inserts (megabytes each) from its heap and
    keep freed ones for the next message, instead of mapping and unmapping each: a fresh mapping
    is page-faulted in again (on these VMs often into pages the host took back) and every unmap
    flushes TLBs. Measured with 8 writers of 2.6 MB batches: the service's I/O thread 0.62-0.75
    -> 0.44-0.50 ms of CPU per insert (RESULTS.md, #19). Process-wide, so only for the service's
    own process; False where the C library has no ``mallopt`` (not glibc): nothing changes then."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Both, in this order: a trim threshold alone would also freeze the mmap threshold at 128 KB.
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD))


def learner_token(directory: Path) -> str:
    """The secret of ``DIR/learner.token`` that the learner's set_learner_version carries;
    created (mode 0600) the first time a service opens the folder, kept across restarts."""
    path = Path(directory) / LEARNER_TOKEN_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32))
        handle.flush()
        os.fsync(handle.fileno())
    return path.read_text().strip()


def write_service_file(directory: Path, address: str) -> None:
    """Atomically publish where the service listens, so a parent can find it."""
    info = {"address": address, "pid": os.getpid(), "started_at": time.time()}
    tmp = directory / (SERVICE_FILE + ".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, directory / SERVICE_FILE)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s buffer %(levelname)s %(message)s")
    if not keep_message_buffers():
        log.info("no glibc mallopt: message buffers are mapped and unmapped per message")
    cfg = BufferConfig.model_validate(json.loads(args.config_json or "{}"))
    host = args.host or cfg.host
    port = cfg.port if args.port is None else args.port
    directory = Path(args.dir)
    store = ReplayStore(directory, cfg, max_staleness=args.max_staleness, seed=args.seed)
    for report in store.recovery:
        log.warning("recovered segment: %s", json.dumps(report))
    service = BufferService(store, cfg, learner_token(directory), curve_keys_dir=args.curve_keys_dir,
                            parent_pid=os.getppid() if args.exit_with_parent else None)
    address = service.bind(host, port)
    gc.freeze()  # what start-up made lives as long as the process: full collections skip it
    # The fsync thread needs the GIL for a few bytecodes to start each round; at the default
    # 5 ms switch interval every round would wait behind the loop's Python work.
    sys.setswitchinterval(FSYNC_THREAD_SWITCH_S)

    def _stop(signum, frame):
        service.stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    write_service_file(directory, address)
    log.info("serving %s on %s (%d rows stored)", directory, address, store.index.n_rows)
    try:
        service.serve()
    finally:
        service.close()
        (directory / SERVICE_FILE).unlink(missing_ok=True)
    if service.failed:
        sys.exit(1)


def _parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m buffer.service", description=__doc__.split("\n")[0])
    parser.add_argument("--dir", required=True, help="buffer folder (segments + journal)")
    parser.add_argument("--host", default=None, help="bind address (default: buffer.host)")
    parser.add_argument("--port", type=int, default=None, help="port, 0 = any (default: buffer.port)")
    parser.add_argument("--config-json", default=None, help="BufferConfig fields as JSON")
    parser.add_argument("--max-staleness", type=int, required=True,
                        help="groups older than this many policy versions are never sampled")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random samplers")
    parser.add_argument("--curve-keys-dir", default=None,
                        help="the job's CURVE keys (`async-rl keys generate DIR`); required off loopback")
    parser.add_argument("--exit-with-parent", action="store_true",
                        help="stop cleanly when the parent process exits")
    return parser.parse_args(argv)


@dataclass
class ServiceHandle:
    """A buffer service subprocess started by :func:`start_service`."""

    process: subprocess.Popen
    address: str
    directory: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def learner_token(self) -> str:
        return learner_token(self.directory)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (clean shutdown), then SIGKILL if it has not exited in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL this service process only (a crash, as tests simulate)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def start_service(
    directory: str | Path, cfg: BufferConfig | None = None, *, max_staleness: int, host: str | None = None,
    port: int | None = None, seed: int = 0, timeout_s: float = 60.0, log_file: Path | None = None,
    curve_keys_dir: str | Path | None = None,
) -> ServiceHandle:
    """Start ``python -m buffer.service`` and wait until it has written its address; with
    ``curve_keys_dir`` only clients holding the job's CURVE client key get through."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SERVICE_FILE).unlink(missing_ok=True)
    cfg = cfg or BufferConfig()
    cmd = [sys.executable, "-m", "buffer.service", "--dir", str(directory),
           "--config-json", cfg.model_dump_json(), "--max-staleness", str(max_staleness), "--seed", str(seed),
           "--exit-with-parent"]
    if host is not None:
        cmd += ["--host", host]
    if port is not None:
        cmd += ["--port", str(port)]
    if curve_keys_dir is not None:
        cmd += ["--curve-keys-dir", str(Path(curve_keys_dir).resolve())]  # the child runs elsewhere
    out = open(log_file or directory / "service.log", "ab")  # noqa: SIM115 (child owns it)
    process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=_repo_root())
    out.close()
    return ServiceHandle(process, _wait_for_address(directory, process, timeout_s), directory)


def _wait_for_address(directory: Path, process: subprocess.Popen, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    path = directory / SERVICE_FILE
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"buffer service exited with code {process.returncode}; see {directory}/service.log"
            )
        if path.exists():
            info = json.loads(path.read_text())
            if info.get("pid") == process.pid:
                return info["address"]
        time.sleep(0.05)
    process.kill()
    process.wait()
    raise TimeoutError(f"buffer service did not start within {timeout_s}s; see {directory}/service.log")


def _repo_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


if __name__ == "__main__":
    main()
