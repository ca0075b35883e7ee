"""The host interface: what the job's steps do on a running instance.

A host is the instance seen from the orchestrator: a work directory to put files in, a detached
trainer to start and watch, files to read back by byte offset. The local provider implements it
with the local filesystem; the SSH provider (and every cloud through it) with SSH and SFTP.

Work directory layout (relative paths are part of the contract with the remote scripts)::

    config/job.yaml     the job's YAML config        (TRAINING_CONFIG)
    data/               the dataset
    outputs/            everything the trainer writes (TRAINING_OUTPUT_DIR), global.json included
    trainer/            the reference trainer, for the default command
    logs/trainer.log    the trainer's stdout and stderr
    run/                pgid, trainer.pid, exit_code (see include/remote/run_trainer.sh)
    run/checkpoint_sync.*   the checkpoint sync's URL (0600), pid and last upload (sync_checkpoints.sh)
    logs/checkpoint_sync.log  what the checkpoint sync did (never a URL)
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CONFIG_PATH = "config/job.yaml"
DATA_DIR = "data"
INIT_DIR = "init"
OUTPUT_DIR = "outputs"
TRAINER_DIR = "trainer"
LOG_PATH = "logs/trainer.log"
RUN_DIR = "run"


def include_dir(package_dir: Path | None = None) -> Path:
    """Where the remote scripts and the reference trainer are: inside the installed package
    (``gpu_training/include``, the distribution's package data), else the checkout's ``include/``."""
    package_dir = package_dir or Path(__file__).resolve().parents[1]
    bundled = package_dir / "include"
    return bundled if (bundled / "remote").is_dir() else package_dir.parents[1] / "include"


INCLUDE_DIR = include_dir()
RUN_TRAINER_SCRIPT = INCLUDE_DIR / "remote" / "run_trainer.sh"
RUN_CONTAINER_SCRIPT = INCLUDE_DIR / "remote" / "run_container.sh"
FETCH_URLS_SCRIPT = INCLUDE_DIR / "remote" / "fetch_urls.sh"
PUSH_URLS_SCRIPT = INCLUDE_DIR / "remote" / "push_urls.sh"
SYNC_CHECKPOINTS_SCRIPT = INCLUDE_DIR / "remote" / "sync_checkpoints.sh"
#: The remote scripts every host carries (in ``bin/`` of the work directory on remote hosts).
REMOTE_SCRIPTS = (
    RUN_TRAINER_SCRIPT,
    RUN_CONTAINER_SCRIPT,
    FETCH_URLS_SCRIPT,
    PUSH_URLS_SCRIPT,
    SYNC_CHECKPOINTS_SCRIPT,
)
#: The trainer's checkpoint pointer, relative to ``OUTPUT_DIR`` (see include/trainer/train.py).
CHECKPOINT_POINTER = "checkpoints/latest.json"
#: The checkpoint sync's files (see include/remote/sync_checkpoints.sh).
CHECKPOINT_SYNC_URL = "run/checkpoint_sync.url"
CHECKPOINT_SYNC_PID = "run/checkpoint_sync.pid"
CHECKPOINT_SYNC_STAMP = "run/checkpoint_sync.stamp"
CHECKPOINT_SYNC_LOG = "logs/checkpoint_sync.log"
REFERENCE_TRAINER_DIR = INCLUDE_DIR / "trainer"


@dataclasses.dataclass(frozen=True)
class TrainerStatus:
    """Whether the trainer was started, still runs, and how it ended."""

    started: bool
    running: bool
    exit_code: int | None = None
    pid: int | None = None
    #: The kernel's OOM killer ended it (known for containers; ``None`` when unknown).
    oom_killed: bool | None = None

    @property
    def vanished(self) -> bool:
        """Started, not running, and no exit code: the wrapper itself was killed."""
        return self.started and not self.running and self.exit_code is None


#: The trainer's status in one round trip, on any host: "<exit_code or -> <pid or -> <alive 0/1>".
#: A zombie counts as dead (its parent has not reaped it yet); a wrapper found dead is given a
#: moment to write its exit code.
TRAINER_STATUS_SCRIPT = r"""
cd "$1" 2>/dev/null || { echo "- - 0"; exit 0; }
pid=$(cat run/trainer.pid 2>/dev/null || echo -)
alive=0
if [ "$pid" != "-" ] && kill -0 "$pid" 2>/dev/null; then
  alive=1
  state=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d" " -f1)
  [ "$state" = Z ] && alive=0
fi
[ "$alive" = 0 ] && [ "$pid" != "-" ] && [ ! -s run/exit_code ] && sleep 0.2
code=$(cat run/exit_code 2>/dev/null || echo -)
echo "${code:--} $pid $alive"
"""


#: Exit status of scripts using :data:`OPEN_REGULAR_SCRIPT` for a file that is not a regular file
#: reached without symlinks.
NOT_REGULAR_STATUS = 86

#: ``open_regular WORKDIR RELPATH``: fd 3 on the file when it is a regular file and no part of its
#: path is a symlink; else status 85 (there is none) or 86 (what it is on stderr). The open file is
#: checked to be the one that was checked (a name swapped in between is refused); a FIFO is never
#: opened. Sets ``id`` (device:inode) and ``real`` (its path).
OPEN_REGULAR_SCRIPT = r"""
open_regular() {
  local path="$1/$2" base
  if [ -L "$path" ]; then echo "a symbolic link to $(readlink -- "$path" | head -c 200)" >&2; return 86; fi
  [ -e "$path" ] || return 85
  base=$(cd -P -- "$1" 2>/dev/null && pwd) || return 85
  real=$(realpath -e -- "$path" 2>/dev/null) || return 85
  if [ "$real" != "$base/$2" ]; then echo "reached through a symbolic link (it is $real)" >&2; return 86; fi
  if [ ! -f "$real" ]; then echo "a $(stat -c %F -- "$real")" >&2; return 86; fi
  id=$(stat -c %d:%i -- "$real") || return 85
  exec 3<"$real" || return 85
  if [ ! -f /dev/fd/3 ] || [ "$(stat -L -c %d:%i /dev/fd/3)" != "$id" ]; then
    exec 3<&-
    echo "replaced while it was opened" >&2
    return 86
  fi
}
"""


#: $1 workdir, $2 the log, $3 lines: its last lines, from its last 64 KiB at most (none when it is
#: not a regular file: ``tail`` on a symlink to /dev/zero would never end).
LOG_TAIL_SCRIPT = (
    OPEN_REGULAR_SCRIPT
    + r"""
open_regular "$1" "$2" 2>/dev/null || exit 0
tail -c 65536 <&3 | tail -n "$3"
"""
)


def parse_trainer_status(out: str) -> TrainerStatus:
    """Parse what :data:`TRAINER_STATUS_SCRIPT` printed (``HostError`` if it printed nothing:
    a cut connection must not read as a trainer that was never started)."""
    if len(out.split()) < 3:
        from gpu_training.errors import HostError

        raise HostError(f"trainer status unreadable: {out.strip()[:200]!r}")
    code, pid, alive = out.split()[:3]
    exit_code = int(code) if code.lstrip("-").isdigit() else None
    pid_value = int(pid) if pid.isdigit() else None
    if exit_code is not None:
        return TrainerStatus(started=True, running=False, exit_code=exit_code, pid=pid_value)
    if pid_value is None:
        return TrainerStatus(started=False, running=False)
    return TrainerStatus(started=True, running=alive == "1", pid=pid_value)


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    path: str  # relative to the directory that was listed
    size: int
    #: ``file`` (a regular file), ``symlink`` (never followed) or ``other`` (a FIFO, device, socket).
    kind: str = "file"


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


class Host(abc.ABC):
    """Operations on one instance's work directory. Paths are relative to ``workdir``."""

    workdir: str
    #: The interpreter the ``{python}`` placeholder of ``command`` expands to.
    python: str = "python3"
    #: GPU names seen on the host (``nvidia-smi``); empty when it has none.
    gpus: tuple[str, ...] = ()
    #: ``uid:gid`` the work directory belongs to (containers run as it); empty when unknown.
    user: str = ""
    #: Another machine than this worker: S3 data then moves between it and S3 directly.
    remote: bool = False

    def follow_target(self) -> dict[str, Any]:
        """How the triggerer reaches this host to follow the job (JSON-serializable, no secrets)."""
        raise NotImplementedError

    def path(self, relpath: str = "") -> str:
        return f"{self.workdir.rstrip('/')}/{relpath}" if relpath else self.workdir

    @abc.abstractmethod
    def script(
        self, body: str, *args: str, stdin: bytes | None = None, timeout: float = 300, check: bool = True
    ) -> tuple[int, str, str]:
        """Run a constant bash script with ``args`` as its positional parameters (never spliced
        into the script text); ``stdin`` carries what must not appear in an argument list.
        Returns (exit status, stdout, stderr); raises ``HostError`` on failure when ``check``."""

    @abc.abstractmethod
    def remote_script(self, script: Path) -> str:
        """Where one of :data:`REMOTE_SCRIPTS` is on the host."""

    def remove_container(self) -> None:
        """Remove the job's container, if the Docker runtime started one (idempotent)."""
        name = self.read_chunk(f"{RUN_DIR}/container", 0, 256)
        if name and name.strip():
            self.script(
                'bash "$1" remove "$2" "$3"',
                self.remote_script(RUN_CONTAINER_SCRIPT),
                self.workdir,
                name.decode().strip(),
                check=False,
                timeout=120,
            )

    @abc.abstractmethod
    def prepare(self) -> None:
        """Create the work directory layout (idempotent)."""

    @abc.abstractmethod
    def put_bytes(self, data: bytes, relpath: str) -> str:
        """Write ``data`` atomically and verify it; returns its SHA256."""

    @abc.abstractmethod
    def put_file(self, local_path: Path, relpath: str) -> str:
        """Copy a local file, verify size and SHA256 on arrival; returns the SHA256."""

    def put_tree(self, local_dir: Path, relpath: str) -> list[RemoteFile]:
        """Copy a local directory recursively (every file verified)."""
        copied: list[RemoteFile] = []
        for src in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            rel = src.relative_to(local_dir).as_posix()
            if "__pycache__" in rel:
                continue
            self.put_file(src, f"{relpath}/{rel}")
            copied.append(RemoteFile(rel, src.stat().st_size))
        return copied

    @abc.abstractmethod
    def read_chunk(self, relpath: str, offset: int, max_bytes: int) -> bytes | None:
        """Bytes from ``offset`` (at most ``max_bytes``); ``None`` if the file does not exist."""

    @abc.abstractmethod
    def start_trainer(self, argv: Sequence[str], env: Mapping[str, str]) -> TrainerStatus:
        """Start the trainer detached; if it was started already, return its status instead."""

    @abc.abstractmethod
    def trainer_status(self) -> TrainerStatus:
        """Started? running? exit code?"""

    @abc.abstractmethod
    def stop_trainer(self, grace_seconds: float = 10.0) -> None:
        """SIGTERM the trainer's process group, SIGKILL after ``grace_seconds``."""

    @abc.abstractmethod
    def log_tail(self, max_lines: int = 40) -> str:
        """The last lines of the trainer's log (empty if none)."""

    @abc.abstractmethod
    def list_files(self, relpath: str) -> list[RemoteFile]:
        """Files under ``relpath``, recursively; empty if it does not exist."""

    @abc.abstractmethod
    def list_entries(self, relpath: str) -> list[RemoteFile]:
        """Everything under ``relpath`` but folders, recursively, each with its ``kind``, without
        following a symlink (``relpath`` itself a symlink: one entry, path ``""``). Names are as the
        filesystem has them: bytes that are not UTF-8 are kept as surrogate escapes."""

    @abc.abstractmethod
    def fetch_file(self, relpath: str, local_path: Path) -> str:
        """Copy a regular file (never through a symlink) to the orchestrator's machine; returns its
        SHA256."""

    @abc.abstractmethod
    def destroy(self) -> None:
        """Kill everything the job started and remove the work directory (idempotent)."""
