"""The stream reader of a followed job's ``global.json``: bytes from the host as they are written.

:class:`GlobalJsonReader` streams the file (``tail -F`` over SSH, local files by offset) into
:attr:`~GlobalJsonReader.pending`, what was received and not stored yet. While the stream is broken
it polls every ``poll_interval`` and streams again with backoff; a host that does not answer is
retried. It holds at most a batch ahead (backpressure: SSH flow control holds the sender) and never
reads a file that is not a regular file (:attr:`~GlobalJsonReader.refused` says why).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from gpu_training.errors import NotRegularFileError
from gpu_training.follow.sources import Backoff, Source, SourceUnreachable, StreamBroken, ThrottledWarnings
from gpu_training.follow.writer import BATCH_BYTES
from gpu_training.progress import GLOBAL_JSON_PATH


class GlobalJsonReader:
    """Receives ``global.json`` from :attr:`start` (a byte offset of this host's file) on."""

    def __init__(
        self,
        source: Source,
        *,
        start: int,
        poll_interval: float,
        log: Any,
        warnings: ThrottledWarnings | None = None,
        batch_bytes: int = BATCH_BYTES,
    ) -> None:
        self.source = source
        self.start = start  # where in the file ``pending`` starts
        self.pending = bytearray()  # received, not stored yet
        self.poll_interval = poll_interval
        self.log = log
        self.warnings = warnings or ThrottledWarnings(log)
        self.batch_bytes = batch_bytes
        self.stream_failures = 0
        #: Set whenever bytes arrive (or the file is refused).
        self.wake = asyncio.Event()
        #: Why global.json is never read (it is not a regular file), once the stream found it.
        self.refused: NotRegularFileError | None = None
        self._room = asyncio.Event()
        self._room.set()
        self._task: asyncio.Task[None] | None = None

    @property
    def position(self) -> int:
        """Where in the file the next byte read comes from."""
        return self.start + len(self.pending)

    def stream(self) -> None:
        """Start streaming in the background."""
        self._task = asyncio.create_task(self._pump(), name="global.json")

    async def stop(self) -> None:
        """Stop streaming (what was received stays in :attr:`pending`)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._room.set()

    def consumed(self, size: int) -> None:
        """The first ``size`` bytes of :attr:`pending` were stored."""
        del self.pending[:size]
        self.start += size
        self._room.set()

    def restart_at(self, start: int) -> None:
        """Drop what was received: reading goes on from ``start``."""
        self.pending.clear()
        self.start = start
        self._room.set()

    def stored_what_it_could(self) -> None:
        """Storing stopped at an incomplete line: let the stream read on (up to a batch more)."""
        self._room.set()

    async def read_to_end(self) -> None:
        """Read whatever the file holds past what was received (the stream must be stopped)."""
        while data := await self.source.read(GLOBAL_JSON_PATH, self.position, self.batch_bytes):
            self.pending += data

    async def _pump(self) -> None:
        """Feed ``pending`` from the stream; poll while it is broken; reconnect with backoff."""
        backoff = Backoff(first=self.poll_interval)
        stream_again_at = 0.0
        while True:
            try:
                if time.monotonic() >= stream_again_at:
                    started = time.monotonic()
                    try:
                        async for data in self.source.stream(GLOBAL_JSON_PATH, self.position):
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
                            self.poll_interval,
                            delay,
                        )
                data = await self.source.read(GLOBAL_JSON_PATH, self.position, self.batch_bytes)
                if data:
                    await self._feed(data)
                else:
                    await asyncio.sleep(self.poll_interval)
            except SourceUnreachable as err:
                self.warnings.warn("unreachable", f"host not answering: {err}")
                await asyncio.sleep(min(self.poll_interval, 5.0))
            except NotRegularFileError as err:
                self.refused = err  # the job ends with it (what was received before is stored)
                self.wake.set()
                return

    async def _feed(self, data: bytes) -> None:
        self.pending += data
        self.wake.set()
        if len(self.pending) >= self.batch_bytes:
            self._room.clear()
            await self._room.wait()  # backpressure: SSH flow control holds the sender
