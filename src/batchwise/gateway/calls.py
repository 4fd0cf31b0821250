"""The gateway's realtime calls as the store sees them: a stored request claimed by this
process, called once through `Upstream`, and its outcome recorded like every other realtime
call (answer stored, priced and booked in the ledger; or failed with the provider's error).

The claim is renewed by a heartbeat while the call runs, so a call longer than `lease_s` (a
long stream) is never taken over and made twice. An outcome is final: the caller got the
provider's answer or error as it came and retries as its SDK does, so batchwise does not
call again behind its back.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from batchwise.clock import Clock
from batchwise.config import Settings
from batchwise.costs.pricing import PriceBook
from batchwise.errors import ProviderError
from batchwise.gateway.upstream import Upstream
from batchwise.lifecycle.holders import Heartbeat, new_owner
from batchwise.lifecycle.realtime import Claim, apply_outcome, claim
from batchwise.providers.base import CallResult
from batchwise.store.engine import Store

__all__ = ["Caller"]


class Caller:
    """Claims, calls and records the gateway's realtime requests in this process."""

    def __init__(self, store: Store, settings: Settings, *, clock: Clock) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.book = PriceBook.from_settings(settings)
        self.upstream = Upstream(settings)
        #: held from storing a request to claiming it; the embedded runner's realtime pool
        #: claims under it too, so it never takes a call this process is about to make
        self.claim_lock = threading.Lock()
        self._heartbeat = Heartbeat(store, lease_s=settings.lease_s, clock=clock)

    @contextmanager
    def holding(self) -> Iterator[str]:
        """A new claim owner, its claims renewed while the block runs."""
        with self._heartbeat.holding(new_owner()) as owner:
            yield owner

    def claim(self, request_id: int, owner: str) -> Claim | None:
        """Claim the stored request for `owner`; None if another worker has it already."""
        found = claim(
            self.store,
            now=self.clock(),
            settings=self.settings,
            worker=owner,
            limit=1,
            request_id=request_id,
        )
        return found[0] if found else None

    def failure(
        self,
        provider: str,
        message: str,
        *,
        status_code: int | None = None,
        body: Any = None,
        request_id: str | None = None,
        code: str | None = None,
    ) -> ProviderError:
        """A call's failure as recorded: never retried by batchwise (see the module doc); the
        provider's error code and message read from its error body when there is one, any
        provider key in it masked."""
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            found = error.get("code") or error.get("type")
            code = code or (found if isinstance(found, str) else None)
            text = error.get("message")
            message = text if isinstance(text, str) and text else message
        for secret in (self.settings.openai_api_key, self.settings.anthropic_api_key):
            if secret:
                message = message.replace(secret, "***")
        return ProviderError(
            message,
            provider=provider,
            status_code=status_code,
            code=code,
            retryable=False,
            request_id=request_id,
        )

    def answered(
        self, claim_: Claim, body: dict[str, Any], *, status_code: int, request_id: str | None
    ) -> str:
        """Record an answer (priced from its `usage`); returns `succeeded`, or `late` if the
        request had been answered meanwhile (then it is booked as a retry's cost)."""
        result = CallResult(body=body, status_code=status_code, provider_request_id=request_id)
        return self._apply(claim_, result)

    def failed(self, claim_: Claim, error: ProviderError) -> str:
        """Record a failure; the request ends failed with the provider's error."""
        return self._apply(claim_, error)

    def _apply(self, claim_: Claim, outcome: CallResult | ProviderError) -> str:
        return apply_outcome(
            self.store, self.book, claim_, outcome, now=self.clock(), settings=self.settings
        )

    def close(self) -> None:
        self._heartbeat.close()
