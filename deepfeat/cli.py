"""The ``deepfeat`` command: embed folders, inspect models and layers, cross-validate heads."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy, pandas and the library are imported by the commands that need them,
    import pandas as pd  # so that `deepfeat --help` and `--version` answer at once

logger = logging.getLogger("deepfeat.cli")

#: output suffixes `deepfeat embed` writes
_OUTPUT_SUFFIXES = (".parquet", ".csv")


def _read_inputs(path: str, column: str) -> pd.DataFrame:
    import pandas as pd

    from .datasets import load_image_folder

    p = Path(path)
    if p.is_dir():
        df = load_image_folder(p, allow_empty=True)
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


def _providers_arg(text: str):
    """``--providers`` as ImageEmbedder takes it: "auto" or a list of names."""
    return "auto" if text == "auto" else [p.strip() for p in text.split(",") if p.strip()]


def _layers_arg(text: str | None) -> "list | None":
    """``--layers 'stage4, pooled'`` as a list, spaces stripped, as ``--providers`` is;
    ``stage5@gem`` is the pair ``("stage5", "gem")``: that layer with its own pooling."""
    from .pooling import POOLINGS

    if not text:
        return None
    out: list = []
    for part in (t.strip() for t in text.split(",")):
        if not part:
            continue
        name, _, pooling = part.rpartition("@")
        out.append((name.strip(), pooling.strip()) if name and pooling.strip() in POOLINGS else part)
    return out or None


def _layers_text(picks) -> str:
    """(layer, pooling) picks as ``--layers`` takes them."""
    return ",".join(layer if pooling == "vector" else f"{layer}@{pooling}" for layer, pooling in picks)


def _cache_arg(args) -> "bool | str | None":
    """``--cache-dir DIR`` (absolute), ``--cache`` (the default folder); a saved model never brings its own folder."""
    if getattr(args, "no_cache", False):
        return None
    if getattr(args, "cache_dir", None):
        return os.path.abspath(os.path.expanduser(args.cache_dir))
    return True if getattr(args, "cache", False) else None


def _embed_params(args) -> dict:
    """The ImageEmbedder settings of the embedding options, other than model, layers, pooling and cache."""
    return {"batch_size": args.batch_size, "providers": _providers_arg(args.providers), "on_error": args.on_error,
            "progress": not args.no_progress, "cache_key": args.cache_key}


def _embedder(args):
    from .embedder import ImageEmbedder

    return ImageEmbedder(model=args.model, layers=_layers_arg(args.layers), pooling=args.pooling,
                         cache=_cache_arg(args), **_embed_params(args))


def cmd_embed(args) -> int:
    import pandas as pd

    from .images import ImageDecodeError

    out_path = Path(args.output)
    if out_path.suffix.lower() not in _OUTPUT_SUFFIXES:
        raise SystemExit(f"deepfeat: cannot write {out_path.suffix or 'a file without suffix'!r} files "
                         f"({out_path}); use .parquet (with a record of the settings) or .csv")
    df = _read_inputs(args.path, args.path_column)
    df["path"] = [os.path.abspath(p) for p in df["path"]]  # the same rows mean the same files from anywhere
    emb = _embedder(args)
    t0 = time.perf_counter()
    emb.fit(df["path"])
    try:
        X = emb.transform(df["path"])
    except ImageDecodeError as exc:
        return _report_raise(exc, df, args)
    dt = time.perf_counter() - t0
    feats = pd.DataFrame(X, columns=emb.get_feature_names_out(), index=df.index)
    out = pd.concat([df.reset_index(drop=True), feats.reset_index(drop=True)], axis=1)
    with _atomic_output(out_path) as tmp:
        if out_path.suffix.lower() == ".csv":
            out.to_csv(tmp, index=False)
        else:
            _write_parquet(out, tmp, emb)
    failed = len(emb.failures_)
    print(
        f"embedded {len(df) - failed} of {len(df)} images -> {out_path} "
        f"({X.shape[1]} features, layers {[l for l, _ in emb.layers_]}, {emb.providers_[0]}, "
        f"{dt:.1f} s, {len(df) / max(dt, 1e-9):.1f} img/s)"
    )
    if emb.cache_dir_ is not None:
        st = emb.cache_stats_
        print(f"cache {emb.cache_dir_}: {st['hits']} hits, {st['computed']} computed, {st['shared']} from other processes")
    if args.failures:
        _write_failures(emb.failures_, args.failures)
    if failed:
        # under --on-error skip: exit 0 (the output is complete and aligned) but say what failed
        print(f"deepfeat: {failed} of {len(df)} inputs failed and have NaN rows:", file=sys.stderr)
        for row in emb.failures_.head(_MAX_LISTED).itertuples(index=False):
            print(f"  {row.source}: {row.reason}", file=sys.stderr)
        if failed > _MAX_LISTED:
            more = f"see {args.failures}" if args.failures else "use --failures FILE for the full list"
            print(f"  ... and {failed - _MAX_LISTED} more ({more})", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _atomic_output(path: Path):
    """A temporary file beside ``path`` that takes its name only once written whole: a killed run
    leaves the old file (or none), never a half-written one under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # the mode a plain open() would give, not mkstemp's 0600
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_parquet(out: "pd.DataFrame", path: Path, emb) -> None:
    """Parquet whose schema metadata (key ``deepfeat``) records how the features were made."""
    import datetime as dt
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from . import __version__

    s = emb.spec_
    record = {
        "deepfeat_version": __version__,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": s.name,
        "model_sha256": emb.model_sha256_,
        "layers": [{"label": label, "tensor": tensor, "pooling": pooling}
                   for (label, tensor), pooling in zip(emb.layers_, emb.poolings_)],
        "pooling": emb.pooling,
        "tta": emb.tta,
        "preprocessing": {"input_size": s.input_size, "resize_size": s.resize_size, "interpolation": s.interpolation,
                          "mean": list(s.mean), "std": list(s.std), "channel_order": s.channel_order,
                          "jpeg_draft": emb.jpeg_draft},
        "paths": "absolute",
    }
    table = pa.Table.from_pandas(out, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[b"deepfeat"] = json.dumps(record).encode()
    pq.write_table(table.replace_schema_metadata(meta), path)


#: failed inputs printed on stderr; --failures FILE gets all of them
_MAX_LISTED = 20


def _write_failures(failures: pd.DataFrame, path: str) -> None:
    with _atomic_output(Path(path)) as tmp:
        failures.to_csv(tmp, index=False)


def _report_raise(exc, df: pd.DataFrame, args) -> int:
    import pandas as pd

    """--on-error raise met a bad input: say which and why, exit non-zero."""
    paths = [str(p) for p in df["path"]]
    where = f" (input {paths.index(exc.source) + 1} of {len(paths)})" if exc.source in paths else ""
    if args.failures:
        pos = paths.index(exc.source) if exc.source in paths else -1
        row = pd.DataFrame([(pos, exc.source, exc.reason)], columns=["position", "source", "reason"])
        _write_failures(row, args.failures)
    print(
        f"deepfeat: error: cannot embed {exc.source}{where}: {exc.reason}\n"
        "deepfeat: stopped at this input and wrote no output; fix or remove it, or use "
        "--on-error skip to give bad inputs NaN rows and a failure report",
        file=sys.stderr,
    )
    return 1


def cmd_layers(args) -> int:
    import pandas as pd

    from .resolve import list_layers

    df = list_layers(args.model, aliases_only=not args.all)
    with pd.option_context("display.max_rows", None, "display.width", 200):
        print(df.to_string(index=False))
    return 0


def cmd_models(args) -> int:
    import re

    import pandas as pd

    from .registry import list_models

    df = list_models()
    shown = pd.DataFrame({
        "name": df["name"],
        "input": df["input_size"],
        "pooled": df["pooled_dim"],
        "MB": df["size_mb"],
        "arrives": df["obtain"],
        # the file is on disk already
        "local": df["offline"].map({True: "yes", False: "no"}),
        # how the weights are known to be trained; list_models()["trained_source"] says where that was read
        "trained": df["trained"],
        # the licences' names (file; weights); list_models() has the whole text
        "license": ["+".join(part.strip().removeprefix("weights ")
                               for part in re.sub(r"\s*\([^)]*\)", "", str(v)).split(";"))
                    for v in df["license"]],
    })
    print(shown.to_string(index=False))
    print("(deepfeat.list_models() has every column: sources, sha256, mirrors, where 'trained' was read)")
    return 0


def cmd_sample_photos(args) -> int:
    from .datasets import make_sample_photos

    df = make_sample_photos(args.dest, per_class=args.per_class)
    counts = df.groupby("label").size()
    print(f"wrote {len(df)} crops of real photos to {args.dest}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def _labelled(path: str, args) -> pd.DataFrame:
    df = _read_inputs(path, args.path_column)
    if "label" not in df.columns:
        raise SystemExit(f"deepfeat: {path} has no 'label' column; a CSV needs path and label columns")
    unlabelled = df["label"].isna()
    if unlabelled.any():
        print(f"deepfeat: ignoring {int(unlabelled.sum())} files of {path} that have no label "
              "(not in a class sub-folder)", file=sys.stderr)
    return df[~unlabelled].reset_index(drop=True)


def _embed_rows(emb, df: "pd.DataFrame", what: str) -> tuple[Any, Any, Any]:
    """Embed df['path']; drop (and report) rows that failed under --on-error skip. Returns X, y, paths kept."""
    import numpy as np

    X = emb.transform(df["path"])
    ok = ~np.isnan(X).any(axis=1)
    if not ok.all():
        print(f"deepfeat: {int((~ok).sum())} {what} images failed and are left out:", file=sys.stderr)
        for row in emb.failures_.itertuples(index=False):
            print(f"  {row.source}: {row.reason}", file=sys.stderr)
    return X[ok], df["label"].to_numpy()[ok], df["path"].to_numpy()[ok]


def _cache_note(emb) -> str:
    stats = getattr(emb, "cache_stats_", None)
    if getattr(emb, "cache_dir_", None) is None or not stats:
        return ""
    return f", cache: {stats['hits']} hits, {stats['computed']} computed"


def cmd_classify(args) -> int:
    import numpy as np

    from .classify import (
        compare_heads, confusion_table, default_heads, format_leaderboard, make_image_pipeline, save_model,
        unseen_classes_message,
    )

    if args.report:  # before any work: a missing extra is one line, not a traceback after the embedding
        from .report import check_report_dependencies

        check_report_dependencies()
    heads = default_heads(random_state=args.seed)
    if args.heads:
        wanted = [h.strip() for h in args.heads.split(",") if h.strip()]
        unknown = [h for h in wanted if h not in heads]
        if unknown:
            raise SystemExit(f"deepfeat: unknown head(s) {unknown}; choose from {', '.join(heads)}")
        heads = {h: heads[h] for h in wanted}
    train = _labelled(args.train, args)
    test = _labelled(args.test, args) if args.test else None
    t_auto = time.perf_counter()
    recipe, probe = _auto_layers(train, args) if args.auto else (None, None)
    t_probe = time.perf_counter() - t_auto
    emb = _embedder(args)
    if recipe is not None:
        emb.set_params(layers=recipe)
    t0 = time.perf_counter()
    emb.fit()
    X, y, _ = _embed_rows(emb, train, "training")
    t_embed = time.perf_counter() - t0
    print(
        f"{len(y)} training images, {len(set(y))} classes, {X.shape[1]} features from "
        f"{','.join(l for l, _ in emb.layers_)} (embedded in {t_embed:.1f} s on {emb.providers_[0]}{_cache_note(emb)})"
    )
    board = compare_heads(X, y, heads, cv=args.cv, scoring=args.scoring, n_jobs=args.n_jobs, random_state=args.seed,
                          progress=not args.no_progress)
    searched = [board]
    recipe_note = None
    if recipe is not None:
        # the probe is noisy on a few hundred images: keep the recipe only if the heads, under the
        # same folds and on the training images alone, do at least as well as on the default layer
        plain = _embedder(args).fit()
        Xd, yd, _ = _embed_rows(plain, train, "training")
        default_board = compare_heads(Xd, yd, heads, cv=args.cv, scoring=args.scoring, n_jobs=args.n_jobs,
                                      random_state=args.seed, progress=not args.no_progress)
        searched = [board, default_board]
        ours, theirs = board["mean_test_score"].iloc[0], default_board["mean_test_score"].iloc[0]
        keep = ours > theirs
        recipe_note = (f"recipe --layers {_layers_text(_picks(recipe))}: best head CV {ours:.3f}; default layer "
                       f"({','.join(l for l, _ in plain.layers_)}): {theirs:.3f}; kept the "
                       f"{'recipe' if keep else 'default layer'}")
        print(f"--auto: best head CV {ours:.3f} on the recipe, {theirs:.3f} on the default layer "
              f"({','.join(l for l, _ in plain.layers_)}): keeping the {'recipe' if keep else 'default'}")
        if not keep:
            emb, X, y, board = plain, Xd, yd, default_board
    print(f"\n{board.attrs['n_splits']}-fold stratified CV, {args.scoring} (mean ± std over folds), best first:")
    print(format_leaderboard(board))
    if args.leaderboard:
        out = board.drop(columns="estimator").assign(params=lambda d: d["params"].map(str))
        Path(args.leaderboard).parent.mkdir(parents=True, exist_ok=True)
        out.to_csv(args.leaderboard)
    best = board.iloc[0]
    if best["estimator"] is None:
        raise SystemExit("deepfeat: no head could be fitted on these images (see the leaderboard); "
                         "add images, or pick other heads with --heads")
    pipe = make_image_pipeline(emb, best["estimator"])
    save_model(pipe, args.output)
    t_test0 = time.perf_counter()
    print(f"\nbest head: {best['head']} -> {args.output} (apply it: deepfeat predict {args.output} PATHS)")
    evaluated, notes = None, []
    if test is not None:
        Xt, yt, test_paths = _embed_rows(emb, test, "test")
        if len(yt) < len(test):
            notes.append(f"{len(test) - len(yt)} of {len(test)} test images could not be read and are left out.")
        pred = pipe[1:].predict(Xt)
        evaluated = (yt, pred, test_paths, _predicted_probability(pipe[1:], Xt, pred))
        acc = float(np.mean(pred == yt))
        print(f"\ntest: {len(yt)} images, accuracy {acc:.4f} ({int((pred == yt).sum())}/{len(yt)}){_cache_note(emb)}")
        if unseen := unseen_classes_message(yt, pipe.classes_):
            print(f"deepfeat: warning: {unseen}", file=sys.stderr)
        labels = sorted(set(y) | set(yt))
        print(confusion_table(yt, pred, labels=labels).to_string())
    t_test = time.perf_counter() - t_test0
    print("\n" + _time_report(t_probe if recipe is not None else None, t_embed, searched, t_test if test is not None
                              else None, board.attrs.get("n_jobs")))
    if recipe is not None:
        print(f"--auto took {time.perf_counter() - t_auto:.1f} s in all (layer choice, heads, test)")
    if args.report:
        timings = {"--auto probe": t_probe} if recipe is not None else {}
        timings["embedding (training images)"] = t_embed
        for i, b in enumerate(searched):
            which = "" if len(searched) == 1 else (" on the recipe" if i == 0 else " on the default layer")
            timings[f"head searches{which} (wall, {b.attrs['n_jobs']} threads)"] = b.attrs["search_seconds"]
            timings[f"refit of the best head{which}"] = b.attrs["refit_seconds"]
        if test is not None:
            timings["test (embedding and prediction)"] = t_test
        _write_report(args, evaluated, board=board, embedder=emb, head=best["estimator"], probe=probe,
                      recipe=recipe_note, timings=timings,
                      settings={"training images": f"{args.train} ({len(y)} images, {len(set(y))} classes)",
                                "test images": args.test or "none (no --test)",
                                "CV": f"{board.attrs['n_splits']}-fold stratified, {args.scoring}, seed {args.seed}",
                                "best head": f"{best['head']} -> {args.output}"},
                      notes=notes,
                      title=f"deepfeat classify {_short(args.train)}" + (f" --test {_short(args.test)}" if args.test else ""))
    return 0


def _short(path: str) -> str:
    """The last two parts of a path, for a title."""
    return "/".join(Path(os.path.abspath(path)).parts[-2:])


def _picks(layers: list) -> list:
    return [(x, "vector") if isinstance(x, str) else tuple(x) for x in layers]


def _predicted_probability(head, X, pred):
    """The probability the head gave each predicted class (its predict_proba), or None if it has none."""
    import numpy as np

    if not hasattr(head, "predict_proba"):
        return None
    proba = head.predict_proba(X)
    column = {c: i for i, c in enumerate(head.classes_)}
    return np.asarray([proba[i, column[p]] for i, p in enumerate(pred)])


def _write_report(args, evaluated, *, title: str, **kwargs) -> None:
    """--report FILE: the run as one self-contained HTML file (deepfeat.report), written atomically."""
    from .report import make_report

    y_true, y_pred, paths, proba = evaluated if evaluated is not None else (None, None, None, None)
    report = make_report(y_true, y_pred, paths=paths, probability=proba, title=title,
                         leaderboard=kwargs.pop("board", None), **kwargs)
    out = report.save(args.report, normalize=args.report_normalize)
    print(f"report -> {out}")


def _time_report(probe: float | None, embed: float, boards: list, test: float | None, workers) -> str:
    """Where classify's time went: embedding, each head's search (work seconds over the workers), test."""
    parts = [f"--auto probe {probe:.1f} s"] if probe is not None else []
    parts.append(f"embedding {embed:.1f} s")
    for i, b in enumerate(boards):
        heads = ", ".join(f"{h} {t:.1f}" for h, t in zip(b["head"], b["search_time"]))
        which = "" if len(boards) == 1 else (" on the recipe" if i == 0 else " on the default layer")
        parts.append(f"head searches{which} {b.attrs['search_seconds']:.1f} s on {b.attrs['n_jobs']} threads "
                     f"({heads} s of work), refit {b.attrs['refit_seconds']:.1f} s")
    if test is not None:
        parts.append(f"test {test:.1f} s")
    return "time: " + "; ".join(parts)


def _auto_layers(train: "pd.DataFrame", args) -> tuple[list, "pd.DataFrame"]:
    """``classify --auto``: up to three (layer, pooling) picks, chosen by a probe on the training images only."""
    from .selection import select_recipe

    if args.layers:
        raise SystemExit("deepfeat: --auto chooses the layers itself; leave out --layers")
    t = time.perf_counter()
    layers, scores = select_recipe(train["path"], train["label"], model=args.model, max_layers=3, cv=args.cv,
                                   cache=_cache_arg(args), random_state=args.seed, scoring=args.scoring,
                                   embedder_params=_embed_params(args))
    step = scores.attrs["combination"][-1] if scores.attrs.get("combination") else None
    shown = _layers_text(_picks(layers))
    probe = f", probe CV {step['mean_test_score']:.3f}" if step else ""
    print(f"--auto: {len(scores)} (layer, pooling) pairs probed in {time.perf_counter() - t:.1f} s on the "
          f"training images; recipe --layers {shown}{probe}")
    return layers, scores


def cmd_predict(args) -> int:
    import numpy as np
    import pandas as pd

    from .classify import load_model, predict_paths
    from .datasets import load_image_folder

    if args.report:
        from .report import check_report_dependencies

        check_report_dependencies()
    # the cache folder is this machine's choice (--cache-dir, --no-cache), never a folder the file names
    pipe = load_model(args.model, cache=_cache_arg(args) if (args.no_cache or args.cache_dir) else "saved")
    overrides: dict[str, Any] = {"progress": not args.no_progress}
    if args.providers:
        # a loaded pipeline has no session yet (sessions are not pickled): it opens on these
        overrides["providers"] = _providers_arg(args.providers)
    pipe.steps[0][1].set_params(**overrides)
    paths: list[str] = []
    labels: list = []
    for p in args.paths:
        q = Path(p)
        if q.is_dir():
            found = load_image_folder(q, allow_empty=True)
            paths += found["path"].tolist()
            labels += found["label"].tolist()
        elif q.suffix.lower() == ".csv":
            found = _read_inputs(p, args.path_column)
            paths += found["path"].tolist()
            labels += found["label"].tolist() if "label" in found.columns else [None] * len(found)
        else:
            paths.append(p)
            labels.append(None)
    if not paths:
        raise SystemExit(f"deepfeat: no image files in {args.paths}")
    if args.report and all(lab is None or pd.isna(lab) for lab in labels):
        raise SystemExit(f"deepfeat: --report needs labelled images to show what was wrong, and {args.paths} has "
                         "none: give a folder of class sub-folders (root/<label>/<image>) or a CSV with a "
                         "'label' column")
    t0 = time.perf_counter()
    result = predict_paths(pipe, paths)
    t_predict = time.perf_counter() - t0
    if args.output:
        with _atomic_output(Path(args.output)) as tmp:
            result.to_csv(tmp, index=False)
        print(f"predicted {int(result['error'].isna().sum())} of {len(result)} images -> {args.output}")
    else:
        with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_colwidth", 80):
            shown = result.drop(columns="error").astype({"prediction": object})
            shown.loc[result["error"].notna(), "prediction"] = "(unreadable)"
            print(shown.to_string(index=False))
    failed = result[result["error"].notna()]
    for row in failed.itertuples(index=False):
        print(f"deepfeat: could not read {row.path}: {row.error}", file=sys.stderr)
    known = [i for i, lab in enumerate(labels) if lab is not None and pd.notna(lab) and result["error"].isna().iloc[i]]
    if known:  # a labelled folder (or a CSV with labels): say how right the model is
        from .classify import confusion_table, unseen_classes_message

        # as text: a CSV's labels may read as numbers where the training folders gave names
        truth = np.asarray([str(labels[i]) for i in known], dtype=object)
        pred = np.asarray([str(p) for p in result["prediction"].iloc[known]], dtype=object)
        hits = int((pred == truth).sum())
        print(f"\naccuracy on {len(known)} labelled images: {hits / len(known):.4f} ({hits}/{len(known)})")
        if unseen := unseen_classes_message(truth, pipe.classes_):
            print(f"deepfeat: warning: {unseen}", file=sys.stderr)
        classes = sorted(set(truth) | set(pred))
        print(confusion_table(truth.astype(str), pred.astype(str), labels=[str(k) for k in classes]).to_string())
        if args.report:
            prob = result["probability"].iloc[known].to_numpy(dtype=float)
            notes = []
            if len(known) < len(result):
                notes.append(f"{len(result) - len(known)} of {len(result)} inputs are left out: "
                             f"{len(failed)} could not be read, {len(result) - len(known) - len(failed)} have no label.")
            _write_report(args, (truth, pred, [paths[i] for i in known], None if np.isnan(prob).all() else prob),
                          embedder=pipe.steps[0][1], head=pipe, notes=notes,
                          timings={"embedding and prediction": t_predict},
                          settings={"saved model": os.path.abspath(args.model),
                                    "images": f"{', '.join(args.paths)} ({len(known)} labelled images)"},
                          title=f"deepfeat predict {Path(args.model).name}")
    return 1 if len(failed) == len(result) else 0


def cmd_select_layer(args) -> int:
    import pandas as pd

    from .selection import plot_layer_scores, select_layer

    df = _labelled(args.train, args)
    # select-layer tries its own poolings on every candidate: `layer@pooling` names the layer
    layers = [x[0] if isinstance(x, tuple) else x for x in _layers_arg(args.layers) or []] or None
    poolings = [p.strip() for p in args.pooling.split(",") if p.strip()]
    params = _embed_params(args)
    scores = select_layer(
        df["path"], df["label"], model=args.model, layers=layers, poolings=poolings, cv=args.cv,
        cache=_cache_arg(args), scoring=args.scoring, random_state=args.seed, embedder_params=params,
    )
    a = scores.attrs
    print(
        f"linear probe (standardise + ridge), {a['n_splits']}-fold stratified CV {a['scoring']} on "
        f"{a['n_images']} images; embedding took {a['embed_time']:.1f} s"
    )
    table = pd.DataFrame(
        {
            "layer": scores["layer"],
            "pooling": scores["pooling"],
            "features": scores["n_features"],
            a["scoring"]: [f"{m:.3f} ± {s:.3f}" for m, s in zip(scores["mean_test_score"], scores["std_test_score"])],
            "rank": scores["rank_test_score"],
        }
    )
    with pd.option_context("display.max_rows", None, "display.width", 200):
        print(table.to_string(index=False))
    best = scores.loc[scores["mean_test_score"].idxmax()]
    keep = ""  # the user's own options, so the suggested command reads the same cache and model
    if args.model != "efficientnet_lite0":
        keep += f" --model {args.model}"
    if args.cache_dir:
        keep += f" --cache-dir {os.path.abspath(args.cache_dir)}"
    elif args.cache:
        keep += " --cache"
    pooling = "" if best["pooling"] == "vector" else f" --pooling {best['pooling']}"
    print(f"\nbest: {best['layer']} ({best['pooling']}), {best['mean_test_score']:.3f}; "
          f"use it: deepfeat classify {args.train} --layers {best['layer']}{pooling}{keep}")
    if a.get("duplicates"):
        print("scored once (same vectors): " + ", ".join(f"{k} = {v}" for k, v in a["duplicates"].items()))
    combo = a.get("combination") or []
    if len(combo) > 1:
        last = combo[-1]
        print(f"best combination: {' + '.join(f'{l}/{p}' for l, p in last['picks'])}, "
              f"{last['mean_test_score']:.3f} ± {last['std_test_score']:.3f}; use it: deepfeat classify "
              f"{args.train} --layers {_layers_text(last['picks'])}{keep}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        scores.to_csv(args.output, index=False)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        ax = plot_layer_scores(scores)
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        ax.figure.savefig(args.plot, dpi=120)
        print(f"plot -> {args.plot}")
    return 0


def _cache_dir(path: str | None) -> Path:
    from .cache import default_cache_dir, resolve_cache_dir

    found = resolve_cache_dir(path) if path else None
    return found if found is not None else default_cache_dir()


def cmd_cache_info(args) -> int:
    import pandas as pd

    from .cache import FeatureCache

    info = FeatureCache(_cache_dir(args.path)).info(full=args.full)
    if not info["exists"]:
        print(f"no feature cache at {info['path']}")
        return 0
    print(
        f"{info['path']}: {info['vectors']} vectors, {info['bytes'] / 1e6:.1f} MB, "
        f"{'full integrity_check' if args.full else 'integrity (quick_check)'} ok, "
        f"{info['claims']} images being computed now"
    )
    rows = [
        {
            "fingerprint": f["fingerprint"][:10],
            "model": Path(str(f["description"].get("model", "?"))).name[:24],
            "layer": ",".join(f["description"].get("layers", []))[:20],
            "pooling": f["description"].get("pooling", "?"),
            "input": f["description"].get("input_size", "?"),
            "dim": f["dim"],
            "vectors": f["vectors"],
            "computed": f["computed"],
        }
        for f in info["fingerprints"]
    ]
    if rows:
        with pd.option_context("display.width", 100, "display.max_colwidth", 24):
            print(pd.DataFrame(rows).to_string(index=False))
    return 0


def cmd_cache_clear(args) -> int:
    from .cache import FeatureCache

    cache = FeatureCache(_cache_dir(args.path))
    removed = cache.clear()
    if removed:
        print(f"removed {', '.join(p.name for p in removed)} from {cache.directory}")
    else:
        print(f"no feature cache at {cache.path}; nothing to clear")
    return 0


def _add_export_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a PyTorch model to ONNX with standard layer aliases (needs deepfeat[export])",
        description=(
            "SOURCE is a registered model made by export (efficientnet_lite0/1/2: written to "
            "the user model cache and checked against its sha256; inception_v3, resnet50_tv: from "
            "torchvision's weights, which torchvision checks by their hash), torchvision:NAME, "
            "timm:NAME, or package.module:callable returning a torch.nn.Module."
        ),
    )
    p.add_argument("source")
    p.add_argument("-o", "--output", help="output .onnx (default: the user model cache for registered models)")
    p.add_argument("--random-weights", action="store_true", help="do not load pretrained weights")
    p.add_argument("--input-size", type=int, help="override the crop size")
    p.add_argument("--resize-size", type=int, help="override the shorter side before cropping")
    p.add_argument("--no-check", action="store_true", help="skip the ONNX-vs-PyTorch comparison")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    try:
        return _cmd_export(args)
    except ImportError as exc:
        print(f"deepfeat: error: {exc}", file=sys.stderr)
        return 1


def _cmd_export(args) -> int:
    # torch is imported only when export runs
    from .export import export_model, export_registered, load_source
    from .registry import _REGISTRY, file_sha256, user_models_dir

    spec = _REGISTRY.get(args.source)
    if spec is not None:
        if args.random_weights and not args.output:
            # the cache's file is taken for the trained one; a random-weights copy goes where it is asked to
            print(f"deepfeat: error: --random-weights for the registered model {args.source!r} needs -o FILE "
                  "(the user model cache holds the pretrained file only).", file=sys.stderr)
            return 1
        out = Path(args.output) if args.output else user_models_dir() / spec.filename
        path = export_registered(args.source, out, pretrained=not args.random_weights)
        digest = file_sha256(path)
        if not spec.accepted_sha256:
            weights = "random weights (not pretrained)" if args.random_weights else "pretrained weights"
            print(f"exported {args.source} ({weights}) -> {path} ({path.stat().st_size} bytes, sha256 {digest}; "
                  "made here, so no sha256 is pinned: its recipe, preprocessing, aliases and weights are "
                  "checked when it is used)")
            return 0
        good = digest in spec.accepted_sha256
        ok = "matches the registry" if good else f"DIFFERS from the registry's {spec.sha256}"
        print(f"exported {args.source} -> {path} ({path.stat().st_size} bytes, sha256 {digest}: {ok})")
        return 0 if good else 1
    model, prep = load_source(args.source, pretrained=not args.random_weights)
    if args.input_size:
        ratio = prep["resize_size"] / prep["input_size"]
        prep["input_size"], prep["resize_size"] = args.input_size, round(args.input_size * ratio)
    if args.resize_size:
        prep["resize_size"] = args.resize_size
    name = args.source.replace(":", "_").replace(".", "_")
    out = Path(args.output or f"{name}.onnx")
    weights = "random weights (not pretrained)" if args.random_weights else "pretrained weights"
    res = export_model(model, out, **prep, description=f"{args.source}, {weights}",
                       source=f"deepfeat export {args.source}", check=not args.no_check)
    print(f"exported {args.source} ({weights}) -> {res.path} ({res.size_bytes} bytes, sha256 {res.sha256})")
    print("preprocessing: " + ", ".join(f"{k}={v}" for k, v in res.preprocessing.items()))
    print("aliases: " + ", ".join(f"{a}->{t}" for a, t in res.layers.items()))
    if res.max_abs_diff:
        worst = max(res.max_abs_diff.items(), key=lambda kv: kv[1])
        print(f"checked against PyTorch on {len(res.max_abs_diff)} aliases: max |onnx - torch| = "
              f"{worst[1]:.3g} ({worst[0]})")
    return 0


def _add_cache_options(p, *, predict: bool = False) -> None:
    # a flag and a separate DIR option: `--cache photos/` can never swallow the positional folder
    if predict:
        p.add_argument("--cache-dir", default=None, metavar="DIR",
                       help="read and store features in DIR instead of the cache the model was saved with")
        p.add_argument("--no-cache", action="store_true", help="use no feature cache")
        return
    p.add_argument("--cache", action="store_true",
                   help="reuse features from the default cache ($DEEPFEAT_CACHE or ~/.cache/deepfeat/features)")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="reuse features from the cache in DIR")
    p.add_argument(
        "--cache-key", default="content", choices=["content", "stat"],
        help="recognise files by a hash of their bytes, or (faster) by path, size and timestamps",
    )


def _add_embed_options(p):
    p.add_argument("--model", default="efficientnet_lite0", help="registered name or .onnx path")
    p.add_argument("--layers", default=None,
                   help="comma-separated layer aliases or tensor names; layer@pooling gives one its own pooling")
    p.add_argument("--pooling", default="avg", choices=["avg", "max", "gem", "none"],
                   help="how feature maps become vectors (none: flatten)")
    p.add_argument("--batch-size", type=int, default=32, help="images per ONNX Runtime call")
    p.add_argument("--providers", default="auto", help="'auto' or comma-separated providers (cpu, cuda, ...)")
    p.add_argument("--on-error", default="raise", choices=["raise", "skip"],
                   help="a bad image stops the run, or gets a NaN row and a failure report")
    p.add_argument("--path-column", default="path", help="column of image paths when PATH is a CSV")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_cache_options(p)


def _add_report_options(p, what: str) -> None:
    p.add_argument("--report", default=None, metavar="HTML",
                   help=f"write one self-contained HTML file of {what}; needs deepfeat[report]")
    p.add_argument("--report-normalize", action="store_true",
                   help="in the report, colour the confusion matrix by row fractions instead of counts")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, but not the "None" of options that have no default."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


class _Subparsers(argparse._SubParsersAction):
    # every subcommand shows its defaults and takes -v after its name as well
    def add_parser(self, name, **kw):
        kw.setdefault("formatter_class", _Formatter)
        p = super().add_parser(name, **kw)
        p.add_argument("-v", "--verbose", dest="sub_verbose", action="count", default=0,
                       help="more log output (-vv: tracebacks too)")
        return p


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="deepfeat", description=__doc__, formatter_class=_Formatter)
    parser.register("action", "parsers", _Subparsers)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: tracebacks too)")
    parser.add_argument("--version", action="version", version=f"deepfeat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("embed", help="embed a folder of images (or a CSV of paths) to parquet/CSV")
    p.add_argument("path", help="folder of class sub-folders, or a CSV with a path column")
    p.add_argument("-o", "--output", required=True, help="output .parquet (or .csv)")
    p.add_argument(
        "--failures", default=None, metavar="FILE",
        help="write the inputs that failed (position, source, reason) to this CSV",
    )
    _add_embed_options(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("layers", help="list the layers a model can be cut at")
    p.add_argument("model", nargs="?", default="efficientnet_lite0", help="registered name or .onnx path")
    p.add_argument("--all", action="store_true", help="every candidate tensor, not just the aliases")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("models", help="list registered models")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("sample-photos", help="write a labelled folder of crops of real photos (no download)")
    p.add_argument("dest", help="folder to write <label>/<image>.jpg into")
    p.add_argument("--per-class", type=int, default=24, help="crops per photo (class)")
    p.set_defaults(func=cmd_sample_photos)

    p = sub.add_parser(
        "classify", help="embed a labelled folder, grid-search classical heads, save the best pipeline",
        description="Embed TRAIN once, grid-search classical heads on the features with stratified CV, print a "
        "leaderboard, save the best as a joblib Pipeline (images in, labels out), and score it on --test.",
    )
    p.add_argument("train", help="folder of class sub-folders, or a CSV with path and label columns")
    p.add_argument("--test", default=None, help="held-out folder/CSV: report accuracy and a confusion matrix")
    p.add_argument("-o", "--output", default="deepfeat_model.joblib",
                   help="where to save the best pipeline: .skops (safe to share, needs skops) or .joblib (a pickle)")
    p.add_argument("--heads", default=None, help="comma-separated subset of: logreg,linear_svm,rbf_svm,random_forest,knn")
    p.add_argument("--cv", type=int, default=5, help="stratified folds (lowered to the smallest class size)")
    p.add_argument("--scoring", default="accuracy", help="scikit-learn scorer: accuracy, balanced_accuracy, f1_macro...")
    p.add_argument("--n-jobs", type=int, default=None, help="worker threads for the head searches (default: one per core; 1: one fit after another)")
    p.add_argument("--seed", type=int, default=0, help="seed of the CV shuffle and the random forest")
    p.add_argument("--leaderboard", default=None, metavar="CSV", help="also write the leaderboard to this CSV")
    _add_report_options(p, "the run (settings, leaderboard, per-fold CV scores; with --test the confusion "
                        "matrix, per-class scores and the misclassified images)")
    p.add_argument("--auto", action="store_true",
                   help="first choose up to three (layer, pooling) with a linear probe on TRAIN alone "
                        "(deepfeat select-layer), then search the heads on them")
    _add_embed_options(p)
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("predict", help="apply a pipeline saved by classify to images")
    p.add_argument("model", help="a .skops (safe to share) or .joblib file from deepfeat classify (.joblib is a pickle: load only files you trust)")
    p.add_argument("paths", nargs="+", help="image files, folders (searched recursively) or CSVs of paths")
    p.add_argument("-o", "--output", default=None, help="write path,prediction,probability,error to this CSV")
    p.add_argument("--providers", default=None, help="override the saved providers ('auto', 'cpu', 'cuda', ...)")
    p.add_argument("--path-column", default="path", help="column of image paths in a CSV")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_report_options(p, "the predictions on labelled images (confusion matrix, per-class scores, the "
                        "misclassified images)")
    _add_cache_options(p, predict=True)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "select-layer", conflict_handler="resolve",
        help="score every layer and pooling with a cross-validated linear probe",
        description="Cut the model at every candidate layer, embed TRAIN once per pooling, and score each "
        "(layer, pooling) with a standardised ridge probe under stratified CV, to pick the layer by evidence.",
    )
    p.add_argument("train", help="folder of class sub-folders, or a CSV with path and label columns")
    p.add_argument("--cv", type=int, default=5, help="stratified folds (lowered to the smallest class size)")
    p.add_argument("--scoring", default="accuracy", help="scikit-learn scorer name")
    p.add_argument("--seed", type=int, default=0, help="seed of the CV shuffle")
    p.add_argument("-o", "--output", default=None, metavar="CSV", help="write the score table to this CSV")
    p.add_argument("--plot", default=None, metavar="PNG", help="save a plot of the scores (needs matplotlib)")
    _add_embed_options(p)
    # same names as for embed, but lists of candidates here
    p.add_argument("--layers", default=None, help="comma-separated candidate layers (default: every alias)")
    p.add_argument("--pooling", default="avg,gem,max", help="comma-separated poolings to try (default: avg,gem,max)")
    p.set_defaults(func=cmd_select_layer)

    p = sub.add_parser("cache", help="inspect or clear an on-disk feature cache")
    p.register("action", "parsers", _Subparsers)  # `cache info -v` as well
    csub = p.add_subparsers(dest="cache_command", required=True)
    for name, func, text in (
        ("info", cmd_cache_info, "vectors stored per model/layer setting, size, integrity check"),
        ("clear", cmd_cache_clear, "delete the cache database (also rebuilds a corrupt one: it refills on the next run)"),
    ):
        q = csub.add_parser(name, help=text)
        q.add_argument("path", nargs="?", default=None, help="cache folder (default: $DEEPFEAT_CACHE or ~/.cache/deepfeat/features)")
        if name == "info":
            q.add_argument("--full", action="store_true",
                           help="run SQLite's complete integrity_check (reads every page; slower on a large cache)")
        q.set_defaults(func=func)


    _add_export_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbosity = args.verbose + getattr(args, "sub_verbose", 0)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(verbosity, 2), format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (OSError, ImportError, ValueError, KeyError, RuntimeError) as exc:
        if verbosity >= 2:
            raise  # -vv: the whole traceback
        # an error a person can act on: print it without a traceback
        print(f"deepfeat: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if verbosity >= 2:
            raise
        # the work's own cleanup (claims, temporary outputs) has run on the way up; one line, the shell's code
        print("deepfeat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
