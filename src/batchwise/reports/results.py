"""Exporting finished results as JSONL in the providers' own batch output formats, keyed by
the caller's `custom_id`, so code written for the provider's batch files keeps working.

Three line shapes, one output line per finished request:

- **openai**: an OpenAI batch output line `{"id", "custom_id", "response": {"status_code",
  "request_id", "body"}, "error"}`. A failure has `error` set (`{"code", "message"}`) and
  `response` null, or, for an HTTP-level failure, a non-200 `response` with the error body.
- **anthropic**: an Anthropic results line `{"custom_id", "result": {"type": "succeeded",
  "message"}}`, or `errored` (with the error), `canceled` or `expired`.
- **gemini**: a line of Gemini's batch responses file, `{"key", "response"}` with the
  GenerateContentResponse, or `{"key", "error": {"code", "message", "status"}}` (a
  `google.rpc.Status`: `code` is the gRPC code, `status` its name).
- **simple**: `{"custom_id", "request_id", "state", "model", "text", "body", "error"}`, for
  lines that came in simple (`{"model", "messages" | "prompt"}`).

A submission's lines come back in the shape they came in (`submission_lines`), or all in one
format: bodies are then translated for real (`reports.translate`).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import IO, TYPE_CHECKING, Any

import orjson

from batchwise.reports import translate
from batchwise.states import RequestState
from batchwise.store.views import ANSWERED_STATES

if TYPE_CHECKING:
    from batchwise.store.engine import Store

FORMATS = ("openai", "anthropic")
#: every shape a result line can take (the input formats)
SHAPES = ("openai", "anthropic", "gemini", "simple")
#: HTTP status → Google's canonical error status, for Gemini error lines
_GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
}  # fmt: skip
#: Google's status word → its gRPC code (a Gemini line's error is a `google.rpc.Status`)
_GRPC_CODES = {
    "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
    "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9, "INTERNAL": 13,
    "UNAVAILABLE": 14, "UNAUTHENTICATED": 16,
}  # fmt: skip
#: Anthropic's error types (`error.error.type` of an errored line)
ANTHROPIC_ERROR_TYPES = frozenset({
    "invalid_request_error", "authentication_error", "billing_error", "permission_error",
    "not_found_error", "conflict_error", "request_too_large", "rate_limit_error", "api_error",
    "timeout_error", "overloaded_error",
})  # fmt: skip
_EXPIRED_CODES = frozenset({"batch_expired", "expired"})
#: the error codes of a line that ran out of time (an Anthropic `expired` result), for the
#: gateway's Message Batch counts
EXPIRED_CODES = _EXPIRED_CODES


def export(
    store: Store, out: IO[bytes], *, fmt: str | None = None, provider: str | None = None
) -> int:
    """Write one line per finished request; returns the number of lines. `fmt` None writes
    each request in its own provider's format."""
    # imported here: `answer_text` users (the status table, job results) need no SQLAlchemy
    from batchwise.store.reports import finished_requests

    count = 0
    for row in finished_requests(store, provider):
        line = to_line(row, fmt or _own_format(row["provider"]))
        out.write(orjson.dumps(line))
        out.write(b"\n")
        count += 1
    return count


def submission_lines(
    store: Store, submission_id: int, *, fmt: str | None = None
) -> Iterator[dict[str, Any]]:
    """The finished lines of a submission in input order, each in the shape its line came in
    (requests stored before submissions: their provider's), or all in `fmt`."""
    from batchwise.store.submissions import result_rows

    if fmt is not None and fmt not in SHAPES:
        raise ValueError(f"unknown results format {fmt!r}: expected one of {', '.join(SHAPES)}")
    for row in result_rows(store, submission_id):
        yield to_line(row, fmt or row["input_format"] or _own_format(row["provider"]))


def export_submission(
    store: Store, submission_id: int, out: IO[bytes], *, fmt: str | None = None
) -> int:
    """Write a submission's finished lines as JSONL (see `submission_lines`); returns the count."""
    count = 0
    for line in submission_lines(store, submission_id, fmt=fmt):
        out.write(orjson.dumps(line))
        out.write(b"\n")
        count += 1
    return count


def _own_format(provider: str) -> str:
    """The results format of `provider`'s requests: its own, else OpenAI's (a provider added
    by configuration speaks OpenAI's API, the only one a `[providers.NAME]` table may name)."""
    return provider if provider in FORMATS else "openai"


def _created(row: dict[str, Any]) -> int:
    finished = row.get("finished_at")
    return int(finished.timestamp()) if isinstance(finished, datetime) else 0


def _failure(row: dict[str, Any]) -> tuple[str, str]:
    """(code, message) of a request that ended without an answer."""
    state = row["state"]
    if state == RequestState.CANCELLED.value:
        return "batch_cancelled", row["error"] or "cancelled by the user"
    return row["error_code"] or state, row["error"] or state


def to_line(row: dict[str, Any], fmt: str) -> dict[str, Any]:
    """One finished request as a result line of `fmt` ("openai", "anthropic" or "simple")."""
    answered = row["state"] in ANSWERED_STATES
    body = orjson.loads(row["body"]) if answered and row["body"] else None
    if fmt == "openai":
        return _openai_line(row, body)
    if fmt == "anthropic":
        return _anthropic_line(row, body)
    if fmt == "gemini":
        return _gemini_line(row, body)
    if fmt == "simple":
        code, message = _failure(row)
        return {
            "custom_id": row["custom_id"],
            "request_id": row["id"],
            "state": row["state"],
            "model": row.get("model"),
            "text": answer_text(body) if body is not None else None,
            "body": body,
            "error": None if body is not None else {"code": code, "message": message},
        }
    raise ValueError(f"unknown results format {fmt!r}: expected one of {', '.join(SHAPES)}")


def _openai_line(row: dict[str, Any], body: dict[str, Any] | None) -> dict[str, Any]:
    line_id = f"batch_req_{row['response_id'] or row['id']}"
    if body is not None:
        return {
            "id": line_id,
            "custom_id": row["custom_id"],
            "response": {
                "status_code": row["status_code"] or 200,
                "request_id": row["provider_request_id"],
                "body": translate.to_openai(body, created=_created(row)),
            },
            "error": None,
        }
    code, message = _failure(row)
    status = row["status_code"]
    response = None
    if isinstance(status, int) and status >= 400:
        # an HTTP-level failure: the provider's status and an error body, as OpenAI writes it
        error = {"message": message, "type": code, "param": None, "code": code}
        response = {
            "status_code": status,
            "request_id": row["provider_request_id"],
            "body": {"error": error},
        }
    return {
        "id": line_id,
        "custom_id": row["custom_id"],
        "response": response,
        "error": {"code": code, "message": message},
    }


def _gemini_line(row: dict[str, Any], body: dict[str, Any] | None) -> dict[str, Any]:
    """A Gemini responses-file line; a Gemini answer is given as it came (not translated)."""
    if body is not None:
        return {"key": row["custom_id"], "response": body}
    code, message = _failure(row)
    status = row["status_code"] if isinstance(row["status_code"], int) else None
    if row["state"] == RequestState.CANCELLED.value:
        word = "CANCELLED"
    elif code in _EXPIRED_CODES or code == "DEADLINE_EXCEEDED":
        word = "DEADLINE_EXCEEDED"
    elif code in _GOOGLE_STATUS.values():
        word = code
    else:
        word = _GOOGLE_STATUS.get(status or 0, "UNKNOWN")
        message = f"{code}: {message}" if code != message else message
    error = {"code": _GRPC_CODES.get(word, 2), "message": message, "status": word}
    return {"key": row["custom_id"], "error": error}


def _anthropic_line(row: dict[str, Any], body: dict[str, Any] | None) -> dict[str, Any]:
    custom_id = row["custom_id"]
    if body is not None:
        return {
            "custom_id": custom_id,
            "result": {"type": "succeeded", "message": translate.to_anthropic(body)},
        }
    if row["state"] == RequestState.CANCELLED.value:
        return {"custom_id": custom_id, "result": {"type": "canceled"}}
    code, message = _failure(row)
    if code in _EXPIRED_CODES:
        return {"custom_id": custom_id, "result": {"type": "expired"}}
    if code in ANTHROPIC_ERROR_TYPES:
        kind = code
    else:
        kind = "invalid_request_error" if row["status_code"] == 400 else "api_error"
        message = f"{code}: {message}" if code != message else message
    return {
        "custom_id": custom_id,
        "result": {
            "type": "errored",
            "error": {
                "type": "error",
                "error": {"type": kind, "message": message},
                "request_id": row["provider_request_id"],
            },
        },
    }


def answer_text(body: dict[str, Any]) -> str:
    """The text of a chat completion, completion, Responses API or Messages answer; for a
    moderation, whether it was flagged and for what."""
    choices = body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        first = choices[0]
        text = first.get("text")
        if "message" not in first and isinstance(text, str):
            return text  # a legacy completion (`text_completion`)
        return str((first.get("message") or {}).get("content") or "")
    verdicts = body.get("results")
    if isinstance(verdicts, list) and verdicts and isinstance(verdicts[0], dict):
        return "; ".join(_verdict(v) for v in verdicts if isinstance(v, dict))
    candidates = body.get("candidates")  # a Gemini GenerateContentResponse
    if isinstance(candidates, list):
        first = candidates[0] if candidates and isinstance(candidates[0], dict) else {}
        parts = (first.get("content") or {}).get("parts") or []
        return "".join(
            str(p.get("text", "")) for p in parts if isinstance(p, dict) and not p.get("thought")
        )
    content = body.get("content")
    if isinstance(content, list):
        return "".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
    output = body.get("output")
    if isinstance(output, list):
        return "".join(
            str(part.get("text", ""))
            for item in output
            if isinstance(item, dict)
            for part in item.get("content") or []
            if isinstance(part, dict)
        )
    return ""


def _verdict(result: dict[str, Any]) -> str:
    """One moderation result as text: `flagged: harassment, violence` or `not flagged`."""
    if not result.get("flagged"):
        return "not flagged"
    categories = result.get("categories")
    named = [str(k) for k, v in categories.items() if v] if isinstance(categories, dict) else []
    return "flagged" + (f": {', '.join(named)}" if named else "")
