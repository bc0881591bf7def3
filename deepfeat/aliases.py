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
    the globally pooled vector (output of that pooling);
``logits``
    the graph's output.

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
    if g.output and g.output[0].name in shapes:
        aliases["logits"] = g.output[0].name

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
    return {a: aliases[a] for a in STANDARD_ALIASES if a in aliases}


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

