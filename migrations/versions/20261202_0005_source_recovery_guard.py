"""events: how each arrived; deliveries: held by the deprovision guard; Auth0 recovery passes

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 08:15:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import models.base

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "events",
        sa.Column(
            "received_via",
            sa.String(length=16),
            server_default=sa.text("'webhook'"),
            nullable=False,
        ),
    )
    op.add_column("deliveries", sa.Column("held", sa.String(length=32), nullable=True))
    op.create_index(
        "ix_deliveries_held",
        "deliveries",
        ["destination", "held"],
        postgresql_where=sa.text("held IS NOT NULL"),
        sqlite_where=sa.text("held IS NOT NULL"),
    )
    # The deprovision guard: when it let a delivery's deprovision through (its count in
    # the rolling window), and when an operator last approved held ones (the count restarts).
    op.add_column(
        "deliveries",
        sa.Column("deprovision_counted_at", models.base.UTCDateTime(timezone=True), nullable=True),
    )
    op.create_index(
        "ix_deliveries_deprovision_counted",
        "deliveries",
        ["destination", "deprovision_counted_at"],
        postgresql_where=sa.text("deprovision_counted_at IS NOT NULL"),
        sqlite_where=sa.text("deprovision_counted_at IS NOT NULL"),
    )
    op.add_column(
        "destination_states",
        sa.Column(
            "deprovisions_approved_at", models.base.UTCDateTime(timezone=True), nullable=True
        ),
    )
    op.create_table(
        "reconcile_runs",
        sa.Column("id", models.base.BigId, primary_key=True, autoincrement=True),
        sa.Column("destination", sa.String(length=50), nullable=False),
        sa.Column(
            "started_at",
            models.base.UTCDateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.Column("finished_at", models.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("fix", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("checked", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("changed", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("missing", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("live_deprovisioned", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("fixed", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("unfixed", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
    )
    op.create_index("ix_reconcile_runs_destination", "reconcile_runs", ["destination", "id"])
    op.create_table(
        "auth0_recovery_passes",
        sa.Column("id", models.base.BigId, primary_key=True, autoincrement=True),
        sa.Column("stream_id", sa.String(length=64), nullable=False),
        sa.Column(
            "started_at",
            models.base.UTCDateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.Column("finished_at", models.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("window_from", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("window_to", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("dry_run", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("stream_status", sa.String(length=16), nullable=True),
        sa.Column("listed", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("stored", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("duplicates", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("rejected", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("redelivered", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("reenabled", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
    )
    op.create_index("ix_auth0_recovery_passes_stream", "auth0_recovery_passes", ["stream_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_reconcile_runs_destination", table_name="reconcile_runs")
    op.drop_table("reconcile_runs")
    op.drop_column("destination_states", "deprovisions_approved_at")
    op.drop_index("ix_deliveries_deprovision_counted", table_name="deliveries")
    op.drop_column("deliveries", "deprovision_counted_at")
    op.drop_index("ix_auth0_recovery_passes_stream", table_name="auth0_recovery_passes")
    op.drop_table("auth0_recovery_passes")
    op.drop_index("ix_deliveries_held", table_name="deliveries")
    op.drop_column("deliveries", "held")
    op.drop_column("events", "received_via")
