"""One table of provider error codes → kind, for every provider: final or transient.

A *final* error is the request's (or the account's) own fault: sending it again gets the same
answer, so it fails at once with the provider's message. A *transient* error is the provider's
moment (a rate limit, an outage, a timeout, a page from a proxy): it is tried again later.

The code is looked up first (OpenAI's `error.code`, Anthropic's `error.type`, the code of a
non-HTTP batch line), then the type (OpenAI's `error.type`, Gemini's `error.status`), then the
HTTP status. Pure: no
HTTP, no store. Sources: `/work/shared/reference/provider-apis.md` §1.7, 1.9, 2.4, 2.6.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["BATCH_FINAL_CODES", "CODES", "ErrorKind", "batch_error_is_final", "kind_of"]


class ErrorKind(StrEnum):
    """Whether an error may go away by itself."""

    #: the request, its model or the account is wrong: never resubmit
    FINAL = "final"
    #: the provider could not answer now: try again later
    TRANSIENT = "transient"


_F, _T = ErrorKind.FINAL, ErrorKind.TRANSIENT

#: provider error codes and types → kind (OpenAI codes and types, Anthropic types)
CODES: dict[str, ErrorKind] = {
    # OpenAI error.code (§1.7, §1.9)
    "invalid_request": _F,
    "invalid_api_key": _F,
    "model_not_found": _F,
    "model_not_supported": _F,
    "insufficient_quota": _F,
    "context_length_exceeded": _F,
    "invalid_value": _F,
    "missing_required_parameter": _F,
    "invalid_prompt": _F,
    "rate_limit_exceeded": _T,
    "server_error": _T,
    "request_timeout": _T,
    "token_limit_exceeded": _T,
    "timeout": _T,
    "resource_unavailable": _T,
    # OpenAI error.type
    "invalid_request_error": _F,
    "authentication_error": _F,
    "permission_error": _F,
    "not_found_error": _F,
    "requests": _T,
    "tokens": _T,
    # Anthropic error.type (§2.4, §2.6)
    "billing_error": _F,
    "request_too_large": _F,
    "rate_limit_error": _T,
    "api_error": _T,
    "timeout_error": _T,
    "overloaded_error": _T,
    "conflict_error": _T,
    # Gemini (Google's canonical error statuses, `error.status`)
    "INVALID_ARGUMENT": _F,
    "FAILED_PRECONDITION": _F,
    "OUT_OF_RANGE": _F,
    "UNAUTHENTICATED": _F,
    "PERMISSION_DENIED": _F,
    "NOT_FOUND": _F,
    "ALREADY_EXISTS": _F,
    "UNIMPLEMENTED": _F,
    "RESOURCE_EXHAUSTED": _T,
    "UNAVAILABLE": _T,
    "INTERNAL": _T,
    "DEADLINE_EXCEEDED": _T,
    "ABORTED": _T,
    "CANCELLED": _T,
    "UNKNOWN": _T,
}

#: codes of a batch that failed as a whole that doom every request in it (not one bad line):
#: the model does not exist, or the key or the account is refused. Sending the same batch again
#: gets the same answer, so its requests fail at once with the provider's message.
BATCH_FINAL_CODES = frozenset(
    {
        "model_not_found",
        "model_not_supported",
        "invalid_api_key",
        "authentication_error",
        "permission_error",
        "insufficient_quota",
        "billing_error",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
    }
)

#: statuses that are the request's fault; everything else at or above 500, 408, 409, 429 waits
_FINAL_STATUSES = frozenset({400, 401, 402, 403, 404, 413, 422})
_TRANSIENT_STATUSES = frozenset({408, 409, 429})


def kind_of(
    status_code: int | None,
    code: str | None = None,
    type_: str | None = None,
    *,
    unknown: ErrorKind = ErrorKind.FINAL,
) -> ErrorKind:
    """The kind of an error, by code, then type, then status; without any of them, `unknown`
    (OpenAI's non-HTTP line codes are final unless listed; Anthropic retries unknown types).

    A status in the 2xx range with an error means the body was garbage (an HTML page from a
    captive portal, say): transient.
    """
    for key in (code, type_):
        if key and key in CODES:
            return CODES[key]
    if status_code is None:
        return unknown
    if status_code in _TRANSIENT_STATUSES or status_code >= 500 or 200 <= status_code < 300:
        return _T
    if status_code in _FINAL_STATUSES:
        return _F
    return _F if 400 <= status_code < 500 else _T


def batch_error_is_final(code: str | None) -> bool:
    """Whether a batch that failed whole with `code` will fail again for every member."""
    return code in BATCH_FINAL_CODES
