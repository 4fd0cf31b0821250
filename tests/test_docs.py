"""docs/architecture.md describes the code as it is: its state tables are the code's."""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path

from batchwise import states

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"
TEXT = DOC.read_text(encoding="utf-8")


def moves_in_doc(heading: str) -> dict[str, set[str]]:
    """The `| from | may move to |` table under `heading`, as {state: {states}}."""
    section = TEXT[TEXT.index(heading) :].split("\n## ", 1)[0]
    table: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`"):
            table[cells[0].strip("`")] = set(re.findall(r"`([a-z_]+)`", cells[1]))
    return table


def moves_in_code(transitions: dict[StrEnum, frozenset[StrEnum]]) -> dict[str, set[str]]:
    return {src.value: {dst.value for dst in dsts} for src, dsts in transitions.items()}


def test_the_request_moves_in_the_doc_are_the_transition_table() -> None:
    assert moves_in_doc("### Allowed request moves") == moves_in_code(dict(states.TRANSITIONS))


def test_the_batch_moves_in_the_doc_are_the_batch_transition_table() -> None:
    assert moves_in_doc("### Allowed batch moves") == moves_in_code(dict(states.BATCH_TRANSITIONS))


def test_every_module_the_doc_names_exists() -> None:
    root = DOC.parent.parent
    src = root / "src" / "batchwise"
    named = set(re.findall(r"`((?:[a-z_]+/)*[a-z_]+\.py)`", TEXT))
    missing = {
        name
        for name in named
        if not any(src.joinpath(d, name).exists() for d in ("", *_packages(src)))
        and not (root / name).exists()
    }
    assert not missing, f"the doc names modules that do not exist: {missing}"


def _packages(src: Path) -> list[str]:
    return [p.name for p in src.iterdir() if (p / "__init__.py").exists()]
