"""A hostile trainer is contained by the follower (issue 21, item 3): what it writes cannot hold the
triggerer's event loop, make it read anything but regular files, or wedge ingestion.

Real files, a real sshd (``sshd_server``), a real results DB. The trainer is the test itself,
writing and replacing files in the work directory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from gpu_training import follow
from gpu_training.errors import NotRegularFileError
from gpu_training.follow import (
    LOG_LINE_BYTES,
    FollowResult,
    JobFollower,
    LineCutter,
    LocalSource,
    LogGate,
    LogTail,
    Source,
    SshSource,
    TrainerLog,
    source_for,
)
from gpu_training.hosts.base import LOG_PATH
from gpu_training.hosts.local import LocalHost
from gpu_training.progress import GLOBAL_JSON_PATH
from gpu_training.results.models import EpochTrain
from gpu_training.results.store import ResultsStore

from .conftest import event_line
from .test_follow import Trainer, follower, fresh_follow_state, spec  # noqa: F401 - fresh_follow_state: autouse here too

MiB = 1 << 20


@pytest.fixture
def host(tmp_path: Path) -> LocalHost:
    h = LocalHost(tmp_path / "instance")
    h.prepare()
    return h


@pytest.fixture
def trainer(host: LocalHost) -> Iterator[Trainer]:
    t = Trainer(host)
    yield t
    t.stop()


def epochs(store: ResultsStore) -> list[int]:
    with store.session() as s:
        return sorted(s.scalars(select(EpochTrain.epoch)))


# --- log lines: bounded and linear ------------------------------------------------------------------


def test_a_newline_free_stream_is_cut_once_and_costs_linear_time() -> None:
    """32 MiB without a newline in 64 KiB chunks (as SSH brings them): each byte is looked at once.
    The old ``(partial + data).split()`` copied the whole line again per chunk: ~25 s here."""
    cutter = LineCutter()
    chunk = b"x" * (64 * 1024)
    started = time.perf_counter()
    for _ in range(32 * MiB // len(chunk)):
        assert list(cutter.lines(chunk)) == []
    [(line, cut, end)] = list(cutter.lines(b"tail\n"))
    took = time.perf_counter() - started
    assert took < 2.0, f"{took:.2f} s for 32 MiB"
    assert len(line) == LOG_LINE_BYTES and cut == 32 * MiB + 4 - LOG_LINE_BYTES and end == 5
    assert len(cutter.partial) == 0 and cutter.rest() is None


def test_lines_are_split_and_cut_across_chunks() -> None:
    cutter = LineCutter(max_bytes=8)
    got = [
        (line, cut)
        for data in (b"ab\ncd", b"efghijkl", b"m\n\nshort\n0123456789\nre")
        for line, cut, _ in cutter.lines(data)
    ]
    assert got == [(b"ab", 0), (b"cdefghij", 3), (b"", 0), (b"short", 0), (b"01234567", 2)]
    assert cutter.rest() == (b"re", 0)


class _Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, fmt: str, *args: Any) -> None:
        self.lines.append(fmt % args)

    warning = error = info


def trainer_log(source: Source | None = None) -> tuple[TrainerLog, _Log, LogTail]:
    log, tail = _Log(), LogTail()
    shown = TrainerLog(source or LocalSource("/nonexistent"), LogGate(log), tail)
    shown.offset = 0
    return shown, log, tail


def test_a_line_past_the_bound_is_shown_marked_with_what_was_cut() -> None:
    shown, log, tail = trainer_log()

    async def scenario() -> None:
        for _ in range(40):  # 2.5 MiB in one line, then a short one
            await shown.feed(b"y" * 65536)
        await shown.feed(b"\nafter\n")

    asyncio.run(scenario())
    long_line = f"[trainer] {'y' * follow.LOG_LINE_CHARS}... [{40 * 65536 - follow.LOG_LINE_CHARS} more bytes]"
    assert log.lines == [long_line, "[trainer] after"]
    assert tail.text().splitlines() == [long_line.removeprefix("[trainer] "), "after"]
    assert shown.offset == 40 * 65536 + 7


async def longest_block_while(work: Callable[[], Awaitable[None]]) -> float:
    """The longest the event loop was held while ``work`` ran: a probe sleeping 1 ms at a time
    measures the CPU time the loop's thread spent between its turns (a busy test machine that
    takes the CPU away does not count: that is not the loop being held)."""
    longest = 0.0
    done = False

    async def probe() -> None:
        nonlocal longest
        while not done:
            before = time.thread_time()
            await asyncio.sleep(0.001)
            longest = max(longest, time.thread_time() - before)

    task = asyncio.create_task(probe())
    await asyncio.sleep(0.01)
    try:
        await work()
    finally:
        done = True
        await task
    return longest


def test_a_flood_of_short_lines_is_handled_in_slices_that_let_other_jobs_run() -> None:
    """4 MiB of 2-byte lines in one read (a local read brings up to 4 MiB): some 2 million lines,
    over a second of work, never holding the loop for long."""
    shown, log, _ = trainer_log()
    longest = asyncio.run(longest_block_while(lambda: shown.feed(b"z\n" * (2 * MiB))))
    assert longest < 0.1, f"the loop was held {longest * 1000:.0f} ms"
    assert shown.gate.dropped + len(log.lines) == 2 * MiB


# --- only regular files: the local source -----------------------------------------------------------


def replace_with_symlink(path: str, target: str) -> None:
    tmp = path + ".link"
    os.symlink(target, tmp)
    os.replace(tmp, path)


def test_local_source_refuses_symlinks_fifos_and_symlinked_folders(host: LocalHost, tmp_path: Path) -> None:
    source = LocalSource(host.workdir)
    outside = tmp_path / "outside.txt"
    outside.write_text("secret\n")
    gj = host.path(GLOBAL_JSON_PATH)

    async def read() -> bytes:
        return await source.read(GLOBAL_JSON_PATH, 0, 1 << 20)

    assert asyncio.run(read()) == b""  # no file yet: fine
    for target, what in (
        ("/dev/zero", "a symbolic link to /dev/zero"),
        (str(outside), f"a symbolic link to {outside}"),
    ):
        replace_with_symlink(gj, target)
        with pytest.raises(NotRegularFileError, match=r"outputs/global\.json is not a regular file") as refused:
            asyncio.run(read())
        assert refused.value.what == what
        with pytest.raises(NotRegularFileError):
            asyncio.run(source.size(GLOBAL_JSON_PATH))
    os.unlink(gj)
    os.mkfifo(gj)  # opening a FIFO to read would block until a writer comes: it is never opened
    with pytest.raises(NotRegularFileError, match="a FIFO"):
        asyncio.run(asyncio.wait_for(read(), 2))
    os.unlink(gj)
    real = Path(host.path("elsewhere"))
    real.mkdir()
    (real / "global.json").write_text("{}\n")
    os.rename(host.path("outputs"), host.path("outputs.old"))
    os.symlink(real, host.path("outputs"))
    with pytest.raises(NotRegularFileError, match="outputs is a symbolic link"):
        asyncio.run(read())


def test_a_symlink_swapped_in_later_is_not_followed(host: LocalHost, trainer: Trainer, tmp_path: Path) -> None:
    source = LocalSource(host.workdir)
    trainer.write(b"first\n")

    async def scenario() -> list[bytes]:
        got: list[bytes] = []
        with pytest.raises(NotRegularFileError, match="a symbolic link to /dev/zero"):
            async for data in source.stream(GLOBAL_JSON_PATH, 0):
                got.append(data)
                replace_with_symlink(host.path(GLOBAL_JSON_PATH), "/dev/zero")
        return got

    assert asyncio.run(asyncio.wait_for(scenario(), 5)) == [b"first\n"]


# --- only regular files: over SSH -------------------------------------------------------------------


@pytest.fixture
def ssh_source(sshd_server: Any, host: LocalHost, monkeypatch: pytest.MonkeyPatch) -> SshSource:
    monkeypatch.setenv("AIRFLOW_CONN_CONTAIN_SSH", sshd_server.connection())
    target = {
        "kind": "ssh",
        "workdir": host.workdir,
        "ssh_conn_id": "contain_ssh",
        "host": "127.0.0.1",
        "port": sshd_server.port,
        "username": "root",
    }
    source = source_for(target)
    assert isinstance(source, SshSource)
    return source


async def closing(source: Source, coro: Awaitable[Any]) -> Any:
    try:
        return await coro
    finally:
        await source.close()


def test_ssh_source_refuses_symlinks_fifos_and_symlinked_folders(
    ssh_source: SshSource, host: LocalHost, tmp_path: Path
) -> None:
    gj = host.path(GLOBAL_JSON_PATH)
    outside = tmp_path / "outside.txt"
    outside.write_text("secret\n")

    async def scenario() -> list[str]:
        refusals = []
        assert await ssh_source.read(GLOBAL_JSON_PATH, 0, 100) == b""
        for make in (
            lambda: replace_with_symlink(gj, "/dev/zero"),
            lambda: replace_with_symlink(gj, str(outside)),
            lambda: (os.unlink(gj), os.mkfifo(gj)),
        ):
            make()
            for attempt in (
                ssh_source.read(GLOBAL_JSON_PATH, 0, 100),
                ssh_source.size(GLOBAL_JSON_PATH),
                anext(ssh_source.stream(GLOBAL_JSON_PATH, 0)),
            ):
                with pytest.raises(NotRegularFileError) as refused:
                    await asyncio.wait_for(attempt, 10)
                refusals.append(refused.value.what)
        os.unlink(gj)
        os.rename(host.path("outputs"), host.path("outputs.old"))
        os.symlink(tmp_path, host.path("outputs"))
        (tmp_path / "global.json").write_text("{}\n")
        with pytest.raises(NotRegularFileError, match="reached through a symbolic link"):
            await ssh_source.read(GLOBAL_JSON_PATH, 0, 100)
        return refusals

    refusals = asyncio.run(closing(ssh_source, scenario()))
    assert (
        refusals
        == [f"a symbolic link to {target}" for target in ("/dev/zero", outside) for _ in range(3)] + ["a fifo"] * 3
    )


def test_ssh_stream_waits_for_the_file_then_refuses_a_symlink_swapped_in(
    ssh_source: SshSource, host: LocalHost, trainer: Trainer
) -> None:
    async def scenario() -> list[bytes]:
        got: list[bytes] = []

        async def write_later() -> None:
            await asyncio.sleep(0.7)  # the stream waits for the file, as tail -F does
            trainer.write(b"first\n")

        writer = asyncio.create_task(write_later())
        with pytest.raises(NotRegularFileError, match="a symbolic link to /dev/zero"):
            async for data in ssh_source.stream(GLOBAL_JSON_PATH, 0):
                got.append(data)
                replace_with_symlink(host.path(GLOBAL_JSON_PATH), "/dev/zero")
        await writer
        return got

    started = time.monotonic()
    assert asyncio.run(asyncio.wait_for(closing(ssh_source, scenario()), 20)) == [b"first\n"]
    assert time.monotonic() - started < 10


def test_a_long_line_streamed_over_ssh_is_cut_once_it_ends(ssh_source: SshSource, host: LocalHost) -> None:
    log_path = host.path(LOG_PATH)
    Path(log_path).write_bytes(b"starting\n")
    shown, log, _ = trainer_log(ssh_source)
    shown.offset = None

    async def scenario() -> float:
        task = asyncio.create_task(shown.follow())
        while shown.offset != len(b"starting\n"):
            await asyncio.sleep(0.05)

        async def write_and_wait() -> None:
            with open(log_path, "ab") as fh:
                for _ in range(32):
                    fh.write(b"x" * MiB)
                    fh.flush()
                    await asyncio.sleep(0.01)
                fh.write(b"\nafter\n")
            while shown.offset != os.path.getsize(log_path):
                await asyncio.sleep(0.05)

        longest = await longest_block_while(lambda: asyncio.wait_for(write_and_wait(), 60))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return longest

    longest = asyncio.run(closing(ssh_source, scenario()))
    assert log.lines == [
        "[trainer] starting",
        f"[trainer] {'x' * follow.LOG_LINE_CHARS}... [{32 * MiB - follow.LOG_LINE_CHARS} more bytes]",
        "[trainer] after",
    ]
    assert longest < 0.1, f"the loop was held {longest * 1000:.0f} ms"


# --- the follower: global.json refused, the log refused, the row limit --------------------------------


@pytest.mark.parametrize("target", ["/dev/zero", "outside"])
def test_a_symlinked_global_json_fails_the_job_saying_so(
    store: ResultsStore, job_uuid: str, host: LocalHost, trainer: Trainer, tmp_path: Path, target: str
) -> None:
    outside = tmp_path / "outside.json"
    outside.write_bytes(event_line("PROJECT", "end"))
    replace_with_symlink(host.path(GLOBAL_JSON_PATH), str(outside) if target == "outside" else target)
    result = asyncio.run(asyncio.wait_for(follower(store, job_uuid, host).run(), 20))
    assert (result.kind, result.succeeded) == ("not_regular_file", False)
    assert "outputs/global.json is not a regular file (a symbolic link to" in result.reason
    assert not store.job(job_uuid).project_ended  # the outside file's PROJECT end was never read


def test_a_global_json_replaced_by_a_symlink_mid_job_fails_it_after_storing_what_came_before(
    store: ResultsStore, job_uuid: str, host: LocalHost, trainer: Trainer
) -> None:
    async def scenario() -> FollowResult:
        task = asyncio.create_task(follower(store, job_uuid, host).run())
        trainer.epoch(1)
        deadline = time.monotonic() + 10
        while epochs(store) != [1] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        replace_with_symlink(host.path(GLOBAL_JSON_PATH), "/dev/zero")
        return await asyncio.wait_for(task, 10)

    result = asyncio.run(scenario())
    assert result.kind == "not_regular_file" and epochs(store) == [1]


def test_a_symlinked_log_is_reported_once_and_the_job_goes_on(
    store: ResultsStore, job_uuid: str, host: LocalHost, trainer: Trainer, caplog: pytest.LogCaptureFixture
) -> None:
    replace_with_symlink(host.path(LOG_PATH), "/dev/zero")

    async def scenario() -> FollowResult:
        task = asyncio.create_task(follower(store, job_uuid, host).run())
        for n in range(1, 4):
            trainer.epoch(n)
            await asyncio.sleep(0.3)
        trainer.write(event_line("PROJECT", "end"))
        return await asyncio.wait_for(task, 10)

    with caplog.at_level(logging.INFO, logger="test.follow"):
        result = asyncio.run(scenario())
    assert result.kind == "project_end" and epochs(store) == [1, 2, 3]
    refusals = [r.getMessage() for r in caplog.records if "is not a regular file" in r.getMessage()]
    assert refusals == [
        "[trainer] logs/trainer.log is not a regular file (a symbolic link to /dev/zero): it is not shown "
        "(a trainer log must be a regular file)"
    ]


def test_past_the_row_limit_the_job_fails_and_nothing_more_is_stored(
    store: ResultsStore, job_uuid: str, host: LocalHost, trainer: Trainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW__GPU_TRAINING__MAX_METRIC_ROWS_PER_JOB", "50")
    trainer.write(b"".join(event_line("TRAINING", "epoch_complete", iteration=1, epoch=n) for n in range(1, 201)))
    trainer.write(event_line("PROJECT", "end"))
    result = asyncio.run(asyncio.wait_for(follower(store, job_uuid, host).run(), 20))
    assert (result.kind, result.succeeded) == ("max_metric_rows", False)
    assert "the job stored 50 metric rows, the limit is 50 (max_metric_rows_per_job)" in result.reason
    assert epochs(store) == list(range(1, 50))  # the iteration row and 49 epochs
    job = store.job(job_uuid)
    assert job.metric_rows == 50 and not job.project_ended
    again = asyncio.run(asyncio.wait_for(follower(store, job_uuid, host).run(), 20))  # a restarted triggerer
    assert again.kind == "max_metric_rows" and epochs(store) == list(range(1, 50))


class _FloodingLog(LocalSource):
    """A trainer log that is tens of MiB of one line (streamed as fast as it is read)."""

    def __init__(self, workdir: str, total: int) -> None:
        super().__init__(workdir)
        self.total = total

    async def stream(self, relpath: str, offset: int) -> AsyncIterator[bytes]:
        if relpath != LOG_PATH:
            async for data in super().stream(relpath, offset):
                yield data
            return
        chunk = b"w" * (64 * 1024)
        for _ in range(self.total // len(chunk)):
            yield chunk
        await asyncio.sleep(3600)


def test_a_job_with_a_huge_log_line_beside_ordinary_ones_keeps_the_loop_free(
    store: ResultsStore, job_uuid: str, host: LocalHost, trainer: Trainer
) -> None:
    async def scenario() -> FollowResult:
        f = JobFollower(
            spec(job_uuid, host), _FloodingLog(host.workdir, 48 * MiB), log=logging.getLogger("t"), store=store
        )
        task = asyncio.create_task(f.run())

        async def until_done() -> None:
            await asyncio.sleep(1.5)
            trainer.write(event_line("PROJECT", "end"))
            await asyncio.wait_for(asyncio.shield(task), 10)

        longest = await longest_block_while(until_done)
        assert longest < 0.1, f"the loop was held {longest * 1000:.0f} ms"
        return await task

    assert asyncio.run(scenario()).kind == "project_end"
