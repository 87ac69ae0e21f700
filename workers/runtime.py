"""What one worker process builds once, after Celery has forked it."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from idsync.destinations import build_adapter
from idsync.settings import Settings
from models.db import make_engine, make_session_factory
from workers.destinations.base import Destination, Limiter
from workers.ratelimit import LocalRateLimiter, RedisRateLimiter
from workers.slots import DeliverySlots


@dataclass
class Runtime:
    """Settings, database, Redis, and each destination's limiter and adapter."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    redis: Any
    limiters: dict[str, Limiter] = field(default_factory=dict)
    destinations: dict[str, Destination] = field(default_factory=dict)
    slot_sets: dict[str, DeliverySlots] = field(default_factory=dict)
    rng: random.Random = field(default_factory=random.Random)

    def limiter(self, name: str) -> Limiter:
        """Destination ``name``'s request budget, built on first use (its own Redis keys)."""
        if name not in self.limiters:
            self.limiters[name] = build_limiter(self.settings, name, self.redis)
        return self.limiters[name]

    def slots(self, name: str) -> DeliverySlots | None:
        """Destination ``name``'s deliver-task slots (None without Redis: no cap)."""
        if self.redis is None:
            return None
        if name not in self.slot_sets:
            self.slot_sets[name] = DeliverySlots(
                self.redis,
                f"{self.settings.redis_key_prefix}:slots:{name}",
                cap=self.settings.destination(name).concurrency,
                ttl=2 * self.settings.lease_seconds,
            )
        return self.slot_sets[name]

    def destination(self, name: str) -> Destination:
        """The adapter for ``name``, built on first use."""
        if name not in self.destinations:
            self.destinations[name] = build_destination(name, self.settings, self.limiter(name))
        return self.destinations[name]


def build_limiter(settings: Settings, name: str, redis_client: Any) -> Limiter:
    """A destination's limiter: in Redis when there is one, else in this process."""
    limit, window = settings.destination(name).rate
    if redis_client is None:
        return LocalRateLimiter(limit=limit, window=window)
    return RedisRateLimiter(
        redis_client,
        name=f"{settings.redis_key_prefix}:ratelimit:{name}",
        limit=limit,
        window=window,
    )


def build_destination(name: str, settings: Settings, limiter: Limiter) -> Destination:
    """The adapter of one destination, through the registry of kinds."""
    from workers.metrics import HeadroomReporter

    config = settings.destination(name)
    adapter: Destination = build_adapter(
        config, settings, limiter, HeadroomReporter.from_settings(settings, name)
    )
    return adapter


def build_runtime(settings: Settings) -> Runtime:
    """Everything a worker process needs, from ``settings``."""
    engine = make_engine(settings.database_url)
    redis_url = settings.effective_redis_url
    redis_client: Any = None
    if redis_url:
        import redis

        redis_client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    return Runtime(
        settings=settings,
        engine=engine,
        sessions=make_session_factory(engine),
        redis=redis_client,
    )


@cache
def runtime() -> Runtime:
    """This process's runtime, from the environment."""
    return build_runtime(Settings())
