"""Multi-node jobs on a fake cloud, through the lifecycle steps and the follower the trigger runs.

The fake Lambda hands out one box per node on the test sshd, each with its own private address on
the loopback network; the reference trainer runs under torchrun on every node and really
synchronises over gloo (node 0 at its private address). Launches are all or nothing; one node
dying fails the job naming it; teardown terminates every node.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from gpu_training import lifecycle
from gpu_training.follow import FollowResult, FollowSettings, JobFollower, Peer, source_for
from gpu_training.job import terminate as job_terminate
from gpu_training.params import parse_job_params
from gpu_training.results.models import EpochTrain
from gpu_training.results.store import ResultsStore
from tests.fakeclouds.boxes import box_processes, kill_box
from tests.fakeclouds.rigs import STARTERS, Rig

SMALL = {"iterations": 1, "epochs": 3, "hidden_size": 16, "seed": 3}


@pytest.fixture(scope="module")
def lambda_server(sshd_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    rig = STARTERS["lambda"](sshd_server, tmp_path_factory.mktemp("lambda-nodes"))
    yield rig
    rig.stop()


@pytest.fixture
def rig(lambda_server: Rig, monkeypatch: pytest.MonkeyPatch) -> Rig:
    lambda_server.fake.reset()
    for key, value in lambda_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(job_terminate, "TERMINATE_BACKOFF_SECONDS", 0.05)
    return lambda_server


def new_job(store: ResultsStore, rig: Rig, **params: Any) -> str:
    merged = {"project_id": "nodes", "provider": rig.name, "gpu": rig.gpu, "num_nodes": 2, **params}
    job = store.create_job(
        project_id="nodes",
        provider=rig.name,
        runtime="process",
        params=parse_job_params(merged).to_dict(),
        dag_id="gpu_training",
        run_id=f"manual__{time.monotonic_ns()}",
    )
    lifecycle.build_config(store, job)
    return job


def wait_ready(store: ResultsStore, job: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not lifecycle.check_ready(store, job):
        assert time.monotonic() < deadline, "the nodes never became ready"
        time.sleep(0.1)


def follow(store: ResultsStore, job: str, *, poll: float = 0.5) -> FollowResult:
    """What GlobalJsonTrigger does, with this test's store."""
    kw = lifecycle.follow_kwargs(store, job)
    spec = FollowSettings(
        job_uuid=job,
        results_conn_id="unused",
        poll_interval=poll,
        stall_timeout=timedelta(minutes=5),
        max_runtime=timedelta(minutes=10),
        status_command=tuple(kw["status_command"]),
    )

    async def run() -> FollowResult:
        source = source_for(kw["target"])
        peers = [Peer(p["rank"], p["name"], source_for(p["target"]), tuple(p["status_command"])) for p in kw["peers"]]
        try:
            log = logging.getLogger("test.multinode")
            return await JobFollower(spec, source, log=log, store=store, peers=peers).run()
        finally:
            for s in (source, *(p.source for p in peers)):
                await s.close()

    return asyncio.run(run())


def epoch_losses(store: ResultsStore, job: str) -> list[float]:
    from sqlalchemy import select

    with store.session() as s:
        rows = s.scalars(select(EpochTrain).where(EpochTrain.job_id == store.job(job).id)).all()
        return [r.avg_loss for r in sorted(rows, key=lambda r: (r.iteration, r.epoch))]


def test_all_or_nothing_launch_then_a_two_node_job_trains_across_private_addresses(
    store: ResultsStore, rig: Rig
) -> None:
    rig.fake.faults.refuse_launches = (2,)  # the first offer: node 0 launches, node 1 has no capacity
    job = new_job(store, rig, config={**SMALL, "epochs": 2})
    node0 = lifecycle.provision(store, job)

    first, second = (
        [r for r in store.instances_for_job(job) if (r.node_group or r.name) == group]
        for group in dict.fromkeys(r.node_group or r.name for r in store.instances_for_job(job))
    )
    # The first attempt: node 1 refused, so node 0 (already launched) was terminated, not kept.
    assert [(r.node_rank, r.state) for r in first] == [(0, "terminated"), (1, "failed")]
    assert all(r.state_reason and r.state_reason.startswith("no capacity: node 1 of 2") for r in first)
    assert first[0].instance_id and rig.fake.instances[first[0].instance_id].terminate_requested_at
    # The next offer (another region or type): both nodes of one offer in one region.
    assert [r.node_rank for r in second] == [0, 1] and second[0].instance_id == node0.instance_id
    assert len({(r.instance_type, r.region) for r in second}) == 1
    assert (second[0].instance_type, second[0].region) != (first[0].instance_type, first[0].region)

    wait_ready(store, job)
    nodes = lifecycle.node_hosts(store, job)
    private = [info.details["private_ip"] for _, info, _ in nodes]
    assert len(set(private)) == 2, private
    assert lifecycle.transfer_inputs(store, job)["nodes"] == 2
    lifecycle.start_trainer(store, job)
    result = follow(store, job)
    assert result.kind == "project_end", result.reason
    assert len(epoch_losses(store, job)) == 2
    head, peer = (host for _, _, host in nodes)
    assert head.read_chunk("outputs/global.json", 0, 10)  # node 0 writes global.json
    assert peer.read_chunk("outputs/global.json", 0, 10) is None  # the others do not
    log = (peer.read_chunk("logs/trainer.log", 0, 1 << 20) or b"").decode()
    assert "[rank 1]" in log

    terminated = lifecycle.teardown(store, job)
    assert sorted(terminated) == sorted(r.name for r in second)
    rig.fake.assert_all_terminated()
    records = store.instances_for_job(job)
    assert store.job(job).cost_usd == pytest.approx(sum(r.cost_usd or 0 for r in records))
    billed = [r for r in records if r.node_group == second[0].node_group]
    assert len(billed) == 2 and all((r.cost_usd or 0) > 0 for r in billed)  # every node is billed


def test_a_node_killed_mid_training_fails_the_job_naming_it_and_every_node_is_terminated(
    store: ResultsStore, rig: Rig
) -> None:
    job = new_job(store, rig, config={**SMALL, "epochs": 400})
    lifecycle.provision(store, job)
    wait_ready(store, job)
    lifecycle.transfer_inputs(store, job)
    lifecycle.start_trainer(store, job)
    nodes = lifecycle.current_nodes(store, job)
    assert rig.fake.box_root is not None
    boxes = [rig.fake.box_root / r.name for r in nodes]

    def kill_node_1_once_training() -> None:
        deadline = time.monotonic() + 120
        while not epoch_losses(store, job) and time.monotonic() < deadline:
            time.sleep(0.2)
        kill_box(boxes[1])  # node 1's machine dies: its trainer and its wrapper with it

    killer = threading.Thread(target=kill_node_1_once_training)
    killer.start()
    result = follow(store, job)
    killer.join()
    assert result.kind == "node_failed" and not result.succeeded
    assert result.reason.startswith(f"node 1 ({nodes[1].name}): trainer vanished"), result.reason
    lifecycle.after_follow(store, job, result.as_event())  # stops node 0's trainer, which lost its peer
    deadline = time.monotonic() + 15
    while any(box_processes(box) for box in boxes) and time.monotonic() < deadline:
        time.sleep(0.1)  # SIGKILLed ones may take a moment to be gone
    assert [box_processes(box) for box in boxes] == [[], []]  # torchrun's workers too (own sessions)
    lifecycle.teardown(store, job)
    rig.fake.assert_all_terminated()
    assert all(box_processes(box) == [] for box in boxes)
    assert all(r.state == "terminated" for r in store.instances_for_job(job))


def test_each_node_gets_the_distributed_environment_and_a_command_through_torchrun() -> None:
    spec = parse_job_params({"project_id": "p", "num_nodes": 4, "gpus_per_node": 8})
    env = lifecycle.distributed_env(spec, rank=2, master_addr="10.0.0.7", master_port=29411, nproc=8)
    assert env == {
        "MASTER_ADDR": "10.0.0.7",
        "MASTER_PORT": "29411",
        "NODE_RANK": "2",
        "NNODES": "4",
        "NPROC_PER_NODE": "8",
        "WORLD_SIZE": "32",
    }
    launcher = ["/usr/bin/python3", "-m", "torch.distributed.run", "--nnodes=4", "--nproc-per-node=8"]
    launcher += ["--node-rank=2", "--master-addr=10.0.0.7", "--master-port=29411"]
    default = lifecycle.distributed_command(spec, env, python="/usr/bin/python3", workdir="/w")
    assert default == [*launcher, "/w/trainer/train.py"]  # the reference trainer under torchrun
    own = parse_job_params(
        {"project_id": "p", "num_nodes": 4, "command": ["{torchrun}", "{workdir}/fsdp.py", "--bf16"]}
    )
    assert lifecycle.distributed_command(own, env, python="/usr/bin/python3", workdir="/w") == [
        *launcher,
        "/w/fsdp.py",
        "--bf16",
    ]
    plain = parse_job_params({"project_id": "p", "num_nodes": 4, "command": ["bash", "{workdir}/launch.sh"]})
    assert lifecycle.distributed_command(plain, env, python="python3", workdir="/w") == ["bash", "/w/launch.sh"]


def test_multi_node_params_are_checked() -> None:
    from gpu_training.errors import JobParamsError

    with pytest.raises(JobParamsError, match=r"num_nodes.*'ssh' is one host"):
        parse_job_params({"project_id": "p", "num_nodes": 2, "provider": "ssh", "ssh_conn_id": "box"})
    with pytest.raises(JobParamsError, match=r"num_nodes.*runtime 'process'"):
        parse_job_params({"project_id": "p", "num_nodes": 2, "runtime": "docker"})
    with pytest.raises(JobParamsError, match="num_nodes"):
        parse_job_params({"project_id": "p", "num_nodes": 0})
    assert lifecycle.node_names("gpujob-x-1", 3) == ["gpujob-x-1", "gpujob-x-1-n1", "gpujob-x-1-n2"]


#: A launcher like torchrun: its worker runs in a session of its own, outside the wrapper's group.
LAUNCHER = (
    "import subprocess, sys, time\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True)\n"
    "time.sleep(300)\n"
)


def test_stopping_a_trainer_stops_workers_started_in_sessions_of_their_own(tmp_path: Path) -> None:
    import sys

    from gpu_training.hosts.base import CONFIG_PATH
    from gpu_training.hosts.local import LocalHost

    host = LocalHost(tmp_path / "node")
    host.prepare()
    (tmp_path / "node" / "launcher.py").write_text(LAUNCHER)
    env = {"PATH": "/usr/bin:/bin", "TRAINING_CONFIG": host.path(CONFIG_PATH)}
    host.start_trainer([sys.executable, host.path("launcher.py")], env)
    deadline = time.monotonic() + 20
    while len(host._with_our_environment()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # the launcher and its worker
    assert len(host._with_our_environment()) >= 2
    host.stop_trainer(grace_seconds=2)
    deadline = time.monotonic() + 10
    while host._with_our_environment() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host._with_our_environment() == []
