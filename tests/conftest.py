"""Shared fixtures: databases (SQLite and the real PostgreSQL), services, settings, clocks.

Tests that need PostgreSQL or Redis skip when the service is absent, and fail instead when
BATCHWISE_REQUIRE_SERVICES=1 (as `.ci/run` sets), so CI can never go green by skipping.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from batchwise.clock import ManualClock
from batchwise.config import Settings

PG_HOST = os.environ.get("BATCHWISE_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("BATCHWISE_TEST_PG_PORT", "5432"))
PG_DB = os.environ.get("BATCHWISE_TEST_PG_DB", "test")
REDIS_URL = os.environ.get("BATCHWISE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_SERVICES = os.environ.get("BATCHWISE_REQUIRE_SERVICES") == "1"


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip (or, in CI, fail) when a service does not answer."""
    if _port_open(host, port):
        return
    message = f"{name} is not reachable at {host}:{port}"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message} and BATCHWISE_REQUIRE_SERVICES=1")
    pytest.skip(message)


@pytest.fixture(autouse=True)
def _no_jobs(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the repository's own jobs/ folder out of tests that do not ask for it: settings
    from the environment see an empty folder, and settings built in code find no ./jobs."""
    empty = tmp_path_factory.mktemp("no-jobs")
    monkeypatch.setenv("BATCHWISE_JOBS_DIR", str(empty))
    # and the user's cache folder (what genai-prices is known to price) is each test's own
    monkeypatch.setenv("BATCHWISE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.chdir(empty)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2026, 11, 29, 1, 0, tzinfo=UTC))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home", timezone="UTC")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'batchwise.db'}"


def _pg_admin_url() -> str:
    return f"postgresql://{PG_HOST}:{PG_PORT}/{PG_DB}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL schema on the real server, dropped afterwards."""
    require_service("PostgreSQL", PG_HOST, PG_PORT)
    import psycopg

    schema = f"bw_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_pg_admin_url(), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield (f"postgresql+psycopg://{PG_HOST}:{PG_PORT}/{PG_DB}?options=-csearch_path%3D{schema}")
    finally:
        with psycopg.connect(_pg_admin_url(), autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test against SQLite and against the real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'batchwise.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def redis_url() -> str:
    require_service("Redis", "127.0.0.1", 6379)
    return REDIS_URL
