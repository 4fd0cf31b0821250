"""Submissions (issue #13): every submit is one, custom_ids are unique within one only, and each
comes back on its own, in the shape its lines came in; `submissions`, `status --submission`,
`wait` and `results --submission` on the CLI; the upgrade of a 0002 store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from click.testing import CliRunner, Result

import batchwise.store.schema
from batchwise import AmbiguousIdError, Submission
from batchwise.api import Client
from batchwise.cli.main import cli
from batchwise.config import Settings
from batchwise.errors import ResultTimeout
from batchwise.reports.results import answer_text
from batchwise.store.engine import Store
from lifecycle_world import World, make_world

PROMPTS = ("Name a colour.", "Name a fruit.", "Name a river.")


def openai_file(path: Path, prompt_suffix: str = "") -> Path:
    """The OpenAI cookbook's shape: task-0 … task-N."""
    lines = [
        {
            "custom_id": f"task-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": p + prompt_suffix}],
                "max_tokens": 32,
            },
        }
        for i, p in enumerate(PROMPTS)
    ]
    path.write_bytes(b"\n".join(orjson.dumps(line) for line in lines) + b"\n")
    return path


def anthropic_file(path: Path) -> Path:
    """Anthropic's batch shape, with the same ids as the OpenAI file."""
    lines = [
        {
            "custom_id": f"task-{i}",
            "params": {
                "model": "claude-haiku-4-5",
                "max_tokens": 32,
                "messages": [{"role": "user", "content": p}],
            },
        }
        for i, p in enumerate(PROMPTS)
    ]
    path.write_bytes(b"\n".join(orjson.dumps(line) for line in lines) + b"\n")
    return path


@pytest.fixture
def world(tmp_path: Path, db_url: str) -> Any:
    with make_world(tmp_path / "home", db_url) as w:
        yield w


def _invoke(world: World, *args: str) -> Result:
    env = {"BATCHWISE_HOME": str(world.settings.home), "BATCHWISE_TIMEZONE": "UTC"}
    url = world.settings.resolved_database_url
    return CliRunner().invoke(cli, ["--db", url, *args], env=env, catch_exceptions=False)


def test_two_files_with_the_same_ids_live_side_by_side_and_come_back_apart(
    world: World, tmp_path: Path
) -> None:
    # Given an OpenAI file and an Anthropic file, both numbered task-0 … task-2
    client = world.client
    first = client.submit_file(openai_file(tmp_path / "a.jsonl"), name="openai cookbook")
    second = client.submit_file(anthropic_file(tmp_path / "b.jsonl"))
    assert isinstance(first, Submission) and first.accepted == second.accepted == 3
    assert first.id != second.id and first.name == "openai cookbook"
    # When both are answered
    world.drain()
    assert first.wait(timeout=5).failed == 0 and second.status() == {"succeeded": 3}
    # Then each comes back alone, in the shape it came in, one line per input line
    openai_lines = list(first.results())
    anthropic_lines = list(second.results())
    assert [line["custom_id"] for line in openai_lines] == ["task-0", "task-1", "task-2"]
    assert [line["custom_id"] for line in anthropic_lines] == ["task-0", "task-1", "task-2"]
    for line in openai_lines:
        assert set(line) == {"id", "custom_id", "response", "error"} and line["error"] is None
        assert line["response"]["status_code"] == 200
        assert line["response"]["body"]["object"] == "chat.completion"
    for line in anthropic_lines:
        assert line["result"]["type"] == "succeeded"
        assert line["result"]["message"]["type"] == "message"
    # and joining by custom_id gives each file its own answers
    for sub, lines in ((first, openai_lines), (second, anthropic_lines)):
        for line in lines:
            stored = client.get(line["custom_id"], submission=sub.id).result
            body = line.get("response", {}).get("body") if "response" in line else None
            assert (body or line["result"]["message"]) == stored
    texts_a = {ln["custom_id"]: answer_text(ln["response"]["body"]) for ln in openai_lines}
    texts_b = {ln["custom_id"]: answer_text(ln["result"]["message"]) for ln in anthropic_lines}
    assert texts_a != texts_b
    # and --format translates one into the other's shape for real
    translated = list(second.results(format="openai"))
    assert [answer_text(ln["response"]["body"]) for ln in translated] == list(texts_b.values())
    assert all(ln["response"]["body"]["choices"][0]["finish_reason"] for ln in translated)
    # A custom_id alone is now ambiguous, and the error lists both submissions
    with pytest.raises(AmbiguousIdError) as info:
        client.get("task-0")
    assert {sid for sid, _, _ in info.value.submissions} == {first.id, second.id}
    assert "openai cookbook" in str(info.value)


def test_a_long_id_with_dots_and_colons_goes_to_the_provider_and_back(world: World) -> None:
    long_id = "doc.00042:chunk-1/" + "x" * 400
    submission = world.client.enqueue_many(
        [
            {"model": "gpt-4o-mini", "prompt": "one", "custom_id": "doc.00042:chunk-1"},
            {"model": "claude-haiku-4-5", "prompt": "two", "custom_id": long_id},
        ],
        name="chunks",
    )
    # enqueue_many's Submission is also the list of handles it used to return
    assert len(submission) == 2 and [h.submission_id for h in submission] == [submission.id] * 2
    assert submission[0].id < submission[1].id
    world.drain()
    lines = list(submission.results())
    assert [(ln["custom_id"], ln["state"]) for ln in lines] == [
        ("doc.00042:chunk-1", "succeeded"),
        (long_id, "succeeded"),
    ]
    assert all(ln["text"] for ln in lines)  # simple lines get simple result lines
    assert world.client.get("doc.00042:chunk-1").custom_id == "doc.00042:chunk-1"


def test_failures_come_back_in_each_format(world: World, tmp_path: Path) -> None:
    client = world.client
    sub = client.submit_file(openai_file(tmp_path / "a.jsonl"))
    client.cancel(sub[1].id)
    world.drain()
    view = sub.wait(timeout=5)
    assert view.counts == {"cancelled": 1, "succeeded": 2} and view.failed == 1
    openai_line = list(sub.results())[1]
    assert openai_line["response"] is None
    assert openai_line["error"]["code"] == "batch_cancelled"
    anthropic_line = list(sub.results(format="anthropic"))[1]
    assert anthropic_line == {"custom_id": "task-1", "result": {"type": "canceled"}}


def test_wait_exits_0_when_all_answered_1_when_any_failed_2_on_timeout(
    world: World, tmp_path: Path
) -> None:
    good = _invoke(world, "submit", str(openai_file(tmp_path / "a.jsonl")), "--json")
    bad = _invoke(world, "submit", str(openai_file(tmp_path / "b.jsonl", " Again.")), "--json")
    good_id = orjson.loads(good.output)["submission"]
    bad_id = orjson.loads(bad.output)["submission"]
    assert good_id != bad_id
    timed_out = _invoke(world, "wait", str(good_id), "--timeout", "0")
    assert timed_out.exit_code == 2 and "3 unfinished" in timed_out.output
    world.client.cancel(world.client.get("task-2", submission=bad_id).id)
    world.drain()
    done = _invoke(world, "wait", str(good_id))
    assert done.exit_code == 0 and "3 answered, 0 without an answer" in done.output
    failed = _invoke(world, "wait", str(bad_id), "--json")
    assert failed.exit_code == 1
    assert orjson.loads(failed.output)["counts"] == {"cancelled": 1, "succeeded": 2}


def test_submission_commands(world: World, tmp_path: Path) -> None:
    submitted = _invoke(
        world, "submit", str(openai_file(tmp_path / "a.jsonl")), "--name", "first", "--json"
    )
    first = orjson.loads(submitted.output)["submission"]
    second_out = _invoke(world, "submit", str(anthropic_file(tmp_path / "b.jsonl")))
    assert second_out.exit_code == 0 and "submission" in second_out.output
    one = _invoke(world, "submit", "--model", "gpt-4o-mini", "--prompt", "hi", "--json")
    assert set(orjson.loads(one.output)) == {"id", "lane", "state", "submission", "warnings"}
    listed = orjson.loads(_invoke(world, "submissions", "--json").output)
    sources = ["prompt", str(tmp_path / "b.jsonl"), str(tmp_path / "a.jsonl")]
    assert [s["source"] for s in listed] == sources
    assert [s["format"] for s in listed] == ["simple", "anthropic", "openai"]
    assert listed[2]["name"] == "first" and listed[2]["counts"] == {"queued": 3}
    assert "first" in _invoke(world, "submissions").output
    shown = orjson.loads(_invoke(world, "status", "--submission", str(first), "--json").output)
    assert shown["total"] == 3 and shown["finished_at"] is None
    # a custom_id used by two submissions: ambiguous without --submission
    ambiguous = _invoke(world, "status", "task-0")
    assert ambiguous.exit_code == 1 and "2 submissions" in ambiguous.output
    picked = _invoke(world, "status", "task-0", "--submission", str(first), "--json")
    assert orjson.loads(picked.output)[0]["submission"] == first
    world.drain()
    out = tmp_path / "out.jsonl"
    exported = _invoke(world, "results", "--submission", str(first), "--out", str(out))
    assert exported.exit_code == 0 and "exported 3" in exported.output
    lines = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [ln["custom_id"] for ln in lines] == ["task-0", "task-1", "task-2"]
    assert all(ln["response"]["status_code"] == 200 for ln in lines)
    as_anthropic = _invoke(world, "results", "--submission", str(first), "--format", "anthropic")
    messages = [orjson.loads(x) for x in as_anthropic.stdout.splitlines()]
    finish = {"stop": "end_turn", "length": "max_tokens"}
    assert [m["result"]["message"]["stop_reason"] for m in messages] == [
        finish[ln["response"]["body"]["choices"][0]["finish_reason"]] for ln in lines
    ]
    missing = _invoke(world, "results", "--submission", "999")
    assert missing.exit_code == 1 and "no submission with id 999" in missing.output


def test_submission_read_back_by_id_and_wait_timeout(tmp_path: Path, db_url: str) -> None:
    client = Client(db_url, settings=Settings(home=tmp_path / "home", timezone="UTC"))
    stored = client.enqueue_many([{"model": "gpt-4o-mini", "prompt": "hi", "tolerance": "4h"}])
    again = client.submission(stored.id)
    assert [h.id for h in again] == [h.id for h in stored] and again.status() == {"queued": 1}
    with pytest.raises(AttributeError, match="intake summary"):
        _ = again.accepted
    with pytest.raises(ResultTimeout, match="1 unfinished"):
        again.wait(timeout=0)
    handle = client.enqueue(model="gpt-4o-mini", prompt="one more", submission_name="single")
    assert handle.submission_id is not None and handle.submission_id != stored.id
    assert client.submission_view(handle.submission_id).name == "single"
    client.close()


def test_submit_and_list_as_processes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'bw.db'}"
    env = {**os.environ, "BATCHWISE_HOME": str(tmp_path / "home"), "BATCHWISE_TIMEZONE": "UTC"}
    path = openai_file(tmp_path / "a.jsonl")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "batchwise", "--db", url, *args]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)

    for _ in range(2):  # the same file twice: two live submissions
        submitted = run("submit", str(path), "--json", "--name", "twice")
        assert submitted.returncode == 0, submitted.stderr
    listed = run("submissions", "--json")
    assert [(s["name"], s["total"]) for s in orjson.loads(listed.stdout)] == [("twice", 3)] * 2


def test_upgrade_from_0002_backfills_submissions_and_keeps_every_request(db_url: str) -> None:
    config = Config()
    config.set_main_option(
        "script_location", str(Path(batchwise.store.schema.__file__).parent / "migrations")
    )
    engine = sa.create_engine(db_url)
    at = "2026-11-29 12:00:00.000000" if db_url.startswith("sqlite") else "2026-11-29 12:00Z"
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0002")
        conn.execute(
            sa.text(
                "INSERT INTO job_runs (id, job, scheduled_for, state, trigger, started_at, "
                "requests) VALUES (7, 'nightly', :at, 'submitted', 'schedule', :at, 2)"
            ),
            {"at": at},
        )
        for rid, cid, run, state, finished in (
            (1, "a", None, "succeeded", at),
            (2, "b", None, "queued", None),
            (3, "run7-0", 7, "queued", None),
            (4, "run7-1", 7, "queued", None),
            (5, "a", None, "queued", None),  # reused once the first "a" finished
        ):
            conn.execute(
                sa.text(
                    "INSERT INTO requests (id, custom_id, provider, endpoint, model, body_hash, "
                    "tolerance, deadline, lane, reason, state, attempts, tags, job_run_id, "
                    "size_bytes, est_input_tokens, created_at, updated_at, finished_at) VALUES "
                    "(:id, :cid, 'openai', '/v1/chat/completions', 'gpt-4o-mini', :hash, '24h', "
                    ":at, 'deferred', 'r', :state, 0, '{}', :run, 7, 1, :at, :at, :fin)"
                ),
                {"id": rid, "cid": cid, "hash": "ab" * 32, "at": at, "state": state,
                 "run": run, "fin": finished},
            )  # fmt: skip
    engine.dispose()
    store = Store(db_url)  # upgrades to the head
    with store.read() as conn:
        kept = conn.execute(
            sa.text("SELECT id, custom_id, submission_id, input_format FROM requests ORDER BY id")
        ).all()
        subs = conn.execute(
            sa.text(
                "SELECT id, name, source, job_run_id, first_request_id, last_request_id "
                "FROM submissions ORDER BY id"
            )
        ).all()
        indexes = {i["name"] for i in sa.inspect(conn).get_indexes("requests")}
    store.close()
    (run_sub, run_name, run_source, run_id, *run_range), rest = subs
    assert (run_name, run_source, run_id, run_range) == (None, "job:nightly", 7, [3, 4])
    assert rest[1:] == ("before submissions", "upgrade", None, 1, 5)
    assert [(r[0], r[1]) for r in kept] == [
        (1, "a"),
        (2, "b"),
        (3, "run7-0"),
        (4, "run7-1"),
        (5, "a"),
    ]
    assert [r[2] for r in kept] == [rest[0], rest[0], run_sub, run_sub, rest[0]]
    assert {r[3] for r in kept} == {None}
    assert {
        "uq_requests_live_custom_id", "ix_requests_queued", "ix_requests_calls",
        "ix_requests_batch", "ix_requests_job_run", "ix_requests_task", "ix_requests_answered",
    } <= indexes  # fmt: skip
    client = Client(db_url, settings=Settings(timezone="UTC"))
    assert client.get("b").submission_id == rest[0]
    assert client.submission(rest[0]).status() == {"queued": 2, "succeeded": 1}
    client.close()


# The providers' own documented batch files, as their guides and cookbooks write them
# (shapes from /work/shared/reference/provider-apis.md; text shortened).
_PDF = (
    "JVBERi0xLjQKJcOkw7zDtsOfCjEgMCBvYmoKPDwvVHlwZS9DYXRhbG9nPj4KZW5kb2JqCnRyYWlsZXIKPDw+"
    "PgolJUVPRgo="
)
DOCUMENTED: dict[str, list[dict[str, Any]]] = {
    "openai-guide": [  # the Batch guide's own example, model and all
        {"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-3.5-turbo-0125", "messages": [
             {"role": "system", "content": "You are a helpful assistant."},
             {"role": "user", "content": "Hello world!"}], "max_tokens": 1000}},
        {"custom_id": "request-2", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-3.5-turbo-0125", "messages": [
             {"role": "system", "content": "You are an unhelpful assistant."},
             {"role": "user", "content": "Hello world!"}], "max_tokens": 1000}},
    ],
    "openai-cookbook": [
        {"custom_id": f"task-{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-4-turbo", "temperature": 0.1,
                  "response_format": {"type": "json_object"},
                  "messages": [{"role": "system", "content": "Categorise the movie as JSON."},
                               {"role": "user", "content": f"Movie number {i}"}]}}
        for i in range(3)
    ],
    "embeddings": [
        {"custom_id": "emb-1", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": "text-embedding-3-small", "input": "The food was delicious."}},
    ],
    "responses": [
        {"custom_id": "resp-1", "method": "POST", "url": "/v1/responses",
         "body": {"model": "gpt-4o-mini", "input": "Write a one-line story about a unicorn."}},
    ],
    "completions": [
        {"custom_id": "cmp-1", "method": "POST", "url": "/v1/completions",
         "body": {"model": "gpt-3.5-turbo-instruct", "prompt": "Say this is a test",
                  "max_tokens": 7}},
    ],
    "moderations": [
        {"custom_id": "mod-1", "method": "POST", "url": "/v1/moderations",
         "body": {"model": "omni-moderation-latest", "input": "I want to kill them."}},
    ],
    "anthropic-basic": [
        {"custom_id": "my-first-request", "params": {
            "model": "claude-opus-4-8", "max_tokens": 1024,
            "messages": [{"role": "user", "content": "Hello, world"}]}},
        {"custom_id": "my-second-request", "params": {
            "model": "claude-opus-4-8", "max_tokens": 1024,
            "messages": [{"role": "user", "content": "Hi again, friend"}]}},
    ],
    "anthropic-caching": [
        {"custom_id": f"cached-{i}", "params": {
            "model": "claude-opus-4-8", "max_tokens": 1024,
            "system": [
                {"type": "text", "text": "You are an AI assistant analysing literary works."},
                {"type": "text", "text": "Pride and Prejudice, full text. " * 200,
                 "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
            "messages": [{"role": "user", "content": f"Question {i} about the book."}]}}
        for i in range(2)
    ],
    "anthropic-pdf": [
        {"custom_id": "pdf-1", "params": {
            "model": "claude-sonnet-4-5", "max_tokens": 1024,
            "messages": [{"role": "user", "content": [
                {"type": "document", "source": {"type": "base64",
                                                "media_type": "application/pdf", "data": _PDF}},
                {"type": "text", "text": "Summarise this document."}]}]}},
    ],
}  # fmt: skip


def test_the_providers_documented_batch_files_are_answered_and_exported_in_their_own_format(
    world: World, tmp_path: Path
) -> None:
    # Given each documented file submitted unchanged, as its own submission
    submissions = {}
    for name, lines in DOCUMENTED.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
        submissions[name] = world.client.submit_file(path, tolerance="24h", name=name)
        assert submissions[name].accepted == len(lines), name
    # When they are answered
    world.drain()
    # Then each comes back whole, line for line, in the shape it came in
    for name, submission in submissions.items():
        lines = list(submission.results())
        ids = [line["custom_id"] for line in DOCUMENTED[name]]
        assert [line["custom_id"] for line in lines] == ids, name
        for line in lines:
            if name.startswith("anthropic"):
                assert line["result"]["type"] == "succeeded", (name, line)
                assert line["result"]["message"]["content"], (name, line)
            else:
                assert line["error"] is None and line["response"]["status_code"] == 200, line
        if not name.startswith("anthropic"):
            objects = {line["response"]["body"].get("object") for line in lines}
            expected = {"embeddings": "list", "responses": "response",
                        "completions": "text_completion"}.get(name, "chat.completion")  # fmt: skip
            assert objects == {expected} or name == "moderations", (name, objects)
    moderation = next(iter(submissions["moderations"].results()))["response"]["body"]
    assert moderation["results"][0]["flagged"] is True
    embedding = next(iter(submissions["embeddings"].results()))["response"]["body"]
    assert len(embedding["data"][0]["embedding"]) == 1536
