"""OpenAI's Batches API: `POST /v1/batches`, `GET /v1/batches/{id}`, `GET /v1/batches`
(`limit`, `after`), `POST /v1/batches/{id}/cancel`.

A batch is a submission: creating one streams its input file through intake
(`Client.submit_file`), so its lines join the common queue with everyone else's, packed,
deduplicated and rescued like any other work. Metadata keys `use_case`, `step`,
`business_unit` and `task_id` become tags, on top of the key's; `batchwise_tolerance` (else
`completion_window`) is the tolerance. Its status and `request_counts` are read live from
the submission's requests:

- `validating`: stored, nothing sent to a provider or answered yet;
- `in_progress`: some lines on their way or answered, not all;
- `finalizing`: every line settled, its output and error files being written
  (`gateway.outputs`);
- `completed` once they are there; `cancelling` → `cancelled` after a cancel.

A batch of another API (an Anthropic Message Batch, `gateway.message_batches`) is not one of
these: its id is unknown here.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from batchwise.errors import IntakeError, ToleranceError
from batchwise.gateway.context import json_response, openai_error
from batchwise.gateway.files import parse_file_id
from batchwise.gateway.outputs import batch_id, output_ids, parse_batch_id
from batchwise.states import RequestState
from batchwise.store import gateway as rows
from batchwise.store.gateway import MESSAGES_ENDPOINT, BatchRow
from batchwise.store.keys import KeyView
from batchwise.store.submissions import get_submission, request_states
from batchwise.store.views import ANSWERED_STATES, SubmissionView

if TYPE_CHECKING:
    from batchwise.gateway.context import Gateway

#: the endpoints a batch may name (OpenAI's batchable ones that batchwise carries)
ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
)
#: metadata keys that become tags
TAG_KEYS = ("use_case", "step", "business_unit", "task_id")
_WINDOW = timedelta(hours=24)


def batch_status(*, cancelled: bool, view: SubmissionView, written: bool) -> str:
    """The status OpenAI would show: `cancelled` asks a cancel was made, `written` that the
    output files are in place."""
    if cancelled:
        return "cancelled" if view.done and written else "cancelling"
    if view.done:
        if not written:
            return "finalizing"
        return "completed" if view.total else "failed"
    if set(view.counts) <= {RequestState.QUEUED.value}:
        return "validating"
    return "in_progress"


def _unix(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


def batch_object(
    row: BatchRow, view: SubmissionView, written_at: datetime | None
) -> dict[str, Any]:
    written = written_at is not None
    status = batch_status(cancelled=row.cancelled_at is not None, view=view, written=written)
    output_file_id, error_file_id = output_ids(row, view, written=written)
    created = int(row.created_at.timestamp())
    answered = sum(n for state, n in view.counts.items() if state in ANSWERED_STATES)
    return {
        "id": batch_id(row.id),
        "object": "batch",
        "endpoint": row.endpoint,
        "errors": None,
        "input_file_id": f"file-{row.input_file_id}",
        "completion_window": row.completion_window,
        "status": status,
        "output_file_id": output_file_id,
        "error_file_id": error_file_id,
        "created_at": created,
        "in_progress_at": None if status == "validating" else created,
        "expires_at": int((row.created_at + _WINDOW).timestamp()),
        "finalizing_at": _unix(view.finished_at),
        "completed_at": _unix(written_at) if status == "completed" else None,
        "failed_at": _unix(written_at) if status == "failed" else None,
        "expired_at": None,
        "cancelling_at": _unix(row.cancelled_at),
        "cancelled_at": _unix(written_at) if status == "cancelled" else None,
        "request_counts": {"total": view.total, "completed": answered, "failed": view.failed},
        "metadata": row.metadata or None,
    }


def _read(gateway: Gateway, row: BatchRow) -> dict[str, Any]:
    view = get_submission(gateway.store, row.submission_id)
    assert view is not None, "a gateway batch always has its submission"
    written_at = gateway.outputs.written_at(row.id) if view.done else None
    if view.done and written_at is None:
        gateway.outputs.start(gateway.store, row)
    return batch_object(row, view, written_at)


def _find(gateway: Gateway, wanted: str) -> BatchRow | None:
    row_id = parse_batch_id(wanted)
    row = None if row_id is None else rows.get_batch(gateway.store, row_id)
    return row if row is not None and row.endpoint != MESSAGES_ENDPOINT else None


def _create(gateway: Gateway, key: KeyView, body: dict[str, Any]) -> Response:
    endpoint = body.get("endpoint")
    if endpoint not in ENDPOINTS:
        return openai_error(
            400,
            f"endpoint must be one of {', '.join(ENDPOINTS)}, not {endpoint!r}",
            code="invalid_endpoint",
        )
    window = body.get("completion_window") or "24h"
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        return openai_error(400, "metadata must be an object of strings", code="metadata")
    file_row_id = parse_file_id(str(body.get("input_file_id") or ""))
    file_row = None if file_row_id is None else rows.get_file(gateway.store, file_row_id)
    if file_row is None or file_row_id is None:
        return openai_error(
            404, f"No such File object: {body.get('input_file_id')!r}", code="not_found"
        )
    tags = {**key.tags, **{k: metadata[k] for k in TAG_KEYS if metadata.get(k)}}
    tolerance = metadata.get("batchwise_tolerance") or window
    try:
        submission = gateway.client.submit_file(
            file_row.path,
            name=f"gateway {file_row.filename}"[:128],
            tolerance=tolerance,
            tags=tags,
            origin=f"gateway:file-{file_row.id}",
        )
    except IntakeError as exc:
        return openai_error(400, str(exc), code="invalid_file")
    except ToleranceError as exc:
        return openai_error(400, str(exc), code="completion_window")
    try:
        row = rows.insert_batch(
            gateway.store,
            submission_id=submission.id,
            input_file_id=file_row.id,
            endpoint=str(endpoint),
            completion_window=str(window),
            metadata=metadata,
            key_name=key.name,
            at=gateway.clock(),
        )
    except BaseException:
        # no batch to follow them by: its lines are cancelled rather than run unseen
        gateway.client.cancel(*(handle.id for handle in submission))
        raise
    return json_response(_read(gateway, row))


async def create_batch(gateway: Gateway, request: Request, key: KeyView) -> Response:
    try:
        body = await request.json()
    except ValueError:
        return openai_error(400, "the request body is not JSON")
    if not isinstance(body, dict):
        return openai_error(400, "the request body must be a JSON object")
    return await run_in_threadpool(_create, gateway, key, body)


def _get(gateway: Gateway, wanted: str) -> Response:
    row = _find(gateway, wanted)
    if row is None:
        return openai_error(404, f"No such Batch object: {wanted}", code="not_found")
    return json_response(_read(gateway, row))


async def get_batch(gateway: Gateway, request: Request, key: KeyView) -> Response:
    return await run_in_threadpool(_get, gateway, request.path_params["batch_id"])


def _list(gateway: Gateway, limit: int, after: str | None) -> Response:
    after_id = None if after is None else parse_batch_id(after)
    found = rows.list_batches(gateway.store, limit=limit + 1, after=after_id)
    data = [_read(gateway, row) for row in found[:limit]]
    return json_response(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(found) > limit,
        }
    )


async def list_batches(gateway: Gateway, request: Request, key: KeyView) -> Response:
    try:
        limit = int(request.query_params.get("limit", "20"))
    except ValueError:
        return openai_error(400, "limit must be an integer")
    if not 1 <= limit <= 100:
        return openai_error(400, "limit must be between 1 and 100")
    return await run_in_threadpool(_list, gateway, limit, request.query_params.get("after"))


def _cancel(gateway: Gateway, wanted: str) -> Response:
    row = _find(gateway, wanted)
    if row is None:
        return openai_error(404, f"No such Batch object: {wanted}", code="not_found")
    rows.mark_batch_cancelled(gateway.store, row.id, at=gateway.clock())
    ids = [rid for rid, _lane, _state in request_states(gateway.store, row.submission_id)]
    gateway.client.cancel(*ids)
    view = get_submission(gateway.store, row.submission_id)
    if view is not None and view.done and gateway.outputs.written_at(row.id) is None:
        # every line ended with the cancel: its files are written before it answers
        writer = gateway.outputs.start(gateway.store, row)
        if writer is not None:
            writer.join()
    return _get(gateway, wanted)


async def cancel_batch(gateway: Gateway, request: Request, key: KeyView) -> Response:
    return await run_in_threadpool(_cancel, gateway, request.path_params["batch_id"])


ROUTES = [
    ("/v1/batches", create_batch, ["POST"]),
    ("/v1/batches", list_batches, ["GET"]),
    ("/v1/batches/{batch_id}", get_batch, ["GET"]),
    ("/v1/batches/{batch_id}/cancel", cancel_batch, ["POST"]),
]
