"""Recipes beyond the default: per-layer pooling in one pass, flip test-time augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from deepfeat import ImageEmbedder
from deepfeat.cache import FeatureCache

from .conftest import TINY_PREPROCESSING


@pytest.fixture
def kw(tiny_model_path):
    return dict(model=str(tiny_model_path), preprocessing=TINY_PREPROCESSING, progress=False)


def test_per_layer_pooling_equals_separate_embedders_in_one_pass(kw, sample_photos, network_calls):
    asked = network_calls
    emb = ImageEmbedder(**kw, layers=[("stage2", "gem"), ("stage2", "max"), "pooled"]).fit()
    X = emb.transform(sample_photos)
    assert asked == [("conv2", "pooled")]  # one pass, each tensor once
    gem = ImageEmbedder(**kw, layers="stage2", pooling="gem").fit().transform(sample_photos)
    mx = ImageEmbedder(**kw, layers="stage2", pooling="max").fit().transform(sample_photos)
    pooled = ImageEmbedder(**kw, layers="pooled").fit().transform(sample_photos)
    assert np.array_equal(X, np.hstack([gem, mx, pooled]))
    names = emb.get_feature_names_out()
    assert names[0] == "stage2_gem_0000" and names[8] == "stage2_max_0000" and names[-1] == "pooled_0007"
    assert emb.poolings_ == ["gem", "max", "avg"]


def test_per_layer_pooling_mistakes_name_the_parameter(kw):
    with pytest.raises(ValueError, match=r"'layers' parameter .* \(layer, pooling\) pairs .*got \('stage2', 'mean'\)"):
        ImageEmbedder(**kw, layers=[("stage2", "mean")]).fit()
    with pytest.raises(ValueError, match="same tensor 'conv2' with the same pooling 'gem'"):
        ImageEmbedder(**kw, layers=[("stage2", "gem"), ("conv2", "gem")]).fit()


def test_per_layer_pooling_shares_the_cache_with_plain_embedders(kw, sample_photos, tmp_path):
    ImageEmbedder(**kw, layers="stage2", pooling="gem", cache=tmp_path).fit().transform(sample_photos)
    emb = ImageEmbedder(**kw, layers=[("stage2", "gem"), "pooled"], cache=tmp_path).fit()
    emb.transform(sample_photos)
    fps = {f["description"]["layers"][0]: f for f in FeatureCache(tmp_path).info()["fingerprints"]}
    assert fps["stage2"]["computed"] == 2 and fps["pooled"]["computed"] == 2  # stage2/gem was read back


def test_flip_tta_is_mirror_invariant_and_cached_apart(kw, sample_photos, tmp_path):
    photo = sample_photos[0][:200, :200]
    symmetric = np.concatenate([photo[:, :100], photo[:, :100][:, ::-1]], axis=1)
    plain = ImageEmbedder(**kw, cache=tmp_path).fit()
    tta = ImageEmbedder(**kw, cache=tmp_path, tta="flip").fit()
    a = tta.transform([photo, photo[:, ::-1].copy(), symmetric])
    np.testing.assert_allclose(a[0], a[1], rtol=1e-5, atol=1e-6)  # an image and its mirror: one vector
    np.testing.assert_allclose(a[2], plain.transform([symmetric])[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(a[0], plain.transform([photo])[0])  # TTA changes an asymmetric image's vector
    assert tta.cache_fingerprint_ != plain.cache_fingerprint_
    again = ImageEmbedder(**kw, cache=tmp_path, tta="flip").fit()
    assert np.array_equal(again.transform([photo]), a[:1]) and again.cache_stats_["hits"] == 1
    with pytest.raises(ValueError, match="'tta' parameter"):
        ImageEmbedder(**kw, tta="rotate").fit()


def test_select_recipe_gives_layers_an_embedder_takes(photo_folder, tiny_model_path):
    from deepfeat.selection import select_recipe

    _, df = photo_folder
    layers, scores = select_recipe(df["path"], df["label"], model=str(tiny_model_path), poolings=["avg", "max"],
                                   cv=2, embedder_params={"preprocessing": TINY_PREPROCESSING, "progress": False})
    assert 1 <= len(layers) <= 3 and len(scores.attrs["combination"]) == len(layers)
    emb = ImageEmbedder(model=str(tiny_model_path), preprocessing=TINY_PREPROCESSING, progress=False,
                        layers=layers).fit()
    assert emb.transform(df["path"][:2]).shape[1] == emb.n_features_out_


def test_classify_auto_end_to_end(tmp_path, photo_folder, capsys):
    from deepfeat.classify import load_model
    from deepfeat.cli import main

    root, df = photo_folder
    out = tmp_path / "m.joblib"
    assert main(["classify", str(root), "--test", str(root), "--auto", "--cv", "2", "--no-progress",
                 "--cache-dir", str(tmp_path / "c"), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "--auto:" in text and "recipe --layers" in text and "keeping the" in text
    assert "search" in text.splitlines()[[i for i, l in enumerate(text.splitlines()) if "rank" in l][0]]
    assert "test: 36 images, accuracy" in text and "--auto took" in text
    report = next(line for line in text.splitlines() if line.startswith("time: "))
    assert report.startswith("time: --auto probe ") and "head searches on the recipe " in report
    assert "head searches on the default layer " in report and "; test " in report
    pipe = load_model(out)
    assert (pipe.predict(df["path"][:4]) == pipe.predict(df["path"][:4])).all()
    with pytest.raises(SystemExit, match="--auto chooses the layers itself"):
        main(["classify", str(root), "--auto", "--layers", "pooled", "-o", str(out)])


def test_flip_tta_with_flattened_maps_puts_the_mirror_back_in_place(kw, sample_photos):
    # 36 x 36: the resize is the identity and the 32-pixel center crop is symmetric, so the crop of the
    # mirror is the mirror of the crop and the comparison below is exact up to float rounding
    photo = np.ascontiguousarray(sample_photos[0][100:136, 200:236])
    tta = ImageEmbedder(**kw, layers="stage2", pooling="none", tta="flip").fit()
    a, b = tta.transform([photo, photo[:, ::-1].copy()])
    flat = ImageEmbedder(**kw, layers="stage2", pooling="none").fit()
    plain, mirrored = flat.transform([photo, photo[:, ::-1].copy()])
    maps = tta.output_shapes_[0]
    unflip = mirrored.reshape(maps)[..., ::-1].ravel()
    np.testing.assert_allclose(a, (plain + unflip) / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.reshape(maps)[..., ::-1].ravel(), a, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_the_faster_linear_svm_scores_like_the_old_one_on_ants_and_bees(hymenoptera):
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    from deepfeat import load_image_folder
    from deepfeat.classify import compare_heads, default_heads

    df = load_image_folder(hymenoptera / "train")
    df = df[df["path"].str.lower().str.endswith(".jpg")]
    X = ImageEmbedder(progress=False).fit_transform(df["path"])
    y = df["label"].to_numpy()
    old = {"linear_svm": (Pipeline([("scale", StandardScaler()), ("clf", LinearSVC(max_iter=20000))]),
                          {"clf__C": [1e-4, 1e-3, 1e-2, 0.1]})}
    new = {"linear_svm": default_heads()["linear_svm"]}
    before = compare_heads(X, y, old, cv=5, refit=False)["mean_test_score"].iloc[0]
    after = compare_heads(X, y, new, cv=5, refit=False)["mean_test_score"].iloc[0]
    assert abs(after - before) <= 0.01, (before, after)
