"""Crash points for crash-recovery tests: named places where a test can have the process die.

`crashpoint("after_create")` does nothing unless the environment variable
BATCHWISE_CRASHPOINT names that point (optionally `name:N` for its N-th pass), in which case
the process kills itself with SIGKILL, exactly as an OOM kill or a power cut would: no
cleanup, no flush, no finally blocks.
"""

from __future__ import annotations

import os
import signal

_name, _, _nth = (os.environ.get("BATCHWISE_CRASHPOINT") or "").partition(":")
_remaining = int(_nth or 1)


def crashpoint(name: str) -> None:
    global _remaining
    if not _name or name != _name:
        return
    _remaining -= 1
    if _remaining <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
