"""Input signatures and the checks on inference requests."""

import numpy as np
import pytest
from safetensors.numpy import save

from apps.inference.signature import SignatureError, check_inputs, parse_signature
from gridproto.tensors import TensorFormatError, read_tensor_infos

SIGNATURE = [{"name": "input", "dtype": "float32", "shape": [None, 1, 8, 8]}]


def infos(**arrays):
    return read_tensor_infos(save(arrays))


def test_matching_input_accepted():
    check_inputs(SIGNATURE, infos(input=np.zeros((5, 1, 8, 8), np.float32)))


@pytest.mark.parametrize(
    ("arrays", "expected"),
    [
        ({"other": np.zeros((1, 1, 8, 8), np.float32)}, "unknown input 'other'"),
        ({"input": np.zeros((1, 1, 8, 8), np.float64)}, "dtype float64; the model expects float32"),
        ({"input": np.zeros((1, 8, 8), np.float32)}, "has 3 dimensions"),
        ({"input": np.zeros((1, 1, 8, 7), np.float32)}, "size 7 in dimension 3"),
        ({"input": np.zeros((0, 1, 8, 8), np.float32)}, "empty in dimension 0"),
    ],
)
def test_bad_input_names_field(arrays, expected):
    with pytest.raises(SignatureError) as caught:
        check_inputs(SIGNATURE, infos(**arrays))
    assert expected in caught.value.message
    assert caught.value.field == next(iter(arrays))


def test_missing_input_rejected():
    with pytest.raises(SignatureError) as caught:
        check_inputs(SIGNATURE, {})
    assert "missing input 'input'; the model takes: input" in caught.value.message
    assert caught.value.field == "input"


def test_truncated_body_rejected():
    body = save({"input": np.zeros((2, 1, 8, 8), np.float32)})
    with pytest.raises(TensorFormatError):
        read_tensor_infos(body[:-4])


def test_garbage_body_rejected():
    with pytest.raises(TensorFormatError) as caught:
        read_tensor_infos(b"\xff" * 64)
    assert "not safetensors" in str(caught.value)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("not json", "not valid JSON"),
        ("[]", "non-empty list"),
        ('[{"name": "1x", "dtype": "float32", "shape": [1]}]', ".name must be an identifier"),
        ('[{"name": "x", "dtype": "complex64", "shape": [1]}]', "is not supported"),
        ('[{"name": "x", "dtype": "float32", "shape": [0]}]', "positive sizes"),
        ('[{"name": "x", "dtype": "float32", "shape": [1]}, {"name": "x", "dtype": "float32", "shape": [1]}]', "unique"),
    ],
)
def test_invalid_signature_rejected(raw, expected):
    with pytest.raises(SignatureError) as caught:
        parse_signature(raw)
    assert expected in caught.value.message


def test_signature_normalized():
    parsed = parse_signature('[{"name": "x", "dtype": "int64", "shape": [null, 3], "extra": 1}]')
    assert parsed == [{"name": "x", "dtype": "int64", "shape": [None, 3]}]
