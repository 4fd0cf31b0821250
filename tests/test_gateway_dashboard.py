"""The dashboard mounted in `batchwise serve` under `/dashboard`, behind the gateway's keys.

Over a real socket: a script with `Authorization: Bearer KEY`, and a browser's way in (the
login form, then a session cookie). The key never appears in a URL, a cookie or the gateway's
output; revoking it ends its sessions.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from batchwise.cli.main import cli
from batchwise.emulator.app import Emulator, EmulatorConfig
from batchwise.gateway.dashboard import COOKIE, Sessions
from gateway_helpers import Served, new_key, running_gateway

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('timezone = "UTC"\n')
    monkeypatch.setenv("BATCHWISE_HOME", str(home))
    for name in ("BATCHWISE_DATABASE_URL", "BATCHWISE_CONFIG", "BATCHWISE_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    with Emulator(EmulatorConfig()) as emu:
        env = {**os.environ, "OPENAI_BASE_URL": emu.openai_base_url, "OPENAI_API_KEY": "x"}
        with running_gateway(env) as served:
            yield served


def test_a_script_reads_the_dashboard_with_a_bearer_key_and_nothing_without(
    gateway: Served,
) -> None:
    key = new_key("ops")
    with httpx.Client(base_url=gateway.root) as http:
        # Without a key, or with a wrong one: a 401, for the page and its JSON alike
        assert http.get("/dashboard/api/overview").status_code == 401
        wrong = {"Authorization": "Bearer bw-wrong"}
        assert http.get("/dashboard/api/overview", headers=wrong).status_code == 401
        assert http.get("/dashboard/static/dashboard.js").status_code == 401
        page = http.get("/dashboard/")
        assert page.status_code == 401 and 'action="login"' in page.text
        # With a live key: the figures
        bearer = {"Authorization": f"Bearer {key}"}
        overview = http.get("/dashboard/api/overview", headers=bearer)
        assert overview.status_code == 200 and "generated_at" in overview.json()
        assert http.get("/dashboard/", headers=bearer).status_code == 200


def test_a_browser_signs_in_with_the_form_and_keeps_a_session_until_the_key_is_revoked(
    gateway: Served,
) -> None:
    key = new_key("browser")
    with httpx.Client(base_url=gateway.root) as browser:
        # Given the login form, a wrong key is refused with the form again and no cookie
        assert browser.get("/dashboard/login").status_code == 200
        refused = browser.post("/dashboard/login", data={"key": "bw-wrong"})
        assert refused.status_code == 401 and "wrong or revoked" in refused.text
        assert COOKIE not in browser.cookies
        # When the right key is posted
        signed_in = browser.post("/dashboard/login", data={"key": key})
        # Then a session cookie is set (HttpOnly, SameSite=Strict, for the dashboard only),
        # holding no trace of the key, and the browser is sent to the page
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "./"
        set_cookie = signed_in.headers["set-cookie"].lower()
        assert "httponly" in set_cookie and "samesite=strict" in set_cookie
        assert "path=/dashboard" in set_cookie
        assert key not in signed_in.headers["set-cookie"]
        # And the page, its figures and its script all load with the cookie alone
        page = browser.get("/dashboard/")
        assert page.status_code == 200 and "static/dashboard.js" in page.text
        assert browser.get("/dashboard/api/sections").status_code == 200
        assert browser.get("/dashboard/static/dashboard.js").status_code == 200
        # But a cookie tampered with is refused
        cookie = browser.cookies[COOKIE]
        expires, key_hash, mac = cookie.split(".")
        forged = f"{int(expires) + 10**6}.{key_hash}.{mac}"
        response = httpx.get(f"{gateway.root}/dashboard/api/overview", cookies={COOKIE: forged})
        assert response.status_code == 401
        # And revoking the key ends the session at once
        revoked = CliRunner().invoke(cli, ["keys", "revoke", "browser"])
        assert revoked.exit_code == 0, revoked.output
        assert browser.get("/dashboard/api/overview").status_code == 401
    # And the key was never written to the gateway's output
    gateway.stop()
    assert key not in "".join(gateway.stderr)


def test_sessions_accept_only_their_own_unexpired_cookies() -> None:
    sessions, other = Sessions(), Sessions()
    cookie = sessions.make("ab" * 32, now_s=1000.0)
    assert sessions.key_hash(cookie, now_s=1000.0) == "ab" * 32
    assert sessions.key_hash(cookie, now_s=1000.0 + 13 * 3600) is None  # expired
    assert other.key_hash(cookie, now_s=1000.0) is None  # another gateway's secret
    assert sessions.key_hash("garbage", now_s=1000.0) is None
    assert sessions.key_hash(None, now_s=1000.0) is None
