"""Provisioning across offers: cheapest first, the next offer on a capacity refusal, every attempt
recorded, a price cap that fails before launching, and a retried task keeping its instance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gpu_training import lifecycle
from gpu_training.errors import NoCapacityError
from gpu_training.job import context as job_context
from gpu_training.offers import NoOfferError
from gpu_training.providers.base import GpuRequest, InstanceInfo, Offer
from gpu_training.providers.local import LocalProvider
from gpu_training.results.store import ResultsStore


class FakeCloud(LocalProvider):
    """A local provider posing as a cloud with fixed offers; some refuse at launch."""

    def __init__(self, name: str, root: Path, offers: list[Offer], refuse: set[str]) -> None:
        super().__init__(root)
        self.name = name  # type: ignore[misc]
        self._offers = offers
        self.refuse = refuse
        self.launches: list[str] = []

    def list_offers(self, request: GpuRequest) -> list[Offer]:
        return list(self._offers)

    def launch(self, offer: Offer, name: str) -> InstanceInfo:
        self.launches.append(offer.instance_type)
        if offer.instance_type in self.refuse:
            raise NoCapacityError(self.name, f"Not enough capacity to fulfill launch request ({offer.instance_type})")
        return super().launch(offer, name)


@pytest.fixture
def clouds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, FakeCloud]:
    clouds = {
        "lambda": FakeCloud(
            "lambda",
            tmp_path / "lambda",
            [Offer("lambda", "gpu_1x_h100_pcie", 2.49, "us-east-1", "H100", 1)],
            refuse={"gpu_1x_h100_pcie"},
        ),
        "runpod": FakeCloud(
            "runpod", tmp_path / "runpod", [Offer("runpod", "NVIDIA H100 80GB HBM3", 2.69, "US", "H100", 1)], set()
        ),
    }
    monkeypatch.setattr(job_context, "get_provider", lambda name, spec=None: clouds[name])
    return clouds


def job_with(store: ResultsStore, **params: Any) -> str:
    return store.create_job(
        project_id="fo",
        provider="lambda",
        runtime="process",
        params={"project_id": "fo", "provider": "lambda", **params},
        dag_id="gpu_training",
        run_id=f"manual__{len(params)}",
    )


def test_capacity_refusal_moves_to_the_next_offer_and_is_recorded(
    store: ResultsStore, clouds: dict[str, FakeCloud]
) -> None:
    job = job_with(store, gpu="H100", providers=["lambda", "runpod"])
    info = lifecycle.provision(store, job)
    assert info.provider == "runpod"
    rows = store.instances_for_job(job)
    assert [(r.provider, r.state) for r in rows] == [("lambda", "failed"), ("runpod", "running")]
    assert "Not enough capacity" in (rows[0].state_reason or "")
    assert rows[1].price_per_hour == 2.69

    again = lifecycle.provision(store, job)  # a retried task keeps the instance it has
    assert again.instance_id == info.instance_id
    assert clouds["runpod"].launches == ["NVIDIA H100 80GB HBM3"]


def test_every_offer_refused_fails_with_each_reason(store: ResultsStore, clouds: dict[str, FakeCloud]) -> None:
    clouds["runpod"].refuse.add("NVIDIA H100 80GB HBM3")
    job = job_with(store, gpu="H100", providers=["lambda", "runpod"])
    with pytest.raises(NoCapacityError, match=r"every fitting offer was refused or given up \(2\)"):
        lifecycle.provision(store, job)
    assert [r.state for r in store.instances_for_job(job)] == ["failed", "failed"]


def test_price_cap_fails_before_any_launch(store: ResultsStore, clouds: dict[str, FakeCloud]) -> None:
    job = job_with(store, gpu="H100", providers=["lambda", "runpod"], max_price_per_hour=1.5)
    with pytest.raises(NoOfferError, match=r"the cheapest is 2.49 USD/h \(lambda gpu_1x_h100_pcie"):
        lifecycle.provision(store, job)
    assert store.instances_for_job(job) == []
    assert clouds["lambda"].launches == clouds["runpod"].launches == []
