"""ONNX Runtime sessions: providers, options, and running batches."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np
import onnxruntime as ort

__all__ = [
    "resolve_providers",
    "create_session",
    "cuda_provider",
    "tensorrt_provider",
    "Runner",
    "ProviderFallbackWarning",
    "ProviderError",
    "available_providers",
    "on_device",
]

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
    """Execution providers of the installed onnxruntime build.

    Examples
    --------
    >>> "CPUExecutionProvider" in available_providers()
    True
    """
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
        if isinstance(p, str):
            name, opts = p, {}
        elif isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], dict):
            name, opts = p[0], dict(p[1])
        else:
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
        Options go with the name as ORT takes them, e.g.
        ``("CUDAExecutionProvider", {"device_id": 1, "cudnn_conv_algo_search":
        "HEURISTIC"})`` or ``("TensorrtExecutionProvider", {"trt_fp16_enable":
        True, "trt_engine_cache_enable": True, "trt_engine_cache_path":
        "trt-cache"})``; see :func:`cuda_provider` and
        :func:`tensorrt_provider`.
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


def cuda_provider(device_id: int = 0, *, cudnn_conv_algo_search: str = "EXHAUSTIVE", **options: Any) -> tuple[str, dict]:
    """``("CUDAExecutionProvider", options)`` with the commonly tuned options named.

    ``cudnn_conv_algo_search`` is ``"EXHAUSTIVE"`` (ORT's default: best
    kernels, slower first batch), ``"HEURISTIC"`` or ``"DEFAULT"``.

    Examples
    --------
    >>> cuda_provider(1, cudnn_conv_algo_search="HEURISTIC")
    ('CUDAExecutionProvider', {'device_id': 1, 'cudnn_conv_algo_search': 'HEURISTIC'})
    """
    if cudnn_conv_algo_search not in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"):
        raise ValueError(
            f"cudnn_conv_algo_search must be 'EXHAUSTIVE', 'HEURISTIC' or 'DEFAULT'; got {cudnn_conv_algo_search!r}."
        )
    return ("CUDAExecutionProvider", {"device_id": int(device_id), "cudnn_conv_algo_search": cudnn_conv_algo_search, **options})


def tensorrt_provider(
    device_id: int = 0, *, fp16: bool = False, engine_cache_dir: str | os.PathLike | None = None, **options: Any
) -> tuple[str, dict]:
    """``("TensorrtExecutionProvider", options)``: fp16 and a persistent engine cache.

    Building a TensorRT engine takes minutes; ``engine_cache_dir`` keeps it
    across processes. Put :func:`cuda_provider` after it in the list so layers
    TensorRT cannot run fall back to CUDA rather than CPU.

    Examples
    --------
    >>> tensorrt_provider(fp16=True, engine_cache_dir="trt")[1]["trt_engine_cache_path"]
    'trt'
    """
    opts: dict[str, Any] = {"device_id": int(device_id), "trt_fp16_enable": bool(fp16)}
    if engine_cache_dir is not None:
        opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=os.fspath(engine_cache_dir))
    opts.update(options)
    return ("TensorrtExecutionProvider", opts)


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

    Examples
    --------
    >>> from deepfeat.resolve import resolve_model
    >>> path, _ = resolve_model("efficientnet_lite0")
    >>> create_session(path, "cpu").get_providers()
    ['CPUExecutionProvider']
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


#: providers whose memory is not host memory: inputs/outputs go through IOBinding, with
#: outputs allocated on this ORT device type (ROCm has none that ORT's Python API names
#: portably, so it runs without IOBinding)
_DEVICE_PROVIDERS = {
    "CUDAExecutionProvider": "cuda",
    "TensorrtExecutionProvider": "cuda",
    "ROCMExecutionProvider": None,
    "DmlExecutionProvider": "dml",
}


def on_device(providers: Sequence[str]) -> bool:
    """Whether the first of ``providers`` runs on an accelerator with memory of its own.

    Examples
    --------
    >>> on_device(["CUDAExecutionProvider", "CPUExecutionProvider"]), on_device(["CPUExecutionProvider"])
    (True, False)
    """
    return bool(providers) and providers[0] in _DEVICE_PROVIDERS


def session_device(session: ort.InferenceSession) -> tuple[str, int]:
    """``(device_type, device_id)`` of the session's first provider, as IOBinding names devices.

    The id is the one the provider was created with (``cuda_provider(1)``
    runs on GPU 1), so outputs are allocated where the network runs.

    Examples
    --------
    >>> from deepfeat.resolve import resolve_model
    >>> session_device(create_session(resolve_model("efficientnet_lite0")[0], "cpu"))
    ('cpu', 0)
    """
    first = session.get_providers()[0]
    opts = session.get_provider_options().get(first, {})
    return _DEVICE_PROVIDERS.get(first) or "cpu", int(opts.get("device_id") or 0)


@dataclass
class Runner:
    """A session plus the names it needs; ``run`` maps an NCHW batch to outputs.

    On CUDA, TensorRT and DirectML each batch goes
    through ONNX Runtime's IOBinding: the input is copied to the device once,
    the outputs are copied back once, with no per-output host round trip.
    """

    session: ort.InferenceSession
    input_name: str
    output_names: list[str]
    use_io_binding: bool = False
    #: where IOBinding allocates outputs: ORT's device type and the provider's device_id
    output_device: tuple[str, int] = ("cpu", 0)

    @classmethod
    def from_model(
        cls, model: bytes, providers: ProviderArg = "auto", *, io_binding: bool | None = None, **kw: Any
    ) -> "Runner":
        sess = create_session(model, providers, **kw)
        if io_binding is None:
            io_binding = _DEVICE_PROVIDERS.get(sess.get_providers()[0]) is not None
        return cls(sess, sess.get_inputs()[0].name, [o.name for o in sess.get_outputs()], io_binding,
                   session_device(sess))

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    @property
    def on_device(self) -> bool:
        """True when the first provider runs on an accelerator."""
        return on_device(self.providers)

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        if not self.use_io_binding:
            return self.session.run(self.output_names, {self.input_name: batch})
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, np.ascontiguousarray(batch))
        for name in self.output_names:
            # ORT allocates each output on the provider's device; copied back once below
            binding.bind_output(name, *self.output_device)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()
