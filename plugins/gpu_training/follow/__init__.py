"""Following a running job from the triggerer: stream ``global.json``, store it, judge the end.

:class:`JobFollower` (``follower.py``) is what :class:`~gpu_training.triggers.GlobalJsonTrigger`
runs, on one :class:`FollowSettings` (``settings.py``). It holds one connection to the host for the
whole job (``sources.py``: :class:`SshSource`, one asyncssh connection with a ``tail -c +OFFSET -F``
channel per followed file; :class:`LocalSource`, the files themselves, read by offset), so a new event
reaches the results DB within a fraction of a second while no worker slot is held:

- ``reader.py``: :class:`GlobalJsonReader`, the stream of ``global.json`` (polling while it is broken);
- ``writer.py``: :class:`BatchWriter`, the received lines parsed and stored in batches, each in one
  transaction with the new byte offset, on a few DB threads; the offset is read back from the
  results DB when following starts, so a triggerer restart, a second triggerer or a task retry
  neither loses nor duplicates a row;
- ``peers.py``: :class:`PeerWatch`, a multi-node job's other nodes;
- ``trainer_log.py``: every node's trainer log into the task log and onto the job row.

How following ended is a :class:`~gpu_training.progress.FollowOutcome`, in :class:`FollowResult`.
"""

from gpu_training.follow.follower import FollowResult, JobFollower, ProgressListener
from gpu_training.follow.peers import NodeFailure, Peer, PeerWatch
from gpu_training.follow.reader import GlobalJsonReader
from gpu_training.follow.settings import FollowSettings, PeerSettings
from gpu_training.follow.sources import (
    BACKOFF_MAX_SECONDS,
    COMMAND_TIMEOUT_SECONDS,
    CONNECT_TIMEOUT_SECONDS,
    Backoff,
    LocalSource,
    LocalWatch,
    Source,
    SourceUnreachable,
    SshSource,
    StreamBroken,
    ThrottledWarnings,
    source_for,
)
from gpu_training.follow.trainer_log import (
    LOG_BURST_LINES,
    LOG_LINE_BYTES,
    LOG_LINE_CHARS,
    LOG_LINES_PER_SECOND,
    LOG_REPLAY_BYTES,
    LOG_SLICE_SECONDS,
    LOG_TAIL_BYTES,
    LOG_TAIL_LINES,
    LOG_TAIL_WRITE_SECONDS,
    LineCutter,
    LogGate,
    LogTail,
    TrainerLog,
    shortened,
)
from gpu_training.follow.writer import (
    BATCH_BYTES,
    DB_THREADS,
    Batch,
    BatchWriter,
    DbThreads,
    ingest_batch,
    metric_rows_limit,
    results_store,
)
from gpu_training.progress import FollowOutcome


def reset_process_state() -> None:
    """Forget what this process's followers share: the DB threads, the results stores, the local
    files' watches (tests call it between tests; nothing else needs to)."""
    DB_THREADS.shutdown(wait=True)
    results_store.cache_clear()
    LocalWatch.reset()


__all__ = [
    "BACKOFF_MAX_SECONDS",
    "BATCH_BYTES",
    "COMMAND_TIMEOUT_SECONDS",
    "CONNECT_TIMEOUT_SECONDS",
    "DB_THREADS",
    "LOG_BURST_LINES",
    "LOG_LINES_PER_SECOND",
    "LOG_LINE_BYTES",
    "LOG_LINE_CHARS",
    "LOG_REPLAY_BYTES",
    "LOG_SLICE_SECONDS",
    "LOG_TAIL_BYTES",
    "LOG_TAIL_LINES",
    "LOG_TAIL_WRITE_SECONDS",
    "Backoff",
    "Batch",
    "BatchWriter",
    "DbThreads",
    "FollowOutcome",
    "FollowResult",
    "FollowSettings",
    "GlobalJsonReader",
    "JobFollower",
    "LineCutter",
    "LocalSource",
    "LocalWatch",
    "LogGate",
    "LogTail",
    "NodeFailure",
    "Peer",
    "PeerSettings",
    "PeerWatch",
    "ProgressListener",
    "Source",
    "SourceUnreachable",
    "SshSource",
    "StreamBroken",
    "ThrottledWarnings",
    "TrainerLog",
    "ingest_batch",
    "metric_rows_limit",
    "reset_process_state",
    "results_store",
    "shortened",
    "source_for",
]
