"""The delivery pipeline in-process: real PostgreSQL, the fake HubSpot over HTTP.

Events go in through the real Flask app and out through ``run_batch``, the
function the Celery task calls, so each rule of DESIGN's "Delivery semantics
for HubSpot" is checked without process start-up costs.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select

from models.tables import Delivery, DeliveryAttempt
from tests.events import auth0_event
from tests.pipeline import Pipeline
from workers.delivery import run_batch
from workers.destinations.hubspot.adapter import HubSpotDestination
from workers.ratelimit import LocalRateLimiter

__all__ = ["Pipeline"]


def test_created_user_becomes_a_contact_with_mapped_properties(pipeline: Pipeline) -> None:
    pipeline.post(
        auth0_event(
            "user.created",
            "auth0|1",
            email="Ann@Example.com",
            given_name="Ann",
            family_name="Lee",
            phone="+1555",
        )
    )
    pipeline.drain()
    contact = pipeline.hubspot.contact_by_email("ann@example.com")
    assert contact is not None
    assert contact["properties"]["firstname"] == "Ann"
    assert contact["properties"]["lastname"] == "Lee"
    assert contact["properties"]["phone"] == "+1555"
    link = pipeline.link("auth0|1")
    assert link.external_id == contact["id"] and link.created_contact
    assert pipeline.deliveries() == [("succeeded", None)]


def test_email_change_follows_the_person(pipeline: Pipeline) -> None:
    pipeline.post(auth0_event("user.created", "auth0|1", email="old@example.com", at=0))
    pipeline.drain()
    contact_id = pipeline.link("auth0|1").external_id
    pipeline.post(
        auth0_event(
            "user.updated",
            "auth0|1",
            email="new@example.com",
            previous_email="old@example.com",
            at=10,
        )
    )
    pipeline.drain()
    contact = pipeline.hubspot.contact_by_email("new@example.com")
    assert contact is not None and contact["id"] == contact_id
    assert pipeline.hubspot.contact_by_email("old@example.com") is None
    assert len(pipeline.hubspot.contacts()) == 1


def test_first_event_with_new_email_adopts_contact_by_previous_email(pipeline: Pipeline) -> None:
    existing = pipeline.hubspot.seed_contact({"email": "old@example.com", "company": "ACME"})
    pipeline.post(
        auth0_event(
            "user.updated", "auth0|1", email="new@example.com", previous_email="old@example.com"
        )
    )
    pipeline.drain()
    contacts = pipeline.hubspot.contacts()
    assert [c["id"] for c in contacts] == [existing]
    assert contacts[0]["properties"]["email"] == "new@example.com"
    assert contacts[0]["properties"]["company"] == "ACME"  # unmapped: untouched
    assert not pipeline.link("auth0|1").created_contact


def test_out_of_order_update_before_create_ends_at_newest(pipeline: Pipeline) -> None:
    pipeline.post(
        auth0_event("user.updated", "auth0|1", email="a@example.com", given_name="New", at=10)
    )
    pipeline.post(
        auth0_event("user.created", "auth0|1", email="a@example.com", given_name="Old", at=0)
    )
    pipeline.drain()
    contact = pipeline.hubspot.contact_by_email("a@example.com")
    assert contact is not None and contact["properties"]["firstname"] == "New"
    assert sorted(pipeline.deliveries()) == [("skipped", "stale"), ("succeeded", None)]


def test_late_update_after_delete_is_stale(pipeline: Pipeline) -> None:
    pipeline.post(auth0_event("user.created", "auth0|1", email="a@example.com", at=0))
    pipeline.drain()
    pipeline.post(auth0_event("user.deleted", "auth0|1", at=20))
    pipeline.drain()
    pipeline.post(auth0_event("user.updated", "auth0|1", email="a@example.com", at=10))
    pipeline.drain()
    assert pipeline.hubspot.contacts() == []
    assert pipeline.deliveries()[-1] == ("skipped", "stale")


def test_delete_without_email_archives_linked_contact(pipeline: Pipeline) -> None:
    pipeline.post(auth0_event("user.created", "auth0|1", email="a@example.com", at=0))
    pipeline.drain()
    pipeline.post(auth0_event("user.deleted", "auth0|1", at=5))
    pipeline.drain()
    assert pipeline.hubspot.contacts() == []
    assert pipeline.link("auth0|1").deprovisioned


def test_blocked_then_unblocked_restores_a_live_contact(pipeline: Pipeline) -> None:
    pipeline.post(auth0_event("user.created", "auth0|1", email="a@example.com", at=0))
    pipeline.drain()
    pipeline.post(auth0_event("user.updated", "auth0|1", email="a@example.com", blocked=True, at=5))
    pipeline.drain()
    assert pipeline.hubspot.contacts() == []
    pipeline.post(
        auth0_event("user.updated", "auth0|1", email="a@example.com", blocked=False, at=9)
    )
    pipeline.drain()
    assert [c["properties"]["email"] for c in pipeline.hubspot.contacts()] == ["a@example.com"]
    assert not pipeline.link("auth0|1").deprovisioned


def test_mark_mode_sets_a_property_instead_of_archiving(pipeline: Pipeline) -> None:
    pipeline.settings = pipeline.settings.model_copy(update={"deprovision": "mark"})
    pipeline.destination = HubSpotDestination(
        pipeline.settings, LocalRateLimiter(limit=1000, window=1)
    )
    pipeline.post(auth0_event("user.created", "auth0|1", email="a@example.com", at=0))
    pipeline.drain()
    pipeline.post(auth0_event("user.deleted", "auth0|1", at=5))
    pipeline.drain()
    contact = pipeline.hubspot.contact_by_email("a@example.com")
    assert contact is not None
    assert contact["properties"]["idsync_deprovisioned"] == "true"
    assert pipeline.link("auth0|1").deprovisioned


def test_no_email_and_no_link_is_skipped(pipeline: Pipeline) -> None:
    pipeline.post(auth0_event("user.created", "auth0|1"))
    pipeline.drain()
    assert pipeline.deliveries() == [("skipped", "no_email")]
    assert pipeline.hubspot.contacts() == []


def test_unchanged_properties_are_not_sent_again(pipeline: Pipeline) -> None:
    pipeline.post(auth0_event("user.created", "auth0|1", email="a@example.com", at=0))
    pipeline.drain()
    before = len(pipeline.hubspot.requests_log)
    pipeline.post(auth0_event("user.updated", "auth0|1", email="a@example.com", at=5))
    pipeline.drain()
    assert len(pipeline.hubspot.requests_log) == before
    assert pipeline.deliveries()[-1] == ("succeeded", "unchanged")


def test_absent_mapped_field_is_cleared(pipeline: Pipeline) -> None:
    pipeline.post(
        auth0_event("user.created", "auth0|1", email="a@example.com", given_name="Ann", at=0)
    )
    pipeline.drain()
    pipeline.post(auth0_event("user.updated", "auth0|1", email="a@example.com", at=5))
    pipeline.drain()
    contact = pipeline.hubspot.contact_by_email("a@example.com")
    assert contact is not None and contact["properties"].get("firstname", "") == ""


def test_contact_deleted_by_hand_is_recreated(pipeline: Pipeline) -> None:
    pipeline.post(auth0_event("user.created", "auth0|1", email="a@example.com", at=0))
    pipeline.drain()
    old_id = pipeline.link("auth0|1").external_id
    pipeline.hubspot.contacts()  # the contact exists
    import requests

    requests.delete(
        f"{pipeline.hubspot.url}/crm/v3/objects/contacts/{old_id}",
        headers={"Authorization": "Bearer fake-token"},
        timeout=5,
    )
    pipeline.post(
        auth0_event("user.updated", "auth0|1", email="a@example.com", given_name="Ann", at=5)
    )
    pipeline.drain()
    contact = pipeline.hubspot.contact_by_email("a@example.com")
    assert contact is not None and contact["id"] != old_id
    assert pipeline.link("auth0|1").external_id == contact["id"]


def test_contact_held_by_another_user_is_not_adopted(pipeline: Pipeline) -> None:
    pipeline.post(auth0_event("user.created", "auth0|1", email="same@example.com", at=0))
    pipeline.drain()
    pipeline.post(auth0_event("user.created", "auth0|2", email="same@example.com", at=1))
    pipeline.drain()
    assert pipeline.deliveries() == [("succeeded", None), ("failed", "contact_owned")]


def test_email_change_onto_another_contact_is_email_conflict(pipeline: Pipeline) -> None:
    pipeline.hubspot.seed_contact({"email": "taken@example.com"})
    pipeline.post(auth0_event("user.created", "auth0|1", email="a@example.com", at=0))
    pipeline.drain()
    pipeline.post(auth0_event("user.updated", "auth0|1", email="taken@example.com", at=5))
    pipeline.drain()
    assert pipeline.deliveries()[-1] == ("failed", "email_conflict")


def test_merged_contact_moves_the_link(pipeline: Pipeline) -> None:
    pipeline.post(auth0_event("user.created", "auth0|1", email="a@example.com", at=0))
    pipeline.drain()
    old_id = pipeline.link("auth0|1").external_id
    assert old_id is not None
    survivor = pipeline.hubspot.seed_contact({"email": "b@example.com"})
    pipeline.hubspot.merge(old_id, survivor)
    pipeline.post(
        auth0_event("user.updated", "auth0|1", email="a@example.com", given_name="Ann", at=5)
    )
    pipeline.drain()
    assert pipeline.link("auth0|1").external_id == survivor


@pytest.mark.parametrize(
    ("status", "final"),
    [(500, ("succeeded", None)), (503, ("succeeded", None)), (423, ("succeeded", None))],
)
def test_transient_errors_are_retried(pipeline: Pipeline, status: int, final: tuple) -> None:
    pipeline.hubspot.fail_next(2, status=status)
    pipeline.post(auth0_event("user.created", "auth0|1", email="a@example.com"))
    pipeline.drain()
    assert pipeline.deliveries() == [final]
    with pipeline.sessions() as session:
        codes = [a.status_code for a in session.scalars(select(DeliveryAttempt))]
    assert codes[:2] == [status, status] and codes[-1] in (200, 201, 207)


def test_invalid_email_fails_without_retry(pipeline: Pipeline) -> None:
    pipeline.post(auth0_event("user.created", "auth0|1", email="not-an-email"))
    pipeline.drain()
    [(status, reason)] = pipeline.deliveries()
    assert (status, reason) == ("failed", "rejected")
    with pipeline.sessions() as session:
        delivery = session.scalars(select(Delivery)).one()
        assert "INVALID_EMAIL" in (delivery.last_error or "")
        assert delivery.attempts == 1


def test_rate_limit_does_not_spend_the_budget(pipeline: Pipeline) -> None:
    pipeline.hubspot.rate_limit_next(6, retry_after=0)
    pipeline.post(auth0_event("user.created", "auth0|1", email="a@example.com"))
    pipeline.drain(rounds=30)
    assert pipeline.deliveries() == [("succeeded", None)]


def test_bad_token_pauses_the_destination(pipeline: Pipeline) -> None:
    pipeline.hubspot.set_token("rotated")
    pipeline.post(auth0_event("user.created", "auth0|1", email="a@example.com"))
    run_batch(
        sessions=pipeline.sessions, settings=pipeline.settings, destination=pipeline.destination
    )
    assert pipeline.deliveries() == [("pending", None)]
    assert pipeline.client.get("/readyz").json["destinations"]["hubspot"].startswith("paused")


def test_one_bad_input_in_a_batch_fails_alone(pipeline: Pipeline) -> None:
    for n in range(8):
        email = "broken address" if n == 3 else f"u{n}@example.com"
        pipeline.post(auth0_event("user.created", f"auth0|{n}", email=email))
    pipeline.drain()
    statuses = pipeline.deliveries()
    assert statuses.count(("succeeded", None)) == 7
    assert statuses[3] == ("failed", "rejected")
    # One create call for the seven and the bad one together: HubSpot split it (207).
    creates = [r for r in pipeline.hubspot.requests_log if r.path.endswith("batch/create")]
    assert len(creates) == 1


def test_whole_batch_400_is_split_until_the_bad_input_is_alone(pipeline: Pipeline) -> None:
    for n in range(8):
        pipeline.post(auth0_event("user.created", f"auth0|{n}", email=f"u{n}@example.com"))
    # Two whole-batch 400s: the batch is halved until each call goes through.
    pipeline.hubspot.fail_next(2, status=400)
    pipeline.drain()
    assert pipeline.deliveries() == [("succeeded", None)] * 8
    assert len(pipeline.hubspot.contacts()) == 8
    assert len(pipeline.hubspot.requests_log) > 2


def test_batches_group_users_into_few_calls(pipeline: Pipeline) -> None:
    for n in range(50):
        pipeline.post(auth0_event("user.created", f"auth0|{n}", email=f"u{n}@example.com"))
    pipeline.drain()
    assert len(pipeline.hubspot.contacts()) == 50
    # One create call for fifty new users: creating is the lookup.
    assert [r.path for r in pipeline.hubspot.requests_log] == [
        "/crm/v3/objects/contacts/batch/create"
    ]


def test_existing_contacts_are_adopted_through_the_create_conflict(pipeline: Pipeline) -> None:
    existing = {n: pipeline.hubspot.seed_contact({"email": f"u{n}@example.com"}) for n in (1, 3)}
    for n in range(5):
        pipeline.post(auth0_event("user.created", f"auth0|{n}", email=f"u{n}@example.com"))
    pipeline.drain()
    assert len(pipeline.hubspot.contacts()) == 5
    for n, contact_id in existing.items():
        link = pipeline.link(f"auth0|{n}")
        assert link.external_id == contact_id and not link.created_contact
    assert pipeline.link("auth0|0").created_contact


def test_a_rejected_input_of_a_207_keeps_its_own_error_on_its_attempt(
    pipeline: Pipeline,
) -> None:
    pipeline.post(auth0_event("user.created", "auth0|ok", email="ok@example.com"))
    pipeline.post(auth0_event("user.created", "auth0|bad", email="bad address"))
    pipeline.drain()
    with pipeline.sessions() as session:
        rows = session.execute(
            select(Delivery.subject, DeliveryAttempt.error_category, DeliveryAttempt.status_code)
            .join(DeliveryAttempt)
            .where(DeliveryAttempt.request_summary.like("%create%"))
        ).all()
    by_subject = {row.subject: row for row in rows}
    assert by_subject["auth0|ok"].error_category is None
    assert by_subject["auth0|bad"].error_category == "VALIDATION_ERROR"
    assert by_subject["auth0|bad"].status_code == 400
