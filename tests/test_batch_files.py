"""Sweeping batch files: what a killed process or a cancelled batch leaves is removed once it is
old enough, and nothing a live batch still needs is touched."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from batchwise.config import Settings
from batchwise.lifecycle import batch_files
from batchwise.states import BatchState
from batchwise.store.engine import Store, batches_t

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def _batch(store: Store, state: BatchState) -> int:
    with store.write() as conn:
        return int(
            conn.execute(
                sa.insert(batches_t)
                .values(
                    provider="openai",
                    endpoint="/v1/chat/completions",
                    model="gpt-4o-mini",
                    state=state.value,
                    created_at=NOW,
                    updated_at=NOW,
                )
                .returning(batches_t.c.id)
            ).scalar_one()
        )


def _file(path: Path, *, age_s: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"{}\n")
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


@pytest.fixture
def store(db_url: str) -> Store:
    return Store(db_url)


def test_old_leftovers_go_and_what_a_live_batch_needs_stays(
    store: Store, settings: Settings
) -> None:
    sid, old = store.store_id, batch_files.MAX_AGE_S + 60
    building, uploading = _batch(store, BatchState.BUILDING), _batch(store, BatchState.UPLOADING)
    cancelled, done = _batch(store, BatchState.CANCELLED), _batch(store, BatchState.RECONCILED)
    packed = batch_files.packed_file_path
    private = batch_files.private_path
    kept = [
        _file(packed(settings, sid, building), age_s=old),  # waiting for its submitter
        _file(private(settings, sid, uploading), age_s=old),  # a long upload in progress
        _file(private(settings, sid, building), age_s=old),  # taken from the packer just now
        _file(private(settings, sid, done, "partial"), age_s=10),  # its writer may be at work
        _file(private(settings, sid, done), age_s=10),
        _file(packed(settings, "0badcafe", cancelled), age_s=old),  # another store's
        _file(batch_files.folder(settings) / "notes.txt", age_s=old),  # not ours at all
    ]
    swept = [
        _file(packed(settings, sid, cancelled), age_s=old),  # cancelled before submission
        _file(packed(settings, sid, uploading), age_s=old),  # rebuilt by the submitter
        _file(packed(settings, sid, 999_999), age_s=old),  # no such batch
        _file(private(settings, sid, done), age_s=old),  # killed mid-upload, since adopted
        _file(private(settings, sid, building, "partial"), age_s=old),  # killed mid-write
    ]
    try:
        assert batch_files.sweep(store, settings) == len(swept)
        assert [p.name for p in kept if not p.exists()] == []
        assert [p.name for p in swept if p.exists()] == []
        assert batch_files.sweep(store, settings) == 0
    finally:
        store.close()


def test_sweeping_without_a_folder_does_nothing(store: Store, settings: Settings) -> None:
    try:
        assert not batch_files.folder(settings).exists()
        assert batch_files.sweep(store, settings) == 0
    finally:
        store.close()
