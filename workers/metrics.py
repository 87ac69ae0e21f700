"""What workers contribute to ``/metrics``: each destination's rate-limit headroom.

Everything else ingest's ``/metrics`` reports about delivery (statuses, backlog,
attempt latency, retries by error category) is read from the outbox at scrape
time, because the outbox already records every attempt of every worker on
every machine. Only the headroom a destination reports in its answers (HubSpot's
``X-HubSpot-RateLimit-*`` headers, say) is seen nowhere else: each worker writes
the newest values it sees into one small Redis hash per destination
(``<REDIS_KEY_PREFIX>:headroom:<name>``), stamped with Redis's clock, and the
ingest's collector reads it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from idsync.destinations import headroom_key
from idsync.settings import Settings
from workers.destinations.base import Headroom

log = logging.getLogger(__name__)

# Writing the headroom must never slow a delivery: short timeouts, and after a
# failure no new try for a while (the rate limiter already waits out a Redis outage).
REDIS_TIMEOUT_SECONDS = 0.5
RETRY_AFTER_FAILURE_SECONDS = 30.0
# An abandoned hash disappears a day after the destination's last answer.
KEY_TTL_SECONDS = 86_400

# ARGV: the TTL in seconds, then field, value, field, value, ...
_WRITE = """
local t = redis.call('TIME')
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], 'updated_at', t[1] .. '.' .. string.format('%06d', tonumber(t[2])))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"""


class HeadroomReporter:
    """A destination's headroom hook: keep the newest headroom it reported in Redis."""

    def __init__(self, client: Any, key: str) -> None:
        self.client = client
        self.key = key
        self._write = client.register_script(_WRITE)
        self._quiet_until = 0.0

    @classmethod
    def from_settings(cls, settings: Settings, name: str) -> HeadroomReporter | None:
        """A reporter on ``REDIS_URL``; None on the embedded default, which has no Redis."""
        url = settings.effective_redis_url
        if url is None:
            return None
        import redis

        client = redis.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT_SECONDS, socket_connect_timeout=REDIS_TIMEOUT_SECONDS
        )
        return cls(client, headroom_key(settings, name))

    def __call__(self, info: Headroom) -> None:
        """Store the values the destination sent; a Redis failure is logged once and skipped."""
        if time.monotonic() < self._quiet_until:
            return
        values = {
            "max": info.max,
            "remaining": info.remaining,
            "interval_ms": info.interval_ms,
            "daily": info.daily,
            "daily_remaining": info.daily_remaining,
        }
        arguments = [str(KEY_TTL_SECONDS)]
        for name, value in values.items():
            if value is not None:
                arguments += [name, str(value)]
        try:
            self._write(keys=[self.key], args=arguments)
        except Exception as error:  # metrics must never fail a delivery
            self._quiet_until = time.monotonic() + RETRY_AFTER_FAILURE_SECONDS
            log.warning(
                "rate-limit headroom not recorded (%s); next try in %.0f s",
                type(error).__name__,
                RETRY_AFTER_FAILURE_SECONDS,
            )
