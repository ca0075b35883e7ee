"""The global.json parser: timestamps, required fields, line splitting."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gpu_training.events import MAX_JSON_DEPTH, LineDecoder, parse_chunk, parse_event, parse_timestamp, split_lines


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
        # Before datetime.min once in UTC: an error of this line, not a crash of the whole chunk.
        (b'{"ts": "0001-01-01T00:00:00+05:30", "phase": "P", "event": "e"}', "out of range"),
        (b'{"ts": "0001-01-01T00:00:00", "phase": "P", "event": "e"}', "out of range"),
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


def reference_parse_chunk(chunk: bytes, base_offset: int, *, final: bool = False):
    """parse_chunk as the contract defines it: split_lines, then parse_event on each line."""
    from gpu_training.events import ERROR_EXCERPT_BYTES

    events, errors = [], []
    lines, consumed = split_lines(chunk, base_offset, final=final)
    for offset, line in lines:
        try:
            events.append(parse_event(line, offset))
        except ValueError as err:
            errors.append((offset, str(err), line[:ERROR_EXCERPT_BYTES].decode("utf-8", errors="replace")))
    return events, errors, consumed


TRICKY_LINES = [
    b'{"ts":"2026-11-22T15:04:05.123+05:30","phase":"TRAINING","event":"epoch_complete","iteration":1,"epoch":2,'
    b'"data":{"avg_loss":0.5,"model_path":"m.npz"}}',
    b'{"ts": "2026-11-22T15:04:05", "phase": " training ", "event": "EPOCH_COMPLETE", "iteration": "2", "epoch": 3.0}',
    b'{"ts": "2026-11-22T15:04:05Z", "phase": "CUSTOM", "event": "caf\xc3\xa9", "data": {"note": "\xe2\x82\xac"}}',
    b'{"ts": "2026-11-22T15:04:05Z", "phase": "TRAINING", "event": "epoch_complete", "iteration": 1, "epoch": 1, '
    b'"data": {"avg_loss": NaN, "grad_norm": -Infinity}}',
    b'{"ts": "2026-11-22T15:04:05z", "phase": "PROJECT", "event": "start"}',
    b'{"ts": " 2026-11-22T15:04:05 ", "phase": "PROJECT", "event": "start"}',
    b'{"ts": "1930-01-01T00:00:00", "phase": "PROJECT", "event": "start"}',
    b'{"ts": 1795000000.25, "phase": "PROJECT", "event": "start"}',
    b'{"ts": "2026-11-22T15:04:05Z", "phase": "PROJECT", "event": "start", "data": null, "iteration": null}',
    b'  {"ts": "2026-11-22T15:04:05Z", "phase": "PROJECT", "event": "start"}  ',
    b'{"ts": "2026-11-22T15:04:05Z", "phase": "PROJECT", "event": "start"}\r\r',
    b'\xef\xbb\xbf{"ts": "2026-11-22T15:04:05Z", "phase": "PROJECT", "event": "start"}',
    b'{"ts": "2026-11-22T15:04:05Z", "phase": "PROJECT", "event": "st\xffart"}',
    b'{"ts": "2026-11-22T15:04:05Z", "phase": "PROJECT", "event": "start"} {"x": 1}',
    b'{"ts": "2026-11-22T15:04:05Z", "phase": "PROJECT", "event": "start", "epoch": true}',
    b'{"ts": "2026-11-22T15:04:05Z", "phase": "", "event": "start"}',
    b'{"ts": "2026-11-22T15:04:05Z", "phase": "P", "event": "   "}',
    b'{"ts": "not a time", "phase": "P", "event": "e", "iteration": 2.5}',
    b'{"phase": "P", "event": "e"}',
    b'{"ts": "2026-11-22T15:04:05Z", "phase": "P", "event": "e", "data": [1]}',
    b"[1, 2]",
    b"{oops}",
    b"   ",
    b"",
]


@pytest.mark.parametrize("decoder", list(LineDecoder))
@pytest.mark.parametrize("final", [False, True])
def test_parse_chunk_agrees_with_split_lines_and_parse_event(final: bool, decoder: LineDecoder) -> None:
    chunk = b"\n".join(TRICKY_LINES) + b'\n{"ts": "2026-11-22T15:04:05Z", "phase": "P", "event": "partial"}'
    events, errors, consumed = parse_chunk(chunk, 1000, final=final, decoder=decoder)
    ref_events, ref_errors, ref_consumed = reference_parse_chunk(chunk, 1000, final=final)
    assert events == ref_events
    assert [(e.offset, e.reason, e.excerpt) for e in errors] == ref_errors
    assert consumed == ref_consumed
    assert len(events) == (13 if final else 12) and len(errors) == 10


def test_naive_ts_uses_the_zone_database_before_ist_was_fixed() -> None:
    from datetime import timedelta

    from gpu_training.events import IST

    for naive in (datetime(1930, 1, 1), datetime(1942, 9, 1, 12), datetime(1946, 1, 1), datetime(2026, 11, 22, 3)):
        expected = naive.replace(tzinfo=IST).astimezone(UTC)
        assert parse_timestamp(naive.isoformat()) == expected
    assert parse_timestamp("2026-11-22T15:04:05") - parse_timestamp("2026-11-22T15:04:05Z") == -timedelta(
        hours=5, minutes=30
    )


def test_gc_paused_restores_the_collector_across_overlapping_threads() -> None:
    import gc
    import threading

    from gpu_training.events import gc_paused

    inside = threading.Barrier(2)
    leave_first = threading.Event()

    def worker(wait: threading.Event | None) -> None:
        with gc_paused():
            inside.wait()
            if wait is not None:
                wait.wait()

    assert gc.isenabled()
    first = threading.Thread(target=worker, args=(leave_first,))
    second = threading.Thread(target=worker, args=(None,))
    first.start()
    second.start()
    second.join()
    assert not gc.isenabled()  # the first thread is still ingesting
    leave_first.set()
    first.join()
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # someone else's choice is kept
    finally:
        gc.enable()


def test_a_timestamp_out_of_range_is_one_malformed_line_of_its_chunk() -> None:
    chunk = (
        b'{"ts": "0001-01-01T00:00:00+05:30", "phase": "P", "event": "e"}\n'
        b'{"ts": "2026-11-22T15:04:05Z", "phase": "PROJECT", "event": "end"}\n'
    )
    events, errors, consumed = parse_chunk(chunk, 0, final=True)
    assert [e.event for e in events] == ["end"] and consumed == len(chunk)
    assert [(e.offset, "out of range" in e.reason) for e in errors] == [(0, True)]


def line_with(data: str, **fields: str) -> bytes:
    """A line whose ``data`` (and other fields) is the raw JSON text given."""
    head = '{"ts": "2026-11-22T15:04:05Z", "phase": "TRAINING", "event": "epoch_complete"'
    extra = "".join(f', "{key}": {value}' for key, value in fields.items())
    return f'{head}{extra}, "data": {data}}}'.encode("utf-8", "surrogatepass")


#: Lines where JSON decoders are known to differ: each decoder must give the same events and errors.
DECODER_EDGE_LINES = [
    line_with('{"avg_loss": NaN, "grad_norm": Infinity, "x": -Infinity}'),
    line_with('{"big": 123456789012345678901234567890, "neg": -9223372036854775809, "u64": 18446744073709551616}'),
    line_with('{"huge": 1e400, "tiny": 1e-400, "max": 1.7976931348623157e308, "sub": 4.9e-324, "z": -0.0}'),
    line_with('{"a": 1, "a": 2, "b": {"c": 1, "c": [3]}}'),
    line_with('{"lone": "\\ud800", "pair": "\\ud83d\\ude00", "nul": "\\u0000"}'),
    line_with('{"raw_surrogate": "\ud800"}'),
    line_with('{"control": "a\x01b"}'),
    line_with('{"n": 01}'),
    line_with('{"n": .5}'),
    line_with("{}", iteration="2147483648"),
    line_with("{}", iteration="1e2"),
    line_with("{}", epoch="-0"),
    line_with("{}") + b" ",
    line_with("{}") + b'{"x": 1}',
    line_with("[" * (MAX_JSON_DEPTH - 2) + "]" * (MAX_JSON_DEPTH - 2)),
    line_with("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)),
    line_with('{"s": "caf\u00e9 \\u00e9 \\/ \\b"}'),
    b"\xef\xbb\xbf" + line_with("{}"),
    line_with('{"bad_utf8": "\xc0\x80"}'.encode("latin-1").decode("utf-8", "surrogateescape")),
    b"[1, 2]",
    b'"a string"',
    b"123",
]


def test_the_decoders_give_the_same_events_and_errors() -> None:
    """msgspec takes only what json takes the same way; whatever else goes to json (parse_event), so
    NaN/Infinity, big ints, numbers beyond a double, duplicate keys, lone surrogates, invalid
    UTF-8, non-objects and depth give the same result with either decoder."""
    chunk = b"\n".join(DECODER_EDGE_LINES) + b"\n"
    by_decoder = {decoder: parse_chunk(chunk, 0, decoder=decoder) for decoder in LineDecoder}
    json_events, json_errors, json_consumed = by_decoder[LineDecoder.JSON]
    events, errors, consumed = by_decoder[LineDecoder.MSGSPEC]
    assert repr(events) == repr(json_events)  # repr: NaN != NaN, and int vs float shows
    assert [type(v) for ev in events for v in ev.data.values()] == [
        type(v) for ev in json_events for v in ev.data.values()
    ]
    assert errors == json_errors and consumed == json_consumed == len(chunk)
    assert len(events) > 10 and len(errors) > 5
