"""The HTML report of classify and predict: its sections, the thumbnails of the mistakes, nothing external."""

from __future__ import annotations

import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from deepfeat.cli import main

pytest.importorskip("matplotlib")
pytest.importorskip("jinja2")

#: a class folder whose name must come out escaped in the HTML
ODD = "coffee <b> & co"


class _Page(HTMLParser):
    """The parts of a report the tests look at: section ids, thumbnails, images, text by section."""

    def __init__(self, html: str):
        super().__init__()
        self.sections: list[str] = []
        self.thumbs = 0
        self.thumb_imgs = 0
        self.imgs: dict[str, str] = {}
        self.text: dict[str, list[str]] = {}
        self._section = ""
        self._in_thumb = False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self._section = a.get("id", "")
            self.sections.append(self._section)
        if tag == "figure" and "thumb" in (a.get("class") or ""):
            self.thumbs += 1
            self._in_thumb = True
        if tag == "img":
            if self._in_thumb:
                self.thumb_imgs += 1
                assert a["src"].startswith("data:image/jpeg;base64,")
            else:
                assert a["src"].startswith("data:image/png;base64,")
                self.imgs[self._section] = a["src"]

    def handle_endtag(self, tag):
        if tag == "figure":
            self._in_thumb = False

    def handle_data(self, data):
        self.text.setdefault(self._section, []).append(data)

    def section_text(self, name: str) -> str:
        return " ".join(" ".join(self.text.get(name, [])).split())


@pytest.fixture(scope="module")
def photo_sets(tmp_path_factory):
    """Train and test folders of real photo crops; in the test set, two images of each of two classes sit in
    the wrong folder, so a good head makes mistakes; one class folder is named with HTML characters."""
    from deepfeat import make_sample_photos

    root = tmp_path_factory.mktemp("report")
    for split, seed, n in (("train", 0, 8), ("test", 1, 5)):
        make_sample_photos(root / split, per_class=n, size=96, random_state=seed)
        (root / split / "coffee").rename(root / split / ODD)
    test = root / "test"
    for src, dst in (("china", "flower"), ("rocket", ODD)):
        for p in sorted((test / src).iterdir())[:2]:
            shutil.move(str(p), str(test / dst / f"moved_{p.name}"))
    return root / "train", test


@pytest.fixture(scope="module")
def classified(photo_sets, tmp_path_factory):
    train, test = photo_sets
    out = tmp_path_factory.mktemp("classified")
    args = ["classify", str(train), "--test", str(test), "--heads", "logreg,knn", "--cv", "3", "--no-progress",
            "--cache-dir", str(out / "cache"), "-o", str(out / "model.joblib")]
    assert main(args + ["--report", str(out / "report.html")]) == 0
    assert main(args + ["--report", str(out / "normalised.html"), "--report-normalize"]) == 0
    return out


def _truth_and_predictions(model: Path, folder: Path, cache: Path):
    from deepfeat import load_image_folder
    from deepfeat.classify import load_model, predict_paths

    df = load_image_folder(folder)
    got = predict_paths(load_model(model, cache=str(cache)), df["path"])
    return df["label"].to_numpy(), got["prediction"].to_numpy()


def test_classify_report_has_every_section_and_one_thumbnail_per_mistake(classified, photo_sets):
    html = (classified / "report.html").read_text(encoding="utf-8")
    page = _Page(html)
    assert page.sections == ["settings", "leaderboard", "confusion", "per-class", "mistakes"]
    assert {"leaderboard", "confusion"} <= set(page.imgs)  # the per-fold plot and the heatmap
    truth, pred = _truth_and_predictions(classified / "model.joblib", photo_sets[1], classified / "cache")
    wrong = int((truth != pred).sum())
    assert wrong >= 4  # the moved images at least
    assert page.thumbs == page.thumb_imgs == min(wrong, 60)
    assert f"Misclassified images ({wrong})" in page.section_text("mistakes")
    assert "p = " in page.section_text("mistakes")  # both heads give probabilities
    settings = page.section_text("settings")
    for key in ("model sha256", "layers", "pooling", "TTA", "preprocessing", "deepfeat version", "date",
                "embedding (training images)", "logreg search"):
        assert key in settings
    assert "logreg" in page.section_text("leaderboard") and "knn" in page.section_text("leaderboard")
    per_class = page.section_text("per-class")
    assert "precision" in per_class and "recall" in per_class and "support" in per_class


def test_the_report_holds_no_address_and_escapes_labels(classified):
    html = (classified / "report.html").read_text(encoding="utf-8")
    assert "http" not in html.lower()  # nothing to fetch: no URL, no SVG namespace, no PNG "Software" chunk
    assert "<b>" not in html  # the class folder "coffee <b> & co", escaped
    assert "coffee &lt;b&gt; &amp; co" in html
    assert ODD in _Page(html).section_text("per-class")  # and read back as the name it is


def test_rows_normalised_changes_the_heatmap(classified):
    plain = _Page((classified / "report.html").read_text(encoding="utf-8"))
    norm = _Page((classified / "normalised.html").read_text(encoding="utf-8"))
    assert plain.imgs["confusion"] != norm.imgs["confusion"]
    assert "rows normalised" in norm.section_text("confusion")
    assert "rows normalised" not in plain.section_text("confusion")


def test_predict_report_on_a_labelled_folder(classified, photo_sets, tmp_path, capsys):
    report, csv = tmp_path / "predict.html", tmp_path / "pred.csv"
    assert main(["predict", str(classified / "model.joblib"), str(photo_sets[1]), "--no-progress",
                 "--cache-dir", str(classified / "cache"), "-o", str(csv), "--report", str(report)]) == 0
    assert f"report -> {report}" in capsys.readouterr().out
    got = pd.read_csv(csv)
    from deepfeat import load_image_folder

    truth = load_image_folder(photo_sets[1]).set_index("path")["label"]
    wrong = int((got.set_index("path")["prediction"] != truth.loc[got["path"]]).sum())
    html = report.read_text(encoding="utf-8")
    page = _Page(html)
    assert page.sections == ["settings", "confusion", "per-class", "mistakes"]  # no leaderboard: no search ran
    assert page.thumbs == wrong >= 4
    assert "http" not in html.lower()
    assert "saved model" in page.section_text("settings")


def test_predict_report_needs_labels(classified, photo_sets, tmp_path):
    one = next((photo_sets[1] / "china").iterdir())
    with pytest.raises(SystemExit, match="--report needs labelled images"):
        main(["predict", str(classified / "model.joblib"), str(one), "--report", str(tmp_path / "r.html")])
    assert not (tmp_path / "r.html").exists()


def test_missing_extra_is_one_line_before_any_work(photo_sets, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "jinja2", None)  # as if not installed
    assert main(["classify", str(photo_sets[0]), "--report", str(tmp_path / "r.html"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "deepfeat[report]"' in err and "jinja2" in err
    assert not list(tmp_path.iterdir())  # nothing was embedded or written


def test_mistakes_are_capped_most_confident_first(photo_sets):
    """In Python: the cap, the count of the rest, the order, and no probability for a head without one."""
    from deepfeat import load_image_folder
    from deepfeat.report import make_report

    df = load_image_folder(photo_sets[1])
    y = df["label"].to_numpy()
    pred = np.roll(y, 7)  # most rows wrong
    prob = np.linspace(0.2, 0.99, len(y))
    wrong = int((pred != y).sum())
    rep = make_report(y, pred, paths=df["path"], probability=prob)
    page = _Page(rep.to_html(max_mistakes=5))
    assert page.thumbs == page.thumb_imgs == 5
    assert f"and {wrong - 5} more misclassified images not shown" in page.section_text("mistakes")
    order = rep.mistakes()["probability"].to_numpy()
    assert (np.diff(order) <= 0).all() and order[0] == prob[pred != y].max()
    shown = [float(t.split("= ")[1]) for t in page.text["mistakes"] if t.startswith("p = ")]
    assert shown == sorted(shown, reverse=True) and len(shown) == 5
    no_prob = _Page(make_report(y, pred, paths=df["path"]).to_html(max_mistakes=3))
    assert no_prob.thumbs == 3 and "p = " not in no_prob.section_text("mistakes")
    assert "gives no probabilities" in no_prob.section_text("mistakes")


def test_figures_for_a_notebook_leave_pyplot_alone(photo_sets):
    import matplotlib
    from matplotlib.figure import Figure

    from deepfeat.classify import compare_heads, default_heads
    from deepfeat.report import make_report

    backend = matplotlib.get_backend()
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 5)), np.repeat(["a", "b"], 20)
    X[y == "b"] += 1.5
    board = compare_heads(X, y, {"logreg": default_heads()["logreg"]}, cv=4)
    assert len(board.attrs["split_test_scores"]["logreg"]) == 4
    rep = make_report(y, board.loc[1, "estimator"].predict(X), leaderboard=board)
    figs = rep.figures(normalize=True)
    assert set(figs) == {"cv_scores", "confusion"} and all(isinstance(f, Figure) for f in figs.values())
    assert matplotlib.get_backend() == backend
    pyplot = sys.modules.get("matplotlib.pyplot")
    assert pyplot is None or not pyplot.get_fignums()


def test_auto_probe_section(photo_sets):
    """The --auto probe table and plot, from a select_layer table (the CLI passes its own)."""
    from deepfeat.report import make_report

    probe = pd.DataFrame({"layer": ["stage4", "stage4", "pooled"], "tensor": ["t4", "t4", "pooled"],
                          "pooling": ["avg", "max", "vector"], "depth": [10, 10, 20], "n_features": [112, 112, 1280],
                          "mean_test_score": [0.8, 0.85, 0.95], "std_test_score": [0.05, 0.04, 0.02],
                          "rank_test_score": [3, 2, 1]})
    page = _Page(make_report(probe=probe, recipe="recipe --layers pooled").to_html())
    assert page.sections == ["settings", "auto", "confusion"]
    assert "auto" in page.imgs and "recipe --layers pooled" in page.section_text("auto")
    assert "0.950 ± 0.020" in page.section_text("auto")


def test_bad_arguments_name_the_parameter():
    from deepfeat.report import make_report

    with pytest.raises(ValueError, match="paths has 1 entries but y_true has 2"):
        make_report(["a", "b"], ["a", "a"], paths=["x.jpg"])
    with pytest.raises(ValueError, match="both y_true and y_pred"):
        make_report(["a"])
    with pytest.raises(ValueError, match="'max_mistakes' parameter .* Got 0"):
        make_report(["a", "b"], ["a", "a"]).to_html(max_mistakes=0)


def test_classify_auto_report_shows_the_probe(photo_sets, tmp_path):
    """classify --auto --report: the probe's table and plot and the chosen recipe (no --test: no mistakes)."""
    report = tmp_path / "auto.html"
    assert main(["classify", str(photo_sets[0]), "--auto", "--heads", "logreg", "--cv", "3", "--no-progress",
                 "--cache-dir", str(tmp_path / "cache"), "-o", str(tmp_path / "m.joblib"),
                 "--report", str(report)]) == 0
    html = report.read_text(encoding="utf-8")
    page = _Page(html)
    assert page.sections == ["settings", "auto", "leaderboard", "confusion"]
    auto = page.section_text("auto")
    assert "recipe --layers" in auto and "kept the" in auto and "probe CV score" in auto
    assert "auto" in page.imgs and "--auto probe" in page.section_text("settings")
    assert "No labelled test images" in page.section_text("confusion")
    assert "http" not in html.lower()


def test_unreadable_test_images_are_named_not_shown(photo_sets, tmp_path):
    """--on-error skip: a test image that cannot be read is left out of the report, and the report says so."""
    test = tmp_path / "test"
    shutil.copytree(photo_sets[1], test)
    (test / "china" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    report = tmp_path / "r.html"
    assert main(["classify", str(photo_sets[0]), "--test", str(test), "--heads", "knn", "--cv", "3",
                 "--on-error", "skip", "--no-progress", "-o", str(tmp_path / "m.joblib"),
                 "--report", str(report)]) == 0
    page = _Page(report.read_text(encoding="utf-8"))
    assert "1 of" in " ".join(page.text[""]) and "could not be read and are left out" in " ".join(page.text[""])
    assert "broken.jpg" not in report.read_text(encoding="utf-8")
