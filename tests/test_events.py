"""The global.json parser: timestamps, required fields, line splitting."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gpu_training.events import parse_chunk, parse_event, parse_timestamp, split_lines


def test_ts_with_offset_is_honoured_and_stored_in_utc() -> None:
    assert parse_timestamp("2026-11-22T15:04:05.123+05:30") == datetime(2026, 11, 22, 9, 34, 5, 123000, tzinfo=UTC)
    assert parse_timestamp("2026-11-22T15:04:05-08:00") == datetime(2026, 11, 22, 23, 4, 5, tzinfo=UTC)


def test_naive_ts_is_india_standard_time() -> None:
    assert parse_timestamp("2026-11-22T15:04:05") == datetime(2026, 11, 22, 9, 34, 5, tzinfo=UTC)
    assert parse_timestamp("2026-11-22 15:04:05.5") == datetime(2026, 11, 22, 9, 34, 5, 500000, tzinfo=UTC)


def test_zulu_ts() -> None:
    assert parse_timestamp("2026-11-22T15:04:05Z") == datetime(2026, 11, 22, 15, 4, 5, tzinfo=UTC)


def test_event_fields_are_normalised() -> None:
    ev = parse_event(
        b'{"ts":"2026-11-22T15:04:05Z","phase":"training","event":"EPOCH_COMPLETE","iteration":"2","epoch":3.0,'
        b'"data":{"avg_loss":0.5}}',
        offset=42,
    )
    assert (ev.phase, ev.event, ev.iteration, ev.epoch, ev.offset) == ("TRAINING", "epoch_complete", 2, 3, 42)
    assert ev.data == {"avg_loss": 0.5}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"ts": "2026-11-22T15:04:05Z", "event": "start"}', "'phase'"),
        (b'{"ts": "2026-11-22T15:04:05Z", "phase": "PROJECT"}', "'event'"),
        (b'{"phase": "PROJECT", "event": "start"}', "missing 'ts'"),
        (b'{"ts": "yesterday", "phase": "PROJECT", "event": "start"}', "Invalid isoformat"),
        (b'{"ts": "2026-11-22T15:04:05Z", "phase": "P", "event": "e", "data": [1]}', "'data' must be an object"),
        (b'{"ts": "2026-11-22T15:04:05Z", "phase": "P", "event": "e", "epoch": true}', "epoch must be an integer"),
    ],
)
def test_malformed_lines_say_what_is_wrong(line: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_event(line, 0)


def test_split_keeps_partial_last_line_for_later() -> None:
    lines, consumed = split_lines(b'{"a":1}\n{"b":2}\n{"c":', 100)
    assert lines == [(100, b'{"a":1}'), (108, b'{"b":2}')]
    assert consumed == 16


def test_split_final_takes_unterminated_last_line() -> None:
    lines, consumed = split_lines(b'{"a":1}\n{"b":2}', 0, final=True)
    assert [line for _, line in lines] == [b'{"a":1}', b'{"b":2}']
    assert consumed == 15


def test_blank_and_crlf_lines() -> None:
    lines, consumed = split_lines(b'\n{"a":1}\r\n   \n', 0)
    assert lines == [(1, b'{"a":1}')]
    assert consumed == 14


def test_parse_chunk_separates_errors_with_offsets() -> None:
    chunk = b'{"ts":"2026-11-22T15:04:05Z","phase":"PROJECT","event":"start"}\ngarbage\n'
    events, errors, consumed = parse_chunk(chunk, 10)
    assert [e.kind for e in events] == [("PROJECT", "start")]
    assert [(e.offset, e.excerpt) for e in errors] == [(10 + chunk.index(b"garbage"), "garbage")]
    assert consumed == len(chunk)
