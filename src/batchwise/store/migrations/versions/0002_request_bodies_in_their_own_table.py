"""request bodies in their own table; a narrow dedupe key; batch member lists

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 17:14:31.998265

Bodies move from `requests.body` to `request_bodies` (same id), so the rows every state change
rewrites stay narrow. Purged bodies (NULL) get no row. The dedupe index on answered requests is
keyed by `body_key` (64 bits of the hash, filled in here for existing rows) instead of
(provider, endpoint, body_hash). Batches get `member_ids`, the packed requests not yet linked
to them; batches packed before this revision linked theirs as `packed` rows, which the code still
reads. `DROP COLUMN` is native on PostgreSQL
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
        sa.PrimaryKeyConstraint("id"),
    )
    op.execute(
        "INSERT INTO request_bodies (id, body) SELECT id, body FROM requests WHERE body IS NOT NULL"
    )
    op.execute("ALTER TABLE requests DROP COLUMN body")
    op.drop_index("ix_requests_answered_hash", table_name="requests")
    op.add_column("requests", sa.Column("body_key", sa.BigInteger(), nullable=True))
    _fill_body_keys(op.get_bind())
    op.add_column("batches", sa.Column("member_ids", sa.LargeBinary(), nullable=True))
    op.create_index(
        "ix_batches_members",
        "batches",
        ["id"],
        sqlite_where=sa.text("member_ids IS NOT NULL"),
        postgresql_where=sa.text("member_ids IS NOT NULL"),
    )
    op.create_index(
        "ix_requests_answered",
        "requests",
        ["body_key"],
        sqlite_where=sa.text("state = 'succeeded'"),
        postgresql_where=sa.text("state = 'succeeded'"),
    )


def _fill_body_keys(conn: sa.Connection) -> None:
    """One UPDATE over the whole table, so a big store upgrades in flat memory."""
    if conn.dialect.name == "postgresql":
        # The first 16 hex digits as 64 bits, read back as a signed bigint.
        op.execute(
            "UPDATE requests SET body_key = ('x' || substr(body_hash, 1, 16))::bit(64)::bigint"
        )
        return
    raw = conn.connection.driver_connection
    assert raw is not None, "an open connection"
    raw.create_function("batchwise_0002_body_key", 1, _key, deterministic=True)
    op.execute("UPDATE requests SET body_key = batchwise_0002_body_key(body_hash)")


def _key(body_hash: str) -> int:
    """`store.intake_rows.body_key`, copied: a migration must not change when the code does."""
    return int.from_bytes(bytes.fromhex(body_hash[:16]), "big", signed=True)


def downgrade() -> None:
    op.drop_index("ix_batches_members", table_name="batches")
    op.execute("ALTER TABLE batches DROP COLUMN member_ids")
    op.drop_index("ix_requests_answered", table_name="requests")
    op.execute("ALTER TABLE requests DROP COLUMN body_key")
    op.create_index(
        "ix_requests_answered_hash",
        "requests",
        ["provider", "endpoint", "body_hash"],
        sqlite_where=sa.text("state = 'succeeded'"),
        postgresql_where=sa.text("state = 'succeeded'"),
    )
    op.execute("ALTER TABLE requests ADD COLUMN body TEXT")
    op.execute(
        "UPDATE requests SET body = (SELECT b.body FROM request_bodies b WHERE b.id = requests.id)"
    )
    op.drop_table("request_bodies")
