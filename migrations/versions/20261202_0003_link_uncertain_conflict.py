"""links: uncertain outcomes and shared-contact conflicts

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 04:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import models.base

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "links", sa.Column("uncertain_until", models.base.UTCDateTime(timezone=True), nullable=True)
    )
    op.add_column("links", sa.Column("conflict", sa.Text(), nullable=True))
    # The verification sweep looks for links whose window has passed.
    op.create_index(
        "ix_links_uncertain_until",
        "links",
        ["destination", "uncertain_until"],
        postgresql_where=sa.text("uncertain_until IS NOT NULL"),
        sqlite_where=sa.text("uncertain_until IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_links_uncertain_until", table_name="links")
    op.drop_column("links", "conflict")
    op.drop_column("links", "uncertain_until")
