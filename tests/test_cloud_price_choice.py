"""Which cloud a job lands on follows EC2's price list, not its built-in table.

A job with ``provider: cloud`` for one A100, with two clouds configured (the RunPod fake, and
moto's EC2 behind its proxy, which serves the Price List API's ``GetProducts``): RunPod's A100s cost
0.82 to 2.69 USD/h; EC2's cheapest A100 type, p4d.24xlarge, is 21.96 in the table. When the price
list says 0.50, the job runs on EC2 at 0.50; when the price list refuses to answer, the table decides
and the job runs on RunPod. Provisioning is the lifecycle step the DAG runs; each test ends with both
fakes showing every instance terminated.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from gpu_training import lifecycle
from gpu_training.job import terminate as job_terminate
from gpu_training.providers.registry import CLOUD_CONNECTIONS
from gpu_training.results.store import ResultsStore
from tests.fakeclouds.ec2 import Ec2FaultProxy
from tests.fakeclouds.rigs import FAST_RETRIES
from tests.fakeclouds.runpod import FakeRunPod


@pytest.fixture(scope="module")
def clouds(moto_server: Any) -> Iterator[tuple[Ec2FaultProxy, FakeRunPod, str]]:
    ec2 = Ec2FaultProxy(moto_server.endpoint)
    pod = FakeRunPod()
    images = ec2.moto().describe_images(Owners=["amazon"], Filters=[{"Name": "name", "Values": ["*ubuntu*"]}])
    ami = sorted(i["ImageId"] for i in images["Images"] if i.get("RootDeviceName"))[0]
    yield ec2, pod, ami
    ec2.reset()  # terminates in moto whatever a failed test left
    ec2.stop()
    pod.stop()


@pytest.fixture
def both(
    clouds: tuple[Ec2FaultProxy, FakeRunPod, str], monkeypatch: pytest.MonkeyPatch
) -> tuple[Ec2FaultProxy, FakeRunPod]:
    ec2, pod, ami = clouds
    ec2.reset()
    pod.reset()
    for conn_id in CLOUD_CONNECTIONS.values():
        monkeypatch.delenv(f"AIRFLOW_CONN_{conn_id.upper()}", raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", ec2.connection(ami_id=ami, retry_attempts=2))
    monkeypatch.setenv("AIRFLOW_CONN_RUNPOD_DEFAULT", pod.connection(**FAST_RETRIES))
    monkeypatch.setattr(job_terminate, "TERMINATE_BACKOFF_SECONDS", 0.05)
    return ec2, pod


def a100_job(store: ResultsStore) -> str:
    params = {"project_id": "pricechoice", "provider": "cloud", "gpu": "A100"}
    return store.create_job(
        project_id="pricechoice",
        provider="cloud",
        runtime="process",
        params=params,
        dag_id="gpu_training",
        run_id=f"manual__{time.monotonic_ns()}",
    )


def test_the_job_runs_where_the_price_list_says_it_is_cheapest(
    store: ResultsStore, both: tuple[Ec2FaultProxy, FakeRunPod]
) -> None:
    ec2, pod = both
    ec2.on_demand[("us-east-1", "p4d.24xlarge")] = 0.50  # the table: 21.957642; RunPod's A100s: 0.82 and up
    job = a100_job(store)
    info = lifecycle.provision(store, job)
    assert (info.provider, info.instance_type, info.price_per_hour) == ("ec2", "p4d.24xlarge", 0.50)
    record = store.instances_for_job(job)[0]
    assert (record.provider, record.price_per_hour) == ("ec2", 0.50)  # the cost is counted at that price
    assert ("us-east-1", "p4d.24xlarge") in ec2.pricing_requests and pod.launched() == []
    lifecycle.teardown(store, job)
    ec2.assert_all_terminated()
    pod.assert_all_terminated()


def test_without_the_price_list_the_dated_table_decides(
    store: ResultsStore, both: tuple[Ec2FaultProxy, FakeRunPod], caplog: pytest.LogCaptureFixture
) -> None:
    ec2, pod = both
    ec2.on_demand[("us-east-1", "p4d.24xlarge")] = 0.50  # what the price list would say, if it answered
    ec2.pricing_error = "AccessDeniedException"
    job = a100_job(store)
    info = lifecycle.provision(store, job)
    assert info.provider == "runpod" and info.price_per_hour < 3  # EC2's A100s: the table's 21.96 and 27.45
    assert "because the AWS Price List API was not used" in caplog.text and "AccessDeniedException" in caplog.text
    assert ec2.launched() == []
    lifecycle.teardown(store, job)
    ec2.assert_all_terminated()
    pod.assert_all_terminated()
