"""``SshHost``: the host interface over SSH and SFTP (the SSH provider's ``SSHHook``).

Every remote command is an argument vector joined with ``shlex.join``, or a constant script with
its inputs passed as quoted positional arguments: no param value is ever spliced into shell text.
Files go up by SFTP into ``<name>.partial``, resume where an interrupted copy stopped (after the
prefix is checked), and are renamed into place only after size and SHA256 match on the host; a
mismatch is re-sent once, then fails with both checksums.
"""

from __future__ import annotations

import hashlib
import shlex
import stat
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gpu_training.errors import HostError, NotRegularFileError, TransferError
from gpu_training.hosts.base import (
    LOG_PATH,
    LOG_TAIL_SCRIPT,
    REMOTE_SCRIPTS,
    RUN_DIR,
    TRAINER_STATUS_SCRIPT,
    Host,
    RemoteFile,
    TrainerStatus,
    parse_trainer_status,
    sha256_file,
)

CHUNK = 1 << 20
REMOTE_BIN = "bin"
#: AES-GCM first: an AEAD, so paramiko does no separate HMAC pass (bench/transfer.py: 2x the send).
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
#: OpenSSH's sftp-server takes writes up to 255 KiB; 32 KiB is what every SFTP server accepts.
OPENSSH_MAX_WRITE = 255 * 1024
SFTP_MIN_WRITE = 32 * 1024
#: SHA256 on the host: openssl where present (~5x coreutils' sha256sum here), else sha256sum.
_HASH_FN = "if command -v openssl >/dev/null 2>&1; then h() { openssl dgst -sha256 -r; }; else h() { sha256sum; }; fi; "

# SIGTERM the trainer's process group, SIGKILL after the grace period ($2 seconds).
#: SIGTERM the trainer, SIGKILL what is left after the grace. "The trainer" is its process group and
#: every process started with its environment (``TRAINING_CONFIG`` of this work directory): torchrun
#: starts its workers in sessions of their own, which a group kill alone would leave running.
_STOP_SCRIPT = r"""
marker="TRAINING_CONFIG=$1/config/job.yaml"
pg=$(cat "$1/run/pgid" 2>/dev/null)
case "$pg" in ''|*[!0-9]*) pg= ;; esac
[ -n "$pg" ] && [ "$pg" -le 1 ] && pg=
others() { grep -lzxF -- "$marker" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3; }
alive() { { [ -n "$pg" ] && kill -0 -- "-$pg" 2>/dev/null; } || [ -n "$(others)" ]; }
signal() {
  [ -n "$pg" ] && kill "-$1" -- "-$pg" 2>/dev/null
  for p in $(others); do kill "-$1" "$p" 2>/dev/null; done
}
alive || exit 0
signal TERM
end=$(( $(date +%s) + $2 ))
while [ "$(date +%s)" -lt "$end" ]; do
  alive || exit 0
  sleep 0.2
done
signal KILL
exit 0
"""


#: $1 a folder: "<type> TAB <size> TAB <path below it> NUL" for everything in it but folders (and
#: our own ``*.partial`` uploads), symlinks not followed; the folder itself a symlink: one "l" entry.
_LIST_ENTRIES_SCRIPT = r"""
if [ -L "$1" ]; then printf 'l\t0\t\0'; exit 0; fi
[ -d "$1" ] || exit 0
find "$1" -mindepth 1 ! -type d ! \( -type f -name '*.partial' \) -printf '%y\t%s\t%P\0'
"""


class SshHost(Host):
    """A work directory on a remote host reached through an Airflow SSH connection."""

    remote = True

    def __init__(
        self, hook: Any, workdir: str, *, python: str = "python3", gpus: Sequence[str] = (), user: str = ""
    ) -> None:
        self.hook = hook
        self.workdir = workdir.rstrip("/")
        self.python = python
        self.gpus = tuple(gpus)
        self.user = user
        self._sftp: Any = None
        #: Payload bytes this worker moved to and from the host (the transfer benchmark reads it).
        self.bytes_sent = 0
        self.bytes_received = 0

    # --- plumbing ------------------------------------------------------------------------------

    def client(self) -> Any:
        client = self.hook.get_conn()
        transport = client.get_transport()
        if transport is not None and not getattr(transport, "_gpu_tuned", False):
            # Prefer AES-GCM with a one-time re-key (~50 ms): SSHClient.connect cannot reorder
            # ciphers, and disabling the others would lose the fallback on servers without GCM.
            transport._gpu_tuned = True
            opts = transport.get_security_options()
            fast = tuple(c for c in FAST_CIPHERS if c in opts.ciphers)
            if fast and transport.local_cipher not in fast:
                opts.ciphers = fast + tuple(c for c in opts.ciphers if c not in fast)
                transport.renegotiate_keys()
        return client

    def sftp(self) -> Any:
        transport = self.client().get_transport()
        if self._sftp is None or self._sftp.get_channel() is None or self._sftp.get_channel().closed:
            self._sftp = self.client().open_sftp()
        if transport is None or not transport.is_active():
            self._sftp = self.client().open_sftp()
        return self._sftp

    def run(
        self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float = 300, check: bool = True
    ) -> tuple[int, str, str]:
        """Run an argument vector on the host; returns (exit status, stdout, stderr)."""
        status, out, err = self._run_bytes(argv, stdin=stdin, timeout=timeout)
        text_out, text_err = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
        if check and status != 0:
            raise HostError(
                f"{self.hook.remote_host}: {argv[0]!r} exited {status}: {text_err.strip()[-2000:] or text_out[-2000:]}"
            )
        return status, text_out, text_err

    def _run_bytes(
        self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float = 300
    ) -> tuple[int, bytes, bytes]:
        """(exit status, stdout, stderr) as bytes: for output that must not be decoded (file names)."""
        command = shlex.join(argv)
        try:
            chan_in, chan_out, chan_err = self.client().exec_command(command, timeout=timeout)
            if stdin is not None:
                chan_in.write(stdin)
            chan_in.channel.shutdown_write()
            out = chan_out.read()
            err = chan_err.read()
            status = chan_out.channel.recv_exit_status()
        except (TimeoutError, OSError) as exc:
            raise HostError(f"{self.hook.remote_host}: running {argv[0]!r} failed: {exc}") from exc
        return status, bytes(out), bytes(err)

    def script(
        self, body: str, *args: str, stdin: bytes | None = None, timeout: float = 300, check: bool = True
    ) -> tuple[int, str, str]:
        """A constant bash script with its inputs as quoted positional parameters."""
        return self.run(["bash", "-c", body, "bash", *args], stdin=stdin, timeout=timeout, check=check)

    def follow_target(self) -> dict[str, Any]:
        hook = self.hook
        return {
            "kind": "ssh",
            "workdir": self.workdir,
            "ssh_conn_id": hook.ssh_conn_id,
            "host": hook.remote_host,
            "port": int(hook.port or 22),
            "username": hook.username,
        }

    def remote_script(self, script: Path) -> str:
        return self.path(f"{REMOTE_BIN}/{script.name}")

    # --- files ---------------------------------------------------------------------------------

    def _check_rel(self, relpath: str) -> str:
        parts = Path(relpath).parts
        if Path(relpath).is_absolute() or ".." in parts or not parts:
            raise HostError(f"path {relpath!r} escapes the work directory {self.workdir}")
        return self.path(Path(*parts).as_posix())

    def _mkdirs(self, remote_dir: str) -> None:
        self.run(["mkdir", "-p", "--", remote_dir])

    def _mkdirs_many(self, remote_dirs: Sequence[str]) -> None:
        for start in range(0, len(remote_dirs), 500):
            self.run(["mkdir", "-p", "--", *remote_dirs[start : start + 500]])

    def prepare(self) -> None:
        self.run(
            ["mkdir", "-p", "--", *(self.path(d) for d in ("config", "data", "outputs", "logs", RUN_DIR, REMOTE_BIN))]
        )
        self.put_files([(script, f"{REMOTE_BIN}/{script.name}") for script in REMOTE_SCRIPTS])

    def remote_sha256(self, remote: str) -> tuple[int, str]:
        """Size and SHA256 of a file on the host (computed there: nothing is read back)."""
        return self.remote_sha256_many([remote])[0]

    def remote_sha256_many(self, remotes: Sequence[str]) -> list[tuple[int, str]]:
        """Sizes and SHA256s of files on the host, in one round trip per 500 files."""
        facts: list[tuple[int, str]] = []
        for start in range(0, len(remotes), 500):
            batch = list(remotes[start : start + 500])
            _, out, _ = self.script(
                _HASH_FN + 'for f in "$@"; do printf "%s %s\\n" "$(wc -c < "$f")" "$(h < "$f" | cut -d" " -f1)"; done',
                *batch,
            )
            lines = out.split("\n")
            facts.extend((int(line.split()[0]), line.split()[1]) for line in lines[: len(batch)])
        return facts

    def _prefix_sha256(self, remote: str, length: int) -> str:
        _, out, _ = self.script(_HASH_FN + 'head -c "$2" -- "$1" | h', remote, str(length))
        return out.split()[0]

    def put_bytes(self, data: bytes, relpath: str) -> str:
        import tempfile

        with tempfile.NamedTemporaryFile(prefix="gpu-put-") as tmp:
            tmp.write(data)
            tmp.flush()
            return self.put_file(Path(tmp.name), relpath)

    def put_file(self, local_path: Path, relpath: str) -> str:
        return self.put_files([(local_path, relpath)])[0]

    def put_tree(self, local_dir: Path, relpath: str) -> list[RemoteFile]:
        files = sorted(p for p in local_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        rels = [p.relative_to(local_dir).as_posix() for p in files]
        self.put_files([(p, f"{relpath}/{rel}") for p, rel in zip(files, rels, strict=True)])
        return [RemoteFile(rel, p.stat().st_size) for p, rel in zip(files, rels, strict=True)]

    def put_files(self, items: Sequence[tuple[Path, str]]) -> list[str]:
        """Send files into ``<name>.partial`` (resuming a cut copy), check size and SHA256 of all
        of them on the host in one round trip, rename the good ones into place; what arrived
        wrong is sent once more from scratch, then fails naming both checksums."""
        if not items:
            return []
        remotes = [self._check_rel(rel) for _, rel in items]
        self._mkdirs_many(sorted({r.rsplit("/", 1)[0] for r in remotes}))
        sizes = [path.stat().st_size for path, _ in items]
        sftp = self.sftp()
        # The local SHA256s are computed on a thread while the files go out (hashlib drops the GIL).
        with ThreadPoolExecutor(max_workers=1) as pool:
            digests = [pool.submit(sha256_file, path) for path, _ in items]
            for i, (path, _) in enumerate(items):
                partial = remotes[i] + ".partial"
                self._send(sftp, path, partial, self._resume_offset(sftp, partial, path, sizes[i]))
            local = [(size, digest.result()) for size, digest in zip(sizes, digests, strict=True)]
        pending = list(range(len(items)))
        got: dict[int, tuple[int, str]] = {}
        for attempt in (1, 2):
            if attempt == 2:  # what arrived wrong goes again, from scratch
                for i in pending:
                    self._send(sftp, items[i][0], remotes[i] + ".partial", 0)
            facts = self.remote_sha256_many([remotes[i] + ".partial" for i in pending])
            bad = []
            for i, fact in zip(pending, facts, strict=True):
                got[i] = fact
                if fact == local[i]:
                    sftp.posix_rename(remotes[i] + ".partial", remotes[i])
                else:
                    bad.append(i)
            pending = bad
            if not pending:
                return [digest for _, digest in local]
        self.run(["rm", "-f", "--", *(remotes[i] + ".partial" for i in pending)], check=False)
        i = pending[0]
        raise TransferError(
            f"{items[i][0]} -> {self.hook.remote_host}:{remotes[i]}: SHA256 mismatch after a re-send "
            f"(local {local[i][1]}, remote {got[i][1]})"
            + (f"; {len(pending) - 1} more files failed the same way" if len(pending) > 1 else "")
        )

    def _resume_offset(self, sftp: Any, partial: str, local_path: Path, size: int) -> int:
        """Bytes of an interrupted copy that can be kept: its prefix must match the local file."""
        try:
            have = sftp.stat(partial).st_size or 0
        except OSError:
            return 0
        if have <= 0 or have > size:
            return 0
        digest = hashlib.sha256()
        with local_path.open("rb") as fh:
            remaining = have
            while remaining and (chunk := fh.read(min(CHUNK, remaining))):
                digest.update(chunk)
                remaining -= len(chunk)
        return have if self._prefix_sha256(partial, have) == digest.hexdigest() else 0

    def _send(self, sftp: Any, local_path: Path, partial: str, offset: int) -> None:
        import paramiko

        sent = 0
        try:
            with local_path.open("rb") as src, sftp.open(partial, "ab" if offset else "wb") as dst:
                dst.set_pipelined(True)
                version = self.client().get_transport().remote_version or ""
                dst.MAX_REQUEST_SIZE = OPENSSH_MAX_WRITE if "OpenSSH" in version else SFTP_MIN_WRITE
                if offset:
                    src.seek(offset)
                while chunk := src.read(CHUNK):
                    dst.write(chunk)
                    sent += len(chunk)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise TransferError(
                f"{local_path} -> {self.hook.remote_host}:{partial}: connection lost after about "
                f"{offset + sent} of {local_path.stat().st_size} bytes ({exc or type(exc).__name__}); "
                "a retry resumes from there"
            ) from exc
        finally:
            self.bytes_sent += sent

    def read_chunk(self, relpath: str, offset: int, max_bytes: int) -> bytes | None:
        """Regular files only (``NotRegularFileError`` otherwise, looked at before it is opened:
        SFTP has no no-follow open)."""
        try:
            mode = self.sftp().lstat(self._check_rel(relpath)).st_mode or 0
        except FileNotFoundError:
            return None
        except OSError as exc:
            if getattr(exc, "errno", None) == 2:
                return None
            raise HostError(f"{self.hook.remote_host}: reading {relpath} failed: {exc}") from exc
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(relpath, "a symbolic link" if stat.S_ISLNK(mode) else f"file mode {mode:o}")
        try:
            with self.sftp().open(self._check_rel(relpath), "rb") as fh:
                fh.seek(offset)
                data: bytes = fh.read(max_bytes)
                self.bytes_received += len(data)
                return data
        except FileNotFoundError:
            return None
        except OSError as exc:
            if getattr(exc, "errno", None) == 2:
                return None
            raise HostError(f"{self.hook.remote_host}: reading {relpath} failed: {exc}") from exc

    def list_files(self, relpath: str) -> list[RemoteFile]:
        base = self._check_rel(relpath)
        _, out, _ = self.script(
            '[ -d "$1" ] || exit 0; find "$1" -type f ! -name "*.partial" -printf "%s\\t%P\\n"', base
        )
        files = []
        for line in out.splitlines():
            if "\t" in line:
                size, name = line.split("\t", 1)
                files.append(RemoteFile(name, int(size)))
        return sorted(files, key=lambda f: f.path)

    def list_entries(self, relpath: str) -> list[RemoteFile]:
        base = self._check_rel(relpath)
        _, out, _ = self._run_bytes(["bash", "-c", _LIST_ENTRIES_SCRIPT, "bash", base])
        entries = []
        for record in out.split(b"\0"):
            kind, _, rest = record.partition(b"\t")
            size, _, name = rest.partition(b"\t")
            if kind and size.isdigit():
                entries.append(
                    RemoteFile(
                        name.decode("utf-8", "surrogateescape"),
                        int(size),
                        {b"f": "file", b"l": "symlink"}.get(kind, "other"),
                    )
                )
        return sorted(entries, key=lambda e: e.path)

    def fetch_file(self, relpath: str, local_path: Path) -> str:
        remote = self._check_rel(relpath)
        mode = self.sftp().lstat(remote).st_mode or 0
        if not stat.S_ISREG(mode):  # SFTP has no no-follow open: looked at first
            raise NotRegularFileError(relpath, "a symbolic link" if stat.S_ISLNK(mode) else f"file mode {mode:o}")
        local_path.parent.mkdir(parents=True, exist_ok=True)
        size, expected = self.remote_sha256(remote)
        for _attempt in (1, 2):
            self.sftp().get(remote, str(local_path))
            self.bytes_received += size
            got = sha256_file(local_path)
            if got == expected and local_path.stat().st_size == size:
                return got
        raise TransferError(f"{self.hook.remote_host}:{remote} -> {local_path}: SHA256 mismatch after a re-fetch")

    def file_mode(self, relpath: str) -> int | None:
        try:
            return stat.S_IMODE(self.sftp().stat(self._check_rel(relpath)).st_mode)
        except OSError:
            return None

    # --- the trainer ---------------------------------------------------------------------------

    def start_trainer(self, argv: Sequence[str], env: Mapping[str, str]) -> TrainerStatus:
        status = self.trainer_status()
        if status.started:
            return status
        env_args = [f"{k}={v}" for k, v in env.items()]
        launcher = [
            "env",
            "-i",
            *env_args,
            "setsid",
            "bash",
            self.path(f"{REMOTE_BIN}/run_trainer.sh"),
            self.workdir,
            "--",
            *argv,
        ]
        # Only the launcher is backgrounded, with every stream redirected: the SSH channel closes
        # at once instead of waiting on a subshell that still holds its stdout.
        self.script('cd "$1" || exit 1; shift; nohup "$@" </dev/null >/dev/null 2>&1 &', self.workdir, *launcher)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status = self.trainer_status()
            if status.started:
                return status
            time.sleep(0.2)
        raise HostError(f"{self.hook.remote_host}: the trainer wrapper did not start in {self.workdir} within 20 s")

    def trainer_status(self) -> TrainerStatus:
        _, out, _ = self.script(TRAINER_STATUS_SCRIPT, self.workdir)
        return parse_trainer_status(out)

    def stop_trainer(self, grace_seconds: float = 10.0) -> None:
        self.script(_STOP_SCRIPT, self.workdir, str(int(max(1, grace_seconds))), timeout=grace_seconds + 30)

    def log_tail(self, max_lines: int = 40) -> str:
        _, out, _ = self.script(LOG_TAIL_SCRIPT, self.workdir, LOG_PATH, str(max_lines))
        return out.rstrip("\n")

    def destroy(self) -> None:
        self.remove_container()
        self.stop_trainer(grace_seconds=5.0)
        self.run(["rm", "-rf", "--", self.workdir])
