"""The invariants of docs/architecture.md as checks over a store (and the emulator's record of
what it was asked), shared by the lifecycle, crash and distributed tests."""

from __future__ import annotations

from collections import Counter, defaultdict
from itertools import pairwise
from typing import Any

import sqlalchemy as sa

from batchwise.states import LIVE_BATCH_STATES, TERMINAL_REQUEST_STATES
from batchwise.store.engine import Store, batches_t, bodies_t, ledger_t, requests_t, responses_t

TERMINAL = {s.value for s in TERMINAL_REQUEST_STATES}


def rows(store: Store, table: sa.Table, *order: Any) -> list[dict[str, Any]]:
    with store.read() as conn:
        query = sa.select(table).order_by(*(order or (table.c.id,)))
        return [dict(r) for r in conn.execute(query).mappings()]


def request_rows(store: Store) -> list[dict[str, Any]]:
    """Request rows with their body (from `request_bodies`; None once purged)."""
    r, b = requests_t, bodies_t
    with store.read() as conn:
        query = sa.select(r, b.c.body).select_from(r.outerjoin(b, b.c.id == r.c.id))
        return [dict(row) for row in conn.execute(query.order_by(r.c.id)).mappings()]


def check_all_terminal(store: Store) -> list[dict[str, Any]]:
    """Invariant 1: every request ends in exactly one terminal state, and says why."""
    requests = rows(store, requests_t)
    stuck = [(r["id"], r["state"]) for r in requests if r["state"] not in TERMINAL]
    assert not stuck, f"requests not terminal: {stuck[:10]}"
    responses = {r["id"]: r for r in rows(store, responses_t)}
    for r in requests:
        assert r["finished_at"] is not None, r  # terminal rows carry it; live rows never do
        if r["state"] == "succeeded":
            answer = responses[r["response_id"]]
            assert answer["request_id"] == r["id"] and answer["outcome"] == "succeeded"
        elif r["state"] in ("failed", "rejected", "cancelled"):
            assert r["error"], f"request {r['id']} {r['state']} without a reason"
    return requests


def check_no_overlapping_batches(store: Store) -> None:
    """Invariant 2: no request was in two live batches at once, unless it was rescued."""
    batches = {b["id"]: b for b in rows(store, batches_t)}
    by_request: dict[int, list[int]] = defaultdict(list)
    for resp in rows(store, responses_t):
        if resp["batch_id"] is not None:
            by_request[resp["request_id"]].append(resp["batch_id"])
    rescued = {r["id"] for r in rows(store, requests_t) if r["rescued_at"] is not None}
    for rid, batch_ids in by_request.items():
        assert len(batch_ids) == len(set(batch_ids)), f"request {rid} answered twice by one batch"
        spans = sorted(
            (batches[b]["submitted_at"], batches[b]["ended_at"] or batches[b]["updated_at"], b)
            for b in batch_ids
        )
        for (_, end, first), (start, _, second) in pairwise(spans):
            assert rid in rescued or start >= end, (
                f"request {rid} in batches {first} and {second} at once"
            )


def check_batches_created_once(store: Store, stats: dict[str, Any] | None) -> None:
    """Invariant 3: one provider batch per batch row, whatever crashed in between."""
    ours = [b for b in rows(store, batches_t) if b["provider_batch_id"]]
    ids = [(b["provider"], b["provider_batch_id"]) for b in ours]
    assert len(ids) == len(set(ids)), "two batch rows share a provider batch"
    assert not [
        b for b in rows(store, batches_t) if b["state"] in {s.value for s in LIVE_BATCH_STATES}
    ]
    if stats is None:
        return
    created = _emulator_batches(stats)
    keys = Counter(
        b["metadata"].get("batchwise_batch") for b in created if b["provider"] == "openai"
    )
    assert all(n == 1 for n in keys.values()), f"an OpenAI batch was created twice: {keys}"
    for provider in ("openai", "anthropic"):
        theirs = sorted(b["id"] for b in created if b["provider"] == provider)
        mine = sorted(b["provider_batch_id"] for b in ours if b["provider"] == provider)
        assert theirs == mine, f"{provider}: emulator has {theirs}, store has {mine}"


def _emulator_batches(stats: dict[str, Any]) -> list[dict[str, Any]]:
    batches = stats.get("batches")
    if isinstance(batches, list):
        return batches
    out = []
    for provider in ("openai", "anthropic"):
        for b in stats.get(f"{provider}_batches", []):
            out.append({"provider": provider, **b})
    return out


def check_ledger(store: Store) -> None:
    """Invariant 5: each billed response priced exactly once; savings derived, not stored."""
    entries = rows(store, ledger_t)
    priced = Counter(e["response_id"] for e in entries if e["response_id"] is not None)
    assert all(n == 1 for n in priced.values()), "a response is in the ledger twice"
    for resp in rows(store, responses_t):
        billed = resp["outcome"] == "succeeded" or (resp["input_tokens"] or resp["output_tokens"])
        assert (resp["id"] in priced) == bool(billed), f"response {resp['id']} priced wrongly"
    for e in entries:
        if e["kind"] in ("late_batch", "retry"):
            assert e["realtime_nusd"] in (0, None), e
        if e["kind"] in ("realtime", "rescue"):
            assert e["actual_nusd"] == e["realtime_nusd"], e


def check_deadlines(store: Store) -> None:
    """Invariant 7: a deadline is met, or the miss is recorded with its cause."""
    for r in rows(store, requests_t):
        if r["finished_at"] is not None and r["finished_at"] > r["deadline"]:
            assert r["deadline_miss"], f"request {r['id']} missed its deadline silently"


def snapshot(store: Store) -> tuple[list[dict[str, Any]], ...]:
    return rows(store, requests_t), rows(store, responses_t), rows(store, ledger_t)


def check_all(store: Store, stats: dict[str, Any] | None = None) -> None:
    check_all_terminal(store)
    check_no_overlapping_batches(store)
    check_batches_created_once(store, stats)
    check_ledger(store)
    check_deadlines(store)
