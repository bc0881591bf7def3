"""ONNX graph truncation: list the tensors a model exposes and cut it at them."""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import onnx
import pandas as pd
from onnx import shape_inference

__all__ = ["layer_table", "truncate", "resolve_layers", "load_onnx", "GraphSummary", "inferred_shapes", "probe_shapes"]

_FEATURE_RANKS = (2, 4)
#: element types of feature tensors (float16 and bfloat16 in half-precision copies)
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)


class LayerError(ValueError):
    """A requested layer is not in the model."""


def load_onnx(path: str | os.PathLike, data: bytes | None = None) -> onnx.ModelProto:
    """Load and check an ONNX file, with an actionable error if it is not one.

    With ``data``, the model is parsed from those bytes (already read and
    hash-checked by the caller), and external weights are read from the
    file's folder.

    Examples
    --------
    >>> from deepfeat.resolve import resolve_model
    >>> path, _ = resolve_model("efficientnet_lite0")
    >>> len(load_onnx(path).graph.node) > 100
    True
    """
    try:
        if data is None:
            model = onnx.load(os.fspath(path))
        else:
            from onnx.external_data_helper import load_external_data_for_model, uses_external_data

            from .registry import _all_tensors

            model = onnx.load_model_from_string(data)
            if any(uses_external_data(t) for t in _all_tensors(model)):
                load_external_data_for_model(model, os.path.dirname(os.path.abspath(os.fspath(path))))
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises several unrelated types here
        raise ValueError(
            f"{os.fspath(path)!r} is not a valid ONNX model ({type(exc).__name__}: {exc}). "
            "Re-download or re-export it."
        ) from exc
    return model


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without its large weights, for shape inference: each big float
    initializer becomes a graph input of the same type and shape. Small ones
    stay, since shape inference reads their values (a Reshape's target shape).
    Copying and serialising 550 MB of VGG weights is what made inference slow."""
    g = model.graph
    small: list = []
    big: list = []
    for t in g.initializer:
        (big if t.data_type in _FLOAT_TYPES and _numel(t) > 64 else small).append(t)
    listed = {i.name for i in g.input}
    skel = onnx.GraphProto(name=g.name)
    skel.node.extend(g.node)
    skel.input.extend(g.input)
    skel.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                      for t in big if t.name not in listed)
    # the file's own value_info and output shapes may be stale (written for another input
    # size): inference starts from the input alone
    skel.output.extend(onnx.helper.make_tensor_value_info(o.name, o.type.tensor_type.elem_type, None)
                       for o in g.output)
    skel.initializer.extend(small)
    m = onnx.ModelProto(ir_version=max(model.ir_version, 4))
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    m.graph.CopyFrom(skel)
    return m


def inference_exact(model: onnx.ModelProto, input_size: int) -> bool:
    """Whether ONNX shape inference can stand in for a probe run at ``input_size``.

    Not when the file fixes another input side (ONNX Runtime would refuse to run
    it, and the shapes would be invented), nor for pools with ``ceil_mode`` and
    padding, where inference and ONNX Runtime disagree on the last window.
    """
    shape = input_shape(model)
    if len(shape) == 4 and any(d is not None and d != input_size for d in shape[2:]):
        return False
    for n in model.graph.node:
        if n.op_type in ("MaxPool", "AveragePool", "LpPool"):
            attrs = {a.name: a for a in n.attribute}
            if "ceil_mode" in attrs and attrs["ceil_mode"].i and "pads" in attrs and any(attrs["pads"].ints):
                return False
    return True


def _numel(t) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def _with_input_size(model: onnx.ModelProto, input_size: int | None) -> onnx.ModelProto:
    """Shape-inferred copy (weights left out) with the spatial input dims fixed (batch stays symbolic)."""
    m = _skeleton(model)
    weights = {t.name for t in model.graph.initializer}
    data = [i for i in m.graph.input if i.name not in weights]
    if input_size is not None and data:  # a graph without an image input is refused by the caller, by name
        dims = data[0].type.tensor_type.shape.dim
        if len(dims) == 4:
            dims[2].ClearField("dim_param")
            dims[2].dim_value = input_size
            dims[3].ClearField("dim_param")
            dims[3].dim_value = input_size
    return shape_inference.infer_shapes(m)


@dataclass(frozen=True)
class GraphSummary:
    """What layer resolution needs of a graph, without the graph: its tensors and first output.

    Examples
    --------
    >>> from onnx import helper, TensorProto
    >>> n = helper.make_node("Relu", ["x"], ["y"])
    >>> g = helper.make_graph([n], "g",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    >>> GraphSummary.of(helper.make_model(g))
    GraphSummary(produced=frozenset({'y'}), first_output='y', input_shape=(1,))
    """

    produced: frozenset
    first_output: str
    #: the first graph input that is not a weight: its declared dims (None where symbolic)
    input_shape: tuple = ()

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "GraphSummary":
        outputs = [o.name for o in model.graph.output]
        return cls(frozenset(o for n in model.graph.node for o in n.output), outputs[0] if outputs else "",
                   input_shape(model))


def input_shape(model: onnx.ModelProto) -> tuple:
    """Declared dims of the first graph input that is not a weight (None where symbolic; () if none).

    Examples
    --------
    >>> from onnx import helper, TensorProto
    >>> g = helper.make_graph([], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 299, 299])], [])
    >>> input_shape(helper.make_model(g))
    (None, 3, 299, 299)
    """
    weights = {t.name for t in model.graph.initializer}
    data = [i for i in model.graph.input if i.name not in weights]
    return tuple(d.dim_value if d.HasField("dim_value") else None
                 for d in data[0].type.tensor_type.shape.dim) if data else ()


def inferred_shapes(model: onnx.ModelProto, input_size: int | None = None) -> dict[str, tuple]:
    """Shapes that ONNX shape inference finds, without running anything: ``None`` where unknown.

    Rank and channels are known for the usual CNN; spatial sizes may not be
    (behind a computed ``Pad``), see :func:`probe_shapes`.

    Examples
    --------
    >>> from onnx import helper, TensorProto
    >>> n = helper.make_node("Relu", ["x"], ["y"])
    >>> g = helper.make_graph([n], "g",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    >>> inferred_shapes(helper.make_model(g), 8)["y"]
    ('batch', 3, 8, 8)
    """
    g = _with_input_size(model, input_size).graph
    out = {}
    for vi in list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        out[vi.name] = ("batch",) + tuple(dims[1:]) if dims else ()
    return out


def probe_shapes(model: onnx.ModelProto, tensors: Sequence[str], input_size: int) -> list[tuple]:
    """Exact shapes of ``tensors`` for one ``input_size`` image, by running a zero image on CPU.

    Examples
    --------
    >>> from deepfeat.resolve import resolve_model
    >>> path, _ = resolve_model("efficientnet_lite0")
    >>> probe_shapes(load_onnx(path), ["features"], 224)
    [('batch', 1280, 7, 7)]
    """
    import numpy as np
    import onnxruntime as ort

    cut = truncate(model, tensors)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4  # its errors come back as exceptions, worded by the caller
    sess = ort.InferenceSession(cut.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = np.zeros((1, 3, input_size, input_size), dtype=np.float32)
    # a Loop whose condition never ends would hold fit forever: ONNX Runtime stops a run whose terminate
    # flag is set, so a timer sets it (one zero image of a real CNN takes well under a second)
    run_options = ort.RunOptions()
    run_options.log_severity_level = 4
    timer = threading.Timer(PROBE_TIMEOUT_S, setattr, (run_options, "terminate", True))
    timer.daemon = True
    timer.start()
    try:
        values = sess.run(list(tensors), {sess.get_inputs()[0].name: x}, run_options=run_options)
    except Exception:
        if not timer.is_alive():
            loops = sorted({n.name or n.op_type for n in cut.graph.node if n.op_type in ("Loop", "Scan")})
            raise ProbeTimeoutError(
                f"one {input_size}x{input_size} image did not get through the graph in {PROBE_TIMEOUT_S:g} s"
                + (f" (its Loop nodes {loops} may never end)" if loops else "")
            ) from None
        raise
    finally:
        timer.cancel()
    return [("batch",) + tuple(v.shape[1:]) for v in values]


#: seconds the shape probe may run one zero image before the model is refused
PROBE_TIMEOUT_S = 60.0


class ProbeTimeoutError(TimeoutError):
    """The shape probe ran past :data:`PROBE_TIMEOUT_S` (a graph that may never finish)."""


def has_loops(model: onnx.ModelProto) -> bool:
    """Whether any graph of the model (subgraphs too) holds a ``Loop`` or ``Scan``, whose run time shape
    inference cannot bound: such a model is always probed once, under :data:`PROBE_TIMEOUT_S`."""
    def walk(graph) -> bool:
        for node in graph.node:
            if node.op_type in ("Loop", "Scan"):
                return True
            for a in node.attribute:
                if any(walk(g) for g in ([a.g] if a.HasField("g") else []) + list(a.graphs)):
                    return True
        return False

    return walk(model.graph)


def tensor_shapes(model: onnx.ModelProto, input_size: int | None = None) -> dict[str, tuple]:
    """Shapes of the rank-2 and rank-4 floating-point tensors for one ``input_size`` image.

    ONNX shape inference alone leaves spatial dims unknown behind ops such as
    computed ``Pad``; running one zero image through ONNX Runtime with every
    candidate tensor as an output gives exact shapes for any graph.

    Examples
    --------
    >>> from deepfeat.resolve import resolve_model
    >>> path, _ = resolve_model("efficientnet_lite0")
    >>> tensor_shapes(load_onnx(path), 224)["features"]
    ('batch', 1280, 7, 7)
    """
    inferred = _with_input_size(model, input_size)
    g = inferred.graph
    # what inference knows of each float tensor: its dims, None where unknown
    known = {vi.name: tuple(d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim)
             for vi in list(g.value_info) + list(g.output) if vi.type.tensor_type.elem_type in _FLOAT_TYPES}
    candidates = [o for n in g.node for o in n.output if o in known and len(known[o]) in _FEATURE_RANKS]
    if not candidates:
        return {}
    if input_size is not None and inference_exact(model, input_size) and not has_loops(model) and all(
            None not in known[c][1:] for c in candidates):
        # inference knew every shape: no need to run the network
        return {c: ("batch",) + known[c][1:] for c in candidates}
    return dict(zip(candidates, probe_shapes(model, candidates, input_size or 224)))


def _alias_rank(alias: str) -> tuple:
    from .aliases import STANDARD_ALIASES

    if alias in STANDARD_ALIASES:
        return (0, STANDARD_ALIASES.index(alias), alias)
    return (2 if alias.startswith("block") else 1, 0, alias)


def layer_table(
    model: onnx.ModelProto,
    aliases: Mapping[str, str] | None = None,
    *,
    input_size: int = 224,
    aliases_only: bool = False,
) -> pd.DataFrame:
    """The tensors a loaded model can be cut at, with shapes and aliases.

    :func:`deepfeat.list_layers` is the same table for a model name or file.

    Examples
    --------
    >>> from onnx import helper, TensorProto
    >>> n = helper.make_node("Relu", ["x"], ["y"])
    >>> g = helper.make_graph([n], "g",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])])
    >>> layer_table(helper.make_model(g), {"act": "y"}, input_size=8)[["name", "alias", "reduction"]].values.tolist()
    [['y', 'act', 1]]
    """
    proto = model
    aliases = aliases or {}
    by_tensor: dict[str, list[str]] = {}
    for alias, tensor in aliases.items():
        by_tensor.setdefault(tensor, []).append(alias)
    shapes = tensor_shapes(proto, input_size)
    rows = []
    for node in proto.graph.node:
        for out in node.output:
            shape = shapes.get(out)
            if shape is None or len(shape) not in _FEATURE_RANKS:
                continue
            names = by_tensor.get(out, [])
            # a tensor with several aliases shows the standard one first (stage5 before
            # features, pooled before fc7), per-block names last; the rest go to "also"
            names = sorted(names, key=_alias_rank)
            spatial = shape[2] if len(shape) == 4 else None
            rows.append(
                {
                    "name": out,
                    "alias": names[0] if names else None,
                    "op_type": node.op_type,
                    "shape": shape,
                    "channels": shape[1],
                    # the stride: 299 px in, 17 px out is stage 4's 16, as the alias rules count it
                    "reduction": (2 ** round(math.log2(input_size / spatial))
                                  if isinstance(spatial, int) and 0 < spatial <= input_size else None),
                    "also": ",".join(names[1:]),
                }
            )
    df = pd.DataFrame(rows, columns=["name", "alias", "op_type", "shape", "channels", "reduction", "also"])
    df["reduction"] = df["reduction"].astype("Int64")
    if aliases_only:
        df = df[df["alias"].notna()].reset_index(drop=True)
    return df


def resolve_layers(
    model: "onnx.ModelProto | GraphSummary", layers: "str | Sequence[str]", aliases: Mapping[str, str]
) -> list[tuple[str, str]]:
    """Map requested layers (aliases or tensor names) to ``(label, tensor)`` pairs.

    The label is the alias when one was given, else the tensor name; it prefixes
    feature names. The special alias ``"output"`` is the graph's first output.
    Unknown layers and two names of one tensor raise :class:`LayerError`.

    Examples
    --------
    >>> from deepfeat.resolve import resolve_model
    >>> path, spec = resolve_model("efficientnet_lite0")
    >>> resolve_layers(load_onnx(path), ["stage4", "pooled"], spec.layers)
    [('stage4', 'blocks.10'), ('pooled', 'pooled')]
    """
    requested = [layers] if isinstance(layers, str) else list(layers)
    if not requested:
        raise LayerError("At least one layer is needed; got an empty list.")
    summary = model if isinstance(model, GraphSummary) else GraphSummary.of(model)
    produced = summary.produced
    resolved: list[tuple[str, str]] = []
    for layer in requested:
        if layer in aliases:
            tensor = aliases[layer]
        elif layer == "output":
            tensor = summary.first_output
        else:
            tensor = layer
        if not produced:
            raise LayerError("The model computes no tensor (its graph has no nodes): there is no layer to cut at. "
                             "Check that the file is the network you meant.")
        if tensor not in produced:
            valid = sorted(aliases, key=_alias_order) or (["output"] if summary.first_output in produced else [])
            raise LayerError(
                f"Layer {layer!r} is not in the model. Valid aliases: {valid}; any tensor "
                "name from deepfeat.list_layers(model) also works."
            )
        twin = next((label for label, t in resolved if t == tensor), None)
        if twin is not None:
            raise LayerError(
                f"Layers {twin!r} and {layer!r} are the same tensor {tensor!r}; ask for it once."
            )
        resolved.append((layer, tensor))
    return resolved


def _alias_order(alias: str):
    # blockN sorts numerically after the named aliases
    if alias.startswith("block") and alias[5:].isdigit():
        return (1, int(alias[5:]), alias)
    return (0, 0, alias)


def truncate(model: onnx.ModelProto, outputs: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are exactly ``outputs``.

    Every node that does not feed one of the outputs is removed, so a shallow
    cut runs only the layers before it.

    Examples
    --------
    >>> from onnx import helper, TensorProto
    >>> n1 = helper.make_node("Relu", ["x"], ["a"])
    >>> n2 = helper.make_node("Neg", ["a"], ["b"])
    >>> g = helper.make_graph([n1, n2], "g",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
    ...     [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])
    >>> cut = truncate(helper.make_model(g), ["a"])
    >>> [n.op_type for n in cut.graph.node], [o.name for o in cut.graph.output]
    (['Relu'], ['a'])
    """
    outputs = list(dict.fromkeys(outputs))
    g = model.graph
    producer = {}
    for i, node in enumerate(g.node):
        for o in node.output:
            producer[o] = i
    missing = [o for o in outputs if o not in producer and o not in {i.name for i in g.input}]
    if missing:
        raise LayerError(f"Tensors {missing} are not produced by any node of the graph.")
    # walk back from the wanted outputs to find the nodes they need
    keep: set[int] = set()
    stack = [producer[o] for o in outputs if o in producer]
    while stack:
        i = stack.pop()
        if i in keep:
            continue
        keep.add(i)
        for name in _node_inputs(g.node[i]):
            if name in producer and producer[name] not in keep:
                stack.append(producer[name])
    needed_inputs = {n for i in keep for n in _node_inputs(g.node[i])}
    # the outputs' types and shapes, inferred without copying the weights (see _skeleton)
    shapes = {vi.name: vi for vi in list(shape_inference.infer_shapes(_skeleton(model)).graph.value_info) + list(g.output)}

    out = onnx.ModelProto()
    out.CopyFrom(model)
    og = out.graph
    del og.node[:]
    og.node.extend(g.node[i] for i in sorted(keep))
    kept_inits = [t for t in g.initializer if t.name in needed_inputs]
    del og.initializer[:]
    og.initializer.extend(kept_inits)
    del og.output[:]
    for name in outputs:
        if name in shapes:
            og.output.append(shapes[name])
        else:
            og.output.append(onnx.helper.make_empty_tensor_value_info(name))
    kept_vi = [vi for vi in g.value_info if vi.name in needed_inputs]
    del og.value_info[:]
    og.value_info.extend(kept_vi)
    _prune_inputs_and_free_batch(og, g, needed_inputs)
    return out


def _node_inputs(node) -> list[str]:
    """A node's inputs, and the outer names its subgraphs (``If`` branches, ``Loop`` bodies) read.

    A branch may use a tensor of the enclosing graph without listing it: a cut that kept only the
    listed inputs would drop the node that makes it, and the weights it needs.
    """
    names = [n for n in node.input if n]
    for a in node.attribute:
        for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            names += _outer_names(sub)
    return names


def _outer_names(graph) -> list[str]:
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    local |= {t.values.name for t in graph.sparse_initializer}
    used: list[str] = []
    for node in graph.node:
        used += [n for n in _node_inputs(node) if n not in local]
        local.update(node.output)
    used += [o.name for o in graph.output if o.name not in local]
    return used


def _prune_inputs_and_free_batch(og, g, needed: set) -> None:
    """Old (IR 3) files list every weight as a graph input: drop the dropped
    weights too, or ONNX Runtime asks for them. Files exported with batch 1
    (ONNX Model Zoo DenseNet) get a symbolic batch so any batch size runs."""
    inits = {t.name for t in g.initializer}
    kept = [i for i in g.input if i.name not in inits or i.name in needed]
    del og.input[:]
    og.input.extend(kept)
    data = [i for i in og.input if i.name not in inits]
    dims = [i.type.tensor_type.shape.dim for i in data]
    if dims and len(dims[0]) == 4 and dims[0][0].dim_value == 1:
        for vi in list(data) + list(og.output) + list(og.value_info):
            d = vi.type.tensor_type.shape.dim
            if len(d) >= 2 and d[0].dim_value == 1:
                d[0].dim_param = "batch"  # clears dim_value (a oneof)
        _free_reshape_batch(og)


def _free_reshape_batch(og) -> None:
    """A batch-1 file may flatten with a constant shape ``(1, -1)`` (Caffe2's AlexNet):
    its leading 1 becomes 0, "copy the input's dim", so the batch passes through.
    Only for a Reshape of a tensor computed from the image (whose first dim is the
    batch); a Reshape of weights (a mean to ``(1, 3, 1, 1)``) keeps its shape."""
    from onnx import numpy_helper

    inits = {t.name: t for t in og.initializer}
    image = [i.name for i in og.input if i.name not in inits][:1]
    from_image = set(image)
    for node in og.node:  # nodes are in topological order
        if any(i in from_image for i in node.input):
            from_image.update(node.output)
    for node in og.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        if node.input[0] not in from_image or any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        shape = numpy_helper.to_array(inits[node.input[1]])
        if shape.ndim != 1 or len(shape) < 2 or shape[0] != 1:
            continue
        freed = shape.copy()
        freed[0] = 0
        name = node.input[1] + "__batch_free"
        if name not in inits:
            inits[name] = numpy_helper.from_array(freed, name)
            og.initializer.append(inits[name])
            if any(i.name == node.input[1] for i in og.input):  # IR 3: weights are inputs too
                og.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, [len(freed)]))
        node.input[1] = name
