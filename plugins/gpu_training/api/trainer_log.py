"""The last lines of a job's trainer log, for ``GET /v1/jobs/{uuid}/log`` (the job page's log panel).

While the job has not ended they are the ``training_jobs.log_tail`` the follower keeps (the last
~32 KiB, ``[node N] `` prefixed on a multi-node job). Once it ended they are the end of the uploaded
``logs/trainer.log``: ``file://`` read from the end of that one file (only a regular file inside the
job's outputs folder, as an artifact download: :mod:`gpu_training.api.output_files`), ``s3://`` by
one ranged GET of its last bytes. A log that cannot be read falls back to the stored tail, saying why.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Literal

from gpu_training.api.output_files import open_output_file, read_tail
from gpu_training.errors import StorageError
from gpu_training.follow import LOG_LINE_CHARS, LOG_TAIL_BYTES
from gpu_training.hosts.base import LOG_PATH
from gpu_training.results.models import TERMINAL_STATUSES, Artifact, TrainingJob
from gpu_training.storage import AWS_CONN_ID, parse_uri

#: The artifact name of the uploaded trainer log (``storage.upload_outputs``).
UPLOADED_LOG_NAME = LOG_PATH
#: At most this much of the end of an uploaded log is read (enough for 256 lines of 1000 characters).
READ_BYTES = 256 * 1024

Source = Literal["live", "uploaded", "none"]


@dataclasses.dataclass(frozen=True)
class LogLines:
    source: Source
    lines: list[str]
    truncated: bool
    uri: str | None = None
    updated_at: datetime | None = None
    detail: str | None = None


def _cut(line: str) -> str:
    """A line as the live tail keeps it: at most :data:`LOG_LINE_CHARS` characters, marked when cut."""
    if len(line) <= LOG_LINE_CHARS:
        return line
    return line[:LOG_LINE_CHARS] + f"... [{len(line) - LOG_LINE_CHARS} more characters]"


def last_lines(text: str, count: int, *, earlier: bool, cut_long: bool = True) -> tuple[list[str], bool]:
    """The last ``count`` lines of ``text`` (a final newline ends the last line, it does not start
    another) and whether lines before them exist: left out here, or before ``text`` (``earlier``).
    ``cut_long``: cut lines as the live tail does (its own lines already are)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    kept = [line.rstrip("\r") for line in lines[-count:]] if count else []
    return [_cut(line) for line in kept] if cut_long else kept, earlier or len(kept) < len(lines)


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "replace").replace("\x00", "\ufffd")


def job_aws_conn_id(job: TrainingJob) -> str:
    """The AWS connection of the job's ``s3://`` URIs (its ``aws_conn_id`` param)."""
    return str((job.params or {}).get("aws_conn_id") or AWS_CONN_ID)


def read_s3_tail(uri: str, max_bytes: int, *, aws_conn_id: str = AWS_CONN_ID) -> tuple[bytes, int]:
    """The last ``max_bytes`` of an ``s3://`` object (one ranged GET) and its size."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    loc = parse_uri(uri)
    try:
        client = S3Hook(aws_conn_id=aws_conn_id).get_conn()
        resp = client.get_object(Bucket=loc.bucket, Key=loc.path, Range=f"bytes=-{max_bytes}")
        data = resp["Body"].read()
    except Exception as err:  # botocore's ClientError, a missing connection, the network
        raise StorageError(f"{uri}: {err}") from err
    # "bytes 100-199/200"; absent when the whole object came back (a store that ignores the range).
    total = str(resp.get("ContentRange") or "").rpartition("/")[2]
    return data, int(total) if total.isdigit() else len(data)


def read_file_tail(job: TrainingJob, artifact: Artifact, max_bytes: int) -> tuple[bytes, int]:
    """The last ``max_bytes`` of a ``file://`` artifact of the job and its size (StorageError when it
    is not a regular file inside the job's outputs folder)."""
    opened = open_output_file(job, artifact)
    try:
        return read_tail(opened, max_bytes), opened.size
    finally:
        opened.close()


def uploaded_tail(job: TrainingJob, artifact: Artifact) -> tuple[str, bool]:
    """The end of the uploaded log from the start of a line, and whether the log has more before it."""
    # One byte more than shown: when it is a newline, the first line shown is whole.
    max_bytes = READ_BYTES + 1
    if parse_uri(artifact.uri).scheme == "s3":
        data, size = read_s3_tail(artifact.uri, max_bytes, aws_conn_id=job_aws_conn_id(job))
    else:
        data, size = read_file_tail(job, artifact, max_bytes)
    earlier = size > len(data)
    if earlier and (newline := data.find(b"\n")) >= 0:
        data = data[newline + 1 :]  # the end of a line whose start was not read
    return _decode(data), earlier


def job_log(job: TrainingJob, uploaded: Artifact | None, count: int) -> LogLines:
    """The last ``count`` lines of the job's trainer log (see the module's docstring)."""
    detail = None
    if job.status in TERMINAL_STATUSES and uploaded is not None:
        try:
            text, cut = uploaded_tail(job, uploaded)
        except StorageError as err:
            detail = f"the uploaded log could not be read: {err}"
        else:
            lines, truncated = last_lines(text, count, earlier=cut)
            return LogLines("uploaded", lines, truncated, uri=uploaded.uri, updated_at=uploaded.created_at)
    if not job.log_tail:
        return LogLines("none", [], False, detail=detail)
    # The follower keeps the last LOG_TAIL_BYTES of the log: a tail that long has lost its beginning.
    full = len(job.log_tail.encode()) >= LOG_TAIL_BYTES - LOG_LINE_CHARS
    lines, truncated = last_lines(job.log_tail, count, earlier=full, cut_long=False)
    return LogLines("live", lines, truncated, updated_at=job.log_tail_at, detail=detail)
