"""A gateway batch's output and error files, made from its submission's results.

They are never stored: `file-batch_N-output` holds the lines answered, `file-batch_N-errors`
the lines that ended without an answer, each in OpenAI's batch output format
(`reports.results`), read from the store when asked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from batchwise.reports.results import submission_lines
from batchwise.store import gateway as rows
from batchwise.store.gateway import BatchRow
from batchwise.store.submissions import get_submission
from batchwise.store.views import SubmissionView

if TYPE_CHECKING:
    from batchwise.gateway.context import Gateway

_BATCH_PREFIX = "batch_"
_KINDS = {"output": "batch_output", "errors": "batch_output"}


def batch_id(row_id: int) -> str:
    return f"{_BATCH_PREFIX}{row_id}"


def parse_batch_id(text: str) -> int | None:
    """The row id of a batch id (`batch_12`), or None."""
    if text.startswith(_BATCH_PREFIX) and text[len(_BATCH_PREFIX) :].isdigit():
        return int(text[len(_BATCH_PREFIX) :])
    return None


def output_ids(row: BatchRow, view: SubmissionView) -> tuple[str | None, str | None]:
    """(output_file_id, error_file_id) once the batch is over (every line terminal)."""
    if not view.done:
        return None, None
    base = f"file-{batch_id(row.id)}"
    return f"{base}-output", (f"{base}-errors" if view.failed else None)


def _content(gateway: Gateway, row: BatchRow, kind: str) -> bytes:
    wanted_errors = kind == "errors"
    out = bytearray()
    for line in submission_lines(gateway.store, row.submission_id, fmt="openai"):
        if (line["error"] is not None) == wanted_errors:
            out += orjson.dumps(line) + b"\n"
    return bytes(out)


def _lookup(gateway: Gateway, wanted: str) -> tuple[BatchRow, str] | None:
    base, _, kind = wanted.removeprefix("file-").rpartition("-")
    row_id = parse_batch_id(base)
    if kind not in _KINDS or row_id is None:
        return None
    row = rows.get_batch(gateway.store, row_id)
    if row is None:
        return None
    view = get_submission(gateway.store, row.submission_id)
    if view is None or wanted not in output_ids(row, view):
        return None
    return row, kind


def output_file_content(gateway: Gateway, wanted: str) -> bytes | None:
    """The content of a batch's output or error file, or None if there is no such file."""
    found = _lookup(gateway, wanted)
    return None if found is None else _content(gateway, *found)


def output_file_object(gateway: Gateway, wanted: str) -> dict[str, Any] | None:
    """The file object of a batch's output or error file, or None."""
    found = _lookup(gateway, wanted)
    if found is None:
        return None
    row, kind = found
    return {
        "id": wanted,
        "object": "file",
        "bytes": len(_content(gateway, row, kind)),
        "created_at": int(row.created_at.timestamp()),
        "filename": f"{batch_id(row.id)}_{kind}.jsonl",
        "purpose": _KINDS[kind],
        "status": "processed",
        "status_details": None,
    }
