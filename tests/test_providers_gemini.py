"""Gemini in batchwise: the adapter's wire details, its file path through the Files API, usage
and prices, intake of Gemini lines, and a whole run through Gemini batch mode on the emulator.

The life of a batch (inline input, polling, cancel, expiry, faults, keys) is held to the same
contract as the other adapters in `test_provider_contract.py`.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import genai_prices
import httpx
import orjson
import pytest

from batchwise.clock import ManualClock
from batchwise.config import Settings
from batchwise.costs.guards import Policy, estimate_tokens, shape
from batchwise.costs.pricing import PriceBook, normalise_usage
from batchwise.emulator.app import Emulator, EmulatorConfig
from batchwise.errors import IntakeError, ProviderError
from batchwise.intake.ingest import parse_line
from batchwise.intake.lines import Invalid
from batchwise.providers.base import BatchStatus, OutcomeKind
from batchwise.providers.gemini import GENERATE, GeminiProvider, parse_display_name
from batchwise.store.engine import batches_t, ledger_t, requests_t

sys.path.insert(0, str(Path(__file__).parent))
from invariants import rows
from lifecycle_world import make_world

KEY = "AIza-gemini-SECRET-42b42b42b42b"
MODEL = "gemini-2.5-flash"
#: after genai-prices' batch variants start (2026-10-14), so Gemini's batch prices apply
AFTER = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


def body(text: str, model: str = MODEL, **config: Any) -> dict[str, Any]:
    return {
        "model": f"models/{model}",
        "contents": [{"role": "user", "parts": [{"text": text}]}],
        **({"generationConfig": config} if config else {}),
    }


def batch_file(path: Path, provider: GeminiProvider, ids: list[str]) -> Path:
    with path.open("wb") as fh:
        for cid in ids:
            fh.write(provider.batch_line(cid, GENERATE, orjson.dumps(body(f"q {cid}"))) + b"\n")
    return path


# --- the adapter over a socket: the file path ------------------------------------------------


def test_a_large_batch_is_uploaded_resumably_and_read_back_from_its_responses_file(
    tmp_path: Path,
) -> None:
    clock = ManualClock(AFTER)
    with Emulator(EmulatorConfig(turnaround_s=60.0, api_key=KEY), clock=clock) as emu:
        # Given an adapter that sends every batch as a file (nothing is small enough inline)
        provider = GeminiProvider(KEY, emu.gemini_base_url, inline_max_bytes=0)
        ids = [f"r{i}" for i in range(6)]
        path = batch_file(tmp_path / "in.jsonl", provider, ids)
        # When the batch is created and runs to its end
        created = provider.submit_batch(path, endpoint=GENERATE, metadata={"batchwise_batch": "9"})
        assert created.status is BatchStatus.VALIDATING  # BATCH_STATE_PENDING
        assert created.metadata == {"batchwise_batch": "9"}
        assert created.model == MODEL and created.id.startswith("batches/")
        clock.advance(30)
        assert provider.get_batch(created.id).status is BatchStatus.IN_PROGRESS
        clock.advance(31)
        ended = provider.get_batch(created.id)
        outcomes = list(provider.fetch_results(ended))
        stats = httpx.get(f"{emu.url}/_emulator/stats").json()
        provider.delete_batch(created.id)
        with pytest.raises(ProviderError) as caught:
            provider.get_batch(created.id)
        provider.close()
    # Then the input went through the Files API and the answers came from the responses file
    assert ended.status is BatchStatus.COMPLETED
    assert ended.result_refs["responses_file"] == f"files/batch-{created.id.split('/')[1]}"
    assert [o.custom_id for o in outcomes] == ids  # the file keeps input order
    assert {o.kind for o in outcomes} == {OutcomeKind.SUCCEEDED}
    assert all(o.source == "responses" and o.usage for o in outcomes)
    assert (ended.counts.total, ended.counts.succeeded) == (6, 6)
    [made] = stats["batches"]
    assert made["request_count"] == 6 and made["model"] == MODEL
    assert caught.value.status_code == 404 and not caught.value.retryable


def test_broken_lines_of_a_responses_file_are_unreadable_and_the_rest_read(
    tmp_path: Path,
) -> None:
    config = EmulatorConfig(turnaround_s=0.0, malformed_line_rate=0.5, seed=11, api_key=KEY)
    with Emulator(config) as emu:
        provider = GeminiProvider(KEY, emu.gemini_base_url, inline_max_bytes=0)
        ids = [f"m{i}" for i in range(12)]
        created = provider.submit_batch(
            batch_file(tmp_path / "in.jsonl", provider, ids), endpoint=GENERATE, metadata={}
        )
        outcomes = list(provider.fetch_results(provider.get_batch(created.id)))
        provider.close()
    kinds = [o.kind for o in outcomes]
    assert len(outcomes) == len(ids)
    assert OutcomeKind.UNREADABLE in kinds and OutcomeKind.SUCCEEDED in kinds
    assert set(kinds) == {OutcomeKind.UNREADABLE, OutcomeKind.SUCCEEDED}
    for outcome in outcomes:
        if outcome.kind is OutcomeKind.UNREADABLE:
            assert outcome.custom_id == "" and outcome.error_message and outcome.line
            assert KEY not in (outcome.excerpt or "")


def test_realtime_generate_content_sends_the_model_in_the_path_only(tmp_path: Path) -> None:
    with Emulator(EmulatorConfig(api_key=KEY)) as emu:
        provider = GeminiProvider(KEY, emu.gemini_base_url)
        result = provider.call(GENERATE, body("hello", maxOutputTokens=900))
        provider.close()
    usage = result.body["usageMetadata"]
    assert result.body["modelVersion"] == MODEL and result.provider_request_id
    assert usage["thoughtsTokenCount"] > 0 and usage["candidatesTokenCount"] > 0


# --- the adapter's wire details (scripted answers) -------------------------------------------


def scripted(
    answers: list[httpx.Response],
) -> tuple[GeminiProvider, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        return answers.pop(0)

    client = httpx.Client(transport=httpx.MockTransport(handler))
    provider = GeminiProvider(
        KEY, "https://gemini.test", client=client, sleep=lambda _s: None, inline_max_bytes=0
    )
    return provider, seen


def operation(state: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "batches/abc",
        "metadata": {
            "name": "batches/abc",
            "model": "models/gemini-2.5-flash",
            "displayName": "batchwise_batch=7",
            "state": state,
            "createTime": "2026-11-02T09:00:00.123456789Z",
            "batchStats": {"requestCount": "2", "pendingRequestCount": "2"},
            **extra,
        },
    }


def test_the_upload_protocol_and_the_key_header(tmp_path: Path) -> None:
    started = httpx.Response(
        200,
        json={},
        headers={"x-goog-upload-url": "https://elsewhere.test/upload/v1beta/files?upload_id=u1"},
    )
    finished = httpx.Response(200, json={"file": {"name": "files/in1"}})
    created = httpx.Response(200, json=operation("BATCH_STATE_PENDING"))
    provider, seen = scripted([started, finished, created])
    path = batch_file(tmp_path / "in.jsonl", provider, ["a", "b"])
    info = provider.submit_batch(path, endpoint=GENERATE, metadata={"batchwise_batch": "7"})
    start, upload, create = seen
    assert start.url.path == "/upload/v1beta/files"
    assert start.headers["x-goog-upload-protocol"] == "resumable"
    assert start.headers["x-goog-upload-command"] == "start"
    assert start.headers["x-goog-upload-header-content-length"] == str(path.stat().st_size)
    # the upload goes to our host (with the session id), never with the key to another one
    assert (upload.url.host, upload.url.params["upload_id"]) == ("gemini.test", "u1")
    assert upload.headers["x-goog-upload-command"] == "upload, finalize"
    assert upload.content == path.read_bytes()
    assert create.url.path == "/v1beta/models/gemini-2.5-flash:batchGenerateContent"
    assert orjson.loads(create.content) == {
        "batch": {"displayName": "batchwise_batch=7", "inputConfig": {"fileName": "files/in1"}}
    }
    assert all(r.headers["x-goog-api-key"] == KEY and KEY not in str(r.url) for r in seen)
    assert info.status is BatchStatus.VALIDATING and info.counts.processing == 2
    assert info.created_at == datetime(2026, 11, 2, 9, 0, 0, 123456, tzinfo=UTC)
    assert parse_display_name("batchwise_batch=7;x=y") == {"batchwise_batch": "7", "x": "y"}


@pytest.mark.parametrize(
    ("state", "status"),
    [
        ("BATCH_STATE_PENDING", BatchStatus.VALIDATING),
        ("BATCH_STATE_RUNNING", BatchStatus.IN_PROGRESS),
        ("BATCH_STATE_SUCCEEDED", BatchStatus.COMPLETED),
        ("BATCH_STATE_FAILED", BatchStatus.FAILED),
        ("BATCH_STATE_CANCELLED", BatchStatus.CANCELLED),
        ("BATCH_STATE_EXPIRED", BatchStatus.EXPIRED),
        ("JOB_STATE_SUCCEEDED", BatchStatus.COMPLETED),
    ],
)
def test_batch_states_map_to_the_batch_life(state: str, status: BatchStatus) -> None:
    provider, _ = scripted([httpx.Response(200, json=operation(state))])
    assert provider.get_batch("batches/abc").status is status


def test_result_lines_map_errors_by_their_google_status(tmp_path: Path) -> None:
    lines = [
        {"key": "ok", "response": {"candidates": [], "usageMetadata": {"promptTokenCount": 3}}},
        {
            "key": "busy",
            "error": {"code": 429, "message": "slow down", "status": "RESOURCE_EXHAUSTED"},
        },
        {"key": "bad", "error": {"code": 400, "message": "no", "status": "INVALID_ARGUMENT"}},
        # a google.rpc.Status as batch output holds it: a gRPC code and no status word
        {"key": "rpc-busy", "error": {"code": 8, "message": "quota"}},
        {"key": "rpc-bad", "error": {"code": 3, "message": "bad request"}},
        {"response": {}},
    ]
    content = b"".join(orjson.dumps(line) + b"\n" for line in lines) + b'{"key": "cut'
    done = operation("BATCH_STATE_SUCCEEDED", output={"responsesFile": "files/out1"})
    provider, seen = scripted(
        [httpx.Response(200, json=done), httpx.Response(200, content=content)]
    )
    outcomes = list(provider.fetch_results(provider.get_batch("batches/abc")))
    assert seen[1].url.path == "/download/v1beta/files/out1:download"
    assert seen[1].url.params["alt"] == "media"
    kinds = [(o.custom_id, o.kind, o.retryable) for o in outcomes]
    assert kinds == [
        ("ok", OutcomeKind.SUCCEEDED, False),
        ("busy", OutcomeKind.ERRORED, True),
        ("bad", OutcomeKind.ERRORED, False),
        ("rpc-busy", OutcomeKind.ERRORED, True),
        ("rpc-bad", OutcomeKind.ERRORED, False),
        ("", OutcomeKind.UNREADABLE, False),
        ("", OutcomeKind.UNREADABLE, False),
    ]
    assert outcomes[1].error_code == "RESOURCE_EXHAUSTED" and outcomes[1].status_code == 429
    assert outcomes[2].error_message == "no"
    assert (outcomes[3].error_code, outcomes[3].status_code) == ("RESOURCE_EXHAUSTED", None)


def test_a_google_error_answer_is_classified_by_its_status() -> None:
    refusal = {"error": {"code": 400, "message": "Bad model", "status": "INVALID_ARGUMENT"}}
    busy = {"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}}
    provider, seen = scripted(
        [httpx.Response(400, json=refusal)] + [httpx.Response(503, json=busy)] * 3
    )
    with pytest.raises(ProviderError) as final:
        provider.call(GENERATE, body("x"))
    assert (final.value.code, final.value.retryable) == ("INVALID_ARGUMENT", False)
    with pytest.raises(ProviderError) as transient:
        provider.call(GENERATE, body("x"))
    assert (transient.value.code, transient.value.retryable) == ("UNAVAILABLE", True)
    assert len(seen) == 4  # the refusal once, the outage three times (two retries)
    assert all(KEY not in str(e.value) for e in (final, transient))


# --- usage and prices ------------------------------------------------------------------------


def test_usage_counts_thoughts_as_output_and_cached_tokens_within_the_prompt() -> None:
    usage = normalise_usage(
        "gemini",
        GENERATE,
        {
            "promptTokenCount": 2_000,
            "cachedContentTokenCount": 1_500,
            "candidatesTokenCount": 300,
            "thoughtsTokenCount": 700,
            "totalTokenCount": 3_000,
        },
    )
    assert usage is not None
    assert (usage.input_tokens, usage.cache_read_tokens) == (2_000, 1_500)
    assert (usage.output_tokens, usage.reasoning_tokens) == (1_000, 700)


def test_gemini_batch_lines_are_priced_at_genai_prices_batch_rates() -> None:
    raw = {"promptTokenCount": 100_000, "candidatesTokenCount": 20_000, "thoughtsTokenCount": 5_000}
    usage = normalise_usage("gemini", GENERATE, raw)
    book = PriceBook(batch_discount={"gemini": 0.5})
    price = book.price("gemini", MODEL, usage, batch=True, at=AFTER)
    counts = genai_prices.Usage(input_tokens=100_000, output_tokens=25_000)
    standard = genai_prices.calc_price(counts, MODEL, provider_id="google")
    batch = genai_prices.calc_price(
        counts,
        MODEL,
        provider_id="google",
        price_context={"processing": "batch"},
        genai_request_timestamp=AFTER,
    )
    assert price.source == "genai-prices:batch"
    assert price.realtime_nusd == int(standard.total_price * Decimal(10**9))
    assert price.actual_nusd == int(batch.total_price * Decimal(10**9))
    assert price.actual_nusd * 2 == price.realtime_nusd  # Gemini batch mode is half price


# --- intake ----------------------------------------------------------------------------------


def test_simple_lines_for_a_gemini_model_become_generate_content_requests() -> None:
    line = {
        "custom_id": "s1",
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": [{"type": "text", "text": "Again"}]},
        ],
        "max_tokens": 300,
        "temperature": 0.2,
        "tolerance": "24h",
    }
    custom_id, provider, endpoint, model, stored, fmt = parse_line(line, None)
    assert (custom_id, provider, endpoint, model, fmt) == (
        "s1",
        "gemini",
        GENERATE,
        MODEL,
        "simple",
    )
    assert stored == {
        "model": f"models/{MODEL}",
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "contents": [
            {"role": "user", "parts": [{"text": "Hi"}]},
            {"role": "model", "parts": [{"text": "Hello"}]},
            {"role": "user", "parts": [{"text": "Again"}]},
        ],
        "generationConfig": {"maxOutputTokens": 300, "temperature": 0.2},
    }
    prompt = parse_line({"model": "models/gemini-2.0-flash", "prompt": "Hi"}, None)
    assert prompt[1:4] == ("gemini", GENERATE, "gemini-2.0-flash")


def test_gemini_request_lines_keep_their_key_and_body() -> None:
    request = {"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"topP": 0.5}}
    line = {"key": "k-1", "model": MODEL, "request": request, "tags": {"use_case": "u"}}
    custom_id, provider, _endpoint, model, stored, fmt = parse_line(line, None)
    assert (custom_id, provider, model, fmt) == ("k-1", "gemini", MODEL, "gemini")
    assert stored == {"model": f"models/{MODEL}", **request}
    inner = parse_line({"key": "k", "request": {**request, "model": f"models/{MODEL}"}}, None)
    assert inner[3] == MODEL


@pytest.mark.parametrize(
    ("line", "field", "words"),
    [
        (
            {"key": "k", "request": {"contents": []}, "model": MODEL},
            "request.contents",
            "non-empty",
        ),
        ({"key": "k", "request": {"contents": [{"parts": []}]}}, "model", "needs its model"),
        (
            {"model": MODEL, "prompt": "x", "max_tokens": 0},
            "body.generationConfig.maxOutputTokens",
            "≥ 1",
        ),
        ({"model": MODEL, "prompt": "x", "logit_bias": {}}, "logit_bias", "unknown field"),
        ({"key": "k", "request": {}, "model": MODEL, "custom_id": "c"}, "custom_id", "unexpected"),
    ],
)
def test_bad_gemini_lines_say_which_field_and_what_was_expected(
    line: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(Invalid) as caught:
        parse_line(line, None)
    assert caught.value.field == field and words in caught.value.error


def test_guards_cap_gemini_output_in_its_generation_config() -> None:
    capped = shape(
        Policy(default_max_tokens=256, max_max_tokens=1000), "gemini", GENERATE, MODEL, body("hi")
    )
    assert capped.body["generationConfig"] == {"maxOutputTokens": 256}
    over = shape(
        Policy(max_max_tokens=1000), "gemini", GENERATE, MODEL, body("hi", maxOutputTokens=5000)
    )
    assert over.body["generationConfig"] == {"maxOutputTokens": 1000}
    assert "max_tokens" not in over.body
    assert estimate_tokens(body("x" * 400)) >= 100


# --- batchwise end to end --------------------------------------------------------------------


def test_gemini_lines_run_through_batch_mode_at_about_half_the_realtime_price(
    tmp_path: Path, db_url: str
) -> None:
    # Given Gemini simple lines and Gemini request lines in one file
    lines = [
        {"custom_id": f"s{i}", "model": MODEL, "prompt": f"Summarise record {i}", "max_tokens": 900}
        for i in range(8)
    ]
    lines.append({"key": "native-1", "model": MODEL, "request": body("Tell me a fact")})
    source = tmp_path / "gemini.jsonl"
    source.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    with make_world(tmp_path, db_url, clock=ManualClock(AFTER)) as world:
        submission = world.client.submit_file(source)
        assert (submission.accepted, submission.deferred) == (9, 9)
        # When the scheduler packs, submits, polls and reconciles them
        world.drain()
        requests = rows(world.store, requests_t)
        batches = rows(world.store, batches_t)
        ledger = rows(world.store, ledger_t)
        exported = list(submission.results())
        stats = world.stats()
    # Then one Gemini batch answered all of them
    assert {(r["provider"], r["model"], r["state"]) for r in requests} == {
        ("gemini", MODEL, "succeeded")
    }
    [batch] = batches
    assert (batch["provider"], batch["state"], batch["request_count"]) == (
        "gemini",
        "reconciled",
        9,
    )
    assert [(b["provider"], b["request_count"]) for b in stats["batches"]] == [("gemini", 9)]
    assert stats["realtime_calls"]["gemini"] == 0
    # ... booked as batch work at Gemini's batch price, beside its realtime counterfactual
    assert {e["kind"] for e in ledger} == {"batch"} and len(ledger) == 9
    actual = sum(e["actual_nusd"] for e in ledger)
    realtime = sum(e["realtime_nusd"] for e in ledger)
    assert actual > 0 and actual * 2 == pytest.approx(realtime, abs=len(ledger))
    # ... and the results come back in the shape each line came in
    simple, native = exported[:8], exported[8]
    assert [r["custom_id"] for r in simple] == [f"s{i}" for i in range(8)]
    assert all(r["state"] == "succeeded" and r["text"] for r in simple)
    assert native["key"] == "native-1" and native["response"]["candidates"]


def test_failed_gemini_lines_go_again_or_fail_with_the_providers_word(tmp_path: Path) -> None:
    config = EmulatorConfig(turnaround_s=2.0, error_rate=0.3, seed=5)
    lines = [{"custom_id": f"f{i}", "model": MODEL, "prompt": f"Line {i}"} for i in range(20)]
    with make_world(
        tmp_path,
        f"sqlite:///{tmp_path}/db.sqlite",
        emulator_config=config,
        clock=ManualClock(AFTER),
    ) as world:
        world.enqueue(lines)
        world.drain()
        requests = rows(world.store, requests_t)
        made = world.stats()["batches"]
    states = {r["state"] for r in requests}
    assert states <= {"succeeded", "failed"} and "succeeded" in states
    assert len(made) > 1  # transient line errors were sent again in a later batch
    # a final error fails at once; a line that kept failing transiently fails after its tries
    words = ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "INTERNAL")
    failed = [r for r in requests if r["state"] == "failed"]
    assert all(any(w in (r["error"] or "") for w in words) for r in failed)


def test_a_realtime_gemini_request_is_answered_through_generate_content(tmp_path: Path) -> None:
    with make_world(tmp_path, f"sqlite:///{tmp_path}/db.sqlite", clock=ManualClock(AFTER)) as world:
        [handle] = world.client.enqueue_many(
            [{"model": MODEL, "prompt": "Now please", "tolerance": "realtime"}]
        )
        world.drain()
        [entry] = rows(world.store, ledger_t)
        assert handle.refresh().state == "succeeded"
        assert world.stats()["realtime_calls"]["gemini"] == 1
    assert entry["kind"] == "realtime" and entry["actual_nusd"] == entry["realtime_nusd"] > 0


def test_a_bad_gemini_file_is_refused_whole_with_every_bad_line(tmp_path: Path) -> None:
    lines = [
        {"model": MODEL, "prompt": "fine"},
        {"key": "k", "request": {"contents": "nope"}, "model": MODEL},
        {"model": "mystery-model", "prompt": "who serves me?"},
    ]
    source = tmp_path / "bad.jsonl"
    source.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    with make_world(tmp_path, f"sqlite:///{tmp_path}/db.sqlite") as world:
        with pytest.raises(IntakeError) as caught:
            world.client.submit_file(source)
        assert rows(world.store, requests_t) == []
    errors = {(e.line, e.field) for e in caught.value.errors}
    assert errors == {(2, "request.contents"), (3, "provider")}
    assert "gemini" in next(e.error for e in caught.value.errors if e.line == 3)


def test_settings_read_the_gemini_key_and_base_url_as_the_sdk_does() -> None:
    env = {"GEMINI_API_KEY": "g-key", "GOOGLE_GEMINI_BASE_URL": "http://127.0.0.1:9"}
    settings = Settings.from_env(env, config_file=None)
    assert (settings.gemini_api_key, settings.gemini_base_url) == ("g-key", "http://127.0.0.1:9")
    both = Settings.from_env({**env, "GOOGLE_API_KEY": "google-key"})
    assert both.gemini_api_key == "google-key"  # GOOGLE_API_KEY wins, as in google-genai
    assert "g-key" not in repr(settings) and "google-key" not in repr(both)


def test_the_cli_submits_runs_and_exports_gemini_lines_with_the_sdks_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from batchwise.cli.main import cli

    lines = [
        {"custom_id": "s1", "model": MODEL, "prompt": "One", "tolerance": "24h"},
        {"key": "k2", "model": MODEL, "request": body("Two"), "tolerance": "24h"},
    ]
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    with Emulator(EmulatorConfig(turnaround_s=0.2, api_key=KEY)) as emu:
        for name in ("BATCHWISE_DATABASE_URL", "BATCHWISE_CONFIG", "BATCHWISE_BROKER_URL"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
        monkeypatch.setenv("BATCHWISE_HOME", str(tmp_path / "home"))
        monkeypatch.setenv("GEMINI_API_KEY", KEY)
        monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", emu.gemini_base_url)
        runner = CliRunner()
        submitted = runner.invoke(cli, ["submit", str(source), "--json"])
        assert submitted.exit_code == 0, submitted.output
        assert orjson.loads(submitted.stdout)["deferred"] == 2
        ran = runner.invoke(cli, ["run", "--until-idle", "--interval", "0.1"])
        assert ran.exit_code == 0, ran.output
        exported = runner.invoke(cli, ["results", "--submission", "1"])
        made = httpx.get(f"{emu.url}/_emulator/stats").json()["batches"]
    assert exported.exit_code == 0, exported.output
    simple, native = (orjson.loads(line) for line in exported.stdout.splitlines())
    assert simple["custom_id"] == "s1" and simple["state"] == "succeeded" and simple["text"]
    assert native["key"] == "k2" and native["response"]["usageMetadata"]["promptTokenCount"]
    assert [(b["provider"], b["request_count"]) for b in made] == [("gemini", 2)]
    assert KEY not in ran.output + submitted.output + exported.output


def test_gemini_answers_translate_to_chat_completions_and_messages() -> None:
    from batchwise.reports.translate import to_anthropic, to_openai

    response = {
        "candidates": [
            {
                "content": {
                    "role": "model",
                    "parts": [
                        {"text": "thinking aloud", "thought": True},
                        {"text": "Rivers: "},
                        {"text": "Nile."},
                        {"functionCall": {"name": "lookup", "args": {"q": "Nile"}}},
                    ],
                },
                "finishReason": "STOP",
            }
        ],
        "usageMetadata": {
            "promptTokenCount": 100,
            "cachedContentTokenCount": 60,
            "candidatesTokenCount": 20,
            "thoughtsTokenCount": 30,
        },
        "modelVersion": MODEL,
        "responseId": "abc",
    }
    chat = to_openai(response, created=1_700_000_000)
    assert chat["id"] == "chatcmpl-abc" and chat["model"] == MODEL
    [choice] = chat["choices"]
    assert choice["message"]["content"] == "Rivers: Nile."
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "lookup", "arguments": '{"q":"Nile"}'}
    assert chat["usage"] == {
        "prompt_tokens": 100,
        "completion_tokens": 50,
        "total_tokens": 150,
        "prompt_tokens_details": {"cached_tokens": 60},
        "completion_tokens_details": {"reasoning_tokens": 30},
    }
    message = to_anthropic(response)
    assert message["type"] == "message" and message["stop_reason"] == "tool_use"
    assert message["usage"]["input_tokens"] == 40  # Anthropic's count leaves the cache out
    assert message["usage"]["cache_read_input_tokens"] == 60
    blocked = {**response, "candidates": [{"finishReason": "SAFETY"}]}
    assert to_openai(blocked)["choices"][0]["finish_reason"] == "content_filter"
