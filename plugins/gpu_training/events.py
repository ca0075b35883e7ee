"""The ``global.json`` contract: parse JSON-lines events and split a byte chunk into whole lines.

Pure functions, no I/O: the tailer reads bytes by offset, these turn them into events. A line is
``{"ts": ..., "phase": ..., "event": ..., "iteration": N, "epoch": N, "data": {...}}``; ``ts`` with
an offset is honoured, a naive ``ts`` is Asia/Kolkata (IST) as the legacy trainers write it, and
every timestamp leaves here in UTC.

No line can stop ingestion: one nested deeper than :data:`MAX_JSON_DEPTH` is refused before it is
parsed (``json`` parses recursively), and anything a line raises while it is parsed makes it a
malformed line, recorded with its offset like any other.

A plain line is decoded by :class:`LineDecoder` (``msgspec``, about 3x ``json``'s scanner); any line
it does not take as plain JSON (``NaN``, ``Infinity``, a number beyond a double, a lone surrogate,
invalid UTF-8, a syntax error) goes to :func:`parse_event` and ``json``, which accepts it or says
what is wrong: the result is the same with either decoder (``tests/test_events.py``).

What leaves here fits every results DB backend: ``iteration`` and ``epoch`` are 32-bit integers (a
line with a larger one is malformed), and no text holds U+0000 (PostgreSQL's ``text`` and ``jsonb``
cannot; a ``\\u0000`` becomes U+FFFD).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import gc
import json
import json.scanner
import math
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec

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
#: The deepest nesting of arrays and objects a line may have. ``json`` parses recursively (a line
#: 1000 deep raises ``RecursionError``), as do the writers that store ``data``; no field of the
#: contract needs more than a few levels.
MAX_JSON_DEPTH = 64
#: The range of ``iteration`` and ``epoch``: ``integer`` columns, 32 bits on PostgreSQL.
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

# Asia/Kolkata has been UTC+05:30 without DST since 1945-10-15; from then on a naive IST ts is
# converted by subtracting the fixed offset (the same result as ZoneInfo, without its lookup).
_IST_FIXED_SINCE = datetime(1946, 1, 1)
_IST_OFFSET = timedelta(hours=5, minutes=30)


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
    try:
        return _parse_timestamp(value)
    except OverflowError as err:  # e.g. 0001-01-01T00:00:00+05:30 is before datetime.min in UTC
        raise ValueError(f"ts {value!r} is out of range ({err})") from None


def _parse_timestamp(value: Any) -> datetime:
    if type(value) is str:  # the fast path: a well-formed ISO string, as every trainer writes
        try:
            parsed = _fromisoformat(value)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is None:
                if parsed >= _IST_FIXED_SINCE:
                    return (parsed - _IST_OFFSET).replace(tzinfo=UTC)
                return parsed.replace(tzinfo=IST).astimezone(UTC)
            return parsed.astimezone(UTC)
    return _parse_timestamp_slow(value)


_fromisoformat = datetime.fromisoformat


def _parse_timestamp_slow(value: Any) -> datetime:
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
    number: int | None = None
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        number = int(value.strip())
    if number is None:
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if not INT32_MIN <= number <= INT32_MAX:
        raise ValueError(f"{key} must be an integer from {INT32_MIN} to {INT32_MAX}, got {value!r}")
    return number


def nested_deeper_than(line: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text ``line`` nests arrays and objects deeper than ``limit``, found without
    recursion and in linear time (C-speed byte operations; a line of a few brackets costs two counts)."""
    if line.count(b"[") + line.count(b"{") <= limit:
        return False
    # Outside strings every bracket counts: drop escapes (a backslash only occurs in strings and
    # always starts an escape, so dropping its pairs left to right leaves the quotes that delimit
    # strings), then the strings, then everything but brackets.
    text = line.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = _STRING.sub(b"", text).translate(_AS_OPEN_CLOSE, _NOT_BRACKETS)
    if not brackets:
        return False
    import numpy as np  # only for lines with many brackets: the running depth in C

    depth = np.cumsum(np.frombuffer(brackets, dtype=np.int8), dtype=np.int64)
    return bool(depth.max() > limit)


_STRING = re.compile(rb'"[^"]*"')
#: Opening brackets become +1, closing ones -1 (as int8), everything else is deleted.
_AS_OPEN_CLOSE = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def parse_event(line: bytes, offset: int) -> TrainingEvent:
    """Parse one line (without its newline). Raises ``ValueError`` saying what is wrong."""
    if nested_deeper_than(line, MAX_JSON_DEPTH):
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels of arrays and objects")
    try:
        payload = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"not valid JSON: {err}") from None
    except RecursionError:  # a lower recursion limit than the depth allows: still this line's error
        raise ValueError(f"nested too deeply to parse (at most {MAX_JSON_DEPTH} levels)") from None
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


class LineDecoder(enum.StrEnum):
    """What decodes a plain line in :func:`parse_chunk` (the same events and errors either way)."""

    #: ``msgspec.json.decode`` straight from the bytes.
    MSGSPEC = "msgspec"
    #: The C scanner behind ``json.loads``, on the line decoded as UTF-8.
    JSON = "json"


#: The decoder ingestion uses (bench/ingest.py measures both).
DEFAULT_DECODER = LineDecoder.MSGSPEC


def parse_chunk(
    chunk: bytes, base_offset: int, *, final: bool = False, decoder: LineDecoder = DEFAULT_DECODER
) -> tuple[list[TrainingEvent], list[MalformedLine], int]:
    """Parse every complete line of ``chunk``: events, malformed lines, bytes consumed.

    The same result as :func:`split_lines` then :func:`parse_event` on each line, faster: a line
    that is plain well-formed UTF-8 JSON with the usual field types is decoded inline (by
    ``decoder``); any other line goes through :func:`parse_event`, which accepts it the same way or
    says what is wrong.
    """
    with gc_paused():
        return _parse_chunk(chunk, base_offset, final, decoder)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: for bulk work that allocates many acyclic objects.

    Ingesting a chunk allocates a few objects per event that all stay alive until the chunk is
    stored; each allocation burst would otherwise trigger collections, full ones included, that
    traverse every object of the process (often the larger share of the time). Nothing here
    makes reference cycles, so nothing waits for the collector. Safe across threads (the
    triggerer ingests for many jobs at once): the collector is re-enabled when the last user
    leaves, and only if it was enabled when the first one came.
    """
    global _gc_users, _gc_was_enabled
    with _gc_lock:
        if _gc_users == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_users += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_users -= 1
            if _gc_users == 0 and _gc_was_enabled:
                gc.enable()


_gc_lock = threading.Lock()
_gc_users = 0
_gc_was_enabled = True


def _parse_chunk(
    chunk: bytes, base_offset: int, final: bool, decoder: LineDecoder
) -> tuple[list[TrainingEvent], list[MalformedLine], int]:
    events: list[TrainingEvent] = []
    errors: list[MalformedLine] = []
    append = events.append
    scan = _scan_once
    with_msgspec = decoder == LineDecoder.MSGSPEC
    decode = _msgspec_decode
    new = object.__new__
    cls = TrainingEvent
    fromiso = _fromisoformat
    ist_since, ist_offset, utc = _IST_FIXED_SINCE, _IST_OFFSET, UTC
    int_min, int_max = INT32_MIN, INT32_MAX
    depth_limit = MAX_JSON_DEPTH  # a line with more brackets takes parse_event, which checks depth first
    parts = chunk.split(b"\n")
    tail = parts.pop()  # after the last newline: an unterminated line, or b""
    if final and tail:
        parts.append(tail)
    pos = base_offset
    for raw in parts:
        offset = pos
        pos += len(raw) + 1
        ev = None
        if raw[:1] == b"{" and raw[-1:] == b"}" and raw.count(b"[") + raw.count(b"{") <= depth_limit:
            if with_msgspec:
                try:
                    payload = decode(raw)
                except Exception:  # not plain JSON to msgspec (NaN, 1e400, a lone surrogate...): parse_event decides
                    payload = None
            else:
                try:
                    text = raw.decode()
                    payload, end = scan(text, 0)
                    if end != len(text):  # something after the object
                        payload = None
                except (UnicodeDecodeError, StopIteration, ValueError, RecursionError):
                    payload = None
            if type(payload) is dict:
                phase = payload.get("phase")
                name = payload.get("event")
                ts = payload.get("ts")
                data = payload.get("data")
                iteration = payload.get("iteration")
                epoch = payload.get("epoch")
                if (
                    type(phase) is str
                    and type(name) is str
                    and type(ts) is str
                    and (data is None or type(data) is dict)
                    and (iteration is None or (type(iteration) is int and int_min <= iteration <= int_max))
                    and (epoch is None or (type(epoch) is int and int_min <= epoch <= int_max))
                ):
                    phase = phase.strip().upper()
                    name = name.strip().lower()
                    if phase and name:
                        try:
                            when = fromiso(ts)
                            if when.tzinfo is not None:
                                when = when.astimezone(utc)
                            elif when >= ist_since:
                                when = (when - ist_offset).replace(tzinfo=utc)
                            else:
                                when = when.replace(tzinfo=IST).astimezone(utc)
                        except (ValueError, OverflowError):  # the slow path below says what is wrong
                            when = None
                        if when is not None:
                            # What the frozen dataclass's __init__ would build, without its setattr calls.
                            ev = new(cls)
                            ev.__dict__.update(
                                offset=offset,
                                ts=when,
                                phase=phase,
                                event=name,
                                iteration=iteration,
                                epoch=epoch,
                                data={} if data is None else data,
                            )
        if ev is not None:
            append(ev)
            continue
        line = raw.rstrip(b"\r")
        if not line.strip():
            continue
        try:
            append(parse_event(line, offset))
        except Exception as err:  # whatever a line raises is that line's error, never the chunk's
            reason = str(err) if isinstance(err, ValueError) else f"could not be parsed: {type(err).__name__}: {err}"
            excerpt = line[:ERROR_EXCERPT_BYTES].decode("utf-8", errors="replace")
            errors.append(MalformedLine(offset=offset, reason=without_nul(reason), excerpt=without_nul(excerpt)))
    if b"\\u0000" in chunk:  # rare: only then look for U+0000 in what was decoded
        events = [_event_without_nul(ev) for ev in events]
    return events, errors, len(chunk) if final else len(chunk) - len(tail)


def without_nul(value: Any) -> Any:
    """``value`` with every U+0000 of its strings (dict keys too, nested) replaced by U+FFFD."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, dict):
        return {without_nul(k): without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_nul(v) for v in value]
    return value


def _event_without_nul(ev: TrainingEvent) -> TrainingEvent:
    phase, name, data = without_nul(ev.phase), without_nul(ev.event), without_nul(ev.data)
    if data == ev.data and phase == ev.phase and name == ev.event:
        return ev
    return dataclasses.replace(ev, phase=phase, event=name, data=data)


# The C scanner behind json.loads, called directly: it returns where the value ended.
_scan_once = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]
_msgspec_decode = msgspec.json.Decoder().decode
