"""The batch state machine: the table holds every move the code makes and nothing it does not,
and every batch move is a checked compare-and-set, on SQLite and on the real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from batchwise.errors import TransitionError
from batchwise.lifecycle.submitter import STATUS_TO_STATE
from batchwise.states import (
    BATCH_TRANSITIONS,
    ENDED_BATCH_STATES,
    LIVE_BATCH_STATES,
    BatchState,
    RequestState,
)
from batchwise.store import batches, responses
from batchwise.store.engine import Store, batches_t
from batchwise.store.transitions import check_batch_transition, transition_batch

B = BatchState
NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    store = Store(db_url)
    yield store
    store.close()


def _new_batch(store: Store) -> int:
    with store.write() as conn:
        return batches.create(
            conn,
            provider="openai",
            endpoint="/v1/chat/completions",
            model="gpt-4o-mini",
            flush_reason="explicit",
            now=NOW,
        )


def _row(store: Store, batch_id: int) -> tuple[str, str | None]:
    with store.read() as conn:
        row = conn.execute(
            sa.select(batches_t.c.state, batches_t.c.lease_owner).where(batches_t.c.id == batch_id)
        ).one()
    return row[0], row[1]


def test_batch_table_covers_every_state_and_every_batch_can_end() -> None:
    assert set(BATCH_TRANSITIONS) == set(BatchState)
    assert BATCH_TRANSITIONS[B.RECONCILED] == frozenset()
    for state in BatchState:
        reached, frontier = {state}, [state]
        while frontier:
            for nxt in BATCH_TRANSITIONS[frontier.pop()] - reached:
                reached.add(nxt)
                frontier.append(nxt)
        assert B.RECONCILED in reached, f"a {state.value} batch can never be reconciled"


def test_batch_table_allows_what_providers_report_and_no_way_back() -> None:
    # Given what a submit (or adoption) and a poll may record: any status the provider reports
    reported = set(STATUS_TO_STATE.values())
    for src in (B.UPLOADING, *LIVE_BATCH_STATES):
        assert reported <= BATCH_TRANSITIONS[src], src
    for src in ENDED_BATCH_STATES:
        assert BATCH_TRANSITIONS[src] == {B.RECONCILED}
    # Then nothing goes back to being packed, and only a submitter's claim leads to uploading
    assert not any(B.BUILDING in dsts for dsts in BATCH_TRANSITIONS.values())
    claims = {src for src, dsts in BATCH_TRANSITIONS.items() if B.UPLOADING in dsts}
    assert claims == {B.BUILDING, B.UPLOADING}


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (B.RECONCILED, B.BUILDING),
        (B.BUILDING, B.SUBMITTED),
        (B.BUILDING, B.FAILED),
        (B.COMPLETED, B.IN_PROGRESS),
        (B.IN_PROGRESS, B.RECONCILED),
        (B.SUBMITTED, B.UPLOADING),
    ],
)
def test_an_illegal_batch_move_raises(src: BatchState, dst: BatchState) -> None:
    with pytest.raises(TransitionError, match=f"from {src.value} to {dst.value}"):
        check_batch_transition(src, dst)


def test_an_illegal_batch_move_is_refused_before_it_is_written(store: Store) -> None:
    batch_id = _new_batch(store)
    with pytest.raises(TransitionError), store.write() as conn:
        transition_batch(conn, batch_id, src=B.BUILDING, dst=B.COMPLETED, now=NOW)
    with pytest.raises(TransitionError), store.write() as conn:
        # one illegal source among legal ones is enough to refuse the whole move
        transition_batch(conn, batch_id, src=[B.UPLOADING, B.BUILDING], dst=B.FAILED, now=NOW)
    assert _row(store, batch_id) == ("building", None)


def test_a_batch_move_is_compare_and_set(store: Store) -> None:
    batch_id = _new_batch(store)
    # Given a building batch, when two workers move it to uploading, only the first wins
    with store.write() as conn:
        assert transition_batch(
            conn, batch_id, src=B.BUILDING, dst=B.UPLOADING, now=NOW, values={"lease_owner": "a"}
        )
    with store.write() as conn:
        assert not transition_batch(
            conn, batch_id, src=B.BUILDING, dst=B.UPLOADING, now=NOW, values={"lease_owner": "b"}
        )
    assert _row(store, batch_id) == ("uploading", "a")
    # A row not in `src` does not move, even by a legal move
    with store.write() as conn:
        assert not transition_batch(
            conn, batch_id, src=LIVE_BATCH_STATES, dst=B.CANCELLING, now=NOW
        )
    # A worker that does not hold the lease moves nothing; the holder does
    with store.write() as conn:
        assert not transition_batch(
            conn, batch_id, src=B.UPLOADING, dst=B.FAILED, now=NOW, lease_owner="b"
        )
    assert _row(store, batch_id) == ("uploading", "a")
    with store.write() as conn:
        assert transition_batch(
            conn, batch_id, src=B.UPLOADING, dst=B.FAILED, now=NOW, lease_owner="a"
        )
    assert _row(store, batch_id) == ("failed", "a")


def test_store_batch_moves_follow_a_batch_through_its_life(store: Store) -> None:
    batch_id = _new_batch(store)
    claimed = batches.claim_for_upload(store, now=NOW, lease_s=60, worker="w")
    assert claimed is not None and claimed.id == batch_id and claimed.attempts == 1
    assert batches.claim_for_upload(store, now=NOW, lease_s=60, worker="x") is None  # leased
    with store.write() as conn:
        assert not batches.record_submitted(  # someone else's lease: nothing is written
            conn,
            batch_id,
            worker="x",
            state=B.SUBMITTED,
            provider_batch_id="p1",
            provider_status="validating",
            result_refs={},
            now=NOW,
        )
        assert batches.record_submitted(
            conn,
            batch_id,
            worker="w",
            state=B.SUBMITTED,
            provider_batch_id="p1",
            provider_status="validating",
            result_refs={},
            now=NOW,
        )
    assert _row(store, batch_id) == ("submitted", None)
    with store.write() as conn:
        assert batches.record_poll(
            conn,
            batch_id,
            B.COMPLETED,
            now=NOW,
            provider_status="completed",
            counts={"total": 0},
            result_refs={},
            next_poll_at=None,
            ended=True,
        )
        # an ended batch is not polled, nor cancelled, any more
        assert not batches.record_poll(
            conn,
            batch_id,
            B.IN_PROGRESS,
            now=NOW,
            provider_status="in_progress",
            counts={},
            result_refs={},
            next_poll_at=NOW,
        )
        assert not batches.mark_cancelling(conn, batch_id, provider_status="cancelling", now=NOW)
    ended = batches.claim_for_reconcile(store, now=NOW, lease_s=60, worker="w")
    assert ended is not None and ended.state == "completed"
    with store.write() as conn:
        assert batches.mark_reconciled(conn, batch_id, src=B.COMPLETED, now=NOW)
        assert not batches.mark_reconciled(conn, batch_id, src=B.COMPLETED, now=NOW)
    assert _row(store, batch_id) == ("reconciled", None)


def test_reconcile_updates_refuse_an_illegal_request_move(store: Store) -> None:
    # (state, response_id, attempts, batch_id, error, error_code, finished_at, deadline_miss,
    #  updated_at, dedupe_of, id, expected state): a succeeded request sent back to the queue
    row = ("queued", None, 0, None, None, None, None, None, NOW, None, 1, "succeeded")
    with pytest.raises(TransitionError, match="from succeeded to queued"), store.write() as conn:
        responses.apply_updates(conn, [row], 1)
    answer = (1, NOW, None, NOW, 1, RequestState.QUEUED.value)  # answered while only queued
    with pytest.raises(TransitionError, match="from queued to succeeded"), store.write() as conn:
        responses.apply_answers(conn, [answer], 1)
