"""TF Serving JSON values <-> numpy: the branches no served ONNX model can reach over HTTP."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from onnxserve.core import datatypes
from onnxserve.core.types import IndexEntry, ModelState
from onnxserve.errors import InvalidInputError
from onnxserve.protocols.tfserving_rest import codec, values

BYTES = datatypes.from_v2("BYTES")


def test_every_servable_datatype_has_a_tf_name() -> None:
    names = {values.tf_dtype(datatypes.from_v2(v2)) for v2 in datatypes.V2_DATATYPES if v2 != "BF16"}
    assert len(names) == len(datatypes.V2_DATATYPES) - 1
    assert all(name.startswith("DT_") for name in names)


def test_bytes_output_that_is_not_utf8_is_b64() -> None:
    array = np.array([[b"text", b"\xff\x00"]], dtype=object)
    assert values.to_json(BYTES, array) == [["text", {"b64": base64.b64encode(b"\xff\x00").decode()}]]


def test_bytes_input_keeps_nesting_and_decodes_b64() -> None:
    array = values.to_array("t", BYTES, [["a", {"b64": "/wA="}], ["é", ""]])
    assert array.shape == (2, 2)
    assert array.tolist() == [[b"a", b"\xff\x00"], ["é".encode(), b""]]


def test_bytes_input_deeper_than_its_first_row_is_ragged() -> None:
    with pytest.raises(InvalidInputError, match="evenly nested"):
        values.to_array("t", BYTES, ["a", ["b"]])


def test_an_object_named_b64_with_other_keys_is_not_a_binary_value() -> None:
    assert values.is_b64({"b64": "AA=="})
    assert not values.is_b64({"b64": "AA==", "x": 1})


@pytest.mark.parametrize("state", list(ModelState))
def test_every_version_state_has_a_tf_serving_status(state: ModelState) -> None:
    """The status API answers every state a version can be in (a missing UNLOADING gave 500s)."""
    (status,) = codec.encode_status([IndexEntry("m", "1", state.value)])["model_version_status"]
    assert status["state"] in {"LOADING", "AVAILABLE", "UNLOADING", "END"}
    assert status["status"]["error_code"] in {"OK", "UNAVAILABLE"}
    assert (status["state"] == "AVAILABLE") == (state is ModelState.READY)
