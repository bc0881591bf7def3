"""A ResNet-50 ONNX graph with random weights, built with onnx.helper (no PyTorch needed).

It stands in for "a larger backbone" in the provider benchmark: the same
layers, shapes and FLOPs (4.1 GFLOPs at 224 px, 25.6 M parameters) as
torchvision's ResNet-50 with batch norm folded into the convolutions, so its
speed is that of the real network; its vectors mean nothing (random
weights), and every table that uses it says so.

    python benchmarks/random_resnet50.py out.onnx
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: aliases in deepfeat's naming scheme (the graph names its tensors after torchvision's modules)
LAYERS = {"stem": "maxpool", "stage1": "layer1", "stage2": "layer2", "stage3": "layer3", "stage4": "layer4",
          "pooled": "pooled", "logits": "logits"}
#: what ImageEmbedder needs for this file: torchvision's ImageNet preprocessing
PREPROCESSING = {
    "input_size": 224, "resize_size": 256, "mean": (0.485 * 255, 0.456 * 255, 0.406 * 255),
    "std": (0.229 * 255, 0.224 * 255, 0.225 * 255), "layers": LAYERS, "default_layer": "pooled",
}
_STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # width, blocks, stride of the first block


def build(seed: int = 0) -> onnx.ModelProto:
    """ResNet-50 (v1.5: stride on the 3x3 conv) with He-initialised random weights."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(x, cin, cout, k, stride, name, relu=True, gain=1.0):
        w = rng.normal(0, gain * np.sqrt(2.0 / (cin * k * k)), (cout, cin, k, k)).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(np.zeros(cout, np.float32), f"{name}.b")])
        out = name if not relu else f"{name}.pre"
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [out], kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[k // 2] * 4))
        if relu:
            nodes.append(helper.make_node("Relu", [out], [name]))
        return name

    x = conv("input", 3, 64, 7, 2, "conv1")
    nodes.append(helper.make_node("MaxPool", [x], ["maxpool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    x, cin = "maxpool", 64
    for s, (width, blocks, stride) in enumerate(_STAGES, start=1):
        for b in range(blocks):
            p = f"layer{s}.{b}"
            st = stride if b == 0 else 1
            h = conv(x, cin, width, 1, 1, f"{p}.conv1")
            h = conv(h, width, width, 3, st, f"{p}.conv2")
            # a small last gain keeps the residual sum's scale steady over 16 blocks, like zero-init BN
            h = conv(h, width, width * 4, 1, 1, f"{p}.conv3", relu=False, gain=0.2)
            short = conv(x, cin, width * 4, 1, st, f"{p}.downsample", relu=False) if b == 0 else x
            nodes.append(helper.make_node("Add", [h, short], [f"{p}.sum"]))
            out = f"layer{s}" if b == blocks - 1 else p
            nodes.append(helper.make_node("Relu", [f"{p}.sum"], [out]))
            x, cin = out, width * 4
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"]))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"]))
    fc = rng.normal(0, np.sqrt(1.0 / 2048), (2048, 1000)).astype(np.float32)
    inits.extend([numpy_helper.from_array(fc, "fc.w"), numpy_helper.from_array(np.zeros(1000, np.float32), "fc.b")])
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"]))
    graph = helper.make_graph(
        nodes, "resnet50_random",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="deepfeat-benchmarks")
    model.ir_version = 8
    model.doc_string = "ResNet-50 with RANDOM weights (deepfeat benchmarks): speed only, meaningless features"
    onnx.checker.check_model(model)
    return model


def write(path: str | Path, seed: int = 0) -> Path:
    path = Path(path)
    onnx.save(build(seed), str(path))
    return path


if __name__ == "__main__":
    print(write(sys.argv[1] if len(sys.argv) > 1 else "resnet50_random.onnx"))
