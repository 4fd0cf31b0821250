"""Which models genai-prices can price, remembered per user, so `submit` need not import it.

`submit` warns about every model it cannot price. Asking genai-prices means importing it and
pydantic: about 0.2 s and 15 MB, more than storing 50,000 lines. Its answer changes only with
the installed genai-prices (and batchwise, which maps provider names onto its ids), so each
model it knows is written to a small file in the user's cache folder (`$BATCHWISE_CACHE_DIR`,
else `$XDG_CACHE_HOME/batchwise`, else `~/.cache/batchwise`, private to the user), under both
versions. Only models it knows are kept: an unknown one is asked about on every submit (a
newer genai-prices may know it, and its warning must never be lost), and an override in
config.toml never enters the file, since the user may remove it.

It is a cache: a missing, unreadable or foreign file is the same as an empty one, and failing
to write it changes nothing but the next submit's speed.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import orjson

from batchwise.config import Settings

_FILE = "known-models.json"


def cache_dir() -> Path:
    """The user's cache folder for batchwise."""
    if override := os.environ.get("BATCHWISE_CACHE_DIR"):
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "batchwise"


def versions() -> str:
    """What the file's answers hold for: this batchwise and this genai-prices."""
    return f"batchwise {_version('batchwise')}, genai-prices {_version('genai-prices')}"


@functools.cache
def _version(distribution: str) -> str:
    """The installed version, read once a process (a gateway's realtime call asks on every
    call), from the name of the distribution's `NAME-VERSION.dist-info` folder on `sys.path`:
    what `importlib.metadata.version` finds, without importing it (and the email parser it
    reads METADATA with), 30-40 ms of every `submit`'s start."""
    prefix = distribution.replace("-", "_").lower() + "-"
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:  # not a folder (a zip, a missing path)
            continue
        for name in names:
            if name.endswith(".dist-info") and name.lower().startswith(prefix):
                return name[len(prefix) : -len(".dist-info")]
    return "?"


def key(settings: Settings, provider: str, model: str) -> str:
    """A (provider, model) as the file names it: a configured provider by the genai-prices id
    it is priced as, so changing its `prices_provider` asks again."""
    configured = settings.configured_providers.get(provider)
    priced_as = provider if configured is None else f"{provider}={configured.prices_provider}"
    return f"{priced_as}/{model}"


#: the file as last read: (path, inode, mtime, size) and what it held. A gateway reads it on
#: every realtime call; a file rewritten since (`remember` renames a new one in) is read again.
_READ: tuple[tuple[Path, int, int, int], frozenset[str]] | None = None


def load() -> frozenset[str]:
    """The keys genai-prices is known to price, under the installed versions."""
    global _READ
    path = cache_dir() / _FILE
    try:
        st = path.stat()
    except OSError:
        return frozenset()
    stamp = (path, st.st_ino, st.st_mtime_ns, st.st_size)
    found = _READ
    if found is not None and found[0] == stamp:
        return found[1]
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return frozenset()
    known = _known(data)
    _READ = (stamp, known)
    return known


def _known(data: object) -> frozenset[str]:
    """The keys a read file holds, if it was written under the installed versions."""
    if not isinstance(data, dict) or data.get("versions") != versions():
        return frozenset()
    models = data.get("models")
    if not isinstance(models, list):
        return frozenset()
    return frozenset(m for m in models if isinstance(m, str))


def remember(keys: Iterable[str]) -> None:
    """Add `keys` to the file (written whole, then renamed into place)."""
    new = set(keys)
    if not new:
        return
    folder = cache_dir()
    data = {"versions": versions(), "models": sorted(load() | new)}
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".known-models-")  # 0600
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(orjson.dumps(data))
        os.replace(tmp, folder / _FILE)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
