"""Cost guards, applied at intake: model routing, output caps, context budgets, runaway-loop
limits, spend budgets and dedupe.

Guards are settings per tag, in the settings file:

    [guards]                          # everyone (the loop limits are on by default)
    max_requests_per_task = 200
    max_identical_per_task = 5        # also the limit on near repeats (normalised text)
    max_similar_per_task = 8          # recent conversation states this similar (costs.repeats)
    similarity_threshold = 0.8

    [guards.use_case.support_triage]  # also [guards.step.NAME], [guards.business_unit.NAME]
    default_max_tokens = 256
    max_max_tokens = 1024
    max_input_tokens = 8000
    trim_context = true               # trim the oldest turns instead of refusing
    dedupe_window_s = 86400           # answer identical requests from the store
    daily_budget_usd = 5.0
    monthly_budget_usd = 100.0
    budget_policy = "wait"            # or "refuse"; realtime work over budget is always refused
    owner = "team-support"            # named in every event these guards record

    [[routing.rules]]
    use_case = "support_triage"
    step = "classify"
    model = "gpt-4o-mini"

Values from the business unit's table override the global ones, the use case's override those,
and the step's override everything. The decisions here are pure functions over values; the
intake applies them and records every refusal and change as an event.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from hashlib import blake2b
from typing import Any

from batchwise.config import Settings
from batchwise.costs.repeats import Repeat
from batchwise.errors import ConfigError

_TAG_KINDS = ("business_unit", "use_case", "step")  # in order of precedence, lowest first
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Policy:
    """The guards that apply to one (use_case, step, business_unit)."""

    max_requests_per_task: int = 200
    max_identical_per_task: int = 5
    #: how many of a task's recent requests one may resemble (`costs.repeats`): more than
    #: `max_identical_per_task`, a resemblance being weaker evidence than a masked equality
    max_similar_per_task: int = 8
    #: estimated Jaccard similarity of word pairs from which two conversation states resemble
    similarity_threshold: float = 0.8
    default_max_tokens: int | None = None
    max_max_tokens: int | None = None
    max_input_tokens: int | None = None
    trim_context: bool = False
    dedupe_window_s: float | None = None
    daily_budget_usd: float | None = None
    monthly_budget_usd: float | None = None
    budget_policy: str = "wait"
    #: who handles what these guards trigger; copied into each event's data as `owner`
    owner: str | None = None
    #: routing: the model to use instead, if a rule matches
    route_to: str | None = None
    #: the tags whose budgets apply, e.g. (("use_case", "support_triage"),)
    budget_tags: tuple[tuple[str, str], ...] = ()

    @property
    def shapes(self) -> bool:
        """Whether this policy may change a request's body."""
        return bool(
            self.default_max_tokens or self.max_max_tokens or self.max_input_tokens or self.route_to
        )

    @property
    def budgeted(self) -> bool:
        return self.daily_budget_usd is not None or self.monthly_budget_usd is not None


_FIELDS = {
    "max_requests_per_task": int, "max_identical_per_task": int, "max_similar_per_task": int,
    "similarity_threshold": float, "default_max_tokens": int,
    "max_max_tokens": int, "max_input_tokens": int, "trim_context": bool,
    "dedupe_window_s": float, "daily_budget_usd": float, "monthly_budget_usd": float,
    "budget_policy": str, "owner": str,
}  # fmt: skip


def _values(where: str, table: Any) -> dict[str, Any]:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table of guard settings")
    values: dict[str, Any] = {}
    for key, value in table.items():
        kind = _FIELDS.get(key)
        if kind is None:
            raise ConfigError(
                f"unknown guard setting {where}.{key} (expected one of {', '.join(_FIELDS)})"
            )
        if kind is bool and not isinstance(value, bool):
            raise ConfigError(f"{where}.{key} must be true or false, not {value!r}")
        if kind in (int, float) and (
            isinstance(value, bool) or not isinstance(value, int | float) or value < 0
        ):
            raise ConfigError(f"{where}.{key} must be a number ≥ 0, not {value!r}")
        if kind is int and value != int(value):
            raise ConfigError(f"{where}.{key} must be a whole number, not {value!r}")
        if key == "similarity_threshold" and not 0 < value <= 1:
            raise ConfigError(f"{where}.similarity_threshold must be above 0 and at most 1")
        if key == "owner" and (not isinstance(value, str) or not value.strip()):
            raise ConfigError(f'{where}.owner must be a team or person, e.g. "team-payments"')
        if key == "budget_policy" and value not in ("wait", "refuse"):
            raise ConfigError(f'{where}.budget_policy must be "wait" or "refuse", not {value!r}')
        values[key] = kind(value)
    return values


@dataclass(frozen=True)
class Rule:
    """A routing rule: requests of this use case (and step, if given) go to `model`."""

    model: str
    use_case: str | None = None
    step: str | None = None


@dataclass
class Guards:
    """All guard settings, with a cache of the policy per tag combination."""

    base: dict[str, Any] = field(default_factory=dict)
    by_tag: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    _cache: dict[tuple[str | None, str | None, str | None], Policy] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> Guards:
        table = settings.extra.get("guards", {})
        if not isinstance(table, Mapping):
            raise ConfigError("[guards] must be a table")
        base: dict[str, Any] = {}
        by_tag: dict[tuple[str, str], dict[str, Any]] = {}
        for key, value in table.items():
            if key in _TAG_KINDS:
                if not isinstance(value, Mapping):
                    raise ConfigError(f"[guards.{key}] must hold one table per {key}")
                for name, sub in value.items():
                    by_tag[(key, name)] = _values(f"guards.{key}.{name}", sub)
            elif key in ("daily_budget_usd", "monthly_budget_usd"):
                raise ConfigError(
                    f"guards.{key}: budgets belong to a tag; put it under "
                    "[guards.use_case.NAME], [guards.step.NAME] or [guards.business_unit.NAME]"
                )
            else:
                base.update(_values("guards", {key: value}))
        return cls(base=base, by_tag=by_tag, rules=_rules(settings.extra.get("routing", {})))

    def _anywhere(self, *keys: str) -> bool:
        """Whether any table sets one of `keys`, so a check is worth running at all."""
        return any(key in v for v in (self.base, *self.by_tag.values()) for key in keys)

    @property
    def dedupe_anywhere(self) -> bool:
        return self._anywhere("dedupe_window_s")

    @property
    def budgets_anywhere(self) -> bool:
        return self._anywhere("daily_budget_usd", "monthly_budget_usd")

    @property
    def shaping_anywhere(self) -> bool:
        """Whether a request's body may be changed (routing, output caps, context budget)."""
        return bool(self.rules) or self._anywhere(
            "default_max_tokens", "max_max_tokens", "max_input_tokens"
        )

    def policy(self, use_case: str | None, step: str | None, business_unit: str | None) -> Policy:
        key = (use_case, step, business_unit)
        hit = self._cache.get(key)
        if hit is None:
            values = dict(self.base)
            budget_tags: list[tuple[str, str]] = []
            for kind, name in zip(_TAG_KINDS, (business_unit, use_case, step), strict=True):
                if name is None:
                    continue
                own = self.by_tag.get((kind, name))
                if own:
                    values.update(own)
                    if "daily_budget_usd" in own or "monthly_budget_usd" in own:
                        budget_tags.append((kind, name))
            route = next((r.model for r in self.rules if _matches(r, use_case, step)), None)
            hit = replace(Policy(**values), route_to=route, budget_tags=tuple(budget_tags))
            self._cache[key] = hit
        return hit


def _matches(rule: Rule, use_case: str | None, step: str | None) -> bool:
    return (rule.use_case is None or rule.use_case == use_case) and (
        rule.step is None or rule.step == step
    )


def _rules(table: Any) -> tuple[Rule, ...]:
    if not table:
        return ()
    rules = table.get("rules") if isinstance(table, Mapping) else None
    if not isinstance(rules, list):
        raise ConfigError("[routing] must hold a list of [[routing.rules]] tables")
    parsed = []
    for i, rule in enumerate(rules, 1):
        if not isinstance(rule, Mapping) or not isinstance(rule.get("model"), str):
            raise ConfigError(f"routing rule {i} needs a model (a string)")
        extra = set(rule) - {"model", "use_case", "step"}
        if extra:
            raise ConfigError(
                f"routing rule {i}: unknown key {sorted(extra)[0]!r} "
                "(expected model, use_case, step)"
            )
        if "use_case" not in rule and "step" not in rule:
            raise ConfigError(f"routing rule {i} matches everything: give a use_case or a step")
        parsed.append(Rule(rule["model"], rule.get("use_case"), rule.get("step")))
    return tuple(parsed)


# --- shaping a request's body ------------------------------------------------------------


@dataclass(frozen=True)
class Shaped:
    body: dict[str, Any]
    model: str
    #: what was changed, one phrase each, for the event log
    changes: tuple[str, ...] = ()
    #: set when the request must be refused, with the reason
    refusal: str | None = None


def estimate_tokens(body: Mapping[str, Any]) -> int:
    """A rough input size: about four characters a token over the prompt's text."""
    return len(_prompt_text(body)) // 4 + 4 * len(body.get("messages") or [])


def _prompt_text(body: Mapping[str, Any]) -> str:
    parts: list[str] = []
    system = body.get("system")
    if isinstance(system, str):
        parts.append(system)
    elif isinstance(system, list):
        parts.extend(str(b.get("text", "")) for b in system if isinstance(b, Mapping))
    for message in body.get("messages") or []:
        parts.append(_content_text(message.get("content") if isinstance(message, Mapping) else ""))
    if "input" in body:
        parts.append(str(body["input"]))
    if "prompt" in body:  # a legacy completions body
        parts.append(str(body["prompt"]))
    instruction = body.get("systemInstruction")  # a Gemini body
    for content in [instruction, *(body.get("contents") or [])]:
        if isinstance(content, Mapping):
            parts.append(_content_text(content.get("parts")))
    return "".join(parts)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(b.get("text", "")) for b in content if isinstance(b, Mapping))
    return ""


_CAP_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
#: endpoints whose answers have no output tokens to cap
_UNCAPPED = frozenset({"/v1/embeddings", "/v1/moderations"})


def shape(policy: Policy, provider: str, endpoint: str, model: str, body: dict[str, Any]) -> Shaped:
    """Apply routing, output caps and the context budget to a body (a new dict if changed)."""
    changes: list[str] = []
    if policy.route_to and policy.route_to != model:
        routed = f"models/{policy.route_to}" if provider == "gemini" else policy.route_to
        body = {**body, "model": routed}
        changes.append(f"routed {model} → {policy.route_to}")
        model = policy.route_to
    if provider == "gemini":
        body = _cap_gemini(policy, body, changes)
    elif endpoint not in _UNCAPPED and (policy.default_max_tokens or policy.max_max_tokens):
        key = next((k for k in _CAP_KEYS if k in body), None)
        if key is None:
            key = "max_output_tokens" if endpoint == "/v1/responses" else "max_tokens"
            if policy.default_max_tokens:
                body = {**body, key: policy.default_max_tokens}
                changes.append(f"{key} set to the default {policy.default_max_tokens}")
        cap = body.get(key)
        if policy.max_max_tokens and isinstance(cap, int) and cap > policy.max_max_tokens:
            body = {**body, key: policy.max_max_tokens}
            changes.append(f"{key} capped {cap} → {policy.max_max_tokens}")
    if policy.max_input_tokens:
        size = estimate_tokens(body)
        if size > policy.max_input_tokens:
            trimmed = trim_context(body, policy.max_input_tokens) if policy.trim_context else None
            if trimmed is None:
                return Shaped(
                    body,
                    model,
                    tuple(changes),
                    refusal=(
                        f"input of about {size:,} tokens is over the context budget of "
                        f"{policy.max_input_tokens:,} tokens"
                        + ("" if policy.trim_context else " (set trim_context to trim old turns)")
                    ),
                )
            body, dropped = trimmed
            changes.append(
                f"trimmed the {dropped} oldest turn(s): about {size:,} → "
                f"{estimate_tokens(body):,} tokens (budget {policy.max_input_tokens:,})"
            )
    return Shaped(body, model, tuple(changes))


def _cap_gemini(policy: Policy, body: dict[str, Any], changes: list[str]) -> dict[str, Any]:
    """Output caps for a Gemini body: `generationConfig.maxOutputTokens`."""
    raw = body.get("generationConfig")
    config = dict(raw) if isinstance(raw, Mapping) else {}
    cap = config.get("maxOutputTokens")
    key = "generationConfig.maxOutputTokens"
    if cap is None and policy.default_max_tokens:
        cap = config["maxOutputTokens"] = policy.default_max_tokens
        changes.append(f"{key} set to the default {cap}")
    if policy.max_max_tokens and isinstance(cap, int) and cap > policy.max_max_tokens:
        config["maxOutputTokens"] = policy.max_max_tokens
        changes.append(f"{key} capped {cap} → {policy.max_max_tokens}")
    return {**body, "generationConfig": config} if config != raw and config else body


def trim_context(body: dict[str, Any], budget: int) -> tuple[dict[str, Any], int] | None:
    """Drop the oldest conversation turns until the body fits, never the system prompt (the
    `system` field or leading system messages) nor the last user turn. None if it can't fit."""
    messages = list(body.get("messages") or [])
    head = 0
    while (
        head < len(messages)
        and isinstance(messages[head], Mapping)
        and messages[head].get("role") in ("system", "developer")
    ):
        head += 1
    last_user = max(
        (i for i, m in enumerate(messages) if isinstance(m, Mapping) and m.get("role") == "user"),
        default=len(messages) - 1,
    )
    dropped = 0
    while head < last_user and estimate_tokens({**body, "messages": messages}) > budget:
        del messages[head]
        last_user -= 1
        dropped += 1
        # an assistant turn left without the user turn it answered goes too
        while (
            head < last_user
            and isinstance(messages[head], Mapping)
            and messages[head].get("role") != "user"
        ):
            del messages[head]
            last_user -= 1
            dropped += 1
    trimmed = {**body, "messages": messages}
    if dropped == 0 or estimate_tokens(trimmed) > budget:
        return None
    return trimmed, dropped


# --- repetition ---------------------------------------------------------------------------


def loose_key(canonical_body: str) -> str:
    """The body without any whitespace: "the same body modulo whitespace"."""
    return _WHITESPACE.sub("", canonical_body)


#: `requests.loop_key` of a task's request whose key is not worked out yet: it counts toward
#: its task's requests, and gets its key the first time its task could pass a repeat limit
#: (`intake.guarding`). No key is ever UNKEYED: `loop_key` never returns it.
UNKEYED = 0


def loop_key(canonical_body: bytes) -> int:
    """64 bits standing for `loose_key` of a canonical (orjson, sorted keys) body, as stored in
    `requests.loop_key`: two bodies the same modulo whitespace share it. Never `UNKEYED`.

    Canonical JSON escapes every control character, so an ASCII body's only whitespace is the
    space: removing it is `loose_key` at a fraction of a regular expression's cost.
    """
    loose = (
        canonical_body.replace(b" ", b"")
        if canonical_body.isascii()
        else loose_key(canonical_body.decode()).encode()
    )
    return int.from_bytes(blake2b(loose, digest_size=8).digest(), "big", signed=True) or 1


@dataclass
class TaskCount:
    """What a task has asked for so far, during one submission."""

    requests: int = 0
    bodies: dict[str, int] = field(default_factory=dict)


def loop_refusal(
    policy: Policy, task_id: str, requests: int, identical: int, *, earlier: int | None = None
) -> str | None:
    """The refusal reason for one more request of a task that already counts `requests`
    requests, `identical` of them the same as this one (modulo whitespace), the latest being
    request `earlier`; None if it passes. Requests a guard refused do not count."""
    if requests + 1 > policy.max_requests_per_task:
        return (
            f"task {task_id!r} reached its limit of {policy.max_requests_per_task} requests "
            "(a runaway loop?); raise max_requests_per_task in [guards] to allow more"
        )
    if identical + 1 > policy.max_identical_per_task:
        return (
            f"task {task_id!r} sent the same request {policy.max_identical_per_task} times "
            f"already{_repeats(earlier)} (pattern: exact; a repeating loop?); raise "
            "max_identical_per_task in [guards] to allow more"
        )
    return None


def near_repeat_refusal(
    policy: Policy, task_id: str, normalised: Repeat | None, similar: Repeat | None
) -> str | None:
    """The refusal reason for a request of a task whose recent requests it repeats with only
    counters, times or ids changed (`normalised`) or nearly (`similar`); None if it passes
    (see `costs.repeats.near_repeats`)."""
    if normalised is not None and normalised.count >= policy.max_identical_per_task:
        return (
            f"task {task_id!r} sent the same request with only counters, times or ids changed "
            f"{normalised.count} times already{_repeats(normalised.request_id)} (pattern: "
            f"normalised{_cycle(normalised)}; a retry loop?); raise max_identical_per_task in "
            "[guards] to allow more"
        )
    if similar is not None and similar.count >= policy.max_similar_per_task:
        return (
            f"task {task_id!r} sent {similar.count} requests at least "
            f"{policy.similarity_threshold:.0%} similar to this one among its recent ones"
            f"{_repeats(similar.request_id)} (pattern: similar{_cycle(similar)}; not "
            "progressing?); raise max_similar_per_task or similarity_threshold in [guards] to "
            "allow more"
        )
    return None


def _repeats(earlier: int | None) -> str:
    return "" if earlier is None else f", latest as request {earlier}"


def _cycle(repeat: Repeat) -> str:
    return "" if repeat.period == 1 else f", a cycle of {repeat.period} states"


def check_task(policy: Policy, task_id: str, seen: TaskCount, canonical_body: str) -> str | None:
    """Count one more request of a task; the refusal reason if a loop limit is crossed."""
    key = loose_key(canonical_body)
    reason = loop_refusal(policy, task_id, seen.requests, seen.bodies.get(key, 0))
    if reason is None:
        seen.requests += 1
        seen.bodies[key] = seen.bodies.get(key, 0) + 1
    return reason


# --- budgets ------------------------------------------------------------------------------


def period_starts(now: datetime) -> tuple[datetime, datetime, datetime, datetime]:
    """(start of today, start of tomorrow, start of this month, start of next month), UTC."""
    now = now.astimezone(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    month = day.replace(day=1)
    next_month = month.replace(year=month.year + (month.month == 12), month=month.month % 12 + 1)
    return day, day + timedelta(days=1), month, next_month
