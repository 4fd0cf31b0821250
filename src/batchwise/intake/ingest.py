"""Intake: validate submitted lines, give each a deadline and a lane, store them in bulk.

Four line shapes are accepted, each optionally carrying `tolerance`, `provider` and `tags`:
OpenAI batch lines `{custom_id, method, url, body}` (every text endpoint of the Batch API:
chat completions, responses, embeddings, completions, moderations), Anthropic batch lines
`{custom_id, params}`, Gemini request lines `{key, request, model}` (`intake/gemini.py`), and
simple lines `{model, messages | prompt | input, max_tokens?, ...}` whose other keys are passed
through as body parameters (translated for a Gemini model).

This is the hot path of `batchwise submit`: lines are streamed, validated and inserted in
chunks inside one transaction, so a file with a bad line is refused whole (nothing stored)
and memory stays flat however long the file is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any

import orjson

from batchwise.config import Settings
from batchwise.costs.guards import UNKEYED
from batchwise.errors import IntakeError, LineError, ToleranceError
from batchwise.intake import gemini
from batchwise.intake.classify import Turnaround, classify, expected_turnaround
from batchwise.intake.lines import Invalid, infer_provider
from batchwise.intake.tolerance import parse_tolerance
from batchwise.states import Lane, RequestState
from batchwise.store.intake_rows import ROW, RequestSink

if TYPE_CHECKING:
    from batchwise.costs.guards import Guards
    from batchwise.intake.guarding import Keeper, Outcome

#: the longest custom_id a line may carry. Providers are sent batchwise's own ids (see
#: `lifecycle.packer.line_custom_id`), so the caller's id only has to be unique within its
#: submission: any non-empty string up to this length (`doc.00042:chunk-1` included).
CUSTOM_ID_MAX = 512


def custom_id_ok(custom_id: object) -> bool:
    """Whether a line's custom_id is acceptable: a non-empty string of at most 512 characters."""
    return type(custom_id) is str and 0 < len(custom_id) <= CUSTOM_ID_MAX


CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
EMBEDDINGS = "/v1/embeddings"
COMPLETIONS = "/v1/completions"
MODERATIONS = "/v1/moderations"
MESSAGES = "/v1/messages"
#: endpoints each provider serves (batch and realtime), as URL paths
ENDPOINTS: dict[str, frozenset[str]] = {
    "openai": frozenset({CHAT, RESPONSES, EMBEDDINGS, COMPLETIONS, MODERATIONS}),
    "anthropic": frozenset({MESSAGES}),
    "gemini": frozenset({gemini.GENERATE}),
}
#: models served by the legacy completions endpoint (a simple line's `prompt` stays a prompt)
_COMPLETION_MODELS = ("davinci-", "babbage-", "gpt-3.5-turbo-instruct")
#: models served by the moderations endpoint (a simple line's `input` is judged, not embedded)
_MODERATION_MODELS = ("omni-moderation-", "text-moderation-")


def completions_model(model: str) -> bool:
    """Whether `model` is a legacy completions model (`gpt-3.5-turbo-instruct`, `davinci-002`)."""
    return model.startswith(_COMPLETION_MODELS)


def moderation_model(model: str) -> bool:
    """Whether `model` is a moderation model (`omni-moderation-latest`, `text-moderation-007`)."""
    return model.startswith(_MODERATION_MODELS)


NAMED_TAGS = ("use_case", "step", "business_unit", "task_id")
_NAMED_TAG_SET = frozenset(NAMED_TAGS)
#: Anthropic requires max_tokens; simple lines that omit it get this
DEFAULT_ANTHROPIC_MAX_TOKENS = 1024
CHUNK_ROWS = 2000
#: a sink that stores a chunk while the next is read (PostgreSQL: `defers_inserts`) takes
#: bigger ones: each chunk costs it a few round trips and a wait for the server, which 5,000
#: rows amortise (100,000 agentic lines 0.18 s sooner); SQLite, storing at once, is fastest
#: and smallest at 2,000
DEFERRED_CHUNK_ROWS = 5000

_LINE_KEYS = frozenset({"tolerance", "provider", "tags"})
_OPENAI_KEYS = frozenset({"custom_id", "method", "url", "body"}) | _LINE_KEYS
_ANTHROPIC_KEYS = frozenset({"custom_id", "params"}) | _LINE_KEYS
_GEMINI_KEYS = gemini.LINE_KEYS | _LINE_KEYS
_SIMPLE_META = frozenset({"custom_id", "provider", "tolerance", "tags", "endpoint", "prompt"})
_SORT = orjson.OPT_SORT_KEYS
#: what `classify` is given for a realtime request, which it does not read
_UNUSED = Turnaround(0.0, "not used: a realtime request")

_ID, _CUSTOM_ID, _LANE = ROW["id"], ROW["custom_id"], ROW["lane"]


@dataclass(frozen=True)
class Defaults:
    """Command-level defaults; a line's own `tolerance`, `provider` and `tags` override them."""

    tolerance: str = "24h"
    provider: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    #: the cron job run these requests belong to
    job_run_id: int | None = None
    #: where the lines come from, recorded on the submission: a file path, "-" (stdin),
    #: "prompt", "api" or "job:NAME"
    source: str = "api"
    #: the submission's optional name
    name: str | None = None


@dataclass
class SubmitResult:
    accepted: int = 0
    realtime: int = 0
    deferred: int = 0
    rejected: list[LineError] = field(default_factory=list)
    #: ids of stored requests, in input order (only collected when asked for)
    ids: list[int] | None = None
    lanes: list[str] | None = None
    #: ids of the requests stored for the realtime lane, for handing to workers at once
    realtime_ids: list[int] = field(default_factory=list)
    #: stored lines a cost guard refused (kept as rejected requests, with the reason)
    refused: list[LineError] = field(default_factory=list)
    #: requests answered from an identical stored answer at intake
    deduplicated: int = 0
    #: request id -> state, for requests a guard finished at intake
    states: dict[int, str] = field(default_factory=dict)
    #: the submission these lines were stored as (`store.submissions`)
    submission_id: int | None = None
    #: openai | anthropic | simple | mixed, or None when nothing was stored
    format: str | None = None
    #: what the user should know though nothing failed: one per model that cannot be priced
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "submission": self.submission_id,
            "accepted": self.accepted,
            "realtime": self.realtime,
            "deferred": self.deferred,
            "deduplicated": self.deduplicated,
            "warnings": list(self.warnings),
            "refused": [{"line": e.line, "error": e.error} for e in self.refused],
            "rejected": [
                {"line": e.line, "error": e.error, **({"field": e.field} if e.field else {})}
                for e in self.rejected
            ],
        }


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise Invalid(f"expected a non-empty string, got {_describe(value)}", name)
    return value


def _json_error(exc: orjson.JSONDecodeError) -> str:
    """orjson's message without its "line 1" (each input line is one JSON document)."""
    return f"{exc.msg} at column {exc.colno}"


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, str):
        return "an empty string" if not value else f"string {value[:40]!r}"
    try:
        shown = orjson.dumps(value)[:40].decode(errors="replace")
    except TypeError:
        shown = repr(value)[:40]
    return f"{type(value).__name__} {shown}"


_OPENAI_CAPS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
_OPENAI_ENDPOINTS = ENDPOINTS["openai"]
#: the largest output cap accepted: every documented model's cap fits in 32 bits many times
#: over, and a larger number is a typo that would fail only at the provider, hours later
MAX_TOKENS_CAP = 2**31 - 1
#: numeric body fields and the ranges the providers document for them: (field, whole number
#: only, lowest, highest); None (JSON null, "use the default") is accepted. Fields not listed
#: are passed through unchecked: when a range is not documented, the provider decides.
NUMERIC_RANGES: dict[str, tuple[tuple[str, bool, float, float | None], ...]] = {
    "openai": (
        ("temperature", False, 0, 2),
        ("top_p", False, 0, 1),
        ("presence_penalty", False, -2, 2),
        ("frequency_penalty", False, -2, 2),
        ("n", True, 1, 128),
        ("top_logprobs", True, 0, 20),
        ("dimensions", True, 1, None),
    ),
    "anthropic": (
        ("temperature", False, 0, 1),
        ("top_p", False, 0, 1),
        ("top_k", True, 0, None),
    ),
    "gemini": (),  # checked by `intake.gemini.check_body`
}
_RANGED = {p: frozenset(f for f, *_ in checks) for p, checks in NUMERIC_RANGES.items()}


def _check_ranges(provider: str, body: dict[str, Any], prefix: str) -> None:
    """Each numeric field present in `body` is a number of the right kind within its range."""
    for key, whole, low, high in NUMERIC_RANGES[provider]:
        value = body.get(key)
        if value is None:
            continue
        kind = type(value)
        if not (kind is int or (kind is float and not whole)) or not (
            low <= value and (high is None or value <= high)
        ):
            what = "an integer" if whole else "a number"
            span = f"≥ {low}" if high is None else f"from {low} to {high}"
            raise Invalid(f"expected {what} {span}, got {_describe(value)}", f"{prefix}.{key}")


def _check_body(provider: str, endpoint: str, body: Any, prefix: str) -> str:
    """Validate the request body for its endpoint; return the model. (Hot path: exact type
    checks, since decoded JSON holds exact dicts, lists and ints.)"""
    if type(body) is not dict:
        raise Invalid(f"expected a JSON object, got {_describe(body)}", prefix)
    model = body.get("model")
    if type(model) is not str or not model:
        raise Invalid(
            f"expected the model name as a non-empty string, got {_describe(model)}",
            f"{prefix}.model",
        )
    if body.get("stream"):
        raise Invalid(
            "streaming responses cannot be batched; remove stream or set it to false",
            f"{prefix}.stream",
        )
    if endpoint in (CHAT, MESSAGES):
        messages = body.get("messages")
        if type(messages) is not list or not messages:
            raise Invalid(
                f"expected a non-empty list of messages, got {_describe(messages)}",
                f"{prefix}.messages",
            )
    elif endpoint == COMPLETIONS:
        prompt = body.get("prompt")
        if not (type(prompt) is str or type(prompt) is list) or not prompt:
            raise Invalid(
                "expected the prompt as a non-empty string or list (of strings or of token "
                f"ids), got {_describe(prompt)}",
                f"{prefix}.prompt",
            )
    elif "input" not in body:
        raise Invalid(f"{endpoint} needs an 'input'", f"{prefix}.input")
    if provider == "anthropic":
        cap = body.get("max_tokens")
        if type(cap) is not int or not 1 <= cap <= MAX_TOKENS_CAP:
            raise Invalid(
                f"expected an integer ≥ 1 and ≤ {MAX_TOKENS_CAP}, got {_describe(cap)}",
                f"{prefix}.max_tokens",
            )
    else:
        for key in _OPENAI_CAPS:
            if key in body:
                cap = body[key]
                if type(cap) is not int or not 1 <= cap <= MAX_TOKENS_CAP:
                    raise Invalid(
                        f"expected an integer ≥ 1 and ≤ {MAX_TOKENS_CAP}, got {_describe(cap)}",
                        f"{prefix}.{key}",
                    )
    if not _RANGED[provider].isdisjoint(body):
        _check_ranges(provider, body, prefix)
    return model


#: no providers added by configuration: `parse_line`'s default
_NO_CONFIGURED: Mapping[str, str] = {}


def _check_provider(
    given: Any, shape: str | None, model: str, apis: Mapping[str, str] = _NO_CONFIGURED
) -> str:
    """The line's provider: as given (a built-in one, or one of `apis`, the providers added
    by configuration and the API each speaks), else the line's shape's, else the model's."""
    if given is not None:
        provider = _text(given, "provider")
        api = provider if provider in ENDPOINTS else apis.get(provider)
        if api is None:
            configured = (
                f"; configured: {', '.join(sorted(apis))}"
                if apis
                else "; none configured (a [providers.NAME] table in the settings file adds one)"
            )
            raise Invalid(
                f"unknown provider {provider!r}: expected one of {', '.join(ENDPOINTS)} "
                f"(built in){configured}",
                "provider",
            )
        if shape is not None and api != shape:
            speaks = "" if api == provider else f" (which speaks the {api} API)"
            raise Invalid(
                f"this is a {shape}-format line but the provider is {provider!r}{speaks} "
                "(from the line or --provider)",
                "provider",
            )
        return provider
    if shape is not None:
        return shape
    inferred = infer_provider(model)
    if inferred is None:
        raise Invalid(
            f'cannot tell the provider of model {model!r}: add "provider": "openai", '
            '"anthropic" or "gemini" (or a configured provider) to the line, or pass --provider',
            "provider",
        )
    return inferred


def _unexpected(obj: dict[str, Any], allowed: frozenset[str], shape: str) -> Invalid:
    extra = sorted(k for k in obj if k not in allowed)
    return Invalid(
        f"unexpected field in {shape} (expected only {', '.join(sorted(allowed))})", extra[0]
    )


def parse_line(
    obj: Any, default_provider: str | None, apis: Mapping[str, str] = _NO_CONFIGURED
) -> tuple[Any, str, str, str, Any, str]:
    """Validate one decoded line; return (custom_id, provider, endpoint, model, body, format),
    the format being the line's shape: openai, anthropic or simple. `apis`: the providers
    added by configuration, with the API each speaks (an OpenAI batch line may name one)."""
    if type(obj) is not dict:
        raise Invalid(f"expected a JSON object, got {_describe(obj)}")
    if "body" in obj or "url" in obj:
        if not _OPENAI_KEYS.issuperset(obj):
            raise _unexpected(obj, _OPENAI_KEYS, "an OpenAI batch line")
        method = obj.get("method")
        if method is not None and method != "POST":
            raise Invalid(f'expected "POST", got {_describe(method)}', "method")
        endpoint = obj.get("url")
        if type(endpoint) is not str or endpoint not in _OPENAI_ENDPOINTS:
            raise Invalid(
                f"unknown endpoint {_describe(endpoint)}: "
                f"expected one of {sorted(_OPENAI_ENDPOINTS)}",
                "url",
            )
        body = obj.get("body")
        model = _check_body("openai", endpoint, body, "body")
        given = obj.get("provider", default_provider)
        provider = (
            "openai"
            if given is None or given == "openai"
            else _check_provider(given, "openai", model, apis)
        )
        return obj.get("custom_id"), provider, endpoint, model, body, "openai"
    if "params" in obj:
        if not _ANTHROPIC_KEYS.issuperset(obj):
            raise _unexpected(obj, _ANTHROPIC_KEYS, "an Anthropic batch line")
        body = obj.get("params")
        model = _check_body("anthropic", MESSAGES, body, "params")
        provider = _check_provider(obj.get("provider", default_provider), "anthropic", model, apis)
        return obj.get("custom_id"), provider, MESSAGES, model, body, "anthropic"
    if "request" in obj:
        if not _GEMINI_KEYS.issuperset(obj):
            raise _unexpected(obj, _GEMINI_KEYS, "a Gemini request line")
        custom_id, model, body = gemini.parse_request_line(obj)
        provider = _check_provider(obj.get("provider", default_provider), "gemini", model, apis)
        return custom_id, provider, gemini.GENERATE, model, body, "gemini"
    return _parse_simple(obj, default_provider, apis)


def _parse_simple(
    obj: dict[str, Any], default_provider: str | None, apis: Mapping[str, str]
) -> tuple[str | None, str, str, str, dict[str, Any], str]:
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        raise Invalid(
            f"expected the model name as a non-empty string, got {_describe(model)} (a line is an "
            "OpenAI batch line {custom_id, method, url, body}, an Anthropic batch line "
            "{custom_id, params}, or a simple line {model, messages | prompt | input, ...})",
            "model",
        )
    provider = _check_provider(obj.get("provider", default_provider), None, model, apis)
    # a configured provider's lines are read as the API it speaks
    api = apis.get(provider, provider) if apis else provider
    if api == "gemini":
        endpoint = obj.get("endpoint")
        if endpoint is not None and endpoint != gemini.GENERATE:
            raise Invalid(
                f"unknown endpoint {endpoint!r} for gemini: expected {gemini.GENERATE!r}",
                "endpoint",
            )
        body = gemini.simple(obj, model, _SIMPLE_META)
        name = gemini.model_name(model)
        return obj.get("custom_id"), provider, gemini.GENERATE, name, body, "simple"
    body = {k: v for k, v in obj.items() if k not in _SIMPLE_META}
    endpoint = obj.get("endpoint")
    if endpoint is not None and (not isinstance(endpoint, str) or endpoint not in ENDPOINTS[api]):
        raise Invalid(
            f"unknown endpoint {endpoint!r} for {provider}: "
            f"expected one of {sorted(ENDPOINTS[api])}",
            "endpoint",
        )
    if "prompt" in obj:
        if "messages" in obj:
            raise Invalid("give either prompt or messages, not both", "prompt")
        if endpoint == COMPLETIONS or (
            endpoint is None and api == "openai" and completions_model(model)
        ):
            # a completions model takes the prompt as it is (a string or a list of them)
            body["prompt"] = obj["prompt"]
            endpoint = COMPLETIONS
        else:
            body["messages"] = [{"role": "user", "content": _text(obj["prompt"], "prompt")}]
    if endpoint is None:
        if api == "anthropic":
            endpoint = MESSAGES
        elif "messages" in body:
            endpoint = CHAT
        elif "input" in body:
            if model.startswith("text-embedding"):
                endpoint = EMBEDDINGS
            elif moderation_model(model):
                endpoint = MODERATIONS
            else:
                endpoint = RESPONSES
        else:
            raise Invalid("expected messages, prompt or input", "messages")
    if api == "anthropic" and "max_tokens" not in body:
        body["max_tokens"] = DEFAULT_ANTHROPIC_MAX_TOKENS
    _check_body(api, endpoint, body, "body")
    return obj.get("custom_id"), provider, endpoint, model, body, "simple"


def split_tags(tags: Mapping[str, Any], field_name: str = "tags") -> tuple[str | None, ...]:
    """Named tags (use_case, step, business_unit, task_id), then the rest as canonical JSON."""
    named: list[str | None] = [None, None, None, None]
    free: dict[str, str] = {}
    for key, value in tags.items():
        if not isinstance(key, str) or not key:
            raise Invalid("tag names must be non-empty strings", field_name)
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise Invalid(f"expected a string value, got {_describe(value)}", f"{field_name}.{key}")
        text = str(value)
        if key in NAMED_TAGS:
            named[NAMED_TAGS.index(key)] = text
        else:
            free[key] = text
    return (*named, orjson.dumps(free, option=_SORT).decode())


class Intake:
    """One submission in progress: validates lines and writes them to a sink in chunks."""

    def __init__(
        self,
        sink: RequestSink,
        *,
        settings: Settings,
        now: datetime,
        zone: tzinfo,
        defaults: Defaults = Defaults(),
        skip_invalid: bool = False,
        collect_ids: bool = False,
        guards: Guards | None = None,
    ) -> None:
        self.sink = sink
        self.settings = settings
        self.now = now
        self.zone = zone
        self.defaults = defaults
        self.skip_invalid = skip_invalid
        self.result = SubmitResult(
            ids=[] if collect_ids else None, lanes=[] if collect_ids else None
        )
        self._now_value = sink.time_value(now)
        self._default_provider = defaults.provider
        #: providers added by configuration, and the API each speaks
        self._apis = {name: p.api for name, p in settings.configured_providers.items()}
        self._default_tolerance = defaults.tolerance
        self.submission_id = sink.open_submission(
            name=defaults.name, source=defaults.source, job_run_id=defaults.job_run_id, at=now
        )
        self.result.submission_id = self.submission_id
        #: the row's last columns, the same for every line: created_at, updated_at, job_run_id,
        #: submission_id
        self._tail = (self._now_value, self._now_value, defaults.job_run_id, self.submission_id)
        #: the shapes the lines came in (openai, anthropic, simple)
        self._formats: set[str] = set()
        self._last_id: int | None = None
        self._chunk_rows = DEFERRED_CHUNK_ROWS if sink.defers_inserts else CHUNK_ROWS
        self._id_block = 256
        self._default_tags = split_tags(defaults.tags, "--tag")
        self._lanes: dict[tuple[str, str, str], tuple[Any, ...]] = {}
        self._turnarounds: dict[tuple[str, str], Turnaround] = {}
        #: every (provider, model) the lines name, for the price warnings
        self._models: set[tuple[str, str]] = set()
        self._chunk: list[tuple[Any, ...]] = []
        self._lines: list[int] = []
        self._ids: Iterator[int] = iter(())
        self._first_id: int | None = None
        #: the chunk being stored: rows, line numbers, the guards' outcomes for it, and the
        #: call that waits for the insert and returns the refused positions
        self._pending: (
            tuple[
                list[tuple[Any, ...]],
                list[int],
                dict[int, Outcome] | None,
                Callable[[], Sequence[int]],
            ]
            | None
        ) = None
        self.keeper: Keeper | None = None
        if guards is not None:
            from batchwise.intake.guarding import Keeper

            self.keeper = Keeper(guards, sink, now, settings)

    def _classify(self, tolerance: str, provider: str, model: str) -> tuple[Any, ...]:
        """Deadline, lane, reason, state and attempts for a (tolerance, provider, model),
        worked out once per submission: a file holds few distinct tolerances."""
        try:
            parsed = parse_tolerance(tolerance, now=self.now, zone=self.zone)
        except ToleranceError as exc:
            raise Invalid(str(exc), "tolerance") from None
        self._models.add((provider, model))
        turnaround = self._turnarounds.get((provider, model))
        if parsed.realtime:
            # called now whatever a batch would take: no batch history read for it (a query
            # on every gateway call)
            turnaround = _UNUSED
        elif turnaround is None:
            history = self.sink.turnarounds(provider, model)
            turnaround = expected_turnaround(provider, self.settings, history)
            self._turnarounds[(provider, model)] = turnaround
        decision = classify(
            parsed,
            now=self.now,
            turnaround=turnaround,
            settings=self.settings,
            provider=provider,
            model=model,
        )
        deferred = decision.lane is Lane.DEFERRED
        state = RequestState.QUEUED if deferred else RequestState.DISPATCHING
        deadline = parsed.deadline
        if parsed.realtime:
            deadline += timedelta(seconds=self.settings.realtime_deadline_s)
        hit = (self.sink.time_value(deadline), decision.lane.value, decision.reason, state.value, 0)
        self._lanes[(tolerance, provider, model)] = hit
        return hit

    def add(self, lineno: int, raw: bytes | str | Mapping[str, Any]) -> None:
        """Validate one line and queue it for insertion; an invalid line is recorded."""
        self.consume(((lineno, raw),))

    def consume(
        self,
        numbered: Iterable[tuple[int, bytes | str | Mapping[str, Any]]],
        on_line: Callable[[int], None] | None = None,
    ) -> None:
        """Validate numbered lines and queue them for insertion; blank lines are skipped.

        The hot path of intake, so it keeps what it uses per line in local variables.
        """
        loads, dumps, sha256, from_bytes = (
            orjson.loads,
            orjson.dumps,
            hashlib.sha256,
            int.from_bytes,
        )
        lanes, chunk, line_numbers = self._lanes, self._chunk, self._lines
        rejected = self.result.rejected
        default_provider, default_tolerance = self._default_provider, self._default_tolerance
        apis = self._apis
        default_tags, tail = self._default_tags, self._tail
        # Tags made only of named string tags, with no --tag defaults to merge, skip split_tags.
        plain_tags = not self.defaults.tags
        named_tags = _NAMED_TAG_SET
        keeper = self.keeper
        shaper = keeper.shape if keeper is not None and keeper.guards.shaping_anywhere else None
        add_format = self._formats.add
        chunk_rows = self._chunk_rows
        rid = None
        for lineno, raw in numbered:
            if type(raw) is bytes or type(raw) is str:
                if not raw or raw.isspace():
                    continue
                try:
                    obj = loads(raw)
                except orjson.JSONDecodeError as exc:
                    rejected.append(LineError(lineno, f"invalid JSON: {_json_error(exc)}"))
                    continue
            else:
                obj = dict(raw)  # type: ignore[arg-type]
            try:
                custom_id, provider, endpoint, model, body, fmt = parse_line(
                    obj, default_provider, apis
                )
                if custom_id is not None and (
                    type(custom_id) is not str or not 0 < len(custom_id) <= CUSTOM_ID_MAX
                ):
                    raise Invalid(
                        f"expected a non-empty string of at most {CUSTOM_ID_MAX} characters, "
                        f"got {_describe(custom_id)}",
                        "custom_id",
                    )
                tags = obj.get("tags")
                if tags is None:
                    tagged = default_tags
                elif type(tags) is not dict:
                    raise Invalid(
                        f"expected an object of name: value, got {_describe(tags)}", "tags"
                    )
                elif plain_tags and named_tags.issuperset(tags):
                    tagged = (
                        tags.get("use_case"),
                        tags.get("step"),
                        tags.get("business_unit"),
                        tags.get("task_id"),
                        "{}",
                    )
                    for value in tagged:
                        if value is not None and type(value) is not str:
                            tagged = split_tags(tags)  # the checks, and numbers as text
                            break
                else:
                    tagged = split_tags({**self.defaults.tags, **tags})
                if shaper is not None:
                    model, body = shaper(len(chunk), tagged, provider, endpoint, model, body)
                tolerance = obj.get("tolerance") or default_tolerance
                lane = lanes.get((tolerance, provider, model))
                if lane is None:
                    if type(tolerance) is not str:
                        raise Invalid(
                            f"expected a string like '4h', got {_describe(tolerance)}", "tolerance"
                        )
                    lane = self._classify(tolerance, provider, model)
            except Invalid as exc:
                rejected.append(LineError(lineno, exc.error, exc.field))
                continue
            rid = next(self._ids, None)
            if rid is None:
                rid = self._refill_ids()
            canonical = dumps(body, option=_SORT)
            size = len(canonical)
            digest = sha256(canonical).digest()
            chunk.append((
                rid, custom_id or f"bw-{rid}", provider, endpoint, model, canonical.decode(),
                digest.hex(), from_bytes(digest[:8], "big", signed=True), tolerance, *lane,
                *tagged, size, size >> 2, fmt, *tail,
                None if tagged[3] is None else UNKEYED,
            ))  # fmt: skip
            add_format(fmt)
            line_numbers.append(lineno)
            if len(chunk) >= chunk_rows:
                self.flush()
                chunk, line_numbers = self._chunk, self._lines
            if on_line is not None:
                on_line(lineno)
        if rid is not None:
            self._last_id = rid

    def _refill_ids(self) -> int:
        # Blocks grow from 256 to a chunk: a one-line submission takes 256 ids of a sequence,
        # not a chunk's worth (PostgreSQL's sequence never gives unused ones back).
        ids = self.sink.reserve_ids(min(self._chunk_rows, self._id_block))
        self._id_block *= 4
        if self._first_id is None:
            self._first_id = ids[0]
        self._ids = iter(ids)
        return next(self._ids)

    def flush(self) -> None:
        """Review the chunk and start storing it; the chunk before is settled first.

        A sink may still be storing a chunk while the next one is read (PostgreSQL's server
        works on a COPY for about as long as parsing the next chunk takes), so what follows
        the insert (refusals explained, guard decisions written, counts) waits until the next
        chunk is flushed or the intake finishes: `_settle`."""
        self._settle()
        rows, lines = self._chunk, self._lines
        self._chunk, self._lines = [], []
        if not rows:
            return
        keeper = self.keeper
        outcomes = None
        if keeper is not None:
            keeper.review(rows)
            outcomes = keeper.take_outcomes()  # the next chunk's shaping starts afresh
        self._pending = (rows, lines, outcomes, self.sink.start_insert(rows))
        if not self.sink.defers_inserts:
            self._settle()  # stored already: no need to hold the chunk's rows

    def _settle(self) -> None:
        """Finish the chunk being stored: explain refused rows, write the guards' decisions
        for the stored ones, count them."""
        if self._pending is None:
            return
        rows, lines, outcomes, stored_now = self._pending
        self._pending = None
        refused = stored_now()
        skip = set(refused)
        if refused:
            self._reject(rows, lines, refused)
        finals: dict[int, str] = {}
        if self.keeper is not None and outcomes:
            stored = {i for i in range(len(rows)) if i not in skip}
            for position, (state, reason) in self.keeper.apply(rows, stored, outcomes).items():
                finals[rows[position][_ID]] = state
                if reason is not None:
                    self.result.refused.append(LineError(lines[position], reason, "guard"))
        if skip:
            rows = [row for i, row in enumerate(rows) if i not in skip]
        self._count(rows, finals)

    def _reject(
        self, rows: list[tuple[Any, ...]], lines: list[int], refused: Sequence[int]
    ) -> None:
        """Explain each row the sink refused for its custom_id: who holds it already."""
        custom_ids = [rows[i][_CUSTOM_ID] for i in refused]
        owners = self.sink.live_custom_ids(self.submission_id, custom_ids)
        line_of = {row[_ID]: line for row, line in zip(rows, lines, strict=True)}
        for i, cid in zip(refused, custom_ids, strict=True):
            owner = owners.get(cid)
            twice = f"custom_id {cid!r} is used twice in this submission"
            if owner in line_of:
                error = f"{twice} (first on line {line_of[owner]})"
            elif owner is not None and self._first_id is not None and owner >= self._first_id:
                error = f"{twice} (earlier as request {owner})"
            elif owner is not None:
                error = f"custom_id {cid!r} is already used by live request {owner}"
            else:  # pragma: no cover - the holder finished between the insert and this query
                error = f"custom_id {cid!r} was used by another live request"
            self.result.rejected.append(LineError(lines[i], error, "custom_id"))

    def _count(self, rows: list[tuple[Any, ...]], finals: Mapping[int, str] | None = None) -> None:
        """Count stored rows; `finals` holds the rows a guard finished (refused or answered
        from the store), which go to neither lane."""
        result = self.result
        result.accepted += len(rows)
        if result.ids is not None and result.lanes is not None:
            result.ids.extend(r[_ID] for r in rows)
            result.lanes.extend(r[_LANE] for r in rows)
        if finals:
            result.states.update(finals)
            result.deduplicated += sum(
                1 for state in finals.values() if state == RequestState.DEDUPLICATED.value
            )
            rows = [r for r in rows if r[_ID] not in finals]
        # the flex lane is called now like the realtime lane, only at another tier
        realtime = [r[_ID] for r in rows if r[_LANE] != "deferred"]
        result.realtime += len(realtime)
        result.deferred += len(rows) - len(realtime)
        if self.settings.broker_url:  # only distributed mode hands them on; keep memory flat
            result.realtime_ids.extend(realtime)

    def finish(self) -> SubmitResult:
        """Commit, or roll everything back if any line was invalid and skipping is off."""
        self.flush()
        self._settle()
        self.result.rejected.sort(key=lambda e: e.line)
        if self.result.rejected and not self.skip_invalid:
            self.sink.rollback()
            raise IntakeError(self.result.rejected)
        formats = self._formats
        fmt = None if not formats else formats.pop() if len(formats) == 1 else "mixed"
        self.result.format = fmt
        first = self._first_id if self._last_id is not None else None
        self.sink.close_submission(
            self.submission_id, fmt=fmt, first_id=first, last_id=self._last_id
        )
        self.sink.commit()
        if self.result.accepted:
            self.result.warnings = price_warnings(self.settings, self._models)
        return self.result


def price_warnings(settings: Settings, models: Iterable[tuple[str, str]]) -> list[str]:
    """One warning per (provider, model) that cannot be priced: its savings cannot be
    computed. Moderation models are free, so never warned about. Models genai-prices is
    already known to price are not asked about again (`costs/known_models`)."""
    from batchwise.costs import known_models

    known = known_models.load()
    todo = [
        (provider, model)
        for provider, model in sorted(set(models))
        if not moderation_model(model) and known_models.key(settings, provider, model) not in known
    ]
    if not todo:
        return []
    from batchwise.costs.pricing import PriceBook
    from batchwise.errors import ConfigError

    try:
        book = PriceBook.from_settings(settings)
    except ConfigError as exc:  # the run will refuse it too; the submission stands
        return [f"prices cannot be checked: {exc}"]
    warnings = [book.missing_price(provider, model) for provider, model in todo]
    known_models.remember(
        known_models.key(settings, provider, model)
        for provider, model in todo
        if book.knows(provider, model)
    )
    return [warning for warning in warnings if warning is not None]


def submit_lines(
    lines: Iterable[bytes | str | Mapping[str, Any]],
    sink: RequestSink,
    *,
    settings: Settings,
    now: datetime,
    zone: tzinfo,
    defaults: Defaults = Defaults(),
    skip_invalid: bool = False,
    collect_ids: bool = False,
    on_line: Callable[[int], None] | None = None,
    guards: Guards | None = None,
) -> SubmitResult:
    """Validate and store a stream of lines in one transaction.

    Blank lines are skipped. Raises `IntakeError` listing every bad line (nothing stored) unless
    `skip_invalid`, in which case the good lines are stored and the bad ones reported.
    """
    intake = Intake(
        sink,
        settings=settings,
        now=now,
        zone=zone,
        defaults=defaults,
        skip_invalid=skip_invalid,
        collect_ids=collect_ids,
        guards=guards,
    )
    try:
        intake.consume(enumerate(lines, 1), on_line)
        return intake.finish()
    except BaseException:
        sink.rollback()
        raise
