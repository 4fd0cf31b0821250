"""Intake: line shapes, validation errors, all-or-nothing, custom_id rules; on both sinks and
both databases."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from batchwise.api import Client
from batchwise.clock import ManualClock
from batchwise.config import Settings
from batchwise.errors import IntakeError, TransitionError
from batchwise.intake.ingest import Defaults, parse_line, submit_lines
from batchwise.intake.lines import Invalid
from batchwise.intake.tolerance import resolve_zone
from batchwise.store.engine import Store, bodies_t, requests_t
from batchwise.store.intake_rows import REQUEST_COLUMNS, RequestSink, body_key
from batchwise.store.pg_sink import PostgresSink
from batchwise.store.sinks import STORED_COLUMNS, EngineSink, SQLiteSink, open_sink
from invariants import request_rows


def openai_line(i: int, **over: Any) -> dict[str, Any]:
    line: dict[str, Any] = {
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"hi {i}"}]},
    }
    line.update(over)
    return line


def jsonl(*objs: Any) -> list[bytes]:
    return [orjson.dumps(o) if not isinstance(o, bytes) else o for o in objs]


@pytest.fixture(params=["plain", "engine"])
def client(
    request: pytest.FixtureRequest,
    db_url: str,
    settings: Settings,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Client]:
    """A client whose every `_submit` goes through one sink: the driver's own (`plain`:
    `SQLiteSink`, `PostgresSink`), or `EngineSink` on the client's open store (`engine`)."""
    with Client(db_url, settings=settings, clock=clock) as c:
        if request.param == "plain":
            monkeypatch.setattr(c, "_submit", functools.partial(c._submit, bulk=True))
        else:
            assert c.store is not None  # open: a few lines go through the store's engine
        yield c


def rows(client: Client) -> list[dict[str, Any]]:
    return request_rows(client.store)


def test_three_shapes_are_accepted(client: Client) -> None:
    lines = jsonl(
        openai_line(1, tolerance="4h"),
        {
            "custom_id": "a-2",
            "params": {
                "model": "claude-haiku-4-5",
                "max_tokens": 50,
                "messages": [{"role": "user", "content": "hello"}],
            },
        },
        {"model": "gpt-4o-mini", "prompt": "simple", "temperature": 0.2},
        {"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "x"}]},
        {"model": "text-embedding-3-small", "input": "embed me"},
    )
    result = client._submit(lines, Defaults(tolerance="24h"), skip_invalid=False)
    assert (result.accepted, result.rejected) == (5, [])
    stored = rows(client)
    assert [(r["provider"], r["endpoint"], r["model"]) for r in stored] == [
        ("openai", "/v1/chat/completions", "gpt-4o-mini"),
        ("anthropic", "/v1/messages", "claude-haiku-4-5"),
        ("openai", "/v1/chat/completions", "gpt-4o-mini"),
        ("anthropic", "/v1/messages", "claude-haiku-4-5"),
        ("openai", "/v1/embeddings", "text-embedding-3-small"),
    ]
    simple = orjson.loads(stored[2]["body"])
    assert simple == {
        "model": "gpt-4o-mini",
        "temperature": 0.2,
        "messages": [{"role": "user", "content": "simple"}],
    }
    assert orjson.loads(stored[3]["body"])["max_tokens"] == 1024  # Anthropic requires one
    assert stored[0]["custom_id"] == "req-1"
    assert stored[2]["custom_id"] == f"bw-{stored[2]['id']}"  # generated when absent


def test_stored_fields_hash_deadline_lane_tags(client: Client, clock: ManualClock) -> None:
    line = openai_line(
        1, tolerance="2d", tags={"use_case": "summaries", "task_id": "t1", "team": "risk"}
    )
    client._submit(
        jsonl(line), Defaults(tags={"business_unit": "wealth", "team": "ops"}), skip_invalid=False
    )
    (row,) = rows(client)
    canonical = orjson.dumps(line["body"], option=orjson.OPT_SORT_KEYS)
    assert row["body"] == canonical.decode()
    assert row["body_hash"] == hashlib.sha256(canonical).hexdigest()
    assert row["body_key"] == int.from_bytes(hashlib.sha256(canonical).digest()[:8], "big") - (
        1 << 64 if hashlib.sha256(canonical).digest()[0] >= 0x80 else 0
    )
    assert row["body_key"] == body_key(row["body_hash"])
    assert row["deadline"] == clock.now.replace() + __import__("datetime").timedelta(days=2)
    assert (row["lane"], row["state"], row["attempts"]) == ("deferred", "queued", 0)
    assert "leaves room" in row["reason"]
    assert (row["use_case"], row["task_id"], row["business_unit"]) == ("summaries", "t1", "wealth")
    assert orjson.loads(row["tags"]) == {"team": "risk"}  # the line's tag overrides the default


def test_line_overrides_command_defaults(client: Client) -> None:
    lines = jsonl(openai_line(1), openai_line(2, tolerance="realtime"))
    client._submit(lines, Defaults(tolerance="2d"), skip_invalid=False)
    assert [(r["tolerance"], r["lane"], r["state"]) for r in rows(client)] == [
        ("2d", "deferred", "queued"),
        ("realtime", "realtime", "dispatching"),
    ]


BAD_LINES: list[tuple[Any, str | None, str]] = [
    (b"{not json", None, "invalid JSON"),
    (b"[1, 2]", None, "expected a JSON object"),
    (openai_line(1, url="/v1/images"), "url", "unknown endpoint"),
    (openai_line(1, method="GET"), "method", 'expected "POST"'),
    ({**openai_line(1), "extra": 1}, "extra", "unexpected field"),
    (
        openai_line(1, body={"messages": [{"role": "user", "content": "x"}]}),
        "body.model",
        "model name",
    ),
    (
        openai_line(1, body={"model": "gpt-4o-mini", "messages": []}),
        "body.messages",
        "non-empty list",
    ),
    (
        openai_line(1, body={"model": "gpt-4o-mini", "messages": [{}], "stream": True}),
        "body.stream",
        "cannot be batched",
    ),
    (
        openai_line(1, body={"model": "gpt-4o-mini", "messages": [{}], "max_tokens": 0}),
        "body.max_tokens",
        "integer ≥ 1",
    ),
    (openai_line(1, custom_id=""), "custom_id", "non-empty string of at most 512"),
    (openai_line(1, custom_id="x" * 513), "custom_id", "non-empty string of at most 512"),
    (openai_line(1, custom_id=7), "custom_id", "non-empty string of at most 512"),
    (openai_line(1, tolerance="soonish"), "tolerance", "invalid tolerance"),
    (openai_line(1, tolerance="2020-01-01T00:00:00Z"), "tolerance", "already past"),
    (openai_line(1, tags=["a"]), "tags", "object of name"),
    (openai_line(1, tags={"use_case": {"nested": 1}}), "tags.use_case", "string value"),
    (openai_line(1, provider="anthropic"), "provider", "openai-format line"),
    (openai_line(1, provider="mistral"), "provider", "unknown provider"),
    (
        {"custom_id": "x", "params": {"model": "claude-haiku-4-5", "messages": [{}]}},
        "params.max_tokens",
        "integer ≥ 1",
    ),
    ({"model": "llama-3", "prompt": "x"}, "provider", "cannot tell the provider"),
    ({"prompt": "x"}, "model", "model name"),
    (
        {"model": "gpt-4o-mini", "prompt": "x", "messages": []},
        "prompt",
        "either prompt or messages",
    ),
    (
        {"model": "gpt-4o-mini", "prompt": "x", "endpoint": "/v1/messages"},
        "endpoint",
        "unknown endpoint",
    ),
]


@pytest.mark.parametrize(("line", "field", "message"), BAD_LINES)
def test_each_bad_line_gets_a_precise_error(line: Any, field: str | None, message: str) -> None:
    lines = jsonl(openai_line(100), line)
    sink = _MemorySink()
    with pytest.raises(IntakeError) as info:
        submit_lines(
            lines, sink, settings=Settings(), now=ManualClock()(), zone=resolve_zone("UTC")
        )
    (error,) = info.value.errors
    assert error.line == 2
    assert error.field == field
    assert message in error.error
    assert sink.committed is False and sink.rolled_back


def test_bad_file_is_refused_whole_and_every_bad_line_listed(client: Client) -> None:
    lines = jsonl(
        openai_line(1), b"{oops", openai_line(3), openai_line(4, url="/v1/x"), openai_line(5)
    )
    with pytest.raises(IntakeError) as info:
        client._submit(lines, Defaults(), skip_invalid=False)
    assert [e.line for e in info.value.errors] == [2, 4]
    assert rows(client) == []  # nothing half-stored


def test_skip_invalid_stores_the_good_lines(client: Client) -> None:
    lines = jsonl(openai_line(1), b"{oops", openai_line(3))
    result = client._submit(lines, Defaults(), skip_invalid=True)
    assert result.accepted == 2 and [e.line for e in result.rejected] == [2]
    assert [r["custom_id"] for r in rows(client)] == ["req-1", "req-3"]


def test_duplicate_custom_id_within_a_submission(client: Client) -> None:
    lines = jsonl(openai_line(1), openai_line(2), openai_line(1))
    with pytest.raises(IntakeError) as info:
        client._submit(lines, Defaults(), skip_invalid=False)
    (error,) = info.value.errors
    assert (error.line, error.field) == (3, "custom_id")
    assert "used twice in this submission" in error.error and "line 1" in error.error
    assert rows(client) == []


def test_duplicate_custom_id_across_chunks(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("batchwise.intake.ingest.CHUNK_ROWS", 3)
    monkeypatch.setattr("batchwise.intake.ingest.DEFERRED_CHUNK_ROWS", 3)
    lines = jsonl(*(openai_line(i) for i in range(7)), openai_line(2))
    result = client._submit(lines, Defaults(), skip_invalid=True)
    assert result.accepted == 7
    (error,) = result.rejected
    assert error.line == 8 and "used twice in this submission" in error.error


def test_a_failure_while_a_chunk_is_still_being_stored_leaves_nothing(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given chunks of 2 (on PostgreSQL a chunk's COPY is still open while the next is read)
    monkeypatch.setattr("batchwise.intake.ingest.CHUNK_ROWS", 2)
    monkeypatch.setattr("batchwise.intake.ingest.DEFERRED_CHUNK_ROWS", 2)

    def lines() -> Iterator[bytes]:
        yield from jsonl(*(openai_line(i) for i in range(5)))
        raise RuntimeError("the producer died")

    # When the input fails after two chunks and a half
    with pytest.raises(RuntimeError, match="the producer died"):
        client._submit(lines(), Defaults(), skip_invalid=True)
    # Then nothing was stored, and the store takes the next submission as usual
    assert rows(client) == []
    again = client._submit(
        jsonl(*(openai_line(i) for i in range(5))), Defaults(), skip_invalid=False
    )
    assert again.accepted == 5 and len(rows(client)) == 5


def test_a_small_submission_takes_few_ids(client: Client) -> None:
    # PostgreSQL's sequence never gives unused ids back: a one-line submission must not take
    # a whole chunk's worth (ids are 32-bit)
    for i in range(2):
        client._submit(jsonl(openai_line(i)), Defaults(), skip_invalid=False)
    first, second = (r["id"] for r in rows(client))
    assert 0 < second - first <= 256


def test_two_live_submissions_may_use_the_same_custom_ids(client: Client) -> None:
    """Two cookbook files both numbered task-0 … live side by side (issue #13): a custom_id
    is unique within its submission only."""
    first = client._submit(jsonl(openai_line(1)), Defaults(), skip_invalid=False)
    second = client._submit(jsonl(openai_line(2), openai_line(1)), Defaults(), skip_invalid=False)
    assert second.accepted == 2 and first.submission_id != second.submission_id
    stored = rows(client)
    assert [(r["custom_id"], r["submission_id"]) for r in stored] == [
        ("req-1", first.submission_id),
        ("req-2", second.submission_id),
        ("req-1", second.submission_id),
    ]
    assert {r["input_format"] for r in stored} == {"openai"}


def test_a_long_custom_id_any_characters(client: Client) -> None:
    """batchwise sends its own ids to providers, so the caller's may be any string up to 512
    characters, dots and colons included."""
    ids = ["doc.00042:chunk-1", "with space/and ü", "x" * 512]
    result = client._submit(
        jsonl(*(openai_line(i, custom_id=c) for i, c in enumerate(ids))),
        Defaults(),
        skip_invalid=False,
    )
    assert result.accepted == 3
    assert [r["custom_id"] for r in rows(client)] == ids


def test_custom_id_of_a_finished_request_may_be_reused(client: Client) -> None:
    client._submit(jsonl(openai_line(1)), Defaults(), skip_invalid=False)
    with client.store.write() as conn:
        conn.execute(sa.update(requests_t).values(state="succeeded", finished_at=client.clock()))
    result = client._submit(jsonl(openai_line(1)), Defaults(), skip_invalid=False)
    assert result.accepted == 1 and len(rows(client)) == 2


def test_blank_lines_are_skipped_but_counted(client: Client) -> None:
    lines = [orjson.dumps(openai_line(1)), b"\n", b"   ", b"{bad"]
    with pytest.raises(IntakeError) as info:
        client._submit(lines, Defaults(), skip_invalid=False)
    assert info.value.errors[0].line == 4


def test_sinks_write_identical_rows(tmp_path: Path, clock: ManualClock) -> None:
    """The sqlite3 fast path and the SQLAlchemy path store the same thing."""
    lines = jsonl(
        *(openai_line(i, tolerance=t) for i, t in enumerate(["4h", "realtime", "by 07:00"]))
    )
    stored = []
    for name, make in (
        ("fast", SQLiteSink),
        ("engine", lambda url: EngineSink(Store(url), owns_store=True)),
    ):
        url = f"sqlite:///{tmp_path / name}.db"
        submit_lines(lines, make(url), settings=Settings(), now=clock(), zone=resolve_zone("UTC"))
        with Store(url).read() as conn:
            stored.append([dict(r) for r in conn.execute(sa.select(requests_t)).mappings()])
    assert stored[0] == stored[1]
    assert stored[0][0]["deadline"].tzinfo is not None


@pytest.mark.postgres
def test_postgres_sinks_write_identical_rows(postgres_url: str, clock: ManualClock) -> None:
    """psycopg's sink and the SQLAlchemy one store the same thing on PostgreSQL."""
    lines = jsonl(
        *(openai_line(i, tolerance=t) for i, t in enumerate(["4h", "realtime", "by 07:00"])),
        {"model": "gpt-4o-mini", "prompt": "x", "tags": {"task_id": "t", "team": "a"}},
    )
    Store(postgres_url).close()
    made = []
    for make in (PostgresSink, lambda url: EngineSink(Store(url), owns_store=True)):
        made.append(
            submit_lines(
                lines,
                make(postgres_url),
                settings=Settings(),
                now=clock(),
                zone=resolve_zone("UTC"),
            ).submission_id
        )
    store = Store(postgres_url)
    with store.read() as conn:
        stored = [dict(r) for r in conn.execute(sa.select(requests_t)).mappings()]
    store.close()
    by = [[r for r in stored if r["submission_id"] == sid] for sid in made]
    assert len(by[0]) == len(by[1]) == 4
    for plain, engine in zip(*by, strict=True):
        for row in (plain, engine):
            row.pop("submission_id")
            row.pop("id")
            if row["custom_id"].startswith("bw-"):
                row.pop("custom_id")  # named for its id
        assert plain == engine
    assert by[0][0]["deadline"].tzinfo is not None


def test_open_sink_uses_the_fast_path_for_sqlite_files(tmp_path: Path) -> None:
    sink = open_sink(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        assert isinstance(sink, SQLiteSink)
    finally:
        sink.rollback()


@pytest.mark.postgres
@pytest.mark.parametrize("scheme", ["postgresql", "postgresql+psycopg", "postgres"])
def test_open_sink_uses_psycopg_for_postgres(postgres_url: str, scheme: str) -> None:
    Store(postgres_url).close()
    sink = open_sink(scheme + "://" + postgres_url.split("://", 1)[1])
    try:
        assert isinstance(sink, PostgresSink)
        # the URL's options reach the server: this schema, not the default one
        ((path,),) = sink._query("SELECT current_schema()", [])
        assert path in postgres_url
    finally:
        sink.rollback()


@pytest.mark.parametrize(
    "kind", ["sqlite3", "engine", pytest.param("psycopg", marks=pytest.mark.postgres)]
)
def test_sinks_check_guard_moves_against_the_transition_table(
    request: pytest.FixtureRequest, tmp_path: Path, clock: ManualClock, kind: str
) -> None:
    """A guard's refusal or dedupe hit is a state change like any other: a move that
    `states.TRANSITIONS` does not allow is refused before any row is touched."""
    url = f"sqlite:///{tmp_path / 'x.db'}"
    sink: RequestSink
    if kind == "sqlite3":
        sink = SQLiteSink(url)
    elif kind == "engine":
        sink = EngineSink(Store(url), owns_store=True)
    else:
        sink = PostgresSink(request.getfixturevalue("postgres_url"))
    try:
        with pytest.raises(TransitionError, match="from succeeded to rejected"):
            sink.reject([(1, "succeeded", "budget", "over budget")], at=clock())
        with pytest.raises(TransitionError, match="from cancelled to deduplicated"):
            sink.deduplicate([(1, "cancelled", 7)], at=clock())
    finally:
        sink.rollback()


def test_request_columns_exist_in_the_model() -> None:
    assert set(STORED_COLUMNS) <= set(requests_t.c.keys())
    assert set(REQUEST_COLUMNS) - set(STORED_COLUMNS) == {"body"}
    assert set(bodies_t.c.keys()) == {"id", "body"}
    required = {c.name for c in requests_t.c if not c.nullable and not c.primary_key}
    assert required <= set(STORED_COLUMNS), "intake must write every NOT NULL column"


class _MemorySink:
    """An in-process sink for pure validation tests (the real sinks are tested above)."""

    def __init__(self) -> None:
        self.rows: list[tuple[Any, ...]] = []
        self.committed: bool | None = None
        self.rolled_back = False
        self._next = 1

    def time_value(self, moment: Any) -> Any:
        return moment

    def reserve_ids(self, count: int) -> range:
        first, self._next = self._next, self._next + count
        return range(first, first + count)

    def insert(self, rows: Any) -> list[int]:
        self.rows.extend(rows)
        return []

    defers_inserts = False

    def start_insert(self, rows: Any) -> Any:
        refused = self.insert(rows)
        return lambda: refused

    def live_custom_ids(self, submission_id: int, custom_ids: Any) -> dict[str, int]:
        return {}

    def open_submission(self, **kwargs: Any) -> int:
        return 1

    def close_submission(self, submission_id: int, **kwargs: Any) -> None:
        pass

    def turnarounds(self, provider: str, model: str) -> list[float]:
        return []

    def commit(self) -> None:
        self.committed = True

    def rollback(self) -> None:
        self.committed = False
        self.rolled_back = True


# --- property tests on the validator ----------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


@hsettings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_validator_never_crashes_on_arbitrary_json(value: Any) -> None:
    try:
        parse_line(value, None)
    except Invalid as exc:
        assert exc.error


@given(
    st.dictionaries(
        st.sampled_from(
            [
                "custom_id",
                "method",
                "url",
                "body",
                "params",
                "model",
                "messages",
                "prompt",
                "provider",
                "tags",
                "tolerance",
            ]
        ),
        json_values,
        max_size=6,
    )
)
def test_validator_on_near_valid_lines(value: dict[str, Any]) -> None:
    try:
        _, provider, _, model, body, fmt = parse_line(value, None)
    except Invalid as exc:
        assert exc.error
    else:
        assert provider in ("openai", "anthropic") and isinstance(model, str) and model
        assert isinstance(body, dict) and body.get("model") == model
        assert fmt in ("openai", "anthropic", "simple")


@given(st.text(max_size=520) | st.sampled_from(["", "x" * 512, "x" * 513]))
def test_custom_id_rule(custom_id: str) -> None:
    sink = _MemorySink()
    line = orjson.dumps(openai_line(1, custom_id=custom_id))
    valid = 0 < len(custom_id) <= 512
    if valid:
        submit_lines(
            [line], sink, settings=Settings(), now=ManualClock()(), zone=resolve_zone("UTC")
        )
        assert sink.rows[0][1] == custom_id
    else:
        with pytest.raises(IntakeError):
            submit_lines(
                [line], sink, settings=Settings(), now=ManualClock()(), zone=resolve_zone("UTC")
            )


def test_intake_endpoints_are_the_adapters_endpoints() -> None:
    from batchwise.intake.ingest import ENDPOINTS
    from batchwise.providers.anthropic import AnthropicProvider
    from batchwise.providers.openai import OpenAIProvider

    assert ENDPOINTS["openai"] == OpenAIProvider.limits.endpoints
    assert ENDPOINTS["anthropic"] == AnthropicProvider.limits.endpoints


def test_the_raw_benchmark_baseline_writes_the_same_columns() -> None:
    """The raw intake script keeps its own list (it must not import batchwise); keep it true."""
    import sys

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        import raw_intake
    finally:
        sys.path.remove(str(root / "benchmarks"))
    assert raw_intake.COLUMNS == REQUEST_COLUMNS


# --- providers added by configuration -------------------------------------------------------

CONFIGURED = {"groq": "openai"}


def test_a_line_may_name_a_configured_provider_and_is_read_as_its_api() -> None:
    simple = {"model": "llama-3.1-8b-instant", "prompt": "Hi", "provider": "groq"}
    _, provider, endpoint, model, body, fmt = parse_line(simple, None, CONFIGURED)
    assert (provider, endpoint, model, fmt) == (
        "groq", "/v1/chat/completions", "llama-3.1-8b-instant", "simple"
    )  # fmt: skip
    assert "max_tokens" not in body  # read as OpenAI's API: no Anthropic default cap
    batch = {**openai_line(1), "provider": "groq"}
    assert parse_line(batch, None, CONFIGURED)[1] == "groq"
    # the default provider of a file may be a configured one too
    assert parse_line(openai_line(2), "groq", CONFIGURED)[1] == "groq"
    # OpenAI's body ranges apply to the lines of a provider that speaks its API
    with pytest.raises(Invalid) as caught:
        parse_line({**simple, "temperature": 3}, None, CONFIGURED)
    assert caught.value.field == "body.temperature"


def test_a_configured_provider_is_refused_for_another_apis_line_shape() -> None:
    line = {"custom_id": "a", "params": {"model": "claude-haiku-4-5", "max_tokens": 5,
            "messages": [{"role": "user", "content": "Hi"}]}, "provider": "groq"}  # fmt: skip
    with pytest.raises(Invalid) as caught:
        parse_line(line, None, CONFIGURED)
    assert "anthropic-format line but the provider is 'groq' (which speaks the openai API)" in (
        caught.value.error
    )


def test_an_unknown_provider_names_the_configured_ones_or_says_how_to_add_one() -> None:
    line = {"model": "llama-3.1-8b-instant", "prompt": "Hi", "provider": "grok"}
    with pytest.raises(Invalid) as caught:
        parse_line(line, None, CONFIGURED)
    message = caught.value.error
    assert message.startswith("unknown provider 'grok': expected one of openai, anthropic")
    assert message.endswith("(built in); configured: groq")
    with pytest.raises(Invalid) as caught:
        parse_line(line, None)
    assert "none configured (a [providers.NAME] table in the settings file adds one)" in (
        caught.value.error
    )
