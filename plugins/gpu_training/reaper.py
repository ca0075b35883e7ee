"""The reaper: terminates GPU instances that no live job needs any more, at every configured cloud.

A job's own teardown terminates its instances; the reaper catches what that missed: an instance
whose job has ended, whose dag run was deleted or finished without tearing down, or that carries our
name prefix while no record in the results DB claims it. Each is left alone for a grace period
(its own teardown may still be running). Instances without the prefix are never touched.

Plain functions over the results store and the providers; the operator
(:mod:`gpu_training.reaper_operator`) only supplies the clouds, the clock and the dag run lookup.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update

from gpu_training.errors import InstanceNotFoundError
from gpu_training.errors import ReapError as ReapError  # its home was here: still importable from here
from gpu_training.lifecycle import settle_terminated, terminate_until_gone
from gpu_training.providers.base import NAME_PREFIX, ComputeProvider, InstanceInfo
from gpu_training.results.models import Instance, TrainingJob
from gpu_training.results.states import InstanceState
from gpu_training.results.store import ResultsStore, is_terminal

log = logging.getLogger(__name__)

DEFAULT_GRACE = timedelta(minutes=15)
#: How long the reaper keeps terminating one instance before reporting it and moving on: short, so
#: one stuck instance does not hold up the others (the next run tries again).
REAP_TERMINATE_BUDGET = timedelta(minutes=2)
#: Instance rows in these states are settled; any other state claims a live instance.
SETTLED_STATES = (InstanceState.TERMINATED, InstanceState.FAILED)
#: Dag run states after which the run does nothing more (its teardown has run, or never will).
FINISHED_RUN_STATES = frozenset({"success", "failed"})

#: ``(dag_id, run_id) -> state`` of the dag run ("queued", "running", "success", "failed"), or None
#: when no such run exists (deleted). Raises when it cannot tell.
DagRunLookup = Callable[[str, str], str | None]


@dataclasses.dataclass(frozen=True)
class ReapAction:
    """One instance (or instance record) and what the reaper did about it, and why."""

    name: str
    instance_id: str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ProviderReport:
    """What the reaper found and did at one cloud."""

    provider: str
    listed: int = 0  # live instances the cloud listed, ours or not
    ours: int = 0  # of those, the ones with our name prefix
    terminated: list[ReapAction] = dataclasses.field(default_factory=list)
    settled: list[ReapAction] = dataclasses.field(default_factory=list)  # records of instances already gone
    left_alone: list[ReapAction] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "listed": self.listed,
            "ours": self.ours,
            "terminated": [a.to_dict() for a in self.terminated],
            "settled": [a.to_dict() for a in self.settled],
            "left_alone": [a.to_dict() for a in self.left_alone],
            "errors": list(self.errors),
        }


@dataclasses.dataclass
class ReapReport:
    """The reaper's summary per cloud; ``first_seen`` is carried to the next run, not reported."""

    dry_run: bool
    grace: timedelta
    providers: dict[str, ProviderReport] = dataclasses.field(default_factory=dict)
    errors: list[str] = dataclasses.field(default_factory=list)  # not tied to one cloud (dag run lookups)
    #: ``provider:instance_id`` -> when an unrecorded instance of ours was first listed.
    first_seen: dict[str, datetime] = dataclasses.field(default_factory=dict)

    def provider(self, name: str) -> ProviderReport:
        return self.providers.setdefault(name, ProviderReport(name))

    @property
    def all_errors(self) -> list[str]:
        return [f"{p.provider}: {e}" for p in self.providers.values() for e in p.errors] + self.errors

    def to_dict(self) -> dict[str, Any]:
        """The summary returned as the task's XCom: counts, names, ids and reasons only."""
        return {
            "dry_run": self.dry_run,
            "grace_minutes": self.grace.total_seconds() / 60,
            "providers": {name: part.to_dict() for name, part in self.providers.items()},
            "errors": list(self.errors),
        }

    def lines(self) -> list[str]:
        """The summary as readable log lines."""
        verb = "would terminate" if self.dry_run else "terminated"
        settle = "would settle" if self.dry_run else "settled"
        out = [
            f"reaper: {len(self.providers)} cloud(s), grace {_minutes(self.grace)}"
            + (", DRY RUN" if self.dry_run else "")
        ]
        for name, part in self.providers.items():
            out.append(
                f"{name}: listed {part.listed}, ours {part.ours}, {verb} {len(part.terminated)}, "
                f"{settle} {len(part.settled)}, left alone {len(part.left_alone)}, errors {len(part.errors)}"
            )
            for what, actions in ((verb, part.terminated), (settle, part.settled), ("left alone", part.left_alone)):
                out.extend(f"{name}: {what} {a.name} ({a.instance_id or 'no id'}): {a.reason}" for a in actions)
            out.extend(f"{name}: ERROR {e}" for e in part.errors)
        out.extend(f"ERROR {e}" for e in self.errors)
        return out


@dataclasses.dataclass(frozen=True)
class _Verdict:
    reap: bool
    reason: str


def reap(
    store: ResultsStore,
    providers: Mapping[str, ComputeProvider],
    *,
    now: datetime,
    grace: timedelta = DEFAULT_GRACE,
    dag_run_state: DagRunLookup,
    dry_run: bool = False,
    first_seen: Mapping[str, datetime] | None = None,
    budget: timedelta = REAP_TERMINATE_BUDGET,
) -> ReapReport:
    """Find and terminate the instances no live job needs, at each of ``providers``; never raises.

    ``first_seen`` (from the previous run's :attr:`ReapReport.first_seen`) dates the unrecorded
    instances, whose age the clouds do not report. A cloud that fails is reported in its part of
    the report and the others are still handled.
    """
    report = ReapReport(dry_run=dry_run, grace=grace)
    reaper = _Reaper(store, report, now, grace, _CachedRuns(dag_run_state, report), dry_run, budget)
    previous = dict(first_seen or {})
    for name, provider in providers.items():
        if not reaper.reap_provider(name, provider, previous):
            # Not listed this time: keep its instances' dates for the next run.
            report.first_seen.update({k: v for k, v in previous.items() if k.startswith(f"{name}:")})
    return report


class _CachedRuns:
    """Asks for each dag run's state once per reaper run; a failed lookup is reported once."""

    def __init__(self, lookup: DagRunLookup, report: ReapReport) -> None:
        self.lookup = lookup
        self.report = report
        self.states: dict[tuple[str, str], tuple[bool, str | None]] = {}

    def state(self, dag_id: str, run_id: str) -> tuple[bool, str | None]:
        """(known, state): known is False when the lookup failed."""
        key = (dag_id, run_id)
        if key not in self.states:
            try:
                self.states[key] = (True, _state_name(self.lookup(dag_id, run_id)))
            except Exception as err:
                self.report.errors.append(f"could not get the state of dag run {dag_id}/{run_id}: {err}")
                self.states[key] = (False, None)
        return self.states[key]


def _state_name(state: Any) -> str | None:
    return None if state is None else str(getattr(state, "value", state))


class _Reaper:
    def __init__(
        self,
        store: ResultsStore,
        report: ReapReport,
        now: datetime,
        grace: timedelta,
        runs: _CachedRuns,
        dry_run: bool,
        budget: timedelta,
    ) -> None:
        self.store = store
        self.report = report
        self.now = now
        self.grace = grace
        self.runs = runs
        self.dry_run = dry_run
        self.budget = budget

    def reap_provider(self, name: str, provider: ComputeProvider, previous: Mapping[str, datetime]) -> bool:
        """Handle one cloud; False when it could not be listed (nothing else was tried there)."""
        part = self.report.provider(name)
        try:
            # Every named instance, so the prefix check below is ours, not only the cloud's filter.
            listed = provider.list_instances("")
        except Exception as err:
            log.warning("%s: listing instances failed: %s", name, err)
            part.errors.append(f"listing instances failed: {_describe(err)}")
            return False
        ours = [info for info in listed if info.name.startswith(NAME_PREFIX)]
        part.listed, part.ours = len(listed), len(ours)
        try:
            # Read after listing: a launch records its row before calling the cloud, so any instance
            # just listed that a job launched already has its row here.
            records = _records(self.store, name, [info.name for info in ours])
        except Exception as err:
            log.warning("%s: reading the results DB failed: %s", name, err)
            part.errors.append(f"reading instance records from the results DB failed: {_describe(err)}")
            return True  # without the records every instance would look unclaimed: touch nothing
        by_name = {record.name: (record, job) for record, job in records}
        for info in ours:
            claimed = by_name.get(info.name)
            if claimed is None:
                key = f"{name}:{info.instance_id}"
                seen = min(previous.get(key, self.now), self.now)
                self.report.first_seen[key] = seen
                verdict = self._unrecorded(seen)
            else:
                verdict = self._claimed(claimed[0], claimed[1])
            self._act(part, provider, info, claimed[0] if claimed else None, verdict)
        listed_names = {info.name for info in ours}
        for record, job in records:
            if record.name in listed_names or record.state in SETTLED_STATES or record.provider != name:
                continue
            self._settle_unlisted(part, provider, record, job)
        return True

    # --- verdicts --------------------------------------------------------------------------------

    def _age(self, since: datetime) -> timedelta:
        return max(timedelta(0), self.now - since)

    def _unrecorded(self, seen: datetime) -> _Verdict:
        age = self._age(seen)
        if age < self.grace:
            return _Verdict(False, f"no record claims it; first seen {_minutes(age)} ago, within the grace")
        return _Verdict(True, f"no record claims it (first seen {_minutes(age)} ago)")

    def _claimed(self, record: Instance, job: TrainingJob) -> _Verdict:
        age = self._age(record.launched_at or record.created_at)
        if age < self.grace:
            return _Verdict(False, f"launched {_minutes(age)} ago, within the grace")
        # A job ends when ``finalize`` settles it (``completed_at``). A status that is already
        # terminal before that (a step's failure, a cancel) still has upload and teardown to come:
        # its dag run decides below.
        if is_terminal(job.status) and job.completed_at is not None:
            ended = self._age(job.completed_at)
            if ended < self.grace:
                return _Verdict(False, f"job {job.uuid} {job.status} {_minutes(ended)} ago: its teardown may still run")
            return _Verdict(True, f"job {job.uuid} {job.status} {_minutes(ended)} ago")
        known, state = self.runs.state(job.dag_id, job.run_id)
        run = f"dag run {job.dag_id}/{job.run_id}"
        if not known:
            return _Verdict(False, f"job {job.uuid} {job.status}; could not check its {run}")
        if state is not None and state not in FINISHED_RUN_STATES:
            return _Verdict(False, f"job {job.uuid} {job.status}, {run} {state}")
        gone = "no longer exists" if state is None else f"ended {state}"
        quiet = self._age(job.updated_at)
        if quiet < self.grace:
            return _Verdict(False, f"{run} {gone}, but job {job.uuid} changed {_minutes(quiet)} ago")
        return _Verdict(True, f"{run} {gone} while job {job.uuid} is still {job.status}")

    # --- actions ---------------------------------------------------------------------------------

    def _act(
        self, part: ProviderReport, provider: ComputeProvider, info: InstanceInfo, record: Instance | None, v: _Verdict
    ) -> None:
        action = ReapAction(info.name, info.instance_id, v.reason)
        if not v.reap:
            part.left_alone.append(action)
            return
        if self.dry_run:
            part.terminated.append(action)
            return
        try:
            terminate_until_gone(provider, info.instance_id, budget=self.budget)
            if record is not None and record.state != "terminated":
                self._settle(record, info.instance_id, f"reaped: {v.reason}")
        except Exception as err:
            log.warning("%s: terminating %s (%s) failed: %s", part.provider, info.name, info.instance_id, err)
            part.errors.append(f"terminating {info.name} ({info.instance_id}) failed: {_describe(err)}")
            return
        part.terminated.append(action)

    def _settle_unlisted(
        self, part: ProviderReport, provider: ComputeProvider, record: Instance, job: TrainingJob
    ) -> None:
        """A record that claims a live instance the cloud did not list: verify it, then settle it."""
        verdict = self._claimed(record, job)
        if not verdict.reap:
            part.left_alone.append(
                ReapAction(record.name, record.instance_id, f"not listed by the cloud; {verdict.reason}")
            )
            return
        try:
            info = _lookup(provider, record)
        except Exception as err:
            part.errors.append(
                f"checking unlisted {record.name} ({record.instance_id or 'no id'}) failed: {_describe(err)}"
            )
            return
        if info is not None and not info.state.is_gone:  # ours by its record, though not listed
            if not info.name.startswith(NAME_PREFIX):
                part.errors.append(f"{record.name} ({info.instance_id}) is live but not named as ours: not touched")
                return
            self._act(part, provider, info, record, verdict)
            return
        if info is None and not record.instance_id:
            reason = f"never launched; {verdict.reason}"
        else:
            reason = f"gone at the cloud ({info.state if info else 'not found'}); {verdict.reason}"
        action = ReapAction(record.name, record.instance_id, reason)
        if not self.dry_run:
            try:
                if info is None and not record.instance_id:
                    self.store.update_instance(
                        record.name, state=InstanceState.FAILED, state_reason=record.state_reason or "never launched"
                    )
                else:
                    self._settle(record, record.instance_id, f"reaped: {reason}")
            except Exception as err:
                part.errors.append(f"settling the record of {record.name} failed: {_describe(err)}")
                return
        part.settled.append(action)

    def _settle(self, record: Instance, instance_id: str | None, reason: str) -> None:
        """Record a verified termination and its cost as the job's teardown does, and the job's total."""
        # billed until it was verified gone, now (``self.now`` is the clock the verdicts use)
        settle_terminated(self.store, record, instance_id, reason=reason)
        # The job's cost as teardown sets it; updated_at is left alone (the verdicts read it).
        with self.store.session() as s, s.begin():
            costs = s.scalars(select(Instance.cost_usd).where(Instance.job_id == record.job_id)).all()
            s.execute(
                update(TrainingJob)
                .where(TrainingJob.id == record.job_id)
                .values(cost_usd=round(sum(c or 0.0 for c in costs), 6), updated_at=TrainingJob.updated_at)
            )


def _records(store: ResultsStore, provider: str, names: list[str]) -> list[tuple[Instance, TrainingJob]]:
    """Records of the listed instances (by name), and every record of this cloud that claims a live one."""
    claims_live = and_(Instance.provider == provider, Instance.state.not_in(SETTLED_STATES))
    where = or_(Instance.name.in_(names), claims_live) if names else claims_live
    with store.session() as s:
        rows = s.execute(
            select(Instance, TrainingJob).join(TrainingJob, Instance.job_id == TrainingJob.id).where(where)
        ).all()
    return [(row[0], row[1]) for row in rows]


def _lookup(provider: ComputeProvider, record: Instance) -> InstanceInfo | None:
    """The cloud's view of a recorded instance; None when it does not know it."""
    if record.instance_id:
        try:
            return provider.get_instance(record.instance_id)
        except InstanceNotFoundError:
            return None
    return provider.find_instance(record.name)


def _describe(err: BaseException) -> str:
    return str(err) or type(err).__name__


def _minutes(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 60:.1f} min"


def first_seen_from_json(data: Any) -> dict[str, datetime]:
    """Parse stored ``first_seen`` (``{"provider:id": iso}``); anything unreadable is dropped."""
    out: dict[str, datetime] = {}
    if not isinstance(data, dict):
        return out
    for key, value in data.items():
        try:
            when = datetime.fromisoformat(str(value))
        except ValueError:
            continue
        if when.tzinfo is not None:
            out[str(key)] = when
    return out


def first_seen_to_json(first_seen: Mapping[str, datetime]) -> dict[str, str]:
    return {key: when.isoformat() for key, when in sorted(first_seen.items())}


def cloud_providers(names: tuple[str, ...]) -> dict[str, ComputeProvider]:
    """The providers of these clouds (configured from their own connections; no I/O yet)."""
    from gpu_training.providers.registry import get_provider

    return {name: get_provider(name) for name in names}
