"""delivery task id

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 18:43:52.238325
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("deliveries", sa.Column("task_id", sa.String(length=155), nullable=True))


def downgrade() -> None:
    op.drop_column("deliveries", "task_id")
