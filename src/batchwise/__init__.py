"""batchwise: a batch job scheduler for deferrable LLM workloads.

Importing the package builds nothing and imports little; names are loaded on first use so
that `batchwise submit` does not pay for Celery, httpx or the ORM when it does not need them.
The public names are the client API and every error of the tree drawn in `batchwise.errors`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "AlreadyAcknowledged",
    "AmbiguousIdError",
    "BatchwiseError",
    "Client",
    "ConfigError",
    "ForecastError",
    "GuardRefused",
    "Handle",
    "IntakeError",
    "JobError",
    "JobLoadError",
    "NotFoundError",
    "ProviderDataError",
    "ProviderError",
    "RateLimited",
    "RequestFailed",
    "ResultTimeout",
    "RunExists",
    "SchemaError",
    "Settings",
    "Stopped",
    "StoreError",
    "Submission",
    "ToleranceError",
    "TransitionError",
    "__version__",
]

_LAZY = {
    "Client": "batchwise.api",
    "Handle": "batchwise.api",
    "Submission": "batchwise.api",
    "AlreadyAcknowledged": "batchwise.errors",
    "AmbiguousIdError": "batchwise.errors",
    "Settings": "batchwise.config",
    "BatchwiseError": "batchwise.errors",
    "ConfigError": "batchwise.errors",
    "ForecastError": "batchwise.errors",
    "GuardRefused": "batchwise.errors",
    "IntakeError": "batchwise.errors",
    "JobError": "batchwise.errors",
    "JobLoadError": "batchwise.errors",
    "NotFoundError": "batchwise.errors",
    "ProviderDataError": "batchwise.errors",
    "ProviderError": "batchwise.errors",
    "RateLimited": "batchwise.errors",
    "RequestFailed": "batchwise.errors",
    "ResultTimeout": "batchwise.errors",
    "RunExists": "batchwise.errors",
    "SchemaError": "batchwise.errors",
    "Stopped": "batchwise.errors",
    "StoreError": "batchwise.errors",
    "ToleranceError": "batchwise.errors",
    "TransitionError": "batchwise.errors",
}

if TYPE_CHECKING:
    from batchwise.api import Client, Handle, Submission
    from batchwise.config import Settings
    from batchwise.errors import (
        AlreadyAcknowledged,
        AmbiguousIdError,
        BatchwiseError,
        ConfigError,
        ForecastError,
        GuardRefused,
        IntakeError,
        JobError,
        JobLoadError,
        NotFoundError,
        ProviderDataError,
        ProviderError,
        RateLimited,
        RequestFailed,
        ResultTimeout,
        RunExists,
        SchemaError,
        Stopped,
        StoreError,
        ToleranceError,
        TransitionError,
    )


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'batchwise' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
