"""Hardening from an adversarial run: modern formats, external-data weights, preprocessing mistakes,
corrupt caches, hostile model files, and model files that are safe to share."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from deepfeat import ImageEmbedder, load_image_folder
from deepfeat.datasets import IMAGE_EXTENSIONS

from .conftest import TINY_PREPROCESSING


def _cos(a, b):
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("fmt, ext", [("AVIF", ".avif"), ("WEBP", ".webp"), ("JPEG2000", ".jp2")])
def test_modern_formats_embed_like_their_jpeg(tmp_path, hymenoptera, fmt, ext):
    from PIL import features

    if fmt == "AVIF" and not features.check("avif"):
        pytest.skip("this Pillow has no AVIF support")
    src = sorted((hymenoptera / "val" / "bees").glob("*.jpg"))[0]
    root = tmp_path / "photos" / "bees"
    root.mkdir(parents=True)
    (root / "a.jpg").write_bytes(src.read_bytes())
    Image.open(src).convert("RGB").save(root / f"a{ext}", fmt, quality=90)
    df = load_image_folder(tmp_path / "photos")
    assert sorted(p.rsplit(".", 1)[1] for p in df["path"]) == sorted(["jpg", ext[1:]])  # listed, not skipped
    X = ImageEmbedder(progress=False, jpeg_draft=False).fit_transform(df["path"])
    assert np.isfinite(X).all() and _cos(X[0], X[1]) >= 0.99


def test_folders_list_every_extension_pillow_decodes():
    from PIL import Image as PILImage

    for ext in (".avif", ".webp", ".jp2", ".tiff", ".qoi", ".jpg", ".png"):
        fmt = PILImage.registered_extensions().get(ext)
        if fmt is not None and fmt in PILImage.OPEN:
            assert ext in IMAGE_EXTENSIONS, ext
    assert ".h5" not in IMAGE_EXTENSIONS and ".grib" not in IMAGE_EXTENSIONS  # stub plugins: never decoded


def _save_external(model, folder):
    import onnx

    folder.mkdir(exist_ok=True)
    onnx.save_model(model, str(folder / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    return folder / "m.onnx"


def test_external_data_weights_are_part_of_the_model_identity(tmp_path, sample_photos):
    import pickle

    from deepfeat.registry import ModelFileError
    from deepfeat.sessions import clear_sessions

    from .conftest import build_tiny_cnn

    path = _save_external(build_tiny_cnn(seed=0), tmp_path / "a")
    assert (tmp_path / "a" / "weights.bin").stat().st_size > 0
    kw = dict(model=str(path), preprocessing=TINY_PREPROCESSING, progress=False, cache=tmp_path / "c")
    emb = ImageEmbedder(**kw).fit()
    before = emb.transform(sample_photos)
    blob = pickle.dumps(emb)
    # the same graph with other weights, written only to the weights file
    _save_external(build_tiny_cnn(seed=1), tmp_path / "b")
    (tmp_path / "a" / "weights.bin").write_bytes((tmp_path / "b" / "weights.bin").read_bytes())
    fresh = ImageEmbedder(**kw).fit()
    assert fresh.model_sha256_ != emb.model_sha256_
    after = fresh.transform(sample_photos)
    assert fresh.cache_stats_["computed"] == 2  # not answered with the old weights' vectors
    plain = ImageEmbedder(**{**kw, "cache": None}).fit().transform(sample_photos)
    assert np.array_equal(after, plain) and not np.allclose(after, before)
    clear_sessions()  # as in a fresh worker process
    with pytest.raises(ModelFileError, match="Refit"):
        pickle.loads(blob).transform([p[:, ::-1].copy() for p in sample_photos])  # images it has not stored


@pytest.mark.parametrize(
    "preprocessing, match",
    [
        ({"interpolation": "area"}, r"'preprocessing' parameter's 'interpolation' must be one of .*bicubic.*got 'area'"),
        ({"input_szie": 300}, r"unknown key 'input_szie' \(did you mean 'input_size'\?\)"),
        ({"mean": 0.5}, r"'preprocessing' parameter's 'mean' must be 3 numbers.*got 0.5"),
        ({"std": (1.0, 0.0, 1.0)}, r"'std' must be 3 positive numbers"),
        ({"input_size": "224"}, r"'input_size' must be an int >= 8 .*; got '224'"),
        ({"channel_order": "rgb"}, r"'channel_order' must be 'RGB' or 'BGR'"),
    ],
)
def test_preprocessing_mistakes_are_refused_by_fit(tiny_model_path, preprocessing, match):
    with pytest.raises(ValueError, match=match):
        ImageEmbedder(model=str(tiny_model_path), preprocessing={**TINY_PREPROCESSING, **preprocessing},
                      progress=False).fit()


def test_numpy_mean_and_std_work(tiny_model_path, sample_photos):
    kw = dict(model=str(tiny_model_path), progress=False)
    as_tuple = ImageEmbedder(**kw, preprocessing={**TINY_PREPROCESSING, "mean": (127.0,) * 3, "std": (60.0,) * 3})
    as_array = ImageEmbedder(**kw, preprocessing={**TINY_PREPROCESSING, "mean": np.array([127.0] * 3),
                                                   "std": np.full(3, 60.0)})
    a = as_tuple.fit_transform(sample_photos)
    assert np.array_equal(as_array.fit_transform(sample_photos), a)
    assert np.array_equal(as_array.transform(sample_photos), a)  # no "truth value of an array is ambiguous"


# ------------------------------------------------------------------ corrupt caches
def _filled(directory, n=50):
    from deepfeat.cache import FeatureCache

    cache = FeatureCache(directory)
    keys = [f"k{i}" for i in range(n)]
    cache.put_many("fp", keys, np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32))
    cache.close()
    return keys


def test_a_key_that_is_no_longer_text_is_reported_as_corruption(tmp_path):
    import sqlite3

    from deepfeat.cache import DB_NAME, CacheCorruptError, FeatureCache

    _filled(tmp_path)
    con = sqlite3.connect(tmp_path / DB_NAME)
    con.execute("UPDATE fingerprints SET description = CAST(X'FFFE4142' AS TEXT)")  # random bytes in a text cell
    con.commit()
    con.close()
    with pytest.raises(CacheCorruptError, match=f"decode.*deepfeat cache clear {tmp_path}"):
        FeatureCache(tmp_path).info()


def test_full_integrity_check_finds_what_quick_check_passes(tmp_path, capsys):
    import sqlite3

    from deepfeat.cache import DB_NAME, CacheCorruptError, FeatureCache

    _filled(tmp_path)
    con = sqlite3.connect(tmp_path / DB_NAME)
    con.execute("CREATE INDEX by_crc ON vectors (crc)")
    con.execute("PRAGMA writable_schema=ON")  # the index now claims to hold what it does not: rows missing from it
    con.execute("UPDATE sqlite_master SET sql='CREATE INDEX by_crc ON vectors (fp)' WHERE name='by_crc'")
    con.commit()
    con.close()
    FeatureCache(tmp_path).info()  # quick_check (every open) passes it, though counts now go wrong
    with pytest.raises(CacheCorruptError, match="integrity_check.*deepfeat cache clear"):
        FeatureCache(tmp_path).info(full=True)
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "deepfeat", "cache", "info", "--full", str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "corrupt" in res.stderr and "deepfeat cache clear" in res.stderr


def test_a_full_disk_fails_the_transform_clearly_and_leaves_no_claims(tmp_path, tiny_model_path):
    import os
    import subprocess

    from deepfeat.cache import CacheError, FeatureCache

    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        items = list(np.random.default_rng(0).integers(0, 256, size=(3000, 8, 8, 3), dtype=np.uint8))
        kw = dict(model=str(tiny_model_path), preprocessing=TINY_PREPROCESSING, progress=False)
        emb = ImageEmbedder(**kw, cache=mnt / "c").fit()
        with pytest.raises(CacheError, match="disk is full.*Free some space"):
            emb.transform(items)
        info = FeatureCache(mnt / "c").info()
        assert info["claims"] == 0 and 0 < info["vectors"] < 3000
        stored = ImageEmbedder(**kw, cache=mnt / "c").fit()
        # what was stored is right: read back, compared with the uncached vectors
        X = stored.transform(items[:16]) if info["vectors"] >= 16 else None
        if X is not None and stored.cache_stats_["hits"] == 16:
            assert np.array_equal(X, ImageEmbedder(**kw).fit().transform(items[:16]))
    finally:
        from deepfeat.cache import open_cache

        open_cache(mnt / "c").clear()  # closes this process's connection to the files
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# --------------------------------------------------------------- hostile model files
def _tiny_variant(tmp_path, name, *, input_dims=None, domain=None):
    import onnx

    from .conftest import build_tiny_cnn

    m = build_tiny_cnn()
    if input_dims is not None:
        dims = m.graph.input[0].type.tensor_type.shape.dim
        for d, v in zip(dims, input_dims):
            d.ClearField("dim_param")
            d.dim_value = v
    if domain is not None:
        m.graph.node[1].domain = domain  # the first Relu, from an operator set nobody provides
        m.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    path = tmp_path / name
    path.write_bytes(m.SerializeToString())
    return path


def test_a_huge_declared_input_is_refused_at_fit_naming_the_file(tmp_path):
    from deepfeat.registry import ModelFileError

    path = _tiny_variant(tmp_path, "huge.onnx", input_dims=(1, 3, 100000, 100000))
    with pytest.raises(ModelFileError, match=r"huge.onnx declares a fixed input of \(1, 3, 100000, 100000\)"):
        ImageEmbedder(model=str(path), preprocessing=TINY_PREPROCESSING, progress=False).fit()


def test_an_unknown_operator_domain_is_refused_naming_the_file(tmp_path, sample_photos):
    from deepfeat.registry import ModelFileError

    path = _tiny_variant(tmp_path, "custom.onnx", domain="com.example.secret")
    with pytest.raises(ModelFileError, match="model file .*custom.onnx.*com.example.secret:Relu"):
        ImageEmbedder(model=str(path), preprocessing=TINY_PREPROCESSING, progress=False).fit()


# ------------------------------------------------------------- sharing models safely
def test_classify_saves_skops_and_predict_reads_it(tmp_path, photo_folder, tiny_model_path, capsys):
    pytest.importorskip("skops")
    import json

    from deepfeat.cli import main
    from deepfeat.classify import load_model

    root, df = photo_folder
    out = tmp_path / "model.skops"
    pre = json.dumps(TINY_PREPROCESSING)
    assert main(["classify", str(root), "-o", str(out), "--model", str(tiny_model_path), "--heads", "logreg",
                 "--cv", "2", "--no-progress"] + (["--preprocessing", pre] if "--preprocessing" in _help() else [])) == 0
    pipe = load_model(out)
    X = df["path"].tolist()
    assert (pipe.predict(X) == load_model(out).predict(X)).all()
    capsys.readouterr()
    assert main(["predict", str(out), *X[:3], "--no-progress"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) >= 3


def _help():
    import contextlib
    import io

    from deepfeat.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        main(["classify", "--help"])
    return buf.getvalue()


def test_a_skops_file_with_an_untrusted_type_is_refused_naming_it(tmp_path, tiny_model_path, sample_photos):
    sio = pytest.importorskip("skops.io")
    import os

    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    from deepfeat.classify import load_model

    emb = ImageEmbedder(model=str(tiny_model_path), preprocessing=TINY_PREPROCESSING, progress=False).fit()
    X = emb.transform(sample_photos)
    evil = Pipeline([("embed", emb), ("run", FunctionTransformer(os.system)),
                     ("clf", LogisticRegression().fit(X, [0, 1]))])
    path = tmp_path / "evil.skops"
    sio.dump(evil, path)
    with pytest.raises(ValueError, match=r"neither deepfeat's nor scikit-learn's: \[.*system.*\]. It was not loaded"):
        load_model(path)


def test_a_skops_file_naming_a_function_under_a_trusted_module_is_refused(tmp_path):
    """A prefix check is not enough: sklearn.utils._testing imports subprocess.check_output under its own
    name. A crafted file naming it must be refused before skops rebuilds (and calls) anything."""
    sio = pytest.importorskip("skops.io")
    import json
    import zipfile

    from sklearn.preprocessing import FunctionTransformer

    from deepfeat.classify import _trusted_type, load_model

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.skops"
    sio.dump(FunctionTransformer(), path)
    schema = json.loads(zipfile.ZipFile(path).read("schema.json"))
    # the top node now names a function that a trusted-looking module re-exports
    schema.update({"__class__": "check_output", "__module__": "sklearn.utils._testing"})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("schema.json", json.dumps(schema))
    with pytest.raises(ValueError, match=r"sklearn.utils._testing.check_output.*It was not loaded"):
        load_model(path)
    assert not marker.exists()
    assert not _trusted_type("deepfeat.__main__.main") and not _trusted_type("os.system")
    assert _trusted_type("deepfeat.embedder.ImageEmbedder") and _trusted_type("sklearn.pipeline.Pipeline")
    assert _trusted_type("pathlib.PosixPath")


def test_skops_bombs_and_damaged_files_are_refused_in_one_line(tmp_path):
    """Member sizes are checked from the zip directory before anything is decompressed; a file that is
    not a zip, a truncated one and a schema without a protocol are each one ValueError naming the file."""
    sio = pytest.importorskip("skops.io")
    import json
    import time
    import zipfile

    from sklearn.preprocessing import StandardScaler

    from deepfeat.classify import load_model

    good = tmp_path / "good.skops"
    sio.dump(StandardScaler(), good)
    schema = zipfile.ZipFile(good).read("schema.json")

    spaces = tmp_path / "spaces.skops"  # the schema and 64 MiB of blanks: about 64 KB on disk
    with zipfile.ZipFile(spaces, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("schema.json", schema + b" " * (64 << 20))
    big = tmp_path / "bignpy.skops"  # a 40 MiB member that deflates 1000x
    with zipfile.ZipFile(big, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("schema.json", schema)
        z.writestr("0.npy", b"\0" * (40 << 20))
    for path, what in ((spaces, rf"'schema.json' of {len(schema) + (64 << 20)} bytes"),
                       (big, "'0.npy' of 41943040 bytes")):
        assert path.stat().st_size < 1 << 20
        t = time.monotonic()
        with pytest.raises(ValueError, match=f"{path.name}.*holds {what} uncompressed.*not loaded"):
            load_model(path)
        assert time.monotonic() - t < 1.0  # refused from the directory, not after inflating it

    junk = tmp_path / "junk.skops"
    junk.write_bytes(b"not a zip at all")
    truncated = tmp_path / "truncated.skops"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    noproto = tmp_path / "noproto.skops"
    with zipfile.ZipFile(noproto, "w") as z:
        z.writestr("schema.json", json.dumps({k: v for k, v in json.loads(schema).items() if k != "protocol"}))
    for path in (junk, truncated, noproto):
        with pytest.raises(ValueError, match=f"{path.name}.*not a (readable )?.skops file") as err:
            load_model(path)
        assert "\n" not in str(err.value)


def test_an_old_pickle_without_tta_still_transforms(tiny_model_path, sample_photos):
    import joblib

    emb = ImageEmbedder(model=str(tiny_model_path), preprocessing=TINY_PREPROCESSING, progress=False).fit()
    X = emb.transform(sample_photos)
    state = emb.__getstate__()
    keys = ("model", "layers", "pooling", "image_size", "preprocessing", "jpeg_draft", "cache", "cache_key")
    state.pop("tta")
    state.pop("_fitted_hashes")
    state["_fitted_params"] = {k: state[k] for k in keys}  # how deepfeat 0.1.0 recorded them
    old = ImageEmbedder.__new__(ImageEmbedder)
    old.__setstate__(state)
    assert old.tta is None and np.array_equal(old.transform(sample_photos), X)
    assert joblib.hash(old.get_params()) == joblib.hash(emb.get_params())


# ------------------------------------------------ forged fitted fields (#24 item 1)
def _save_skops_model(tmp_path, tiny_model_path, photo_folder, cache):
    sio = pytest.importorskip("skops.io")
    from sklearn.linear_model import LogisticRegression

    from deepfeat.classify import make_image_pipeline

    root, df = photo_folder
    emb = ImageEmbedder(model=str(tiny_model_path), preprocessing=TINY_PREPROCESSING, progress=False,
                        cache=cache).fit()
    X = emb.transform(df["path"])
    pipe = make_image_pipeline(emb, LogisticRegression(max_iter=500).fit(X, df["label"]))
    path = tmp_path / "honest.skops"
    sio.dump(pipe, path)
    return path, pipe, df["path"].tolist()


def _forge(path, out, edit):
    """Edit the embedder's fields in schema.json, the way an attacker would (no Python object is built)."""
    import json
    import zipfile

    with zipfile.ZipFile(path) as z:
        members = {name: z.read(name) for name in z.namelist()}
    schema = json.loads(members["schema.json"])

    def embedder_node(node):
        if isinstance(node, dict):
            if node.get("__class__") == "ImageEmbedder":
                return node
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            return None
        for child in children:
            found = embedder_node(child)
            if found is not None:
                return found
        return None

    fields = embedder_node(schema)["content"]["content"]
    edit(fields)
    members["schema.json"] = json.dumps(schema).encode()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return out


def _set_json(node, value):
    import json

    node["content"] = json.dumps(value)
    # skops shares equal objects by __id__ (an int 8 may be n_features_out_ and a layer's dim): a new id unshares
    node["__id__"] = next(_FORGED_IDS)


_FORGED_IDS = itertools.count(1)


def test_a_forged_fitted_spec_is_refused_and_writes_nothing(tmp_path, tiny_model_path, photo_folder):
    """The attack of #24: another mean/std in spec_, the fitted cache folder pointed at the victim's, the old
    fingerprints kept. Fitting again here derives another mean: refused, naming the file and the field."""
    import numpy as np

    from deepfeat.classify import load_model

    honest, pipe, paths = _save_skops_model(tmp_path, tiny_model_path, photo_folder, cache=None)
    victim = tmp_path / "victim-cache"

    def edit(f):
        mean = f["spec_"]["content"]["mean"]
        for item in mean["content"]:
            _set_json(item, 5.0) if item.get("is_json") else None
        _set_json(f["cache_dir_"], str(victim))

    forged = _forge(honest, tmp_path / "forged.skops", edit)
    with pytest.raises(ValueError, match=r"forged.skops.*does not match its own parameters.*spec_.mean.*not loaded"):
        load_model(forged)
    assert not victim.exists()
    # the honest file still loads and predicts as the pipeline it was saved from
    np.testing.assert_array_equal(load_model(honest).predict(paths), pipe.predict(paths))


def test_forged_fingerprints_are_refused(tmp_path, tiny_model_path, photo_folder):
    from deepfeat.classify import load_model

    honest, _, _ = _save_skops_model(tmp_path, tiny_model_path, photo_folder, cache=None)
    forged = _forge(honest, tmp_path / "fp.skops", lambda f: _set_json(f["cache_fingerprint_"], "0" * 64))
    with pytest.raises(ValueError, match=r"fp.skops.*\['cache_fingerprint_'\]"):
        load_model(forged)
    forged = _forge(honest, tmp_path / "dims.skops", lambda f: _set_json(f["n_features_out_"], 3))
    with pytest.raises(ValueError, match=r"dims.skops.*\['n_features_out_'\]"):
        load_model(forged)


def test_a_model_file_cannot_choose_where_features_are_written(tmp_path, tiny_model_path, photo_folder, monkeypatch,
                                                               caplog):
    """A cache folder in the file (the parameter or the fitted field) is never written without asking."""
    from deepfeat.classify import load_model, predict_paths

    monkeypatch.setenv("DEEPFEAT_CACHE", str(tmp_path / "mine"))
    honest, pipe, paths = _save_skops_model(tmp_path, tiny_model_path, photo_folder, cache=True)
    victim = tmp_path / "victim" / "deep" / "folder"
    forged = _forge(honest, tmp_path / "dir.skops", lambda f: _set_json(f["cache_dir_"], str(victim)))
    emb = load_model(forged).steps[0][1]
    assert emb.cache_dir_ == tmp_path / "mine"
    forged = _forge(honest, tmp_path / "param.skops", lambda f: (_set_json(f["cache"], str(victim)),
                                                                 _set_json(f["cache_dir_"], str(victim))))
    with caplog.at_level("WARNING", logger="deepfeat.classify"):
        loaded = load_model(forged)
    assert "param.skops" in caplog.text and str(victim) in caplog.text
    result = predict_paths(loaded, paths[:4])
    assert result["error"].isna().all()
    assert loaded.steps[0][1].cache_dir_ == tmp_path / "mine" and not (tmp_path / "victim").exists()
    assert load_model(forged, cache=None).steps[0][1].cache_dir_ is None


def test_a_pipeline_without_a_predictor_is_one_line(tmp_path, tiny_model_path):
    import joblib
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from deepfeat.classify import load_model

    emb = ImageEmbedder(model=str(tiny_model_path), preprocessing=TINY_PREPROCESSING, progress=False).fit()
    path = tmp_path / "noclf.joblib"
    joblib.dump(Pipeline([("embed", emb), ("scale", StandardScaler())]), path)
    with pytest.raises(ValueError, match=r"noclf.joblib.*without a classifier.*StandardScaler"):
        load_model(path)


# --------------------------------------------- hostile graphs (#24 items 2, 5, 8, 9)
def _if_model_with_external_body(folder, weights):
    """An ``If`` whose then-branch multiplies by ``w_ext``, a weight kept in ``body.bin`` beside the model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(np.asarray(weights, np.float32), "w_ext")
    (folder / "body.bin").write_bytes(w.raw_data)
    length = len(w.raw_data)
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "body.bin"), ("offset", "0"), ("length", str(length))):
        w.external_data.add(key=key, value=value)
    out = [helper.make_tensor_value_info("b_out", TensorProto.FLOAT, ["batch", 4])]
    then_g = helper.make_graph([helper.make_node("MatMul", ["flat", "w_ext"], ["b_out"])], "then", [], out,
                               initializer=[w])
    else_g = helper.make_graph([helper.make_node("MatMul", ["flat", "w_zero"], ["b_out"])], "else", [], out,
                               initializer=[numpy_helper.from_array(np.zeros((3, 4), np.float32), "w_zero")])
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"]),
             helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True))),
             helper.make_node("If", ["cond"], ["logits"], then_branch=then_g, else_branch=else_g)]
    graph = helper.make_graph(nodes, "if_external",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / "if_external.onnx"))
    return folder / "if_external.onnx"


_IF_PRE = {"input_size": 32, "resize_size": 36, "layers": {"logits": "logits"}, "default_layer": "logits"}


def test_a_subgraphs_external_weights_are_part_of_the_model_identity(tmp_path, sample_photos):
    """Replacing the weights file of an If branch changes model_sha256: the cache serves no stale vectors."""
    from deepfeat.registry import model_sha256

    path = _if_model_with_external_body(tmp_path / "m", np.arange(12).reshape(3, 4))
    first = ImageEmbedder(model=str(path), preprocessing=_IF_PRE, progress=False, cache=tmp_path / "c").fit()
    a = first.transform(sample_photos)
    assert first.cache_stats_["computed"] == 2 and np.abs(a).max() > 1
    sha = model_sha256(path)
    _if_model_with_external_body(tmp_path / "m", -np.arange(12).reshape(3, 4))
    assert model_sha256(path) != sha
    second = ImageEmbedder(model=str(path), preprocessing=_IF_PRE, progress=False, cache=tmp_path / "c").fit()
    b = second.transform(sample_photos)
    assert second.model_sha256_ != first.model_sha256_ and second.cache_stats_["hits"] == 0
    np.testing.assert_allclose(b, -a, rtol=1e-5)


def _endless_loop_model(path):
    """A Loop without a trip count whose condition stays true: running it never ends."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["v_in", "one"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.array(1.0, np.float32), "one")])
    nodes = [helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True))),
             helper.make_node("Loop", ["", "cond", "input"], ["looped"], body=body, name="forever"),
             helper.make_node("GlobalAveragePool", ["looped"], ["pooled"])]
    graph = helper.make_graph(nodes, "endless",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
                              [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", 3, 1, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_fit_on_an_endless_loop_is_refused_naming_the_file(tmp_path, monkeypatch):
    import deepfeat.graph
    from deepfeat.registry import ModelFileError

    monkeypatch.setattr(deepfeat.graph, "PROBE_TIMEOUT_S", 1.0)
    path = _endless_loop_model(tmp_path / "endless.onnx")
    pre = {"input_size": 32, "resize_size": 36, "layers": {"pooled": "pooled"}, "default_layer": "pooled"}
    with pytest.raises(ModelFileError, match=r"endless.onnx was refused: .* in 1 s \(its Loop nodes \['forever'\]"):
        ImageEmbedder(model=str(path), preprocessing=pre, progress=False).fit()


def test_graphs_without_inputs_or_nodes_are_refused_naming_the_file(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from deepfeat.registry import ModelFileError

    def save(name, nodes, inputs, outputs):
        model = helper.make_model(helper.make_graph(nodes, name, inputs, outputs),
                                  opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.save(model, str(tmp_path / f"{name}.onnx"))
        return str(tmp_path / f"{name}.onnx")

    image = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])
    const = helper.make_node("Constant", [], ["y"], value=numpy_helper.from_array(np.ones((1, 3), np.float32)))
    pre = {"input_size": 32, "resize_size": 36}
    cases = {save("noinput", [const], [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])]):
             "has no image input", save("empty", [], [image], []): "computes no tensor",
             save("passthrough", [], [image], [image]): "computes no tensor"}
    for path, what in cases.items():
        with pytest.raises(ModelFileError, match=f"{path}.*{what}"):
            ImageEmbedder(model=path, preprocessing=pre, progress=False).fit()


def test_naming_a_module_in_a_skops_file_never_imports_it():
    """#24 items 8 and 9: test-suite and experimental types are refused, without importing their modules."""
    import subprocess
    import sys

    code = ("import sys\nfrom deepfeat.classify import _trusted_type\n"
            "names = ['sklearn.experimental.enable_iterative_imputer.IterativeImputer',"
            " 'sklearn.tests.test_base.MyEstimator', 'sklearn.utils._testing.MinimalClassifier',"
            " 'sklearn.impute._iterative.IterativeImputer']\n"
            "print([_trusted_type(n) for n in names], "
            "'sklearn.experimental.enable_iterative_imputer' in sys.modules, 'sklearn.tests.test_base' in sys.modules,"
            " _trusted_type('sklearn.ensemble._forest.RandomForestClassifier'), "
            "_trusted_type('sklearn.tree._tree.Tree'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[False,", "False,", "False,", "False]", "False", "False", "True", "True"], out


@pytest.mark.parametrize("depth", [200, 5000])
def test_a_deeply_nested_skops_file_is_refused_naming_it(tmp_path, depth):
    """#24 item 9: a schema.json nested thousands deep (forged as text) is one line naming the file."""
    pytest.importorskip("skops.io")
    import zipfile

    from deepfeat.classify import load_model

    leaf = '{"__class__": "str", "__module__": "builtins", "__loader__": "JsonNode", "content": "1", "is_json": true}'
    head = '{"__class__": "list", "__module__": "builtins", "__loader__": "ListNode", "content": ['
    schema = head * depth + leaf + "]}" * depth
    schema = schema[:-1] + ', "protocol": 2, "_skops_version": "0.16.0"}'
    path = tmp_path / f"nested{depth}.skops"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("schema.json", schema)
    import re

    # 200 deep loads (a list of lists, harmless) and is not a pipeline; 5000 deep exceeds the recursion limit
    what = "an image pipeline" if depth < 1000 else "a readable .skops file"
    with pytest.raises(ValueError, match=f"'{re.escape(str(path))}' is not {what}") as err:
        load_model(path)
    assert "\n" not in str(err.value)


def test_an_onnx_graph_nested_beyond_protobufs_depth_is_refused_naming_the_file(tmp_path):
    """If inside If, 300 deep, written at the wire level (onnx.helper cannot build it): one line naming the file."""
    from deepfeat import ImageEmbedder
    from deepfeat.registry import ModelFileError

    def varint(n):
        out = b""
        while n > 0x7F:
            out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
        return out + bytes([n])

    def msg(num, payload):  # a length-delimited field
        return varint(num << 3 | 2) + varint(len(payload)) + payload

    graph = msg(2, b"leaf")  # GraphProto.name
    for _ in range(300):  # GraphProto.node(1) -> NodeProto.attribute(5) -> AttributeProto.g(6) -> GraphProto
        attr = msg(1, b"then_branch") + msg(6, graph) + varint(20 << 3) + varint(5)
        graph = msg(1, msg(4, b"If") + msg(5, attr))
    path = tmp_path / "nested.onnx"
    path.write_bytes(varint(1 << 3) + varint(8) + msg(7, graph))
    with pytest.raises((ModelFileError, ValueError), match=f"{path}.*not a valid ONNX model") as err:
        ImageEmbedder(model=str(path), progress=False).fit()
    assert "\n" not in str(err.value)
