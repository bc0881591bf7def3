"""Keys: which image (a hash of its bytes or its file stamp) and which features (a fingerprint).

The engine finds a stored vector by ``(fingerprint, key)`` alone, the way a
content-addressed store does: nothing is hashed again that did not change.

* the *key* says which image: a BLAKE2b hash of the file's bytes (``"content"``
  mode), or, in the documented fast ``"stat"`` mode, a hash of the file's real
  path, inode, size, mtime and ctime. Encoded bytes and ``uint8`` arrays are
  hashed as they are; in-memory PIL images have no stable identity and get no key.
* the *fingerprint* says which features: a SHA-256 over everything that changes
  one layer's vector (model file hash, tensor, pooling, preprocessing, the
  library's feature-format version), see :func:`feature_fingerprint`.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat as stat_module
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["KEY_MODES", "content_key", "content_keys", "feature_fingerprint", "stamp_holds"]

#: accepted values of ``key_mode`` / ``ImageEmbedder(cache_key=...)``
KEY_MODES = ("content", "stat")


def feature_fingerprint(parts: Mapping[str, Any]) -> str:
    """SHA-256 hex digest of everything that determines a feature vector.

    ``parts`` must be JSON-serialisable; key order does not matter.

    Examples
    --------
    >>> a = feature_fingerprint({"model_sha256": "ab", "pooling": "avg"})
    >>> a == feature_fingerprint({"pooling": "avg", "model_sha256": "ab"})
    True
    >>> a == feature_fingerprint({"model_sha256": "ab", "pooling": "max"})
    False
    """
    blob = json.dumps(dict(parts), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def file_stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    # ctime cannot be set by tools that preserve mtime (cp -p, rsync -t), so an
    # edit always changes the stamp
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def content_key(item: Any, mode: str = "content") -> tuple[str | None, tuple | None]:
    """Cache key of one input, and the file stamp that must still hold when storing.

    Parameters
    ----------
    item : path, bytes, ndarray or other
        What :class:`~deepfeat.ImageEmbedder` accepts.
    mode : {"content", "stat"}
        ``"content"`` hashes the file's bytes (an edited file always misses);
        a process hashes each version of a file (device, inode, size, mtime,
        ctime, which no tool can set back after an edit) once.
        ``"stat"`` hashes real path, inode, size, mtime and ctime instead, with
        no read: much faster on slow disks, but it trusts the file system's
        timestamps (an edit that keeps all of them returns the old vector).

    Returns
    -------
    key : str or None
        ``None`` when the input cannot be cached (unreadable file, PIL image).
    stamp : tuple or None
        ``(inode, size, mtime_ns, ctime_ns)`` of a file before it was read, so
        a file edited while being embedded is not stored under its old key.

    Examples
    --------
    >>> import numpy as np
    >>> key, stamp = content_key(np.zeros((2, 2, 3), np.uint8))
    >>> key[:2], stamp
    ('a:', None)
    >>> content_key(b"abc")[0] == content_key(bytearray(b"abc"))[0]
    True
    """
    if mode not in KEY_MODES:
        raise ValueError(f"mode must be one of {KEY_MODES}; got {mode!r}.")
    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        try:
            st = os.stat(path)
            if not stat_module.S_ISREG(st.st_mode):
                return None, None
            stamp = file_stamp(st)
            if mode == "stat":
                ident = "\0".join(map(str, (os.path.realpath(path),) + stamp))
                return "s:" + hashlib.blake2b(ident.encode(), digest_size=16).hexdigest(), stamp
            memo = (path, st.st_dev) + stamp
            key = _HASHED.get(memo)
            if key is not None:
                return key, stamp
            h = hashlib.blake2b(digest_size=16)
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError:
            return None, None  # the decoder reports the reason
        # same prefix as raw bytes: a file and its bytes decode identically
        key = "c:" + h.hexdigest()
        _remember(memo, key, st)
        return key, stamp
    if isinstance(item, (bytes, bytearray, memoryview)):
        return "c:" + hashlib.blake2b(bytes(item), digest_size=16).hexdigest(), None
    if isinstance(item, np.ndarray) and item.dtype != object:
        h = hashlib.blake2b(f"{item.dtype.str}{item.shape}".encode(), digest_size=16)
        h.update(np.ascontiguousarray(item).data)
        return "a:" + h.hexdigest(), None
    return None, None


# Content keys hashed in this process, by file version (path, device, inode, size,
# mtime, ctime): every fold of a grid search hashes each photo once, not once per fold.
# Like git's index, a file is remembered only once its timestamps are older than
# _SETTLED seconds, so an edit in the same clock tick as the hashing (same size,
# mtime reset) still changes the ctime that a later look-up sees.
_HASHED: dict[tuple, str] = {}
_HASHED_MAX = 200_000
_SETTLED = 2.0


def settled(st: os.stat_result) -> bool:
    """Whether a file's timestamps are old enough for a memo keyed by them (see above);
    :mod:`deepfeat.registry` memoises model hashes by the same rule."""
    return time.time() - max(st.st_mtime, st.st_ctime) >= _SETTLED


def _remember(memo: tuple, key: str, st: os.stat_result) -> None:
    if not settled(st):
        return
    if len(_HASHED) >= _HASHED_MAX:
        _HASHED.clear()
    _HASHED[memo] = key


def content_keys(items: Sequence, mode: str = "content", threads: int = 1) -> tuple[list, list]:
    """:func:`content_key` of every item: ``(keys, stamps)``, files hashed on ``threads`` threads.

    Files this process has hashed already (same version) cost a ``stat``;
    only the others are read, in chunks spread over the threads.

    Examples
    --------
    >>> import numpy as np
    >>> keys, stamps = content_keys([np.zeros((1, 1), np.uint8), "no/such/file.jpg"])
    >>> keys[0][:2], keys[1], stamps
    ('a:', None, [None, None])
    """
    if mode not in KEY_MODES:
        raise ValueError(f"mode must be one of {KEY_MODES}; got {mode!r}.")
    pairs: list = [None] * len(items)
    todo = []
    for i, item in enumerate(items):
        known = _remembered(item) if mode == "content" else None
        if known is not None:
            pairs[i] = known
        else:
            todo.append(i)
    if threads > 1 and len(todo) > 16:
        # hashing releases the GIL; file reads overlap. Chunks keep the per-future cost small.
        step = max(1, min(64, len(todo) // (4 * threads)))
        chunks = [todo[s : s + step] for s in range(0, len(todo), step)]
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="deepfeat-hash") as ex:
            for chunk, got in zip(chunks, ex.map(lambda c: [content_key(items[i], mode) for i in c], chunks)):
                for i, pair in zip(chunk, got):
                    pairs[i] = pair
    else:
        for i in todo:
            pairs[i] = content_key(items[i], mode)
    return [k for k, _ in pairs], [s for _, s in pairs]


def _remembered(item: Any) -> tuple[str, tuple] | None:
    """The key this process hashed for this version of the file, if any: one ``stat``."""
    if not _HASHED or not isinstance(item, (str, os.PathLike)):
        return None
    path = os.fspath(item)
    try:
        st = os.stat(path)
    except OSError:
        return None
    stamp = file_stamp(st)
    key = _HASHED.get((path, st.st_dev) + stamp)
    return None if key is None else (key, stamp)


def stamp_holds(item: Any, stamp: tuple | None) -> bool:
    """Whether the file behind ``item`` still has the stamp it had when its key was made.

    Examples
    --------
    >>> stamp_holds(b"bytes have no stamp", None)
    True
    """
    if stamp is None:
        return True
    try:
        return file_stamp(os.stat(os.fspath(item))) == stamp
    except OSError:
        return False
