"""Forgetting what requests said: request and response bodies may hold personal data.

A purge deletes the `request_bodies` rows and sets `responses.body` to NULL for requests that
finished (reached a terminal state) before a cutoff. Everything reports need stays: the ledger,
with its tags and token counts copied in, and the request rows themselves, so totals add up the
same afterwards.
The work runs in chunks of request ids, one short transaction each, so a purge of millions of
rows never holds SQLite's write lock for long and can be interrupted and run again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from batchwise.store import purge as purge_store

if TYPE_CHECKING:
    from batchwise.store.engine import Store

DEFAULT_CHUNK = 5000


@dataclass(frozen=True, slots=True)
class PurgeResult:
    """How many bodies a purge removed (or, in a dry run, would remove)."""

    cutoff: datetime
    dry_run: bool
    #: requests whose body was removed
    requests: int
    #: responses whose body was removed
    responses: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "cutoff": self.cutoff.isoformat(),
            "dry_run": self.dry_run,
            "requests": self.requests,
            "responses": self.responses,
        }


def purge_bodies(
    store: Store,
    *,
    older_than: timedelta,
    now: datetime,
    dry_run: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
) -> PurgeResult:
    """Remove the bodies of requests finished more than `older_than` before `now`, and of their
    responses; live requests are never touched, whatever their age."""
    if older_than < timedelta(0):
        raise ValueError("older_than must not be negative")
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    cutoff = now - older_than
    if dry_run:
        with store.read() as conn:
            requests, responses = purge_store.count_bodies(conn, cutoff)
        return PurgeResult(cutoff, True, requests, responses)

    requests = responses = 0
    last_id = 0
    while True:
        with store.write() as conn:
            ids = purge_store.with_bodies(conn, cutoff, after_id=last_id, limit=chunk_size)
            if not ids:
                break
            removed = purge_store.remove_bodies(conn, ids, cutoff)
            requests += removed[0]
            responses += removed[1]
            last_id = ids[-1]
    return PurgeResult(cutoff, False, requests, responses)
