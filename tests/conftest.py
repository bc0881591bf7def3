"""Shared fixtures: a tiny real ONNX CNN built with onnx.helper, real photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "hymenoptera_data"

#: layer aliases of the tiny model, in the registry's naming scheme
TINY_LAYERS = {"stage1": "conv1", "stage2": "conv2", "pooled": "pooled", "logits": "logits"}
#: preprocessing for the tiny model (what an unregistered .onnx file needs)
TINY_PREPROCESSING = {"input_size": 32, "resize_size": 36, "layers": TINY_LAYERS, "default_layer": "pooled"}


def build_tiny_cnn(seed: int = 0) -> onnx.ModelProto:
    """Conv-ReLU x2, global average pool, linear head; dynamic batch and spatial axes."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.5, (8, 4, 3, 3)).astype(np.float32), "w2")
    wf = numpy_helper.from_array(rng.normal(0, 0.5, (8, 3)).astype(np.float32), "wf")
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["conv1"]),
        helper.make_node("Conv", ["conv1", "w2"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["conv2"]),
        helper.make_node("GlobalAveragePool", ["conv2"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "wf"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        initializer=[w1, w2, wf],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny.onnx"
    onnx.save(build_tiny_cnn(), str(path))
    return path


@pytest.fixture(scope="session")
def sample_photos() -> list[np.ndarray]:
    """scikit-learn's two real photos (china, flower), uint8 RGB."""
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory):
    """A labelled folder of JPEG crops of real photos (deepfeat.make_sample_photos)."""
    from deepfeat import make_sample_photos

    root = tmp_path_factory.mktemp("photos")
    df = make_sample_photos(root, per_class=6, size=96)
    return root, df


@pytest.fixture(scope="session")
def hymenoptera() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real photo set not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def network_calls(monkeypatch) -> list:
    """The tensors each ImageEmbedder asks its session for, one entry per network call."""
    from deepfeat import ImageEmbedder

    asked: list = []
    network = ImageEmbedder._network

    def recording(self, tensors):
        asked.append(tensors)
        return network(self, tensors)

    monkeypatch.setattr(ImageEmbedder, "_network", recording)
    return asked
