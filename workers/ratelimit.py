"""A destination's request budget, shared by every worker process on every machine.

Each destination has its own limiter (its own Redis keys). HubSpot, for one,
counts requests in a rolling window per app. ``RedisRateLimiter`` keeps
the same rolling window in one Redis sorted set, updated atomically by a Lua
script with Redis's own clock, so all workers together stay under the limit.
It fails closed: when Redis cannot be reached, workers wait instead of sending.
A 429 or an exhausted ``X-HubSpot-RateLimit-Remaining`` blocks everyone until
the window has passed. ``LocalRateLimiter`` does the same inside one process,
for the embedded default, which runs a single worker process.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import deque
from typing import Any, Protocol, runtime_checkable

from workers.destinations.base import Limiter, LimiterTimeout

__all__ = [
    "LimiterTimeout",
    "LocalRateLimiter",
    "RateLimiter",
    "RedisRateLimiter",
    "SlotForecast",
]

# Leave a little room, so that our window and HubSpot's never disagree at the edge.
WINDOW_MARGIN = 1.03


# The interface every limiter offers, declared where destinations see it.
RateLimiter = Limiter


@runtime_checkable
class SlotForecast(Protocol):
    """A limiter that can tell a slot is near, so that work is claimed before it frees."""

    def wait_for_capacity_within(self, timeout: float, *, ahead: float) -> bool:
        """Wait up to ``timeout`` seconds until a slot is free or frees within ``ahead``."""
        ...


_ACQUIRE = """
local key, block_key = KEYS[1], KEYS[2]
local limit, window_us, member = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local peek = ARGV[4] == '1'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local blocked_until = tonumber(redis.call('GET', block_key) or '0')
if blocked_until > now then return blocked_until - now end
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window_us)
if redis.call('ZCARD', key) < limit then
  if peek then return 0 end
  redis.call('ZADD', key, now, member)
  redis.call('PEXPIRE', key, math.ceil(window_us / 1000) + 1000)
  return 0
end
local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
return tonumber(oldest[2]) + window_us - now + 1
"""

_BLOCK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local until_us = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_us > current then
  redis.call('SET', KEYS[1], until_us, 'PX', math.ceil(tonumber(ARGV[1]) / 1000) + 1000)
end
return until_us
"""


class RedisRateLimiter:
    """A rolling-window limiter in Redis, atomic across processes and machines."""

    def __init__(self, client: Any, *, name: str, limit: int, window: float) -> None:
        self.client = client
        self.limit = limit
        self.window_us = int(window * WINDOW_MARGIN * 1_000_000)
        self.key = f"{name}:window"
        self.block_key = f"{name}:blocked"
        self._acquire = client.register_script(_ACQUIRE)
        self._block = client.register_script(_BLOCK)

    def _wait_us(self, *, peek: bool) -> int | None:
        """Microseconds until a slot is free (0: taken, or free to take); None: no Redis."""
        try:
            return int(
                self._acquire(
                    keys=[self.key, self.block_key],
                    args=[self.limit, self.window_us, uuid.uuid4().hex, "1" if peek else "0"],
                )
            )
        except Exception:
            return None

    def _poll(self, timeout: float, *, peek: bool, ahead: float = 0.0) -> bool:
        deadline = time.monotonic() + timeout
        ahead_us = int(ahead * 1_000_000)
        while True:
            answer = self._wait_us(peek=peek)
            # Fail closed: no Redis, no request, and no slot is near either.
            wait_us = 500_000 if answer is None else answer - (ahead_us if peek else 0)
            if wait_us <= 0:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(wait_us / 1_000_000, remaining, 1.0))

    def acquire(self, timeout: float) -> None:
        """Take one request slot, waiting up to ``timeout`` seconds."""
        if not self._poll(timeout, peek=False):
            raise LimiterTimeout(f"no request slot within {timeout:.0f}s")

    def wait_for_capacity(self, timeout: float) -> bool:
        """Wait until a slot is free, without taking it (before claiming work)."""
        return self._poll(timeout, peek=True)

    def wait_for_capacity_within(self, timeout: float, *, ahead: float) -> bool:
        """Wait until a slot is free or frees within ``ahead`` seconds, taking none."""
        return self._poll(timeout, peek=True, ahead=ahead)

    def block_for(self, seconds: float) -> None:
        """Stop every worker from sending for ``seconds`` (after a 429, say)."""
        # Without Redis the next acquire fails closed anyway.
        with contextlib.suppress(Exception):
            self._block(keys=[self.block_key], args=[int(seconds * 1_000_000)])


class LocalRateLimiter:
    """The same rolling window, for one process (the embedded default)."""

    def __init__(self, *, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window * WINDOW_MARGIN
        self._sent: deque[float] = deque()
        self._blocked_until = 0.0
        self._lock = threading.Lock()

    def _wait(self, now: float, *, peek: bool) -> float:
        if self._blocked_until > now:
            return self._blocked_until - now
        while self._sent and self._sent[0] <= now - self.window:
            self._sent.popleft()
        if len(self._sent) < self.limit:
            if not peek:
                self._sent.append(now)
            return 0.0
        return self._sent[0] + self.window - now

    def _poll(self, timeout: float, *, peek: bool, ahead: float = 0.0) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                wait = self._wait(time.monotonic(), peek=peek) - (ahead if peek else 0.0)
            if wait <= 0:
                return True
            if time.monotonic() + wait > deadline:
                return False
            time.sleep(min(wait, 1.0))

    def acquire(self, timeout: float) -> None:
        if not self._poll(timeout, peek=False):
            raise LimiterTimeout(f"no request slot within {timeout:.0f}s")

    def wait_for_capacity(self, timeout: float) -> bool:
        return self._poll(timeout, peek=True)

    def wait_for_capacity_within(self, timeout: float, *, ahead: float) -> bool:
        return self._poll(timeout, peek=True, ahead=ahead)

    def block_for(self, seconds: float) -> None:
        with self._lock:
            self._blocked_until = max(self._blocked_until, time.monotonic() + seconds)
