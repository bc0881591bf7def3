"""deepfeat.quantize: int8 and fp16 graphs that run, keep their named tensors, stay close to fp32."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from deepfeat import ImageEmbedder
from deepfeat.graph import load_onnx, truncate
from deepfeat.quantize import QuantizationError, convert_float16, quantize_model
from deepfeat.registry import METADATA_KEY
from deepfeat.resolve import resolve_model
from deepfeat.runtime import Runner

from .conftest import TINY_LAYERS, TINY_PREPROCESSING


def _images(n: int, seed: int) -> list[np.ndarray]:
    """Random crops (and flips) of scikit-learn's two real photos; seeds give disjoint-enough sets."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(rng.integers(60, 200))
        y, x = rng.integers(0, photo.shape[0] - side), rng.integers(0, photo.shape[1] - side)
        crop = photo[y:y + side, x:x + side]
        out.append(np.ascontiguousarray(crop[:, ::-1] if rng.random() < 0.5 else crop))
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _embed(model, images, **kw) -> np.ndarray:
    return ImageEmbedder(model=str(model), layers=["stage1", "pooled"], progress=False, **kw).fit_transform(images)


@pytest.fixture(scope="module")
def eval_images() -> list[np.ndarray]:
    return _images(8, seed=1)


@pytest.mark.parametrize("weight_type", ["int8", "uint8"])
def test_static_int8_keeps_tensors_metadata_and_vectors(tiny_model_path, tmp_path, eval_images, weight_type):
    out = quantize_model(
        tiny_model_path, tmp_path / "tiny-int8.onnx", _images(16, seed=0),
        weight_type=weight_type, preprocessing=TINY_PREPROCESSING, batch_size=5,
    )
    assert out == tmp_path / "tiny-int8.onnx" and out.is_file()
    proto = load_onnx(out)
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # really quantized, QDQ format
    produced = {o for n in proto.graph.node for o in n.output}
    assert set(TINY_LAYERS.values()) <= produced  # the source's tensor names survive

    record = json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])
    assert record["quantization"]["calibration_images"] == 16
    assert record["quantization"]["weight_type"] == weight_type
    _, spec = resolve_model(out)  # no preprocessing given: it comes from the file
    assert (spec.input_size, spec.resize_size, spec.default_layer) == (32, 36, "pooled")
    # the quantizer folds each Relu into the uint8 range and names the Conv output "conv1":
    # the aliases of ReLU outputs point to the dequantized tensor instead, the others stay
    # ("features", which the source file does not name, is derived from its graph)
    assert dict(spec.layers) == {**TINY_LAYERS, "stage1": "conv1_DequantizeLinear_Output",
                                 "stage2": "conv2_DequantizeLinear_Output",
                                 "features": "conv2_DequantizeLinear_Output"}
    x = np.random.default_rng(0).normal(0, 1, (2, 3, 32, 32)).astype(np.float32)
    for alias, tensor in spec.layers.items():
        # every alias is a float tensor that a truncated graph can output
        cut = truncate(proto, [tensor])
        (value,) = Runner.from_model(cut.SerializeToString(), "cpu").run(x)
        assert value.dtype == np.float32 and value.shape[0] == 2
        if alias.startswith("stage"):
            assert value.min() >= 0  # a ReLU output, not the pre-activation

    ref = _embed(tiny_model_path, eval_images, preprocessing=TINY_PREPROCESSING)
    q = _embed(out, eval_images)
    assert q.shape == ref.shape and np.isfinite(q).all()
    assert not np.array_equal(q, ref)
    assert _cosine(ref, q).min() > 0.99


def test_dynamic_int8_needs_no_calibration(tiny_model_path, tmp_path, eval_images):
    out = quantize_model(tiny_model_path, tmp_path / "tiny-dyn.onnx", method="dynamic", preprocessing=TINY_PREPROCESSING)
    proto = load_onnx(out)
    assert "ConvInteger" in {n.op_type for n in proto.graph.node}
    assert set(TINY_LAYERS.values()) <= {o for n in proto.graph.node for o in n.output}
    ref = _embed(tiny_model_path, eval_images, preprocessing=TINY_PREPROCESSING)
    q = _embed(out, eval_images)
    assert _cosine(ref, q).min() > 0.99


def test_calibration_folder_is_spread_over_classes(tiny_model_path, tmp_path, photo_folder):
    root, df = photo_folder
    out = quantize_model(tiny_model_path, tmp_path / "t.onnx", root, max_images=4, preprocessing=TINY_PREPROCESSING)
    record = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}[METADATA_KEY])
    assert record["quantization"]["calibration_images"] == 4


def test_unreadable_calibration_images_are_skipped_or_refused(tiny_model_path, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"<html>not a photo</html>")
    out = quantize_model(tiny_model_path, tmp_path / "a.onnx", [str(bad)] + _images(3, seed=2),
                         preprocessing=TINY_PREPROCESSING)
    record = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}[METADATA_KEY])
    assert record["quantization"]["calibration_images"] == 3
    with pytest.raises(QuantizationError, match="None of the 2 calibration images.*bad.jpg"):
        quantize_model(tiny_model_path, tmp_path / "b.onnx", [str(bad), str(tmp_path / "missing.png")],
                       preprocessing=TINY_PREPROCESSING)
    assert not (tmp_path / "b.onnx").exists()


def test_bad_arguments_say_what_to_do(tiny_model_path, tmp_path):
    kw = dict(preprocessing=TINY_PREPROCESSING)
    with pytest.raises(ValueError, match="needs calibration_images"):
        quantize_model(tiny_model_path, tmp_path / "x.onnx", **kw)
    with pytest.raises(ValueError, match="'method' parameter .* Got 'qat'"):
        quantize_model(tiny_model_path, tmp_path / "x.onnx", _images(2, 0), method="qat", **kw)
    with pytest.raises(ValueError, match="'weight_type' parameter .* Got 'int4'"):
        quantize_model(tiny_model_path, tmp_path / "x.onnx", _images(2, 0), weight_type="int4", **kw)
    with pytest.raises(ValueError, match="'max_images' parameter .* Got 0"):
        quantize_model(tiny_model_path, tmp_path / "x.onnx", _images(2, 0), max_images=0, **kw)
    with pytest.raises(ValueError, match="is the source model file"):
        quantize_model(tiny_model_path, tiny_model_path, _images(2, 0), **kw)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        quantize_model(tiny_model_path, tmp_path / "x.onnx", str(tmp_path / "nowhere"), **kw)
    with pytest.raises(QuantizationError, match="no tensor for the layer aliases .*'gone'"):
        quantize_model(tiny_model_path, tmp_path / "x.onnx", _images(2, 0),
                       preprocessing={**TINY_PREPROCESSING, "layers": {**TINY_LAYERS, "gone": "no_such_tensor"}})
    assert not (tmp_path / "x.onnx").exists()


def test_float16_keeps_tensors_metadata_io_types_and_vectors(tiny_model_path, tmp_path, eval_images):
    out = convert_float16(tiny_model_path, tmp_path / "tiny-fp16.onnx", preprocessing=TINY_PREPROCESSING)
    proto = load_onnx(out)  # the checker passes: nodes are in topological order
    weights = {t.name: t.data_type for t in proto.graph.initializer}
    assert weights["w1"] == onnx.TensorProto.FLOAT16 and weights["w2"] == onnx.TensorProto.FLOAT16
    # the image input and the final output stay float32: a drop-in file
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert set(TINY_LAYERS.values()) <= {o for n in proto.graph.node for o in n.output}
    record = json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])
    assert record["precision"] == "float16" and record["layers"] == {**TINY_LAYERS, "features": "conv2"}  # features: derived
    # the file needs no preprocessing argument, and its vectors come back float32 and close to fp32's
    ref = _embed(tiny_model_path, eval_images, preprocessing=TINY_PREPROCESSING)
    half = _embed(out, eval_images)
    assert half.dtype == np.float32 and half.shape == ref.shape
    assert _cosine(ref, half).min() >= 0.999
    assert not np.array_equal(ref, half)  # really computed in half precision


def test_float16_shipped_model_on_real_photos(tmp_path, sample_photos):
    out = convert_float16("efficientnet_lite0", tmp_path / "lite0-fp16.onnx")
    kw = {"layers": ["stage4", "pooled"], "progress": False}
    ref = ImageEmbedder(**kw).fit_transform(sample_photos)
    half = ImageEmbedder(model=str(out), **kw).fit_transform(sample_photos)
    assert _cosine(ref, half).min() >= 0.999
    assert resolve_model(out)[1].layers == resolve_model("efficientnet_lite0")[1].layers


def test_float16_refuses_to_overwrite_its_source(tiny_model_path):
    with pytest.raises(ValueError, match="source model file"):
        convert_float16(tiny_model_path, tiny_model_path, preprocessing=TINY_PREPROCESSING)


def test_float16_layer_table_matches_fp32_in_graph_order(tmp_path):
    from deepfeat import list_layers

    out = convert_float16("efficientnet_lite0", tmp_path / "lite0-fp16.onnx")
    ref = list_layers("efficientnet_lite0", aliases_only=True)
    half = list_layers(out, aliases_only=True)
    assert half[["name", "alias", "shape"]].values.tolist() == ref[["name", "alias", "shape"]].values.tolist()


def test_float16_of_a_file_listing_its_weights_as_inputs(tmp_path):
    # old exporters (IR 3) list every weight as a graph input too; those must become fp16 as well
    from .conftest import build_tiny_cnn

    model = build_tiny_cnn()
    model.graph.input.extend(
        onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in model.graph.initializer
    )
    src = tmp_path / "tiny-ir3.onnx"
    onnx.save(model, str(src))
    proto = load_onnx(convert_float16(src, tmp_path / "tiny-ir3-fp16.onnx", preprocessing=TINY_PREPROCESSING))
    assert {t.data_type for t in proto.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert [i.name for i in proto.graph.input] == ["input"]


def test_float16_sort_keeps_subgraph_reads_after_their_producers(tmp_path):
    from onnx import TensorProto as T
    from onnx import helper as h

    # an If whose branches read tensors of the outer graph
    then_g = h.make_graph([h.make_node("Identity", ["b"], ["t"])], "then", [], [h.make_tensor_value_info("t", T.FLOAT, [1, 4])])
    else_g = h.make_graph([h.make_node("Identity", ["a"], ["e"])], "else", [], [h.make_tensor_value_info("e", T.FLOAT, [1, 4])])
    nodes = [h.make_node("Relu", ["x"], ["a"]), h.make_node("Relu", ["a"], ["b"]),
             h.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 4]),
                                  h.make_tensor_value_info("cond", T.BOOL, [])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 4])])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    src = tmp_path / "if.onnx"
    onnx.save(model, str(src))
    out = convert_float16(src, tmp_path / "if-fp16.onnx", preprocessing={"layers": {"a": "a"}, "default_layer": "a"})
    proto = load_onnx(out)  # raises if a node reads a tensor before its producer
    order = [n.output[0] for n in proto.graph.node]
    assert order.index("b") < order.index("y") and order.index("a") < order.index("b")
