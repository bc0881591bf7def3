"""Shared helpers for the benchmark sections: the real photos, timing, machine facts."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO.parent / "shared" / "data" / "hymenoptera_data"


def real_jpegs() -> list[str]:
    """Every real JPEG of the hymenoptera set (train + val), sorted."""
    if not PHOTOS.is_dir():
        raise SystemExit(f"benchmarks need the real photos at {PHOTOS} (see ../shared/README.md)")
    return sorted(str(p) for p in PHOTOS.glob("*/*/*") if p.suffix.lower() in (".jpg", ".jpeg"))


def best_of(fn, repeat: int = 3) -> float:
    """Fastest wall time of ``repeat`` calls (the least disturbed by other load)."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def gpu() -> str | None:
    """GPU 0 (the one ``cuda_provider(0)`` runs on), as nvidia-smi names it, if onnxruntime can use CUDA."""
    import subprocess

    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return None
    try:
        out = subprocess.run(["nvidia-smi", "-i", "0", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return f"{out or 'a CUDA GPU (nvidia-smi not found)'}, onnxruntime-gpu {onnxruntime.__version__}"


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    return (
        f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}"
    )
