"""deepfeat: pretrained ONNX CNN features for scikit-learn.

The public API is small: :class:`ImageEmbedder` (a scikit-learn transformer),
:func:`list_models`, :func:`get_model_spec`, :func:`list_layers` and
:func:`load_image_folder`.
"""

from .datasets import load_image_folder, make_sample_photos
from .embedder import ImageEmbedder
from .resolve import list_layers
from .registry import get_model_spec, list_models

__version__ = "0.1.0"

__all__ = [
    "ImageEmbedder",
    "get_model_spec",
    "list_layers",
    "list_models",
    "load_image_folder",
    "make_sample_photos",
    "__version__",
]
