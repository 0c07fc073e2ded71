"""The job's control endpoint: JSON requests over a ZeroMQ REP socket (never pickle).

``async-rl status|scale|stop`` find its address in ``RUN_DIR/run.json`` and send one
request each: ``{"verb": "status"}``, ``{"verb": "scale_actors", "count": N}``,
``{"verb": "scale_learners", "count": M}``, ``{"verb": "stop"}``. The reply is
``{"ok": true, "result": …}`` or ``{"ok": false, "error": "one line"}``. It binds to the
cluster's bind host (loopback unless configured); with the job's CURVE keys (required off
loopback) only clients holding the job's client key are admitted.

Any request, of any size or shape, gets one reply and the endpoint keeps serving: the REP
socket must answer every request before it can receive the next.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from async_rl.records import VERBS, ControlRequest, one_line
from buffer.wire import int_arg

MAX_REQUEST_BYTES = 64 * 1024
# Counts a scale request may ask for: far above any cluster this runs on (an actor is a vLLM
# engine, a rank a GPU), low enough that a typo cannot make the controller loop for hours.
SCALE_BOUNDS = {"scale_actors": (0, 1024), "scale_learners": (1, 1024)}


class ControlServer:
    def __init__(self, host: str = "127.0.0.1", *, curve_keys_dir: str | None = None):
        import zmq

        from async_rl.weights.keys import secure_server

        # Its own context when secured: the CURVE authenticator then covers only this socket.
        self._ctx = zmq.Context() if curve_keys_dir else zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.REP)
        self._auth = secure_server(self._ctx, self._sock, curve_keys_dir) if curve_keys_dir else None
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        self._sock.setsockopt(zmq.LINGER, 0)
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"

    def serve_pending(self, handle: Callable[[ControlRequest], Any], timeout_ms: int = 0) -> int:
        """Answer the requests waiting now (or within ``timeout_ms``); returns how many."""
        import zmq

        served = 0
        while self._sock.poll(timeout_ms if served == 0 else 0, zmq.POLLIN):
            raw = self._sock.recv()
            self._sock.send(_encode(self._answer(raw, handle)))
            served += 1
        return served

    @staticmethod
    def _answer(raw: bytes, handle) -> dict[str, Any]:
        try:
            request = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):  # deep nesting: RecursionError
            return {"ok": False, "error": "request is not JSON (or nested too deeply)"}
        if not isinstance(request, dict) or request.get("verb") not in VERBS:
            return {"ok": False, "error": f"unknown verb; expected one of {', '.join(VERBS)}"}
        try:
            if request["verb"] in SCALE_BOUNDS:
                lo, hi = SCALE_BOUNDS[request["verb"]]
                int_arg(request, "count", None, lo=lo, hi=hi)
            typed = ControlRequest.model_validate(request)
        except ValidationError as err:
            return {"ok": False, "error": one_line(err)}
        except ValueError as err:
            return {"ok": False, "error": f"{type(err).__name__}: {err}"}
        try:
            return {"ok": True, "result": handle(typed)}
        except Exception as err:  # report, keep serving
            return {"ok": False, "error": f"{type(err).__name__}: {err}"}

    def close(self) -> None:
        self._sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
            self._ctx.term()


class RequestRefused(RuntimeError):
    """The job answered a request with an error (its one line)."""


def _encode(reply: dict[str, Any]) -> bytes:
    """The reply as JSON; a result that does not encode becomes an error reply instead."""
    try:
        return json.dumps(reply, default=str).encode()
    except (ValueError, TypeError, RecursionError) as err:
        return json.dumps({"ok": False, "error": f"reply not encodable: {type(err).__name__}"}).encode()


def request(address: str, verb: str, *, timeout_s: float = 300.0, curve_keys_dir: str | None = None,
            **fields: Any) -> Any:
    """Send one request to a running job; raises ConnectionError if it does not answer (a job
    started with CURVE keys never answers a client without them)."""
    import zmq

    from async_rl.weights.keys import secure_client

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))  # no peer (refused handshake): no hang
    if curve_keys_dir:
        secure_client(sock, curve_keys_dir)
    sock.connect(address)
    silent = ConnectionError(f"{address}: the job did not answer within {timeout_s:.0f} s (is it running?)")
    try:
        try:
            sock.send(json.dumps({"verb": verb, **fields}).encode())
        except zmq.Again:
            raise silent from None
        if not sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            raise silent
        reply = json.loads(sock.recv())
    finally:
        sock.close(linger=0)
    if not reply.get("ok"):
        raise RequestRefused(reply.get("error", "request failed"))
    return reply["result"]
