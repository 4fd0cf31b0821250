"""What the real-client tests share: client libraries kept offline, and a guard that proves it.

Curator and LiteLLM reach for the network on their own: LiteLLM fetches its price map from
GitHub at import, Curator sends telemetry and counts tokens with tiktoken (which downloads its
encodings), and `datasets` asks the Hugging Face hub. `go_offline()` sets the switches each
library documents, and must run before they are imported (some read them at import time);
`NetworkGuard` then refuses and records any lookup or connection beyond the loopback, so a
test fails instead of hanging if a new version finds another way out.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


def _bundled_tiktoken_dir() -> str | None:
    """LiteLLM ships tiktoken's cl100k_base file; tiktoken reads it from a cache directory."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or spec.origin is None:
        return None
    return str(Path(spec.origin).parent / "litellm_core_utils" / "tokenizers")


def go_offline() -> None:
    """Set the libraries' own offline switches (call before importing litellm or curator)."""
    os.environ.update(
        {
            # LiteLLM: use the bundled model price map instead of fetching it at import
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            # Curator: no PostHog telemetry, no live terminal display
            "TELEMETRY_ENABLED": "false",
            "CURATOR_DISABLE_RICH_DISPLAY": "1",
            # datasets / huggingface_hub (Curator's results): never ask the hub
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
    )
    bundled = _bundled_tiktoken_dir()
    if bundled is not None:
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", bundled)


class NetworkGuard:
    """Refuses and records name lookups and connections beyond the loopback while armed.

    One audit hook for the whole process (hooks cannot be removed), active only inside
    `armed()`.
    """

    _installed: NetworkGuard | None = None

    def __init__(self) -> None:
        self._attempts: list[str] | None = None

    @classmethod
    def get(cls) -> NetworkGuard:
        if cls._installed is None:
            cls._installed = cls()
            sys.addaudithook(cls._installed._hook)
        return cls._installed

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        attempts = self._attempts
        if attempts is None:
            return
        host: object = None
        if event == "socket.getaddrinfo":
            host = args[0]
        elif event == "socket.connect" and isinstance(args[1], tuple):
            host = args[1][0]
        if host is None:
            return
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name not in _LOOPBACK:
            attempts.append(f"{event} {name}")
            raise ConnectionRefusedError(f"the compat tests stay offline: {event} {name}")

    @contextmanager
    def armed(self) -> Iterator[list[str]]:
        """Guard the block; yields the list of attempts it makes."""
        self._attempts = []
        try:
            yield self._attempts
        finally:
            self._attempts = None


def write_batch_file(path: Path, custom_ids: list[str], model: str = "gpt-3.5-turbo-0125") -> Path:
    """The OpenAI Batch guide's input file: one chat request per line."""
    path.write_bytes(
        b"".join(
            orjson.dumps(
                {
                    "custom_id": c,
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {
                        "model": model,
                        "messages": [
                            {"role": "system", "content": "You are a helpful assistant."},
                            {"role": "user", "content": f"Hello world! ({c})"},
                        ],
                        "max_tokens": 1000,
                    },
                }
            )
            + b"\n"
            for c in custom_ids
        )
    )
    return path
