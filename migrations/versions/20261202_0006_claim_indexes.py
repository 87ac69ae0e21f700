"""deliveries: partial indexes for the claim, so it costs the same at any backlog

The claim's candidates are pending rows that are not held, in claim order, and
in-progress rows whose lease ran out. One index on all rows with an OR of the two
made PostgreSQL scan and sort every due row (166 ms at 1,000,000 pending); with a
partial index per condition each is an index scan that stops after one batch.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_deliveries_pending",
        "deliveries",
        ["destination", "priority", "next_attempt_at", "id"],
        postgresql_where=sa.text("status = 'pending' AND held IS NULL"),
        sqlite_where=sa.text("status = 'pending' AND held IS NULL"),
    )
    op.create_index(
        "ix_deliveries_leased",
        "deliveries",
        ["destination", "lease_expires_at"],
        postgresql_where=sa.text("status = 'in_progress'"),
        sqlite_where=sa.text("status = 'in_progress'"),
    )


def downgrade() -> None:
    op.drop_index("ix_deliveries_leased", table_name="deliveries")
    op.drop_index("ix_deliveries_pending", table_name="deliveries")
