"""Ingest's store path on a full outbox: the same posts with 1,000,000 events already stored.

What ingest does in the database (``models.outbox.commit_event``: the event and one
delivery per destination in one autocommitted INSERT, ON CONFLICT on (source, event id))
must not slow down as the tables grow. Two databases copied from the run's schema,
one left empty and one holding ``stored`` events with their deliveries and links
(set-based SQL, as ``bench.claims`` fills it), take the same stream of new events
from a few threads, in alternating rounds. HTTP, parsing and validation cost the
same on both sides and are left out, so the ratio is the store path's own: the
webhook's ratio lies closer to 1.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field

from bench.claims import seed_pending
from bench.common import own_database
from bench.delivery import user_document
from bench.report import Row, number, verdict
from ingest.validation import to_new_event
from models.db import make_engine
from models.outbox import commit_event

TARGET = 0.9
THREADS = 4  # as gunicorn's workers and threads keep a few requests in the database at once


@dataclass
class IngestDepthOptions:
    stored: int  # events already stored on the full side
    rounds: int
    round_seconds: float


@dataclass
class IngestDepthResult:
    options: IngestDepthOptions
    rates: dict[str, list[float]]  # side -> events per second, one per round
    seed_seconds: float
    notes: list[str] = field(default_factory=list)

    def rate(self, side: str) -> float:
        return sum(self.rates[side]) / len(self.rates[side])

    @property
    def ratio(self) -> float:
        return self.rate("full") / self.rate("empty")


def _round(url: str, seconds: float, run: str) -> float:
    """Record new events from ``THREADS`` threads for ``seconds``; events per second."""
    engine = make_engine(url, autocommit=True, pool_size=THREADS)  # as ingest records
    stop = time.monotonic() + seconds
    counts = [0] * THREADS

    def post(thread: int) -> None:
        number_ = 0
        while time.monotonic() < stop:
            document = user_document("created", thread * 10_000_000 + number_, run)
            document["id"] = f"evt_depth_{run}_{thread}_{number_}"
            event = to_new_event(document, json.dumps(document).encode())
            commit_event(engine=engine, event=event, destinations=("hubspot",))
            number_ += 1
        counts[thread] = number_

    try:
        threads = [threading.Thread(target=post, args=(n,)) for n in range(THREADS)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return sum(counts) / (time.monotonic() - started)
    finally:
        engine.dispose()


def run_ingest_depth(
    options: IngestDepthOptions, *, admin_url: str, run_id: str, schema: str
) -> IngestDepthResult:
    """Alternate rounds on the empty and the full database; events per second of each."""
    rates: dict[str, list[float]] = {"empty": [], "full": []}
    with (
        own_database(admin_url, f"idsync_bench_{run_id}_depth_empty", template=schema) as empty,
        own_database(admin_url, f"idsync_bench_{run_id}_depth_full", template=schema) as full,
    ):
        seeded = seed_pending(full, first=0, last=options.stored)
        for _ in range(options.rounds):
            for side, url in (("empty", empty), ("full", full)):
                rates[side].append(_round(url, options.round_seconds, uuid.uuid4().hex[:8]))
    return IngestDepthResult(options=options, rates=rates, seed_seconds=seeded)


def ingest_depth_rows(result: IngestDepthResult) -> list[Row]:
    """The store path's rate on both sides and their ratio."""
    options = result.options
    return [
        Row(
            "ingest",
            f"store path (record_event + COMMIT, {THREADS} threads) on an empty outbox",
            f"{number(result.rate('empty'))} events/s",
        ),
        Row(
            "ingest",
            f"the same with {number(options.stored)} events already stored",
            f"{number(result.rate('full'))} events/s",
        ),
        Row(
            "ingest",
            f"{number(options.stored)} stored / empty, events per second",
            f"{number(result.ratio, 2)}x ({options.rounds} alternating rounds of "
            f"{options.round_seconds:g} s; {number(result.seed_seconds, 1)} s to store the rows "
            f"by set-based SQL)",
            f">= {TARGET}x",
            verdict(result.ratio, TARGET, at_least=True),
        ),
    ]
