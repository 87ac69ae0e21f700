"""When to try a delivery again: backoff with jitter; the attempt budget."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, delays: list[float], jitter: float, rng: random.Random) -> float:
    """Seconds before attempt ``attempt + 1``, from the schedule with +/- ``jitter``."""
    base = delays[min(attempt, len(delays)) - 1] if attempt > 0 else delays[0]
    return max(0.0, base * (1 + rng.uniform(-jitter, jitter)))


def budget_spent(attempts: int, delays: list[float]) -> bool:
    """The budget counts attempts: one first try, then one per scheduled delay."""
    return attempts > len(delays)
