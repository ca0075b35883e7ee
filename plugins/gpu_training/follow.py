"""Following a running job from the triggerer: stream ``global.json``, store it, judge the end.

:class:`JobFollower` is what :class:`~gpu_training.triggers.GlobalJsonTrigger` runs. It holds one
connection to the host for the whole job (:class:`SshSource`: one asyncssh connection with a
``tail -c +OFFSET -F`` channel per followed file; :class:`LocalSource`: the files themselves, read by
offset), so a new event reaches the results DB within a fraction of a second while no worker slot is
held. Whatever arrives is parsed and stored in batches, each in one transaction with the new byte
offset (:meth:`~gpu_training.results.store.ResultsStore.ingest`), on a small thread pool so the
triggerer's event loop never waits on the database. The offset is read back from the results DB
when following starts, so a triggerer restart, a second triggerer or a task retry neither loses nor
duplicates a row.

Every ``poll_interval`` the trainer's status and the job's row are checked and the job judged
(:func:`gpu_training.progress.judge`): PROJECT end, trainer exit, stall, ``max_runtime``, a cancel,
a non-finite loss (with ``stop_on_nan``), or the host unreachable for longer than
``unreachable_timeout``. If the stream breaks, new bytes are polled every ``poll_interval`` while
the stream is re-opened with backoff; a lost connection is re-opened with backoff too. The
follower only observes: stopping a trainer is the worker's job once the trigger returns.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import random
import shlex
import stat
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any, TypeVar

from gpu_training.errors import HostError, NotRegularFileError
from gpu_training.events import MalformedLine, parse_chunk, without_nul
from gpu_training.hosts.base import LOG_PATH, LOG_TAIL_SCRIPT, NOT_REGULAR_STATUS, OPEN_REGULAR_SCRIPT, TrainerStatus
from gpu_training.hosts.local import open_regular
from gpu_training.progress import GLOBAL_JSON_PATH, Verdict, exit_description, judge, with_log_tail
from gpu_training.results.models import utcnow
from gpu_training.results.store import ResultsStore

T = TypeVar("T")

#: Largest batch parsed and stored in one transaction; also the read-ahead limit per job.
BATCH_BYTES = 4 << 20
#: How often local files are checked for new bytes (one ``stat`` per followed file, one wakeup).
LOCAL_TICK_SECONDS = 0.1
#: Log lines shown per job: a burst of this many, then ``LOG_LINES_PER_SECOND``.
LOG_BURST_LINES = 400
LOG_LINES_PER_SECOND = 40.0
LOG_LINE_CHARS = 1000
#: A trainer log line is cut here (its start kept, the rest counted): a line without a newline
#: costs a bounded copy, whatever its length.
LOG_LINE_BYTES = 64 * 1024
#: The longest the lines of one log hold the triggerer's event loop before it runs other tasks.
LOG_SLICE_SECONDS = 0.005
#: How much of an existing trainer log is shown when following starts (e.g. after a restart).
LOG_REPLAY_BYTES = 64 * 1024
#: The trainer log's last lines kept on the job row for the job page (``training_jobs.log_tail``):
#: at most this many bytes and lines, written at most this often while they change.
LOG_TAIL_BYTES = 32 * 1024
LOG_TAIL_LINES = 1000
LOG_TAIL_WRITE_SECONDS = 2.0
CONNECT_TIMEOUT_SECONDS = 20.0
COMMAND_TIMEOUT_SECONDS = 30.0
BACKOFF_MAX_SECONDS = 30.0

#: Results DB calls of every follower in this process share these threads (SQLite serialises
#: writers anyway; PostgreSQL gets a few concurrent transactions).
_DB_THREADS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="gpu-training-results")


class SourceUnreachable(Exception):
    """The host does not answer (connection refused, lost, or a command timed out)."""


class StreamBroken(Exception):
    """A ``tail -F`` stream ended or failed while the host still answers."""


@dataclasses.dataclass(frozen=True)
class FollowSpec:
    job_uuid: str
    results_conn_id: str
    poll_interval: float
    stall_timeout: timedelta
    max_runtime: timedelta
    stop_on_nan: bool = False
    unreachable_timeout: timedelta = timedelta(minutes=2)
    #: ``[body, *args]`` of the bash script printing the trainer's status (see runtimes.Trainer).
    status_command: tuple[str, ...] = ()
    #: ``process`` or ``docker``: how the status output is parsed.
    runtime: str = "process"
    #: When the job's instances reach ``max_cost_usd`` (None: no cost limit).
    cost_deadline: datetime | None = None
    max_cost_usd: float = 0
    #: The most metric rows the job may store; None: the deployment's ``max_metric_rows_per_job``.
    max_metric_rows: int | None = None


@dataclasses.dataclass
class Peer:
    """Another node of a multi-node job: its trainer is watched and its log shown with its rank
    (node 0, the followed source, writes global.json)."""

    rank: int
    name: str
    source: Source
    #: ``[body, *args]`` of the script printing this node's trainer status.
    status_command: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class FollowResult:
    """What the trigger hands back to the worker."""

    kind: str
    succeeded: bool
    reason: str
    offset: int
    events: int
    errors: int
    exit_code: int | None = None

    def as_event(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Backoff:
    """Exponential backoff with full jitter: 1, 2, 4 ... ``BACKOFF_MAX_SECONDS``."""

    def __init__(self, first: float = 1.0, cap: float = BACKOFF_MAX_SECONDS) -> None:
        self.first, self.cap, self.attempt = first, cap, 0

    def next(self) -> float:
        delay = min(self.cap, self.first * (2**self.attempt))
        self.attempt += 1
        return delay / 2 + random.uniform(0, delay / 2)

    def reset(self) -> None:
        self.attempt = 0


# --- where the files are -------------------------------------------------------------------------


class Source(abc.ABC):
    """The job's work directory, seen from the triggerer."""

    workdir: str

    #: Monotonic time since which the host has not answered; ``None`` while it answers.
    unreachable_since: float | None = None
    last_error: str = ""

    def unreachable_for(self) -> float:
        return 0.0 if self.unreachable_since is None else time.monotonic() - self.unreachable_since

    def _answered(self) -> None:
        self.unreachable_since = None

    def _failed(self, err: BaseException, since: float) -> None:
        """An operation begun at ``since`` (monotonic) failed: the host is silent since then."""
        self.last_error = str(err) or type(err).__name__
        if self.unreachable_since is None or since < self.unreachable_since:
            self.unreachable_since = since

    @abc.abstractmethod
    def stream(self, relpath: str, offset: int) -> AsyncIterator[bytes]:
        """New bytes of ``relpath`` from ``offset`` as they are written (waiting for the file to
        appear); raises :class:`StreamBroken` when the stream breaks, ``NotRegularFileError`` when the
        file is not a regular file reached without symlinks (then or later: never followed)."""

    async def size(self, relpath: str) -> int:
        """The file's size; 0 when it does not exist; ``NotRegularFileError`` when it is not one."""
        status, out, err = await self.script(OPEN_REGULAR_SCRIPT + _SIZE_SCRIPT, self.workdir, relpath)
        if status == NOT_REGULAR_STATUS:
            raise NotRegularFileError(relpath, err.strip())
        return int(out.split()[0]) if out.split() and out.split()[0].isdigit() else 0

    @abc.abstractmethod
    async def read(self, relpath: str, offset: int, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` from ``offset``; empty when there are none or no file;
        ``NotRegularFileError`` when it is not a regular file reached without symlinks."""

    @abc.abstractmethod
    async def script(self, body: str, *args: str, timeout: float = COMMAND_TIMEOUT_SECONDS) -> tuple[int, str, str]:
        """Run a constant bash script with positional ``args``: (status, stdout, stderr)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the connection."""


class _LocalWatch:
    """One ticker for every local file followed on an event loop: each tick ``stat``s the files
    waited on and wakes only the followers whose file grew (50 jobs cost one wakeup per tick)."""

    def __init__(self) -> None:
        self._waiting: list[tuple[str, int, asyncio.Future[None]]] = []
        self._ticker: asyncio.Task[None] | None = None

    async def grown(self, path: str, size: int) -> None:
        """Return once ``path`` is larger than ``size`` bytes."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((path, size, future))
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.create_task(self._tick(), name="gpu-training-local-watch")
        try:
            await future
        finally:
            self._waiting = [w for w in self._waiting if w[2] is not future]

    async def _tick(self) -> None:
        while self._waiting:
            await asyncio.sleep(LOCAL_TICK_SECONDS)
            for path, size, future in list(self._waiting):
                if not future.done() and not 0 <= _size(path) <= size:  # grew, or is no file to read
                    future.set_result(None)


_WATCHES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LocalWatch] = weakref.WeakKeyDictionary()


def _local_watch() -> _LocalWatch:
    loop = asyncio.get_running_loop()
    watch = _WATCHES.get(loop)
    if watch is None:
        watch = _WATCHES[loop] = _LocalWatch()
    return watch


class LocalSource(Source):
    """A work directory on the triggerer's machine: files read by offset."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir

    def _path(self, relpath: str) -> str:
        return os.path.join(self.workdir, relpath)

    async def size(self, relpath: str) -> int:
        fd = open_regular(self.workdir, relpath)
        if fd is None:
            return 0
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    async def stream(self, relpath: str, offset: int) -> AsyncIterator[bytes]:
        path = self._path(relpath)
        while True:
            size = _size(path)
            # A name that is not a regular file is read too: the read refuses it and says what it is.
            data = await self.read(relpath, offset, BATCH_BYTES) if not 0 <= size <= offset else b""
            if data:
                offset += len(data)
                yield data
            else:
                await _local_watch().grown(path, offset)

    async def read(self, relpath: str, offset: int, max_bytes: int) -> bytes:
        fd = open_regular(self.workdir, relpath)
        if fd is None:
            return b""
        try:
            return os.pread(fd, max_bytes, offset)
        finally:
            os.close(fd)

    async def script(self, body: str, *args: str, timeout: float = COMMAND_TIMEOUT_SECONDS) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            "bash", "-c", body, "bash", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        return proc.returncode or 0, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def _size(path: str) -> int:
    """The size of a regular file (symlinks not followed); 0 when there is none; -1 for any other
    kind of file (a symlink, a FIFO...)."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else -1


#: $1 workdir, $2 file: its size (0: none).
_SIZE_SCRIPT = r"""
open_regular "$1" "$2"
case $? in 0) stat -L -c %s /dev/fd/3 ;; 85) echo 0 ;; *) exit 86 ;; esac
"""
#: $1 workdir, $2 file, $3 offset + 1, $4 most bytes: the bytes (none: no file).
_READ_SCRIPT = r"""
open_regular "$1" "$2"
case $? in 0) ;; 85) exit 0 ;; *) exit 86 ;; esac
tail -c "+$3" <&3 | head -c "$4"
"""
#: $1 workdir, $2 file, $3 offset + 1: ``tail -F`` that never follows a symlink. Waits for the file
#: to appear, opens it (checked), then follows that open file, not its name. When the name no longer
#: holds it: 86 if it is now something else than a regular file, else 87 (replaced or removed: the
#: caller starts again by name). Ends with ``tail``, which ends once our side closed the channel.
_STREAM_SCRIPT = r"""
while :; do
  open_regular "$1" "$2"
  status=$?
  [ "$status" = 85 ] || break
  sleep 0.5
done
[ "$status" = 0 ] || exit "$status"
tail -c "+$3" -f /dev/fd/3 2>/dev/null &
follower=$!
exec 3<&-
trap 'kill "$follower" 2>/dev/null' EXIT
while kill -0 "$follower" 2>/dev/null; do
  sleep 1
  if [ "$(stat -c %d:%i -- "$1/$2" 2>/dev/null)" != "$id" ]; then
    open_regular "$1" "$2"
    [ $? = 86 ] && exit 86
    echo "replaced" >&2
    exit 87
  fi
done
"""


class SshSource(Source):
    """A work directory on a remote host: one asyncssh connection, re-opened with backoff."""

    def __init__(self, target: dict[str, Any], *, timeout: float = COMMAND_TIMEOUT_SECONDS) -> None:
        self.workdir = str(target["workdir"])
        self.target = target
        #: Longest wait for a connect or a command before the host counts as not answering.
        self.timeout = timeout
        self._conn: Any = None
        self._lock = asyncio.Lock()
        self._backoff = Backoff()
        self._next_try = 0.0
        self.connects = 0

    @property
    def where(self) -> str:
        return f"{self.target.get('host')}:{self.target.get('port', 22)}"

    async def _connection(self) -> Any:
        async with self._lock:
            if self._conn is not None:
                return self._conn
            wait = self._next_try - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            started = time.monotonic()
            try:
                self._conn = await asyncio.wait_for(self._connect(), min(CONNECT_TIMEOUT_SECONDS, self.timeout))
            except Exception as err:
                self._next_try = time.monotonic() + self._backoff.next()
                self._failed(err, started)
                raise SourceUnreachable(f"{self.where}: connecting failed: {err or type(err).__name__}") from err
            self.connects += 1
            self._backoff.reset()
            self._answered()
            return self._conn

    async def _connect(self) -> Any:
        from airflow.providers.ssh.hooks.ssh import SSHHookAsync

        logging.getLogger("asyncssh").setLevel(logging.WARNING)  # it logs every channel at INFO

        target = self.target
        hook = SSHHookAsync(
            ssh_conn_id=target["ssh_conn_id"],
            host=target.get("host"),
            port=target.get("port"),
            username=target.get("username"),
            keepalive_interval=15,
        )
        return await hook.get_conn()

    def _drop(self, conn: Any, err: BaseException, since: float) -> None:
        """Forget a connection that failed (the next call re-opens it)."""
        self._failed(err, since)
        if self._conn is conn and conn is not None:
            self._conn = None
            conn.abort()

    def _command(self, body: str, *args: str) -> str:
        return shlex.join(["bash", "-c", body, "bash", *args])

    async def script(self, body: str, *args: str, timeout: float = COMMAND_TIMEOUT_SECONDS) -> tuple[int, str, str]:
        import asyncssh

        conn = await self._connection()
        started = time.monotonic()
        try:
            result = await asyncio.wait_for(
                conn.run(self._command(body, *args), check=False), min(timeout, self.timeout)
            )
        except (asyncssh.Error, OSError, TimeoutError) as err:
            self._drop(conn, err, started)
            raise SourceUnreachable(f"{self.where}: {err or type(err).__name__}") from err
        if result.exit_status is None:  # the channel closed without an answer
            lost = ConnectionError(f"command ended without an exit status (signal {result.exit_signal})")
            self._drop(conn, lost, started)
            raise SourceUnreachable(f"{self.where}: {lost}")
        self._answered()
        return result.exit_status, str(result.stdout or ""), str(result.stderr or "")

    async def read(self, relpath: str, offset: int, max_bytes: int) -> bytes:
        import asyncssh

        conn = await self._connection()
        command = self._command(
            OPEN_REGULAR_SCRIPT + _READ_SCRIPT, self.workdir, relpath, str(offset + 1), str(max_bytes)
        )
        started = time.monotonic()
        try:
            result = await asyncio.wait_for(conn.run(command, check=False, encoding=None), self.timeout)
        except (asyncssh.Error, OSError, TimeoutError) as err:
            self._drop(conn, err, started)
            raise SourceUnreachable(f"{self.where}: {err or type(err).__name__}") from err
        self._answered()
        if result.exit_status == NOT_REGULAR_STATUS:
            raise NotRegularFileError(relpath, bytes(result.stderr or b"").decode("utf-8", "replace").strip())
        return bytes(result.stdout or b"")

    def _path(self, relpath: str) -> str:
        return f"{self.workdir}/{relpath}"

    async def stream(self, relpath: str, offset: int) -> AsyncIterator[bytes]:
        import asyncssh

        conn = await self._connection()
        try:
            process = await conn.create_process(
                self._command(OPEN_REGULAR_SCRIPT + _STREAM_SCRIPT, self.workdir, relpath, str(offset + 1)),
                encoding=None,
            )
        except (asyncssh.Error, OSError) as err:
            self._drop(conn, err, time.monotonic())
            raise SourceUnreachable(f"{self.where}: {err or type(err).__name__}") from err
        try:
            while True:
                try:
                    data = await process.stdout.read(1 << 16)
                except (asyncssh.Error, OSError) as err:
                    raise StreamBroken(str(err) or type(err).__name__) from err
                if not data:
                    break
                self._answered()
                yield data
            said = b""
            with contextlib.suppress(asyncssh.Error, OSError, TimeoutError):
                said = await asyncio.wait_for(process.stderr.read(1000), 5)
                await asyncio.wait_for(process.wait_closed(), 5)
            if process.exit_status == NOT_REGULAR_STATUS:
                raise NotRegularFileError(relpath, bytes(said).decode("utf-8", "replace").strip())
            raise StreamBroken(f"tail ended (exit status {process.exit_status})")
        finally:
            process.close()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.wait_closed(), 5)


def source_for(target: dict[str, Any], *, unreachable_timeout: float = 120.0) -> Source:
    """The source for a host's :meth:`~gpu_training.hosts.base.Host.follow_target`. Commands time
    out at a quarter of ``unreachable_timeout`` (at most 30 s), so a silent host is noticed in time."""
    kind = target.get("kind")
    if kind == "local":
        return LocalSource(str(target["workdir"]))
    if kind == "ssh":
        return SshSource(target, timeout=max(0.5, min(COMMAND_TIMEOUT_SECONDS, unreachable_timeout / 4)))
    raise ValueError(f"unknown follow target kind {kind!r}")


# --- the results DB, off the event loop ----------------------------------------------------------


@functools.lru_cache(maxsize=16)
def results_store(conn_id: str) -> ResultsStore:
    """One store (engine and pool) per results connection per process."""
    from gpu_training.hooks.results import ResultsDbHook

    return ResultsDbHook(conn_id).get_store()


@dataclasses.dataclass(frozen=True)
class Batch:
    consumed: int
    events: int
    errors: int
    conflict_offset: int | None = None
    project_end: bool = False
    non_finite_loss: str | None = None
    #: The job's metric rows when ``max_metric_rows`` stopped this batch (None: it did not).
    row_limit_at: int | None = None


def metric_rows_limit() -> int:
    """The deployment's ``[gpu_training] max_metric_rows_per_job`` (see :mod:`gpu_training.policy`)."""
    from gpu_training.policy import Policy

    return Policy.current().max_metric_rows_per_job


def ingest_batch(
    store: ResultsStore, job_uuid: str, data: bytes, offset: int, *, final: bool, max_rows: int | None = None
) -> Batch:
    """Parse the complete lines of ``data`` (read at ``offset``) and store them with the new offset.

    A line longer than :data:`BATCH_BYTES` is recorded as an ingestion error and skipped. Runs on
    a DB thread (parsing a large backlog would otherwise hold the event loop too). With
    ``max_rows`` the batch stops at the first line that would take the job past it.
    """
    events, errors, consumed = parse_chunk(data, offset, final=final)
    if consumed == 0:
        if len(data) < BATCH_BYTES:
            return Batch(0, 0, 0)
        consumed = len(data)  # part of one huge line: skip it (the rest ends at its newline)
        errors = [MalformedLine(offset, f"line longer than {BATCH_BYTES} bytes", "")]
    result = store.ingest(
        job_uuid,
        expected_offset=offset,
        new_offset=offset + consumed,
        events=events,
        errors=errors,
        max_rows=max_rows,
    )
    if result.conflict:
        return Batch(0, 0, 0, conflict_offset=result.offset)
    stored_to = result.offset
    return Batch(
        stored_to - offset,
        result.events,
        result.errors,
        project_end=any(ev.kind == ("PROJECT", "end") and ev.offset < stored_to for ev in events),
        non_finite_loss=result.non_finite_loss,
        row_limit_at=result.metric_rows if result.row_limit_reached else None,
    )


# --- the follower --------------------------------------------------------------------------------


class _Finished(Exception):
    def __init__(self, verdict: Verdict, exit_code: int | None = None) -> None:
        super().__init__(verdict.reason)
        self.verdict = verdict
        self.exit_code = exit_code


class JobFollower:
    """Follows one job until it ends; see the module docstring."""

    def __init__(
        self,
        spec: FollowSpec,
        source: Source,
        *,
        log: Any,
        store: ResultsStore | None = None,
        parse_status: Callable[[int, str, str], TrainerStatus] | None = None,
        peers: Sequence[Peer] = (),
    ) -> None:
        self.spec = spec
        self.source = source
        self.peers = list(peers)
        self.log = log
        self._store = store
        self._parse_status = parse_status or _parse_status_for(spec.runtime)
        self.offset = 0  # stored in the results DB up to here (job-wide offsets)
        self.base = 0  # the job-wide offset of this instance's global.json byte 0 (a recovery moves it)
        self.pending = bytearray()  # received after ``offset``, not stored yet
        self.events = self.errors = 0
        self.stream_failures = 0
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._skip_long_line = False
        self._warned_nan = False
        self.log_tail = LogTail()
        self._logs = [_TrainerLog(source, _LogGate(log, "node 0" if self.peers else "trainer"), self.log_tail)] + [
            _TrainerLog(peer.source, _LogGate(log, f"node {peer.rank}"), self.log_tail) for peer in self.peers
        ]
        self._tail_saved_at = 0.0
        self._pump_task: asyncio.Task[None] | None = None
        self._progress_task: asyncio.Task[None] | None = None
        self._progress_wanted = False
        self._warned: dict[str, float] = {}
        self.max_rows: int | None = spec.max_metric_rows
        #: Why global.json is never read (it is not a regular file), once the pump found it.
        self._refused: NotRegularFileError | None = None

    @property
    def received(self) -> int:
        return self.offset + len(self.pending)

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_DB_THREADS, functools.partial(fn, *args, **kwargs))

    async def _get_store(self) -> ResultsStore:
        if self._store is None:
            self._store = await self._db(results_store, self.spec.results_conn_id)
        return self._store

    async def run(self) -> FollowResult:
        store = await self._get_store()
        if self.max_rows is None:
            self.max_rows = metric_rows_limit()
        job = await self._db(store.job, self.spec.job_uuid)
        self.offset = job.ingest_offset
        self.base = job.ingest_base
        self.log.info(
            "following %s of job %s from byte %d (%s)",
            GLOBAL_JSON_PATH,
            self.spec.job_uuid,
            self.offset,
            getattr(self.source, "where", self.source.workdir),
        )
        self._start_pump()
        logs = [asyncio.create_task(t.follow(), name=f"trainer.log {i}") for i, t in enumerate(self._logs)]
        try:
            result = await self._main(store)
            await asyncio.gather(*(t.drain(task) for t, task in zip(self._logs, logs, strict=True)))
            await self._save_log_tail(store, force=True)
            return result
        finally:
            for task in logs:
                task.cancel()
            await asyncio.gather(*logs, return_exceptions=True)
            await self._stop_pump()
            for trainer_log in self._logs:
                trainer_log.gate.flush()
            await self._progress_sent()

    def _start_pump(self) -> None:
        self._pump_task = asyncio.create_task(self._pump(), name="global.json")

    async def _stop_pump(self) -> None:
        task, self._pump_task = self._pump_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._room.set()

    async def _main(self, store: ResultsStore) -> FollowResult:
        next_check = time.monotonic()
        while True:
            try:
                timeout = max(0.0, next_check - time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                self._wake.clear()
                await self._store_pending(store, final=False)
                if self._refused is not None:
                    raise self._refusal(self._refused)
                await self._save_log_tail(store)
                if time.monotonic() >= next_check:
                    await self._check(store)
                    next_check = time.monotonic() + self.spec.poll_interval
            except _Restart:
                await self._stop_pump()
                self._start_pump()
            except _Finished as done:
                return FollowResult(
                    done.verdict.kind,
                    done.verdict.succeeded,
                    done.verdict.reason,
                    self.offset,
                    self.events,
                    self.errors,
                    done.exit_code,
                )

    async def _save_log_tail(self, store: ResultsStore, *, force: bool = False) -> None:
        """The log's last lines onto the job row when they changed (every few seconds at most): the
        job page shows them live. A failed write is not a failed job: the next one catches up."""
        if not self.log_tail.changed or (not force and time.monotonic() - self._tail_saved_at < LOG_TAIL_WRITE_SECONDS):
            return
        self._tail_saved_at = time.monotonic()
        self.log_tail.changed = False
        try:
            await self._db(store.update_job, self.spec.job_uuid, log_tail=self.log_tail.text(), log_tail_at=utcnow())
        except Exception as err:
            self.log_tail.changed = True
            self._warn("log_tail", f"could not store the trainer log's last lines: {err}")

    # -- global.json ----------------------------------------------------------------------------

    async def _pump(self) -> None:
        """Feed ``pending`` from the stream; poll while it is broken; reconnect with backoff."""
        backoff = Backoff(first=self.spec.poll_interval)
        stream_again_at = 0.0
        while True:
            try:
                if time.monotonic() >= stream_again_at:
                    started = time.monotonic()
                    try:
                        async for data in self.source.stream(GLOBAL_JSON_PATH, self.received - self.base):
                            await self._feed(data)
                    except StreamBroken as err:
                        self.stream_failures += 1
                        if time.monotonic() - started > 60:
                            backoff.reset()
                        delay = backoff.next()
                        stream_again_at = time.monotonic() + delay
                        self.log.warning(
                            "the stream of global.json broke (%s): polling every %gs, streaming again in %.0fs",
                            err,
                            self.spec.poll_interval,
                            delay,
                        )
                data = await self.source.read(GLOBAL_JSON_PATH, self.received - self.base, BATCH_BYTES)
                if data:
                    await self._feed(data)
                else:
                    await asyncio.sleep(self.spec.poll_interval)
            except SourceUnreachable as err:
                self._warn("unreachable", f"host not answering: {err}")
                await asyncio.sleep(min(self.spec.poll_interval, 5.0))
            except NotRegularFileError as err:
                self._refused = err  # the job ends with it (what was received before is stored)
                self._wake.set()
                return

    def _refusal(self, err: NotRegularFileError) -> _Finished:
        """global.json is not a regular file: the job fails, said once in the task log."""
        reason = f"{err}: it is never read (the trainer must append to a regular file {GLOBAL_JSON_PATH})"
        self.log.error("%s", reason)
        return _Finished(Verdict("not_regular_file", False, reason))

    async def _feed(self, data: bytes) -> None:
        self.pending += data
        self._wake.set()
        if len(self.pending) >= BATCH_BYTES:
            self._room.clear()
            await self._room.wait()  # backpressure: SSH flow control holds the sender

    async def _store_pending(self, store: ResultsStore, *, final: bool) -> None:
        """Store every complete line received so far, a batch per transaction."""
        while self.pending:
            data = bytes(self.pending[:BATCH_BYTES])
            if self._skip_long_line:
                newline = data.find(b"\n")
                batch = Batch(len(data) if newline < 0 else newline + 1, 0, 0)
                result = await self._db(
                    store.ingest,
                    self.spec.job_uuid,
                    expected_offset=self.offset,
                    new_offset=self.offset + batch.consumed,
                    events=[],
                )
                if result.conflict:
                    batch = Batch(0, 0, 0, conflict_offset=result.offset)
                self._skip_long_line = newline < 0
            else:
                batch = await self._db(
                    ingest_batch, store, self.spec.job_uuid, data, self.offset, final=final, max_rows=self.max_rows
                )
                self._skip_long_line = batch.consumed == len(data) == BATCH_BYTES and not data.endswith(b"\n")
            if batch.conflict_offset is not None:
                self._resync(batch.conflict_offset)
                return
            if batch.consumed:
                del self.pending[: batch.consumed]
                self.offset += batch.consumed
                self.events += batch.events
                self.errors += batch.errors
                if batch.events:
                    self._progress_due(store)
                self._room.set()
                if batch.non_finite_loss:
                    self._non_finite(batch.non_finite_loss)
            if batch.row_limit_at is not None:  # also when its first line did not fit
                raise _Finished(
                    Verdict(
                        "max_metric_rows",
                        False,
                        f"{GLOBAL_JSON_PATH}: the job stored {batch.row_limit_at} metric rows, the limit is "
                        f"{self.max_rows} (max_metric_rows_per_job); nothing from byte {self.offset - self.base} "
                        "on was stored",
                    )
                )
            if batch.consumed == 0:
                break
            if batch.project_end:
                raise _Finished(Verdict("project_end", True, "PROJECT end"))
        self._room.set()

    def _progress_due(self, store: ResultsStore) -> None:
        """Progress notifications (``notify_every_epochs``) are checked in a thread, one check at a
        time (one asked for meanwhile runs next), so a slow mail server never holds the follower."""
        self._progress_wanted = True
        if self._progress_task is None or self._progress_task.done():
            self._progress_task = asyncio.create_task(self._notify_progress(store), name="notify progress")

    async def _notify_progress(self, store: ResultsStore) -> None:
        while self._progress_wanted:
            self._progress_wanted = False
            try:
                from gpu_training.notify import PROGRESS_TIMEOUT_SECONDS, notify_progress

                await asyncio.wait_for(
                    asyncio.to_thread(notify_progress, store, self.spec.job_uuid), PROGRESS_TIMEOUT_SECONDS
                )
            except Exception as err:  # notify_progress logs its own failures: a timeout, an import
                self.log.warning("progress notification of job %s: %r (training goes on)", self.spec.job_uuid, err)
                return

    async def _progress_sent(self) -> None:
        """Let a progress notification in flight finish (15 s at most) before following stops."""
        task, self._progress_task = self._progress_task, None
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), 15)
        except Exception:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _resync(self, offset: int) -> None:
        """Another follower stored this range first: continue from where it is."""
        self.log.warning("global.json was stored up to byte %d by another follower: continuing there", offset)
        self.offset = offset
        self.pending.clear()
        self._room.set()
        raise _Restart

    def _warn(self, key: str, message: str) -> None:
        """A warning at most every 30 s per kind (a host that is down is not news every poll)."""
        now = time.monotonic()
        if now - self._warned.get(key, -1e9) >= 30:
            self._warned[key] = now
            self.log.warning("%s", message)

    def _non_finite(self, description: str) -> None:
        if self.spec.stop_on_nan:
            raise _Finished(Verdict("non_finite_loss", False, f"non-finite loss: {description} (stop_on_nan)"))
        if not self._warned_nan:
            self._warned_nan = True
            self.log.warning("non-finite loss: %s (recorded; set stop_on_nan to stop such jobs)", description)

    # -- the periodic check ---------------------------------------------------------------------

    async def _status(self) -> TrainerStatus | None:
        if not self.spec.status_command:
            return None
        try:
            return self._parse_status(*await self.source.script(*self.spec.status_command))
        except (SourceUnreachable, HostError, TimeoutError, OSError) as err:
            self._warn("status", f"trainer status unknown: {err}")
            return None

    async def _check(self, store: ResultsStore) -> None:
        status = await self._status()
        if self.peers:
            await self._check_peers(store, status)
        if status is not None and not status.running:
            await self._drain(store)
        verdict = await self._judge(store, status)
        if verdict is not None and verdict.kind == "stall":
            # No new bytes *stored* is not no new bytes *written*: a follower that just started
            # (or restarted) may not have read what the trainer wrote before. Read to the end
            # first; the job stalled only if there was nothing.
            await self._catch_up(store)
            verdict = await self._judge(store, status)
        unreachable = self.source.unreachable_for() > self.spec.unreachable_timeout.total_seconds()
        if unreachable and (verdict is None or verdict.kind == "stall"):
            minutes = self.spec.unreachable_timeout.total_seconds() / 60
            verdict = Verdict(
                "unreachable", False, f"host unreachable for more than {minutes:g} min: {self.source.last_error}"
            )
        if verdict is None:
            return
        exit_code = status.exit_code if status is not None else None
        if verdict.kind == "trainer_exit":
            verdict = dataclasses.replace(verdict, reason=with_log_tail(verdict.reason, await _log_tail(self.source)))
            if exit_code is not None:
                await self._db(store.update_job, self.spec.job_uuid, trainer_exit_code=exit_code)
        raise _Finished(verdict, exit_code)

    async def _judge(self, store: ResultsStore, status: TrainerStatus | None) -> Verdict | None:
        job = await self._db(store.job, self.spec.job_uuid)
        return judge(
            job,
            status,
            now=utcnow(),
            stall_timeout=self.spec.stall_timeout,
            max_runtime=self.spec.max_runtime,
            cost_deadline=self.spec.cost_deadline,
            max_cost_usd=self.spec.max_cost_usd,
        )

    async def _catch_up(self, store: ResultsStore) -> None:
        """Read and store whatever the file holds past what was received, then stream again."""
        await self._stop_pump()  # only this reads meanwhile: no byte arrives twice
        try:
            while data := await self.source.read(GLOBAL_JSON_PATH, self.received - self.base, BATCH_BYTES):
                self.pending += data
            await self._store_pending(store, final=False)
        except (SourceUnreachable, HostError, TimeoutError, OSError) as err:
            self._warn("catch-up", f"could not read global.json to its end: {err}")
        except NotRegularFileError as err:
            await self._store_pending(store, final=False)
            raise self._refusal(err) from None
        finally:
            self._start_pump()

    async def _drain(self, store: ResultsStore) -> None:
        """The trainer exited: read to the end of the file (an unterminated last line counts)."""
        await self._stop_pump()  # from here on only this reads, so no byte arrives twice
        while True:
            try:
                data = await self.source.read(GLOBAL_JSON_PATH, self.received - self.base, BATCH_BYTES)
            except NotRegularFileError as err:
                await self._store_pending(store, final=False)
                raise self._refusal(err) from None
            if not data:
                break
            self.pending += data
        await self._store_pending(store, final=True)

    # -- the other nodes of a multi-node job -----------------------------------------------------

    async def _check_peers(self, store: ResultsStore, head: TrainerStatus | None) -> None:
        """Fail the job when a node's trainer died (or its host stopped answering), naming that
        node and its reason. When several ended, the node that ended first is the cause (the
        others lost their peer); one killed with its wrapper (no exit code) counts as first."""
        statuses = await asyncio.gather(*(self._peer_status(peer) for peer in self.peers))
        failed: list[tuple[float, Peer | None, TrainerStatus | None, str]] = []
        for peer, status in zip(self.peers, statuses, strict=True):
            if status is None:
                if peer.source.unreachable_for() > self.spec.unreachable_timeout.total_seconds():
                    minutes = self.spec.unreachable_timeout.total_seconds() / 60
                    reason = f"host unreachable for more than {minutes:g} min: {peer.source.last_error}"
                    failed.append((0.0, peer, None, reason))
                continue
            if not status.started:
                failed.append((0.0, peer, status, "the trainer is not running: it was never started on the node"))
            elif not status.running and status.exit_code != 0:
                failed.append((await _ended_at(peer.source), peer, status, f"trainer {exit_description(status)}"))
        if not failed:
            return
        if head is not None and head.started and not head.running and head.exit_code != 0:
            failed.append((await _ended_at(self.source), None, head, f"trainer {exit_description(head)}"))
        _, culprit, ended, reason = min(failed, key=lambda f: (f[0], f[1] is None))
        if culprit is None:
            return  # node 0 failed first: judged as its own trainer exit
        tail = await _log_tail(culprit.source)
        exit_code = ended.exit_code if ended is not None else None
        await self._store_pending(store, final=False)
        raise _Finished(
            Verdict("node_failed", False, with_log_tail(f"node {culprit.rank} ({culprit.name}): {reason}", tail)),
            exit_code,
        )

    async def _peer_status(self, peer: Peer) -> TrainerStatus | None:
        try:
            return self._parse_status(*await peer.source.script(*peer.status_command))
        except (SourceUnreachable, HostError, TimeoutError, OSError) as err:
            self._warn(f"status {peer.rank}", f"node {peer.rank}: trainer status unknown: {err}")
            return None


#: When the trainer's wrapper recorded its exit (seconds since the epoch; 0 when it never did).
_ENDED_AT = 'date -r "$1/run/exit_code" +%s.%N 2>/dev/null || echo 0'


async def _ended_at(source: Source) -> float:
    try:
        _, out, _ = await source.script(_ENDED_AT, source.workdir)
        return float(out.strip() or 0)
    except (SourceUnreachable, HostError, TimeoutError, OSError, ValueError):
        return 0.0


async def _log_tail(source: Source, lines: int = 20) -> str:
    """The log's last lines for a failure reason (none when it is not a regular file)."""
    try:
        _, out, _ = await source.script(LOG_TAIL_SCRIPT, source.workdir, LOG_PATH, str(lines))
    except (SourceUnreachable, TimeoutError, OSError):
        return ""
    return out.rstrip("\n")


class LogTail:
    """The last lines of the trainer log (every node's), at most ``max_bytes`` and ``max_lines``:
    what the job page shows while the job trains. Lines longer than :data:`LOG_LINE_CHARS` are cut,
    marked as cut."""

    def __init__(self, max_bytes: int = LOG_TAIL_BYTES, max_lines: int = LOG_TAIL_LINES) -> None:
        self.max_bytes = max_bytes
        self.max_lines = max_lines
        self.lines: deque[str] = deque()
        self.size = 0
        self.changed = False

    def add(self, text: str, cut: int = 0) -> None:
        """One line; ``cut``: bytes of it that never arrived here (see :class:`LineCutter`)."""
        text = shortened(text, cut)
        self.lines.append(text)
        self.size += len(text) + 1
        while (self.size > self.max_bytes or len(self.lines) > self.max_lines) and len(self.lines) > 1:
            self.size -= len(self.lines.popleft()) + 1
        self.changed = True

    def text(self) -> str:
        return without_nul("\n".join(self.lines))


def shortened(text: str, cut: int = 0) -> str:
    """A log line as shown: at most :data:`LOG_LINE_CHARS` characters, then how much more it had
    (``... [N more characters]``; ``... [N more bytes]`` when :class:`LineCutter` already cut it)."""
    if len(text) <= LOG_LINE_CHARS and not cut:
        return text
    if not cut:
        return text[:LOG_LINE_CHARS] + f"... [{len(text) - LOG_LINE_CHARS} more characters]"
    rest = len(text[LOG_LINE_CHARS:].encode("utf-8", "replace")) + cut
    return text[:LOG_LINE_CHARS] + f"... [{rest} more bytes]"


class LineCutter:
    """Splits a byte stream into lines of at most ``max_bytes``: a longer line keeps its start and
    only counts the rest. Linear in what it is fed: each byte is searched once and copied at most
    once, so a log without a newline costs no more per MiB than any other."""

    def __init__(self, max_bytes: int = LOG_LINE_BYTES, *, in_line: bool = False) -> None:
        self.max_bytes = max_bytes
        self.partial = bytearray()  # the start of the unterminated last line
        self.cut = 0  # bytes of that line beyond ``max_bytes``, dropped
        #: Fed from the middle of a line (a replay of the log's end): drop it, start at the next.
        self.in_line = in_line

    def lines(self, data: bytes, start: int = 0, stop: int | None = None) -> Iterator[tuple[bytes, int, int]]:
        """``(line, bytes cut from it, end)`` for each line ``data[start:stop]`` completes, ``end``
        being where in ``data`` that line's newline ends; what follows the last newline is kept."""
        stop = len(data) if stop is None else stop
        if self.in_line:
            newline = data.find(b"\n", start, stop)
            if newline < 0:
                return
            self.in_line = False
            start = newline + 1
        while (newline := data.find(b"\n", start, stop)) >= 0:
            if self.partial or self.cut:
                self._keep(data, start, newline)
                line, cut = bytes(self.partial), self.cut
                self.partial.clear()
                self.cut = 0
            elif newline - start > self.max_bytes:
                line, cut = data[start : start + self.max_bytes], newline - start - self.max_bytes
            else:
                line, cut = data[start:newline], 0
            start = newline + 1
            yield line, cut, start
        self._keep(data, start, stop)

    def _keep(self, data: bytes, start: int, end: int) -> None:
        take = max(0, min(self.max_bytes - len(self.partial), end - start))
        if take:
            self.partial += memoryview(data)[start : start + take]
        self.cut += end - start - take

    def rest(self) -> tuple[bytes, int] | None:
        """The unterminated last line and what was cut from it, once the stream ended."""
        if not self.partial and not self.cut:
            return None
        line, cut = bytes(self.partial), self.cut
        self.partial.clear()
        self.cut = 0
        return line, cut


class _TrainerLog:
    """One node's trainer log shown in the task log and kept in the job's :class:`LogTail`
    (display only: after a restart the last :data:`LOG_REPLAY_BYTES` are shown again).

    Lines are handled in slices that hold the event loop :data:`LOG_SLICE_SECONDS` at most, and
    each is cut at :data:`LOG_LINE_BYTES`: every job's follower shares the triggerer's loop."""

    def __init__(self, source: Source, gate: _LogGate, tail: LogTail | None = None) -> None:
        self.source = source
        self.gate = gate
        self.tail = tail
        # Several nodes share one tail: their lines are told apart as in the task log.
        self.prefix = "" if gate.label == "trainer" else f"[{gate.label}] "
        self.offset: int | None = None  # shown up to here
        self.cutter = LineCutter()
        self.refused: NotRegularFileError | None = None
        self._slice_started = time.perf_counter()

    async def follow(self) -> None:
        backoff = Backoff()
        while True:
            try:
                if self.offset is None:
                    self.offset = max(0, await self.source.size(LOG_PATH) - LOG_REPLAY_BYTES)
                    self.cutter = LineCutter(in_line=self.offset > 0)
                async for data in self.source.stream(LOG_PATH, self.offset):
                    await self.feed(data)
                    backoff.reset()
            except (StreamBroken, SourceUnreachable):
                await asyncio.sleep(backoff.next())
            except NotRegularFileError as err:
                self._refuse(err)
                await asyncio.sleep(BACKOFF_MAX_SECONDS)  # looked at again: it may become one

    def _refuse(self, err: NotRegularFileError) -> None:
        """Say once that the log is not shown, and why (it is not uploaded either)."""
        if self.refused is None:
            self.gate.log.warning(
                "[%s] %s: it is not shown (a trainer log must be a regular file)", self.gate.label, err
            )
        self.refused = err

    async def feed(self, data: bytes) -> None:
        """Show the lines ``data`` completes, yielding to the loop between slices.

        Of a read with many lines only those the gate can show now and the last ones the tail
        keeps (:data:`LOG_TAIL_LINES`, :data:`LOG_TAIL_BYTES`) are handled one by one; the lines
        between are counted as not shown, in C: a flood of short lines costs little more than a read."""
        assert self.offset is not None
        # A stream with data waiting returns chunk after chunk without the loop running anything
        # else in between (a local read, an SSH channel's buffer): the slice spans the chunks.
        await self._pause_if_due()
        base, start = self.offset, 0
        showable = self.gate.showable()
        if data.count(b"\n") > showable + LOG_TAIL_LINES + 1:
            head_end = _after_newlines(data, showable + 1)
            skip_to = _tail_window(data, LOG_TAIL_LINES, LOG_TAIL_BYTES)
            if 0 < head_end < skip_to:
                await self._feed(data, base, 0, head_end)
                self.gate.drop(data.count(b"\n", head_end, skip_to), skip_to - head_end)
                start = skip_to
        await self._feed(data, base, start, len(data))
        self.offset = base + len(data)

    async def _feed(self, data: bytes, base: int, start: int, stop: int) -> None:
        for count, (line, cut, end) in enumerate(self.cutter.lines(data, start, stop), 1):
            self._line(line.decode("utf-8", "replace"), cut)
            self.offset = base + end
            if count % 64 == 0:
                await self._pause_if_due()

    async def _pause_if_due(self) -> None:
        """Let the loop run other tasks once this log held it :data:`LOG_SLICE_SECONDS`."""
        if time.perf_counter() - self._slice_started > LOG_SLICE_SECONDS:
            await asyncio.sleep(0)
            self._slice_started = time.perf_counter()

    def _line(self, text: str, cut: int = 0) -> None:
        self.gate.line(text, cut)
        if self.tail is not None:
            self.tail.add(self.prefix + text, cut)

    async def drain(self, task: asyncio.Task[None]) -> None:
        """The job ended: the log's last lines, which the stream may not have brought yet (a
        loaded host or triggerer), are read once more before following stops (the last
        :data:`LOG_REPLAY_BYTES`, when the stream was further behind)."""
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        try:
            await self._read_the_rest()
        except NotRegularFileError as err:  # said once, though the stream never got to it
            self._refuse(err)
        if (rest := self.cutter.rest()) is not None:
            self._line(rest[0].decode("utf-8", "replace"), rest[1])

    async def _read_the_rest(self) -> None:
        with contextlib.suppress(SourceUnreachable, StreamBroken, HostError, TimeoutError, OSError):
            size = await asyncio.wait_for(self.source.size(LOG_PATH), 10)
            if self.offset is None:  # the stream never started: nothing shown, nothing to add
                return
            if size - self.offset > LOG_REPLAY_BYTES:
                skipped = size - LOG_REPLAY_BYTES - self.offset
                self.gate.log.info("[%s] ... %d bytes of the log not shown", self.gate.label, skipped)
                self.cutter = LineCutter(in_line=True)
                self.offset = size - LOG_REPLAY_BYTES
            await self.feed(await asyncio.wait_for(self.source.read(LOG_PATH, self.offset, LOG_REPLAY_BYTES), 10))


def _tail_window(data: bytes, lines: int, size: int) -> int:
    """Where the last ``lines`` complete lines of ``data`` start, or its last ``size`` bytes' first
    whole line if later (0: from the start)."""
    newline = data.rfind(b"\n")
    for _ in range(lines):
        if newline <= 0:
            return 0
        newline = data.rfind(b"\n", 0, newline)
    return max(newline + 1, data.rfind(b"\n", 0, max(0, len(data) - size)) + 1)


def _after_newlines(data: bytes, count: int) -> int:
    """Where the ``count``-th newline of ``data`` ends (0 for none; -1 when it has fewer)."""
    end = 0
    for _ in range(count):
        newline = data.find(b"\n", end)
        if newline < 0:
            return -1
        end = newline + 1
    return end


class _Restart(Exception):
    pass


class _LogGate:
    """Trainer lines into the task log: a burst, then a steady rate; what is dropped is counted."""

    def __init__(self, log: Any, label: str = "trainer") -> None:
        self.log = log
        self.label = label
        self.tokens = float(LOG_BURST_LINES)
        self.stamp = time.monotonic()
        self.dropped = 0
        self.dropped_bytes = 0
        self.reported = time.monotonic()

    def showable(self) -> int:
        """How many lines it would show now."""
        now = time.monotonic()
        return int(min(float(LOG_BURST_LINES), self.tokens + (now - self.stamp) * LOG_LINES_PER_SECOND))

    def drop(self, lines: int, size: int) -> None:
        """Count lines that are not shown (nor looked at one by one)."""
        self.dropped += lines
        self.dropped_bytes += size

    def line(self, text: str, cut: int = 0) -> None:
        now = time.monotonic()
        self.tokens = min(float(LOG_BURST_LINES), self.tokens + (now - self.stamp) * LOG_LINES_PER_SECOND)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            if self.dropped and now - self.reported > 10:
                self.flush()
            self.log.info("[%s] %s", self.label, shortened(text, cut))
        else:
            self.dropped += 1
            self.dropped_bytes += len(text) + cut + 1

    def flush(self) -> None:
        if self.dropped:
            self.log.info(
                "[%s] ... %d lines (%d bytes) not shown: the trainer writes faster than %g lines/s; "
                "logs/trainer.log has them all and is uploaded with the outputs",
                self.label,
                self.dropped,
                self.dropped_bytes,
                LOG_LINES_PER_SECOND,
            )
            self.dropped = self.dropped_bytes = 0
            self.reported = time.monotonic()


def _parse_status_for(runtime: str) -> Callable[[int, str, str], TrainerStatus]:
    from gpu_training.runtimes import ContainerTrainer, ProcessTrainer

    return ContainerTrainer.parse_status if runtime == "docker" else ProcessTrainer.parse_status
