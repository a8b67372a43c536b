"""Block-wise int8 MatMuls: the form selective int8 gives the nodes it kept out of per-tensor int8.

ONNX Runtime's dynamic int8 quantizes a MatMul's *input* with one scale per tensor, per batch; on a
transformer's feed-forward layers (outliers in the activations) that is where the error comes from,
and selective int8 keeps those nodes in float32 -- the float weights then dominate the file (nine
float feed-forward MatMuls of all-MiniLM-L6-v2 are 21 MB of its 39 MB). ONNX Runtime's
``MatMulNBits`` (``com.microsoft``) at 8 bits stores the weight as int8 with one scale per block of
rows of each column (:data:`BLOCKS`), and with ``accuracy_level`` 4 quantizes the input to int8 per
block of as many values too: a scale per 32 or 128 values instead of one per tensor keeps almost all of
float's accuracy at a quarter of its size, and runs on the int8 kernels of CPUs that have them.

:func:`blockwise_int8` rewrites named MatMuls (a constant 2-D float weight) so; the nodes it cannot
rewrite stay as they are. Whether a rewritten model keeps the accuracy budget is measured by
:mod:`onnxserve.toolkit.selective` like every other choice.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Collection, Iterator

import onnx

BITS = 8
BLOCKS = (128, 32)
"""Values per scale, along the weight's input dimension (and the input's last axis), in the order
selective int8 tries them: 128 is faster (all-MiniLM-L6-v2: worst held-out cosine 0.993), 32 more
accurate (0.998)."""
ACCURACY_LEVEL = 4
"""``MatMulNBits``' int8 compute: the input quantized per block (0 or unset: float32 compute, which
is several times slower than float32 MatMul on CPUs)."""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    logging.disable(logging.INFO)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


def blockwise_int8(model: onnx.ModelProto, nodes: Collection[str], block: int = BLOCKS[-1]) -> onnx.ModelProto:
    """``model`` with the MatMuls named in ``nodes`` as 8-bit ``MatMulNBits`` (symmetric, one scale per
    ``block`` values, int8 compute); a copy, other nodes unchanged."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    names = [n.name for n in model.graph.node if n.name in set(nodes) and n.op_type == "MatMul"]
    result = onnx.ModelProto()
    result.CopyFrom(model)
    if not names:  # an empty include list would mean every MatMul to ONNX Runtime's quantizer
        return result
    with _quiet():
        quantizer = MatMulNBitsQuantizer(
            result,
            bits=BITS,
            block_size=block,
            is_symmetric=True,
            accuracy_level=ACCURACY_LEVEL,
            # ONNX Runtime rewrites every MatMul *or* an included node: exclude all the others
            nodes_to_exclude=[n.name for n in result.graph.node if n.name not in names],
            op_types_to_quantize=("MatMul",),
        )
        quantizer.process()
    rewritten: onnx.ModelProto = quantizer.model.model
    return rewritten


def blockwise_nodes(model: onnx.ModelProto) -> list[str]:
    """The names of the MatMuls :func:`blockwise_int8` rewrote (``MatMulNBits`` keeps ``<name>_Q8``)."""
    return [n.name.removesuffix(f"_Q{BITS}") for n in model.graph.node if n.op_type == "MatMulNBits"]
