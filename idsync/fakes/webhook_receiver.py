"""A Standard Webhooks receiver: a real HTTP server on loopback, for tests and trials.

It checks every request the way a careful receiver does, with the
``standardwebhooks`` package: the signature over the exact bytes received
(any of the signatures in the header may match any of the receiver's secrets)
and the timestamp's freshness (5 minutes); a request that fails is answered
401. A verified message is kept once per ``webhook-id``: a repeat is answered
200 too, and kept with the others of its id, in order, but ``messages()`` shows
each id once, in arrival order.

Test switches change the answers to the next ``n`` requests: a status (5xx,
401, 410, 429 with ``Retry-After``, a 3xx with ``Location``, ...) given before
the message is looked at; a slow answer (the message is kept, the answer
comes ``seconds`` later); or no answer at all until ``reset()`` or ``stop()``.
``reset()`` also starts a new generation: a request still held from before it
is answered 503 and keeps nothing.

It keeps connections alive (HTTP/1.1) as a production receiver does, so that a
sender's connection pool is exercised too.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import signal
import socket
import socketserver
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from standardwebhooks.webhooks import Webhook

DEFAULT_SECRET = "whsec_" + base64.b64encode(b"idsync-fake-webhook-receiver-key").decode()
DEFAULT_PATH = "/webhooks/idsync"
MAX_BODY_BYTES = 1024 * 1024
# An idle kept-alive connection is closed after this long.
IDLE_SECONDS = 30.0


@dataclass(frozen=True)
class ReceivedRequest:
    """One request as the receiver saw it, and what it answered (None while held)."""

    method: str
    path: str
    message_id: str | None
    timestamp: str | None
    signature: str | None
    body: bytes
    arrived: float  # time.monotonic() on arrival
    status: int | None = None
    verified: bool = False
    duplicate: bool = False
    error: str | None = None  # why verification failed
    fault: str | None = None  # the switch that chose the answer: "status", "slow", "hang"


@dataclass(frozen=True)
class _Fault:
    kind: str  # "status", "slow" or "hang"
    status: int = 200
    seconds: float = 0.0
    retry_after: str | None = None
    location: str | None = None
    body: str | None = None


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


class _Server(ThreadingHTTPServer):
    """A threaded HTTP/1.1 server that knows its receiver and its open connections."""

    daemon_threads = True

    def __init__(self, port: int, receiver: FakeWebhookReceiver) -> None:
        self.receiver = receiver
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        self.receiver._connected()
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """End every open connection, idle kept-alive ones included."""
        with self.connections_lock:
            for connection in self.connections:
                with contextlib.suppress(OSError):  # already gone
                    connection.shutdown(socket.SHUT_RDWR)

    def server_bind(self) -> None:
        # HTTPServer's own looks its host name up, which can stall on a machine without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A sender that gave up and closed its connection is not an error here."""
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep connections alive
    timeout = IDLE_SECONDS
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Tests send many requests; an access-log line each is noise."""

    def setup(self) -> None:
        super().setup()
        # Headers and body leave in separate sends: without this, the sender's delayed
        # ACK holds every answer back ~40 ms (Nagle), which no real receiver does.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _serve(self) -> None:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self._write(_json(411, {"error": "send a Content-Length"}), close=True)
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self._write(_json(413, {"error": "body too large"}), close=True)
            return
        body = self.rfile.read(length)
        headers = {key.lower(): value for key, value in self.headers.items()}
        path = urlsplit(self.path).path
        self._write(self.server.receiver._answer(self.command, path, headers, body))

    do_POST = do_GET = do_PUT = do_PATCH = do_DELETE = _serve

    def _write(self, answer: _Answer, *, close: bool = False) -> None:
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        if answer.status not in (204, 304):
            self.send_header("Content-Length", str(len(answer.body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if answer.status not in (204, 304):
            self.wfile.write(answer.body)


class FakeWebhookReceiver:
    """A webhook endpoint on 127.0.0.1 that verifies signatures; use as a context manager."""

    def __init__(
        self,
        secrets: Iterable[str] = (DEFAULT_SECRET,),
        *,
        port: int = 0,
        path: str = DEFAULT_PATH,
    ) -> None:
        self._initial_secrets = tuple(secrets)
        self._port = port
        self.path = path
        self._lock = threading.Condition()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._generation = 0
        self._release = threading.Event()  # set to answer every held or slow request now
        self.reset()

    # Lifecycle

    def start(self) -> FakeWebhookReceiver:
        """Serve in a background thread; ``url`` is valid afterwards."""
        if self._server is not None:
            raise RuntimeError("the fake webhook receiver is already running")
        with self._lock:
            if self._release.is_set():  # stopped before: holds work again
                self._release = threading.Event()
        self._server = _Server(self._port, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; held and slow requests are answered at once."""
        if self._server is None or self._thread is None:
            return
        self._release.set()
        self._server.shutdown()
        self._thread.join()
        self._server.close_connections()
        self._server.server_close()
        self._server = self._thread = None

    @property
    def url(self) -> str:
        """The endpoint to configure as ``<NAME>_URL``."""
        if self._server is None:
            raise RuntimeError("the fake webhook receiver is not running; call start() first")
        return f"http://127.0.0.1:{self._server.server_port}{self.path}"

    def __enter__(self) -> FakeWebhookReceiver:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # Test switches

    def reset(self) -> None:
        """Forget every message, switch and log entry, and answer held requests 503."""
        with self._lock:
            self._generation += 1
            self._release.set()
            self._release = threading.Event()
            self._secrets = self._initial_secrets
            self._faults: deque[_Fault] = deque()
            self._log: list[ReceivedRequest] = []
            self._order: list[str] = []
            self._by_id: dict[str, list[dict[str, Any]]] = {}
            self._connections = 0
            self._lock.notify_all()

    def set_secrets(self, secrets: Iterable[str]) -> None:
        """Verify with these secrets from now on (any one matching is enough)."""
        with self._lock:
            self._secrets = tuple(secrets)

    def answer_next(
        self,
        n: int,
        status: int,
        *,
        retry_after: float | str | None = None,
        location: str | None = None,
        body: str | None = None,
    ) -> None:
        """Answer the next ``n`` requests ``status`` without looking at them."""
        text = None if retry_after is None else str(retry_after)
        fault = _Fault("status", status, retry_after=text, location=location, body=body)
        self._add(n, fault)

    def slow_next(self, n: int, seconds: float, status: int = 200) -> None:
        """Keep the next ``n`` messages as usual but answer each ``seconds`` late."""
        self._add(n, _Fault("slow", status, seconds=seconds))

    def hang_next(self, n: int) -> None:
        """Never answer the next ``n`` requests (until ``reset()`` or ``stop()``); keep nothing."""
        self._add(n, _Fault("hang"))

    # What arrived

    def messages(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Verified message bodies, one per ``webhook-id``, in arrival order (of ``kind``)."""
        with self._lock:
            first = [self._by_id[message_id][0] for message_id in self._order]
        return [body for body in first if kind is None or body.get("type") == kind]

    def message_ids(self) -> list[str]:
        """The ``webhook-id`` of every verified message, once each, in arrival order."""
        with self._lock:
            return list(self._order)

    def received(self, message_id: str) -> list[dict[str, Any]]:
        """Every verified body that arrived under ``message_id``, repeats included, in order."""
        with self._lock:
            return list(self._by_id.get(message_id, []))

    @property
    def requests_log(self) -> list[ReceivedRequest]:
        """Every request of this generation, verified or not, in arrival order."""
        with self._lock:
            return list(self._log)

    @property
    def connections_opened(self) -> int:
        """How many connections senders opened since the last reset (keep-alive reuses them)."""
        with self._lock:
            return self._connections

    def wait_for_messages(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Wait until ``count`` distinct messages arrived; raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._order) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self._order)} of {count} messages arrived")
                self._lock.wait(left)
        return self.messages()

    # Serving

    def _connected(self) -> None:
        with self._lock:
            self._connections += 1

    def _add(self, n: int, fault: _Fault) -> None:
        with self._lock:
            self._faults.extend([fault] * n)

    def _answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> _Answer:
        """Log the request, then answer it as the switches and its signature say."""
        entry = ReceivedRequest(
            method=method,
            path=path,
            message_id=headers.get("webhook-id"),
            timestamp=headers.get("webhook-timestamp"),
            signature=headers.get("webhook-signature"),
            body=body,
            arrived=time.monotonic(),
        )
        ours = path == self.path and method == "POST"
        with self._lock:
            generation, release, secrets = self._generation, self._release, self._secrets
            fault = self._faults.popleft() if ours and self._faults else None
            index = len(self._log)
            self._log.append(replace(entry, fault=fault.kind if fault else None))
        if path != self.path:
            return self._finish(generation, index, _json(404, {"error": "no such endpoint"}))
        if method != "POST":
            return self._finish(generation, index, _json(405, {"error": "POST only"}))
        if fault is not None and fault.kind == "hang":
            release.wait()
            return self._finish(generation, index, _json(503, {"error": "released"}))
        if fault is not None and fault.kind == "status":
            return self._finish(generation, index, _fault_answer(fault))
        try:
            payload = _verify(body, headers, secrets)
        except Exception as error:  # the package raises more than its own error on bad headers
            answer = _json(401, {"error": "verification failed"})
            return self._finish(generation, index, answer, error=f"{type(error).__name__}: {error}")
        duplicate = self._keep(generation, headers["webhook-id"], payload)
        if duplicate is None:
            return self._finish(generation, index, _json(503, {"error": "stale"}))
        status = fault.status if fault is not None else 200
        if fault is not None and fault.kind == "slow":
            release.wait(fault.seconds)
        answer = _json(status, {"status": "duplicate" if duplicate else "received"})
        return self._finish(generation, index, answer, verified=True, duplicate=duplicate)

    def _keep(self, generation: int, message_id: str, payload: dict[str, Any]) -> bool | None:
        """Keep a verified message; whether its id was seen before (None: from before a reset)."""
        with self._lock:
            if generation != self._generation:
                return None
            seen = message_id in self._by_id
            if not seen:
                self._order.append(message_id)
            self._by_id.setdefault(message_id, []).append(payload)
            self._lock.notify_all()
            return seen

    def _finish(
        self,
        generation: int,
        index: int,
        answer: _Answer,
        *,
        verified: bool = False,
        duplicate: bool = False,
        error: str | None = None,
    ) -> _Answer:
        with self._lock:
            if generation == self._generation:
                self._log[index] = replace(
                    self._log[index],
                    status=answer.status,
                    verified=verified,
                    duplicate=duplicate,
                    error=error,
                )
        return answer


def _verify(body: bytes, headers: dict[str, str], secrets: tuple[str, ...]) -> dict[str, Any]:
    """The parsed body when one secret verifies it; raises otherwise."""
    if not secrets:
        raise ValueError("the receiver has no secret")
    failure: Exception | None = None
    for secret in secrets:
        try:
            payload = Webhook(secret).verify(body, headers)
        except Exception as error:
            failure = error
            continue
        if not isinstance(payload, dict):
            raise ValueError("the body is not a JSON object")
        return payload
    assert failure is not None
    raise failure


def _fault_answer(fault: _Fault) -> _Answer:
    headers = {}
    if fault.retry_after is not None:
        headers["Retry-After"] = fault.retry_after
    if fault.location is not None:
        headers["Location"] = fault.location
    if fault.body is not None:
        headers["Content-Type"] = "text/plain; charset=utf-8"
        return _Answer(fault.status, fault.body.encode(), headers)
    return _json(fault.status, {"error": f"injected HTTP {fault.status}"}, headers)


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> _Answer:
    return _Answer(
        status, json.dumps(body).encode(), {"Content-Type": "application/json"} | (headers or {})
    )


def main(argv: list[str] | None = None) -> int:
    """Run a receiver until SIGTERM or SIGINT; prints its URL on the first line."""
    parser = argparse.ArgumentParser(
        prog="python -m idsync.fakes.webhook_receiver", description=__doc__
    )
    parser.add_argument("--port", type=int, default=8098)
    parser.add_argument("--path", default=DEFAULT_PATH)
    parser.add_argument(
        "--secret", action="append", help="whsec_ secret to verify with (repeat for several)"
    )
    args = parser.parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    receiver = FakeWebhookReceiver(args.secret or (DEFAULT_SECRET,), port=args.port, path=args.path)
    with receiver:
        print(receiver.url, flush=True)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
