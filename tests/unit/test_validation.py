"""What every request is checked for before its model is looked up (core.validation.check_request)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxserve.core import datatypes
from onnxserve.core.types import InferenceRequest, Tensor
from onnxserve.core.validation import check_request
from onnxserve.errors import InvalidInputError

MANY = 65_536  # the most entries a request's list may hold


def test_a_name_given_twice_is_named_among_many_at_once() -> None:
    """The repeated name last of 65,536: found in one pass (a search of the names before each took minutes,
    on the event loop: outside attack rt55)."""
    names = [f"y{k}" for k in range(MANY - 1)] + ["y0"]
    with pytest.raises(InvalidInputError, match="output 'y0' is requested more than once"):
        check_request(InferenceRequest("m", [], outputs=names))
    x = np.zeros(1, dtype=np.float32)
    tensors = [Tensor(name, datatypes.from_v2("FP32"), x) for name in names]
    with pytest.raises(InvalidInputError, match="input 'y0' is given more than once"):
        check_request(InferenceRequest("m", tensors))
    check_request(InferenceRequest("m", tensors[:-1], outputs=names[:-1]))  # each once: fine
