import numpy as np
import onnxruntime as ort
import pytest

from deepfeat import get_model_spec, list_layers
from deepfeat.graph import LayerError, load_onnx, resolve_layers, truncate
from deepfeat.registry import ModelFileError
from deepfeat.resolve import resolve_model

from .conftest import TINY_LAYERS, build_tiny_cnn


def test_truncate_keeps_only_needed_nodes():
    model = build_tiny_cnn()
    cut = truncate(model, ["conv1"])
    assert [n.op_type for n in cut.graph.node] == ["Conv", "Relu"]
    assert [o.name for o in cut.graph.output] == ["conv1"]
    assert {t.name for t in cut.graph.initializer} == {"w1"}


def test_truncated_output_equals_full_graph_tensor():
    model = build_tiny_cnn()
    x = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    cut = ort.InferenceSession(truncate(model, ["conv2", "pooled"]).SerializeToString())
    conv2, pooled = cut.run(None, {"input": x})
    assert conv2.shape == (2, 8, 8, 8)
    np.testing.assert_allclose(pooled[:, :, 0, 0], conv2.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)


def test_unknown_layer_lists_valid_aliases():
    with pytest.raises(LayerError, match=r"stage9.*Valid aliases: \['logits', 'pooled', 'stage1', 'stage2'\]"):
        resolve_layers(build_tiny_cnn(), ["stage9"], TINY_LAYERS)


def test_tensor_names_work_as_layers():
    assert resolve_layers(build_tiny_cnn(), "c2", TINY_LAYERS) == [("c2", "c2")]


def test_list_layers_tiny_model_shapes():
    df = list_layers(build_tiny_cnn(), input_size=32)
    rows = df.set_index("name")
    assert rows.loc["conv1", "shape"] == ("batch", 4, 16, 16)
    assert rows.loc["conv2", "reduction"] == 4
    assert rows.loc["logits", "shape"] == ("batch", 3)


def test_list_layers_real_model_aliases():
    df = list_layers("efficientnet_lite0", aliases_only=True).set_index("alias")
    expected = {"stage1": (16, 2), "stage2": (24, 4), "stage3": (40, 8), "stage4": (112, 16), "stage5": (320, 32),
                "features": (1280, 32)}
    for alias, (channels, reduction) in expected.items():
        assert (df.loc[alias, "channels"], df.loc[alias, "reduction"]) == (channels, reduction)
    assert df.loc["logits", "shape"] == ("batch", 1000)


def test_shallow_cut_of_real_model_has_fewer_nodes():
    path, spec = resolve_model("efficientnet_lite0")
    full = load_onnx(path)
    shallow = truncate(full, [spec.layers["stage2"]])
    deep = truncate(full, [spec.layers["pooled"]])
    assert len(shallow.graph.node) < len(deep.graph.node) < len(full.graph.node)
    assert len(shallow.graph.node) < len(full.graph.node) / 3


def test_registry_checks_sha256(tmp_path, monkeypatch):
    spec = get_model_spec("efficientnet_lite0")
    bad = tmp_path / spec.filename
    bad.write_bytes(b"not the model")
    monkeypatch.setenv("DEEPFEAT_MODELS", str(tmp_path))
    with pytest.raises(ModelFileError, match="sha256"):
        resolve_model("efficientnet_lite0")


def test_registry_unknown_name():
    with pytest.raises(FileNotFoundError, match="neither a registered name"):
        resolve_model("no_such_model")


def test_spec_is_immutable():
    spec = get_model_spec("efficientnet_lite0")
    with pytest.raises(Exception):
        spec.input_size = 1
    with pytest.raises(TypeError):
        spec.layers["x"] = "y"
