"""ImageEmbedder: the scikit-learn transformer that turns images into feature vectors."""

from __future__ import annotations

import copy
import logging
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from numbers import Integral
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from . import graph
from .cache import KEY_MODES, cached_compute, feature_fingerprint, open_cache, resolve_cache_dir
from .images import DEFAULT_MAX_PIXELS, ImageDecodeError, describe, load_image, preprocess
from .pooling import POOLINGS, pool, pooled_dim
from .registry import DEFAULT_MODEL, ModelFileError, file_sha256
from .resolve import resolve_model
from .runtime import Runner

__all__ = ["ImageEmbedder"]

logger = logging.getLogger(__name__)

#: bump when a change alters the vectors produced for the same image and settings
FEATURE_VERSION = 2


class ImageEmbedder(TransformerMixin, BaseEstimator):
    """Embed images with a pretrained ONNX CNN truncated at intermediate layers.

    Parameters
    ----------
    model : str or path-like, default="efficientnet_lite0"
        A registered model name (see :func:`deepfeat.list_models`) or a path to
        an ``.onnx`` file with an NCHW float input.
    layers : str, list of str or None, default=None
        Layer aliases (``"stage4"``, ``"features"``, ``"pooled"``, ...) or
        tensor names (see :func:`deepfeat.list_layers`). Several layers are
        pooled separately and concatenated. ``None`` uses the model's default
        (the pooled penultimate vector for registered models).
    pooling : {"avg", "max", "gem", "none"}, default="avg"
        How feature maps become vectors; ``"none"`` flattens them. Vector
        layers (``"pooled"``, ``"logits"``) are used as they are.
    image_size : int or None, default=None
        Square crop side fed to the network; ``None`` uses the model's own.
        The resize before the crop scales with it.
    batch_size : int, default=16
        Images per ONNX Runtime call. On CPU, 16 runs as fast as 32 or 64
        (benchmarks/RESULTS.md) with a lower memory peak; a GPU wants more.
    providers : "auto", str, list, default="auto"
        ONNX Runtime execution providers: ``"auto"`` (CUDA, ROCm, OpenVINO,
        CoreML or DirectML when installed, else CPU), a name (``"cpu"``,
        ``"cuda"``, ``"tensorrt"`` or ORT's full names), ``(name, options)``
        pairs, or a list of those in order of preference. See
        :func:`deepfeat.runtime.resolve_providers`.
    strict_providers : bool, default=False
        Raise instead of warning when a requested provider is unavailable or
        fails to initialise.
    on_error : {"raise", "skip"}, default="raise"
        What a bad input does: ``"raise"`` stops with an error naming the input
        and the reason; ``"skip"`` gives a row of NaN (rows stay aligned with
        the inputs) and records the input in ``failures_``.
    progress : bool, default=True
        Show a progress bar (only when stderr is a terminal).
    n_jobs : int or None, default=None
        Threads that decode and preprocess images while the network runs;
        ``None`` uses one per core, up to 4 on CPU, all cores on a GPU.
    max_pixels : int or None, default=178956970
        Images with more pixels are refused (decompression-bomb guard).
    jpeg_draft : bool, default=True
        Decode JPEGs at least twice the model's resize size at reduced scale
        (DCT scaling; see :func:`deepfeat.images.load_image`): several times
        faster on camera photos, within the tolerance reported in
        ``benchmarks/RESULTS.md``. ``False`` decodes every pixel.
    preprocessing : dict or None, default=None
        Overrides of the model's preprocessing (``input_size``,
        ``resize_size``, ``mean``, ``std`` on the 0..255 scale,
        ``interpolation``, ``layers``), required for unregistered models that
        do not use ImageNet's torchvision preprocessing.
    cache : bool, str, path-like or None, default=None
        Folder of a persistent feature cache (see :mod:`deepfeat.cache`):
        each image's vector is computed once and read back by later
        ``transform`` calls, cross-validation folds and processes. ``True``
        uses ``$DEEPFEAT_CACHE`` or ``~/.cache/deepfeat/features``. Vectors are
        keyed by the image's content and by everything that changes them
        (model file, layers, pooling, preprocessing), so a changed setting or
        an edited file is never answered with an old vector.
    cache_key : {"content", "stat"}, default="content"
        How a file is recognised: by a hash of its bytes, or (faster, for slow
        disks) by its path, size and timestamps, which trusts the file system
        to update them on every edit. In-memory PIL images are never cached.
    inference_threads : int or None, default=None
        Threads of the ONNX Runtime session (its intra-op pool); ``None``
        lets ONNX Runtime use one per physical core. Set it when several
        embedders share a machine (Dask workers, joblib processes), e.g.
        cores // workers each, so they do not oversubscribe the cores.

    Attributes
    ----------
    spec_ : ModelSpec
        The resolved model spec, preprocessing included.
    model_path_ : pathlib.Path
        The ``.onnx`` file used.
    layers_ : list of (str, str)
        ``(label, tensor name)`` of each requested layer.
    n_features_out_ : int
        Length of the output vectors.
    providers_ : list of str
        Execution providers the session really runs on.
    failures_ : pandas.DataFrame
        After ``transform`` with ``on_error="skip"``: the inputs that failed,
        with their row position and the reason. Empty when all succeeded.
    cache_dir_ : pathlib.Path or None
        The cache folder used, ``None`` without a cache.
    cache_fingerprint_ : str
        SHA-256 of the settings that determine the vectors (the cache's key
        prefix).
    cache_stats_ : dict
        Counts of the last ``transform``: ``hits`` (rows read from the cache),
        ``misses``, ``computed`` (images run through the network),
        ``shared`` (misses another process computed meanwhile) and
        ``uncacheable``.

    See Also
    --------
    deepfeat.list_layers : the layers a model can be cut at.
    deepfeat.load_image_folder : a DataFrame of paths and labels from a folder.

    Examples
    --------
    >>> from sklearn.datasets import load_sample_images
    >>> from deepfeat import ImageEmbedder
    >>> photos = list(load_sample_images().images)  # two uint8 RGB photos
    >>> emb = ImageEmbedder(layers=["stage3", "pooled"], progress=False)
    >>> X = emb.fit_transform(photos)
    >>> X.shape, X.dtype
    ((2, 1320), dtype('float32'))
    >>> emb.get_feature_names_out()[[0, -1]].tolist()
    ['stage3_0000', 'pooled_1279']
    """

    _parameter_constraints: dict = {
        "model": [str, os.PathLike],
        "layers": [str, list, tuple, None],
        "pooling": [StrOptions(set(POOLINGS))],
        "image_size": [Interval(Integral, 8, None, closed="left"), None],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "providers": [str, list, tuple, None],
        "strict_providers": ["boolean"],
        "on_error": [StrOptions({"raise", "skip"})],
        "progress": ["boolean"],
        "n_jobs": [Interval(Integral, 1, None, closed="left"), None],
        "max_pixels": [Interval(Integral, 1, None, closed="left"), None],
        "jpeg_draft": ["boolean"],
        "preprocessing": [dict, None],
        "cache": ["boolean", str, os.PathLike, None],
        "cache_key": [StrOptions(set(KEY_MODES))],
        "inference_threads": [Interval(Integral, 1, None, closed="left"), None],
    }

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_MODEL,
        layers: str | list[str] | None = None,
        pooling: str = "avg",
        image_size: int | None = None,
        batch_size: int = 16,
        providers: Any = "auto",
        strict_providers: bool = False,
        on_error: str = "raise",
        progress: bool = True,
        n_jobs: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        jpeg_draft: bool = True,
        preprocessing: dict | None = None,
        cache: bool | str | os.PathLike | None = None,
        cache_key: str = "content",
        inference_threads: int | None = None,
    ):
        self.model = model
        self.layers = layers
        self.pooling = pooling
        self.image_size = image_size
        self.batch_size = batch_size
        self.providers = providers
        self.strict_providers = strict_providers
        self.on_error = on_error
        self.progress = progress
        self.n_jobs = n_jobs
        self.max_pixels = max_pixels
        self.jpeg_draft = jpeg_draft
        self.preprocessing = preprocessing
        self.cache = cache
        self.cache_key = cache_key
        self.inference_threads = inference_threads

    # ------------------------------------------------------------------ fit
    def fit(self, X=None, y=None):
        """Resolve the model, cut its graph at ``layers`` and open a session.

        No image is read: the embedder is not trained. ``X`` and ``y`` are
        accepted for Pipeline compatibility.
        """
        self._validate_params()
        overrides = dict(self.preprocessing or {})
        path, spec = resolve_model(self.model, **overrides)
        if self.image_size is not None:
            ratio = spec.resize_size / spec.input_size
            spec = replace(spec, input_size=self.image_size, resize_size=round(self.image_size * ratio))
        proto = graph.load_onnx(path)
        layers = spec.default_layer if self.layers is None else self.layers
        self.layers_ = graph.resolve_layers(proto, layers, spec.layers)
        self.spec_ = spec
        self.model_path_ = Path(path)
        self.model_sha256_ = spec.sha256 or file_sha256(path)
        self._build_runner(proto)
        probe = self._runner.run(np.zeros((1, 3, spec.input_size, spec.input_size), np.float32))
        for (label, tensor), p in zip(self.layers_, probe):
            if p.ndim not in (2, 4):
                raise graph.LayerError(
                    f"Layer {label!r} (tensor {tensor!r}) has shape {p.shape}; only (n, c, h, w) feature maps "
                    "and (n, d) vectors can be embedded. Pick another layer from deepfeat.list_layers(model)."
                )
        self.output_shapes_ = [tuple(p.shape[1:]) for p in probe]
        self.output_dims_ = [pooled_dim(p.shape, self.pooling) for p in probe]
        self.n_features_out_ = int(sum(self.output_dims_))
        self.failures_ = _empty_failures()
        self._fitted_params = self._vector_params()
        self.cache_dir_ = resolve_cache_dir(self.cache)
        self.cache_fingerprint_ = feature_fingerprint(self._cache_parts())
        self.cache_stats_ = dict.fromkeys(("hits", "misses", "computed", "shared", "uncacheable"), 0)
        if self.cache_dir_ is not None:
            open_cache(self.cache_dir_)  # a corrupt or unwritable cache fails here, not mid-transform
        return self

    def _cache_parts(self) -> dict:
        """Everything that changes a vector; the cache key prefix is its hash."""
        s = self.spec_
        return {
            "feature_version": FEATURE_VERSION,
            "model_sha256": self.model_sha256_,
            "tensors": [t for _, t in self.layers_],
            "pooling": self.pooling,
            "input_size": s.input_size,
            "resize_size": s.resize_size,
            "interpolation": s.interpolation,
            "mean": [float(v) for v in s.mean],
            "std": [float(v) for v in s.std],
            "channel_order": s.channel_order,
            "jpeg_draft": bool(self.jpeg_draft),
            "dims": [int(d) for d in self.output_dims_],
        }

    def _vector_params(self) -> dict:
        """The parameters that ``fit`` resolved into the session, the layers or the cache key."""
        keys = ("model", "layers", "pooling", "image_size", "preprocessing", "jpeg_draft", "cache", "cache_key")
        return copy.deepcopy({k: getattr(self, k) for k in keys})

    def _check_unchanged_since_fit(self) -> None:
        fitted = getattr(self, "_fitted_params", None)
        current = self._vector_params()
        if fitted is not None and fitted != current:
            changed = sorted(k for k in current if current[k] != fitted.get(k))
            raise ValueError(
                f"ImageEmbedder parameters {changed} changed since fit; call fit() again before transform "
                "(fit resolves them into the model session and the cache key)."
            )

    def _build_runner(self, proto=None) -> Runner:
        if proto is None:
            proto = graph.load_onnx(self._verified_model_path())
        cut = graph.truncate(proto, [t for _, t in self.layers_])
        self._runner = Runner.from_model(cut.SerializeToString(), self.providers, strict=self.strict_providers,
                                         intra_op_threads=self.inference_threads)
        self._runner_key = self._session_params()
        # on an unpickled embedder this is the machine it runs on now
        self.providers_ = self._runner.providers
        return self._runner

    def _session_params(self) -> tuple:
        """The parameters a built session depends on without changing the vectors."""
        return copy.deepcopy((self.providers, self.strict_providers, self.inference_threads))

    def _verified_model_path(self) -> Path:
        """The fitted model file, found again and checked when the session is rebuilt
        (after unpickling, possibly on another machine)."""
        path = self.model_path_
        if path.is_file() and file_sha256(path) == self.model_sha256_:
            return path
        found, _ = resolve_model(self.model, **dict(self.preprocessing or {}))
        digest = file_sha256(found)
        if digest != self.model_sha256_:
            raise ModelFileError(
                f"The model file {found} has sha256 {digest}, but this embedder was fitted with "
                f"{self.model_sha256_} ({path}). Refit the embedder, or restore the original file."
            )
        self.model_path_ = Path(found)
        return self.model_path_

    def _get_runner(self) -> Runner:
        runner = getattr(self, "_runner", None)
        if runner is None or getattr(self, "_runner_key", None) != self._session_params():
            # no session yet (unpickled), or providers/threads changed with set_params: (re)build it
            return self._build_runner()
        return runner

    # ------------------------------------------------------------ transform
    def transform(self, X) -> np.ndarray:
        """Embed images.

        Parameters
        ----------
        X : list, ndarray, pandas Series or one-column DataFrame
            Image paths (str or Path), PIL images, or ``uint8`` arrays; a 4-D
            ``uint8`` array is a batch of ``(h, w, c)`` images.

        Returns
        -------
        ndarray of shape (n_images, n_features_out_), float32
        """
        check_is_fitted(self, "layers_")
        self._check_unchanged_since_fit()
        items = _as_items(X)
        out = np.empty((len(items), self.n_features_out_), dtype=np.float32)
        failures: list[tuple[int, str, str]] = []
        if getattr(self, "cache_dir_", None) is None:
            computed = 0
            for idx, batch in self._stream(items, failures):
                feats = self._infer(batch)
                out[idx] = feats
                computed += len(idx)
            self.cache_stats_ = {"hits": 0, "misses": 0, "computed": computed, "shared": 0, "uncacheable": 0}
        else:
            self.cache_stats_ = cached_compute(
                open_cache(self.cache_dir_),
                self.cache_fingerprint_,
                items,
                out,
                lambda positions: self._compute_at(items, positions, failures),
                key_mode=self.cache_key,
                description={"model": self.spec_.name, "layers": [l for l, _ in self.layers_], **self._cache_parts()},
                chunk=max(512, 4 * self.batch_size),
                threads=self.n_jobs or _default_decode_threads(on_device=False),
            )
            failures.sort(key=lambda f: f[0])
        if failures:
            out[[i for i, _, _ in failures]] = np.nan
            logger.warning("%d of %d images failed and were given NaN rows", len(failures), len(items))
        self.failures_ = pd.DataFrame(failures, columns=["position", "source", "reason"])
        return out

    def _compute_at(self, items: list, positions, failures: list) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Run the network on ``items[positions]``: yield ``(positions, features)``
        batches; failures are recorded with their position in ``items``."""
        positions = np.asarray(positions, dtype=np.intp)
        local: list = []
        try:
            for idx, batch in self._stream([items[i] for i in positions], local):
                yield positions[idx], self._infer(batch)
        finally:
            failures.extend((int(positions[f[0]]),) + tuple(f[1:]) for f in local)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        outputs = self._get_runner().run(batch)
        return np.concatenate([pool(o, self.pooling) for o in outputs], axis=1)

    def _decode(self, item) -> np.ndarray:
        s = self.spec_
        img = load_image(item, max_pixels=self.max_pixels, draft_side=s.resize_size if self.jpeg_draft else None)
        x = preprocess(
            img, input_size=s.input_size, resize_size=s.resize_size,
            mean=s.mean, std=s.std, interpolation=s.interpolation,
        )
        # networks converted from Caffe expect BGR planes
        return np.ascontiguousarray(x[::-1]) if s.channel_order == "BGR" else x

    def _decode_safe(self, item):
        try:
            return self._decode(item)
        except ImageDecodeError as exc:
            return exc
        except Exception as exc:  # e.g. MemoryError in preprocess: one bad file must not end a long job
            err = ImageDecodeError(describe(item), f"cannot decode or preprocess ({type(exc).__name__}: {exc})")
            err.__cause__ = exc
            return err

    def _stream(self, items: list, failures: list) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(row positions, NCHW batch)``, decoding the next batch while
        the caller runs the network on this one."""
        n = len(items)
        workers = self.n_jobs or _default_decode_threads(self._get_runner().on_device)
        bar = _progress(n, self.progress)
        try:
            yield from self._stream_batches(items, workers, bar, failures)
        finally:
            if bar is not None:
                bar.close()

    def _stream_batches(self, items: list, workers: int, bar, failures: list):
        n = len(items)
        bs = self.batch_size
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deepfeat-decode") as pool_:
            def submit(start):
                return [pool_.submit(self._decode_safe, items[i]) for i in range(start, min(start + bs, n))]

            pending = submit(0) if n else []
            for start in range(0, n, bs):
                current = pending
                nxt = start + bs
                pending = submit(nxt) if nxt < n else []
                arrays, positions = [], []
                for offset, fut in enumerate(current):
                    res = fut.result()
                    pos = start + offset
                    if isinstance(res, ImageDecodeError):
                        if self.on_error == "raise":
                            for f in pending:
                                f.cancel()
                            raise res
                        logger.warning("skipping %s", res)
                        failures.append((pos, res.source, res.reason))
                        continue
                    arrays.append(res)
                    positions.append(pos)
                if arrays:
                    yield np.asarray(positions), np.stack(arrays)
                if bar is not None:
                    bar.update(len(current))

    # --------------------------------------------------------- sklearn glue
    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        """Names ``<layer>_<index>``, e.g. ``stage4_0017``, one per output column."""
        check_is_fitted(self, "layers_")
        names = []
        for (label, _), dim in zip(self.layers_, self.output_dims_):
            prefix = re.sub(r"[^0-9A-Za-z]+", "_", label).strip("_")
            names += [f"{prefix}_{i:04d}" for i in range(dim)]
        return np.asarray(names, dtype=object)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_runner", None)  # ORT sessions do not pickle; rebuilt on first use
        return state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        tags.requires_fit = True
        return tags


def _default_decode_threads(on_device: bool) -> int:
    # on CPU the network and the decoders share the cores; a GPU needs every core decoding to stay fed
    cores = os.cpu_count() or 1
    return cores if on_device else max(1, min(4, cores))


def _empty_failures() -> pd.DataFrame:
    return pd.DataFrame(columns=["position", "source", "reason"])


def _progress(total: int, enabled: bool):
    if not enabled or total == 0 or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="embedding")


def _as_items(X) -> list:
    """Normalise the accepted input containers to a list of items."""
    if isinstance(X, (str, os.PathLike)):
        raise TypeError(
            f"ImageEmbedder expects a collection of images, got the single path {os.fspath(X)!r}. "
            "Wrap it in a list, or use deepfeat.load_image_folder(folder)['path'] for a folder."
        )
    if isinstance(X, pd.DataFrame):
        if X.shape[1] == 1:
            return list(X.iloc[:, 0])
        if "path" in X.columns:
            return list(X["path"])
        raise ValueError(
            f"A DataFrame given to ImageEmbedder needs one column or a 'path' column; got {list(X.columns)}. "
            "Select the image column, e.g. ColumnTransformer([('img', ImageEmbedder(), ['path'])])."
        )
    if isinstance(X, pd.Series):
        return list(X)
    if isinstance(X, Image.Image):
        return [X]
    if isinstance(X, np.ndarray):
        if X.dtype == np.uint8 and X.ndim == 4:
            return list(X)
        if X.dtype == np.uint8 and X.ndim in (2, 3):
            raise ValueError(
                f"Got one uint8 array of shape {X.shape}; pass a list of images, or a 4-D (n, h, w, c) batch."
            )
        if X.ndim == 2 and X.shape[1] == 1:
            return list(X[:, 0])
        if X.ndim == 1:
            return list(X)
        raise ValueError(f"Cannot read images from an array of shape {X.shape} and dtype {X.dtype}.")
    return list(X)
