"""Settings: read once from the environment and an optional TOML file, then passed around.

Precedence is explicit argument > environment > settings file > default. The environment is read
here and in the CLI only. API keys are kept out of `repr` so they never reach a log line.
"""

from __future__ import annotations

import math
import os
import re
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


#: the APIs a provider added by configuration may speak (`[providers.NAME] api`)
PROVIDER_APIS = ("openai",)
#: provider names batchwise knows by itself; a configured provider may not take one of them
BUILTIN_PROVIDERS = ("openai", "anthropic", "gemini")
#: what a configured provider's name looks like: it is stored with every request (32 characters)
_PROVIDER_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class ProviderConfig:
    """A provider added by configuration alone (a `[providers.NAME]` table): a service that
    speaks OpenAI's Files + Batches API (Groq, Together, a proxy) under its own name, key and
    URL. Everything else is the OpenAI adapter's."""

    name: str
    #: the API it speaks: "openai"
    api: str
    base_url: str
    #: the environment variable holding its API key (the key itself is never in a file)
    key_env: str
    #: genai-prices' provider id for its prices; the table name unless given
    prices_provider: str
    #: batch price as a fraction of realtime where genai-prices has no batch price; None:
    #: `[pricing] batch_discount.NAME`, else realtime prices with a warning
    batch_discount: float | None = None
    #: lines per batch file; None: the API's own limit (OpenAI 50,000)
    max_requests: int | None = None
    #: bytes per batch file; None: the API's own limit (OpenAI 200 MB)
    max_bytes: int | None = None


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

    # --- providers added by configuration ([providers.NAME]) ------------------------------
    #: OpenAI-compatible providers by name (see `ProviderConfig`)
    configured_providers: Mapping[str, ProviderConfig] = field(default_factory=dict)
    #: their API keys by provider name, read by `from_env` from each one's `key_env` variable
    provider_keys: Mapping[str, str] = field(default_factory=dict, repr=False)

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
        keys = ", ".join(f"{name}: '***'" for name in sorted(self.provider_keys))
        return (
            f"Settings({shown}, openai_api_key={_secret_repr(self.openai_api_key)}, "
            f"anthropic_api_key={_secret_repr(self.anthropic_api_key)}, "
            f"gemini_api_key={_secret_repr(self.gemini_api_key)}, "
            f"provider_keys={{{keys}}})"
        )

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home / 'batchwise.db'}"

    @property
    def embedded(self) -> bool:
        return not self.broker_url

    def provider_api(self, provider: str) -> str:
        """The API `provider` speaks: a configured provider's `api`, else its own name."""
        configured = self.configured_providers.get(provider)
        return provider if configured is None else configured.api

    @property
    def provider_names(self) -> tuple[str, ...]:
        """Every provider a line may name: the built-in ones, then the configured ones."""
        return (*BUILTIN_PROVIDERS, *sorted(self.configured_providers))

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
        configured: Mapping[str, ProviderConfig] = values.get("configured_providers", {})
        keys = {name: env[p.key_env] for name, p in configured.items() if env.get(p.key_env)}
        if keys:
            values["provider_keys"] = keys
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
                if key == "providers" and isinstance(sub_value, dict) and sub not in _SECTIONS[key]:
                    configured = values.setdefault("configured_providers", {})
                    configured[sub] = _provider_table(path, sub, sub_value)
                    continue
                if sub not in _SECTIONS[key]:
                    allowed = ", ".join(sorted(_SECTIONS[key]))
                    if key == "providers":
                        allowed += ", or a [providers.NAME] table adding a provider"
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


#: the keys of a `[providers.NAME]` table, and what each holds
_PROVIDER_KEYS = {
    "api": "the API it speaks (openai)",
    "base_url": "its API's base URL, e.g. https://api.groq.com/openai/v1",
    "key_env": "the environment variable holding its API key, e.g. GROQ_API_KEY",
    "prices_provider": "genai-prices' provider id (default: the table name)",
    "batch_discount": "the batch price as a fraction of realtime, e.g. 0.5",
    "limits": "{ max_requests = N, max_bytes = N } per batch file",
}
_LIMIT_KEYS = ("max_requests", "max_bytes")


def _provider_table(path: Path, name: str, table: dict[str, Any]) -> ProviderConfig:
    """A `[providers.NAME]` table as a `ProviderConfig`; a `ConfigError` naming the table and
    the field for anything missing or wrong."""
    where = f"{path}: [providers.{name}]"
    if name in BUILTIN_PROVIDERS:
        raise ConfigError(
            f"{where}: {name!r} is a built-in provider; configure it with its environment "
            f"variables ({name.upper()}_API_KEY, {name.upper()}_BASE_URL), or give the table "
            "another name"
        )
    if not _PROVIDER_NAME.match(name):
        raise ConfigError(
            f"{where}: a provider name is 1 to 32 lowercase letters, digits, '-' or '_', "
            "starting with a letter"
        )
    unknown = sorted(set(table) - set(_PROVIDER_KEYS))
    if unknown:
        expected = "; ".join(f"{k}: {v}" for k, v in _PROVIDER_KEYS.items())
        raise ConfigError(f"{where}: unknown field {unknown[0]!r} (expected {expected})")
    for key in ("api", "base_url", "key_env"):
        if key not in table:
            raise ConfigError(f"{where}: missing field {key!r} ({_PROVIDER_KEYS[key]})")

    def text(key: str) -> str:
        value = table[key]
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(
                f"{where}: {key} = {_shown(value)} is invalid: expected {_PROVIDER_KEYS[key]}"
            )
        return value.strip()

    api = text("api")
    if api not in PROVIDER_APIS:
        raise ConfigError(
            f"{where}: api = {api!r} is invalid: expected one of {', '.join(PROVIDER_APIS)} "
            "(the API the provider speaks)"
        )
    base_url = text("base_url")
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(
            f"{where}: base_url = {_shown(base_url)} is invalid: expected an http:// or "
            "https:// URL"
        )
    key_env = text("key_env")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key_env):
        raise ConfigError(
            f"{where}: key_env = {_shown(key_env)} is invalid: expected the name of an "
            "environment variable (the key itself is read from the environment, never a file)"
        )
    discount = table.get("batch_discount")
    if discount is not None and (
        isinstance(discount, bool) or not isinstance(discount, int | float) or not 0 < discount <= 1
    ):
        raise ConfigError(
            f"{where}: batch_discount = {_shown(discount)} is invalid: expected a fraction of "
            "the realtime price above 0, at most 1 (e.g. 0.5)"
        )
    limits = table.get("limits", {})
    if not isinstance(limits, dict) or not set(limits) <= set(_LIMIT_KEYS):
        raise ConfigError(
            f"{where}: limits = {_shown(limits)} is invalid: expected {_PROVIDER_KEYS['limits']}"
        )
    for key, value in limits.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(
                f"{where}: limits.{key} = {_shown(value)} is invalid: expected a whole number "
                "above 0"
            )
    return ProviderConfig(
        name=name,
        api=api,
        base_url=base_url,
        key_env=key_env,
        prices_provider=text("prices_provider") if "prices_provider" in table else name,
        batch_discount=None if discount is None else float(discount),
        max_requests=limits.get("max_requests"),
        max_bytes=limits.get("max_bytes"),
    )
