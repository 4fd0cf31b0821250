"""Anthropic's Message Batches API: `POST /v1/messages/batches`, `GET /v1/messages/batches`
(`limit`, `before_id`, `after_id`), `GET /v1/messages/batches/{id}`, `GET …/{id}/results`,
`POST …/{id}/cancel`, `DELETE …/{id}` (once ended; its requests and their costs stay).

A Message Batch is a submission like an OpenAI batch: its requests go through intake
(`Client.enqueue_many`) into the common queue, all or none. Anthropic's create takes no
metadata, so tags come from the key and the `X-Batchwise-Tags` header, and the tolerance from
`X-Batchwise-Tolerance` (default 24h, Anthropic's own window). The batch object is read live
from the submission's requests, as Anthropic reports it: `in_progress` with every request
counted `processing` until all have ended, `canceling` after a cancel, then `ended` with the
counts by result type and a `results_url`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from batchwise.errors import IntakeError, ToleranceError
from batchwise.gateway.context import anthropic_error, json_response
from batchwise.gateway.realtime import TAGS_HEADER, header_tags
from batchwise.intake.lines import infer_provider
from batchwise.reports.results import EXPIRED_CODES, submission_lines
from batchwise.states import RequestState
from batchwise.store import gateway as rows
from batchwise.store.gateway import MESSAGES_ENDPOINT, NO_FILE, BatchRow
from batchwise.store.keys import KeyView
from batchwise.store.submissions import get_submission, request_states
from batchwise.store.views import ANSWERED_STATES, SubmissionView

if TYPE_CHECKING:
    from batchwise.gateway.context import Gateway

#: the header naming how long a batch's requests may wait (`batchwise submit --tolerance`)
TOLERANCE_HEADER = "x-batchwise-tolerance"
#: Anthropic's limit on the requests of one batch
MAX_REQUESTS = 100_000
_PREFIX = "msgbatch_"
_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_WINDOW = timedelta(hours=24)
_RESULT_TYPES = ("succeeded", "errored", "canceled", "expired")
#: result lines sent per chunk of a results download
_RESULTS_CHUNK = 500


def message_batch_id(row_id: int) -> str:
    return f"{_PREFIX}{row_id}"


def parse_message_batch_id(text: str) -> int | None:
    """The row id of a Message Batch id (`msgbatch_12`), or None."""
    if text.startswith(_PREFIX) and text[len(_PREFIX) :].isdigit():
        return int(text[len(_PREFIX) :])
    return None


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def result_counts(view: SubmissionView, failures: dict[str, int]) -> dict[str, int]:
    """An ended batch's requests by result type, as its results file reads (`reports.results`):
    answered ones `succeeded`, cancelled ones `canceled`, failed ones `expired` when their
    code says so and `errored` otherwise."""
    expired = sum(n for code, n in failures.items() if code in EXPIRED_CODES)
    return {
        "succeeded": sum(n for state, n in view.counts.items() if state in ANSWERED_STATES),
        "errored": sum(failures.values()) - expired,
        "canceled": view.counts.get(RequestState.CANCELLED.value, 0),
        "expired": expired,
    }


def batch_object(
    gateway: Gateway, row: BatchRow, view: SubmissionView, base_url: str
) -> dict[str, Any]:
    """The `message_batch` object of a stored batch."""
    ended = view.done
    counts = {"processing": view.total, **dict.fromkeys(_RESULT_TYPES, 0)}
    ended_at: datetime | None = None
    if ended:
        failures = rows.failure_codes(gateway.store, row.submission_id)
        counts = {"processing": 0, **result_counts(view, failures)}
        status = "ended"
        ended_at = view.finished_at or row.cancelled_at or row.created_at
    else:
        status = "in_progress" if row.cancelled_at is None else "canceling"
    return {
        "id": message_batch_id(row.id),
        "type": "message_batch",
        "processing_status": status,
        "request_counts": counts,
        "ended_at": None if ended_at is None else _rfc3339(ended_at),
        "created_at": _rfc3339(row.created_at),
        "expires_at": _rfc3339(row.created_at + _WINDOW),
        "archived_at": None,
        "cancel_initiated_at": (None if row.cancelled_at is None else _rfc3339(row.cancelled_at)),
        "results_url": (
            f"{base_url}/v1/messages/batches/{message_batch_id(row.id)}/results" if ended else None
        ),
    }


def _lines(gateway: Gateway, row: BatchRow) -> Iterator[dict[str, Any]]:
    return submission_lines(gateway.store, row.submission_id, fmt="anthropic")


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _read(gateway: Gateway, row: BatchRow, base_url: str) -> dict[str, Any]:
    view = get_submission(gateway.store, row.submission_id)
    assert view is not None, "a gateway batch always has its submission"
    return batch_object(gateway, row, view, base_url)


def _find(gateway: Gateway, wanted: str) -> BatchRow | None:
    row_id = parse_message_batch_id(wanted)
    row = None if row_id is None else rows.get_batch(gateway.store, row_id)
    return row if row is not None and row.endpoint == MESSAGES_ENDPOINT else None


def _not_found(wanted: str) -> Response:
    return anthropic_error(404, f"No message batch found with id '{wanted}'.")


class _Bad(Exception):
    """One request item that cannot be a Message Batch request: Anthropic's message for it."""


def check_items(requests: Any) -> list[dict[str, Any]]:
    """The request items as intake lines (`{custom_id, params}`), checked as Anthropic checks
    them when a batch is created; raises `_Bad` naming the item and the field."""
    if not isinstance(requests, list):
        raise _Bad("requests: Field required (a list of {custom_id, params} items)")
    if not 1 <= len(requests) <= MAX_REQUESTS:
        raise _Bad(
            f"requests: List should have between 1 and {MAX_REQUESTS} items, not {len(requests)}"
        )
    seen: set[str] = set()
    for i, item in enumerate(requests):
        if not isinstance(item, dict):
            raise _Bad(f"requests.{i}: Input should be a valid dictionary")
        extra = sorted(set(item) - {"custom_id", "params"})
        if extra:
            raise _Bad(f"requests.{i}.{extra[0]}: Extra inputs are not permitted")
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not _CUSTOM_ID.match(custom_id):
            raise _Bad(
                f"requests.{i}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
            )
        if custom_id in seen:
            raise _Bad(
                f"requests.{i}.custom_id: duplicate custom_id '{custom_id}'; custom_ids must "
                "be unique within a batch"
            )
        seen.add(custom_id)
        params = item.get("params")
        if not isinstance(params, dict):
            raise _Bad(f"requests.{i}.params: Field required (the Messages API body)")
        model = params.get("model")
        served_by = infer_provider(model) if isinstance(model, str) else None
        if served_by not in (None, "anthropic"):
            raise _Bad(
                f"requests.{i}.params.model: {model!r} is not an Anthropic model (its name says "
                f"{served_by}); this is Anthropic's Message Batches API"
            )
    return requests


def _intake_message(exc: IntakeError) -> str:
    """Intake's first bad line, named as Anthropic names a request item (`requests.2.params…`)."""
    first = exc.errors[0]
    where = f"requests.{first.line - 1}"
    if first.field:
        where += f".{first.field}"
    more = f" (and {len(exc.errors) - 1} more invalid request(s))" if len(exc.errors) > 1 else ""
    return f"{where}: {first.error}{more}; nothing was stored"


def _create(
    gateway: Gateway,
    key: KeyView,
    items: list[dict[str, Any]],
    tags: dict[str, str],
    tolerance: str,
    base_url: str,
) -> Response:
    lines = [{**item, "tags": tags, "tolerance": tolerance} for item in items]
    try:
        submission = gateway.client.enqueue_many(
            lines, name=f"gateway message batch ({key.name})"[:128], source="gateway:messages"
        )
    except IntakeError as exc:
        return anthropic_error(400, _intake_message(exc))
    except ToleranceError as exc:
        return anthropic_error(400, f"{TOLERANCE_HEADER}: {exc}")
    try:
        row = rows.insert_batch(
            gateway.store,
            submission_id=submission.id,
            input_file_id=NO_FILE,
            endpoint=MESSAGES_ENDPOINT,
            completion_window="24h",
            metadata={},
            key_name=key.name,
            at=gateway.clock(),
        )
    except BaseException:
        # no batch to follow them by: its requests are cancelled rather than run unseen
        gateway.client.cancel(*(handle.id for handle in submission))
        raise
    return json_response(_read(gateway, row, base_url))


async def create_batch(gateway: Gateway, request: Request, key: KeyView) -> Response:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        return anthropic_error(400, f"the request body is not JSON: {exc}")
    if not isinstance(body, dict):
        return anthropic_error(400, "the request body must be a JSON object")
    try:
        items = check_items(body.get("requests"))
        tags = {**key.tags, **header_tags(request.headers.get(TAGS_HEADER))}
    except (_Bad, ValueError) as exc:
        return anthropic_error(400, str(exc))
    tolerance = request.headers.get(TOLERANCE_HEADER) or "24h"
    return await run_in_threadpool(
        _create, gateway, key, items, tags, tolerance, _base_url(request)
    )


def _get(gateway: Gateway, wanted: str, base_url: str) -> Response:
    row = _find(gateway, wanted)
    return _not_found(wanted) if row is None else json_response(_read(gateway, row, base_url))


async def get_batch(gateway: Gateway, request: Request, key: KeyView) -> Response:
    return await run_in_threadpool(
        _get, gateway, request.path_params["batch_id"], _base_url(request)
    )


def _ended(gateway: Gateway, wanted: str, not_yet: str) -> BatchRow | Response:
    """Batch `wanted` if it has ended, else the 404, or a 400 saying `not_yet`."""
    row = _find(gateway, wanted)
    if row is None:
        return _not_found(wanted)
    view = get_submission(gateway.store, row.submission_id)
    if view is None or not view.done:
        return anthropic_error(400, f"Message batch {wanted} {not_yet}")
    return row


def _results(gateway: Gateway, wanted: str) -> Response:
    row = _ended(
        gateway,
        wanted,
        "has not ended yet; results are available once processing_status is 'ended'.",
    )
    if isinstance(row, Response):
        return row
    return StreamingResponse(_jsonl(gateway, row), media_type="application/binary")


def _jsonl(gateway: Gateway, row: BatchRow) -> Iterator[bytes]:
    """The results file, read from the store as it is sent, in pieces of `_RESULTS_CHUNK`
    lines (a batch of 100,000 answers is never held whole)."""
    piece: list[bytes] = []
    for line in _lines(gateway, row):
        piece.append(orjson.dumps(line) + b"\n")
        if len(piece) == _RESULTS_CHUNK:
            yield b"".join(piece)
            piece.clear()
    if piece:
        yield b"".join(piece)


async def batch_results(gateway: Gateway, request: Request, key: KeyView) -> Response:
    return await run_in_threadpool(_results, gateway, request.path_params["batch_id"])


def _list(
    gateway: Gateway, limit: int, after: str | None, before: str | None, base_url: str
) -> Response:
    cursors = {}
    for name, value in (("after_id", after), ("before_id", before)):
        if value is not None:
            row_id = parse_message_batch_id(value)
            if row_id is None:
                return anthropic_error(400, f"{name}: no message batch with id '{value}'")
            cursors[name] = row_id
    found = rows.list_batches(
        gateway.store,
        limit=limit + 1,
        after=cursors.get("after_id"),
        before=cursors.get("before_id"),
        anthropic=True,
    )
    # newest first; going back (`before_id`) keeps the `limit` nearest the cursor
    page = found[-limit:] if before is not None else found[:limit]
    data = [_read(gateway, row, base_url) for row in page]
    return json_response(
        {
            "data": data,
            "has_more": len(found) > limit,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
    )


async def list_batches(gateway: Gateway, request: Request, key: KeyView) -> Response:
    query = request.query_params
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        return anthropic_error(
            400, f"limit: Input should be a valid integer, not {query['limit']!r}"
        )
    if not 1 <= limit <= 1000:
        return anthropic_error(400, f"limit: Input should be between 1 and 1000, not {limit}")
    if query.get("after_id") and query.get("before_id"):
        return anthropic_error(400, "give after_id or before_id, not both")
    return await run_in_threadpool(
        _list,
        gateway,
        limit,
        query.get("after_id") or None,
        query.get("before_id") or None,
        _base_url(request),
    )


def _cancel(gateway: Gateway, wanted: str, base_url: str) -> Response:
    row = _find(gateway, wanted)
    if row is None:
        return _not_found(wanted)
    view = get_submission(gateway.store, row.submission_id)
    if view is not None and view.done and row.cancelled_at is None:
        return anthropic_error(
            400, f"Message batch {wanted} has already ended and cannot be canceled."
        )
    rows.mark_batch_cancelled(gateway.store, row.id, at=gateway.clock())
    ids = [rid for rid, _lane, _state in request_states(gateway.store, row.submission_id)]
    gateway.client.cancel(*ids)
    return _get(gateway, wanted, base_url)


async def cancel_batch(gateway: Gateway, request: Request, key: KeyView) -> Response:
    return await run_in_threadpool(
        _cancel, gateway, request.path_params["batch_id"], _base_url(request)
    )


def _delete(gateway: Gateway, wanted: str) -> Response:
    row = _ended(
        gateway,
        wanted,
        "is still processing; cancel it and wait until it has ended before deleting it.",
    )
    if isinstance(row, Response):
        return row
    rows.delete_batch(gateway.store, row.id)
    return json_response({"id": wanted, "type": "message_batch_deleted"})


async def delete_batch(gateway: Gateway, request: Request, key: KeyView) -> Response:
    return await run_in_threadpool(_delete, gateway, request.path_params["batch_id"])


ROUTES = [
    ("/v1/messages/batches", create_batch, ["POST"]),
    ("/v1/messages/batches", list_batches, ["GET"]),
    ("/v1/messages/batches/{batch_id}", get_batch, ["GET"]),
    ("/v1/messages/batches/{batch_id}", delete_batch, ["DELETE"]),
    ("/v1/messages/batches/{batch_id}/results", batch_results, ["GET"]),
    ("/v1/messages/batches/{batch_id}/cancel", cancel_batch, ["POST"]),
]
