"""Image folders as DataFrames, and a sample photo folder that needs no download."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["load_image_folder", "make_sample_photos", "IMAGE_EXTENSIONS"]



def _pillow_extensions() -> tuple[str, ...]:
    """File endings of every format the installed Pillow can open and decode.

    Stub plugins (BUFR, GRIB, HDF5, WMF/EMF off Windows: they need a handler
    nobody registers), MPEG (identified, never decoded) and PostScript without
    Ghostscript are left out: a folder's README.ps is not an image.
    """
    from PIL import EpsImagePlugin, Image, ImageFile

    Image.init()
    out = []
    for ext, fmt in Image.registered_extensions().items():
        entry = Image.OPEN.get(fmt)
        if entry is None:
            continue
        cls = entry[0]
        if isinstance(cls, type) and issubclass(cls, ImageFile.StubImageFile):
            continue
        if fmt == "MPEG" or (fmt == "EPS" and not EpsImagePlugin.has_ghostscript()):
            continue
        out.append(ext.lower())
    return tuple(sorted(set(out)))


#: file endings read as images: every format the installed Pillow opens and decodes (AVIF, WebP,
#: JPEG 2000, TIFF, ... with the plugins it was built with)
IMAGE_EXTENSIONS = _pillow_extensions()


def load_image_folder(
    root: str | os.PathLike, *, extensions: tuple[str, ...] = IMAGE_EXTENSIONS, allow_empty: bool = False
) -> pd.DataFrame:
    """Index a folder of class sub-folders, like torchvision's ``ImageFolder``.

    Parameters
    ----------
    root : str or path-like
        ``root/<label>/<image>``; files directly in ``root`` get no label.
    extensions : tuple of str
        File endings (case-insensitive) taken as images.
    allow_empty : bool, default=False
        Return an empty DataFrame for a folder without image files instead
        of raising ``ValueError``.

    Returns
    -------
    pandas.DataFrame
        Columns ``path`` (str) and ``label`` (str, or None at the top level),
        sorted by label then path.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> (root / "cat").mkdir(); (root / "cat" / "a.jpg").write_bytes(b"")
    0
    >>> load_image_folder(root)["label"].tolist()
    ['cat']
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder; expected root/<label>/<image files>.")
    exts = tuple(e.lower() for e in extensions)
    rows = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        label = rel.parts[0] if rel.parts else None
        for name in sorted(filenames):
            if name.startswith(".") or not name.lower().endswith(exts):
                continue
            rows.append({"path": str(Path(dirpath) / name), "label": label})
    if not rows and not allow_empty:
        raise ValueError(
            f"No image files under {root} (looked for {len(exts)} extensions Pillow can decode, such as "
            ".jpg, .png, .webp, .avif). Expected root/<label>/<image files>; pass allow_empty=True to get "
            "an empty DataFrame instead."
        )
    df = pd.DataFrame(rows, columns=["path", "label"])
    return df.sort_values(["label", "path"], na_position="first", ignore_index=True)


def _sample_sources() -> dict[str, np.ndarray]:
    """Real RGB photos that ship inside scikit-learn (and scikit-image, if installed)."""
    from sklearn.datasets import load_sample_image

    photos = {"china": load_sample_image("china.jpg"), "flower": load_sample_image("flower.jpg")}
    try:
        from skimage import data
    except ImportError:
        return photos
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        photos[name] = getattr(data, name)()
    return photos


def make_sample_photos(
    dest: str | os.PathLike, *, per_class: int = 24, size: int = 160, random_state: int = 0
) -> pd.DataFrame:
    """Write a small labelled photo folder made of random crops of real photos.

    Each class is one photo that ships with scikit-learn (``china``,
    ``flower``) or scikit-image (``astronaut``, ``chelsea``, ``coffee``,
    ``rocket``, when installed); its images are random crops (30-80 % of the
    shorter side), some mirrored, saved as JPEG. It is a real-photo data set
    that needs no download, for demos and tests.

    Returns
    -------
    pandas.DataFrame
        :func:`load_image_folder` of ``dest``.

    Examples
    --------
    >>> import tempfile
    >>> df = make_sample_photos(tempfile.mkdtemp(), per_class=2)
    >>> int(df.groupby("label").size().min())
    2
    """
    from PIL import Image

    rng = np.random.default_rng(random_state)
    dest = Path(dest)
    for label, arr in _sample_sources().items():
        out = dest / label
        out.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(arr).convert("RGB")
        w, h = img.size
        for i in range(per_class):
            side = int(min(w, h) * rng.uniform(0.3, 0.8))
            left, top = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
            crop = img.crop((int(left), int(top), int(left) + side, int(top) + side)).resize((size, size))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            crop.save(out / f"{label}_{i:03d}.jpg", quality=90)
    return load_image_folder(dest)
