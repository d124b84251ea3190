"""Fuzzing of the wire-format parsers that read bytes from the network.

Each parser may reject input only with its documented error class, never
with another exception: a stray TypeError or RecursionError in the gateway's
consumer would end the agent's connection, and in a view it would be a 500.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gridproto.frames import FrameError, decode_frame, encode_frame
from gridproto.messages import (
    AGENT_MESSAGES,
    GATEWAY_MESSAGES,
    MessageError,
    parse_control,
)
from gridproto.pt2 import ArchiveError, check_archive
from gridproto.tensors import TensorFormatError, read_tensor_infos
from tests.models import export_bytes

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any JSON value, nested a few levels.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
DEEP = "[" * 100_000 + "]" * 100_000

ARCHIVE = export_bytes()


def control_message(kind: str) -> st.SearchStrategy[str]:
    """A JSON object of the given type whose fields are arbitrary JSON values."""
    fields = st.dictionaries(st.sampled_from(["protocol", "name", "models", "seq", "in_flight", "job_id", "attempt", "error", "kind", "sha256", "x"]), JSON)
    return fields.map(lambda body: json.dumps({**body, "type": kind}))


@FUZZ
@given(st.one_of(st.text(), st.binary(), control_message("hello"), control_message("heartbeat"), control_message("infer.error"), JSON.map(json.dumps)))
@example(DEEP)
@example(b"\xff\xfe")
@example('{"type": ["hello"]}')
def test_parse_control_raises_message_error(data):
    for schema in (AGENT_MESSAGES, GATEWAY_MESSAGES):
        try:
            message = parse_control(data, schema)
        except MessageError:
            continue
        assert isinstance(message["type"], str)


def frame_with_header(header: bytes, body: bytes = b"") -> bytes:
    return struct.pack(">I", len(header)) + header + body


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=2048),
        st.builds(frame_with_header, st.binary(max_size=512), st.binary(max_size=64)),
        st.builds(frame_with_header, JSON.map(lambda value: json.dumps(value).encode())),
    )
)
@example(frame_with_header(DEEP.encode()[:60_000]))
@example(frame_with_header(b'{"type": 1}'))
@example(struct.pack(">I", 2**32 - 1))
def test_decode_frame_raises_frame_error(frame):
    try:
        header, body = decode_frame(frame)
    except FrameError:
        return
    assert isinstance(header["type"], str)
    assert bytes(body) == frame[4 + struct.unpack_from(">I", frame)[0] :]


def test_frame_round_trip():
    header, body = decode_frame(encode_frame({"type": "infer.result", "job_id": "j"}, b"\x00\x01"))

    assert header == {"type": "infer.result", "job_id": "j"}
    assert bytes(body) == b"\x00\x01"


def safetensors_with_header(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


TENSOR_ENTRY = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.one_of(st.sampled_from(["F32", "I64", "U8", "BOOL", "C64"]), JSON),
        "shape": st.one_of(st.lists(st.integers(-2, 5), max_size=3), JSON),
        "data_offsets": st.one_of(st.lists(st.integers(-4, 64), min_size=2, max_size=2), JSON),
    },
)


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=1024),
        st.builds(safetensors_with_header, st.binary(max_size=256), st.binary(max_size=64)),
        st.builds(
            safetensors_with_header,
            st.dictionaries(st.text(max_size=8), st.one_of(TENSOR_ENTRY, JSON), max_size=3).map(lambda h: json.dumps(h).encode()),
            st.binary(max_size=64),
        ),
    )
)
@example(safetensors_with_header(DEEP.encode()))
@example(safetensors_with_header(b'{"x": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}', b"\x00" * 4))
@example(safetensors_with_header(b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4.0]}}', b"\x00" * 4))
def test_read_tensor_infos_raises_format_error(data):
    try:
        infos = read_tensor_infos(data)
    except TensorFormatError:
        return
    for info in infos.values():
        assert all(isinstance(d, int) and d >= 0 for d in info.shape)


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    buffer = bytearray(data)
    for position, value in edits:
        buffer[position % len(buffer)] = value
    return bytes(buffer[:cut] if cut else buffer)


def rezip(entries: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, body in entries.items():
            archive.writestr(name, body)
    return out.getvalue()


ENTRY_NAMES = st.sampled_from(
    [
        "archive/archive_format",
        "archive/models/model.json",
        "archive/data/weights/model_weights_config.json",
        "archive/data/constants/model_constants_config.json",
        "archive/data/weights/weight_0",
        "archive/../escape",
        "other/models/model.json",
    ]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=512),
        st.builds(mutate, st.just(ARCHIVE), st.lists(st.tuples(st.integers(0, len(ARCHIVE)), st.integers(0, 255)), max_size=8), st.none() | st.integers(1, len(ARCHIVE))),
        st.dictionaries(ENTRY_NAMES, st.one_of(st.binary(max_size=64), JSON.map(lambda v: json.dumps(v).encode())), max_size=5).map(rezip),
    )
)
@example(rezip({"archive/archive_format": b"pt2", "archive/models/model.json": DEEP.encode()}))
@example(rezip({"archive/data/weights/model_weights_config.json": b'{"config": []}'}))
def test_check_archive_raises_archive_error(data):
    try:
        info = check_archive(io.BytesIO(data), max_unpacked_bytes=1 << 30)
    except ArchiveError:
        return
    assert info.input_names
