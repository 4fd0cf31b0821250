"""Who holds a claim: the `lease_owner` of a row names the holding process, and the SQL that
renews a live holder's claims and ends a dead one's.

An owner is `host:pid:start:token`: the host name, the process id, the process's start time
(clock ticks since boot, from `/proc/<pid>/stat`, so a reused pid never passes for a dead
holder) and a random token naming one unit of work (a runner's tick, a worker's task). Whether
such a process still runs is `batchwise.lifecycle.holders.alive`; this module only names it.

Three tables carry claims: requests (a realtime call), batches (an upload or a reconcile) and
job runs (a delivery). Every function here covers all three.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa

from batchwise.states import CALLS_SQL
from batchwise.store.engine import Store, batches_t, job_runs_t, requests_t
from batchwise.store.events import record_event

#: every table with a `lease_owner` column, by the name used in reports
CLAIM_TABLES: dict[str, sa.Table] = {
    "requests": requests_t,
    "batches": batches_t,
    "job_runs": job_runs_t,
}
#: a request only holds a lease while it waits for (or is in) a realtime call; the predicate
#: of the ix_requests_calls partial index, so scans by owner stay on that index
_CALLS = sa.text(CALLS_SQL)
#: how long before `now` an ended claim counts as lapsed (claims and sweeps compare strictly)
LAPSED_BY = timedelta(milliseconds=1)
#: room for the host in a 64-character `lease_owner`, beside pid, start time and token
_HOST_CHARS = 32


def hostname() -> str:
    """This host's name as owners carry it: up to 32 characters; a longer name is cut and
    suffixed with a hash of the whole, so two long names sharing a prefix stay apart."""
    name = socket.gethostname().replace(":", "_") or "localhost"
    if len(name) <= _HOST_CHARS:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: _HOST_CHARS - 9]}~{digest}"


@dataclass(frozen=True)
class Holder:
    """A process that can hold claims: its host, pid and start time (clock ticks since boot;
    0 where the platform does not say, which never matches a live process)."""

    host: str
    pid: int
    start: int

    def owner(self, token: str) -> str:
        """The `lease_owner` value for one unit of this process's work."""
        return f"{self.host}:{self.pid}:{self.start}:{token}"

    def __str__(self) -> str:
        return f"{self.host}:{self.pid} (started at tick {self.start})"


def parse_owner(owner: str) -> Holder | None:
    """The holder named by a `lease_owner`, or None for any other text (an owner written by an
    older version, or by a test), which is left to lapse with its lease."""
    parts = owner.split(":")
    if len(parts) != 4 or not parts[0]:
        return None
    host, pid, start, _token = parts
    if not (pid.isdigit() and start.isdigit()):
        return None
    return Holder(host, int(pid), int(start))


def owners_on(store: Store, host: str) -> dict[str, set[str]]:
    """The owners of `host` that hold a claim now, by table (owners of other hosts, and
    unreadable ones, are not returned)."""
    prefix = f"{host}:"
    found: dict[str, set[str]] = {}
    with store.read() as conn:
        for name, t in CLAIM_TABLES.items():
            query = sa.select(t.c.lease_owner).where(t.c.lease_owner.is_not(None)).distinct()
            if t is requests_t:
                query = query.where(_CALLS)
            owners = {
                owner
                for owner in conn.execute(query).scalars()
                if owner.startswith(prefix) and parse_owner(owner) is not None
            }
            if owners:
                found[name] = owners
    return found


def expire_claims(store: Store, owners: Collection[str], *, now: datetime) -> dict[str, list[int]]:
    """End at once the live leases `owners` hold, as if they had lapsed just before `now`
    (`lease_expires_at = now - 1 ms`), so a claim or sweep at `now` takes the rows over; the
    row ids by table.

    The owner is kept on the row: a realtime claim then records the takeover as it does for a
    lapsed lease, and the distributed sweep sends the request again. Rows whose lease already
    lapsed are left as they are. One event lists what was ended.
    """
    if not owners:
        return {}
    chosen = sorted(owners)
    lapsed = now - LAPSED_BY
    ended: dict[str, list[int]] = {}
    with store.write() as conn:
        for name, t in CLAIM_TABLES.items():
            where = sa.and_(t.c.lease_owner.in_(chosen), t.c.lease_expires_at > now)
            if t is requests_t:
                where = sa.and_(_CALLS, where)
            ids = sorted(
                conn.execute(
                    sa.update(t).where(where).values(lease_expires_at=lapsed).returning(t.c.id)
                ).scalars()
            )
            if ids:
                ended[name] = ids
        if ended:
            counts = ", ".join(f"{len(ids)} {name}" for name, ids in ended.items())
            record_event(
                conn,
                at=now,
                kind="claims_released",
                severity="warning",
                message=f"claims of dead process(es) ended at once ({counts}); a realtime "
                "call they made may have been billed without being recorded",
                data={
                    "owners": chosen[:100],
                    **{name: ids[:1000] for name, ids in ended.items()},
                },
            )
    return ended


def renew_claims(store: Store, owners: Collection[str], *, until: datetime) -> int:
    """Push the leases `owners` hold to `until` (never shortening one): one UPDATE per table,
    whatever the number of rows. How many rows were renewed."""
    if not owners:
        return 0
    chosen = sorted(owners)
    renewed = 0
    with store.write() as conn:
        for t in CLAIM_TABLES.values():
            where = sa.and_(t.c.lease_owner.in_(chosen), t.c.lease_expires_at < until)
            if t is requests_t:
                where = sa.and_(_CALLS, where)
            renewed += conn.execute(
                sa.update(t).where(where).values(lease_expires_at=until)
            ).rowcount
    return renewed
