"""When to try a delivery again: backoff with jitter, and waits that rate limits name."""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

SHORT_WINDOWS = {"TEN_SECONDLY_ROLLING": 10.0, "SECONDLY": 1.0}


def backoff_delay(attempt: int, delays: list[float], jitter: float, rng: random.Random) -> float:
    """Seconds before attempt ``attempt + 1``, from the schedule with +/- ``jitter``."""
    base = delays[min(attempt, len(delays)) - 1] if attempt > 0 else delays[0]
    return max(0.0, base * (1 + rng.uniform(-jitter, jitter)))


def budget_spent(attempts: int, delays: list[float]) -> bool:
    """The budget counts attempts: one first try, then one per scheduled delay."""
    return attempts > len(delays)


def rate_limit_wait(
    policy: str | None, retry_after: float | None, *, now: datetime, timezone: str
) -> float:
    """Seconds a 429 asks us to wait: ``Retry-After``, else the window its policy names."""
    if retry_after is not None:
        return max(0.0, retry_after)
    if policy == "DAILY":
        local = now.astimezone(ZoneInfo(timezone))
        midnight = (local + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        return (midnight - local).total_seconds() + 1
    return SHORT_WINDOWS.get(policy or "", 10.0)
