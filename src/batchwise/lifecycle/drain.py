"""When `run --until-idle` may stop: every request is terminal, or the only work left waits
for a known reason until a known time further off than `HELD_AFTER_S`:

- **held**: queued with `not_before` later than that (a budget's "wait" policy holds a
  request until its next budget period);
- **capacity**: queued for a model that waits after a capacity refusal past that time;
- **creation bound**: listed on a batch held after too many provider creations within the
  hour (`capacity.creation_hold`), until its hour is over.

Anything else live (a batch at the provider, a call, a request free to be packed, a wait
that ends sooner) keeps the run going. `held` is the decision; `Held` says what waits, how
many, until when, for the run's last line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from batchwise.config import Settings
from batchwise.lifecycle import capacity
from batchwise.states import BatchState
from batchwise.store import drain

if TYPE_CHECKING:
    from batchwise.store.engine import Store

#: waits that end sooner than this are waited out by `--until-idle` (seconds)
HELD_AFTER_S = 300.0


@dataclass
class Held:
    """Requests left waiting when a run stops: by reason, how many and until when."""

    #: reason -> [requests, until (the latest end of a wait for that reason)]
    reasons: dict[str, tuple[int, datetime]] = field(default_factory=dict)

    def add(self, reason: str, count: int, until: datetime) -> None:
        if count <= 0:
            return
        known = self.reasons.get(reason)
        if known is None:
            self.reasons[reason] = (count, until)
        else:
            self.reasons[reason] = (known[0] + count, max(known[1], until))

    @property
    def count(self) -> int:
        return sum(n for n, _ in self.reasons.values())

    @property
    def until(self) -> datetime | None:
        return max((u for _, u in self.reasons.values()), default=None)

    def line(self) -> str:
        """One line for the end of a run: how many are held, why and until when."""
        if not self.reasons:
            return "held: none (every request is terminal)"
        parts = [
            f"{n:,} {reason} until {until.isoformat(timespec='seconds')}"
            for reason, (n, until) in sorted(self.reasons.items())
        ]
        return f"held: {self.count:,} request(s) ({'; '.join(parts)})"

    def as_json(self) -> dict[str, object]:
        return {
            "held": self.count,
            "until": None if self.until is None else self.until.isoformat(),
            "reasons": {
                reason: {"requests": n, "until": until.isoformat()}
                for reason, (n, until) in sorted(self.reasons.items())
            },
        }


def held(store: Store, settings: Settings, *, now: datetime) -> Held | None:
    """What waits, if all the live work waits for a known reason past `HELD_AFTER_S` from
    `now`; None if something can still move sooner (then keep running)."""
    horizon = now + timedelta(seconds=HELD_AFTER_S)
    found = Held()
    with store.read() as conn:
        if drain.live_outside_queue(conn):
            return None
        batches = drain.open_batches(conn)
        groups = drain.queued_groups(conn, after=horizon)
        rooms = capacity.rooms(conn, settings, now=now)
    held_rows: dict[tuple[str, str], int] = {}
    for batch in batches:
        bound = (
            batch.state == BatchState.UPLOADING.value
            and batch.next_at is not None
            and batch.next_at > horizon
        )
        if not bound:
            return None  # at the provider, being built, or retried soon: it will move
        key = (batch.provider, batch.model)
        held_rows[key] = held_rows.get(key, 0) + batch.request_count
        found.add("creation bound", batch.request_count, batch.next_at)  # type: ignore[arg-type]
    for group in groups:
        if group.held and group.held_until is not None:
            found.add("held", group.held, group.held_until)
        free = group.free - held_rows.get((group.provider, group.model), 0)
        if free <= 0:
            continue
        wait = rooms[group.provider, group.model].wait_until
        if wait is None or wait <= horizon:
            return None
        found.add("capacity", free, wait)
    return found
