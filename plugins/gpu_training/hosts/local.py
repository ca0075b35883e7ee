"""``LocalHost``: the host interface on this machine's filesystem and process table."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gpu_training.errors import HostError, NotRegularFileError, TransferError
from gpu_training.hosts.base import (
    CONFIG_PATH,
    DATA_DIR,
    LOG_PATH,
    OUTPUT_DIR,
    RUN_DIR,
    RUN_TRAINER_SCRIPT,
    Host,
    RemoteFile,
    TrainerStatus,
    sha256_file,
)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


class LocalHost(Host):
    """A work directory on this machine; the trainer runs in its own session and process group."""

    def __init__(
        self,
        workdir: Path | str,
        *,
        python: str | None = None,
        gpus: Sequence[str] = (),
        run_as: str | None = None,
    ) -> None:
        self.root = Path(workdir)
        self.workdir = str(self.root)
        self.python = python or sys.executable
        self.gpus = tuple(gpus)
        self.user = f"{os.getuid()}:{os.getgid()}"
        #: The unprivileged user the trainer runs as (``[gpu_training] local_run_as_user``).
        self.run_as = run_as or None

    def _trainer_identity(self) -> tuple[int, int] | None:
        """(uid, gid) the trainer runs as; None: the worker's own. The wrapper stays the worker's
        (it writes run/: pid, process group, exit code, which only the worker may write), and only
        ``outputs/`` belongs to the trainer's user."""
        if not self.run_as:
            return None
        import pwd

        try:
            entry = pwd.getpwnam(self.run_as)
        except KeyError:
            raise HostError(
                f"[gpu_training] local_run_as_user = {self.run_as!r} is not a user on this machine: create it "
                f"(useradd --system --no-create-home {self.run_as}) or change the setting"
            ) from None
        if os.geteuid() != 0:
            raise HostError(
                f"[gpu_training] local_run_as_user = {self.run_as!r} needs the worker to run as root (it switches "
                "to that user to start the trainer)"
            )
        return entry.pw_uid, entry.pw_gid

    def script(
        self, body: str, *args: str, stdin: bytes | None = None, timeout: float = 300, check: bool = True
    ) -> tuple[int, str, str]:
        try:
            proc = subprocess.run(
                ["bash", "-c", body, "bash", *args],
                input=stdin or b"",
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise HostError(f"local script timed out after {timeout:g} s") from exc
        out, err = proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
        if check and proc.returncode != 0:
            raise HostError(f"local script exited {proc.returncode}: {err.strip()[-2000:] or out[-2000:]}")
        return proc.returncode, out, err

    def remote_script(self, script: Path) -> str:
        return str(script)

    def _abs(self, relpath: str) -> Path:
        target = (self.root / relpath).resolve()
        if target != self.root.resolve() and self.root.resolve() not in target.parents:
            raise HostError(f"path {relpath!r} escapes the work directory {self.workdir}")
        return target

    def prepare(self) -> None:
        for sub in ("config", DATA_DIR, OUTPUT_DIR, "logs", RUN_DIR):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def put_bytes(self, data: bytes, relpath: str) -> str:
        import hashlib

        dest = self._abs(relpath)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".partial")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
        expected = hashlib.sha256(data).hexdigest()
        if sha256_file(dest) != expected:
            raise TransferError(f"{relpath}: SHA256 mismatch after write")
        return expected

    def put_file(self, local_path: Path, relpath: str) -> str:
        dest = self._abs(relpath)
        dest.parent.mkdir(parents=True, exist_ok=True)
        expected = sha256_file(local_path)
        size = local_path.stat().st_size
        for _attempt in range(2):  # a bad copy is re-sent once
            tmp = dest.with_name(dest.name + ".partial")
            shutil.copyfile(local_path, tmp)
            if tmp.stat().st_size == size and sha256_file(tmp) == expected:
                os.replace(tmp, dest)
                return expected
        raise TransferError(f"{local_path} -> {relpath}: size or SHA256 mismatch after two copies")

    def read_chunk(self, relpath: str, offset: int, max_bytes: int) -> bytes | None:
        """Regular files only (``NotRegularFileError`` otherwise): never a symlink's target, a
        FIFO (whose open would block) or a device."""
        fd = open_regular(self.workdir, relpath)
        if fd is None:
            return None
        try:
            return os.pread(fd, max_bytes, offset)
        finally:
            os.close(fd)

    def start_trainer(self, argv: Sequence[str], env: Mapping[str, str]) -> TrainerStatus:
        status = self.trainer_status()
        if status.started:
            return status
        self.prepare()
        identity = self._trainer_identity()
        if identity is not None:
            uid, gid = identity
            for path in [self.root / OUTPUT_DIR, *(self.root / OUTPUT_DIR).rglob("*")]:
                os.chown(path, uid, gid, follow_symlinks=False)
            setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
            argv = [setpriv, f"--reuid={uid}", f"--regid={gid}", "--init-groups", "--", *argv]
        # setsid in a backgrounded shell: the wrapper leads a new session and process group that
        # teardown kills whole, and it is not our child, so it outlives the task that started it
        # and is never left a zombie of a long-lived worker.
        subprocess.run(
            [
                "bash",
                "-c",
                'setsid bash "$0" "$@" </dev/null >/dev/null 2>&1 &',
                str(RUN_TRAINER_SCRIPT),
                self.workdir,
                "--",
                *argv,
            ],
            cwd=self.workdir,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            check=True,
            timeout=30,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status = self.trainer_status()
            if status.started:
                return status
            time.sleep(0.05)
        raise HostError(f"the trainer wrapper did not start in {self.workdir} within 10 s")

    def follow_target(self) -> dict[str, Any]:
        return {"kind": "local", "workdir": str(self.root)}

    def trainer_status(self) -> TrainerStatus:
        run = self.root / RUN_DIR
        exit_code = _read_int(run / "exit_code")
        pid = _read_int(run / "trainer.pid")
        if exit_code is not None:
            return TrainerStatus(started=True, running=False, exit_code=exit_code, pid=pid)
        if pid is None:
            return TrainerStatus(started=False, running=False)
        alive = _pid_alive(pid)
        if not alive:  # the wrapper may be writing exit_code right now
            time.sleep(0.2)
            exit_code = _read_int(run / "exit_code")
        return TrainerStatus(started=True, running=alive, exit_code=exit_code, pid=pid)

    def _pgid(self) -> int | None:
        return _read_int(self.root / RUN_DIR / "pgid")

    def stop_trainer(self, grace_seconds: float = 10.0) -> None:
        """SIGTERM the trainer, SIGKILL what is left after the grace: its process group and every
        process started with its environment (torchrun starts its workers in sessions of their own,
        which a group kill alone would leave running)."""
        pgid = self._pgid()
        group = pgid if pgid is not None and pgid > 1 else None

        def alive() -> list[int]:
            return (_group_members(group) if group else []) + self._with_our_environment()

        def send(sig: signal.Signals) -> None:
            if group:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, sig)
            for pid in self._with_our_environment():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)

        if not alive():
            return
        send(signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline:
            if not alive():
                return
            time.sleep(0.1)
        send(signal.SIGKILL)

    def _with_our_environment(self) -> list[int]:
        """Processes started with this work directory's ``TRAINING_CONFIG`` (the trainer's own)."""
        marker = f"TRAINING_CONFIG={self.path(CONFIG_PATH)}".encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if marker in environ.split(b"\0"):
                found.append(int(entry))
        return found

    def group_alive(self) -> bool:
        """Whether any process of the trainer's process group still exists."""
        pgid = self._pgid()
        return pgid is not None and bool(_group_members(pgid))

    def log_tail(self, max_lines: int = 40) -> str:
        """The last lines of its last 64 KiB (none when the log is not a regular file)."""
        try:
            fd = open_regular(self.workdir, LOG_PATH)
        except NotRegularFileError:
            return ""
        if fd is None:
            return ""
        try:
            size = os.fstat(fd).st_size
            data = os.pread(fd, 64 * 1024, max(0, size - 64 * 1024))
        finally:
            os.close(fd)
        return "\n".join(deque(data.decode("utf-8", errors="replace").splitlines(), maxlen=max_lines))

    def list_files(self, relpath: str) -> list[RemoteFile]:
        base = self._abs(relpath)
        if not base.is_dir():
            return []
        return [
            RemoteFile(p.relative_to(base).as_posix(), p.stat().st_size)
            for p in sorted(base.rglob("*"))
            if p.is_file() and not p.is_symlink()
        ]

    def list_entries(self, relpath: str) -> list[RemoteFile]:
        base = self.root / relpath
        if base.is_symlink():
            return [RemoteFile("", 0, "symlink")]
        if not base.is_dir():
            return []
        entries: list[RemoteFile] = []
        folders = [(str(base), "")]
        while folders:
            folder, prefix = folders.pop()
            with os.scandir(folder) as found:
                for entry in found:
                    rel = prefix + entry.name
                    if entry.is_symlink():
                        entries.append(RemoteFile(rel, 0, "symlink"))
                    elif entry.is_dir(follow_symlinks=False):
                        folders.append((entry.path, rel + "/"))
                    elif entry.is_file(follow_symlinks=False):
                        entries.append(RemoteFile(rel, entry.stat(follow_symlinks=False).st_size))
                    else:
                        entries.append(RemoteFile(rel, 0, "other"))
        return sorted(entries, key=lambda e: e.path)

    def fetch_file(self, relpath: str, local_path: Path) -> str:
        fd = open_regular(self.workdir, relpath)
        if fd is None:
            raise HostError(f"{relpath} does not exist in {self.workdir}")
        local_path.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(fd, "rb") as src, local_path.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        return sha256_file(local_path)

    def destroy(self) -> None:
        self.remove_container()
        self.stop_trainer(grace_seconds=5.0)
        shutil.rmtree(self.root, ignore_errors=True)


_NO_FOLLOW = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def open_regular(workdir: str, relpath: str) -> int | None:
    """A read-only descriptor of ``workdir/relpath``, opened without following a symlink in any part
    of ``relpath`` and checked to be a regular file (never a FIFO's blocking open, a device, or a
    file swapped in between the check and the open); ``None`` when it does not exist. Raises
    :class:`~gpu_training.errors.NotRegularFileError` saying what it is instead."""
    *folders, name = relpath.split("/")
    if any(part in ("", ".", "..") for part in (*folders, name)):
        raise HostError(f"path {relpath!r} is not a plain path inside the work directory {workdir}")
    try:
        dir_fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        for folder in folders:
            try:
                st = os.stat(folder, dir_fd=dir_fd, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                return None
            if not stat.S_ISDIR(st.st_mode):
                raise NotRegularFileError(relpath, f"{folder} is {_file_kind(st.st_mode, folder, dir_fd)}")
            next_fd = os.open(folder, _NO_FOLLOW | os.O_DIRECTORY, dir_fd=dir_fd)
            os.close(dir_fd)
            dir_fd = next_fd
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(relpath, _file_kind(st.st_mode, name, dir_fd))
        try:
            fd = os.open(name, _NO_FOLLOW, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        except OSError as err:  # ELOOP: a symlink swapped in since the stat
            raise NotRegularFileError(relpath, f"replaced while it was opened: {err.strerror}") from None
    finally:
        os.close(dir_fd)
    opened = os.fstat(fd)
    if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(opened.st_mode):
        os.close(fd)
        raise NotRegularFileError(relpath, "replaced while it was opened")
    return fd


def _file_kind(mode: int, name: str, dir_fd: int) -> str:
    """What a file that is not a regular file is, in words (a symlink with its target)."""
    if stat.S_ISLNK(mode):
        try:
            return f"a symbolic link to {os.readlink(name, dir_fd=dir_fd)[:200]}"
        except OSError:
            return "a symbolic link"
    for test, words in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return words
    return "not a regular file"
