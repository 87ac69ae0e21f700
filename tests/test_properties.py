"""Property tests: for any duplication and reordering, each user ends at its newest state.

Two sizes, as DESIGN's "Tests use real parts" asks: pure functions with many
examples, then the whole pipeline in-process on PostgreSQL and the fake HubSpot.
The same property through real worker processes is in tests/test_properties_e2e.py.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from models.ordering import FUTURE_TOLERANCE, order_key
from tests.strategies import arrivals, assert_newest_state, documents, histories
from tests.test_pipeline import Pipeline
from workers.destinations.hubspot.adapter import DEFAULT_PROPERTY_MAP, map_properties

TYPES = ["user.created", "user.updated", "user.deleted"]
moments = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)
)


@given(
    st.lists(
        st.tuples(
            moments,
            st.none() | moments,
            st.sampled_from(TYPES),
            st.text("abcdef0123", min_size=1, max_size=8),
        ),
        min_size=2,
        max_size=20,
        unique_by=lambda e: e[3],
    )
)
def test_order_key_orders_by_time_then_updated_at_then_type_then_id(
    events: list[tuple[datetime, datetime | None, str, str]],
) -> None:
    far_later = datetime(2031, 1, 1, tzinfo=UTC)  # arrival after every event: no clock guard
    keyed = sorted(
        events,
        key=lambda e: order_key(
            event_time=e[0],
            received_at=far_later,
            object_updated_at=e[1],
            event_type=e[2],
            event_id=e[3],
        ),
    )
    rank = {t: n for n, t in enumerate(TYPES)}
    expected = sorted(
        events, key=lambda e: (e[0], e[1] or datetime.min.replace(tzinfo=UTC), rank[e[2]], e[3])
    )
    assert keyed == expected


@given(moments, st.integers(1, 10_000))
def test_far_future_event_is_ordered_by_arrival(arrived: datetime, minutes_ahead: int) -> None:
    event_time = arrived + FUTURE_TOLERANCE + timedelta(minutes=minutes_ahead)
    skewed = order_key(
        event_time=event_time,
        received_at=arrived,
        object_updated_at=None,
        event_type="user.updated",
        event_id="evt_a",
    )
    next_real = order_key(
        event_time=arrived + timedelta(seconds=1),
        received_at=arrived,
        object_updated_at=None,
        event_type="user.updated",
        event_id="evt_b",
    )
    assert skewed < next_real


profile_values = st.none() | st.text(max_size=12) | st.booleans() | st.integers()


@given(
    st.dictionaries(
        st.sampled_from(
            [
                "email",
                "given_name",
                "family_name",
                "phone_number",
                "nickname",
                "logins_count",
                "blocked",
            ]
        ),
        profile_values,
    )
)
def test_mapping_sets_every_mapped_property_and_nothing_else(profile: dict[str, Any]) -> None:
    properties = map_properties(profile, DEFAULT_PROPERTY_MAP)
    unmapped = set(properties) - set(DEFAULT_PROPERTY_MAP.values())
    assert not unmapped
    for field, prop in DEFAULT_PROPERTY_MAP.items():
        value = profile.get(field)
        if field == "email":
            email = value.strip().lower() if isinstance(value, str) else ""
            assert properties.get(prop, "") == (email if email else "")
        elif value is None:
            assert properties[prop] == ""  # absent fields are cleared
        elif isinstance(value, bool):
            assert properties[prop] == ("true" if value else "false")
        else:
            assert properties[prop] == str(value)


@settings(max_examples=25, deadline=None)
@given(history=histories(), data=st.data())
def test_pipeline_ends_at_each_users_newest_state(
    pipeline: Pipeline, history: Any, data: Any
) -> None:
    pipeline.reset()
    events = documents(history, uuid.uuid4().hex[:8])
    order = arrivals(
        data.draw(st.permutations(range(len(events)))),
        data.draw(st.lists(st.integers(0, 50), max_size=4)),
        len(events),
    )
    drain_after = data.draw(st.sets(st.integers(0, len(order))))
    for position, index in enumerate(order):
        answer = pipeline.post(events[index])
        assert answer.status_code in (200, 202)
        if position in drain_after:
            pipeline.drain()
    pipeline.drain()
    statuses = pipeline.deliveries()
    assert len(statuses) == len(events)
    assert_newest_state(statuses, pipeline.hubspot.contacts(), history)
