"""deliveries: drop the index on updated_at, which no query reads

Every claim and every recorded outcome writes a new version of a delivery row,
and each version is entered in every index of the table: the index on
``updated_at`` cost each delivery two index insertions (and one at ingest) and
answered no query.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 19:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_deliveries_updated_at", table_name="deliveries")


def downgrade() -> None:
    op.create_index("ix_deliveries_updated_at", "deliveries", ["updated_at"], unique=False)
