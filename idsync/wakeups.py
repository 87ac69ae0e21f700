"""Wake the workers after a commit: coalesced, best effort, and quick to give up.

The outbox is the source of truth; a wake-up only saves the sweep's delay. So a
publish that fails is logged and forgotten, and while one wake-up per
destination is pending (a short-lived ``SET NX`` token in Redis) no other is
sent: the number of Celery messages grows with batches, not with events.
"""

from __future__ import annotations

import logging
from functools import cached_property
from typing import Any

from idsync.settings import Settings

log = logging.getLogger(__name__)

DELIVER_TASK = "idsync.deliver"


def wakeup_key(settings: Settings, destination: str) -> str:
    """The Redis key of a destination's pending wake-up (the worker deletes it)."""
    return f"{settings.redis_key_prefix}:wakeup:{destination}"


class Waker:
    """Publishes ``idsync.deliver`` by name, without loading any worker code."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

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
        """Release the broker and Redis connections this waker opened (built on first use)."""
        if "celery" in self.__dict__:
            self.celery.close()
        if "redis" in self.__dict__ and self.redis is not None:
            self.redis.close()

    def wake(self, destination: str) -> bool:
        """Publish a wake-up unless one is pending; False when none was sent."""
        try:
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
