"""Settings: the settings file's tables are validated at load, naming the key that is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchwise.config import Settings
from batchwise.errors import ConfigError


def load(tmp_path: Path, text: str, **env: str) -> Settings:
    (tmp_path / "config.toml").write_text(text)
    return Settings.from_env({"BATCHWISE_HOME": str(tmp_path), **env})


def test_the_jobs_table_becomes_settings(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        '[jobs]\nfolder = "~/my-jobs"\noutput_dir = "/srv/reports"\ngrace_s = 90\n'
        '[jobs.nightly]\noutput_dir = "/srv/nightly"\nrecipients = ["a@example.com"]\n',
    )
    assert settings.jobs_dir == Path("~/my-jobs").expanduser()
    assert settings.jobs_output_dir == Path("/srv/reports")
    assert settings.jobs_grace_s == 90.0
    assert settings.job_tables == {
        "nightly": {"output_dir": "/srv/nightly", "recipients": ["a@example.com"]}
    }
    assert "jobs" not in settings.extra
    # the environment wins over the file
    from_env = load(tmp_path, '[jobs]\nfolder = "cfg"\n', BATCHWISE_JOBS_DIR=str(tmp_path / "e"))
    assert from_env.jobs_dir == tmp_path / "e"


def test_jobs_defaults(tmp_path: Path) -> None:
    settings = load(tmp_path, "")
    assert (settings.jobs_dir, settings.jobs_output_dir) == (None, None)
    assert settings.jobs_grace_s == 300.0 and settings.job_tables == {}


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        (
            '[jobs]\nfoldr = "x"\n',
            ["unknown key jobs.foldr", "expected folder, output_dir, grace_s"],
        ),
        (
            '[jobs]\ngrace_s = "soon"\n',
            ["jobs.grace_s = 'soon' is invalid", "expected a number of seconds"],
        ),
        ("[jobs]\ngrace_s = -1\n", ["jobs.grace_s = -1 is invalid"]),
        ("[jobs]\ngrace_s = true\n", ["jobs.grace_s = True is invalid"]),
        ("[jobs]\nfolder = 3\n", ["jobs.folder = 3 is invalid", "expected a folder path"]),
        ("[jobs]\noutput_dir = []\n", ["jobs.output_dir = [] is invalid"]),
        ('jobs = "nightly"\n', ["[jobs] must be a table"]),
    ],
)
def test_a_wrong_jobs_table_is_an_error_at_load(
    tmp_path: Path, text: str, fragments: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'config.toml'}: "), message
    assert all(f in message for f in fragments), message


def test_extra_holds_only_the_tables_their_modules_parse() -> None:
    with pytest.raises(ConfigError, match=r"\[jobs\] is jobs_dir, jobs_output_dir"):
        Settings(extra={"jobs": {"folder": "x"}})
    assert Settings(extra={"guards": {}, "routing": {}, "alerts": {}}).extra


# --- providers added by configuration ([providers.NAME]) ---------------------------------------

GROQ = (
    "[providers]\nrealtime_timeout_s = 300\n"
    '[providers.groq]\napi = "openai"\nbase_url = "https://api.groq.com/openai/v1"\n'
    'key_env = "GROQ_API_KEY"\n'
)


def test_a_providers_table_adds_an_openai_compatible_provider(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        GROQ + "batch_discount = 0.5\nlimits = { max_requests = 1000 }\n",
        GROQ_API_KEY="gsk-secret",
    )
    groq = settings.configured_providers["groq"]
    assert (groq.api, groq.base_url, groq.key_env) == (
        "openai",
        "https://api.groq.com/openai/v1",
        "GROQ_API_KEY",
    )
    # prices_provider defaults to the table's name; limits not given stay the API's own
    assert (groq.prices_provider, groq.batch_discount) == ("groq", 0.5)
    assert (groq.max_requests, groq.max_bytes) == (1000, None)
    # the [providers] timeouts beside it are still read as settings
    assert settings.realtime_timeout_s == 300
    assert settings.provider_names == ("openai", "anthropic", "gemini", "groq")
    assert settings.provider_api("groq") == "openai"
    # the key comes from the environment variable the table names, and never shows in repr
    assert settings.provider_keys == {"groq": "gsk-secret"}
    assert "gsk-secret" not in repr(settings) and "groq: '***'" in repr(settings)


def test_a_configured_provider_without_its_key_in_the_environment_has_none(
    tmp_path: Path,
) -> None:
    settings = load(tmp_path, GROQ)
    assert "groq" in settings.configured_providers and settings.provider_keys == {}


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        (
            '[providers.groq]\napi = "openai"\nkey_env = "GROQ_API_KEY"\n',
            ["[providers.groq]: missing field 'base_url'", "base URL"],
        ),
        (
            '[providers.groq]\napi = "anthropic"\nbase_url = "https://x/v1"\nkey_env = "K"\n',
            ["[providers.groq]: api = 'anthropic' is invalid", "expected one of openai"],
        ),
        (
            GROQ.replace('"GROQ_API_KEY"', '"gsk-abc def"'),
            ["[providers.groq]: key_env = 'gsk-abc def' is invalid", "environment variable"],
        ),
        (
            GROQ.replace("https://api.groq.com", "api.groq.com"),
            ["[providers.groq]: base_url = 'api.groq.com/openai/v1' is invalid", "http"],
        ),
        (GROQ + "batch_discount = 2\n", ["[providers.groq]: batch_discount = 2 is invalid"]),
        (GROQ + "limits = { max_lines = 5 }\n", ["[providers.groq]: limits = ", "max_requests"]),
        (GROQ + "limits = { max_bytes = 0 }\n", ["[providers.groq]: limits.max_bytes = 0"]),
        (
            GROQ.replace("providers.groq", "providers.openai"),
            ["[providers.openai]: 'openai' is a built-in provider", "OPENAI_API_KEY"],
        ),
        (
            GROQ.replace("providers.groq", "providers.Groq"),
            ["[providers.Groq]: a provider name is 1 to 32 lowercase letters"],
        ),
        ("[providers]\nrealtime_timout_s = 3\n", ["a [providers.NAME] table adding a provider"]),
    ],
)
def test_a_wrong_providers_table_names_the_table_and_the_field(
    tmp_path: Path, text: str, fragments: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'config.toml'}: "), message
    assert all(f in message for f in fragments), message


def test_a_key_written_into_a_providers_table_is_refused_and_never_shown(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, GROQ + 'api_key = "gsk-SECRET-123"\n')
    message = str(info.value)
    assert "unknown field 'api_key'" in message and "key_env" in message
    assert "gsk-SECRET-123" not in message
