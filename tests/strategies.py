"""Hypothesis strategies: a few users' Auth0 histories, delivered duplicated and shuffled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from tests.events import auth0_event

RANK = {"user.created": 0, "user.updated": 1, "user.deleted": 2}


@dataclass(frozen=True)
class Step:
    """One change to a user, in the order it happened."""

    kind: str
    email: str | None
    given_name: str
    blocked: bool


@st.composite
def histories(draw: Any, max_users: int = 3, max_steps: int = 5) -> dict[str, list[Step]]:
    """Per user, the events that happened to it: email changes, blocks, unblocks, deletes."""
    users = draw(st.integers(1, max_users))
    result = {}
    for n in range(users):
        emails = [f"u{n}a@example.com", f"u{n}b@example.com", None]
        steps = draw(
            st.lists(
                st.builds(
                    Step,
                    kind=st.sampled_from(
                        ["user.created", "user.updated", "user.updated", "user.deleted"]
                    ),
                    email=st.sampled_from(emails),
                    given_name=st.sampled_from(["Ann", "Bo", "Cy"]),
                    blocked=st.booleans(),
                ),
                min_size=1,
                max_size=max_steps,
            )
        )
        result[f"auth0|prop{n}"] = steps
    return result


def documents(history: dict[str, list[Step]], id_salt: str) -> list[dict[str, Any]]:
    """The Auth0 events of ``history``, each user's in time order, with previous emails."""
    out = []
    for user, steps in history.items():
        previous: str | None = None
        for index, step in enumerate(steps):
            out.append(
                auth0_event(
                    step.kind,
                    user,
                    email=step.email,
                    previous_email=previous,
                    given_name=step.given_name,
                    blocked=step.blocked,
                    at=index * 10,
                    event_id=f"evt_{id_salt}_{user[-1]}_{index}",
                )
            )
            previous = step.email
    return out


def expected_state(history: dict[str, list[Step]]) -> dict[str, dict[str, str] | None]:
    """Per user, the live contact HubSpot should hold (email -> firstname), or None."""
    expected: dict[str, dict[str, str] | None] = {}
    for user, steps in history.items():
        newest = steps[-1]  # times increase with the index: the last step is the newest
        live = newest.kind != "user.deleted" and not newest.blocked and newest.email
        expected[user] = {"email": newest.email, "firstname": newest.given_name} if live else None
    return expected


def arrivals(draw_permutation: list[int], duplicates: list[int], count: int) -> list[int]:
    """The order events arrive in: shuffled, some delivered twice."""
    order = list(draw_permutation)
    for position, index in enumerate(duplicates):
        order.insert(min(position * 2, len(order)), index % count)
    return order


def assert_newest_state(
    statuses: list[tuple[str, str | None]],
    contacts: list[dict[str, Any]],
    history: dict[str, list[Step]],
) -> None:
    """Every delivery ended with a reason where needed; each user holds its newest state."""
    assert all(status in ("succeeded", "skipped") for status, _ in statuses), statuses
    assert all(reason for status, reason in statuses if status == "skipped")
    # A user whose newest state has no email keeps a contact with its email cleared.
    live = {c["properties"].get("email"): c["properties"] for c in contacts}
    for user, want in expected_state(history).items():
        held = {email for email in live if email and email.startswith(f"u{user[-1]}")}
        if want is None:
            assert not held, (user, live)
        else:
            assert held == {want["email"]}, (user, live)
            assert live[want["email"]]["firstname"] == want["firstname"]
