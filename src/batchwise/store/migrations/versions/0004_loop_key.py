"""loop_key: the runaway-loop guard counts a task's requests in SQL

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 07:12:50.693777

A `loop_key` column on `requests` (64 bits of the body modulo whitespace, for requests with a
task_id) and the task index widened to (task_id, loop_key), so the runaway-loop guard counts
a task's requests, and its identical ones, from the index alone instead of reading bodies.

Existing requests with a task_id are **backfilled**: from their body, in pages of ids (flat
memory), or from `body_key` when the body was purged (it still counts as a request, and as the
same body as nothing else). Requests a guard refused keep NULL: they do not count.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from hashlib import blake2b

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TASKS = "task_id IS NOT NULL"
_PAGE = 5000
_WHITESPACE = re.compile(r"\s+")


def _loop_key(body: str) -> int:
    """`costs.guards.loop_key`, copied: a migration must not change when the code does."""
    loose = _WHITESPACE.sub("", body).encode()
    return int.from_bytes(blake2b(loose, digest_size=8).digest(), "big", signed=True)


def upgrade() -> None:
    op.add_column("requests", sa.Column("loop_key", sa.BigInteger(), nullable=True))
    op.drop_index("ix_requests_task", table_name="requests")
    conn = op.get_bind()
    last = 0
    while True:
        page = conn.execute(
            sa.text(
                "SELECT r.id, b.body, r.body_key FROM requests r "
                "LEFT JOIN request_bodies b ON b.id = r.id "
                "WHERE r.task_id IS NOT NULL AND r.state <> 'rejected' AND r.id > :last "
                "ORDER BY r.id LIMIT :n"
            ),
            {"last": last, "n": _PAGE},
        ).all()
        if not page:
            break
        conn.execute(
            sa.text("UPDATE requests SET loop_key = :k WHERE id = :id"),
            [
                {"id": rid, "k": _loop_key(body) if body is not None else key}
                for rid, body, key in page
            ],
        )
        last = page[-1][0]
    op.create_index(
        "ix_requests_task",
        "requests",
        ["task_id", "loop_key"],
        sqlite_where=sa.text(_TASKS),
        postgresql_where=sa.text(_TASKS),
    )


def downgrade() -> None:
    op.drop_index("ix_requests_task", table_name="requests")
    op.execute("ALTER TABLE requests DROP COLUMN loop_key")
    op.create_index(
        "ix_requests_task",
        "requests",
        ["task_id"],
        sqlite_where=sa.text(_TASKS),
        postgresql_where=sa.text(_TASKS),
    )
