"""attrax.viz: HTML heatmap, matplotlib figure, rich table, and a real headless-Chromium render."""

from __future__ import annotations

import io as _io
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import xarray as xr
from matplotlib import colormaps, colors
from rich.console import Console

import attrax as ax
from attrax import viz
from tests._arrays import batch, classifier, dataset, encoder_decoder, single, single_hidden


class _Cells(HTMLParser):
    """Collects the heatmap's headers and cells, with entities already unescaped."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[dict[str, list]] = []
        self._cell: dict | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "table":
            self.tables.append({"src": [], "tgt": [], "cells": [], "scores": [], "sides": []})
        elif tag in ("td", "th"):
            self._cell = {**a, "tag": tag, "class": a.get("class", "").split(), "text": ""}

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell["text"] += data

    def handle_endtag(self, tag: str) -> None:
        if tag not in ("td", "th") or self._cell is None:
            return
        cell, self._cell = self._cell, None
        kinds = {"ax-src": "src", "ax-tgt": "tgt", "ax-c": "cells", "ax-s": "scores"}
        kinds["ax-side"] = "sides"
        for cls, key in kinds.items():
            if cls in cell["class"]:
                self.tables[-1][key].append(cell)


def parse(page: viz.HTML) -> list[dict[str, list]]:
    parser = _Cells()
    parser.feed(page._repr_html_())
    return parser.tables


def extreme_end(da: xr.DataArray) -> float:
    """Where the largest-magnitude value sits on a symmetric diverging map: 0.0 or 1.0."""
    flat = da.values.ravel()
    return 1.0 if flat[np.nanargmax(np.abs(flat))] > 0 else 0.0


def labels(tokens) -> list[str]:
    return [viz.readable_token(str(t)) for t in np.asarray(tokens).tolist()]


# --- tokens ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "shown"),
    [
        ("Ġcafé", "␣café"),
        ("ĠcafÃ©", "␣café"),  # real GPT-2 byte-level spelling of " café"
        ("▁Straße", "␣Straße"),
        ("▁▁x", "␣␣x"),
        ("Ċ", "↵"),
        ("ĉ", "⇥"),
        ("日本", "日本"),
        ("👩‍🚀", "👩‍🚀"),
        ("<s>", "<s>"),
        ("Ã", "Ã"),  # half a UTF-8 sequence stays as it is
        ("", ""),
    ],
)
def test_readable_token(token: str, shown: str) -> None:
    assert viz.readable_token(token) == shown


# --- HTML -----------------------------------------------------------------------------------


def test_show_single_has_every_label_and_cell() -> None:
    da = single()
    page = viz.show(da)
    (t,) = parse(page)
    assert [c["text"] for c in t["src"]] == labels(da.source_token)
    assert [c["text"] for c in t["tgt"]] == labels(da.target_token)
    assert len(t["cells"]) == da.size
    nan_cells = [c for c in t["cells"] if "ax-nan" in c["class"]]
    assert len(nan_cells) == int(da.isnull().sum()) > 0
    assert all(c.get("data-nan") == "1" and c["text"] == "" for c in nan_cells)
    values = [float(c["data-value"]) for c in t["cells"] if "ax-nan" not in c["class"]]
    np.testing.assert_allclose(values, da.values[~np.isnan(da.values)], rtol=1e-5)
    # Tooltips carry the value; markup in tokens is escaped, never live.
    assert any(c["title"].endswith(f"{float(da.values[-1, 0]):.4g}") for c in t["cells"])
    raw = page._repr_html_()
    assert "<b>" not in raw and "&lt;b&gt;&amp;amp;" in raw and "&quot;quote&#x27;" in raw
    assert "saliency · synthetic/tiny" in raw


def test_show_colours_follow_the_values() -> None:
    da = single()
    (t,) = parse(viz.show(da))
    cells = [c for c in t["cells"] if "ax-nan" not in c["class"]]
    by_value = {float(c["data-value"]): c["style"] for c in cells}
    top = float(np.nanmax(np.abs(da.values)))
    strongest = by_value[max(by_value, key=abs)]
    end = 1.0 if np.nanmax(da.values) == top else 0.0
    assert colors.to_hex(colormaps["RdBu_r"](end)) in strongest  # diverging, centred on 0

    pos = single(signed=False)
    (t,) = parse(viz.show(pos))
    cells = [c for c in t["cells"] if "ax-nan" not in c["class"]]
    best = max(cells, key=lambda c: float(c["data-value"]))
    assert colors.to_hex(colormaps["Reds"](1.0)) in best["style"]  # sequential from 0

    (t,) = parse(viz.show(pos, cmap="viridis"))
    best = max(t["cells"], key=lambda c: float(c.get("data-value", "-inf")))
    assert colors.to_hex(colormaps["viridis"](1.0)) in best["style"]


def test_show_batch_one_table_per_example_without_padding() -> None:
    da = batch(lengths=(5, 7, 4), prompt=2)
    tables = parse(viz.show(da))
    assert len(tables) == 3
    for e, (t, length) in enumerate(zip(tables, (5, 7, 4), strict=True)):
        assert len(t["src"]) == length
        assert len(t["tgt"]) == length - 2
        assert len(t["cells"]) == length * (length - 2)
        assert [c["text"] for c in t["src"]] == labels(da.source_token[e, :length])
    (only,) = parse(viz.show(da, example=1))
    assert len(only["cells"]) == 7 * 5
    assert len(parse(viz.show(da, example=[0, 2]))) == 2
    assert "example 2" in viz.show(da, example=-1)._repr_html_()


def test_show_encoder_decoder_groups_sides() -> None:
    da = encoder_decoder(n_source=4, n_target=4)
    page = viz.show(da)
    (t,) = parse(page)
    assert [(c["text"], c["colspan"]) for c in t["sides"]] == [("source", "4"), ("target", "4")]
    assert len(t["cells"]) == da.size
    split = [i for i, c in enumerate(t["cells"][: da.sizes["source"]]) if "ax-split" in c["class"]]
    assert split == [4]


def test_show_without_token_coords_uses_positions() -> None:
    da = xr.DataArray(np.eye(2), dims=("target", "source"), coords={"target": [5, 6]})
    (t,) = parse(viz.show(da))
    assert [c["text"] for c in t["tgt"]] == ["5", "6"]
    assert [c["text"] for c in t["src"]] == ["0", "1"]


def test_show_takes_step_scores_as_they_come(models) -> None:
    """ax.step_scores' array (a `score` dim), one score of it, and ax.with_scores' Dataset were
    refused or headed `step_scores` (until 2026-12-06): a column per score, under its name."""
    model = models["gpt2"]
    source, target = "the capital of france is", " paris and"
    da = ax.l2_norm(ax.saliency(model, source, target))
    scores = ax.step_scores(model, source, target, scores=["probability", "entropy"])
    for given, names in (
        ({"scores": scores}, ["probability", "entropy"]),
        ({"scores": scores.sel(score="entropy")}, ["entropy"]),
    ):
        page = viz.show(da, **given)
        assert [n for n in ("probability", "entropy", "step_scores") if f">{n}</th>" in
                page._repr_html_()] == names  # fmt: skip
    joined = viz.show(ax.with_scores(da, scores))
    assert joined._repr_html_() == viz.show(da, scores=scores)._repr_html_()
    (t,) = parse(joined)
    np.testing.assert_allclose(
        [float(c["text"]) for c in t["scores"][::2]], scores.sel(score="probability"), rtol=1e-3
    )
    with pytest.raises(ax.InputError, match=r"what ax\.with_scores returns"):
        viz.show(ax.with_scores(da, scores), scores=scores)


def test_show_scores_columns() -> None:
    da = single()
    ds = dataset()
    for scores, names in [
        (ds["probability"], ["probability"]),
        (ds[["probability", "gap"]], ["probability", "gap"]),
        ({"p": ds["probability"]}, ["p"]),
        (ds["probability"].rename(None), ["score"]),
    ]:
        page = viz.show(da, scores=scores)
        (t,) = parse(page)
        assert len(t["scores"]) == len(names) * da.sizes["target"]
        assert all(f">{n}</th>" in page._repr_html_() for n in names)
    (t,) = parse(viz.show(da, scores=ds["probability"]))
    shown = [float(c["text"]) for c in t["scores"]]
    np.testing.assert_allclose(shown, ds["probability"].values, rtol=1e-3)
    # aligned on the target coordinate, not by order
    (t,) = parse(viz.show(da, scores=ds["probability"].isel(target=slice(None, None, -1))))
    np.testing.assert_allclose([float(c["text"]) for c in t["scores"]], shown)
    # a batch's scores carry an example dim
    b = batch()
    probs = xr.DataArray(
        np.arange(15.0).reshape(3, 5), dims=("example", "target"), coords={"target": b.target}
    )
    tables = parse(viz.show(b, scores={"p": probs}))
    assert [c["text"] for c in tables[1]["scores"]] == ["5", "6", "7", "8", "9"]
    # labelled examples are matched by label: a selection of `da` shows its own examples'
    # scores (the first example's were shown until 2026-12-05)
    labelled = probs.assign_coords(example=b.example)
    (one,) = parse(viz.show(b.isel(example=[1]), scores={"p": labelled}))
    assert [c["text"] for c in one["scores"]] == ["5", "6", "7", "8", "9"]
    with pytest.raises(ax.InputError, match="`scores` has no example 1, which `da` shows"):
        viz.show(b.isel(example=[1]), scores={"p": labelled.isel(example=[0])})
    with pytest.raises(ax.InputError, match="`scores` has 2 unlabelled examples but `da` has 3"):
        viz.show(b, scores={"p": probs.isel(example=[0, 1])})


# --- classification rows --------------------------------------------------------------------


class _Rows(HTMLParser):
    """Collects the rows view: per row, its caption cells and its highlighted words."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.headings: list[str] = []
        self.rows: list[dict[str, list]] = []
        self._open: dict | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "tr" and self.headings:
            self.rows.append({"cells": [], "words": []})
        if tag in ("th", "td", "span"):
            self._open = {**a, "tag": tag, "class": a.get("class", "").split(), "text": ""}

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._open["text"] += data

    def handle_endtag(self, tag: str) -> None:
        if tag not in ("th", "td", "span") or self._open is None:
            return
        item, self._open = self._open, None
        if tag == "th" and "ax-h" in item["class"]:
            self.headings.append(item["text"])
        elif tag == "span" and "ax-w" in item["class"]:
            self.rows[-1]["words"].append(item)
        elif tag == "td" and "ax-text" not in item["class"]:
            self.rows[-1]["cells"].append(item)


def parse_rows(page: viz.HTML) -> _Rows:
    parser = _Rows()
    parser.feed(page._repr_html_())
    return parser


def test_show_classifier_rows_one_per_example() -> None:
    da = classifier()
    page = viz.show(da, labels=["positive", "positive", 0])
    parsed = parse_rows(page)
    assert parsed.headings == ["example", "true label", "predicted", "attributed", "sum", "text"]
    assert len(parsed.rows) == da.sizes["example"]
    expected_words = [
        ["[CLS]", "the", "film", "was", "great", "[SEP]"],
        ["[CLS]", "a", "bad", "ly", "made", "<b>", "film", "[SEP]"],  # ##ly joins its word
        ["[CLS]", "okay", "[SEP]"],  # padding dropped
    ]
    for e, row in enumerate(parsed.rows):
        cells = [c["text"] for c in row["cells"]]
        predicted = str(da.predicted_label[e].item())
        probability = float(da.predicted_probability[e])
        assert cells[:4] == [
            str(e),
            ["positive", "positive", "negative"][e],  # a class id is named
            f"{predicted} ({probability:.2f})",
            predicted,  # each example's predicted class is the one shown
        ]
        assert [w["text"] for w in row["words"]] == expected_words[e]
        values = da.isel(example=e).sel(target=predicted).dropna("source").values
        shown = [float(w["data-value"]) for w in row["words"]]
        np.testing.assert_allclose(shown, values, rtol=1e-5)
        assert float(cells[4]) == pytest.approx(float(values.sum()), rel=1e-3)
    ok = [c for r in parsed.rows for c in r["cells"] if "ax-pred" in c["class"]]
    assert ["ax-ok" in c["class"] for c in ok] == [True, False, False]
    raw = page._repr_html_()
    assert "<b>" not in raw and "&lt;b&gt;" in raw  # escaped, never live
    assert 'a <span class="ax-w"' not in raw and "bad</span><span" in raw  # no space before ##ly


def test_show_classifier_rows_colours_share_one_scale() -> None:
    da = classifier()
    parsed = parse_rows(viz.show(da))
    assert "true label" not in parsed.headings  # no labels given
    words = [w for r in parsed.rows for w in r["words"]]
    strongest = max(words, key=lambda w: abs(float(w["data-value"])))
    end = 1.0 if float(strongest["data-value"]) > 0 else 0.0
    assert colors.to_hex(colormaps["RdBu_r"](end)) in strongest["style"]
    # the same example alone keeps its own values but takes its own scale
    (alone,) = parse_rows(viz.show(da, example=[1])).rows
    assert len(alone["words"]) == 8


def test_show_classifier_rows_from_a_selected_class_and_all_classes() -> None:
    everything = classifier(attributed="all")
    chosen = everything.sel(target="neutral")  # (example, source), target now a scalar coord
    parsed = parse_rows(viz.show(chosen, labels=[0, 1, 2]))
    assert [r["cells"][3]["text"] for r in parsed.rows] == ["neutral"] * 3
    assert [r["cells"][1]["text"] for r in parsed.rows] == ["negative", "neutral", "positive"]
    np.testing.assert_allclose(
        [float(w["data-value"]) for w in parsed.rows[0]["words"]],
        chosen.isel(example=0).dropna("source").values,
        rtol=1e-5,
    )
    # all classes attributed: each example shows its predicted class
    parsed = parse_rows(viz.show(everything))
    assert [r["cells"][1]["text"].split()[0] for r in parsed.rows] == [
        "positive",
        "negative",
        "positive",
    ]
    assert [r["cells"][2]["text"] for r in parsed.rows] == ["positive", "negative", "positive"]
    # one text, one class: a single row without an example column
    one = parse_rows(viz.show(chosen.isel(example=0)))
    assert one.headings == ["predicted", "attributed", "sum", "text"] and len(one.rows) == 1
    # one example's (target, source) stays a heatmap of its classes
    (t,) = parse(viz.show(everything.isel(example=0)))
    assert [c["text"] for c in t["tgt"]] == ["negative", "neutral", "positive"]


def test_classifier_rows_errors() -> None:
    da = classifier()
    with pytest.raises(ax.OptionError, match="`labels` must be a list of 3"):
        viz.show(da, labels=["positive"])
    with pytest.raises(ax.OptionError, match="`labels`"):
        viz.show(da, labels="positive")  # type: ignore[arg-type]
    with pytest.raises(ax.OptionError, match="`labels`"):
        viz.show(single(), labels=["x"])
    with pytest.raises(ax.OptionError, match="`labels`"):
        viz.plot(single(), labels=["x"])
    with pytest.raises(ax.OptionError, match="`scores`"):
        viz.show(da, scores=dataset()["probability"])
    with pytest.raises(ax.OptionError, match="`example`"):
        viz.show(da, example=5)
    two = classifier(attributed="all").copy()
    two["predicted_label"] = ("example", np.array(["", "", ""]))
    with pytest.raises(ax.InputError, match="select one first"):
        viz.show(two)


def test_labels_are_checked_against_the_classes() -> None:
    every = classifier(attributed="all")  # all three classes: the labels must be among them
    with pytest.raises(ax.OptionError, match=r"`labels\[0\]` 'happy' is not a class.*'neutral'"):
        viz.show(every, labels=["happy", 0, 2])
    with pytest.raises(ax.OptionError, match=r"`labels\[1\]` 7 is not a class"):
        viz.plot(every, labels=["positive", 7, 2])
    with pytest.raises(ax.OptionError, match=r"`labels\[0\]` must be a class name"):
        viz.show(every, labels=[True, 0, 2])
    with pytest.raises(ax.OptionError, match=r"`labels\[2\]` must be a class name"):
        viz.show(classifier(), labels=["positive", 0, 2.0])
    parsed = parse_rows(viz.show(every, labels=["neutral", np.int64(0), "positive"]))
    assert [r["cells"][1]["text"] for r in parsed.rows] == ["neutral", "negative", "positive"]
    # each example's predicted class only: a true class the array never saw is still allowed
    parsed = parse_rows(viz.show(classifier(), labels=["neutral", 1, "positive"]))
    assert [r["cells"][1]["text"] for r in parsed.rows] == ["neutral", "1", "positive"]


def test_plot_classifier_rows(tmp_path: Path) -> None:
    da = classifier()
    fig = viz.plot(da, labels=["positive", "negative", "neutral"], path=tmp_path / "rows.png")
    heat, bar = fig.axes
    ticks = [t.get_text() for t in heat.get_yticklabels()]
    assert ticks[0] == "0 · true label positive · predicted positive (0.50)"
    assert ticks[2].startswith("2 · true label neutral · predicted positive")
    texts = [t.get_text() for t in heat.texts]
    assert texts[:6] == ["[CLS]", "the", "film", "was", "great", "[SEP]"]
    assert len(heat.patches) == len(texts) == 6 + 8 + 3
    values = da.sel(target=da.predicted_label).values
    top = float(np.nanmax(np.abs(values)))
    assert bar.get_ylim() == pytest.approx((-top, top))
    image = matplotlib.image.imread(tmp_path / "rows.png")
    assert image.shape[0] > 100 and image.shape[1] > 300


def test_html_object_and_saving(tmp_path: Path) -> None:
    page = viz.show(single(), title="My <title>", path=tmp_path / "a.html")
    text = (tmp_path / "a.html").read_text(encoding="utf-8")
    assert text == str(page)
    assert text.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in text
    assert "<title>My &lt;title&gt;</title>" in text
    assert page._repr_html_() in text and "<html" not in page._repr_html_()
    assert "Straße" in text and "日本" in text
    assert page.save(tmp_path / "b.html").read_text(encoding="utf-8") == text
    assert "attrax.viz.HTML" in repr(page)
    with pytest.raises(ax.InputError, match=r"`path`.*directory"):
        page.save(tmp_path)


def test_output_paths_and_titles_are_checked_before_drawing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_drawing(*args, **kwargs):
        raise AssertionError("drew before checking the options")

    monkeypatch.setattr(viz, "_prepare", no_drawing)
    monkeypatch.setattr(viz, "_check_dims", no_drawing)
    missing = tmp_path / "nodir"
    with pytest.raises(ax.InputError, match=r"`path`.*nodir' does not exist"):
        viz.plot(single(), path=missing / "x.png")
    with pytest.raises(ax.InputError, match=r"`path`.*cannot write 'xyz' files.*\.png"):
        viz.plot(single(), path=tmp_path / "x.xyz")
    with pytest.raises(ax.InputError, match=r"`path`.*nodir' does not exist"):
        viz.show(single(), path=missing / "x.html")
    with pytest.raises(ax.InputError, match=r"`path`.*nodir' does not exist"):
        viz.HTML("<p>hi</p>").save(missing / "x.html")
    with pytest.raises(ax.InputError, match=r"`path`.*is a directory"):
        viz.plot(single(), path=tmp_path)
    with pytest.raises(ax.InputError, match=r"`path` must be"):
        viz.show(single(), path=3)  # type: ignore[arg-type]
    with pytest.raises(ax.OptionError, match=r"`title` must be a string or None, got 3"):
        viz.show(single(), title=3)  # type: ignore[arg-type]
    with pytest.raises(ax.OptionError, match=r"`title`"):
        viz.plot(single(), title=["a"])  # type: ignore[arg-type]
    if Path("/proc/self").is_dir():  # a directory nobody may write in, root included
        with pytest.raises(ax.InputError, match=r"`path` '/proc/x.html'"):
            viz.HTML("<p>hi</p>").save("/proc/x.html")
    assert list(tmp_path.iterdir()) == []


def test_plot_and_show_write_whole_files_or_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.figure import Figure

    png, html = tmp_path / "a.png", tmp_path / "a.html"
    viz.plot(single(), path=png, dpi=20)
    page = viz.show(single(), path=html)
    before = png.read_bytes()

    def failing(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"partial")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Figure, "savefig", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        viz.plot(batch(), path=png)
    assert png.read_bytes() == before
    assert sorted(tmp_path.iterdir()) == [html, png]  # no temp file left behind
    monkeypatch.undo()
    # no suffix: matplotlib's default format, although the file is written under a temp name
    bare = tmp_path / "figure"
    viz.plot(single(), path=bare, dpi=20)
    assert bare.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    viz.plot(single(), path=tmp_path / "a.svg")
    assert (tmp_path / "a.svg").read_text().lstrip().startswith("<?xml")
    assert html.read_text(encoding="utf-8") == str(page)


def test_input_errors() -> None:
    with pytest.raises(ax.InputError, match=r"'hidden'.*l2_norm"):
        viz.show(single_hidden())
    with pytest.raises(ax.InputError, match="hidden"):
        viz.plot(single_hidden())
    with pytest.raises(ax.InputError, match="hidden"):
        viz.table(single_hidden())
    layered = single().expand_dims(layer=2)
    with pytest.raises(ax.InputError, match=r"\('layer',\)"):
        viz.show(layered)
    with pytest.raises(ax.InputError, match=r"must have dims \('target', 'source'\)"):
        viz.table(single().isel(target=0))  # (source,) is a row for show/plot, not a table
    with pytest.raises(ax.InputError, match="`da`"):
        viz.show(single().values)  # type: ignore[arg-type]
    with pytest.raises(ax.OptionError, match="`example`"):
        viz.show(batch(), example=3)
    with pytest.raises(ax.OptionError, match="`example`"):
        viz.show(single(), example=0)
    # numpy's, matplotlib's or a TypeError until 2026-12-05
    with pytest.raises(ax.OptionError, match="`example` selects no example"):
        viz.show(batch(), example=[])
    with pytest.raises(ax.OptionError, match=r"`example` must be positions .*got 1\.0"):
        viz.show(batch(), example=1.0)
    with pytest.raises(ax.InputError, match="`da` has no examples to draw"):
        viz.show(batch().isel(example=[]))
    with pytest.raises(ax.InputError, match="`da` must hold real numbers to draw"):
        viz.show(xr.DataArray([["a", "b"]], dims=("target", "source")))
    with pytest.raises(ax.OptionError, match="`dpi` must be a positive number, got 0"):
        viz.plot(single(), dpi=0)
    with pytest.raises(ax.OptionError, match="`ax` must be a matplotlib Axes, got str"):
        viz.plot(single(), ax="notaxes")  # type: ignore[arg-type]
    with pytest.raises(ax.InputError, match="`out` must be a run's directory"):
        ax.load_dataset_results(5)  # type: ignore[arg-type]
    # read as True, or ignored, until 2026-12-05
    with pytest.raises(ax.OptionError, match="`lazy` must be a bool, got 'no'"):
        ax.load_dataset_results("runs", lazy="no")  # type: ignore[arg-type]
    with pytest.raises(ax.OptionError, match="`annotate` must be a bool, got 'no'"):
        viz.show(single(), annotate="no")  # type: ignore[arg-type]
    grid = xr.DataArray(np.zeros((2, 2, 3)), dims=("layer", "head", "source"))
    with pytest.raises(ax.OptionError, match="`labels` does not apply to the layer x head grid"):
        viz.show(grid, labels=["x"])
    with pytest.raises(ax.OptionError, match="`cmap`"):
        viz.show(single(), cmap="no-such-map")
    with pytest.raises(ax.InputError, match="`scores"):
        viz.show(single(), scores=single())
    with pytest.raises(ax.InputError, match="`scores"):
        viz.show(single(), scores=xr.DataArray([1.0], dims="source"))
    with pytest.raises(ax.InputError, match="`scores"):
        viz.show(single(), scores=[1, 2])  # type: ignore[arg-type]


def test_all_nan_and_constant_arrays_render() -> None:
    da = single() * np.nan
    (t,) = parse(viz.show(da))
    assert all("ax-nan" in c["class"] for c in t["cells"])
    zero = single().fillna(0) * 0
    (t,) = parse(viz.show(zero))
    assert len({c["style"] for c in t["cells"]}) == 1


# --- matplotlib -----------------------------------------------------------------------------


def test_plot_writes_a_real_png(tmp_path: Path) -> None:
    da = single()
    fig = viz.plot(da, path=tmp_path / "a.png", dpi=80)
    assert (tmp_path / "a.png").stat().st_size > 5_000
    image = matplotlib.image.imread(tmp_path / "a.png")
    width, height = fig.get_size_inches() * 80
    assert abs(image.shape[0] - height) <= 1 and abs(image.shape[1] - width) <= 1
    assert image.shape[0] > 150 and image.shape[1] > 250
    assert image[..., :3].std() > 0.05
    rgb = (image[..., :3] * 255).round().astype(int).reshape(-1, 3)
    strongest = np.array(colors.to_rgb(colormaps["RdBu_r"](extreme_end(da))))
    close = np.abs(rgb - (strongest * 255).round()).max(axis=1) <= 2
    assert close.sum() > 400  # the extreme cell, not just the end of the colorbar
    grey = np.abs(rgb - 230).max(axis=1) <= 2
    assert grey.sum() > 2000  # NaN cells (the future) are drawn grey
    # The numpy PNG reader used on Chromium's screenshot agrees with matplotlib's (small file:
    # that reader is pure Python for some filters).
    small = viz.plot(da, path=tmp_path / "small.png", dpi=30)
    assert small is not fig
    expected = matplotlib.image.imread(tmp_path / "small.png")
    decoded = read_png(tmp_path / "small.png")
    np.testing.assert_array_equal(decoded, (expected * 255).round().astype(np.uint8))
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == labels(da.source_token)
    assert len(fig.axes) == 2  # heatmap + colorbar


def test_plot_batch_ax_and_errors(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    fig = viz.plot(batch())
    assert len(fig.axes) == 6  # three heatmaps, three colorbars
    own = Figure()
    axes = own.subplots()
    assert viz.plot(encoder_decoder(), ax=axes) is own
    assert [t.get_text() for t in axes.get_yticklabels()] == labels(encoder_decoder().target_token)
    assert viz.plot(batch(), ax=own.subplots(), example=1) is own
    with pytest.raises(ax.OptionError, match="`ax`"):
        viz.plot(batch(), ax=axes)


# --- rich -----------------------------------------------------------------------------------


def test_table_text_and_colours(capsys: pytest.CaptureFixture[str]) -> None:
    da = single()
    console = Console(record=True, width=200, file=_io.StringIO(), color_system="truecolor")
    text = viz.table(da, console=console)
    assert isinstance(text, str)
    for token in labels(da.source_token) + labels(da.target_token):
        assert token in text  # "[bold]x" shows literally: tokens are never read as markup
    assert f"{float(da.values[-1, 0]):.2f}" in text and "·" in text
    ansi = console.file.getvalue()  # type: ignore[attr-defined]
    r, g, b = (round(255 * x) for x in colormaps["RdBu_r"](extreme_end(da))[:3])
    assert f"48;2;{r};{g};{b}" in ansi  # background of the strongest cell
    assert viz.table(batch(), console=Console(file=_io.StringIO(), width=200)).count("example") == 3
    assert viz.table(da, digits=3) is None
    assert f"{float(da.values[-1, 0]):.3f}" in capsys.readouterr().out


# --- real browser ---------------------------------------------------------------------------


def read_png(path: Path) -> np.ndarray:
    """Decode an 8-bit, non-interlaced RGB/RGBA PNG with zlib and numpy only."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert header is not None
    width, height, depth, colour_type, _, _, interlace = header
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, header
    bpp = 3 if colour_type == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, 1 + width * bpp)
    out = np.zeros((height, width * bpp), dtype=np.uint8)
    prev = np.zeros(width * bpp, dtype=np.int32)
    for y in range(height):
        kind, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        if kind == 0:
            row = line
        elif kind == 2:
            row = (line + prev) & 0xFF
        elif kind == 1:  # Sub: a running sum per channel
            row = (np.cumsum(line.reshape(width, bpp), axis=0) & 0xFF).reshape(-1)
        else:  # Average and Paeth depend on the pixel to the left: go pixel by pixel
            row = np.zeros_like(line)
            for x in range(0, width * bpp, bpp):
                a = row[x - bpp : x] if x else np.zeros(bpp, dtype=np.int32)
                b, c = prev[x : x + bpp], prev[x - bpp : x] if x else np.zeros(bpp, np.int32)
                if kind == 3:
                    pred = (a + b) // 2
                else:
                    p = a + b - c
                    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
                    pred = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
                row[x : x + bpp] = (line[x : x + bpp] + pred) & 0xFF
        out[y], prev = row, row
    return out.reshape(height, width, bpp)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_chromium_renders_the_heatmap(tmp_path: Path) -> None:
    da = encoder_decoder()
    page = viz.show(da, path=tmp_path / "heat.html", scores={"p": da.isel(source=0)})
    shot = tmp_path / "shot.png"
    command = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        "--force-color-profile=srgb",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=640,400",
        (tmp_path / "heat.html").as_uri(),
    ]
    subprocess.run(command, check=True, timeout=90, capture_output=True)
    assert "Straße" in str(page)
    pixels = read_png(shot)[..., :3].astype(int)
    assert pixels.shape[:2] == (400, 640)

    def count(colour: str) -> int:
        rgb = np.array([round(255 * x) for x in colors.to_rgb(colour)])
        return int((np.abs(pixels - rgb).max(axis=-1) <= 2).sum())

    values = da.values[np.isfinite(da.values)]
    top = np.abs(values).max()
    cmap = colormaps["RdBu_r"]
    strongest = colors.to_hex(cmap(0.5 + 0.5 * values[np.abs(values).argmax()] / top))
    weakest_sign = values[np.sign(values) != np.sign(values[np.abs(values).argmax()])]
    other = colors.to_hex(cmap(0.5 + 0.5 * weakest_sign[np.abs(weakest_sign).argmax()] / top))
    assert count(strongest) >= 200  # a ~20x20 px cell of the extreme value's colour
    assert count(other) >= 200  # and the strongest of the other sign
    assert count("#e6e6e6") >= 3 * 200  # NaN cells (the future) are grey


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_chromium_renders_classifier_rows(tmp_path: Path) -> None:
    da = classifier()
    viz.show(da, path=tmp_path / "rows.html", labels=["positive", "negative", "neutral"])
    shot = tmp_path / "shot.png"
    command = [
        "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--hide-scrollbars", "--force-device-scale-factor=1",
        "--force-color-profile=srgb", f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}", "--window-size=640,300", (tmp_path / "rows.html").as_uri(),
    ]  # fmt: skip
    subprocess.run(command, check=True, timeout=90, capture_output=True)
    pixels = read_png(shot)[..., :3].astype(int)
    shown = da.sel(target=da.predicted_label).values
    top = np.nanmax(np.abs(shown))
    strongest = shown.ravel()[np.nanargmax(np.abs(shown))]
    colour = colors.to_hex(colormaps["RdBu_r"](0.5 + 0.5 * strongest / top))
    rgb = np.array([round(255 * x) for x in colors.to_rgb(colour)])
    assert int((np.abs(pixels - rgb).max(axis=-1) <= 2).sum()) >= 150  # a highlighted word
    ok = np.array([0x1A, 0x7F, 0x37])  # the correct prediction's green text
    assert int((np.abs(pixels - ok).max(axis=-1) <= 40).sum()) >= 10


def test_merged_words_label_the_views_and_their_padding_goes() -> None:
    """merge_subwords' arrays carry words (``source_word``/``target_word``) and pad a batch
    with "" words: the heatmap and the rows show the words and drop the padding (positions and
    blank all-NaN columns were shown until 2026-12-05)."""
    values = np.array([[[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], [[0.1, 0.2, np.nan], [np.nan] * 3]])
    da = xr.DataArray(
        values,
        dims=("example", "target", "source"),
        coords={
            "example": [0, 1],
            "target": [1, 2],
            "source": [0, 1, 2],
            "source_word": (("example", "source"), [["The", "café", "is"], ["Hello", "café", ""]]),
            "target_word": (("example", "target"), [["café", "is"], ["café", ""]]),
        },
    )
    panels, _ = viz._prepare(da, None, None, None)
    assert panels[0].source_labels == ["The", "café", "is"]
    assert panels[1].source_labels == ["Hello", "café"] and panels[1].target_labels == ["café"]
    rows = da.isel(target=0, drop=True).drop_vars("target_word")
    shown, _ = viz._prepare_rows(rows, None, None, None)
    assert [w for w, _ in shown[1].words] == ["Hello", "café"]


def test_table_titles_are_text_not_markup() -> None:
    """A model named with square brackets was read as rich markup: "[/x]" raised a MarkupError
    and "[red]" vanished from the title (until 2026-12-05)."""
    da = xr.DataArray(
        [[0.2, -0.7]], dims=("target", "source"), attrs={"method": "m", "model": "[red]a [/x]"}
    )
    text = viz.table(da, console=Console(width=80, color_system=None))
    assert "[red]a" in text and "[/x]" in text


def test_tokens_show_as_text_whatever_they_hold():
    """Until 2026-12-06: a token "$$" (GPT-2 has it) failed matplotlib's formula parser and
    "$x_1$" was drawn as a formula; ESC reached the terminal raw (a "clear screen"), and a
    right-to-left override reordered what followed it."""
    import io as _io

    from rich.console import Console

    from attrax.viz import readable_token, table

    # a flag's tags draw it; tags elsewhere are hidden text ("ASCII smuggling"), escaped
    england, hidden = "\U0001f3f4\U000e0067\U000e0062\U000e007f", "ok\U000e0069"
    assert readable_token(england) == england
    assert readable_token(hidden) == "ok\\U000e0069"
    tokens = ["$$", "$x_1$", "\x1b[2J", "a\u202eb", "<0x0A>", "<0xE2>"]
    assert [readable_token(t) for t in tokens] == [
        "$$", "$x_1$", "\\x1b[2J", "a\\u202eb", "\u21b5", "<0xE2>",  # a piece of "€" kept
    ]  # fmt: skip
    da = xr.DataArray(
        [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]],
        dims=("target", "source"),
        coords={"source_token": ("source", tokens), "target_token": ("target", ["$"])},
    )
    fig = ax.plot(da, path=None)
    fig.canvas.draw()  # the formula parser ran at drawing time
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == [readable_token(t) for t in tokens]
    assert not any(t.get_parse_math() for t in fig.axes[0].get_xticklabels())
    text = table(da, console=Console(file=_io.StringIO(), width=200))
    assert "\x1b" not in text and "\\x1b[2J" in text


def test_plot_paints_inf_as_the_scales_end_and_takes_named_examples():
    """imshow masked inf as NaN: drawn as "not attributed" (until 2026-12-06), where show
    paints it at full saturation. Examples named by a pandas Index (object or string dtype)
    failed on .item()."""
    import pandas as pd

    da = xr.DataArray([[np.inf, 0.5, np.nan, 1.0]], dims=("target", "source"))
    image = ax.plot(da).axes[0].images[0].get_array()
    assert image.mask.tolist() == [[False, False, True, False]] and image[0, 0] == 1.0
    one = xr.DataArray([[0.1, 0.2]], dims=("target", "source"))
    both = xr.concat([one, one * 2], dim=pd.Index(["doc-a", "doc-b"], name="example"))
    assert "doc-b" in ax.show(both)._repr_html_()
    assert len([a for a in ax.plot(both).axes if a.images]) == 2


def test_annotated_cells_read_at_any_magnitude():
    """Cells printed 1e300 with its 301 digits and 0.001 as 0.00 until 2026-12-06."""
    da = xr.DataArray([[0.25, 1e300, 0.0012, 0.0]], dims=("target", "source"))
    page = ax.show(da, annotate=True)._repr_html_()
    for text in ("0.25", "1e+300", "0.0012", "0.00"):
        assert f">{text}<" in page, text
    assert "0000000000" not in page


def test_show_of_unreduced_head_outputs_asks_to_reduce_hidden():
    model = ax.load_model()
    da = ax.saliency(model, "1 2 3 =", " 3", layers=0, site="heads")
    with pytest.raises(ax.InputError, match=r"reduce them first \(e.g. ax.l2_norm"):
        ax.show(da)
    assert "<table" in ax.show(ax.l2_norm(da).isel(target=0))._repr_html_()
