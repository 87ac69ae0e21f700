"""The deprovision guard: a burst of deprovisions beyond DEPROVISION_GUARD waits for approval.

Events go in through the real webhook and out through ``run_batch`` to the fake
HubSpot, with the outbox in PostgreSQL: the count, the hold and the release are
the database's.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import func, select, update

from idsync.cli import main
from idsync.settings import Settings
from models.db import transaction
from models.guard import (
    GUARD_HOLD,
    approve_deprovisions,
    drop_stale_holds,
    guard_state,
    held_counts,
)
from models.outbox import has_due_work
from models.tables import Delivery, DeliveryStatus
from tests.conftest import REDIS_URL
from tests.events import auth0_event
from tests.pipeline import Pipeline
from workers.delivery import is_deprovision, run_batch
from workers.destinations.base import Intent, LinkState, UserState


def _drain(pipeline: Pipeline) -> None:
    """Run batches until nothing is claimable: held deliveries wait, pending, on purpose."""
    for _ in range(20):
        report = run_batch(
            sessions=pipeline.sessions, settings=pipeline.settings, destination=pipeline.destination
        )
        if report.claimed == 0:
            with transaction(pipeline.sessions) as session:
                if not has_due_work(session=session, destination="hubspot"):
                    return
    raise AssertionError(f"outbox not drained: {pipeline.deliveries()}")


def _users(pipeline: Pipeline, count: int, *, prefix: str = "u") -> list[str]:
    subjects = [f"auth0|{prefix}{n}" for n in range(count)]
    for n, subject in enumerate(subjects):
        pipeline.post(auth0_event("user.created", subject, email=f"{prefix}{n}@example.com", at=n))
    _drain(pipeline)
    return subjects


def _block(pipeline: Pipeline, subjects: list[str], *, at: int = 1000) -> None:
    for n, subject in enumerate(subjects):
        email = subject.split("|")[1] + "@example.com"
        pipeline.post(auth0_event("user.updated", subject, email=email, blocked=True, at=at + n))


def _live_emails(pipeline: Pipeline) -> set[str]:
    return {contact["properties"]["email"] for contact in pipeline.hubspot.contacts()}


def _held(pipeline: Pipeline) -> int:
    with transaction(pipeline.sessions) as session:
        return held_counts(session=session).get("hubspot", 0)


def _with(pipeline: Pipeline, **changes: object) -> Pipeline:
    pipeline.settings = pipeline.settings.model_copy(update=changes)
    return pipeline


def test_a_burst_of_150_deprovisions_holds_50_and_approval_releases_them(
    pipeline: Pipeline,
) -> None:
    subjects = _users(pipeline, 150)
    assert len(pipeline.hubspot.contacts()) == 150
    _block(pipeline, subjects)
    # Other work keeps flowing while the burst is held.
    pipeline.post(auth0_event("user.created", "auth0|new", email="new@example.com", at=2000))
    _drain(pipeline)

    assert _held(pipeline) == 50
    assert len(pipeline.hubspot.contacts()) == 50 + 1  # 100 archived, the newcomer created
    assert "new@example.com" in _live_emails(pipeline)
    with transaction(pipeline.sessions) as session:
        state = guard_state(session=session, destination="hubspot", limit=(100, 3600.0))
        held = session.scalars(select(Delivery).where(Delivery.held == GUARD_HOLD)).all()
        assert (state.counted, state.held) == (100, 50)
        # Held work is pending, spent no attempt and is not leased; its users are free.
        assert {(d.status, d.attempts, d.lease_token) for d in held} == {
            (DeliveryStatus.PENDING, 0, None)
        }
        assert all(pipeline.link(d.subject).lease_token is None for d in held)

    with transaction(pipeline.sessions) as session:
        assert approve_deprovisions(session=session, destination="hubspot", dry_run=True) == 50
    assert _held(pipeline) == 50
    with transaction(pipeline.sessions) as session:
        assert approve_deprovisions(session=session, destination="hubspot") == 50
    _drain(pipeline)

    assert _held(pipeline) == 0
    assert _live_emails(pipeline) == {"new@example.com"}
    assert pipeline.deliveries().count(("succeeded", None)) == 150 + 150 + 1
    with transaction(pipeline.sessions) as session:
        # The count restarted at the approval: the released ones are not in it.
        state = guard_state(session=session, destination="hubspot", limit=(100, 3600.0))
        assert state.counted == 0


def test_a_held_deprovision_followed_by_a_newer_update_ends_stale_and_the_contact_stays(
    pipeline: Pipeline,
) -> None:
    _with(pipeline, deprovision_guard="1/1h")
    first, second = _users(pipeline, 2)
    _block(pipeline, [first, second])
    _drain(pipeline)
    assert _held(pipeline) == 1
    # The IdP is fixed: the held user's newer event says live again.
    held_subject = second if "u0@example.com" not in _live_emails(pipeline) else first
    email = held_subject.split("|")[1] + "@example.com"
    pipeline.post(
        auth0_event("user.updated", held_subject, email=email, given_name="Back", at=5000)
    )
    _drain(pipeline)
    with transaction(pipeline.sessions) as session:
        assert drop_stale_holds(session=session, destination="hubspot") == 1
    assert _held(pipeline) == 0
    contact = pipeline.hubspot.contact_by_email(email)
    assert contact is not None and contact["properties"]["firstname"] == "Back"
    with transaction(pipeline.sessions) as session:
        blocked = session.scalars(
            select(Delivery).where(Delivery.subject == held_subject).order_by(Delivery.id)
        ).all()[1]
        assert (blocked.status, blocked.reason, blocked.held) == (
            DeliveryStatus.SKIPPED,
            "stale",
            None,
        )


def test_approving_after_the_idp_was_fixed_sends_nothing_stale(pipeline: Pipeline) -> None:
    _with(pipeline, deprovision_guard="1/1h")
    subjects = _users(pipeline, 3)
    _block(pipeline, subjects)
    _drain(pipeline)
    assert _held(pipeline) == 2
    held = [s for s in subjects if s.split("|")[1] + "@example.com" in _live_emails(pipeline)]
    for subject in held:
        email = subject.split("|")[1] + "@example.com"
        pipeline.post(auth0_event("user.updated", subject, email=email, at=5000))
    _drain(pipeline)
    with transaction(pipeline.sessions) as session:
        assert approve_deprovisions(session=session, destination="hubspot") == 2
    _drain(pipeline)
    assert {s.split("|")[1] + "@example.com" for s in held} == _live_emails(pipeline)
    assert pipeline.deliveries().count(("skipped", "stale")) == 2


def test_the_window_rolls_and_a_retried_deprovision_is_counted_once(
    pipeline: Pipeline,
) -> None:
    _with(pipeline, deprovision_guard="2/1h")
    subjects = _users(pipeline, 4)
    pipeline.hubspot.fail_next(1, status=500)  # the first archive batch fails, then retries
    _block(pipeline, subjects[:2])
    _drain(pipeline)
    assert _held(pipeline) == 0  # two deprovisions, one retry: still two in the window
    with transaction(pipeline.sessions) as session:
        assert guard_state(session=session, destination="hubspot", limit=(2, 3600.0)).counted == 2
        # An hour later those two have left the window.
        session.execute(
            update(Delivery)
            .where(Delivery.deprovision_counted_at.is_not(None))
            .values(deprovision_counted_at=func.now() - timedelta(hours=1, seconds=1))
        )
    _block(pipeline, subjects[2:], at=3000)
    _drain(pipeline)
    assert _held(pipeline) == 0
    assert _live_emails(pipeline) == set()


def test_the_guard_can_be_off_for_one_destination(pipeline: Pipeline) -> None:
    _with(pipeline, destination_env={"HUBSPOT_DEPROVISION_GUARD": "off"}, deprovision_guard="1/1h")
    subjects = _users(pipeline, 3)
    _block(pipeline, subjects)
    _drain(pipeline)
    assert _held(pipeline) == 0
    assert _live_emails(pipeline) == set()


@pytest.mark.parametrize(
    ("deprovisioned", "link", "email", "counted"),
    [
        (True, LinkState(external_id="101"), None, True),  # a live link turning deprovisioned
        (True, LinkState(), "a@example.com", True),  # looked up, then archived
        (True, LinkState(), None, False),  # nothing to find
        (True, LinkState(external_id="101", deprovisioned=True), "a@example.com", False),
        (False, LinkState(external_id="101"), "a@example.com", False),
    ],
)
def test_which_intents_count_as_deprovisions(
    deprovisioned: bool, link: LinkState, email: str | None, counted: bool
) -> None:
    user = UserState("auth0|1", email, None, deprovisioned, False, {})
    assert is_deprovision(Intent(key="1", user=user, link=link)) is counted


def test_a_mistyped_guard_stops_start_up() -> None:
    with pytest.raises(ValueError, match="DEPROVISION_GUARD='lots' is not a guard"):
        Settings(deprovision_guard="lots")
    with pytest.raises(ValueError, match="HUBSPOT_DEPROVISION_GUARD='1/0s'"):
        Settings(destination_env={"HUBSPOT_DEPROVISION_GUARD": "1/0s"})


# The command line


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, pipeline: Pipeline, redis_prefix: str) -> Iterator[None]:
    values = {
        "DATABASE_URL": pipeline.settings.database_url,
        "CELERY_BROKER_URL": REDIS_URL,
        "REDIS_URL": REDIS_URL,
        "REDIS_KEY_PREFIX": redis_prefix,
        "DESTINATIONS": "hubspot",
        "HUBSPOT_TOKEN": "fake-token",
        "DEPROVISION_GUARD": "1/1h",
        "COLUMNS": "200",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    yield


def idsync(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def test_approve_deprovisions_on_the_command_line(pipeline: Pipeline, env: None) -> None:
    _with(pipeline, deprovision_guard="1/1h")
    _block(pipeline, _users(pipeline, 3))
    _drain(pipeline)

    listed = idsync("destinations", "list")
    assert "2 deprovisions held" in listed.stdout
    dry = idsync("destinations", "approve-deprovisions", "hubspot", "--dry-run")
    assert dry.exit_code == 0 and "2 held deprovisions would be released" in dry.stdout
    refused = idsync("destinations", "approve-deprovisions", "hubspot", input="n\n")
    assert refused.exit_code == 1 and _held(pipeline) == 2
    unknown = idsync("destinations", "approve-deprovisions", "nope", "--yes")
    assert unknown.exit_code == 2 and "not in DESTINATIONS" in unknown.stderr
    done = idsync("destinations", "approve-deprovisions", "hubspot", "--yes")
    assert done.exit_code == 0 and "Released 2 held deprovisions" in done.stdout
    _drain(pipeline)
    assert _live_emails(pipeline) == set()
    again = idsync("destinations", "approve-deprovisions", "hubspot", "--yes")
    assert "Nothing is held" in again.stdout


def test_held_deprovisions_show_in_readyz_and_metrics_but_not_in_the_backlog_age(
    pipeline: Pipeline,
) -> None:
    _with(pipeline, deprovision_guard="1/1h")
    pipeline.app.extensions["idsync"].settings = pipeline.settings
    _block(pipeline, _users(pipeline, 3))
    _drain(pipeline)
    ready = pipeline.client.get("/readyz").get_json()
    assert ready["deprovision_guard"]["hubspot"].startswith("holding 2 deprovisions")
    metrics = pipeline.client.get("/metrics").get_data(as_text=True)
    assert 'idsync_deliveries_held{destination="hubspot",reason="deprovision_guard"} 2.0' in metrics
    assert 'idsync_outbox_oldest_pending_age_seconds{destination="hubspot"} 0.0' in metrics


def test_the_admin_api_and_page_approve_held_deprovisions(
    settings: Settings, sessions: object, hubspot: object
) -> None:
    from tests.test_admin_page import ADMIN_TOKEN, admin_pipeline, csrf_token, sign_in

    pipe = admin_pipeline(settings, sessions, hubspot, deprovision_guard="1/1h")  # type: ignore[arg-type]
    try:
        _block(pipe, _users(pipe, 3))
        _drain(pipe)
        bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        dry = pipe.client.post(
            "/admin/destinations/hubspot/approve-deprovisions",
            json={"dry_run": True},
            headers=bearer,
        )
        assert dry.status_code == 200 and dry.get_json()["released"] == 2
        assert _held(pipe) == 2
        bad = pipe.client.post(
            "/admin/destinations/hubspot/approve-deprovisions", json={"dry": 1}, headers=bearer
        )
        assert bad.status_code == 400
        sign_in(pipe)
        page = pipe.client.get("/admin/")
        assert "2 deprovisions held" in page.get_data(as_text=True)
        forged = pipe.client.post("/admin/ui/destinations/hubspot/approve-deprovisions")
        assert forged.status_code == 400 and _held(pipe) == 2
        approved = pipe.client.post(
            "/admin/ui/destinations/hubspot/approve-deprovisions",
            data={"csrf_token": csrf_token(page)},
        )
        assert approved.status_code == 302 and _held(pipe) == 0
    finally:
        pipe.close()
