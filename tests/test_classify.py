"""Head comparison, saved image pipelines, prediction, and the classify/predict commands."""

import re
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline

from deepfeat import ImageEmbedder
from deepfeat.classify import (
    compare_heads,
    confusion_table,
    default_heads,
    format_leaderboard,
    load_model,
    make_image_pipeline,
    predict_paths,
    save_model,
    stratified_cv,
)
from deepfeat.cli import main

from .conftest import TINY_PREPROCESSING


@pytest.fixture(scope="module")
def blobs():
    X, y = make_classification(
        n_samples=90, n_features=12, n_informative=6, n_classes=3, class_sep=2.0, random_state=0
    )
    return X, np.array(["a", "b", "c"])[y]


@pytest.fixture
def tiny(tiny_model_path):
    return ImageEmbedder(model=str(tiny_model_path), preprocessing=TINY_PREPROCESSING, progress=False)


def test_default_heads_are_fresh_unfitted_pipelines():
    a, b = default_heads(), default_heads()
    assert list(a) == ["logreg", "linear_svm", "rbf_svm", "random_forest", "knn"]
    for name, (est, grid) in a.items():
        assert isinstance(est, Pipeline) and est.steps[-1][0] == "clf"
        assert est is not b[name][0]  # callers may mutate what they get
        assert set(grid) <= set(est.get_params())  # every grid key is a real parameter
        clone(est)
    assert default_heads(random_state=3)["random_forest"][0].get_params()["clf__random_state"] == 3


def test_stratified_cv_lowers_folds_and_rejects_unusable_labels(caplog):
    assert stratified_cv(["x"] * 3 + ["y"] * 9, cv=5).get_n_splits() == 3
    assert "3 CV folds instead of 5" in caplog.text
    with pytest.raises(ValueError, match="at least 2 classes"):
        stratified_cv(["x"] * 5)
    with pytest.raises(ValueError, match=r"\['y'\] has 1"):
        stratified_cv(["x"] * 5 + ["y"])
    with pytest.raises(ValueError, match="cv must be an integer >= 2"):
        stratified_cv(["x", "y"] * 3, cv=1)


def test_compare_heads_leaderboard(blobs):
    X, y = blobs
    heads = {
        "logreg": default_heads()["logreg"],
        "knn1": KNeighborsClassifier(n_neighbors=1),  # a bare estimator: no grid
    }
    board = compare_heads(X, y, heads, cv=3, refit="all")
    assert list(board.columns) == [
        "head", "mean_test_score", "std_test_score", "mean_fit_time", "search_time", "params", "estimator",
    ]
    assert board.index.tolist() == [1, 2] and board.index.name == "rank"
    assert board["mean_test_score"].is_monotonic_decreasing
    assert set(board["head"]) == {"logreg", "knn1"}
    assert {k: board.attrs[k] for k in ("scoring", "n_splits")} == {"scoring": "accuracy", "n_splits": 3}
    assert board.attrs["search_seconds"] > 0 and board.attrs["refit_seconds"] >= 0
    # the reported score is the grid search's own, for its best parameters
    row = board.set_index("head").loc["logreg"]
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    ref = GridSearchCV(default_heads()["logreg"][0], default_heads()["logreg"][1], cv=cv).fit(X, y)
    assert row["params"] == ref.best_params_
    assert row["mean_test_score"] == pytest.approx(ref.best_score_)
    # refitted on all the data
    assert (row["estimator"].predict(X) == ref.best_estimator_.predict(X)).all()
    text = format_leaderboard(board)
    assert text.splitlines()[0].split()[:3] == ["rank", "head", "accuracy"]
    assert "±" in text and "clf__C=" in text


def test_compare_heads_other_scoring_and_no_refit(blobs):
    X, y = blobs
    board = compare_heads(X, y, {"knn": default_heads()["knn"]}, cv=3, scoring="f1_macro", refit=False)
    assert board.attrs["scoring"] == "f1_macro"
    assert board.loc[1, "estimator"] is None
    assert "f1_macro" in format_leaderboard(board).splitlines()[0]


def test_compare_heads_rejects_bad_input(blobs):
    X, y = blobs
    Xn = X.copy()
    Xn[4, 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN in 1 rows \(first: \[4\]\)"):
        compare_heads(Xn, y)
    with pytest.raises(ValueError, match="X has 90 rows but y has 89"):
        compare_heads(X, y[:-1])
    with pytest.raises(ValueError, match="no fit method"):
        compare_heads(X, y, {"bad": ("not an estimator", {})})
    with pytest.raises(ValueError, match="non-empty dict"):
        compare_heads(X, y, {})


def test_feature_search_equals_end_to_end_pipeline_search(tiny, photo_folder):
    """Searching heads on precomputed features is what a GridSearchCV over
    Pipeline(ImageEmbedder, head) computes, because the embedder learns nothing."""
    _, df = photo_folder
    paths, y = df["path"].to_numpy(), df["label"].to_numpy()
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    grid = {"clf__C": [0.1, 10.0]}
    board = compare_heads(
        clone(tiny).fit().transform(paths), y, {"lr": (Pipeline([("clf", LogisticRegression(max_iter=2000))]), grid)},
        cv=cv,
    )
    full = GridSearchCV(
        Pipeline([("embed", clone(tiny)), ("clf", LogisticRegression(max_iter=2000))]), grid, cv=cv
    ).fit(paths, y)
    assert board.loc[1, "mean_test_score"] == pytest.approx(full.best_score_)
    assert board.loc[1, "params"] == full.best_params_


def test_image_pipeline_save_load_predict(tiny, photo_folder, tmp_path):
    _, df = photo_folder
    emb = tiny.fit()
    X = emb.transform(df["path"])
    head = default_heads()["logreg"][0].fit(X, df["label"])
    pipe = make_image_pipeline(emb, head)
    assert [n for n, _ in pipe.steps] == ["embed", "scale", "clf"]
    expected = head.predict(X)
    assert (pipe.predict(df["path"]) == expected).all()

    path = tmp_path / "sub" / "model.joblib"
    save_model(pipe, path)
    loaded = load_model(path)
    assert "_runner" not in vars(loaded.steps[0][1])  # no ONNX Runtime session in the file
    assert (loaded.predict(df["path"]) == expected).all()


@pytest.mark.parametrize("head", ["logreg", "linear_svm", "rbf_svm", "random_forest", "knn"])
def test_every_default_head_saved_as_skops_loads_back(tiny, photo_folder, tmp_path, head):
    """Whatever classify can save (a forest holds sklearn.tree._tree.Tree objects), load_model takes."""
    _, df = photo_folder
    emb = tiny.fit()
    X = emb.transform(df["path"])
    pipe = make_image_pipeline(emb, default_heads()[head][0].fit(X, df["label"]))
    save_model(pipe, tmp_path / "m.skops")
    loaded = load_model(tmp_path / "m.skops")
    assert (loaded.predict(df["path"]) == pipe.predict(df["path"])).all()


def test_make_image_pipeline_and_load_model_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match="fitted ImageEmbedder"):
        make_image_pipeline(tiny, LogisticRegression())
    with pytest.raises(FileNotFoundError, match="deepfeat classify"):
        load_model(tmp_path / "missing.joblib")
    joblib.dump(LogisticRegression(), tmp_path / "lr.joblib")
    with pytest.raises(ValueError, match="not an image pipeline"):
        load_model(tmp_path / "lr.joblib")


def test_predict_paths_keeps_going_past_bad_files(tiny, photo_folder, tmp_path):
    _, df = photo_folder
    emb = tiny.fit()
    pipe = make_image_pipeline(emb, LogisticRegression(max_iter=2000).fit(emb.transform(df["path"]), df["label"]))
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    paths = [df["path"][0], str(bad), df["path"][7]]
    out = predict_paths(pipe, paths)
    assert out["path"].tolist() == paths
    assert pd.isna(out["prediction"][1])
    assert "not an image file" in out["error"][1]
    assert out["error"][[0, 2]].isna().all()
    assert out["prediction"][[0, 2]].tolist() == pipe.predict([paths[0], paths[2]]).tolist()
    assert ((out["probability"][[0, 2]] > 0) & (out["probability"][[0, 2]] <= 1)).all()
    assert pipe.steps[0][1].on_error == "raise"  # the caller's pipeline is left as it was


def test_confusion_table_labels_and_counts():
    cm = confusion_table(["ant", "bee", "bee", "bee"], ["ant", "ant", "bee", "bee"], labels=["bee", "ant"])
    assert cm.index.tolist() == ["bee", "ant"] and cm.columns.tolist() == ["bee", "ant"]
    assert cm.loc["bee", "bee"] == 2 and cm.loc["bee", "ant"] == 1 and cm.loc["ant", "ant"] == 1
    assert cm.to_numpy().sum() == 4


def _split_folder(df: pd.DataFrame, root: Path):
    """Hard-link a labelled folder into train/ and test/ halves (by file order within each class)."""
    for i, (path, label) in enumerate(zip(df["path"], df["label"])):
        part = "train" if i % 3 else "test"
        dest = root / part / label / Path(path).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(Path(path).read_bytes())
    return root / "train", root / "test"


def test_classify_and_predict_commands_on_real_photos(photo_folder, tmp_path, capsys):
    """The shipped model on crops of real photos: leaderboard, saved pipeline, test report, predict."""
    _, df = photo_folder
    train, test = _split_folder(df, tmp_path / "data")
    model = tmp_path / "model.joblib"
    board_csv = tmp_path / "board.csv"
    rc = main([
        "classify", str(train), "--test", str(test), "-o", str(model), "--heads", "logreg,knn",
        "--cv", "3", "--leaderboard", str(board_csv), "--no-progress",
    ])
    assert rc == 0
    out = capsys.readouterr().out
    assert "3-fold stratified CV, accuracy" in out
    board = pd.read_csv(board_csv)
    assert set(board["head"]) == {"logreg", "knn"} and board["rank"].tolist() == [1, 2]
    assert f"best head: {board['head'][0]}" in out
    acc = float(out.split("accuracy ")[-1].split()[0])
    n_test = len(list(test.rglob("*.jpg")))
    assert f"test: {n_test} images" in out
    # six distinct photos, cropped: the pretrained features separate them almost perfectly
    assert acc >= 0.9
    assert "predicted" in out and "true" in out  # the confusion matrix
    # where the time went, head by head
    report = next(line for line in out.splitlines() if line.startswith("time: "))
    assert re.fullmatch(r"time: embedding \d+\.\d s; head searches \d+\.\d s on \d+ threads \((logreg|knn) "
                        r"\d+\.\d, (logreg|knn) \d+\.\d s of work\), refit \d+\.\d s; test \d+\.\d s", report), report

    pipe = load_model(model)
    assert isinstance(pipe.steps[0][1], ImageEmbedder)
    preds_csv = tmp_path / "preds.csv"
    assert main(["predict", str(model), str(test), "-o", str(preds_csv), "--no-progress"]) == 0
    preds = pd.read_csv(preds_csv)
    assert len(preds) == n_test and preds["error"].isna().all()
    truth = [Path(p).parent.name for p in preds["path"]]
    assert np.mean(preds["prediction"] == truth) == pytest.approx(acc)


def test_classify_errors_are_actionable(photo_folder, tmp_path, capsys):
    root, _ = photo_folder
    with pytest.raises(SystemExit, match="unknown head"):
        main(["classify", str(root), "--heads", "logreg,xgboost"])
    assert main(["predict", str(tmp_path / "nope.joblib"), str(root)]) == 1
    assert "deepfeat classify" in capsys.readouterr().err


def test_a_test_class_never_seen_in_training_is_warned(photo_folder, tmp_path, capsys):
    """#24 item 9: classify --test, predict on a labelled folder and confusion_table(trained=) all say so."""
    _, df = photo_folder
    classes = sorted(df["label"].unique())
    train, test = _split_folder(df[df["label"] != classes[-1]], tmp_path / "data")
    extra = df[df["label"] == classes[-1]].head(3)
    for path in extra["path"]:  # three images of a class training never had
        dest = test / classes[-1] / Path(path).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(Path(path).read_bytes())
    model = tmp_path / "model.joblib"
    assert main(["classify", str(train), "--test", str(test), "-o", str(model), "--heads", "logreg",
                 "--cv", "2", "--no-progress"]) == 0
    expected = (f"deepfeat: warning: test class {classes[-1]!r} (3 images) never appears in training: "
                "the model cannot predict it")
    assert expected in capsys.readouterr().err
    assert main(["predict", str(model), str(test), "--no-progress"]) == 0
    assert expected in capsys.readouterr().err
    # a test set holding only trained classes says nothing
    assert main(["predict", str(model), str(train), "--no-progress"]) == 0
    assert "never appear" not in capsys.readouterr().err

    from deepfeat.classify import confusion_table

    with pytest.warns(UserWarning, match=r"test classes 'moth' \(1 image\), 'wasp' \(2 images\) never appear"):
        cm = confusion_table(["ant", "wasp", "wasp", "moth"], ["ant", "ant", "bee", "ant"], trained=["ant", "bee"])
    assert cm.loc["wasp"].sum() == 2 and cm.loc["wasp", "wasp"] == 0
