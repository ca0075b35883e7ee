"""The ``file://`` outputs of a job that the API reads: an artifact download and the uploaded log.

A trainer chooses the names (and on the local provider may write the folder itself), so a file is
only served when its path, resolved (symlinks included), is a regular file inside the job's own
outputs folder (its ``outputs_uri``, resolved). The check is made race-free by opening the file
through that folder one component at a time without following a symlink (``openat`` with
``O_NOFOLLOW``): a link swapped in after the path was resolved is refused, not followed. A FIFO is
opened without blocking and refused, as a directory or a device is.
"""

from __future__ import annotations

import dataclasses
import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from gpu_training.errors import StorageError
from gpu_training.results.models import Artifact, TrainingJob
from gpu_training.storage import parse_uri

#: A download is read and sent this much at a time.
CHUNK_BYTES = 256 * 1024

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


@dataclasses.dataclass(frozen=True)
class OutputFile:
    """An open regular file of a job's outputs (closed when collected, or by :meth:`close`)."""

    file: io.FileIO
    size: int

    def close(self) -> None:
        self.file.close()


def outputs_root(job: TrainingJob, artifact: Artifact) -> Path:
    """The job's outputs folder: its ``outputs_uri``; for a job that has none recorded, the
    artifact's path without its name (``logs/trainer.log`` -> two folders up)."""
    if job.outputs_uri:
        loc = parse_uri(job.outputs_uri)
        if loc.scheme != "file":
            raise StorageError(f"the job's outputs are at {job.outputs_uri}, not in a file:// folder")
        return Path(loc.path)
    path = Path(parse_uri(artifact.uri).path)
    depth = len(Path(artifact.name).parts)
    return path.parents[depth - 1] if 0 < depth <= len(path.parents) else path.parent


def open_output_file(job: TrainingJob, artifact: Artifact) -> OutputFile:
    """The ``file://`` artifact of ``job``, opened (StorageError saying why when it is not a regular
    file inside the job's outputs folder)."""
    loc = parse_uri(artifact.uri)
    if loc.scheme != "file":
        raise StorageError(f"{artifact.uri}: not a file:// artifact")
    return open_inside(Path(loc.path), outputs_root(job, artifact))


def open_inside(path: Path, root: Path) -> OutputFile:
    """``path`` opened for reading, if it resolves to a regular file inside ``root``."""
    try:
        resolved = path.resolve(strict=True)
        base = root.resolve(strict=True)
    except (OSError, RuntimeError) as err:
        raise StorageError(f"{path}: {err}") from err
    if not resolved.is_relative_to(base):
        raise StorageError(f"{path}: resolves to {resolved}, outside the job's outputs folder {root}")
    parts = resolved.relative_to(base).parts
    if not parts:
        raise StorageError(f"{path}: not a regular file (the job's outputs folder itself)")
    try:
        folder = os.open(base, os.O_RDONLY | _DIRECTORY)
        try:
            for part in parts[:-1]:
                inner = os.open(part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW, dir_fd=folder)
                os.close(folder)
                folder = inner
            fd = os.open(parts[-1], os.O_RDONLY | _NOFOLLOW | _NONBLOCK, dir_fd=folder)
        finally:
            os.close(folder)
    except OSError as err:  # ELOOP / ENOTDIR: a symlink appeared since the path was resolved
        raise StorageError(f"{path}: {err}") from err
    try:
        info = os.fstat(fd)
    except OSError as err:
        os.close(fd)
        raise StorageError(f"{path}: {err}") from err
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise StorageError(f"{path}: not a regular file")
    return OutputFile(os.fdopen(fd, "rb", buffering=0), info.st_size)


def read_tail(opened: OutputFile, max_bytes: int) -> bytes:
    """The last ``max_bytes`` of an opened file (as big as it was when opened)."""
    start = max(0, opened.size - max_bytes)
    try:
        return os.pread(opened.file.fileno(), opened.size - start, start)
    except OSError as err:
        raise StorageError(f"reading the end of the file: {err}") from err


def _chunks(opened: OutputFile) -> Iterator[bytes]:
    left = opened.size
    try:
        while left > 0:
            data = opened.file.read(min(CHUNK_BYTES, left))
            if not data:
                return
            left -= len(data)
            yield data
    finally:
        opened.close()


def content_disposition(filename: str) -> str:
    """``attachment; filename=...`` as Starlette's FileResponse writes it (RFC 6266 for non-ASCII)."""
    quoted = quote(filename)
    if quoted != filename:
        return f"attachment; filename*=utf-8''{quoted}"
    return f'attachment; filename="{filename}"'


def file_response(opened: OutputFile, *, filename: str) -> StreamingResponse:
    """The opened file as a download, streamed from the open file (never reopened by its path)."""
    return StreamingResponse(
        _chunks(opened),
        media_type="application/octet-stream",
        headers={"Content-Length": str(opened.size), "Content-Disposition": content_disposition(filename)},
        background=BackgroundTask(opened.close),
    )
