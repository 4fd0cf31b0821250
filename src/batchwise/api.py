"""The Python API: `Client` to enqueue requests and read them back, `Handle` to follow one,
`Submission` to follow the lines stored together.

from batchwise import Client

client = Client("sqlite:///work.db")
handle = client.enqueue(model="gpt-4o-mini", prompt="Summarise …", tolerance="4h",
                        tags={"use_case": "summaries"})
handle.lane, handle.state          # 'deferred', 'queued'
answer = handle.result(timeout=3600)   # once a runner or worker has done the work

submission = client.submit_file("batch.jsonl", name="cookbook")
submission.wait(timeout=3600)
for line in submission.results():   # in the shape the lines came in
    ...
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, overload

from batchwise.clock import Clock, system_clock
from batchwise.config import Settings
from batchwise.errors import GuardRefused, NotFoundError, RequestFailed, ResultTimeout
from batchwise.intake.ingest import Defaults, SubmitResult, submit_lines
from batchwise.intake.tolerance import resolve_zone
from batchwise.states import RequestState
from batchwise.store.views import RequestView as RequestView  # re-exported: users name it here
from batchwise.store.views import SubmissionView as SubmissionView

if TYPE_CHECKING:
    from batchwise.costs.guards import Guards
    from batchwise.store.engine import Store
    from batchwise.store.intake_rows import RequestSink


class Handle:
    """A submitted request. Reads go to the store, so a handle works from any process."""

    def __init__(
        self,
        client: Client,
        request_id: int,
        *,
        lane: str,
        state: str,
        submission_id: int | None = None,
        warnings: tuple[str, ...] = (),
    ) -> None:
        self.client = client
        self.id = request_id
        self.lane = lane
        self.state = state
        #: the submission it came in with
        self.submission_id = submission_id
        #: what its submission warned about (a model that cannot be priced); not errors
        self.warnings = warnings

    def __repr__(self) -> str:
        return f"<Handle {self.id} {self.lane} {self.state}>"

    def refresh(self) -> RequestView:
        view = self.client.get(self.id)
        self.lane, self.state = view.lane, view.state
        return view

    def result(self, timeout: float | None = None, *, poll_s: float = 0.5) -> dict[str, Any]:
        """Wait until the request is terminal; return the provider's response body.

        Raises `RequestFailed` if it ended without an answer and `ResultTimeout` if it is not
        done within `timeout` seconds. Something must be doing the work meanwhile: a
        `batchwise run` process, Celery workers, or `Client.run()` in this process.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            view = self.refresh()
            if view.terminal:
                if view.result is not None:
                    return view.result
                raise RequestFailed(view.id, view.state, view.error)
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeout(
                    f"request {self.id} is still {view.state} after {timeout}s "
                    f"(deadline {view.deadline.isoformat(timespec='seconds')}); is a runner "
                    "or worker running? (`batchwise run` or `batchwise worker`)"
                )
            time.sleep(
                poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic()))
            )


class Submission:
    """The lines stored together by one `Client.submit_file` or `enqueue_many` call (or a
    `batchwise submit`, or a cron job run): follow them, wait for them, read their results.

    Reads go to the store, so a submission works from any process (`Client.submission(ID)`).
    It is also the sequence of its requests' `Handle`s (`len`, index, iteration), as
    `enqueue_many` returned before submissions existed. The intake summary (`accepted`,
    `realtime`, `deferred`, `deduplicated`, `rejected`, `refused`) is there when this process
    stored the lines.
    """

    def __init__(
        self,
        client: Client,
        submission_id: int,
        *,
        name: str | None = None,
        intake: SubmitResult | None = None,
        handles: list[Handle] | None = None,
    ) -> None:
        self.client = client
        self.id = submission_id
        self.name = name
        #: what intake reported when these lines were stored (None when read back by id)
        self.intake = intake
        self._handles = handles

    def __repr__(self) -> str:
        named = f" {self.name!r}" if self.name else ""
        return f"<Submission {self.id}{named}>"

    # --- the intake summary ------------------------------------------------------------------

    def _summary(self) -> SubmitResult:
        if self.intake is None:
            raise AttributeError(
                f"submission {self.id} was read back from the store: its intake summary lives "
                "with the process that stored it; use .status() for its counts"
            )
        return self.intake

    @property
    def accepted(self) -> int:
        return self._summary().accepted

    @property
    def realtime(self) -> int:
        return self._summary().realtime

    @property
    def deferred(self) -> int:
        return self._summary().deferred

    @property
    def deduplicated(self) -> int:
        return self._summary().deduplicated

    @property
    def rejected(self) -> list[Any]:
        """Invalid lines skipped (`skip_invalid=True`), as `LineError`s."""
        return self._summary().rejected

    @property
    def refused(self) -> list[Any]:
        """Lines a cost guard refused (stored as `rejected` requests), as `LineError`s."""
        return self._summary().refused

    @property
    def warnings(self) -> list[str]:
        """What the user should know though nothing failed: a model that cannot be priced."""
        return self._summary().warnings

    def as_dict(self) -> dict[str, Any]:
        """The intake summary as `batchwise submit --json` prints it."""
        return self._summary().as_dict()

    # --- its requests ------------------------------------------------------------------------

    @property
    def handles(self) -> list[Handle]:
        """A `Handle` per stored request, in input order."""
        if self._handles is None:
            from batchwise.store.submissions import request_states

            self._handles = [
                Handle(self.client, rid, lane=lane, state=state, submission_id=self.id)
                for rid, lane, state in request_states(self.client.store, self.id)
            ]
        return self._handles

    def __iter__(self) -> Iterator[Handle]:
        return iter(self.handles)

    def __len__(self) -> int:
        return len(self.handles)

    @overload
    def __getitem__(self, index: int) -> Handle: ...

    @overload
    def __getitem__(self, index: slice) -> list[Handle]: ...

    def __getitem__(self, index: int | slice) -> Handle | list[Handle]:
        return self.handles[index]

    # --- following it --------------------------------------------------------------------------

    def view(self) -> SubmissionView:
        """The submission as stored now: source, format, counts by state, times."""
        return self.client.submission_view(self.id)

    def status(self) -> dict[str, int]:
        """Its requests counted by state."""
        return self.view().counts

    def wait(
        self,
        timeout: float | None = None,
        *,
        poll_s: float = 0.5,
        on_poll: Callable[[SubmissionView], None] | None = None,
    ) -> SubmissionView:
        """Block until every request is terminal; return the final view (`.failed` counts the
        lines that ended without an answer). Raises `ResultTimeout` after `timeout` seconds.
        Only reads the store: something must be doing the work meanwhile (`batchwise run`,
        workers, `Client.run()`). `on_poll` sees each view read (a progress bar)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            view = self.view()
            if on_poll is not None:
                on_poll(view)
            if view.done:
                return view
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeout(
                    f"submission {self.id} still has {view.unfinished} unfinished request(s) "
                    f"after {timeout}s; is a runner or worker running? (`batchwise run` or "
                    "`batchwise worker`)"
                )
            time.sleep(
                poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic()))
            )

    def results(self, format: str | None = None) -> Iterator[dict[str, Any]]:
        """Its finished lines as result lines, in input order: each in the shape its line came
        in (an OpenAI batch output line, an Anthropic results line, a simple result line), or
        all translated to `format` ("openai" or "anthropic"; see `reports.translate`)."""
        from batchwise.reports.results import submission_lines

        return submission_lines(self.client.store, self.id, fmt=format)


class Client:
    """Enqueue requests and read them back. Thread-safe for reads; one writer per call."""

    def __init__(
        self,
        database_url: str | None = None,
        *,
        settings: Settings | None = None,
        clock: Clock = system_clock,
    ) -> None:
        base = settings or Settings.from_env()
        self.settings = base.with_overrides(database_url=database_url)
        self.clock = clock
        self._store: Store | None = None
        self._guards: Guards | None = None

    @property
    def guards(self) -> Guards:
        """The cost guards from the settings, read once."""
        if self._guards is None:
            from batchwise.costs.guards import Guards

            self._guards = Guards.from_settings(self.settings)
        return self._guards

    @property
    def database_url(self) -> str:
        return self.settings.resolved_database_url

    @property
    def store(self) -> Store:
        if self._store is None:
            from batchwise.store.engine import Store

            self._store = Store(self.database_url)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- writing ------------------------------------------------------------------------

    def enqueue(
        self,
        *,
        model: str | None = None,
        messages: list[dict[str, Any]] | None = None,
        prompt: str | None = None,
        body: Mapping[str, Any] | None = None,
        provider: str | None = None,
        endpoint: str | None = None,
        tolerance: str | None = None,
        tags: Mapping[str, str] | None = None,
        custom_id: str | None = None,
        max_tokens: int | None = None,
        submission_name: str | None = None,
        **params: Any,
    ) -> Handle:
        """Store one request (a submission of one, named `submission_name`) and classify it.
        `body` is a complete request body; otherwise `model` plus `messages` or `prompt` (and
        any other body parameters as keywords)."""
        item = request_item(
            model=model,
            messages=messages,
            prompt=prompt,
            body=body,
            provider=provider,
            endpoint=endpoint,
            tolerance=tolerance,
            tags=tags,
            custom_id=custom_id,
            max_tokens=max_tokens,
            **params,
        )
        result = self._submit(
            [item], Defaults(name=submission_name), skip_invalid=False, collect_ids=True
        )
        if result.refused:
            raise GuardRefused("guard", result.refused[0].error)
        return handles(self, result)[0]

    def enqueue_many(
        self,
        items: Iterable[Mapping[str, Any]],
        *,
        name: str | None = None,
        source: str = "api",
    ) -> Submission:
        """Store many requests in one transaction, as one submission: all or none
        (`IntakeError` lists every bad item by its 1-based position). Items use the same
        shapes as `batchwise submit` lines. Returns the `Submission`, which is also the list of
        the requests' handles. `source` is recorded on the submission."""
        result = self._submit(
            items, Defaults(name=name, source=source), skip_invalid=False, collect_ids=True
        )
        return self._submission(result, name, handles(self, result))

    def submit_file(
        self,
        source: str | Path | IO[bytes],
        *,
        name: str | None = None,
        tolerance: str | None = None,
        provider: str | None = None,
        tags: Mapping[str, str] | None = None,
        skip_invalid: bool = False,
        on_line: Callable[[int], None] | None = None,
        origin: str | None = None,
    ) -> Submission:
        """Stream a JSONL file (a path or a binary stream) into the store as one submission.

        `origin` is the source recorded on the submission (default: the path, or "-" for a
        stream)."""
        recorded = origin or (str(source) if isinstance(source, str | Path) else "-")
        defaults = Defaults(
            tolerance=tolerance or "24h",
            provider=provider,
            tags=dict(tags or {}),
            source=recorded,
            name=name,
        )
        kw: dict[str, Any] = {"skip_invalid": skip_invalid, "on_line": on_line, "bulk": True}
        if isinstance(source, str | Path):
            with open(source, "rb") as stream:
                result = self._submit(stream, defaults, **kw)
        else:
            result = self._submit(source, defaults, **kw)
        return self._submission(result, name)

    def _submission(
        self, result: SubmitResult, name: str | None, handles: list[Handle] | None = None
    ) -> Submission:
        assert result.submission_id is not None, "intake opens a submission"
        return Submission(self, result.submission_id, name=name, intake=result, handles=handles)

    def _submit(
        self,
        lines: Iterable[Any],
        defaults: Defaults,
        *,
        skip_invalid: bool,
        collect_ids: bool = False,
        on_line: Callable[[int], None] | None = None,
        bulk: bool = False,
    ) -> SubmitResult:
        """Intake `lines` through a sink on this client's database. A `bulk` one (a file)
        goes through the driver's own sink (`plain_sink`) even with the store open: on SQLite,
        through the engine's, a 50,000-line file took twice as long (the gateway's batches)."""
        from batchwise.store.sinks import EngineSink, open_sink, plain_sink

        url = self.database_url
        sink: RequestSink | None
        if self._store is None:
            sink = open_sink(url)
        else:
            sink = plain_sink(url) if bulk else None
            if sink is None:  # a few lines: the store's pooled connection is already open
                sink = EngineSink(self._store)
        result = submit_lines(
            lines,
            sink,
            settings=self.settings,
            now=self.clock(),
            zone=resolve_zone(self.settings.timezone),
            defaults=defaults,
            skip_invalid=skip_invalid,
            collect_ids=collect_ids,
            on_line=on_line,
            guards=self.guards,
        )
        if self.settings.broker_url and result.realtime_ids:
            # Distributed mode: hand realtime work to the workers now, not at the next sweep.
            from batchwise.worker import send_realtime

            send_realtime(self.settings, result.realtime_ids)
        return result

    # --- doing the work in this process ----------------------------------------------------

    def run(
        self, *, until_idle: bool = True, include_held: bool = False, interval_s: float = 1.0
    ) -> None:
        """Run the embedded scheduler here until every request is terminal or held for a known
        reason and time (`include_held`: until every one is terminal), or forever.

        For scripts and notebooks; services run `batchwise run` or Celery workers instead.
        """
        from batchwise.lifecycle.runner import run_embedded

        self.close()
        run_embedded(
            self.settings,
            until_idle=until_idle,
            include_held=include_held,
            interval_s=interval_s,
            show=False,
            clock=self.clock,
        )

    def cancel(self, *ids: int) -> list[int]:
        """Cancel live requests; returns the ids that were cancelled."""
        from batchwise.lifecycle.cancel import cancel_requests

        return cancel_requests(self.store, list(ids), now=self.clock())

    # --- reading ------------------------------------------------------------------------

    def get(self, request: int | str, *, submission: int | None = None) -> RequestView:
        """A request by id, or by custom_id (the most recent with it). A custom_id used in
        several submissions needs `submission` (else `AmbiguousIdError` lists them)."""
        from batchwise.store import queries

        view = queries.request_view(self.store, request, submission_id=submission)
        if view is None:
            where = f" in submission {submission}" if submission is not None else ""
            raise NotFoundError(f"no request with id or custom_id {request!r}{where}")
        return view

    def submission(self, submission_id: int) -> Submission:
        """A stored submission by id, to follow or read back."""
        view = self.submission_view(submission_id)
        return Submission(self, view.id, name=view.name)

    def submission_view(self, submission_id: int) -> SubmissionView:
        """A submission as stored now, with its requests counted by state."""
        from batchwise.store.submissions import get_submission

        view = get_submission(self.store, submission_id)
        if view is None:
            raise NotFoundError(f"no submission with id {submission_id}")
        return view

    def submissions(self, *, limit: int = 50) -> list[SubmissionView]:
        """The latest submissions, newest first."""
        from batchwise.store.submissions import list_submissions

        return list_submissions(self.store, limit=limit)

    def status(self) -> dict[str, Any]:
        """Counts by lane and by state, and each model's open tokens against its capacity
        estimate: {"total", "by_lane", "by_state", "capacity": [...]}."""
        from batchwise.reports.overview import status_report

        return status_report(self.store, self.settings, now=self.clock())


def handles(client: Client, result: SubmitResult) -> list[Handle]:
    """Handles for the requests a submission stored, in input order."""
    assert result.ids is not None and result.lanes is not None
    warnings = tuple(result.warnings)
    return [
        Handle(
            client,
            rid,
            lane=lane,
            state=result.states.get(rid) or _initial_state(lane),
            submission_id=result.submission_id,
            warnings=warnings,
        )
        for rid, lane in zip(result.ids, result.lanes, strict=True)
    ]


def request_item(
    *,
    model: str | None = None,
    messages: list[dict[str, Any]] | None = None,
    prompt: str | None = None,
    body: Mapping[str, Any] | None = None,
    provider: str | None = None,
    endpoint: str | None = None,
    tolerance: str | None = None,
    tags: Mapping[str, str] | None = None,
    custom_id: str | None = None,
    max_tokens: int | None = None,
    **params: Any,
) -> dict[str, Any]:
    """The intake line (simple shape) for `Client.enqueue`'s keyword arguments."""
    item: dict[str, Any] = dict(body or {})
    item.update(params)
    for key, value in (
        ("model", model),
        ("messages", messages),
        ("prompt", prompt),
        ("provider", provider),
        ("endpoint", endpoint),
        ("tolerance", tolerance),
        ("tags", dict(tags) if tags else None),
        ("custom_id", custom_id),
        ("max_tokens", max_tokens),
    ):
        if value is not None:
            item[key] = value
    return item


def _initial_state(lane: str) -> str:
    return (RequestState.QUEUED if lane == "deferred" else RequestState.DISPATCHING).value
