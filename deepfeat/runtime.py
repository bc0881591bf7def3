"""ONNX Runtime sessions: providers, options, and running batches."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np
import onnxruntime as ort

__all__ = ["resolve_providers", "create_session", "Runner", "ProviderFallbackWarning", "available_providers"]

logger = logging.getLogger(__name__)

ProviderArg = Union[str, "tuple[str, dict]", Sequence[Union[str, "tuple[str, dict]"]]]

#: order tried by providers="auto" (TensorRT only when asked for by name)
_AUTO_ORDER = (
    "CUDAExecutionProvider",
    "ROCMExecutionProvider",
    "OpenVINOExecutionProvider",
    "CoreMLExecutionProvider",
    "DmlExecutionProvider",
    "CPUExecutionProvider",
)

_SHORT = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
}


class ProviderFallbackWarning(RuntimeWarning):
    """A requested execution provider could not be used; another one is."""


class ProviderError(RuntimeError):
    """A requested execution provider is unavailable and ``strict=True``."""


def available_providers() -> list[str]:
    """Execution providers of the installed onnxruntime build."""
    return list(ort.get_available_providers())


def _normalise(providers: ProviderArg) -> list[tuple[str, dict]]:
    if providers is None or (isinstance(providers, str) and providers == "auto"):
        return [(p, {}) for p in _AUTO_ORDER]
    if isinstance(providers, str) or (
        isinstance(providers, tuple) and len(providers) == 2 and isinstance(providers[1], dict)
    ):
        providers = [providers]
    out = []
    for p in providers:
        name, opts = (p, {}) if isinstance(p, str) else (p[0], dict(p[1]))
        if not isinstance(name, str):
            raise TypeError(f"Each provider must be a name or a (name, options) pair; got {p!r}.")
        out.append((_SHORT.get(name.lower(), name), opts))
    return out


def resolve_providers(providers: ProviderArg = "auto", *, strict: bool = False) -> list[tuple[str, dict]]:
    """Ordered ``(name, options)`` pairs that this onnxruntime build can run.

    Parameters
    ----------
    providers : "auto", str, (str, dict) or a list of them
        ``"auto"`` picks the best installed provider (CUDA, ROCm, OpenVINO,
        CoreML, DirectML, then CPU). Names may be ORT's
        (``"CUDAExecutionProvider"``) or short (``"cuda"``).
    strict : bool
        Raise :class:`ProviderError` instead of warning when an explicitly
        requested provider is missing.

    Returns
    -------
    list of (str, dict)
        Always ends with the CPU provider, ORT's own last resort.

    Examples
    --------
    >>> resolve_providers("cpu")
    [('CPUExecutionProvider', {})]
    """
    auto = providers is None or providers == "auto"
    wanted = _normalise(providers)
    have = set(available_providers())
    usable = [(n, o) for n, o in wanted if n in have]
    missing = [n for n, _ in wanted if n not in have]
    if missing and not auto:
        msg = (
            f"Execution provider(s) {missing} are not available in this onnxruntime build "
            f"(available: {sorted(have)})."
        )
        if strict:
            raise ProviderError(msg + " Install onnxruntime-gpu (pip install 'deepfeat[gpu]') or ask for another provider.")
        fallback = [n for n, _ in usable] or ["CPUExecutionProvider"]
        warnings.warn(f"{msg} Using {fallback} instead.", ProviderFallbackWarning, stacklevel=3)
    if not any(n == "CPUExecutionProvider" for n, _ in usable):
        usable.append(("CPUExecutionProvider", {}))
    return usable


def create_session(
    model: bytes | str | os.PathLike,
    providers: ProviderArg = "auto",
    *,
    strict: bool = False,
    intra_op_threads: int | None = None,
) -> ort.InferenceSession:
    """An ``InferenceSession`` with tuned options, checked to use what was asked.

    ORT silently drops a provider that fails to initialise (a CUDA library
    missing, say); this compares what the session reports with what was asked
    and warns (or raises with ``strict``) naming the provider.
    """
    resolved = resolve_providers(providers, strict=strict)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if intra_op_threads:
        opts.intra_op_num_threads = int(intra_op_threads)
    src = model if isinstance(model, bytes) else os.fspath(model)
    sess = ort.InferenceSession(
        src, opts, providers=[n for n, _ in resolved], provider_options=[o for _, o in resolved]
    )
    used = sess.get_providers()
    first = resolved[0][0]
    if used[0] != first:
        msg = f"Execution provider {first} failed to initialise; running on {used[0]} instead."
        if strict:
            raise ProviderError(msg + " Check the provider's libraries (CUDA, cuDNN) with onnxruntime.preload_dlls().")
        warnings.warn(msg, ProviderFallbackWarning, stacklevel=2)
    logger.info("ONNX Runtime session on %s", used)
    return sess


@dataclass
class Runner:
    """A session plus the names it needs; ``run`` maps an NCHW batch to outputs."""

    session: ort.InferenceSession
    input_name: str
    output_names: list[str]

    @classmethod
    def from_model(cls, model: bytes, providers: ProviderArg = "auto", **kw: Any) -> "Runner":
        sess = create_session(model, providers, **kw)
        return cls(sess, sess.get_inputs()[0].name, [o.name for o in sess.get_outputs()])

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.output_names, {self.input_name: batch})
