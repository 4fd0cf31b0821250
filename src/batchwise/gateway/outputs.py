"""A gateway batch's output and error files, written once every line has settled.

While they are written the batch is `finalizing`; once they are there it is `completed` (or
`cancelled`). `file-batch_N-output` holds the lines answered, `file-batch_N-errors` the lines
that ended without an answer, each in OpenAI's batch output format (`reports.results`). A
batch's two files are written into a private folder that is renamed into place at once, so a
reader sees both or neither, and two gateways racing to write them keep one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from batchwise.reports.results import submission_lines
from batchwise.store import gateway as rows
from batchwise.store.engine import Store
from batchwise.store.gateway import MESSAGES_ENDPOINT, BatchRow
from batchwise.store.submissions import get_submission
from batchwise.store.views import SubmissionView

if TYPE_CHECKING:
    from batchwise.gateway.context import Gateway

__all__ = ["Outputs", "batch_id", "output_ids", "parse_batch_id"]

_BATCH_PREFIX = "batch_"
_KINDS = {"output": "batch_output", "errors": "batch_output"}
_FILE_MODE = 0o600
_DIR_MODE = 0o700


def batch_id(row_id: int) -> str:
    return f"{_BATCH_PREFIX}{row_id}"


def parse_batch_id(text: str) -> int | None:
    """The row id of a batch id (`batch_12`), or None."""
    if text.startswith(_BATCH_PREFIX) and text[len(_BATCH_PREFIX) :].isdigit():
        return int(text[len(_BATCH_PREFIX) :])
    return None


def output_ids(
    row: BatchRow, view: SubmissionView, *, written: bool
) -> tuple[str | None, str | None]:
    """(output_file_id, error_file_id) once the batch's files are written."""
    if not (view.done and written):
        return None, None
    base = f"file-{batch_id(row.id)}"
    return f"{base}-output", (f"{base}-errors" if view.failed else None)


class Outputs:
    """Where batches' output files live, and the writers making them (one thread per batch,
    started by the first read that finds every line settled)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._writing: set[int] = set()
        self._lock = threading.Lock()

    def path(self, row_id: int, kind: str) -> Path:
        return self.folder / batch_id(row_id) / f"{kind}.jsonl"

    def written_at(self, row_id: int) -> datetime | None:
        """When the batch's files were put in place, or None if they are not yet."""
        try:
            moment = (self.folder / batch_id(row_id)).stat().st_mtime
        except FileNotFoundError:
            return None
        return datetime.fromtimestamp(moment, UTC)

    def start(self, store: Store, row: BatchRow) -> threading.Thread | None:
        """Write the batch's files in a thread, unless they are being written already; the
        thread, to wait for if need be."""
        with self._lock:
            if row.id in self._writing:
                return None
            self._writing.add(row.id)
        thread = threading.Thread(
            target=self._write, args=(store, row), name=f"batchwise-output-{row.id}", daemon=True
        )
        thread.start()
        return thread

    def _write(self, store: Store, row: BatchRow) -> None:
        final = self.folder / batch_id(row.id)
        draft = self.folder / f".{batch_id(row.id)}-{uuid.uuid4().hex[:8]}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
            draft.mkdir(mode=_DIR_MODE)
            write(store, row, draft)
            # another gateway may have put them in place first: then theirs stand
            with contextlib.suppress(OSError):
                os.rename(draft, final)
        finally:
            shutil.rmtree(draft, ignore_errors=True)
            with self._lock:
                self._writing.discard(row.id)


def write(store: Store, row: BatchRow, folder: Path) -> None:
    """The batch's answered lines to `output.jsonl`, the others to `errors.jsonl` (0600)."""
    files = {
        kind: os.fdopen(
            os.open(folder / f"{kind}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE),
            "wb",
        )
        for kind in _KINDS
    }
    try:
        for line in submission_lines(store, row.submission_id, fmt="openai"):
            files["errors" if line["error"] is not None else "output"].write(
                orjson.dumps(line) + b"\n"
            )
    finally:
        for handle in files.values():
            handle.close()


def _lookup(gateway: Gateway, wanted: str) -> tuple[BatchRow, str] | None:
    base, _, kind = wanted.removeprefix("file-").rpartition("-")
    row_id = parse_batch_id(base)
    if kind not in _KINDS or row_id is None:
        return None
    row = rows.get_batch(gateway.store, row_id)
    if row is None or row.endpoint == MESSAGES_ENDPOINT:
        return None
    view = get_submission(gateway.store, row.submission_id)
    written = gateway.outputs.written_at(row.id) is not None
    if view is None or wanted not in output_ids(row, view, written=written):
        return None
    return row, kind


def output_file_path(gateway: Gateway, wanted: str) -> Path | None:
    """The file holding a batch's output or error file, or None if there is no such file."""
    found = _lookup(gateway, wanted)
    return None if found is None else gateway.outputs.path(found[0].id, found[1])


def output_file_object(gateway: Gateway, wanted: str) -> dict[str, Any] | None:
    """The file object of a batch's output or error file, or None."""
    found = _lookup(gateway, wanted)
    if found is None:
        return None
    row, kind = found
    path = gateway.outputs.path(row.id, kind)
    return {
        "id": wanted,
        "object": "file",
        "bytes": path.stat().st_size,
        "created_at": int(path.stat().st_mtime),
        "filename": f"{batch_id(row.id)}_{kind}.jsonl",
        "purpose": _KINDS[kind],
        "status": "processed",
        "status_details": None,
    }
