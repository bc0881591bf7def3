"""Run every benchmark section on this machine in one run and write benchmarks/RESULTS.md.

    python benchmarks/run.py            # all sections, writes benchmarks/RESULTS.md
    python benchmarks/run.py --quick    # fewer images, prints only (a smoke run)
    python benchmarks/run.py --sections throughput,cache

    python benchmarks/run.py --sections providers --output RESULTS-gpu.md   # on a GPU machine
    python benchmarks/run.py --sections warm,cache --update   # re-measure some sections in RESULTS.md

Sections: throughput (raw ORT ceiling, end-to-end, PyTorch eager, naive loop,
shallow vs full, peak RSS), cache (cold vs warm transform), warm (grid search
over a warm cache vs precomputed features, a second run vs the cold fill,
processes sharing a cache, engine cost per key), recipes (classify --auto vs
the default layer), layers (deriving a third-party file's aliases, before and
after #16), quantize (int8 vs fp32),
providers (CPU vs CUDA, fp32 vs fp16; CUDA rows only where onnxruntime-gpu sees
a GPU), distributed (1 vs 2 local Dask workers). Needs the real photos under
../shared/data/ (providers falls back to sample photos). With ``--update`` the
chosen sections replace their namesakes in the existing file (or are appended),
each marked with the date and command of its own run; the others stay as they
were.
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

SECTIONS = ("throughput", "cache", "warm", "recipes", "heads", "layers", "quantize", "providers", "distributed")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run; prints, does not write RESULTS.md")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--output", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--update", action="store_true", help="replace only the chosen sections in --output")
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
    if args.update and Path(args.output).exists():
        stamp = f"_Re-measured {dt.date.today().isoformat()} on {machine()} by `{command.strip()}`._\n"
        first = len(parts) - 2 * len(chosen)
        measured = [stamp + parts[i] + parts[i + 1] for i in range(first, len(parts), 2)]
        text = _merge(Path(args.output).read_text(), measured)
    if not args.quick:
        Path(args.output).write_text(text + "\n")
        print(f"wrote {args.output}")
    return 0


def _merge(old: str, sections: list[str]) -> str:
    """``old`` with each ``## `` section of ``sections`` replacing the one of the same title, or appended."""
    def split(text):
        blocks, cur = [], []
        for line in text.splitlines():
            if line.startswith("## ") and cur:
                blocks.append("\n".join(cur))
                cur = []
            cur.append(line)
        blocks.append("\n".join(cur))
        return blocks

    blocks = split(old)
    for sec in sections:
        body = sec[sec.index("## "):]
        title = body.splitlines()[0]
        stamp = sec[: sec.index("## ")].strip()
        new = body.rstrip() + "\n\n" + stamp + "\n"
        for i, b in enumerate(blocks):
            if b.splitlines()[0] == title:
                blocks[i] = new
                break
        else:
            blocks.append(new)
    head = blocks[0].replace("(every number below comes from this one run)",
                             "(every number below comes from this one run, except sections marked re-measured)")
    return "\n".join([head] + blocks[1:]).rstrip() + "\n"


if __name__ == "__main__":
    sys.exit(main())
