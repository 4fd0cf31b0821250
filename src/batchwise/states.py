"""The states requests, batches and cron job runs move through, and the allowed moves.

States are plain strings in the database (no DB enums), so adding one needs no migration. The
allowed moves live in one `TRANSITIONS` table that the store and the tests both read. This
module imports nothing heavy: the intake fast path uses it.
"""

from __future__ import annotations

from enum import StrEnum


class RequestState(StrEnum):
    """Where a request is in its life (docs/architecture.md, "Request life")."""

    #: deferred lane: waiting to be packed into a batch
    QUEUED = "queued"
    #: riding on a batch the provider has not accepted yet: a coalesced duplicate of one of
    #: its lines (a batch's own members stay `queued`, listed on the batch row, until then)
    PACKED = "packed"
    #: in a provider batch that is running
    SUBMITTED = "submitted"
    #: realtime lane: waiting for, or in, a realtime call
    DISPATCHING = "dispatching"
    #: deadline at risk: sent through the realtime lane while its batch may still answer
    RESCUED = "rescued"
    #: answered; the answer is stored
    SUCCEEDED = "succeeded"
    #: ended without an answer; `error` says why
    FAILED = "failed"
    #: answered from an identical request's stored answer, at no cost
    DEDUPLICATED = "deduplicated"
    #: refused by a cost guard; `error` says which and why
    REJECTED = "rejected"
    #: cancelled by the user before it finished
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_REQUEST_STATES


TERMINAL_REQUEST_STATES = frozenset(
    {
        RequestState.SUCCEEDED,
        RequestState.FAILED,
        RequestState.DEDUPLICATED,
        RequestState.REJECTED,
        RequestState.CANCELLED,
    }
)
LIVE_REQUEST_STATES = frozenset(RequestState) - TERMINAL_REQUEST_STATES

S = RequestState
#: every allowed state change of a request; anything else is a bug
TRANSITIONS: dict[RequestState, frozenset[RequestState]] = {
    # queued -> submitted: a batch's members are linked to it when the provider accepts it
    # (packing only lists them on the batch row; see `packer`)
    S.QUEUED: frozenset(
        {S.PACKED, S.SUBMITTED, S.RESCUED, S.FAILED, S.DEDUPLICATED, S.REJECTED, S.CANCELLED}
    ),
    S.PACKED: frozenset({S.SUBMITTED, S.QUEUED, S.RESCUED, S.FAILED, S.CANCELLED}),
    S.SUBMITTED: frozenset(
        {S.SUCCEEDED, S.QUEUED, S.FAILED, S.RESCUED, S.DEDUPLICATED, S.CANCELLED}
    ),
    # dispatching -> rejected: a cost guard refuses a realtime request after intake stored it
    S.DISPATCHING: frozenset({S.SUCCEEDED, S.FAILED, S.DEDUPLICATED, S.REJECTED, S.CANCELLED}),
    # rescued -> deduplicated: identical rescued requests ride on one realtime call
    S.RESCUED: frozenset({S.SUCCEEDED, S.FAILED, S.DEDUPLICATED, S.CANCELLED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.DEDUPLICATED: frozenset(),
    S.REJECTED: frozenset(),
    S.CANCELLED: frozenset(),
}
del S


class Lane(StrEnum):
    """Which path a request takes to the provider."""

    #: call the provider's realtime API now
    REALTIME = "realtime"
    #: call it now at the provider's slower, cheaper flex tier (OpenAI `service_tier: "flex"`,
    #: Batch API prices), at the standard tier once the deadline comes close
    FLEX = "flex"
    #: wait for a provider batch (about half price)
    DEFERRED = "deferred"


class BatchState(StrEnum):
    """Where a batch is in its life (docs/architecture.md, "Batch life")."""

    #: row written, requests assigned; nothing sent to the provider yet
    BUILDING = "building"
    #: the submitter is uploading / creating it at the provider
    UPLOADING = "uploading"
    #: the provider accepted it (OpenAI `validating`)
    SUBMITTED = "submitted"
    #: the provider is running it
    IN_PROGRESS = "in_progress"
    #: the provider is writing its output
    FINALIZING = "finalizing"
    #: a cancel was requested
    CANCELLING = "cancelling"
    #: ended normally, results waiting to be reconciled
    COMPLETED = "completed"
    #: the window passed; partial results waiting to be reconciled
    EXPIRED = "expired"
    #: cancelled; partial results waiting to be reconciled
    CANCELLED = "cancelled"
    #: failed as a whole at the provider (or could not be created); requests re-queued
    FAILED = "failed"
    #: results applied to every request of the batch; nothing left to do
    RECONCILED = "reconciled"


#: batch states in which the provider holds the batch and we poll it
LIVE_BATCH_STATES = frozenset(
    {BatchState.SUBMITTED, BatchState.IN_PROGRESS, BatchState.FINALIZING, BatchState.CANCELLING}
)
#: batch states whose results (or failure) still have to be applied
ENDED_BATCH_STATES = frozenset(
    {BatchState.COMPLETED, BatchState.EXPIRED, BatchState.CANCELLED, BatchState.FAILED}
)
#: batch states that hold provider capacity (enqueued tokens) for their model: every state
#: before the batch ended, so its requests may still be answered by it
OPEN_BATCH_STATES = LIVE_BATCH_STATES | {BatchState.BUILDING, BatchState.UPLOADING}

B = BatchState
#: every allowed state change of a batch; anything else is a bug. Once the provider holds a
#: batch its state is the provider's word: a submit (or adoption) and every poll record
#: whatever the provider reports, so from `uploading` and the live states any live or ended
#: state may follow, the same one included (a poll that finds the batch where it was).
BATCH_TRANSITIONS: dict[BatchState, frozenset[BatchState]] = {
    # the submitter claims it (packing writes the row as `building`)
    B.BUILDING: frozenset({B.UPLOADING}),
    # again `uploading`: claimed again after a lapsed lease or a retry delay; `failed`: the
    # submit failed for good; `reconciled`: nothing was left to send (every member cancelled
    # or rescued while it was packed)
    B.UPLOADING: LIVE_BATCH_STATES | ENDED_BATCH_STATES | {B.UPLOADING, B.RECONCILED},
    # polls, and `cancelling` when a cancel is asked for
    **dict.fromkeys(LIVE_BATCH_STATES, LIVE_BATCH_STATES | ENDED_BATCH_STATES),
    # the reconciler applied its results (or put its requests back in the queue)
    **dict.fromkeys(ENDED_BATCH_STATES, frozenset({B.RECONCILED})),
    B.RECONCILED: frozenset(),
}
del B


def state_predicate(states: frozenset[RequestState] | set[RequestState]) -> str:
    """SQL for "state is one of these", as an OR chain rather than an IN list.

    Partial indexes use these predicates. SQLite evaluates an IN list of more than two values
    through a temporary table, once per inserted row, and only uses a partial index for a
    query whose WHERE clause repeats the index's predicate exactly; an OR chain costs a few
    comparisons and can be repeated verbatim by every query that needs the index.
    """
    return (
        "("
        + " OR ".join(f"state = '{s.value}'" for s in sorted(states, key=lambda s: s.value))
        + ")"
    )


#: requests not finished yet (what a custom_id may not collide with). Every move into a
#: terminal state sets finished_at and no other move touches it, so moves between live
#: states leave the indexes that use this predicate alone.
LIVE_SQL = "finished_at IS NULL"
#: live requests that belong to a batch (packed, submitted, or rescued while in one)
BATCHED_SQL = "batch_id IS NOT NULL AND finished_at IS NULL"
#: requests waiting for (or in) a realtime call
CALLS_SQL = state_predicate({RequestState.DISPATCHING, RequestState.RESCUED})
#: requests waiting to be packed
QUEUED_SQL = "state = 'queued'"


class RunState(StrEnum):
    """Where a job run is (the `state` of a `job_runs` row)."""

    #: its requests are stored; waiting for all of them to be terminal
    SUBMITTED = "submitted"
    #: `on_results` is running under a lease
    DELIVERING = "delivering"
    #: delivered; `output` says where
    DONE = "done"
    #: `requests()` (nothing stored) or `on_results` failed; `error` says how
    FAILED = "failed"
    #: an occurrence not run; `trigger` says why (missed, superseded)
    SKIPPED = "skipped"
    #: not a run: when a scheduler first saw the job, so history is not back-filled
    SEEN = "seen"


class Trigger(StrEnum):
    """Why a run row exists: for runs, what started it; for skipped rows, why not."""

    #: its occurrence came while a scheduler was running
    SCHEDULE = "schedule"
    #: the latest occurrence missed while no scheduler ran (CATCH_UP = "once")
    CATCH_UP = "catch_up"
    #: `batchwise jobs run` or `run_now`
    MANUAL = "manual"
    #: skipped: missed while no scheduler ran (CATCH_UP = "skip")
    MISSED = "missed"
    #: skipped: missed, and a later occurrence ran instead (CATCH_UP = "once")
    SUPERSEDED = "superseded"
    #: not a run: when a scheduler first saw the job; its history starts here
    FIRST_SEEN = "first_seen"
