"""The Python API: `Client` to enqueue requests and read them back, `Handle` to follow one.

from batchwise import Client

client = Client("sqlite:///work.db")
handle = client.enqueue(model="gpt-4o-mini", prompt="Summarise …", tolerance="4h",
                        tags={"use_case": "summaries"})
handle.lane, handle.state          # 'deferred', 'queued'
answer = handle.result(timeout=3600)   # once a runner or worker has done the work
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from batchwise.clock import Clock, system_clock
from batchwise.config import Settings
from batchwise.errors import GuardRefused, NotFoundError, RequestFailed, ResultTimeout
from batchwise.intake.ingest import Defaults, SubmitResult, submit_lines
from batchwise.intake.tolerance import resolve_zone
from batchwise.states import RequestState
from batchwise.store.views import RequestView as RequestView  # re-exported: users name it here

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
        warnings: tuple[str, ...] = (),
    ) -> None:
        self.client = client
        self.id = request_id
        self.lane = lane
        self.state = state
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
        **params: Any,
    ) -> Handle:
        """Store one request and classify it. `body` is a complete request body; otherwise
        `model` plus `messages` or `prompt` (and any other body parameters as keywords)."""
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
        result = self._submit([item], Defaults(), skip_invalid=False, collect_ids=True)
        if result.refused:
            raise GuardRefused("guard", result.refused[0].error)
        return handles(self, result)[0]

    def enqueue_many(self, items: Iterable[Mapping[str, Any]]) -> list[Handle]:
        """Store many requests in one transaction: all or none (`IntakeError` lists every bad
        item by its 1-based position). Items use the same shapes as `batchwise submit` lines."""
        result = self._submit(items, Defaults(), skip_invalid=False, collect_ids=True)
        return handles(self, result)

    def submit_file(
        self,
        source: str | Path | IO[bytes],
        *,
        tolerance: str | None = None,
        provider: str | None = None,
        tags: Mapping[str, str] | None = None,
        skip_invalid: bool = False,
        on_line: Callable[[int], None] | None = None,
    ) -> SubmitResult:
        """Stream a JSONL file (a path or a binary stream) into the store."""
        defaults = Defaults(tolerance=tolerance or "24h", provider=provider, tags=dict(tags or {}))
        if isinstance(source, str | Path):
            with open(source, "rb") as stream:
                return self._submit(stream, defaults, skip_invalid=skip_invalid, on_line=on_line)
        return self._submit(source, defaults, skip_invalid=skip_invalid, on_line=on_line)

    def _submit(
        self,
        lines: Iterable[Any],
        defaults: Defaults,
        *,
        skip_invalid: bool,
        collect_ids: bool = False,
        on_line: Callable[[int], None] | None = None,
    ) -> SubmitResult:
        from batchwise.store.sinks import EngineSink, open_sink

        sink: RequestSink = (
            EngineSink(self._store) if self._store is not None else open_sink(self.database_url)
        )
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

    def run(self, *, until_idle: bool = True, interval_s: float = 1.0) -> None:
        """Run the embedded scheduler here until every request is terminal (or forever).

        For scripts and notebooks; services run `batchwise run` or Celery workers instead.
        """
        from batchwise.lifecycle.runner import run_embedded

        self.close()
        run_embedded(
            self.settings,
            until_idle=until_idle,
            interval_s=interval_s,
            show=False,
            clock=self.clock,
        )

    def cancel(self, *ids: int) -> list[int]:
        """Cancel live requests; returns the ids that were cancelled."""
        from batchwise.lifecycle.cancel import cancel_requests

        return cancel_requests(self.store, list(ids), now=self.clock())

    # --- reading ------------------------------------------------------------------------

    def get(self, request: int | str) -> RequestView:
        """A request by id, or by custom_id (the live one, else the most recent)."""
        from batchwise.store import queries

        view = queries.request_view(self.store, request)
        if view is None:
            raise NotFoundError(f"no request with id or custom_id {request!r}")
        return view

    def status(self) -> dict[str, Any]:
        """Counts by lane and by state: {"total", "by_lane", "by_state"}."""
        from batchwise.store import queries

        return queries.status_counts(self.store)


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
