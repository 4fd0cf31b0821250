"""Anomaly alerts: a workflow step whose tokens or cost in an hour jump far above its own
recent hours, reported minutes after the hour instead of on next month's invoice.

Settings, in the `[alerts]` table of the settings file (all optional):

    [alerts]
    enabled = true
    factor = 3.0               # tokens or cost alert above factor × their baseline …
    min_tokens = 10000         # … tokens only from this many in the hour,
    min_cost_usd = 0.10        # … cost only from this much, so tiny steps never alert
    baseline_hours = 24        # the trailing window the baseline is taken over
    min_baseline_hours = 3     # hours with traffic needed before a step is judged at all
    baseline = "median"        # or "mean"
    webhook_url = "https://hooks.example.com/…"   # also POST each alert here as JSON
    task_factor = 2.0          # per workflow and task: see `costs.task_alerts`
    task_window_hours = 24
    task_baseline_days = 7
    min_tasks = 5
    runaway_factor = 3.0
    owner = "team-platform"    # who handles an alert: in its event's data and the webhook

    [alerts.use_case.payments] # the owner of a use case's alerts (cost per task, runaway task)
    owner = "team-payments"
    [alerts.step.classify]     # the owner of a step's hourly alerts
    owner = "team-triage"

The decision (`detect`) is a pure function over hourly figures. `check_anomalies` reads them
from the ledger, records each anomaly once per (step, hour) as an `anomaly` event, logs it and
posts it to the webhook. `tick` is what the scheduler calls: it checks once an hour at most,
`SETTLE` after the hour ends.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from batchwise.config import Settings
from batchwise.costs.ledger import Kind
from batchwise.costs.pricing import NANO_PER_USD, format_usd
from batchwise.costs.savings import task_costs
from batchwise.costs.task_alerts import TaskAlert, detect_tasks
from batchwise.errors import ConfigError
from batchwise.store import reports as store_reports
from batchwise.store.engine import Store
from batchwise.store.events import record_event

if TYPE_CHECKING:
    import httpx
    from sqlalchemy.engine import Connection

__all__ = [
    "ANOMALY_KIND",
    "WEBHOOK_FAILED_KIND",
    "Alert",
    "AlertSettings",
    "Anomaly",
    "check_anomalies",
    "detect",
    "hourly_usage",
    "last_complete_hour",
    "tick",
]

log = logging.getLogger(__name__)

#: the `events.kind` of an anomaly alert
ANOMALY_KIND = "anomaly"
#: the `events.kind` recorded when the webhook could not take an alert
WEBHOOK_FAILED_KIND = "alert_webhook_failed"
#: the scheduler waits for the webhook at most this long per alert
WEBHOOK_TIMEOUT_S = 5.0
#: PostgreSQL advisory lock key that makes "record unless recorded" atomic across processes
_LOCK_KEY = 0x616C7274  # "alrt"
_HOUR = timedelta(hours=1)
#: an hour is complete this long after it ends: a reconcile stamps a batch's ledger entries
#: with the time it started and may commit the last of them minutes later
SETTLE = timedelta(minutes=10)
_STATISTICS = ("median", "mean")

#: a workflow step tag; None groups the requests sent without one
Step = str | None
#: one hour of one step: (start of the hour in UTC, tokens, cost in nano-USD)
HourFigures = tuple[datetime, int, int]


@dataclass(frozen=True)
class AlertSettings:
    """The validated `[alerts]` table."""

    enabled: bool = True
    factor: float = 3.0
    min_tokens: int = 10_000
    min_cost_nusd: int = NANO_PER_USD // 10
    baseline_hours: int = 24
    min_baseline_hours: int = 3
    #: median (robust to an earlier spike in the window) or mean
    baseline: str = "median"
    #: kept out of repr: chat webhooks carry their credential in the path
    webhook_url: str | None = field(default=None, repr=False)
    #: per workflow and task (`costs.task_alerts`)
    task_factor: float = 2.0
    task_window_hours: int = 24
    task_baseline_days: int = 7
    min_tasks: int = 5
    runaway_factor: float = 3.0
    #: who handles an alert, globally and per ("use_case" | "step", name)
    owner: str | None = None
    owners: Mapping[tuple[str, str], str] = field(default_factory=dict)

    def owner_of(self, alert: Alert) -> str | None:
        """The owner a use case's or step's table names, else the global one."""
        if isinstance(alert, Anomaly):
            tag = None if alert.step is None else ("step", alert.step)
        else:
            tag = None if alert.use_case is None else ("use_case", alert.use_case)
        return (self.owners.get(tag) if tag else None) or self.owner

    @classmethod
    def from_settings(cls, settings: Settings) -> AlertSettings:
        """Parse `settings.extra["alerts"]`; a wrong or unknown key is a `ConfigError` naming it,
        so a typo never silently leaves alerts on their defaults."""
        table = settings.extra.get("alerts", {})
        if not isinstance(table, Mapping):
            raise ConfigError("[alerts] must be a table of alert settings")
        values: dict[str, Any] = {}
        owners: dict[tuple[str, str], str] = {}
        for key, value in table.items():
            if key in _OWNED_TAGS:
                owners.update(_owners(key, value))
            else:
                values.update(_parse(key, value))
        values["owners"] = owners
        config = cls(**values)
        if config.min_baseline_hours > config.baseline_hours:
            raise ConfigError(
                f"alerts.min_baseline_hours ({config.min_baseline_hours}) must not exceed "
                f"alerts.baseline_hours ({config.baseline_hours})"
            )
        return config


#: the tags an `[alerts.TAG.NAME]` table may name an owner for (alerts carry no business unit)
_OWNED_TAGS = ("use_case", "step")


def _owner(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f'{name} must be a team or person, e.g. "team-payments"')
    return value


def _owners(kind: str, tables: Any) -> dict[tuple[str, str], str]:
    if not isinstance(tables, Mapping):
        raise ConfigError(f"[alerts.{kind}] must hold one table per {kind}")
    owners: dict[tuple[str, str], str] = {}
    for name, table in tables.items():
        where = f"alerts.{kind}.{name}"
        if not isinstance(table, Mapping) or set(table) - {"owner"}:
            raise ConfigError(f"[{where}] holds only owner")
        if "owner" in table:
            owners[(kind, name)] = _owner(f"{where}.owner", table["owner"])
    return owners


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number, not {value!r}")
    return float(value)


def _whole(name: str, value: Any, *, low: int, high: int | None = None) -> int:
    number = _number(name, value)
    if number != int(number) or number < low or (high is not None and number > high):
        bounds = f"from {low} to {high}" if high is not None else f"≥ {low}"
        raise ConfigError(f"{name} must be a whole number {bounds}, not {value!r}")
    return int(number)


_KEYS = (
    "enabled", "factor", "min_tokens", "min_cost_usd", "baseline_hours", "min_baseline_hours",
    "baseline", "webhook_url", "task_factor", "task_window_hours", "task_baseline_days",
    "min_tasks", "runaway_factor", "owner", *_OWNED_TAGS,
)  # fmt: skip


def _parse(key: str, value: Any) -> dict[str, Any]:
    """One `[alerts]` entry as AlertSettings fields."""
    name = f"alerts.{key}"
    match key:
        case "enabled":
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be true or false, not {value!r}")
            return {key: value}
        case "factor" | "task_factor" | "runaway_factor":
            if _number(name, value) <= 1:
                raise ConfigError(f"{name} must be greater than 1 (e.g. 3 for 3× the baseline)")
            return {key: float(value)}
        case "min_tokens":
            return {key: _whole(name, value, low=0)}
        case "min_cost_usd":
            if _number(name, value) < 0:
                raise ConfigError(f"{name} must be a number ≥ 0 (US dollars), not {value!r}")
            return {"min_cost_nusd": int(Decimal(str(value)) * NANO_PER_USD)}
        case "baseline_hours" | "task_window_hours":
            return {key: _whole(name, value, low=1, high=24 * 30)}
        case "task_baseline_days":
            return {key: _whole(name, value, low=1, high=365)}
        case "min_tasks":
            return {key: _whole(name, value, low=1)}
        case "min_baseline_hours":
            return {key: _whole(name, value, low=1)}
        case "baseline":
            if value not in _STATISTICS:
                raise ConfigError(f'{name} must be "median" or "mean", not {value!r}')
            return {key: value}
        case "webhook_url":
            return {key: _webhook_url(name, value)}
        case "owner":
            return {key: _owner(name, value)}
    raise ConfigError(f"unknown setting {name} (expected one of {', '.join(sorted(_KEYS))})")


def _webhook_url(name: str, value: Any) -> str | None:
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be an http(s) URL string")
    if not value:
        return None
    import httpx

    try:
        url: httpx.URL | None = httpx.URL(value)
    except httpx.InvalidURL:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        # the value itself is not echoed: it may hold the webhook's credential
        raise ConfigError(f"{name} must be an http:// or https:// URL with a host")
    return value


# --- the decision ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Anomaly:
    """One step's hour whose tokens and/or cost exceeded factor × its baseline."""

    step: Step
    #: start of the hour, UTC
    hour: datetime
    tokens: int
    cost_nusd: int
    baseline_tokens: int
    baseline_cost_nusd: int
    #: how many hours with traffic the baseline was taken over
    baseline_hours: int
    statistic: str
    factor: float
    #: which figures alerted: "tokens", "cost" or both
    exceeded: tuple[str, ...]

    @property
    def step_name(self) -> str:
        return "(none)" if self.step is None else repr(self.step)

    @property
    def label(self) -> str:
        return f"step {self.step_name}"

    @property
    def key(self) -> tuple[str, str | None, str]:
        """(alert, subject, hour): recorded once each."""
        return ("step", self.step, self.hour.isoformat())

    def key_data(self) -> dict[str, Any]:
        return {"step": self.step, "hour": self.hour.isoformat()}

    @property
    def message(self) -> str:
        what = " and ".join(self.exceeded)
        return (
            f"step {self.step_name}: {what} in the hour {self.hour:%Y-%m-%d %H:00} UTC "
            f"exceeded {self.factor:g}× the baseline: "
            f"{self.tokens:,} tokens vs {self.baseline_tokens:,} "
            f"({_ratio(self.tokens, self.baseline_tokens)}), "
            f"${format_usd(self.cost_nusd)} vs ${format_usd(self.baseline_cost_nusd)} "
            f"({_ratio(self.cost_nusd, self.baseline_cost_nusd)}); baseline = {self.statistic} of "
            f"{self.baseline_hours} hour(s) with traffic"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "hour": self.hour.isoformat(),
            "tokens": self.tokens,
            "cost_nusd": self.cost_nusd,
            "cost_usd": format_usd(self.cost_nusd),
            "baseline_tokens": self.baseline_tokens,
            "baseline_cost_nusd": self.baseline_cost_nusd,
            "baseline_cost_usd": format_usd(self.baseline_cost_nusd),
            "baseline_hours": self.baseline_hours,
            "statistic": self.statistic,
            "factor": self.factor,
            "exceeded": list(self.exceeded),
        }


#: every alert `check_anomalies` records: a step's hour, a use case's cost per task, a live task
Alert = Anomaly | TaskAlert


def _ratio(value: int, baseline: int) -> str:
    return f"{value / baseline:.1f}×" if baseline else "baseline 0"


def last_complete_hour(now: datetime) -> datetime:
    """Start of the last UTC hour that ended at least `SETTLE` before `now`."""
    return (now - SETTLE).astimezone(UTC).replace(minute=0, second=0, microsecond=0) - _HOUR


def detect(
    hourly: Mapping[Step, Sequence[HourFigures]], now: datetime, settings: AlertSettings
) -> list[Anomaly]:
    """The steps whose last complete hour before `now` exceeded `factor` × their baseline.

    The baseline is the median (or mean) of the step's hours with traffic among the
    `baseline_hours` before that hour; hours without traffic are left out so a step that runs
    twice a day is compared with its runs, not with its silence. A figure alerts only above
    its floor too (`min_tokens`, `min_cost_nusd`). Hours outside the window are ignored.
    """
    target = last_complete_hour(now)
    window_start = target - settings.baseline_hours * _HOUR
    average = statistics.median if settings.baseline == "median" else statistics.fmean
    found: list[Anomaly] = []
    for step, hours in hourly.items():
        current = [(t, c) for h, t, c in hours if h == target]
        history = [(t, c) for h, t, c in hours if window_start <= h < target and (t or c)]
        if not current or len(history) < settings.min_baseline_hours:
            continue
        tokens, cost = sum(t for t, _ in current), sum(c for _, c in current)
        base_tokens = round(average([t for t, _ in history]))
        base_cost = round(average([c for _, c in history]))
        exceeded = tuple(
            name
            for name, value, base, floor in (
                ("tokens", tokens, base_tokens, settings.min_tokens),
                ("cost", cost, base_cost, settings.min_cost_nusd),
            )
            if value >= floor and value > settings.factor * base
        )
        if exceeded:
            found.append(
                Anomaly(
                    step=step,
                    hour=target,
                    tokens=tokens,
                    cost_nusd=cost,
                    baseline_tokens=base_tokens,
                    baseline_cost_nusd=base_cost,
                    baseline_hours=len(history),
                    statistic=settings.baseline,
                    factor=settings.factor,
                    exceeded=exceeded,
                )
            )
    return sorted(found, key=lambda a: (a.step is not None, a.step or ""))


# --- the store side --------------------------------------------------------------------------


def hourly_usage(store: Store, *, start: datetime, end: datetime) -> dict[Step, list[HourFigures]]:
    """Tokens (input + output) and actual cost per step and UTC hour for ledger entries in
    [start, end), summed in the database. Unpriced entries count their tokens and no cost;
    dedupe entries count nothing (their tokens were answered from the store, not sent)."""
    hourly: dict[Step, list[HourFigures]] = {}
    with store.read() as conn:
        rows = store_reports.hourly_usage(conn, start=start, end=end, skip_kind=Kind.DEDUPE.value)
    for step, hour, tokens, cost in rows:
        hourly.setdefault(step, []).append((hour, tokens, cost))
    for hours in hourly.values():
        hours.sort()
    return hourly


def check_anomalies(
    store: Store,
    *,
    now: datetime,
    settings: Settings,
    http_client: httpx.Client | None = None,
) -> list[Alert]:
    """Check the last complete hour; record, log and post each alert not recorded before:
    the steps' hourly anomalies, then the use cases' cost per task and the runaway live tasks
    (`costs.task_alerts`).

    Returns only the alerts this call recorded, so running it twice alerts once. A failing
    webhook is logged and recorded as an event, never raised.
    """
    config = AlertSettings.from_settings(settings)
    if not config.enabled:
        return []
    target = last_complete_hour(now)
    hourly = hourly_usage(store, start=target - config.baseline_hours * _HOUR, end=target + _HOUR)
    anomalies: list[Alert] = [*detect(hourly, now, config)]
    anomalies += detect_tasks(task_costs(store), hour=target, settings=config)
    if not anomalies:
        return []
    new = _record_new(store, anomalies, now=now, config=config)
    for anomaly in new:
        log.warning("anomaly: %s", anomaly.message)
    if new and config.webhook_url:
        _post_all(store, new, url=config.webhook_url, now=now, client=http_client, config=config)
    return new


def _record_new(
    store: Store, anomalies: Sequence[Alert], *, now: datetime, config: AlertSettings
) -> list[Alert]:
    """Insert the alerts not yet recorded for their (alert, subject, hour), in one transaction.

    The events table has no key for this, so the check and the insert are serialised: SQLite
    writes start with BEGIN IMMEDIATE, PostgreSQL takes a transaction-scoped advisory lock.
    """
    with store.write() as conn:
        store_reports.serialise(conn, _LOCK_KEY)
        seen = _recorded(conn, since=min(a.hour for a in anomalies))
        new = [a for a in anomalies if a.key not in seen]
        for anomaly in new:
            record_event(
                conn,
                at=now,
                kind=ANOMALY_KIND,
                severity="alert",
                message=anomaly.message,
                data=_owned(anomaly.as_dict(), config.owner_of(anomaly)),
            )
    return new


def _owned(data: dict[str, Any], owner: str | None) -> dict[str, Any]:
    return {**data, "owner": owner} if owner else data


def _recorded(conn: Connection, *, since: datetime) -> set[tuple[str, str | None, str]]:
    """(alert, subject, hour) of anomaly events recorded at or after `since` (an hour's alert
    is always recorded after the hour began); a step's alert is ("step", step, hour)."""
    return {
        (
            str(data.get("alert", "step")),
            data.get("subject", data.get("step")),
            str(data.get("hour")),
        )
        for data in store_reports.event_data_since(conn, kind=ANOMALY_KIND, since=since)
    }


def _post_all(
    store: Store,
    anomalies: Sequence[Alert],
    *,
    url: str,
    now: datetime,
    client: httpx.Client | None,
    config: AlertSettings,
) -> None:
    import httpx

    if client is None:
        with httpx.Client(timeout=WEBHOOK_TIMEOUT_S) as own:
            _post_all(store, anomalies, url=url, now=now, client=own, config=config)
        return
    for anomaly in anomalies:
        owner = config.owner_of(anomaly)
        error = _post(client, url, anomaly, owner=owner)
        if error is not None:
            _record_webhook_failure(store, anomaly, error=error, url=url, now=now, owner=owner)


def _post(client: httpx.Client, url: str, anomaly: Alert, *, owner: str | None) -> str | None:
    """POST one alert; the failure in words (with no part of the URL's path), or None."""
    payload = {
        "kind": ANOMALY_KIND,
        "severity": "alert",
        "text": anomaly.message,  # what Slack-style incoming webhooks display
        **anomaly.as_dict(),
        "owner": owner,  # always present, null when no table names one
    }
    try:
        response = client.post(url, json=payload, timeout=WEBHOOK_TIMEOUT_S)
    except Exception as exc:  # any failure here must stay out of the scheduler
        return f"{type(exc).__name__}: {str(exc).replace(url, _safe_url(url))}"
    if response.is_success:
        return None
    return f"HTTP {response.status_code}"


def _safe_url(url: str) -> str:
    """Scheme and host only: a webhook's path and query often are its credential."""
    import httpx

    parsed = httpx.URL(url)
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{parsed.host}{port}/…"


def _record_webhook_failure(
    store: Store, anomaly: Alert, *, error: str, url: str, now: datetime, owner: str | None
) -> None:
    message = (
        f"the alert for {anomaly.label} in the hour {anomaly.hour:%Y-%m-%d %H:00} UTC "
        f"could not be posted to the webhook at {_safe_url(url)}: {error}"
    )
    log.warning("%s", message)
    try:
        with store.write() as conn:
            record_event(
                conn,
                at=now,
                kind=WEBHOOK_FAILED_KIND,
                severity="warning",
                message=message,
                data=_owned({**anomaly.key_data(), "error": error}, owner),
            )
    except Exception:
        log.exception("could not record the webhook failure")


# --- the scheduler's hook --------------------------------------------------------------------


#: the last hour checked, per store object: in practice once per process (a store lives as
#: long as its process's scheduler or worker runtime), and nothing outlives the store
_checked: WeakKeyDictionary[Store, datetime] = WeakKeyDictionary()


def tick(store: Store, *, settings: Settings, now: datetime) -> list[Alert]:
    """Check the last complete hour if this process has not yet; the scheduler calls this every
    tick. Costs a dictionary look-up when nothing is due, and never raises: a broken `[alerts]`
    table or a failed check is logged, and batch work goes on."""
    hour = last_complete_hour(now)
    last = _checked.get(store)
    if last is not None and last >= hour:
        return []
    try:
        found = check_anomalies(store, now=now, settings=settings)
    except ConfigError as exc:
        # reported once an hour rather than every tick, until someone fixes the file
        log.error("anomaly alerts are skipped until the settings are fixed: %s", exc)
        found = []
    except Exception:
        log.exception("the anomaly check failed; it is retried next tick")
        return []
    _checked[store] = hour
    return found
