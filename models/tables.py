"""The outbox tables: events, deliveries, attempts, links, quarantine, destinations."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    Enum,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from models.base import Base, BigId, JsonDocument, UTCDateTime


class EventStatus(enum.StrEnum):
    ACCEPTED = "accepted"
    IGNORED = "ignored"


class ReceivedVia(enum.StrEnum):
    """How an event reached idsync."""

    WEBHOOK = "webhook"  # the Event Stream posted it
    RECOVERY = "recovery"  # read back from Auth0's failed deliveries
    BACKFILL = "backfill"  # made from a user export


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    SUCCEEDED = "succeeded"
    SKIPPED = "skipped"
    FAILED = "failed"


FINISHED = (DeliveryStatus.SUCCEEDED, DeliveryStatus.SKIPPED, DeliveryStatus.FAILED)


def _enum(kind: type[enum.Enum], name: str) -> Enum:
    """Store an enum by its value as text, with a named CHECK constraint."""
    return Enum(
        kind,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=20,
        values_callable=lambda members: [member.value for member in members],
    )


def _now_column() -> Mapped[datetime]:
    return mapped_column(UTCDateTime(), server_default=func.now(), nullable=False)


class Event(Base):
    """One Auth0 event as received, unique on (source, event id)."""

    __tablename__ = "events"
    __table_args__ = (
        UniqueConstraint("source", "event_id"),
        Index("ix_events_source_subject", "source", "subject"),
        Index("ix_events_received_at", "received_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    source: Mapped[str] = mapped_column(String(255))
    event_id: Mapped[str] = mapped_column(String(255))
    type: Mapped[str] = mapped_column(String(100))
    subject: Mapped[str | None] = mapped_column(String(255))
    event_time: Mapped[datetime] = mapped_column(UTCDateTime())
    object_updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    received_at: Mapped[datetime] = _now_column()
    status: Mapped[EventStatus] = mapped_column(_enum(EventStatus, "event_status"))
    ignore_reason: Mapped[str | None] = mapped_column(String(64))
    body_sha256: Mapped[str] = mapped_column(String(64))
    # The CloudEvent without data.context; set to NULL when retention purges it.
    payload: Mapped[dict[str, Any] | None] = mapped_column(JsonDocument)
    # A ReceivedVia value.
    received_via: Mapped[str] = mapped_column(
        String(16), default=ReceivedVia.WEBHOOK.value, server_default=text("'webhook'")
    )

    deliveries: Mapped[list[Delivery]] = relationship(back_populates="event")


class Delivery(Base):
    """One event on its way to one destination."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("event_pk", "destination"),
        # Counts and ages by destination and status (metrics, the admin page).
        Index("ix_deliveries_claim", "destination", "status", "priority", "next_attempt_at"),
        # The claim reads claimable pending work in claim order, and orphans by lease
        # expiry, as two index scans that stop after a batch: the same cost at any backlog.
        Index(
            "ix_deliveries_pending",
            "destination",
            "priority",
            "next_attempt_at",
            "id",
            postgresql_where=text("status = 'pending' AND held IS NULL"),
            sqlite_where=text("status = 'pending' AND held IS NULL"),
        ),
        Index(
            "ix_deliveries_leased",
            "destination",
            "lease_expires_at",
            postgresql_where=text("status = 'in_progress'"),
            sqlite_where=text("status = 'in_progress'"),
        ),
        Index("ix_deliveries_user", "destination", "source", "subject", "status"),
        Index(
            "ix_deliveries_held",
            "destination",
            "held",
            postgresql_where=text("held IS NOT NULL"),
            sqlite_where=text("held IS NOT NULL"),
        ),
        # The deprovision guard counts a destination's recent deprovisions.
        Index(
            "ix_deliveries_deprovision_counted",
            "destination",
            "deprovision_counted_at",
            postgresql_where=text("deprovision_counted_at IS NOT NULL"),
            sqlite_where=text("deprovision_counted_at IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    event_pk: Mapped[int] = mapped_column(ForeignKey("events.id", ondelete="CASCADE"))
    destination: Mapped[str] = mapped_column(String(50))
    # Copied from the event so that a user's work is claimed without a join.
    source: Mapped[str] = mapped_column(String(255))
    subject: Mapped[str] = mapped_column(String(255))
    status: Mapped[DeliveryStatus] = mapped_column(
        _enum(DeliveryStatus, "delivery_status"), default=DeliveryStatus.PENDING
    )
    reason: Mapped[str | None] = mapped_column(String(64))
    # 0 is live traffic, 1 an operator's replay: live work is claimed first.
    priority: Mapped[int] = mapped_column(SmallInteger, default=0, server_default=text("0"))
    # A resync sends the user's state even when the stale rule would skip it.
    force: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    reclaims: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # How often an operator resynced it: part of the message id a receiver dedupes on.
    resyncs: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    next_attempt_at: Mapped[datetime] = _now_column()
    lease_token: Mapped[str | None] = mapped_column(String(36))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    external_id: Mapped[str | None] = mapped_column(String(64))
    # Pending but not to be claimed until an operator releases it (``deprovision_guard``).
    held: Mapped[str | None] = mapped_column(String(32))
    # When the deprovision guard let this delivery's deprovision through: it counts in
    # the guard's rolling window from then on, and a retry of it is not counted again.
    deprovision_counted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The Celery task that last claimed it: open it in Flower at /task/<task_id>.
    task_id: Mapped[str | None] = mapped_column(String(155))
    created_at: Mapped[datetime] = _now_column()
    updated_at: Mapped[datetime] = _now_column()
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    event: Mapped[Event] = relationship(back_populates="deliveries")
    attempt_records: Mapped[list[DeliveryAttempt]] = relationship(
        back_populates="delivery", order_by="DeliveryAttempt.id"
    )


class DeliveryAttempt(Base):
    """One HTTP call made on behalf of a delivery, with what came back (masked)."""

    __tablename__ = "delivery_attempts"
    __table_args__ = (Index("ix_delivery_attempts_delivery_id", "delivery_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("deliveries.id", ondelete="CASCADE"))
    started_at: Mapped[datetime] = _now_column()
    duration_ms: Mapped[float | None] = mapped_column()
    request_summary: Mapped[str] = mapped_column(String(255))
    status_code: Mapped[int | None] = mapped_column(Integer)
    error_category: Mapped[str | None] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(32))
    response_excerpt: Mapped[str | None] = mapped_column(Text)

    delivery: Mapped[Delivery] = relationship(back_populates="attempt_records")


class Link(Base):
    """What idsync knows of one user at one destination, and the hold on that user."""

    __tablename__ = "links"
    __table_args__ = (
        UniqueConstraint("destination", "source", "subject"),
        # A contact belongs to at most one live link.
        Index(
            "uq_links_live_external_id",
            "destination",
            "external_id",
            unique=True,
            postgresql_where=text("external_id IS NOT NULL AND NOT deprovisioned"),
            sqlite_where=text("external_id IS NOT NULL AND NOT deprovisioned"),
        ),
        # The verification sweep looks for links whose uncertain window has passed.
        Index(
            "ix_links_uncertain_until",
            "destination",
            "uncertain_until",
            postgresql_where=text("uncertain_until IS NOT NULL"),
            sqlite_where=text("uncertain_until IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    destination: Mapped[str] = mapped_column(String(50))
    source: Mapped[str] = mapped_column(String(255))
    subject: Mapped[str] = mapped_column(String(255))
    external_id: Mapped[str | None] = mapped_column(String(64))
    created_contact: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=text("false")
    )
    last_order_key: Mapped[str | None] = mapped_column(String(400))
    properties_hash: Mapped[str | None] = mapped_column(String(64))
    last_email: Mapped[str | None] = mapped_column(String(320))
    deprovisioned: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=text("false")
    )
    lease_token: Mapped[str | None] = mapped_column(String(36))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # A call whose outcome is unknown (a timeout, a connection lost after sending) may
    # still land until then: the next write reads back first, and a verification
    # runs when the window has passed.
    uncertain_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Set when two users ended on one contact: their deliveries fail ``contact_owned``
    # without a call until ``idsync resync --subject`` clears it.
    conflict: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = _now_column()


class Quarantine(Base):
    """An authenticated body that failed validation, kept for operators."""

    __tablename__ = "quarantine"
    __table_args__ = (Index("ix_quarantine_received_at", "received_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    received_at: Mapped[datetime] = _now_column()
    reason: Mapped[str] = mapped_column(Text)
    source: Mapped[str | None] = mapped_column(String(255))
    event_id: Mapped[str | None] = mapped_column(String(255))
    body: Mapped[str] = mapped_column(Text)


class DestinationState(Base):
    """Whether a destination is paused, why, and when to probe it again."""

    __tablename__ = "destination_states"

    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    paused: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    paused_reason: Mapped[str | None] = mapped_column(Text)
    paused_by: Mapped[str | None] = mapped_column(String(20))
    paused_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    next_probe_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # An operator released the deprovisions held for it: the guard counts anew from here.
    deprovisions_approved_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ReconcileRun(Base):
    """One reconciliation of a destination's records against the links, and its drift."""

    __tablename__ = "reconcile_runs"
    __table_args__ = (Index("ix_reconcile_runs_destination", "destination", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    destination: Mapped[str] = mapped_column(String(50))
    started_at: Mapped[datetime] = _now_column()
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    trigger: Mapped[str] = mapped_column(String(16))  # cli, or beat
    fix: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    checked: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # Drift found: changed by hand, missing (deleted or merged), live though deprovisioned.
    changed: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    missing: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    live_deprovisioned: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    fixed: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    unfixed: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    error: Mapped[str | None] = mapped_column(Text)


class Auth0RecoveryPass(Base):
    """One pass over an Event Stream's failed deliveries, and what it found."""

    __tablename__ = "auth0_recovery_passes"
    __table_args__ = (Index("ix_auth0_recovery_passes_stream", "stream_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    stream_id: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = _now_column()
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The window of delivery times it read; the newest finished window_to is the watermark.
    window_from: Mapped[datetime] = mapped_column(UTCDateTime())
    window_to: Mapped[datetime] = mapped_column(UTCDateTime())
    trigger: Mapped[str] = mapped_column(String(16))  # beat, or cli
    dry_run: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    stream_status: Mapped[str | None] = mapped_column(String(16))
    listed: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    stored: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    duplicates: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    rejected: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    redelivered: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    reenabled: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    error: Mapped[str | None] = mapped_column(Text)
