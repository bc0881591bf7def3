import subprocess
import sys

import pandas as pd

from deepfeat.cli import main


def test_embed_folder_to_parquet(photo_folder, tmp_path, capsys):
    root, df = photo_folder
    out = tmp_path / "feats.parquet"
    assert main(["embed", str(root), "-o", str(out), "--layers", "stage3,pooled", "--no-progress"]) == 0
    got = pd.read_parquet(out)
    assert len(got) == len(df)
    assert list(got.columns[:2]) == ["path", "label"]
    assert got.columns[2] == "stage3_0000" and got.shape[1] == 2 + 40 + 1280
    assert "CPUExecutionProvider" in capsys.readouterr().out


def test_an_interrupted_embed_leaves_no_half_written_output(photo_folder, tmp_path, monkeypatch, capsys):
    """The output takes its final name only once written whole; the file that was there stays."""
    import pytest

    root, df = photo_folder
    out = tmp_path / "feats.csv"
    out.write_text("the previous run's output\n")

    def killed_halfway(self, path, **kw):
        with open(path, "w") as f:
            f.write("path,label\n" + "half a row")
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_csv", killed_halfway)
    assert main(["embed", str(root), "-o", str(out), "--no-progress"]) == 130  # Ctrl-C: one line, exit 130
    assert capsys.readouterr().err == "deepfeat: interrupted\n"
    with pytest.raises(KeyboardInterrupt):  # -vv keeps the traceback
        main(["embed", str(root), "-o", str(out), "--no-progress", "-vv"])
    assert out.read_text() == "the previous run's output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats.csv"]  # no temporary file left
    monkeypatch.undo()
    assert main(["embed", str(root), "-o", str(out), "--no-progress"]) == 0
    assert len(pd.read_csv(out)) == len(df)
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_embed_csv_with_relative_paths(photo_folder, tmp_path):
    root, df = photo_folder
    csv = root / "list.csv"
    pd.DataFrame({"file": [str(p.relative_to(root)) for p in map(__import__("pathlib").Path, df["path"])]}).to_csv(
        csv, index=False
    )
    out = tmp_path / "feats.csv"
    assert main(["embed", str(csv), "--path-column", "file", "-o", str(out), "--no-progress"]) == 0
    assert pd.read_csv(out).shape == (len(df), 1 + 1280)


def test_layers_and_models_commands(capsys):
    assert main(["layers"]) == 0
    out = capsys.readouterr().out
    assert "stage4" in out and "pooled" in out
    assert main(["models"]) == 0
    assert "efficientnet_lite0" in capsys.readouterr().out


def test_unknown_layer_is_a_clear_error(photo_folder, tmp_path, capsys):
    root, _ = photo_folder
    assert main(["embed", str(root), "-o", str(tmp_path / "x.parquet"), "--layers", "stage9"]) == 1
    assert "Valid aliases" in capsys.readouterr().err


def test_console_script_runs():
    res = subprocess.run([sys.executable, "-m", "deepfeat", "models"], capture_output=True, text=True, check=True)
    assert "efficientnet_lite0" in res.stdout
