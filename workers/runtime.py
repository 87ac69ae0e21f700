"""What one worker process builds once, after Celery has forked it."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from idsync.settings import Settings
from models.db import make_engine, make_session_factory
from workers.destinations.base import Destination
from workers.ratelimit import LocalRateLimiter, RateLimiter, RedisRateLimiter


@dataclass
class Runtime:
    """Settings, database, Redis, rate limiter and destinations of this process."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    redis: Any
    limiter: RateLimiter
    destinations: dict[str, Destination] = field(default_factory=dict)
    rng: random.Random = field(default_factory=random.Random)

    def destination(self, name: str) -> Destination:
        """The adapter for ``name``, built on first use."""
        if name not in self.destinations:
            self.destinations[name] = build_destination(name, self.settings, self.limiter)
        return self.destinations[name]


def build_destination(name: str, settings: Settings, limiter: RateLimiter) -> Destination:
    """The adapter of one destination by name."""
    if name == "hubspot":
        from workers.destinations.hubspot import HubSpotDestination
        from workers.metrics import RateLimitReporter

        return HubSpotDestination(
            settings, limiter, on_rate_limit_info=RateLimitReporter.from_settings(settings)
        )
    raise ValueError(f"unknown destination {name!r}")


def build_runtime(settings: Settings) -> Runtime:
    """Everything a worker process needs, from ``settings``."""
    engine = make_engine(settings.database_url)
    limit, window = settings.rate_limit
    redis_url = settings.effective_redis_url
    redis_client: Any = None
    limiter: RateLimiter
    if redis_url:
        import redis

        redis_client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
        limiter = RedisRateLimiter(
            redis_client,
            name=f"{settings.redis_key_prefix}:ratelimit:hubspot",
            limit=limit,
            window=window,
        )
    else:
        limiter = LocalRateLimiter(limit=limit, window=window)
    return Runtime(
        settings=settings,
        engine=engine,
        sessions=make_session_factory(engine),
        redis=redis_client,
        limiter=limiter,
    )


@cache
def runtime() -> Runtime:
    """This process's runtime, from the environment."""
    return build_runtime(Settings())
