"""The newest-state property through real processes: gunicorn, two workers, the fake HubSpot.

Few examples (each one runs the real stack); derandomized in CI by the profile
in tests/conftest.py.
"""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.processes import ServiceStack
from tests.strategies import arrivals, assert_newest_state, documents, histories

pytestmark = pytest.mark.e2e


@settings(max_examples=6, deadline=None)
@given(history=histories(max_users=4, max_steps=5), data=st.data())
def test_concurrent_workers_end_at_each_users_newest_state(
    e2e: ServiceStack, history: Any, data: Any
) -> None:
    e2e.reset()
    events = documents(history, uuid.uuid4().hex[:8])
    order = arrivals(
        data.draw(st.permutations(range(len(events)))),
        data.draw(st.lists(st.integers(0, 50), max_size=3)),
        len(events),
    )
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda index: e2e.post(events[index]), order))
    assert all(answer.status_code in (200, 202) for answer in answers)
    e2e.wait_finished(len(events), timeout=60)
    assert e2e.hubspot.overlaps() == []
    assert_newest_state(e2e.statuses(), e2e.hubspot.contacts(), history)
