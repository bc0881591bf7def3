"""Dask scaling: embedding the real photos on a LocalCluster of 1 and 2 worker processes (2 also with one ORT thread each).

Run: python benchmarks/bench_distributed.py [--quick]

Each worker process has one thread and builds its ONNX Runtime session once,
before the clock starts (``client.run(worker_embedder, ...)``), so the table
shows steady-state throughput: decode + inference + moving the feature
partitions back to the client. Cluster start-up and session builds are
reported separately. No feature cache is used: every image goes through the
network. The set-ups are timed in interleaved rounds, so that load from other
processes on a shared machine falls on all of them alike.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine, real_jpegs  # noqa: E402

sys.path.insert(0, str(REPO))

COMMAND = "python benchmarks/bench_distributed.py"
PARTITIONS = 4


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(quick: bool = False) -> str:
    """The markdown section: in-process vs 1 vs 2 local Dask workers on the real photos."""
    import dask.dataframe as dd
    import distributed
    import pandas as pd

    from deepfeat import ImageEmbedder
    from deepfeat.distributed import embed_dataframe, worker_embedder

    paths = real_jpegs()
    if quick:
        paths = paths[:64]
    repeat = 1 if quick else 3
    emb = ImageEmbedder(progress=False)
    # one intra-op thread per worker: two workers then split the two cores instead of each taking both
    emb_1thread = ImageEmbedder(progress=False, inference_threads=1)
    setups = (("1", 1, emb), ("2", 2, emb), ("2, inference_threads=1", 2, emb_1thread))
    ddf = dd.from_pandas(pd.DataFrame({"path": paths}), npartitions=PARTITIONS)

    startup = {"in-process (no Dask)": _timed(lambda: worker_embedder(emb))}
    jobs = {"in-process (no Dask)": lambda: worker_embedder(emb).transform(paths)}
    with ExitStack() as stack:
        for label, n, e in setups:
            t = time.perf_counter()
            cluster = stack.enter_context(
                distributed.LocalCluster(
                    n_workers=n,
                    threads_per_worker=1,
                    processes=True,
                    host="127.0.0.1",
                    # None would still bind the scheduler's HTTP server to port 8787; 0 = any free port
                    dashboard_address="127.0.0.1:0",
                    silence_logs=logging.ERROR,
                )
            )
            client = stack.enter_context(distributed.Client(cluster, set_as_default=False))
            client.wait_for_workers(n)
            client.run(worker_embedder, e)  # one session per worker, off the clock
            startup[label] = time.perf_counter() - t
            client.compute(embed_dataframe(ddf.partitions[:n], e)).result()  # warm the task path
            jobs[label] = lambda c=client, e=e: c.compute(embed_dataframe(ddf, e)).result()
        jobs["in-process (no Dask)"]()  # warm-up
        # rounds interleave the set-ups, so load from other processes hits them alike
        times: dict[str, list[float]] = {k: [] for k in jobs}
        for _ in range(repeat):
            for label, job in jobs.items():
                times[label].append(_timed(job))

    best = {k: min(v) for k, v in times.items()}
    lines = [
        "## Dask: 1 vs 2 local worker processes",
        "",
        f"`deepfeat.distributed.embed_dataframe` on {len(paths)} real JPEGs (hymenoptera), EfficientNet-Lite0 "
        f"pooled features, {PARTITIONS} partitions, `LocalCluster(threads_per_worker=1)`, no cache; best of "
        f"{repeat} interleaved rounds, sessions already built. Machine: {machine()}.",
        "",
        "| workers | images | seconds | img/s | ratio vs 1 worker | start-up s (cluster + sessions) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, seconds in best.items():
        lines.append(
            f"| {label} | {len(paths)} | {seconds:.2f} | {len(paths) / seconds:.1f} | {best['1'] / seconds:.2f}x "
            f"| {startup[label]:.1f} |"
        )
    lines += [
        "",
        "Two workers on one machine share its cores (each ONNX Runtime session uses one intra-op thread per "
        "core, unless `inference_threads` says otherwise), so locally they can only win by overlapping one "
        "worker's decoding with the other's inference; workers on more machines, or more cores, are where the "
        "throughput grows.",
        "",
        f"Command: `{COMMAND}{' --quick' if quick else ''}`",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # the guard also keeps spawned worker processes from re-running it
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 images, one timing each")
    print(run(quick=parser.parse_args().quick))
