"""The web page's document cache: one computation per document, bounded, dropped with its version."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import orjson
import pytest

import models
from onnxserve.errors import ErrorKind, InvalidInputError, ModelLoadError, TooLargeError
from onnxserve.server.web import documents, overview
from onnxserve.server.web.documents import DocumentCache, MiB
from onnxserve.toolkit import diff, graph, model_header


def _model_file(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(models.offset_model(1.5), path)
    return path


def test_concurrent_requests_share_one_computation(tmp_path: Path) -> None:
    path = _model_file(tmp_path / "1")
    name = onnx.load(path).graph.node[0].output[0]  # Constant's output: not an initializer

    async def scenario() -> None:
        cache = DocumentCache()
        pages = await asyncio.gather(*(cache.graph(path) for _ in range(20)))
        assert len(set(pages)) == 1
        assert cache.computed == 1
        await asyncio.gather(*(cache.graph(path) for _ in range(5)))
        assert cache.computed == 1
        with pytest.raises(InvalidInputError, match="no initializer named"):
            await cache.weight_page(path, name, 0, 10)
        assert cache.computed == 2  # the weights, read once; the missing name is the request's fault

    asyncio.run(scenario())


def test_documents_leave_with_their_version_and_stay_within_the_bound(tmp_path: Path) -> None:
    one, two = _model_file(tmp_path / "1"), _model_file(tmp_path / "2")

    async def scenario() -> None:
        cache = DocumentCache()
        await cache.graph(one)
        await cache.graph(two)
        assert cache.held_bytes > 0
        cache.retain([str(two)])  # version 1 unloaded
        held = cache.held_bytes
        await cache.graph(two)
        assert cache.computed == 2
        await cache.graph(one)
        assert cache.computed == 3  # computed again: it had left
        assert cache.held_bytes > held

        tiny = DocumentCache(max_bytes=10)  # nothing fits: computed per request, never kept
        document = await tiny.graph(one)
        assert orjson.loads(document)["nodes"]
        assert tiny.held_bytes == 0

    asyncio.run(scenario())


def _metadata_model() -> onnx.ModelProto:
    """Two nodes, a 1 MB initializer, doc strings, metadata and two opsets."""
    weight = onnx.numpy_helper.from_array(np.arange(262_144, dtype=np.float32), "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["x", "w"], ["s"]), onnx.helper.make_node("Relu", ["s"], ["y"])],
        "described",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [262_144])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [262_144])],
        [weight],
        doc_string="the graph's own words",
    )
    model = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("com.example", 2)],
        producer_name="maker",
        producer_version="1.2",
    )
    onnx.helper.set_model_props(model, {"license": "MIT", "author": "üñí"})
    return model


def test_the_header_is_read_without_the_weights_and_says_what_onnx_load_says(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(_metadata_model(), path)
    loaded = onnx.load(path)
    header = overview.onnx_header(path)
    assert header.ir_version == loaded.ir_version
    assert dict(header.opsets) == {"ai.onnx": 17, "com.example": 2}
    assert header.producer == "maker 1.2"
    assert header.graph_name == "described"
    assert header.doc_string == "the graph's own words"
    assert dict(header.properties) == {"license": "MIT", "author": "üñí"}
    assert header.nodes == len(loaded.graph.node) == 2
    found = model_header.read_header(path)
    assert not found.model.HasField("graph")  # the weights were never parsed
    assert found.model.ByteSize() < 200


@pytest.mark.parametrize("content", [b"", b"not a model at all", b"\x0a\xff\xff\xff\x0f"])
def test_a_file_that_is_not_a_model_has_no_header(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="cannot read the model file"):
        overview.onnx_header(path)


def test_a_cut_model_file_has_no_header(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(_metadata_model(), path)
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match="cannot read the model file"):
        overview.onnx_header(path)


def test_concurrent_header_reads_share_one_computation(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(_metadata_model(), path)

    async def scenario() -> None:
        cache = DocumentCache()
        headers = await asyncio.gather(*(cache.header(path) for _ in range(40)))
        assert len(set(headers)) == 1
        assert cache.headers_read == 1

    asyncio.run(scenario())


def test_a_document_larger_than_the_memory_is_refused_and_others_wait_their_turn(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(_metadata_model(), path)
    size = path.stat().st_size

    async def scenario() -> None:
        cache = DocumentCache(memory=int(size * 2.5 * 1.5))  # one graph fits, two at once do not
        with pytest.raises(TooLargeError, match="too large for the web page"):
            await cache.diff(path, path)  # both files together: 5x the file
        assert cache.computed == 0
        running: list[int] = []
        most = [0]

        def compute() -> bytes:
            running.append(1)
            most[0] = max(most[0], len(running))
            time.sleep(0.05)
            running.pop()
            return b"{}"

        cost = cache._cost("graph", documents.file_key(path))
        computing = documents._in_thread(compute)
        await asyncio.gather(*(cache._get(("test", n), (str(path),), computing, cost) for n in range(4)))
        assert cache.computed == 4
        assert most[0] == 1  # admitted one at a time: two would exceed the memory

    asyncio.run(scenario())


def test_statistics_computed_in_chunks_are_those_of_the_whole_array(monkeypatch: pytest.MonkeyPatch) -> None:
    values = np.random.default_rng(3).standard_normal(10_007).astype(np.float32)
    values[[5, 77, 9000]] = [np.nan, np.inf, 0.0]
    monkeypatch.setattr(graph, "STATISTICS_CHUNK", 1000)
    monkeypatch.setattr(diff, "STATISTICS_CHUNK", 1000)
    summary = graph.array_summary("w", values)
    whole = values.astype(np.float64)
    finite = whole[np.isfinite(whole)]
    counts, edges = np.histogram(finite, bins=graph.HISTOGRAM_BINS)
    assert summary.histogram is not None
    assert summary.histogram.counts == counts.tolist()
    assert summary.histogram.edges == edges.tolist()
    assert (summary.min, summary.max) == (finite.min(), finite.max())
    assert summary.mean == pytest.approx(finite.mean(), rel=1e-12)
    assert summary.std == pytest.approx(finite.std(), rel=1e-12)
    assert summary.sparsity == np.count_nonzero(whole == 0) / whole.size

    other = values.copy()
    other[100:200] += 1
    stats = diff.weight_stats(np.nan_to_num(values), np.nan_to_num(other))
    a, b = np.nan_to_num(values).astype(np.float64), np.nan_to_num(other).astype(np.float64)
    assert stats.changed == 100
    assert stats.max_abs_diff == pytest.approx(np.abs(b - a).max(), rel=1e-12)
    assert stats.mean_abs_diff == pytest.approx(np.abs(b - a).mean(), rel=1e-12)
    assert stats.relative_l2 == pytest.approx(np.linalg.norm(b - a) / np.linalg.norm(a), rel=1e-12)


def test_a_removed_model_file_has_no_documents_and_no_path_in_the_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # rt10 N3: documents of a loaded version whose folder was removed answered 500 with the file's path.
    gone, kept = _model_file(tmp_path / "1"), _model_file(tmp_path / "2")
    racing = _model_file(tmp_path / "3")
    gone.unlink()
    computed = overview.onnx_header

    def removed_while_read(path: Path) -> overview.OnnxHeader:  # the folder goes between the check and the reading
        path.unlink()
        return computed(path)

    async def scenario() -> None:
        cache = DocumentCache()
        for refused in (
            cache.header(gone),
            cache.graph(gone),
            cache.weight_page(gone, "w", 0, 1),
            cache.diff(kept, gone),
        ):
            with pytest.raises(documents.FileGoneError) as caught:
                await refused
            assert caught.value.kind is ErrorKind.NOT_FOUND
            assert str(tmp_path) not in caught.value.message
        monkeypatch.setattr(overview, "onnx_header", removed_while_read)  # read in a thread of this process
        with pytest.raises(documents.FileGoneError, match="no longer on disk"):
            await cache.header(racing)
        monkeypatch.setattr(overview, "onnx_header", computed)
        assert orjson.loads(await cache.diff(kept, kept))["diff"] is not None  # the others still answer

    asyncio.run(scenario())


def _chain_model(path: Path, nodes: int) -> Path:
    """A valid model of ``nodes`` Identity nodes in a chain: a small file, many nodes."""
    chain = [onnx.helper.make_node("Identity", [f"t{i}"], [f"t{i + 1}"]) for i in range(nodes)]
    graph_ = onnx.helper.make_graph(
        chain,
        "chain",
        [onnx.helper.make_tensor_value_info("t0", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info(f"t{nodes}", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(onnx.helper.make_model(graph_, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)
    return path


def test_graph_and_diff_documents_count_their_nodes_and_refuse_too_many(tmp_path: Path) -> None:
    small = _chain_model(tmp_path / "small.onnx", 50)
    large = _chain_model(tmp_path / "large.onnx", 200)
    size = large.stat().st_size

    async def scenario() -> None:
        cache = DocumentCache(max_nodes=100)
        with pytest.raises(TooLargeError, match="model of 200 nodes is too large for the web page") as refused:
            await cache.graph(large)
        assert refused.value.kind is ErrorKind.TOO_LARGE
        with pytest.raises(TooLargeError, match="diff document of a model of 200 nodes"):
            await cache.diff(small, large)
        assert (cache.computed, cache.headers_read) == (0, 2)  # only the headers were read
        assert orjson.loads(await cache.graph(small))["nodes"]
        assert (cache.computed, cache.headers_read) == (1, 2)
        # the file alone would fit many times over; its nodes do not
        counted = DocumentCache(memory=int(size * documents.COST_FACTOR * 4))
        assert int(size * documents.COST_FACTOR) + 200 * documents.NODE_COST > counted.memory
        with pytest.raises(TooLargeError, match="its model and external data files and nodes"):
            await counted.graph(large)

    asyncio.run(scenario())


def _external_model(folder: Path, values: int) -> Path:
    """y = x @ W with W (``values`` floats) kept in an external data file beside the model."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = onnx.numpy_helper.from_array(np.arange(values, dtype=np.float32).reshape(-1, 1), "W")
    graph_ = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "W"], ["y"])],
        "external",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, values])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1])],
        [weights],
    )
    path = folder / "model.onnx"
    model = onnx.helper.make_model(graph_, opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.save(model, path, save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    return path


def test_documents_of_a_model_with_external_data_read_it_and_count_it(tmp_path: Path) -> None:
    """The diff read external weights from the server's working directory: 500 and a traceback on every
    request; and the documents counted the model file only (outside attack rt12 F6)."""
    one, two = _external_model(tmp_path / "1", 1000), _external_model(tmp_path / "2", 1000)
    data = (tmp_path / "1" / "model.onnx.data").stat().st_size
    assert model_header.read_header(one).contents.external == (("model.onnx.data", 4000),)

    async def scenario() -> None:
        cache = DocumentCache()
        found = orjson.loads(await cache.diff(one, two))["diff"]
        assert found["initializers"] == []  # the same weights, read from each side's own folder
        assert orjson.loads(await cache.graph(one))["nodes"]
        assert orjson.loads(await cache.weight_page(one, "W", 0, 3))["values"] == [0.0, 1.0, 2.0]
        small = DocumentCache(memory=int(data * documents.COST_FACTOR))  # the model file itself is tiny
        with pytest.raises(TooLargeError, match="external data"):
            await small.weight_page(one, "W", 0, 3)

    asyncio.run(scenario())


def test_nodes_in_subgraphs_and_functions_count_too(tmp_path: Path) -> None:
    """A main graph of two nodes whose If branches held 300,000 nodes each, or one node calling a local
    function of 500,000, were counted as 2 and 1 nodes: +1.8 GB and a crash (outside attack rt13 N2)."""

    def chain(name: str, count: int) -> onnx.GraphProto:
        nodes = [
            onnx.helper.make_node("Identity", [f"{name}{i}" if i else "x"], [f"{name}{i + 1}"]) for i in range(count)
        ]
        nodes[-1].output[0] = f"{name}_out"
        return onnx.helper.make_graph(
            nodes, name, [], [onnx.helper.make_tensor_value_info(f"{name}_out", onnx.TensorProto.FLOAT, [1])]
        )

    branches = onnx.helper.make_node("If", ["c"], ["y"], then_branch=chain("t", 150), else_branch=chain("e", 150))
    graph_ = onnx.helper.make_graph(
        [branches],
        "branches",
        [
            onnx.helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []),
            onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1]),
        ],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    opsets = [onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("local", 1)]
    with_if = tmp_path / "if.onnx"
    onnx.save(onnx.helper.make_model(graph_, opset_imports=opsets), with_if)
    body = [onnx.helper.make_node("Identity", [f"f{i}" if i else "a"], [f"f{i + 1}"]) for i in range(200)]
    body[-1].output[0] = "b"
    function = onnx.helper.make_function("local", "chain", ["a"], ["b"], body, [onnx.helper.make_opsetid("", 17)])
    caller = onnx.helper.make_graph(
        [onnx.helper.make_node("chain", ["x"], ["y"], domain="local")],
        "caller",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    with_function = tmp_path / "function.onnx"
    onnx.save(onnx.helper.make_model(caller, opset_imports=opsets, functions=[function]), with_function)
    assert (model_header.read_header(with_if).nodes, model_header.read_header(with_if).contents.all_nodes) == (1, 301)
    assert model_header.read_header(with_function).contents.all_nodes == 201

    async def scenario() -> None:
        cache = DocumentCache(max_nodes=100)
        with pytest.raises(TooLargeError, match="model of 301 nodes"):
            await cache.graph(with_if)
        with pytest.raises(TooLargeError, match="model of 201 nodes"):
            await cache.diff(with_function, with_function)
        assert orjson.loads(await DocumentCache().graph(with_if))["nodes"]

    asyncio.run(scenario())


def test_each_tensor_that_names_an_external_file_counts_it_subgraphs_included(tmp_path: Path) -> None:
    """20 initializers naming one 128 MiB file took +2.5 GB for a document counted at 320 MB, and an If
    branch's initializers naming a 1 GiB file were not counted at all (outside attack rt13 N5)."""
    (tmp_path / "w.bin").write_bytes(np.arange(1024, dtype=np.float32).tobytes())  # 4 KiB

    def external(name: str) -> onnx.TensorProto:
        tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT, dims=[1024])
        tensor.data_location = onnx.TensorProto.EXTERNAL
        tensor.external_data.add(key="location", value="w.bin")  # no length: all of the file
        return tensor

    branch = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["b0"], ["out"])],
        "branch",
        [],
        [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [1024])],
        [external("b0")],
    )
    graph_ = onnx.helper.make_graph(
        [onnx.helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)],
        "named",
        [onnx.helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1024])],
        [external(f"w{i}") for i in range(3)],
    )
    path = tmp_path / "model.onnx"
    onnx.save(onnx.helper.make_model(graph_, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)
    assert model_header.read_header(path).contents.external == (("w.bin", -1),) * 5  # 3 initializers, 2 branches

    async def scenario() -> None:
        size = path.stat().st_size
        counted = (size + 5 * 4096) * documents.COST_FACTOR + documents.OPSET_COST  # its one opset import
        fits = DocumentCache(memory=int(counted) + 1)
        await fits.weight_page(path, "w0", 0, 3)
        short = DocumentCache(memory=int(counted) - 1)
        with pytest.raises(TooLargeError, match="external data"):
            await short.weight_page(path, "w0", 0, 3)

    asyncio.run(scenario())


def _string_model(path: Path, short: int, long: int) -> Path:
    """An Identity that also answers a STRING initializer: ``short`` one-character labels and one of ``long``
    characters, and a Constant of three strings."""
    labels = onnx.helper.make_tensor("labels", onnx.TensorProto.STRING, [short + 1], [b"a"] * short + [b"b" * long])
    nodes = [
        onnx.helper.make_node("Identity", ["x"], ["y"]),
        onnx.helper.make_node("Identity", ["labels"], ["s"]),
        onnx.helper.make_node("Constant", [], ["c"], value_strings=["p", "q", "r"]),
    ]
    graph_ = onnx.helper.make_graph(
        nodes,
        "strings",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [
            onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1]),
            onnx.helper.make_tensor_value_info("s", onnx.TensorProto.STRING, [short + 1]),
            onnx.helper.make_tensor_value_info("c", onnx.TensorProto.STRING, [3]),
        ],
        [labels],
    )
    onnx.save(onnx.helper.make_model(graph_, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)
    return path


def test_string_tensors_are_read_as_stored_and_counted_per_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside attack rt17: numpy made a STRING tensor a fixed-width array, every value padded to the longest
    at 4 bytes a character: 5,000 one-character labels and one of 100,000 (a 115 KB file) took +1.9 GB
    for one graph document, counted at 2.5 times the file. Strings are now read as the bytes they are, each
    counted at ``STRING_COST``, and a page of them is bounded in bytes."""
    path = _string_model(tmp_path / "model.onnx", 5000, 100_000)
    assert model_header.read_header(path).contents.strings == 5001 + 3  # the initializer's values and the Constant's
    labels = onnx.load(path).graph.initializer[0]
    values = graph.weight_array(labels, None)
    assert (values.dtype, values.shape) == (np.dtype(object), (5001,))
    assert (values[0], values[-1]) == (b"a", b"b" * 100_000)
    assert values.nbytes < 100_000  # a pointer a value, not 5,001 x 400,000 bytes
    monkeypatch.setattr(graph, "STRING_PAGE_BYTES", 1000)

    async def scenario() -> None:
        cache = DocumentCache()
        assert orjson.loads(await cache.graph(path))["nodes"]
        held = cache.held_bytes
        page = orjson.loads(await cache.weight_page(path, "labels", 0, 10_000))
        assert (page["total"], page["values"]) == (5001, ["a"] * 1000)  # the page ends at 1,000 bytes
        last = orjson.loads(await cache.weight_page(path, "labels", 5000, 10))["values"]
        assert last == ["b" * 1000]  # one value longer than a page: cut to it
        assert cache.held_bytes - held > 100_000  # the weights are counted with their strings' bytes
        size = path.stat().st_size
        tight = DocumentCache(memory=int(size * documents.COST_FACTOR) + 1000 * documents.STRING_COST)
        with pytest.raises(TooLargeError):  # the file fits, its 5,004 strings do not
            await tight.graph(path)

    asyncio.run(scenario())


def _identity_with(path: Path, initializers: list[onnx.TensorProto], sparse: list[onnx.SparseTensorProto]) -> Path:
    """y = x, beside ``initializers`` and ``sparse`` initializers the graph does not use."""
    graph_ = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "held",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        initializers,
        sparse_initializer=sparse,
    )
    onnx.save(onnx.helper.make_model(graph_, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)
    return path


def test_values_that_take_more_once_read_than_in_the_file_are_counted(tmp_path: Path) -> None:
    """Outside attack rt17: 30 M int64 zeros in ``int64_data`` (a byte of file each, eight read) made a 30 MB
    file that took +1.8 GB for its documents, counted at 75 MB; three diffs of 127-byte files whose sparse
    initializers ONNX Runtime makes dense took +3.8 GB. The header now reads each stored tensor's dims and
    type, and a document counts what they take beyond the file."""
    zeros = onnx.helper.make_tensor("zeros", onnx.TensorProto.INT64, [1_000_000], [0] * 1_000_000)
    typed = _identity_with(tmp_path / "typed.onnx", [zeros], [])
    values = onnx.helper.make_tensor("values", onnx.TensorProto.FLOAT, [1], [1.0])
    indices = onnx.helper.make_tensor("indices", onnx.TensorProto.INT64, [1], [0])
    dense = 500_000_000
    sparse = _identity_with(tmp_path / "sparse.onnx", [], [onnx.helper.make_sparse_tensor(values, indices, [dense])])
    # protobuf's int64 array and numpy's, where the file holds about 1 MB
    assert model_header.read_header(typed).contents.declared == 16_000_000
    flags = onnx.helper.make_tensor("flags", onnx.TensorProto.INT8, [1000], [0] * 1000)  # in int32_data
    assert model_header.read_header(_identity_with(tmp_path / "int8.onnx", [flags], [])).contents.declared == 5000
    assert model_header.read_header(sparse).contents.declared == 4 * dense
    assert sparse.stat().st_size < 200

    async def scenario() -> None:
        cache = DocumentCache()
        with pytest.raises(TooLargeError):  # 2 GB once dense: never computed
            await cache.diff(sparse, sparse)
        assert cache.computed == 0
        beyond = 16_000_000 - typed.stat().st_size
        tight = DocumentCache(memory=int(typed.stat().st_size * documents.COST_FACTOR) + beyond)
        with pytest.raises(TooLargeError):  # the file fits; its values once read do not
            await tight.weight_page(typed, "zeros", 0, 3)
        assert orjson.loads(await cache.weight_page(typed, "zeros", 0, 3))["values"] == [0, 0, 0]

    asyncio.run(scenario())


def test_long_names_count_in_graph_documents(tmp_path: Path) -> None:
    """Outside attack rt17: 40 nodes with names of 1 MB (a 117 MB file) took +707 MB for one graph
    document, counted at 292 MB: each name appears in its node, its edges and its values."""
    name = "n" * 100_000
    graph_ = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], [name], name=name), onnx.helper.make_node("Identity", [name], ["y"])],
        "names",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "names.onnx"
    onnx.save(onnx.helper.make_model(graph_, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)
    assert model_header.read_header(path).contents.names >= 3 * len(name)
    assert model_header.read_header(path).contents.values == 2  # x and y; value_info entries count too (rt18)

    async def scenario() -> None:
        size = path.stat().st_size
        counted_as_file = DocumentCache(memory=int(size * documents.COST_FACTOR) + 2 * documents.NODE_COST)
        with pytest.raises(TooLargeError):
            await counted_as_file.graph(path)
        assert orjson.loads(await DocumentCache().graph(path))["nodes"]

    asyncio.run(scenario())


def test_metadata_properties_count_in_documents(tmp_path: Path) -> None:
    """Outside attack rt18: a million short metadata properties (a 12.9 MB file) took +224 MB for a graph
    document counted at 32 MB; each property now counts ``PROPERTY_COST``."""
    path = _model_file(tmp_path / "1")
    model = onnx.load(path)
    onnx.helper.set_model_props(model, {f"k{i}": "v" for i in range(20_000)})
    onnx.save(model, path)

    async def scenario() -> None:
        size = path.stat().st_size
        assert size * documents.COST_FACTOR < 20_000 * documents.PROPERTY_COST
        counted_as_file = DocumentCache(memory=int(size * documents.COST_FACTOR) + 10 * documents.NODE_COST)
        with pytest.raises(TooLargeError):
            await counted_as_file.graph(path)
        assert orjson.loads(await DocumentCache().graph(path))["nodes"]

    asyncio.run(scenario())


def test_a_diff_does_not_run_models_whose_tensors_grow_by_input_values(tmp_path: Path) -> None:
    """Outside attack rt18: two 366-byte versions of ``ConstantOfShape(5e8 * min(ceil(|x|), 1))`` loaded at
    once (their warm-up feeds zeros) but built 5e8 floats on the diff's random inputs: +1.9 GB. Such models
    are compared without running them, and the diff says why; a graph whose sizes follow its input shapes
    still runs."""
    sized = models.parse(
        """
        sized (float[1] x) => (float total) {
            count = Cast <to = 7> (x)
            big = ConstantOfShape(count)
            total = ReduceSum <keepdims = 0> (big)
        }
        """
    )
    one, two = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(sized, one)
    onnx.save(sized, two)

    async def scenario() -> None:
        found = orjson.loads(await DocumentCache().diff(one, two))["diff"]["numeric"]
        assert found["ran"] is False
        assert "may grow by its input values" in found["reason"]
        assert "ConstantOfShape" in found["reason"]

    asyncio.run(scenario())
    looping = models.parse(
        """
        looping (float[1] x) => (float[n] y) {
            trips = Constant <value = int64 {30}> ()
            zero = Constant <value = float {0.0}> ()
            positive = Greater(x, zero)
            go = Squeeze(positive)
            y = Loop(trips, go, x) <body = step (int64 i, bool c, float[m] acc) => (bool c_out, float[k] twice) {
                c_out = Identity(c)
                twice = Concat <axis = 0> (acc, acc)
            }>
        }
        """
    )
    onnx.save(looping, one)
    onnx.save(looping, two)

    async def repeated() -> None:  # a constant trip count, a condition from the input (rt19: +5.1 GB)
        found = orjson.loads(await DocumentCache().diff(one, two))["diff"]["numeric"]
        assert found["ran"] is False
        assert "Loop" in found["reason"]

    asyncio.run(repeated())
    plain = _model_file(tmp_path / "plain")
    assert orjson.loads(asyncio.run(DocumentCache().diff(plain, plain)))["diff"]["numeric"]["ran"] is True


def test_value_entries_count_in_graph_documents(tmp_path: Path) -> None:
    """Outside attack rt18: a million value_info entries took +1,134 MB for a graph document counted at
    171 MB; each input, output and value_info entry now counts ``VALUE_COST``."""
    path = _model_file(tmp_path / "1")
    model = onnx.load(path)
    model.graph.value_info.extend(
        onnx.helper.make_tensor_value_info(f"v{i}", onnx.TensorProto.FLOAT, [1]) for i in range(2000)
    )
    onnx.save(model, path)
    header = model_header.read_header(path)
    assert header.contents.values >= 2000

    async def scenario() -> None:
        without_values = (
            int(path.stat().st_size * documents.COST_FACTOR)
            + header.contents.names * documents.NAME_COST
            + max(header.nodes, header.contents.all_nodes) * documents.NODE_COST
        )
        with pytest.raises(TooLargeError):
            await DocumentCache(memory=without_values + 1000).graph(path)
        assert orjson.loads(await DocumentCache().graph(path))["nodes"]

    asyncio.run(scenario())


def test_attribute_lists_count_in_graph_documents(tmp_path: Path) -> None:
    """Outside attack rt19: a Constant's ``value_ints`` of 30 M (a 90 MB model) made a graph document of
    about 9 times its count, and the JSON encoder ended the process. Each number of an attribute list now
    counts ``LIST_ITEM_COST`` (packed ints at one a byte, at most their count)."""
    path = tmp_path / "model.onnx"
    graph_ = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Constant", [], ["c"], value_ints=list(range(100_000))),
            onnx.helper.make_node("Constant", [], ["f"], value_floats=[0.5] * 1000),
            onnx.helper.make_node("Identity", ["x"], ["y"]),
        ],
        "lists",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(onnx.helper.make_model(graph_, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)
    header = model_header.read_header(path)
    assert (
        101_000 <= header.contents.list_items <= path.stat().st_size
    )  # 100,000 ints (1 to 3 bytes each), 1,000 floats

    async def scenario() -> None:
        size = path.stat().st_size
        with pytest.raises(TooLargeError):
            await DocumentCache(memory=int(size * documents.COST_FACTOR) + 100_000 * 8).graph(path)
        assert orjson.loads(await DocumentCache().graph(path))["nodes"]

    asyncio.run(scenario())


def test_training_graphs_count_like_subgraphs(tmp_path: Path) -> None:
    """Outside attack rt19: a ``training_info`` graph of a million nodes (a 30 MB file) escaped the node limit
    and took +726 MB for a graph document. Its graphs are walked and counted like subgraphs now."""
    path = _model_file(tmp_path / "1")
    model = onnx.load(path)
    chain = [onnx.helper.make_node("Identity", [f"t{i}"], [f"t{i + 1}"]) for i in range(300)]
    training = onnx.TrainingInfoProto()
    training.algorithm.CopyFrom(onnx.helper.make_graph(chain, "train", [], []))
    model.training_info.append(training)
    path.write_bytes(model.SerializeToString())
    assert model_header.read_header(path).contents.all_nodes >= 300

    async def scenario() -> None:
        with pytest.raises(TooLargeError, match=r"model of 30[0-9] nodes"):
            await DocumentCache(max_nodes=100).graph(path)

    asyncio.run(scenario())


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    key, length = (number << 3) | 2, len(payload)
    encoded = bytearray()
    for value in (key, length):
        while value > 0x7F:
            encoded.append(value & 0x7F | 0x80)
            value >>= 7
        encoded.append(value)
    return bytes(encoded) + payload


def _peak_rss() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024


@contextlib.contextmanager
def _peak_growth_under(bound: int) -> Iterator[None]:
    """Assert that this process's peak RSS grows by less than ``bound`` bytes within the block."""
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the RSS now
    before = _peak_rss()
    yield
    assert _peak_rss() - before < bound


def test_a_document_that_needs_more_than_its_counts_is_refused_in_its_worker(tmp_path: Path) -> None:
    """Outside attack rt20: one quantization annotation of 5 M empty entries, a 10 MB file counted at 25 MB,
    took +632 MB for its graph document (40 M entries: +2.1 GB, and the parse held a probe 10.8 s). No count
    foresees every kind of entry a model may hold: graph and diff documents are computed in worker processes,
    each under a cap of its counted cost and ``HEADROOM``, and the server only waits."""
    path = _model_file(tmp_path / "1")
    annotation = _field(1, b"x") + b"\x12\x00" * 5_000_000  # tensor_name "x", then empty entries
    path.write_bytes(path.read_bytes() + _field(7, _field(14, annotation)))  # merged into the model's graph
    other = _model_file(tmp_path / "2")

    async def scenario() -> None:
        cache = DocumentCache()
        with _peak_growth_under(100 * MiB), pytest.raises(TooLargeError, match="needs more than"):
            await cache.graph(path)  # the worker took what the document needed, not this process
        computed = cache.computed
        with pytest.raises(TooLargeError, match="needs more than"):
            await cache.graph(path)  # refused again at once: the same file is not computed again
        assert cache.computed == computed
        assert orjson.loads(await cache.graph(other))["nodes"]  # the workers still compute others
        with _peak_growth_under(100 * MiB), pytest.raises(TooLargeError, match="needs more than"):
            await cache.weight_page(path, "w", 0, 1)  # rt22: the weights, read in the server, took +1.6 GB

    asyncio.run(scenario())


def _save_graph(nodes: list[onnx.NodeProto], x_shape: list[int], path: Path) -> Path:
    """Save at ``path`` the opset-17 model of ``nodes``, from a float input ``x`` of ``x_shape`` to an output ``y``."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    graph_ = onnx.helper.make_graph(nodes, "g", [x], [y])
    model = onnx.helper.make_model(graph_, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def _growing_in_a_branch(path: Path, floats: int) -> Path:
    """A model whose If takes, for any input that is not all zeros, a branch that expands its input to a
    constant shape of ``floats`` values: no input value sets a size, yet a run takes ``4 * floats`` bytes."""
    helper = onnx.helper

    def constant(name: str, value: np.ndarray) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(value, name))

    def branch(name: str, nodes: list[onnx.NodeProto], output: str) -> onnx.GraphProto:
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None)])

    grow = branch(
        "grow",
        [
            constant("shape", np.array([floats // 4, 4], np.int64)),
            helper.make_node("Expand", ["x", "shape"], ["big"]),
            helper.make_node("ReduceSum", ["big"], ["grown"], keepdims=0),
        ],
        "grown",
    )
    keep = branch("keep", [helper.make_node("ReduceSum", ["x"], ["kept"], keepdims=0)], "kept")
    nodes = [
        helper.make_node("ReduceMax", ["x"], ["top"], keepdims=0),
        helper.make_node("Abs", ["top"], ["size"]),
        constant("zero", np.array(0, np.float32)),
        helper.make_node("Greater", ["size", "zero"], ["nonzero"]),
        helper.make_node("If", ["nonzero"], ["y"], then_branch=grow, else_branch=keep),
    ]
    return _save_graph(nodes, [1, 4], path)


def test_a_diff_whose_run_needs_more_than_its_worker_may_take_is_shown_without_its_run(tmp_path: Path) -> None:
    """Outside attack rt20: a diff of two 518-byte versions whose If branch expands to a constant shape of
    500 M floats (no operator sized by input values: the run rule let it run) took +1.9 GB, two at once +3.5 GB.
    In its worker the run fails for memory; the diff is shown without it."""
    a = _growing_in_a_branch(tmp_path / "1" / "model.onnx", 500_000_000)
    b = _growing_in_a_branch(tmp_path / "2" / "model.onnx", 500_000_000)

    async def scenario() -> None:
        cache = DocumentCache()
        with _peak_growth_under(100 * MiB):
            found = orjson.loads(await cache.diff(a, b))["diff"]
        assert found["numeric"]["ran"] is False, found["numeric"]
        assert "could not get the memory its run asks for" in found["numeric"]["reason"], found["numeric"]

    asyncio.run(scenario())


def _slow_to_run(path: Path, products: int) -> Path:
    """A small file whose run takes long: its input expanded to a constant 1024 x 1024, then squared
    ``products`` times (2 GFLOP each)."""
    helper = onnx.helper
    shape = onnx.numpy_helper.from_array(np.array([1024, 1024], np.int64), "shape")
    nodes = [
        helper.make_node("Constant", [], ["shape"], value=shape),
        helper.make_node("Expand", ["x", "shape"], ["t0"]),
    ]
    nodes += [helper.make_node("MatMul", [f"t{i}", f"t{i}"], [f"t{i + 1}"]) for i in range(products)]
    nodes.append(helper.make_node("ReduceSum", [f"t{products}"], ["y"], keepdims=0))
    return _save_graph(nodes, [1, 1], path)


def test_a_document_that_takes_too_long_is_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside attack rt22: two diffs of 79 KB versions of 3,000 chained 1024 x 1024 MatMuls ran for minutes
    in both document workers, and every other document waited. A document is stopped past DOCUMENT_SECONDS
    (its worker replaced) and refused, and the refusal is kept for the file."""
    slow = _slow_to_run(tmp_path / "1" / "model.onnx", 2000)
    other = _model_file(tmp_path / "2")
    monkeypatch.setattr(documents, "DOCUMENT_SECONDS", 2.0)

    async def scenario() -> None:
        cache = DocumentCache()
        started = time.monotonic()
        with pytest.raises(TooLargeError, match="took longer than 2 s"):
            await cache.diff(slow, slow)
        assert time.monotonic() - started < 30  # before: minutes (about 8,000 GFLOP)
        with pytest.raises(TooLargeError, match="took longer than 2 s"):
            await cache.diff(slow, slow)  # kept: refused at once
        assert orjson.loads(await cache.graph(other))["nodes"]  # a new worker computes the next one

    asyncio.run(scenario())


def _rewritten_with_its_key(path: Path, model: onnx.ModelProto) -> None:
    """``model`` written at ``path`` with the file's size and modification time (padded with a doc string):
    the cache sees the same file version, and computing its documents again would now succeed."""
    before = path.stat()
    content, room = model.SerializeToString(), before.st_size - model.ByteSize()
    padding = next(_field(6, b" " * n) for n in range(room, 0, -1) if len(_field(6, b" " * n)) == room)
    path.write_bytes(content + padding)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert documents.file_key(path) == (str(path), before.st_mtime_ns, before.st_size)


def test_a_kept_refusal_survives_the_cache_filling_with_other_documents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside attack rt24: refusals were kept among the documents, and two 130 MiB weights documents passing
    through the cache pushed them out, so a refused 60 s diff ran again. Refusals are kept apart (at most
    REFUSALS of them), and leave only with their version."""
    slow = _slow_to_run(tmp_path / "1" / "model.onnx", 2000)
    others = [_model_file(tmp_path / str(version)) for version in range(2, 6)]
    monkeypatch.setattr(documents, "DOCUMENT_SECONDS", 2.0)

    async def scenario() -> None:
        size = len(await DocumentCache().graph(others[0]))
        cache = DocumentCache(max_bytes=3 * size)  # room for about two graphs and their headers
        with pytest.raises(TooLargeError, match="took longer than 2 s"):
            await cache.diff(slow, slow)
        for other in others:  # the cache fills with other documents, and its oldest leave
            assert orjson.loads(await cache.graph(other))["nodes"]
        assert cache.held_bytes <= cache.max_bytes
        _rewritten_with_its_key(slow, models.offset_model(2.5))  # a diff computed again would now succeed
        with pytest.raises(TooLargeError, match="took longer than 2 s"):
            await cache.diff(slow, slow)  # kept: refused at once, not run again
        assert cache.refusals == 1
        cache.retain(str(other) for other in others)  # its version unloaded
        assert cache.refusals == 0
        assert orjson.loads(await cache.diff(slow, slow))["diff"]  # the file (as it is now) is computed afresh

    asyncio.run(scenario())
