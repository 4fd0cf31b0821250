"""Batch files on disk: their names, and sweeping the ones nobody will read again.

Three kinds live in `<home>/batches`, all named for the store and the batch, so two databases
sharing a home never touch each other's files:

- `<store>-<batch>.jsonl`: written by the packer as it cuts the batch, waiting for the
  submitter, which takes it by renaming it to its own name;
- `<store>-<batch>.<tag>.jsonl`: a submitter's own copy while it uploads (a random tag, since
  after a lease takeover two submitters may build the same batch);
- `<store>-<batch>.<tag>.partial`: a file still being written, renamed when complete.

Each writer removes its own files, but a process killed mid-way leaves them, and a batch
cancelled before it was submitted leaves its packed file. `sweep` removes those.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from batchwise.states import BatchState
from batchwise.store import batches

if TYPE_CHECKING:
    from batchwise.config import Settings
    from batchwise.store.engine import Store

#: files younger than this are never swept: their writer may still be at work
MAX_AGE_S = 3600.0
#: the batch states in which a file may still be read
_PACKED_NEEDED_WHILE = frozenset({BatchState.BUILDING.value})
_COPY_NEEDED_WHILE = frozenset({BatchState.BUILDING.value, BatchState.UPLOADING.value})
_NAME = re.compile(
    r"(?P<store>[0-9a-f]+)-(?P<batch>[0-9]+)(?:\.(?P<tag>[0-9a-f]+))?\.(?P<kind>jsonl|partial)"
)


def folder(settings: Settings) -> Path:
    return settings.home / "batches"


def packed_file_path(settings: Settings, store_id: str, batch_id: int) -> Path:
    """The file the packer wrote for a batch."""
    return folder(settings) / f"{store_id}-{batch_id}.jsonl"


def private_path(settings: Settings, store_id: str, batch_id: int, suffix: str = "jsonl") -> Path:
    """A name no other process will use for this batch (a submitter's copy, a partial file)."""
    return folder(settings) / f"{store_id}-{batch_id}.{uuid.uuid4().hex[:8]}.{suffix}"


def sweep(store: Store, settings: Settings, *, max_age_s: float = MAX_AGE_S) -> int:
    """Remove this store's batch files that no process will read again; returns how many.

    A partial file older than `max_age_s` belongs to a writer that died. A packed file is read
    only while its batch is `building`; a submitter's copy only until its batch is submitted
    (a taken packed file keeps its old time, so `building` counts too). Only files older than
    `max_age_s` are considered, so a file is never taken from under a writer still at work."""
    where = folder(settings)
    if not where.is_dir():
        return 0
    cutoff = time.time() - max_age_s
    store_id = store.store_id
    removed = 0
    candidates: dict[int, list[tuple[Path, frozenset[str]]]] = {}
    with os.scandir(where) as entries:
        for entry in entries:
            found = _NAME.fullmatch(entry.name)
            if found is None or found["store"] != store_id:
                continue
            try:
                if entry.stat().st_mtime > cutoff:
                    continue
            except FileNotFoundError:  # removed meanwhile by its writer
                continue
            path = Path(entry.path)
            if found["kind"] == "partial":
                removed += _unlink(path)
                continue
            needed_while = _COPY_NEEDED_WHILE if found["tag"] else _PACKED_NEEDED_WHILE
            candidates.setdefault(int(found["batch"]), []).append((path, needed_while))
    if not candidates:
        return removed
    with store.read() as conn:
        states = batches.states_of(conn, candidates)
    for batch_id, files in candidates.items():
        for path, needed_while in files:
            if states.get(batch_id) not in needed_while:
                removed += _unlink(path)
    return removed


def _unlink(path: Path) -> int:
    try:
        path.unlink()
    except FileNotFoundError:  # swept by another process meanwhile
        return 0
    return 1
