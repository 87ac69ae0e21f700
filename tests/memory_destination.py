"""An in-memory destination for the engine's own tests: no HTTP, no vendor rules.

Each intent is answered by ``answer`` (a function the test sets); by default
it succeeds and stores the user's profile under a record id of its own. The
hooks let a test make the destination slow, raise, or wait at a barrier.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from workers.destinations.base import ContactClaim, Intent, Outcome, Verdict

Answer = Callable[[Intent], Outcome]


@dataclass
class MemoryDestination:
    """Records every batch it was asked to deliver and answers from ``answer``."""

    name: str = "hubspot"
    clears_with: str | None = None
    answer: Answer | None = None
    delay: float = 0.0  # seconds each batch takes, ignoring the deadline on purpose
    raises: Exception | None = None
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    batches: list[list[Intent]] = field(default_factory=list)
    deadlines: list[float] = field(default_factory=list)
    before_answer: Callable[[], None] | None = None
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def deliver(
        self, intents: list[Intent], *, claim: ContactClaim, deadline: float
    ) -> dict[str, Outcome]:
        with self._lock:
            self.batches.append(intents)
            self.deadlines.append(deadline)
        if self.delay:
            time.sleep(self.delay)
        if self.before_answer is not None:
            self.before_answer()
        if self.raises is not None:
            raise self.raises
        return {intent.key: (self.answer or self._store)(intent) for intent in intents}

    def _store(self, intent: Intent) -> Outcome:
        record_id = intent.link.external_id or f"r{next(self._ids)}"
        self.records[record_id] = dict(intent.user.profile)
        return Outcome(Verdict.SUCCEEDED, external_id=record_id, email=intent.user.email)

    def probe(self) -> str | None:
        return None

    def read(self, external_ids: list[str]) -> dict[str, dict[str, Any]]:
        return {i: dict(self.records[i]) for i in external_ids if i in self.records}

    def close(self) -> None:
        pass
