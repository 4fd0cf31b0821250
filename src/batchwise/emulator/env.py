"""The emulator's shared runtime: configuration, fault injection, and the `Env` every handler
gets (config, clock, state, faults). Fault draws come from `seeded`, so a run can be replayed.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import orjson

from batchwise.emulator.http import ApiError
from batchwise.emulator.seeded import draw
from batchwise.emulator.state import State
from batchwise.errors import ConfigError

_RATES = (
    "error_rate",
    "expire_rate",
    "rate_limit_rate",
    "server_error_rate",
    "slow_response_rate",
    "html_error_rate",
    "flex_refusal_rate",
)


@dataclass(frozen=True)
class EmulatorConfig:
    """How the emulator behaves: timing, fault rates, persistence, seed and accepted key."""

    #: time from create to ended for a batch
    turnaround_s: float = 2.0
    #: share of batch lines (and realtime calls) that fail with a provider error
    error_rate: float = 0.0
    #: share of batches that expire with partial output (about half the lines done)
    expire_rate: float = 0.0
    #: share of HTTP calls answered 429 with a short retry-after
    rate_limit_rate: float = 0.0
    #: share of HTTP calls answered 500
    server_error_rate: float = 0.0
    #: added latency per realtime call
    latency_s: float = 0.0
    #: added latency per call at the flex tier (`service_tier: "flex"`), on top of `latency_s`
    flex_latency_s: float = 0.0
    #: share of flex-tier calls refused with 429 `resource_unavailable` (not billed)
    flex_refusal_rate: float = 0.0
    #: per-model cap on in-flight prompt tokens of OpenAI batches (`token_limit_exceeded`)
    enqueued_token_limit: int | None = None
    #: keep state on disk here so a restart continues; None keeps it in memory
    state_dir: Path | None = None
    seed: int = 0
    #: None accepts any non-empty key; otherwise exactly this one
    api_key: str | None = None
    #: share of result-file lines that come out broken: cut off (not valid JSON), without
    #: `custom_id`, or with `"custom_id": ""` (`--malformed-line-rate`)
    malformed_line_rate: float = 0.0
    # --- network faults (what a flaky provider or a proxy in front of it does) ---------------
    #: share of API answers whose body drips a byte a second, never finishing in time
    slow_response_rate: float = 0.0
    #: refuse every connection for this many seconds from start, then serve
    outage_s: float = 0.0
    #: share of API calls answered by an HTML page (half with status 200, half with 502)
    html_error_rate: float = 0.0
    #: model names the OpenAI API answers (as chat models) beyond OpenAI's own, for an
    #: emulator playing an OpenAI-compatible provider (`--model llama-3.1-8b-instant`)
    models: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not 0.0 <= self.malformed_line_rate <= 1.0:
            raise ConfigError(
                f"malformed_line_rate must be between 0 and 1, got {self.malformed_line_rate!r}"
            )
        for name in _RATES:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be between 0 and 1, got {value!r}")
        if self.rate_limit_rate + self.server_error_rate > 1.0:
            raise ConfigError("rate_limit_rate + server_error_rate must not exceed 1")
        if self.turnaround_s < 0 or self.latency_s < 0 or self.flex_latency_s < 0:
            raise ConfigError("turnaround_s, latency_s and flex_latency_s must not be negative")
        if not (math.isfinite(self.outage_s) and self.outage_s >= 0):
            raise ConfigError(f"outage_s must be 0 or more seconds, got {self.outage_s!r}")
        if self.enqueued_token_limit is not None and self.enqueued_token_limit < 1:
            raise ConfigError("enqueued_token_limit must be a positive number of tokens")
        if self.api_key == "":
            raise ConfigError("api_key must be None (accept any key) or a non-empty string")

    def __repr__(self) -> str:
        key = None if self.api_key is None else "***"
        return (
            f"EmulatorConfig(turnaround_s={self.turnaround_s}, error_rate={self.error_rate}, "
            f"expire_rate={self.expire_rate}, rate_limit_rate={self.rate_limit_rate}, "
            f"server_error_rate={self.server_error_rate}, latency_s={self.latency_s}, "
            f"enqueued_token_limit={self.enqueued_token_limit}, state_dir={self.state_dir!r}, "
            f"seed={self.seed}, api_key={key!r}, slow_response_rate={self.slow_response_rate}, "
            f"outage_s={self.outage_s}, html_error_rate={self.html_error_rate}, "
            f"malformed_line_rate={self.malformed_line_rate}, "
            f"flex_latency_s={self.flex_latency_s}, flex_refusal_rate={self.flex_refusal_rate}, "
            f"models={sorted(self.models)!r})"
        )


RATE_LIMIT = "rate_limit"
SERVER_ERROR = "server_error"
INVALID_REQUEST = "invalid_request"


def line_fault(kind: str, *, retry_after_s: float | None = None) -> ApiError:
    """The error a batch line (or call) answers with for an injected fault of `kind`."""
    if kind == RATE_LIMIT:
        return ApiError(
            429,
            "Rate limit reached for requests (emulated). Please try again later.",
            type="requests",
            code="rate_limit_exceeded",
            retry_after_s=retry_after_s,
        )
    if kind == SERVER_ERROR:
        return ApiError(
            500,
            "The server had an error while processing your request (emulated).",
            type="server_error",
            code="server_error",
        )
    return ApiError(
        400,
        "The request was rejected by the provider (emulated final error).",
        code="invalid_request",
    )


class Faults:
    """Seeded fault draws, counted in the store for `/_emulator/stats`.

    HTTP-level and realtime faults are drawn per call number, so a retried call gets a fresh
    draw; batch-line faults are drawn per (batch id, custom_id).
    """

    def __init__(self, config: EmulatorConfig, state: State) -> None:
        self._config = config
        self._state = state
        self._calls = itertools.count()
        self._realtime_calls = itertools.count()
        self._network_calls = itertools.count()
        self._flex_calls = itertools.count()

    def network(self) -> str | None:
        """ "slow", "html_200", "html_502" for this API call, or None (drawn per call)."""
        cfg = self._config
        if cfg.slow_response_rate == 0 and cfg.html_error_rate == 0:
            return None
        n = next(self._network_calls)
        u = draw(cfg.seed, "network", n)
        if u < cfg.slow_response_rate:
            self._state.bump("fault.slow_response")
            return "slow"
        if u < cfg.slow_response_rate + cfg.html_error_rate:
            self._state.bump("fault.html_error")
            return "html_200" if draw(cfg.seed, "html-status", n) < 0.5 else "html_502"
        return None

    def http(self) -> ApiError | None:
        """A 429 or 500 for this HTTP call, or None."""
        cfg = self._config
        if cfg.rate_limit_rate == 0 and cfg.server_error_rate == 0:
            return None
        n = next(self._calls)
        u = draw(cfg.seed, "http", n)
        if u < cfg.rate_limit_rate:
            self._state.bump("fault.rate_limit")
            # small, so SDK retries that honour it keep tests fast
            return line_fault(
                RATE_LIMIT, retry_after_s=0.05 + 0.45 * draw(cfg.seed, "retry-after", n)
            )
        if u < cfg.rate_limit_rate + cfg.server_error_rate:
            self._state.bump("fault.server_error")
            return line_fault(SERVER_ERROR)
        return None

    def realtime(self) -> ApiError | None:
        """A retryable server error for this realtime call (`error_rate`), or None."""
        if self._config.error_rate == 0:
            return None
        n = next(self._realtime_calls)
        if draw(self._config.seed, "realtime", n) >= self._config.error_rate:
            return None
        self._state.bump("fault.realtime_error")
        return line_fault(SERVER_ERROR)

    def flex(self) -> ApiError | None:
        """A 429 `resource_unavailable` for this flex-tier call (`flex_refusal_rate`), or None."""
        if self._config.flex_refusal_rate == 0:
            return None
        n = next(self._flex_calls)
        if draw(self._config.seed, "flex", n) >= self._config.flex_refusal_rate:
            return None
        self._state.bump("fault.flex_refusal")
        return ApiError(
            429,
            "Resource unavailable for flex processing (emulated). Please try again later, "
            "or retry with the default service tier.",
            type="invalid_request_error",
            code="resource_unavailable",
        )

    def line(self, batch_id: str, custom_id: str) -> ApiError | None:
        """The injected error of one batch line, or None; a mix of retryable and final kinds."""
        seed = self._config.seed
        if self._config.error_rate == 0:
            return None
        if draw(seed, "line", batch_id, custom_id) >= self._config.error_rate:
            return None
        u = draw(seed, "line-kind", batch_id, custom_id)
        kind = SERVER_ERROR if u < 0.45 else RATE_LIMIT if u < 0.75 else INVALID_REQUEST
        return line_fault(kind)

    def expires(self, batch_id: str) -> bool:
        """Whether this batch runs out of time with about half its lines done."""
        return draw(self._config.seed, "expire", batch_id) < self._config.expire_rate

    def malformed(
        self, batch_id: str, source: str, lines: Iterable[bytes], *, id_field: str = "custom_id"
    ) -> Iterator[bytes]:
        """The lines of one result file (`source`: output, error, results, responses), a seeded
        share of them broken (`malformed_line_rate`), drawn per (batch, file, line number): a
        file reads the same way on every download, as a provider's stored file would.
        `id_field` names the line's id (Gemini's is `key`)."""
        rate, seed = self._config.malformed_line_rate, self._config.seed
        if rate == 0:
            yield from lines
            return
        for n, line in enumerate(lines, 1):
            if draw(seed, "malformed", batch_id, source, n) >= rate:
                yield line
            else:
                u = draw(seed, "malformed-kind", batch_id, source, n)
                yield malform(line, u, id_field=id_field)


def malform(line: bytes, u: float, *, id_field: str = "custom_id") -> bytes:
    """`line` (one JSON object and its newline) broken one of three ways, chosen by `u` in
    [0, 1): cut off in the middle, its id (`id_field`) removed, or its id emptied."""
    text = line.rstrip(b"\n")
    if u < 1 / 3:
        return text[: len(text) // 2] + b"\n"
    obj = orjson.loads(text)
    if u < 2 / 3:
        obj.pop(id_field, None)
    else:
        obj[id_field] = ""
    return orjson.dumps(obj) + b"\n"


def retry_after_headers(wait_s: float, *, with_ms: bool) -> list[tuple[str, str]]:
    """`retry-after` in whole seconds (as providers send it) and, for OpenAI, milliseconds."""
    headers = [("retry-after", str(max(1, math.ceil(wait_s))))]
    if with_ms:
        headers.append(("retry-after-ms", str(max(1, round(wait_s * 1000)))))
    return headers


#: the emulator's clock: Unix seconds (like `time.time`) or an aware datetime (like
#: `batchwise.clock.ManualClock`), so a test can drive the scheduler and the emulator together
EmulatorClock = Callable[[], float | datetime]


@dataclass
class Env:
    """What every handler needs: the config, the clock and the store."""

    config: EmulatorConfig
    clock: EmulatorClock
    state: State
    faults: Faults

    def now(self) -> float:
        value = self.clock()
        return value.timestamp() if isinstance(value, datetime) else float(value)

    def realtime_gate(self) -> None:
        """What every valid realtime call meets first: an injected error, then the latency."""
        fault = self.faults.realtime()
        if fault is not None:
            raise fault
        if self.config.latency_s:
            time.sleep(self.config.latency_s)

    def flex_gate(self) -> None:
        """What a flex-tier call meets after `realtime_gate`: a refusal, then the slowness."""
        fault = self.faults.flex()
        if fault is not None:
            raise fault
        self.state.bump("realtime.flex")
        if self.config.flex_latency_s:
            time.sleep(self.config.flex_latency_s)
