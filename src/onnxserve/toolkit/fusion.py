"""Transformer fusions for BERT-like encoders, with what was expected, what was achieved and why not.

onnxscript's ONNX Runtime fusions (written for ``torch.onnx`` dynamo exports) run first, then ONNX
Runtime's transformer optimizer (which knows the older TorchScript exports). The expected counts come
from the source's layers: one Attention and one Gelu per layer (a layer is a Softmax), two
SkipLayerNormalization per layer, and one EmbedLayerNormalization when a graph input indexes an
embedding table. The achieved counts are the fused-operator statistics of the result.

When int8 follows, each fused ``Attention`` is unpacked into one packed QKV ``MatMul``, a ``Split``
and a ``MultiHeadAttention``: ONNX Runtime's quantizer would otherwise leave the QKV projection in
float32 (its QAttention takes neither the ``attention_bias`` input that dynamo exports use for the
padding mask nor ``qkv_hidden_sizes``), and the MatMul becomes an int8 MatMulInteger.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxserve.errors import OptimizeError
from onnxserve.toolkit.optimize_report import Fusion

log = logging.getLogger(__name__)

FUSIONS = ("Attention", "SkipLayerNormalization", "Gelu", "EmbedLayerNormalization")
_FUSED_TYPES = {
    "Attention": ("Attention", "MultiHeadAttention"),
    "SkipLayerNormalization": ("SkipLayerNormalization",),
    "Gelu": ("Gelu", "FastGelu", "BiasGelu", "GemmFastGelu"),
    "EmbedLayerNormalization": ("EmbedLayerNormalization",),
}
"""Each fusion and the fused operator types that count as achieving it."""


def expected_fusions(model: onnx.ModelProto) -> dict[str, int]:
    """What a BERT-like encoder's layers call for: one attention per Softmax, two residual layer norms and
    one Gelu per layer, and one embedding layer norm when a graph input indexes an embedding table."""
    ops = Counter(n.op_type for n in model.graph.node)
    layers = ops["Softmax"]
    if layers == 0:
        return {}
    inputs = {i.name for i in model.graph.input}
    embeds = any(n.op_type == "Gather" and len(n.input) == 2 and n.input[1] in inputs for n in model.graph.node)
    gelu = ops["Erf"] + sum(ops[t] for t in _FUSED_TYPES["Gelu"])
    return {
        "Attention": layers,
        "SkipLayerNormalization": 2 * layers,
        "Gelu": min(gelu, layers),
        "EmbedLayerNormalization": 1 if embeds else 0,
    }


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The fusers print and log advice (shape inference notes); keep the CLI's output clean."""
    loggers = [logging.getLogger(n) for n in ("", "onnxruntime", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def fuse(
    source: onnx.ModelProto, for_int8: bool = False
) -> tuple[onnx.ModelProto, list[Fusion], dict[str, dict[str, int]]]:
    """Transformer fusions: onnxscript's (for dynamo exports), then ONNX Runtime's optimizer. ``source``
    is left as it was; the fused model is returned with what was expected and achieved."""
    from onnxruntime.transformers.onnx_model import OnnxModel
    from onnxruntime.transformers.optimizer import optimize_model

    expected = expected_fusions(source)
    fusers: dict[str, dict[str, int]] = {}
    model = onnx.ModelProto()
    model.CopyFrom(source)  # ONNX Runtime's optimizer rewrites the model it is given
    onnxscript_missing = False
    with quiet():
        try:
            import onnx_ir as ir
            from onnxscript.rewriter.ort_fusions import optimize_for_ort
        except ImportError:
            onnxscript_missing = True
        else:
            try:
                fused_ir, counts = optimize_for_ort(ir.from_proto(model))
                model = ir.to_proto(fused_ir)
                fusers["onnxscript"] = {k: int(v) for k, v in counts.items() if v}
            except Exception as e:  # a rewrite that fails leaves the model as it was
                log.warning("onnxscript's fusions failed (%s); using ONNX Runtime's optimizer alone", e)
        try:
            optimizer = optimize_model(model, model_type="bert", num_heads=0, hidden_size=0, opt_level=0)
        except Exception as e:  # the optimizer raises many types on graphs it does not know
            raise OptimizeError(f"ONNX Runtime's transformer optimizer failed: {str(e).splitlines()[0]}") from e
        if for_int8:
            unpacked = unpack_attention(optimizer.model)
            if unpacked:
                fusers["unpacked_for_int8"] = {"Attention": unpacked}
        stats = {k: int(v) for k, v in optimizer.get_fused_operator_statistics().items()}
        optimizer.topological_sort()  # what its save_model_to_file does, without the file
        fused: onnx.ModelProto = optimizer.model
        if any(n.domain == "com.microsoft" for n in fused.graph.node) and not any(
            o.domain == "com.microsoft" for o in fused.opset_import
        ):
            fused.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    before = Counter(n.op_type for n in source.graph.node)
    fusers["fused_operators"] = {  # ONNX Runtime's fused-operator statistics of the result, less the source's
        k: v - before[k] for k, v in stats.items() if v - before[k] > 0 and k != "LayerNormalization"
    }
    final = Counter(n.op_type for n in OnnxModel(fused).nodes())
    results: list[Fusion] = []
    for name in FUSIONS:
        want = expected.get(name, 0)
        if not want:
            continue
        got = sum(final[t] for t in _FUSED_TYPES[name])
        reason = ""
        if got < want:
            engines = "ONNX Runtime's optimizer" + ("" if onnxscript_missing else " and onnxscript's fusions")
            reason = f"{engines} matched {got} of {want}: this export's subgraph does not fit their {name} pattern"
            if onnxscript_missing:
                reason += " (onnxscript, which knows torch dynamo exports, is not installed)"
        results.append(Fusion(name, want, got, reason))
    return fused, results, fusers


def _constant(graph: onnx.GraphProto, name: str) -> np.ndarray[Any, Any] | None:
    """The value of ``name`` if it is an initializer, or a Concat of initializers (as onnxscript packs QKV)."""
    inits = {t.name: t for t in graph.initializer}
    if name in inits:
        return numpy_helper.to_array(inits[name])
    producer = next((n for n in graph.node if name in n.output), None)
    if producer is not None and producer.op_type == "Concat" and all(i in inits for i in producer.input):
        axis = next(int(helper.get_attribute_value(a)) for a in producer.attribute if a.name == "axis")
        return np.concatenate([numpy_helper.to_array(inits[i]) for i in producer.input], axis=axis)
    return None


def unpack_attention(model: onnx.ModelProto) -> int:
    """Rewrite each packed ``Attention`` as MatMul (packed QKV weight) + Split + MultiHeadAttention, in place.

    Only nodes without a mask index or past state, and with a constant weight, are rewritten: the
    bias and the additive ``attention_bias`` carry over unchanged, so the result computes the same.
    Returns how many were rewritten.
    """
    graph = model.graph
    rewritten = 0
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        inputs = list(node.input) + [""] * (6 - len(node.input))
        weight = _constant(graph, inputs[1]) if node.op_type == "Attention" else None
        if weight is None or inputs[3] or inputs[4] or weight.ndim != 2:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("unidirectional", 0):
            nodes.append(node)
            continue
        sizes = [int(x) for x in attrs.get("qkv_hidden_sizes", [])] or [weight.shape[1] // 3] * 3
        if len(set(sizes)) != 1:  # MultiHeadAttention needs equal Q, K and V widths
            nodes.append(node)
            continue
        prefix = node.name or f"attention_{rewritten}"
        weight_name, split_name = f"{prefix}/qkv_weight", f"{prefix}/qkv_sizes"
        graph.initializer.append(numpy_helper.from_array(weight, weight_name))
        graph.initializer.append(numpy_helper.from_array(np.array(sizes, dtype=np.int64), split_name))
        qkv, q, k, v = (f"{prefix}/{part}" for part in ("qkv", "q", "k", "v"))
        nodes.append(helper.make_node("MatMul", [inputs[0], weight_name], [qkv], name=f"{prefix}/MatMul"))
        nodes.append(helper.make_node("Split", [qkv, split_name], [q, k, v], name=f"{prefix}/Split", axis=-1))
        mha_inputs = [q, k, v, inputs[2], "", inputs[5]]
        while mha_inputs and not mha_inputs[-1]:
            mha_inputs.pop()
        extra = {"scale": attrs["scale"]} if "scale" in attrs else {}
        nodes.append(
            helper.make_node(
                "MultiHeadAttention",
                mha_inputs,
                list(node.output[:1]),
                name=f"{prefix}/MultiHeadAttention",
                domain="com.microsoft",
                num_heads=int(attrs["num_heads"]),
                **extra,
            )
        )
        rewritten += 1
    if rewritten:
        del graph.node[:]
        graph.node.extend(nodes)
        _drop_unused(graph)
    return rewritten


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nothing reads, then initializers nothing reads."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        keep = [n for n in graph.node if any(o in used for o in n.output)]
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    unused = [t for t in graph.initializer if t.name not in used]
    for t in unused:
        graph.initializer.remove(t)
