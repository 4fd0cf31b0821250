"""What a run did, in words: the closing lines of `batchwise run` and `batchwise demo`.

    finished 9 request(s): 6 succeeded, 2 failed (model_not_found 2), 1 deduplicated
    rescued through the realtime lane to keep a deadline: 1; still waiting: 0
    look closer: batchwise status · batchwise events · batchwise results --out results.jsonl · …

Pure: it takes the figures `store.queries.finished_since` reads and returns lines.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any

__all__ = ["describe", "next_commands"]

#: terminal states in the order people read them
_ORDER = ("succeeded", "failed", "deduplicated", "rejected", "cancelled")
#: how many failure reasons a line names before "…"
_REASONS = 4


def describe(outcome: Mapping[str, Any], *, db: str | None = None, hints: bool = True) -> list[str]:
    """Lines saying what became of the requests (by state, failures by reason, rescues, what
    is still waiting) and, if `hints`, the commands to look closer; `db` is added to each
    command when the store is not the default one."""
    by_state: Mapping[str, int] = outcome["by_state"]
    finished = sum(by_state.values())
    lines = []
    if finished:
        parts = []
        for state in (*_ORDER, *sorted(set(by_state) - set(_ORDER))):
            count = by_state.get(state, 0)
            if not count:
                continue
            part = f"{count:,} {state}"
            if state == "failed" and outcome.get("failed_by"):
                part += f" ({_reasons(outcome['failed_by'])})"
            parts.append(part)
        lines.append(f"finished {finished:,} request(s): {', '.join(parts)}")
    else:
        lines.append("no request finished in this run")
    tail = []
    if outcome.get("rescued"):
        tail.append(f"rescued through the realtime lane to keep a deadline: {outcome['rescued']:,}")
    tail.append(f"still waiting: {outcome.get('waiting', 0):,}")
    lines.append("; ".join(tail))
    if hints:
        lines.append("look closer: " + " · ".join(next_commands(outcome, db=db)))
    return lines


def next_commands(outcome: Mapping[str, Any], *, db: str | None = None) -> list[str]:
    """The commands that show more of what `outcome` summarises, most useful first."""
    by_state: Mapping[str, int] = outcome["by_state"]
    commands = ["batchwise status"]
    if by_state.get("failed") or by_state.get("rejected") or outcome.get("rescued"):
        commands.append("batchwise events")
    if by_state.get("succeeded") or by_state.get("failed") or by_state.get("deduplicated"):
        commands.append("batchwise results --out results.jsonl")
    if by_state.get("succeeded") or by_state.get("deduplicated"):
        commands.append("batchwise savings")
        commands.append("batchwise dashboard")
    if db:
        commands = [f"{command} --db {shlex.quote(db)}" for command in commands]
    return commands


def _reasons(failed_by: Mapping[str, int]) -> str:
    shown = [f"{reason} {count:,}" for reason, count in list(failed_by.items())[:_REASONS]]
    if len(failed_by) > _REASONS:
        shown.append(f"{len(failed_by) - _REASONS} more reason(s)")
    return ", ".join(shown)
