"""ImageEmbedder: the scikit-learn transformer that turns images into feature vectors."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import fields, replace
from functools import partial
from numbers import Integral
from pathlib import Path
from types import MappingProxyType
from typing import Any

import joblib
import numpy as np
import pandas as pd
from PIL import Image
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from . import graph
from .cache import NullStore, open_cache, resolve_cache_dir
from .engine import Layer, embed
from .images import DEFAULT_MAX_PIXELS, network_input
from .keys import KEY_MODES, feature_fingerprint
from .pooling import POOLINGS, pooled_dim
from .registry import DEFAULT_MODEL, ModelFileError, ModelSpec, _rebuild_spec, model_sha256
from .resolve import layer_shapes, model_summary, resolve_model
from .runtime import on_device, resolve_providers
from .sessions import get_runner

__all__ = ["ImageEmbedder"]

logger = logging.getLogger(__name__)

#: bump when a change alters the vectors produced for the same image and settings
FEATURE_VERSION = 3


class ImageEmbedder(TransformerMixin, BaseEstimator):
    """Embed images with a pretrained ONNX CNN truncated at intermediate layers.

    Parameters
    ----------
    model : str or path-like, default="efficientnet_lite0"
        A registered model name (see :func:`deepfeat.list_models`) or a path to
        an ``.onnx`` file with an NCHW float input.
    layers : str, list or None, default=None
        Layer aliases (``"stage4"``, ``"features"``, ``"pooled"``, ...) or
        tensor names (see :func:`deepfeat.list_layers`). Several layers are
        pooled separately and concatenated, all from one network pass. An
        entry may be a ``(layer, pooling)`` pair to pool that layer its own
        way (its columns are then named ``<layer>_<pooling>_0000``...), e.g.
        ``[("stage5", "gem"), "pooled"]``. ``None`` uses the model's default
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
    tta : {None, "flip"}, default=None
        Test-time augmentation: ``"flip"`` embeds each image and its
        horizontal mirror in the same batch and returns the mean of the two
        vectors (twice the network time). Cached under its own key, apart
        from plain vectors.
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
    poolings_ : list of str
        The pooling of each layer (``pooling``, or the one its pair names).
    n_features_out_ : int
        Length of the output vectors.
    providers_ : list of str
        After ``fit``, the available providers in the order asked (no
        session is opened by ``fit``); after a ``transform`` that ran the
        network, those the session really runs on.
    failures_ : pandas.DataFrame
        After ``transform`` with ``on_error="skip"``: the inputs that failed,
        with their row position and the reason. Empty when all succeeded.
    cache_dir_ : pathlib.Path or None
        The cache folder used, ``None`` without a cache.
    cache_fingerprint_ : str
        SHA-256 identifying the settings that determine the vectors; the
        cache keys each layer's vectors by its own fingerprint (model file,
        tensor, pooling, preprocessing), so layers are shared between
        embedders that ask for them in other combinations.
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
        "tta": [StrOptions({"flip"}), None],
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
        tta: str | None = None,
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
        self.tta = tta

    # ------------------------------------------------------------------ fit
    def fit(self, X=None, y=None):
        """Resolve the model, its preprocessing and ``layers``; check them. No image is read.

        Fitting is cheap and opens no ONNX Runtime session: the model file's
        hash, its tensors and the layers' shapes are memoised per process
        (keyed by the file's stat and content hash), and the session is built
        on the first image that must go through the network, then shared by
        every embedder of the process with the same model, layers, providers
        and threads (:mod:`deepfeat.sessions`). What fit refuses: invalid
        parameters, an unknown layer, a bad or tampered model file, an
        unavailable provider with ``strict_providers=True``, an unusable
        cache. ``X`` and ``y`` are accepted for Pipeline compatibility.
        """
        self._validate_params()
        overrides = dict(self.preprocessing or {})
        path, spec = resolve_model(self.model, **overrides)
        if self.image_size is not None:
            ratio = spec.resize_size / spec.input_size
            spec = replace(spec, input_size=self.image_size, resize_size=round(self.image_size * ratio))
        # the pinned digest when there is one; else hashed (external-data weights included)
        sha = spec.sha256 if spec.sha256 and not spec.sha256_also else model_sha256(path)
        layers = spec.default_layer if self.layers is None else self.layers
        summary = model_summary(str(path), sha, spec.input_size)
        _check_input(summary.input_shape, spec.input_size, path)
        if not summary.produced:
            raise ModelFileError(f"The model file {path} computes no tensor (its graph has no nodes): there is no "
                                 "layer to embed. Check that the file is the network you meant.")
        self.layers_, self.poolings_ = _resolve_layer_poolings(summary, layers, spec.layers, self.pooling)
        tensors = tuple(t for _, t in self.layers_)
        shapes = layer_shapes(str(path), sha, tensors, spec.input_size, "none" in self.poolings_)
        for (label, tensor), shape in zip(self.layers_, shapes):
            if len(shape) not in (2, 4):
                raise graph.LayerError(
                    f"Layer {label!r} (tensor {tensor!r}) has shape {shape}; only (n, c, h, w) feature maps "
                    "and (n, d) vectors can be embedded. Pick another layer from deepfeat.list_layers(model)."
                )
        # ProviderError here, not at the first image, when strict and unavailable
        self.providers_ = [name for name, _ in resolve_providers(self.providers, strict=self.strict_providers)]
        self.spec_ = spec
        self.model_path_ = Path(path)
        self.model_sha256_ = sha
        self.output_shapes_ = [tuple(s[1:]) for s in shapes]
        self.output_dims_ = [pooled_dim(s, p) for s, p in zip(shapes, self.poolings_)]
        self.n_features_out_ = int(sum(self.output_dims_))
        self._build_plan()
        self.failures_ = _empty_failures()
        self._fitted_hashes = self._vector_params()
        self.cache_dir_ = resolve_cache_dir(self.cache)
        self.cache_stats_ = dict.fromkeys(("hits", "misses", "computed", "shared", "uncacheable"), 0)
        if self.cache_dir_ is not None:
            open_cache(self.cache_dir_)  # a corrupt or unwritable cache fails here, not mid-transform
        return self

    def _build_plan(self) -> None:
        """The engine's view of the fitted state: claims scope, and one Layer per output block."""
        self._scope = feature_fingerprint(self._pass_parts())
        poolings = getattr(self, "poolings_", None) or [self.pooling] * len(self.layers_)  # pickles of 0.1.0
        self._plan = [
            Layer(label, tensor, pooling, dim, feature_fingerprint(self._layer_parts(tensor, shape, dim, pooling)),
                  self._layer_description(label, tensor, pooling))
            for (label, tensor), shape, dim, pooling in zip(self.layers_, self.output_shapes_, self.output_dims_,
                                                             poolings)
        ]
        self.cache_fingerprint_ = feature_fingerprint({"layers": [layer.fingerprint for layer in self._plan]})

    def _pass_parts(self) -> dict:
        """What decides how an image is decoded and run: the claims scope, and part of every fingerprint."""
        s = self.spec_
        return {
            "feature_version": FEATURE_VERSION,
            "model_sha256": self.model_sha256_,
            "input_size": s.input_size,
            "resize_size": s.resize_size,
            "interpolation": s.interpolation,
            "mean": [float(v) for v in s.mean],
            "std": [float(v) for v in s.std],
            "channel_order": s.channel_order,
            "jpeg_draft": bool(self.jpeg_draft),
            "tta": self.tta,
        }

    def _layer_parts(self, tensor: str, shape: tuple, dim: int, pooling: str) -> dict:
        """Everything that changes one layer's vector; its hash keys the layer's vectors in the cache."""
        # pooling does nothing to a (n, d) vector: one stored copy serves every pooling
        pooling = "vector" if len(shape) == 1 else pooling  # shape without the batch axis
        return {**self._pass_parts(), "tensor": tensor, "pooling": pooling, "dim": int(dim)}

    def _layer_description(self, label: str, tensor: str, pooling: str) -> dict:
        s = self.spec_
        return {"model": s.name, "layers": [label], "tensor": tensor, "pooling": pooling,
                "input_size": s.input_size, "model_sha256": self.model_sha256_}

    def _vector_params(self) -> dict:
        """The parameters that ``fit`` resolved into the layers or the cache keys."""
        keys = ("model", "layers", "pooling", "image_size", "preprocessing", "jpeg_draft", "cache", "cache_key", "tta")
        # hashed, not copied: a numpy mean/std compares without "truth value of an array is ambiguous"
        return {k: joblib.hash(getattr(self, k)) for k in keys}

    def _check_unchanged_since_fit(self) -> None:
        fitted = getattr(self, "_fitted_hashes", None)
        current = self._vector_params()
        if fitted is not None and fitted != current:
            changed = sorted(k for k in current if current[k] != fitted.get(k))
            raise ValueError(
                f"ImageEmbedder parameters {changed} changed since fit; call fit() again before transform "
                "(fit resolves them into the layers and the cache keys)."
            )

    def _network(self, tensors: tuple[str, ...]) -> Any:  # a Runner: what engine.embed calls `network`
        """The shared session of the fitted model cut at ``tensors`` (built on first use)."""
        return get_runner(
            self.model_path_, self.model_sha256_, tensors, self.providers,
            strict=self.strict_providers, threads=self.inference_threads, locate=self._locate_model,
        )

    def _locate_model(self) -> Path:
        # an unpickled embedder on another machine: find the file again by name; get_runner checks its hash
        from .registry import _REGISTRY

        spec = _REGISTRY.get(str(self.model))
        # the fitted file is now registered under another name (resnet50's Computer_Vision export is
        # resnet50_unverified): the name means another file, whether pinned or made by deepfeat export
        moved = [s.name for s in _REGISTRY.values() if s.name != self.model and self.model_sha256_ in s.accepted_sha256]
        if spec is not None and (spec.sha256 or moved) and self.model_sha256_ not in spec.accepted_sha256:
            # the name now means another file: say so before downloading or exporting it
            now = f"the file with sha256 {spec.sha256}" if spec.sha256 else "a file made by deepfeat export"
            where = f"; the file it was fitted on is now registered as {moved[0]!r}" if moved else ""
            raise ModelFileError(
                f"This embedder was fitted on model {self.model!r} with sha256 {self.model_sha256_}, but that "
                f"name now means {now} ({spec.description}){where}. Refit the embedder "
                f"(or pass the old file's path as model=)."
            )
        found, _ = resolve_model(self.model, **dict(self.preprocessing or {}))
        self.model_path_ = Path(found)
        return self.model_path_

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
        if not hasattr(self, "_plan"):  # fitted (and pickled) by deepfeat 0.1.0, before the engine
            self._build_plan()
        items = _as_items(X)
        s = self.spec_
        decode = partial(
            network_input, input_size=s.input_size, resize_size=s.resize_size, mean=s.mean, std=s.std,
            interpolation=s.interpolation, channel_order=s.channel_order, max_pixels=self.max_pixels,
            draft=self.jpeg_draft,
        )
        store = NullStore() if self.cache_dir_ is None else open_cache(self.cache_dir_)
        result = embed(
            items, self._plan, decode=decode, network=self._network, store=store, scope=self._scope,
            key_mode=self.cache_key, batch_size=self.batch_size, on_error=self.on_error,
            decode_threads=self.n_jobs or _default_decode_threads(on_device(self.providers_)),
            # a caller running several passes (select_layer) names each bar
            progress=(getattr(self, "_progress_label", None) or True) if self.progress else False,
            tta=getattr(self, "tta", None),
        )
        if result.failures:
            logger.warning("%d of %d images failed and were given NaN rows", len(result.failures), len(items))
        self.failures_ = (pd.DataFrame(result.failures, columns=["position", "source", "reason"])
                          if result.failures else _empty_failures())
        self.cache_stats_ = result.stats
        if result.providers is not None:
            self.providers_ = result.providers  # what the session really runs on
        return result.X

    # --------------------------------------------------------- sklearn glue
    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        """Names ``<layer>_<index>``, e.g. ``stage4_0017``, one per output column."""
        check_is_fitted(self, "layers_")
        names = []
        for (label, _), dim in zip(self.layers_, self.output_dims_):
            prefix = re.sub(r"[^0-9A-Za-z]+", "_", label).strip("_")
            names += [f"{prefix}_{i:04d}" for i in range(dim)]
        return np.asarray(names, dtype=object)

    def __getstate__(self) -> dict:
        # plain values only: the spec as a dict, failures as records, so that skops (which
        # rebuilds only types it is told to trust) can save a fitted embedder as well as pickle
        state = dict(super().__getstate__())
        if isinstance(state.get("spec_"), ModelSpec):
            spec = state["spec_"]
            state["spec_"] = {f.name: (dict(getattr(spec, f.name)) if f.name == "layers" else getattr(spec, f.name))
                              for f in fields(spec)}
        if isinstance(state.get("failures_"), pd.DataFrame):
            state["failures_"] = [tuple(r) for r in state["failures_"].itertuples(index=False)]
        for key in ("model_path_", "cache_dir_"):
            if isinstance(state.get(key), Path):
                state[key] = str(state[key])
        if "_plan" in state:
            state["_plan"] = [
                {"label": la.label, "tensor": la.tensor, "pooling": la.pooling, "dim": la.dim,
                 "fingerprint": la.fingerprint, "description": dict(la.description)}
                for la in state["_plan"]
            ]
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        if "tta" not in state:  # fitted by deepfeat 0.1.0, before the parameter existed
            state["tta"] = None
        if isinstance(state.get("_fitted_params"), dict) and "_fitted_hashes" not in state:
            # 0.1.0 kept the fitted values themselves; compare by hash as fit does now
            old = {"tta": None, **state.pop("_fitted_params")}
            state["_fitted_hashes"] = {k: joblib.hash(v) for k, v in old.items()}
        if isinstance(state.get("spec_"), dict):
            spec = dict(state["spec_"])
            spec["layers"] = MappingProxyType(dict(spec.get("layers") or {}))
            for k in ("mean", "std"):
                if k in spec:
                    spec[k] = tuple(spec[k])
            state["spec_"] = _rebuild_spec(spec)
        if isinstance(state.get("failures_"), list):
            state["failures_"] = (pd.DataFrame(state["failures_"], columns=["position", "source", "reason"])
                                  if state["failures_"] else _empty_failures())
        for key in ("model_path_", "cache_dir_"):
            if isinstance(state.get(key), str):
                state[key] = Path(state[key])
        if state.get("_plan") and isinstance(state["_plan"][0], dict):
            state["_plan"] = [Layer(**la) for la in state["_plan"]]
        super().__setstate__(state)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        tags.requires_fit = True
        return tags


def _resolve_layer_poolings(summary, layers, aliases, default_pooling: str) -> tuple[list, list]:
    """``layers`` -> ``[(label, tensor)]`` and one pooling each.

    An entry is a layer name (pooled with ``pooling``) or a ``(layer, pooling)`` pair,
    labelled ``<layer>_<pooling>``; one tensor may come twice under two poolings.
    """
    entries = [layers] if isinstance(layers, str) else list(layers)
    if not entries:
        raise graph.LayerError("At least one layer is needed; got an empty list.")
    resolved: list[tuple[str, str]] = []
    poolings: list[str] = []
    seen: dict[tuple[str, str], str] = {}
    for entry in entries:
        if isinstance(entry, str):
            name, pooling, label = entry, default_pooling, entry
        elif (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)
              and entry[1] in POOLINGS):
            name, pooling = entry
            label = f"{name}_{pooling}"
        else:
            raise ValueError(
                f"The 'layers' parameter of ImageEmbedder takes layer names or (layer, pooling) pairs with a "
                f"pooling among {list(POOLINGS)}; got {entry!r}."
            )
        ((_, tensor),) = graph.resolve_layers(summary, [name], aliases)
        twin = seen.get((tensor, pooling))
        if twin is not None:
            raise graph.LayerError(
                f"Layers {twin!r} and {name!r} are the same tensor {tensor!r} with the same pooling "
                f"{pooling!r}; ask for it once."
            )
        seen[(tensor, pooling)] = name
        resolved.append((label, tensor))
        poolings.append(pooling)
    return resolved, poolings


def _check_input(shape: tuple, size: int, path) -> None:
    """Refuse, naming the file, a model whose declared input cannot take (batch, 3, size, size)."""
    want = f"(batch, 3, {size}, {size})"
    if not shape:
        raise ModelFileError(f"The model file {path} has no image input (its graph declares no input that is not a "
                             f"weight); deepfeat feeds images as {want}. Use a CNN with an NCHW RGB input.")
    if len(shape) != 4 or shape[1] not in (None, 3):
        raise ModelFileError(
            f"The model file {path} declares its input as {shape}; deepfeat feeds images as {want}. "
            "Use a CNN with an NCHW RGB input."
        )
    fixed = [d for d in shape[2:] if d is not None]
    if fixed and any(d != size for d in fixed):
        raise ModelFileError(
            f"The model file {path} declares a fixed input of {shape}, but deepfeat would feed {want}. "
            f"Set preprocessing={{'input_size': {fixed[0]}}} (if that size is sensible), or re-export it "
            "with dynamic height and width."
        )


def _default_decode_threads(device: bool) -> int:
    # on CPU the network and the decoders share the cores; a GPU needs every core decoding to stay fed
    cores = os.cpu_count() or 1
    return cores if device else max(1, min(4, cores))


_NO_FAILURES = pd.DataFrame(columns=["position", "source", "reason"])


def _empty_failures() -> pd.DataFrame:
    return _NO_FAILURES.copy(deep=False)  # building a new empty frame costs more than the warm read itself


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
        raise ValueError(
            f"Cannot read images from an array of shape {X.shape} and dtype {X.dtype}. ImageEmbedder takes "
            "a list (or 1-D array, Series, one-column DataFrame) of paths, PIL images or uint8 (h, w[, c]) "
            "arrays, or a uint8 (n, h, w, c) batch; features (a float matrix) go to the next pipeline step."
        )
    return list(X)
