"""Where a followed job's files are, seen from the triggerer: the host's work directory.

:class:`LocalSource` reads files on this machine by offset (one ticker per event loop wakes the
readers whose file grew); :class:`SshSource` holds one asyncssh connection per host, with a
``tail -c +OFFSET -F`` channel per followed file, re-opened with backoff. Neither ever follows a
symbolic link: a followed name that is not a regular file raises ``NotRegularFileError``.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import random
import shlex
import stat
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from gpu_training.errors import HostError, NotRegularFileError, SourceUnreachable, StreamBroken
from gpu_training.hosts.base import LOG_PATH, LOG_TAIL_SCRIPT, NOT_REGULAR_STATUS, OPEN_REGULAR_SCRIPT
from gpu_training.hosts.local import open_regular

#: The most bytes one read of a local file brings (the stream's chunk).
READ_BYTES = 4 << 20
#: How often local files are checked for new bytes (one ``stat`` per followed file, one wakeup).
LOCAL_TICK_SECONDS = 0.1
CONNECT_TIMEOUT_SECONDS = 20.0
COMMAND_TIMEOUT_SECONDS = 30.0
BACKOFF_MAX_SECONDS = 30.0


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


class LocalWatch:
    """One ticker for every local file followed on an event loop: each tick ``stat``s the files
    waited on and wakes only the followers whose file grew (50 jobs cost one wakeup per tick)."""

    #: The watch of each event loop (gone with its loop); :meth:`reset` forgets them all.
    _of_loop: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LocalWatch]] = weakref.WeakKeyDictionary()

    def __init__(self) -> None:
        self._waiting: list[tuple[str, int, asyncio.Future[None]]] = []
        self._ticker: asyncio.Task[None] | None = None

    @classmethod
    def of_running_loop(cls) -> LocalWatch:
        """The watch shared by every local source on the running event loop."""
        loop = asyncio.get_running_loop()
        watch = cls._of_loop.get(loop)
        if watch is None:
            watch = cls._of_loop[loop] = cls()
        return watch

    @classmethod
    def reset(cls) -> None:
        """Forget every loop's watch (tests; a watch's waiters end with their loop)."""
        cls._of_loop.clear()

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
            data = await self.read(relpath, offset, READ_BYTES) if not 0 <= size <= offset else b""
            if data:
                offset += len(data)
                yield data
            else:
                await LocalWatch.of_running_loop().grown(path, offset)

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
#: ``-s 0.1``: GNU tail follows /dev/fd/3 by polling, once a second unless told (0.5-1 s of latency
#: on every SSH-followed event; 0.1 s: ~30 ms, bench/followers.py).
_STREAM_SCRIPT = r"""
while :; do
  open_regular "$1" "$2"
  status=$?
  [ "$status" = 85 ] || break
  sleep 0.5
done
[ "$status" = 0 ] || exit "$status"
tail -s 0.1 -c "+$3" -f /dev/fd/3 2>/dev/null &
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


#: When the trainer's wrapper recorded its exit (seconds since the epoch; 0 when it never did).
_ENDED_AT = 'date -r "$1/run/exit_code" +%s.%N 2>/dev/null || echo 0'


async def trainer_ended_at(source: Source) -> float:
    """When the trainer's wrapper recorded its exit (seconds since the epoch; 0: never, or unknown)."""
    try:
        _, out, _ = await source.script(_ENDED_AT, source.workdir)
        return float(out.strip() or 0)
    except (SourceUnreachable, HostError, TimeoutError, OSError, ValueError):
        return 0.0


async def last_log_lines(source: Source, lines: int = 20) -> str:
    """The log's last lines for a failure reason (none when it is not a regular file)."""
    try:
        _, out, _ = await source.script(LOG_TAIL_SCRIPT, source.workdir, LOG_PATH, str(lines))
    except (SourceUnreachable, TimeoutError, OSError):
        return ""
    return out.rstrip("\n")


class ThrottledWarnings:
    """Warnings at most every :attr:`every` seconds per kind: a host that is down is not news
    at every poll."""

    def __init__(self, log: Any, every: float = 30.0) -> None:
        self.log = log
        self.every = every
        self._said: dict[str, float] = {}

    def warn(self, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self._said.get(key, -1e9) >= self.every:
            self._said[key] = now
            self.log.warning("%s", message)
