"""Benchmark: a hostile trainer beside ordinary jobs, on one triggerer event loop (issue 21, item 3).

Two parts, each run with the trainer log handled the old way (``(partial + data).split(b"\\n")``
per chunk, every line handled on the loop at once: what ``TrainerLog.lines`` did) and the new way
(:class:`~gpu_training.follow.LineCutter`, slices of at most ``LOG_SLICE_SECONDS``, a flood's
middle counted in C), in the same run:

1. **One newline-free line** of 16, 32 and 64 MiB fed in 64 KiB chunks (what SSH brings per read):
   total time and the longest single chunk (CPU time).
2. **The loop**: 20 ordinary jobs (an epoch and a log line every 0.1 s each, real files, a real
   SQLite results DB, one :class:`~gpu_training.follow.JobFollower` each) and one hostile job whose
   trainer writes a newline-free line of ``--long-mib`` MiB and then ``--flood-mib`` MiB of 2-byte
   lines, its log read in 64 KiB chunks as over SSH. A probe task sleeps 10 ms at a time: the
   longest overshoot (wall clock) and the longest CPU time the loop's thread spent between two of
   its turns (what the loop was held for, whatever else the machine runs) are the longest block,
   beside the longest single callback and the longest full garbage collection. Goal: under 50 ms.
   The first job's one-off imports (notifications) are done before measuring.

    python bench/hostile.py [--jobs 20] [--long-mib 64] [--flood-mib 8] [--sizes 16,32,64]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "plugins"), str(ROOT)]
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="bench-hostile-"))

from gpu_training import follow  # noqa: E402
from gpu_training.follow import FollowSettings, JobFollower, LocalSource, LogGate, LogTail, TrainerLog  # noqa: E402
from gpu_training.hooks.results import create_results_engine  # noqa: E402
from gpu_training.hosts.base import LOG_PATH  # noqa: E402
from gpu_training.progress import GLOBAL_JSON_PATH  # noqa: E402
from gpu_training.results.migrate import upgrade  # noqa: E402
from gpu_training.results.store import ResultsStore  # noqa: E402

MiB = 1 << 20
SSH_CHUNK = 64 * 1024


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}"


# --- the old way, as TrainerLog.lines was -------------------------------------------------------------


async def old_feed(self: TrainerLog, data: bytes) -> None:
    """``TrainerLog.lines`` before this change: the unterminated line copied again with every chunk,
    every line of a chunk handled before the loop runs anything else."""
    assert self.offset is not None
    self.offset += len(data)
    lines = (getattr(self, "partial", b"") + data).split(b"\n")
    self.partial = lines.pop()  # type: ignore[attr-defined]
    for line in lines:
        self._line(line.decode("utf-8", "replace"))


@contextmanager
def the_old_way() -> Iterator[None]:
    new_feed = TrainerLog.feed
    TrainerLog.feed = old_feed  # type: ignore[method-assign]
    try:
        yield
    finally:
        TrainerLog.feed = new_feed  # type: ignore[method-assign]


WAYS: list[tuple[str, Callable[[], Any]]] = [("before", the_old_way), ("after", nullcontext)]


class _NullLog:
    def info(self, *args: Any) -> None:
        pass

    warning = error = info


# --- part 1: one long line -----------------------------------------------------------------------------


def one_line(mib: int) -> tuple[float, float]:
    """(total seconds, longest chunk) for a line of ``mib`` MiB in 64 KiB chunks."""
    shown = TrainerLog(LocalSource("/nonexistent"), LogGate(_NullLog()), LogTail())
    shown.offset = 0
    chunk = b"x" * SSH_CHUNK

    async def run() -> tuple[float, float]:
        longest = 0.0
        started = time.perf_counter()
        for _ in range(mib * MiB // SSH_CHUNK):
            before = time.thread_time()  # CPU: a busy machine taking the CPU away is not the feed's
            await shown.feed(chunk)
            longest = max(longest, time.thread_time() - before)
        await shown.feed(b"\n")
        return time.perf_counter() - started, longest

    return asyncio.run(run())


# --- part 2: the loop ----------------------------------------------------------------------------------


class SshLikeSource(LocalSource):
    """A local work directory whose trainer log arrives in 64 KiB chunks, as ``tail`` over SSH
    brings it (``read(1 << 16)``), without waiting between them."""

    async def stream(self, relpath: str, offset: int) -> AsyncIterator[bytes]:
        if relpath != LOG_PATH:
            async for data in super().stream(relpath, offset):
                yield data
            return
        async for data in super().stream(relpath, offset):
            for start in range(0, len(data), SSH_CHUNK):
                yield data[start : start + SSH_CHUNK]


def event_line(phase: str, event: str, **fields: Any) -> bytes:
    return (json.dumps({"ts": "2026-12-08T10:00:00Z", "phase": phase, "event": event, **fields}) + "\n").encode()


def write_ordinary(workdir: Path, stop: threading.Event) -> None:
    with (workdir / GLOBAL_JSON_PATH).open("ab") as gj, (workdir / LOG_PATH).open("ab") as log:
        gj.write(event_line("PROJECT", "start"))
        epoch = 0
        while not stop.wait(0.1):
            epoch += 1
            gj.write(event_line("TRAINING", "epoch_complete", iteration=1, epoch=epoch, data={"avg_loss": 1 / epoch}))
            gj.flush()
            log.write(f"epoch {epoch} loss {1 / epoch:.4f}\n".encode())
            log.flush()
        gj.write(event_line("PROJECT", "end"))


def write_hostile(workdir: Path, long_mib: int, flood_mib: int, done: threading.Event, stop: threading.Event) -> None:
    time.sleep(1.0)  # its follower is following: the log is streamed, not replayed
    with (workdir / LOG_PATH).open("ab") as log:
        chunk = b"x" * MiB
        for _ in range(long_mib):
            log.write(chunk)
            log.flush()
            time.sleep(0.005)
        log.write(b"\n")
        flood = b"z\n" * (MiB // 2)
        for _ in range(flood_mib):
            log.write(flood)
            log.flush()
            time.sleep(0.005)
    done.set()
    stop.wait()
    with (workdir / GLOBAL_JSON_PATH).open("ab") as gj:
        gj.write(event_line("PROJECT", "end"))


@contextmanager
def longest_callback() -> Iterator[list[float]]:
    """The CPU time of the longest single callback the loop ran meanwhile (a task's step between two
    awaits): what ``loop.slow_callback_duration`` looks at, without debug mode's own cost."""
    longest = [0.0]
    run = asyncio.events.Handle._run

    def timed(handle: asyncio.events.Handle) -> None:
        started = time.thread_time()
        run(handle)
        longest[0] = max(longest[0], time.thread_time() - started)

    asyncio.events.Handle._run = timed  # type: ignore[method-assign]
    try:
        yield longest
    finally:
        asyncio.events.Handle._run = run  # type: ignore[method-assign]


@contextmanager
def gc_pauses() -> Iterator[list[float]]:
    """The CPU seconds of each full (generation 2) collection meanwhile: the whole process stops
    for one, in whichever thread it runs, whatever the loop was doing."""
    pauses: list[float] = []
    started = [0.0]

    def timing(phase: str, info: dict[str, Any]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            started[0] = time.thread_time()
        else:
            pauses.append(time.thread_time() - started[0])

    gc.callbacks.append(timing)
    try:
        yield pauses
    finally:
        gc.callbacks.remove(timing)


def the_loop(jobs: int, long_mib: int, flood_mib: int, label: str) -> dict[str, float]:
    """The longest block of the loop (wall overshoot and CPU) while the hostile job's log streams."""
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-hostile-{label}-"))
    engine = create_results_engine(f"sqlite:///{tmp / 'results.db'}")
    upgrade(engine)
    store = ResultsStore(engine)
    workdirs = []
    uuids = []
    for n in range(jobs + 1):
        workdir = tmp / f"job{n}"
        for sub in ("outputs", "logs", "run"):
            (workdir / sub).mkdir(parents=True)
        (workdir / LOG_PATH).touch()
        workdirs.append(workdir)
        uuids.append(
            store.create_job(
                project_id="bench", provider="local", runtime="process", params={}, dag_id="bench", run_id=f"{label}{n}"
            )
        )
    stop, hostile_done = threading.Event(), threading.Event()
    writers = [threading.Thread(target=write_ordinary, args=(w, stop), daemon=True) for w in workdirs[1:]]
    writers.append(
        threading.Thread(target=write_hostile, args=(workdirs[0], long_mib, flood_mib, hostile_done, stop), daemon=True)
    )
    log = logging.getLogger("bench.hostile")
    log.addHandler(logging.NullHandler())
    log.propagate = False

    async def scenario() -> dict[str, float]:
        limits = {"poll_interval": 1.0, "stall_timeout": timedelta(hours=1), "max_runtime": timedelta(hours=1)}
        followers = [
            JobFollower(
                FollowSettings(job_uuid=uuid, results_conn_id="bench", max_metric_rows=10**9, **limits),
                (SshLikeSource if n == 0 else LocalSource)(str(workdir)),
                log=log,
                store=store,
            )
            for n, (uuid, workdir) in enumerate(zip(uuids, workdirs, strict=True))
        ]
        tasks = [asyncio.create_task(f.run()) for f in followers]
        worst = {"wall": 0.0, "cpu": 0.0}
        started = time.monotonic()
        await asyncio.sleep(0.5)
        for writer in writers:
            writer.start()
        hostile = followers[0]._logs[0]
        target = (long_mib + flood_mib) * MiB + 1
        while time.monotonic() - started < 600:
            wall, cpu = time.perf_counter(), time.thread_time()
            await asyncio.sleep(0.01)
            worst["wall"] = max(worst["wall"], time.perf_counter() - wall - 0.01)
            worst["cpu"] = max(worst["cpu"], time.thread_time() - cpu)
            if hostile_done.is_set() and (hostile.offset or 0) >= target:
                break
        worst["seconds"] = time.monotonic() - started
        worst["epochs"] = float(sum(f.writer.events for f in followers[1:]))
        stop.set()
        for writer in writers:
            writer.join()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 120)
        return worst

    with gc_pauses() as pauses, longest_callback() as callback:
        result = asyncio.run(scenario())
    result["gc"] = max(pauses, default=0.0)
    result["callback"] = callback[0]
    return result


def main() -> None:
    import gpu_training.notify  # noqa: F401 - a triggerer's first job imports it once: not measured

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20, help="ordinary jobs beside the hostile one")
    parser.add_argument("--long-mib", type=int, default=64, help="MiB of the hostile job's newline-free line")
    parser.add_argument("--flood-mib", type=int, default=8, help="MiB of 2-byte lines after it")
    parser.add_argument("--sizes", default="16,32,64", help="MiB of the single lines of part 1")
    args = parser.parse_args()
    logging.getLogger("alembic").setLevel(logging.WARNING)
    print(f"machine: {machine()}")
    print("\n1. one newline-free line, fed in 64 KiB chunks")
    print(f"{'MiB':>5} {'before s':>10} {'longest ms':>11} {'after s':>9} {'longest ms':>11} {'ratio':>7}")
    for mib in (int(s) for s in args.sizes.split(",")):
        with the_old_way():
            old_total, old_longest = one_line(mib)
        new_total, new_longest = one_line(mib)
        print(
            f"{mib:>5} {old_total:>10.2f} {old_longest * 1000:>11.1f} {new_total:>9.3f} {new_longest * 1000:>11.2f}"
            f" {old_total / new_total:>6.0f}x"
        )
    print(
        f"\n2. the loop: {args.jobs} ordinary jobs and one hostile one ({args.long_mib} MiB in one line, then"
        f" {args.flood_mib} MiB of 2-byte lines, read in 64 KiB chunks)"
    )
    header = (
        f"{'longest block: wall ms':>23} {'cpu ms':>7} {'one callback ms':>16} {'took s':>7} {'epochs stored':>14}"
        f" {'full gc ms':>11}"
    )
    print(f"{'':>7} {header}")
    results = {}
    for label, way in WAYS:
        with way():
            results[label] = the_loop(args.jobs, args.long_mib, args.flood_mib, label)
        r = results[label]
        print(
            f"{label:>7} {r['wall'] * 1000:>23.1f} {r['cpu'] * 1000:>7.1f} {r['callback'] * 1000:>16.1f}"
            f" {r['seconds']:>7.1f} {r['epochs']:>14.0f} {r['gc'] * 1000:>11.1f}"
        )
    before, after = results["before"], results["after"]
    print(
        f"\nlongest block: {before['wall'] * 1000:.0f} ms -> {after['wall'] * 1000:.1f} ms wall "
        f"({before['wall'] / max(after['wall'], 1e-4):.0f}x), {before['cpu'] * 1000:.0f} ms -> "
        f"{after['cpu'] * 1000:.1f} ms CPU; goal: under 50 ms"
    )
    print(
        "(wall: what a task waiting on the loop saw, this machine's other load, the DB threads' hold on the GIL"
        " and a full collection included; cpu: the loop's own thread between two turns of the probe, every"
        " callback of that turn together; one callback: the longest single callback, CPU; full gc: the longest"
        " generation-2 collection, which stops the whole process whatever it runs)"
    )
    follow.DB_THREADS.shutdown(wait=False)


if __name__ == "__main__":
    main()
