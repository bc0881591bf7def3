"""The newcomer's first hour with the ``deepfeat`` command: one test per rough edge found."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from deepfeat import ImageEmbedder, load_image_folder, make_sample_photos
from deepfeat.cli import main

from .conftest import TINY_PREPROCESSING


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    """12 photos in 6 classes: fewer per training fold than the kNN grid's largest k."""
    root = tmp_path_factory.mktemp("small")
    make_sample_photos(root, per_class=2, size=64)
    return root


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "deepfeat", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_classify_on_a_small_folder_prints_no_traceback(small_folder, tmp_path, tiny_model_path):
    res = _run("classify", small_folder, "--model", tiny_model_path, "--cv", "2", "--no-progress",
               "-o", tmp_path / "m.joblib", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    assert "knn" in res.stdout  # kNN ran with the neighbours a fold holds, and is on the board


def test_a_head_that_cannot_fit_is_one_line():
    from sklearn.base import BaseEstimator, ClassifierMixin

    from deepfeat.classify import compare_heads, format_leaderboard

    class Broken(ClassifierMixin, BaseEstimator):
        def fit(self, X, y):
            raise RuntimeError("this head cannot fit\nsecond line")

    X = np.random.default_rng(0).normal(size=(20, 3))
    y = np.repeat([0, 1], 10)
    from sklearn.linear_model import LogisticRegression

    board = compare_heads(X, y, {"broken": Broken(), "logreg": LogisticRegression()}, cv=2)
    assert board["head"].tolist() == ["logreg", "broken"]
    text = format_leaderboard(board)
    assert "failed" in text and "second line" in text and "Traceback" not in text


def test_cache_flag_cannot_swallow_the_folder(tmp_path, photo_folder, tiny_model_path, monkeypatch):
    root, _ = photo_folder
    monkeypatch.setenv("DEEPFEAT_CACHE", str(tmp_path / "default-cache"))
    assert main(["embed", "--cache", str(root), "-o", str(tmp_path / "f.parquet"), "--model", str(tiny_model_path),
                 "--no-progress"]) == 0
    assert (tmp_path / "default-cache" / "features.sqlite3").exists()
    assert main(["embed", str(root), "--cache-dir", str(tmp_path / "c"), "-o", str(tmp_path / "g.parquet"),
                 "--model", str(tiny_model_path), "--no-progress"]) == 0
    assert (tmp_path / "c" / "features.sqlite3").exists()


def test_a_saved_model_never_brings_its_cache_folder(tmp_path, photo_folder, tiny_model_path, monkeypatch, caplog):
    """#24: the folder a model file names is not written to without asking; --cache-dir chooses it again."""
    import joblib

    root, df = photo_folder
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    monkeypatch.setenv("DEEPFEAT_CACHE", str(tmp_path / "default-cache"))
    res = _run("classify", root, "--model", tiny_model_path, "--heads", "logreg", "--cv", "2", "--no-progress",
               "--cache-dir", "rel-cache", "-o", work / "m.joblib", cwd=work)
    assert res.returncode == 0, res.stderr
    from deepfeat.classify import load_model

    stored = joblib.load(work / "m.joblib").steps[0][1]
    assert os.path.isabs(stored.cache) and stored.cache_dir_ == work / "rel-cache"
    with caplog.at_level("WARNING", logger="deepfeat.classify"):
        loaded = load_model(work / "m.joblib").steps[0][1]
    assert loaded.cache is True and loaded.cache_dir_ == tmp_path / "default-cache"
    assert "rel-cache" in caplog.text and "not used without asking" in caplog.text
    assert load_model(work / "m.joblib", cache=str(work / "rel-cache")).steps[0][1].cache_dir_ == work / "rel-cache"
    assert load_model(work / "m.joblib", cache=None).steps[0][1].cache_dir_ is None
    res = _run("predict", work / "m.joblib", *df["path"][:3], "--no-progress", cwd=elsewhere)
    assert res.returncode == 0, res.stderr
    assert "not used without asking" in res.stderr
    assert not (elsewhere / "rel-cache").exists()
    res = _run("predict", work / "m.joblib", *df["path"][:3], "--no-progress", "--no-cache", cwd=elsewhere)
    assert res.returncode == 0 and "not used without asking" not in res.stderr, res.stderr
    res = _run("predict", work / "m.joblib", *df["path"][:3], "--no-progress", "--cache-dir", work / "rel-cache",
               cwd=elsewhere)
    assert res.returncode == 0 and "not used without asking" not in res.stderr, res.stderr


def test_layers_with_spaces(tmp_path, photo_folder, tiny_model_path):
    root, _ = photo_folder
    out = tmp_path / "f.parquet"
    assert main(["embed", str(root), "-o", str(out), "--model", str(tiny_model_path), "--layers", "conv1, pooled",
                 "--no-progress"]) == 0
    cols = pd.read_parquet(out).columns
    assert any(c.startswith("conv1_") for c in cols) and any(c.startswith("pooled_") for c in cols)


def test_verbose_after_the_subcommand_and_vv_tracebacks(tmp_path, tiny_model_path):
    res = _run("layers", tmp_path / "missing.onnx", "-v")
    assert res.returncode == 1 and "deepfeat: error:" in res.stderr and "Traceback" not in res.stderr
    res = _run("layers", tmp_path / "missing.onnx", "-vv")
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_version_help_defaults_and_a_light_import():
    from deepfeat import __version__

    res = _run("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"deepfeat {__version__}"
    text = " ".join(_run("embed", "--help").stdout.split())
    assert "(default: efficientnet_lite0)" in text and "(default: 32)" in text
    # --help answers before the heavy libraries load
    probe = ("import sys, deepfeat.cli as c; c.build_parser(); "
             "print(sorted(m for m in ('pandas', 'onnxruntime', 'sklearn', 'onnx') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "[]", res.stdout + res.stderr


def test_parquet_describes_itself_and_unknown_suffixes_are_refused(tmp_path, photo_folder, tiny_model_path,
                                                                    monkeypatch):
    import pyarrow.parquet as pq

    root, _ = photo_folder
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "f.parquet"
    assert main(["embed", os.path.relpath(root, tmp_path), "-o", str(out), "--model", str(tiny_model_path),
                 "--no-progress"]) == 0
    meta = json.loads(pq.read_schema(out).metadata[b"deepfeat"])
    assert meta["model_sha256"] and meta["pooling"] == "avg" and meta["layers"][0]["label"] == "output"
    assert meta["preprocessing"]["input_size"] == 224 and meta["deepfeat_version"] and meta["date"]
    assert all(os.path.isabs(p) for p in pd.read_parquet(out)["path"])
    with pytest.raises(SystemExit, match="xlsx"):
        main(["embed", str(root), "-o", str(tmp_path / "f.xlsx"), "--model", str(tiny_model_path)])


def test_select_layer_suggestion_keeps_the_cache_option(tmp_path, photo_folder, tiny_model_path, capsys):
    root, _ = photo_folder
    assert main(["select-layer", str(root), "--model", str(tiny_model_path), "--layers", "conv1,pooled",
                 "--pooling", "avg", "--cv", "2", "--cache-dir", str(tmp_path / "c"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    suggestion = next(line for line in out.splitlines() if "use it: deepfeat classify" in line)
    assert f"--cache-dir {tmp_path / 'c'}" in suggestion and f"--model {tiny_model_path}" in suggestion


def test_leaderboard_ties_are_ordered_by_name():
    from sklearn.linear_model import LogisticRegression

    from deepfeat.classify import compare_heads

    X = np.random.default_rng(0).normal(size=(30, 4))
    y = np.repeat([0, 1], 15)
    heads = {"zeta": LogisticRegression(), "alpha": LogisticRegression(), "mid": LogisticRegression()}
    for _ in range(3):
        assert compare_heads(X, y, heads, cv=3, refit=False)["head"].tolist() == ["alpha", "mid", "zeta"]


def test_a_worker_session_on_every_core_is_warned_about(monkeypatch):
    import multiprocessing

    from deepfeat import sessions

    monkeypatch.setattr(sessions, "_WARNED_OVERSUBSCRIBED", False)
    assert sessions._oversubscription(None) is None  # the main process: no warning
    monkeypatch.setattr(multiprocessing, "parent_process", lambda: object())
    assert sessions._oversubscription(1) is None  # threads set: the user chose
    note = sessions._oversubscription(None)
    assert "inference_threads=cores // workers" in note
    assert sessions._oversubscription(None) is None  # once per process


def test_tables_fit_100_columns(tmp_path, photo_folder, tiny_model_path, capsys):
    root, _ = photo_folder
    assert main(["models"]) == 0
    assert main(["embed", str(root), "-o", str(tmp_path / "f.parquet"), "--model", str(tiny_model_path),
                 "--no-progress", "--cache-dir", str(tmp_path / "c"), "--layers", "conv1,pooled"]) == 0
    capsys.readouterr()
    assert main(["models"]) == 0 and main(["cache", "info", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    long = [line for line in out.splitlines() if len(line) > 100 and not line.startswith("/")]
    assert not long, long


def test_python_errors_say_what_is_accepted(tmp_path, tiny_model_path):
    with pytest.raises(ValueError, match="No image files under"):
        load_image_folder(tmp_path)
    assert load_image_folder(tmp_path, allow_empty=True).empty
    emb = ImageEmbedder(model=str(tiny_model_path), preprocessing=TINY_PREPROCESSING, progress=False).fit()
    with pytest.raises(ValueError, match=r"shape \(10, 5\).*takes a list .* of paths, PIL images or uint8"):
        emb.transform(np.zeros((10, 5)))


def test_predict_on_a_labelled_folder_reports_accuracy(tmp_path, photo_folder, tiny_model_path, capsys):
    root, _ = photo_folder
    model = tmp_path / "m.joblib"
    assert main(["classify", str(root), "--model", str(tiny_model_path), "--heads", "logreg", "--cv", "2",
                 "--no-progress", "-o", str(model)]) == 0
    capsys.readouterr()
    assert main(["predict", str(model), str(root), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "accuracy on 36 labelled images" in out and "predicted" in out  # the confusion matrix's header
