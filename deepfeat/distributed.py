"""Embedding Dask collections of image paths on a cluster, one session per worker process.

Dask (with ``distributed`` for clusters) is the engine: this module only maps
:class:`~deepfeat.ImageEmbedder` over partitions. Each worker process keeps
one fitted embedder per distinct set of parameters in a process-wide registry,
and its ONNX Runtime sessions come from the process's session pool
(:mod:`deepfeat.sessions`): built by the first partition that needs one and
reused by every later one. :func:`session_builds` reports how many sessions
this process built, so ``client.run(session_builds)`` shows it per worker.

Install with ``pip install 'deepfeat[dask]'``.
"""

from __future__ import annotations

import logging
import os
import threading

import joblib
import numpy as np
import pandas as pd
from sklearn.base import clone

from .embedder import ImageEmbedder
from .sessions import clear_sessions, session_stats

try:
    import dask.array as da
    import dask.bag as db
    import dask.dataframe as dd
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "deepfeat.distributed needs Dask: pip install 'deepfeat[dask]' "
        "(dask[dataframe] and distributed)."
    ) from exc

__all__ = ["embed_dataframe", "embed_bag", "worker_embedder", "session_builds", "clear_worker_embedders"]

logger = logging.getLogger(__name__)

# Process-wide registry: key -> fitted embedder. A lock makes concurrent
# tasks of a multi-threaded worker wait for the one that builds the session
# instead of building their own.
_LOCK = threading.Lock()
_EMBEDDERS: dict[tuple, ImageEmbedder] = {}
_PID = os.getpid()


def _registry_key(embedder: ImageEmbedder) -> tuple:
    cls = type(embedder)
    return (cls.__module__, cls.__qualname__, joblib.hash(embedder.get_params(deep=False)))


def _check_pid() -> None:
    # ORT sessions do not survive a fork; a forked child starts with an empty registry
    global _PID
    if os.getpid() != _PID:
        _EMBEDDERS.clear()
        _PID = os.getpid()


def worker_embedder(embedder: ImageEmbedder | None = None) -> ImageEmbedder:
    """The fitted embedder this process uses for ``embedder``'s parameters.

    The first call with a given set of parameters fits a clone (resolving the
    model and layers; the session is built by the first image that needs it);
    later calls, from any thread of the process, return that same object. The caller's embedder is
    never modified.

    Parameters
    ----------
    embedder : ImageEmbedder or None
        Only its parameters (``get_params()``) matter. ``None`` means
        ``ImageEmbedder(progress=False)``.

    Returns
    -------
    ImageEmbedder
        Fitted, shared by every task of this process: do not ``set_params`` on it.

    Examples
    --------
    >>> from deepfeat import ImageEmbedder
    >>> from deepfeat.distributed import worker_embedder
    >>> a = worker_embedder(ImageEmbedder(progress=False))
    >>> a is worker_embedder(ImageEmbedder(progress=False))
    True
    >>> a.n_features_out_
    1280
    """
    if embedder is None:
        embedder = ImageEmbedder(progress=False)
    if not isinstance(embedder, ImageEmbedder):
        raise TypeError(
            f"embedder must be a deepfeat.ImageEmbedder (or None for the default); got {type(embedder).__name__}."
        )
    key = _registry_key(embedder)
    with _LOCK:
        _check_pid()
        fitted = _EMBEDDERS.get(key)
        if fitted is None:
            fitted = clone(embedder).fit()
            _EMBEDDERS[key] = fitted
            logger.info("process %d fitted an embedder for %s", os.getpid(), fitted.model)
        return fitted


def session_builds() -> int:
    """How many ONNX Runtime sessions this process has built (:func:`deepfeat.sessions.session_stats`).

    Run it on every worker with ``client.run(session_builds)``: after a job,
    each worker that ran a partition shows 1 per distinct model, layer set,
    provider list and thread count.

    Examples
    --------
    >>> from deepfeat.distributed import session_builds
    >>> isinstance(session_builds(), int)
    True
    """
    return session_stats()["builds"]


def clear_worker_embedders() -> int:
    """Drop this process's embedders and pooled sessions (freeing their memory); return how many embedders.

    On a cluster: ``client.run(clear_worker_embedders)``. The build counter of
    :func:`session_builds` is kept.

    Examples
    --------
    >>> from deepfeat.distributed import clear_worker_embedders
    >>> clear_worker_embedders() >= 0
    True
    """
    with _LOCK:
        _check_pid()
        n = len(_EMBEDDERS)
        _EMBEDDERS.clear()
    clear_sessions()
    return n


def _shippable(embedder: ImageEmbedder | None) -> ImageEmbedder:
    """An unfitted copy to send to workers: parameters only, no progress bars."""
    if embedder is None:
        return ImageEmbedder(progress=False)
    if not isinstance(embedder, ImageEmbedder):
        raise TypeError(
            f"embedder must be a deepfeat.ImageEmbedder (or None for the default); got {type(embedder).__name__}."
        )
    # many partitions in one process would each draw a bar; workers have no terminal anyway
    return clone(embedder).set_params(progress=False)


def _embed_partition(paths: pd.Series, embedder: ImageEmbedder, columns: list[str]) -> pd.DataFrame:
    emb = worker_embedder(embedder)
    X = emb.transform(list(paths))
    return pd.DataFrame(X, index=paths.index, columns=columns)


def _embed_items(items, embedder: ImageEmbedder) -> np.ndarray:
    return worker_embedder(embedder).transform(list(items))


def _count(items) -> list[int]:
    return [sum(1 for _ in items)]


def embed_dataframe(
    data: "dd.DataFrame | dd.Series", embedder: ImageEmbedder | None = None, *, column: str | None = None
) -> "dd.DataFrame":
    """Embed a Dask column of image paths, partition by partition.

    Parameters
    ----------
    data : dask.dataframe.Series or dask.dataframe.DataFrame
        Image paths (or anything :meth:`ImageEmbedder.transform` reads from
        a list). The files must be readable under the same names on every
        worker (a shared filesystem or the same mount).
    embedder : ImageEmbedder or None
        Its parameters are sent to the workers; each worker process fits its
        own copy once (see :func:`worker_embedder`). A relative ``model`` path
        or ``cache`` directory is resolved on each worker. ``None`` uses the
        default model. With several worker processes on one machine, give it
        ``inference_threads=cores // workers_per_machine`` so the workers'
        ONNX Runtime sessions do not oversubscribe the cores.
    column : str or None
        For a DataFrame: the column of paths. ``None`` takes ``"path"`` if
        present, else the only column.

    Returns
    -------
    dask.dataframe.DataFrame
        ``float32`` columns named by ``get_feature_names_out()``, with the
        input's index and divisions, so ``df.join(features)`` lines up. With
        ``on_error="skip"`` failed images give NaN rows (each worker logs them).

    Notes
    -----
    The client process fits the embedder once too, to learn the column names
    (the result's ``meta``).

    Examples
    --------
    >>> import dask.dataframe as dd, pandas as pd
    >>> from deepfeat import ImageEmbedder, make_sample_photos
    >>> import tempfile
    >>> df = make_sample_photos(tempfile.mkdtemp(), per_class=2, size=64)
    >>> ddf = dd.from_pandas(df, npartitions=3)
    >>> feats = embed_dataframe(ddf, ImageEmbedder(layers="stage2", progress=False))
    >>> feats.npartitions, list(feats.columns[:2])
    (3, ['stage2_0000', 'stage2_0001'])
    >>> feats.compute().shape[0] == len(df)  # threaded scheduler, or a distributed Client
    True
    """
    if isinstance(data, dd.DataFrame):
        cols = list(data.columns)
        if column is None:
            if "path" in cols:
                column = "path"
            elif len(cols) == 1:
                column = cols[0]
            else:
                raise ValueError(
                    f"embed_dataframe got a DataFrame with columns {cols} and no 'path' column; "
                    "say which holds the images with column='...'."
                )
        if column not in cols:
            raise KeyError(f"column={column!r} is not a column of the DataFrame; columns are {cols}.")
        series = data[column]
    elif isinstance(data, dd.Series):
        if column is not None:
            raise ValueError(f"column={column!r} applies to a Dask DataFrame; data is a Series, leave it out.")
        series = data
    elif isinstance(data, (pd.Series, pd.DataFrame)):
        raise TypeError(
            "embed_dataframe takes a Dask collection; for a pandas object use ImageEmbedder.transform, "
            "or dask.dataframe.from_pandas(data, npartitions=...) to spread it over workers."
        )
    else:
        raise TypeError(f"data must be a dask DataFrame or Series of image paths; got {type(data).__name__}.")

    shipped = _shippable(embedder)
    columns = worker_embedder(shipped).get_feature_names_out().tolist()
    # one float32 block: a dict of 1280 empty Series takes a noticeable fraction of a second
    meta = pd.DataFrame(np.empty((0, len(columns)), np.float32), columns=columns, index=series._meta.index[:0])
    return series.map_partitions(_embed_partition, shipped, columns, meta=meta)


def embed_bag(
    paths: "db.Bag", embedder: ImageEmbedder | None = None, *, lengths: "bool | list[int]" = True
) -> "da.Array":
    """Embed a Dask bag of image paths into a Dask array, one block per partition.

    Parameters
    ----------
    paths : dask.bag.Bag
        Image paths (or other items :meth:`ImageEmbedder.transform` reads),
        readable under the same names on every worker.
    embedder : ImageEmbedder or None
        As for :func:`embed_dataframe`.
    lengths : bool or list of int, default=True
        Items per partition, for known chunk sizes. ``True`` counts them with
        one pass over the bag (cheap for a bag of paths; the bag's upstream
        work runs twice); ``False`` leaves row chunks unknown (NaN), as
        ``dask.dataframe.to_dask_array`` does.

    Returns
    -------
    dask.array.Array
        ``float32`` of shape ``(n_images, n_features_out_)``, one row chunk
        per bag partition, a single column chunk.

    Examples
    --------
    >>> import dask.bag as db, tempfile
    >>> from deepfeat import ImageEmbedder, make_sample_photos
    >>> df = make_sample_photos(tempfile.mkdtemp(), per_class=2, size=64)
    >>> bag = db.from_sequence(df["path"].tolist(), npartitions=2)
    >>> X = embed_bag(bag, ImageEmbedder(layers="stage2", progress=False))
    >>> X.chunks[0] == (len(df) // 2, len(df) - len(df) // 2), X.dtype
    (True, dtype('float32'))
    >>> X.compute().shape == X.shape
    True
    """
    if not isinstance(paths, db.Bag):
        raise TypeError(
            f"embed_bag takes a dask.bag.Bag of image paths; got {type(paths).__name__}. "
            "Use dask.bag.from_sequence(paths, npartitions=...) or embed_dataframe for a Dask DataFrame."
        )
    shipped = _shippable(embedder)
    n_features = worker_embedder(shipped).n_features_out_
    if lengths is True:
        sizes: list[float] = [int(n) for n in paths.map_partitions(_count).compute()]
    elif lengths is False or lengths is None:
        sizes = [np.nan] * paths.npartitions
    else:
        sizes = [int(n) for n in lengths]
        if len(sizes) != paths.npartitions:
            raise ValueError(
                f"lengths has {len(sizes)} entries but the bag has {paths.npartitions} partitions; "
                "give one count per partition, or lengths=True to count them."
            )
    blocks = paths.map_partitions(_embed_items, shipped).to_delayed()
    arrays = [
        da.from_delayed(block, shape=(n, n_features), dtype=np.float32) for block, n in zip(blocks, sizes)
    ]
    return da.concatenate(arrays, axis=0)
