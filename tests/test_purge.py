"""Purging bodies: only of finished, old requests; the ledger and every report stay the same."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from batchwise.costs.savings import GROUP_KEYS, savings_report, task_costs, task_summary
from batchwise.lifecycle.purge import purge_bodies
from batchwise.store.engine import Store, bodies_t, ledger_t, requests_t, responses_t

NOW = datetime(2026, 12, 15, 12, tzinfo=UTC)
OLD = datetime(2026, 11, 1, tzinfo=UTC)
RECENT = datetime(2026, 12, 10, tzinfo=UTC)
BODY = '{"messages":[{"role":"user","content":"my address is …"}]}'

# id -> (state, finished_at, has body); cutoff is NOW - 30d = 2026-11-15 12:00
REQUESTS: dict[int, tuple[str, datetime | None, bool]] = {
    1: ("succeeded", OLD, True),  # purged, with two responses
    2: ("failed", OLD + timedelta(days=9), True),  # purged, with one response
    3: ("deduplicated", OLD, True),  # purged, no response
    4: ("succeeded", RECENT, True),  # too recent
    5: ("queued", None, True),  # live, however old
    6: ("submitted", None, True),  # live, with a response (a retryable error)
    7: ("rejected", OLD, False),  # nothing left to purge
    8: ("cancelled", None, True),  # terminal without finished_at: updated_at counts
}
# (request, outcome)
RESPONSES = [(1, "errored"), (1, "succeeded"), (2, "errored"), (4, "succeeded"), (6, "errored")]


def request_row(rid: int) -> dict[str, Any]:
    state, finished, _ = REQUESTS[rid]
    return {
        "id": rid,
        "custom_id": f"c-{rid}",
        "provider": "openai",
        "endpoint": "/v1/chat/completions",
        "model": "gpt-4o-mini",
        "body_hash": f"{rid:064d}",
        "tolerance": "24h",
        "deadline": OLD,
        "lane": "deferred",
        "reason": "test",
        "state": state,
        "use_case": "support" if rid % 2 else "billing",
        "task_id": f"T{rid % 3}",
        "tags": '{"team": "x"}',
        "created_at": OLD - timedelta(days=30),
        "updated_at": OLD,
        "finished_at": finished,
    }


def ledger_row(n: int, rid: int) -> dict[str, Any]:
    return {
        "response_id": n,
        "request_id": rid,
        "at": OLD + timedelta(days=n),
        "kind": "batch" if n % 2 else "retry",
        "lane": "deferred",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "endpoint": "/v1/chat/completions",
        "use_case": "support" if rid % 2 else "billing",
        "task_id": f"T{rid % 3}",
        "input_tokens": 100 * n,
        "output_tokens": 10 * n,
        "actual_nusd": 1000 * n if n % 2 else 700 * n,
        "realtime_nusd": 2000 * n if n % 2 else 0,
        "price_source": "test",
    }


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store(db_url)
    with s.write() as conn:
        conn.execute(sa.insert(requests_t), [request_row(rid) for rid in REQUESTS])
        conn.execute(
            sa.insert(bodies_t),
            [{"id": rid, "body": BODY} for rid, (*_, has_body) in REQUESTS.items() if has_body],
        )
        conn.execute(
            sa.insert(responses_t),
            [
                {
                    "id": n,
                    "request_id": rid,
                    "batch_id": n,
                    "kind": "batch",
                    "outcome": outcome,
                    "body": '{"answer": "personal"}',
                    "input_tokens": 100,
                    "output_tokens": 10,
                    "created_at": OLD,
                }
                for n, (rid, outcome) in enumerate(RESPONSES, 1)
            ],
        )
        conn.execute(
            sa.insert(ledger_t), [ledger_row(n, rid) for n, (rid, _) in enumerate(RESPONSES, 1)]
        )
    yield s
    s.close()


def bodies(store: Store) -> tuple[dict[int, bool], list[tuple[int, bool]]]:
    with store.read() as conn:
        r, b = requests_t, bodies_t
        requests: dict[int, bool] = dict(
            conn.execute(
                sa.select(r.c.id, b.c.id.is_not(None)).select_from(r.outerjoin(b, b.c.id == r.c.id))
            ).all()
        )
        responses = [
            (int(rid), bool(has))
            for rid, has in conn.execute(
                sa.select(responses_t.c.request_id, responses_t.c.body.is_not(None)).order_by(
                    responses_t.c.id
                )
            )
        ]
    return {int(k): bool(v) for k, v in requests.items()}, responses


def everything_reported(store: Store) -> dict[str, Any]:
    """Every report the ledger feeds, plus the rows purge must not change."""
    reports: dict[str, Any] = {
        key: savings_report(store, by=(key,)).as_dict() for key in GROUP_KEYS
    }
    tasks = task_costs(store)
    reports["tasks"] = [t.as_dict() for t in tasks]
    reports["task_summary"] = task_summary(tasks)
    with store.read() as conn:
        reports["ledger"] = [
            dict(r) for r in conn.execute(sa.select(ledger_t).order_by(ledger_t.c.id)).mappings()
        ]
        keep = [c for c in requests_t.c if c.name != "body"]
        reports["requests"] = [
            dict(r) for r in conn.execute(sa.select(*keep).order_by(requests_t.c.id)).mappings()
        ]
    return reports


def test_dry_run_counts_and_changes_nothing(store: Store) -> None:
    before = bodies(store)
    result = purge_bodies(store, older_than=timedelta(days=30), now=NOW, dry_run=True)
    assert (result.requests, result.responses, result.dry_run) == (4, 3, True)
    assert result.cutoff == datetime(2026, 11, 15, 12, tzinfo=UTC)
    assert bodies(store) == before


def test_purge_nulls_only_finished_old_bodies_in_chunks(store: Store) -> None:
    # Given a mix of old, recent, live and already-empty requests
    # When purging in chunks of two requests
    result = purge_bodies(store, older_than=timedelta(days=30), now=NOW, chunk_size=2)
    # Then requests 1, 2, 3, 8 lost their bodies, with the three responses of 1 and 2
    assert (result.requests, result.responses, result.dry_run) == (4, 3, False)
    requests, responses = bodies(store)
    assert requests == {1: False, 2: False, 3: False, 4: True, 5: True, 6: True, 7: False, 8: False}
    assert responses == [(1, False), (1, False), (2, False), (4, True), (6, True)]
    # And a second run finds nothing left
    again = purge_bodies(store, older_than=timedelta(days=30), now=NOW)
    assert (again.requests, again.responses) == (0, 0)


def test_reports_are_identical_after_a_purge(store: Store) -> None:
    before = everything_reported(store)
    assert before["kind"]["total"]["actual_cost_usd"] != "0.000000000"  # a real ledger
    purge_bodies(store, older_than=timedelta(0), now=NOW + timedelta(days=365))
    # every finished request lost its body; only the live ones (5, 6) keep theirs
    assert bodies(store)[0] == {rid: rid in (5, 6) for rid in REQUESTS}
    assert everything_reported(store) == before


def test_a_shorter_age_reaches_recent_requests(store: Store) -> None:
    result = purge_bodies(store, older_than=timedelta(days=1), now=NOW)
    assert (result.requests, result.responses) == (5, 4)  # request 4 and its response too


@pytest.mark.parametrize(
    ("older_than", "chunk"), [(timedelta(days=-1), 10), (timedelta(days=1), 0)]
)
def test_bad_arguments_are_refused(store: Store, older_than: timedelta, chunk: int) -> None:
    with pytest.raises(ValueError, match="must"):
        purge_bodies(store, older_than=older_than, now=NOW, chunk_size=chunk)
