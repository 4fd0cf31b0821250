"""OpenAI batch input: the create call's metadata and every line of the input file, checked
as the real Batch API does (a bad line fails the whole batch with `errors.data[].line`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from batchwise.emulator.batches import LineDraft
from batchwise.emulator.http import ApiError
from batchwise.emulator.models import resolve
from batchwise.emulator.openai.bodies import plan

MAX_LINES = 50_000
#: batch-level validation errors reported at most (the rest are not listed)
MAX_REPORTED_ERRORS = 100


class InputScan:
    """The result of reading an input file line by line."""

    def __init__(self) -> None:
        self.drafts: list[LineDraft] = []
        self.errors: list[dict[str, Any]] = []
        self.lines = 0
        self.model: str | None = None

    def fail(self, code: str, message: str, *, line: int | None, param: str | None = None) -> None:
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append({"code": code, "message": message, "param": param, "line": line})


def check_metadata(value: Any) -> dict[str, str] | None:
    """The `metadata` of a create call: at most 16 string pairs, keys ≤ 64, values ≤ 512."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or len(value) > 16:
        raise ApiError(
            400,
            "Invalid 'metadata': expected an object with at most 16 pairs.",
            param="metadata",
            code="invalid_value",
        )
    for key, item in value.items():
        if not isinstance(item, str) or len(key) > 64 or len(item) > 512:
            raise ApiError(
                400,
                f"Invalid 'metadata.{key}': keys are strings of at most 64 "
                "characters and values strings of at most 512.",
                param=f"metadata.{key}",
                code="invalid_value",
            )
    return dict(value)


def scan_input(path: Path, endpoint: str, models: frozenset[str] = frozenset()) -> InputScan:
    """Read a batch input file line by line: every line checked, valid ones planned (`models`:
    names answered beyond OpenAI's own)."""
    scan = InputScan()
    with path.open("rb") as fh:
        scan.lines = sum(1 for raw in fh if raw.strip())
    if scan.lines > MAX_LINES:
        scan.fail(
            "too_many_tasks",
            f"A batch may hold at most {MAX_LINES} requests; the input file has {scan.lines}.",
            line=None,
        )
        return scan
    seen: set[str] = set()
    blank: list[int] = []
    offset = 0
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            start, offset = offset, offset + len(raw)
            text = raw.strip()
            if not text:
                blank.append(line_no)
                continue
            for b in blank:
                scan.fail("invalid_json_line", "This line is not parseable as valid JSON.", line=b)
            blank.clear()
            _scan_line(scan, seen, text, line_no, start, len(raw), endpoint, models)
    if scan.lines == 0:
        scan.fail("empty_file", "The input file is empty.", line=None)
    elif not scan.errors and scan.model and resolve("openai", scan.model, models) is None:
        scan.fail(
            "model_not_found",
            f"The provided model '{scan.model}' is not supported by the Batch API.",
            line=None,
            param="body.model",
        )
    return scan


def _scan_line(
    scan: InputScan,
    seen: set[str],
    text: bytes,
    line_no: int,
    offset: int,
    length: int,
    endpoint: str,
    models: frozenset[str],
) -> None:
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        scan.fail("invalid_json_line", "This line is not parseable as valid JSON.", line=line_no)
        return
    custom_id = obj.get("custom_id")
    body = obj.get("body")
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(custom_id, str) or not custom_id:
        scan.fail(
            "missing_required_parameter",
            "Missing required parameter: 'custom_id'.",
            line=line_no,
            param="custom_id",
        )
    elif custom_id in seen:
        scan.fail(
            "duplicate_custom_id",
            "The custom_id for this request is a duplicate of "
            "another request. The custom_id parameter must be unique for each request "
            "in a batch.",
            line=line_no,
            param="custom_id",
        )
    elif obj.get("method") != "POST":
        scan.fail(
            "invalid_method",
            f"The 'method' must be 'POST', got {obj.get('method')!r}.",
            line=line_no,
            param="method",
        )
    elif obj.get("url") != endpoint:
        scan.fail(
            "url_mismatch",
            f"The provided 'url' {obj.get('url')!r} does not match the "
            f"batch endpoint '{endpoint}'.",
            line=line_no,
            param="url",
        )
    elif not isinstance(body, dict):
        scan.fail(
            "missing_required_parameter",
            "Missing required parameter: 'body'.",
            line=line_no,
            param="body",
        )
    elif isinstance(model, str) and scan.model is not None and model != scan.model:
        scan.fail(
            "model_mismatch",
            f"This line uses model '{model}' but earlier lines use "
            f"'{scan.model}'; a batch may only use one model.",
            line=line_no,
            param="body.model",
        )
    else:
        seen.add(custom_id)
        if isinstance(model, str) and scan.model is None:
            scan.model = model
        if scan.errors:
            return  # the batch fails anyway: keep scanning for errors, skip the work
        try:
            p = plan(endpoint, body, models)
        except ApiError as exc:
            draft = LineDraft(line_no, custom_id, offset, length, exc)
        else:
            draft = LineDraft(
                line_no,
                custom_id,
                offset,
                length,
                None,
                # only a prompt with cacheable prefixes is read again (by the cache, when
                # the batch settles): a batch's other prompts need not stay in memory
                p.prompt if p.prompt.keys else None,
                p.input_tokens,
                p.output_tokens,
                p.reasoning_tokens,
            )
        scan.drafts.append(draft)
