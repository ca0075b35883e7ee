"""The trainer's log while a job is followed: into the task log (rate-limited) and onto the job
row (its last lines, for the job page). Display only: ``logs/trainer.log`` itself has every line
and is uploaded with the outputs.

Every job's follower shares the triggerer's event loop, so nothing here holds it long: lines are
cut at :data:`LOG_LINE_BYTES` (:class:`LineCutter`), handled in slices of at most
:data:`LOG_SLICE_SECONDS`, and a flood's lines that are neither shown nor kept are only counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from gpu_training.errors import HostError, NotRegularFileError
from gpu_training.events import without_nul
from gpu_training.follow.sources import BACKOFF_MAX_SECONDS, Backoff, Source, SourceUnreachable, StreamBroken
from gpu_training.hosts.base import LOG_PATH

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


class TrainerLog:
    """One node's trainer log shown in the task log and kept in the job's :class:`LogTail`
    (display only: after a restart the last :data:`LOG_REPLAY_BYTES` are shown again).

    Lines are handled in slices that hold the event loop :data:`LOG_SLICE_SECONDS` at most, and
    each is cut at :data:`LOG_LINE_BYTES`: every job's follower shares the triggerer's loop."""

    def __init__(self, source: Source, gate: LogGate, tail: LogTail | None = None) -> None:
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


class LogGate:
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
