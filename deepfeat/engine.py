"""The embedding engine: one path, one way, for every store.

    items -> keys -> store lookup -> claims -> decode -> session -> pool -> store -> array

:func:`embed` owns that loop. It calls down into :mod:`deepfeat.keys`, the store
(:class:`deepfeat.cache.FeatureCache`, or :class:`deepfeat.cache.NullStore`
when there is no cache), the decoder and the network it is handed, and
:mod:`deepfeat.pooling`; none of them calls back. Statistics and failures come
back as a value (:class:`EmbedResult`), never written into an estimator from a
worker thread.

How the work is shared: vectors are stored per layer, so only the layers an
image misses go through the network, in one pass (the session is cut at just
those tensors). Images are claimed a window (one batch) at a time, right before
they are decoded: N processes on one cache each take about 1/N of the work, a
claim round costs O(window) whatever the job's size, and a process that finds
an image claimed moves on and comes back to it at the end, when it re-checks
only the images others held.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np

from .cache import NullStore, StoreBatch, new_owner
from .images import ImageDecodeError, describe
from .keys import content_keys, stamp_holds
from .pooling import pool

__all__ = ["Layer", "EmbedResult", "embed"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layer:
    """One block of output columns: a tensor, how it is pooled, and where its vectors are stored.

    ``fingerprint`` names this layer's vectors in the store (see
    :func:`deepfeat.keys.feature_fingerprint`); ``description`` is stored
    beside a new fingerprint for ``deepfeat cache info``.
    """

    label: str
    tensor: str
    pooling: str
    dim: int
    fingerprint: str = ""
    description: Mapping = field(default_factory=dict, compare=False, hash=False)


@dataclass
class EmbedResult:
    """What :func:`embed` returns: the array and what happened on the way."""

    #: (n_items, sum of layer dims) float32; rows of failed items are NaN
    X: np.ndarray
    #: (position, source, reason) of each item that failed, by position
    failures: list[tuple[int, str, str]]
    #: hits, misses, computed, shared, uncacheable (see ImageEmbedder.cache_stats_)
    stats: dict[str, int]
    #: providers of the last session that ran; None when no image needed the network
    providers: list[str] | None


class _Runner(Protocol):
    providers: list[str]

    def run(self, batch: np.ndarray) -> list[np.ndarray]: ...


@dataclass
class _Task:
    positions: np.ndarray  # rows of items to decode and run
    units: np.ndarray | None  # their unique-key indices (None: uncacheable, no claim)
    need: np.ndarray  # bool per layer: the layers to compute


#: an output this large is announced as a warning before the work starts (smaller ones at INFO)
LARGE_OUTPUT_BYTES = 256 << 20
_WAIT = object()  # the claim loop has nothing now: others hold what is left


class _Mirrored:
    """Runs a batch and its horizontal mirror in one call; each output comes back as (n, 2, ...)."""

    def __init__(self, runner: _Runner):
        self.runner = runner
        self.providers = runner.providers

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        n = len(batch)
        both = np.concatenate([batch, np.ascontiguousarray(batch[..., ::-1])])
        return [np.stack([o[:n], o[n:]], axis=1) for o in self.runner.run(both)]


def _announce_size(n: int, layers: Sequence[Layer]) -> None:
    """Say what the output array will take before the work starts: unpooled maps are large."""
    per_image = sum(int(layer.dim) for layer in layers)
    nbytes = n * per_image * 4
    big = nbytes >= LARGE_OUTPUT_BYTES
    unpooled = [f"{layer.label!r} ({layer.dim})" for layer in layers if layer.pooling == "none"]
    logger.log(
        logging.WARNING if big else logging.INFO,
        "the features of %d images take %.0f MiB (%d float32 per image)%s",
        n, nbytes / 2**20, per_image,
        f"; unpooled layers {', '.join(unpooled)} make most of it: pooling='avg' keeps one value per channel"
        if big and unpooled else "",
    )


def embed(
    items: Sequence[Any],
    layers: Sequence[Layer],
    *,
    decode: Callable[[Any], np.ndarray],
    network: Callable[[tuple[str, ...]], _Runner],
    store: Any = None,
    scope: str = "",
    key_mode: str = "content",
    batch_size: int = 16,
    on_error: str = "raise",
    decode_threads: int = 4,
    progress: "bool | str" = False,
    poll: float = 0.05,
    tta: str | None = None,
) -> EmbedResult:
    """Embed ``items`` into one row each: from the store where it has them, else computed once and stored.

    Parameters
    ----------
    items : sequence
        Inputs ``decode`` understands (paths, bytes, arrays, PIL images).
    layers : sequence of Layer
        Column blocks, in output order.
    decode : callable
        ``decode(item)`` returns the ``(3, h, w)`` float32 input of the
        network, or raises :class:`~deepfeat.images.ImageDecodeError`.
    network : callable
        ``network(tensors)`` returns a runner (``run(batch) -> outputs``, one
        per tensor, and ``providers``) of the model cut at ``tensors``. Called
        only when an image must go through the network.
    store : FeatureCache, NullStore or None
        Where vectors are looked up and kept; ``None`` is a :class:`NullStore`.
    scope : str
        Claims namespace: images decoded and run the same way (model and
        preprocessing) share it, whatever the layers.
    key_mode : {"content", "stat"}
        See :func:`deepfeat.keys.content_key`.
    batch_size : int
        Images per network call, and per claim window.
    on_error : {"raise", "skip"}
        A bad input raises, or gives a NaN row listed in ``failures``.
    decode_threads : int
        Threads decoding (and hashing) while the network runs.
    progress : bool or str
        tqdm bar over the images computed (only on a terminal); a string
        labels it.
    poll : float
        First wait, in seconds, when every image left is claimed by others.
    tta : {None, "flip"}
        Test-time augmentation: ``"flip"`` runs each image and its mirror in
        the same batch and returns the mean of their pooled vectors. Give the
        layers their own fingerprints for it: the vectors differ.

    Returns
    -------
    EmbedResult

    Examples
    --------
    A "network" that returns the mean pixel, on a store that forgets:

    >>> import numpy as np
    >>> class Mean:
    ...     providers = ["none"]
    ...     def run(self, batch):
    ...         return [batch.mean(axis=(1, 2, 3))[:, None]]
    >>> items = [np.full((2, 2, 3), v, np.uint8) for v in (1, 2)]
    >>> res = embed(items, [Layer("mean", "t", "avg", 1)],
    ...             decode=lambda a: a.transpose(2, 0, 1).astype(np.float32), network=lambda t: Mean())
    >>> res.X.ravel().tolist(), res.stats["computed"]
    ([1.0, 2.0], 2)
    """
    store = NullStore() if store is None else store
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip'; got {on_error!r}.")
    n, n_layers = len(items), len(layers)
    bounds = np.cumsum([0] + [int(layer.dim) for layer in layers])
    cols = [slice(int(bounds[j]), int(bounds[j + 1])) for j in range(n_layers)]
    _announce_size(n, layers)
    X = np.empty((n, int(bounds[-1])), dtype=np.float32)
    stats = {"hits": 0, "misses": 0, "computed": 0, "shared": 0, "uncacheable": 0}
    failures: list[tuple[int, str, str]] = []
    bs = max(1, int(batch_size))

    # keys: one unit of work per distinct image; duplicates are copied, never run twice
    if store.persistent:
        keys, stamps = content_keys(items, key_mode, decode_threads)
    else:
        keys, stamps = [None] * n, [None] * n
    unit_of: dict[str, int] = {}
    first: list[int] = []
    dups: dict[int, list[int]] = {}
    loose: list[int] = []
    for i, k in enumerate(keys):
        if k is None:
            loose.append(i)
            continue
        u = unit_of.setdefault(k, len(first))
        if u == len(first):
            first.append(i)
        else:
            dups.setdefault(u, []).append(i)
    ukeys = list(unit_of)
    upos = np.asarray(first, dtype=np.intp)
    weight = np.ones(len(ukeys), dtype=np.int64)  # rows each unit stands for
    for u, extra in dups.items():
        weight[u] += len(extra)

    # store lookup: straight into X, one layer at a time
    missing = np.ones((len(ukeys), n_layers), dtype=bool)
    for j, layer in enumerate(layers):
        missing[:, j] = ~store.get_into(layer.fingerprint, ukeys, X, upos, cols[j])
    complete = ~missing.any(axis=1)
    stats["hits"] = int(weight[complete].sum())
    stats["misses"] = int(weight[~complete].sum())
    stats["uncacheable"] = len(loose) if store.persistent else 0

    def copy_dups(units: "Sequence[int] | np.ndarray") -> None:
        """Give the other rows of each unit its (complete) row."""
        for u in units:
            extra = dups.get(int(u))
            if extra:
                X[extra] = X[upos[u]]

    copy_dups(np.flatnonzero(complete))

    owner = new_owner()
    claimed = False

    def refresh(units: np.ndarray) -> np.ndarray:
        """Read what others stored meanwhile for ``units``; return those still incomplete."""
        for j, layer in enumerate(layers):
            want = units[missing[units, j]]
            if len(want):
                found = store.get_into(layer.fingerprint, [ukeys[u] for u in want], X, upos[want], cols[j])
                missing[want[found], j] = False
        done = ~missing[units].any(axis=1)
        if done.any():
            stats["shared"] += int(weight[units[done]].sum())
            copy_dups(units[done])
        return units[~done]

    def tasks() -> Iterator[Any]:
        nonlocal claimed
        all_layers = np.ones(n_layers, dtype=bool)
        for s in range(0, len(loose), bs):  # no key: computed, never stored or claimed
            yield _Task(np.asarray(loose[s : s + bs], dtype=np.intp), None, all_layers)
        pending = np.flatnonzero(~complete)
        cursor = 0
        waiting: deque[int] = deque()
        idle = 0  # windows of `waiting` in a row that made no progress
        while cursor < len(pending) or waiting:
            if cursor < len(pending):
                window, fresh = pending[cursor : cursor + bs], True
                cursor += bs
            else:
                window = np.asarray([waiting.popleft() for _ in range(min(bs, len(waiting)))], dtype=np.intp)
                fresh = False
                before = len(window)
                window = refresh(window)  # re-check only what others held
                if len(window) < before:
                    idle = 0
            if not len(window):
                continue
            claimed = True
            _, others = store.claim(scope, [ukeys[u] for u in window], owner=owner)
            held = set(others)
            if held:
                waiting.extend(int(u) for u in window if ukeys[u] in held)
            mine = np.asarray([u for u in window if ukeys[u] not in held], dtype=np.intp)
            if len(mine):
                # another process may have stored some between our look-up and our claim
                still = refresh(mine)
                if len(still) < len(mine):
                    left = set(still.tolist())
                    store.release(owner, [ukeys[u] for u in mine if u not in left], scope)
                if len(still):
                    idle = 0
                    yield _Task(upos[still], still, missing[still].any(axis=0))
                    continue
            if not fresh:
                idle += 1
                if idle * bs >= len(waiting) + bs:  # a whole pass over what others hold: wait
                    idle = 0
                    yield _WAIT

    # decode -> session -> pool -> store -> array
    providers: list[str] | None = None
    retry: list[int] = []
    bar = _progress_bar(len(loose) + int((~complete).sum()), progress)

    def finish(task: _Task, futures: list[Future]) -> None:
        nonlocal providers
        ok_rows, ok_idx, arrays = [], [], []
        decoded = [res for fut in futures for res in fut.result()]
        for offset, res in enumerate(decoded):
            pos = int(task.positions[offset])
            if isinstance(res, ImageDecodeError):
                if on_error == "raise":
                    raise res
                logger.warning("skipping %s", res)
                failures.append((pos, res.source, res.reason))
                if task.units is not None:  # its copies may still be readable: they run on their own
                    retry.extend(dups.get(int(task.units[offset]), ()))
                continue
            ok_rows.append(pos)
            ok_idx.append(offset)
            arrays.append(res)
        need = np.flatnonzero(task.need).tolist()  # plain ints: they index `layers`
        outs = None
        if arrays:
            tensors = tuple(dict.fromkeys(layers[j].tensor for j in need))
            runner = network(tensors)
            outs, ran, errors = run_split(_Mirrored(runner) if tta == "flip" else runner, np.stack(arrays))
            providers = list(runner.providers)
            for i, exc in errors.items():
                pos = ok_rows[i]
                reason = f"inference failed on {runner.providers[0]} ({type(exc).__name__}: {exc})"
                logger.warning("skipping %s: %s", describe(items[pos]), reason)
                failures.append((pos, describe(items[pos]), reason))
                if task.units is not None:
                    retry.extend(dups.get(int(task.units[ok_idx[i]]), ()))
            if errors and outs is None and not stats["computed"]:
                first = ok_rows[min(errors)]
                raise RuntimeError(
                    f"ONNX Runtime on {runner.providers[0]} could not run any image, even alone (first: "
                    f"{describe(items[first])}: {errors[min(errors)]}). Check the provider, or lower batch_size."
                ) from errors[min(errors)]
            ok_rows = [p for p, r in zip(ok_rows, ran) if r]
            ok_idx = [i for i, r in zip(ok_idx, ran) if r]
        if outs is not None:
            outputs = dict(zip(tensors, outs))
            rows = np.asarray(ok_rows, dtype=np.intp)
            for j in need:
                out = outputs[layers[j].tensor]
                if tta == "flip":  # (n, 2, ...): the image and its mirror, pooled, then averaged
                    mirror = out[:, 1][..., ::-1] if out.ndim == 5 else out[:, 1]  # maps back in place: "none" too
                    vecs = (pool(out[:, 0], layers[j].pooling) + pool(mirror, layers[j].pooling)) / 2
                else:
                    vecs = pool(out, layers[j].pooling)
                if vecs.shape[1] != layers[j].dim:
                    raise ValueError(
                        f"Layer {layers[j].label!r} (tensor {layers[j].tensor!r}) gave {vecs.shape[1]} features "
                        f"per image, expected {layers[j].dim}: the model file changed since fit. Refit."
                    )
                if task.units is None:
                    X[rows, cols[j]] = vecs
                else:  # what the store already gave stays as it was read
                    write = missing[task.units[ok_idx], j]
                    X[rows[write], cols[j]] = vecs[write]
            stats["computed"] += len(ok_rows)
        units = task.units
        if units is not None:
            ok_units = units[ok_idx]
            keep = []
            for i, u in zip(ok_idx, ok_units):
                if stamp_holds(items[upos[u]], stamps[upos[u]]):
                    copy_dups([u])  # found layers too, not only computed ones
                    if np.isfinite(X[upos[u]]).all():
                        keep.append(i)
                else:  # edited while read: the vector is not its key's, nor its copies'
                    retry.extend(dups.get(int(u), ()))
            if len(keep) < len(ok_idx):
                logger.info("not caching %d vectors (non-finite, or file changed while read)", len(ok_idx) - len(keep))
            kept = units[keep]
            batches = []
            for j in need:
                us = kept[missing[kept, j]]
                if len(us):
                    batches.append(StoreBatch(layers[j].fingerprint, [ukeys[u] for u in us], X[upos[us], cols[j]],
                                              layers[j].description))
            store.put(batches, owner=owner, scope=scope, release=[ukeys[u] for u in units])
            missing[ok_units[:, None], np.asarray(need, dtype=np.intp)[None, :]] = False
        if bar is not None:
            bar.update(len(task.positions))

    def run_split(runner: _Runner, batch: np.ndarray) -> tuple[list | None, np.ndarray, dict[int, Exception]]:
        """Outputs of the rows that ran, which rows ran, and the error of each row that failed alone.

        With ``on_error="skip"`` a batch that fails (out of memory, say) is run again in halves,
        down to single images, so one bad batch costs only the images that fail on their own."""
        try:
            return list(runner.run(batch)), np.ones(len(batch), dtype=bool), {}
        except Exception as exc:
            if on_error == "raise":
                raise
            if len(batch) == 1:
                return None, np.zeros(1, dtype=bool), {0: exc}
        mid = len(batch) // 2
        o1, m1, e1 = run_split(runner, batch[:mid])
        o2, m2, e2 = run_split(runner, batch[mid:])
        outs = o2 if o1 is None else o1 if o2 is None else [np.concatenate([a, b]) for a, b in zip(o1, o2)]
        return outs, np.concatenate([m1, m2]), {**e1, **{mid + k: v for k, v in e2.items()}}

    def decode_safe(item: Any) -> Any:
        try:
            return decode(item)
        except ImageDecodeError as exc:
            return exc
        except Exception as exc:  # e.g. MemoryError in preprocess: one bad file must not end a long job
            err = ImageDecodeError(describe(item), f"cannot decode or preprocess ({type(exc).__name__}: {exc})")
            err.__cause__ = exc
            return err

    def decode_many(positions: np.ndarray) -> list:
        return [decode_safe(items[p]) for p in positions]

    workers = max(1, decode_threads)

    def drive(ex: ThreadPoolExecutor, work: Iterator[Any]) -> None:
        in_flight: tuple[_Task, list[Future]] | None = None
        delay = poll
        try:
            for task in work:
                if task is _WAIT:
                    if in_flight is not None:
                        finish(*in_flight)
                        in_flight = None
                    else:
                        time.sleep(delay)  # another process computes what we need
                        delay = min(delay * 1.5, 0.5)
                    continue
                delay = poll
                # decode the next batch while the network runs on this one; a few futures
                # per batch, not one per image: each future costs a lock and a condition
                step = -(-len(task.positions) // workers)
                futures = [ex.submit(decode_many, task.positions[s : s + step])
                           for s in range(0, len(task.positions), step)]
                if in_flight is not None:
                    finish(*in_flight)
                in_flight = (task, futures)
            if in_flight is not None:
                finish(*in_flight)
                in_flight = None
        finally:
            if in_flight is not None:
                for f in in_flight[1]:
                    f.cancel()

    def retried() -> Iterator[_Task]:
        todo = np.asarray(retry, dtype=np.intp)
        retry.clear()
        for s in range(0, len(todo), bs):
            yield _Task(todo[s : s + bs], None, np.ones(n_layers, dtype=bool))

    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deepfeat-decode") as ex:
            drive(ex, tasks())
            while retry:  # copies of failed or edited images, computed on their own, never stored
                drive(ex, retried())
    finally:
        if bar is not None:
            bar.close()
        if claimed:
            store.release(owner)
    failures.sort(key=lambda f: f[0])
    if failures:
        X[[f[0] for f in failures]] = np.nan
    return EmbedResult(X, failures, stats, providers)


def _progress_bar(total: int, enabled: "bool | str"):
    if not enabled or total == 0 or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc=enabled if isinstance(enabled, str) else "embedding")
