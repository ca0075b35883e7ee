"""Choosing the offer: GPU names, counts, regions, spot, the price cap, cheapest first."""

from __future__ import annotations

import pytest

from gpu_training.errors import JobParamsError
from gpu_training.offers import NoOfferError, gpu_matches, parse_gpu, rank_offers, request_from
from gpu_training.providers.base import Offer


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("H100", ("H100", 1)),
        ("A100:8", ("A100", 8)),
        ("8xA100", ("A100", 8)),
        ("", (None, 1)),
        ("RTX 4090", ("RTX 4090", 1)),
    ],
)
def test_parse_gpu(text: str, parsed: tuple[str | None, int]) -> None:
    assert parse_gpu(text) == parsed


@pytest.mark.parametrize("text", ["8xA100:8", "A100:0", "A100:65", ":8", "100"])
def test_bad_gpu_requests_name_the_param(text: str) -> None:
    with pytest.raises(JobParamsError, match="gpu"):
        parse_gpu(text)


@pytest.mark.parametrize(
    ("wanted", "offered", "ok"),
    [
        ("A100", "NVIDIA A100-SXM4-80GB", True),
        ("a100", "gpu_1x_a100", True),
        ("H100", "NVIDIA H100 80GB HBM3", True),
        ("RTX4090", "RTX 4090", True),
        ("A10", "NVIDIA A100-SXM4-80GB", False),
        ("A100", "NVIDIA A10", False),
        ("H100", None, False),
    ],
)
def test_gpu_names_match_whole_tokens(wanted: str, offered: str | None, ok: bool) -> None:
    assert gpu_matches(wanted, offered) is ok


OFFERS = [
    Offer("lambda", "gpu_1x_h100_pcie", 2.49, "us-east-1", "H100", 1),
    Offer("runpod", "NVIDIA H100 80GB HBM3", 2.69, "US", "NVIDIA H100 80GB HBM3", 1),
    Offer("vast", "ask-1", 1.89, "Quebec, CA", "H100 SXM", 1, spot=True),
    Offer("vast", "ask-2", 1.99, "Texas, US", "H100 PCIE", 1, available=False),
    Offer("lambda", "gpu_8x_h100_sxm5", 23.92, "us-west-1", "H100", 8),
    Offer("ec2", "p4d.24xlarge", 32.77, "us-east-1", "A100", 8),
]


def test_cheapest_fitting_offer_first_and_spot_only_when_allowed() -> None:
    ranked = rank_offers(OFFERS, request_from("H100"))
    assert [(o.provider, o.instance_type) for o in ranked] == [
        ("lambda", "gpu_1x_h100_pcie"),
        ("runpod", "NVIDIA H100 80GB HBM3"),
        ("lambda", "gpu_8x_h100_sxm5"),
    ]
    assert rank_offers(OFFERS, request_from("H100", spot=True))[0].instance_type == "ask-1"


def test_count_region_and_exact_instance_type() -> None:
    assert [o.instance_type for o in rank_offers(OFFERS, request_from("H100:8"))] == ["gpu_8x_h100_sxm5"]
    assert [o.provider for o in rank_offers(OFFERS, request_from("H100", regions=["US"]))] == ["runpod"]
    only = rank_offers(OFFERS, request_from("", instance_type="p4d.24xlarge"))
    assert [o.provider for o in only] == ["ec2"]


def test_no_offer_under_the_cap_says_what_the_cheapest_was() -> None:
    with pytest.raises(
        NoOfferError, match=r"max_price_per_hour 2 USD; the cheapest is 2.49 USD/h \(lambda gpu_1x_h100_pcie"
    ):
        rank_offers(OFFERS, request_from("H100", max_price_per_hour=2.0))


def test_nothing_matching_or_nothing_free_is_said_plainly() -> None:
    with pytest.raises(NoOfferError, match="no offer matches 1x B200"):
        rank_offers(OFFERS, request_from("B200"))
    with pytest.raises(NoOfferError, match="none has capacity now"):
        rank_offers(OFFERS, request_from("H100", regions=["Texas, US"]))
