"""Following a job from the triggerer (gpu_training.follow): real files, a real sshd, a real DB.

The "trainer" is a real process whose pid is in ``run/trainer.pid`` (as run_trainer.sh writes it);
the tests append to ``outputs/global.json`` and ``logs/trainer.log`` themselves so every fault can
be timed exactly. Over SSH the bytes go through a TCP proxy the tests can cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from gpu_training import follow
from gpu_training.follow import (
    FollowResult,
    FollowSettings,
    JobFollower,
    LocalSource,
    PeerSettings,
    Source,
    SshSource,
    source_for,
)
from gpu_training.hosts.base import LOG_PATH, TRAINER_STATUS_SCRIPT
from gpu_training.hosts.local import LocalHost
from gpu_training.notify import ProgressNotifier
from gpu_training.progress import GLOBAL_JSON_PATH
from gpu_training.results.models import EpochTrain, IngestError, TrainingJob, utcnow
from gpu_training.results.store import ResultsStore
from gpu_training.triggers import GlobalJsonTrigger

from .conftest import event_line
from .tcp_proxy import TcpProxy

FAST = {
    "poll_interval": 0.2,
    "stall_timeout": timedelta(minutes=10),
    "max_runtime": timedelta(minutes=10),
}


class Trainer:
    """A real process standing in for the trainer, and the files it writes."""

    def __init__(self, host: LocalHost) -> None:
        self.host = host
        self.proc = subprocess.Popen(["sleep", "600"])
        Path(host.path("run/trainer.pid")).write_text(f"{self.proc.pid}\n")

    def write(self, data: bytes) -> None:
        with open(self.host.path(GLOBAL_JSON_PATH), "ab") as fh:
            fh.write(data)

    def epoch(self, epoch: int, loss: float = 0.5) -> None:
        self.write(event_line("TRAINING", "epoch_complete", iteration=1, epoch=epoch, data={"avg_loss": loss}))

    def log(self, *lines: str) -> None:
        with open(self.host.path("logs/trainer.log"), "a") as fh:
            fh.writelines(line + "\n" for line in lines)

    def exit(self, code: int) -> None:
        self.proc.send_signal(signal.SIGKILL)  # not reaped: a zombie must count as dead
        Path(self.host.path("run/exit_code")).write_text(f"{code}\n")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def host(tmp_path: Path) -> LocalHost:
    h = LocalHost(tmp_path / "instance")
    h.prepare()
    return h


@pytest.fixture
def trainer(host: LocalHost) -> Iterator[Trainer]:
    t = Trainer(host)
    yield t
    t.stop()


def spec(job_uuid: str, host: LocalHost, **overrides: Any) -> FollowSettings:
    values: dict[str, Any] = {
        "job_uuid": job_uuid,
        "results_conn_id": "unused",
        "status_command": (TRAINER_STATUS_SCRIPT, host.workdir),
        **FAST,
    }
    values.update(overrides)
    return FollowSettings(**values)


def epochs(store: ResultsStore) -> list[int]:
    with store.session() as s:
        return sorted(s.scalars(select(EpochTrain.epoch)))


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def follower(
    store: ResultsStore, job_uuid: str, host: LocalHost, source: Source | None = None, **kw: Any
) -> JobFollower:
    """The trigger's follower (progress notifications included) on ``host``'s files."""
    log = logging.getLogger("test.follow")
    return JobFollower(
        spec(job_uuid, host, **kw),
        source or LocalSource(host.workdir),
        log=log,
        store=store,
        progress=ProgressNotifier(log),
    )


@pytest.fixture(autouse=True)
def fresh_follow_state() -> Iterator[None]:
    """Each test starts and ends without the followers' shared threads, stores and watches."""
    follow.reset_process_state()
    yield
    follow.reset_process_state()


# --- local files ----------------------------------------------------------------------------------


def test_events_are_stored_as_they_are_written_and_project_end_ends_it(
    store: ResultsStore, job_uuid: str, host: LocalHost, trainer: Trainer
) -> None:
    async def scenario() -> FollowResult:
        task = asyncio.create_task(follower(store, job_uuid, host, poll_interval=30).run())
        trainer.write(event_line("PROJECT", "start"))
        for epoch in (1, 2, 3):
            trainer.epoch(epoch)
            # stored long before the 30 s status check: the file is followed, not polled
            await until(lambda e=epoch: epochs(store) == list(range(1, e + 1)), timeout=3)
        trainer.write(event_line("PROJECT", "end"))
        return await asyncio.wait_for(task, 5)

    result = asyncio.run(scenario())
    assert (result.kind, result.succeeded, result.events) == ("project_end", True, 5)
    assert result.offset == os.path.getsize(host.path(GLOBAL_JSON_PATH))
    assert store.job(job_uuid).project_ended


def test_a_restarted_follower_continues_from_the_db_offset_exactly_once(
    store: ResultsStore, job_uuid: str, host: LocalHost, trainer: Trainer
) -> None:
    async def scenario() -> FollowResult:
        first = asyncio.create_task(follower(store, job_uuid, host).run())
        for epoch in range(1, 6):
            trainer.epoch(epoch)
        await until(lambda: len(epochs(store)) == 5)
        first.cancel()  # the triggerer dies
        with contextlib.suppress(asyncio.CancelledError):
            await first
        for epoch in range(6, 11):
            trainer.epoch(epoch)
        line = event_line("PROJECT", "end")
        trainer.write(line[:10])  # a half-written line when the new triggerer starts
        second = asyncio.create_task(follower(store, job_uuid, host).run())
        await asyncio.sleep(0.5)
        trainer.write(line[10:])
        return await asyncio.wait_for(second, 5)

    result = asyncio.run(scenario())
    assert result.kind == "project_end"
    assert epochs(store) == list(range(1, 11))
    assert store.job(job_uuid).ingest_offset == os.path.getsize(host.path(GLOBAL_JSON_PATH))


def test_two_followers_of_one_job_store_every_event_once(
    store: ResultsStore, job_uuid: str, host: LocalHost, trainer: Trainer
) -> None:
    async def scenario() -> list[FollowResult]:
        tasks = [asyncio.create_task(follower(store, job_uuid, host).run()) for _ in range(2)]
        for epoch in range(1, 201):
            trainer.epoch(epoch)
            if epoch % 20 == 0:
                await asyncio.sleep(0.05)
        trainer.write(event_line("PROJECT", "end"))
        return list(await asyncio.wait_for(asyncio.gather(*tasks), 10))

    results = asyncio.run(scenario())
    assert {r.kind for r in results} == {"project_end"}
    assert epochs(store) == list(range(1, 201))
    assert sum(r.events for r in results) == 201  # each event stored by exactly one of them


def test_trainer_exit_without_project_end_reports_code_and_log_tail(
    store: ResultsStore, job_uuid: str, host: LocalHost, trainer: Trainer
) -> None:
    trainer.epoch(1)
    trainer.write(event_line("TRAINING", "epoch_complete", iteration=1, epoch=2).rstrip(b"\n"))  # unterminated
    trainer.log("epoch 1 done", "RuntimeError: CUDA error: an illegal memory access")
    trainer.exit(3)
    result = asyncio.run(follower(store, job_uuid, host).run())
    assert (result.kind, result.succeeded, result.exit_code) == ("trainer_exit", False, 3)
    assert "exited with code 3 without PROJECT end" in result.reason
    assert "CUDA error: an illegal memory access" in result.reason
    assert epochs(store) == [1, 2]  # the trainer is gone, so its last line counts
    assert store.job(job_uuid).trainer_exit_code == 3


def test_sigkilled_trainer_is_reported_as_likely_out_of_memory(
    store: ResultsStore, job_uuid: str, host: LocalHost, trainer: Trainer
) -> None:
    trainer.exit(137)
    result = asyncio.run(follower(store, job_uuid, host).run())
    assert "exited with code 137 (SIGKILL: out of memory?)" in result.reason
    assert "its log is empty" in result.reason


def test_no_new_bytes_for_the_stall_timeout_stalls_the_job(
    store: ResultsStore, job_uuid: str, host: LocalHost, trainer: Trainer
) -> None:
    trainer.epoch(1)
    result = asyncio.run(follower(store, job_uuid, host, stall_timeout=timedelta(seconds=1)).run())
    assert (result.kind, result.succeeded) == ("stall", False)
    assert "stalled: no new bytes in global.json" in result.reason
    assert epochs(store) == [1]


class _LaggingSource(LocalSource):
    """A host whose global.json stream brings nothing (a loaded triggerer, a slow first read)."""

    async def stream(self, relpath: str, offset: int) -> AsyncIterator[bytes]:
        await asyncio.sleep(3600)
        yield b""


def test_a_follower_that_starts_late_reads_what_was_written_before_judging_a_stall(
    store: ResultsStore, job_uuid: str, host: LocalHost, trainer: Trainer
) -> None:
    """The trainer wrote epochs, then hung, longer than the stall timeout before following began:
    those epochs are stored (read to the end first), then the job is stalled."""
    for epoch in (1, 2, 3):
        trainer.epoch(epoch)
    store.update_job(job_uuid, trainer_started_at=utcnow() - timedelta(minutes=5))
    source = _LaggingSource(host.workdir)
    result = asyncio.run(follower(store, job_uuid, host, source=source, stall_timeout=timedelta(seconds=1)).run())
    assert epochs(store) == [1, 2, 3]
    assert result.kind == "stall" and result.events == 3


def test_max_runtime_ends_the_job(store: ResultsStore, job_uuid: str, host: LocalHost, trainer: Trainer) -> None:
    result = asyncio.run(follower(store, job_uuid, host, max_runtime=timedelta(seconds=0.5)).run())
    assert result.kind == "max_runtime"
    assert "exceeded max_runtime_minutes" in result.reason


def test_a_cancelled_job_ends_following(store: ResultsStore, job_uuid: str, host: LocalHost, trainer: Trainer) -> None:
    async def scenario() -> FollowResult:
        task = asyncio.create_task(follower(store, job_uuid, host).run())
        trainer.epoch(1)
        await until(lambda: epochs(store) == [1])
        store.set_status(job_uuid, "cancelled")
        return await asyncio.wait_for(task, 5)

    assert asyncio.run(scenario()).kind == "cancelled"


def test_a_trainer_that_never_started_is_reported(store: ResultsStore, job_uuid: str, host: LocalHost) -> None:
    result = asyncio.run(follower(store, job_uuid, host).run())
    assert result.kind == "not_started"


def test_nan_loss_is_recorded_and_training_goes_on(
    store: ResultsStore, job_uuid: str, host: LocalHost, trainer: Trainer, caplog: pytest.LogCaptureFixture
) -> None:
    trainer.epoch(1)
    trainer.epoch(2, float("nan"))
    trainer.epoch(3, float("inf"))
    trainer.write(event_line("PROJECT", "end"))
    with caplog.at_level(logging.WARNING, logger="test.follow"):
        result = asyncio.run(follower(store, job_uuid, host).run())
    assert result.kind == "project_end"
    assert epochs(store) == [1, 2, 3]
    job = store.job(job_uuid)
    assert job.non_finite_loss == "iteration 1 epoch 2 TRAINING/epoch_complete: avg_loss=NaN"
    assert [r.message for r in caplog.records].count(
        "non-finite loss: iteration 1 epoch 2 TRAINING/epoch_complete: avg_loss=NaN "
        "(recorded; set stop_on_nan to stop such jobs)"
    ) == 1


def test_stop_on_nan_stops_the_job_at_the_first_nan(
    store: ResultsStore, job_uuid: str, host: LocalHost, trainer: Trainer
) -> None:
    trainer.epoch(1)
    trainer.epoch(2, float("nan"))
    result = asyncio.run(follower(store, job_uuid, host, stop_on_nan=True).run())
    assert (result.kind, result.succeeded) == ("non_finite_loss", False)
    assert result.reason == "non-finite loss: iteration 1 epoch 2 TRAINING/epoch_complete: avg_loss=NaN (stop_on_nan)"
    assert epochs(store) == [1, 2]  # recorded before stopping


def test_a_line_longer_than_a_batch_is_recorded_and_skipped(
    store: ResultsStore, job_uuid: str, host: LocalHost, trainer: Trainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer.epoch(1)
    trainer.write(b"x" * 10_000 + b"\n")
    trainer.epoch(2)
    trainer.write(event_line("PROJECT", "end"))
    small = JobFollower(
        spec(job_uuid, host),
        LocalSource(host.workdir),
        log=logging.getLogger("test.follow"),
        store=store,
        batch_bytes=4096,
    )
    result = asyncio.run(small.run())
    assert result.kind == "project_end"
    assert epochs(store) == [1, 2]
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(IngestError)) == 1


def test_trainer_log_lines_reach_the_log_and_a_chatty_trainer_is_cut_short(
    store: ResultsStore, job_uuid: str, host: LocalHost, trainer: Trainer, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> FollowResult:
        task = asyncio.create_task(follower(store, job_uuid, host).run())
        trainer.log("epoch 1 done", "y" * 5000)
        await until(lambda: any("epoch 1 done" in r.message for r in caplog.records))
        trainer.log(*(f"batch {i}" for i in range(3000)))
        trainer.write(event_line("PROJECT", "end"))
        await asyncio.sleep(0.5)
        return await asyncio.wait_for(task, 5)

    with caplog.at_level(logging.INFO, logger="test.follow"):
        asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records]
    assert "[trainer] epoch 1 done" in messages
    long_line = next(m for m in messages if m.startswith("[trainer] yyy"))
    assert long_line.endswith(f"... [{5000 - follow.LOG_LINE_CHARS} more characters]")
    shown = [m for m in messages if m.startswith("[trainer] batch ")]
    assert 0 < len(shown) < 3000
    dropped = next(m for m in messages if "lines (" in m and "not shown" in m)
    assert f"[trainer] ... {3000 - len(shown)} lines" in dropped


def test_the_logs_last_lines_are_kept_on_the_job_row_live_and_at_the_end(
    store: ResultsStore, job_uuid: str, host: LocalHost, trainer: Trainer
) -> None:
    """The job page shows ``training_jobs.log_tail``: the last lines, while the job trains (within
    a few seconds) and once it ended, bounded in size, lines cut and marked."""

    async def scenario() -> tuple[str | None, FollowResult]:
        task = asyncio.create_task(follower(store, job_uuid, host).run())
        trainer.log("epoch 1 done", "z" * 5000)
        await until(lambda: "epoch 1 done" in (store.job(job_uuid).log_tail or ""), follow.LOG_TAIL_WRITE_SECONDS + 5)
        live = store.job(job_uuid).log_tail
        trainer.log(*(f"batch {i:05d} " + "x" * 90 for i in range(2000)))
        trainer.log("the last line")
        trainer.write(event_line("PROJECT", "end"))
        return live, await asyncio.wait_for(task, 10)

    live, result = asyncio.run(scenario())
    assert result.succeeded
    assert live is not None and live.splitlines()[0] == "epoch 1 done"
    assert live.splitlines()[1].endswith(f"... [{5000 - follow.LOG_LINE_CHARS} more characters]")
    job = store.job(job_uuid)
    assert job.log_tail is not None and job.log_tail_at is not None
    lines = job.log_tail.splitlines()
    assert lines[-1] == "the last line"
    assert lines[-2].startswith("batch 01999 ")
    assert len(job.log_tail.encode()) <= follow.LOG_TAIL_BYTES
    assert "epoch 1 done" not in job.log_tail  # pushed out by the 2000 later lines


class _LaggingLogSource(LocalSource):
    """A host whose log stream lags: nothing of ``logs/trainer.log`` arrives by streaming."""

    async def stream(self, relpath: str, offset: int) -> AsyncIterator[bytes]:
        if relpath == LOG_PATH:
            await asyncio.sleep(3600)
        async for data in super().stream(relpath, offset):
            yield data


def test_the_trainer_logs_last_lines_reach_the_log_when_the_job_ends(
    store: ResultsStore, job_uuid: str, host: LocalHost, trainer: Trainer, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> FollowResult:
        source = _LaggingLogSource(host.workdir)
        task = asyncio.create_task(follower(store, job_uuid, host, source=source).run())
        await asyncio.sleep(0.3)
        trainer.log("epoch 3 done", "saving the model")
        with Path(host.path(LOG_PATH)).open("a") as fh:
            fh.write("no newline at the end")
        trainer.write(event_line("PROJECT", "end"))
        return await asyncio.wait_for(task, 5)

    with caplog.at_level(logging.INFO, logger="test.follow"):
        assert asyncio.run(scenario()).succeeded
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if m.startswith("[trainer] ")] == [
        "[trainer] epoch 3 done",
        "[trainer] saving the model",
        "[trainer] no newline at the end",
    ]


# --- over SSH -------------------------------------------------------------------------------------


@pytest.fixture
def ssh_target(sshd_server: Any, host: LocalHost, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    proxy = TcpProxy(sshd_server.port)
    proxy.start()
    monkeypatch.setenv("AIRFLOW_CONN_FOLLOW_SSH", sshd_server.connection())
    yield {
        "kind": "ssh",
        "workdir": host.workdir,
        "ssh_conn_id": "follow_ssh",
        "host": "127.0.0.1",
        "port": proxy.port,
        "username": "root",
        "proxy": proxy,
    }
    proxy.stop()


def ssh_follower(store: ResultsStore, job_uuid: str, host: LocalHost, target: dict[str, Any], **kw: Any) -> JobFollower:
    limit = kw.get("unreachable_timeout", timedelta(minutes=2)).total_seconds()
    source = source_for({k: v for k, v in target.items() if k != "proxy"}, unreachable_timeout=limit)
    assert isinstance(source, SshSource)
    return follower(store, job_uuid, host, source, **kw)


def test_ssh_streams_events_over_one_connection(
    store: ResultsStore, job_uuid: str, host: LocalHost, trainer: Trainer, ssh_target: dict[str, Any]
) -> None:
    async def scenario() -> tuple[FollowResult, JobFollower]:
        f = ssh_follower(store, job_uuid, host, ssh_target, poll_interval=30)
        task = asyncio.create_task(f.run())
        for epoch in (1, 2, 3):
            trainer.epoch(epoch)
            await until(lambda e=epoch: epochs(store) == list(range(1, e + 1)), timeout=5)
        trainer.write(event_line("PROJECT", "end"))
        result = await asyncio.wait_for(task, 5)
        await f.source.close()
        return result, f

    result, f = asyncio.run(scenario())
    assert result.kind == "project_end"
    assert isinstance(f.source, SshSource)
    assert f.source.connects == 1
    assert ssh_target["proxy"].connections == 1


def test_ssh_stream_broken_falls_back_to_polling(
    store: ResultsStore, job_uuid: str, host: LocalHost, trainer: Trainer, ssh_target: dict[str, Any]
) -> None:
    async def scenario() -> tuple[FollowResult, JobFollower]:
        f = ssh_follower(store, job_uuid, host, ssh_target)
        task = asyncio.create_task(f.run())
        trainer.epoch(1)
        await until(lambda: epochs(store) == [1])
        # the remote tail dies (OOM killer, an admin): the host still answers
        streams = subprocess.run(
            ["pgrep", "-f", f"{host.workdir} outputs/global.json"], capture_output=True, text=True, check=True
        )
        for stream in streams.stdout.split():
            subprocess.run(["pkill", "-P", stream, "-x", "tail"], check=False)
        await until(lambda: f.stream_failures >= 1)
        trainer.epoch(2)
        await until(lambda: epochs(store) == [1, 2])
        trainer.write(event_line("PROJECT", "end"))
        result = await asyncio.wait_for(task, 10)
        await f.source.close()
        return result, f

    result, f = asyncio.run(scenario())
    assert result.kind == "project_end"
    assert f.stream_failures >= 1
    assert epochs(store) == [1, 2]


def test_ssh_reconnects_after_the_network_drops_and_loses_nothing(
    store: ResultsStore, job_uuid: str, host: LocalHost, trainer: Trainer, ssh_target: dict[str, Any]
) -> None:
    proxy: TcpProxy = ssh_target["proxy"]

    async def scenario() -> tuple[FollowResult, JobFollower]:
        f = ssh_follower(store, job_uuid, host, ssh_target)
        task = asyncio.create_task(f.run())
        trainer.epoch(1)
        await until(lambda: epochs(store) == [1])
        proxy.cut(refuse=True)
        for epoch in range(2, 6):
            trainer.epoch(epoch)
        await asyncio.sleep(1.5)
        assert epochs(store) == [1]
        proxy.restore()
        await until(lambda: epochs(store) == [1, 2, 3, 4, 5], timeout=20)
        trainer.write(event_line("PROJECT", "end"))
        result = await asyncio.wait_for(task, 10)
        await f.source.close()
        return result, f

    result, f = asyncio.run(scenario())
    assert result.kind == "project_end"
    assert isinstance(f.source, SshSource)
    assert f.source.connects >= 2
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(EpochTrain)) == 5


def test_ssh_host_unreachable_past_the_timeout_ends_the_job(
    store: ResultsStore, job_uuid: str, host: LocalHost, trainer: Trainer, ssh_target: dict[str, Any]
) -> None:
    proxy: TcpProxy = ssh_target["proxy"]

    async def scenario() -> FollowResult:
        # 5 s: on a loaded machine one SSH connect and command can take 2.
        f = ssh_follower(store, job_uuid, host, ssh_target, unreachable_timeout=timedelta(seconds=5))
        task = asyncio.create_task(f.run())
        trainer.epoch(1)
        await until(lambda: epochs(store) == [1], timeout=30)
        proxy.cut(refuse=False)  # packets vanish: connects and commands hang until they time out
        return await asyncio.wait_for(task, 60)

    result = asyncio.run(scenario())
    assert (result.kind, result.succeeded) == ("unreachable", False)
    assert result.reason.startswith("host unreachable for more than")


# --- the trigger ----------------------------------------------------------------------------------


def ssh_host_with_secrets(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[str]]:
    """An SSH host whose Airflow connection holds a password and a private key, and those secrets."""
    import io

    import paramiko
    from airflow.providers.ssh.hooks.ssh import SSHHook

    from gpu_training.hosts.ssh import SshHost

    key = paramiko.RSAKey.generate(2048)
    pem = io.StringIO()
    key.write_private_key(pem)
    password = "follow-secret-password-5f3a"
    connection = {
        "conn_type": "ssh",
        "host": "10.0.0.7",
        "port": 2222,
        "login": "trainer",
        "password": password,
        "extra": {"private_key": pem.getvalue(), "no_host_key_check": "true"},
    }
    monkeypatch.setenv("AIRFLOW_CONN_FOLLOW_SECRETS", json.dumps(connection))
    host = SshHost(SSHHook(ssh_conn_id="follow_secrets"), "/srv/jobs/j1")
    secrets = [password, key.get_base64(), *pem.getvalue().splitlines()[1:-1]]
    return host, secrets


def test_follow_settings_round_trip_without_the_ssh_connections_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker -> trigger kwargs -> triggerer: the same settings, and neither the SSH connection's
    password nor its private key in what is serialized (the connection's id is)."""
    host, secrets = ssh_host_with_secrets(monkeypatch)
    target = host.follow_target()
    settings = FollowSettings(
        job_uuid="job-1",
        results_conn_id="training_results",
        target=target,
        status_command=(TRAINER_STATUS_SCRIPT, host.workdir),
        runtime="docker",
        poll_interval=2.5,
        stall_timeout=timedelta(minutes=7),
        max_runtime=timedelta(hours=3),
        unreachable_timeout=timedelta(seconds=90),
        stop_on_nan=True,
        cost_deadline=datetime(2026, 12, 8, 3, 0, tzinfo=UTC),
        max_cost_usd=12.5,
        max_metric_rows=5000,
        peers=(PeerSettings(rank=1, name="node-1", target=target, status_command=("status", "1")),),
    )
    path, kwargs = GlobalJsonTrigger.following(settings).serialize()
    assert path == "gpu_training.triggers.GlobalJsonTrigger"
    serialized = json.dumps(kwargs)  # what the triggerer's table holds
    leaked = [secret for secret in secrets if secret in serialized]
    assert not leaked, f"secrets of the SSH connection serialized: {leaked}"
    assert kwargs["target"] == {
        "kind": "ssh",
        "workdir": "/srv/jobs/j1",
        "ssh_conn_id": "follow_secrets",
        "host": "10.0.0.7",
        "port": 2222,
        "username": "trainer",
    }
    assert "offset" not in serialized  # the offset lives in the results DB only
    assert GlobalJsonTrigger(**json.loads(serialized)).settings == settings
    assert FollowSettings.from_kwargs(settings.to_kwargs()) == settings
    for secret_key in ("password", "private_key"):
        with_secret = FollowSettings(job_uuid="job-1", target={**target, secret_key: "x"})
        with pytest.raises(ValueError, match="must not hold secrets"):
            with_secret.to_kwargs()
        with pytest.raises(ValueError, match="must not hold secrets"):
            FollowSettings.from_kwargs({**settings.to_kwargs(), "target": {**target, secret_key: "x"}})


def test_trigger_serializes_without_secrets_and_fires_once(
    store: ResultsStore, job_uuid: str, host: LocalHost, trainer: Trainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(follow, "results_store", lambda conn_id: store)
    ssh_host, secrets = ssh_host_with_secrets(monkeypatch)
    over_ssh = GlobalJsonTrigger(
        job_uuid=job_uuid,
        results_conn_id="training_results",
        target=ssh_host.follow_target(),
        status_command=[TRAINER_STATUS_SCRIPT, ssh_host.workdir],
    )
    assert not [secret for secret in secrets if secret in json.dumps(over_ssh.serialize()[1])]
    trigger = GlobalJsonTrigger(
        job_uuid=job_uuid,
        results_conn_id="training_results",
        target=host.follow_target(),
        status_command=[TRAINER_STATUS_SCRIPT, host.workdir],
        poll_interval_seconds=0.2,
    )
    path, kwargs = trigger.serialize()
    assert path == "gpu_training.triggers.GlobalJsonTrigger"
    assert kwargs["target"] == {"kind": "local", "workdir": host.workdir}
    assert "offset" not in str(kwargs)  # the offset lives in the results DB only
    rebuilt = GlobalJsonTrigger(**kwargs)
    trainer.epoch(1)
    trainer.write(event_line("PROJECT", "end"))

    async def first_event() -> Any:
        async for event in rebuilt.run():
            return event.payload
        return None

    payload = asyncio.run(first_event())
    assert payload["kind"] == "project_end" and payload["succeeded"] is True
    assert type(payload["kind"]) is str  # plain JSON in the trigger event
    with store.session() as s:
        assert s.get(TrainingJob, store.job(job_uuid).id).project_ended
