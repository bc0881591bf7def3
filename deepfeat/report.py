"""A self-contained HTML report of a classification run: settings, leaderboard, errors, mistakes.

``deepfeat classify TRAIN --test TEST --report report.html`` and ``deepfeat predict MODEL FOLDER --report
report.html`` write one HTML file that opens anywhere, from a mail attachment too: the plots are embedded
PNG images, the misclassified photos small embedded JPEG thumbnails, and nothing in the file reaches the
network (it holds no ``http`` address at all). In a notebook, :func:`make_report` gathers what a run already
computed (nothing runs the network again) and :meth:`ClassificationReport.figures` /
:meth:`ClassificationReport.to_html` return the pieces.

The plots need matplotlib and the HTML Jinja2: ``pip install "deepfeat[report]"``. Figures are
``matplotlib.figure.Figure`` objects drawn without pyplot, so neither the backend nor pyplot's figure list
of a notebook is touched.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["ClassificationReport", "make_report", "embedder_settings", "check_report_dependencies"]

logger = logging.getLogger(__name__)

#: misclassified thumbnails shown at most; the rest are counted
MAX_MISTAKES = 60
#: longest side of a thumbnail, in pixels
THUMB_SIZE = 112
#: class names longer than this are shortened on the plots' axes (the tables show them whole)
_MAX_TICK_CHARS = 28

_INSTALL = 'pip install "deepfeat[report]"'


def check_report_dependencies() -> None:
    """Raise one ``ImportError`` line naming the extra when matplotlib or Jinja2 is missing.

    Raises
    ------
    ImportError
        ``deepfeat's HTML report needs ...: pip install "deepfeat[report]"``.

    Examples
    --------
    >>> from deepfeat.report import check_report_dependencies
    >>> check_report_dependencies()  # the dev extra has both
    """
    missing = []
    for module in ("matplotlib", "jinja2"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(f"deepfeat's HTML report needs {' and '.join(missing)}, which is not installed: "
                          f"{_INSTALL}")


def embedder_settings(embedder: Any) -> dict[str, str]:
    """The settings of a fitted :class:`~deepfeat.ImageEmbedder` that decide its vectors, as display text.

    Parameters
    ----------
    embedder : ImageEmbedder
        Fitted.

    Returns
    -------
    dict of str to str
        ``model``, ``model sha256``, ``layers``, ``pooling``, ``TTA``,
        ``preprocessing``, ``runs on``, in that order.

    Raises
    ------
    ValueError
        If the embedder is not fitted.

    Examples
    --------
    >>> from deepfeat import ImageEmbedder
    >>> from deepfeat.report import embedder_settings
    >>> s = embedder_settings(ImageEmbedder(layers=["stage4", "pooled"], progress=False).fit())
    >>> s["model"], s["layers"]
    ('efficientnet_lite0', 'stage4 (blocks.10, avg), pooled (pooled, avg)')
    >>> len(s["model sha256"])
    64
    """
    if not hasattr(embedder, "layers_"):
        raise ValueError(f"embedder must be a fitted ImageEmbedder; got {embedder!r}. Call .fit() first.")
    s = embedder.spec_
    poolings = getattr(embedder, "poolings_", None) or [embedder.pooling] * len(embedder.layers_)
    layers = ", ".join(f"{label} ({tensor}, {pooling})" for (label, tensor), pooling in zip(embedder.layers_, poolings))
    mean = ", ".join(f"{v:g}" for v in s.mean)
    std = ", ".join(f"{v:g}" for v in s.std)
    return {
        "model": str(s.name),
        "model sha256": str(embedder.model_sha256_),
        "layers": layers,
        "pooling": str(embedder.pooling),
        "TTA": "none" if embedder.tta is None else str(embedder.tta),
        "preprocessing": (f"resize {s.resize_size} ({s.interpolation}), centre crop {s.input_size}, "
                          f"mean ({mean}), std ({std}), {s.channel_order}, "
                          f"JPEG draft {'on' if embedder.jpeg_draft else 'off'}"),
        "features": str(getattr(embedder, "n_features_out_", "?")),
        "runs on": ", ".join(getattr(embedder, "providers_", [])[:1]) or "?",
    }


@dataclass
class ClassificationReport:
    """What a report shows, gathered from a run; build it with :func:`make_report`.

    Attributes
    ----------
    y_true, y_pred : ndarray of object or None
        True and predicted labels of the evaluated images (None: no test set).
    paths : list of str or None
        The image of each row, for the thumbnails.
    probability : ndarray of float or None
        The probability the head gave its prediction (NaN where it gives none).
    classes : list
        Class order of the confusion matrix and the per-class table.
    leaderboard : pandas.DataFrame or None
        :func:`deepfeat.classify.compare_heads` output.
    settings : dict of str to str
        Shown first, in order.
    timings : dict of str to float
        Seconds, shown in order.
    probe : pandas.DataFrame or None
        :func:`deepfeat.selection.select_layer` output (``classify --auto``).
    recipe : str or None
        The layers ``--auto`` chose and whether they were kept.
    title : str
    notes : list of str
        Lines shown under the title (images left out, unlabelled inputs, ...).
    """

    y_true: np.ndarray | None
    y_pred: np.ndarray | None
    paths: list[str] | None
    probability: np.ndarray | None
    classes: list
    leaderboard: pd.DataFrame | None = None
    settings: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    probe: pd.DataFrame | None = None
    recipe: str | None = None
    title: str = "deepfeat report"
    notes: list[str] = field(default_factory=list)

    # ---- tables -------------------------------------------------------------------------------------------

    def per_class(self) -> pd.DataFrame:
        """Precision, recall, F1 and support of each class on the evaluated images.

        Returns
        -------
        pandas.DataFrame
            Indexed by class; empty without a test set.
        """
        from sklearn.metrics import precision_recall_fscore_support

        if self.y_true is None or self.y_pred is None or not len(self.y_true):
            return pd.DataFrame(columns=["precision", "recall", "f1", "support"])
        p, r, f, s = precision_recall_fscore_support(self.y_true, self.y_pred, labels=self.classes,
                                                     zero_division=0)
        return pd.DataFrame({"precision": p, "recall": r, "f1": f, "support": s},
                            index=pd.Index(self.classes, name="class"))

    def confusion(self, normalize: bool = False) -> pd.DataFrame:
        """The confusion matrix (rows: true class, columns: predicted), counts or row fractions.

        Parameters
        ----------
        normalize : bool, default=False
            Divide each row by its total (a class without images keeps zeros).

        Returns
        -------
        pandas.DataFrame
        """
        from .classify import confusion_table

        if self.y_true is None or self.y_pred is None:
            return pd.DataFrame()
        cm = confusion_table(self.y_true, self.y_pred, labels=self.classes)
        if normalize:
            totals = cm.sum(axis=1).replace(0, 1)
            return cm.div(totals, axis=0)
        return cm

    def mistakes(self) -> pd.DataFrame:
        """The misclassified images, most confident mistakes first.

        Returns
        -------
        pandas.DataFrame
            Columns ``path``, ``true``, ``predicted``, ``probability`` (NaN
            where the head gives none). Mistakes without a probability keep
            their input order, after those with one.
        """
        if self.y_true is None or self.y_pred is None:
            return pd.DataFrame(columns=["path", "true", "predicted", "probability"])
        n = len(self.y_true)
        paths = self.paths if self.paths is not None else [""] * n
        prob = self.probability if self.probability is not None else np.full(n, np.nan)
        df = pd.DataFrame({"path": paths, "true": self.y_true, "predicted": self.y_pred,
                           "probability": np.asarray(prob, dtype=float)})
        wrong = df[df["true"] != df["predicted"]]
        return wrong.sort_values("probability", ascending=False, na_position="last", kind="stable")

    # ---- figures ------------------------------------------------------------------------------------------

    def figures(self, normalize: bool = False) -> dict[str, Figure]:
        """The report's plots as matplotlib figures (no pyplot: nothing is shown or kept by it).

        Parameters
        ----------
        normalize : bool, default=False
            Colour the confusion matrix by row fraction (the cells show the
            fraction and the count) instead of by count.

        Returns
        -------
        dict of str to matplotlib.figure.Figure
            ``"cv_scores"`` (each head's score on each CV fold), ``"confusion"``
            and ``"probe"`` (the ``--auto`` layer scores), each only where the
            report has the data.

        Raises
        ------
        ImportError
            Without matplotlib, naming the ``report`` extra.
        """
        check_report_dependencies()
        figs: dict[str, Figure] = {}
        fig = self._cv_figure()
        if fig is not None:
            figs["cv_scores"] = fig
        if self.y_true is not None and len(self.classes):
            figs["confusion"] = self._confusion_figure(normalize)
        if self.probe is not None and len(self.probe):
            from matplotlib.figure import Figure

            from .selection import plot_layer_scores

            fig = Figure(figsize=(max(6.0, 0.45 * self.probe["layer"].nunique() + 2), 4.2))
            ax = plot_layer_scores(self.probe, ax=fig.subplots())
            ax.legend(title="pooling", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
            fig.tight_layout()  # the legend beside the axes, off the lines
            figs["probe"] = fig
        return figs

    def _cv_figure(self) -> Figure | None:
        from matplotlib.figure import Figure

        board = self.leaderboard
        splits = {} if board is None else board.attrs.get("split_test_scores") or {}
        heads = [h for h in ([] if board is None else board["head"]) if splits.get(h)]
        if not heads:
            return None
        fig = Figure(figsize=(7.0, 0.45 * len(heads) + 1.4))
        ax = fig.subplots()
        for i, head in enumerate(heads):  # best first, at the top
            scores = np.asarray(splits[head], dtype=float)
            # folds side by side, slightly apart, so equal scores do not hide each other
            spread = 0.08 * (np.arange(len(scores)) - (len(scores) - 1) / 2)
            ax.plot(scores, i + spread, "o", color="tab:blue", alpha=0.6, markersize=6,
                    label="one fold" if i == 0 else None)
            ax.plot([np.nanmean(scores)], [i], "|", color="black", markersize=18, markeredgewidth=2,
                    label="mean" if i == 0 else None)
        ax.set_yticks(range(len(heads)))
        ax.set_yticklabels([_tick(h) for h in heads])
        ax.set_ylim(len(heads) - 0.5, -0.5)  # best at the top; room for the folds' spread
        ax.set_xlabel(f"CV {board.attrs.get('scoring', 'score')} per fold"  # type: ignore[union-attr]
                      f" ({board.attrs.get('n_splits', '?')} folds, best parameters)")  # type: ignore[union-attr]
        ax.grid(True, axis="x", alpha=0.3)
        fig.legend(fontsize="small", loc="upper center", ncol=2, frameon=False)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
        return fig

    def _confusion_figure(self, normalize: bool) -> Figure:
        from matplotlib.figure import Figure

        counts = self.confusion(normalize=False).to_numpy()
        shown = self.confusion(normalize=True).to_numpy() if normalize else counts
        n = len(self.classes)
        names = [_tick(c) for c in self.classes]
        longest = max((len(t) for t in names), default=1)
        # room for the labels beside and below the cells; a few hundred classes stay a readable picture
        side = min(max(3.5, 0.55 * n) + 0.09 * longest, 40.0)
        fig = Figure(figsize=(side + 1.2, side))
        ax = fig.subplots()
        vmax = 1.0 if normalize else max(int(counts.max()), 1)
        im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=vmax)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04,
                     label="fraction of the true class" if normalize else "images")
        size = 9 if n <= 8 else 7 if n <= 16 else 5
        for i in range(n if n <= 40 else 0):  # beyond 40 classes the colour alone: no room for numbers
            for j in range(n):
                if counts[i, j] == 0:  # empty cells stay blank: the few errors stand out
                    continue
                text = f"{shown[i, j]:.2f}\n({counts[i, j]})" if normalize else str(counts[i, j])
                dark = shown[i, j] > 0.5 * vmax
                ax.text(j, i, text, ha="center", va="center", fontsize=size, color="white" if dark else "black")
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xticklabels(names, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticklabels(names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title("confusion matrix" + (", rows normalised" if normalize else ", counts"))
        fig.tight_layout()
        return fig

    # ---- HTML ---------------------------------------------------------------------------------------------

    def to_html(self, *, normalize: bool = False, max_mistakes: int = MAX_MISTAKES,
                thumb_size: int = THUMB_SIZE) -> str:
        """The whole report as one self-contained HTML document.

        Parameters
        ----------
        normalize : bool, default=False
            Confusion matrix rows as fractions (see :meth:`figures`).
        max_mistakes : int, default=60
            Thumbnails of misclassified images shown at most (most confident
            first); the rest are counted.
        thumb_size : int, default=112
            Longest side of a thumbnail in pixels.

        Returns
        -------
        str
            HTML5 with every image embedded (``data:`` URIs); no address of
            any kind, so it opens offline and from a mail attachment.

        Raises
        ------
        ImportError
            Without matplotlib or Jinja2, naming the ``report`` extra.
        ValueError
            If ``max_mistakes`` or ``thumb_size`` is not a positive integer.
        """
        check_report_dependencies()
        import jinja2

        for name, value in (("max_mistakes", max_mistakes), ("thumb_size", thumb_size)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"The {name!r} parameter of ClassificationReport.to_html must be a positive "
                                 f"integer. Got {value!r}.")
        probe = self._probe_rows()
        figs = {name: _png_data(fig) for name, fig in self.figures(normalize=normalize).items()}
        wrong = self.mistakes()
        shown = wrong.head(int(max_mistakes))
        thumbs = [{"src": _thumbnail(row.path, int(thumb_size)) if row.path else None,
                   "name": os.path.basename(str(row.path)), "path": str(row.path),
                   "true": str(row.true), "predicted": str(row.predicted),
                   "probability": None if np.isnan(row.probability) else f"{row.probability:.2f}"}
                  for row in shown.itertuples(index=False)]
        env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
        html = env.from_string(_TEMPLATE).render(
            title=self.title, notes=self.notes, settings=self.settings, timings=self._timing_rows(),
            summary=self._summary(), leaderboard=self._board_rows(),
            scoring=(self.leaderboard.attrs.get("scoring", "score") if self.leaderboard is not None else None),
            figs=figs, normalize=normalize, per_class=self._class_rows(),
            has_test=self.y_true is not None, n_wrong=len(wrong), thumbs=thumbs,
            n_more=len(wrong) - len(shown), any_probability=bool(wrong["probability"].notna().any()),
            probe=probe, probe_top=sorted(probe, key=lambda r: r["rank_value"])[:10], recipe=self.recipe,
        )
        return html

    def save(self, path: str | os.PathLike, **kwargs: Any) -> Path:
        """Write :meth:`to_html` to ``path`` atomically (a killed run leaves no half-written file).

        Parameters
        ----------
        path : str or path-like
            The ``.html`` file; parent folders are created.
        **kwargs
            :meth:`to_html` arguments.

        Returns
        -------
        pathlib.Path
        """
        from .cli import _atomic_output

        html = self.to_html(**kwargs)
        out = Path(path)
        with _atomic_output(out) as tmp:
            tmp.write_text(html, encoding="utf-8")
        logger.info("report -> %s (%d kB)", out, len(html) // 1000)
        return out

    # ---- rows for the template ----------------------------------------------------------------------------

    def _summary(self) -> str | None:
        if self.y_true is None or self.y_pred is None:
            return None
        n = len(self.y_true)
        hits = int(np.sum(np.asarray(self.y_true) == np.asarray(self.y_pred)))
        return f"accuracy {hits / max(n, 1):.4f} ({hits}/{n} images, {n - hits} misclassified)"

    def _timing_rows(self) -> list[tuple[str, str]]:
        return [(k, f"{v:.1f} s") for k, v in self.timings.items()]

    def _board_rows(self) -> list[dict[str, str]]:
        from .classify import _format_params

        if self.leaderboard is None:
            return []
        rows = []
        for rank, r in self.leaderboard.iterrows():
            ok = r["mean_test_score"] == r["mean_test_score"]
            rows.append({
                "rank": str(rank), "head": str(r["head"]),
                "score": f"{r['mean_test_score']:.3f} ± {r['std_test_score']:.3f}" if ok else "failed",
                "fit": f"{r['mean_fit_time']:.2f} s" if ok else "-",
                "search": f"{r['search_time']:.1f} s" if "search_time" in r else "-",
                "params": _format_params(r["params"]) if isinstance(r["params"], Mapping) else str(r["params"]),
            })
        return rows

    def _class_rows(self) -> list[dict[str, str]]:
        table = self.per_class()
        return [{"name": str(name), "precision": f"{r.precision:.3f}", "recall": f"{r.recall:.3f}",
                 "f1": f"{r.f1:.3f}", "support": str(int(r.support))} for name, r in table.iterrows()]

    def _probe_rows(self) -> list[dict[str, Any]]:
        if self.probe is None:
            return []
        best = self.probe["mean_test_score"].max()
        return [{"layer": str(r.layer), "pooling": str(r.pooling), "features": str(r.n_features),
                 "score": f"{r.mean_test_score:.3f} ± {r.std_test_score:.3f}", "rank": str(r.rank_test_score),
                 "rank_value": float(r.rank_test_score),
                 "best": bool(r.mean_test_score == best)}
                for r in self.probe.itertuples(index=False)]


def make_report(
    y_true: Sequence | None = None,
    y_pred: Sequence | None = None,
    *,
    paths: Sequence | None = None,
    probability: Sequence | None = None,
    classes: Sequence | None = None,
    leaderboard: pd.DataFrame | None = None,
    embedder: Any = None,
    head: Any = None,
    probe: pd.DataFrame | None = None,
    recipe: str | None = None,
    settings: Mapping[str, Any] | None = None,
    timings: Mapping[str, float] | None = None,
    title: str = "deepfeat report",
    notes: Sequence[str] = (),
) -> ClassificationReport:
    """Gather what a run computed into a :class:`ClassificationReport` (nothing is recomputed).

    Parameters
    ----------
    y_true, y_pred : array-like of shape (n_images,), optional
        True and predicted labels of the held-out images; without them the
        report has no confusion matrix, per-class table or mistakes.
    paths : sequence of str, optional
        The image file of each row: the misclassified ones become thumbnails.
    probability : array-like of shape (n_images,), optional
        The probability the head gave its predicted class (its
        ``predict_proba``); leave out for heads without one. Mistakes are
        shown most confident first.
    classes : sequence, optional
        Class order; default: the sorted union of the labels.
    leaderboard : pandas.DataFrame, optional
        :func:`deepfeat.classify.compare_heads` output; its
        ``attrs["split_test_scores"]`` gives the per-fold plot.
    embedder : ImageEmbedder, optional
        Fitted; its settings are shown (:func:`embedder_settings`).
    head : estimator, optional
        The head that made ``y_pred``; its class name is shown.
    probe : pandas.DataFrame, optional
        :func:`deepfeat.selection.select_layer` output (``classify --auto``).
    recipe : str, optional
        The chosen layers, as text.
    settings : mapping, optional
        More settings to show (after the embedder's), as text.
    timings : mapping of str to float, optional
        Seconds spent, by what (embedding, each head's search, ...). The
        leaderboard's search times are added per head when not given.
    title : str, default="deepfeat report"
    notes : sequence of str, default=()
        Lines shown under the title.

    Returns
    -------
    ClassificationReport

    Raises
    ------
    ValueError
        If ``y_true``, ``y_pred``, ``paths`` and ``probability`` differ in
        length, or only one of ``y_true`` and ``y_pred`` is given.

    Examples
    --------
    >>> from deepfeat.report import make_report
    >>> rep = make_report(["ant", "bee", "bee", "ant"], ["ant", "ant", "bee", "ant"],
    ...                   probability=[0.9, 0.8, 0.7, 0.6])
    >>> rep.mistakes()[["true", "predicted", "probability"]].to_dict("records")
    [{'true': 'bee', 'predicted': 'ant', 'probability': 0.8}]
    >>> rep.per_class()["recall"].round(2).to_dict()
    {'ant': 1.0, 'bee': 0.5}
    >>> html = rep.to_html()
    >>> html.startswith("<!DOCTYPE html>"), "http" in html
    (True, False)
    """
    from . import __version__

    if (y_true is None) != (y_pred is None):
        raise ValueError("Give both y_true and y_pred (the true and the predicted labels), or neither.")
    yt = yp = None
    if y_true is not None and y_pred is not None:
        yt = np.asarray(list(y_true), dtype=object)
        yp = np.asarray(list(y_pred), dtype=object)
        n = len(yt)
        for name, values in (("y_pred", yp), ("paths", paths), ("probability", probability)):
            if values is not None and len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries but y_true has {n}; they must match.")
    if classes is None:
        classes = [] if yt is None else sorted(set(yt) | set(yp), key=lambda c: (str(type(c)), c))  # type: ignore[arg-type]
    prob = None if probability is None else np.asarray(probability, dtype=float)
    shown: dict[str, str] = {}
    if embedder is not None:
        shown.update(embedder_settings(embedder))
    if head is not None:
        shown["head"] = type(head[-1] if hasattr(head, "steps") else head).__name__
    shown.update({str(k): str(v) for k, v in (settings or {}).items()})
    shown["deepfeat version"] = __version__
    shown["date"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    times = dict(timings or {})
    if leaderboard is not None and "search_time" in leaderboard:
        for h, t in zip(leaderboard["head"], leaderboard["search_time"]):
            times.setdefault(f"{h} search (work seconds)", float(t))
    return ClassificationReport(
        y_true=yt, y_pred=yp, paths=None if paths is None else [str(p) for p in paths], probability=prob,
        classes=list(classes), leaderboard=leaderboard, settings=shown, timings=times, probe=probe,
        recipe=recipe, title=title, notes=list(notes),
    )


def _tick(label: Any) -> str:
    """A class name as an axis label: shortened, and ``$`` kept literal (matplotlib reads ``$..$`` as maths)."""
    text = str(label)
    if len(text) > _MAX_TICK_CHARS:
        text = text[: _MAX_TICK_CHARS - 1] + "…"
    return text.replace("$", r"\$")


def _png_data(fig: Figure) -> str:
    buf = io.BytesIO()
    # no "Software" chunk: matplotlib's names its web address
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _thumbnail(path: str, size: int) -> str | None:
    """A base64 JPEG of the image, decoded as the embedder decodes it (EXIF orientation, modes); None if unreadable."""
    from .images import ImageDecodeError, load_image

    try:
        img = load_image(path, draft_side=size)
    except (ImageDecodeError, OSError) as exc:
        logger.warning("no thumbnail for %s: %s", path, exc)
        return None
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
nav { font-size: 0.9em; margin: 0.3em 0 0.8em; }
nav a { color: #1f5fa8; }
h2 { font-size: 1.15em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
.note { color: #555; margin: 0.2em 0; }
.summary { font-size: 1.1em; font-weight: 600; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f6f8; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.settings td:first-child { white-space: nowrap; font-weight: 600; }
table.settings td { word-break: break-word; }
tr.best td { background: #eef6ee; }
details { margin: 0.5em 0; }
summary { cursor: pointer; color: #1f5fa8; }
.figure img { max-width: 100%; height: auto; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 10px; }
.thumb { border: 1px solid #ddd; border-radius: 4px; padding: 6px; font-size: 0.8em; background: #fafafa;
         overflow-wrap: anywhere; }
.thumb { margin: 0; }
.thumb .img { height: 120px; display: flex; align-items: center; justify-content: center; }
.thumb img { max-width: 100%; max-height: 120px; }
.thumb .missing { color: #999; }
.thumb .true { color: #176117; }
.thumb .pred { color: #a11; font-weight: 600; }
.thumb .prob { font-weight: 600; }
.thumb .file { color: #777; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
<nav><a href="#settings">settings</a>{% if recipe or probe %} · <a href="#auto">--auto probe</a>{% endif %}{% if leaderboard %} · <a href="#leaderboard">leaderboard</a>{% endif %} · <a href="#confusion">confusion matrix</a>{% if has_test %} · <a href="#per-class">per class</a> · <a href="#mistakes">misclassified images ({{ n_wrong }})</a>{% endif %}</nav>
{% if summary %}<p class="summary">{{ summary }}</p>{% endif %}
{% for note in notes %}<p class="note">{{ note }}</p>{% endfor %}

<section id="settings">
<h2>Settings</h2>
<table class="settings">
{% for key, value in settings.items() %}<tr><td>{{ key }}</td><td>{{ value }}</td></tr>
{% endfor %}</table>
{% if timings %}
<h3>Time spent</h3>
<table class="timings">
{% for key, value in timings %}<tr><td>{{ key }}</td><td class="num">{{ value }}</td></tr>
{% endfor %}</table>
{% endif %}
</section>

{% if recipe or probe %}
<section id="auto">
<h2>--auto: layer probe and recipe</h2>
{% if recipe %}<p>{{ recipe }}</p>{% endif %}
{% if figs.get("probe") %}<div class="figure"><img alt="linear probe score of each layer and pooling" src="{{ figs.get("probe") }}"></div>{% endif %}
{% macro probe_table(rows) %}<table class="probe">
<tr><th>layer</th><th>pooling</th><th>features</th><th>probe CV score</th><th>rank</th></tr>
{% for r in rows %}<tr{% if r.best %} class="best"{% endif %}><td>{{ r.layer }}</td><td>{{ r.pooling }}</td>
<td class="num">{{ r.features }}</td><td class="num">{{ r.score }}</td><td class="num">{{ r.rank }}</td></tr>
{% endfor %}</table>{% endmacro %}
{% if probe %}
<p class="note">The best {{ probe_top | length }} of {{ probe | length }} (layer, pooling) pairs:</p>
{{ probe_table(probe_top) }}
{% if probe | length > probe_top | length %}<details><summary>all {{ probe | length }} pairs, in network order</summary>
{{ probe_table(probe) }}</details>{% endif %}
{% endif %}
</section>
{% endif %}

{% if leaderboard %}
<section id="leaderboard">
<h2>Leaderboard</h2>
<table class="leaderboard">
<tr><th>rank</th><th>head</th><th>CV {{ scoring }} (mean ± std)</th><th>fit time</th><th>search</th><th>best parameters</th></tr>
{% for r in leaderboard %}<tr><td class="num">{{ r.rank }}</td><td>{{ r.head }}</td><td class="num">{{ r.score }}</td>
<td class="num">{{ r.fit }}</td><td class="num">{{ r.search }}</td><td>{{ r.params }}</td></tr>
{% endfor %}</table>
{% if figs.get("cv_scores") %}<div class="figure" id="cv-scores"><img alt="each head's score on each CV fold" src="{{ figs.get("cv_scores") }}"></div>{% endif %}
</section>
{% endif %}

<section id="confusion">
<h2>Confusion matrix{% if normalize %} (rows normalised){% endif %}</h2>
{% if figs.get("confusion") %}<div class="figure"><img alt="confusion matrix" src="{{ figs.get("confusion") }}"></div>
{% else %}<p class="note">No labelled test images: pass --test (classify) or a labelled folder (predict).</p>{% endif %}
</section>

{% if has_test %}
<section id="per-class">
<h2>Per class</h2>
<table class="per-class">
<tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>
{% for r in per_class %}<tr><td>{{ r.name }}</td><td class="num">{{ r.precision }}</td><td class="num">{{ r.recall }}</td>
<td class="num">{{ r.f1 }}</td><td class="num">{{ r.support }}</td></tr>
{% endfor %}</table>
</section>

<section id="mistakes">
<h2>Misclassified images ({{ n_wrong }})</h2>
{% if n_wrong == 0 %}<p class="note">None: every test image was classified correctly.</p>
{% else %}
<p class="note">{% if any_probability %}Most confident mistakes first; the number is the probability the head gave its (wrong) prediction.{% else %}This head gives no probabilities; in input order.{% endif %}</p>
<div class="grid">
{% for t in thumbs %}<figure class="thumb" title="{{ t.path }}">
<div class="img">{% if t.src %}<img alt="{{ t.name }}" src="{{ t.src }}">{% else %}<span class="missing">(unreadable)</span>{% endif %}</div>
<figcaption><div class="true">true: {{ t.true }}</div><div class="pred">predicted: {{ t.predicted }}</div>{% if t.probability %}<div class="prob">p = {{ t.probability }}</div>{% endif %}
<div class="file">{{ t.name }}</div></figcaption>
</figure>
{% endfor %}</div>
{% if n_more %}<p class="more">and {{ n_more }} more misclassified images not shown{% if any_probability %} (the least confident){% endif %}.</p>{% endif %}
{% endif %}
</section>
{% endif %}
</body>
</html>
"""
