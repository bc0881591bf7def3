"""Image decoding and preprocessing: any input -> RGB -> resized, cropped, normalised."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["load_image", "preprocess", "ImageDecodeError", "DEFAULT_MAX_PIXELS", "describe"]

#: decompression-bomb guard: images with more pixels than this are refused
DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own default (about 179 MP)

#: background that transparent pixels are composited on (white, as browsers show them)
ALPHA_BACKGROUND = (255, 255, 255)

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


class ImageDecodeError(ValueError):
    """An input could not be turned into an RGB image; the message names it and why."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


def describe(item: Any) -> str:
    """Short human name of an input item, for errors and reports."""
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    if isinstance(item, Image.Image):
        return f"<PIL.Image {item.mode} {item.size[0]}x{item.size[1]}>"
    if isinstance(item, np.ndarray):
        return f"<ndarray {item.dtype} {item.shape}>"
    return f"<{type(item).__name__}>"


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, alpha composited on ALPHA_BACKGROUND."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        # palette transparency is only honoured after going through RGBA
        img = img.convert("RGBA")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit grayscale: scale to 8 bits instead of clipping at 255
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        lo, hi = np.nanmin(a), np.nanmax(a)
        scale = (hi - lo) or 1.0
        img = Image.fromarray(((a - lo) / scale * 255.0).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(item: Any, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode one input into an RGB ``PIL.Image``.

    Parameters
    ----------
    item : str, path-like, bytes, PIL.Image.Image or ndarray
        A file path, encoded bytes, a Pillow image, or a ``uint8`` array
        ``(h, w)``, ``(h, w, 1)``, ``(h, w, 3)`` or ``(h, w, 4)``.
    max_pixels : int or None
        Refuse images with more pixels than this (decompression bombs);
        ``None`` disables the guard.

    Returns
    -------
    PIL.Image.Image
        An RGB image with EXIF orientation applied. Multi-frame files give their
        first frame; alpha is composited on white.

    Raises
    ------
    ImageDecodeError
        The message names the input and the reason (missing, empty, not an
        image, truncated, too many pixels, unsupported array).

    Examples
    --------
    >>> import numpy as np
    >>> load_image(np.zeros((4, 6, 3), dtype=np.uint8)).size
    (6, 4)
    """
    name = describe(item)
    if isinstance(item, np.ndarray):
        return _array_to_image(item, name)
    if isinstance(item, Image.Image):
        img = item
    else:
        if isinstance(item, (bytes, bytearray)):
            data = bytes(item)
        elif isinstance(item, (str, os.PathLike)):
            data = _read_file(Path(item), name)
        else:
            raise ImageDecodeError(name, "not a path, bytes, PIL image or uint8 array")
        if not data:
            raise ImageDecodeError(name, "empty file (0 bytes)")
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageDecodeError(name, f"not an image file Pillow can read (starts with {data[:16]!r})") from None
        except Exception as exc:
            raise ImageDecodeError(name, f"cannot open image: {exc}") from exc
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageDecodeError(
            name,
            f"{w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
            "(decompression-bomb guard); raise max_pixels if the image is trusted",
        )
    try:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except ImageDecodeError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(name, f"corrupt or truncated image data ({exc})") from exc


def _read_file(path: Path, name: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageDecodeError(name, "file not found") from None
    except IsADirectoryError:
        raise ImageDecodeError(name, "is a directory, not an image file") from None
    except PermissionError:
        raise ImageDecodeError(name, "permission denied") from None
    except OSError as exc:
        raise ImageDecodeError(name, f"cannot read file ({exc.strerror or exc})") from exc


def _array_to_image(a: np.ndarray, name: str) -> Image.Image:
    if a.dtype != np.uint8:
        raise ImageDecodeError(name, "arrays must be uint8 (h, w[, c]) with values 0..255")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        return Image.fromarray(a, "L").convert("RGB")
    if a.ndim == 3 and a.shape[2] in (3, 4):
        return _to_rgb(Image.fromarray(np.ascontiguousarray(a), "RGB" if a.shape[2] == 3 else "RGBA"))
    raise ImageDecodeError(name, f"arrays must be (h, w), (h, w, 1), (h, w, 3) or (h, w, 4); got {a.shape}")


def preprocess(
    img: Image.Image,
    *,
    input_size: int,
    resize_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    interpolation: str = "bilinear",
) -> np.ndarray:
    """Resize the shorter side to ``resize_size``, center-crop ``input_size``, normalise.

    Returns a ``(3, input_size, input_size)`` float32 array ``(x - mean) / std``
    with ``x`` in 0..255.

    Examples
    --------
    >>> from PIL import Image
    >>> x = preprocess(Image.new("RGB", (300, 200), (127, 127, 127)), input_size=224,
    ...                resize_size=256, mean=(127.0,) * 3, std=(128.0,) * 3)
    >>> x.shape, float(abs(x).max())
    ((3, 224, 224), 0.0)
    """
    w, h = img.size
    scale = resize_size / min(w, h)
    nw, nh = max(input_size, round(w * scale)), max(input_size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), _RESAMPLE[interpolation])
    left, top = (nw - input_size) // 2, (nh - input_size) // 2
    img = img.crop((left, top, left + input_size, top + input_size))
    a = np.asarray(img, dtype=np.float32)
    a = (a - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1))
