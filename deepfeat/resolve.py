"""Model resolution: a model name or file becomes a checked file and its spec.

A registered name is looked up in :mod:`deepfeat.registry`, its file found on
the search path (or downloaded / exported on first use) and checked against
its sha256; a file path gets the preprocessing recorded in it. Layer aliases
of Model Zoo files are derived from their graphs here.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from typing import Any, Mapping

import numpy as np
import onnx
import pandas as pd

from . import registry
from .aliases import derive_aliases
from .download import fetch_model
from .graph import (GraphSummary, ProbeTimeoutError, has_loops, inference_exact, inferred_shapes, input_shape,
                    layer_table, load_onnx, probe_shapes)
from .registry import ModelSpec

__all__ = ["resolve_model", "check_preprocessing", "list_layers", "model_summary", "layer_shapes"]

#: keys of ``ImageEmbedder(preprocessing=...)`` and what each must be
PREPROCESSING_KEYS = {
    "input_size": "an int >= 8 (the square crop side)",
    "resize_size": "an int >= 1 (the shorter side before the crop)",
    "mean": "3 numbers, one per RGB channel on the 0..255 scale, e.g. (123.675, 116.28, 103.53)",
    "std": "3 positive numbers on the 0..255 scale, e.g. (58.395, 57.12, 57.375)",
    "interpolation": "one of {}",
    "channel_order": "'RGB' or 'BGR'",
    "layers": "a dict of layer alias -> tensor name",
    "default_layer": "a layer alias or tensor name (str)",
}


def resolve_model(model: str | os.PathLike, **overrides) -> tuple[Path, ModelSpec]:
    """Find the file for ``model`` and check it; return ``(path, spec)``.

    ``model`` is a registry name or a path to a ``.onnx`` file. For a path,
    ``overrides`` give the preprocessing (``input_size``, ``resize_size``,
    ``mean``, ``std``, ``interpolation``, ``layers``); without them the
    ImageNet defaults of the torchvision family are used (224, 256,
    mean/std of ImageNet on the 0..255 scale), unless the file records its
    own (``deepfeat export``, :mod:`deepfeat.quantize`). For a registry
    name, ``overrides`` replace fields of the registered spec; a file not on
    disk is downloaded or exported (:func:`deepfeat.download.fetch_model`)
    and every registered file is checked against its sha256.

    Examples
    --------
    >>> path, spec = resolve_model("efficientnet_lite0")
    >>> path.name, spec.layers["stage4"]
    ('efficientnet_lite0.onnx', 'blocks.10')
    """
    overrides = check_preprocessing({k: v for k, v in overrides.items() if v is not None})
    name = os.fspath(model)
    if name in registry._REGISTRY:
        spec = registry._REGISTRY[name]
        path = registry._find_file(spec.filename)
        if path is None:
            path = fetch_model(spec)
        digest = registry.file_sha256(path)
        if not spec.accepted_sha256:
            # made on this machine by deepfeat export: no digest can be pinned, the file must be the recipe's
            _check_export(path, digest, spec)
        elif digest not in spec.accepted_sha256:
            raise registry.ModelFileError(
                f"Model file {path} has sha256 {digest}, but {spec.name!r} expects "
                f"{' or '.join(spec.accepted_sha256)}. The file is corrupt or a different version: delete it "
                "and reinstall deepfeat (or re-download / re-export it)."
            )
        elif spec.derive_layers or spec.check_trained:
            input_size = overrides.get("input_size", spec.input_size)
            derived, untrained = _graph_checks(str(path), digest, input_size, spec.check_trained)
            if untrained is not None:
                raise registry.ModelFileError(
                    f"The file {path} of model {spec.name!r} matches its published sha256 but holds untrained "
                    f"weights ({untrained}): its publisher exported it without loading the "
                    f"pretrained weights, so its features would be noise. Use a model whose weights are known "
                    f"to be trained instead (deepfeat models, column 'trained'), or make the file from the "
                    f"pretrained weights with `deepfeat export torchvision:NAME` (pip install \"deepfeat[export]\") "
                    f"and pass its path as model=."
                )
            if spec.derive_layers:
                spec = replace(spec, layers={**derived, **spec.layers})
        return path, replace(spec, **overrides) if overrides else spec
    path = Path(name).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Model {name!r} is neither a registered name ({sorted(registry._REGISTRY)}) "
            "nor an existing .onnx file."
        )
    defaults: dict[str, Any] = dict(
        name=str(path),
        filename=path.name,
        sha256=None,
        input_size=224,
        resize_size=256,
        mean=registry.IMAGENET_MEAN,
        std=registry.IMAGENET_STD,
        default_layer="output",
    )
    st = path.stat()
    stamp = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    recorded, declared = _file_header(*stamp)
    defaults.update(recorded)
    if "input_size" not in recorded and "input_size" not in overrides:
        # a file that fixes its input side (Inception at 299) is measured and fed at that side
        side = _fixed_side(declared)
        if side is not None:
            defaults.update(input_size=side, resize_size=round(side / 0.875))
    defaults.update(overrides)
    if not recorded.get("layers"):
        # a file made by others: the standard aliases from its graph (explicit layers win)
        derived = _derived_or_nothing(*stamp, int(defaults["input_size"]))
        defaults["layers"] = {**derived, **dict(defaults.get("layers") or {})}
    return path, registry.ModelSpec(**defaults)


def _check_export(path: Path, digest: str, spec: ModelSpec) -> None:
    """Refuse a file that is not ``deepfeat export``'s output of ``spec``'s recipe, or holds random weights.

    What is checked, since an export made on the user's machine has no pinned sha256: the
    metadata record ``deepfeat export`` writes names this recipe and pretrained weights, and
    records the registered preprocessing and aliases; every alias is a tensor of the graph;
    and (``check_trained``) the weights are not an initialisation.
    """
    record, produced, untrained = _export_facts(str(path), digest)
    fix = f"Delete it and run `deepfeat export {spec.name}` (needs pip install \"deepfeat[export]\")."
    problems = []
    if record.get("recipe") != spec.exporter:
        problems.append(f"it records the recipe {record.get('recipe')!r}, the model is made by {spec.exporter!r}"
                        if record else "it carries no deepfeat export record")
    else:
        for key in ("input_size", "resize_size", "interpolation", "mean", "std"):
            want, got = getattr(spec, key), record.get(key)
            same = (isinstance(got, list) and len(got) == 3 and all(isinstance(v, (int, float)) for v in got)
                    and np.allclose(got, want, rtol=0, atol=1e-6) if key in ("mean", "std") else got == want)
            if not same:
                problems.append(f"{key} {got!r} where the registry has {want!r}")
        if record.get("layers") != dict(spec.layers):
            problems.append(f"layers {record.get('layers')!r} where the registry has {dict(spec.layers)!r}")
    missing = [t for t in spec.layers.values() if t not in produced]
    if missing:
        problems.append(f"the graph has no tensor {missing}")
    if problems:
        raise registry.ModelFileError(
            f"The file {path} is not deepfeat's export of model {spec.name!r}: {'; '.join(problems)}. {fix}")
    if record.get("weights") != "pretrained" or (spec.check_trained and untrained is not None):
        why = untrained if untrained is not None else f"its record says weights {record.get('weights')!r}"
        raise registry.ModelFileError(
            f"The file {path} of model {spec.name!r} holds untrained weights ({why}): it was exported "
            f"without its pretrained weights, so its features would be noise. {fix}")


@lru_cache(maxsize=16)
def _export_facts(path: str, sha256: str) -> tuple[dict, frozenset, str | None]:
    """The deepfeat export record of a checked file, the tensors its graph computes, and why its
    weights look untrained (or ``None``): one read and parse, memoised by the file's hash."""
    proto = _load_checked(path, sha256)
    props = {p.key: p.value for p in proto.metadata_props}
    try:
        record = json.loads(props.get(registry.METADATA_KEY, "{}"))
    except ValueError:
        record = {}
    produced = frozenset(o for n in proto.graph.node for o in n.output)
    return (record if isinstance(record, dict) else {}), produced, untrained_reason(proto)


def check_preprocessing(preprocessing: Mapping | None) -> dict:
    """Validate ``preprocessing`` overrides; return them normalised (mean/std as tuples of float).

    The one place preprocessing is checked: the user's values override the
    model's (recorded in the file or registered), which override the
    library's defaults, and a mistake is reported here, naming the key, the
    value and what is allowed, never later as an image that "fails to decode".

    Examples
    --------
    >>> import numpy as np
    >>> check_preprocessing({"mean": np.array([127.0] * 3), "input_size": 300})
    {'mean': (127.0, 127.0, 127.0), 'input_size': 300}
    >>> check_preprocessing({"input_szie": 300})
    Traceback (most recent call last):
    ...
    ValueError: The 'preprocessing' parameter has an unknown key 'input_szie' (did you mean 'input_size'?). Allowed keys: ['channel_order', 'default_layer', 'input_size', 'interpolation', 'layers', 'mean', 'resize_size', 'std'].
    """
    import difflib
    from numbers import Integral

    from .images import INTERPOLATIONS

    if preprocessing is None:
        return {}
    if not isinstance(preprocessing, Mapping):
        raise ValueError(f"The 'preprocessing' parameter must be a dict or None; got {preprocessing!r}.")
    out: dict = {}
    for key, value in preprocessing.items():
        if key not in PREPROCESSING_KEYS:
            close = difflib.get_close_matches(str(key), PREPROCESSING_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"The 'preprocessing' parameter has an unknown key {key!r}{hint}. "
                f"Allowed keys: {sorted(PREPROCESSING_KEYS)}."
            )
        ok = True
        if key in ("input_size", "resize_size"):
            ok = isinstance(value, Integral) and not isinstance(value, bool) and int(value) >= (
                8 if key == "input_size" else 1)
            value = int(value) if ok else value
        elif key in ("mean", "std"):
            try:
                arr = np.asarray(value, dtype=np.float64).ravel()
                ok = isinstance(value, (list, tuple, np.ndarray)) and arr.shape == (3,) and bool(np.isfinite(arr).all())
                ok = ok and (key == "mean" or bool((arr > 0).all()))
            except (TypeError, ValueError):
                ok = False
            value = tuple(float(v) for v in arr) if ok else value
        elif key == "interpolation":
            ok = value in INTERPOLATIONS
        elif key == "channel_order":
            ok = value in ("RGB", "BGR")
        elif key == "layers":
            ok = isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
        elif key == "default_layer":
            ok = isinstance(value, str)
        if not ok:
            allowed = PREPROCESSING_KEYS[key].format(sorted(INTERPOLATIONS))
            raise ValueError(f"The 'preprocessing' parameter's {key!r} must be {allowed}; got {value!r}.")
        out[key] = value
    return out


def list_layers(
    model: "str | os.PathLike | onnx.ModelProto" = "efficientnet_lite0",
    *,
    input_size: int | None = None,
    aliases_only: bool = False,
) -> pd.DataFrame:
    """Candidate tensors to cut the model at.

    Parameters
    ----------
    model : str, path or onnx.ModelProto
        A registry name, an ``.onnx`` path, or a loaded model.
    input_size : int, optional
        Square input side used for the shapes (default: the model's own,
        224 for unregistered files).
    aliases_only : bool
        Keep only the rows that have an alias (stages, features, pooled, logits).

    Returns
    -------
    pandas.DataFrame
        Columns ``name`` (tensor), ``alias``, ``op_type``, ``shape`` (batch
        first), ``channels``, ``reduction`` (the stride: input side / map side,
        rounded to a power of two) and ``also`` (further aliases of the same
        tensor, e.g. ``features`` beside ``stage5``), in graph order.

    Examples
    --------
    >>> from deepfeat import list_layers
    >>> df = list_layers("efficientnet_lite0", aliases_only=True)
    >>> int(df.set_index("alias").loc["pooled", "channels"])
    1280
    """
    if isinstance(model, onnx.ModelProto):
        return layer_table(model, input_size=input_size or 224, aliases_only=aliases_only)
    path, spec = resolve_model(model)
    try:
        return layer_table(load_onnx(path), spec.layers, input_size=input_size or spec.input_size,
                           aliases_only=aliases_only)
    except ProbeTimeoutError as exc:
        raise registry.ModelFileError(f"The model file {path} was refused: {exc}.") from None


@lru_cache(maxsize=64)
def _file_header(path: str, *stamp: int) -> tuple[dict, tuple]:
    """What a file says of itself: the preprocessing and aliases ``deepfeat export``
    stored in it (if any), and the declared shape of its image input.

    Memoised by the file's stat (``stamp``): a fit reads the file once per process.
    Callers get the cached dict: they copy it (``dict.update``), never change it."""
    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except Exception:  # not ONNX: graph.load_onnx reports it with a better message
        return {}, ()
    declared = input_shape(proto)
    props = {p.key: p.value for p in proto.metadata_props}
    if registry.METADATA_KEY not in props:
        return {}, declared
    try:
        rec = json.loads(props[registry.METADATA_KEY])
    except ValueError:
        return {}, declared
    allowed = {"input_size", "resize_size", "interpolation", "mean", "std", "channel_order",
               "layers", "default_layer", "description", "source", "license"}
    out = {k: v for k, v in rec.items() if k in allowed}
    for k in ("mean", "std"):
        if k in out:
            out[k] = tuple(float(v) for v in out[k])
    return out, declared


@lru_cache(maxsize=64)
def _derived_or_nothing(path: str, *stamp_and_size: int) -> dict[str, str]:
    """Derived aliases of a file made by others, or none when they cannot be derived
    (not ONNX, shapes that cannot be found: the fit reports those). Memoised by stat,
    failures included, so a grid search does not retry a failing derivation per fit."""
    *_, input_size = stamp_and_size
    try:
        return _graph_checks(path, registry.model_sha256(path), input_size)[0]
    except Exception:
        return {}


def _fixed_side(shape: tuple) -> int | None:
    """The square spatial side a declared ``(n, 3, h, w)`` input fixes, if it fixes one."""
    if len(shape) != 4:
        return None
    h, w = shape[2:]
    return int(h) if h is not None and h == w and h >= 8 else None


def untrained_reason(model: onnx.ModelProto) -> str | None:
    """Why ``model``'s weights look freshly initialised, or ``None`` if they look trained.

    Looks at the biases of the convolutions (batch norms folded into them) and
    at any batch norm left in the graph; a graph with neither says nothing.

    Examples
    --------
    >>> from deepfeat.graph import load_onnx
    >>> untrained_reason(load_onnx(resolve_model("efficientnet_lite0")[0])) is None
    True
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}

    def arr(name: str):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    biases = [arr(n.input[2]) for n in model.graph.node
              if n.op_type == "Conv" and len(n.input) > 2 and n.input[2] in inits]
    if len(biases) >= 3 and all(not np.any(b) for b in biases):
        return f"all {len(biases)} convolution biases are exactly 0"
    norms = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    if norms and not biases:
        fresh = 0
        for n in norms:
            scale, shift, mean, var = (arr(i) for i in n.input[1:5])
            if any(v is None for v in (scale, shift, mean, var)):
                return None  # computed statistics: nothing to judge
            fresh += bool(np.all(scale == 1) and not np.any(shift) and not np.any(mean) and np.all(var == 1))
        if fresh == len(norms):
            return f"all {len(norms)} batch norms hold their initial values (mean 0, var 1, scale 1, shift 0)"
    return None


@lru_cache(maxsize=32)
def _graph_checks(path: str, sha256: str, input_size: int, check_trained: bool = False) -> tuple[dict, str | None]:
    """The standard aliases derived from a checked file's graph, and (with ``check_trained``)
    why its weights look untrained: one read and parse for both. Keyed by the file's hash,
    so a checked file is judged once per process (exporters fold batch norms into the
    convolutions; fresh ones fold into biases that are exactly 0, see :func:`untrained_reason`)."""
    proto = _load_checked(path, sha256)
    untrained = untrained_reason(proto) if check_trained else None
    return (derive_aliases(proto, input_size) if untrained is None else {}), untrained


# ------------------------------------------------------------ per-process memos
# A fit resolves the same model and layers again and again (every fold of every
# candidate of a grid search): what it needs of the graph is computed once per
# process and file content (the sha256 is in every key), so a fit costs a stat
# of the model file and a few dictionary look-ups.
def model_summary(path: str, sha256: str, input_size: int = 224) -> GraphSummary:
    """The tensors of a checked ONNX file (:func:`deepfeat.graph.load_onnx` runs once per content).

    ``input_size`` only selects the memo entry that :func:`layer_shapes` shares: the file is read,
    checked and parsed once for both.

    Examples
    --------
    >>> from deepfeat.registry import file_sha256
    >>> path, _ = resolve_model("efficientnet_lite0")
    >>> model_summary(str(path), file_sha256(path)).first_output
    'logits'
    """
    return _graph_facts(path, sha256, input_size)[0]


@lru_cache(maxsize=16)
def _graph_facts(path: str, sha256: str, input_size: int) -> tuple[GraphSummary, dict[str, tuple]]:
    # one load of the (possibly large) file for what a fit needs of the graph
    proto = _load_checked(path, sha256)
    inferred = inferred_shapes(proto, input_size)
    if has_loops(proto):
        # a Loop may never end: shapes come from one probe run under a deadline, which refuses such a file
        inferred = {}
    elif not inference_exact(proto, input_size):
        # spatial sizes (and what is flattened from them) are left to a probe run
        inferred = {t: (s[:2] + (None, None) if len(s) == 4 else s[:1] + (None,) * (len(s) - 1))
                    for t, s in inferred.items()}
    return GraphSummary.of(proto), inferred


@lru_cache(maxsize=64)
def layer_shapes(path: str, sha256: str, tensors: tuple, input_size: int, exact: bool = False) -> tuple:
    """Shapes ``(batch, c, h, w)`` or ``(batch, d)`` of ``tensors`` for an ``input_size`` image.

    ONNX shape inference answers without running anything; only where it
    leaves the rank or channels unknown (or any dimension, with ``exact``:
    flattened maps need every one) is one zero image run on CPU
    (:func:`deepfeat.graph.probe_shapes`). Unknown spatial sizes are ``None``.

    Examples
    --------
    >>> from deepfeat.registry import file_sha256
    >>> path, _ = resolve_model("efficientnet_lite0")
    >>> layer_shapes(str(path), file_sha256(path), ("blocks.10", "pooled"), 224)
    (('batch', 112, None, None), ('batch', 1280, 1, 1))
    """
    inferred = _graph_facts(path, sha256, input_size)[1]
    shapes = [inferred.get(t) for t in tensors]

    def known(s):
        if s is None or len(s) < 2 or s[1] is None:
            return False
        return not exact or all(d is not None for d in s[1:])

    if all(known(s) for s in shapes):
        return tuple(shapes)
    try:
        return tuple(probe_shapes(_load_checked(path, sha256), list(tensors), input_size))
    except registry.ModelFileError:
        raise
    except ProbeTimeoutError as exc:
        raise registry.ModelFileError(
            f"The model file {path} was refused: {exc}. deepfeat embeds CNNs whose run time is bounded; "
            "export the network without the Loop, or cut it before the Loop (layers=)."
        ) from None
    except Exception as exc:  # ONNX Runtime's own words, with the file named
        raise registry.ModelFileError(
            f"ONNX Runtime cannot run the model file {path} on a {input_size}x{input_size} image "
            f"({type(exc).__name__}: {exc}). Check that the file is a CNN taking (batch, 3, h, w) images, "
            "uses only standard ONNX operators, and that preprocessing['input_size'] fits it."
        ) from exc


def _load_checked(path: str, sha256: str):
    # parse the bytes that were hashed: the memos are keyed by that hash
    return load_onnx(path, registry.verified_bytes(path, sha256))
