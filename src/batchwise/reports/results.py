"""Exporting finished results as JSONL in each provider's own batch output format, keyed by the
caller's `custom_id`, so code written for the provider's batch files keeps working."""

from __future__ import annotations

from typing import IO, TYPE_CHECKING, Any

import orjson

from batchwise.states import RequestState

if TYPE_CHECKING:
    from batchwise.store.engine import Store

FORMATS = ("openai", "anthropic")


def export(
    store: Store, out: IO[bytes], *, fmt: str | None = None, provider: str | None = None
) -> int:
    """Write one line per finished request; returns the number of lines. `fmt` None writes
    each request in its own provider's format."""
    # imported here: `answer_text` users (the status table, job results) need no SQLAlchemy
    from batchwise.store.reports import finished_requests

    count = 0
    for row in finished_requests(store, provider):
        line = to_line(row, fmt or row["provider"])
        out.write(orjson.dumps(line))
        out.write(b"\n")
        count += 1
    return count


def to_line(row: dict[str, Any], fmt: str) -> dict[str, Any]:
    """One request as a result line of `fmt` ("openai" or "anthropic")."""
    answered = row["state"] in (RequestState.SUCCEEDED.value, RequestState.DEDUPLICATED.value)
    body = orjson.loads(row["body"]) if answered and row["body"] else None
    code = row["error_code"] or row["state"]
    message = row["error"] or row["state"]
    if fmt == "openai":
        line_id = f"batch_req_{row['response_id'] or row['id']}"
        if body is not None:
            return {
                "id": line_id,
                "custom_id": row["custom_id"],
                "error": None,
                "response": {
                    "status_code": row["status_code"] or 200,
                    "request_id": row["provider_request_id"],
                    "body": body,
                },
            }
        return {
            "id": line_id,
            "custom_id": row["custom_id"],
            "response": None,
            "error": {"code": code, "message": message},
        }
    if fmt == "anthropic":
        if body is not None:
            return {"custom_id": row["custom_id"], "result": {"type": "succeeded", "message": body}}
        if row["state"] == RequestState.CANCELLED.value:
            return {"custom_id": row["custom_id"], "result": {"type": "canceled"}}
        return {
            "custom_id": row["custom_id"],
            "result": {
                "type": "errored",
                "error": {"type": "error", "error": {"type": code, "message": message}},
            },
        }
    raise ValueError(f"unknown results format {fmt!r}: expected one of {', '.join(FORMATS)}")


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
