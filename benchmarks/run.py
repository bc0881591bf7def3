"""Run every benchmark section on this machine in one run and write benchmarks/RESULTS.md.

    python benchmarks/run.py            # all sections, writes benchmarks/RESULTS.md
    python benchmarks/run.py --quick    # fewer images, prints only (a smoke run)
    python benchmarks/run.py --sections throughput,cache

    python benchmarks/run.py --sections providers --output RESULTS-gpu.md   # on a GPU machine

Sections: throughput (raw ORT ceiling, end-to-end, PyTorch eager, naive loop,
shallow vs full, peak RSS), cache (cold vs warm transform), quantize (int8 vs
fp32), providers (CPU vs CUDA, fp32 vs fp16; CUDA rows only where
onnxruntime-gpu sees a GPU), distributed (1 vs 2 local Dask workers). Needs
the real photos under ../shared/data/ (providers falls back to sample photos).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import gpu, machine  # noqa: E402

SECTIONS = ("throughput", "cache", "quantize", "providers", "distributed")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run; prints, does not write RESULTS.md")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--output", default=str(HERE / "RESULTS.md"))
    args = ap.parse_args(argv)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    command = "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    parts = [
        "# Benchmark results",
        "",
        f"- Date: {dt.date.today().isoformat()}",
        f"- Machine: {machine()}",
        f"- Command: `{command.strip()}` (every number below comes from this one run)",
        f"- GPU: {gpu() or 'none here (onnxruntime sees no CUDA GPU): GPU numbers not measured'}",
        "",
    ]
    for name in chosen:
        t = time.perf_counter()
        mod = importlib.import_module(f"bench_{name}")
        parts.append(mod.run(quick=args.quick))
        parts.append(f"\n_section time: {time.perf_counter() - t:.0f} s_\n")
        print(parts[-2], flush=True)
    text = "\n".join(parts)
    if not args.quick:
        Path(args.output).write_text(text + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
