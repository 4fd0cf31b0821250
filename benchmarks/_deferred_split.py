"""Where a distributed deferred run's time went, read after the run from what it left behind.

Nothing here runs inside the workers, so the split costs the run nothing:

- the batches' own timestamps in the store: `created_at` (the flush that packed it started),
  `upload_started_at` (a submitter claimed it), `create_started_at` (its file was ready, the
  upload and create call began), `submitted_at` (the provider answered the create call),
  `ended_at` (a poll saw it end), `reconciled_at` (the reconcile step that applied it started:
  a step stamps every row it writes with the moment it began);
- Celery's own lines in the worker logs: "Task NAME[id] succeeded in Xs", so each task's end
  and run time, hence when a reconcile finished and when no task ran anywhere;
- /proc: CPU seconds (user + system) of each process group, of the PostgreSQL backends that
  served them (told apart by `application_name`, from `PGAPPNAME`), and of the machine.

The ledger is written in reconcile's own transactions, stamped with the same moment, so it is
not told apart here: its time is inside "reconcile".
"""

from __future__ import annotations

import os
import re
import threading
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa

from batchwise.config import Settings
from batchwise.lifecycle import capacity
from batchwise.store.capacity import estimates as capacity_rows
from batchwise.store.engine import Store, batches_t, events_t, requests_t

TICK_S = os.sysconf("SC_CLK_TCK")

# "[2026-12-05 11:30:01,123: INFO/MainProcess] Task batchwise.poll[…] succeeded in 0.01s: {…}"
_SUCCEEDED = re.compile(
    r"^\[(?P<at>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): \w+/[^\]]*\] "
    r"Task (?P<name>[\w.]+)\[[^\]]+\] succeeded in (?P<run>[0-9.e+-]+)s: (?P<result>.*)$"
)
_RAISED = re.compile(r"\] Task [\w.]+\[[^\]]+\] raised ")


# --- /proc ------------------------------------------------------------------------------------


def _stat_fields(pid_dir: Path) -> list[str]:
    """The fields of /proc/PID/stat after the command name (field 3 is index 0)."""
    return (pid_dir / "stat").read_text().rsplit(")", 1)[1].split()


def group_processes(pgid: int) -> Iterator[tuple[Path, list[str]]]:
    """(/proc/PID, stat fields) of every live process of a process group."""
    for pid_dir in Path("/proc").glob("[0-9]*"):
        try:
            fields = _stat_fields(pid_dir)
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:
            yield pid_dir, fields


def cpu_s(fields: list[str]) -> float:
    """User + system CPU seconds of a process, its reaped children's included."""
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / TICK_S


def group_cpu_s(pgid: int) -> float:
    return sum(cpu_s(fields) for _, fields in group_processes(pgid))


def postgres_cpu_s() -> float:
    """CPU seconds of every PostgreSQL process, the backends that have exited included (the
    postmaster reaped them): everyone's sessions, and the server's own background work."""
    total = 0.0
    for pid_dir in Path("/proc").glob("[0-9]*"):
        try:
            if (pid_dir / "comm").read_text().strip() == "postgres":
                total += cpu_s(_stat_fields(pid_dir))
        except (OSError, IndexError):
            continue
    return total


def machine_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, over every CPU."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values) - idle) / TICK_S, sum(values) / TICK_S


class BackendCpu:
    """CPU seconds of the PostgreSQL backends whose `application_name` starts with `prefix`,
    by name. A thread asks `pg_stat_activity` for them and reads their /proc/PID/stat four
    times a second, so a backend that closes mid-run keeps its last reading (at most a quarter
    of a second short)."""

    def __init__(self, pg: str, prefix: str) -> None:
        self.pg, self.prefix = pg, prefix
        self._names: dict[int, str] = {}
        self._last: dict[int, float] = {}
        self._base: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> BackendCpu:
        import psycopg

        self._conn = psycopg.connect(self.pg, autocommit=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._conn.close()

    def mark(self) -> None:
        """From now on: what backends used so far is not counted."""
        self._find()
        self._read()
        with self._lock:
            self._base = dict(self._last)

    def by_name(self) -> dict[str, float]:
        """CPU seconds since `mark`, per application name."""
        self._read()
        with self._lock:
            used: dict[str, float] = defaultdict(float)
            for pid, seconds in self._last.items():
                used[self._names[pid]] += seconds - self._base.get(pid, 0.0)
            return dict(used)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self._find()
            self._read()

    def _find(self) -> None:
        rows = self._conn.execute(
            "SELECT pid, application_name FROM pg_stat_activity WHERE application_name LIKE %s",
            (self.prefix + "%",),
        ).fetchall()
        with self._lock:
            for pid, name in rows:
                self._names.setdefault(int(pid), str(name).removeprefix(self.prefix))

    def _read(self) -> None:
        with self._lock:
            pids = list(self._names)
        for pid in pids:
            try:
                seconds = cpu_s(_stat_fields(Path(f"/proc/{pid}")))
            except (OSError, IndexError):
                continue  # gone: its last reading stands
            with self._lock:
                self._last[pid] = seconds


# --- the worker logs --------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskRun:
    """One task a worker ran, from Celery's "succeeded in" line (epoch seconds)."""

    name: str
    start: float
    end: float
    result: str


def task_runs(logs: Iterable[str]) -> tuple[list[TaskRun], int]:
    """Every task that succeeded, by start; and how many raised."""
    runs, raised = [], 0
    for text in logs:
        for line in text.splitlines():
            if (m := _SUCCEEDED.match(line)) is not None:
                # Celery stamps log lines in local time
                end = datetime.strptime(m["at"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                name = m["name"].removeprefix("batchwise.")
                runs.append(TaskRun(name, end - float(m["run"]), end, m["result"]))
            elif _RAISED.search(line):
                raised += 1
    return sorted(runs, key=lambda r: r.start), raised


def _did_nothing(result: str) -> bool:
    """Whether a task's logged result counts nothing ({'packed': 0, 'submitted': 0}, 0, None)."""
    return all(n == "0" for n in re.findall(r"\d+", result))


def busy_s(runs: Iterable[TaskRun], start: float, end: float) -> float:
    """Seconds of [start, end] during which at least one task ran on some worker."""
    total, reach = 0.0, start
    for run in sorted(runs, key=lambda r: r.start):
        lo, hi = max(run.start, reach), min(run.end, end)
        if hi > lo:
            total += hi - lo
            reach = hi
    return total


# --- the store --------------------------------------------------------------------------------


@dataclass
class BatchTimes:
    """One batch row's timestamps (epoch seconds) and size."""

    id: int
    requests: int
    size_bytes: int
    est_tokens: int
    state: str
    flush_reason: str | None
    packed: float
    claimed: float | None
    create_started: float | None
    submitted: float | None
    ended: float | None
    reconcile_started: float | None
    #: the end of the reconcile task that applied it (from the worker logs)
    reconcile_ended: float | None = None
    #: how many batches that task applied (their ends are not told apart)
    reconcile_shared: int = 1
    attempts: int = 0
    #: polls that asked the provider about it
    polls: int = 0


def _epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def batch_times(store: Store) -> list[BatchTimes]:
    c = batches_t.c
    columns = [c.id, c.request_count, c.size_bytes, c.est_input_tokens, c.state, c.flush_reason]
    stamps = [c.created_at, c.upload_started_at, c.create_started_at, c.submitted_at, c.ended_at]
    with store.read() as conn:
        rows = conn.execute(
            sa.select(*columns, *stamps, c.reconciled_at, c.submit_attempts, c.poll_count).order_by(
                c.id
            )
        ).all()
    return [
        BatchTimes(
            int(r[0]),
            int(r[1]),
            int(r[2]),
            int(r[3] or 0),
            str(r[4]),
            r[5],
            r[6].timestamp(),
            *(_epoch(v) for v in r[7:12]),
            attempts=int(r[12]),
            polls=int(r[13]),
        )
        for r in rows
    ]


def match_reconciles(batches: list[BatchTimes], runs: list[TaskRun]) -> None:
    """Give each reconciled batch the end of the reconcile task that applied it: the one
    running at its `reconciled_at` (that task's own start, a little after the logged run's)."""
    reconciles = [r for r in runs if r.name == "reconcile" and "'batches': 0" not in r.result]
    by_task: dict[int, list[BatchTimes]] = defaultdict(list)
    for batch in batches:
        at = batch.reconcile_started
        running = [i for i, r in enumerate(reconciles) if at and r.start - 0.5 <= at <= r.end]
        if running:  # two workers may both be reconciling: the one that began then
            by_task[min(running, key=lambda i: abs(reconciles[i].start - (at or 0.0)))].append(
                batch
            )
    for i, members in by_task.items():
        for batch in members:
            batch.reconcile_ended = reconciles[i].end
            batch.reconcile_shared = len(members)


def store_tallies(store: Store) -> tuple[dict[str, int], dict[str, int]]:
    """(requests by state, events by kind): two set-based reads."""
    with store.read() as conn:
        states = conn.execute(
            sa.select(requests_t.c.state, sa.func.count()).group_by(requests_t.c.state)
        ).all()
        kinds = conn.execute(
            sa.select(events_t.c.kind, sa.func.count()).group_by(events_t.c.kind)
        ).all()
    return {str(s): int(n) for s, n in states}, {str(k): int(n) for k, n in kinds}


def capacity_lines(store: Store, settings: Settings) -> list[str]:
    """Each batched model's enqueued-token limit, as the packer sees it at the end of the run:
    its open batches may hold no more, so a bigger workload is packed a batch at a time."""
    with store.read() as conn:
        models = conn.execute(sa.select(batches_t.c.provider, batches_t.c.model).distinct()).all()
        known = {(e.get("provider"), e.get("model")): e for e in capacity_rows(conn)}
    lines = []
    for provider, model in models:
        top, source = capacity.ceiling(settings, provider, model)
        learned = known.get((provider, model), {}).get("learned_tokens")
        limit = "none" if top is None else f"{top:,} tokens ({source})"
        lines.append(
            f"enqueued-token limit for {provider} {model}: {limit}"
            + (f", learned {learned:,}" if learned else "")
        )
    return lines


# --- the report -------------------------------------------------------------------------------


@dataclass
class Split:
    """Everything the report needs, gathered after the run. Times are epoch seconds."""

    started: float
    submit_ended: float
    done: float
    batches: list[BatchTimes]
    runs: list[TaskRun]
    raised: int
    states: dict[str, int]
    events: dict[str, int]
    #: CPU seconds during the run, per process (or group) name
    cpu: dict[str, float] = field(default_factory=dict)
    #: CPU seconds of the PostgreSQL backends serving each process name
    backend_cpu: dict[str, float] = field(default_factory=dict)
    #: (busy, available) CPU seconds of the whole machine during the run
    machine: tuple[float, float] = (0.0, 0.0)
    #: peak RSS in MB per process name (the largest process of a group)
    peak_mb: dict[str, float] = field(default_factory=dict)
    #: CPU seconds of every PostgreSQL process during the run (everyone's)
    postgres_cpu: float = 0.0
    #: what limits each model's open batches, as lines
    capacity: list[str] = field(default_factory=list)


def _rel(split: Split, at: float | None) -> str:
    return "—" if at is None else f"{at - split.started:.1f}"


def _gap(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def _to_reconcile(b: BatchTimes) -> float | None:
    """Ended → its reconcile started; unknown (None) when the task that applied it had begun
    before it ended (it applied another batch first)."""
    gap = _gap(b.ended, b.reconcile_started)
    return None if gap is None or gap < 0 else gap


def _fmt(value: float | None, width: int = 6) -> str:
    return f"{'—':>{width}}" if value is None else f"{value:{width}.1f}"


#: the critical path's segments, in the order a batch goes through them
PATH = (
    ("submit", "submit (the CLI process; it commits before it exits, so work may start)"),
    ("first_tick", "submit end → the first batch's flush starts (the next tick)"),
    ("packing", "packing: flush start → claimed for upload (earlier submits of its task)"),
    ("upload", "file + upload + create call (the emulator's work on it included)"),
    ("provider", "at the provider until a poll saw it end (turnaround 0: the wait for a poll)"),
    ("room", "waiting for room: a batch ended → the next flush packs (capacity, tick)"),
    ("to_reconcile", "the last batch: ended → its reconcile starts (poll → reconcile task)"),
    ("reconcile", "its reconcile (download + reconcile + ledger)"),
    ("tail", "tail: its reconcile ended → all done seen by the benchmark (polls 4/s)"),
)


def chain(batches: list[BatchTimes]) -> list[BatchTimes]:
    """The batches the run waited on: the batch reconciled last, then the batch whose end let
    it be packed, and so on back, in run order. The packer holds a model's next batch until
    its enqueued tokens have room; the room is read some way into the flush (after the plan,
    in the packers' turn), so the one before is the latest of an earlier flush to end before
    this one was claimed."""
    done = [b for b in batches if b.reconcile_ended is not None]
    if not done:
        return []
    path = [max(done, key=lambda b: b.reconcile_ended or 0.0)]
    while True:
        cur = path[-1]
        until = cur.claimed if cur.claimed is not None else cur.packed
        before = [
            b for b in batches if b.packed < cur.packed and b.ended is not None and b.ended <= until
        ]
        if not before:
            return path[::-1]
        path.append(max(before, key=lambda b: b.ended or 0.0))


def critical_path(split: Split) -> tuple[dict[str, float], list[int]]:
    """The wall time cut along `chain`: seconds per segment of `PATH` (they add up to the wall
    time: each point is clamped to be no earlier than the one before), and the chain's ids."""
    path = chain(split.batches)
    marks: list[tuple[str, float | None]] = [("submit", split.submit_ended)]
    for i, b in enumerate(path):
        marks.append(("first_tick" if i == 0 else "room", b.packed))
        marks += [("packing", b.claimed), ("upload", b.submitted), ("provider", b.ended)]
    if path:
        marks += [
            ("to_reconcile", path[-1].reconcile_started),
            ("reconcile", path[-1].reconcile_ended),
        ]
    marks.append(("tail", split.done))
    seconds: dict[str, float] = dict.fromkeys((key for key, _ in PATH), 0.0)
    point = split.started
    for key, at in marks:
        nxt = point if at is None else max(point, at)
        seconds[key] += nxt - point
        point = nxt
    return seconds, [b.id for b in path]


def report(split: Split) -> str:
    """The split as printed lines (indented under the deferred run's headline)."""
    wall = split.done - split.started
    out = []
    sizes = Counter((b.requests, round(b.size_bytes / 2**20, 1)) for b in split.batches)
    reasons = Counter(b.flush_reason or "?" for b in split.batches)
    out.append(
        f"  batches: {len(split.batches)} ("
        + ", ".join(f"{n}× {req} requests / {mb} MB" for (req, mb), n in sorted(sizes.items()))
        + "; flushed: "
        + ", ".join(f"{reason} {n}" for reason, n in reasons.most_common())
        + ")"
    )
    out.append(
        "  requests: "
        + ", ".join(f"{state} {n}" for state, n in sorted(split.states.items()))
        + ("; events: " + ", ".join(f"{k} {n}" for k, n in sorted(split.events.items())))
        * bool(split.events)
    )

    def first_last(attr: str) -> str:
        times = [getattr(b, attr) for b in split.batches if getattr(b, attr) is not None]
        return f"{_rel(split, min(times))}/{_rel(split, max(times))}" if times else "—"

    out.append(
        f"  first/last batch (s from the start of submit): submit ended "
        f"{_rel(split, split.submit_ended)}; packed {first_last('packed')}, at the provider "
        f"{first_last('submitted')}, ended {first_last('ended')}, reconciled "
        f"{first_last('reconcile_ended')}; all done seen {_rel(split, split.done)}"
    )
    seconds, path = critical_path(split)
    out.append(
        f"  where the {wall:.1f} s went, along the batches the run waited on "
        f"({' → '.join(map(str, path))}):"
    )
    for key, label in PATH:
        out.append(f"    {seconds[key]:7.2f}  {label}")
    out.append(
        "  per batch (s; 'at': from the start of submit): requests, est. tokens, packed at, "
        "packing, file, upload, provider/polls, → reconcile, reconcile [×N: one task for N "
        "batches], reconciled at"
    )
    for b in split.batches:
        shared = f" ×{b.reconcile_shared}" if b.reconcile_shared > 1 else ""
        out.append(
            f"    batch {b.id:>3} {b.requests:>6} {b.est_tokens / 1e6:5.2f}M "
            f"{_rel(split, b.packed):>6} "
            f"{_fmt(_gap(b.packed, b.claimed))} {_fmt(_gap(b.claimed, b.create_started))} "
            f"{_fmt(_gap(b.create_started, b.submitted))} {_fmt(_gap(b.submitted, b.ended))}"
            f"/{b.polls} "
            f"{_fmt(_to_reconcile(b))} "
            f"{_fmt(_gap(b.reconcile_started, b.reconcile_ended))}{shared:<3} "
            f"{_rel(split, b.reconcile_ended):>6}"
            + (f"  ({b.attempts} submit attempts, {b.state})" if b.attempts > 1 else "")
        )
    stages = (
        ("packed", "claimed"),
        ("claimed", "create_started"),
        ("create_started", "submitted"),
        ("submitted", "ended"),
    )
    totals = [
        sum(_gap(getattr(b, a), getattr(b, z)) or 0.0 for b in split.batches) for a, z in stages
    ]
    totals.append(sum(_to_reconcile(b) or 0.0 for b in split.batches))
    # a task that applied N batches is counted once
    reconciles = {
        (b.reconcile_started, b.reconcile_ended): _gap(b.reconcile_started, b.reconcile_ended)
        or 0.0
        for b in split.batches
    }
    out.append(
        f"    {'summed':>9} {sum(b.requests for b in split.batches):>6} "
        f"{sum(b.est_tokens for b in split.batches) / 1e6:5.1f}M {'':>6} "
        + " ".join(_fmt(t) for t in totals[:4])
        + f"   {_fmt(totals[4])} {_fmt(sum(reconciles.values()))}"
    )
    if split.capacity:
        out.append("  " + "; ".join(split.capacity))
    after = [r for r in split.runs if r.end > split.submit_ended and r.start < split.done]
    by_name: dict[str, list[TaskRun]] = defaultdict(list)
    for run in after:
        by_name[run.name].append(run)
    span = split.done - split.submit_ended
    busy = busy_s(after, split.submit_ended, split.done)
    spent = {name: sum(r.end - r.start for r in runs) for name, runs in by_name.items()}
    out.append(
        f"  worker tasks after submit ended ({span:.1f} s; run time summed / tasks, from the "
        "logs; of which ran finding nothing to do):"
    )
    for name, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
        idle = [r for r in by_name[name] if _did_nothing(r.result)]
        out.append(
            f"    {name:<13} {seconds:6.1f} s / {len(by_name[name]):>4}   nothing to do: "
            f"{sum(r.end - r.start for r in idle):5.1f} s / {len(idle):>4}"
        )
    if split.raised:
        out.append(f"    {split.raised} task(s) raised")
    out.append(
        f"  idle (no task running on any worker) {span - busy:.1f} s of those {span:.1f} s; "
        f"tasks running on average {sum(r.end - r.start for r in after) / max(span, 1e-9):.2f}"
    )
    if split.cpu:
        cpu = ", ".join(f"{name} {s:.1f}" for name, s in split.cpu.items())
        pg = sum(split.backend_cpu.values())
        pg_by = ", ".join(f"{name} {s:.1f}" for name, s in sorted(split.backend_cpu.items()))
        busy_m, avail_m = split.machine
        ours = sum(split.cpu.values()) + pg
        out.append(f"  CPU s (user+sys) during the run: {cpu}")
        out.append(
            f"    their PostgreSQL backends {pg:.1f} ({pg_by}); every PostgreSQL process "
            f"{split.postgres_cpu:.1f} (exited backends, background work, other users' sessions)"
        )
        out.append(
            f"    machine busy {busy_m:.1f} of {avail_m:.1f} CPU s; these processes "
            f"{ours:.1f}, the rest (PostgreSQL's own background work, Redis, other users) "
            f"{busy_m - ours:.1f}"
        )
    if split.peak_mb:
        out.append(
            "  peak RSS MB: " + ", ".join(f"{name} {mb:.0f}" for name, mb in split.peak_mb.items())
        )
    return "\n".join(out)
