"""Standard layer aliases derived from any ONNX image classifier's graph.

Every backbone gets the same names, so a grid search over
``embed__layers`` works across models:

``stage1`` .. ``stage5``
    the output of the last block at spatial reduction 2, 4, 8, 16, 32
    (a tensor every path from the input to the output goes through, and not a
    bottleneck's wide expansion in front of the next stride);
``features``
    the last feature map, the input of the global pooling;
``pooled``
    the globally pooled vector (output of that pooling). A network without
    global pooling whose head is fully connected layers (AlexNet, VGG) has
    the activation of its last hidden fully connected layer instead: the
    penultimate vector the classic transfer-learning papers use (fc7);
``fc6``, ``fc7``
    the two hidden fully connected activations of an AlexNet/VGG-style head
    (only when the head has exactly two);
``logits``
    the graph's output, or the input of its final Softmax (a file that ends
    in probabilities still has logits).

The rules look at the graph only (op types, tensor shapes from one probe run,
topology), not at tensor names, so they work for files nobody annotated, such
as the ONNX Model Zoo's.
"""

from __future__ import annotations

import math
import onnx

__all__ = ["derive_aliases", "STANDARD_ALIASES"]

#: alias names every model gets, shallow to deep
STANDARD_ALIASES = ("stage1", "stage2", "stage3", "stage4", "stage5", "features", "pooled", "logits")
#: aliases only some heads have, in the order they are listed after the standard ones
_HEAD_ALIASES = ("fc6", "fc7")

_SHAPE_OPS = {"Shape", "Size"}
_POOL_OPS = {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "AveragePool", "MaxPool", "ReduceMean", "ReduceMax"}


def derive_aliases(model: onnx.ModelProto, input_size: int = 224) -> dict[str, str]:
    """Alias -> tensor name for ``stage1..stage5``, ``features``, ``pooled``, ``logits``.

    Parameters
    ----------
    model : onnx.ModelProto
        An image classifier with one NCHW float input.
    input_size : int
        Square input side used to measure spatial reductions.

    Returns
    -------
    dict
        Only the aliases the graph has (a net without global pooling has no
        ``pooled``; one that never reaches stride 32 has no ``stage5``).

    Examples
    --------
    >>> from deepfeat.graph import load_onnx
    >>> from deepfeat.resolve import resolve_model
    >>> aliases = derive_aliases(load_onnx(resolve_model("efficientnet_lite0")[0]), 224)
    >>> aliases["stage3"], aliases["pooled"], aliases["logits"]
    ('blocks.4', 'pooled', 'logits')
    """
    from .graph import tensor_shapes

    g = model.graph
    shapes = tensor_shapes(model, input_size)
    order = [o for n in g.node for o in n.output if o in shapes]
    position = {t: i for i, t in enumerate(order)}
    op_of = {o: n.op_type for n in g.node for o in n.output}
    inputs_of = {o: list(n.input) for n in g.node for o in n.output}
    aliases: dict[str, str] = {}
    consumers: dict[str, list] = {}
    for n in g.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    if g.output and g.output[0].name in shapes:
        out = g.output[0].name
        # Caffe-era files end in Softmax: the scores before it are the logits
        if op_of.get(out) in ("Softmax", "LogSoftmax") and inputs_of[out][0] in shapes:
            out = inputs_of[out][0]
        aliases["logits"] = out

    def spatial(t):
        s = shapes[t]
        return s[2] if len(s) == 4 else 1

    def reduction(t) -> int | None:
        s = shapes[t]
        if len(s) != 4 or not s[3] or s[3] <= 1:
            return None
        return 2 ** round(math.log2(input_size / s[3]))

    # pooled/features: the last pooling node that takes a map (>1x1) to a vector
    features = None
    for t in reversed(order):
        if op_of[t] not in _POOL_OPS or spatial(t) != 1:
            continue
        src = [i for i in inputs_of[t] if i in shapes and len(shapes[i]) == 4 and spatial(i) > 1]
        if src and shapes[src[0]][1] == shapes[t][1]:
            aliases["pooled"], features = t, src[0]
            break
    if features is None:
        # no global pooling (or a functional one we cannot see): the last map
        maps = [t for t in order if reduction(t) is not None]
        features = maps[-1] if maps else None
        if features is not None:
            aliases.update(_dense_head(order[position[features] + 1:], op_of, inputs_of, consumers, shapes))
    if features is not None:
        aliases["features"] = features
    last = position[features] if features is not None else len(order) - 1
    dominators = _dominators(model, [t for t in order[: last + 1] if reduction(t) is not None])
    by_red: dict[int, list[str]] = {}
    for t in dominators:
        r = reduction(t)
        if r is not None:  # dominators were chosen among tensors with a reduction
            by_red.setdefault(r, []).append(t)
    for k in range(1, 6):
        r = 2**k
        cands = by_red.get(r)
        if not cands:
            continue
        deeper = [c for rr, ts in by_red.items() if rr > r for c in ts]
        if not deeper:
            aliases[f"stage{k}"] = cands[-1]
            continue
        # a stride-2 bottleneck first widens at the old resolution; the stage
        # output is the narrower block output before it
        limit = min(shapes[t][1] for t in by_red[min(rr for rr in by_red if rr > r)])
        chosen = next((t for t in reversed(cands) if shapes[t][1] <= limit), cands[-1])
        aliases[f"stage{k}"] = chosen
    return {a: aliases[a] for a in STANDARD_ALIASES + _HEAD_ALIASES if a in aliases}


def _dense_head(after: list[str], op_of: dict, inputs_of: dict, consumers: dict, shapes: dict) -> dict[str, str]:
    """``pooled`` (and ``fc6``/``fc7``) of a head of fully connected layers after the last map.

    A dense layer is a Gemm, or a MatMul with its bias Add; its activation is the
    output of the Relu that alone consumes it. The last dense layer is the
    classifier; the ones before it are the hidden layers.
    """
    dense = []
    for t in after:
        op = op_of[t]
        if op == "MatMul" and len(consumers.get(t, ())) == 1 and consumers[t][0].op_type == "Add":
            continue  # its bias Add ends the layer
        if op == "Gemm" or op == "MatMul" or (op == "Add" and any(op_of.get(i) == "MatMul" for i in inputs_of[t])):
            if len(shapes[t]) == 2:
                dense.append(t)
    hidden = []
    for t in dense[:-1]:
        act, cur = t, t
        # the activation may follow a Dropout (an identity at inference)
        while len(consumers.get(cur, ())) == 1 and consumers[cur][0].op_type in ("Dropout", "Identity", "Relu"):
            op = consumers[cur][0]
            cur = op.output[0]
            if op.op_type == "Relu":
                act = cur
                break
        hidden.append(act)
    found: dict[str, str] = {}
    if hidden:
        found["pooled"] = hidden[-1]
    if len(hidden) == 2:
        found["fc6"], found["fc7"] = hidden
    return found


def _dominators(model: onnx.ModelProto, candidates: list[str]) -> list[str]:
    """The candidates that every path from the graph input to its output passes."""
    g = model.graph
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(g.node):
        if n.op_type in _SHAPE_OPS:
            continue  # shape arithmetic (e.g. computed padding) carries no pixels
        for name in n.input:
            consumers.setdefault(name, []).append(i)
    inits = {t.name for t in g.initializer}
    start = next(i.name for i in g.input if i.name not in inits)
    target = g.output[0].name

    def reaches_without(blocked: str) -> bool:
        seen = {start}
        stack = [start]
        while stack:
            t = stack.pop()
            for i in consumers.get(t, ()):
                for o in g.node[i].output:
                    if o == target:
                        return True
                    if o != blocked and o not in seen:
                        seen.add(o)
                        stack.append(o)
        return False

    return [t for t in candidates if t != target and not reaches_without(t)]

