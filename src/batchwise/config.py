"""Settings: read once from the environment and an optional TOML file, then passed around.

Precedence is explicit argument > environment > settings file > default. The environment is read
here and in the CLI only. API keys are kept out of `repr` so they never reach a log line.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from batchwise.errors import ConfigError

DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
DEFAULT_ANTHROPIC_BASE_URL = "https://api.anthropic.com"
#: the Gemini API's root, without its version (as `GOOGLE_GEMINI_BASE_URL` gives it to the SDK)
DEFAULT_GEMINI_BASE_URL = "https://generativelanguage.googleapis.com"


def _secret_repr(value: str | None) -> str:
    return "None" if value is None else "'***'"


@dataclass(frozen=True)
class Settings:
    """Every tunable of batchwise, with defaults that work offline on one laptop."""

    home: Path = field(default_factory=lambda: Path.home() / ".batchwise")
    #: SQLAlchemy URL; None means a SQLite file `batchwise.db` in `home`
    database_url: str | None = None
    #: Celery broker URL; None means embedded mode (no Redis, in-process runner)
    broker_url: str | None = None
    openai_api_key: str | None = field(default=None, repr=False)
    openai_base_url: str = DEFAULT_OPENAI_BASE_URL
    anthropic_api_key: str | None = field(default=None, repr=False)
    anthropic_base_url: str = DEFAULT_ANTHROPIC_BASE_URL
    #: from GOOGLE_API_KEY, else GEMINI_API_KEY (the google-genai SDK's order)
    gemini_api_key: str | None = field(default=None, repr=False)
    gemini_base_url: str = DEFAULT_GEMINI_BASE_URL
    #: IANA zone for `by HH:MM` tolerances; None means the machine's local zone
    timezone: str | None = None

    # --- cron jobs ([jobs]) -------------------------------------------------------------------
    #: folder of cron job modules: BATCHWISE_JOBS_DIR, else `[jobs] folder`; None means ./jobs
    jobs_dir: Path | None = None
    #: where jobs write their reports (`[jobs] output_dir`); None means `home / "reports"`
    jobs_output_dir: Path | None = None
    #: an occurrence this late (seconds) still runs on time; older ones were missed and follow
    #: the job's catch-up policy (`[jobs] grace_s`)
    jobs_grace_s: float = 300.0
    #: each job's own settings, by job name (the `[jobs.NAME]` tables), given to its `Run`
    job_tables: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    # --- classification -------------------------------------------------------------------
    #: expected batch turnaround per provider before the store has history (seconds)
    turnaround_prior_s: Mapping[str, float] = field(
        default_factory=lambda: {"openai": 7200.0, "anthropic": 7200.0, "gemini": 7200.0}
    )
    #: percentile of observed turnarounds used once there is history
    turnaround_percentile: float = 0.95
    #: observed batches needed before history replaces the prior
    turnaround_min_history: int = 5
    #: time kept in reserve to rescue a late batch through the realtime lane (seconds)
    rescue_margin_s: float = 900.0
    #: assume the provider's full 24 h window instead of observed turnaround
    strict: bool = False
    #: the provider's guaranteed completion window (seconds)
    completion_window_s: float = 86400.0
    #: the deadline a `realtime` request is held to: answered within this many seconds
    realtime_deadline_s: float = 60.0
    #: OpenAI models served at the flex tier (`service_tier: "flex"`): a name matches itself,
    #: its dated snapshots and its family (`gpt-5` matches `gpt-5-mini` and `gpt-5.1`)
    flex_models: tuple[str, ...] = ("o3", "o4-mini", "gpt-5")
    #: a request too near its deadline for a batch goes to the flex lane if at least this many
    #: seconds are left (room for a slow call, refusals and the fallback)
    flex_min_s: float = 600.0
    #: with less than this left before its deadline, a flex request is called at the standard
    #: tier instead (seconds)
    flex_fallback_s: float = 120.0

    # --- packing and the scheduler ------------------------------------------------------------
    #: a group is flushed once its oldest request has waited this long (seconds)
    max_wait_s: float = 600.0
    #: period of the scheduler tick (seconds)
    tick_interval_s: float = 30.0
    #: tries per request (batch lines and realtime calls) before it fails with its last error
    max_attempts: int = 3
    #: enqueued-token budget per model for in-flight batches; models not listed use the default
    inflight_token_budget: Mapping[str, int] = field(default_factory=dict)
    #: one limit for every model not listed; 0: each model's documented tier default
    #: (`lifecycle.capacity.TIER_DEFAULTS`), else none until the provider refuses a batch
    default_inflight_token_budget: int = 0
    #: realtime calls in flight at once, per process
    realtime_concurrency: int = 8
    #: how long a claim on a row lasts unless its holder renews it (seconds). A live holder's
    #: heartbeat renews it every third of this, however long the work; a dead holder's work is
    #: taken over this long after it stopped (at once when it ran on this host)
    lease_s: float = 30.0

    # --- provider calls ([providers]): overall deadlines, retries included ---------------------
    #: polls, creates, lists and cancels (seconds)
    provider_timeout_s: float = 60.0
    #: one realtime call, as the SDKs allow (seconds)
    realtime_timeout_s: float = 600.0
    #: an upload or download fails after this long without a byte moving (seconds) ...
    transfer_stall_timeout_s: float = 60.0
    #: ... or after this long in all (seconds)
    transfer_timeout_s: float = 3600.0
    #: after SIGTERM or Ctrl-C, `batchwise worker` waits this long for running tasks, then
    #: cancels them (they are taken up again); `run` and `demo` abandon calls at once (seconds)
    shutdown_timeout_s: float = 3.0

    # --- pricing ---------------------------------------------------------------------------
    #: batch price as a fraction of realtime, where the price table has no batch variant
    batch_discount: Mapping[str, float] = field(
        default_factory=lambda: {"openai": 0.5, "anthropic": 0.5, "gemini": 0.5}
    )
    #: negotiated rates: "provider:model" -> {"input_mtok": ..., "output_mtok": ..., ...}
    price_overrides: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    #: the raw settings-file tables of the modules that parse their own sections
    #: (`[guards]`, `[routing]`, `[alerts]`)
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.extra) - _OWN_SECTIONS)
        if unknown:
            hint = ""
            if "jobs" in unknown:
                hint = " ([jobs] is jobs_dir, jobs_output_dir, jobs_grace_s and job_tables)"
            raise ConfigError(
                f"Settings.extra holds only the {', '.join(sorted(_OWN_SECTIONS))} tables, "
                f"not {unknown[0]!r}{hint}"
            )

    def __repr__(self) -> str:
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.repr)
        return (
            f"Settings({shown}, openai_api_key={_secret_repr(self.openai_api_key)}, "
            f"anthropic_api_key={_secret_repr(self.anthropic_api_key)}, "
            f"gemini_api_key={_secret_repr(self.gemini_api_key)})"
        )

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home / 'batchwise.db'}"

    @property
    def embedded(self) -> bool:
        return not self.broker_url

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with some fields changed; `None` values are ignored."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, config_file: Path | None = None
    ) -> Settings:
        """Build settings from the environment and the settings file it points to.

        The file is `BATCHWISE_CONFIG` if set, else `$BATCHWISE_HOME/config.toml` if present.
        """
        env = os.environ if env is None else env
        home = Path(env.get("BATCHWISE_HOME") or Path.home() / ".batchwise").expanduser()
        path = config_file or (
            Path(env["BATCHWISE_CONFIG"]).expanduser()
            if env.get("BATCHWISE_CONFIG")
            else home / "config.toml"
        )
        values: dict[str, Any] = {"home": home}
        if path.exists():
            values.update(_load_file(path))
        elif config_file is not None or env.get("BATCHWISE_CONFIG"):
            raise ConfigError(f"settings file {path} does not exist (set by BATCHWISE_CONFIG)")
        for key, name in (
            ("database_url", "BATCHWISE_DATABASE_URL"),
            ("broker_url", "BATCHWISE_BROKER_URL"),
            ("timezone", "BATCHWISE_TIMEZONE"),
            ("openai_api_key", "OPENAI_API_KEY"),
            ("openai_base_url", "OPENAI_BASE_URL"),
            ("anthropic_api_key", "ANTHROPIC_API_KEY"),
            ("anthropic_base_url", "ANTHROPIC_BASE_URL"),
            ("gemini_base_url", "GOOGLE_GEMINI_BASE_URL"),
        ):
            if env.get(name):
                values[key] = env[name]
        gemini_key = env.get("GOOGLE_API_KEY") or env.get("GEMINI_API_KEY")
        if gemini_key:
            values["gemini_api_key"] = gemini_key
        if env.get("BATCHWISE_JOBS_DIR"):
            values["jobs_dir"] = Path(env["BATCHWISE_JOBS_DIR"]).expanduser()
        if env.get("BATCHWISE_STRICT"):
            values["strict"] = env["BATCHWISE_STRICT"].lower() in {"1", "true", "yes", "on"}
        return cls(**values)


_SECTIONS = {
    "classifier": {
        "turnaround_prior_s",
        "turnaround_percentile",
        "turnaround_min_history",
        "rescue_margin_s",
        "strict",
        "completion_window_s",
        "realtime_deadline_s",
        "flex_models",
        "flex_min_s",
        "flex_fallback_s",
    },
    "scheduler": {
        "max_wait_s",
        "tick_interval_s",
        "max_attempts",
        "inflight_token_budget",
        "default_inflight_token_budget",
        "realtime_concurrency",
        "lease_s",
    },
    "pricing": {"batch_discount"},
    "providers": {
        "provider_timeout_s",
        "realtime_timeout_s",
        "transfer_stall_timeout_s",
        "transfer_timeout_s",
        "shutdown_timeout_s",
    },
}
_TOP = {
    "database_url",
    "broker_url",
    "timezone",
    "openai_base_url",
    "anthropic_base_url",
    "gemini_base_url",
}
_OWN_SECTIONS = {"guards", "routing", "alerts"}


def _load_file(path: Path) -> dict[str, Any]:
    """Read a settings file; unknown keys are errors so a typo never silently does nothing."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read settings file {path}: {exc}") from exc
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in data.items():
        if key in _TOP:
            values[key] = _checked(path, key, key, value)
        elif key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: [{key}] must be a table")
            for sub, sub_value in value.items():
                if sub not in _SECTIONS[key]:
                    allowed = ", ".join(sorted(_SECTIONS[key]))
                    raise ConfigError(
                        f"{path}: unknown key {key}.{sub} (expected one of {allowed})"
                    )
                values[sub] = _checked(path, f"{key}.{sub}", sub, sub_value)
        elif key == "prices":
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: [prices] must be a table of 'provider:model' tables")
            values["price_overrides"] = value
        elif key == "jobs":
            values.update(_jobs_table(path, value))
        elif key in _OWN_SECTIONS:
            extra[key] = value
        elif key in {"openai_api_key", "anthropic_api_key", "gemini_api_key"}:
            raise ConfigError(
                f"{path}: API keys are read from the environment only "
                f"(set {key.upper()}), never from a file"
            )
        else:
            raise ConfigError(f"{path}: unknown setting {key!r}")
    if extra:
        values["extra"] = extra
    return values


#: settings that must be above zero (the other numbers may be zero)
_POSITIVE = {
    "lease_s",
    "tick_interval_s",
    "completion_window_s",
    "max_attempts",
    "realtime_concurrency",
    "turnaround_percentile",
}
#: settings that are fractions, at most 1 (for a mapping: each of its values)
_FRACTIONS = {"turnaround_percentile", "batch_discount"}


def _checked(path: Path, key: str, name: str, value: Any) -> Any:
    """`value` if it has the type and range of the setting `name` (judged by its default);
    else a `ConfigError` naming the file, the key, the value and what is expected."""
    default = _default(name)
    if isinstance(default, Mapping):
        if not isinstance(value, dict):
            raise ConfigError(
                f"{path}: {key} = {_shown(value)} is invalid: expected a table of name = number"
            )
        for sub, item in value.items():
            _number(path, f"{key}.{sub}", name, item, whole=False)
        return value
    if isinstance(default, tuple):
        if not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
            raise ConfigError(
                f"{path}: {key} = {_shown(value)} is invalid: expected a list of names"
            )
        return tuple(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: {key} = {_shown(value)} is invalid: expected true or false")
        return value
    if isinstance(default, int | float):
        return _number(path, key, name, value, whole=isinstance(default, int))
    if not isinstance(value, str):  # URLs, names: strings, or absent (None)
        raise ConfigError(f"{path}: {key} = {_shown(value)} is invalid: expected a string")
    return value


def _number(path: Path, key: str, name: str, value: Any, *, whole: bool) -> Any:
    kind = (int,) if whole else (int, float)
    positive = name in _POSITIVE
    ok = (
        not isinstance(value, bool)
        and isinstance(value, kind)
        and math.isfinite(value)
        and (value > 0 if positive else value >= 0)
        and (name not in _FRACTIONS or value <= 1)
    )
    if not ok:
        what = "a whole number" if whole else "a number"
        low = "above 0" if positive else "0 or more"
        high = ", at most 1" if name in _FRACTIONS else ""
        raise ConfigError(
            f"{path}: {key} = {_shown(value)} is invalid: expected {what} {low}{high}"
        )
    return value


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "…"


def _default(name: str) -> Any:
    spec = next(f for f in fields(Settings) if f.name == name)
    if spec.default_factory is not MISSING:
        return spec.default_factory()
    return spec.default


def _jobs_table(path: Path, table: Any) -> dict[str, Any]:
    """The `[jobs]` table: `folder`, `output_dir`, `grace_s`, and one `[jobs.NAME]` table per
    job that wants settings of its own (any keys: the job reads them from `run.config`)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [jobs] must be a table")
    values: dict[str, Any] = {}
    job_tables: dict[str, Mapping[str, Any]] = {}
    for key, value in table.items():
        if key in {"folder", "output_dir"}:
            if not isinstance(value, str) or not value:
                raise ConfigError(
                    f"{path}: jobs.{key} = {value!r} is invalid: expected a folder path string"
                )
            values["jobs_dir" if key == "folder" else "jobs_output_dir"] = Path(value).expanduser()
        elif key == "grace_s":
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(
                    f"{path}: jobs.grace_s = {value!r} is invalid: expected a number of seconds "
                    "of 0 or more (like 300)"
                )
            values["jobs_grace_s"] = float(value)
        elif isinstance(value, dict):
            job_tables[key] = value
        else:
            raise ConfigError(
                f"{path}: unknown key jobs.{key} (expected folder, output_dir, grace_s, "
                f"or a [jobs.{key}] table of that job's own settings)"
            )
    if job_tables:
        values["job_tables"] = job_tables
    return values
