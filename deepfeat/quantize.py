"""Reduced-precision copies of an ONNX backbone: int8 for CPU, fp16 for GPU.

:func:`convert_float16` writes an fp16 copy for GPU execution providers
(CUDA, TensorRT), whose tensor cores run half precision; see its docstring
for the accuracy measured on real photos. :func:`quantize_model` writes a
post-training int8 copy for CPU.

int8 is **not recommended for the shipped EfficientNet-Lite0.** Measured by
``benchmarks/bench_quantize.py`` on the hymenoptera photos (160 train photos
for calibration, 153 val photos scored) on a 2-core AVX2 CPU without VNNI,
no int8 variant was within one point of fp32 *and* faster:

- default (uint8 activations, 7-bit int8 weights): mean ImageNet top-1 of
  the ants/bees photos 0.801 against fp32's 0.830 (-2.9 points), linear
  probe 0.941 against 0.948, pooled cosine to fp32 0.974 (min 0.907), and
  0.98x fp32's speed;
- ``weight_type="uint8", reduce_range=False``: top-1 0.849, probe 0.941,
  cosine 0.992, but 0.17x fp32's speed (slow uint8 x uint8 kernels);
- ``method="dynamic"``: top-1 0.766, 0.12x fp32's speed.

The file is 3.6 times smaller. The module stays for CPUs where int8 kernels
are faster (VNNI/AMX, which also run int8 weights at a full 8 bits without
the saturation that ``reduce_range`` avoids here) and for other models:
measure with the benchmark before using an int8 file.

The quantized file keeps every named tensor (``stem``, ``blocks.N``,
``features``, ``pooled``, ``logits``) and records the source model's
preprocessing and layer aliases in its metadata, so
``ImageEmbedder(model="model-int8.onnx", layers="stage4")`` works with no
further arguments. One difference: the static quantizer removes a
``Relu``/``Clip`` whose clamp the uint8 range already does, and its output
name then labels the tensor *before* the activation; the aliases of such
tensors (``stem`` and ``features`` here) are recorded as the dequantized
tensor after it, which holds the activation's result. Use the aliases, not
those raw tensor names, on an int8 file.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_dynamic,
    quantize_static,
)

from .graph import load_onnx
from .images import ImageDecodeError, network_input
from .registry import METADATA_KEY, ModelSpec, file_sha256
from .resolve import resolve_model

__all__ = ["quantize_model", "convert_float16", "QuantizationError"]

logger = logging.getLogger(__name__)

_METHODS = ("static", "dynamic")
_WEIGHT_TYPES = ("int8", "uint8")


class QuantizationError(RuntimeError):
    """Quantization failed or lost a named tensor the layer aliases point to."""


def quantize_model(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    calibration_images: "str | os.PathLike | Iterable[Any] | None" = None,
    *,
    method: str = "static",
    per_channel: bool = True,
    weight_type: str = "int8",
    reduce_range: bool = True,
    max_images: int = 200,
    batch_size: int = 16,
    preprocessing: dict | None = None,
) -> Path:
    """Write an int8 copy of an ONNX model that keeps its named tensors.

    The model is first prepared with ONNX Runtime's ``quant_pre_process``
    (shape inference and constant folding, which turns the padding
    sub-graphs into plain ``Conv`` padding), then quantized with
    ``quantize_static`` in QDQ format (activation ranges from min/max over
    the calibration photos) or with ``quantize_dynamic``. Every tensor named
    by the model's layer aliases is checked to still exist (an alias of a
    ``Relu``/``Clip`` output the quantizer folded away is moved to the
    dequantized tensor that now holds its values), and the source's
    preprocessing and aliases are recorded in the file's metadata.

    Parameters
    ----------
    src : str or path-like
        Registered model name (``"efficientnet_lite0"``) or ``.onnx`` path.
    dst : str or path-like
        Where to write the quantized ``.onnx`` file (written atomically).
        Must not be the source file.
    calibration_images : folder, iterable of images, or None
        Images whose activations set the int8 ranges (``method="static"``):
        a folder (searched recursively, as
        :func:`deepfeat.load_image_folder`), or paths, PIL images or
        ``uint8`` arrays. Use real photos like the ones the model will see,
        100-200 of them. Unreadable files are skipped with a warning.
        Ignored by ``method="dynamic"``.
    method : {"static", "dynamic"}, default="static"
        ``"static"``: weights and activations int8 (QDQ format), ranges from
        the calibration images. ``"dynamic"``: int8 weights, activation
        ranges computed per batch at run time (no calibration; on CPU it
        runs ``ConvInteger`` and was slower than fp32 in our measurement).
    per_channel : bool, default=True
        One weight scale per output channel instead of per tensor; needed
        for depthwise convolutions to keep their accuracy.
    weight_type : {"int8", "uint8"}, default="int8"
        Weight type (activations are always uint8). On x86 CPUs without VNNI
        int8 x uint8 products can saturate unless ``reduce_range`` is set;
        ``"uint8"`` avoids that at full 8 bits but runs on slower kernels.
    reduce_range : bool, default=True
        Quantize weights to 7 bits, which keeps the fast uint8 x int8 kernels
        of AVX2/AVX-512 CPUs without VNNI from saturating, at some cost in
        accuracy. Only a CPU with VNNI or AMX should run a model quantized
        with ``False`` and ``weight_type="int8"``.
    max_images : int, default=200
        At most this many calibration images are used, spread evenly over
        the given ones (so a class-sorted folder is not cut to its first
        class).
    batch_size : int, default=16
        Calibration images per ONNX Runtime call.
    preprocessing : dict or None, default=None
        Overrides of the source's preprocessing (as for
        :class:`deepfeat.ImageEmbedder`), used to feed the calibration
        images and recorded in the output.

    Returns
    -------
    pathlib.Path
        ``dst``.

    Raises
    ------
    QuantizationError
        A tensor named by a layer alias disappeared, or no calibration image
        could be read.

    See Also
    --------
    benchmarks/bench_quantize.py : accuracy and speed of int8 against fp32 on real photos.

    Examples
    --------
    >>> from deepfeat import ImageEmbedder
    >>> from deepfeat.quantize import quantize_model
    >>> out = quantize_model("efficientnet_lite0", "lite0-int8.onnx",
    ...                      "hymenoptera_data/train")  # doctest: +SKIP
    >>> emb = ImageEmbedder(model=out, layers=["stage4", "pooled"]).fit()  # doctest: +SKIP
    >>> emb.n_features_out_  # doctest: +SKIP
    1392
    """
    _check_choice("method", method, _METHODS)
    _check_choice("weight_type", weight_type, _WEIGHT_TYPES)
    for name, value in (("max_images", max_images), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"The {name!r} parameter of quantize_model must be a positive int. Got {value!r}.")
    path, spec = resolve_model(src, **dict(preprocessing or {}))
    dst = Path(dst).expanduser()
    if dst.exists() and dst.resolve() == path.resolve():
        raise ValueError(f"dst {os.fspath(dst)!r} is the source model file; write the int8 copy elsewhere.")
    source = load_onnx(path)
    aliased = dict(spec.layers)
    _check_tensors(source, aliased, f"source model {path}")
    wtype = QuantType.QInt8 if weight_type == "int8" else QuantType.QUInt8

    with tempfile.TemporaryDirectory(prefix="deepfeat-quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quantized = Path(tmp) / "quantized.onnx"
        # ONNX's own shape inference is enough for a CNN; the symbolic one would need sympy
        # (not a dependency) and gives the same quantized graph for the shipped model
        quant_pre_process(source, prepared, skip_symbolic_shape=True)
        _check_tensors(load_onnx(prepared), aliased, "the model after ONNX Runtime's quantization pre-processing")
        n_calib = 0
        if method == "static":
            items = _calibration_items(calibration_images, max_images)
            reader = _CalibrationReader(items, spec, source.graph.input[0].name, batch_size)
            try:
                quantize_static(
                    prepared, quantized, reader,
                    quant_format=QuantFormat.QDQ,
                    per_channel=per_channel,
                    reduce_range=reduce_range,
                    activation_type=QuantType.QUInt8,
                    weight_type=wtype,
                    # the calibrator adds ReduceMin/ReduceMax per tensor: it keeps scalars, not activations
                    calibrate_method=CalibrationMethod.MinMax,
                )
            except ValueError:
                if reader.n_used:
                    raise
                raise QuantizationError(
                    f"None of the {len(items)} calibration images could be read (first failure: "
                    f"{reader.failures[0]}). Pass a folder or a list of real photos."
                ) from None
            n_calib = reader.n_used
        else:
            quantize_dynamic(prepared, quantized, per_channel=per_channel, reduce_range=reduce_range, weight_type=wtype)
        proto = load_onnx(quantized)
    _check_tensors(proto, aliased, f"the {method} int8 model")
    aliased = _alias_targets(source, proto, aliased)
    settings = {
        "method": method,
        "format": "QDQ" if method == "static" else "dynamic",
        "per_channel": per_channel,
        "weight_type": weight_type,
        "activation_type": "uint8",
        "reduce_range": reduce_range,
        "calibration_images": n_calib,
        "source_sha256": file_sha256(path),
    }
    _record(proto, spec, aliased, path, f"int8 ({method}) quantization of {spec.name}", quantization=settings)
    _write_atomically(proto, dst)
    logger.info(
        "wrote %s int8 model %s (%.1f MB, from %s, %d calibration images)",
        method, dst, dst.stat().st_size / 1e6, path, n_calib,
    )
    return dst


def convert_float16(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    preprocessing: dict | None = None,
) -> Path:
    """Write an fp16 copy of an ONNX model for GPU execution providers.

    Weights and activations become float16 (ONNX Runtime's
    ``convert_float_to_float16``); the image input and the model's final
    outputs stay float32, so the file is a drop-in replacement: every named
    tensor keeps its name, and the source's preprocessing and layer aliases
    are recorded in the file's metadata. An intermediate layer cut from it
    is float16, which :class:`deepfeat.ImageEmbedder` pools in float64 and
    returns as float32 like any other.

    fp16 is for CUDA and TensorRT, whose tensor cores run it; on a CPU it
    is slower than fp32 (Lite0 about 0.6x, ``benchmarks/RESULTS.md``). Its
    speed on a GPU has not been measured here (no GPU was lent). Measured on the 153 hymenoptera val photos with the shipped
    EfficientNet-Lite0 on the CPU provider (``python benchmarks/run.py
    --sections providers``): ImageNet top-1 of the ants/bees 0.843/0.831
    against fp32's 0.829/0.831 (one photo more right), ``pooled`` cosine to
    fp32 >= 0.9999 on every photo. With TensorRT, ``tensorrt_provider(
    fp16=True)`` on the fp32 file does the same without a second file.

    Parameters
    ----------
    src : str or path-like
        Registered model name (``"efficientnet_lite0"``) or ``.onnx`` path.
    dst : str or path-like
        Where to write the fp16 ``.onnx`` file (written atomically); not the
        source file.
    preprocessing : dict or None, default=None
        Overrides of the source's preprocessing, recorded in the output.

    Returns
    -------
    pathlib.Path
        ``dst``.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from deepfeat import ImageEmbedder
    >>> from deepfeat.quantize import convert_float16
    >>> tmp = tempfile.TemporaryDirectory()
    >>> out = convert_float16("efficientnet_lite0", pathlib.Path(tmp.name) / "lite0-fp16.onnx")
    >>> round(out.stat().st_size / 1e6, 1)
    9.4
    >>> ImageEmbedder(model=out, layers=["stage4", "pooled"]).fit().n_features_out_
    1392
    >>> tmp.cleanup()
    """
    # the converter lives in ORT's transformers tools; imported here, as only this function needs it
    from onnxruntime.transformers.float16 import convert_float_to_float16

    path, spec = resolve_model(src, **dict(preprocessing or {}))
    dst = Path(dst).expanduser()
    if dst.exists() and dst.resolve() == path.resolve():
        raise ValueError(f"dst {os.fspath(dst)!r} is the source model file; write the fp16 copy elsewhere.")
    source = load_onnx(path)
    aliased = dict(spec.layers)
    _check_tensors(source, aliased, f"source model {path}")
    # files that also list their weights as graph inputs (IR < 4) would keep them float32 behind
    # Cast nodes, since the converter keeps every graph input's type: list only the real inputs
    weights = {t.name for t in source.graph.initializer}
    real_inputs = [i for i in source.graph.input if i.name not in weights]
    del source.graph.input[:]
    source.graph.input.extend(real_inputs)
    source.ir_version = max(source.ir_version, 4)
    proto = convert_float_to_float16(source, keep_io_types=True)
    _sort_nodes(proto.graph)
    _check_tensors(proto, aliased, "the fp16 model")
    _record(proto, spec, aliased, path, f"fp16 conversion of {spec.name}", precision="float16")
    _write_atomically(proto, dst)
    logger.info("wrote fp16 model %s (%.1f MB, from %s)", dst, dst.stat().st_size / 1e6, path)
    return dst


def _sort_nodes(graph) -> None:
    """Order nodes so each comes after its inputs' producers (the ONNX checker requires it).

    The fp16 converter appends the Cast nodes of the input at the end of the
    node list. Each node keeps its place unless a producer must come first
    (depth-first, in the original order), so the layer table keeps its graph
    order; names read inside If/Loop/Scan bodies count as the node's inputs.
    """
    producer = {o: n for n in graph.node for o in n.output if o}
    done: set[int] = set()
    ordered: list = []
    for root in list(graph.node):
        # iterative depth-first walk (a long chain would overflow Python's recursion limit)
        stack, on_path = [(root, False)], set()
        while stack:
            node, expanded = stack.pop()
            if id(node) in done:
                continue
            if expanded:
                on_path.discard(id(node))
                done.add(id(node))
                ordered.append(node)
                continue
            if id(node) in on_path:
                raise QuantizationError(f"The fp16 graph has a cycle through node {node.name!r}.")
            on_path.add(id(node))
            stack.append((node, True))
            needs = list(node.input) + sorted(_outer_names(node))
            for name in reversed(needs):
                if name in producer and id(producer[name]) not in done:
                    stack.append((producer[name], False))
    del graph.node[:]
    graph.node.extend(ordered)


def _outer_names(node) -> set[str]:
    """Names a node's subgraphs read from the enclosing graph."""
    names: set[str] = set()
    for attr in node.attribute:
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            local = {i.name for i in sub.input} | {t.name for t in sub.initializer}
            local |= {o for n in sub.node for o in n.output}
            for n in sub.node:
                names |= {i for i in n.input if i and i not in local}
                names |= _outer_names(n) - local
            names |= {o.name for o in sub.output if o.name not in local}
    return names


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"The {name!r} parameter of quantize_model must be one of {set(allowed)}. Got {value!r}.")


def _check_tensors(proto, aliased: dict, what: str) -> None:
    produced = {o for n in proto.graph.node for o in n.output} | {i.name for i in proto.graph.input}
    missing = {alias: t for alias, t in aliased.items() if t not in produced}
    if missing:
        raise QuantizationError(
            f"{what} has no tensor for the layer aliases {missing}; the aliases would not work on it. "
            "Report this with the model file, or quantize a model whose aliases name Conv/Add/Clip outputs."
        )


#: activations the static quantizer folds into the uint8 range of the tensor after them
_FOLDED_ACTIVATIONS = ("Relu", "Clip")


def _alias_targets(source, proto, aliased: dict) -> dict:
    """Alias -> the tensor of the int8 graph that holds what the alias held in the source.

    The QDQ quantizer removes a ``Relu``/``Clip`` whose range the uint8
    quantization already clamps to, and gives its output name to the tensor
    before it: that float tensor is then the *pre-activation* value. The
    activation's result is the ``DequantizeLinear`` output after it, which is
    what the alias is pointed to. Other tensors keep their names.
    """
    src_op = {o: n.op_type for n in source.graph.node for o in n.output}
    producer = {o: n for n in proto.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out = {}
    for alias, tensor in aliased.items():
        node = producer.get(tensor)
        if node is None or src_op.get(tensor) not in _FOLDED_ACTIVATIONS or node.op_type in _FOLDED_ACTIVATIONS:
            out[alias] = tensor
            continue
        dq = [
            d.output[0]
            for q in consumers.get(tensor, []) if q.op_type == "QuantizeLinear"
            for d in consumers.get(q.output[0], []) if d.op_type == "DequantizeLinear"
        ]
        if not dq:
            raise QuantizationError(
                f"The quantizer removed the {src_op[tensor]} that produced {tensor!r} (layer {alias!r}) "
                "and left no quantized tensor in its place; this layer cannot be cut from the int8 model."
            )
        out[alias] = dq[0]
    return out


def _calibration_items(images, max_images: int) -> list:
    if images is None:
        raise ValueError(
            "method='static' needs calibration_images: a folder or a list of real photos "
            "(100-200 of the kind the model will embed), or use method='dynamic'."
        )
    if isinstance(images, (str, os.PathLike)):
        folder = Path(images).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(
                f"calibration_images {os.fspath(images)!r} is not a folder; pass a folder of photos or a list of images."
            )
        from .datasets import load_image_folder

        items = load_image_folder(folder)["path"].tolist()
    else:
        items = list(images)
    if not items:
        raise ValueError(f"calibration_images {os.fspath(images) if isinstance(images, (str, os.PathLike)) else ''} "
                         "holds no images; pass 100-200 real photos.")
    if len(items) > max_images:
        # evenly spread: a class-sorted folder contributes every class
        keep = np.linspace(0, len(items) - 1, max_images).round().astype(int)
        items = [items[i] for i in keep]
    return items


def _write_atomically(proto, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(dst.name + ".part")
    part.write_bytes(proto.SerializeToString())
    os.replace(part, dst)


def _record(proto, spec: ModelSpec, layers: dict, path: Path, description: str, **settings: Any) -> None:
    """Store the source's preprocessing and aliases where ``resolve_model`` reads them."""
    record = {
        "input_size": int(spec.input_size),
        "resize_size": int(spec.resize_size),
        "interpolation": spec.interpolation,
        "mean": [float(v) for v in spec.mean],
        "std": [float(v) for v in spec.std],
        "channel_order": spec.channel_order,
        "layers": layers,
        "default_layer": spec.default_layer,
        "description": description,
        "source": f"deepfeat.quantize of {path.name} (sha256 {file_sha256(path)})",
        "license": spec.license,
        **settings,
    }
    kept = [p for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(record, sort_keys=True))


class _CalibrationReader(CalibrationDataReader):
    """Feeds preprocessed calibration images to ONNX Runtime's calibrator, one batch at a time."""

    def __init__(self, items: list, spec: ModelSpec, input_name: str, batch_size: int):
        self.items = items
        self.spec = spec
        self.input_name = input_name
        self.batch_size = batch_size
        self.pos = 0
        self.n_used = 0
        self.failures: list[str] = []

    def _decode(self, item) -> np.ndarray | None:
        s = self.spec
        try:
            return network_input(item, input_size=s.input_size, resize_size=s.resize_size, mean=s.mean, std=s.std,
                                 interpolation=s.interpolation, channel_order=s.channel_order, draft=False)
        except ImageDecodeError as exc:
            logger.warning("calibration image skipped: %s", exc)
            self.failures.append(str(exc))
            return None

    def get_next(self) -> dict | None:
        while self.pos < len(self.items):
            chunk = self.items[self.pos:self.pos + self.batch_size]
            self.pos += len(chunk)
            arrays = [a for a in map(self._decode, chunk) if a is not None]
            if arrays:
                self.n_used += len(arrays)
                return {self.input_name: np.stack(arrays)}
        return None

    def rewind(self) -> None:
        self.pos = 0
        self.n_used = 0
        self.failures = []
