"""Cost of each provider response, exact to the nano-dollar, from the usage the provider reported.

    usage ──normalise_usage──► TokenUsage ──PriceBook.price──► Price(actual, realtime, source)

Unit prices come from negotiated overrides in the settings file, else from genai-prices' bundled
snapshot (never fetched at run time). A `genai_prices.calc_price` call costs over 100
microseconds (model lookup, unit validation, Decimal arithmetic), too slow for a bulk
reconcile of 100,000 lines, so a `PriceBook` resolves each (provider, model, batch?, UTC day)
once into integer coefficients per `TokenUsage` field and then prices a response with a few
integer multiplications. The coefficients follow genai-prices' own rules, so the fast path equals
`calc_price` (the tests check it on random usages):

* a usage splits into disjoint leaves, each priced once: cache reads and writes are carved out
  of total input, 1 h writes out of all writes, reasoning out of output — but only when the
  model has a price for the narrower unit; otherwise those tokens stay at the wider price;
* tiers are cliffs: once *total input tokens* exceed a tier's start, every token of a tiered
  unit is priced at that tier (`TieredPrices`), so each tier bracket gets its own coefficients.

Batch lines use genai-prices' `processing: batch` variant when one is in force for the model on
that day. genai-prices silently returns the standard price when there is none (or when the
request predates the variant's start date), so that case is detected and the provider's
configured discount is applied instead; `Price.source` records which path priced the line.

Money is an `int` of nano-USD (1e-9 USD), so ledger sums are exact. Each call's exact total (a
rational number: prices are decimals per million tokens, discounts are decimals) is rounded
once, half to even; components are never rounded separately.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, date, datetime
from decimal import Context, Decimal, localcontext
from functools import cache, partial
from typing import TYPE_CHECKING, Any

from genai_prices import data_snapshot
from genai_prices.data_units import unit_data
from genai_prices.types import ModelInfo, ModelPrice, TieredPrices, TimeOfDateConstraint
from genai_prices.units import UnitDef, UnitRegistry

from batchwise.errors import ConfigError, ProviderDataError

if TYPE_CHECKING:
    from batchwise.config import ProviderConfig, Settings

__all__ = [
    "FREE_ENDPOINTS",
    "Price",
    "PriceBook",
    "Quote",
    "TokenUsage",
    "UsageReader",
    "format_usd",
    "normalise_usage",
    "nusd_to_decimal",
    "usage_of",
]

_log = logging.getLogger(__name__)

NANO_PER_USD = 1_000_000_000
#: batchwise provider name -> genai-prices provider id; other names are passed through unchanged
_GENAI_PROVIDER_IDS = {"openai": "openai", "anthropic": "anthropic", "gemini": "google"}
_BATCH_CONTEXT = {"processing": "batch"}
#: the endpoint of every Gemini request (the model goes where `{model}` is)
GEMINI_GENERATE = "/v1beta/models/{model}:generateContent"
#: enough digits that no Decimal step here ever rounds (prices have a handful of digits)
_EXACT = Context(prec=80)


# --- usage ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """One response's usage, normalised across providers and endpoints.

    Subsets are nested, never added: `input_tokens` includes cache reads and writes,
    `cache_write_tokens` includes 1 h writes, `output_tokens` includes reasoning.
    """

    #: total input, including cache reads and cache writes
    input_tokens: int
    cache_read_tokens: int = 0
    #: all cache writes (5 min + 1 h)
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    #: total output, including reasoning/thinking tokens
    output_tokens: int = 0
    reasoning_tokens: int = 0
    #: server-side web searches, billed per call (Anthropic `server_tool_use`)
    web_search_requests: int = 0

    def __post_init__(self) -> None:
        # one chained test on the hot path; the message is worked out only on failure
        if not (
            0 <= self.cache_write_1h_tokens <= self.cache_write_tokens
            and self.cache_read_tokens >= 0
            and self.cache_read_tokens + self.cache_write_tokens <= self.input_tokens
            and 0 <= self.reasoning_tokens <= self.output_tokens
            and self.web_search_requests >= 0
        ):
            raise ValueError(self._problem())

    def _problem(self) -> str:
        if min(getattr(self, f.name) for f in fields(self)) < 0:
            return f"token counts must not be negative: {self}"
        if self.cache_read_tokens + self.cache_write_tokens > self.input_tokens:
            return (
                f"cache reads ({self.cache_read_tokens}) + writes ({self.cache_write_tokens}) "
                f"exceed total input ({self.input_tokens})"
            )
        if self.cache_write_1h_tokens > self.cache_write_tokens:
            return (
                f"1 h cache writes ({self.cache_write_1h_tokens}) exceed all cache writes "
                f"({self.cache_write_tokens})"
            )
        return f"reasoning tokens ({self.reasoning_tokens}) exceed output ({self.output_tokens})"


_new = object.__new__
#: the slots' own setters: a frozen dataclass's `__init__` goes through `object.__setattr__`
#: once per field and then `__post_init__`, which costs more than reading a chat line's usage
_SET_USAGE = tuple(
    getattr(TokenUsage, f.name).__set__ for f in fields(TokenUsage)
)  # input, cache read, cache write, 1 h write, output, reasoning, web searches


def _valid_usage(
    input_tokens: int, cache_read: int, cache_write: int, output_tokens: int, reasoning: int
) -> TokenUsage:
    """`TokenUsage(input_tokens, cache_read, cache_write, 0, output_tokens, reasoning)`, built
    without its checks: for a caller that has made them (none negative, the subsets within
    their totals)."""
    usage = _new(TokenUsage)
    s_in, s_read, s_write, s_1h, s_out, s_reason, s_web = _SET_USAGE
    s_in(usage, input_tokens)
    s_read(usage, cache_read)
    s_write(usage, cache_write)
    s_1h(usage, 0)
    s_out(usage, output_tokens)
    s_reason(usage, reasoning)
    s_web(usage, 0)
    return usage


def _count(usage: Mapping[str, Any], key: str, *, required: bool = False) -> int:
    value = usage.get(key)
    if value is None:
        if required:
            raise ValueError(f"missing {key!r}")
        return 0
    if type(value) is not int or value < 0:  # bool is an int subclass: reject it too
        raise ValueError(f"{key!r} must be a non-negative integer, got {value!r}")
    return value


def _part(usage: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = usage.get(key)
    if type(value) is dict:  # what JSON gives; spares the slower abstract Mapping check
        return value
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{key!r} must be an object, got {value!r}")
    return value


def _openai_chat(usage: Mapping[str, Any]) -> TokenUsage:
    # prompt_tokens includes cached (and written) tokens; completion_tokens includes reasoning
    prompt, completion = usage.get("prompt_tokens_details"), usage.get("completion_tokens_details")
    if type(prompt) is dict and type(completion) is dict:
        # the shape of every chat line, read in one go; a value the checks below would not pass
        # (missing, None, not an int, negative) takes the general path, which names it
        total_in, total_out = usage.get("prompt_tokens"), usage.get("completion_tokens")
        cached, written = prompt.get("cached_tokens", 0), prompt.get("cache_write_tokens", 0)
        reasoning = completion.get("reasoning_tokens", 0)
        if (
            type(total_in) is int
            and type(total_out) is int
            and type(cached) is int
            and type(written) is int
            and type(reasoning) is int
            and (total_in | total_out | cached | written | reasoning) >= 0  # none negative
        ):
            if cached + written <= total_in and reasoning <= total_out:
                return _valid_usage(total_in, cached, written, total_out, reasoning)
            # positional, in field order: input, cache read, cache write, 1 h write, output,
            # reasoning (raises, naming what is inconsistent)
            return TokenUsage(total_in, cached, written, 0, total_out, reasoning)
    prompt = _part(usage, "prompt_tokens_details")
    return TokenUsage(
        input_tokens=_count(usage, "prompt_tokens", required=True),
        cache_read_tokens=_count(prompt, "cached_tokens"),
        cache_write_tokens=_count(prompt, "cache_write_tokens"),
        output_tokens=_count(usage, "completion_tokens", required=True),
        reasoning_tokens=_count(_part(usage, "completion_tokens_details"), "reasoning_tokens"),
    )


def _openai_responses(usage: Mapping[str, Any]) -> TokenUsage:
    details = _part(usage, "input_tokens_details")
    return TokenUsage(
        input_tokens=_count(usage, "input_tokens", required=True),
        cache_read_tokens=_count(details, "cached_tokens"),
        cache_write_tokens=_count(details, "cache_write_tokens"),
        output_tokens=_count(usage, "output_tokens", required=True),
        reasoning_tokens=_count(_part(usage, "output_tokens_details"), "reasoning_tokens"),
    )


def _openai_embeddings(usage: Mapping[str, Any]) -> TokenUsage:
    return TokenUsage(input_tokens=_count(usage, "prompt_tokens", required=True))


def _anthropic_messages(usage: Mapping[str, Any]) -> TokenUsage:
    # Anthropic's input_tokens excludes cache reads and writes: the total is their sum
    uncached = _count(usage, "input_tokens", required=True)
    read = _count(usage, "cache_read_input_tokens")
    ttl = _part(usage, "cache_creation")
    written_1h = _count(ttl, "ephemeral_1h_input_tokens")
    if usage.get("cache_creation_input_tokens") is None:
        written = _count(ttl, "ephemeral_5m_input_tokens") + written_1h
    else:
        written = _count(usage, "cache_creation_input_tokens")
    return TokenUsage(
        input_tokens=uncached + read + written,
        cache_read_tokens=read,
        cache_write_tokens=written,
        cache_write_1h_tokens=written_1h,
        output_tokens=_count(usage, "output_tokens", required=True),
        reasoning_tokens=_count(_part(usage, "output_tokens_details"), "thinking_tokens"),
        web_search_requests=_count(_part(usage, "server_tool_use"), "web_search_requests"),
    )


def _gemini(usage: Mapping[str, Any]) -> TokenUsage:
    # promptTokenCount includes the cached tokens; thoughts are billed as output but are not
    # in candidatesTokenCount; tool-use prompts are input
    thoughts = _count(usage, "thoughtsTokenCount")
    return TokenUsage(
        input_tokens=_count(usage, "promptTokenCount") + _count(usage, "toolUsePromptTokenCount"),
        cache_read_tokens=_count(usage, "cachedContentTokenCount"),
        output_tokens=_count(usage, "candidatesTokenCount") + thoughts,
        reasoning_tokens=thoughts,
    )


#: reads one line's raw usage object: see `PriceBook.usage_reader`
UsageReader = Callable[[Mapping[str, Any] | None], TokenUsage | None]


def usage_of(body: Mapping[str, Any]) -> Any:
    """A response body's raw usage object: `usage`, or Gemini's `usageMetadata`."""
    usage = body.get("usage")
    return body.get("usageMetadata") if usage is None else usage


def _unbilled(usage: Mapping[str, Any]) -> TokenUsage:
    return TokenUsage(input_tokens=0)


#: (provider, endpoint) pairs the provider does not bill, with the ledger source that says so:
#: their responses are priced at $0, as priced (never "unpriced": there is nothing to price)
FREE_ENDPOINTS: dict[tuple[str, str], str] = {("openai", "/v1/moderations"): "free: moderations"}

_USAGE_SHAPES = {
    ("openai", "/v1/chat/completions"): _openai_chat,
    ("openai", "/v1/completions"): _openai_chat,
    ("openai", "/v1/responses"): _openai_responses,
    ("openai", "/v1/embeddings"): _openai_embeddings,
    ("openai", "/v1/moderations"): _unbilled,
    ("anthropic", "/v1/messages"): _anthropic_messages,
    ("gemini", GEMINI_GENERATE): _gemini,
}


def normalise_usage(
    provider: str, endpoint: str, usage: Mapping[str, Any] | None
) -> TokenUsage | None:
    """Read a response body's `usage` object as the provider reported it (never re-tokenised).

    `endpoint` is the API path the line was sent to (`/v1/chat/completions`, `/v1/responses`,
    `/v1/embeddings`, `/v1/completions`, `/v1/moderations`, `/v1/messages`). Returns None when
    the provider reported no usage, so the caller records the response as unpriced rather than
    free; an endpoint the provider never bills (`FREE_ENDPOINTS`: moderations report no usage)
    reads as zero tokens.
    Audio/image token breakdowns are not read: those tokens are priced as text.

    Raises `ProviderDataError` when the usage is malformed or inconsistent (cached > prompt…),
    and `ValueError` for a provider/endpoint pair batchwise does not know.
    """
    shape = _USAGE_SHAPES.get((provider, endpoint))
    if shape is None:
        known = ", ".join(f"{p} {e}" for p, e in _USAGE_SHAPES)
        raise ValueError(f"no usage shape for {provider} {endpoint} (known: {known})")
    if usage is None:
        return _unbilled({}) if (provider, endpoint) in FREE_ENDPOINTS else None
    if type(usage) is not dict and not isinstance(usage, Mapping):
        raise ProviderDataError(
            f"usage for {endpoint} must be an object, got {type(usage).__name__}",
            provider=provider,
        )
    try:
        return shape(usage)
    except ValueError as exc:
        raise ProviderDataError(
            f"unreadable usage for {endpoint}: {exc}", provider=provider
        ) from exc


# --- money ---------------------------------------------------------------------------------


def nusd_to_decimal(n: int) -> Decimal:
    """Nano-USD as an exact Decimal number of USD."""
    return Decimal(n).scaleb(-9)


def format_usd(n: int) -> str:
    """Nano-USD as an exact USD string with all nine decimals, e.g. `1.050000000`."""
    sign = "-" if n < 0 else ""
    whole, frac = divmod(abs(n), NANO_PER_USD)
    return f"{sign}{whole}.{frac:09d}"


@dataclass(frozen=True, slots=True)
class Price:
    """What one response cost, and what the same usage costs at realtime prices."""

    #: cost as processed (batch price for a batch line); None means unpriced, never 0
    actual_nusd: int | None
    #: the same usage at standard realtime prices
    realtime_nusd: int | None
    #: what priced `actual_nusd`: genai-prices:batch, genai-prices:standard, discount:0.5,
    #: override, override+discount:0.5, free: moderations (an unbilled endpoint), or unpriced
    source: str
    warning: str | None = None

    @property
    def priced(self) -> bool:
        return self.actual_nusd is not None

    @property
    def saving_nusd(self) -> int | None:
        """Realtime-equivalent cost minus actual cost; None when unpriced."""
        if self.actual_nusd is None or self.realtime_nusd is None:
            return None
        return self.realtime_nusd - self.actual_nusd


# --- rates: a resolved price table as integer arithmetic ------------------------------------

#: genai-prices usage keys batchwise reports, as weights on the TokenUsage fields
#: (input, cache_read, cache_write, cache_write_1h, output, reasoning, web_search_requests)
_REPORTED_KEYS: dict[str, tuple[int, ...]] = {
    "input_tokens": (1, 0, 0, 0, 0, 0, 0),
    "cache_read_tokens": (0, 1, 0, 0, 0, 0, 0),
    "cache_write_tokens": (0, 0, 1, 0, 0, 0, 0),
    "cache_write_5m_tokens": (0, 0, 1, -1, 0, 0, 0),
    "cache_write_1h_tokens": (0, 0, 0, 1, 0, 0, 0),
    "output_tokens": (0, 0, 0, 0, 1, 0, 0),
    "output_reasoning_tokens": (0, 0, 0, 0, 0, 1, 0),
    "web_searches": (0, 0, 0, 0, 0, 0, 1),
}
_FIELDS = 7


@cache
def _registry() -> UnitRegistry:
    return UnitRegistry(unit_data)


def _price_keys(model_price: ModelPrice) -> list[tuple[str, Decimal | TieredPrices]]:
    return [
        (key, value)
        for key, value in vars(model_price).items()
        if not key.startswith("_") and isinstance(value, Decimal | TieredPrices)
    ]


def _tier_price(value: Decimal | TieredPrices, input_tokens: int) -> Decimal:
    """genai-prices' cliff rule: the highest tier whose start total input exceeds, else base."""
    if isinstance(value, Decimal):
        return value
    for tier in reversed(value.tiers):
        if input_tokens > tier.start:
            return tier.price
    return value.base


def _coefficients(model_price: ModelPrice, input_tokens: int, factor: Decimal) -> list[Decimal]:
    """nano-USD per unit of each TokenUsage field (plus a per-request constant, last).

    Mirrors genai-prices' leaf decomposition symbolically: each priced unit's leaf is its own
    count minus the leaves of its priced descendants (units with a superset of its dimensions,
    e.g. cache_read ⊂ input), so every token is priced exactly once.
    """
    registry = _registry()
    priced: list[tuple[UnitDef, Decimal]] = []
    per_request = Decimal(0)
    for key, value in _price_keys(model_price):
        try:
            unit = registry.unit_for_price_key(key)
        except KeyError:
            continue  # genai-prices ignores unknown price keys as well
        price = _tier_price(value, input_tokens) * factor * NANO_PER_USD / unit.per
        if unit.usage_key == "requests":
            per_request += price
        else:
            priced.append((unit, price))
    priced.sort(key=lambda item: (-len(item[0].dimensions), item[0].usage_key))
    leaves: dict[str, dict[str, int]] = {}
    by_key: dict[str, Decimal] = {}
    for unit, price in priced:
        leaf = {unit.usage_key: 1}
        for other, _ in priced:
            if other.usage_key in leaves and unit.dimensions.items() <= other.dimensions.items():
                for key, weight in leaves[other.usage_key].items():
                    leaf[key] = leaf.get(key, 0) - weight
        leaves[unit.usage_key] = leaf
        for key, weight in leaf.items():
            by_key[key] = by_key.get(key, Decimal(0)) + price * weight
    coefficients = [Decimal(0)] * _FIELDS
    for key, weights in _REPORTED_KEYS.items():
        if key in by_key:
            for i, weight in enumerate(weights):
                coefficients[i] += by_key[key] * weight
    coefficients.append(per_request)
    return coefficients


class _Rate:
    """One resolved price table: integer coefficients per tier bracket over a common scale."""

    __slots__ = ("brackets", "scale", "thresholds")
    #: bracket i holds while total input tokens are in (thresholds[i-1], thresholds[i]]
    thresholds: tuple[int, ...]
    #: per bracket: coefficient per TokenUsage field, then a per-request constant
    brackets: tuple[tuple[int, ...], ...]
    #: coefficients are nano-USD x scale, so the sum is divided (and rounded) once
    scale: int

    def __init__(self, model_price: ModelPrice, factor: Decimal = Decimal(1)) -> None:
        starts = sorted(
            {
                tier.start
                for _, value in _price_keys(model_price)
                if isinstance(value, TieredPrices)
                for tier in value.tiers
            }
        )
        self.thresholds = tuple(starts)
        with localcontext(_EXACT):
            exact = [
                _coefficients(model_price, start, factor) for start in (0, *(s + 1 for s in starts))
            ]
            # the smallest power of ten that makes every coefficient an integer
            digits = max(
                0, *(-int(c.normalize().as_tuple().exponent) for row in exact for c in row)
            )
            self.scale = int(10**digits)
            self.brackets = tuple(tuple(int(c.scaleb(digits)) for c in row) for row in exact)

    def nusd(self, u: TokenUsage) -> int:
        """Exact cost of `u` in nano-USD, rounded once, half to even."""
        c = self.brackets[bisect_left(self.thresholds, u.input_tokens)]
        total = (
            c[0] * u.input_tokens
            + c[1] * u.cache_read_tokens
            + c[2] * u.cache_write_tokens
            + c[3] * u.cache_write_1h_tokens
            + c[4] * u.output_tokens
            + c[5] * u.reasoning_tokens
            + c[6] * u.web_search_requests
            + c[7]
        )
        scale = self.scale
        if scale == 1:
            return total
        q, r = divmod(total, scale)
        if 2 * r > scale or (2 * r == scale and q & 1):
            q += 1
        return q


class Quote:
    """Everything needed to price a usage for one (provider, model, batch?, moment): see
    `PriceBook.quote`."""

    __slots__ = ("actual", "realtime", "source", "unpriced", "warning")

    def __init__(
        self,
        actual: _Rate | None,
        realtime: _Rate | None,
        source: str,
        warning: str | None = None,
    ) -> None:
        self.actual = actual
        self.realtime = realtime
        self.source = source
        self.warning = warning
        self.unpriced = (
            Price(None, None, source, warning) if actual is None or realtime is None else None
        )

    def price(self, usage: TokenUsage) -> Price:
        """What `usage` cost, and its realtime equivalent."""
        if self.unpriced is not None:
            return self.unpriced
        actual, realtime = self.amounts(usage)
        return Price(actual, realtime, self.source, self.warning)

    def amounts(self, usage: TokenUsage) -> tuple[int | None, int | None]:
        """`price(usage)`'s (actual_nusd, realtime_nusd) alone, with no `Price` built: for a
        caller that writes many rows (`source` and `warning` are the quote's own)."""
        if self.actual is None or self.realtime is None:
            return None, None
        realtime = self.realtime.nusd(usage)
        if self.actual is self.realtime:
            return realtime, realtime
        return self.actual.nusd(usage), realtime


# --- overrides -----------------------------------------------------------------------------

_OVERRIDE_KEYS = {
    "input_mtok": "USD per million input tokens",
    "output_mtok": "USD per million output tokens",
    "cache_read_mtok": "USD per million cache-read tokens",
    "cache_write_mtok": "USD per million cache-write tokens (5 minute TTL)",
    "cache_write_1h_mtok": "USD per million 1 hour cache-write tokens",
}
_BATCH_PREFIX = "batch_"


@dataclass(frozen=True, slots=True)
class _Override:
    realtime: ModelPrice
    #: explicit negotiated batch prices; None means realtime x the provider's discount
    batch: ModelPrice | None


def _number(where: str, value: object) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    # str() of a float is its shortest repr, so 0.15 in TOML becomes exactly Decimal("0.15")
    number = Decimal(str(value)) if isinstance(value, float) else Decimal(value)
    if not number.is_finite() or number < 0:
        raise ConfigError(f"{where} must be a finite number >= 0, got {value!r}")
    return number


def _parse_discounts(batch_discount: Mapping[str, float]) -> dict[str, Decimal]:
    discounts: dict[str, Decimal] = {}
    for provider, value in batch_discount.items():
        where = f"pricing.batch_discount.{provider}"
        discount = _number(where, value)
        if not 0 < discount <= 1:
            raise ConfigError(
                f"{where} must be a fraction of the realtime price in (0, 1], e.g. 0.5; "
                f"got {value!r}"
            )
        discounts[provider] = discount
    return discounts


def _price_table(where: str, entry: Mapping[str, Decimal], prefix: str) -> ModelPrice:
    for key in ("input_mtok", "output_mtok"):
        if prefix + key not in entry:
            raise ConfigError(
                f"{where}: missing {prefix + key} ({_OVERRIDE_KEYS[key]}; use 0 if not billed)"
            )
    if prefix + "cache_write_1h_mtok" in entry and prefix + "cache_write_mtok" not in entry:
        raise ConfigError(
            f"{where}: {prefix}cache_write_1h_mtok needs {prefix}cache_write_mtok "
            "(the 5 minute cache-write price) as well"
        )
    return ModelPrice(
        **{key: entry[prefix + key] for key in _OVERRIDE_KEYS if prefix + key in entry}
    )


def _parse_override(where: str, raw: object) -> _Override:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a table of prices, got {raw!r}")
    allowed = [*_OVERRIDE_KEYS, *(_BATCH_PREFIX + key for key in _OVERRIDE_KEYS)]
    entry: dict[str, Decimal] = {}
    for key, value in raw.items():
        if key not in allowed:
            raise ConfigError(
                f"{where}: unknown key {key!r} (expected one of {', '.join(allowed)}; "
                "prices are USD per million tokens)"
            )
        entry[key] = _number(f"{where}.{key}", value)
    realtime = _price_table(where, entry, "")
    if not any(key.startswith(_BATCH_PREFIX) for key in entry):
        return _Override(realtime, None)
    for key in _OVERRIDE_KEYS:
        batch_key = _BATCH_PREFIX + key
        if (key in entry) != (batch_key in entry):
            have, missing = (key, batch_key) if key in entry else (batch_key, key)
            raise ConfigError(
                f"{where}: batch prices are given, so every realtime price needs its batch "
                f"counterpart: {have} is set but {missing} is not"
            )
    return _Override(realtime, _price_table(where, entry, _BATCH_PREFIX))


# --- the price book ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Model:
    """A (provider, model name) resolved once: where its prices come from."""

    label: str
    override: _Override | None
    info: ModelInfo | None
    #: genai-prices applies price variants only to a provider's own models, not fallbacks
    direct: bool
    #: prices change with the time of day, so they cannot be cached per day
    time_of_day: bool


class PriceBook:
    """Prices responses from overrides and genai-prices' bundled snapshot, fast.

    Caches per (provider, model, batch?, UTC day); safe to share between threads (a race only
    resolves the same entry twice). Build one per process, or per reconcile pass.
    """

    def __init__(
        self,
        *,
        batch_discount: Mapping[str, float],
        overrides: Mapping[str, Mapping[str, float]] | None = None,
        configured: Iterable[ProviderConfig] = (),
    ) -> None:
        """`configured`: providers added by configuration, priced under genai-prices'
        `prices_provider` id with their own `batch_discount` (else `batch_discount`'s)."""
        configured = tuple(configured)
        self._discounts = _parse_discounts(
            {
                **batch_discount,
                **{p.name: p.batch_discount for p in configured if p.batch_discount is not None},
            }
        )
        self._genai_ids = {**_GENAI_PROVIDER_IDS, **{p.name: p.prices_provider for p in configured}}
        self._apis = {p.name: p.api for p in configured}
        known = sorted({*_GENAI_PROVIDER_IDS, *self._discounts, *self._apis})
        self._overrides: dict[tuple[str, str], _Override] = {}
        for name, raw in (overrides or {}).items():
            where = f'prices."{name}"'
            provider, _, model = name.partition(":")
            if not provider or not model:
                raise ConfigError(
                    f"{where}: price override keys are 'provider:model', e.g. 'openai:gpt-4o-mini'"
                )
            if provider not in known:
                raise ConfigError(
                    f"{where}: unknown provider {provider!r} (expected one of {', '.join(known)})"
                )
            self._overrides[(provider, model.lower())] = _parse_override(where, raw)
        self._overrides_by_id: dict[tuple[str, str], _Override] | None = None
        self._models: dict[tuple[str, str], _Model] = {}
        self._quotes: dict[tuple[str, str, bool, date], Quote] = {}
        self._warned: set[tuple[str, str]] = set()

    @classmethod
    def from_settings(cls, settings: Settings) -> PriceBook:
        """A price book from `Settings.batch_discount`, the `[prices]` overrides and the
        providers added by configuration."""
        return cls(
            batch_discount=settings.batch_discount,
            overrides=settings.price_overrides,
            configured=settings.configured_providers.values(),
        )

    def api_of(self, provider: str) -> str:
        """The API `provider` speaks, which says how its usage reads and which endpoints are
        free: a configured provider's `api`, else its own name."""
        return self._apis.get(provider, provider)

    def usage(
        self, provider: str, endpoint: str, usage: Mapping[str, Any] | None
    ) -> TokenUsage | None:
        """`normalise_usage` for `provider`, a configured one read as the API it speaks."""
        return normalise_usage(self._apis.get(provider, provider), endpoint, usage)

    def usage_reader(self, provider: str, endpoint: str) -> UsageReader:
        """`usage` for one (provider, endpoint), its shape looked up once: for reading the
        many lines of one batch. Reads and raises exactly as `usage` does."""
        api = self._apis.get(provider, provider)
        shape = _USAGE_SHAPES.get((api, endpoint))
        if shape is None:  # raises on each line, naming the known shapes, as `usage` does
            return partial(normalise_usage, api, endpoint)

        def read(usage: Mapping[str, Any] | None) -> TokenUsage | None:
            if type(usage) is dict:  # what JSON gives: the rest is `normalise_usage`'s
                try:
                    return shape(usage)
                except ValueError as exc:
                    raise ProviderDataError(
                        f"unreadable usage for {endpoint}: {exc}", provider=api
                    ) from exc
            return normalise_usage(api, endpoint, usage)

        return read

    def free_endpoint(self, provider: str, endpoint: str) -> str | None:
        """The ledger source of an endpoint `provider` does not bill (`FREE_ENDPOINTS`)."""
        return FREE_ENDPOINTS.get((self._apis.get(provider, provider), endpoint))

    def price(
        self, provider: str, model: str, usage: TokenUsage | None, *, batch: bool, at: datetime
    ) -> Price:
        """Price one response.

        `model` is the model the provider reported (dated snapshots resolve), `batch` whether
        it ran through a batch API, `at` (timezone-aware) when the provider accepted the
        request: prices and the start of batch variants are looked up for that UTC day.
        """
        if at.tzinfo is None:
            raise ValueError(f"`at` must be timezone-aware, got {at!r}")
        if usage is None:
            return self._no_usage(provider, model)
        return self.quote(provider, model, batch=batch, at=at).price(usage)

    def quote(self, provider: str, model: str, *, batch: bool, at: datetime) -> Quote:
        """The prices `price` applies for (provider, model, batch?) at `at`, to price many
        usages at that same moment without looking them up again for each."""
        if at.tzinfo is None:
            raise ValueError(f"`at` must be timezone-aware, got {at!r}")
        key = (provider, model, batch, at.astimezone(UTC).date())
        quote = self._quotes.get(key)
        if quote is None:
            quote = self._quote(key, at)
        return quote

    def knows(self, provider: str, model: str) -> bool:
        """Whether genai-prices itself prices `model` (overrides aside)."""
        entry = self._models.get((provider, model))
        if entry is None:
            entry = self._models[(provider, model)] = self._resolve_model(provider, model)
        return entry.info is not None

    def missing_price(self, provider: str, model: str) -> str | None:
        """Why `model` cannot be priced (neither genai-prices nor an override knows it), in a
        sentence naming it; None when it can be. Logs nothing: for warning at submit time."""
        entry = self._models.get((provider, model))
        if entry is None:
            entry = self._models[(provider, model)] = self._resolve_model(provider, model)
        if entry.info is not None or entry.override is not None:
            return None
        return (
            f"no price for {entry.label}: genai-prices does not know the model and there is no "
            f'[prices."{entry.label}"] override in config.toml, so its cost and savings cannot '
            "be computed (its requests run all the same, recorded as unpriced)"
        )

    # -- slow path: resolving a quote, once per (provider, model, batch?, day) --------------

    def _quote(self, key: tuple[str, str, bool, date], at: datetime) -> Quote:
        provider, model, batch, _ = key
        entry = self._models.get((provider, model))
        if entry is None:
            entry = self._models[(provider, model)] = self._resolve_model(provider, model)
        quote = self._build_quote(provider, entry, batch, at)
        if not entry.time_of_day:
            self._quotes[key] = quote
        return quote

    def _resolve_model(self, provider: str, model: str) -> _Model:
        label = f"{provider}:{model}"
        genai_provider = self._genai_ids.get(provider, provider)
        try:
            found, info = data_snapshot.get_snapshot().find_provider_model(
                model, None, genai_provider, None
            )
        except LookupError:
            override = self._overrides.get((provider, model.lower()))
            return _Model(label, override, None, direct=False, time_of_day=False)
        override = self._overrides.get((provider, model.lower())) or self._override_for_id(
            provider, info.id
        )
        conditions = [
            *(p.constraint for p in (info.prices if isinstance(info.prices, list) else [])),
            *(v.constraint for v in info.price_variants or ()),
        ]
        return _Model(
            label,
            override,
            info,
            direct=any(info is m for m in found.models),
            time_of_day=any(isinstance(c, TimeOfDateConstraint) for c in conditions),
        )

    def _override_for_id(self, provider: str, model_id: str) -> _Override | None:
        """An override named after a model genai-prices knows also covers its dated snapshots."""
        if self._overrides_by_id is None:
            by_id: dict[tuple[str, str], _Override] = {}
            snapshot = data_snapshot.get_snapshot()
            for (prov, name), override in self._overrides.items():
                try:
                    _, info = snapshot.find_provider_model(
                        name, None, self._genai_ids.get(prov, prov), None
                    )
                except LookupError:
                    continue
                by_id.setdefault((prov, info.id), override)
            self._overrides_by_id = by_id
        return self._overrides_by_id.get((provider, model_id))

    def _build_quote(self, provider: str, entry: _Model, batch: bool, at: datetime) -> Quote:
        if entry.override is not None:
            realtime = _Rate(entry.override.realtime)
            if not batch:
                return Quote(realtime, realtime, "override")
            if entry.override.batch is not None:
                return Quote(_Rate(entry.override.batch), realtime, "override")
            return self._discounted(provider, entry, entry.override.realtime, realtime, "override")
        if entry.info is None:
            warning = (
                f"no price for {entry.label}: genai-prices does not know the model and there is "
                f'no [prices."{entry.label}"] override; recorded as unpriced'
            )
            self._warn_once(entry.label, "unknown", warning)
            return Quote(None, None, "unpriced", warning)
        standard = entry.info.get_prices(at)
        realtime = _Rate(standard)
        if not batch:
            return Quote(realtime, realtime, "genai-prices:standard")
        if entry.direct:
            batch_prices = entry.info.get_prices(at, _BATCH_CONTEXT)
            # genai-prices falls back to the standard price silently: no variant for the
            # model, or one that starts after `at`. Equal tables mean no batch price applied.
            if batch_prices != standard:
                return Quote(_Rate(batch_prices), realtime, "genai-prices:batch")
        return self._discounted(provider, entry, standard, realtime, "genai-prices")

    def _discounted(
        self, provider: str, entry: _Model, standard: ModelPrice, realtime: _Rate, base: str
    ) -> Quote:
        discount = self._discounts.get(provider)
        if discount is None:
            warning = (
                f"no batch price for {entry.label} and no batch discount for {provider} "
                f"(set pricing.batch_discount.{provider}); priced at realtime rates"
            )
            self._warn_once(entry.label, "no-discount", warning)
            source = "override" if base == "override" else f"{base}:standard"
            return Quote(realtime, realtime, source, warning)
        shown = format(discount.normalize(), "f")
        source = f"override+discount:{shown}" if base == "override" else f"discount:{shown}"
        return Quote(_Rate(standard, discount), realtime, source)

    def _no_usage(self, provider: str, model: str) -> Price:
        label = f"{provider}:{model}"
        warning = f"{label}: the provider reported no usage; recorded as unpriced"
        self._warn_once(label, "no-usage", warning)
        return Price(None, None, "unpriced", warning)

    def _warn_once(self, label: str, reason: str, message: str) -> None:
        if (label, reason) not in self._warned:
            self._warned.add((label, reason))
            _log.warning("%s", message)
