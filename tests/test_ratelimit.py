"""The shared rate limiter: atomic across processes, fails closed, obeys HubSpot's 429s."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
import redis

from idsync.settings import Settings
from tests.conftest import REDIS_URL
from tests.processes import PrivateRedis, flush_prefix
from workers.ratelimit import LimiterTimeout, LocalRateLimiter, RedisRateLimiter


def _take(prefix: str, limit: int, window: float, seconds: float, queue: object) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    limiter = RedisRateLimiter(client, name=prefix, limit=limit, window=window)
    stamps = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            limiter.acquire(timeout=max(0.01, deadline - time.monotonic()))
        except LimiterTimeout:
            break
        stamps.append(time.time())
    client.close()
    queue.put(stamps)  # type: ignore[attr-defined]


def test_processes_together_stay_under_the_limit(redis_prefix: str) -> None:
    prefix = f"{redis_prefix}:limiter-test"
    limit, window = 20, 1.0
    queue: multiprocessing.Queue[list[float]] = multiprocessing.Queue()
    workers = [
        multiprocessing.Process(target=_take, args=(prefix, limit, window, 3.0, queue))
        for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    stamps = sorted(t for _ in workers for t in queue.get(timeout=30))
    for worker in workers:
        worker.join(timeout=10)
    flush_prefix(REDIS_URL, prefix)
    # In any rolling window, never more than the limit (the Redis clock decides).
    for index, start in enumerate(stamps):
        in_window = [t for t in stamps[index:] if t < start + window]
        assert len(in_window) <= limit
    assert len(stamps) >= 2 * limit  # and the limit is used, not starved


def test_block_for_stops_every_taker(redis_prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    limiter = RedisRateLimiter(client, name=f"{redis_prefix}:block", limit=100, window=10)
    other = RedisRateLimiter(client, name=f"{redis_prefix}:block", limit=100, window=10)
    limiter.acquire(timeout=1)
    limiter.block_for(1.0)
    started = time.monotonic()
    with pytest.raises(LimiterTimeout):
        other.acquire(timeout=0.3)
    other.acquire(timeout=5)
    assert time.monotonic() - started >= 0.9
    client.close()
    flush_prefix(REDIS_URL, f"{redis_prefix}:block")


def test_limiter_fails_closed_without_redis(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path)
    server.start()
    client = redis.Redis.from_url(server.url, socket_timeout=0.2, socket_connect_timeout=0.2)
    limiter = RedisRateLimiter(client, name="closed", limit=100, window=10)
    limiter.acquire(timeout=1)
    server.stop()
    with pytest.raises(LimiterTimeout):
        limiter.acquire(timeout=1.0)
    client.close()


def test_local_limiter_keeps_the_rolling_window() -> None:
    limiter = LocalRateLimiter(limit=5, window=0.5)
    started = time.monotonic()
    for _ in range(10):
        limiter.acquire(timeout=5)
    # The sixth request had to wait for the first one to leave the window.
    assert time.monotonic() - started >= 0.5
    with pytest.raises(LimiterTimeout):
        for _ in range(10):
            limiter.acquire(timeout=0.01)


def test_waiting_for_capacity_takes_no_slot(redis_prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    name = f"{redis_prefix}:peek"
    limiter = RedisRateLimiter(client, name=name, limit=2, window=10)
    for _ in range(5):
        assert limiter.wait_for_capacity(timeout=0.1)
    limiter.acquire(timeout=1)
    limiter.acquire(timeout=1)
    assert not limiter.wait_for_capacity(timeout=0.2)
    client.close()
    flush_prefix(REDIS_URL, name)
    local = LocalRateLimiter(limit=1, window=10)
    assert local.wait_for_capacity(timeout=0.1) and local.wait_for_capacity(timeout=0.1)
    local.acquire(timeout=1)
    assert not local.wait_for_capacity(timeout=0.1)


def test_remaining_zero_blocks_only_when_someone_else_spends_the_budget(
    settings: Settings,
) -> None:
    from workers.destinations.hubspot.adapter import HubSpotDestination

    limiter = LocalRateLimiter(limit=2, window=10)
    destination = HubSpotDestination(settings, limiter)
    limiter.acquire(timeout=1)
    limiter.acquire(timeout=1)
    destination._window_spent(5.0)  # our window is full too: it paces by itself
    assert limiter._blocked_until == 0.0
    other = LocalRateLimiter(limit=2, window=10)
    second = HubSpotDestination(settings, other)
    second._window_spent(5.0)  # we sent little, so others did: everyone waits
    assert not other.wait_for_capacity(timeout=0)
    destination.close()
    second.close()
