"""request bodies in their own table

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 17:14:31.998265

Bodies move from `requests.body` to `request_bodies` (same id), so the rows every state change
rewrites stay narrow. Purged bodies (NULL) get no row. `DROP COLUMN` is native on PostgreSQL
and on SQLite 3.35+, and keeps the partial indexes that a table rebuild would have to recreate.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "request_bodies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["id"], ["requests.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.execute(
        "INSERT INTO request_bodies (id, body) SELECT id, body FROM requests WHERE body IS NOT NULL"
    )
    op.execute("ALTER TABLE requests DROP COLUMN body")


def downgrade() -> None:
    op.execute("ALTER TABLE requests ADD COLUMN body TEXT")
    op.execute(
        "UPDATE requests SET body = (SELECT b.body FROM request_bodies b WHERE b.id = requests.id)"
    )
    op.drop_table("request_bodies")
