"""The live dashboard: an ASGI app (Starlette) over a store, read-only.

`create_app(store)` builds it; `batchwise dashboard` serves it alone on uvicorn, and the
gateway (`batchwise serve`) mounts the same app at `/dashboard` behind its keys. The figures come
from `reports.overview`, the panels from `reports.sections` (shared with `savings --html`).
"""

from __future__ import annotations

from batchwise.dashboard.app import create_app

__all__ = ["create_app"]
