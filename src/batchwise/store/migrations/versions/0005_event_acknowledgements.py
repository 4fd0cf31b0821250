"""event acknowledgements: a triggered safeguard is handled, not forgotten

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 07:50:00.000000

Three nullable columns on `events`, set once by `batchwise events ack`: `acknowledged_at`,
`acknowledged_by` and `ack_note`. Existing events stay unacknowledged. (The owner a guard or
alert names travels in the event's `data` JSON, so it needs no column.)
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from batchwise.store.schema import UTCDateTime

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("events", sa.Column("acknowledged_at", UTCDateTime(timezone=True), nullable=True))
    op.add_column("events", sa.Column("acknowledged_by", sa.String(length=128), nullable=True))
    op.add_column("events", sa.Column("ack_note", sa.Text(), nullable=True))


def downgrade() -> None:
    op.execute("ALTER TABLE events DROP COLUMN ack_note")
    op.execute("ALTER TABLE events DROP COLUMN acknowledged_by")
    op.execute("ALTER TABLE events DROP COLUMN acknowledged_at")
