"""Job definitions: the `Job` a scheduler runs, what a job's functions are given (`Run`,
`JobResult`), and loading job modules from a folder.

A job module declares, at module level (only SCHEDULE and one of the functions are required):

    NAME = "overnight_portfolio_summary"   # default: the file name without .py
    SCHEDULE = "0 1 * * *"                 # cron, 5 fields or @daily/@hourly/…
    TIMEZONE = "Europe/London"             # IANA zone of SCHEDULE and DEADLINE; default UTC
    DEADLINE = "by 07:00"                  # tolerance from the scheduled time; default 24h
    CATCH_UP = "once"                      # or "skip": what to do with runs missed while down

    def requests(run): ...                 # yield request items (as for Client.enqueue_many)
    def on_results(run, results): ...      # write the output; return its path (or None)

Files whose names start with `_` are not jobs, so helpers can live beside them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from batchwise.errors import JobError, JobLoadError, NotFoundError, ToleranceError
from batchwise.jobs.schedule import CatchUp, check_deadline, normalise_schedule
from batchwise.states import RequestState

if TYPE_CHECKING:
    from batchwise.config import Settings
    from batchwise.store.engine import Store

#: the environment variable naming the jobs folder (read by `jobs_folder` and the CLI)
JOBS_DIR_ENV = "BATCHWISE_JOBS_DIR"
#: a job name: it names files and folders, so it starts with a letter, digit or '_' (never
#: '.' or '..') and holds no path separator
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def _no_requests(run: Run) -> Iterable[Mapping[str, Any]]:
    return ()


RequestsFn = Callable[["Run"], Iterable[Mapping[str, Any]]]
OnResultsFn = Callable[["Run", list["JobResult"]], "str | os.PathLike[str] | None"]


@dataclass(frozen=True)
class Job:
    """A cron job: when it runs, how long its requests may take, what it asks and delivers.

    Validated on creation, so a bad definition fails when loaded, not at 01:00.
    """

    name: str
    schedule: str
    requests: RequestsFn = _no_requests
    timezone: str = "UTC"
    deadline: str = "24h"
    catch_up: str = CatchUp.ONCE.value
    on_results: OnResultsFn | None = None
    #: the module it was loaded from, for error messages
    source: Path | None = None
    #: `schedule` in 5-field form
    cron: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        where = str(self.source) if self.source else f"job {self.name!r}"
        if not isinstance(self.name, str) or not NAME_PATTERN.fullmatch(self.name):
            raise JobLoadError(
                f"{where}: NAME {self.name!r} is invalid: use 1-128 letters, digits, '_', '.' "
                "or '-', starting with a letter, digit or '_'"
            )
        for attr, value in (
            ("SCHEDULE", self.schedule),
            ("TIMEZONE", self.timezone),
            ("DEADLINE", self.deadline),
            ("CATCH_UP", self.catch_up),
        ):
            if not isinstance(value, str):
                raise JobLoadError(f"{where}: {attr} must be a string, got {value!r}")
        try:
            object.__setattr__(self, "cron", normalise_schedule(self.schedule))
        except ValueError as exc:
            raise JobLoadError(
                f"{where}: SCHEDULE {self.schedule!r} is not a valid cron expression: {exc}"
            ) from None
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise JobLoadError(
                f"{where}: TIMEZONE {self.timezone!r} is not an IANA time zone name "
                "(like UTC or Europe/London)"
            ) from None
        try:
            check_deadline(self.deadline)
        except ToleranceError as exc:
            raise JobLoadError(f"{where}: DEADLINE is invalid: {exc}") from None
        if self.catch_up not in {c.value for c in CatchUp}:
            raise JobLoadError(f"{where}: CATCH_UP must be 'once' or 'skip', got {self.catch_up!r}")
        _check_function(self.requests, "requests", ("run",), where)
        if self.on_results is not None:
            _check_function(self.on_results, "on_results", ("run", "results"), where)

    @property
    def zone(self) -> tzinfo:
        return ZoneInfo(self.timezone)


def _check_function(fn: Any, attr: str, params: tuple[str, ...], where: str) -> None:
    wanted = f"{attr}({', '.join(params)})"
    if not callable(fn):
        raise JobLoadError(f"{where}: {attr} must be a function {wanted}, got {fn!r}")
    try:
        inspect.signature(fn).bind(*params)
    except TypeError:
        raise JobLoadError(
            f"{where}: {attr} must take {len(params)} argument(s), as in def {wanted}; "
            f"it is {attr}{inspect.signature(fn)}"
        ) from None
    except ValueError:  # pragma: no cover - callables without a signature (builtins)
        pass


@dataclass(frozen=True)
class Run:
    """What a job's `requests` and `on_results` are given: this run and where to work."""

    id: int
    job: Job
    #: the occurrence this run is for (UTC); a catch-up or late run starts after it
    scheduled_for: datetime
    #: schedule | catch_up | manual
    trigger: str
    #: when the run's requests must be answered by (UTC)
    deadline: datetime
    settings: Settings
    store: Store

    @property
    def name(self) -> str:
        return self.job.name

    @property
    def local_time(self) -> datetime:
        """The scheduled time in the job's zone (for dates in file names and headings)."""
        return self.scheduled_for.astimezone(self.job.zone)

    @property
    def config(self) -> Mapping[str, Any]:
        """The job's own settings-file table, `[jobs.NAME]`, or an empty mapping."""
        return job_config(self.settings, self.job.name)

    @property
    def output_dir(self) -> Path:
        """Where to write reports: `output_dir` of `[jobs.NAME]`, else of `[jobs]`, else
        `<home>/reports`."""
        chosen = self.config.get("output_dir")
        if chosen:
            return Path(chosen).expanduser()
        return self.settings.jobs_output_dir or self.settings.home / "reports"

    def write_output(self, filename: str | os.PathLike[str], text: str) -> str:
        """Write `text` to `output_dir / filename` through a temporary file and a rename, so
        a reader never sees half a report and a repeated delivery just rewrites it.

        `filename` is relative (sub-folders allowed) and must stay inside the output folder:
        an absolute path, a `..` part or a symlink leading out raises `JobError`.
        """
        path = self.output_path(filename)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not _inside(path.parent.resolve(), self.output_dir.resolve()):  # a symlink raced in
            raise self._outside(filename)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as stream:
                stream.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return str(path)

    def output_path(self, filename: str | os.PathLike[str]) -> Path:
        """`output_dir / filename`, checked to stay inside the output folder (see
        `write_output`)."""
        relative = Path(filename)
        if (
            not str(filename)
            or relative.is_absolute()
            or relative.drive
            or ".." in relative.parts
            or relative.name in {"", ".", ".."}
        ):
            raise self._outside(filename)
        folder = self.output_dir.resolve()
        path = folder / relative
        # resolve() follows every symlink on the way, the file itself included
        if not _inside(path.resolve(), folder) or path.resolve() == folder:
            raise self._outside(filename)
        return path

    def _outside(self, filename: str | os.PathLike[str]) -> JobError:
        return JobError(
            f"job {self.job.name!r}: write_output({str(filename)!r}) refused: give a file name "
            f"relative to the output folder {self.output_dir} that stays inside it (no "
            "absolute path, no '..', no symlink leading out)"
        )


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


@dataclass(frozen=True)
class JobResult:
    """One finished request of a run, as `on_results` receives it."""

    #: the custom_id the job gave the item (or its 1-based position when it gave none)
    custom_id: str
    request_id: int
    #: the request's terminal state: succeeded, failed, cancelled, rejected, deduplicated
    state: str
    #: the answer's text, when answered
    text: str | None
    #: the provider's response body, when answered
    body: dict[str, Any] | None
    error: str | None

    @property
    def ok(self) -> bool:
        answered = {RequestState.SUCCEEDED.value, RequestState.DEDUPLICATED.value}
        return self.state in answered and self.body is not None


def job_config(settings: Settings, name: str) -> Mapping[str, Any]:
    """The job's own `[jobs.NAME]` table, or an empty mapping."""
    return settings.job_tables.get(name) or {}


def jobs_folder(settings: Settings) -> tuple[Path, bool]:
    """The jobs folder and whether it was configured (a configured folder must exist).

    `Settings.jobs_dir` (`BATCHWISE_JOBS_DIR` > `[jobs] folder` in the settings file) > `./jobs`.
    """
    if settings.jobs_dir is not None:
        return settings.jobs_dir, True
    return Path("jobs"), False


# --- loading ----------------------------------------------------------------------------------


@dataclass
class LoadedJobs:
    """The jobs of a folder, and the files that failed to load (each error names its file)."""

    jobs: list[Job] = field(default_factory=list)
    errors: list[JobLoadError] = field(default_factory=list)

    def get(self, name: str) -> Job:
        for job in self.jobs:
            if job.name == name:
                return job
        known = ", ".join(sorted(j.name for j in self.jobs)) or "none"
        raise NotFoundError(f"no job named {name!r} (known jobs: {known})")

    def check(self) -> LoadedJobs:
        """Raise the first load error, if any."""
        if self.errors:
            raise self.errors[0]
        return self


def load_file(path: Path) -> Job:
    """The job defined by one module; `JobLoadError` names the file and what is wrong."""
    digest = hashlib.sha256(str(path.resolve().parent).encode()).hexdigest()[:8]
    module_name = f"batchwise_job_{digest}_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - only for non-.py paths
        raise JobLoadError(f"{path}: cannot load it as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise JobLoadError(f"{path}: cannot import it: {type(exc).__name__}: {exc}") from exc
    values = vars(module)
    if "SCHEDULE" not in values:
        raise JobLoadError(f'{path}: SCHEDULE is missing: add e.g. SCHEDULE = "0 1 * * *"')
    requests = values.get("requests")
    on_results = values.get("on_results")
    if requests is None and on_results is None:
        raise JobLoadError(
            f"{path}: requests is missing: define def requests(run) yielding request items "
            "(or def on_results(run, results) for a job that makes no requests)"
        )
    return Job(
        name=values.get("NAME", path.stem),
        schedule=values["SCHEDULE"],
        requests=requests if requests is not None else _no_requests,
        timezone=values.get("TIMEZONE", "UTC"),
        deadline=values.get("DEADLINE", "24h"),
        catch_up=values.get("CATCH_UP", CatchUp.ONCE.value),
        on_results=on_results,
        source=path,
    )


def load_folder(folder: Path, *, required: bool = False) -> LoadedJobs:
    """Every job in `folder` (files `*.py` not starting with `_`), errors collected."""
    loaded = LoadedJobs()
    if not folder.is_dir():
        if required:
            loaded.errors.append(
                JobLoadError(
                    f"jobs folder {folder} does not exist (set by {JOBS_DIR_ENV} or [jobs] folder)"
                )
            )
        return loaded
    seen: dict[str, Path] = {}
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith(("_", ".")):
            continue
        try:
            job = load_file(path)
        except JobLoadError as exc:
            loaded.errors.append(exc)
            continue
        if job.name in seen:
            loaded.errors.append(
                JobLoadError(f"{path}: NAME {job.name!r} is already used by {seen[job.name]}")
            )
            continue
        seen[job.name] = path
        loaded.jobs.append(job)
    return loaded


_cache_lock = threading.Lock()
_cache: dict[Path, tuple[tuple[tuple[str, int, int], ...], LoadedJobs]] = {}


def _signature(folder: Path) -> tuple[tuple[str, int, int], ...]:
    if not folder.is_dir():
        return ()
    stats = [(p.name, p.stat()) for p in folder.glob("*.py")]
    return tuple(sorted((name, st.st_mtime_ns, st.st_size) for name, st in stats))


def cached_folder(folder: Path, *, required: bool = False) -> LoadedJobs:
    """`load_folder`, re-run only when a file in the folder changed (schedulers call this
    every tick)."""
    key = folder.resolve()
    with _cache_lock:
        signature = _signature(key)
        hit = _cache.get(key)
        if hit is not None and hit[0] == signature:
            return hit[1]
        loaded = load_folder(folder, required=required)
        _cache[key] = (signature, loaded)
        return loaded
