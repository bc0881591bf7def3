"""Layer selection by evidence: a cross-validated linear probe on every candidate layer and pooling.

Which layer of a pretrained CNN transfers best depends on how close the task is
to the pretraining data: the pooled penultimate vector for everyday objects,
a middle stage for textures, medical or satellite images. :func:`select_layer`
measures it instead of guessing. For each pooling, one pass of the network
produces every candidate layer at once (the graph is cut at all of them), so
the cost is one embedding per pooling, not one per layer, and with ``cache=``
a second call costs nothing.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from numbers import Integral
from typing import Any, Sequence

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, clone
from sklearn.linear_model import RidgeClassifierCV
from sklearn.model_selection import cross_validate
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from .classify import stratified_cv
from .embedder import ImageEmbedder
from .graph import load_onnx
from .pooling import POOLINGS
from .registry import DEFAULT_MODEL
from .resolve import resolve_model

__all__ = ["select_layer", "select_recipe", "plot_layer_scores", "default_probe"]

logger = logging.getLogger(__name__)

#: the pooling column of vector layers (``pooled``, ``logits``): nothing to pool
VECTOR = "vector"


def default_probe() -> BaseEstimator:
    """The linear probe of :func:`select_layer`: standardise, then ridge classification.

    ``RidgeClassifierCV`` picks its regularisation by efficient leave-one-out
    on each training fold, so the probe is tuned per layer (wide and narrow
    layers need very different penalties) without a nested grid search, and
    the outer cross-validation score stays unbiased.

    Returns
    -------
    sklearn.pipeline.Pipeline

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from deepfeat.selection import default_probe
    >>> X, y = load_iris(return_X_y=True)
    >>> round(default_probe().fit(X, y).score(X, y), 2)
    0.85
    """
    return make_pipeline(StandardScaler(), RidgeClassifierCV(alphas=np.logspace(-1, 5, 7)))


def _candidate_layers(model, preprocessing: dict | None) -> list[str]:
    _, spec = resolve_model(model, **dict(preprocessing or {}))
    if not spec.layers:
        raise ValueError(
            f"Model {os.fspath(model)!r} has no layer aliases to try; pass layers=[...] with tensor names "
            f"from deepfeat.list_layers({os.fspath(model)!r}), or name aliases in "
            "preprocessing={'layers': {...}}."
        )
    first: dict[str, str] = {}
    for alias, tensor in spec.layers.items():
        first.setdefault(tensor, alias)  # "stage1" and "block0" may name one tensor: score it once
    return list(first.values())


def select_layer(
    paths: Sequence,
    y,
    model: str | os.PathLike = DEFAULT_MODEL,
    layers: Sequence[str] | None = None,
    poolings: Sequence[str] = ("avg", "gem", "max"),
    cv: int | Any = 5,
    cache: bool | str | os.PathLike | None = None,
    *,
    probe: BaseEstimator | None = None,
    scoring: str = "accuracy",
    random_state: int | None = 0,
    n_jobs: int | None = None,
    embedder_params: dict | None = None,
    max_combination: int = 3,
) -> pd.DataFrame:
    """Score every candidate layer and pooling with a fast linear probe under CV.

    Parameters
    ----------
    paths : sequence
        Images (paths, or anything :class:`~deepfeat.ImageEmbedder` takes).
    y : array-like of shape (n_images,)
        Class labels.
    model : str or path-like, default="efficientnet_lite0"
        Registered name or ``.onnx`` path.
    layers : sequence of str, optional
        Candidate layers (aliases or tensor names). ``None``: every alias of
        the model (for ``efficientnet_lite0``: stem, stage1-5, block0-15,
        features, pooled, logits).
    poolings : sequence of str, default=("avg", "gem", "max")
        Poolings to try on feature maps (``"none"`` flattens: only sensible
        for small late maps). Vector layers are scored once, with pooling
        ``"vector"``.
    cv : int or CV splitter, default=5
        Stratified, shuffled folds (lowered to the smallest class size), or a
        scikit-learn splitter. The same folds score every layer.
    cache : bool, str, path-like or None, default=None
        Feature cache folder, passed to :class:`~deepfeat.ImageEmbedder`; with
        it, running the selection again (or on more poolings) re-embeds nothing
        already seen.
    probe : estimator, optional
        The classifier fitted on each layer's features; default
        :func:`default_probe`.
    scoring : str, default="accuracy"
        scikit-learn scorer name.
    random_state : int or None, default=0
        Seed of the fold shuffle.
    n_jobs : int or None, default=None
        Parallel folds in ``cross_validate``.
    embedder_params : dict, optional
        Further :class:`~deepfeat.ImageEmbedder` parameters (``batch_size``,
        ``providers``, ``image_size``, ``preprocessing``, ``on_error``,
        ``progress``...). Images that fail under ``on_error="skip"`` are
        dropped from the probe (and counted in ``df.attrs["n_dropped"]``).
    max_combination : int, default=3
        Then search, greedily, for up to this many (layer, pooling) picks
        whose concatenated features the same probe scores best under the same
        folds (``df.attrs["combination"]``: one dict per step, ``picks``,
        ``mean_test_score``, ``std_test_score``). 1 skips it.

    Returns
    -------
    pandas.DataFrame
        One row per (layer, pooling) in network order, with columns ``layer``,
        ``tensor``, ``pooling``, ``depth`` (position of the layer in the
        graph, 0 = first), ``stride`` (input side over map side; empty for
        vectors), ``n_features``, ``mean_test_score``,
        ``std_test_score``, ``mean_fit_time`` and ``rank_test_score``
        (1 = best; ties share a rank). All pairs come out of one network pass;
        a pair whose vectors equal an earlier one's (``features`` averaged
        is ``pooled``) is scored once, and named in ``df.attrs["duplicates"]``.
        ``df.attrs`` also holds ``model``, ``layers`` and ``poolings`` (an
        ``ImageEmbedder(layers=[(layer, pooling), ...], cache=cache)`` reads
        the same vectors back from the cache), ``scoring``, ``n_splits``,
        ``n_images``, ``n_dropped``, ``embed_time`` and ``combination``.

    See Also
    --------
    plot_layer_scores : the table as a plot.
    deepfeat.list_layers : the layers a model can be cut at.

    Examples
    --------
    >>> import tempfile
    >>> from deepfeat import make_sample_photos
    >>> from deepfeat.selection import select_layer
    >>> photos = make_sample_photos(tempfile.mkdtemp(), per_class=4, size=64)
    >>> df = select_layer(photos["path"], photos["label"], layers=["stage3", "stage5", "pooled"],
    ...                   poolings=["avg", "max"], cv=2, embedder_params={"progress": False})
    >>> df[["layer", "pooling"]].to_records(index=False).tolist()
    [('stage3', 'avg'), ('stage3', 'max'), ('stage5', 'avg'), ('stage5', 'max'), ('pooled', 'vector')]
    >>> int(df["rank_test_score"].min())
    1
    """
    params = dict(embedder_params or {})
    for reserved in ("model", "layers", "pooling", "cache"):
        if reserved in params:
            raise ValueError(
                f"embedder_params must not set {reserved!r}; it is an argument of select_layer itself."
            )
    poolings = [poolings] if isinstance(poolings, str) else list(poolings)
    bad = [p for p in poolings if p not in POOLINGS]
    if not poolings or bad:
        raise ValueError(
            f"The 'poolings' parameter of select_layer must be a non-empty list of {set(POOLINGS)}; "
            f"got {poolings!r}."
        )
    items = list(paths.iloc[:, 0] if isinstance(paths, pd.DataFrame) and paths.shape[1] == 1 else paths)
    y = np.asarray(y)
    if len(items) != len(y):
        raise ValueError(f"paths has {len(items)} images but y has {len(y)} labels; they must match.")
    if layers is None:
        layers = _candidate_layers(model, params.get("preprocessing"))
    elif isinstance(layers, str):
        layers = [layers]
    layers = list(dict.fromkeys(layers))  # repeated names would be scored twice
    probe = default_probe() if probe is None else probe

    # embed: every (layer, pooling) pair comes out of one network pass
    t0 = time.perf_counter()
    plain = ImageEmbedder(model=model, layers=layers, cache=cache, **params).fit()  # shapes only: no session
    pairs: list[tuple[str, str, str, bool]] = []  # (layer, tensor, pooling, is_vector)
    for name, (_, tensor), shape in zip(layers, plain.layers_, plain.output_shapes_):
        # a (c, 1, 1) map, like "pooled" here, is a vector in all but shape: pooling does not touch it
        is_vector = len(shape) == 1 or (len(shape) == 3 and shape[1] == shape[2] == 1)
        for pooling in poolings[:1] if is_vector else poolings:
            pairs.append((name, tensor, pooling, is_vector))
    by_pair: list = [(n, p) for n, _, p, _ in pairs]
    emb = ImageEmbedder(model=model, layers=by_pair, pooling=poolings[0], cache=cache, **params).fit()
    emb._progress_label = f"embedding {len(layers)} layers x {len(poolings)} poolings, one pass"
    X = emb.transform(items)
    embed_time = time.perf_counter() - t0
    keep = ~np.isnan(X).any(axis=1)
    nodes = load_onnx(emb.model_path_).graph.node
    order = {out: i for i, node in enumerate(nodes) for out in node.output}
    strides = _strides(emb)
    blocks: list[tuple[str, str, str, int, np.ndarray]] = []
    starts = np.cumsum([0] + emb.output_dims_)
    for (name, tensor, pooling, is_vector), start, dim in zip(pairs, starts, emb.output_dims_):
        blocks.append((name, tensor, VECTOR if is_vector else pooling, order.get(tensor, -1), X[:, start:start + dim]))
    blocks, duplicates = _drop_duplicates(blocks, keep)
    n_dropped = int((~keep).sum())
    if n_dropped:
        logger.warning("%d of %d images failed to embed and are left out of the probe", n_dropped, len(items))
    y_ok = y[keep]
    splitter: Any = stratified_cv(y_ok, int(cv), random_state) if isinstance(cv, Integral) else cv

    def score(cols: np.ndarray) -> dict:
        # hundreds of small fits: BLAS threads cost more in contention than they give
        with threadpool_limits(limits=1, user_api="blas"):
            res = cross_validate(clone(probe), cols[keep], y_ok, cv=splitter, scoring=scoring, n_jobs=n_jobs)
        return {"mean_test_score": float(np.mean(res["test_score"])), "std_test_score": float(np.std(res["test_score"])),
                "mean_fit_time": float(np.mean(res["fit_time"]))}

    # probe: the same folds for every (layer, pooling)
    rows = []
    show = bool(params.get("progress", True)) and sys.stderr.isatty()
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(blocks), unit="probe", desc=f"probing {len(blocks)} (layer, pooling) pairs")
    for label, tensor, pooling, depth, cols in blocks:
        rows.append({"layer": label, "tensor": tensor, "pooling": pooling, "depth": depth,
                     "stride": strides.get(tensor), "n_features": cols.shape[1], **score(cols)})
        logger.info("%s/%s: %s %.4f", label, pooling, scoring, rows[-1]["mean_test_score"])
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    df = pd.DataFrame(rows)
    df["stride"] = df["stride"].astype("Int64")
    pool_rank = {p: i for i, p in enumerate([VECTOR] + poolings)}
    df = df.sort_values(["depth", "pooling"], key=lambda s: s.map(pool_rank) if s.name == "pooling" else s,
                        kind="stable").reset_index(drop=True)
    df["rank_test_score"] = df["mean_test_score"].rank(ascending=False, method="min").astype(int)
    combination = _greedy_combination(df, blocks, score, max_combination) if max_combination > 1 else None
    df.attrs.update(
        model=os.fspath(model), layers=layers, poolings=poolings, scoring=scoring,
        n_splits=splitter.get_n_splits(np.empty((len(y_ok), 1)), y_ok),
        n_images=int(keep.sum()), n_dropped=n_dropped, embed_time=embed_time, duplicates=duplicates,
        combination=combination,
    )
    return df


def select_recipe(paths: Sequence, y, model: str | os.PathLike = DEFAULT_MODEL, *, max_layers: int = 3,
                  **kwargs: Any) -> tuple[list, pd.DataFrame]:
    """The layers (with their poolings) a linear probe picks on the training images alone.

    :func:`select_layer` over every alias and pooling, then its greedy
    combination of up to ``max_layers`` picks. Pass the result to
    ``ImageEmbedder(layers=...)``: vector layers come as names, feature maps
    as ``(layer, pooling)`` pairs. ``deepfeat classify --auto`` runs this,
    then searches the heads on those features with the same folds.

    Parameters
    ----------
    paths, y, model
        As :func:`select_layer`.
    max_layers : int, default=3
        Most (layer, pooling) picks to combine.
    **kwargs
        Further :func:`select_layer` arguments (``poolings``, ``cv``,
        ``cache``, ``random_state``, ``embedder_params``, ...).

    Returns
    -------
    layers : list
        For ``ImageEmbedder(layers=layers)``.
    scores : pandas.DataFrame
        The :func:`select_layer` table (``attrs["combination"]`` holds the steps).

    Examples
    --------
    >>> import tempfile
    >>> from deepfeat import make_sample_photos
    >>> from deepfeat.selection import select_recipe
    >>> photos = make_sample_photos(tempfile.mkdtemp(), per_class=4, size=64)
    >>> layers, _ = select_recipe(photos["path"], photos["label"], layers=["stage3", "pooled"],
    ...                           poolings=["avg", "gem"], cv=2, embedder_params={"progress": False})
    >>> 1 <= len(layers) <= 3
    True
    """
    scores = select_layer(paths, y, model, max_combination=max_layers, **kwargs)
    combo = scores.attrs.get("combination")
    if combo:
        picks = combo[-1]["picks"]
    else:
        best = scores.loc[scores["mean_test_score"].idxmax()]
        picks = [(best["layer"], best["pooling"])]
    layers = [name if pooling == VECTOR else (name, pooling) for name, pooling in picks]
    return layers, scores


def _strides(emb: ImageEmbedder) -> dict[str, int]:
    """Tensor -> stride (input side / map side) of the fitted embedder's maps."""
    from .resolve import layer_shapes

    tensors = tuple(dict.fromkeys(t for _, t in emb.layers_))
    size = emb.spec_.input_size
    shapes = layer_shapes(str(emb.model_path_), emb.model_sha256_, tensors, size, True)
    return {t: size // s[2] for t, s in zip(tensors, shapes) if len(s) == 4 and s[2] and s[2] > 1}


def _drop_duplicates(blocks: list, keep: np.ndarray) -> tuple[list, dict[str, str]]:
    """Blocks whose vectors equal an earlier block's (``features`` averaged is ``pooled``) are scored once.

    The vector layer is kept over a pooled map; the dropped one is named in the returned dict.
    """
    kept: list = []
    dropped: dict[str, str] = {}
    for block in blocks:
        label, _, pooling, _, cols = block
        twin = next((i for i, k in enumerate(kept) if k[4].shape == cols.shape
                     and np.allclose(k[4][keep], cols[keep], rtol=1e-4, atol=1e-5)), None)
        if twin is None:
            kept.append(block)
            continue
        other = kept[twin]
        if pooling == VECTOR and other[2] != VECTOR:  # keep the plain vector, drop the pooled map
            kept[twin] = block
            other, block = block, other
        dropped[f"{block[0]}/{block[2]}"] = f"{other[0]}/{other[2]}"
        logger.info("%s/%s gives the same vectors as %s/%s: scored once", block[0], block[2], other[0], other[2])
    return kept, dropped


def _greedy_combination(df: pd.DataFrame, blocks: list, score, max_picks: int, shortlist: int = 8) -> list[dict]:
    """Forward selection of up to ``max_picks`` (layer, pooling) blocks, concatenated, with the same probe and folds.

    Starts from the best single block and adds, from the best ``shortlist`` singles, the one that raises the
    CV score most; stops when nothing raises it.
    """
    by_key = {(b[0], b[2]): b[4] for b in blocks}
    ranked = df.sort_values(["mean_test_score", "std_test_score", "depth"], ascending=[False, True, True])
    candidates = [(r.layer, r.pooling) for r in ranked.head(shortlist).itertuples()]
    best = ranked.iloc[0]
    picks = [candidates[0]]
    steps = [{"picks": list(picks), "mean_test_score": float(best["mean_test_score"]),
              "std_test_score": float(best["std_test_score"])}]
    while len(picks) < max_picks:
        trials = []
        for cand in candidates:
            if cand in picks:
                continue
            res = score(np.hstack([by_key[p] for p in picks + [cand]]))
            trials.append((res["mean_test_score"], -res["std_test_score"], cand, res))
        if not trials:
            break
        top = max(trials, key=lambda t: (t[0], t[1]))
        if top[0] <= steps[-1]["mean_test_score"]:
            break
        picks.append(top[2])
        steps.append({"picks": list(picks), "mean_test_score": top[3]["mean_test_score"],
                      "std_test_score": top[3]["std_test_score"]})
    return steps  # plain dicts: pandas compares attrs when it concatenates frames


def plot_layer_scores(df: pd.DataFrame, ax=None):
    """Plot :func:`select_layer` scores: one line per pooling along the network's depth.

    Error bars are the standard deviation over the folds; the best
    (layer, pooling) is circled. Needs matplotlib (imported only here).

    Parameters
    ----------
    df : pandas.DataFrame
        Output of :func:`select_layer`.
    ax : matplotlib.axes.Axes, optional
        Where to draw; default: a new figure.

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import pandas as pd
    >>> from deepfeat.selection import plot_layer_scores
    >>> df = pd.DataFrame({"layer": ["stage4", "stage4", "pooled"], "pooling": ["avg", "max", "vector"],
    ...                    "depth": [10, 10, 20], "mean_test_score": [0.8, 0.85, 0.95],
    ...                    "std_test_score": [0.05, 0.04, 0.02]})
    >>> ax = plot_layer_scores(df)
    >>> [t.get_text() for t in ax.get_xticklabels()]
    ['stage4', 'pooled']
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plot_layer_scores needs matplotlib: pip install matplotlib") from exc
    required = {"layer", "pooling", "depth", "mean_test_score", "std_test_score"}
    missing = required - set(df.columns)
    if missing:
        raise ValueError(f"df lacks the columns {sorted(missing)}; pass the output of select_layer.")
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6.0, 0.45 * df["layer"].nunique() + 2), 4))
    layer_order = df.sort_values("depth", kind="stable")["layer"].drop_duplicates().tolist()
    x_of = {layer: i for i, layer in enumerate(layer_order)}
    vectors = df[df["pooling"] == VECTOR]
    maps = df[df["pooling"] != VECTOR]
    n_lines = maps["pooling"].nunique()
    for i, (pooling, part) in enumerate(maps.groupby("pooling", sort=False)):
        # a pooling's line runs on into the vector layers, which it does not change;
        # a small sideways shift keeps the error bars of the lines apart
        shift = 0.08 * (i - (n_lines - 1) / 2)
        part = pd.concat([part, vectors]).sort_values("depth", kind="stable")
        ax.errorbar([x_of[v] + shift for v in part["layer"]], part["mean_test_score"],
                    yerr=part["std_test_score"], marker="o", markersize=4, capsize=2, label=pooling)
    if len(vectors) and (df["pooling"] == VECTOR).all():
        ax.errorbar([x_of[v] for v in vectors["layer"]], vectors["mean_test_score"],
                    yerr=vectors["std_test_score"], marker="o", markersize=4, capsize=2, label=VECTOR)
    best = df.loc[df["mean_test_score"].idxmax()]
    ax.plot([x_of[best["layer"]]], [best["mean_test_score"]], "o", markersize=14, markerfacecolor="none",
            markeredgecolor="black", label=f"best: {best['layer']} ({best['pooling']})")
    ax.set_xticks(range(len(layer_order)))
    ax.set_xticklabels(layer_order, rotation=60, ha="right")
    metric = df.attrs.get("scoring", "score")
    ax.set_ylabel(f"CV {metric} (linear probe)")
    ax.set_xlabel("layer (input → output)")
    ax.grid(True, alpha=0.3)
    ax.legend(title="pooling", fontsize="small")
    ax.figure.tight_layout()
    return ax
