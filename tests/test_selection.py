"""Layer selection: per-(layer, pooling) linear-probe scores, the plot, and the select-layer command."""

import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score

from deepfeat import ImageEmbedder
from deepfeat.cache import FeatureCache
from deepfeat.cli import main
from deepfeat.selection import default_probe, plot_layer_scores, select_layer

from .conftest import TINY_PREPROCESSING

matplotlib = pytest.importorskip("matplotlib", reason="plots need matplotlib (the dev extra)")
matplotlib.use("Agg")

PARAMS = {"preprocessing": TINY_PREPROCESSING, "progress": False}


@pytest.fixture(scope="module")
def tiny_scores(tiny_model_path, photo_folder):
    _, df = photo_folder
    return select_layer(
        df["path"], df["label"], model=str(tiny_model_path), poolings=("avg", "max"), cv=3, embedder_params=PARAMS
    )


def test_select_layer_table(tiny_scores, photo_folder):
    _, df = photo_folder
    s = tiny_scores
    # every alias of the tiny model, in graph order; vector layers once (pooling cannot change them), and
    # stage2 averaged is exactly `pooled` (a GlobalAveragePool of it): scored once, as the vector
    assert list(zip(s["layer"], s["pooling"])) == [
        ("stage1", "avg"), ("stage1", "max"), ("stage2", "max"), ("pooled", "vector"), ("logits", "vector"),
    ]
    assert s.attrs["duplicates"] == {"stage2/avg": "pooled/vector"}
    assert s["depth"].is_monotonic_increasing
    assert s["n_features"].tolist() == [4, 4, 8, 8, 3]
    assert s["stride"].tolist()[:3] == [2, 2, 4] and s["stride"].isna().tolist()[3:] == [True, True]
    assert s["tensor"].tolist()[:2] == ["conv1", "conv1"]
    combo = s.attrs["combination"]  # greedy: each step adds a pick and raises the score
    scores = [step["mean_test_score"] for step in combo]
    assert scores == sorted(scores) and len(set(scores)) == len(scores) and len(combo[-1]["picks"]) <= 3
    assert tuple(combo[0]["picks"][0]) in set(zip(s["layer"], s["pooling"]))
    assert s["mean_test_score"].between(0, 1).all() and (s["std_test_score"] >= 0).all()
    best = s["mean_test_score"].max()
    assert s.loc[s["rank_test_score"] == 1, "mean_test_score"].eq(best).all()
    assert s.attrs["n_splits"] == 3 and s.attrs["n_images"] == len(df) and s.attrs["n_dropped"] == 0


def test_scores_are_those_of_each_layer_alone(tiny_scores, tiny_model_path, photo_folder):
    """Slicing the multi-layer embedding gives each layer's own features: the score equals
    a probe on an embedder cut at that layer only."""
    _, df = photo_folder
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    for layer, pooling in [("stage2", "max"), ("logits", "vector")]:
        emb = ImageEmbedder(model=str(tiny_model_path), layers=[layer],
                            pooling="avg" if pooling == "vector" else pooling, **PARAMS)
        ref = cross_val_score(default_probe(), emb.fit_transform(df["path"]), df["label"], cv=cv)
        row = tiny_scores[(tiny_scores["layer"] == layer) & (tiny_scores["pooling"] == pooling)].iloc[0]
        assert row["mean_test_score"] == pytest.approx(ref.mean())
        assert row["std_test_score"] == pytest.approx(ref.std())


def test_select_layer_uses_the_cache(tiny_model_path, photo_folder, tmp_path):
    _, df = photo_folder
    kw = dict(model=str(tiny_model_path), layers=["stage2", "pooled"], poolings=["avg", "gem"], cv=2,
              cache=tmp_path / "cache", embedder_params=PARAMS)
    first = select_layer(df["path"], df["label"], **kw)
    info = FeatureCache(tmp_path / "cache").info()
    # one fingerprint per layer and pooling (the (8, 1, 1) `pooled` map once), every image stored once under each
    assert len(info["fingerprints"]) == 3 and info["vectors"] == 3 * len(df)
    assert all(f["computed"] == len(df) for f in info["fingerprints"])
    again = select_layer(df["path"], df["label"], **kw)
    assert FeatureCache(tmp_path / "cache").info()["vectors"] == 3 * len(df)
    pd.testing.assert_frame_equal(first.drop(columns="mean_fit_time"), again.drop(columns="mean_fit_time"))
    # the winner, embedded on its own afterwards (what `classify --layers X` does), is read back, not computed
    emb = ImageEmbedder(model=str(tiny_model_path), layers="stage2", pooling="gem", cache=tmp_path / "cache",
                        **PARAMS).fit()
    emb.transform(df["path"])
    assert emb.cache_stats_["hits"] == len(df) and emb.cache_stats_["computed"] == 0


def test_select_layer_custom_probe_scoring_and_failures(tiny_model_path, photo_folder, tmp_path, caplog):
    _, df = photo_folder
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    paths = list(df["path"]) + [str(bad)]
    labels = list(df["label"]) + [df["label"][0]]
    s = select_layer(
        paths, labels, model=str(tiny_model_path), layers="stage2", poolings="gem", cv=2,
        probe=LogisticRegression(max_iter=500), scoring="balanced_accuracy",
        embedder_params={**PARAMS, "on_error": "skip"},
    )
    assert s[["layer", "pooling"]].values.tolist() == [["stage2", "gem"]]
    assert s.attrs["scoring"] == "balanced_accuracy"
    assert s.attrs["n_dropped"] == 1 and s.attrs["n_images"] == len(df)
    assert "1 of" in caplog.text and "left out of the probe" in caplog.text


def test_select_layer_errors(tiny_model_path, photo_folder):
    _, df = photo_folder
    paths, y = df["path"], df["label"]
    with pytest.raises(ValueError, match="'poolings' parameter.*got \\['mean'\\]"):
        select_layer(paths, y, model=str(tiny_model_path), poolings=["mean"], embedder_params=PARAMS)
    with pytest.raises(ValueError, match="has 36 images but y has 35"):
        select_layer(paths, y[:-1], model=str(tiny_model_path), embedder_params=PARAMS)
    with pytest.raises(ValueError, match="must not set 'pooling'"):
        select_layer(paths, y, model=str(tiny_model_path), embedder_params={**PARAMS, "pooling": "max"})
    # an unregistered file without recorded aliases gets them from its graph, so there are candidates
    from deepfeat.resolve import resolve_model

    from .conftest import TINY_LAYERS

    assert dict(resolve_model(str(tiny_model_path))[1].layers) == {**TINY_LAYERS, "features": "conv2"}


def test_default_candidates_of_the_shipped_model_are_distinct_tensors():
    from deepfeat.selection import _candidate_layers

    layers = _candidate_layers("efficientnet_lite0", None)
    assert layers[:3] == ["stem", "stage1", "stage2"] and "pooled" in layers and "logits" in layers
    assert "block0" not in layers  # same tensor as stage1
    assert "block1" in layers


def test_plot_layer_scores(tiny_scores):
    ax = plot_layer_scores(tiny_scores)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["stage1", "stage2", "pooled", "logits"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    best = [t for t in legend if t.startswith("best: ")]
    assert sorted(set(legend) - set(best)) == ["avg", "max"] and len(best) == 1
    assert "accuracy" in ax.get_ylabel()
    with pytest.raises(ValueError, match="lacks the columns"):
        plot_layer_scores(tiny_scores.drop(columns="depth"))


def test_select_layer_command(tiny_model_path, photo_folder, tmp_path, capsys):
    root, _ = photo_folder
    out_csv, png = tmp_path / "scores.csv", tmp_path / "plot" / "layers.png"
    rc = main([
        "select-layer", str(root), "--model", str(tiny_model_path), "--layers", "conv1,conv2,pooled",
        "--pooling", "avg,max", "--cv", "3", "-o", str(out_csv), "--plot", str(png), "--no-progress",
    ])
    assert rc == 0
    text = capsys.readouterr().out
    scores = pd.read_csv(out_csv)
    assert list(zip(scores["layer"], scores["pooling"])) == [  # conv2 averaged is pooled: scored once
        ("conv1", "avg"), ("conv1", "max"), ("conv2", "max"), ("pooled", "vector"),
    ]
    best = scores.loc[scores["mean_test_score"].idxmax()]
    assert f"best: {best['layer']} ({best['pooling']})" in text
    assert f"--layers {best['layer']}" in text
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
