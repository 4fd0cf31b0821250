"""submissions; custom_id unique within its submission, up to 512 characters

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-14 10:02:11.418305

A `submissions` table (one row per `submit`, `Client` call or cron job run) and, on
`requests`, `submission_id` and `input_format` (openai | anthropic | simple). The live
custom_id index becomes (submission_id, custom_id), and `custom_id` grows from 64 to 512
characters.

Existing requests are **backfilled**, not left NULL: each cron job run's requests become one
submission (source `job:NAME`), and every other request one submission named
"before submissions" (source `upgrade`). Their `input_format` stays NULL (unknown): exports
give them their provider's format, as before. Custom_ids were unique store-wide among live
requests until now, so the new index holds at once.

On SQLite the column's declared type can only change by rebuilding the table (Alembic's batch
mode); the partial indexes are dropped first and created again after, so the rebuild cannot
lose their predicates. PostgreSQL alters in place (widening a varchar rewrites nothing).
The downgrade fails if two live requests now share a custom_id or an id is longer than 64.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import batchwise.store.schema

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_LIVE = "finished_at IS NULL"
#: the partial indexes of `requests` at 0002 besides the custom_id one, copied (a migration
#: must not change when the code does): name, columns, predicate
_OTHER_INDEXES = (
    ("ix_requests_queued", ["deadline"], "state = 'queued'"),
    ("ix_requests_calls", ["deadline"], "(state = 'dispatching' OR state = 'rescued')"),
    ("ix_requests_batch", ["batch_id"], "batch_id IS NOT NULL AND finished_at IS NULL"),
    ("ix_requests_job_run", ["job_run_id"], "job_run_id IS NOT NULL"),
    ("ix_requests_task", ["task_id"], "task_id IS NOT NULL"),
    ("ix_requests_answered", ["body_key"], "state = 'succeeded'"),
)


def _create_index(name: str, columns: list[str], predicate: str, *, unique: bool = False) -> None:
    op.create_index(
        name,
        "requests",
        columns,
        unique=unique,
        sqlite_where=sa.text(predicate),
        postgresql_where=sa.text(predicate),
    )


def _sqlite() -> bool:
    return op.get_bind().dialect.name == "sqlite"


def upgrade() -> None:
    op.create_table(
        "submissions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=True),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=True),
        sa.Column("job_run_id", sa.Integer(), nullable=True),
        sa.Column("first_request_id", sa.Integer(), nullable=True),
        sa.Column("last_request_id", sa.Integer(), nullable=True),
        sa.Column("created_at", batchwise.store.schema.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.drop_index("uq_requests_live_custom_id", table_name="requests")
    rebuild = _sqlite()
    if rebuild:
        for name, _, _ in _OTHER_INDEXES:
            op.drop_index(name, table_name="requests")
    with op.batch_alter_table("requests") as batch_op:
        batch_op.alter_column(
            "custom_id",
            existing_type=sa.String(length=64),
            type_=sa.String(length=512),
            existing_nullable=False,
        )
        batch_op.add_column(sa.Column("submission_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("input_format", sa.String(length=16), nullable=True))
    _backfill(op.get_bind())
    if rebuild:
        for name, columns, predicate in _OTHER_INDEXES:
            _create_index(name, columns, predicate)
    _create_index("uq_requests_live_custom_id", ["submission_id", "custom_id"], _LIVE, unique=True)


def _backfill(conn: sa.Connection) -> None:
    """One submission per cron job run, one for everything else."""
    op.execute(
        "INSERT INTO submissions (source, job_run_id, first_request_id, last_request_id, "
        "created_at) SELECT 'job:' || j.job, r.job_run_id, min(r.id), max(r.id), "
        "min(r.created_at) FROM requests r JOIN job_runs j ON j.id = r.job_run_id "
        "GROUP BY r.job_run_id, j.job ORDER BY r.job_run_id"
    )
    op.execute(
        "UPDATE requests SET submission_id = (SELECT s.id FROM submissions s "
        "WHERE s.job_run_id = requests.job_run_id) WHERE job_run_id IS NOT NULL"
    )
    first, last, created = conn.execute(
        sa.text(
            "SELECT min(id), max(id), min(created_at) FROM requests WHERE submission_id IS NULL"
        )
    ).one()
    if first is None:
        return
    conn.execute(
        sa.text(
            "INSERT INTO submissions (name, source, first_request_id, last_request_id, "
            "created_at) VALUES ('before submissions', 'upgrade', :first, :last, :created)"
        ),
        {"first": first, "last": last, "created": created},
    )
    rest = conn.execute(sa.text("SELECT max(id) FROM submissions")).scalar_one()
    conn.execute(
        sa.text("UPDATE requests SET submission_id = :s WHERE submission_id IS NULL"), {"s": rest}
    )


def downgrade() -> None:
    op.drop_index("uq_requests_live_custom_id", table_name="requests")
    rebuild = _sqlite()
    if rebuild:
        for name, _, _ in _OTHER_INDEXES:
            op.drop_index(name, table_name="requests")
    with op.batch_alter_table("requests") as batch_op:
        batch_op.drop_column("input_format")
        batch_op.drop_column("submission_id")
        batch_op.alter_column(
            "custom_id",
            existing_type=sa.String(length=512),
            type_=sa.String(length=64),
            existing_nullable=False,
        )
    if rebuild:
        for name, columns, predicate in _OTHER_INDEXES:
            _create_index(name, columns, predicate)
    _create_index("uq_requests_live_custom_id", ["custom_id"], _LIVE, unique=True)
    op.drop_table("submissions")
