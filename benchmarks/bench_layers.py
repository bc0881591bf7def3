"""Deriving the standard layer aliases of a file made by others, before and after #16, in one run.

The first use of a downloaded model (and ``deepfeat layers FILE``) derives its aliases from the graph.
That needs every candidate tensor's shape. Before #16 the shapes came from ONNX shape inference on a
full copy of the model (weights included) and then one ONNX Runtime run of a zero image with every
candidate as an output; now inference runs on the graph without its large weights, and the run is
skipped when inference knows every shape. Both paths are timed here on the same graphs, built in
memory with full widths and random weights: the registered VGG-16's architecture (MXNet names,
553 MB of weights, built by ``tests/zoo_archs.py``) and ResNet-50 (``random_resnet50.py``, 102 MB).
Each path is called 3 times; the table gives the fastest and slowest call and the range of the
ratio (fastest before / slowest after .. slowest before / fastest after);
the aliases of both paths are checked to be the same.

Run ``python benchmarks/bench_layers.py`` (``--quick``: ResNet-50 only).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import time  # noqa: E402


def _times(fn, repeat: int = 3) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _before(model, size: int):
    """The shapes as the code before #16 found them: full-copy inference, then one probe run."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import shape_inference

    from deepfeat.graph import _FEATURE_RANKS, _FLOAT_TYPES

    m = onnx.ModelProto()
    m.CopyFrom(model)
    dims = m.graph.input[0].type.tensor_type.shape.dim
    for d in dims[2:]:
        d.ClearField("dim_param")
        d.dim_value = size
    g = shape_inference.infer_shapes(m).graph
    infos = list(g.value_info) + list(g.output)
    floats = {vi.name for vi in infos if vi.type.tensor_type.elem_type in _FLOAT_TYPES}
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in infos}
    candidates = [o for n in g.node for o in n.output if ranks.get(o) in _FEATURE_RANKS and o in floats]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in candidates)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    values = sess.run(candidates, {sess.get_inputs()[0].name: np.zeros((1, 3, size, size), np.float32)})
    return {c: ("batch",) + tuple(v.shape[1:]) for c, v in zip(candidates, values)}


def run(quick: bool = False) -> str:
    from unittest import mock

    import random_resnet50

    import deepfeat.graph as graph
    from deepfeat.aliases import derive_aliases  # it looks up graph.tensor_shapes at each call

    models = [("ResNet-50 (102 MB)", random_resnet50.build())]
    if not quick:
        import zoo_archs

        models.insert(0, ("VGG-16 (553 MB)", zoo_archs.mxnet_vgg16(div=1, classes=1000)))
    lines = [
        "## Layer aliases of a file made by others: first derivation",
        "",
        "`derive_aliases` on a graph in memory (full widths, random weights), 3 calls of each path, "
        "2 cores. Before: shape inference on a full copy, then an ONNX Runtime probe run "
        "(replicated in `benchmarks/bench_layers.py`); after: inference without the large weights, "
        "no run when every shape is known.",
        "",
        "| model | before (3 calls) | after (3 calls) | before / after | same aliases |",
        "|---|---|---|---|---|",
    ]
    for name, model in models:
        with mock.patch.object(graph, "tensor_shapes", _before):
            old = derive_aliases(model, 224)
            before = _times(lambda: derive_aliases(model, 224))
        new = derive_aliases(model, 224)
        after = _times(lambda: derive_aliases(model, 224))
        lines.append(f"| {name} | {min(before):.2f}-{max(before):.2f} s | {min(after) * 1e3:.1f}-{max(after) * 1e3:.1f} ms "
                     f"| {min(before) / max(after):.0f}-{max(before) / min(after):.0f}x "
                     f"| {'yes' if old == new else 'NO'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
