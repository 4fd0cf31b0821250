"""The SQL tables. The store is the single source of truth and the queue of deferred work;
the states rows move through are in `states`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

from batchwise.states import BATCHED_SQL, CALLS_SQL, LIVE_SQL, QUEUED_SQL
from batchwise.store.dbapi import SQLITE_TIME_FORMAT


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes everywhere: TIMESTAMPTZ on PostgreSQL, fixed-width text on SQLite.

    SQLite has no time zones; storing UTC in one fixed format keeps comparisons in SQL correct
    and lets the bulk paths write the same text without going through SQLAlchemy.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(26))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: batchwise stores aware UTC datetimes only")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.strftime(SQLITE_TIME_FORMAT)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            return datetime.strptime(value, SQLITE_TIME_FORMAT).replace(tzinfo=UTC)
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _where(predicate: str) -> dict[str, Any]:
    """A partial index's predicate, the same text on SQLite and PostgreSQL."""
    return {"sqlite_where": text(predicate), "postgresql_where": text(predicate)}


def _time(**kwargs: Any) -> Any:
    return Field(sa_type=UTCDateTime, **kwargs)


class Request(SQLModel, table=True):
    """One LLM call a producer asked for, and everything that happened to it."""

    __tablename__ = "requests"
    __table_args__ = (
        # A caller's custom_id names one live request of its submission; two submissions may
        # use the same ids side by side (two cookbook files both numbered task-0 … task-N).
        Index(
            "uq_requests_live_custom_id",
            "submission_id",
            "custom_id",
            unique=True,
            **_where(LIVE_SQL),
        ),
        # The two work queues, each holding only the rows waiting in it, by deadline: the
        # packer's and the realtime lane's. Keys are narrow: each accepted request pays for
        # one entry at intake.
        Index("ix_requests_queued", "deadline", **_where(QUEUED_SQL)),
        Index("ix_requests_calls", "deadline", **_where(CALLS_SQL)),
        # The live members of each batch (the rescuer finds at-risk batches by their
        # earliest deadline, then their members here).
        Index("ix_requests_batch", "batch_id", **_where(BATCHED_SQL)),
        Index(
            "ix_requests_job_run",
            "job_run_id",
            sqlite_where=text("job_run_id IS NOT NULL"),
            postgresql_where=text("job_run_id IS NOT NULL"),
        ),
        # A task's requests, and the runaway-loop guard's counts per task and per body
        # (modulo whitespace), read from the index alone (`store.guard_state.task_counts`).
        Index(
            "ix_requests_task",
            "task_id",
            "loop_key",
            sqlite_where=text("task_id IS NOT NULL"),
            postgresql_where=text("task_id IS NOT NULL"),
        ),
        # Dedupe looks up answered requests by content. Keyed by a 64-bit integer from the
        # hash, not the 64-character hash: every answer inserts one entry at a random place,
        # and a narrow index stays small enough to be cheap to insert into.
        Index("ix_requests_answered", "body_key", **_where("state = 'succeeded'")),
    )

    id: int | None = Field(default=None, primary_key=True)
    #: the caller's id, as given (any non-empty string up to 512 characters): providers are sent
    #: batchwise's own ids, never this one
    custom_id: str = Field(sa_type=String(512))
    provider: str = Field(sa_type=String(32))
    endpoint: str = Field(sa_type=String(64))
    model: str = Field(sa_type=String(128))
    #: the model asked for, when a routing rule changed it
    original_model: str | None = Field(default=None, sa_type=String(128))
    #: sha256 of the canonical body, for dedupe and repetition detection (the body itself is
    #: a row of `request_bodies`)
    body_hash: str = Field(sa_type=String(64))
    #: the hash's first 64 bits as a signed integer: the dedupe index's key (see `body_key`)
    body_key: int | None = Field(default=None, sa_type=BigInteger)
    tolerance: str = Field(sa_type=String(64))
    deadline: datetime = _time()
    lane: str = Field(sa_type=String(16))
    #: why the classifier chose the lane
    reason: str = Field(sa_type=Text)
    state: str = Field(sa_type=String(16))
    attempts: int = Field(default=0, sa_type=Integer)
    #: the batch holding it now (or that answered it)
    batch_id: int | None = Field(default=None)
    use_case: str | None = Field(default=None, sa_type=String(128))
    step: str | None = Field(default=None, sa_type=String(128))
    business_unit: str | None = Field(default=None, sa_type=String(128))
    task_id: str | None = Field(default=None, sa_type=String(128))
    #: for a request with a task_id: 64 bits of its body modulo whitespace
    #: (`costs.guards.loop_key`), what the runaway-loop guard counts; NULL once a guard refused
    #: the request, so refused requests do not count toward their task's limits
    loop_key: int | None = Field(default=None, sa_type=BigInteger)
    #: free key/value tags as a JSON object
    tags: str = Field(default="{}", sa_type=Text)
    #: not to be packed before this time (a budget with the "wait" policy held it)
    not_before: datetime | None = _time(default=None)
    #: a coalesced duplicate: the identical request whose provider call answers this one too
    dedupe_of: int | None = Field(default=None)
    #: the cron job run that produced it, if any
    job_run_id: int | None = Field(default=None)
    #: the submission it came in with (`submissions`); None only for rows written outside
    #: intake (every intake path, and the 0003 upgrade, set it)
    submission_id: int | None = Field(default=None)
    #: the shape its line came in: openai | anthropic | simple (None before revision 0003)
    input_format: str | None = Field(default=None, sa_type=String(16))
    #: bytes of the canonical body, so the packer can size batches without reading bodies
    size_bytes: int = Field(default=0, sa_type=Integer)
    #: estimated prompt tokens, for in-flight token budgets
    est_input_tokens: int = Field(default=0, sa_type=Integer)
    created_at: datetime = _time()
    updated_at: datetime = _time()
    finished_at: datetime | None = _time(default=None)
    #: the stored answer (a row of `responses`)
    response_id: int | None = Field(default=None)
    error: str | None = Field(default=None, sa_type=Text)
    error_code: str | None = Field(default=None, sa_type=String(64))
    rescued_at: datetime | None = _time(default=None)
    #: why it was sent through the realtime lane after all
    rescue_reason: str | None = Field(default=None, sa_type=Text)
    #: set when the deadline was missed; says why
    deadline_miss: str | None = Field(default=None, sa_type=Text)
    lease_owner: str | None = Field(default=None, sa_type=String(64))
    lease_expires_at: datetime | None = _time(default=None)


class Submission(SQLModel, table=True):
    """One `submit` (file, stdin or single prompt), `Client` call or cron job run: the lines
    that came in together. Counts by state and the finish time are derived from `requests`
    (`store.submissions`), never stored."""

    __tablename__ = "submissions"

    id: int | None = Field(default=None, primary_key=True)
    name: str | None = Field(default=None, sa_type=String(128))
    #: where the lines came from: a file path, "-" (stdin), "prompt", "api", "job:NAME", or
    #: "upgrade" (requests stored before revision 0003)
    source: str = Field(sa_type=Text)
    #: openai | anthropic | simple, or mixed (each request keeps its own `input_format`);
    #: None while intake runs, or when nothing was stored
    format: str | None = Field(default=None, sa_type=String(16))
    #: the cron job run it belongs to, if any
    job_run_id: int | None = Field(default=None)
    #: the lowest and highest request ids intake gave its lines: every request of the
    #: submission has an id in between, so reads scan that range of the primary key instead
    #: of every intake insert paying for one more index
    first_request_id: int | None = Field(default=None)
    last_request_id: int | None = Field(default=None)
    created_at: datetime = _time()


class Batch(SQLModel, table=True):
    """One provider batch submission, written before any provider call is made."""

    __tablename__ = "batches"
    __table_args__ = (
        UniqueConstraint("provider", "provider_batch_id", name="uq_batches_provider_batch_id"),
        Index("ix_batches_state", "state"),
        # The few batches whose members are listed but not linked yet (`store.batches.held_ids`).
        Index("ix_batches_members", "id", **_where("member_ids IS NOT NULL")),
    )

    id: int | None = Field(default=None, primary_key=True)
    provider: str = Field(sa_type=String(32))
    endpoint: str = Field(sa_type=String(64))
    model: str = Field(sa_type=String(128))
    state: str = Field(sa_type=String(16))
    provider_batch_id: str | None = Field(default=None, sa_type=String(128))
    provider_status: str | None = Field(default=None, sa_type=String(32))
    request_count: int = Field(default=0, sa_type=Integer)
    size_bytes: int = Field(default=0, sa_type=BigInteger)
    est_input_tokens: int = Field(default=0, sa_type=BigInteger)
    #: the earliest deadline among its live members, for the rescuer
    earliest_deadline: datetime | None = _time(default=None)
    #: provider request counts as JSON
    counts: str = Field(default="{}", sa_type=Text)
    #: where results live (file ids, results URL) as JSON
    result_refs: str = Field(default="{}", sa_type=Text)
    #: why it flushed: full, max_wait, deadline, explicit
    flush_reason: str | None = Field(default=None, sa_type=String(32))
    #: the requests packed into it and not yet linked to it (see `batches.pack_ids`): packing
    #: writes this list instead of touching each request; the submitter links the requests
    #: (queued -> submitted) once the provider has the batch, and clears it
    member_ids: bytes | None = Field(default=None, sa_type=LargeBinary)
    created_at: datetime = _time()
    updated_at: datetime = _time()
    upload_started_at: datetime | None = _time(default=None)
    #: set (and committed) just before the create call, so a takeover knows whether a
    #: provider batch may exist and must be looked for before creating one
    create_started_at: datetime | None = _time(default=None)
    submitted_at: datetime | None = _time(default=None)
    ended_at: datetime | None = _time(default=None)
    reconciled_at: datetime | None = _time(default=None)
    next_poll_at: datetime | None = _time(default=None)
    poll_count: int = Field(default=0, sa_type=Integer)
    #: seconds from submission to the provider ending it, once ended
    turnaround_s: float | None = Field(default=None)
    submit_attempts: int = Field(default=0, sa_type=Integer)
    #: the batch-level error, e.g. token_limit_exceeded (see `last_error` for the message)
    error_code: str | None = Field(default=None, sa_type=String(64))
    last_error: str | None = Field(default=None, sa_type=Text)
    lease_owner: str | None = Field(default=None, sa_type=String(64))
    lease_expires_at: datetime | None = _time(default=None)


class RequestBody(SQLModel, table=True):
    """A request's body as canonical JSON (sorted keys), one row per request, same id.

    Kept out of `requests` so the rows the lifecycle rewrites at every state change stay
    narrow: rewriting a request row then costs a fraction of what it costs with a body inside
    it, and only the packer and the realtime lane ever read bodies. A purge deletes the row.
    """

    __tablename__ = "request_bodies"

    #: the request's id (no foreign key: both rows are written in one transaction, and a
    #: check per row would cost intake a sixth of what storing the body does)
    id: int = Field(primary_key=True)
    body: str = Field(sa_type=Text)


class Response(SQLModel, table=True):
    """One answer (or per-line error) a provider gave for a request, kept even when superseded.

    A batch line is stored once per (request, batch): reconciling twice inserts nothing new.
    """

    __tablename__ = "responses"
    __table_args__ = (
        # batch first: the reconciler reads a batch's stored lines before applying its results
        UniqueConstraint("batch_id", "request_id", name="uq_responses_batch_request"),
        Index("ix_responses_request", "request_id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    request_id: int
    #: the batch it came from; None for realtime calls
    batch_id: int | None = Field(default=None)
    #: batch | realtime | rescue
    kind: str = Field(sa_type=String(16))
    #: succeeded | errored | expired | cancelled
    outcome: str = Field(sa_type=String(16))
    status_code: int | None = Field(default=None)
    body: str | None = Field(default=None, sa_type=Text)
    error_code: str | None = Field(default=None, sa_type=String(64))
    error_message: str | None = Field(default=None, sa_type=Text)
    retryable: bool = Field(default=False)
    provider_request_id: str | None = Field(default=None, sa_type=String(128))
    input_tokens: int = Field(default=0, sa_type=Integer)
    output_tokens: int = Field(default=0, sa_type=Integer)
    created_at: datetime = _time()


class Event(SQLModel, table=True):
    """Something worth telling a person: a rescue, a missed deadline, an unknown result line,
    a guard refusal, an anomaly."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_at", "at"), Index("ix_events_kind", "kind"))

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = _time()
    kind: str = Field(sa_type=String(32))
    #: info | warning | alert
    severity: str = Field(default="info", sa_type=String(16))
    message: str = Field(sa_type=Text)
    request_id: int | None = Field(default=None)
    batch_id: int | None = Field(default=None)
    task_id: str | None = Field(default=None, sa_type=String(128))
    #: carries `owner`, the team a triggered guard or alert names (`costs.owners`)
    data: str = Field(default="{}", sa_type=Text)
    #: set once, by `batchwise events ack`: when, by whom, and what was done
    acknowledged_at: datetime | None = _time(default=None)
    acknowledged_by: str | None = Field(default=None, sa_type=String(128))
    ack_note: str | None = Field(default=None, sa_type=Text)


class LedgerEntry(SQLModel, table=True):
    """What one billed provider response cost, next to what it would have cost in realtime.

    Written in the same transaction as the response it prices, at most once per response
    (invariant 5). Tags are copied in so reports still add up after bodies are purged.
    """

    __tablename__ = "ledger"
    __table_args__ = (
        UniqueConstraint("response_id", name="uq_ledger_response"),
        Index("ix_ledger_at", "at"),
        Index("ix_ledger_task", "task_id", **_where("task_id IS NOT NULL")),
    )

    id: int | None = Field(default=None, primary_key=True)
    #: the priced response; None for entries that price no response (a dedupe hit)
    response_id: int | None = Field(default=None)
    request_id: int
    batch_id: int | None = Field(default=None)
    at: datetime = _time()
    #: batch | realtime | rescue | late_batch | retry | dedupe (see ledger.Kind)
    kind: str = Field(sa_type=String(16))
    #: the lane of the request this entry belongs to
    lane: str = Field(sa_type=String(16))
    provider: str = Field(sa_type=String(32))
    model: str = Field(sa_type=String(128))
    endpoint: str = Field(sa_type=String(64))
    use_case: str | None = Field(default=None, sa_type=String(128))
    step: str | None = Field(default=None, sa_type=String(128))
    business_unit: str | None = Field(default=None, sa_type=String(128))
    task_id: str | None = Field(default=None, sa_type=String(128))
    input_tokens: int = Field(default=0, sa_type=BigInteger)
    cache_read_tokens: int = Field(default=0, sa_type=BigInteger)
    cache_write_tokens: int = Field(default=0, sa_type=BigInteger)
    output_tokens: int = Field(default=0, sa_type=BigInteger)
    reasoning_tokens: int = Field(default=0, sa_type=BigInteger)
    #: what was (or would have been) paid, nano-USD; None when the model has no price
    actual_nusd: int | None = Field(default=None, sa_type=BigInteger)
    #: the same usage at realtime prices, or 0 when the call replaced no realtime call
    realtime_nusd: int | None = Field(default=None, sa_type=BigInteger)
    #: which price source priced it (genai-prices:batch, discount:0.5, override, unpriced…)
    price_source: str = Field(sa_type=String(48))


class StoreMeta(SQLModel, table=True):
    """Facts about the store itself, such as its random identity."""

    __tablename__ = "store_meta"

    key: str = Field(primary_key=True, sa_type=String(64))
    value: str = Field(sa_type=Text)


class JobRun(SQLModel, table=True):
    """One scheduled run of a cron job. The unique (job, scheduled_for) makes a run happen at
    most once however many schedulers race for it."""

    __tablename__ = "job_runs"
    __table_args__ = (
        UniqueConstraint("job", "scheduled_for", name="uq_job_runs_job_time"),
        Index("ix_job_runs_state", "state"),
    )

    id: int | None = Field(default=None, primary_key=True)
    job: str = Field(sa_type=String(128))
    scheduled_for: datetime = _time()
    #: submitted | delivering | done | failed | skipped
    state: str = Field(sa_type=String(16))
    #: why it ran: schedule | catch_up | manual; or why it was skipped
    trigger: str = Field(sa_type=String(32))
    started_at: datetime = _time()
    finished_at: datetime | None = _time(default=None)
    requests: int = Field(default=0, sa_type=Integer)
    #: where the job wrote its output, if it did
    output: str | None = Field(default=None, sa_type=Text)
    error: str | None = Field(default=None, sa_type=Text)
    lease_owner: str | None = Field(default=None, sa_type=String(64))
    lease_expires_at: datetime | None = _time(default=None)


class GatewayKey(SQLModel, table=True):
    """A key for `batchwise serve`: only its sha256 is kept; its tags go on all it submits."""

    __tablename__ = "gateway_keys"
    __table_args__ = (
        UniqueConstraint("key_hash", name="uq_gateway_keys_hash"),
        UniqueConstraint("name", name="uq_gateway_keys_name"),
    )

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_type=String(128))
    #: sha256 of the key, hex
    key_hash: str = Field(sa_type=String(64))
    #: JSON object of tags added to every request the key submits
    tags: str = Field(default="{}", sa_type=Text)
    created_at: datetime = _time()
    #: set once, by `batchwise keys revoke`
    revoked_at: datetime | None = _time(default=None)


class GatewayFile(SQLModel, table=True):
    """A file uploaded through the gateway's `POST /v1/files`; its bytes live under the home
    folder (`path`), readable by the owner only."""

    __tablename__ = "gateway_files"

    id: int | None = Field(default=None, primary_key=True)
    filename: str = Field(sa_type=Text)
    purpose: str = Field(sa_type=String(32))
    bytes: int = Field(default=0, sa_type=Integer)
    path: str = Field(sa_type=Text)
    #: the key that uploaded it (its name)
    key_name: str = Field(sa_type=String(128))
    created_at: datetime = _time()
    deleted_at: datetime | None = _time(default=None)


class GatewayBatch(SQLModel, table=True):
    """An OpenAI batch created through the gateway: one submission, and what the caller asked."""

    __tablename__ = "gateway_batches"
    __table_args__ = (UniqueConstraint("submission_id", name="uq_gateway_batches_submission"),)

    id: int | None = Field(default=None, primary_key=True)
    submission_id: int
    input_file_id: int
    endpoint: str = Field(sa_type=String(64))
    completion_window: str = Field(sa_type=String(16))
    #: JSON object, as the caller sent it
    metadata_json: str = Field(default="{}", sa_type=Text)
    key_name: str = Field(sa_type=String(128))
    created_at: datetime = _time()
    cancelled_at: datetime | None = _time(default=None)
