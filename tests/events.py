"""Build Auth0 Event Stream deliveries shaped like the real fixtures."""

from __future__ import annotations

import copy
import json
import uuid
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

from tests.conftest import FIXTURES

BASE_TIME = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@cache
def fixture(name: str) -> dict[str, Any]:
    """One of the real Auth0 payloads in tests/fixtures/auth0."""
    return json.loads((FIXTURES / name).read_text())


def stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def auth0_event(
    event_type: str,
    user_id: str,
    *,
    email: str | None = None,
    previous_email: str | None = None,
    given_name: str | None = None,
    family_name: str | None = None,
    phone: str | None = None,
    blocked: bool | None = None,
    at: datetime | int = 0,
    event_id: str | None = None,
    source: str = "urn:auth0:example.auth0app.com",
) -> dict[str, Any]:
    """An Auth0 user event; ``at`` is a datetime or seconds after BASE_TIME."""
    moment = at if isinstance(at, datetime) else BASE_TIME + timedelta(seconds=at)
    template = "user_deleted.json" if event_type == "user.deleted" else "user_created.json"
    document = copy.deepcopy(fixture(template))
    document.update(
        type=event_type,
        id=event_id or f"evt_{uuid.uuid4().hex[:22]}",
        time=stamp(moment),
        source=source,
    )
    user: dict[str, Any] = {
        "user_id": user_id,
        "created_at": stamp(BASE_TIME),
        "updated_at": stamp(moment),
        "identities": document["data"]["object"]["identities"],
    }
    for key, value in (
        ("email", email),
        ("given_name", given_name),
        ("family_name", family_name),
        ("phone_number", phone),
        ("blocked", blocked),
    ):
        if value is not None:
            user[key] = value
    if event_type == "user.deleted":
        user["deleted_at"] = stamp(moment)
    previous = dict(user)
    if previous_email is not None:
        previous["email"] = previous_email
    document["data"] = {
        "object": user,
        "previous_object": previous,
        "context": document["data"]["context"],
    }
    return document
