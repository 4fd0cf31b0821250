"""Provider adapters behind one `Provider` protocol, and the local emulator.

Importing this package loads no adapter and no HTTP library: `make_provider` imports the one
it builds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from batchwise.config import (
    BUILTIN_PROVIDERS,
    DEFAULT_ANTHROPIC_BASE_URL,
    DEFAULT_GEMINI_BASE_URL,
    DEFAULT_OPENAI_BASE_URL,
)
from batchwise.errors import ConfigError

if TYPE_CHECKING:
    import threading

    import httpx

    from batchwise.config import ProviderConfig, Settings
    from batchwise.providers.base import Provider
    from batchwise.providers.http import Timeouts

__all__ = ["PROVIDERS", "make_provider"]

#: the built-in names `make_provider` accepts (besides the configured providers): one list,
#: `config.BUILTIN_PROVIDERS`, which a `[providers.NAME]` table may not take
PROVIDERS = BUILTIN_PROVIDERS


def make_provider(
    name: str,
    settings: Settings,
    *,
    client: httpx.Client | None = None,
    stop: threading.Event | None = None,
) -> Provider:
    """The adapter for `name`, with its key, base URL and call deadlines from `settings`;
    once `stop` is set its calls in flight are abandoned (`Stopped`).

    A missing key is an error against the provider's own API; against another base URL (the
    emulator, a proxy) the adapter sends no key, since such servers need none or add their own.
    """
    from batchwise.providers.http import Timeouts

    timeouts = Timeouts(
        call_s=settings.provider_timeout_s,
        realtime_s=settings.realtime_timeout_s,
        transfer_stall_s=settings.transfer_stall_timeout_s,
        transfer_s=settings.transfer_timeout_s,
    )
    if name == "openai":
        from batchwise.providers.openai import OpenAIProvider

        _require_key(
            name,
            settings.openai_api_key,
            settings.openai_base_url,
            DEFAULT_OPENAI_BASE_URL,
            example_url="http://127.0.0.1:8900/v1",
        )
        return OpenAIProvider(
            settings.openai_api_key,
            settings.openai_base_url,
            client=client,
            timeouts=timeouts,
            stop=stop,
        )
    if name == "anthropic":
        from batchwise.providers.anthropic import AnthropicProvider

        _require_key(
            name,
            settings.anthropic_api_key,
            settings.anthropic_base_url,
            DEFAULT_ANTHROPIC_BASE_URL,
            example_url="http://127.0.0.1:8900",
        )
        return AnthropicProvider(
            settings.anthropic_api_key,
            settings.anthropic_base_url,
            client=client,
            timeouts=timeouts,
            stop=stop,
        )
    if name == "gemini":
        from batchwise.providers.gemini import GeminiProvider

        _require_key(
            name,
            settings.gemini_api_key,
            settings.gemini_base_url,
            DEFAULT_GEMINI_BASE_URL,
            example_url="http://127.0.0.1:8900",
            env="GEMINI_API_KEY (or GOOGLE_API_KEY)",
            url_env="GOOGLE_GEMINI_BASE_URL",
        )
        return GeminiProvider(
            settings.gemini_api_key,
            settings.gemini_base_url,
            client=client,
            timeouts=timeouts,
            stop=stop,
        )
    configured = settings.configured_providers.get(name)
    if configured is not None:
        return _configured(configured, settings, client=client, timeouts=timeouts, stop=stop)
    known = ", ".join(settings.provider_names)
    raise ConfigError(f"unknown provider {name!r} (expected one of {known})")


def _configured(
    configured: ProviderConfig,
    settings: Settings,
    *,
    client: httpx.Client | None,
    timeouts: Timeouts,
    stop: threading.Event | None,
) -> Provider:
    """A provider added by configuration (`[providers.NAME]`): the adapter of the API it
    speaks under its own name, URL, key and limits. Its key comes only from the environment
    variable its table names, and is required: the table names a real service."""
    from batchwise.providers.openai import OpenAIProvider

    key = settings.provider_keys.get(configured.name)
    if not key:
        raise ConfigError(
            f"No API key for {configured.name}: set {configured.key_env} (the key_env of "
            f"[providers.{configured.name}] in the settings file)"
        )
    return OpenAIProvider(
        key,
        configured.base_url,
        client=client,
        timeouts=timeouts,
        stop=stop,
        name=configured.name,
        max_requests=configured.max_requests,
        max_bytes=configured.max_bytes,
        batch_discount=configured.batch_discount,
    )


def _require_key(
    name: str,
    key: str | None,
    base_url: str,
    default_url: str,
    *,
    example_url: str,
    env: str | None = None,
    url_env: str | None = None,
) -> None:
    if key or base_url.rstrip("/") != default_url.rstrip("/"):
        return
    env = env or f"{name.upper()}_API_KEY"
    url_env = url_env or f"{name.upper()}_BASE_URL"
    raise ConfigError(
        f"No API key for {name}: set {env}, or run `batchwise emulator` and set "
        f"{url_env}={example_url} to work offline"
    )
