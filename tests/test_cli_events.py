"""`batchwise events` through click, on SQLite and the real PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from batchwise.cli.events import events
from batchwise.cli.main import Context
from batchwise.store.engine import Store
from batchwise.store.events import list_events, record_event

NOW = datetime.now(UTC)

#: (ago, kind, severity, message, request_id, batch_id, task_id, data)
EventRow = tuple[timedelta, str, str, str, int | None, int | None, str | None, dict[str, Any]]
EVENTS: list[EventRow] = [
    (timedelta(days=10), "rescue", "info", "request 7 sent realtime", 7, 3, None, {}),
    (timedelta(days=2), "deadline_missed", "warning", "request 8 missed", 8, None, "T1", {}),
    (timedelta(hours=1), "anomaly", "alert", "step [bold]x[/bold] spiked", None, None, None,
     {"step": "x", "tokens": 100_000}),
    (timedelta(minutes=30), "guard_refused", "warning", "task T2 over 200", None, None, "T2",
     {"owner": "team-payments"}),
]  # fmt: skip


@pytest.fixture
def db(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("BATCHWISE_HOME", str(tmp_path / "home"))
    store = Store(db_url)
    with store.write() as conn:
        for ago, kind, severity, message, request_id, batch_id, task_id, data in EVENTS:
            record_event(
                conn,
                at=NOW - ago,
                kind=kind,
                severity=severity,
                message=message,
                request_id=request_id,
                batch_id=batch_id,
                task_id=task_id,
                data=data,
            )
    store.close()
    yield db_url


def run(url: str, *args: str) -> Result:
    return CliRunner().invoke(events, list(args), obj=Context(url), catch_exceptions=False)


def listed(url: str, *args: str) -> list[dict[str, Any]]:
    result = run(url, "--json", *args)
    assert result.exit_code == 0, result.output
    rows: list[dict[str, Any]] = json.loads(result.output)
    return rows


def test_json_lists_every_field_newest_first(db: str) -> None:
    rows = listed(db)
    assert [r["kind"] for r in rows] == ["guard_refused", "anomaly", "deadline_missed", "rescue"]
    assert rows[1] == {
        "id": 3,
        "at": (NOW - timedelta(hours=1)).isoformat(),
        "kind": "anomaly",
        "severity": "alert",
        "message": "step [bold]x[/bold] spiked",
        "request_id": None,
        "batch_id": None,
        "task_id": None,
        "data": {"step": "x", "tokens": 100_000},
        "owner": None,
        "acknowledged": False,
        "acknowledged_at": None,
        "acknowledged_by": None,
        "ack_note": None,
    }
    assert (rows[3]["request_id"], rows[3]["batch_id"], rows[2]["task_id"]) == (7, 3, "T1")


def test_table_shows_messages_as_written(db: str) -> None:
    result = run(db)
    assert result.exit_code == 0, result.output
    out = result.output
    for header in ("id", "at (UTC)", "kind", "message", "request", "task", "owner", "acked"):
        assert header in out
    assert "step [bold]x[/bold] spiked" in out  # not swallowed as rich markup
    assert out.index("guard_refused") < out.index("anomaly") < out.index("rescue")
    assert f"{NOW - timedelta(days=10):%Y-%m-%d %H:%M:%S}" in out
    assert "older events not shown" not in out


@pytest.mark.parametrize(
    ("args", "kinds"),
    [
        (("--kind", "anomaly"), ["anomaly"]),
        (("--kind", "rescue,anomaly"), ["anomaly", "rescue"]),
        (("--kind", "rescue", "--kind", "deadline_missed"), ["deadline_missed", "rescue"]),
        (("--kind", "nothing"), []),
        (("--since", "3d"), ["guard_refused", "anomaly", "deadline_missed"]),
        (("--since", "45m"), ["guard_refused"]),
        (("--since", "3d", "--kind", "rescue"), []),
        (("--limit", "2"), ["guard_refused", "anomaly"]),
        (("--owner", "team-payments"), ["guard_refused"]),
        (("--owner", "team-pay"), []),
        (("--owner", "team-payments", "--kind", "anomaly"), []),
        (("--unacked",), ["guard_refused", "anomaly", "deadline_missed", "rescue"]),
    ],
)
def test_filters(db: str, args: tuple[str, ...], kinds: list[str]) -> None:
    assert [r["kind"] for r in listed(db, *args)] == kinds


def test_since_takes_iso_dates_and_datetimes(db: str) -> None:
    day = (NOW - timedelta(days=5)).date().isoformat()
    assert len(listed(db, "--since", day)) == 3
    moment = (NOW - timedelta(minutes=90)).isoformat()
    assert [r["kind"] for r in listed(db, "--since", moment)] == ["guard_refused", "anomaly"]


def test_limit_says_when_older_events_are_left_out(db: str) -> None:
    assert "older events not shown" in run(db, "--limit", "3").output
    assert "older events not shown" not in run(db, "--limit", "4").output


def test_bad_options_are_usage_errors(db: str) -> None:
    result = run(db, "--since", "soon")
    assert result.exit_code == 2
    assert "Invalid value for --since: invalid time 'soon': expected an ISO date" in result.output
    assert run(db, "--limit", "0").exit_code == 2


def test_empty_store(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHWISE_HOME", str(tmp_path / "home"))
    assert run(db_url).output == "no events yet\n"
    assert run(db_url, "--kind", "anomaly").output == "no events match\n"
    assert listed(db_url) == []


def test_list_events_from_python(db: str) -> None:
    store = Store(db)
    try:
        (only,) = list_events(store, kinds=["rescue"], since=NOW - timedelta(days=11))
    finally:
        store.close()
    assert (only.kind, only.request_id, only.at) == ("rescue", 7, NOW - timedelta(days=10))


def test_ack_records_who_when_and_note_and_unacked_leaves_it_out(db: str) -> None:
    # Given the guard refusal owned by team-payments, open
    (refusal,) = listed(db, "--owner", "team-payments", "--unacked")
    assert (refusal["owner"], refusal["acknowledged"]) == ("team-payments", False)
    # When its owner acknowledges it
    result = run(db, "ack", str(refusal["id"]), "--note", "raised the cap, PAY-12", "--by", "ana")
    assert result.exit_code == 0, result.output
    assert result.output == f"acknowledged event {refusal['id']} (guard_refused) as ana: " \
        "raised the cap, PAY-12\n"  # fmt: skip
    # Then it shows as acknowledged, with who, when and the note, and --unacked leaves it out
    (acked,) = listed(db, "--owner", "team-payments")
    assert (acked["acknowledged"], acked["acknowledged_by"], acked["ack_note"]) == (
        True,
        "ana",
        "raised the cap, PAY-12",
    )
    assert datetime.fromisoformat(acked["acknowledged_at"]) >= NOW
    assert listed(db, "--owner", "team-payments", "--unacked") == []
    assert [r["kind"] for r in listed(db, "--unacked")] == ["anomaly", "deadline_missed", "rescue"]
    assert "ana" in run(db).output  # the table's acked column


def test_a_second_ack_is_refused_and_the_first_stands(db: str) -> None:
    assert run(db, "ack", "1", "--note", "first", "--by", "ana").exit_code == 0
    again = run(db, "ack", "1", "--note", "second", "--by", "bo")
    assert again.exit_code == 1
    assert "event 1 was already acknowledged at " in again.output
    assert "by ana: first" in again.output
    (rescue,) = listed(db, "--kind", "rescue")
    assert (rescue["acknowledged_by"], rescue["ack_note"]) == ("ana", "first")


def test_ack_of_an_unknown_event_or_without_a_note(db: str) -> None:
    missing = run(db, "ack", "99", "--note", "x")
    assert missing.exit_code == 1
    assert "no event 99" in missing.output
    assert run(db, "ack", "1").exit_code == 2  # --note is required


def test_ack_as_json_defaults_to_the_login_name(db: str) -> None:
    import getpass

    result = run(db, "ack", "2", "--note", "looked", "--json")
    assert result.exit_code == 0, result.output
    event = json.loads(result.output)
    assert (event["id"], event["acknowledged_by"]) == (2, getpass.getuser())
