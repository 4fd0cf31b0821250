"""The Gemini API's Files: resumable uploads (start, then `upload` / `finalize` at the
session's `x-goog-upload-url`), and get, list and delete. A file's blob is on disk; its row
is in the state's `files` table, its purpose `gemini:<mime type>` (so OpenAI's Files API, on
the same table, never shows it). A batch's responses file is made from its lines when read
(see `api.GeminiApi`).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from batchwise.emulator.env import Env
from batchwise.emulator.http import ApiError, Request, Response, json_response
from batchwise.emulator.seeded import hex_id
from batchwise.emulator.state import FileRow

MAX_FILE_BYTES = 2 << 30
#: uploaded files (and responses files) are kept 48 hours
FILE_TTL_S = 48 * 3600.0


def rfc3339(moment: float) -> str:
    return datetime.fromtimestamp(moment, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class _Upload:
    """A resumable upload in progress."""

    file_id: str
    path: Path
    size: int | None
    mime_type: str
    display_name: str
    received: int = 0


class GeminiFiles:
    """Uploads and file objects; `batch_ended(batch_id)` says whether a responses file may be
    read yet."""

    def __init__(self, env: Env, batch_ended: Callable[[str], bool]) -> None:
        self._env = env
        self._batch_ended = batch_ended
        self._uploads: dict[str, _Upload] = {}
        self._lock = threading.Lock()

    def upload(self, req: Request) -> Response:
        """`POST upload/…/files`: start a session, or take its bytes (`upload`, `finalize`)."""
        upload_id = req.query.get("upload_id")
        if upload_id is None:
            return self._start_upload(req)
        with self._lock:
            upload = self._uploads.get(upload_id)
        if upload is None:
            raise ApiError(404, "No upload session with that upload_id.")
        command = {c.strip() for c in req.headers.get("x-goog-upload-command", "").split(",")}
        if "query" in command:
            return self._upload_status(upload, "active")
        if "upload" in command:
            offset = int(req.headers.get("x-goog-upload-offset") or upload.received)
            if offset != upload.received:
                raise ApiError(400, f"Upload offset {offset} != {upload.received} bytes received.")
            with upload.path.open("ab") as out:
                for chunk in req.body.chunks():
                    upload.received += len(chunk)
                    if upload.received > MAX_FILE_BYTES:
                        raise ApiError(400, "The file is larger than 2 GB.")
                    out.write(chunk)
        if "finalize" not in command:
            return self._upload_status(upload, "active")
        if upload.size is not None and upload.received != upload.size:
            raise ApiError(400, f"Received {upload.received} bytes, {upload.size} were announced.")
        now = self._env.now()
        row = FileRow(
            upload.file_id, 0, f"gemini:{upload.mime_type}", upload.display_name,
            upload.received, now, now + FILE_TTL_S, str(upload.path),
        )  # fmt: skip
        self._env.state.insert_file(row)
        with self._lock:
            self._uploads.pop(upload_id, None)
        response = json_response({"file": self.file_object(row, req.base_url)})
        response.headers.append(("x-goog-upload-status", "final"))
        return response

    def _start_upload(self, req: Request) -> Response:
        protocol = req.headers.get("x-goog-upload-protocol", "")
        if protocol != "resumable":
            raise ApiError(400, "Only the resumable upload protocol is emulated.")
        raw = req.read_bytes()
        meta = orjson.loads(raw) if raw.strip() else {}
        file = meta.get("file") if isinstance(meta, dict) else None
        file = file if isinstance(file, dict) else {}
        size_header = req.headers.get("x-goog-upload-header-content-length")
        file_id = hex_id(self._env.config.seed, "gemini-file", uuid.uuid4().hex, length=12)
        upload = _Upload(
            file_id=file_id,
            path=self._env.state.blob_dir / f"gemini-file-{file_id}",
            size=int(size_header) if size_header and size_header.isdigit() else None,
            mime_type=req.headers.get("x-goog-upload-header-content-type")
            or str(file.get("mimeType") or file.get("mime_type") or "application/octet-stream"),
            display_name=str(
                file.get("displayName")
                or file.get("display_name")  # the SDK sends its own field names here
                or req.headers.get("x-goog-upload-file-name")
                or file_id
            ),
        )
        upload.path.write_bytes(b"")
        upload_id = uuid.uuid4().hex
        with self._lock:
            self._uploads[upload_id] = upload
        response = self._upload_status(upload, "active")
        response.headers.append(
            (
                "x-goog-upload-url",
                f"{req.base_url}{req.path}?upload_id={upload_id}&upload_protocol=resumable",
            )
        )
        response.headers.append(("x-goog-upload-chunk-granularity", str(8 << 20)))
        return response

    @staticmethod
    def _upload_status(upload: _Upload, status: str) -> Response:
        response = json_response({})
        response.headers += [
            ("x-goog-upload-status", status),
            ("x-goog-upload-size-received", str(upload.received)),
        ]
        return response

    def file(self, file_id: str) -> FileRow:
        """A Gemini file; a batch's responses file only once its batch has ended."""
        file = self._env.state.get_file(file_id)
        if file is None or not file.purpose.startswith("gemini:"):
            raise ApiError(403, f"You do not have permission to access the File {file_id} "
                           "or it may not exist.")  # fmt: skip
        if file.batch_id is not None and not self._batch_ended(file.batch_id):
            raise ApiError(404, f"File files/{file_id} not found.")
        return file

    def file_object(self, file: FileRow, base_url: str) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "name": f"files/{file.id}",
            "displayName": file.filename,
            "mimeType": file.purpose.removeprefix("gemini:"),
            "sizeBytes": str(file.bytes or 0),
            "createTime": rfc3339(file.created_at),
            "updateTime": rfc3339(file.created_at),
            "uri": f"{base_url}/v1beta/files/{file.id}",
            "state": "ACTIVE",
            "source": "UPLOADED",
        }
        if file.expires_at is not None:
            obj["expirationTime"] = rfc3339(file.expires_at)
        if file.batch_id is not None:
            obj["source"] = "GENERATED"
            obj["downloadUri"] = f"{base_url}/download/v1beta/files/{file.id}:download?alt=media"
        return obj

    def get(self, req: Request, file_id: str) -> Response:
        return json_response(self.file_object(self.file(file_id), req.base_url))

    def list(self, req: Request) -> Response:
        files = [f for f in self._env.state.uploaded_files() if f.purpose.startswith("gemini:")]
        return json_response({"files": [self.file_object(f, req.base_url) for f in files]})

    def delete(self, req: Request, file_id: str) -> Response:
        self.file(file_id)
        self._env.state.delete_file(file_id)
        return json_response({})
