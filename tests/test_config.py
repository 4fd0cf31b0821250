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
