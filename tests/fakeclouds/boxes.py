"""The processes of a fake instance's box, and powering the box off.

A fake cloud's instance is no machine: it is the directory ``<work root>/<instance name>`` on the
one test sshd that every fake instance answers on (``tests/fakeclouds/rigs.py``). Terminating it
cannot power anything off, and neither a process group nor a session marks what ran "on" it (the
trainer runs in a session of its own, everything else is a child of the shared sshd). So a process
belongs to a box by where it runs: its working directory is in the box (``run_trainer.sh`` and the
trainer cd there), its ``HOME`` or ``TRAINING_*`` environment points into it (what the trainer
starts inherits that), or one of its arguments is a path in it (the scripts the job runs over SSH:
``tail -F``, the status script, ``run_trainer.sh WORKDIR``). Matching the box's directory, not pids
written in its files, also keeps a dead trainer's pid, soon another process's on a busy machine
(``pid_max`` is 32768 here), from being taken for the trainer.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

#: Environment variables that place a process in a box (what ``lifecycle.trainer_env`` sets).
_BOX_ENV = (b"HOME", b"TRAINING_OUTPUT_DIR", b"TRAINING_CONFIG")


def _in(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def _ours() -> set[int]:
    """This process and its ancestors: never taken for a box's, whatever their directory."""
    ours: set[int] = set()
    pid = os.getpid()
    while pid > 1 and pid not in ours:
        ours.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return ours


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def belongs(pid: int, box: Path) -> bool:
    """Whether process ``pid`` runs for ``box`` (see the module docstring); a zombie does not."""
    prefixes = tuple({str(box), os.path.realpath(box)})
    if _state(pid) in ("", "Z", "X"):
        return False
    with contextlib.suppress(OSError):
        if _in(os.readlink(f"/proc/{pid}/cwd").removesuffix(" (deleted)"), prefixes):
            return True
    with contextlib.suppress(OSError):
        for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            key, _, value = entry.partition(b"=")
            if key in _BOX_ENV and _in(value.decode(errors="replace"), prefixes):
                return True
    with contextlib.suppress(OSError):
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if any(_in(arg.decode(errors="replace"), prefixes) for arg in args if arg.startswith(b"/")):
            return True
    return False


def box_processes(box: Path) -> list[int]:
    """The live processes that run for ``box`` (a box, or a work root: every box in it)."""
    ours = _ours()
    pids = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    return [pid for pid in pids if pid not in ours and belongs(pid, box)]


def kill_box(box: Path, *, timeout: float = 10.0) -> list[int]:
    """SIGKILL every process of ``box``, as a machine that is switched off, and wait until none is
    left (what was killed may have started another meanwhile). Returns the pids killed."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while pids := box_processes(box):
        if time.monotonic() > deadline:
            raise TimeoutError(f"processes of {box} still alive after SIGKILL: {pids}")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                if pid not in killed:
                    killed.append(pid)
        time.sleep(0.02)
    return killed
