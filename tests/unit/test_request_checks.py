"""The pure parts of request checking: JSON depth and what an error message may show."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from onnxserve.errors import InvalidInputError
from onnxserve.protocols.json_depth import MAX_JSON_DEPTH, check_depth, depth_exceeds
from onnxserve.protocols.public_errors import redact_paths


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


@pytest.mark.parametrize("depth", [0, 1, 2, 10, MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH])
def test_documents_up_to_the_limit_pass(depth: int) -> None:
    doc = nested(depth)
    assert check_depth(doc) is doc
    assert not depth_exceeds(doc, depth)
    assert depth == 0 or depth_exceeds(doc, depth - 1)


def test_one_level_more_is_refused_with_the_limit_named() -> None:
    with pytest.raises(InvalidInputError, match=f"more than {MAX_JSON_DEPTH} levels deep"):
        check_depth({"inputs": [1, 2, nested(MAX_JSON_DEPTH)]})


@pytest.mark.parametrize("depth", [0, 3, MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1, 200])
def test_the_source_text_shortcut_decides_as_the_walk_does(depth: int) -> None:
    # A document with few brackets in its text is passed without a walk; the rest are walked.
    doc = nested(depth)
    source = orjson.dumps(doc)
    if depth <= MAX_JSON_DEPTH:
        assert check_depth(doc, source=source) is doc
    else:
        with pytest.raises(InvalidInputError, match="levels deep"):
            check_depth(doc, source=source)


def test_brackets_inside_strings_only_make_the_walk_happen() -> None:
    shallow = {"text": "[" * 1000 + "{" * 1000}
    assert check_depth(shallow, source=orjson.dumps(shallow)) is shallow
    deep = {"text": "[[", "x": nested(MAX_JSON_DEPTH + 1)}
    with pytest.raises(InvalidInputError, match="levels deep"):
        check_depth(deep, source=orjson.dumps(deep))


def test_a_deep_branch_is_found_beside_wide_shallow_ones() -> None:
    doc = [list(range(1000)), {"a": [1.0] * 1000}, [[[[[[7]]]]]]]
    assert depth_exceeds(doc, 6)
    assert not depth_exceeds(doc, 7)


def test_very_deep_documents_do_not_recurse() -> None:
    assert depth_exceeds(nested(200_000), MAX_JSON_DEPTH)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            "model 'm' failed to load: /srv/models/m/1/model.onnx: not an ONNX model",
            "model 'm' failed to load: <path>: not an ONNX model",
        ),
        ("Status Message: /onnxruntime_src/core/x.h:563 boom", "Status Message: <path>:563 boom"),
        ("file 'C:\\Users\\me\\m.onnx' is bad", "file '<path>' is bad"),
        ("a version number goes in /versions/3", "a version number goes in /versions/3"),
        ("no such endpoint: POST /v2/models/x/infer", "no such endpoint: POST /v2/models/x/infer"),
        ("ratio 3/4, a/b/c relative, n/a", "ratio 3/4, a/b/c relative, n/a"),
        ("input 'a': shape [1, 16] has a negative dimension", "input 'a': shape [1, 16] has a negative dimension"),
    ],
)
def test_absolute_paths_are_redacted_and_nothing_else(message: str, expected: str) -> None:
    assert redact_paths(message) == expected
