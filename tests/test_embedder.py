import pickle

import joblib
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.base import clone
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import (
    check_estimator_repr,
    check_get_params_invariance,
    check_no_attributes_set_in_init,
    check_parameters_default_constructible,
    check_set_params,
)

from deepfeat import ImageEmbedder
from deepfeat.pooling import pool
from deepfeat.sessions import clear_sessions, session_stats

from .conftest import TINY_PREPROCESSING


@pytest.fixture
def tiny(tiny_model_path):
    return ImageEmbedder(model=str(tiny_model_path), preprocessing=TINY_PREPROCESSING, progress=False)


@pytest.mark.parametrize(
    "check",
    [
        check_parameters_default_constructible,
        check_no_attributes_set_in_init,
        check_get_params_invariance,
        check_set_params,
        check_estimator_repr,
    ],
)
def test_sklearn_data_free_checks(check):
    check("ImageEmbedder", ImageEmbedder())


def test_init_stores_params_unchanged():
    layers = ["stage1", "pooled"]
    emb = ImageEmbedder(layers=layers, providers=["cpu"])
    assert emb.layers is layers
    assert clone(emb).get_params()["layers"] == layers


def test_invalid_param_is_reported_in_fit(tiny):
    emb = tiny.set_params(pooling="mean")
    with pytest.raises(ValueError, match=r"'pooling' parameter of ImageEmbedder must be a str among .*Got 'mean'"):
        emb.fit()


def test_accepts_every_input_kind(tiny, photo_folder, sample_photos):
    root, df = photo_folder
    paths = df["path"].tolist()[:3]
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    # exact equality needs every pixel decoded: JPEG draft mode applies to files only
    emb = clone(tiny).set_params(jpeg_draft=False).fit()
    ref = emb.transform(paths)
    assert ref.dtype == np.float32 and ref.shape == (3, 8)
    from pathlib import Path

    for X in (
        [Path(p) for p in paths],
        np.asarray(paths, dtype=object),
        pd.Series(paths),
        pd.DataFrame({"path": paths}),
        [Image.open(p) for p in paths],
        arrays,
        np.stack(arrays),
    ):
        np.testing.assert_allclose(emb.transform(X), ref, rtol=1e-5, atol=1e-6)


def test_single_path_is_refused_with_hint(tiny):
    with pytest.raises(TypeError, match="Wrap it in a list"):
        tiny.fit().transform("some.jpg")


def test_several_layers_are_pooled_and_concatenated(tiny, sample_photos):
    emb = clone(tiny).set_params(layers=["stage1", "stage2"], pooling="max").fit()
    X = emb.transform(sample_photos)
    assert X.shape == (2, 4 + 8)
    names = emb.get_feature_names_out()
    assert names[0] == "stage1_0000" and names[-1] == "stage2_0007"
    # each block equals the pooled layer on its own
    alone = clone(tiny).set_params(layers="stage2", pooling="max").fit().transform(sample_photos)
    np.testing.assert_allclose(X[:, 4:], alone, rtol=1e-6)


@pytest.mark.parametrize("pooling, dim", [("avg", 8), ("max", 8), ("gem", 8), ("none", 8 * 8 * 8)])
def test_pooling_dims(tiny, sample_photos, pooling, dim):
    emb = clone(tiny).set_params(layers="stage2", pooling=pooling).fit()
    X = emb.transform(sample_photos)
    assert X.shape == (2, dim) == (2, emb.n_features_out_)
    assert len(emb.get_feature_names_out()) == dim


def test_gem_between_avg_and_max():
    x = np.random.default_rng(0).uniform(0, 1, (3, 5, 4, 4)).astype(np.float32)
    avg, gem, mx = pool(x, "avg"), pool(x, "gem"), pool(x, "max")
    assert np.all(avg <= gem + 1e-6) and np.all(gem <= mx + 1e-6)
    np.testing.assert_allclose(pool(x, "gem", p=1.0), avg, rtol=1e-5)


def test_image_size_changes_input(tiny, sample_photos):
    a = clone(tiny).set_params(layers="stage2", pooling="none", image_size=64).fit()
    assert a.transform(sample_photos[:1]).shape == (1, 8 * 16 * 16)


def test_pickle_holds_no_session_and_reproduces(tiny, sample_photos, tmp_path):
    emb = tiny.fit()
    X = emb.transform(sample_photos)
    blob = pickle.dumps(emb)
    assert b"InferenceSession" not in blob and b"Runner" not in blob
    before = session_stats()["builds"]
    back = pickle.loads(blob)
    np.testing.assert_array_equal(back.transform(sample_photos), X)
    assert session_stats()["builds"] == before  # the unpickled copy reuses the process's session
    joblib.dump(emb, tmp_path / "emb.joblib")
    np.testing.assert_array_equal(joblib.load(tmp_path / "emb.joblib").transform(sample_photos), X)


def test_set_output_pandas(tiny, sample_photos):
    emb = clone(tiny).set_params(layers=["stage1", "pooled"]).set_output(transform="pandas")
    out = emb.fit_transform(sample_photos)
    assert isinstance(out, pd.DataFrame)
    assert list(out.columns) == list(emb.get_feature_names_out())
    assert out.shape == (2, 12)


def test_column_transformer_on_dataframe(tiny, photo_folder):
    _, df = photo_folder
    df = df.assign(width=np.arange(len(df), dtype=float))
    ct = ColumnTransformer([("img", tiny, ["path"]), ("num", StandardScaler(), ["width"])])
    ct.set_output(transform="pandas")
    out = ct.fit_transform(df)
    assert out.shape == (len(df), 9)
    assert out.columns[0] == "img__pooled_0000" and out.columns[-1] == "num__width"


def test_grid_search_over_embedder_and_head_params(tiny, photo_folder):
    _, df = photo_folder
    pipe = Pipeline([("embed", tiny), ("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=1000))])
    grid = GridSearchCV(
        pipe,
        {"embed__layers": ["stage1", ["stage2", "pooled"]], "embed__pooling": ["avg", "max"], "clf__C": [0.1, 10.0]},
        cv=StratifiedKFold(3, shuffle=True, random_state=0),
    )
    grid.fit(df["path"], df["label"])
    assert len(grid.cv_results_["params"]) == 8
    assert set(grid.best_params_) == {"embed__layers", "embed__pooling", "clf__C"}
    assert grid.predict(df["path"]).shape == (len(df),)


def test_real_backbone_recognises_sample_photos(sample_photos):
    emb = ImageEmbedder(layers="logits", progress=False).fit()
    top5 = np.argsort(-emb.transform(sample_photos), axis=1)[:, :5]
    # ImageNet: 698 palace, 663 monastery for china.jpg; 985 daisy for flower.jpg
    assert {698, 663} & set(top5[0])
    assert 985 in top5[1]


def test_real_backbone_default_features_and_names(sample_photos):
    emb = ImageEmbedder(progress=False).fit()
    X = emb.transform(sample_photos)
    assert X.shape == (2, 1280) and np.isfinite(X).all()
    assert emb.layers_ == [("pooled", "pooled")]
    assert emb.providers_[-1] == "CPUExecutionProvider"
    # the pooled vector is the average of the last feature map
    fmap = ImageEmbedder(layers="features", pooling="avg", progress=False).fit().transform(sample_photos)
    np.testing.assert_allclose(X, fmap, rtol=1e-4, atol=1e-5)


def test_cross_validated_head_on_real_photos(photo_folder):
    _, df = photo_folder
    pipe = Pipeline([("embed", ImageEmbedder(progress=False)), ("clf", LogisticRegression(max_iter=1000))])
    scores = cross_val_score(pipe, df["path"], df["label"], cv=StratifiedKFold(3, shuffle=True, random_state=0))
    # six classes of crops from six different photos: chance is 1/6
    assert scores.mean() > 0.8


def test_changed_params_after_fit_must_refit(tiny, sample_photos):
    emb = tiny.fit()
    emb.set_params(pooling="max")
    with pytest.raises(ValueError, match=r"\['pooling'\] changed since fit; call fit\(\) again"):
        emb.transform(sample_photos)
    assert emb.fit().transform(sample_photos).shape == (2, 8)
    # parameters that do not change vectors may change freely
    emb.set_params(batch_size=1, progress=False, on_error="skip")
    assert emb.transform(sample_photos).shape == (2, 8)


def test_same_tensor_twice_is_refused(tiny):
    from deepfeat.graph import LayerError

    with pytest.raises(LayerError, match="'stage2' and 'conv2' are the same tensor"):
        clone(tiny).set_params(layers=["stage2", "conv2"]).fit()


def test_empty_layer_list_is_refused_not_replaced_by_the_default(tiny):
    from deepfeat.graph import LayerError

    with pytest.raises(LayerError, match="At least one layer"):
        clone(tiny).set_params(layers=[]).fit()


def test_unpickled_embedder_refuses_a_replaced_model_file(tmp_path, sample_photos):
    import shutil

    from deepfeat.registry import ModelFileError

    from .conftest import build_tiny_cnn

    path = tmp_path / "m.onnx"
    import onnx

    onnx.save(build_tiny_cnn(seed=0), str(path))
    emb = ImageEmbedder(model=str(path), preprocessing=TINY_PREPROCESSING, progress=False).fit()
    blob = pickle.dumps(emb)
    onnx.save(build_tiny_cnn(seed=1), str(path))  # same name, other weights
    clear_sessions()  # as in a fresh worker process: no pooled session for the fitted file's hash
    with pytest.raises(ModelFileError, match="Refit the embedder"):
        pickle.loads(blob).transform(sample_photos)
    shutil.rmtree(tmp_path)


def test_the_output_size_is_said_before_the_work_starts(sample_photos, monkeypatch, caplog):
    """#24 item 10: a large output (unpooled maps) is a warning naming the unpooled layers, before any image runs."""
    import deepfeat.engine as engine
    from deepfeat import ImageEmbedder

    emb = ImageEmbedder(layers="stage4", pooling="none", progress=False).fit()
    per_image = emb.n_features_out_
    monkeypatch.setattr(engine, "LARGE_OUTPUT_BYTES", per_image * 4)
    with caplog.at_level("WARNING", logger="deepfeat.engine"):
        emb.transform(sample_photos)
    assert (f"the features of 2 images take {2 * per_image * 4 / 2**20:.0f} MiB ({per_image} float32 per image); "
            f"unpooled layers 'stage4' ({per_image}) make most of it") in caplog.text
    caplog.clear()
    monkeypatch.setattr(engine, "LARGE_OUTPUT_BYTES", 1 << 40)
    with caplog.at_level("WARNING", logger="deepfeat.engine"):
        emb.transform(sample_photos)
    assert "MiB" not in caplog.text
