"""On-demand EC2 prices for offers: the AWS Price List, cached for a day; a dated table when it cannot be asked.

:class:`Ec2OnDemandPrices` asks :class:`~gpu_training.hooks.ec2_pricing.Ec2PricingHook` for the Linux
on-demand price of each (region, instance type) it has no fresh answer for, and keeps every answer in
a :class:`PriceCache` for :data:`CACHE_TTL`, "the price list has no such product" included (such a
type is not offered in that region: no price is made up for it).

When the API cannot be used (no permission ``pricing:GetProducts``, no network, throttled past
botocore's retries, a connection that cannot make a pricing client) the prices come from the
provider's built-in table, which is dated; a warning says so once per provider, with the table's
date and why. The failure is remembered in the cache for :data:`RETRY_AFTER_FAILURE`, so the tasks
that follow do not each wait for the same timeout.

The cache is a JSON file, not the results database: prices are neither job results nor state a
retry needs, every task process on a machine shares the file, and a file on a volume all workers
mount (the ``price_cache`` setting) makes one lookup a day serve the whole deployment. Writes merge
under an exclusive ``flock`` and replace the file atomically; an unreadable file is an empty cache,
an unwritable one only costs more lookups.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Callable, Collection, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gpu_training.errors import ProviderError

log = logging.getLogger(__name__)

#: How long a price list answer is used without asking again.
CACHE_TTL = timedelta(days=1)
#: How long a failed lookup keeps the table in use before the API is asked again.
RETRY_AFTER_FAILURE = timedelta(minutes=15)
#: Answers older than this are dropped from the file when it is written.
KEEP_FOR = timedelta(days=7)
CACHE_FORMAT = 1


def _now() -> datetime:
    return datetime.now(UTC)


def _when(value: Any) -> datetime | None:
    try:
        when = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@dataclasses.dataclass(frozen=True)
class CachedPrice:
    """One price list answer: USD per hour, or None when the price list has no such product."""

    price: float | None
    fetched_at: datetime


@dataclasses.dataclass(frozen=True)
class ApiFailure:
    """The price list API could not be used with a connection, since ``at``."""

    at: datetime
    reason: str


@dataclasses.dataclass
class CacheContents:
    prices: dict[tuple[str, str], CachedPrice] = dataclasses.field(default_factory=dict)
    failures: dict[str, ApiFailure] = dataclasses.field(default_factory=dict)


class PriceCache:
    """A JSON file of price list answers keyed by (region, instance type), with their fetch times."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def read(self) -> CacheContents:
        """What the file holds; a missing or unreadable file is an empty cache."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return CacheContents()
        except (OSError, ValueError) as err:
            log.warning("EC2 price cache %s not read (%s); treated as empty", self.path, err)
            return CacheContents()
        return self._parse(data)

    @staticmethod
    def _parse(data: Any) -> CacheContents:
        contents = CacheContents()
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            return contents
        for key, entry in (data.get("prices") or {}).items():
            region, _, itype = str(key).partition("/")
            when = _when((entry or {}).get("fetched_at")) if isinstance(entry, dict) else None
            price = entry.get("price") if isinstance(entry, dict) else None
            if not itype or when is None or not (price is None or isinstance(price, int | float)):
                continue
            contents.prices[region, itype] = CachedPrice(None if price is None else float(price), when)
        for conn_id, entry in (data.get("failures") or {}).items():
            when = _when((entry or {}).get("at")) if isinstance(entry, dict) else None
            if when is not None:
                contents.failures[str(conn_id)] = ApiFailure(when, str(entry.get("reason") or ""))
        return contents

    def update(
        self,
        prices: Mapping[tuple[str, str], CachedPrice],
        failures: Mapping[str, ApiFailure | None],
        *,
        now: datetime,
    ) -> None:
        """Merge new answers (and failures set or cleared, None clearing) into the file, atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            contents = self.read()
            contents.prices.update(prices)
            for conn_id, failure in failures.items():
                if failure is None:
                    contents.failures.pop(conn_id, None)
                else:
                    contents.failures[conn_id] = failure
            data = {
                "format": CACHE_FORMAT,
                "prices": {
                    f"{region}/{itype}": {"price": entry.price, "fetched_at": entry.fetched_at.isoformat()}
                    for (region, itype), entry in sorted(contents.prices.items())
                    if now - entry.fetched_at < KEEP_FOR
                },
                "failures": {
                    conn_id: {"at": failure.at.isoformat(), "reason": failure.reason}
                    for conn_id, failure in sorted(contents.failures.items())
                },
            }
            fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as out:
                    json.dump(data, out, indent=1)
                os.chmod(tmp, 0o644)  # public prices; readable by every worker user
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


class Ec2OnDemandPrices:
    """Linux on-demand USD/hour per (region, instance type), for one provider (one connection).

    ``pricing_hook`` makes the :class:`~gpu_training.hooks.ec2_pricing.Ec2PricingHook` on first
    need (nothing is created while the cache answers); ``table`` and ``table_date`` are the fallback.
    """

    def __init__(
        self,
        pricing_hook: Callable[[], Any],
        cache: PriceCache,
        table: Mapping[str, float],
        table_date: str,
        *,
        conn_id: str,
        now: Callable[[], datetime] = _now,
    ) -> None:
        self._make_hook = pricing_hook
        self._hook: Any = None
        self.cache = cache
        self.table = dict(table)
        self.table_date = table_date
        self.conn_id = conn_id
        self.now = now
        #: Why the API is not used by this provider (set on the first failure); None while it works.
        self.unavailable: str | None = None
        self._said_unlisted: set[tuple[str, str]] = set()
        self._said_fallback = False
        self._cache_unwritable = False

    def prices(self, region: str, instance_types: Collection[str]) -> dict[str, float]:
        """``{type: USD per hour}``. A type the price list has no Linux on-demand product for in
        ``region`` is left out: it is not offered there."""
        if not instance_types:
            return {}
        now = self.now()
        contents = self.cache.read()
        prices: dict[str, float] = {}
        todo = []
        for itype in sorted(set(instance_types)):
            entry = contents.prices.get((region, itype))
            if entry is not None and timedelta(0) <= now - entry.fetched_at < CACHE_TTL:
                self._take(prices, region, itype, entry.price)
            else:
                todo.append(itype)
        if not todo:
            return prices
        why = self.unavailable or self._remembered_failure(contents, now)
        fetched: dict[tuple[str, str], CachedPrice] = {}
        failures: dict[str, ApiFailure | None] = {}
        if why is None:
            try:
                hook = self._hook = self._hook or self._make_hook()
                for itype in list(todo):
                    price = hook.on_demand_price(region, itype)
                    fetched[region, itype] = CachedPrice(price, now)
                    todo.remove(itype)
                    self._take(prices, region, itype, price)
            except ProviderError as err:
                why = self.unavailable = str(err)
                failures[self.conn_id] = ApiFailure(now, why)
            else:
                if self.conn_id in contents.failures:
                    failures[self.conn_id] = None
        if why is not None:
            self._say_fallback(why)
            prices.update({itype: self.table[itype] for itype in todo if itype in self.table})
        if fetched or failures:
            self._write(fetched, failures, now)
        return prices

    def _remembered_failure(self, contents: CacheContents, now: datetime) -> str | None:
        failure = contents.failures.get(self.conn_id)
        if failure is None or not timedelta(0) <= now - failure.at < RETRY_AFTER_FAILURE:
            return None
        again = (failure.at + RETRY_AFTER_FAILURE).isoformat(timespec="seconds")
        return f"it failed at {failure.at.isoformat(timespec='seconds')} ({failure.reason}); asked again after {again}"

    def _take(self, prices: dict[str, float], region: str, itype: str, price: float | None) -> None:
        if price is not None:
            prices[itype] = price
        elif (region, itype) not in self._said_unlisted:
            self._said_unlisted.add((region, itype))
            log.info(
                "the AWS price list has no Linux on-demand price for %s in %s: not offered there "
                "(a price in the gpu_training.prices setting of connection %r would offer it)",
                itype,
                region,
                self.conn_id,
            )

    def _say_fallback(self, why: str) -> None:
        if self._said_fallback:
            return
        self._said_fallback = True
        log.warning(
            "EC2 on-demand prices come from the built-in table dated %s (us-east-1 prices, used for every "
            "region) because the AWS Price List API was not used: %s",
            self.table_date,
            why,
        )

    def _write(
        self, fetched: Mapping[tuple[str, str], CachedPrice], failures: Mapping[str, ApiFailure | None], now: datetime
    ) -> None:
        try:
            self.cache.update(fetched, failures, now=now)
        except OSError as err:
            if not self._cache_unwritable:
                self._cache_unwritable = True
                log.warning(
                    "EC2 price cache %s not written (%s); prices are looked up again next time", self.cache.path, err
                )
