"""The ``deepfeat`` command: embed folders, inspect models and layers, cross-validate heads."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger("deepfeat.cli")


def _read_inputs(path: str, column: str) -> pd.DataFrame:
    from .datasets import load_image_folder

    p = Path(path)
    if p.is_dir():
        df = load_image_folder(p)
        if df.empty:
            raise SystemExit(f"deepfeat: no image files under {p}")
        return df
    if p.suffix.lower() == ".csv":
        df = pd.read_csv(p)
        if column not in df.columns:
            raise SystemExit(f"deepfeat: {p} has no {column!r} column (columns: {list(df.columns)}); use --path-column")
        base = p.parent
        df = df.rename(columns={column: "path"})
        df["path"] = [str(q if Path(q).is_absolute() else base / q) for q in df["path"]]
        return df
    raise SystemExit(f"deepfeat: {p} is neither a folder nor a .csv file")


def _embedder(args):
    from .embedder import ImageEmbedder

    layers = args.layers.split(",") if args.layers else None
    return ImageEmbedder(
        model=args.model,
        layers=layers,
        pooling=args.pooling,
        batch_size=args.batch_size,
        providers=args.providers.split(",") if args.providers != "auto" else "auto",
        on_error=args.on_error,
        progress=not args.no_progress,
    )


def cmd_embed(args) -> int:
    df = _read_inputs(args.path, args.path_column)
    emb = _embedder(args)
    t0 = time.perf_counter()
    X = emb.fit(df["path"]).transform(df["path"])
    dt = time.perf_counter() - t0
    feats = pd.DataFrame(X, columns=emb.get_feature_names_out(), index=df.index)
    out = pd.concat([df.reset_index(drop=True), feats.reset_index(drop=True)], axis=1)
    out_path = Path(args.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path.suffix.lower() == ".csv":
        out.to_csv(out_path, index=False)
    else:
        out.to_parquet(out_path, index=False)
    failed = len(emb.failures_)
    print(
        f"embedded {len(df) - failed} of {len(df)} images -> {out_path} "
        f"({X.shape[1]} features, layers {[l for l, _ in emb.layers_]}, {emb.providers_[0]}, "
        f"{dt:.1f} s, {len(df) / max(dt, 1e-9):.1f} img/s)"
    )
    if failed:
        print(emb.failures_.to_string(index=False), file=sys.stderr)
    return 0


def cmd_layers(args) -> int:
    from .graph import list_layers

    df = list_layers(args.model, aliases_only=not args.all)
    with pd.option_context("display.max_rows", None, "display.width", 200):
        print(df.to_string(index=False))
    return 0


def cmd_models(args) -> int:
    from .registry import list_models

    with pd.option_context("display.max_colwidth", 60, "display.width", 200):
        print(list_models().to_string(index=False))
    return 0


def cmd_sample_photos(args) -> int:
    from .datasets import make_sample_photos

    df = make_sample_photos(args.dest, per_class=args.per_class)
    counts = df.groupby("label").size()
    print(f"wrote {len(df)} crops of real photos to {args.dest}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def cmd_classify(args) -> int:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    df = _read_inputs(args.train, args.path_column)
    df = df[df["label"].notna()]
    emb = _embedder(args)
    t0 = time.perf_counter()
    X = emb.fit(df["path"]).transform(df["path"])
    t_embed = time.perf_counter() - t0
    ok = ~np.isnan(X).any(axis=1)
    X, y = X[ok], df["label"].to_numpy()[ok]
    head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    n_splits = min(args.cv, int(pd.Series(y).value_counts().min()))
    if n_splits < 2:
        raise SystemExit("deepfeat: every class needs at least 2 images for cross-validation")
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=0)
    scores = cross_val_score(head, X, y, cv=cv, scoring="accuracy")
    print(
        f"{len(y)} images, {len(set(y))} classes, {X.shape[1]} features "
        f"(embedded in {t_embed:.1f} s on {emb.providers_[0]})"
    )
    print(f"logistic regression, {n_splits}-fold CV accuracy: {scores.mean():.3f} ± {scores.std():.3f}")
    return 0


def _add_embed_options(p):
    p.add_argument("--model", default="efficientnet_lite0", help="registered name or .onnx path")
    p.add_argument("--layers", default=None, help="comma-separated layer aliases or tensor names")
    p.add_argument("--pooling", default="avg", choices=["avg", "max", "gem", "none"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--providers", default="auto", help="'auto' or comma-separated providers (cpu, cuda, ...)")
    p.add_argument("--on-error", default="raise", choices=["raise", "skip"])
    p.add_argument("--path-column", default="path", help="column of image paths when PATH is a CSV")
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepfeat", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("embed", help="embed a folder of images (or a CSV of paths) to parquet/CSV")
    p.add_argument("path", help="folder of class sub-folders, or a CSV with a path column")
    p.add_argument("-o", "--output", required=True, help="output .parquet (or .csv)")
    _add_embed_options(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("layers", help="list the layers a model can be cut at")
    p.add_argument("model", nargs="?", default="efficientnet_lite0")
    p.add_argument("--all", action="store_true", help="every candidate tensor, not just the aliases")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("models", help="list registered models")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("sample-photos", help="write a labelled folder of crops of real photos (no download)")
    p.add_argument("dest")
    p.add_argument("--per-class", type=int, default=24)
    p.set_defaults(func=cmd_sample_photos)

    p = sub.add_parser("classify", help="embed a labelled folder and cross-validate a classical head")
    p.add_argument("train", help="folder of class sub-folders, or a CSV with path and label columns")
    p.add_argument("--cv", type=int, default=5)
    _add_embed_options(p)
    p.set_defaults(func=cmd_classify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2), format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as exc:
        # an error a person can act on: print it without a traceback
        print(f"deepfeat: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
