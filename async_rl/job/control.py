"""The job's control endpoint: JSON requests over a ZeroMQ REP socket (never pickle).

``async-rl status|scale|stop`` find its address in ``RUN_DIR/run.json`` and send one
request each: ``{"verb": "status"}``, ``{"verb": "scale_actors", "count": N}``,
``{"verb": "scale_learners", "count": M}``, ``{"verb": "stop"}``. The reply is
``{"ok": true, "result": …}`` or ``{"ok": false, "error": "one line"}``. It binds to the
cluster's bind host (loopback unless configured).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

MAX_REQUEST_BYTES = 64 * 1024
VERBS = ("status", "scale_actors", "scale_learners", "stop")


class ControlServer:
    def __init__(self, host: str = "127.0.0.1"):
        import zmq

        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        self._sock.setsockopt(zmq.LINGER, 0)
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"

    def serve_pending(self, handle: Callable[[dict[str, Any]], Any], timeout_ms: int = 0) -> int:
        """Answer the requests waiting now (or within ``timeout_ms``); returns how many."""
        import zmq

        served = 0
        while self._sock.poll(timeout_ms if served == 0 else 0, zmq.POLLIN):
            raw = self._sock.recv()
            self._sock.send(json.dumps(self._answer(raw, handle)).encode())
            served += 1
        return served

    @staticmethod
    def _answer(raw: bytes, handle) -> dict[str, Any]:
        try:
            request = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return {"ok": False, "error": "request is not JSON"}
        if not isinstance(request, dict) or request.get("verb") not in VERBS:
            return {"ok": False, "error": f"unknown verb; expected one of {', '.join(VERBS)}"}
        try:
            return {"ok": True, "result": handle(request)}
        except Exception as err:  # report, keep serving
            return {"ok": False, "error": f"{type(err).__name__}: {err}"}

    def close(self) -> None:
        self._sock.close(linger=0)


def request(address: str, verb: str, *, timeout_s: float = 300.0, **fields: Any) -> Any:
    """Send one request to a running job; raises ConnectionError if it does not answer."""
    import zmq

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send(json.dumps({"verb": verb, **fields}).encode())
        if not sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            raise ConnectionError(f"{address}: the job did not answer within {timeout_s:.0f} s (is it running?)")
        reply = json.loads(sock.recv())
    finally:
        sock.close(linger=0)
    if not reply.get("ok"):
        raise RuntimeError(reply.get("error", "request failed"))
    return reply["result"]
