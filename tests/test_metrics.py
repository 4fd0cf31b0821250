"""Prometheus exposition: parsed back and checked against the rows, printed and served."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from batchwise.reports.metrics import CONTENT_TYPE, collect, create_app, exposition
from batchwise.store.engine import Store, batches_t, ledger_t, requests_t

AT = datetime(2026, 11, 1, tzinfo=UTC)
ODD = 'say "hi"\n\\'

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)",?')


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), value)


def parse(text: str) -> dict[str, dict[str, Any]]:
    """A strict-enough reader of text format 0.0.4: HELP/TYPE before samples, labels escaped."""
    assert text.endswith("\n")
    families: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            families[name] = {"help": help_text, "samples": {}}
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert kind in ("counter", "gauge"), line
            families[name]["type"] = kind
        else:
            match = _SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            name, labels, value = match.groups()
            assert "type" in families[name], f"{name} sampled before its TYPE"
            pairs = _LABEL.findall(labels or "")
            assert ",".join(f'{k}="{v}"' for k, v in pairs) == (labels or "")
            key = frozenset((k, _unescape(v)) for k, v in pairs)
            assert key not in families[name]["samples"], f"duplicate sample {line!r}"
            families[name]["samples"][key] = float(value)
    return families


def sample(families: dict[str, dict[str, Any]], name: str, **labels: str) -> float:
    value = families[name]["samples"][frozenset(labels.items())]
    assert isinstance(value, float)
    return value


def request_row(rid: int, lane: str, state: str) -> dict[str, Any]:
    return {
        "id": rid,
        "custom_id": f"c-{rid}",
        "provider": "openai",
        "endpoint": "/v1/chat/completions",
        "model": "gpt-4o-mini",
        "body_hash": f"{rid:064d}",
        "tolerance": "24h",
        "deadline": AT,
        "lane": lane,
        "reason": "test",
        "state": state,
        "created_at": AT,
        "updated_at": AT,
    }


def ledger_row(
    rid: int, kind: str, use_case: str | None, model: str, actual: int | None, realtime: int | None
) -> dict[str, Any]:
    return {
        "request_id": rid,
        "at": AT,
        "kind": kind,
        "lane": "deferred",
        "provider": "openai",
        "model": model,
        "endpoint": "/v1/chat/completions",
        "use_case": use_case,
        "actual_nusd": actual,
        "realtime_nusd": realtime,
        "price_source": "test",
    }


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store(db_url)
    states = [("deferred", "queued"), ("deferred", "queued"), ("deferred", "succeeded")]
    states += [("realtime", "succeeded"), ("realtime", "failed")]
    batch_states = ["in_progress", "in_progress", "submitted", "building"] + ["reconciled"] * 3
    with s.write() as conn:
        conn.execute(sa.insert(requests_t), [request_row(i, *ls) for i, ls in enumerate(states, 1)])
        conn.execute(
            sa.insert(batches_t),
            [
                {"provider": "openai", "endpoint": "/v1/chat/completions", "model": "m",
                 "state": state, "created_at": AT, "updated_at": AT}
                for state in batch_states
            ],
        )  # fmt: skip
        conn.execute(
            sa.insert(ledger_t),
            [
                ledger_row(1, "batch", "summaries", "gpt-4o-mini", 500, 1000),
                ledger_row(1, "late_batch", "summaries", "gpt-4o-mini", 300, 0),
                ledger_row(2, "realtime", None, "claude", 2_000_000_000, 2_000_000_000),
                ledger_row(3, "dedupe", ODD, "gpt-4o-mini", 0, 1_500_000_000),
                ledger_row(4, "batch", "x", "mystery", None, None),
                ledger_row(5, "batch", "x", "mystery", None, None),
            ],
        )
    yield s
    s.close()


def check(families: dict[str, dict[str, Any]]) -> None:
    assert families["batchwise_requests"]["type"] == "gauge"
    assert sample(families, "batchwise_requests", lane="deferred", state="queued") == 2
    assert sample(families, "batchwise_requests", lane="realtime", state="failed") == 1
    assert len(families["batchwise_requests"]["samples"]) == 4
    assert sample(families, "batchwise_batches", state="in_progress") == 2
    assert sample(families, "batchwise_batches", state="reconciled") == 3
    assert sample(families, "batchwise_batches_in_flight") == 3  # in_progress x2 + submitted
    cost = "batchwise_cost_usd_total"
    assert families[cost]["type"] == "counter"
    assert sample(families, cost, use_case="summaries", model="gpt-4o-mini") == 800e-9
    assert sample(families, cost, use_case="", model="claude") == 2.0
    assert sample(families, cost, use_case=ODD, model="gpt-4o-mini") == 0.0
    realtime = "batchwise_realtime_equivalent_usd_total"
    assert sample(families, realtime, use_case="summaries", model="gpt-4o-mini") == 1000e-9
    assert sample(families, realtime, use_case=ODD, model="gpt-4o-mini") == 1.5
    saving = "batchwise_saving_usd"
    assert sample(families, saving, use_case="summaries", model="gpt-4o-mini") == 200e-9
    assert sample(families, saving, use_case="", model="claude") == 0.0
    # unpriced entries are not exported as $0 anywhere; they are counted instead
    assert frozenset({("use_case", "x"), ("model", "mystery")}) not in families[cost]["samples"]
    assert sample(families, "batchwise_unpriced_entries_total") == 2
    kinds = families["batchwise_ledger_entries_total"]["samples"]
    assert {dict(k)["kind"]: v for k, v in kinds.items()} == {
        "batch": 3,
        "dedupe": 1,
        "late_batch": 1,
        "realtime": 1,
    }


def test_exposition_matches_the_store(store: Store) -> None:
    check(parse(exposition(store)))


FAMILIES = [
    "batchwise_requests",
    "batchwise_batches",
    "batchwise_batches_in_flight",
    "batchwise_cost_usd_total",
    "batchwise_realtime_equivalent_usd_total",
    "batchwise_saving_usd",
    "batchwise_ledger_entries_total",
    "batchwise_unpriced_entries_total",
]


def test_served_over_http(store: Store, db_url: str, tmp_path: Path) -> None:
    # Given `batchwise metrics --serve` on a free loopback port
    env = {**os.environ, "BATCHWISE_HOME": str(tmp_path / "home")}
    with subprocess.Popen(
        [sys.executable, "-m", "batchwise", "--db", db_url, "metrics", "--serve", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    ) as proc:  # fmt: skip
        try:
            assert proc.stderr is not None
            line = proc.stderr.readline()
            found = re.fullmatch(r"serving metrics on (http://127\.0\.0\.1:\d+)/metrics\n", line)
            assert found, line + proc.stderr.read()
            # When Prometheus scrapes /metrics
            with httpx.Client(base_url=found[1], timeout=10) as client:
                response = client.get("/metrics")
                missing = client.get("/")
            # and the server is asked to stop
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    # Then it got the exposition, with its content type
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE
    check(parse(response.text))
    assert missing.status_code == 404 and "/metrics" in missing.text


def test_a_scrape_of_an_unreadable_store_is_answered_500(db_url: str) -> None:
    store = Store(db_url)
    try:
        with store.write() as conn:
            conn.execute(sa.text("DROP TABLE ledger"))
        with TestClient(create_app(store)) as client:
            response = client.get("/metrics")
    finally:
        store.close()
    assert response.status_code == 500
    assert response.text.startswith("cannot read the store: ")


def test_empty_store_still_exposes_every_family(db_url: str) -> None:
    store = Store(db_url)
    families = parse(exposition(store))
    families_read = len(collect(store))
    store.close()
    assert list(families) == FAMILIES and families_read == len(FAMILIES)
    assert sample(families, "batchwise_unpriced_entries_total") == 0
    assert sample(families, "batchwise_batches_in_flight") == 0
