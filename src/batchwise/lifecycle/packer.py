"""The packer: queued deferred requests become batch rows, per (provider, endpoint, model),
within each provider's limits and each model's in-flight token budget.

A group is flushed when it is full, when its oldest request has waited `max_wait_s`, when a
request's deadline leaves no more room to wait, or on an explicit flush (drain). Deciding is a
pure function (`plan`); `pack` applies a plan in one transaction per batch.

Packing writes one row, the batch, whatever its size: its members are listed on it
(`member_ids`) and stay `queued`, held by that list so no other batch takes them. The submitter
links them (`queued → submitted`, compare-and-set) when the provider has accepted the batch, so
each request row is rewritten once on its way into a batch, not once per step. Coalesced
duplicates, which ride on a member's line, are the exception: they are moved to `packed` with
the member they ride on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from batchwise.faults import crashpoint
from batchwise.lifecycle import batch_files, capacity
from batchwise.lifecycle.capacity import Room
from batchwise.providers.base import BatchLimits, Provider
from batchwise.store import batches, packing
from batchwise.store.packing import Group, GroupKey

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from batchwise.config import Settings
    from batchwise.store.engine import Store

#: bytes a provider's line wrapper adds around a body (custom_id, url, keys), conservatively
LINE_OVERHEAD_BYTES = 160
_CUSTOM_ID = re.compile(r"b(\d+)-r(\d+)-([0-9a-f]{8})")


def line_custom_id(store_id: str, batch_id: int, request_id: int) -> str:
    """The custom_id a request carries inside one batch: unique, names both rows, and the
    store, so a line of another deployment's batch can never be taken for ours."""
    return f"b{batch_id}-r{request_id}-{store_id}"


def parse_custom_id(custom_id: str, store_id: str) -> tuple[int, int] | None:
    """(batch id, request id) from a line custom_id, or None if it is not one of this store's."""
    match = _CUSTOM_ID.fullmatch(custom_id)
    if match is None or match[3] != store_id:
        return None
    return int(match[1]), int(match[2])


def batch_request_ids(store_id: str, batch_id: int) -> Callable[[str], int | None]:
    """`parse_custom_id` for the many lines of one batch: the request a line custom_id names
    if it is one of this store's for batch `batch_id`, else None. The usual custom_id, as
    `line_custom_id` writes it, is read without the regular expression."""
    prefix, suffix = f"b{batch_id}-r", f"-{store_id}"
    start, end, shortest = len(prefix), -len(suffix), len(prefix) + len(suffix) + 1

    def request_id(custom_id: str) -> int | None:
        if (
            len(custom_id) >= shortest
            and custom_id.startswith(prefix)
            and custom_id.endswith(suffix)
            and custom_id[start:end].isdecimal()  # what the pattern's \d+ matches
        ):
            return int(custom_id[start:end])
        ids = parse_custom_id(custom_id, store_id)  # any other spelling, or not ours
        return ids[1] if ids is not None and ids[0] == batch_id else None

    return request_id


@dataclass(frozen=True)
class Flush:
    group: Group
    #: full | max_wait | deadline | explicit
    reason: str
    #: why a last batch that is not full goes too (the group's deadline, max_wait, drain), or
    #: None if only full batches go
    tail: str | None


def plan(
    groups: list[Group],
    *,
    now: datetime,
    settings: Settings,
    limits: Mapping[str, BatchLimits],
    turnaround_s: Callable[[str, str], float],
    rooms: Mapping[tuple[str, str], Room],
    drain: bool = False,
) -> list[Flush]:
    """Which groups to flush now, and why. Pure. A group whose model has no room (its open
    batches fill the capacity estimate, or it waits after a refusal) is not flushed."""
    flushes = []
    for group in groups:
        limit = limits[group.provider]
        if not has_room(rooms[group.provider, group.model], group.smallest_tokens):
            # the provider would refuse it (token_limit_exceeded), or not one request fits
            # what is left: wait for capacity, without reading the group's rows for nothing
            continue
        due = None
        if drain:
            due = "explicit"
        elif (group.earliest_deadline - now).total_seconds() <= (
            turnaround_s(group.provider, group.model)
            + settings.rescue_margin_s
            + settings.tick_interval_s
        ):
            due = "deadline"
        elif (now - group.oldest_queued_at).total_seconds() >= settings.max_wait_s:
            due = "max_wait"
        if group.count >= limit.max_requests or group.size_bytes >= limit.max_bytes:
            flushes.append(Flush(group, "full", tail=due))
        elif due is not None:
            flushes.append(Flush(group, due, tail=due))
    return flushes


def has_room(room: Room | None, smallest_tokens: int = 0) -> bool:
    """Whether a batch of the model may be packed now (None: nothing known, no limit): some
    room is free, enough for the group's smallest request (`smallest_tokens`) unless nothing
    of the model is open (then a request bigger than the whole limit may go alone)."""
    if room is None or room.free_tokens is None:
        return True
    free = room.free_tokens
    return free > 0 and (free >= smallest_tokens or room.alone)


def pack(
    store: Store,
    *,
    now: datetime,
    settings: Settings,
    limits: Mapping[str, BatchLimits],
    turnaround_s: Callable[[str, str], float],
    drain: bool = False,
    coalesce: Callable[[str | None, str | None, str | None], bool] | None = None,
    provider_for: Callable[[str], Provider] | None = None,
) -> list[int]:
    """Flush every group that is due into batch rows; returns the new batch ids.

    `coalesce(use_case, step, business_unit)` says whether identical requests of those tags
    share one batch line (dedupe); the others ride on it and take its answer. With
    `provider_for`, each batch's file is written as its rows are read (`packed_file_path`),
    so the submitter need not read them again; without it, the submitter builds the file."""
    batch_files.sweep(store, settings)
    with store.read() as conn:
        rooms = capacity.rooms(conn, settings, now=now)
        flushes = (
            _drain_flushes(*packing.queued_group_keys(conn, now), now=now, rooms=rooms)
            if drain
            else None
        )
        if flushes is None:
            flushes = plan(
                packing.queued_groups(
                    conn, now, batches.held_ids(conn), line_overhead_bytes=LINE_OVERHEAD_BYTES
                ),
                now=now,
                settings=settings,
                limits=limits,
                turnaround_s=turnaround_s,
                rooms=rooms,
                drain=drain,
            )
    created: list[int] = []
    for flush in flushes:
        created += _pack_flush(
            store,
            flush,
            now=now,
            settings=settings,
            limits=limits,
            coalesce=coalesce,
            provider_for=provider_for,
        )
    return created


def _pack_flush(
    store: Store,
    flush: Flush,
    *,
    now: datetime,
    settings: Settings,
    limits: Mapping[str, BatchLimits],
    coalesce: Callable[[str | None, str | None, str | None], bool] | None,
    provider_for: Callable[[str], Provider] | None,
) -> list[int]:
    group = flush.group
    batch_ids = _pack_group(
        store,
        flush,
        now=now,
        settings=settings,
        limit=limits[group.provider],
        coalesce=coalesce,
        provider=None if provider_for is None else provider_for(group.provider),
    )
    if batch_ids:
        crashpoint("after_pack")
    return batch_ids


def _drain_flushes(
    first: GroupKey | None,
    groups: set[GroupKey],
    *,
    now: datetime,
    rooms: Mapping[tuple[str, str], Room],
) -> list[Flush] | None:
    """Every group, flushed, without the per-group sums `plan` needs: the groups come from
    one DISTINCT over the queue, which SQL answers without a row reaching Python; the group
    of the first queued request goes first. Groups without room left wait. None if that
    first group has none (then `plan` decides, as without drain)."""
    if first is None:
        return []

    def has_budget(key: GroupKey) -> bool:
        # Without it the provider would refuse the batch (token_limit_exceeded): wait.
        return has_room(rooms[key[0], key[2]])

    if not has_budget(first):
        return None
    return [
        Flush(Group(provider, endpoint, model, 0, 0, 0, now, now), "explicit", "explicit")
        for provider, endpoint, model in [first, *sorted(groups - {first})]
        if has_budget((provider, endpoint, model))
    ]


class LineFormat:
    """A provider's batch line with the custom_id and body left open, learnt by asking the
    provider for one line: writing a line is then one bytes formatting operation."""

    _PROBE_ID = "b0-r0-probe"
    _PROBE_BODY = b'{"probe":0}'

    def __init__(self, provider: Provider, endpoint: str, store_id: str) -> None:
        probe = provider.batch_line(self._PROBE_ID, endpoint, self._PROBE_BODY)
        head, found_id, rest = probe.partition(b'"' + self._PROBE_ID.encode() + b'"')
        middle, found_body, tail = rest.rpartition(self._PROBE_BODY)
        if not found_id or not found_body:  # pragma: no cover - a provider that rewrites bodies
            raise ValueError(f"{provider.name}: batch lines do not splice the body as given")
        literal = (head, middle, tail)
        head, middle, tail = (part.replace(b"%", b"%%") for part in literal)
        self.template = b'%sb%%d-r%%d-%s"%s%%s%s\n' % (
            head + b'"',
            store_id.encode(),
            middle,
            tail,
        )
        self._check(provider, endpoint, store_id)

    def line(self, batch_id: int, request_id: int, body: bytes) -> bytes:
        return self.template % (batch_id, request_id, body)

    def _check(self, provider: Provider, endpoint: str, store_id: str) -> None:
        expected = provider.batch_line(line_custom_id(store_id, 7, 42), endpoint, b'{"a":"%d"}')
        if self.line(7, 42, b'{"a":"%d"}') != expected + b"\n":  # pragma: no cover - a bug
            raise ValueError(f"{provider.name}: batch line template does not match")


@dataclass
class _Cut:
    """The batch being filled while a group's rows are read (its row exists already, so its
    id can go into the file's lines)."""

    batch_id: int
    ids: list[int]
    file: BinaryIO | None = None
    path: Path | None = None


def _pack_group(
    store: Store,
    flush: Flush,
    *,
    now: datetime,
    settings: Settings,
    limit: BatchLimits,
    coalesce: Callable[[str | None, str | None, str | None], bool] | None = None,
    provider: Provider | None = None,
) -> list[int]:
    """Cut a group into batch rows listing their members, in one transaction.

    The rows are read once, in deadline order, and cut wherever the provider's limits or
    the token budget say; a batch that is not full is written only if the whole group is due.
    With a `provider`, each batch's file is written from the same read, under a temporary
    name until the transaction commits. On PostgreSQL packers take turns (an advisory lock),
    so the requests other batches hold (`held_ids`) and the model's room under its
    enqueued-token estimate are known for certain meanwhile.

    The hot loop: each row is only what the loop needs (every column read costs a Python
    object per row), so a batch's earliest deadline is taken from its first member in SQL.
    """
    group = flush.group
    created: list[_Cut] = []
    lines = None if provider is None else LineFormat(provider, group.endpoint, store.store_id)
    cut: _Cut | None = None
    try:
        with store.write() as conn:
            packing.take_turn(conn)
            # The model's room is read again in this turn: the plan's reading is from before
            # it, and a packer that went first (another worker's flush) may have filled it.
            # Never over the estimate: the line that would cross it waits (alone, a request
            # bigger than the whole limit goes only when nothing of its model is open).
            room = capacity.rooms(conn, settings, now=now)[group.provider, group.model]
            budget = room.free_tokens if room.free_tokens is not None else 1 << 62
            alone = room.alone
            held = batches.held_ids(conn)
            #: identical requests ride on the first of them (coalesced): (follower, leader)
            followers: list[tuple[int, int]] = []
            leaders: dict[str, int] = {}
            capped = False
            max_requests, max_bytes = limit.max_requests, limit.max_bytes
            overhead = LINE_OVERHEAD_BYTES
            template = lines.template if lines is not None else b""
            write = None
            batch_id, ids = 0, []
            # The current batch's totals are locals here, handed to `_close_cut`: this is the
            # hot loop of packing.
            count = size = tokens = 0
            with packing.group_rows(
                conn, group, now=now, bodies=lines is not None, tags=coalesce is not None
            ) as rows:
                for rid, row_bytes, est, body, body_hash, use_case, step, unit in rows:
                    if held and rid in held:
                        continue
                    if coalesce is not None and coalesce(use_case, step, unit):
                        leader = leaders.setdefault(body_hash, rid)
                        if leader != rid:
                            followers.append((rid, leader))
                            continue
                    line_bytes = row_bytes + overhead
                    if tokens + est > budget and not (alone and not created and not count):
                        capped = True  # the provider would refuse more of this model now
                        break
                    if count and (count >= max_requests or size + line_bytes > max_bytes):
                        assert cut is not None
                        _close_cut(conn, cut, "full", size, tokens)
                        created.append(cut)
                        budget -= tokens
                        cut, count, size, tokens = None, 0, 0, 0
                    if cut is None:
                        cut = _open_cut(conn, store, settings, flush, lines, now=now)
                        write = cut.file.write if cut.file is not None else None
                        batch_id, ids = cut.batch_id, cut.ids
                    ids.append(rid)
                    count += 1
                    size += line_bytes
                    tokens += est
                    if write is not None:
                        write(template % (batch_id, rid, body))
            if cut is not None and (flush.tail is not None or capped):
                _close_cut(conn, cut, flush.tail or flush.reason, size, tokens)
                created.append(cut)
            elif cut is not None:
                # Not due yet: its row goes, and followers of its leaders stay queued with them.
                batches.drop_unfilled(conn, cut.batch_id)
                kept = set(cut.ids)
                followers = [(rid, leader) for rid, leader in followers if leader not in kept]
                _discard(cut)
            cut = None
            if followers:
                packing.ride(conn, followers, [c.batch_id for c in created], now=now)
    except BaseException:
        for unfinished in (*created, *([cut] if cut is not None else [])):
            _discard(unfinished)
        raise
    for done in created:  # committed: the files take their names
        if done.path is not None:
            done.path.replace(batch_files.packed_file_path(settings, store.store_id, done.batch_id))
    return [c.batch_id for c in created]


def _open_cut(
    conn: Connection,
    store: Store,
    settings: Settings,
    flush: Flush,
    lines: LineFormat | None,
    *,
    now: datetime,
) -> _Cut:
    group = flush.group
    batch_id = batches.create(
        conn,
        provider=group.provider,
        endpoint=group.endpoint,
        model=group.model,
        flush_reason=flush.reason,
        now=now,
    )
    cut = _Cut(batch_id, [])
    if lines is not None:
        cut.path = batch_files.private_path(settings, store.store_id, cut.batch_id, "partial")
        cut.path.parent.mkdir(parents=True, exist_ok=True)
        cut.file = open(cut.path, "wb")  # noqa: SIM115 - closed by _close_cut or _discard
    return cut


def _close_cut(conn: Connection, cut: _Cut, reason: str, size: int, tokens: int) -> None:
    if cut.file is not None:
        cut.file.close()
    batches.close_cut(
        conn, cut.batch_id, cut.ids, reason=reason, size_bytes=size, est_input_tokens=tokens
    )


def _discard(cut: _Cut) -> None:
    if cut.file is not None:
        cut.file.close()
    if cut.path is not None:
        cut.path.unlink(missing_ok=True)


def write_batch_file(
    store: Store, *, batch_id: int, provider: Provider, endpoint: str, path: Path
) -> tuple[int, int]:
    """Stream a batch's requests into a JSONL file in the provider's format.

    Rows are read with a server-side cursor in chunks, so memory stays flat however big the
    batch. Returns (lines, bytes). Written to a temporary name and renamed, so a crash never
    leaves a half file under the final name.
    """
    tmp = path.with_suffix(".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = size = 0
    store_id = store.store_id
    with open(tmp, "wb") as out:
        for rid, body in packing.batch_bodies(store, batch_id):
            data = provider.batch_line(
                line_custom_id(store_id, batch_id, rid), endpoint, body.encode()
            )
            out.write(data)
            out.write(b"\n")
            lines += 1
            size += len(data) + 1
    tmp.replace(path)
    return lines, size
