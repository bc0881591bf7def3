"""The classical heads: searching them against embedding the images, before and after #23, in one run.

* **Before**: what ``compare_heads`` ran until #23 (one ``GridSearchCV`` per head, one fit after another,
  scikit-learn's own threading, the logreg head at lbfgs' default tol 1e-4), replicated here.
* **After**: ``compare_heads`` as it is (:mod:`deepfeat.search`), default arguments.
* **Plain**: ``GridSearchCV`` over today's heads, to check that the shortcuts give its answer: the best
  candidate's CV score, its parameters, and the largest gap over all candidates.

Data, all embedded here by the shipped EfficientNet-Lite0 (``pooled``, 1,280 columns, or with
``features@gem`` 2,560):

* 720 real JPEG photos: the 397 hymenoptera photos and 323 mirrored copies (2 classes); their cold
  ``ImageEmbedder().fit_transform`` is the yardstick;
* 720 of scikit-learn's digits drawn as 224 px images (10 classes, 72 each), the same embedder;
* growth: n = 1k, 2k, 5k, 10k rows (d = 1,280) and 1k, 2k, 5k (d = 2,560) drawn from class-conditional
  Gaussians fitted to the 1,797 embedded digits (10 class means, their pooled within-class covariance).

Run ``python benchmarks/bench_heads.py`` (``--quick``: smaller).
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import real_jpegs  # noqa: E402


def _before_heads():
    from sklearn.linear_model import LogisticRegression

    from deepfeat.classify import default_heads

    heads = default_heads()
    heads["logreg"][0].set_params(clf=LogisticRegression(max_iter=5000))  # tol 1e-4, as shipped before
    return heads


def _before(X, y, folds):
    """compare_heads before #23: a GridSearchCV per head, serial, refit of every head."""
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV

    out = {}
    t = time.perf_counter()
    for name, (est, grid) in _before_heads().items():
        t0 = time.perf_counter()
        g = GridSearchCV(clone(est), grid, cv=folds, n_jobs=None, refit=True).fit(X, y)
        out[name] = (time.perf_counter() - t0, g.best_score_)
    return time.perf_counter() - t, out


def _plain(X, y, folds):
    """GridSearchCV over today's heads (one BLAS thread: the same scores, sooner)."""
    from sklearn.model_selection import GridSearchCV
    from threadpoolctl import threadpool_limits

    from deepfeat.classify import default_heads

    out = {}
    with threadpool_limits(limits=1, user_api="blas"):
        for name, (est, grid) in default_heads().items():
            out[name] = GridSearchCV(est, grid, cv=folds, refit=False).fit(X, y).cv_results_
    return out


def _after(X, y):
    from deepfeat.classify import compare_heads

    t = time.perf_counter()
    board = compare_heads(X, y, cv=5)
    return time.perf_counter() - t, board


def _agreement(X, y, folds):
    """Per head: (plain best, fast best, same params, max gap over candidates)."""
    from deepfeat.classify import default_heads
    from deepfeat.search import search_heads

    plain = _plain(X, y, folds)
    fast = search_heads(default_heads(), X, y, folds)
    rows = {}
    for name, ref in plain.items():
        got = fast[name]
        b = int(np.argmin(ref["rank_test_score"]))
        rows[name] = (ref["mean_test_score"][b], got.mean_test_score[got.best_index],
                      str(ref["params"][b]) == str(got.params[got.best_index]),
                      float(np.nanmax(np.abs(ref["mean_test_score"] - got.mean_test_score))), ref["params"][b])
    return rows


def _digit_images(n_per_class=None):
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.arange(len(d.target))
    if n_per_class:
        rng = np.random.default_rng(0)
        idx = np.concatenate([rng.choice(np.flatnonzero(d.target == c), n_per_class, replace=False)
                              for c in range(10)])
    imgs = np.repeat(np.repeat((d.images[idx] / 16 * 255).astype(np.uint8), 28, 1), 28, 2)
    return list(np.stack([255 - imgs] * 3, axis=-1)), d.target[idx]


def _gaussian(X, y, n, rng):
    """n rows from class-conditional Gaussians fitted to (X, y): class means, pooled within-class covariance."""
    classes = np.unique(y)
    means = np.stack([X[y == c].mean(0) for c in classes]).astype(np.float64)
    R = X.astype(np.float64) - means[np.searchsorted(classes, y)]
    cov = R.T @ R / (len(X) - len(classes))
    w, Q = np.linalg.eigh(cov + 1e-6 * np.trace(cov) / len(cov) * np.eye(len(cov)))
    L = Q * np.sqrt(np.maximum(w, 0))
    labels = np.resize(classes, n)
    rng.shuffle(labels)
    Z = rng.standard_normal((n, len(w)))
    return (means[np.searchsorted(classes, labels)] + Z @ L.T).astype(np.float32), labels


def _fmt_agree(title, rows, lines):
    for name, (pb, fb, same, gap, params) in rows.items():
        params = ", ".join(f"{k}={type(v).__name__ if hasattr(v, 'fit') else v}" for k, v in params.items())
        lines.append(f"| {title} | {name} | {pb:.4f} | {fb:.4f} | {'yes' if same else '**no**'} ({params}) | "
                     f"{gap:.4f} |")


def run(quick: bool = False) -> str:
    from PIL import Image, ImageOps

    from deepfeat import ImageEmbedder
    from deepfeat.classify import stratified_cv

    warnings.simplefilter("ignore")
    n_photos = 200 if quick else 720
    lines = ["## Heads: grid-searching the classical heads against embedding the images (#23)", ""]
    with tempfile.TemporaryDirectory() as d:
        paths = real_jpegs()
        labels = [Path(p).parent.name for p in paths]
        for p in paths[: max(0, n_photos - len(paths))]:  # mirrored copies: new pixels, same label
            out = Path(d) / f"{len(labels):04d}_{Path(p).name}"
            ImageOps.mirror(Image.open(p).convert("RGB")).save(out, quality=90)
            paths.append(str(out))
            labels.append(Path(p).parent.name)
        paths, labels = paths[:n_photos], np.asarray(labels[:n_photos])
        t = time.perf_counter()
        X_photos = ImageEmbedder(progress=False).fit_transform(paths)
        t_embed = time.perf_counter() - t
    imgs, y_dig = _digit_images(20 if quick else 72)
    emb = ImageEmbedder(layers=[("features", "gem"), "pooled"], progress=False).fit()
    t = time.perf_counter()
    X_dig2 = emb.transform(imgs)
    t_embed_dig = time.perf_counter() - t
    X_dig = X_dig2[:, 1280:]
    cases = {f"{n_photos} photos, 2 classes, d=1280": (X_photos, labels),
             f"{len(y_dig)} digits, 10 classes, d=1280": (X_dig, y_dig),
             f"{len(y_dig)} digits, 10 classes, d=2560": (X_dig2, y_dig)}
    lines += [f"Cold `ImageEmbedder().fit_transform` of the {n_photos} JPEG photos (fresh process state for the "
              f"model, no cache): **{t_embed:.1f} s**; of the {len(y_dig)} digit images (arrays, no decoding, "
              f"two layers): {t_embed_dig:.1f} s.", "",
              "| features | before: seconds | after: seconds | before / after | after / cold embedding of "
              f"{n_photos} photos |", "|---|---:|---:|---:|---:|"]
    per_head = []
    agree = []
    for title, (X, y) in cases.items():
        folds = list(stratified_cv(y, 5, 0).split(X, y))
        tb, heads_b = _before(X, y, folds)
        ta, board = _after(X, y)
        lines.append(f"| {title} | {tb:.1f} | {ta:.1f} | {tb / ta:.1f}x | {ta / t_embed:.2f}x |")
        after = dict(zip(board["head"], board["search_time"]))
        per_head.append((title, heads_b, after, board))
        agree.append((title, _agreement(X, y, folds)))
    lines += ["", "Per head (before: seconds of its GridSearchCV; after: seconds of work on its fits, summed over "
              "the 2 worker threads, so they add up to about twice the wall time):", "",
              "| features | head | before s | after s (work) |", "|---|---|---:|---:|"]
    for title, hb, after, board in per_head:
        for name, (secs, _) in hb.items():
            lines.append(f"| {title} | {name} | {secs:.1f} | {after[name]:.1f} |")
    lines += ["", "Agreement with a plain `GridSearchCV` over today's heads, same folds (best candidate's CV "
              "accuracy, its parameters, and the largest gap over every candidate of the grid):", "",
              "| features | head | plain best | fast best | same parameters | max gap, all candidates |",
              "|---|---|---:|---:|---|---:|"]
    for title, rows in agree:
        _fmt_agree(title, rows, lines)

    # growth with rows and width
    rng = np.random.default_rng(0)
    imgs_all, y_all = _digit_images(None if not quick else 40)
    Xa2 = emb.transform(imgs_all)
    plan = ([(1280, 1000), (1280, 2000)] if quick else
            [(1280, 1000), (1280, 2000), (1280, 5000), (1280, 10000), (2560, 1000), (2560, 2000), (2560, 5000)])
    lines += ["", f"Growth: rows from class-conditional Gaussians fitted to the {len(y_all)} embedded digits "
              "(10 classes); `compare_heads` with the default heads, 5 folds; before only at 1,000 rows "
              "(it took 49-84 s there in a trial run, and grows faster than after).", "",
              "| rows | d | before s | after s | before / after | after s per 1k rows | slowest head (work s) |",
              "|---:|---:|---:|---:|---:|---:|---|"]
    for dim, n in plan:
        Xsrc = Xa2[:, 1280:] if dim == 1280 else Xa2
        X, y = _gaussian(Xsrc, y_all, n, rng)
        folds = list(stratified_cv(y, 5, 0).split(X, y))
        tb = _before(X, y, folds)[0] if n <= 1000 else None
        ta, board = _after(X, y)
        slow = board.sort_values("search_time").iloc[-1]
        lines.append(f"| {n} | {dim} | {'-' if tb is None else f'{tb:.1f}'} | {ta:.1f} | "
                     f"{'-' if tb is None else f'{tb / ta:.1f}x'} | {ta / n * 1000:.2f} | "
                     f"{slow['head']} ({slow['search_time']:.1f}) |")
    lines += ["", "Command: `python benchmarks/run.py --sections heads --update` "
              "(or `python benchmarks/bench_heads.py`)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
