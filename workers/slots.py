"""At most ``<NAME>_CONCURRENCY`` deliver tasks per destination, across every worker.

A destination that hangs until every call times out must not take every
worker slot: each deliver task first takes one of its destination's slots, a
lease in one Redis sorted set (member: the task id, score: when the lease
ends, on Redis's clock), renewed before each batch. A task over the cap ends
at once; a dead worker's slot expires by itself. Without Redis (the embedded
default, one worker process) there is no cap.
"""

from __future__ import annotations

from typing import Any

_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local cap, ttl, member = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
if redis.call('ZSCORE', KEYS[1], member) or redis.call('ZCARD', KEYS[1]) < cap then
  redis.call('ZADD', KEYS[1], now + ttl, member)
  redis.call('EXPIRE', KEYS[1], math.ceil(ttl) + 1)
  return 1
end
return 0
"""


class DeliverySlots:
    """The deliver-task slots of one destination."""

    def __init__(self, client: Any, key: str, cap: int, ttl: float) -> None:
        self.client = client
        self.key = key
        self.cap = cap
        self.ttl = ttl
        self._take = client.register_script(_TAKE)

    def take(self, task_id: str) -> bool:
        """Take or renew ``task_id``'s slot; False when the destination's cap is reached."""
        return bool(self._take(keys=[self.key], args=[self.cap, self.ttl, task_id]))

    def release(self, task_id: str) -> None:
        """Give the slot back for the next task."""
        self.client.zrem(self.key, task_id)
