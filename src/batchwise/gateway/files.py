"""OpenAI's Files API: `POST /v1/files`, `GET /v1/files/{id}`, `GET /v1/files/{id}/content`,
`DELETE /v1/files/{id}`.

An upload (multipart, purpose `batch`, any file name) is written under the home folder,
readable by its owner only (0600), and recorded in the store (`store.gateway`). A batch's
output and error files (`file-batch_N-output`, `file-batch_N-errors`) are written beside them
once its lines have settled (`gateway.outputs`).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, Response

from batchwise.gateway.context import json_response, openai_error
from batchwise.gateway.outputs import output_file_object, output_file_path
from batchwise.store import gateway as rows
from batchwise.store.gateway import FileRow
from batchwise.store.keys import KeyView

if TYPE_CHECKING:
    from batchwise.gateway.context import Gateway

#: OpenAI's limit for one batch input file
MAX_FILE_BYTES = 200 * 1024 * 1024
_CHUNK_BYTES = 1024 * 1024
_PREFIX = "file-"


def file_id(row_id: int) -> str:
    return f"{_PREFIX}{row_id}"


def parse_file_id(text: str) -> int | None:
    """The row id of an uploaded file's id (`file-12`), or None."""
    if text.startswith(_PREFIX) and text[len(_PREFIX) :].isdigit():
        return int(text[len(_PREFIX) :])
    return None


def file_object(row: FileRow) -> dict[str, Any]:
    return {
        "id": file_id(row.id),
        "object": "file",
        "bytes": row.bytes,
        "created_at": int(row.created_at.timestamp()),
        "filename": row.filename,
        "purpose": row.purpose,
        "status": "processed",
        "status_details": None,
    }


def _not_found(what: str) -> Response:
    return openai_error(404, f"No such File object: {what}", code="not_found")


async def _save(upload: UploadFile, folder: Path) -> tuple[Path, int]:
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / f"{uuid.uuid4().hex}.jsonl"
    size = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := await upload.read(_CHUNK_BYTES):
                size += len(chunk)
                if size > MAX_FILE_BYTES:
                    raise ValueError(f"file is larger than {MAX_FILE_BYTES} bytes")
                out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, size


async def create_file(gateway: Gateway, request: Request, key: KeyView) -> Response:
    async with request.form(max_files=1, max_fields=10) as form:
        purpose = form.get("purpose")
        upload = form.get("file")
        if purpose != "batch":
            return openai_error(
                400, f"purpose must be 'batch' on this gateway, not {purpose!r}", code="purpose"
            )
        if not isinstance(upload, UploadFile):
            return openai_error(400, "a multipart 'file' field is required", code="file")
        try:
            path, size = await _save(upload, gateway.files_dir)
        except ValueError as exc:
            return openai_error(413, str(exc), code="file_too_large")
        row = await run_in_threadpool(
            rows.insert_file,
            gateway.store,
            filename=upload.filename or "upload.jsonl",
            purpose=purpose,
            size_bytes=size,
            path=str(path),
            key_name=key.name,
            at=gateway.clock(),
        )
    return json_response(file_object(row))


async def get_file(gateway: Gateway, request: Request, key: KeyView) -> Response:
    wanted = request.path_params["file_id"]
    row_id = parse_file_id(wanted)
    if row_id is None:
        found = await run_in_threadpool(output_file_object, gateway, wanted)
        return _not_found(wanted) if found is None else json_response(found)
    row = await run_in_threadpool(rows.get_file, gateway.store, row_id)
    return _not_found(wanted) if row is None else json_response(file_object(row))


async def file_content(gateway: Gateway, request: Request, key: KeyView) -> Response:
    wanted = request.path_params["file_id"]
    row_id = parse_file_id(wanted)
    if row_id is None:
        path = await run_in_threadpool(output_file_path, gateway, wanted)
        if path is None:
            return _not_found(wanted)
        return FileResponse(path, media_type="application/jsonl")
    row = await run_in_threadpool(rows.get_file, gateway.store, row_id)
    if row is None:
        return _not_found(wanted)
    return FileResponse(row.path, media_type="application/jsonl")


async def delete_file(gateway: Gateway, request: Request, key: KeyView) -> Response:
    wanted = request.path_params["file_id"]
    row_id = parse_file_id(wanted)
    row = None if row_id is None else await run_in_threadpool(rows.get_file, gateway.store, row_id)
    if row is None or row_id is None:
        return _not_found(wanted)
    await run_in_threadpool(rows.delete_file, gateway.store, row_id, at=gateway.clock())
    Path(row.path).unlink(missing_ok=True)
    return json_response({"id": wanted, "object": "file", "deleted": True})


ROUTES = [
    ("/v1/files", create_file, ["POST"]),
    ("/v1/files/{file_id}", get_file, ["GET"]),
    ("/v1/files/{file_id}", delete_file, ["DELETE"]),
    ("/v1/files/{file_id}/content", file_content, ["GET"]),
]
