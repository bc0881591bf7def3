"""Feature cache benchmark: a warm-cache ``transform`` against a cold one, in one run.

Real JPEGs (the hymenoptera validation photos in ``../shared/data``), the
shipped EfficientNet-Lite0 on the default execution provider. *Cold* is the
first ``transform`` into an empty cache (network plus cache writes); *warm* is
a freshly fitted embedder (as a new cross-validation fold or a new process
would be) reading the same cache, median of three. Both exclude ``fit``.

Run ``python benchmarks/bench_cache.py`` (``--quick`` for 32 images).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "hymenoptera_data" / "val"
GOAL = 50.0


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run(quick: bool = False) -> str:
    """Measure cold and warm ``transform`` times; return a markdown section.

    Parameters
    ----------
    quick : bool, default=False
        32 images and the content key only, instead of all validation photos
        with both key modes and a no-cache baseline.

    Returns
    -------
    str
        A ``##`` section with a table of seconds and warm speed-ups.
    """
    import onnxruntime

    from deepfeat import ImageEmbedder, load_image_folder

    if not DATA.is_dir():
        raise FileNotFoundError(f"benchmark photos not found at {DATA} (expected ../shared/data beside the repository)")
    paths = load_image_folder(DATA)["path"].tolist()
    if quick:
        paths = paths[:32]
    n = len(paths)
    rows = []
    baseline = None
    with tempfile.TemporaryDirectory(prefix="deepfeat-bench-cache-") as tmp:
        if not quick:
            plain = ImageEmbedder(progress=False).fit()
            baseline, ref = _timed(lambda: plain.transform(paths))
        for key_mode in ("content",) if quick else ("content", "stat"):
            cache_dir = Path(tmp) / key_mode
            cold_emb = ImageEmbedder(progress=False, cache=cache_dir, cache_key=key_mode).fit()
            cold, X_cold = _timed(lambda: cold_emb.transform(paths))
            if cold_emb.cache_stats_["computed"] != n:
                raise RuntimeError(f"cold run computed {cold_emb.cache_stats_}, expected {n} images")
            warms = []
            for _ in range(3):
                warm_emb = ImageEmbedder(progress=False, cache=cache_dir, cache_key=key_mode).fit()
                t, X_warm = _timed(lambda: warm_emb.transform(paths))
                if warm_emb.cache_stats_["hits"] != n or not np.array_equal(X_warm, X_cold):
                    raise RuntimeError(f"warm run was not served from the cache: {warm_emb.cache_stats_}")
                warms.append(t)
            if baseline is not None and not np.array_equal(X_cold, ref):
                raise RuntimeError("cached vectors differ from uncached ones")
            warm = statistics.median(warms)
            rows.append((key_mode, cold, warm, cold / warm))
        provider = cold_emb.providers_[0]

    cmd = "python benchmarks/bench_cache.py" + (" --quick" if quick else "")
    lines = [
        "## Feature cache: warm vs cold transform",
        "",
        f"{n} real JPEGs (hymenoptera val), EfficientNet-Lite0 `pooled` (1280-d), {provider}, "
        f"onnxruntime {onnxruntime.__version__}, {os.cpu_count()} CPUs ({platform.machine()}), "
        f"Python {platform.python_version()}. Cold = first transform into an empty cache; warm = a freshly "
        "fitted embedder reading it (median of 3). `fit` excluded from both.",
        "",
        "| key | images | no cache (s) | cold (s) | warm (s) | warm speed-up (cold / warm) | goal |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for key_mode, cold, warm, ratio in rows:
        base = f"{baseline:.2f}" if baseline is not None else "-"
        ok = "met" if ratio >= GOAL else "NOT met"
        lines.append(f"| {key_mode} | {n} | {base} | {cold:.2f} | {warm:.3f} | {ratio:.0f}x | >= {GOAL:.0f}x {ok} |")
    lines += ["", f"Command: `{cmd}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv[1:]))
