"""The ``global.json`` contract: parse JSON-lines events and split a byte chunk into whole lines.

Pure functions, no I/O: the tailer reads bytes by offset, these turn them into events. A line is
``{"ts": ..., "phase": ..., "event": ..., "iteration": N, "epoch": N, "data": {...}}``; ``ts`` with
an offset is honoured, a naive ``ts`` is Asia/Kolkata (IST) as the legacy trainers write it, and
every timestamp leaves here in UTC.
"""

from __future__ import annotations

import dataclasses
import json
import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

try:  # zoneinfo needs the system tz database; IST has had no DST since 1945 either way.
    from zoneinfo import ZoneInfo

    IST: Any = ZoneInfo("Asia/Kolkata")
except Exception:  # pragma: no cover - minimal containers without tzdata
    IST = timezone(timedelta(hours=5, minutes=30), "IST")

GLOBAL_JSON = "global.json"

KNOWN_PHASES = frozenset(
    {
        "PROJECT",
        "GROUP_ITERATION",
        "ITERATION",
        "TRAJECTORY",
        "TRAINING",
        "EVAL_TRAINING",
        "EVAL_MODEL",
    }
)
# Longest line kept in an ingestion error record, so one huge garbage line cannot bloat the DB.
ERROR_EXCERPT_BYTES = 500


@dataclasses.dataclass(frozen=True)
class TrainingEvent:
    """One event of ``global.json``; ``offset`` is the byte offset where its line starts."""

    offset: int
    ts: datetime
    phase: str
    event: str
    iteration: int | None = None
    epoch: int | None = None
    data: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def kind(self) -> tuple[str, str]:
        return (self.phase, self.event)


@dataclasses.dataclass(frozen=True)
class MalformedLine:
    """A line that is not a valid event; it is recorded as an ingestion error and skipped."""

    offset: int
    reason: str
    excerpt: str


def parse_timestamp(value: Any) -> datetime:
    """Parse an ISO 8601 ``ts`` to an aware UTC datetime; naive values are IST."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"ts is not finite: {value!r}")
        return datetime.fromtimestamp(value, tz=UTC)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"ts must be an ISO 8601 string, got {value!r}")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=IST)
    return parsed.astimezone(UTC)


def _optional_int(payload: dict[str, Any], key: str) -> int | None:
    value = payload.get(key)
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    raise ValueError(f"{key} must be an integer, got {value!r}")


def parse_event(line: bytes, offset: int) -> TrainingEvent:
    """Parse one line (without its newline). Raises ``ValueError`` saying what is wrong."""
    try:
        payload = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"not valid JSON: {err}") from None
    if not isinstance(payload, dict):
        raise ValueError(f"expected a JSON object, got {type(payload).__name__}")
    phase, event = payload.get("phase"), payload.get("event")
    if not isinstance(phase, str) or not phase.strip():
        raise ValueError("missing or empty 'phase'")
    if not isinstance(event, str) or not event.strip():
        raise ValueError("missing or empty 'event'")
    if "ts" not in payload:
        raise ValueError("missing 'ts'")
    data = payload.get("data")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"'data' must be an object, got {type(data).__name__}")
    return TrainingEvent(
        offset=offset,
        ts=parse_timestamp(payload["ts"]),
        phase=phase.strip().upper(),
        event=event.strip().lower(),
        iteration=_optional_int(payload, "iteration"),
        epoch=_optional_int(payload, "epoch"),
        data=data,
    )


def split_lines(chunk: bytes, base_offset: int, *, final: bool = False) -> tuple[list[tuple[int, bytes]], int]:
    """Split ``chunk`` (read at ``base_offset``) into complete lines.

    Returns ``[(line_offset, line_without_newline), ...]`` and the number of bytes consumed. An
    unterminated last line is left for the next read unless ``final`` (the writer has exited).
    Blank lines are consumed but not returned.
    """
    lines: list[tuple[int, bytes]] = []
    start = 0
    while True:
        end = chunk.find(b"\n", start)
        if end < 0:
            break
        line = chunk[start:end].rstrip(b"\r")
        if line.strip():
            lines.append((base_offset + start, line))
        start = end + 1
    if final and start < len(chunk):
        tail = chunk[start:]
        if tail.strip():
            lines.append((base_offset + start, tail.rstrip(b"\r")))
        start = len(chunk)
    return lines, start


def parse_chunk(
    chunk: bytes, base_offset: int, *, final: bool = False
) -> tuple[list[TrainingEvent], list[MalformedLine], int]:
    """Parse every complete line of ``chunk``: events, malformed lines, bytes consumed."""
    events: list[TrainingEvent] = []
    errors: list[MalformedLine] = []
    lines, consumed = split_lines(chunk, base_offset, final=final)
    for offset, line in lines:
        try:
            events.append(parse_event(line, offset))
        except ValueError as err:
            excerpt = line[:ERROR_EXCERPT_BYTES].decode("utf-8", errors="replace")
            errors.append(MalformedLine(offset=offset, reason=str(err), excerpt=excerpt))
    return events, errors, consumed
