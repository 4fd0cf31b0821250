"""One contract for every adapter, run against the local emulator over a real socket.

Each test is parametrised over the providers, so OpenAI, Anthropic, Gemini and a provider
added by configuration (`groq`, played by the emulator's OpenAI API) are held to the same
behaviour through `make_provider`, exactly as the scheduler builds them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from batchwise.config import ProviderConfig, Settings
from batchwise.costs.pricing import usage_of
from batchwise.emulator.app import Emulator, EmulatorConfig
from batchwise.errors import ConfigError, ProviderError
from batchwise.providers import PROVIDERS, make_provider
from batchwise.providers.anthropic import AnthropicProvider
from batchwise.providers.base import BatchInfo, BatchStatus, LineOutcome, OutcomeKind, Provider
from batchwise.providers.gemini import GENERATE, GeminiProvider
from batchwise.providers.openai import OpenAIProvider

KEY = "sk-contract-SECRET-9a9a9a9a9a"
TURNAROUND_S = 0.4
POLL_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Shape:
    """How to ask each provider the same small question."""

    endpoint: str
    model: str

    def body(self, text: str) -> dict[str, Any]:
        if self.endpoint == GENERATE:  # a GenerateContentRequest, its model named as in REST
            return {
                "model": f"models/{self.model}",
                "contents": [{"role": "user", "parts": [{"text": text}]}],
                "generationConfig": {"maxOutputTokens": 16},
            }
        messages = [{"role": "user", "content": text}]
        return {"model": self.model, "max_tokens": 16, "messages": messages}


#: a provider added by configuration (a `[providers.groq]` table speaking OpenAI's API)
CONFIGURED = "groq"
#: the API each provider speaks, as the emulator records its batches
API = {"openai": "openai", "anthropic": "anthropic", "gemini": "gemini", CONFIGURED: "openai"}

SHAPES = {
    "openai": Shape("/v1/chat/completions", "gpt-4o-mini"),
    "anthropic": Shape("/v1/messages", "claude-haiku-4-5"),
    CONFIGURED: Shape("/v1/chat/completions", "gpt-4o-mini"),
    "gemini": Shape(GENERATE, "gemini-2.5-flash-lite"),
}
#: what each provider answers a wrong key with (Gemini: 400 `API key not valid`)
WRONG_KEY_STATUS = {"openai": 401, "anthropic": 401, "gemini": 400, CONFIGURED: 401}


def settings_for(emulator: Emulator, key: str | None = KEY) -> Settings:
    configured = ProviderConfig(
        name=CONFIGURED,
        api="openai",
        base_url=emulator.openai_base_url,
        key_env="GROQ_API_KEY",
        prices_provider="groq",
    )
    return Settings(
        openai_api_key=key,
        openai_base_url=emulator.openai_base_url,
        anthropic_api_key=key,
        anthropic_base_url=emulator.anthropic_base_url,
        configured_providers={CONFIGURED: configured},
        provider_keys={} if key is None else {CONFIGURED: key},
        gemini_api_key=key,
        gemini_base_url=emulator.gemini_base_url,
    )


class StepClock:
    """A clock the test moves by hand, so long turnarounds take no real time."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def direct(name: str, emu: Emulator, sleeps: list[float]) -> Provider:
    """The adapter built by hand, to record (and skip) its retry waits."""
    if API[name] == "openai":
        return OpenAIProvider(KEY, emu.openai_base_url, sleep=sleeps.append, name=name)
    if name == "gemini":
        return GeminiProvider(KEY, emu.gemini_base_url, sleep=sleeps.append)
    return AnthropicProvider(KEY, emu.anthropic_base_url, sleep=sleeps.append)


def created_batches(emu: Emulator, name: str) -> list[dict[str, Any]]:
    stats = httpx.get(f"{emu.url}/_emulator/stats").json()
    return [b for b in stats["batches"] if b["provider"] == API[name]]


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    with Emulator(EmulatorConfig(turnaround_s=TURNAROUND_S, api_key=KEY)) as emu:
        yield emu


@pytest.fixture(scope="module")
def faulty() -> Iterator[Emulator]:
    """Half the lines fail; every HTTP call has a chance of a 429 or a 500."""
    config = EmulatorConfig(
        turnaround_s=TURNAROUND_S,
        error_rate=0.5,
        rate_limit_rate=0.1,
        server_error_rate=0.1,
        seed=3,
        api_key=KEY,
    )
    with Emulator(config) as emu:
        yield emu


@pytest.fixture(params=(*PROVIDERS, CONFIGURED))
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def provider(name: str, emulator: Emulator) -> Iterator[Provider]:
    adapter = make_provider(name, settings_for(emulator))
    yield adapter
    adapter.close()


def write_batch(path: Path, provider: Provider, ids: list[str]) -> Path:
    shape = SHAPES[provider.name]
    with path.open("wb") as fh:
        for cid in ids:
            body = orjson.dumps(shape.body(f"question {cid}"))
            fh.write(provider.batch_line(cid, shape.endpoint, body) + b"\n")
    return path


def submit(provider: Provider, tmp_path: Path, ids: list[str], row: str) -> BatchInfo:
    path = write_batch(tmp_path / f"{provider.name}-{row}.jsonl", provider, ids)
    shape = SHAPES[provider.name]
    return provider.submit_batch(path, endpoint=shape.endpoint, metadata={"batchwise_batch": row})


def wait_terminal(provider: Provider, batch_id: str, clock: StepClock | None = None) -> BatchInfo:
    """Poll until the batch ends; with a `clock`, move it on instead of sleeping."""
    deadline = time.monotonic() + POLL_TIMEOUT_S
    while True:
        info = provider.get_batch(batch_id)
        if info.status.terminal:
            return info
        assert time.monotonic() < deadline, f"{batch_id} still {info.provider_status}"
        if clock is None:
            time.sleep(0.05)
        else:
            clock.now += 10.0


def by_custom_id(outcomes: list[LineOutcome]) -> dict[str, LineOutcome]:
    joined = {o.custom_id: o for o in outcomes}
    assert len(joined) == len(outcomes), "a custom_id came back twice"
    return joined


# --- the life of a batch ---------------------------------------------------------------------


def test_submit_poll_fetch_joins_every_line_on_custom_id(
    provider: Provider, tmp_path: Path
) -> None:
    # Given a batch of five requests
    ids = [f"req-{i}" for i in range(5)]
    before = datetime.now(UTC)
    created = submit(provider, tmp_path, ids, row="life")
    assert not created.status.terminal
    assert created.created_at is not None and created.created_at.tzinfo is not None
    assert created.created_at >= before.replace(microsecond=0) - timedelta(seconds=1)
    # When it is polled to the end and its results fetched
    ended = wait_terminal(provider, created.id)
    outcomes = by_custom_id(list(provider.fetch_results(ended)))
    # Then every request has exactly one successful answer with usage, and counts agree
    assert ended.status is BatchStatus.COMPLETED and ended.status.has_results
    assert ended.ended_at is not None and ended.created_at is not None
    assert ended.ended_at >= ended.created_at
    assert (ended.counts.total, ended.counts.succeeded, ended.counts.errored) == (5, 5, 0)
    assert set(outcomes) == set(ids)
    for cid, outcome in outcomes.items():
        assert outcome.kind is OutcomeKind.SUCCEEDED, (cid, outcome)
        assert outcome.body is not None and outcome.usage, outcome
        model = outcome.body.get("model", outcome.body.get("modelVersion"))
        assert str(model).startswith(SHAPES[provider.name].model)
        assert outcome.line is not None and outcome.source is not None


def test_find_batches_recovers_a_batch_after_a_crash(provider: Provider, tmp_path: Path) -> None:
    # Given a batch created but never recorded (the submitter "crashed" after the call)
    since = datetime.now(UTC) - timedelta(seconds=1)
    created = submit(provider, tmp_path, ["a", "b", "c"], row="row-17")
    # When the submitter looks for it before creating it again
    found = provider.find_batches("batchwise_batch", "row-17", created_after=since, request_count=3)
    # Then it is found, and a window after its creation finds nothing
    assert created.id in [b.id for b in found]
    later = datetime.now(UTC) + timedelta(seconds=5)
    assert provider.find_batches("batchwise_batch", "row-17", created_after=later) == []
    wait_terminal(provider, created.id)


def test_find_batches_follows_the_cursor_across_pages(provider: Provider, tmp_path: Path) -> None:
    # Given five batches and a list call that returns two at a time
    since = datetime.now(UTC) - timedelta(seconds=1)
    made = [
        submit(provider, tmp_path, [f"p{j}" for j in range(i + 1)], row="paged").id
        for i in range(5)
    ]
    provider.list_page_size = 2
    # When the submitter looks for them
    found = provider.find_batches("batchwise_batch", "paged", created_after=since)
    # Then all five come back, newest first, however they were paged
    assert [b.id for b in found if b.id in made] == made[::-1]
    by_size = provider.find_batches(
        "batchwise_batch", "paged", created_after=since, request_count=4
    )
    assert made[3] in [b.id for b in by_size]


def test_find_batches_uses_metadata_where_the_provider_has_it(
    tmp_path: Path, emulator: Emulator
) -> None:
    provider = make_provider("openai", settings_for(emulator))
    since = datetime.now(UTC) - timedelta(seconds=1)
    created = submit(provider, tmp_path, ["a", "b"], row="row-mine")
    assert [
        b.id for b in provider.find_batches("batchwise_batch", "row-mine", created_after=since)
    ] == [created.id]
    assert provider.find_batches("batchwise_batch", "row-other", created_after=since) == []
    provider.close()


def test_cancel_ends_the_batch_with_every_line_accounted_for(name: str, tmp_path: Path) -> None:
    clock = StepClock()
    with Emulator(EmulatorConfig(turnaround_s=100.0, api_key=KEY), clock=clock) as emu:
        provider = make_provider(name, settings_for(emu))
        # Given a batch about half done
        ids = [f"c{i}" for i in range(10)]
        created = submit(provider, tmp_path, ids, row="cancel")
        clock.now += 50.0
        # When it is cancelled
        cancelling = provider.cancel(created.id)
        # Gemini has no cancelling state: the batch runs on until it is cancelled
        expected = BatchStatus.IN_PROGRESS if name == "gemini" else BatchStatus.CANCELLING
        assert cancelling.status is expected
        ended = wait_terminal(provider, created.id, clock)
        outcomes = by_custom_id(list(provider.fetch_results(ended)))
        provider.close()
    # Then it ends cancelled, with finished lines answered and the rest cancelled
    assert ended.status is BatchStatus.CANCELLED and ended.status.has_results
    assert set(outcomes) == set(ids)
    kinds = [o.kind for o in outcomes.values()]
    assert OutcomeKind.SUCCEEDED in kinds and OutcomeKind.CANCELLED in kinds
    assert set(kinds) == {OutcomeKind.SUCCEEDED, OutcomeKind.CANCELLED}
    assert kinds.count(OutcomeKind.SUCCEEDED) == ended.counts.succeeded


def test_an_expired_batch_reports_finished_and_expired_lines(name: str, tmp_path: Path) -> None:
    clock = StepClock()
    config = EmulatorConfig(turnaround_s=100.0, expire_rate=1.0, api_key=KEY)
    with Emulator(config, clock=clock) as emu:
        provider = make_provider(name, settings_for(emu))
        ids = [f"e{i}" for i in range(10)]
        ended = wait_terminal(provider, submit(provider, tmp_path, ids, row="exp").id, clock)
        outcomes = by_custom_id(list(provider.fetch_results(ended)))
        provider.close()
    assert ended.status is BatchStatus.EXPIRED
    assert set(outcomes) == set(ids)
    kinds = [o.kind for o in outcomes.values()]
    assert set(kinds) == {OutcomeKind.SUCCEEDED, OutcomeKind.EXPIRED}
    assert not any(o.retryable for o in outcomes.values() if o.kind is OutcomeKind.EXPIRED)


def test_an_openai_batch_over_the_enqueued_token_limit_fails_as_a_whole(tmp_path: Path) -> None:
    with Emulator(EmulatorConfig(turnaround_s=0.2, enqueued_token_limit=5, api_key=KEY)) as emu:
        provider = make_provider("openai", settings_for(emu))
        ended = wait_terminal(provider, submit(provider, tmp_path, ["a", "b"], row="big").id)
        outcomes = list(provider.fetch_results(ended))
        provider.close()
    assert ended.status is BatchStatus.FAILED and not ended.status.has_results
    assert [issue.code for issue in ended.errors] == ["token_limit_exceeded"]
    assert outcomes == []


# --- faults ----------------------------------------------------------------------------------


def test_error_lines_come_back_with_codes_and_retryability(
    name: str, faulty: Emulator, tmp_path: Path
) -> None:
    sleeps: list[float] = []
    provider = direct(name, faulty, sleeps)
    ids = [f"f{i}" for i in range(40)]
    # Given a batch submitted and polled through injected 429s and 500s
    ended = wait_terminal(provider, submit(provider, tmp_path, ids, row=f"faulty-{name}").id)
    # When its results are fetched
    outcomes = by_custom_id(list(provider.fetch_results(ended)))
    provider.close()
    # Then every line is there, failed ones with a code, a message and a retry verdict
    assert set(outcomes) == set(ids)
    errored = [o for o in outcomes.values() if o.kind is OutcomeKind.ERRORED]
    succeeded = [o for o in outcomes.values() if o.kind is OutcomeKind.SUCCEEDED]
    assert errored and succeeded
    assert len(errored) + len(succeeded) == len(ids)
    assert ended.counts.errored == len(errored)
    for outcome in errored:
        assert outcome.error_code and outcome.error_message
    assert {o.retryable for o in errored} == {True, False}, "expected both final and retryable"
    # ... and the retried create made exactly one batch
    # (a duplicate would carry the same metadata, where the provider keeps it: the configured
    # provider shares the OpenAI emulator's batches with OpenAI's own)
    mine = [
        b
        for b in created_batches(faulty, name)
        if b["request_count"] == len(ids)
        and (
            API[name] != "openai"
            or (b["metadata"] or {}).get("batchwise_batch") == f"faulty-{name}"
        )
    ]
    assert [b["id"] for b in mine] == [ended.id]


def test_unknown_batch_is_a_final_not_found(provider: Provider) -> None:
    with pytest.raises(ProviderError) as caught:
        provider.get_batch("batch_does_not_exist")
    assert caught.value.status_code == 404 and caught.value.retryable is False


def test_a_wrong_key_is_refused_and_never_shown(
    name: str, emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "sk-WRONG-key-0000000000"
    provider = make_provider(name, settings_for(emulator, key=wrong))
    with pytest.raises(ProviderError) as caught:
        provider.call(SHAPES[name].endpoint, SHAPES[name].body("hello"))
    provider.close()
    assert caught.value.status_code == WRONG_KEY_STATUS[name]
    assert caught.value.retryable is False
    for text in (str(caught.value), repr(caught.value), repr(provider), caplog.text):
        assert wrong not in text and KEY not in text


# --- realtime --------------------------------------------------------------------------------


def test_realtime_call_answers_with_usage_and_a_request_id(provider: Provider) -> None:
    shape = SHAPES[provider.name]
    result = provider.call(shape.endpoint, shape.body("hello"))
    assert result.status_code == 200
    assert isinstance(usage_of(result.body), dict)
    assert result.provider_request_id


def test_realtime_calls_ride_out_injected_429s_and_500s(name: str, faulty: Emulator) -> None:
    sleeps: list[float] = []
    provider = direct(name, faulty, sleeps)
    shape = SHAPES[name]
    answered = 0
    for i in range(8):
        try:
            provider.call(shape.endpoint, shape.body(f"q{i}"))
            answered += 1
        except ProviderError as exc:
            assert exc.retryable, exc  # only transient failures may get through
    provider.close()
    assert sleeps, "some calls should have been retried"
    assert answered >= 4


# --- the factory -----------------------------------------------------------------------------


def test_make_provider_builds_each_adapter_lazily() -> None:
    settings = Settings(openai_api_key="k1", anthropic_api_key="k2", gemini_api_key="k3")
    with httpx.Client() as client:
        for name in PROVIDERS:
            adapter = make_provider(name, settings, client=client)
            assert isinstance(adapter, Provider) and adapter.name == name
            adapter.close()
        assert not client.is_closed, "an injected client belongs to its owner"


@pytest.mark.parametrize(
    ("name", "env"), [("openai", "OPENAI"), ("anthropic", "ANTHROPIC"), ("gemini", "GEMINI")]
)
def test_a_missing_key_says_how_to_fix_it(name: str, env: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_provider(name, Settings())
    message = str(caught.value)
    assert f"{env}_API_KEY" in message and f"{env}_BASE_URL" in message
    assert "batchwise emulator" in message


def test_an_unknown_provider_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="expected one of openai, anthropic, gemini"):
        make_provider("mistral", Settings())


def test_importing_the_package_loads_no_adapter() -> None:
    import subprocess
    import sys

    code = (
        "import sys, batchwise.providers; "
        "print(any(m in sys.modules for m in "
        "('httpx', 'batchwise.providers.openai', 'batchwise.providers.anthropic', "
        "'batchwise.providers.gemini')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
