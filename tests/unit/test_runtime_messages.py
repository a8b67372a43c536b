"""ONNX Runtime's messages as clients see them: what failed, never where in its C++ source."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxserve.core.runtime import ModelSession
from onnxserve.errors import InvalidInputError

LEAKS = re.compile(r"onnxruntime::|\.(?:h|hpp|cc|cpp|c):\d+")


def test_a_kernel_failure_says_what_and_not_where(tmp_path: Path) -> None:
    """An outside attack read ``element_wise_ops.cc:703 Compute`` in a division-by-zero answer (a bare function
    name after the file and line, which the signature pattern missed); a broadcast failure carries a full
    signature (``void onnxruntime::BroadcastIterator::Append(...)``). Both are cut; the reason stays."""
    model = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (int64[n] a, int64[n] b, float[m] x, float[k] y) => (int64[n] q, float[m] s) {
            q = Div(a, b)
            s = Add(x, y)
        }"""
    )
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    session = ModelSession(path)
    feeds = {"a": np.array([1, 2]), "b": np.array([1, 1]), "x": np.ones(3, np.float32), "y": np.ones(3, np.float32)}
    for changed, reason in (
        ({"b": np.array([1, 0])}, "Integer division by zero"),
        ({"y": np.ones(4, np.float32)}, "Attempting to broadcast an axis by a dimension other than 1"),
    ):
        with pytest.raises(InvalidInputError) as refused:
            session.run({**feeds, **changed})
        assert reason in refused.value.message
        assert not LEAKS.search(refused.value.message), refused.value.message
