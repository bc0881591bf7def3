"""Exact shortcuts for grid-searching classical heads on a feature matrix.

:func:`search_heads` computes, for every head and grid candidate, the fold
scores that ``GridSearchCV(head, grid, cv=folds)`` computes, but shares what
the candidates of a fold have in common instead of starting each one cold:

* **The preprocessing once per fold.** Candidates that differ only in the
  final estimator's parameters see the same scaled fold; a ``StandardScaler``
  is fitted once per fold, not once per candidate, and shared by every head
  that uses it.
* **The row space for L2-penalised linear heads.** With fewer training rows
  than features, the optimum of an L2-penalised linear model lies in the span
  of the training rows, so the same problem can be solved on ``Z = A V`` (``V``
  an orthonormal basis of that span, from the fold's linear kernel matrix):
  ``LogisticRegression`` and ``LinearSVC`` on ``n x r`` columns instead of
  ``n x d``, with the same objective, the same iterations and the same
  predictions. liblinear penalises its intercept column, so that column joins
  the span for ``LinearSVC``.
* **A warm-started regularisation path** for ``LogisticRegression``: the
  candidates' ``C`` values, smallest first, each started from the previous
  solution (what ``LogisticRegressionCV`` does).
* **Kernel matrices once per fold**: the RBF (and linear, polynomial,
  sigmoid) kernel of ``SVC`` for every ``C``, and the distance matrix of
  ``KNeighborsClassifier`` for every ``n_neighbors`` and ``weights``, both
  from the fold's linear kernel matrix, through ``kernel="precomputed"`` and
  ``metric="precomputed"``: libsvm and scikit-learn's own neighbour vote do
  the rest.
* **Every fit on the cores.** The (head, fold) tasks run on a pool of
  threads (liblinear, libsvm, the tree builders and BLAS release the GIL),
  with BLAS (and OpenMP) held to one thread per worker so the cores are not
  oversubscribed.

Anything else (random forests, your own estimators) is fitted as it is, on the
shared preprocessed fold. The refit of the best parameters is scikit-learn's
own: ``clone(head).set_params(**best).fit(X, y)``, as ``GridSearchCV`` does.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from joblib import Parallel, delayed
from scipy.sparse import issparse
from sklearn.base import BaseEstimator, clone
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import check_scoring
from sklearn.model_selection import ParameterGrid
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.svm import SVC, LinearSVC
from threadpoolctl import threadpool_limits

__all__ = ["HeadSearch", "search_heads", "available_cores", "worker_count"]

logger = logging.getLogger(__name__)

#: the row-space reduction pays when the training rows are fewer than this share of the features
REDUCE_BELOW = 0.8
#: largest training-fold kernel matrix (float64 bytes) built for SVC or kNN; beyond it they compute their own
MAX_KERNEL_BYTES = 256 * 2**20
#: the narrowest kept eigenvalue share of the fold's kernel matrix for which the row space is used
_EIG_RTOL = 1e-8


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def worker_count(n_jobs: int | None) -> int:
    """Workers for ``n_jobs``: ``None`` or negative means one per available core."""
    return available_cores() if n_jobs is None or n_jobs < 0 else max(1, int(n_jobs))


@dataclass
class HeadSearch:
    """What a grid search of one head found: ``GridSearchCV``'s ``cv_results_`` in short.

    Attributes
    ----------
    params : list of dict
        The candidates, in ``ParameterGrid`` order.
    split_scores : ndarray of shape (n_candidates, n_splits)
        Test score of each candidate on each fold (NaN where its fit failed).
    fit_times : ndarray of shape (n_candidates, n_splits)
        Seconds to fit each candidate on each fold.
    seconds : float
        Seconds of work spent on this head's tasks (summed over workers).
    error : str or None
        ``"Type: message"`` of the last failure, when every candidate failed.
    """

    params: list[dict]
    split_scores: np.ndarray
    fit_times: np.ndarray
    seconds: float = 0.0
    error: str | None = None
    estimator: Any = None

    @property
    def mean_test_score(self) -> np.ndarray:
        # np.average and the population std, as GridSearchCV computes them
        with np.errstate(invalid="ignore"):
            return np.average(self.split_scores, axis=1)

    @property
    def std_test_score(self) -> np.ndarray:
        mean = self.mean_test_score
        return np.sqrt(np.average((self.split_scores - mean[:, None]) ** 2, axis=1))

    @property
    def best_index(self) -> int | None:
        """First candidate with the best mean score (GridSearchCV's rank 1), None if all failed."""
        mean = self.mean_test_score
        finite = np.isfinite(mean)
        if not finite.any():
            return None
        return int(np.flatnonzero(finite & (mean == mean[finite].max()))[0])


@dataclass
class _Candidate:
    index: int
    final: BaseEstimator  # the final step, configured


@dataclass
class _Group:
    """Candidates of one head that share the preprocessing (and so one fold view)."""

    pre: Any  # an unfitted transformer (a Pipeline of the head's leading steps) or None
    pre_key: tuple
    candidates: list[_Candidate] = field(default_factory=list)


def _param_key(value: Any) -> Any:
    """A hashable stand-in for a parameter value, equal for equal estimators."""
    if isinstance(value, BaseEstimator):
        return (type(value).__qualname__, _params_key(value.get_params(deep=False)))
    if isinstance(value, (list, tuple)):
        return tuple(_param_key(v) for v in value)
    if isinstance(value, dict):
        return _params_key(value)
    if isinstance(value, np.ndarray):
        return ("ndarray", value.shape, value.tobytes())
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return value


def _params_key(params: dict) -> tuple:
    return tuple(sorted((k, _param_key(v)) for k, v in params.items()))


def _groups(estimator: BaseEstimator, grid: Any) -> tuple[list[_Group], list[dict]]:
    """Split each candidate into its preprocessing and its final step; group by the preprocessing."""
    candidates = list(ParameterGrid(grid if grid else {}))
    if isinstance(estimator, Pipeline) and len(estimator.steps) > 1:
        final_name = estimator.steps[-1][0]
    else:
        final_name = None
    groups: dict[tuple, _Group] = {}
    for i, params in enumerate(candidates):
        if final_name is None:
            pre, final = None, clone(estimator).set_params(**params)
        else:
            head = clone(estimator).set_params(**params)
            pre, final = head[:-1], head.steps[-1][1]
        key = () if pre is None else tuple(
            (type(step).__qualname__, _params_key(step.get_params(deep=False)) if hasattr(step, "get_params")
             else repr(step)) for _, step in pre.steps
        )
        group = groups.setdefault(key, _Group(pre=pre, pre_key=key))
        group.candidates.append(_Candidate(i, final))
    return list(groups.values()), candidates


class _FoldView:
    """One training/test fold after one preprocessing, with what its candidates share, built on first use.

    Thread-safe: the first task that asks for a matrix builds it, the others wait and reuse it.
    """

    def __init__(self, X, y, train, test, pre):
        self._X, self._train, self._test, self._pre = X, train, test, pre
        self.y_train, self.y_test = y[train], y[test]
        self._lock = threading.RLock()
        self._memo: dict[Any, Any] = {}

    def _once(self, key, build: Callable[[], Any]):
        with self._lock:
            if key not in self._memo:
                self._memo[key] = build()
            return self._memo[key]

    def data(self) -> tuple[np.ndarray, np.ndarray]:
        def build():
            Xtr, Xte = self._X[self._train], self._X[self._test]
            if self._pre is None:
                return Xtr, Xte
            pre = clone(self._pre)
            A, B = pre.fit_transform(Xtr, self.y_train), pre.transform(Xte)
            if issparse(A) or issparse(B):
                return A, B  # fitted as they are: the shortcuts take dense rows only
            return np.asarray(A), np.asarray(B)
        return self._once("data", build)

    def gram(self) -> tuple[np.ndarray, np.ndarray]:
        """Linear kernels in float64: train x train and test x train."""
        def build():
            A, B = self.data()
            A64, B64 = A.astype(np.float64, copy=False), B.astype(np.float64, copy=False)
            return A64 @ A64.T, B64 @ A64.T
        return self._once("gram", build)

    def sq_norms(self) -> tuple[np.ndarray, np.ndarray]:
        def build():
            A, B = self.data()
            return (np.einsum("ij,ij->i", A, A, dtype=np.float64), np.einsum("ij,ij->i", B, B, dtype=np.float64))
        return self._once("sq", build)

    def sq_distances(self) -> tuple[np.ndarray, np.ndarray]:
        def build():
            K, Kt = self.gram()
            a, b = self.sq_norms()
            D = np.maximum(a[:, None] + a[None, :] - 2 * K, 0)
            np.fill_diagonal(D, 0)
            return D, np.maximum(b[:, None] + a[None, :] - 2 * Kt, 0)
        return self._once("sqdist", build)

    def row_space(self, shift: float) -> tuple[np.ndarray, np.ndarray] | None:
        """Coordinates of the rows in an orthonormal basis of their span (with a constant column of value
        ``sqrt(shift)`` appended, when ``shift`` > 0): ``Z @ Z.T`` is the kernel ``A @ A.T + shift``; None when
        the kernel matrix is too ill-conditioned to give them exactly."""
        def build():
            K, Kt = self.gram()
            w, U = np.linalg.eigh(K + shift)
            # eigenvalues at rounding level are no direction (a centred fold loses one); a kept spectrum
            # wider than 1e8 means the kernel matrix cannot resolve the small directions: no shortcut
            keep = w > w[-1] * len(w) * 10 * np.finfo(np.float64).eps
            if not keep.any() or w[keep].min() < w[-1] * _EIG_RTOL:
                return None
            w, U = w[keep][::-1], U[:, keep][:, ::-1]
            root = np.sqrt(w)
            dtype = self.data()[0].dtype
            dtype = dtype if np.issubdtype(dtype, np.floating) else np.float64  # never round to integers
            return (U * root).astype(dtype), ((Kt + shift) @ (U / root)).astype(dtype)
        return self._once(("rows", shift), build)


#: final steps that have a shortcut (the others are fitted as they are, one candidate per task)
_SHORTCUT_TYPES = (LogisticRegression, LinearSVC, SVC, KNeighborsClassifier)


def _n_features(view: _FoldView) -> int:
    return int(view.data()[0].shape[1])


def _dense(view: _FoldView) -> bool:
    A = view.data()[0]
    return isinstance(A, np.ndarray) and A.ndim == 2 and A.dtype.kind in "biuf"


def _reducible_logreg(est: BaseEstimator, view: _FoldView) -> bool:
    if type(est) is not LogisticRegression or not _dense(view):
        return False
    p = est.get_params()
    l2 = p.get("l1_ratio") in (0, 0.0, None) and p.get("penalty") in ("deprecated", "l2")
    return bool(l2 and p["solver"] != "liblinear" and np.isfinite(p["C"]) and not p.get("dual")
                and len(view.y_train) < REDUCE_BELOW * _n_features(view))


def _reducible_linearsvc(est: BaseEstimator, view: _FoldView) -> bool:
    return (type(est) is LinearSVC and _dense(view) and est.get_params()["penalty"] == "l2"
            and len(view.y_train) < REDUCE_BELOW * _n_features(view))


def _kernel_ok(view: _FoldView) -> bool:
    return _dense(view) and len(view.y_train) ** 2 * 8 <= MAX_KERNEL_BYTES


def _svc_kernel(est: SVC, view: _FoldView) -> tuple[np.ndarray, np.ndarray] | None:
    """SVC's kernel matrices from the fold's linear kernel, or None for a kernel we do not rebuild."""
    p = est.get_params()
    kernel = p["kernel"]
    if not isinstance(kernel, str) or kernel not in ("rbf", "linear", "poly", "sigmoid"):
        return None
    A = view.data()[0]
    if isinstance(p["gamma"], str):
        # what libsvm's wrapper resolves: 'scale' = 1 / (n_features * X.var()), 'auto' = 1 / n_features
        var = view._once("var", lambda: float(np.asarray(A, dtype=np.float64).var()))
        gamma = 1.0 / (A.shape[1] * var) if p["gamma"] == "scale" and var != 0 else (
            1.0 if p["gamma"] == "scale" else 1.0 / A.shape[1])
    else:
        gamma = float(p["gamma"])

    def build():
        K, Kt = view.gram()
        if kernel == "linear":
            return K, Kt
        if kernel == "rbf":
            D, Dt = view.sq_distances()
            return np.exp(-gamma * D), np.exp(-gamma * Dt)
        if kernel == "poly":
            return (gamma * K + p["coef0"]) ** p["degree"], (gamma * Kt + p["coef0"]) ** p["degree"]
        return np.tanh(gamma * K + p["coef0"]), np.tanh(gamma * Kt + p["coef0"])

    return view._once(("svc", kernel, gamma, p["coef0"], p["degree"]), build)


def _knn_precomputable(est: BaseEstimator) -> bool:
    if type(est) is not KNeighborsClassifier:
        return False
    p = est.get_params()
    euclid = p["metric"] == "euclidean" or (p["metric"] == "minkowski" and p["p"] == 2)
    return bool(euclid and p["metric_params"] in (None, {}))


def _reason(exc: BaseException) -> str:
    """``Type: last line of the message``: what a leaderboard shows of a failed fit."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[-1][:160]}"


def _fold_task(view: _FoldView, group: _Group, scoring: Any) -> list[tuple[int, float, float, str | None]]:
    """Fit and score every candidate of one group on one fold: (index, score, fit seconds, error)."""
    out: list[tuple[int, float, float, str | None]] = []

    def run(cand: _Candidate, fit: Callable[[], tuple[Any, Any]]):
        t0 = time.perf_counter()
        try:
            model, X_test = fit()
            elapsed = time.perf_counter() - t0
            score = float(check_scoring(model, scoring=scoring)(model, X_test, view.y_test))
            out.append((cand.index, score, elapsed, None))
        except Exception as exc:  # GridSearchCV's error_score=nan: the other candidates still compete
            out.append((cand.index, float("nan"), time.perf_counter() - t0, _reason(exc)))

    try:
        view.data()
    except Exception as exc:  # the preprocessing itself failed: every candidate of the group fails here
        return [(c.index, float("nan"), 0.0, _reason(exc)) for c in group.candidates]

    # the logistic path: candidates equal but for C, smallest C first, each warm-started from the last
    paths: dict[tuple, list[_Candidate]] = {}
    rest = []
    for cand in group.candidates:
        if _reducible_logreg(cand.final, view):
            params = cand.final.get_params()
            paths.setdefault(_params_key({k: v for k, v in params.items() if k != "C"}), []).append(cand)
        else:
            rest.append(cand)
    for path in paths.values():
        path.sort(key=lambda c: c.final.get_params()["C"])
        model = clone(path[0].final).set_params(warm_start=True)  # one model along the path
        for cand in path:
            def fit_logreg(C=cand.final.get_params()["C"], model=model, est=cand.final):
                rows = view.row_space(0.0)
                if rows is None:  # fitted as it is
                    A, B = view.data()
                    return clone(est).fit(A, view.y_train), B
                return model.set_params(C=C).fit(rows[0], view.y_train), rows[1]
            run(cand, fit_logreg)

    for cand in rest:
        est = cand.final
        if _reducible_linearsvc(est, view):
            def fit_svm(est=est):
                p = est.get_params()
                # 'auto' resolves to the dual on the full-width fold (fewer rows than features); Z is
                # about square, so say it
                dual = True if p["dual"] == "auto" else p["dual"]
                shift = float(p["intercept_scaling"]) ** 2 if p["fit_intercept"] else 0.0
                rows = view.row_space(shift)
                if rows is None:
                    A, B = view.data()
                    return clone(est).fit(A, view.y_train), B
                return clone(est).set_params(fit_intercept=False, dual=dual).fit(rows[0], view.y_train), rows[1]
            run(cand, fit_svm)
        elif type(est) is SVC and _kernel_ok(view) and _svc_kernel(est, view) is not None:
            def fit_svc(est=est):
                K, Kt = _svc_kernel(est, view)
                return clone(est).set_params(kernel="precomputed").fit(K, view.y_train), Kt
            run(cand, fit_svc)
        elif _knn_precomputable(est) and _kernel_ok(view):
            def fit_knn(est=est):
                D, Dt = view.sq_distances()
                model = clone(est).set_params(metric="precomputed", p=2, algorithm="brute")
                return model.fit(np.sqrt(D), view.y_train), np.sqrt(Dt)
            run(cand, fit_knn)
        else:
            def fit_plain(est=est):
                A, B = view.data()
                return clone(est).fit(A, view.y_train), B
            run(cand, fit_plain)
    return out


def search_heads(
    heads: dict[str, tuple[BaseEstimator, Any]],
    X: np.ndarray,
    y: np.ndarray,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    scoring: Any = "accuracy",
    n_jobs: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, HeadSearch]:
    """The fold scores of every head's grid, as ``GridSearchCV`` computes them, with exact shortcuts.

    Parameters
    ----------
    heads : dict of str to (estimator, param_grid)
        Each head an estimator (often a ``Pipeline`` whose last step is the
        classifier) and a grid (a dict or list of dicts, or ``{}``).
    X : ndarray of shape (n_samples, n_features)
    y : ndarray of shape (n_samples,)
    folds : sequence of (train, test) index arrays
        The same folds for every head.
    scoring : str or callable, default="accuracy"
    n_jobs : int or None, default=None
        Worker threads; ``None`` or ``-1``: one per core this process may use.
    progress : callable, optional
        Called as ``progress(done, total)`` after each (head, fold) task.

    Returns
    -------
    dict of str to HeadSearch
        In the order of ``heads``; no refit (see :func:`deepfeat.classify.compare_heads`).

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from sklearn.model_selection import StratifiedKFold
    >>> from deepfeat.classify import default_heads
    >>> from deepfeat.search import search_heads
    >>> X, y = load_iris(return_X_y=True)
    >>> folds = list(StratifiedKFold(3, shuffle=True, random_state=0).split(X, y))
    >>> found = search_heads({"logreg": default_heads()["logreg"]}, X, y, folds)
    >>> found["logreg"].params[found["logreg"].best_index]
    {'clf__C': 10.0}
    """
    workers = worker_count(n_jobs)
    plans = {name: _groups(est, grid) for name, (est, grid) in heads.items()}
    views: dict[tuple[int, tuple], _FoldView] = {}
    tasks = []
    # fold-major: the views of a fold are built by its first tasks and dropped after its last
    # fold-major: the views of a fold are built by its first tasks and dropped after its last; inside a
    # fold, the estimators fitted as they are (forests, say: the costly ones) one task each and first, so
    # the cheap shortcut tasks fill the cores at the end
    for f, (train, test) in enumerate(folds):
        shortcut, plain = [], []
        for name, (groups, _) in plans.items():
            for group in groups:
                key = (f, group.pre_key)
                if key not in views:
                    views[key] = _FoldView(X, y, train, test, group.pre)
                fast = [c for c in group.candidates if type(c.final) in _SHORTCUT_TYPES]
                if fast:
                    shortcut.append((name, f, _Group(group.pre, group.pre_key, fast), views[key]))
                plain += [(name, f, _Group(group.pre, group.pre_key, [c]), views[key])
                          for c in group.candidates if type(c.final) not in _SHORTCUT_TYPES]
        tasks += plain + shortcut
    pending = {key: 0 for key in views}
    for _, f, group, _ in tasks:
        pending[(f, group.pre_key)] += 1
    lock = threading.Lock()

    def task(name, f, group, view):
        t0 = time.perf_counter()
        try:
            return name, f, _fold_task(view, group, scoring), time.perf_counter() - t0
        finally:
            with lock:  # free the fold's matrices once no task needs them
                pending[(f, group.pre_key)] -= 1
                if pending[(f, group.pre_key)] == 0:
                    view._memo.clear()

    results = []
    # BLAS at one thread: with OpenBLAS's threads beside the OpenMP threads of scikit-learn's losses, a
    # LogisticRegression fold on 2 cores ran 7x slower than on one thread (benchmarks/RESULTS.md, "Heads");
    # with several workers, OpenMP at one thread per worker too: the workers already fill the cores
    with threadpool_limits(limits=1, user_api="blas"), threadpool_limits(limits=1 if workers > 1 else None):
        if workers > 1:
            for res in Parallel(n_jobs=workers, backend="threading", return_as="generator_unordered")(
                    delayed(task)(*t) for t in tasks):
                results.append(res)
                if progress is not None:
                    progress(len(results), len(tasks))
        else:
            for t in tasks:
                results.append(task(*t))
                if progress is not None:
                    progress(len(results), len(tasks))

    out = {}
    for name, (groups, candidates) in plans.items():
        n = len(candidates)
        out[name] = HeadSearch(params=candidates, split_scores=np.full((n, len(folds)), np.nan),
                               fit_times=np.zeros((n, len(folds))))
    errors: dict[str, str] = {}
    for name, f, rows, seconds in results:
        found = out[name]
        found.seconds += seconds
        for index, score, fit_time, error in rows:
            found.split_scores[index, f] = score
            found.fit_times[index, f] = fit_time
            if error is not None:
                errors[name] = error
    for name, found in out.items():
        if found.best_index is None:
            found.error = errors.get(name, "ValueError: every candidate failed to fit")
    return out
