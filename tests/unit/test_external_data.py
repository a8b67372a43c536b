"""A session's external data is mapped from a private copy the server made at load, removed once the session
exists (``core.external_data``; memory the server owns where no copy can be made), wherever the model keeps
it: ONNX Runtime maps no file of the version folder, so a file overwritten in place after the load changes
nothing the session computes (outside attack rt25 F1), and tensors in subgraphs or sharing one byte range
cost no more than their file (outside attack rt26 F3)."""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
import tempfile
import textwrap
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxserve.core.confinement import check_model, model_tensors
from onnxserve.core.division_guard import guard_division
from onnxserve.core.external_data import has_external_data, private_copy, take_external_data
from onnxserve.core.runtime import ModelSession, create_session, guarded_session, read_onnx
from onnxserve.errors import ModelLoadError

N = 300_000  # elements of each float32 tensor: 1.2 MB, several pages each
PRIVATE_COPY_PREFIX = "onnxserve-weights-"  # how core.external_data names its private copies' folders
BF16_ONE = np.uint16(0x3F80)


def _external(tensor: TensorProto, location: str, offset: int, length: int) -> TensorProto:
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def _temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, usable: bool = True) -> Path:
    """The temporary folder the private copies are made in, for this test; not ``usable``: a file where it
    should be, so that no private copy can be made (the weights are read into memory)."""
    temporary = tmp_path / "tmp"
    if usable:
        temporary.mkdir()
    else:
        temporary.write_bytes(b"")
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    return temporary


def _after_the_first_range(monkeypatch: pytest.MonkeyPatch, copied: bool, change: Any) -> list[int]:
    """Make ``change`` happen once the load has taken its first byte range (copied privately, or read into
    memory); the ranges taken, in a list that grows as they are."""
    from onnxserve.core import external_data

    taken: list[int] = []

    def after(take: Any, *args: Any) -> Any:
        result = take(*args)
        if not taken:
            change()
        taken.append(1)
        return result

    if copied:
        monkeypatch.setattr(external_data, "_copy_range", functools.partial(after, external_data._copy_range))
    else:
        read = external_data._Reader._read_range
        monkeypatch.setattr(
            external_data._Reader, "_read_range", lambda self, *args: after(functools.partial(read, self), *args)
        )
    return taken


def _gather_branch(
    name: str, table: str, output: str, initializers: list[TensorProto] | None = None
) -> onnx.GraphProto:
    """An ``If`` branch answering ``table[idx]`` (``idx`` from the outer graph) as ``output``."""
    return helper.make_graph(
        [helper.make_node("Gather", [table, "idx"], [output], axis=0)],
        name,
        [],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["k"])],
        initializers or [],
    )


def everywhere_model(folder: Path, divide: bool = False) -> dict[str, np.ndarray]:
    """A model that keeps external data in every place ONNX allows, in two files, and the outputs it
    computes for ``idx = [3, N - 1]``, ``cond = True`` (and ``d = [1, 1]`` when it ``divide``s):

    - ``a``: main initializer W (``w.bin`` at 0), ``b``: main initializer V sharing W's bytes,
    - ``c``: a Constant node's value attribute (``w.bin``, after W),
    - ``e``: a then-branch initializer of an If (``sub/more.bin``, a second file in a subfolder),
    - ``f``: a sparse initializer's values (``w.bin``), ``h``: a bfloat16 initializer (``w.bin``).
    """
    folder.mkdir(parents=True)
    (folder / "sub").mkdir()
    w = np.arange(N, dtype=np.float32)
    c = w * 2
    s = w * 3
    sparse_values = np.array([5.0, 6.0], dtype=np.float32)
    bf16 = np.full(4, BF16_ONE, dtype=np.uint16)
    blob = b"".join(x.tobytes() for x in (w, c, sparse_values, bf16))
    (folder / "w.bin").write_bytes(blob)
    (folder / "sub" / "more.bin").write_bytes(b"\0" * 4096 + s.tobytes())  # at an offset
    at_c, at_sparse, at_bf16 = w.nbytes, w.nbytes + c.nbytes, w.nbytes + c.nbytes + sparse_values.nbytes

    weights = _external(numpy_helper.from_array(w, "W"), "w.bin", 0, w.nbytes)
    shared = _external(numpy_helper.from_array(w, "V"), "w.bin", 0, w.nbytes)
    half = helper.make_tensor("H", TensorProto.BFLOAT16, [4], [1.0] * 4)
    half = _external(half, "w.bin", at_bf16, bf16.nbytes)
    constant = _external(numpy_helper.from_array(c, "Cv"), "w.bin", at_c, c.nbytes)
    branch = _external(numpy_helper.from_array(s, "S"), "sub/more.bin", 4096, s.nbytes)
    values = _external(numpy_helper.from_array(sparse_values, "P"), "w.bin", at_sparse, sparse_values.nbytes)
    sparse = helper.make_sparse_tensor(values, numpy_helper.from_array(np.array([1, 3], np.int64), "Pi"), [4])

    then_graph = _gather_branch("then", "S", "t", [branch])
    else_graph = _gather_branch("else", "W", "u")
    nodes = [
        helper.make_node("Constant", [], ["C"], value=constant),
        helper.make_node("Gather", ["W", "idx"], ["a"], axis=0),
        helper.make_node("Gather", ["V", "idx"], ["b"], axis=0),
        helper.make_node("Gather", ["C", "idx"], ["c"], axis=0),
        helper.make_node("If", ["cond"], ["e"], then_branch=then_graph, else_branch=else_graph),
        helper.make_node("Identity", ["P"], ["f"]),
        helper.make_node("Cast", ["H"], ["h"], to=TensorProto.FLOAT),
    ]
    inputs = [
        helper.make_tensor_value_info("idx", TensorProto.INT64, ["k"]),
        helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
    ]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "abcefh"]
    if divide:
        nodes.append(helper.make_node("Div", ["idx", "d"], ["q"]))
        inputs.append(helper.make_tensor_value_info("d", TensorProto.INT64, ["k"]))
        outputs.append(helper.make_tensor_value_info("q", TensorProto.INT64, ["k"]))
    graph = helper.make_graph(
        nodes, "everywhere", inputs, outputs, [weights, shared, half], sparse_initializer=[sparse]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, folder / "model.onnx")
    last = N - 1
    return {
        "a": np.array([3, last], np.float32),
        "b": np.array([3, last], np.float32),
        "c": np.array([6, 2 * last], np.float32),
        "e": np.array([9, 3 * last], np.float32),
        "f": np.array([0, 5, 0, 6], np.float32),
        "h": np.ones(4, np.float32),
    }


def _feeds(divide: bool) -> dict[str, np.ndarray]:
    feeds = {"idx": np.array([3, N - 1], np.int64), "cond": np.array(True)}
    if divide:
        feeds["d"] = np.array([1, 1], np.int64)
    return feeds


def _mapped(folder: Path) -> list[str]:
    maps = Path("/proc/self/maps")
    return [line for line in maps.read_text().splitlines() if str(folder) in line] if maps.exists() else []


@pytest.mark.parametrize("divide", [False, True], ids=["from-file", "guarded-copy"])
def test_files_overwritten_after_the_load_change_nothing_the_session_computes(tmp_path: Path, divide: bool) -> None:
    folder = tmp_path / "m" / "1"
    expected = everywhere_model(folder, divide)
    model = read_onnx(folder / "model.onnx")
    assert has_external_data(model)
    assert (guard_division(model, "m") is not None) == divide
    session = ModelSession(folder / "model.onnx", name="m")
    outputs = session.run(_feeds(divide))
    for name, values in expected.items():
        np.testing.assert_array_equal(outputs[name], values, err_msg=name)
    if sys.platform == "linux":
        assert _mapped(folder) == []  # before: w.bin and sub/more.bin mapped for the session's life

    # rsync --inplace: the same sizes, other bytes (before: W, V, C and S answered them)
    for file in (folder / "w.bin", folder / "sub" / "more.bin"):
        file.write_bytes(bytes(255 - b for b in file.read_bytes()))
    outputs = session.run(_feeds(divide))
    for name, values in expected.items():
        np.testing.assert_array_equal(outputs[name], values, err_msg=name)

    # cp's first step: the files cut to nothing (before: SIGBUS at the first page read)
    for file in (folder / "w.bin", folder / "sub" / "more.bin"):
        file.write_bytes(b"")
    outputs = session.run(_feeds(divide))
    for name, values in expected.items():
        np.testing.assert_array_equal(outputs[name], values, err_msg=name)


def test_the_read_arrays_are_freed_once_the_session_is_made(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    expected = everywhere_model(folder)
    model = read_onnx(folder / "model.onnx")
    check_model(model, folder)
    taken = take_external_data(model, folder, "m")
    assert sorted(taken) == ["H", "V", "W"]  # the main graph's; the rest is embedded in the model
    assert taken["W"].array.base is taken["V"].array.base  # one byte range, read once
    assert all(t.data_location != TensorProto.EXTERNAL for _, t in model_tensors(model, main_initializers=False))
    session = create_session(model, initializers=taken)
    arrays = [weakref.ref(i.array) for i in taken.values()]
    taken.clear()
    assert [a() for a in arrays] == [None, None, None]  # ONNX Runtime copied them: nothing else holds them
    (folder / "w.bin").write_bytes(b"")
    (a,) = session.run(["a"], _feeds(False))
    np.testing.assert_array_equal(a, expected["a"])


def test_a_file_cut_between_the_check_and_the_read_is_a_load_error(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    everywhere_model(folder)
    model = read_onnx(folder / "model.onnx")
    check_model(model, folder)
    (folder / "sub" / "more.bin").write_bytes(b"\0" * 5000)  # cut after the check: S ends past it
    with pytest.raises(ModelLoadError, match=r"m: initializer 'S': external data file 'sub/more.bin' ended at byte"):
        take_external_data(model, folder, "m")


def shared_branch_model(folder: Path, elements: int, tensors: int, broken: bool = False) -> None:
    """``y = If(c, then: Sum of Gather(Ws_i, idx) for i < tensors, else: [1, 2, 3, 4][idx])``, every Ws_i
    naming all of ``w.bin`` (arange(elements) as float32): rt26's ``shsub``. ``broken`` makes the then-branch
    output an int64 the If cannot return, so ONNX Runtime refuses the model after it mapped the weights."""
    folder.mkdir(parents=True)
    np.arange(elements, dtype=np.float32).tofile(folder / "w.bin")
    names = [f"Ws_{i}" for i in range(tensors)]
    weights = [
        _external(TensorProto(name=n, data_type=TensorProto.FLOAT, dims=[elements]), "w.bin", 0, 4 * elements)
        for n in names
    ]
    nodes = [helper.make_node("Gather", [n, "idx"], [f"g{i}"], axis=0) for i, n in enumerate(names)]
    nodes.append(helper.make_node("Sum", [f"g{i}" for i in range(tensors)], ["s"]))
    nodes.append(helper.make_node("Cast", ["s"], ["o"], to=TensorProto.INT64 if broken else TensorProto.FLOAT))
    then_graph = helper.make_graph(
        nodes, "then", [], [helper.make_tensor_value_info("o", TensorProto.FLOAT, ["k"])], weights
    )
    small = numpy_helper.from_array(np.array([1, 2, 3, 4], np.float32), "Wt")
    else_graph = _gather_branch("else", "Wt", "e", [small])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_graph, else_branch=else_graph)],
        "shsub",
        [
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("idx", TensorProto.INT64, ["k"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["k"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, folder / "model.onnx")


_UNDER_A_LIMIT = textwrap.dedent(
    """
    import gc, resource, sys
    from pathlib import Path
    from onnxserve.core.memory import fix_mmap_threshold, give_back_free_memory, limit_malloc_arenas, release_frames
    from onnxserve.core.runtime import ModelSession
    from onnxserve.errors import ModelLoadError

    limit_malloc_arenas()
    fix_mmap_threshold()

    def status(key):
        return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024

    path, room = Path(sys.argv[1]), int(sys.argv[2])
    ModelSession(Path(sys.argv[3]))  # ONNX Runtime's first session costs what it costs once
    gc.collect()
    give_back_free_memory()
    before = status("VmRSS")
    outcomes = []
    for _ in range(3):
        resource.setrlimit(resource.RLIMIT_AS, (status("VmSize") + room, resource.RLIM_INFINITY))
        try:
            session = ModelSession(path)
            outcomes.append("loaded")
            del session
        except ModelLoadError as e:
            outcomes.append(e.message)
            release_frames(e)
            del e
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        gc.collect()
        give_back_free_memory()
    print(status("VmRSS") - before)
    print(outcomes)
    """
)


def _under_a_limit(tmp_path: Path, script: str, room: int, *args: str) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """Run ``script`` in a fresh interpreter on a model of 12 branch initializers of 20 MB over one data file,
    with ``room`` bytes of address space and ``args``, after a tiny model it loads first: the model's file and
    what the process printed."""
    folder = tmp_path / "m" / "1"
    shared_branch_model(folder, 5_000_000, 12)
    tiny = tmp_path / "tiny" / "1"
    everywhere_model(tiny)
    package = Path(onnx.__file__).parents[1], Path(__import__("onnxserve").__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in reversed(package))}
    model = folder / "model.onnx"
    command = [sys.executable, "-c", script, str(model), str(room), *args, str(tiny / "model.onnx")]
    return model, subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)


@pytest.mark.skipif(sys.platform != "linux", reason="address-space limits and /proc are Linux's")
def test_loads_under_an_address_space_limit_keep_nothing_once_they_are_over(tmp_path: Path) -> None:
    # rt26 F3: 12 subgraph initializers over one file were embedded, one copy each, in the model handed to
    # ONNX Runtime, whose load then failed for want of memory and kept what it had parsed: 786 MB after a
    # failed load of 12 x 100 MB (and, given room, as much again at each retry). Here 12 x 20 MB under
    # 1.1 GB of room: before, each load failed (std::bad_alloc) and kept ~150 MB; now each maps one copy.
    _, done = _under_a_limit(tmp_path, _UNDER_A_LIMIT, 1100 * 2**20)
    assert done.returncode == 0, done.stderr[-2000:]
    kept, outcomes = done.stdout.splitlines()[-2:]
    assert outcomes == str(["loaded"] * 3)  # before: three "... std::bad_alloc" refusals
    assert int(kept) < 20 * 2**20  # before: ~450 MB kept after three failed loads


def _private_maps() -> list[str]:
    return [line for line in Path("/proc/self/maps").read_text().splitlines() if PRIVATE_COPY_PREFIX in line]


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/maps is Linux's")
def test_tensors_are_mapped_from_a_private_copy_removed_once_the_session_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    temporary = _temporary(tmp_path, monkeypatch)
    folder = tmp_path / "m" / "1"
    shared_branch_model(folder, 300_000, 8)
    session = ModelSession(folder / "model.onnx", name="m")
    assert list(temporary.iterdir()) == []  # removed: the session's mappings are the only way to it
    mapped = _private_maps()
    assert mapped
    assert all(line.endswith("(deleted)") for line in mapped)  # the 8 tensors map the one copy
    assert len({line.split()[-2] for line in mapped}) == 1
    assert _mapped(folder) == []
    (folder / "w.bin").write_bytes(b"")  # cp's first step: nothing served changes
    (y,) = session.run({"c": np.array(True), "idx": np.array([3, 299_999], np.int64)}).values()
    np.testing.assert_array_equal(y, np.array([24, 8 * 299_999], np.float32))
    del session
    assert _private_maps() == []


def test_a_session_onnx_runtime_refuses_leaves_no_private_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    temporary = _temporary(tmp_path, monkeypatch)
    folder = tmp_path / "m" / "1"
    shared_branch_model(folder, 300_000, 8, broken=True)
    with pytest.raises(ModelLoadError, match="ONNX Runtime cannot load the model"):
        guarded_session(folder / "model.onnx", where="m")
    assert list(temporary.iterdir()) == []
    if sys.platform == "linux":
        assert _private_maps() == []


def test_where_no_private_copy_can_be_made_the_weights_are_read_into_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    not_a_folder = tmp_path / "tmp"
    not_a_folder.write_bytes(b"")
    monkeypatch.setattr(tempfile, "tempdir", str(not_a_folder))
    folder = tmp_path / "m" / "1"
    expected = everywhere_model(folder)
    with caplog.at_level(logging.WARNING, logger="onnxserve.core.external_data"):
        session = ModelSession(folder / "model.onnx", name="m")
    assert "m: no private copy of its external data" in caplog.text
    outputs = session.run(_feeds(False))
    for name, values in expected.items():
        np.testing.assert_array_equal(outputs[name], values, err_msg=name)
    if sys.platform == "linux":
        assert _mapped(folder) == []
        assert _private_maps() == []


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX's")
def test_a_private_copy_left_by_a_process_that_ended_mid_load_is_removed_by_the_next_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl

    temporary = _temporary(tmp_path, monkeypatch)
    # a process killed while its load made its session: its folder, copy and lock file, the lock held by nobody
    left = temporary / f"{PRIVATE_COPY_PREFIX}abandoned"
    left.mkdir()
    (left / "lock").write_bytes(b"")
    (left / "0.bin").write_bytes(b"\0" * 4096)
    # a load under way (here, its lock held on another open file)
    busy = temporary / f"{PRIVATE_COPY_PREFIX}busy"
    busy.mkdir()
    (busy / "lock").write_bytes(b"")
    (busy / "0.bin").write_bytes(b"\0" * 4096)
    (temporary / "unrelated").mkdir()
    (temporary / f"{PRIVATE_COPY_PREFIX}a-file").write_bytes(b"")
    folder = tmp_path / "m" / "1"
    shared_branch_model(folder, 1000, 2)
    with (busy / "lock").open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        ModelSession(folder / "model.onnx", name="m")
    names = sorted(p.name for p in temporary.iterdir())
    assert names == [f"{PRIVATE_COPY_PREFIX}a-file", f"{PRIVATE_COPY_PREFIX}busy", "unrelated"]
    assert (busy / "0.bin").exists()


def test_a_file_cut_between_the_check_and_the_copy_is_a_load_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    temporary = _temporary(tmp_path, monkeypatch)
    folder = tmp_path / "m"
    everywhere_model(folder)
    model = read_onnx(folder / "model.onnx")
    check_model(model, folder)
    (folder / "sub" / "more.bin").write_bytes(b"\0" * 5000)  # cut after the check: S ends past it
    with (
        pytest.raises(ModelLoadError, match=r"m: initializer 'S': external data file 'sub/more.bin' ended at byte"),
        private_copy(model, folder, "m"),
    ):
        pass
    assert list(temporary.iterdir()) == []


_FALLBACK_UNDER_A_LIMIT = textwrap.dedent(
    """
    import resource, sys, tempfile
    from pathlib import Path
    from onnxserve.core.memory import fix_mmap_threshold, limit_malloc_arenas
    from onnxserve.core.runtime import ModelSession
    from onnxserve.errors import ModelLoadError

    limit_malloc_arenas()
    fix_mmap_threshold()
    tempfile.tempdir = sys.argv[3]  # not a folder: no private copy, the weights are read into memory
    ModelSession(Path(sys.argv[4]))  # ONNX Runtime's first session costs what it costs once
    vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + int(sys.argv[2]), resource.RLIM_INFINITY))
    try:
        ModelSession(Path(sys.argv[1]))
        print("loaded")
    except ModelLoadError as e:
        print(e.message)
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="address-space limits and /proc are Linux's")
def test_a_model_the_fallback_cannot_serialize_for_want_of_memory_is_a_load_error(tmp_path: Path) -> None:
    # 12 x 20 MB embedded (240 MB) fit in 400 MB of room; serializing them for ONNX Runtime (240 MB more)
    # does not. Before: protobuf's EncodeError went up as it was, not as the version's load error.
    not_a_folder = tmp_path / "tmp"
    not_a_folder.write_bytes(b"")
    model, done = _under_a_limit(tmp_path, _FALLBACK_UNDER_A_LIMIT, 400 * 2**20, str(not_a_folder))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == (
        f"{model}: the process has no memory to hand this model to ONNX Runtime now"
    )


def _aliased_model(folder: Path) -> onnx.ModelProto:
    """Four initializers naming the same bytes of one file by four locations: two spellings of its name, a
    hard link to it and a symbolic link to it; ``y = A + B + C + D``."""
    folder.mkdir(parents=True)
    w = np.arange(N, dtype=np.float32)
    (folder / "w.bin").write_bytes(w.tobytes())
    os.link(folder / "w.bin", folder / "hard.bin")
    os.symlink("w.bin", folder / "soft.bin")
    names = {"A": "w.bin", "B": "./w.bin", "C": "hard.bin", "D": "soft.bin"}
    tensors = [_external(numpy_helper.from_array(w, n), location, 0, w.nbytes) for n, location in names.items()]
    graph = helper.make_graph(
        [helper.make_node("Sum", list(names), ["y"])],
        "aliases",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [N])],
        tensors,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, folder / "model.onnx")
    return onnx.load_model(folder / "model.onnx", load_external_data=False)


@pytest.mark.skipif(sys.platform == "win32", reason="hard and symbolic links as POSIX has them")
def test_one_file_named_by_several_locations_is_copied_and_read_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside attack rt31: 8 spellings of one 100 MB file (``w.bin``, ``./w.bin``, ...) took 8 copies,
    763 MB of the temporary folder; 16 filled it, and the fallback then read the file 16 times (peak
    3.2 GB)."""
    _temporary(tmp_path, monkeypatch)
    folder = tmp_path / "m" / "1"
    model = _aliased_model(folder)
    check_model(model, folder)  # every location stays inside the version folder
    with private_copy(model, folder, "m") as private:
        assert private is not None
        assert sorted(p.name for p in private.iterdir()) == ["0.bin", "lock"]  # one copy for the four
        assert (private / "0.bin").stat().st_size == N * 4
        locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {"0.bin"}
    taken = take_external_data(_aliased_model(tmp_path / "n" / "1"), tmp_path / "n" / "1", "n")
    arrays = [taken[name].array for name in "ABCD"]
    assert all(np.shares_memory(arrays[0], other) for other in arrays[1:])  # read once
    session = ModelSession(folder / "model.onnx", name="m")
    (y,) = session.run({}).values()
    np.testing.assert_array_equal(y, 4 * np.arange(N, dtype=np.float32))


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX's")
def test_another_process_sweeping_the_temporary_folder_never_takes_a_load_s_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside attack rt31: a second server sharing the temporary folder, sweeping it as each of its loads
    does first, removed 3 of 150 loads' private folders: it found their lock file made but not yet locked.
    Here the sweep runs at that very moment, just before the load locks its lock file."""
    import fcntl

    from onnxserve.core import external_data

    temporary = _temporary(tmp_path, monkeypatch)
    flock = fcntl.flock
    swept: list[bool] = []

    def sweep_first(fd: int, operation: int) -> None:
        if not swept:  # the load's own lock, about to be taken: another process sweeps now
            swept.append(True)
            external_data.remove_abandoned_copies(temporary)
        flock(fd, operation)

    monkeypatch.setattr(external_data.fcntl, "flock", sweep_first)
    folder = tmp_path / "m" / "1"
    model = _aliased_model(folder)
    with private_copy(model, folder, "m") as private:
        assert swept
        assert private is not None  # before: removed, or no copy made
        assert (private / "0.bin").exists()


@pytest.mark.parametrize("copied", [True, False], ids=["private-copy", "read-into-memory"])
def test_a_file_written_in_place_while_the_load_takes_it_is_a_load_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, copied: bool
) -> None:
    """Outside attack rt31 F4: ``dd conv=notrunc`` over an 800 MB file 0.1 s into its load (same size) made
    a version that served old values at some offsets and new ones at others. Here the write lands after the
    load took the first range, before the next."""
    temporary = _temporary(tmp_path, monkeypatch, usable=copied)
    folder = tmp_path / "m"
    everywhere_model(folder)
    for name in ("w.bin", "sub/more.bin"):
        os.utime(folder / name, (1_000_000_000, 1_000_000_000))  # written long ago
    model = read_onnx(folder / "model.onnx")
    check_model(model, folder)

    def overwrite() -> None:
        with (folder / "w.bin").open("r+b") as written:  # in place, the same size
            written.write(b"\xff" * 4096)

    taken = _after_the_first_range(monkeypatch, copied, overwrite)
    if copied:
        with (
            pytest.raises(ModelLoadError, match=r"m: external data file 'w.bin' was written while the load read it"),
            private_copy(model, folder, "m"),
        ):
            pass
        assert list(temporary.iterdir()) == []
    else:
        with pytest.raises(ModelLoadError, match=r"m: external data file 'w.bin' was written while the load read it"):
            take_external_data(model, folder, "m")
    assert len(taken) > 1


@pytest.mark.parametrize("copied", [True, False], ids=["private-copy", "read-into-memory"])
def test_a_version_folder_replaced_while_it_loads_is_a_load_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, copied: bool
) -> None:
    """Outside attack rt35 F1: the documented deploy (a staged version folder moved over the served one) done
    while a load ran made a version of the old folder's first file and the new folder's second; load 200,
    served until the next load. Here the folders are swapped after the load took its first range."""
    temporary = _temporary(tmp_path, monkeypatch, usable=copied)
    folder = tmp_path / "m" / "1"
    everywhere_model(folder)
    everywhere_model(tmp_path / "staged")

    def swap() -> None:
        folder.rename(tmp_path / "old")
        (tmp_path / "staged").rename(folder)

    swapped = _after_the_first_range(monkeypatch, copied, swap)
    with pytest.raises(ModelLoadError, match=r"m: the version folder was replaced while it loaded"):
        guarded_session(folder / "model.onnx", where="m")
    assert swapped
    if copied:
        assert list(temporary.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    session = guarded_session(folder / "model.onnx", where="m")  # loaded again: the new folder, whole
    assert session.get_outputs()
