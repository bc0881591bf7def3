"""Classical heads on image features: grid search, leaderboard, saved pipelines, prediction.

The features are computed once (and cached by :class:`~deepfeat.ImageEmbedder`);
each head is then grid-searched with stratified cross-validation on the feature
matrix, which is exactly what a ``GridSearchCV`` over
``Pipeline([("embed", ImageEmbedder()), ...head])`` computes, since the
embedder learns nothing from the training folds. The winner is joined to the
fitted embedder into one ``Pipeline`` that takes image paths.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import time
import warnings
from numbers import Integral
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, clone
from sklearn.ensemble import BaseEnsemble, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import SVC, LinearSVC
from threadpoolctl import threadpool_limits

from .embedder import ImageEmbedder
from .search import search_heads, worker_count

__all__ = [
    "default_heads",
    "compare_heads",
    "format_leaderboard",
    "stratified_cv",
    "make_image_pipeline",
    "confusion_table",
    "unseen_classes_message",
    "save_model",
    "load_model",
    "predict_paths",
]

logger = logging.getLogger(__name__)


def default_heads(random_state: int = 0) -> dict[str, tuple[Pipeline, dict]]:
    """The classical heads ``deepfeat classify`` compares, with their grids.

    Each head is a ``Pipeline`` of a scaling step named ``"scale"`` (where the
    model needs one) and a classifier named ``"clf"``, so grid keys read
    ``"clf__C"``. The grids are small on purpose: on a few hundred images the
    whole comparison takes seconds to tens of seconds on two cores.

    =================  ===========================================  ============================
    name               pipeline                                     grid
    =================  ===========================================  ============================
    ``logreg``         StandardScaler, LogisticRegression(tol 1e-8) C in 0.01, 0.1, 1, 10
    ``linear_svm``     StandardScaler, LinearSVC (tol 1e-3)         C in 1e-4, 1e-3, 1e-2
    ``rbf_svm``        StandardScaler or Normalizer, SVC(rbf)       scaler x C in 1, 10, 100
    ``random_forest``  RandomForestClassifier (200 trees)           max_features sqrt, log2
    ``knn``            Normalizer, KNeighborsClassifier             k in 5, 9, 15 x weights
    =================  ===========================================  ============================

    Parameters
    ----------
    random_state : int, default=0
        Seed of the heads that draw random numbers (random forest).

    Returns
    -------
    dict of str to (Pipeline, dict)
        A new dict of unfitted estimators on every call; change it freely.

    Examples
    --------
    >>> from deepfeat.classify import default_heads
    >>> heads = default_heads()
    >>> list(heads)
    ['logreg', 'linear_svm', 'rbf_svm', 'random_forest', 'knn']
    >>> heads["logreg"][1]
    {'clf__C': [0.01, 0.1, 1.0, 10.0]}
    """
    return {
        "logreg": (
            # tol 1e-8: at scikit-learn's 1e-4 (and on some folds at 1e-6) a cold lbfgs stops short of
            # the optimum: its predictions at C >= 1 differed from the optimum's on up to 3.6 % of the
            # rows. The warm-started path of deepfeat.search reaches it at no extra cost
            Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(tol=1e-8, max_iter=5000))]),
            {"clf__C": [0.01, 0.1, 1.0, 10.0]},
        ),
        "linear_svm": (
            # tol 1e-3 and no C = 0.1: the dual solver's slowest fits, which never won here
            # (benchmarks/RESULTS.md: the search 2.3x faster, the same choice)
            Pipeline([("scale", StandardScaler()), ("clf", LinearSVC(tol=1e-3, max_iter=2000))]),
            {"clf__C": [1e-4, 1e-3, 1e-2]},
        ),
        # gamma="scale" adapts to the feature scale; which scaler suits the
        # rbf kernel depends on the layer, so the grid lets the data decide
        "rbf_svm": (
            Pipeline([("scale", StandardScaler()), ("clf", SVC(kernel="rbf"))]),
            {"scale": [StandardScaler(), Normalizer()], "clf__C": [1.0, 10.0, 100.0]},
        ),
        "random_forest": (
            Pipeline([("clf", RandomForestClassifier(n_estimators=200, random_state=random_state))]),
            {"clf__max_features": ["sqrt", "log2"]},
        ),
        # unit-length rows make euclidean neighbours cosine neighbours, the
        # usual metric for CNN features
        "knn": (
            Pipeline([("scale", Normalizer()), ("clf", KNeighborsClassifier())]),
            {"clf__n_neighbors": [5, 9, 15], "clf__weights": ["uniform", "distance"]},
        ),
    }


def stratified_cv(y, cv: int = 5, random_state: int | None = 0) -> StratifiedKFold:
    """A shuffled ``StratifiedKFold`` with as many folds as the rarest class allows.

    Parameters
    ----------
    y : array-like of shape (n_samples,)
        Class labels.
    cv : int, default=5
        Folds wanted; lowered to the size of the smallest class.
    random_state : int or None, default=0
        Seed of the shuffle.

    Returns
    -------
    sklearn.model_selection.StratifiedKFold

    Raises
    ------
    ValueError
        If there are fewer than two classes, or a class has a single sample.

    Examples
    --------
    >>> from deepfeat.classify import stratified_cv
    >>> stratified_cv(["a"] * 3 + ["b"] * 10, cv=5).get_n_splits()
    3
    """
    if not isinstance(cv, Integral) or cv < 2:
        raise ValueError(f"cv must be an integer >= 2 (the number of folds); got {cv!r}.")
    counts = pd.Series(np.asarray(y)).value_counts()
    if len(counts) < 2:
        raise ValueError(
            f"Classification needs at least 2 classes; got {len(counts)} ({list(counts.index)!r}). "
            "Check the labels (for a folder: one sub-folder per class)."
        )
    n_splits = min(int(cv), int(counts.min()))
    if n_splits < 2:
        rare = list(counts[counts < 2].index)
        raise ValueError(
            f"Every class needs at least 2 samples for cross-validation; {rare!r} has 1. "
            "Add images of that class or drop it."
        )
    if n_splits < cv:
        logger.warning("using %d CV folds instead of %d: the smallest class has %d samples", n_splits, cv, n_splits)
    return StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=random_state)


def _check_heads(heads) -> dict[str, tuple[BaseEstimator, Any]]:
    if heads is None:
        return default_heads()
    if not isinstance(heads, Mapping) or not heads:
        raise ValueError(
            "heads must be a non-empty dict of name -> (estimator, param_grid) or name -> estimator; "
            f"got {heads!r}. Start from deepfeat.classify.default_heads()."
        )
    out = {}
    for name, head in heads.items():
        if isinstance(head, tuple) and len(head) == 2:
            est, grid = head
        else:
            est, grid = head, {}
        if not hasattr(est, "fit"):
            raise ValueError(f"Head {name!r} is {est!r}, which has no fit method; give an estimator.")
        out[str(name)] = (est, grid if grid is not None else {})
    return out


def compare_heads(
    X,
    y,
    heads: Mapping[str, Any] | None = None,
    *,
    cv: int | Any = 5,
    scoring: str = "accuracy",
    n_jobs: int | None = None,
    random_state: int | None = 0,
    refit: bool | str = "best",
    progress: bool = False,
) -> pd.DataFrame:
    """Grid-search several heads on one feature matrix and rank them.

    Every head is searched with the same stratified folds, so the scores are
    comparable. The table is a leaderboard: best mean score first.

    The scores, the chosen parameters and the refitted estimator are those of
    a ``GridSearchCV`` per head with these folds; the search takes exact
    shortcuts to them (:mod:`deepfeat.search`: the scaling once per fold, the
    row space of the fold for L2-penalised linear heads, a warm-started
    ``C`` path, kernel and distance matrices once per fold, the fits on every
    core).

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        Features, e.g. ``ImageEmbedder().fit_transform(paths)``. Rows with NaN
        (images that failed with ``on_error="skip"``) must be dropped first.
    y : array-like of shape (n_samples,)
        Class labels.
    heads : dict, optional
        ``name -> (estimator, param_grid)`` or ``name -> estimator`` (no
        grid). ``None`` uses :func:`default_heads`.
    cv : int or CV splitter, default=5
        Number of stratified, shuffled folds (lowered to the smallest class
        size), any scikit-learn splitter, or an iterable of (train, test)
        index arrays.
    scoring : str, default="accuracy"
        A scikit-learn scorer name (``"balanced_accuracy"``, ``"f1_macro"``...).
    n_jobs : int or None, default=None
        Worker threads for the (head, fold) fits; ``None`` or ``-1``: one per
        core this process may use, ``1``: one after another.
    random_state : int or None, default=0
        Seed of the fold shuffle.
    refit : {"best", "all"} or bool, default="best"
        Refit the best parameters on all of ``X`` (column ``estimator``):
        ``"best"`` only the winning head's, ``"all"`` (or ``True``) every
        head's, ``False`` none.
    progress : bool, default=False
        A tqdm bar over the heads, showing each head's search as it runs
        (only on a terminal); each finished head is also logged.

    Returns
    -------
    pandas.DataFrame
        One row per head, best first, indexed by rank (1 = best), with columns
        ``head``, ``mean_test_score``, ``std_test_score`` (over the folds, for
        the head's best parameters), ``mean_fit_time`` (seconds per fit, same
        candidate), ``search_time`` (seconds for the whole grid), ``params``
        (best parameters) and ``estimator`` (the refitted best estimator, or
        None). ``search_time`` is the seconds of work on that head's fits,
        summed over the workers. ``df.attrs`` holds ``scoring``, ``n_splits``,
        ``search_seconds`` (wall time of all the searches), ``n_jobs`` (the
        workers), ``refit_seconds`` and ``split_test_scores`` (head -> its
        score on each fold, for its best parameters; empty if it failed).

    See Also
    --------
    default_heads : the heads compared when none are given.
    make_image_pipeline : join the winner to the embedder.

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from deepfeat.classify import compare_heads, default_heads
    >>> X, y = load_iris(return_X_y=True)
    >>> heads = {k: v for k, v in default_heads().items() if k in ("logreg", "knn")}
    >>> board = compare_heads(X, y, heads, cv=3)
    >>> board[["head", "mean_test_score"]].round(2).to_dict("list")
    {'head': ['knn', 'logreg'], 'mean_test_score': [0.98, 0.97]}
    >>> board.loc[1, "estimator"].predict(X[:1])
    array([0])
    """
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim != 2:
        raise ValueError(f"X must be a 2-D feature matrix; got shape {X.shape}.")
    if len(X) != len(y):
        raise ValueError(f"X has {len(X)} rows but y has {len(y)} labels; they must match.")
    if np.issubdtype(X.dtype, np.floating) and np.isnan(X).any():
        bad = np.flatnonzero(np.isnan(X).any(axis=1))
        raise ValueError(
            f"X has NaN in {len(bad)} rows (first: {bad[:5].tolist()}), usually images that failed to "
            "decode with on_error='skip'. Drop them first: keep = ~np.isnan(X).any(axis=1)."
        )
    if isinstance(cv, Integral):
        folds = list(stratified_cv(y, int(cv), random_state).split(X, y))
    elif hasattr(cv, "split"):
        folds = list(cv.split(X, y))
    else:  # an iterable of (train, test) index arrays, as GridSearchCV takes
        folds = [(np.asarray(tr), np.asarray(te)) for tr, te in cv]  # type: ignore[union-attr]
    smallest_fold = min(len(train) for train, _ in folds)
    checked = {name: (est, _fit_grid(grid, smallest_fold)) for name, (est, grid) in _check_heads(heads).items()}
    if refit not in (True, False, "best", "all"):
        raise ValueError(f"refit must be 'best', 'all', True (= 'all') or False; got {refit!r}.")
    bar = None
    if progress and sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=0, unit="fit", desc="grid search")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*non-finite.*", category=UserWarning)
        found = search_heads(checked, X, y, folds, scoring=scoring, n_jobs=n_jobs,
                             progress=None if bar is None else _bar_callback(bar))
    wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    rows = []
    for name, result in found.items():
        best = result.best_index
        if best is None:
            reason = result.error or "ValueError: every candidate failed to fit"
            logger.warning("%s could not be fitted: %s", name, reason)
            rows.append({"head": name, "mean_test_score": np.nan, "std_test_score": np.nan,
                         "mean_fit_time": np.nan, "search_time": result.seconds,
                         "params": {"failed": reason}, "estimator": None})
            continue
        rows.append(
            {
                "head": name,
                "mean_test_score": float(result.mean_test_score[best]),
                "std_test_score": float(result.std_test_score[best]),
                "mean_fit_time": float(result.fit_times[best].mean()),
                "search_time": result.seconds,
                "params": result.params[best],
                "estimator": None,
            }
        )
        logger.info("%s: %s %.4f (%s) in %.1f s", name, scoring, rows[-1]["mean_test_score"], result.params[best],
                    result.seconds)
    board = pd.DataFrame(rows)
    # ties go to the steadier head, then by name: the order never depends on timing noise;
    # heads that could not be fitted come last
    board = board.sort_values(
        ["mean_test_score", "std_test_score", "head"], ascending=[False, True, True], kind="stable",
        na_position="last",
    ).reset_index(drop=True)
    board.index = pd.RangeIndex(1, len(board) + 1, name="rank")
    t_refit = time.perf_counter()
    wanted = [] if refit is False else board.index[board["mean_test_score"].notna()]
    for rank in (wanted if refit in (True, "all") else wanted[:1]):
        name = board.at[rank, "head"]
        board.at[rank, "estimator"] = _refit(checked[name][0], board.at[rank, "params"], X, y, n_jobs)
    # each head's score on each fold, for its best parameters (plain lists: pandas compares attrs)
    split_scores = {name: ([] if result.best_index is None else
                           [float(s) for s in result.split_scores[result.best_index]])
                    for name, result in found.items()}
    board.attrs.update(scoring=scoring, n_splits=len(folds), search_seconds=wall,
                       n_jobs=worker_count(n_jobs),
                       refit_seconds=time.perf_counter() - t_refit, split_test_scores=split_scores)
    return board


def _refit(est: BaseEstimator, params: dict, X: np.ndarray, y: np.ndarray, n_jobs: int | None) -> BaseEstimator:
    """GridSearchCV's refit: a clone with the best parameters, fitted on all the rows.

    A final step that parallelises itself (a forest) fits on every core and is handed back with its
    own ``n_jobs`` as it was: scikit-learn's results do not depend on ``n_jobs``.
    """
    model = clone(est).set_params(**params)
    final = model.steps[-1][1] if isinstance(model, Pipeline) else model
    serial = isinstance(final, BaseEnsemble) and final.get_params(deep=False).get("n_jobs", 0) is None
    workers = worker_count(n_jobs)
    if serial and workers > 1:
        final.set_params(n_jobs=workers)
    with threadpool_limits(limits=1, user_api="blas"):  # as in the search (deepfeat.search)
        model.fit(X, y)
    if serial and workers > 1:
        final.set_params(n_jobs=None)
    return model


def _bar_callback(bar):
    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)
    return update


def _fit_grid(grid: Any, smallest_fold: int) -> Any:
    """The grid with neighbour counts a training fold can hold (kNN needs k <= samples)."""
    if isinstance(grid, (list, tuple)):  # GridSearchCV also takes a list of grids
        return [_fit_grid(g, smallest_fold) for g in grid]
    out = {}
    for key, values in dict(grid).items():
        if key.split("__")[-1] == "n_neighbors":
            fitting = [v for v in values if v <= smallest_fold]
            values = fitting or [max(1, smallest_fold)]
        out[key] = list(values)
    return out


def format_leaderboard(board: pd.DataFrame) -> str:
    """Render :func:`compare_heads` output as a plain-text table.

    Parameters
    ----------
    board : pandas.DataFrame
        The leaderboard.

    Returns
    -------
    str

    Examples
    --------
    >>> import pandas as pd
    >>> from deepfeat.classify import format_leaderboard
    >>> board = pd.DataFrame({"head": ["logreg"], "mean_test_score": [0.9512], "std_test_score": [0.02],
    ...                       "mean_fit_time": [0.31], "params": [{"clf__C": 0.1}]},
    ...                      index=pd.RangeIndex(1, 2, name="rank"))
    >>> print(format_leaderboard(board))
    rank  head    accuracy       fit time  best parameters
       1  logreg  0.951 ± 0.020  0.31 s    clf__C=0.1
    """
    metric = board.attrs.get("scoring", "accuracy")
    table = pd.DataFrame(
        {
            "rank": board.index,
            "head": board["head"].to_numpy(),
            metric: [f"{m:.3f} ± {s:.3f}" if m == m else "failed"
                     for m, s in zip(board["mean_test_score"], board["std_test_score"])],
            "fit time": [f"{t:.2f} s" if t == t else "-" for t in board["mean_fit_time"]],
            **({"search": [f"{t:.1f} s" for t in board["search_time"]]} if "search_time" in board else {}),
            "best parameters": [_format_params(p) for p in board["params"]],
        }
    )
    lines = []
    widths = {c: max(len(str(c)), *(len(str(v)) for v in table[c])) for c in table.columns}
    lines.append("  ".join(str(c).ljust(widths[c]) if c != "rank" else str(c) for c in table.columns).rstrip())
    for _, row in table.iterrows():
        cells = [str(row["rank"]).rjust(widths["rank"])]
        cells += [str(row[c]).ljust(widths[c]) for c in table.columns[1:]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _format_params(params: Mapping[str, Any]) -> str:
    def short(v):
        if isinstance(v, BaseEstimator):
            return type(v).__name__
        return repr(v) if isinstance(v, str) else str(v)

    return ", ".join(f"{k}={short(v)}" for k, v in params.items())


def make_image_pipeline(embedder: ImageEmbedder, head: BaseEstimator) -> Pipeline:
    """Join a fitted embedder and a head fitted on its features into one Pipeline.

    The result takes image paths (or anything the embedder takes) in
    ``predict``; since the embedder learns nothing from data, it equals a
    ``Pipeline`` fitted end to end. A head that is itself a ``Pipeline`` is
    flattened, so the steps are ``embed``, then the head's own.

    Parameters
    ----------
    embedder : ImageEmbedder
        Fitted.
    head : estimator
        Fitted on ``embedder.transform(...)`` output.

    Returns
    -------
    sklearn.pipeline.Pipeline

    Examples
    --------
    >>> from sklearn.datasets import load_sample_images
    >>> from sklearn.linear_model import LogisticRegression
    >>> from deepfeat import ImageEmbedder
    >>> from deepfeat.classify import make_image_pipeline
    >>> photos = list(load_sample_images().images)
    >>> emb = ImageEmbedder(progress=False).fit()
    >>> head = LogisticRegression().fit(emb.transform(photos), ["china", "flower"])
    >>> pipe = make_image_pipeline(emb, head)
    >>> [name for name, _ in pipe.steps], pipe.predict(photos).tolist()
    (['embed', 'clf'], ['china', 'flower'])
    """
    if not isinstance(embedder, ImageEmbedder) or not hasattr(embedder, "layers_"):
        raise ValueError(f"embedder must be a fitted ImageEmbedder; got {embedder!r}. Call .fit() first.")
    steps = list(head.steps) if isinstance(head, Pipeline) else [("clf", head)]
    if any(name == "embed" for name, _ in steps):
        raise ValueError("The head already has a step named 'embed'; rename it.")
    return Pipeline([("embed", embedder)] + steps)


def unseen_classes_message(y_true, trained: Sequence) -> str | None:
    """Say which true classes a predictor never saw in training, or ``None``.

    Such a class's images can only be mistakes: the head has no output for it.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        True labels of the images scored.
    trained : sequence
        The classes the predictor was trained on (its ``classes_``).

    Returns
    -------
    str or None

    Examples
    --------
    >>> from deepfeat.classify import unseen_classes_message
    >>> unseen_classes_message(["ant", "wasp", "wasp"], ["ant", "bee"])
    "test class 'wasp' (2 images) never appears in training: the model cannot predict it, so every one of its images counts as a mistake"
    """
    known = {str(c) for c in trained}
    truth = pd.Series([str(t) for t in np.asarray(y_true, dtype=object)])
    counts = truth[~truth.isin(known)].value_counts().sort_index()
    if counts.empty:
        return None
    named = ", ".join(f"{c!r} ({n} image{'s' if n != 1 else ''})" for c, n in counts.items())
    one = len(counts) == 1
    return (f"test class{'' if one else 'es'} {named} never appear{'s' if one else ''} in training: the model "
            f"cannot predict {'it' if one else 'them'}, so every one of {'its' if one else 'their'} images "
            "counts as a mistake")


def confusion_table(y_true, y_pred, labels: Sequence | None = None, *,
                    trained: Sequence | None = None) -> pd.DataFrame:
    """Confusion matrix as a labelled DataFrame (rows: true class, columns: predicted).

    Parameters
    ----------
    y_true, y_pred : array-like of shape (n_samples,)
        True and predicted labels.
    labels : sequence, optional
        Class order; default: sorted union of both.
    trained : sequence, optional
        The classes the predictor was trained on: a true class outside them
        gets a ``UserWarning`` (its row is all mistakes, whatever the head).

    Returns
    -------
    pandas.DataFrame

    Examples
    --------
    >>> from deepfeat.classify import confusion_table
    >>> cm = confusion_table(["ant", "bee", "bee"], ["ant", "ant", "bee"])
    >>> cm.to_dict("index")  # rows: true class
    {'ant': {'ant': 1, 'bee': 0}, 'bee': {'ant': 1, 'bee': 1}}
    """
    if trained is not None and (message := unseen_classes_message(y_true, trained)):
        warnings.warn(message, UserWarning, stacklevel=2)
    if labels is None:
        labels = list(np.unique(np.concatenate([np.asarray(y_true), np.asarray(y_pred)])))
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    return pd.DataFrame(
        cm, index=pd.Index(labels, name="true"), columns=pd.Index(labels, name="predicted")
    )


def save_model(pipeline: Pipeline, path: str | os.PathLike) -> None:
    """Save an image pipeline: ``*.skops`` with skops (safe to share), else joblib (a pickle).

    The ONNX Runtime session is never saved.

    Parameters
    ----------
    pipeline : Pipeline
        From :func:`make_image_pipeline` (or any fitted Pipeline whose first
        step is an :class:`ImageEmbedder`).
    path : str or path-like
        Target file: ``*.skops`` (needs the ``skops`` extra) or ``*.joblib``;
        parent folders are created.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from sklearn.datasets import load_sample_images
    >>> from sklearn.linear_model import LogisticRegression
    >>> from deepfeat import ImageEmbedder
    >>> from deepfeat.classify import load_model, make_image_pipeline, save_model
    >>> photos = list(load_sample_images().images)
    >>> emb = ImageEmbedder(progress=False).fit()
    >>> pipe = make_image_pipeline(emb, LogisticRegression().fit(emb.transform(photos), [0, 1]))
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "model.joblib"
    >>> save_model(pipe, path)
    >>> load_model(path).predict(photos).tolist()
    [0, 1]
    """
    import joblib

    _check_image_pipeline(pipeline, "pipeline")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".skops"):
        _skops().dump(pipeline, path)
    else:
        joblib.dump(pipeline, path)


#: modules whose estimator classes a ``.skops`` model may hold; anything else is refused by :func:`load_model`
TRUSTED_MODULES = ("deepfeat.", "sklearn.")
#: other classes a deepfeat model legitimately holds (a ``Path`` given as ``model=`` or ``cache=``)
TRUSTED_CLASSES = frozenset({"pathlib.Path", "pathlib.PosixPath", "pathlib.WindowsPath"})
#: scikit-learn's own classes that are not estimators but that fitted heads hold (a forest's trees, a
#: neighbour search's tree and distance metric), by their base classes; each must still resolve to a class
#: defined in the scikit-learn module named
SKLEARN_STATE_BASES = (
    ("sklearn.tree._tree", "Tree"), ("sklearn.neighbors._kd_tree", "BinaryTree64"),
    ("sklearn.neighbors._ball_tree", "BinaryTree64"), ("sklearn.metrics._dist_metrics", "DistanceMetric"),
)


#: module path parts whose classes no saved model holds: test suites and opt-in experimental switches
_UNTRUSTED_PARTS = frozenset({"tests", "testing", "experimental", "conftest", "benchmarks", "externals"})


def _state_bases() -> tuple[type, ...]:
    import importlib

    return tuple(getattr(importlib.import_module(m), c) for m, c in SKLEARN_STATE_BASES
                 if hasattr(importlib.import_module(m), c))


def _trusted_type(name: str) -> bool:
    """Whether ``name`` (``module.Class`` as skops lists it) is a class we let skops rebuild.

    A prefix is not enough: a scikit-learn module may import ``subprocess.check_output`` under its own
    name, and skops calls what it finds there. So the name must resolve to a class *defined* in that
    module (``cls.__module__`` is the module named) and be an estimator; functions are never trusted.
    """
    import importlib

    if name in TRUSTED_CLASSES:
        return True
    module, _, attr = name.rpartition(".")
    parts = module.split(".")
    if not module.startswith(TRUSTED_MODULES) or any(
            (p.startswith("_") and p.endswith("_")) or p in _UNTRUSTED_PARTS or p.startswith("_test") for p in parts):
        return False  # never import an arbitrary module, nor deepfeat.__main__ (it runs the CLI)
    try:
        # import only the public package a user imports (sklearn.tree, deepfeat); the module named must then be
        # loaded already: naming a module in a file never imports it (enable_iterative_imputer patches sklearn)
        importlib.import_module(".".join(parts[:2]))
    except ImportError:
        return False
    obj = getattr(sys.modules.get(module), attr, None)
    if not (isinstance(obj, type) and obj.__module__ == module):
        return False
    return module.startswith("sklearn.") and issubclass(obj, _state_bases()) or issubclass(obj, BaseEstimator)


def _skops():
    try:
        import skops.io as sio
    except ImportError as exc:
        raise ImportError(
            "Saving and loading .skops models needs skops: pip install 'deepfeat[skops]' "
            "(or use a .joblib file, which is a pickle: load only files you trust)."
        ) from exc
    return sio


def load_model(path: str | os.PathLike, *, cache: Any = "saved") -> Pipeline:
    """Load a pipeline saved by :func:`save_model` or ``deepfeat classify``.

    ``.skops`` files (skops, scikit-learn's secure persistence) are safe to
    take from others: only deepfeat's and scikit-learn's types (and the
    NumPy/SciPy containers skops itself trusts) are rebuilt, and a file
    holding any other type or function is refused, naming it.
    ``.joblib`` files are pickles: load only files you trust.

    Nothing the file holds decides what is written to a feature cache, nor
    where: the embedder is fitted again on this machine from its parameters
    and the model file found here, and what that derives (the model's
    sha256 and preprocessing, the layers, their shapes and the cache
    fingerprints) must equal what the file says, or the file is refused. A
    cache *folder* stored in the file is not used unless you pass it again.

    Parameters
    ----------
    path : str or path-like
    cache : bool, str, path-like, None or "saved", default="saved"
        The embedder's feature cache on this machine. ``"saved"`` keeps the
        file's ``True`` (this machine's default folder) or ``None``/``False``
        (no cache); a folder path stored in the file becomes ``True``, with a
        warning naming it. Anything else is used as the ``cache`` parameter.

    Returns
    -------
    Pipeline
        First step an :class:`ImageEmbedder`, fitted on this machine; its
        session is opened on first use.

    Examples
    --------
    See :func:`save_model`.
    """
    import joblib

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No saved model at {path!r}; create one with `deepfeat classify TRAIN -o {path}`.")
    if path.endswith(".skops"):
        sio = _skops()
        _check_skops_archive(path)
        try:
            types = sio.get_untrusted_types(file=path)
        except Exception as exc:  # a forged or damaged schema: one line, not skops' traceback
            raise ValueError(f"The model file {path!r} is not a readable .skops file "
                             f"({type(exc).__name__}: {_last_line(exc)}); it was not loaded.") from None
        refused = sorted(t for t in types if not _trusted_type(t))
        if refused:
            raise ValueError(
                f"The model file {path!r} holds types that are neither deepfeat's nor scikit-learn's: {refused}. "
                "It was not loaded. If you trust its author, load it with skops.io.load(path, trusted=[...]) yourself."
            )
        try:
            obj = sio.load(path, trusted=types)
        except Exception as exc:
            raise ValueError(f"The model file {path!r} could not be loaded by skops "
                             f"({type(exc).__name__}: {_last_line(exc)}); it was not loaded.") from None
    else:
        obj = joblib.load(path)
    _check_image_pipeline(obj, path)
    _check_predictor(obj, path)
    name, stored = obj.steps[0]
    fresh = _derive_embedder(stored, path, cache)
    n_in = getattr(obj[1:], "n_features_in_", None)
    if n_in is not None and n_in != fresh.n_features_out_:
        raise ValueError(f"The model file {path!r} holds a head fitted on {n_in} features, but its embedder gives "
                         f"{fresh.n_features_out_}; it was not loaded. Retrain with `deepfeat classify`.")
    obj.steps[0] = (name, fresh)
    return obj


#: fitted fields that ``fit`` derives from the parameters and the model file; a loaded model's must match
_DERIVED = ("model_sha256_", "layers_", "poolings_", "output_shapes_", "output_dims_", "n_features_out_",
            "cache_fingerprint_", "_scope")
#: the parts of ``spec_`` that change a vector (the rest, a description or mirrors, may differ between versions)
_DERIVED_SPEC = ("input_size", "resize_size", "interpolation", "mean", "std", "channel_order")


def _derive_embedder(stored: ImageEmbedder, path: str, cache: Any) -> ImageEmbedder:
    """A fresh embedder fitted here with the stored one's parameters, refused if it derives other fields."""
    params = stored.get_params(deep=False)
    if isinstance(cache, str) and cache == "saved":
        cache = params.get("cache")
        if not (cache is None or isinstance(cache, (bool, np.bool_))):
            logger.warning("The model file %r names the feature cache folder %r; it is not used without asking. "
                           "Using this machine's default cache folder; pass cache= (or --cache-dir) to choose one.",
                           path, os.fspath(cache))
            cache = True
    providers = params.get("providers")
    if providers is not None and not isinstance(providers, str):
        # provider options can name folders (TensorRT's engine cache): keep the file's names, never its options
        params["providers"] = [p[0] if isinstance(p, (tuple, list)) else p for p in providers]
    fresh = ImageEmbedder(**{**params, "cache": cache})
    try:
        fresh.fit()
    except Exception as exc:
        raise ValueError(f"The model file {path!r} names an embedder that cannot be fitted on this machine "
                         f"({type(exc).__name__}: {_last_line(exc)}); it was not loaded.") from None
    if hasattr(stored, "layers_"):  # a fitted embedder: what the head was trained on must be what runs here
        differ = [k for k in _DERIVED if hasattr(stored, k) and _plain(getattr(stored, k)) != _plain(getattr(fresh, k))]
        spec = getattr(stored, "spec_", None)
        differ += [f"spec_.{k}" for k in _DERIVED_SPEC
                   if spec is not None and _plain(_spec_field(spec, k)) != _plain(getattr(fresh.spec_, k))]
        plan = getattr(stored, "_plan", None)
        if plan is not None and _plain([_plan_fingerprint(la) for la in plan]) != _plain(
                [la.fingerprint for la in fresh._plan]):
            differ.append("_plan")
        if differ:
            raise ValueError(
                f"The model file {path!r} does not match its own parameters on this machine: {sorted(differ)} "
                f"differ from what fitting model={params.get('model')!r} here derives (model sha256 here "
                f"{fresh.model_sha256_[:12]}...). The file was edited, or the model file changed since it was "
                "saved; it was not loaded. Retrain with `deepfeat classify`."
            )
    return fresh


def _spec_field(spec: Any, key: str) -> Any:
    return spec.get(key) if isinstance(spec, Mapping) else getattr(spec, key, None)


def _plan_fingerprint(layer: Any) -> Any:
    return layer.get("fingerprint") if isinstance(layer, Mapping) else getattr(layer, "fingerprint", None)


def _plain(value: Any) -> Any:
    """Tuples and lists, numpy scalars and Python numbers compare alike."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _check_predictor(obj: Pipeline, where: str) -> None:
    last = obj.steps[-1][1]
    if len(obj.steps) < 2 or not hasattr(last, "predict"):
        raise ValueError(
            f"{where!r} is an image pipeline without a classifier: its last step is "
            f"{type(last).__name__}, which has no predict(). Save a pipeline that ends in a fitted head "
            "(deepfeat classify, or deepfeat.classify.make_image_pipeline(embedder, head))."
        )


#: the largest schema.json and the largest other member a ``.skops`` file may hold (uncompressed bytes):
#: a head on a few hundred thousand 1280-d rows (kNN keeps them all) stays well below
MAX_SKOPS_SCHEMA_BYTES = 64 << 20
MAX_SKOPS_MEMBER_BYTES = 1 << 30
#: a member larger than 16 MiB that compresses better than this is a decompression bomb, not a model
MAX_SKOPS_RATIO = 200


def _last_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[-1][:200]


def _check_skops_archive(path: str) -> None:
    """Refuse, from the zip directory alone (nothing is decompressed), a ``.skops`` file too large to be a model."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"The model file {path!r} is not a .skops file (not a readable zip archive: "
                         f"{_last_line(exc)}); it was not loaded.") from None
    for info in members:
        limit = MAX_SKOPS_SCHEMA_BYTES if info.filename == "schema.json" else MAX_SKOPS_MEMBER_BYTES
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > limit or (info.file_size > 16 << 20 and ratio > MAX_SKOPS_RATIO):
            raise ValueError(
                f"The model file {path!r} holds {info.filename!r} of {info.file_size} bytes uncompressed "
                f"({ratio:.0f}x its stored size; at most {limit} bytes and {MAX_SKOPS_RATIO}x are accepted): "
                "it was not loaded."
            )


def _check_image_pipeline(obj, where: str) -> None:
    if not (isinstance(obj, Pipeline) and isinstance(obj.steps[0][1], ImageEmbedder)):
        raise ValueError(
            f"{where!r} is not an image pipeline: expected a scikit-learn Pipeline whose first step is an "
            f"ImageEmbedder, got {type(obj).__name__}. Build one with deepfeat.classify.make_image_pipeline."
        )


def predict_paths(pipeline: Pipeline, paths: Sequence) -> pd.DataFrame:
    """Predict a class for each image, keeping going past unreadable files.

    Parameters
    ----------
    pipeline : Pipeline
        An image pipeline (:func:`load_model`, :func:`make_image_pipeline`).
    paths : sequence
        Image paths (or anything the embedder takes).

    Returns
    -------
    pandas.DataFrame
        One row per input, in order: ``path``, ``prediction`` (missing where
        the image could not be read), ``probability`` of the predicted class
        (NaN when the head has no ``predict_proba``) and ``error`` (the reason
        an image failed, else missing). Test with ``pandas.isna``.

    Examples
    --------
    >>> from sklearn.datasets import load_sample_images
    >>> from sklearn.linear_model import LogisticRegression
    >>> from deepfeat import ImageEmbedder
    >>> from deepfeat.classify import make_image_pipeline, predict_paths
    >>> photos = list(load_sample_images().images)
    >>> emb = ImageEmbedder(progress=False).fit()
    >>> pipe = make_image_pipeline(emb, LogisticRegression().fit(emb.transform(photos), ["china", "flower"]))
    >>> predict_paths(pipe, photos)["prediction"].tolist()
    ['china', 'flower']
    """
    _check_image_pipeline(pipeline, "pipeline")
    items = list(paths)
    # a shallow copy (same session) with on_error="skip": one bad file must
    # not stop the batch, and the caller's pipeline stays as it was
    embedder = copy.copy(pipeline.steps[0][1]).set_params(on_error="skip")
    X = embedder.transform(items)
    ok = ~np.isnan(X).any(axis=1)
    rest = pipeline[1:]
    pred = np.full(len(items), None, dtype=object)
    prob = np.full(len(items), np.nan)
    if ok.any():
        pred[ok] = rest.predict(X[ok])
        if hasattr(rest, "predict_proba"):
            proba = rest.predict_proba(X[ok])
            prob[ok] = proba.max(axis=1)
    errors = np.full(len(items), None, dtype=object)
    for pos, reason in zip(embedder.failures_["position"], embedder.failures_["reason"]):
        errors[int(pos)] = reason
    return pd.DataFrame(
        {"path": [str(p) if isinstance(p, (str, os.PathLike)) else f"<{type(p).__name__}>" for p in items],
         "prediction": pred, "probability": prob, "error": errors}
    )
