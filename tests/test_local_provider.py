"""The local provider: idempotent launch by name, terminate kills the process group, tolerant."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from gpu_training.errors import BadRequestError, InstanceNotFoundError
from gpu_training.hosts.local import _pid_alive
from gpu_training.providers.base import GpuRequest, InstanceState, instance_name
from gpu_training.providers.local import LocalProvider


@pytest.fixture
def provider(tmp_path: Path) -> LocalProvider:
    return LocalProvider(tmp_path / "instances")


def test_instance_names_are_deterministic_and_prefixed() -> None:
    a = instance_name("gpu_training", "manual__2026-11-22T10:00:00", "uuid-1")
    assert a == instance_name("gpu_training", "manual__2026-11-22T10:00:00", "uuid-1")
    assert a != instance_name("gpu_training", "manual__2026-11-22T10:00:01", "uuid-1")
    assert a.startswith("gpujob-gpu-training-") and len(a) <= 64


def test_offers_are_free(provider: LocalProvider) -> None:
    offers = provider.list_offers(GpuRequest())
    assert len(offers) == 1 and offers[0].price_per_hour == 0.0 and offers[0].provider == "local"


def test_launch_is_idempotent_by_name(provider: LocalProvider) -> None:
    offer = provider.list_offers(GpuRequest())[0]
    first = provider.launch(offer, "gpujob-a")
    again = provider.launch(offer, "gpujob-a")
    assert first.instance_id == again.instance_id == "gpujob-a"
    assert first.state == InstanceState.RUNNING
    assert [i.name for i in provider.list_instances()] == ["gpujob-a"]
    assert provider.find_instance("gpujob-b") is None


def test_terminate_kills_the_whole_process_group_and_removes_the_dir(provider: LocalProvider) -> None:
    info = provider.launch(provider.list_offers(GpuRequest())[0], "gpujob-kill")
    host = provider.host(info)
    host.prepare()
    # The trainer forks a grandchild that ignores SIGTERM: it must die all the same.
    grandchild = (
        "import os, signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "open('run/child.pid', 'w').write(str(os.getpid()))\n"
        "time.sleep(600)\n"
    )
    script = (
        f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {grandchild!r}])\ntime.sleep(600)\n"
    )
    Path(host.path("t.py")).write_text(script)
    status = host.start_trainer([sys.executable, host.path("t.py")], {"PATH": os.environ["PATH"]})
    assert status.running
    child_pid_file = Path(host.path("run/child.pid"))
    for _ in range(100):
        if child_pid_file.exists() and child_pid_file.read_text():
            break
        time.sleep(0.05)
    child_pid = int(child_pid_file.read_text())
    started = time.monotonic()
    provider.terminate(info.instance_id)
    assert time.monotonic() - started < 15
    assert not Path(host.workdir).exists()
    assert not _pid_alive(child_pid)  # dead (a zombie waiting for init to reap it counts as dead)
    with pytest.raises(InstanceNotFoundError):
        provider.get_instance(info.instance_id)
    provider.terminate(info.instance_id)  # already gone: not an error


def test_start_trainer_twice_reattaches(provider: LocalProvider) -> None:
    info = provider.launch(provider.list_offers(GpuRequest())[0], "gpujob-twice")
    host = provider.host(info)
    host.prepare()
    Path(host.path("t.py")).write_text("import time\nwith open('run/starts','a') as f: f.write('x')\ntime.sleep(30)\n")
    first = host.start_trainer([sys.executable, host.path("t.py")], {"PATH": os.environ["PATH"]})
    second = host.start_trainer([sys.executable, host.path("t.py")], {"PATH": os.environ["PATH"]})
    try:
        assert first.pid == second.pid
        time.sleep(0.3)
        assert Path(host.path("run/starts")).read_text() == "x"
    finally:
        provider.terminate(info.instance_id)


def test_exit_code_is_recorded(provider: LocalProvider) -> None:
    info = provider.launch(provider.list_offers(GpuRequest())[0], "gpujob-exit")
    host = provider.host(info)
    host.prepare()
    host.start_trainer([sys.executable, "-c", "import sys; print('bye'); sys.exit(7)"], {"PATH": os.environ["PATH"]})
    for _ in range(100):
        if not host.trainer_status().running:
            break
        time.sleep(0.05)
    status = host.trainer_status()
    assert (status.running, status.exit_code) == (False, 7)
    assert host.log_tail() == "bye"
    provider.terminate(info.instance_id)


def test_paths_cannot_escape_the_workdir(provider: LocalProvider) -> None:
    from gpu_training.errors import HostError

    host = provider.host(provider.launch(provider.list_offers(GpuRequest())[0], "gpujob-escape"))
    with pytest.raises(HostError, match="escapes"):
        host.put_bytes(b"x", "../../etc/evil")


def test_wait_for_ready_gives_up_after_the_boot_timeout(store, job_uuid, monkeypatch, tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from gpu_training import lifecycle
    from gpu_training.errors import ProviderError
    from gpu_training.job import context as job_context
    from gpu_training.providers.base import InstanceInfo

    class SlowBoot(LocalProvider):
        def get_instance(self, instance_id: str) -> InstanceInfo:
            return InstanceInfo("local", instance_id, instance_id, InstanceState.BOOTING)

    monkeypatch.setattr(job_context, "get_provider", lambda name, spec=None: SlowBoot(tmp_path / "i"))
    store.record_instance_intent(job_uuid, provider="local", name="gpujob-slow")
    store.update_instance("gpujob-slow", instance_id="gpujob-slow", state="booting", launched_at=datetime.now(UTC))
    assert lifecycle.check_ready(store, job_uuid) is False
    store.update_instance("gpujob-slow", launched_at=datetime.now(UTC) - timedelta(minutes=31))
    with pytest.raises(ProviderError, match=r"still booting after 31\.0 min"):
        lifecycle.check_ready(store, job_uuid)


def test_a_task_on_another_machine_is_told_the_instance_is_not_there(
    provider: LocalProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers on several hosts or containers (docker-compose): the local provider says why it fails."""
    offer = provider.list_offers(GpuRequest())[0]
    info = provider.launch(offer, "gpujob-elsewhere")
    assert provider.host(info).workdir == info.details["workdir"]  # same machine: fine

    monkeypatch.setattr("gpu_training.providers.local.machine_id", lambda: "other-boot/pid:[1]")
    with pytest.raises(BadRequestError, match=r"was launched on .*provider 'local' keeps a job on the machine"):
        provider.host(provider.get_instance(info.instance_id))
    with pytest.raises(InstanceNotFoundError, match="use provider 'ssh' or a cloud"):
        LocalProvider(provider.root / "elsewhere").get_instance(info.instance_id)
