"""Headless Chromium for the dashboard tests, driven over the DevTools protocol.

Debian's `chromium` package; when it is missing the tests skip on a laptop and fail in CI
(BATCHWISE_REQUIRE_SERVICES=1), as the PostgreSQL and Redis tests do. A tiny client:
open a page, evaluate JavaScript and read back its value, take a screenshot.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

REQUIRE_SERVICES = os.environ.get("BATCHWISE_REQUIRE_SERVICES") == "1"
CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str:
    """The browser's path; skips (or, in CI, fails) the test when there is none."""
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    message = "no headless Chromium (apt-get install -y chromium)"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message} and BATCHWISE_REQUIRE_SERVICES=1")
    pytest.skip(message)


def flags(profile: str) -> list[str]:
    return [
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--no-first-run",
        f"--user-data-dir={profile}",
    ]


class Browser:
    """One headless Chromium with one page, over the DevTools websocket."""

    def __init__(self, *, width: int = 1366, height: int = 900) -> None:
        from websockets.sync.client import connect

        self.profile = tempfile.mkdtemp(prefix="batchwise-chromium-")
        # stderr to a file, never a pipe: a pipe nobody drains would stall the browser
        self.log = Path(self.profile) / "stderr.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [chromium_path(), *flags(self.profile), "--remote-debugging-port=0",
                 f"--window-size={width},{height}", "about:blank"],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )  # fmt: skip
        self.stack = ExitStack()
        port = self._port()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            pages = [t for t in json.load(r) if t["type"] == "page"]
        self.ws = self.stack.enter_context(
            connect(pages[0]["webSocketDebuggerUrl"], max_size=2**26)
        )
        self.ids = itertools.count(1)

    def _port(self) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            found = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", text)
            if found:
                return int(found.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"chromium did not start its DevTools endpoint: {text[-2000:]}")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and wait for its answer (events in between are dropped)."""
        ident = next(self.ids)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-able)."""
        found = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in found:
            raise RuntimeError(found["exceptionDetails"])
        return found["result"].get("value")

    def open(self, url: str, *, ready: str = "document.readyState === 'complete'") -> None:
        self.call("Page.enable")
        self.call("Page.navigate", url=url)
        self.wait_for(ready)

    def wait_for(self, expression: str, *, timeout_s: float = 20.0) -> Any:
        """Poll until `expression` is truthy in the page; its value."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")

    def screenshot(self, path: Path) -> None:
        """The whole page as a PNG."""
        height = int(self.evaluate("document.documentElement.scrollHeight"))
        width = int(self.evaluate("document.documentElement.clientWidth"))
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width, height=height, deviceScaleFactor=1, mobile=False,
        )  # fmt: skip
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        try:
            self.stack.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            shutil.rmtree(self.profile, ignore_errors=True)


#: every marked figure on the page: {name: [value, text]}
FIGURES_JS = """Object.fromEntries(Array.from(document.querySelectorAll('[data-figure]'))
  .map(e => [e.dataset.figure, [e.dataset.value, e.textContent]]))"""
#: every chart mark: [chart id, series, label, value]
MARKS_JS = """Array.from(document.querySelectorAll('svg [data-series]'))
  .map(e => [e.closest('svg').id, e.dataset.series, e.dataset.label, e.dataset.value])"""
