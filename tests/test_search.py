"""The exact shortcuts of the head search agree with a plain GridSearchCV, candidate by candidate."""

import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.datasets import load_digits, make_classification
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MinMaxScaler, Normalizer, StandardScaler
from sklearn.svm import SVC, LinearSVC
from threadpoolctl import threadpool_limits

from deepfeat.classify import compare_heads, default_heads, stratified_cv
from deepfeat.search import search_heads

HYMENOPTERA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera_data"


@pytest.fixture(scope="module")
def wide():
    """Fewer rows than features, as CNN features of a few hundred images are: the row-space shortcut applies."""
    X, y = make_classification(n_samples=150, n_features=220, n_informative=20, n_classes=3, class_sep=1.2,
                               random_state=0)
    return X.astype(np.float32), y


def _plain(est, grid, X, y, folds):
    # one BLAS thread: the same scores, without the thread contention that makes lbfgs 7x slower here
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore")
        return GridSearchCV(est, grid, cv=folds, refit=False).fit(X, y).cv_results_


def _fast(heads, X, y, folds, n_jobs=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return search_heads(heads, X, y, folds, n_jobs=n_jobs)


SHORTCUT_HEADS = {
    # tight tolerances: these compare every candidate, and lbfgs at 1e-4 stops where it stops
    "logreg": (Pipeline([("s", StandardScaler()), ("clf", LogisticRegression(tol=1e-10, max_iter=10000))]),
               {"clf__C": [0.001, 0.1, 10.0], "clf__fit_intercept": [True, False]}),
    "linear_svm": (Pipeline([("s", StandardScaler()), ("clf", LinearSVC(tol=1e-8, max_iter=100000))]),
                   {"clf__C": [1e-3, 1e-1], "clf__loss": ["squared_hinge", "hinge"],
                    "clf__intercept_scaling": [1.0, 3.0]}),
    "linear_svm_cs": (Pipeline([("s", StandardScaler()),
                                ("clf", LinearSVC(multi_class="crammer_singer", fit_intercept=False, tol=1e-8,
                                                  max_iter=100000))]), {"clf__C": [1e-2]}),
    "svc": (Pipeline([("s", StandardScaler()), ("clf", SVC())]),
            [{"s": [StandardScaler(), Normalizer(), MinMaxScaler()], "clf__C": [1.0, 100.0],
              "clf__gamma": ["scale", "auto", 0.003]},
             {"clf__kernel": ["linear", "poly", "sigmoid"], "clf__C": [0.5]}]),
    "knn": (Pipeline([("n", Normalizer()), ("clf", KNeighborsClassifier())]),
            {"clf__n_neighbors": [1, 4, 9], "clf__weights": ["uniform", "distance"]}),
    "bare_knn": (KNeighborsClassifier(metric="minkowski", p=2), {"n_neighbors": [3, 7]}),
    "forest": (RandomForestClassifier(n_estimators=20, random_state=0), {"max_features": ["sqrt", 0.5]}),
    "swap_clf": (Pipeline([("s", StandardScaler()), ("clf", LogisticRegression())]),
                 {"clf": [LogisticRegression(tol=1e-10, max_iter=10000, C=0.05), SVC(C=3.0),
                          KNeighborsClassifier(3)]}),
}


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_every_shortcut_scores_every_candidate_as_grid_search_does(wide, n_jobs):
    X, y = wide
    folds = list(StratifiedKFold(4, shuffle=True, random_state=1).split(X, y))
    found = _fast(SHORTCUT_HEADS, X, y, folds, n_jobs=n_jobs)
    for name, (est, grid) in SHORTCUT_HEADS.items():
        ref = _plain(est, grid, X, y, folds)
        got = found[name]
        assert got.params == ref["params"], name
        for c in range(len(got.params)):
            np.testing.assert_allclose(got.split_scores[c], [ref[f"split{f}_test_score"][c] for f in range(4)],
                                       atol=1e-12, err_msg=f"{name} {got.params[c]}")
        np.testing.assert_allclose(got.mean_test_score, ref["mean_test_score"], atol=1e-12)
        np.testing.assert_allclose(got.std_test_score, ref["std_test_score"], atol=1e-12)
        assert got.best_index == int(np.argmin(ref["rank_test_score"])), name
        assert got.seconds > 0 and (got.fit_times > 0).all()


def test_the_shortcuts_only_take_the_problems_they_solve_exactly(wide):
    """Many rows (no row-space reduction), an L1 penalty, a callable kernel, a non-euclidean metric."""
    X, y = wide
    Xtall = np.vstack([X[:, :30]] * 3) + np.random.default_rng(0).normal(0, 0.1, (450, 30)).astype(np.float32)
    ytall = np.concatenate([y] * 3)
    heads = {
        "l1": (LogisticRegression(l1_ratio=1.0, solver="saga", C=0.5, max_iter=300, random_state=0), {"C": [0.1, 1.0]}),
        "lsvc_l1": (LinearSVC(penalty="l1", dual=False, C=0.1), {}),
        "svc_callable": (SVC(kernel=lambda a, b: a @ b.T), {"C": [1.0]}),
        "knn_manhattan": (KNeighborsClassifier(metric="manhattan"), {"n_neighbors": [3, 5]}),
    }
    folds = list(StratifiedKFold(3, shuffle=True, random_state=0).split(X, y))
    tall_folds = list(StratifiedKFold(3, shuffle=True, random_state=0).split(Xtall, ytall))
    tall = {"logreg": (LogisticRegression(tol=1e-10, max_iter=10000), {"C": [0.01, 1.0]}),
            "lsvc": (LinearSVC(tol=1e-8, max_iter=100000), {"C": [0.01, 1.0]})}
    for data, hs, fs in ((X, heads, folds), (Xtall, tall, tall_folds)):
        yy = y if data is X else ytall
        found = _fast(hs, data, yy, fs)
        for name, (est, grid) in hs.items():
            ref = _plain(est, grid, data, yy, fs)
            np.testing.assert_allclose(found[name].mean_test_score, ref["mean_test_score"], atol=1e-12,
                                       err_msg=name)


def test_failing_candidates_score_nan_and_the_others_compete(wide):
    class FailsOnOdd(ClassifierMixin, BaseEstimator):
        def __init__(self, k=0):
            self.k = k

        def fit(self, X, y):
            if self.k % 2:
                raise RuntimeError(f"cannot fit k={self.k}\nlast line")
            self.classes_ = np.unique(y)
            return self

        def predict(self, X):
            return np.full(len(X), self.classes_[0])

    X, y = wide
    folds = list(StratifiedKFold(3, shuffle=True, random_state=0).split(X, y))
    found = _fast({"f": (FailsOnOdd(), {"k": [1, 2, 3]}), "dead": (FailsOnOdd(), {"k": [1]})}, X, y, folds)
    assert np.isnan(found["f"].split_scores[[0, 2]]).all() and np.isfinite(found["f"].split_scores[1]).all()
    assert found["f"].best_index == 1 and found["f"].error is None
    assert found["dead"].best_index is None and found["dead"].error == "RuntimeError: last line"


def test_refit_best_all_or_none(wide):
    X, y = wide
    heads = {k: v for k, v in default_heads().items() if k in ("logreg", "knn", "rbf_svm")}
    best = compare_heads(X, y, heads, cv=3)
    assert best.loc[1, "estimator"] is not None and best.loc[2:, "estimator"].isna().all()
    every = compare_heads(X, y, heads, cv=3, refit="all")
    assert every["estimator"].notna().all()
    assert compare_heads(X, y, heads, cv=3, refit=False)["estimator"].isna().all()
    # the refit is GridSearchCV's: the best parameters, fitted on every row
    name, params = best.loc[1, "head"], best.loc[1, "params"]
    ref = GridSearchCV(*heads[name], cv=stratified_cv(y, 3, 0)).fit(X, y)
    assert ref.best_params_ == params
    assert (best.loc[1, "estimator"].predict(X) == ref.best_estimator_.predict(X)).all()
    with pytest.raises(ValueError, match="refit must be 'best', 'all'"):
        compare_heads(X, y, heads, cv=3, refit="winner")


def test_a_forest_refit_on_every_core_hands_back_its_own_n_jobs(wide):
    X, y = wide
    board = compare_heads(X, y, {"rf": default_heads()["random_forest"]}, cv=3, n_jobs=2)
    forest = board.loc[1, "estimator"].named_steps["clf"]
    assert forest.n_jobs is None
    serial = RandomForestClassifier(n_estimators=200, random_state=0, max_features=board.loc[1, "params"]
                                    ["clf__max_features"]).fit(X, y)
    assert (forest.predict_proba(X) == serial.predict_proba(X)).all()


def _digit_images(n):
    d = load_digits()
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.choice(np.flatnonzero(d.target == c), n // 10, replace=False) for c in range(10)])
    imgs = np.repeat(np.repeat((d.images[idx] / 16 * 255).astype(np.uint8), 28, 1), 28, 2)
    return list(np.stack([255 - imgs] * 3, axis=-1)), d.target[idx]


@pytest.mark.slow
@pytest.mark.parametrize("data", ["hymenoptera", "digits"])
def test_default_heads_on_real_features_agree_with_grid_search(data):
    """The shipped network's pooled vectors: every default head's best score within 0.002 of a plain
    GridSearchCV's, with the same best parameters."""
    from deepfeat import ImageEmbedder, load_image_folder

    if data == "hymenoptera":
        if not HYMENOPTERA.is_dir():
            pytest.skip(f"needs the photos in {HYMENOPTERA}")
        df = load_image_folder(HYMENOPTERA / "train")
        df = df[~df["path"].str.endswith(".gif")]
        images, y = list(df["path"]), df["label"].to_numpy()
    else:  # ten classes, scikit-learn's digits drawn as 224 px images
        images, y = _digit_images(300)
    X = ImageEmbedder(progress=False).fit_transform(images)
    folds = list(stratified_cv(y, 5, 0).split(X, y))
    found = _fast(default_heads(), X, y, folds)
    for name, (est, grid) in default_heads().items():
        ref = _plain(est, grid, X, y, folds)
        got = found[name]
        best = int(np.argmin(ref["rank_test_score"]))
        assert str(got.params[got.best_index]) == str(ref["params"][best]), name
        assert abs(got.mean_test_score[got.best_index] - ref["mean_test_score"][best]) <= 0.002, name
