"""ONNX graphs with the architectures of the registered third-party files, built with onnx.helper.

The real files (100-550 MB) cannot be downloaded on the test machines, so the
tests check the layer rules on graphs of the same architecture: the same
operators, kernel sizes, strides, paddings and branch structure, in the style
of the exporter that made each file (Caffe2 names and a final Softmax for
AlexNet, MXNet names for VGG and ResNet-50 v1 (batch norms left as nodes), a
turnkey export with batch norms folded for the Computer_Vision Inception-v3 and
ResNet-50, each with the file's fixed batch-1 input). :func:`as_deepfeat_export`
turns a graph into what ``deepfeat export`` writes (alias-named tensors, a
dynamic batch axis, the metadata record). Channel
widths are divided by ``div`` to keep them small; the weights are random, with
non-zero biases as trained networks have (``trained=False`` gives the zero
biases of an untrained export).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class _Builder:
    def __init__(self, seed: int, trained: bool):
        self.rng = np.random.default_rng(seed)
        self.trained = trained
        self.nodes: list = []
        self.inits: list = []

    def weight(self, name: str, shape: tuple, fan_in: int):
        w = self.rng.normal(0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)
        self.inits.append(numpy_helper.from_array(w, name))
        return name

    def bias(self, name: str, n: int):
        b = self.rng.normal(0, 0.05, n).astype(np.float32) if self.trained else np.zeros(n, np.float32)
        self.inits.append(numpy_helper.from_array(b, name))
        return name

    def conv(self, x, cin, cout, k, name, stride=1, pad=None, relu=True, relu_name=None):
        kh, kw = (k, k) if isinstance(k, int) else k
        if pad is None:
            pad = (kh // 2, kw // 2)
        elif isinstance(pad, int):
            pad = (pad, pad)
        w = self.weight(f"{name}_w", (cout, cin, kh, kw), cin * kh * kw)
        b = self.bias(f"{name}_b", cout)
        self.nodes.append(helper.make_node("Conv", [x, w, b], [name], kernel_shape=[kh, kw],
                                           strides=[stride, stride], pads=[pad[0], pad[1], pad[0], pad[1]]))
        if not relu:
            return name
        out = relu_name or f"{name}_relu"
        self.nodes.append(helper.make_node("Relu", [name], [out]))
        return out

    def pool(self, op, x, k, stride, name, pad=0):
        self.nodes.append(helper.make_node(op, [x], [name], kernel_shape=[k, k], strides=[stride, stride],
                                           pads=[pad] * 4))
        return name

    def gemm(self, x, cin, cout, name):
        w = self.weight(f"{name}_w", (cout, cin), cin)
        b = self.bias(f"{name}_b", cout)
        self.nodes.append(helper.make_node("Gemm", [x, w, b], [name], transB=1))
        return name

    def head(self, x, cin, width, classes, hidden_names, classifier):
        """Two hidden fully connected layers (Gemm, ReLU, Dropout each), then the classifier."""
        for gemm, relu, drop in hidden_names:
            x = self.node("Dropout", [self.node("Relu", [self.gemm(x, cin, width, gemm)], relu)], drop)
            cin = width
        return self.gemm(x, cin, classes, classifier)

    def const(self, name, values):
        self.inits.append(numpy_helper.from_array(np.asarray(values), name))
        return name

    def node(self, op, inputs, output, **attrs):
        self.nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def model(self, name, input_name, side, output, n_out, opset, ir_version=None) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [1, 3, side, side])],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, [1, n_out])], self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        if ir_version is not None:
            m.ir_version = ir_version
        onnx.checker.check_model(m)
        return m


def caffe_alexnet(div: int = 8, trained: bool = True, classes: int = 100) -> onnx.ModelProto:
    """BVLC AlexNet as the zoo's Caffe2 conversion lays it out (``bvlcalexnet-12``): input
    ``data_0``, LRN after conv1/conv2, fc6/fc7 with ReLU and Dropout, output ``prob_1`` (Softmax)."""
    b = _Builder(1, trained)
    c1, c2, c3, fc = 96 // div, 256 // div, 384 // div, 4096 // div
    x = b.conv("data_0", 3, c1, 11, "conv1_1", stride=4, pad=2, relu_name="conv1_2")
    x = b.node("LRN", [x], "norm1_1", size=5, alpha=1e-4, beta=0.75, bias=1.0)
    x = b.pool("MaxPool", x, 3, 2, "pool1_1")
    x = b.conv(x, c1, c2, 5, "conv2_1", pad=2, relu_name="conv2_2")
    x = b.node("LRN", [x], "norm2_1", size=5, alpha=1e-4, beta=0.75, bias=1.0)
    x = b.pool("MaxPool", x, 3, 2, "pool2_1")
    x = b.conv(x, c2, c3, 3, "conv3_1", relu_name="conv3_2")
    x = b.conv(x, c3, c3, 3, "conv4_1", relu_name="conv4_2")
    x = b.conv(x, c3, c2, 3, "conv5_1", relu_name="conv5_2")
    x = b.pool("MaxPool", x, 3, 2, "pool5_1")
    x = b.node("Reshape", [x, b.const("OC2_DUMMY_1", np.array([1, -1], np.int64))], "OC2_DUMMY_0")
    x = b.head(x, c2 * 6 * 6, fc, classes, [("fc6_1", "fc6_2", "fc6_3"), ("fc7_1", "fc7_2", "fc7_3")], "fc8_1")
    b.node("Softmax", [x], "prob_1", axis=1)
    return b.model("bvlc_alexnet", "data_0", 224, "prob_1", classes, 12)


def mxnet_vgg16(div: int = 8, trained: bool = True, classes: int = 100) -> onnx.ModelProto:
    """MXNet Gluon VGG-16 as the zoo's ``vgg16-7`` names it: input ``data``, 13 conv+ReLU in
    5 blocks with 2x2 max pools, Flatten, two Dense+ReLU+Dropout, output ``vgg0_dense2_fwd``."""
    b = _Builder(2, trained)
    cfg = [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]
    x, cin, i = "data", 3, 0
    for blk, (width, n) in enumerate(cfg):
        for _ in range(n):
            x = b.conv(x, cin, width // div, 3, f"vgg0_conv{i}_fwd", relu_name=f"vgg0_relu{i}_fwd")
            cin, i = width // div, i + 1
        x = b.pool("MaxPool", x, 2, 2, f"vgg0_pool{blk}_fwd")
    x = b.node("Flatten", [x], "vgg0_flatten0_reshape0", axis=1)
    names = [(f"vgg0_dense{k}_fwd", f"vgg0_dense{k}_relu_fwd", f"vgg0_dropout{k}_fwd") for k in (0, 1)]
    b.head(x, cin * 7 * 7, 4096 // div, classes, names, "vgg0_dense2_fwd")
    return b.model("vgg16", "data", 224, "vgg0_dense2_fwd", classes, 7)


def timm_inception_v3(div: int = 8, trained: bool = True, classes: int = 100) -> onnx.ModelProto:
    """timm's Inception-v3 as the zoo's turnkey export has it (``inception_v3_Opset17``): input
    ``x`` fixed at 1x3x299x299, batch norms folded into Conv biases, Mixed_5b..Mixed_7c branches
    joined by Concat, global average pool, Flatten, Gemm."""
    b = _Builder(3, trained)

    def c(n):
        return max(n // div, 1)

    def conv(x, cin, cout, k, name, stride=1, pad=None):
        return b.conv(x, cin, cout, k, f"{name}.conv", stride=stride, pad=pad, relu_name=name)

    x = conv("x", 3, c(32), 3, "Conv2d_1a_3x3", stride=2, pad=0)        # 149
    x = conv(x, c(32), c(32), 3, "Conv2d_2a_3x3", pad=0)                 # 147
    x = conv(x, c(32), c(64), 3, "Conv2d_2b_3x3", pad=1)                 # 147
    x = b.pool("MaxPool", x, 3, 2, "Pool1")                              # 73
    x = conv(x, c(64), c(80), 1, "Conv2d_3b_1x1")
    x = conv(x, c(80), c(192), 3, "Conv2d_4a_3x3", pad=0)                # 71
    x = b.pool("MaxPool", x, 3, 2, "Pool2")                              # 35
    cin = c(192)

    def avg_branch(x, cin, cout, name):
        p = b.pool("AveragePool", x, 3, 1, f"{name}.avgpool", pad=1)
        return conv(p, cin, cout, 1, name)

    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):   # InceptionA
        b1 = conv(x, cin, c(64), 1, f"{name}.branch1x1")
        b5 = conv(conv(x, cin, c(48), 1, f"{name}.branch5x5_1"), c(48), c(64), 5, f"{name}.branch5x5_2")
        d = conv(x, cin, c(64), 1, f"{name}.branch3x3dbl_1")
        d = conv(d, c(64), c(96), 3, f"{name}.branch3x3dbl_2")
        d = conv(d, c(96), c(96), 3, f"{name}.branch3x3dbl_3")
        bp = avg_branch(x, cin, c(pool_features), f"{name}.branch_pool")
        x = b.node("Concat", [b1, b5, d, bp], name, axis=1)
        cin = c(64) + c(64) + c(96) + c(pool_features)
    # InceptionB: 35 -> 17
    b3 = conv(x, cin, c(384), 3, "Mixed_6a.branch3x3", stride=2, pad=0)
    d = conv(x, cin, c(64), 1, "Mixed_6a.branch3x3dbl_1")
    d = conv(d, c(64), c(96), 3, "Mixed_6a.branch3x3dbl_2")
    d = conv(d, c(96), c(96), 3, "Mixed_6a.branch3x3dbl_3", stride=2, pad=0)
    bp = b.pool("MaxPool", x, 3, 2, "Mixed_6a.pool")
    x = b.node("Concat", [b3, d, bp], "Mixed_6a", axis=1)
    cin = c(384) + c(96) + cin
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):  # InceptionC
        b1 = conv(x, cin, c(192), 1, f"{name}.branch1x1")
        s = conv(x, cin, c(c7), 1, f"{name}.branch7x7_1")
        s = conv(s, c(c7), c(c7), (1, 7), f"{name}.branch7x7_2")
        s = conv(s, c(c7), c(192), (7, 1), f"{name}.branch7x7_3")
        d = conv(x, cin, c(c7), 1, f"{name}.branch7x7dbl_1")
        for j, k in enumerate([(7, 1), (1, 7), (7, 1)], start=2):
            d = conv(d, c(c7), c(c7), k, f"{name}.branch7x7dbl_{j}")
        d = conv(d, c(c7), c(192), (1, 7), f"{name}.branch7x7dbl_5")
        bp = avg_branch(x, cin, c(192), f"{name}.branch_pool")
        x = b.node("Concat", [b1, s, d, bp], name, axis=1)
        cin = 4 * c(192)
    # InceptionD: 17 -> 8
    b3 = conv(conv(x, cin, c(192), 1, "Mixed_7a.branch3x3_1"), c(192), c(320), 3, "Mixed_7a.branch3x3_2",
              stride=2, pad=0)
    s = conv(x, cin, c(192), 1, "Mixed_7a.branch7x7x3_1")
    s = conv(s, c(192), c(192), (1, 7), "Mixed_7a.branch7x7x3_2")
    s = conv(s, c(192), c(192), (7, 1), "Mixed_7a.branch7x7x3_3")
    s = conv(s, c(192), c(192), 3, "Mixed_7a.branch7x7x3_4", stride=2, pad=0)
    bp = b.pool("MaxPool", x, 3, 2, "Mixed_7a.pool")
    x = b.node("Concat", [b3, s, bp], "Mixed_7a", axis=1)
    cin = c(320) + c(192) + cin
    for name in ("Mixed_7b", "Mixed_7c"):  # InceptionE
        b1 = conv(x, cin, c(320), 1, f"{name}.branch1x1")
        t = conv(x, cin, c(384), 1, f"{name}.branch3x3_1")
        t = b.node("Concat", [conv(t, c(384), c(384), (1, 3), f"{name}.branch3x3_2a"),
                              conv(t, c(384), c(384), (3, 1), f"{name}.branch3x3_2b")], f"{name}.branch3x3", axis=1)
        d = conv(conv(x, cin, c(448), 1, f"{name}.branch3x3dbl_1"), c(448), c(384), 3, f"{name}.branch3x3dbl_2")
        d = b.node("Concat", [conv(d, c(384), c(384), (1, 3), f"{name}.branch3x3dbl_3a"),
                              conv(d, c(384), c(384), (3, 1), f"{name}.branch3x3dbl_3b")],
                   f"{name}.branch3x3dbl", axis=1)
        bp = avg_branch(x, cin, c(192), f"{name}.branch_pool")
        x = b.node("Concat", [b1, t, d, bp], name, axis=1)
        cin = c(320) + 2 * c(384) + 2 * c(384) + c(192)
    x = b.node("GlobalAveragePool", [x], "global_pool")
    x = b.node("Flatten", [x], "flatten", axis=1)
    b.gemm(x, cin, classes, "fc")
    return b.model("inception_v3", "x", 299, "fc", classes, 17)


def torchvision_resnet50(div: int = 8, trained: bool = True, classes: int = 100) -> onnx.ModelProto:
    """torchvision's ResNet-50 (v1.5: stride on the 3x3 conv) as a turnkey export has it:
    input fixed at 1x3x224x224, batch norms folded, bottlenecks joined by Add + ReLU."""
    b = _Builder(4, trained)
    x = b.conv("input", 3, 64 // div, 7, "conv1", stride=2, pad=3, relu_name="relu")
    x = b.pool("MaxPool", x, 3, 2, "maxpool", pad=1)
    cin = 64 // div
    for s, (width, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), start=1):
        width //= div
        for i in range(blocks):
            p = f"layer{s}.{i}"
            st = stride if i == 0 else 1
            h = b.conv(x, cin, width, 1, f"{p}.conv1")
            h = b.conv(h, width, width, 3, f"{p}.conv2", stride=st)
            h = b.conv(h, width, width * 4, 1, f"{p}.conv3", relu=False)
            short = b.conv(x, cin, width * 4, 1, f"{p}.downsample", stride=st, pad=0, relu=False) if i == 0 else x
            add = b.node("Add", [h, short], f"{p}.add")
            x = b.node("Relu", [add], f"{p}.relu")
            cin = width * 4
    x = b.node("GlobalAveragePool", [x], "avgpool")
    x = b.node("Flatten", [x], "flatten", axis=1)
    b.gemm(x, cin, classes, "fc")
    return b.model("resnet50", "input", 224, "fc", classes, 17)


def mxnet_resnet50_v1(div: int = 8, trained: bool = True, classes: int = 100) -> onnx.ModelProto:
    """MXNet Gluon ResNet-50 v1 as the zoo's ``resnet50-v1-12`` lays it out: input ``data``, Conv without
    bias then BatchNormalization and Relu (not folded), the stride on each stage's first 1x1 conv (v1,
    not v1.5), shortcut conv + batch norm, ``_plus`` Add then Relu, global average pool, Flatten, Dense."""
    b = _Builder(5, trained)
    p = "resnetv17_"
    n = {"conv": 0, "bn": 0}

    def conv_bn(x, cin, cout, k, name, stride=1, pad=None, relu=True):
        pad = k // 2 if pad is None else pad
        w = b.weight(f"{name}_weight", (cout, cin, k, k), cin * k * k)
        c = b.node("Conv", [x, w], f"{name}_fwd", kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4)
        bn = name.replace("conv", "batchnorm")
        gamma = b.const(f"{bn}_gamma", (b.rng.uniform(0.5, 1.5, cout) if trained else np.ones(cout)).astype(np.float32))
        beta = b.const(f"{bn}_beta", (b.rng.normal(0, 0.1, cout) if trained else np.zeros(cout)).astype(np.float32))
        mean = b.const(f"{bn}_running_mean", (b.rng.normal(0, 0.1, cout) if trained else np.zeros(cout)).astype(np.float32))
        var = b.const(f"{bn}_running_var", (b.rng.uniform(0.5, 2, cout) if trained else np.ones(cout)).astype(np.float32))
        y = b.node("BatchNormalization", [c, gamma, beta, mean, var], f"{bn}_fwd", epsilon=1e-5)
        return b.node("Relu", [y], f"{bn.replace('batchnorm', 'relu')}_fwd") if relu else y

    x = conv_bn("data", 3, 64 // div, 7, f"{p}conv0", stride=2, pad=3)
    x = b.pool("MaxPool", x, 3, 2, f"{p}pool0_fwd", pad=1)
    cin = 64 // div
    for s, (width, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), start=1):
        width //= div
        for i in range(blocks):
            q = f"{p}stage{s}_"
            st = stride if i == 0 else 1
            h = conv_bn(x, cin, width, 1, f"{q}conv{3 * i}", stride=st, pad=0)
            h = conv_bn(h, width, width, 3, f"{q}conv{3 * i + 1}")
            h = conv_bn(h, width, width * 4, 1, f"{q}conv{3 * i + 2}", pad=0, relu=False)
            short = conv_bn(x, cin, width * 4, 1, f"{q}down_conv{i}", stride=st, pad=0, relu=False) if i == 0 else x
            add = b.node("Add", [h, short], f"{q}_plus{i}")
            x = b.node("Relu", [add], f"{q}activation{i}")
            cin = width * 4
    x = b.node("GlobalAveragePool", [x], f"{p}pool1_fwd")
    x = b.node("Flatten", [x], f"{p}flatten0_flatten0", axis=1)
    b.gemm(x, cin, classes, f"{p}dense0_fwd")
    return b.model("resnet50_v1", "data", 224, f"{p}dense0_fwd", classes, 12)


def as_deepfeat_export(model: onnx.ModelProto, aliases: dict[str, str], spec, *, weights: str = "pretrained",
                       recipe: str | None = None, **record_changes) -> onnx.ModelProto:
    """``model`` as ``deepfeat export`` writes a registered recipe's file: each alias's tensor renamed to the
    alias (a second alias of the same tensor is an Identity, as torch's exporter writes it), the input
    ``input`` with a dynamic batch axis, and deepfeat's metadata record (``recipe``, ``weights``, the spec's
    preprocessing and aliases; ``record_changes`` replace entries)."""
    import json

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    rename: dict[str, str] = {g.input[0].name: "input"}
    extra = []
    for alias, tensor in aliases.items():
        if tensor in rename:
            extra.append(helper.make_node("Identity", [rename[tensor]], [alias]))
        else:
            rename[tensor] = alias
    for node in g.node:
        node.input[:] = [rename.get(t, t) for t in node.input]
        node.output[:] = [rename.get(t, t) for t in node.output]
    g.node.extend(extra)
    for vi in list(g.input) + list(g.output):
        vi.name = rename.get(vi.name, vi.name)
        vi.type.tensor_type.shape.dim[0].dim_param = "batch"
    record = {
        "recipe": spec.exporter if recipe is None else recipe, "weights": weights,
        "input_size": spec.input_size, "resize_size": spec.resize_size, "interpolation": spec.interpolation,
        "mean": list(spec.mean), "std": list(spec.std), "layers": {a: a for a in aliases},
        "default_layer": "pooled", "description": spec.description, "source": spec.exporter,
        **record_changes,
    }
    m.producer_name = "deepfeat.export"
    m.metadata_props.add(key="deepfeat", value=json.dumps(record, sort_keys=True))
    onnx.checker.check_model(m)
    return m


#: the registry name each builder stands for, and the aliases the rules must find on it
ARCHITECTURES = {
    "alexnet": (caffe_alexnet, {
        # no stride-2 map: conv1 has stride 4 (55x55); LRN ends the first two stages
        "stage2": "norm1_1", "stage3": "norm2_1", "stage4": "conv5_2", "stage5": "pool5_1",
        "features": "pool5_1", "pooled": "fc7_2", "logits": "fc8_1", "fc6": "fc6_2", "fc7": "fc7_2"}),
    "vgg16": (mxnet_vgg16, {
        "stage1": "vgg0_relu3_fwd", "stage2": "vgg0_relu6_fwd", "stage3": "vgg0_relu9_fwd",
        "stage4": "vgg0_relu12_fwd", "stage5": "vgg0_pool4_fwd", "features": "vgg0_pool4_fwd",
        "pooled": "vgg0_dense1_relu_fwd", "logits": "vgg0_dense2_fwd",
        "fc6": "vgg0_dense0_relu_fwd", "fc7": "vgg0_dense1_relu_fwd"}),
    "inception_v3_unverified": (timm_inception_v3, {
        "stage1": "Conv2d_2b_3x3", "stage2": "Conv2d_4a_3x3", "stage3": "Mixed_5d", "stage4": "Mixed_6e",
        "stage5": "Mixed_7c", "features": "Mixed_7c", "pooled": "global_pool", "logits": "fc"}),
    "resnet50_unverified": (torchvision_resnet50, {
        "stage1": "relu", "stage2": "layer1.2.relu", "stage3": "layer2.3.relu", "stage4": "layer3.5.relu",
        "stage5": "layer4.2.relu", "features": "layer4.2.relu", "pooled": "avgpool", "logits": "fc"}),
    "resnet50": (mxnet_resnet50_v1, {
        "stage1": "resnetv17_relu0_fwd", "stage2": "resnetv17_stage1_activation2",
        "stage3": "resnetv17_stage2_activation3", "stage4": "resnetv17_stage3_activation5",
        "stage5": "resnetv17_stage4_activation2", "features": "resnetv17_stage4_activation2",
        "pooled": "resnetv17_pool1_fwd", "logits": "resnetv17_dense0_fwd"}),
}

#: registered names made by ``deepfeat export`` from torchvision weights: the graph of the same architecture
#: (torchvision's module layout) and the tensors its aliases are, before :func:`as_deepfeat_export` renames them
EXPORTS = {
    "inception_v3": ARCHITECTURES["inception_v3_unverified"],
    "resnet50_tv": ARCHITECTURES["resnet50_unverified"],
}
