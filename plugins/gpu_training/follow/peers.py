"""The other nodes of a multi-node job, watched while node 0 is followed.

:class:`PeerWatch` asks each node for its trainer's status at every check and names the node whose
trainer failed first (or whose host stopped answering) as the cause of the job's end: the others
only lost their peer.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from datetime import timedelta

from gpu_training.errors import HostError
from gpu_training.follow.sources import (
    Source,
    SourceUnreachable,
    ThrottledWarnings,
    last_log_lines,
    trainer_ended_at,
)
from gpu_training.hosts.base import TrainerStatus
from gpu_training.progress import FollowOutcome, Verdict, exit_description, with_log_tail


@dataclasses.dataclass
class Peer:
    """Another node of a multi-node job: its trainer is watched and its log shown with its rank
    (node 0, the followed source, writes global.json)."""

    rank: int
    name: str
    source: Source
    #: ``[body, *args]`` of the script printing this node's trainer status.
    status_command: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class NodeFailure:
    """A node's trainer failed: why the job ends, and that trainer's exit code (None: unknown)."""

    verdict: Verdict
    exit_code: int | None


class PeerWatch:
    """Checks the other nodes' trainers (see the module docstring)."""

    def __init__(
        self,
        peers: Sequence[Peer],
        *,
        head: Source,
        unreachable_timeout: timedelta,
        parse_status: Callable[[int, str, str], TrainerStatus],
        warnings: ThrottledWarnings,
    ) -> None:
        self.peers = list(peers)
        self.head = head
        self.unreachable_timeout = unreachable_timeout
        self.parse_status = parse_status
        self.warnings = warnings

    async def failure(self, head: TrainerStatus | None) -> NodeFailure | None:
        """The failure that ends the job, if a node's trainer died (or its host stopped answering).
        When several ended, the node that ended first is the cause (the others lost their peer); one
        killed with its wrapper (no exit code) counts as first. ``head``: node 0's status; node 0
        failing first is no node failure (it is judged as its own trainer's exit)."""
        statuses = await asyncio.gather(*(self._status(peer) for peer in self.peers))
        failed: list[tuple[float, Peer | None, TrainerStatus | None, str]] = []
        limit = self.unreachable_timeout.total_seconds()
        for peer, status in zip(self.peers, statuses, strict=True):
            if status is None:
                if peer.source.unreachable_for() > limit:
                    reason = f"host unreachable for more than {limit / 60:g} min: {peer.source.last_error}"
                    failed.append((0.0, peer, None, reason))
                continue
            if not status.started:
                failed.append((0.0, peer, status, "the trainer is not running: it was never started on the node"))
            elif not status.running and status.exit_code != 0:
                failed.append(
                    (await trainer_ended_at(peer.source), peer, status, f"trainer {exit_description(status)}")
                )
        if not failed:
            return None
        if head is not None and head.started and not head.running and head.exit_code != 0:
            failed.append((await trainer_ended_at(self.head), None, head, f"trainer {exit_description(head)}"))
        _, culprit, ended, reason = min(failed, key=lambda f: (f[0], f[1] is None))
        if culprit is None:
            return None  # node 0 failed first: judged as its own trainer exit
        tail = await last_log_lines(culprit.source)
        reason = with_log_tail(f"node {culprit.rank} ({culprit.name}): {reason}", tail)
        return NodeFailure(
            Verdict(FollowOutcome.NODE_FAILED, False, reason), ended.exit_code if ended is not None else None
        )

    async def _status(self, peer: Peer) -> TrainerStatus | None:
        try:
            return self.parse_status(*await peer.source.script(*peer.status_command))
        except (SourceUnreachable, HostError, TimeoutError, OSError) as err:
            self.warnings.warn(f"status {peer.rank}", f"node {peer.rank}: trainer status unknown: {err}")
            return None
