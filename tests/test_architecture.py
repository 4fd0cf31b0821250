"""Tests that keep the shape of the code (issue #11): no import cycles, all SQL in `store/`,
every state change through the transition tables, one error tree that `batchwise` exports.

The first three read the source (AST and regular expressions), so a failure names the file and
line to fix; the transition check also runs a real lifecycle with SQLite triggers recording
every state change the code makes, whichever way it makes it.
"""

from __future__ import annotations

import ast
import importlib
import itertools
import pkgutil
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import batchwise
from batchwise import errors, states
from batchwise.store.engine import Store

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "batchwise"
STORE = PACKAGE / "store"
#: The emulator is a separate program that imitates the providers, and it keeps its own state
#: database (batches, files and lines *at the provider*), unrelated to batchwise's store. Its
#: one module for that database may use sqlite3; the rest of the emulator may not.
OWN_DATABASE = {PACKAGE / "emulator" / "state.py"}
DB_LIBRARIES = {"sqlalchemy", "sqlmodel", "sqlite3", "psycopg", "psycopg2", "alembic"}
#: the API names `batchwise` exports besides the errors
API_NAMES = {"Client", "Handle", "Settings", "Submission", "__version__"}


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool
    tree: ast.Module

    @property
    def where(self) -> str:
        return str(self.path.relative_to(SRC.parent))


def modules() -> list[Module]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found.append(Module(".".join(parts), path, is_package, tree))
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Every node below `node` that runs at some point (function bodies included), leaving out
    the bodies of `if TYPE_CHECKING:` blocks."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for other in child.orelse:
                yield other
                yield from runtime_nodes(other)
            continue
        yield child
        yield from runtime_nodes(child)


def imported(module: Module) -> Iterator[tuple[str, int]]:
    """(dotted name, line) of every runtime import, `importlib.import_module("…")` included;
    `from a import b` yields both `a` and `a.b` (b may be a module)."""
    for node in runtime_nodes(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.name.split(".")
                if not module.is_package:
                    base.pop()
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            yield target, node.lineno
            for alias in node.names:
                yield f"{target}.{alias.name}", node.lineno
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.args[0].value, node.lineno


def import_graph() -> tuple[dict[str, dict[str, int]], dict[str, Module]]:
    by_name = {m.name: m for m in modules()}
    graph: dict[str, dict[str, int]] = {}
    for module in by_name.values():
        edges: dict[str, int] = {}
        for target, line in imported(module):
            while target and target not in by_name:
                target = target.rpartition(".")[0]
            if target and target != module.name:
                edges.setdefault(target, line)
        graph[module.name] = edges
    return graph, by_name


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm, iteratively; components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def one_cycle(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, as module names."""
    members, start = set(component), component[0]
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node]):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if child in members and child not in came_from:
                came_from[child] = node
                queue.append(child)
    raise AssertionError(f"no cycle found in {component}")  # pragma: no cover


def test_no_import_cycles() -> None:
    """Counting imports inside functions (they run too), not those under `if TYPE_CHECKING:`.
    A cycle is broken by moving the shared piece to where it belongs, not by hiding an import."""
    graph, by_name = import_graph()
    shown = []
    for component in strongly_connected(graph):
        cycle = one_cycle(graph, component)
        steps = [
            f"    {a} ({by_name[a].where}:{graph[a][b]}) imports {b}"
            for a, b in itertools.pairwise(cycle)
        ]
        shown.append(f"  cycle among {', '.join(component)}:\n" + "\n".join(steps))
    assert not shown, "import cycles:\n" + "\n".join(shown)


# --- SQL lives in store/ ------------------------------------------------------------------------

#: SQL statements in string literals (upper-case keywords, as SQL is written in this code)
SQL_STATEMENT = re.compile(
    r"\bSELECT\b[\s\S]*?\bFROM\b|\bINSERT\s+(?:OR\s+\w+\s+)?INTO\b|\bUPDATE\s+\w+\s+SET\b"
    r"|\bDELETE\s+FROM\b|\b(?:CREATE|DROP|ALTER)\s+(?:TABLE|INDEX|TRIGGER|VIEW)\b|\bPRAGMA\s+\w"
)
EXECUTE_METHODS = {"execute", "executemany", "executescript", "exec_driver_sql"}
#: a state column set in SQL text: `SET state = …`, `SET a = ?, state = ?`
SETS_STATE_SQL = re.compile(r"\bSET\b(?:(?!\bWHERE\b)[\s\S])*?\bstate\s*=", re.IGNORECASE)


def outside_store() -> list[Module]:
    return [m for m in modules() if STORE not in m.path.parents and m.path not in OWN_DATABASE]


def docstrings(tree: ast.Module) -> set[int]:
    """ids of the docstring nodes (prose may say `UPDATE … SET`)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def string_literals(module: Module) -> Iterator[tuple[int, str]]:
    """(line, text) of every string literal that is not a docstring; an f-string's text is its
    constant parts joined."""
    skip = docstrings(module.tree)
    for node in ast.walk(module.tree):
        if isinstance(node, ast.JoinedStr):
            parts = [v.value for v in node.values if isinstance(v, ast.Constant)]
            yield node.lineno, " ".join(str(p) for p in parts)
        elif (
            isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
        ):
            yield node.lineno, node.value


def sql_outside_store() -> list[str]:
    found = []
    for module in outside_store():
        for node in runtime_nodes(module.tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in DB_LIBRARIES:
                    found.append(f"{module.where}:{node.lineno}: imports {name}")
        for node in ast.walk(module.tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in EXECUTE_METHODS
            ):
                found.append(f"{module.where}:{node.lineno}: calls .{node.func.attr}(…)")
        for line, text in string_literals(module):
            match = SQL_STATEMENT.search(text)
            if match:
                shown = " ".join(match.group(0).split())[:60]
                found.append(f"{module.where}:{line}: SQL in a string: {shown!r}")
    return sorted(set(found), key=_by_place)


def _by_place(entry: str) -> tuple[str, int]:
    path, line, _ = entry.split(":", 2)
    return path, int(line)


def test_no_sql_outside_the_store() -> None:
    """Outside `store/` nothing imports a database library at run time (imports under
    `if TYPE_CHECKING:` are fine), runs a statement, or holds SQL text: callers use the named
    functions of `store.*`. The emulator's own database (`emulator/state.py`) is allowed."""
    found = sql_outside_store()
    assert not found, f"SQL outside store/ ({len(found)} places):\n  " + "\n  ".join(found)


# --- state changes go through the transition tables ----------------------------------------------


def _sets_state(node: ast.Call) -> bool:
    """`.values(state=…)`, `.values({…"state": …})`, `.execute(stmt, {"state": …})` and the
    like: a `state` column set from Python."""
    if not isinstance(node.func, ast.Attribute):
        return False
    if node.func.attr == "values" and any(k.arg == "state" for k in node.keywords):
        return True
    if node.func.attr not in {"values", *EXECUTE_METHODS}:
        return False
    given = [*node.args, *(k.value for k in node.keywords if k.arg is None)]
    for arg in given:
        for inner in ast.walk(arg):
            if isinstance(inner, ast.Dict) and any(
                (isinstance(key, ast.Constant) and key.value == "state")
                or (isinstance(key, ast.Attribute) and key.attr == "state")
                for key in inner.keys
            ):
                return True
    return False


def state_set_outside_store() -> list[str]:
    found = []
    for module in outside_store():
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Call) and _sets_state(node):
                found.append(f"{module.where}:{node.lineno}: sets a state column from Python")
        for line, text in string_literals(module):
            if SETS_STATE_SQL.search(text) and SQL_STATEMENT.search(text):
                found.append(f"{module.where}:{line}: sets a state column in SQL")
    return sorted(set(found), key=_by_place)


def test_no_state_column_is_set_outside_the_store() -> None:
    """Only `store/` moves a request, batch or job run from one state to another (and there
    through the transition functions, which check `TRANSITIONS`)."""
    found = state_set_outside_store()
    assert not found, "state set outside store/:\n  " + "\n  ".join(found)


RECORD_MOVES = [
    "CREATE TABLE state_moves (tbl TEXT NOT NULL, src TEXT NOT NULL, dst TEXT NOT NULL)",
    *(
        f"CREATE TRIGGER record_{table}_moves AFTER UPDATE OF state ON {table} "
        f"WHEN old.state IS NOT new.state BEGIN "
        f"INSERT INTO state_moves VALUES ('{table}', old.state, new.state); END"
        for table in ("requests", "batches")
    ),
]


def record_moves(store: Store) -> None:
    """Triggers that log every (old, new) state of `requests` and `batches`, however the code
    writes it: Core, text, the raw driver, from any process."""
    with store.write() as conn:
        for statement in RECORD_MOVES:
            conn.execute(sa.text(statement))


def recorded_moves(store: Store) -> set[tuple[str, str, str]]:
    with store.read() as conn:
        rows = conn.execute(sa.text("SELECT tbl, src, dst FROM state_moves"))
        return {(tbl, src, dst) for tbl, src, dst in rows}


@pytest.fixture(scope="module")
def lifecycle_moves(tmp_path_factory: pytest.TempPathFactory) -> set[tuple[str, str, str]]:
    """Every state move a real lifecycle makes on SQLite: the emulator's faults (rate limits,
    server errors, final errors, expired batches), coalesced duplicates, an unknown model, a
    deadline rescue, cancelled requests and a cancelled batch, and cost guards refusing and
    deduplicating at intake."""
    from batchwise.clock import ManualClock
    from batchwise.emulator.app import EmulatorConfig
    from batchwise.lifecycle.cancel import cancel_batch
    from lifecycle_world import World, make_world, mixed_items

    moves: set[tuple[str, str, str]] = set()

    def world(name: str, config: EmulatorConfig, **changes: Any) -> Any:
        home = tmp_path_factory.mktemp(name)
        no_jobs = home / "no-jobs"  # not the repository's jobs/ folder
        no_jobs.mkdir()
        url = f"sqlite:///{home / 'db.sqlite'}"
        return make_world(home, url, emulator_config=config, jobs_dir=no_jobs, **changes)

    def done(w: World) -> None:
        moves.update(recorded_moves(w.store))

    # Faults everywhere, retries, expiry with salvage, realtime calls.
    faults = EmulatorConfig(
        turnaround_s=2.0,
        error_rate=0.2,
        expire_rate=0.4,
        rate_limit_rate=0.1,
        server_error_rate=0.05,
        seed=11,
    )
    same = {"model": "gpt-4o-mini", "prompt": "The same question.", "max_tokens": 16}
    unknown = {"model": "gpt-no-such-model", "prompt": "x"}
    with world("faults", faults, max_attempts=4) as w:
        record_moves(w.store)
        w.enqueue(mixed_items(80, realtime_every=4))
        # identical lines ride on one batch line (coalesced); a model the provider refuses
        w.enqueue([{**same, "custom_id": f"same-{i}", "tolerance": "2d"} for i in range(3)])
        w.enqueue([{**unknown, "tolerance": "realtime"}, {**unknown, "tolerance": "2d"}])
        w.drain(max_ticks=400)
        done(w)

    # A batch that runs late: its request is rescued through the realtime lane, and one
    # whose batch answers before the (disabled) rescue call.
    clock = ManualClock()
    with world("rescue", EmulatorConfig(turnaround_s=4 * 3600), clock=clock) as w:
        record_moves(w.store)
        w.enqueue([{**mixed_items(1)[0], "tolerance": "3h"}])
        w.tick(drain=True)
        clock.advance(2 * 3600 + 46 * 60)
        w.tick()
        clock.advance(2 * 3600)
        w.drain()
        done(w)
    clock = ManualClock()
    with world("slow-rescue", EmulatorConfig(turnaround_s=8400), clock=clock) as w:
        record_moves(w.store)
        w.scheduler.dispatcher = None
        w.enqueue([{**mixed_items(1)[0], "tolerance": "2h26m"}])
        w.tick(drain=True)
        clock.advance(2 * 3600 + 12 * 60)
        w.tick()
        clock.advance(600)
        w.drain()
        done(w)

    # A cancelled queued request and a cancelled batch.
    with world("cancel", EmulatorConfig(turnaround_s=30)) as w:
        record_moves(w.store)
        ids = w.enqueue([i for i in mixed_items(12) if i["model"] == "gpt-4o-mini"])
        w.client.cancel(ids[0])
        w.tick(drain=True)
        with w.store.read() as conn:
            batch_id = conn.execute(sa.text("SELECT id FROM batches")).scalar_one()
        cancel_batch(w.store, w.scheduler.providers("openai"), batch_id, now=w.clock())
        w.drain()
        done(w)

    # Cost guards: a task over its limit (realtime and deferred), an identical question
    # answered from the store.
    guards = {
        "use_case": {
            "agent": {"max_requests_per_task": 2},
            "faq": {"dedupe_window_s": 3600.0},
        }
    }
    with world("guards", EmulatorConfig(turnaround_s=2.0), extra={"guards": guards}) as w:
        record_moves(w.store)
        agent = {"model": "gpt-4o-mini", "max_tokens": 16}
        w.enqueue(
            [
                {**agent, "prompt": f"step {i}", "tolerance": tolerance, "tags": tags}
                for tolerance, task in (("realtime", "rt"), ("2d", "deferred"))
                for i in range(3)
                for tags in [{"use_case": "agent", "task_id": task}]
            ]
        )
        faq = {**agent, "prompt": "What is your refund policy?", "tags": {"use_case": "faq"}}
        w.enqueue([{**faq, "tolerance": "2d"}])
        w.drain()
        w.enqueue([{**faq, "tolerance": "2d"}])
        w.drain()
        done(w)
    return moves


def test_every_request_state_change_is_in_the_transition_table(
    lifecycle_moves: set[tuple[str, str, str]],
) -> None:
    moves = {(src, dst) for tbl, src, dst in lifecycle_moves if tbl == "requests"}
    exercised = {("submitted", "rescued"), ("queued", "cancelled"), ("dispatching", "succeeded")}
    assert exercised <= moves, f"the scenarios no longer make these moves: {exercised - moves}"
    allowed = {(src.value, dst.value) for src, dsts in states.TRANSITIONS.items() for dst in dsts}
    assert not moves - allowed, (
        f"request moves missing from states.TRANSITIONS: {sorted(moves - allowed)}"
    )


def test_every_batch_state_change_is_in_the_batch_transition_table(
    lifecycle_moves: set[tuple[str, str, str]],
) -> None:
    table = states.BATCH_TRANSITIONS
    moves = {(src, dst) for tbl, src, dst in lifecycle_moves if tbl == "batches"}
    exercised = {("in_progress", "expired"), ("cancelling", "cancelled"), ("submitted", "failed")}
    assert exercised <= moves, f"the scenarios no longer make these moves: {exercised - moves}"
    allowed = {(src.value, dst.value) for src, dsts in table.items() for dst in dsts}
    assert not moves - allowed, (
        f"batch moves missing from states.BATCH_TRANSITIONS: {sorted(moves - allowed)}"
    )


# --- one error tree, exported --------------------------------------------------------------------

TREE_LINE = re.compile(r"^(?P<indent>(?:[│ ] {3})*)(?:[├└]── )?(?P<name>[A-Z]\w+)\b")


def drawn_tree() -> dict[str, str | None]:
    """{error: drawn parent} from the drawing at the top of `batchwise.errors`."""
    parents: dict[str, str | None] = {}
    path: list[str] = []
    for line in (errors.__doc__ or "").splitlines():
        match = TREE_LINE.match(line)
        if not match or not (line.startswith("BatchwiseError") or "── " in line):
            continue
        depth = len(match["indent"]) // 4 + (0 if line.startswith("BatchwiseError") else 1)
        path[depth:] = [match["name"]]
        parents[match["name"]] = path[depth - 1] if depth else None
    return parents


def error_classes() -> dict[str, type[BaseException]]:
    """Every `BatchwiseError` subclass defined anywhere in the package."""
    skip = {"batchwise.__main__", "batchwise.store.migrations"}
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="batchwise."):
        if not any(info.name == s or info.name.startswith(s + ".") for s in skip):
            importlib.import_module(info.name)
    found: dict[str, type[BaseException]] = {}
    todo: list[type[BaseException]] = [errors.BatchwiseError]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def test_every_error_is_in_the_drawn_tree_under_its_real_parent() -> None:
    tree = drawn_tree()
    classes = error_classes()
    assert set(tree) == set(classes), (
        f"drawn but not defined: {sorted(set(tree) - set(classes))}; "
        f"defined but not drawn: {sorted(set(classes) - set(tree))}"
    )
    for name, cls in classes.items():
        assert cls.__module__ == "batchwise.errors", f"{name} is defined in {cls.__module__}"
        if name == "BatchwiseError":
            continue
        parents = [b.__name__ for b in cls.__bases__ if issubclass(b, errors.BatchwiseError)]
        assert parents == [tree[name]], f"{name} is drawn under {tree[name]}, derives {parents}"


def test_batchwise_exports_the_api_and_every_error() -> None:
    assert set(batchwise.__all__) == set(drawn_tree()) | API_NAMES
    assert len(batchwise.__all__) == len(set(batchwise.__all__))
    for name in batchwise.__all__:
        assert getattr(batchwise, name) is not None
    assert batchwise.GuardRefused is errors.GuardRefused
