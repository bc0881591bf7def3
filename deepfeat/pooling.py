"""Pooling of feature maps into one vector per image."""

from __future__ import annotations

import numpy as np

__all__ = ["pool", "POOLINGS"]

#: accepted values of the ``pooling`` parameter
POOLINGS = ("avg", "max", "gem", "none")


def pool(x: np.ndarray, method: str = "avg", *, p: float = 3.0, eps: float = 1e-6) -> np.ndarray:
    """Reduce a batch of feature maps ``(n, c, h, w)`` to ``(n, d)`` float32.

    Parameters
    ----------
    x : ndarray
        ``(n, c, h, w)`` feature maps, or ``(n, d)`` vectors (returned as is,
        whatever the method, since there is nothing to pool).
    method : {"avg", "max", "gem", "none"}
        Global average, global max, generalized mean (GeM, Radenović et al.
        2018) with exponent ``p``, or ``"none"`` to flatten ``c*h*w``.
    p : float
        GeM exponent; 1 is average pooling, large values approach max.
    eps : float
        GeM clamps activations to ``eps`` first, since GeM is defined on
        non-negative inputs.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2)
    >>> pool(x, "avg").tolist(), pool(x, "max").tolist()
    ([[1.5, 5.5]], [[3.0, 7.0]])
    """
    x = np.asarray(x)
    n = x.shape[0]
    if x.ndim == 2:
        return x.astype(np.float32, copy=False)
    if x.ndim != 4:
        raise ValueError(f"Expected a (n, c, h, w) or (n, d) array, got shape {x.shape}.")
    if method == "avg":
        out = x.mean(axis=(2, 3), dtype=np.float64)
    elif method == "max":
        out = x.max(axis=(2, 3))
    elif method == "gem":
        out = np.power(np.power(np.clip(x, eps, None, dtype=np.float64), p).mean(axis=(2, 3)), 1.0 / p)
    elif method == "none":
        out = x.reshape(n, -1)
    else:
        raise ValueError(f"pooling must be one of {POOLINGS}; got {method!r}.")
    return np.ascontiguousarray(out, dtype=np.float32)


def pooled_dim(shape: tuple, method: str) -> int:
    """Length of the pooled vector for a ``(batch, c, h, w)`` or ``(batch, d)`` tensor shape.

    Examples
    --------
    >>> pooled_dim((1, 40, 28, 28), "avg"), pooled_dim((1, 40, 28, 28), "none")
    (40, 31360)
    """
    if len(shape) == 2 or method != "none":
        return int(shape[1])
    return int(np.prod(shape[1:]))
