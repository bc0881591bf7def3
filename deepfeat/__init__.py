"""deepfeat: pretrained ONNX CNN features for scikit-learn.

The public API is small: :class:`ImageEmbedder` (a scikit-learn transformer),
:func:`list_models`, :func:`get_model_spec`, :func:`list_layers` and
:func:`load_image_folder`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# imported on first use, so that `deepfeat --help` and `--version` start in a fraction of a second
_LAZY = {
    "ImageEmbedder": "embedder",
    "get_model_spec": "registry",
    "list_layers": "resolve",
    "list_models": "registry",
    "load_image_folder": "datasets",
    "make_sample_photos": "datasets",
}

if TYPE_CHECKING:
    from .datasets import load_image_folder, make_sample_photos
    from .embedder import ImageEmbedder
    from .registry import get_model_spec, list_models
    from .resolve import list_layers


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'deepfeat' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))

__all__ = [
    "ImageEmbedder",
    "get_model_spec",
    "list_layers",
    "list_models",
    "load_image_folder",
    "make_sample_photos",
    "__version__",
]
