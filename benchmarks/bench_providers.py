"""Execution providers: CPU against CUDA, fp32 against fp16, for EfficientNet-Lite0 and a ResNet-50.

Run: python benchmarks/bench_providers.py [--quick]
(or ``python benchmarks/run.py --sections providers``)

Every row runs on the machine the script runs on, in one run. CUDA rows
need onnxruntime-gpu and a CUDA GPU; without them they read "not measured".
On a lent GPU machine, where ../shared does not travel, the photos are
:func:`deepfeat.make_sample_photos` crops instead of the hymenoptera set
(the table says which).

(a) End-to-end images/s: ``ImageEmbedder.transform`` from JPEG files (decode
    threads = the default for the provider), cut at ``pooled``, cache off,
    after a warm-up call (cuDNN picks its kernels on the first batch).
    Raw images/s: the same session on pre-decoded tensors.
(b) Agreement of the ``pooled`` vectors with CPU fp32: max absolute
    difference and the lowest cosine over the photos.
(c) fp16's accuracy: ImageNet top-1 of the hymenoptera val ants (class 310)
    and bees (309) with the shipped Lite0 (only with the real photos).

The ResNet-50 has **random weights** (``random_resnet50.py``; no
pretrained ResNet-50 can be installed here): its speeds are those of the
real architecture, its vectors mean nothing, and it has no accuracy row.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import random_resnet50  # noqa: E402
from common import PHOTOS, REPO  # noqa: E402

sys.path.insert(0, str(REPO))
from deepfeat import ImageEmbedder, make_sample_photos  # noqa: E402
from deepfeat.quantize import convert_float16  # noqa: E402
from deepfeat.runtime import available_providers, cuda_provider  # noqa: E402

CLASSES = {"ants": 310, "bees": 309}
GOAL = 10.0  # CUDA end-to-end / CPU end-to-end, issue #5


def _photos(tmp: Path, n: int) -> tuple[list[str], str]:
    if PHOTOS.is_dir():
        paths = sorted(str(p) for p in PHOTOS.glob("*/*/*") if p.suffix.lower() in (".jpg", ".jpeg"))
        keep = np.linspace(0, len(paths) - 1, min(n, len(paths))).round().astype(int)
        return [paths[i] for i in keep], "real JPEGs (hymenoptera train+val, evenly spread, typically 500x375)"
    df = make_sample_photos(tmp / "photos", per_class=-(-n // 6), size=400)
    return df["path"].tolist()[:n], "JPEG crops of scikit-learn/scikit-image photos (400 px; ../shared not present)"


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _embedder(model: dict, provider, batch_size: int) -> ImageEmbedder:
    return ImageEmbedder(model=model["path"], preprocessing=model.get("preprocessing"), layers="pooled",
                         providers=provider, strict_providers=True, batch_size=batch_size, progress=False).fit()


def _end_to_end(emb: ImageEmbedder, paths: list[str], repeat: int, rounds: int) -> tuple[float, np.ndarray]:
    emb.transform(paths[: emb.batch_size])  # warm-up: arena growth, cuDNN algorithm search
    items = paths * repeat
    best, X = 0.0, None
    for _ in range(rounds):
        t = time.perf_counter()
        X = emb.transform(items)
        best = max(best, len(items) / (time.perf_counter() - t))
    return best, X[: len(paths)]


def _raw(emb: ImageEmbedder, x: np.ndarray, rounds: int) -> float:
    runner, bs = emb._network(tuple(t for _, t in emb.layers_)), emb.batch_size
    runner.run(x[:bs])
    best = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        for i in range(0, len(x), bs):
            runner.run(x[i:i + bs])
        best = max(best, len(x) / (time.perf_counter() - t))
    return best


def _decoded(emb: ImageEmbedder, paths: list[str]) -> np.ndarray:
    return np.stack([emb._decode_safe(p) for p in paths])


def _top1(model_path: str, provider) -> dict[str, float] | None:
    if not PHOTOS.is_dir():
        return None
    val = sorted(p for p in (PHOTOS / "val").glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg"))
    labels = np.array([p.parent.name for p in val])
    emb = ImageEmbedder(model=model_path, layers="logits", providers=provider, strict_providers=True,
                        jpeg_draft=False, progress=False)
    top = emb.fit_transform([str(p) for p in val]).argmax(1)
    return {c: float(np.mean(top[labels == c] == idx)) for c, idx in CLASSES.items()}


def run(quick: bool = False) -> str:
    has_cuda = "CUDAExecutionProvider" in available_providers()
    providers = [("CPU", "cpu", 16, 1)]
    if has_cuda:
        # a GPU eats a CPU batch in well under a millisecond: bigger batches, many passes over the photos
        providers += [(f"CUDA, batch {bs}", cuda_provider(0), bs, 8) for bs in (16, 64, 128)]
    n = 32 if quick else 128
    rounds = 1 if quick else 2
    with tempfile.TemporaryDirectory(prefix="deepfeat-bench-") as tmp:
        tmp = Path(tmp)
        paths, what = _photos(tmp, n)
        lite0 = {"label": "EfficientNet-Lite0 (ImageNet weights, shipped)", "path": "efficientnet_lite0"}
        r50_path = random_resnet50.write(tmp / "resnet50_random.onnx")
        r50 = {"label": "ResNet-50 (random weights)", "path": str(r50_path),
               "preprocessing": random_resnet50.PREPROCESSING}
        models = []
        for m in (lite0, r50):
            half = convert_float16(m["path"], tmp / f"{Path(m['path']).stem}-fp16.onnx",
                                   preprocessing=m.get("preprocessing"))
            models += [dict(m, precision="fp32"), dict(m, path=str(half), precision="fp16", preprocessing=None)]

        rows, ref, speeds = [], {}, {}
        for m in models:
            x = None
            for plabel, provider, bs, repeat in providers:
                emb = _embedder(m, provider, bs)
                if x is None:
                    x = _decoded(emb, paths)
                e2e, X = _end_to_end(emb, paths, repeat, rounds)
                raw = _raw(emb, np.concatenate([x] * repeat), rounds)
                key = (m["label"], m["precision"], plabel)
                speeds[key] = e2e
                if m["precision"] == "fp32" and plabel == "CPU":
                    ref[m["label"]] = X
                base = ref[m["label"]]
                rows.append((m["label"], m["precision"], plabel, emb.providers_[0], e2e, raw,
                             float(np.abs(X - base).max()), float(_cosine(X, base).min())))

        acc = {}
        for m in models[:2]:
            for plabel, provider, _, _ in providers[:2]:
                res = _top1(m["path"], provider)
                if res is not None:
                    acc[(m["precision"], plabel.split(",")[0])] = res

    lines = [
        "## Execution providers: CPU vs CUDA, fp32 vs fp16",
        "",
        f"{len(paths)} {what}; cut at `pooled`, cache off. End-to-end: `ImageEmbedder.transform` from the files "
        f"(decode threads: the provider's default), best of {rounds} after a warm-up; raw: the same session on "
        "pre-decoded tensors. CPU passes once over the photos, CUDA eight times. Agreement: `pooled` vectors "
        "against CPU fp32 of the same model.",
        "",
        "| model | precision | provider | runs on | end-to-end img/s | raw img/s | max abs diff vs CPU fp32 | min cosine |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for label, prec, plabel, used, e2e, raw, diff, cos in rows:
        lines.append(f"| {label} | {prec} | {plabel} | {used} | {e2e:.1f} | {raw:.1f} | {diff:.2g} | {cos:.5f} |")
    if not has_cuda:
        lines.append("| both models | fp32, fp16 | CUDA | - | not measured | not measured | not measured | not measured |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    for m in models:
        cpu = speeds[(m["label"], m["precision"], "CPU")]
        cuda = [v for (lab, prec, p), v in speeds.items() if lab == m["label"] and prec == m["precision"] and p != "CPU"]
        value = f"{max(cuda) / cpu:.1f}x (goal >= {GOAL:.0f}x)" if cuda else "not measured (no CUDA here)"
        lines.append(f"| {m['label']} {m['precision']}: best CUDA / CPU end-to-end | {value} |")
    for m in models[1::2]:
        fp32 = speeds[(m["label"], "fp32", "CPU")]
        lines.append(f"| {m['label']}: fp16 / fp32 on CPU, end-to-end | {speeds[(m['label'], 'fp16', 'CPU')] / fp32:.2f} |")
    if acc:
        lines += ["", "ImageNet top-1 of the 153 hymenoptera val photos, shipped Lite0 (full decode):", "",
                  "| precision | provider | ants (70) | bees (83) | mean |", "|---|---|---:|---:|---:|"]
        for (prec, plabel), r in acc.items():
            lines.append(f"| {prec} | {plabel} | {r['ants']:.3f} | {r['bees']:.3f} | {np.mean(list(r.values())):.3f} |")
    lines += ["", "Command: `python benchmarks/bench_providers.py`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    print(run(ap.parse_args().quick))
