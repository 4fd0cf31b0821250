"""Take the README's dashboard screenshot (docs/dashboard.png).

    python scripts/dashboard_screenshot.py [--out docs/dashboard.png] [--height 1500]

Fills a fresh store with the demo workload (the emulator, the demo's own code path), serves
`batchwise dashboard` on a free loopback port, and has headless Chromium (Debian's `chromium`)
take a laptop-sized picture of the page.
"""

from __future__ import annotations

import argparse
import io
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from batchwise.config import Settings
from batchwise.demo import run_demo

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--width", type=int, default=1366)
    parser.add_argument("--height", type=int, default=1500)
    args = parser.parse_args()
    browser = shutil.which("chromium") or sys.exit("needs chromium: apt-get install -y chromium")
    home = Path(tempfile.mkdtemp(prefix="batchwise-shot-"))
    url = f"sqlite:///{home / 'demo.db'}"
    settings = Settings(home=home, timezone="UTC", jobs_dir=home / "jobs")
    run_demo(settings, database_url=url, turnaround_s=0.5, console=Console(file=io.StringIO()))
    server = subprocess.Popen(
        [sys.executable, "-m", "batchwise", "--db", url, "dashboard", "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stderr is not None
        line = server.stderr.readline()  # "dashboard on http://127.0.0.1:PORT/ (…)"
        page = line.split(" on ", 1)[1].split(" ", 1)[0]
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={home / 'profile'}", f"--window-size={args.width},{args.height}",
             f"--screenshot={args.out}", "--virtual-time-budget=3000", page],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=15)
        shutil.rmtree(home, ignore_errors=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
