"""int8 EfficientNet-Lite0 against fp32 on real photos: accuracy, feature drift, CPU speed, in one run.

Run: python benchmarks/bench_quantize.py [--quick]

The shipped model is quantized (into a temporary folder, never committed)
with :func:`deepfeat.quantize.quantize_model`, calibrated on hymenoptera
*train* photos, and every variant is measured on the *val* photos:

(a) ImageNet top-1/top-5 of the val ants (class 310) and bees (class 309);
(b) a linear probe (standardise + logistic regression) on the ``pooled``
    features, trained on train, scored on val;
(c) cosine similarity of each val image's ``pooled`` vector to fp32's;
(d) images/s of the ONNX Runtime session cut at ``pooled`` (what
    ``ImageEmbedder`` runs) on 32 pre-decoded images, CPU provider; the
    models are timed in interleaved rounds so that load from other processes
    on a shared machine falls on all of them alike.

Photos are decoded in full (``jpeg_draft=False``), the decoding under which
the fp32 reference top-1 (0.829 ants, 0.831 bees) was measured.
The bar for shipping a variant: within 1 point of fp32 on mean top-1 *and*
on probe accuracy, *and* faster.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PHOTOS, REPO, machine  # noqa: E402

sys.path.insert(0, str(REPO))

COMMAND = "python benchmarks/bench_quantize.py"
CLASSES = {"ants": 310, "bees": 309}  # ImageNet-1k indices
CALIBRATION_IMAGES = 160
BAR_POINTS = 1.0

#: (label, quantize_model keyword arguments); fp32 is the shipped file itself
VARIANTS = (
    ("int8 static, u8 act / 7-bit s8 weights (default)", {"method": "static"}),
    ("int8 static, u8 act / u8 weights", {"method": "static", "weight_type": "uint8", "reduce_range": False}),
    ("int8 dynamic, s8 weights", {"method": "dynamic", "reduce_range": False}),
)


def _decode_all(paths: list[str], spec) -> np.ndarray:
    from deepfeat.images import load_image, preprocess

    return np.stack([
        preprocess(load_image(p), input_size=spec.input_size, resize_size=spec.resize_size,
                   mean=spec.mean, std=spec.std, interpolation=spec.interpolation)
        for p in paths
    ])


def _runner(model, alias_names: list[str]):
    """A CPU session cut at the model's aliased tensors (model: registry name or file)."""
    from deepfeat.graph import load_onnx, truncate
    from deepfeat.resolve import resolve_model
    from deepfeat.runtime import Runner

    path, spec = resolve_model(model)
    cut = truncate(load_onnx(path), [spec.layers[a] for a in alias_names])
    return Runner.from_model(cut.SerializeToString(), "cpu")


def _outputs(runner, x: np.ndarray, batch: int = 32) -> list[np.ndarray]:
    parts = [runner.run(x[i:i + batch]) for i in range(0, len(x), batch)]
    return [np.concatenate([p[k] for p in parts]).reshape(len(x), -1) for k in range(len(parts[0]))]


def _measure(model, x_train, y_train, x_val, y_val) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # pooled from a session cut at pooled alone, as ImageEmbedder's default runs it: in an int8
    # graph the tensors requested together decide which QDQ nodes ORT fuses, so they are not mixed
    pooled_runner = _runner(model, ["pooled"])
    (pooled_val,) = _outputs(pooled_runner, x_val)
    (pooled_train,) = _outputs(pooled_runner, x_train)
    (logits,) = _outputs(_runner(model, ["logits"]), x_val)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    res = {"pooled": pooled_val}
    for name, idx in CLASSES.items():
        rows = y_val == name
        res[f"top1_{name}"] = float(np.mean(top5[rows, 0] == idx))
        res[f"top5_{name}"] = float(np.mean((top5[rows] == idx).any(axis=1)))
    res["top1_mean"] = float(np.mean([res[f"top1_{c}"] for c in CLASSES]))
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(pooled_train, y_train)
    res["probe"] = float(probe.score(pooled_val, y_val))
    return res


def _speeds(models: dict, batch: np.ndarray, rounds: int) -> dict[str, float]:
    """Best images/s of each model over interleaved rounds (one warm-up call first)."""
    runners = {}
    for label, model in models.items():
        runners[label] = _runner(model, ["pooled"])
        runners[label].run(batch)
    best = dict.fromkeys(models, 0.0)
    for _ in range(rounds):
        for label, runner in runners.items():
            t = time.perf_counter()
            runner.run(batch)
            best[label] = max(best[label], len(batch) / (time.perf_counter() - t))
    return best


def _embedder_check(path: Path, val_paths: list[str], pooled_ref: np.ndarray) -> str:
    """ImageEmbedder on the int8 file, with an intermediate alias and no preprocessing argument."""
    from deepfeat import ImageEmbedder

    emb = ImageEmbedder(model=str(path), layers=["stage3", "pooled"], jpeg_draft=False, progress=False)
    X = emb.fit_transform(val_paths)
    pooled = X[:, -pooled_ref.shape[1]:]
    cos = (pooled * pooled_ref).sum(1) / (np.linalg.norm(pooled, axis=1) * np.linalg.norm(pooled_ref, axis=1))
    rel = float(np.abs(pooled - pooled_ref).max() / np.abs(pooled_ref).max())
    return (f"`ImageEmbedder(model=<int8 file>, layers=['stage3', 'pooled'])` ran on {len(val_paths)} val photos "
            f"with the preprocessing recorded in the file: {X.shape[1]} features, `stage3` -> "
            f"`{emb.layers_[0][1]}`. Its `pooled` columns match the session cut at `pooled` alone to cosine "
            f">= {cos.min():.5f} (max difference {rel:.2%} of the largest value)"
            + ("." if rel == 0 else ": with another tensor as an output, ONNX Runtime fuses other QDQ nodes "
               "into int8 kernels, so int8 vectors can depend slightly on the layers requested together."))


def run(quick: bool = False) -> str:
    """Quantize the shipped EfficientNet-Lite0 and compare it with fp32; return a markdown section.

    Parameters
    ----------
    quick : bool, default=False
        The default int8 variant only, 32 calibration images, 64 train and
        48 val photos, 2 timing rounds (a smoke run; its numbers are noisy).

    Returns
    -------
    str
        A ``##`` section with one table row per variant and the decision.
    """
    from deepfeat import get_model_spec, load_image_folder
    from deepfeat.quantize import quantize_model
    from deepfeat.resolve import resolve_model

    if not PHOTOS.is_dir():
        raise SystemExit(f"this benchmark needs the real photos at {PHOTOS}")
    train = load_image_folder(PHOTOS / "train")
    val = load_image_folder(PHOTOS / "val")
    variants = VARIANTS[:1] if quick else VARIANTS
    n_calib = 32 if quick else CALIBRATION_IMAGES
    rounds = 2 if quick else 5
    if quick:
        # spread over both classes (the folders are listed class by class)
        train = train.iloc[np.linspace(0, len(train) - 1, 64).round().astype(int)]
        val = val.iloc[np.linspace(0, len(val) - 1, 48).round().astype(int)]
    spec = get_model_spec("efficientnet_lite0")
    t0 = time.perf_counter()
    x_train, x_val = _decode_all(train["path"].tolist(), spec), _decode_all(val["path"].tolist(), spec)
    y_train, y_val = train["label"].to_numpy(), val["label"].to_numpy()
    t_decode = time.perf_counter() - t0

    rows = []
    with tempfile.TemporaryDirectory(prefix="deepfeat-bench-quantize-") as tmp:
        models = {"fp32 (shipped)": "efficientnet_lite0"}
        qtimes = {"fp32 (shipped)": None}
        for i, (label, kwargs) in enumerate(variants):
            t = time.perf_counter()
            models[label] = quantize_model(
                "efficientnet_lite0", Path(tmp) / f"lite0-int8-{i}.onnx", train["path"].tolist(),
                max_images=n_calib, **kwargs,
            )
            qtimes[label] = time.perf_counter() - t
        results = {label: _measure(m, x_train, y_train, x_val, y_val) for label, m in models.items()}
        speeds = _speeds(models, x_val[:32], rounds)
        check = _embedder_check(models[variants[0][0]], val["path"].tolist()[:8], results[variants[0][0]]["pooled"][:8])
        ref = results["fp32 (shipped)"]
        for label, model in models.items():
            r = results[label]
            cos = (r["pooled"] * ref["pooled"]).sum(1) / (
                np.linalg.norm(r["pooled"], axis=1) * np.linalg.norm(ref["pooled"], axis=1))
            rows.append({
                "label": label, "mb": resolve_model(model)[0].stat().st_size / 1e6, "qtime": qtimes[label], **r,
                "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                "ips": speeds[label], "ratio": speeds[label] / speeds["fp32 (shipped)"],
            })

    fp = rows[0]
    lines = [
        "## int8 quantization of EfficientNet-Lite0 (CPU)",
        "",
        f"Machine: {machine()}. CPU execution provider, session cut at `pooled`, batch 32 pre-decoded images, "
        f"best of {rounds} interleaved rounds. Calibration: {n_calib} hymenoptera train photos (evenly spread over "
        f"both classes); evaluation: {len(val)} val photos ({(y_val == 'ants').sum()} ants, {(y_val == 'bees').sum()} "
        f"bees); probe: standardise + logistic regression on `pooled`, fit on {len(train)} train photos. "
        f"Decoding all photos took {t_decode:.0f} s (not in the speeds).",
        "",
        "| model | MB | top-1 ants | top-1 bees | top-1 mean | top-5 ants | top-5 bees | probe acc | "
        "cos vs fp32 mean / min | img/s | speed vs fp32 | meets bar |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    verdicts = {}
    for r in rows:
        if r is fp:
            verdict = "reference"
        else:
            d_top1 = 100 * (r["top1_mean"] - fp["top1_mean"])
            d_probe = 100 * (r["probe"] - fp["probe"])
            fails = []
            if d_top1 < -BAR_POINTS:
                fails.append(f"top-1 {d_top1:+.1f} pt")
            if d_probe < -BAR_POINTS:
                fails.append(f"probe {d_probe:+.1f} pt")
            if r["ratio"] <= 1.0:
                fails.append("not faster")
            verdict = "yes" if not fails else "no: " + ", ".join(fails)
            verdicts[r["label"]] = not fails
        lines.append(
            f"| {r['label']} | {r['mb']:.1f} | {r['top1_ants']:.3f} | {r['top1_bees']:.3f} | {r['top1_mean']:.3f} | "
            f"{r['top5_ants']:.3f} | {r['top5_bees']:.3f} | {r['probe']:.3f} | "
            f"{r['cos_mean']:.4f} / {r['cos_min']:.4f} | {r['ips']:.1f} | {r['ratio']:.2f}x | {verdict} |"
        )
    qt = "; ".join(f"{label}: {t:.0f} s" for label, t in qtimes.items() if t is not None)
    passed = [label for label, ok in verdicts.items() if ok]
    decision = (
        f"**Decision: {', '.join(passed)} meets the bar.**" if passed else
        "**Decision: no int8 variant meets the bar (within 1 point of fp32 on mean top-1 and on the probe, and "
        "faster); none is shipped or recommended.** `deepfeat.quantize` stays for CPUs where int8 kernels are "
        "faster (VNNI/AMX) — measure there with this script first."
    )
    lines += [
        "",
        f"Quantization time ({qt}).",
        "",
        check,
        "",
        decision,
        "",
        f"Command: `{COMMAND}{' --quick' if quick else ''}`",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv[1:]))
