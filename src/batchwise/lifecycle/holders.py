"""Claims held by processes: is a holder still alive, ending the claims of dead ones on this
host at once, and the heartbeat that keeps a live process's claims from lapsing.

The rule: a claim lasts `lease_s` (30 s by default) and its holder's heartbeat pushes it
forward every third of that for as long as the work runs, however long (an upload, a realtime
call of minutes, a job's `on_results`). A holder that stops renewing loses its claims when
the lease lapses. A holder on this host that is no longer running loses them at once: the
embedded runner ends them when it starts, and each Celery sweep does so for its own host.

A holder is dead only when that is certain: on this host, `/proc/<pid>/stat` shows no running
process with that pid and start time (a reused pid has another start time). Anything unsure
(another host, a process of another user hidden from `/proc`, a platform without `/proc`)
counts as alive and is left to its lease.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType

from batchwise.clock import Clock
from batchwise.store.engine import Store
from batchwise.store.holders import (
    Holder,
    expire_claims,
    hostname,
    owners_on,
    parse_owner,
    renew_claims,
)

log = logging.getLogger(__name__)

PROC = Path("/proc")
#: `/proc/<pid>/stat` states of a process that has ended (zombie, dead)
_ENDED = frozenset({"Z", "X", "x"})


def proc_stat(pid: int, *, proc: Path = PROC) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of a process, from
    `/proc/<pid>/stat`; None if there is no such entry (or no /proc)."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # "pid (command) S ppid …": the command may hold spaces and parentheses, so split after
    # the last ')'; the state is field 3 and the start time field 22.
    fields = text.rsplit(")", 1)[-1].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def this_holder(*, proc: Path = PROC) -> Holder:
    """This process as a holder of claims (read each time: a forked child is another one)."""
    pid = os.getpid()
    stat = proc_stat(pid, proc=proc)
    return Holder(hostname(), pid, stat[1] if stat else 0)


#: this process's start time, kept with its pid: a forked child sees another pid and reads its
#: own (a gateway names an owner per call, and reading /proc each time cost ~0.1 ms of it)
_STARTED: tuple[int, int] | None = None


def _this_holder_cached() -> Holder:
    global _STARTED
    pid = os.getpid()
    found = _STARTED
    if found is None or found[0] != pid:
        stat = proc_stat(pid)
        found = _STARTED = (pid, stat[1] if stat else 0)
    return Holder(hostname(), pid, found[1])


def new_owner() -> str:
    """A `lease_owner` for one unit of this process's work (a tick, a task)."""
    return _this_holder_cached().owner(uuid.uuid4().hex[:8])


def alive(holder: Holder, *, host: str, proc: Path = PROC) -> bool:
    """False only if `holder` is certainly gone: it ran on `host` (this host) and no running
    process there has its pid and start time."""
    if holder.host != host or holder.pid <= 0:
        return True
    stat = proc_stat(holder.pid, proc=proc)
    if stat is not None:
        state, start = stat
        return state not in _ENDED and (holder.start == 0 or start == holder.start)
    try:
        os.kill(holder.pid, 0)  # no /proc entry: does the pid exist at all?
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process, hidden from /proc (hidepid)
        return True
    return True


def release_dead(store: Store, *, now: datetime, proc: Path = PROC) -> dict[str, list[int]]:
    """End at once every claim held by a process of this host that is no longer running, so
    its work is taken up now instead of when its lease lapses; the row ids by table."""
    here = hostname()
    owners = {owner for found in owners_on(store, here).values() for owner in found}
    dead = set()
    for owner in owners:
        holder = parse_owner(owner)
        if holder is not None and not alive(holder, host=here, proc=proc):
            dead.add(owner)
    ended = expire_claims(store, dead, now=now)
    if ended:
        holders = sorted({str(parse_owner(owner)) for owner in dead})
        log.warning(
            "took over the claims of %d dead process(es) on this host (%s): %s",
            len(holders),
            "; ".join(holders[:5]) + ("; …" if len(holders) > 5 else ""),
            ", ".join(f"{name} {_ids(ids)}" for name, ids in ended.items()),
        )
    return ended


def _ids(ids: list[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:10])
    return f"[{shown}{', …' if len(ids) > 10 else ''}] ({len(ids)})"


class Heartbeat:
    """Renews the claims of this process's work in progress every third of a lease.

    Work names itself with `holding(owner)` while it runs; a background thread then pushes
    the leases of every owner held forward with one UPDATE per table. Once the work ends (or
    fails, leaving a claim behind) its owner is no longer renewed and any claim it left
    lapses with its lease. The thread starts with the first `holding`, so a Celery pool
    process makes its own after the fork.
    """

    def __init__(self, store: Store, *, lease_s: float, clock: Clock) -> None:
        self.store, self.lease_s, self.clock = store, lease_s, clock
        self._owners: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    @property
    def period_s(self) -> float:
        return max(0.05, self.lease_s / 3)

    @contextmanager
    def holding(self, owner: str) -> Iterator[str]:
        """Keep `owner`'s claims alive while the block runs."""
        with self._lock:
            self._owners[owner] = self._owners.get(owner, 0) + 1
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._run, name="batchwise-heartbeat", daemon=True
                )
                self._thread.start()
        try:
            yield owner
        finally:
            with self._lock:
                left = self._owners.pop(owner) - 1
                if left:
                    self._owners[owner] = left

    def owners(self) -> list[str]:
        with self._lock:
            return sorted(self._owners)

    def renew(self) -> int:
        """Renew the claims of every owner held now; how many rows were renewed."""
        owners = self.owners()
        if not owners:
            return 0
        until = self.clock() + timedelta(seconds=self.lease_s)
        return renew_claims(self.store, owners, until=until)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.renew()
            except Exception as exc:  # the store is away: keep beating, say so once
                if not self._failing:
                    log.warning("heartbeat: cannot renew claims (will keep trying): %s", exc)
                self._failing = True
            else:
                if self._failing:
                    log.warning("heartbeat: renewing claims again")
                self._failing = False

    def close(self) -> None:
        """Stop renewing (claims still held then lapse with their leases)."""
        self._stop.set()
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def __enter__(self) -> Heartbeat:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
