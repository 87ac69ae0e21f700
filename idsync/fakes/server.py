"""What every fake of an external system shares: a Flask app served on loopback.

A fake subclasses ``FakeServer``, builds its Flask app in ``__init__`` and
assigns it to ``self.app``; ``start()`` serves it in a background thread,
``url`` names it, and ``with fake:`` starts and stops it. ``run_until_signal``
is the body of a fake's ``python -m idsync.fakes.<name>`` entry point: it
prints the URL on the first line (a parent process reads it) and serves until
SIGTERM or SIGINT.
"""

from __future__ import annotations

import signal
import socket
import threading
from types import TracebackType
from typing import Self

from flask import Flask
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server


class QuietHandler(WSGIRequestHandler):
    """No access-log line per request (tests make thousands), and no Nagle stalls."""

    # HTTP/1.1 keeps a client's connection alive between requests, as vendors do.
    protocol_version = "HTTP/1.1"

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Say nothing."""

    def setup(self) -> None:
        super().setup()
        # The headers and the body leave in separate sends: without this, the
        # client's delayed ACK holds every answer back ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class FakeServer:
    """A fake's lifecycle: serve ``self.app`` on 127.0.0.1 in a daemon thread."""

    app: Flask
    label = "fake"  # named in error messages: "the fake Braze is not running"

    def __init__(self, port: int = 0) -> None:
        self._port = port
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        """Serve in a background thread; ``url`` is valid afterwards."""
        if self._server is not None:
            raise RuntimeError(f"the {self.label} is already running")
        self._server = make_server(
            "127.0.0.1", self._port, self.app, threaded=True, request_handler=QuietHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def before_stop(self) -> None:
        """Let requests held in flight go (a fake with slow answers overrides it)."""

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is None or self._thread is None:
            return
        self.before_stop()
        self._server.shutdown()
        self._thread.join()
        self._server.server_close()
        self._server = self._thread = None

    @property
    def url(self) -> str:
        """Base URL to give a client, e.g. ``http://127.0.0.1:PORT``."""
        if self._server is None:
            raise RuntimeError(f"the {self.label} is not running; call start() first")
        return f"http://127.0.0.1:{self._server.server_port}"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def run_until_signal(fake: FakeServer) -> int:
    """Serve ``fake``, print its URL on the first line, and stop on SIGTERM or SIGINT."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with fake:
        print(fake.url, flush=True)
        while not stop.wait(0.5):
            pass
    return 0
