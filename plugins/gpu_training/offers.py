"""Choosing where a job runs: the GPU request, which offers fit it, cheapest first.

Pure functions over :class:`~gpu_training.providers.base.Offer` lists, so the choice is the same
whichever clouds answered. Launch-time failover walks the ranked list (a cloud may refuse an offer
it listed as available).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from gpu_training.errors import JobParamsError, NoOfferError
from gpu_training.providers.base import GpuRequest, Offer

_GPU_RE = re.compile(r"^\s*(?:(?P<pre>\d+)\s*[xX]\s*)?(?P<name>[A-Za-z][A-Za-z0-9 _.-]*?)\s*(?::\s*(?P<post>\d+))?\s*$")


def parse_gpu(text: str) -> tuple[str | None, int]:
    """``"H100"`` -> (H100, 1); ``"A100:8"`` and ``"8xA100"`` -> (A100, 8); ``""`` -> (None, 1)."""
    if not text or not text.strip():
        return None, 1
    match = _GPU_RE.match(text)
    if not match or (match["pre"] and match["post"]):
        raise JobParamsError("gpu", f"{text!r} is not a GPU request; use e.g. 'H100', 'A100:8' or '8xA100'")
    count = int(match["pre"] or match["post"] or 1)
    if not 1 <= count <= 64:
        raise JobParamsError("gpu", f"GPU count must be 1-64 (got {count})")
    return match["name"].strip(), count


def gpu_matches(wanted: str | None, offered: str | None) -> bool:
    """``A100`` matches ``NVIDIA A100-SXM4-80GB``, ``a100_80gb`` and ``gpu_1x_a100``; ``RTX4090``
    matches ``RTX 4090``; ``A10`` does not match ``A100`` (whole name tokens only)."""
    if wanted is None:
        return True
    if not offered:
        return False
    want = re.sub(r"[^a-z0-9]", "", wanted.lower())
    tokens = re.findall(r"[a-z0-9]+", offered.lower())
    return any("".join(tokens[i:j]) == want for i in range(len(tokens)) for j in range(i + 1, len(tokens) + 1))


def fits(offer: Offer, request: GpuRequest) -> bool:
    """Whether an offer satisfies the request, price cap aside."""
    if request.instance_type and offer.instance_type != request.instance_type:
        return False
    if request.gpu is not None and not gpu_matches(request.gpu, offer.gpu_name):
        return False
    if request.gpu is not None and offer.gpu_count < request.gpu_count:
        return False
    if request.regions and offer.region not in request.regions:
        return False
    return request.spot or not offer.spot


def rank_offers(offers: Iterable[Offer], request: GpuRequest) -> list[Offer]:
    """Offers that fit, have capacity and are under the price cap, cheapest first.

    Raises :class:`NoOfferError` saying why nothing qualified (and what the cheapest fitting
    offer costs when the cap excluded everything).
    """
    fitting = [o for o in offers if fits(o, request)]
    if not fitting:
        raise NoOfferError(f"no offer matches {describe(request)}")
    free = [o for o in fitting if o.available]
    if not free:
        raise NoOfferError(f"{len(fitting)} offers match {describe(request)} but none has capacity now")
    cap = request.max_price_per_hour
    under = [o for o in free if cap is None or o.price_per_hour <= cap]
    if not under:
        cheapest = min(free, key=lambda o: o.price_per_hour)
        raise NoOfferError(
            f"no offer for {describe(request)} at or under max_price_per_hour {cap:g} USD; the cheapest is "
            f"{cheapest.price_per_hour:g} USD/h ({cheapest.provider} {cheapest.instance_type}"
            f"{' in ' + cheapest.region if cheapest.region else ''})"
        )
    return sorted(under, key=lambda o: (o.price_per_hour, o.spot is False, o.provider, o.instance_type, o.region or ""))


def describe(request: GpuRequest) -> str:
    parts = [f"{request.gpu_count}x {request.gpu}" if request.gpu else "any GPU"]
    if request.instance_type:
        parts.append(f"instance type {request.instance_type}")
    if request.regions:
        parts.append("regions " + ",".join(request.regions))
    parts.append("spot allowed" if request.spot else "on-demand only")
    return ", ".join(parts)


def request_from(
    gpu: str,
    *,
    instance_type: str = "",
    regions: Sequence[str] = (),
    max_price_per_hour: float = 0,
    spot: bool = False,
) -> GpuRequest:
    """The request from the job's params (``max_price_per_hour`` 0 means no cap)."""
    name, count = parse_gpu(gpu)
    return GpuRequest(
        gpu=name,
        gpu_count=count,
        instance_type=instance_type or None,
        regions=tuple(regions),
        max_price_per_hour=max_price_per_hour or None,
        spot=spot,
    )
