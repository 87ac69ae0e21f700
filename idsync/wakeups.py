"""Wake the workers after a commit: coalesced, best effort, and quick to give up.

The outbox is the source of truth; a wake-up only saves the sweep's delay. So a
publish that fails is logged and forgotten, and while one wake-up per
destination is pending (a short-lived ``SET NX`` token in Redis) no other is
sent: the number of Celery messages grows with batches, not with events.

Each process also coalesces in memory before it asks Redis: after a wake-up of a
destination, the wake-ups of the next ``LOCAL_QUIET_SECONDS`` become one, sent
by a background thread when that quiet time ends. So a busy ingest process asks
Redis a few times a second instead of on every request, and no wake-up is later
than ``LOCAL_QUIET_SECONDS`` (a worker that finished meanwhile is still woken).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from functools import cached_property
from typing import Any

from idsync.settings import Settings

log = logging.getLogger(__name__)

DELIVER_TASK = "idsync.deliver"
# Short beside the Redis token's lifetime and the sweep: a wake-up is at most this late.
LOCAL_QUIET_SECONDS = 0.05


def wakeup_key(settings: Settings, destination: str) -> str:
    """The Redis key of a destination's pending wake-up (the worker deletes it)."""
    return f"{settings.redis_key_prefix}:wakeup:{destination}"


class Waker:
    """Publishes ``idsync.deliver`` by name, without loading any worker code.

    Safe to share between threads; built before a fork (gunicorn ``--preload``), it
    starts afresh in the child.
    """

    def __init__(self, settings: Settings, quiet_seconds: float = LOCAL_QUIET_SECONDS) -> None:
        self.settings = settings
        self.quiet_seconds = quiet_seconds
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._publishing = threading.Lock()  # one publish at a time; builds the clients once
        self._state = threading.Condition()
        self._quiet_until: dict[str, float] = {}
        self._owed: set[str] = set()
        self._closed = False
        self._flusher: threading.Thread | None = None

    @cached_property
    def celery(self) -> Any:
        from celery import Celery

        from idsync.celery_config import celery_config

        app = Celery("idsync-ingest", set_as_current=False)
        app.conf.update(celery_config(self.settings, publisher=True))
        return app

    @cached_property
    def redis(self) -> Any:
        url = self.settings.effective_redis_url
        if url is None:
            return None
        import redis

        timeout = self.settings.publish_timeout_seconds
        return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)

    def close(self) -> None:
        """Send the wake-ups still owed, then release the broker and Redis connections."""
        with self._state:
            self._closed = True
            owed, self._owed = sorted(self._owed), set()
            self._state.notify_all()
        for destination in owed:
            self._publish(destination)
        if "celery" in self.__dict__:
            self.celery.close()
        if "redis" in self.__dict__ and self.redis is not None:
            self.redis.close()

    def wake(self, destination: str) -> bool:
        """Publish a wake-up unless one is pending; False when none was sent now.

        Within the quiet time after this process's last wake-up of ``destination``
        the wake-up is owed instead, and sent when the quiet time ends.
        """
        if self._pid != os.getpid():
            self._reset()  # a forked child: the parent's thread and locks are not ours
        now = time.monotonic()
        with self._state:
            if not self._closed and now < self._quiet_until.get(destination, 0.0):
                self._owed.add(destination)
                self._start_flusher()
                self._state.notify_all()
                return False
            self._quiet_until[destination] = now + self.quiet_seconds
        return self._publish(destination)

    def _start_flusher(self) -> None:
        if self._flusher is None or not self._flusher.is_alive():
            self._flusher = threading.Thread(
                target=self._flush_owed, name="idsync-wakeups", daemon=True
            )
            self._flusher.start()

    def _flush_owed(self) -> None:
        """Send each owed wake-up when its destination's quiet time ends."""
        while True:
            with self._state:
                while not self._owed and not self._closed:
                    self._state.wait()
                if self._closed:
                    return
                now = time.monotonic()
                due = sorted(d for d in self._owed if self._quiet_until.get(d, 0.0) <= now)
                if not due:
                    first = min(self._quiet_until.get(d, 0.0) for d in self._owed)
                    self._state.wait(timeout=first - now)
                    continue
                for destination in due:
                    self._owed.discard(destination)
                    self._quiet_until[destination] = now + self.quiet_seconds
            for destination in due:
                self._publish(destination)

    def _publish(self, destination: str) -> bool:
        try:
            with self._publishing:
                if self.redis is not None and not self.redis.set(
                    wakeup_key(self.settings, destination),
                    "1",
                    nx=True,
                    px=int(self.settings.wakeup_token_seconds * 1000),
                ):
                    return False
                self.celery.send_task(DELIVER_TASK, args=[destination], retry=False)
        except Exception as error:
            log.warning(
                "wake-up for %s not published (%s); the sweep will pick it up",
                destination,
                type(error).__name__,
            )
            return False
        return True
