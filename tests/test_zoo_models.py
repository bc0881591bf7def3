"""The registered third-party backbones (ResNet-50, Inception-v3, VGG-16, AlexNet) on graphs of
the same architecture built here (tests/zoo_archs.py): standard aliases at the right strides,
registered preprocessing wired through, the untrained-weights guard, and the files deepfeat export
makes from torchvision weights (inception_v3, resnet50_tv), checked by recipe and structure."""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from deepfeat import registry
from deepfeat.aliases import derive_aliases
from deepfeat.cli import main
from deepfeat.registry import ModelFileError, get_model_spec
from deepfeat.resolve import list_layers, resolve_model, untrained_reason

from .zoo_archs import ARCHITECTURES, EXPORTS, as_deepfeat_export, mxnet_resnet50_v1, torchvision_resnet50

REDUCTION = {"stage1": 2, "stage2": 4, "stage3": 8, "stage4": 16, "stage5": 32}


def _side(model) -> int:
    return model.graph.input[0].type.tensor_type.shape.dim[2].dim_value


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_graph_rules_find_the_standard_aliases(name):
    build, expected = ARCHITECTURES[name]
    model = build()
    assert derive_aliases(model, _side(model)) == expected


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_deepfeat_layers_shows_the_aliases_at_their_strides(name, tmp_path, capsys):
    build, expected = ARCHITECTURES[name]
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(build().SerializeToString())
    assert main(["layers", str(path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[1]: line for line in out.splitlines()[1:]}  # first alias of each tensor
    shown = {a for line in rows.values() for a in [line.split()[1]] + line.split()[-1].split(",") if a in expected}
    assert shown == set(expected)
    df = list_layers(str(path), aliases_only=True)
    table = {a: row for _, row in df.iterrows() for a in [row["alias"], *filter(None, row["also"].split(","))]}
    assert {a: table[a]["name"] for a in expected} == expected
    for alias, stride in REDUCTION.items():
        if alias in expected:
            assert table[alias]["reduction"] == stride, (alias, table[alias])
    # the fixed input side is the one measured: Inception's stage5 is 8x8 at 299
    if name == "inception_v3_unverified":
        assert re.search(r"Mixed_7c\s+stage5\s+Concat\s+\(batch, 256, 8, 8\)\s+256\s+32\s+features", out)


@pytest.fixture
def registered_file(tmp_path, monkeypatch):
    """Put a built graph where the registry looks for ``name``'s file, pinned by its own sha256."""
    monkeypatch.setenv("DEEPFEAT_MODELS", str(tmp_path))

    def put(name, model):
        spec = get_model_spec(name)
        data = model.SerializeToString()
        (tmp_path / spec.filename).write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        monkeypatch.setitem(registry._REGISTRY, name, replace(spec, sha256=sha, sha256_also=(), urls=()))
        return tmp_path / spec.filename

    return put


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_registered_spec_embeds_with_its_preprocessing(name, registered_file):
    from deepfeat import ImageEmbedder

    build, expected = ARCHITECTURES[name]
    registered_file(name, build())
    _, spec = resolve_model(name)
    assert {a: spec.layers[a] for a in expected} == expected
    images = np.random.default_rng(0).integers(0, 255, (3, 90, 120, 3), dtype=np.uint8)
    emb = ImageEmbedder(model=name, layers=["stage3", "pooled"], batch_size=2, progress=False).fit(images)
    X = emb.transform(images)
    assert X.shape[0] == 3 and np.isfinite(X).all()
    assert emb.spec_.input_size == spec.input_size


def test_registered_preprocessing_comes_from_each_weights_source():
    inc = get_model_spec("inception_v3_unverified")
    # timm's inception_v3.tv_in1k config: 299, crop_pct 0.875, bicubic, mean = std = 0.5
    assert (inc.input_size, inc.resize_size, inc.interpolation) == (299, 341, "bicubic")
    assert inc.mean == inc.std == (127.5, 127.5, 127.5)
    r50 = get_model_spec("resnet50_unverified")
    # torchvision ResNet50_Weights.IMAGENET1K_V2: resize 232, crop 224, ImageNet statistics
    assert (r50.input_size, r50.resize_size, r50.mean, r50.std) == (
        224, 232, registry.IMAGENET_MEAN, registry.IMAGENET_STD)
    alex = get_model_spec("alexnet")
    assert alex.channel_order == "BGR" and alex.std == (1.0, 1.0, 1.0)
    assert get_model_spec("vgg16").mean == registry.IMAGENET_MEAN
    for name in ("resnet50", "resnet50_unverified", "inception_v3_unverified", "vgg16", "alexnet", "resnet50_v2",
                 "mobilenetv2", "densenet121"):
        spec = get_model_spec(name)
        assert spec.urls[0].startswith("https://huggingface.co/onnxmodelzoo/"), name
        assert spec.urls[-1].startswith("https://github.com/onnx/models/raw/main/"), name
        assert len(set(spec.urls)) == len(spec.urls) == (4 if spec.check_trained else 3)
        assert all(re.fullmatch(r"[0-9a-f]{64}", d) for d in spec.accepted_sha256)
        assert spec.pooled_dim in (1024, 1280, 2048, 4096) and spec.size_bytes > 10_000_000


def test_plain_names_mean_files_whose_weights_are_known_to_be_trained():
    # resnet50: the zoo's validated MXNet ResNet-50 v1 (top-1 74.97% in its README), pinned by the
    # publisher's digests: the same file as resnet50_mxnet, fed as the zoo's README says
    r50, mx = get_model_spec("resnet50"), get_model_spec("resnet50_mxnet")
    assert (r50.filename, r50.accepted_sha256, r50.urls) == ("resnet50-v1-12.onnx", mx.accepted_sha256, mx.urls)
    assert r50.urls[0].endswith("legacy_models/resolve/main/validated/vision/classification/resnet/model/"
                                "resnet50-v1-12.onnx")
    assert (r50.input_size, r50.resize_size, r50.interpolation, r50.mean, r50.std) == (
        224, 256, "bilinear", registry.IMAGENET_MEAN, registry.IMAGENET_STD)
    assert r50.derive_layers and not r50.check_trained and r50.trained == "zoo top-1 74.97"
    assert "resnet/README.md" in r50.trained_source
    # inception_v3 and resnet50_tv: made by deepfeat export from torchvision's weights, with those weights'
    # own transforms (Inception_V3_Weights.IMAGENET1K_V1: resize 342, crop 299; ResNet50 V2: 232, 224)
    for name, exporter, sizes in (("inception_v3", "torchvision:inception_v3@IMAGENET1K_V1", (299, 342)),
                                  ("resnet50_tv", "torchvision:resnet50@IMAGENET1K_V2", (224, 232))):
        spec = get_model_spec(name)
        assert (spec.exporter, spec.sha256, spec.urls, spec.filename) == (exporter, None, (), f"{name}.onnx")
        assert (spec.input_size, spec.resize_size, spec.interpolation) == (*sizes, "bilinear")
        assert (spec.mean, spec.std) == (registry.IMAGENET_MEAN, registry.IMAGENET_STD)
        assert dict(spec.layers) == {a: a for a in ("stage1", "stage2", "stage3", "stage4", "stage5", "features",
                                                    "pooled", "logits")}
        assert spec.check_trained and not spec.derive_layers and spec.trained == "torchvision hash"
        assert spec.pooled_dim == 2048
    # the Computer_Vision benchmark exports keep their pinned files only under names that say so
    for name, digest in (("resnet50_unverified", "eb6eabe7"), ("inception_v3_unverified", "d714dcf6")):
        spec = get_model_spec(name)
        assert spec.sha256.startswith(digest) and spec.check_trained and spec.trained == "unverified"
        assert "UNVERIFIED" in spec.description
    for spec in registry._REGISTRY.values():
        if not spec.name.endswith("_unverified"):
            assert not any("Computer_Vision" in u for u in spec.urls), spec.name
            assert spec.sha256 not in {get_model_spec("resnet50_unverified").sha256,
                                       get_model_spec("inception_v3_unverified").sha256}, spec.name


def test_every_entry_says_how_its_weights_are_known_to_be_trained():
    labels = {spec.name: spec.trained for spec in registry._REGISTRY.values()}
    allowed = re.compile(r"zoo top-1 \d\d\.\d\d|zoo, no top-1|torchvision hash|measured here|pinned export|unverified")
    assert all(allowed.fullmatch(v) for v in labels.values()), labels
    assert all(spec.trained_source for spec in registry._REGISTRY.values())
    assert labels["efficientnet_lite0"] == "measured here" and labels["densenet121"] == "zoo, no top-1"
    df = registry.list_models().set_index("name")
    assert df.loc["inception_v3", "trained"] == "torchvision hash" and pd.isna(df.loc["inception_v3", "sha256"])
    assert "inception.py" in df.loc["inception_v3", "trained_source"]


def test_a_spec_pickled_before_the_trained_field_loads():
    import pickle

    spec = get_model_spec("resnet50_mxnet")
    fields = {k: getattr(spec, k) for k in spec.__dataclass_fields__ if k not in ("trained", "trained_source")}
    fields["layers"] = dict(spec.layers)
    old = registry._rebuild_spec(fields)  # what unpickling an older spec calls
    assert old.trained == "" and old.sha256 == spec.sha256
    assert pickle.loads(pickle.dumps(spec)) == spec
    # an embedder saved before the field existed (its spec_ is stored as a dict) loads and embeds
    from deepfeat import ImageEmbedder

    images = np.random.default_rng(0).integers(0, 255, (2, 40, 40, 3), dtype=np.uint8)
    emb = ImageEmbedder(layers="pooled", progress=False).fit(images)
    state = emb.__getstate__()
    for key in ("trained", "trained_source"):
        del state["spec_"][key]
    loaded = ImageEmbedder.__new__(ImageEmbedder)
    loaded.__setstate__(state)
    assert loaded.spec_.trained == "" and loaded.spec_.input_size == 224
    np.testing.assert_allclose(loaded.transform(images), emb.transform(images), rtol=1e-6)


def test_a_published_file_with_untrained_weights_is_refused(registered_file):
    registered_file("resnet50_unverified", torchvision_resnet50(trained=False))
    with pytest.raises(ModelFileError, match=r"untrained weights \(all 53 convolution biases are exactly 0\)"):
        resolve_model("resnet50_unverified")


def test_a_trained_looking_file_passes_the_guard(registered_file):
    path = registered_file("resnet50_unverified", torchvision_resnet50(trained=True))
    assert resolve_model("resnet50_unverified")[0] == path


# --- files made by deepfeat export on the user's machine (no pinned sha256) -----------------------------


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    """An empty model search path: $DEEPFEAT_MODELS and the user cache both in tmp_path."""
    monkeypatch.setenv("DEEPFEAT_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(registry, "models_dirs", lambda: [tmp_path / "models", registry.user_models_dir()])
    (tmp_path / "models").mkdir()
    return tmp_path / "models"


def _put_export(models_dir, name, trained=True, **kw):
    build, aliases = EXPORTS[name]
    spec = get_model_spec(name)
    path = models_dir / spec.filename
    path.write_bytes(as_deepfeat_export(build(trained=trained), aliases, spec, **kw).SerializeToString())
    return path


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_an_export_of_the_recipe_resolves_and_embeds_with_its_preprocessing(name, models_dir):
    from deepfeat import ImageEmbedder

    path = _put_export(models_dir, name)
    found, spec = resolve_model(name)
    assert found == path and dict(spec.layers) == dict(get_model_spec(name).layers)
    images = np.random.default_rng(0).integers(0, 255, (3, 90, 120, 3), dtype=np.uint8)
    emb = ImageEmbedder(model=name, layers=["stage4", "pooled"], batch_size=2, progress=False).fit(images)
    X = emb.transform(images)
    side = 299 if name == "inception_v3" else 224
    assert emb.spec_.input_size == side and emb.spec_.resize_size == get_model_spec(name).resize_size
    assert X.shape == (3, emb.n_features_out_) and np.isfinite(X).all()
    # the aliases are the tensors the export named, at the strides their names say
    df = list_layers(name, aliases_only=True)
    table = {a: row for _, row in df.iterrows() for a in [row["alias"], *filter(None, row["also"].split(","))]}
    assert {a: int(table[a]["reduction"]) for a in REDUCTION} == REDUCTION
    assert emb.model_sha256_ == registry.file_sha256(path)


@pytest.mark.parametrize("change, message", [
    ({"recipe": "torchvision:resnet50@IMAGENET1K_V2"}, r"it records the recipe 'torchvision:resnet50@IMAGENET1K_V2', "
                                                       r"the model is made by 'torchvision:inception_v3@IMAGENET1K_V1'"),
    ({"resize_size": 341}, r"resize_size 341 where the registry has 342"),
    ({"mean": [127.5, 127.5, 127.5]}, r"mean \[127.5, 127.5, 127.5\] where the registry has \(123.67"),
    ({"layers": {"pooled": "pooled"}}, r"layers \{'pooled': 'pooled'\} where the registry has"),
    ({"std": "58.4"}, r"std '58.4' where the registry has \(58.39"),
])
def test_a_file_that_is_not_the_recipes_export_is_refused(change, message, models_dir):
    _put_export(models_dir, "inception_v3", **change)
    with pytest.raises(ModelFileError, match=r"is not deepfeat's export of model 'inception_v3': " + message) as err:
        resolve_model("inception_v3")
    assert 'run `deepfeat export inception_v3` (needs pip install "deepfeat[export]")' in str(err.value)


def test_a_file_without_a_record_or_without_the_alias_tensors_is_refused(models_dir):
    build, _ = EXPORTS["inception_v3"]
    (models_dir / "inception_v3.onnx").write_bytes(build().SerializeToString())
    with pytest.raises(ModelFileError, match=r"carries no deepfeat export record; the graph has no tensor \['stage1'"):
        resolve_model("inception_v3")


def test_an_export_with_random_weights_is_refused_under_the_name(models_dir):
    _put_export(models_dir, "inception_v3", weights="random")
    with pytest.raises(ModelFileError, match=r"holds untrained weights \(its record says weights 'random'\)"):
        resolve_model("inception_v3")
    # a record that says pretrained does not hide initial weights: the guard reads the biases
    _put_export(models_dir, "inception_v3", trained=False)
    with pytest.raises(ModelFileError, match=r"holds untrained weights \(all 94 convolution biases are exactly 0\)"):
        resolve_model("inception_v3")


@pytest.mark.skipif(__import__("importlib").util.find_spec("torch") is not None,
                    reason="with torch installed a missing export is made, not refused")
def test_a_missing_export_says_the_command_in_one_line(models_dir, capsys):
    from deepfeat import ImageEmbedder

    with pytest.raises(ModelFileError) as err:
        ImageEmbedder(model="inception_v3", progress=False).fit()
    text = str(err.value)
    assert "\n" not in text and "Model 'inception_v3'" in text
    assert 'by `deepfeat export inception_v3`, which needs pip install "deepfeat[export]"' in text
    assert main(["layers", "resnet50_tv"]) == 1
    err_line = capsys.readouterr().err
    assert err_line.count("\n") == 1 and "`deepfeat export resnet50_tv`" in err_line


def test_an_embedder_fitted_on_the_old_inception_v3_says_where_its_file_went(registered_file, monkeypatch):
    """Fitted when inception_v3 meant the Computer_Vision file: the name is now an export recipe, the file
    is inception_v3_unverified; transform says so before exporting anything."""
    import pickle

    from deepfeat import ImageEmbedder
    from deepfeat.sessions import clear_sessions

    new = get_model_spec("inception_v3")
    path = registered_file("inception_v3_unverified", ARCHITECTURES["inception_v3_unverified"][0]())
    old = replace(get_model_spec("inception_v3_unverified"), name="inception_v3")
    monkeypatch.setitem(registry._REGISTRY, "inception_v3", old)
    images = np.random.default_rng(0).integers(0, 255, (2, 40, 40, 3), dtype=np.uint8)
    blob = pickle.dumps(ImageEmbedder(model="inception_v3", layers="pooled", progress=False).fit(images))
    monkeypatch.setitem(registry._REGISTRY, "inception_v3", new)
    path.unlink()
    clear_sessions()
    with pytest.raises(ModelFileError, match=r"now means a file made by deepfeat export .*now registered as "
                                             r"'inception_v3_unverified'. Refit"):
        pickle.loads(blob).transform(images)


def test_untrained_reason_reads_batch_norms_too():
    from onnx import TensorProto, helper, numpy_helper

    def bn_model(mean):
        c = 4
        inits = [numpy_helper.from_array(np.ones((c, 3, 3, 3), np.float32), "w"),
                 numpy_helper.from_array(np.ones(c, np.float32), "scale"),
                 numpy_helper.from_array(np.zeros(c, np.float32), "shift"),
                 numpy_helper.from_array(np.full(c, mean, np.float32), "mean"),
                 numpy_helper.from_array(np.ones(c, np.float32), "var")]
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3]),
                 helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["y"])]
        g = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 6, 6])], inits)
        return helper.make_model(g)

    assert "batch norms hold their initial values" in untrained_reason(bn_model(0.0))
    assert untrained_reason(bn_model(0.3)) is None


def test_batch_one_file_flattening_with_a_constant_shape_runs_any_batch(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    from deepfeat import ImageEmbedder

    # IR 3 style (weights listed as inputs), batch fixed to 1, Reshape to (1, -1) as Caffe2 writes it
    inits = [numpy_helper.from_array(np.full((4, 3, 3, 3), 0.1, np.float32), "w"),
             numpy_helper.from_array(np.array([1, -1], np.int64), "shape")]
    nodes = [helper.make_node("Conv", ["data_0", "w"], ["c"], kernel_shape=[3, 3], strides=[2, 2]),
             helper.make_node("Reshape", ["c", "shape"], ["flat"])]
    inputs = [helper.make_tensor_value_info("data_0", TensorProto.FLOAT, [1, 3, 16, 16])]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("flat", TensorProto.FLOAT, [1, 196])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 7)])
    m.ir_version = 3
    path = tmp_path / "b1.onnx"
    path.write_bytes(m.SerializeToString())
    images = np.random.default_rng(0).integers(0, 255, (5, 20, 20, 3), dtype=np.uint8)
    emb = ImageEmbedder(model=str(path), layers="flat", preprocessing={"input_size": 16, "resize_size": 16},
                        batch_size=4, progress=False)
    X = emb.fit(images).transform(images)
    one = np.vstack([emb.transform(images[i:i + 1]) for i in range(5)])
    assert X.shape == (5, 196) and np.allclose(X, one, atol=1e-5)


def _tiny(nodes, inits, inp, out, opset=13, rank=4):
    from onnx import TensorProto, helper

    out_shape = [f"d{i}" for i in range(rank)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, inp)],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_batch_one_file_keeps_reshapes_of_weights_and_allowzero(tmp_path):
    from onnx import helper, numpy_helper

    from deepfeat import ImageEmbedder

    # normalisation inside the graph: a (3,) mean reshaped to (1, 3, 1, 1) is not the batch
    inits = [numpy_helper.from_array(np.array([0.4, 0.5, 0.6], np.float32), "mean"),
             numpy_helper.from_array(np.array([1, 3, 1, 1], np.int64), "bshape"),
             numpy_helper.from_array(np.full((4, 3, 3, 3), 0.1, np.float32), "w"),
             numpy_helper.from_array(np.array([1, -1], np.int64), "flat_shape")]
    nodes = [helper.make_node("Reshape", ["mean", "bshape"], ["m4"]),
             helper.make_node("Sub", ["x", "m4"], ["xn"]),
             helper.make_node("Conv", ["xn", "w"], ["c"], kernel_shape=[3, 3], strides=[2, 2]),
             helper.make_node("Reshape", ["c", "flat_shape"], ["flat"], allowzero=1)]
    path = tmp_path / "norm.onnx"
    path.write_bytes(_tiny(nodes, inits, [1, 3, 16, 16], "flat", opset=14, rank=2).SerializeToString())
    images = np.random.default_rng(0).integers(0, 255, (3, 20, 20, 3), dtype=np.uint8)
    emb = ImageEmbedder(model=str(path), layers="c", preprocessing={"input_size": 16, "resize_size": 16},
                        batch_size=2, progress=False)
    assert emb.fit(images).transform(images).shape == (3, 4)  # the weights' Reshape ran untouched
    from deepfeat.graph import truncate

    cut = truncate(_tiny(nodes, inits, [1, 3, 16, 16], "flat", opset=14, rank=2), ["flat"])
    flat = next(n for n in cut.graph.node if n.output[0] == "flat")
    assert flat.input[1] == "flat_shape"  # allowzero=1: a 0 would mean an empty dim, so it is left alone


def test_layer_table_of_a_map_larger_than_the_input():
    from onnx import helper, numpy_helper

    from deepfeat.graph import layer_table

    inits = [numpy_helper.from_array(np.full((3, 2, 2, 2), 0.1, np.float32), "w")]
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["up"], kernel_shape=[2, 2], strides=[2, 2])]
    df = layer_table(_tiny(nodes, inits, [1, 3, 8, 8], "up"), input_size=8)
    assert df.loc[0, "shape"] == ("batch", 2, 16, 16) and df["reduction"].isna().all()


def test_shapes_come_from_the_input_size_not_from_shapes_stored_in_the_file():
    from onnx import TensorProto, helper, numpy_helper

    from deepfeat.graph import tensor_shapes

    inits = [numpy_helper.from_array(np.full((4, 3, 3, 3), 0.1, np.float32), "w")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3])]
    m = _tiny(nodes, inits, ["n", 3, "h", "w"], "c")
    m.graph.value_info.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, ["n", 4, 6, 6]))
    assert tensor_shapes(m, 16)["c"] == ("batch", 4, 14, 14)


def test_dense_head_with_dropout_before_the_activation():
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], strides=[2, 2]),
             helper.make_node("Flatten", ["c"], ["f"])]
    x, cin = "f", 4 * 7 * 7
    for i, cout in enumerate([16, 16, 5]):
        inits.append(numpy_helper.from_array(rng.normal(size=(cout, cin)).astype(np.float32), f"fc{i}_w"))
        nodes.append(helper.make_node("Gemm", [x, f"fc{i}_w"], [f"fc{i}"], transB=1))
        x, cin = f"fc{i}", cout
        if i < 2:
            nodes += [helper.make_node("Dropout", [x], [f"drop{i}"]), helper.make_node("Relu", [f"drop{i}"], [f"act{i}"])]
            x = f"act{i}"
    aliases = derive_aliases(_tiny(nodes, inits, [1, 3, 16, 16], "fc2", rank=2), 16)
    assert (aliases["fc6"], aliases["fc7"], aliases["pooled"], aliases["logits"]) == ("act0", "act1", "act1", "fc2")


def test_flattened_map_behind_a_padded_ceil_mode_pool_has_onnx_runtimes_width(tmp_path):
    from onnx import helper, numpy_helper

    from deepfeat import ImageEmbedder

    # ONNX shape inference says 6x6 here, ONNX Runtime computes 5x5: the probe decides
    inits = [numpy_helper.from_array(np.full((2, 3, 1, 1), 0.1, np.float32), "w")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]),
             helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1],
                              ceil_mode=1)]
    path = tmp_path / "ceil.onnx"
    path.write_bytes(_tiny(nodes, inits, ["n", 3, "h", "w"], "p").SerializeToString())
    images = np.random.default_rng(0).integers(0, 255, (2, 9, 9, 3), dtype=np.uint8)
    emb = ImageEmbedder(model=str(path), layers="p", pooling="none",
                        preprocessing={"input_size": 9, "resize_size": 9}, progress=False).fit(images)
    X = emb.transform(images)
    assert X.shape[1] == emb.n_features_out_


def test_embedder_fitted_on_a_name_that_now_means_another_file_says_refit_before_fetching(
        registered_file, monkeypatch):
    import pickle

    from deepfeat import ImageEmbedder

    path = registered_file("resnet50", torchvision_resnet50())
    images = np.random.default_rng(0).integers(0, 255, (2, 40, 40, 3), dtype=np.uint8)
    emb = ImageEmbedder(model="resnet50", layers="pooled", progress=False).fit(images)
    blob = pickle.dumps(emb)
    # another machine, a later registry: the name now pins other bytes at a mirror that must not be asked
    path.unlink()
    spec = get_model_spec("resnet50")
    monkeypatch.setitem(registry._REGISTRY, "resnet50",
                        replace(spec, sha256="f" * 64, urls=("http://127.0.0.1:9/never-asked.onnx",)))
    from deepfeat.sessions import clear_sessions

    clear_sessions()
    with pytest.raises(ModelFileError, match=r"now means the file with sha256 f{64}.*Refit"):
        pickle.loads(blob).transform(images)
