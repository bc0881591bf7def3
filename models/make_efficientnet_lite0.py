"""Regenerate models/efficientnet_lite0.onnx and verify it against PyTorch.

Needs the export extra:  pip install -e ".[export]"
Run from the repository root:  python models/make_efficientnet_lite0.py [--check-only]

Prints the sha256 of the exported file, the largest |ONNX - PyTorch| over real
photos, and whether the top-5 ImageNet classes agree; exits non-zero if the
export differs from the committed file or the numbers miss their bounds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from deepfeat.export import export_efficientnet_lite, load_efficientnet_lite  # noqa: E402
from deepfeat.images import load_image, preprocess  # noqa: E402
from deepfeat.registry import file_sha256, get_model_spec  # noqa: E402


def real_batch(limit: int = 32) -> tuple[list[str], np.ndarray]:
    """scikit-learn's two photos, then hymenoptera val photos when ../shared is there."""
    from sklearn.datasets import load_sample_images

    spec = get_model_spec("efficientnet_lite0")
    items: list = list(load_sample_images().images)
    names = ["china.jpg", "flower.jpg"]
    shared = HERE.parent.parent / "shared" / "data" / "hymenoptera_data" / "val"
    if shared.is_dir():
        extra = sorted(shared.glob("*/*.jpg"))[: limit - 2]
        items += [str(p) for p in extra]
        names += [p.name for p in extra]
    x = np.stack([
        preprocess(load_image(i), input_size=spec.input_size, resize_size=spec.resize_size, mean=spec.mean, std=spec.std)
        for i in items
    ])
    return names, x


def verify(onnx_path: Path) -> dict:
    import onnxruntime as ort
    import torch

    names, x = real_batch()
    model = load_efficientnet_lite("efficientnet-lite0")
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": x})[0]
    top5_ref, top5_got = np.argsort(-ref, 1)[:, :5], np.argsort(-got, 1)[:, :5]
    return {
        "images": len(names),
        "max_abs_diff": float(np.abs(ref - got).max()),
        "top5_match": bool((top5_ref == top5_got).all()),
        "top5_sample_photos": {n: top5_got[i].tolist() for i, n in enumerate(names[:2])},
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-only", action="store_true", help="verify the committed file, do not re-export")
    args = ap.parse_args()
    committed = HERE / "efficientnet_lite0.onnx"
    ok = True
    target = committed
    if not args.check_only:
        target = Path(tempfile.mkdtemp()) / "efficientnet_lite0.onnx"
        export_efficientnet_lite("efficientnet-lite0", target)
        import onnx

        # the committed file predates the fixed producer_version (it says torch's "2.13.0")
        shipped = onnx.load(str(committed))
        shipped.producer_version = onnx.load(str(target)).producer_version
        same = shipped.SerializeToString() == target.read_bytes()
        print(f"re-exported sha256 {file_sha256(target)}: {'the same graph, weights and metadata as' if same else 'DIFFERS from'} "
              f"the committed file (sha256 {file_sha256(committed)}) apart from producer_version")
        ok &= same
    res = verify(target)
    print(res)
    ok &= res["max_abs_diff"] < 1e-4 and res["top5_match"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
