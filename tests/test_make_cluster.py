"""`make cluster`'s entry point without starting a deployment: the admin's password kept per
CLUSTER_HOME, a taken port refused naming its holder before anything is removed or started, a home
that a running deployment uses left alone, and the example retraining DAGs paused on creation.

The deployment itself (sign-in required, the printed login working, no failed run while it starts)
is ``tests/e2e/celery/test_fresh_deployment.py``.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.airflow_cluster import (
    ADMIN_PASSWORD_FILE,
    ClusterError,
    PortInUse,
    admin_password,
    check_port_free,
    prepare_home,
)

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINT = REPO / "tests" / "airflow_cluster.py"


@pytest.fixture
def listener() -> Iterator[int]:
    """A port this process listens on (as another program holding 8080 would)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_the_admin_password_is_generated_once_private_and_reused(tmp_path: Path) -> None:
    home = tmp_path / "cluster"
    password = admin_password(home)
    path = home / ADMIN_PASSWORD_FILE
    assert re.fullmatch(r"[A-Za-z0-9]{20}", password)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == password + "\n"
    assert admin_password(home) == password  # the next start with this home
    assert admin_password(tmp_path / "other") != password


def test_an_empty_password_file_gets_a_new_password_and_loose_modes_are_tightened(tmp_path: Path) -> None:
    path = tmp_path / ADMIN_PASSWORD_FILE
    path.write_text("\n")
    password = admin_password(tmp_path)
    assert password and path.read_text().strip() == password
    path.chmod(0o644)
    assert admin_password(tmp_path) == password
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_taken_port_is_refused_naming_the_process_that_holds_it(listener: int) -> None:
    with pytest.raises(PortInUse, match=rf"port {listener} .*taken by pid {os.getpid()} \(.*python"):
        check_port_free(listener)


def test_a_free_port_passes(listener: int) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    check_port_free(port)


def test_the_entry_point_refuses_a_taken_port_before_removing_or_starting_anything(
    listener: int, tmp_path: Path
) -> None:
    """As `make cluster PORT=<taken>` runs it: exit 1 in about a second, the holder named, and the
    home of the last deployment (logs included) left as it was."""
    home = tmp_path / "cluster"
    (home / "airflow" / "logs").mkdir(parents=True)
    (home / "airflow" / "logs" / "scheduler.log").write_text("the last run's log\n")
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(ENTRY_POINT), "--celery", "--fresh", "--workers", "1", "--port", str(listener), str(home)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert f"port {listener} on 127.0.0.1 is not free" in proc.stderr
    assert f"taken by pid {os.getpid()}" in proc.stderr
    assert "make cluster PORT=" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (home / "airflow" / "logs" / "scheduler.log").read_text() == "the last run's log\n"
    assert not (home / "redis").exists()  # nothing started
    assert time.monotonic() - started < 60


def test_fresh_removes_the_last_deployment_but_keeps_the_password(tmp_path: Path) -> None:
    password = admin_password(tmp_path)
    for name in ("airflow/logs", "redis"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("mine")
    prepare_home(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ADMIN_PASSWORD_FILE, "cluster.pid", "notes.txt"]
    assert admin_password(tmp_path) == password


def test_fresh_refuses_a_home_that_a_running_deployment_uses(tmp_path: Path) -> None:
    # A process whose command line names the entry point, as a running `make cluster` does.
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "tests/airflow_cluster.py"])
    try:
        cmdline = Path(f"/proc/{running.pid}/cmdline")
        deadline = time.monotonic() + 10
        while b"airflow_cluster.py" not in cmdline.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)  # until its exec shows
        (tmp_path / "airflow").mkdir()
        (tmp_path / "cluster.pid").write_text(f"{running.pid}\n")
        with pytest.raises(ClusterError, match=rf"still runs \(pid {running.pid}\)"):
            prepare_home(tmp_path)
        assert (tmp_path / "airflow").is_dir()
    finally:
        running.kill()
        running.wait()
    prepare_home(tmp_path)  # once it is gone, the home is reused
    assert not (tmp_path / "airflow").exists()


def test_every_retraining_dag_is_paused_when_first_created() -> None:
    """The repo's example specs launch jobs on their schedules: nothing runs until someone unpauses
    them, whatever `[core] dags_are_paused_at_creation` says (make cluster's and compose's: False)."""
    from gpu_training.retraining.dags import build_dags

    dags = build_dags(REPO / "include" / "retraining")
    assert len(dags) >= 4
    assert {dag_id: dag.is_paused_upon_creation for dag_id, dag in dags.items()} == dict.fromkeys(dags, True)
