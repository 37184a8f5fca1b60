"""The array contract: docs/data-model.md against attrax._schema, and what methods produce."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import attrax as ax
from attrax import _schema

from .conftest import PAIRS, assert_close

PAGE = Path(__file__).resolve().parent.parent / "docs" / "data-model.md"


def _documented(section: str) -> set[str]:
    """The backticked names in the first column of the table under ``## section``."""
    text = PAGE.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in body.splitlines():
        if line.startswith("| `"):
            names.update(re.findall(r"`([a-z_]+)`", line.split("|")[1]))
    return names


@pytest.mark.parametrize(
    ("section", "table"),
    [("Dims", _schema.DIMS), ("Coordinates", _schema.COORDS), ("Attrs", _schema.ATTRS)],
)
def test_page_documents_exactly_the_schema(section, table):
    assert _documented(section) == set(table)


def _results(models) -> list[xr.DataArray | xr.Dataset]:
    gpt2, marian = models["gpt2"], models["marian"]
    sources, targets = [p[0] for p in PAIRS[:2]], [p[1] for p in PAIRS[:2]]
    ig = ax.integrated_gradients(gpt2, sources, targets, steps=3, contrast=None)
    cut = ax.pipe(ax.saliency, ax.l2_norm)(gpt2, *PAIRS[0])
    return [
        ig,
        ax.saliency(marian, *PAIRS[0], attribute_target=True),
        ax.occlusion(gpt2, *PAIRS[0]),
        ax.attention(gpt2, sources, targets),
        ax.attention(marian, PAIRS[0][0], maps="encoder"),
        ax.rollout(marian, *PAIRS[0], attribute_target=True),
        ax.step_scores(gpt2, *PAIRS[0], scores=["probability", "entropy"]),
        ax.with_scores(cut, ax.step_scores(gpt2, *PAIRS[0])),
        ax.deletion(gpt2, cut, *PAIRS[0], fractions=2),
        ax.comprehensiveness(gpt2, cut, *PAIRS[0]),
        ax.merge_subwords(ax.l2_norm(ax.saliency(marian, *PAIRS[0], attribute_target=True))),
        ax.merge_subwords(cut, dims="target"),
        *_classifier_results(),
        ax.evaluate(
            gpt2,
            [{"input": PAIRS[0][0], "target": PAIRS[0][1], "label": "x"}],
            {"s": ax.saliency, "o": ax.occlusion},
            ["sufficiency", "kendall"],
            attributions=True,
        ),
    ]


def _classifier_results() -> list[xr.DataArray]:
    from attrax.testing import tiny_classifier

    hf, tok = tiny_classifier("bert", "sequence")
    sequence = ax.load_model(hf, tokenizer=tok)
    hf, tok = tiny_classifier("gpt2", "token")
    token = ax.load_model(hf, tokenizer=tok)
    pairs = [("the capital", "is paris"), ("hello", "world")]
    return [
        ax.saliency(sequence, pairs, [["label_1", "label_2"]] * 2, contrast="label_0"),
        ax.occlusion(token, ["the capital", "hello world"], contrast=0),
        ax.step_scores(sequence, pairs),
    ]


def test_every_produced_name_is_documented(models):
    for result in _results(models):
        assert set(map(str, result.dims)) <= set(_schema.DIMS), result.dims
        coords = set(map(str, result.coords)) - set(map(str, result.dims))
        assert coords <= set(_schema.COORDS), coords - set(_schema.COORDS)
        variables = result.data_vars.values() if isinstance(result, xr.Dataset) else [result]
        for variable in [*variables, result]:
            assert set(variable.attrs) <= set(_schema.ATTRS), variable.attrs.keys()


def test_arrays_built_directly_equal_the_constructors(models, monkeypatch):
    """``_schema._direct`` skips xarray's constructor: every result equals the constructor's,
    coordinate dtypes and indexes included."""
    fast = _results(models)
    monkeypatch.setattr(_schema, "_direct", lambda *args: None)
    slow = _results(models)
    for a, b in zip(fast, slow, strict=True):
        xr.testing.assert_identical(a, b)
        for name in b.coords:
            assert a.coords[name].dtype == b.coords[name].dtype, name
        assert {k: type(v) for k, v in a.xindexes.items()} == {
            k: type(v) for k, v in b.xindexes.items()
        }


def test_missing_markers_fill_a_batch(models):
    da = ax.saliency(models["gpt2"], [PAIRS[0][0], "Hi"], [PAIRS[0][1], " there"])
    short = da.isel(example=1)
    padded = short.source_id.values == _schema.MISSING_ID
    assert padded.any()
    assert (short.source_token.values[padded] == _schema.MISSING_TOKEN).all()
    assert np.isnan(short.values[:, padded]).all()
    assert _schema.fill_value(short.source_id.dtype) == _schema.MISSING_ID
    assert _schema.fill_value(short.source_token.dtype) == _schema.MISSING_TOKEN
    assert np.isnan(_schema.fill_value(short.dtype))


def test_drop_padding_keeps_the_example_only(models):
    da = ax.l2_norm(ax.saliency(models["gpt2"], [PAIRS[0][0], "Hi"], [PAIRS[0][1], " there"]))
    alone = ax.l2_norm(ax.saliency(models["gpt2"], "Hi", " there"))
    dropped = _schema.drop_padding(da.isel(example=1, drop=True))
    assert dropped.source_token.values.tolist() == alone.source_token.values.tolist()
    assert dropped.target.values.tolist() == alone.target.values.tolist()
    assert_close(dropped.values, alone.values, rtol=1e-5, atol=1e-6)


def test_per_example_tiles_a_single_input(models):
    da = ax.saliency(models["gpt2"], *PAIRS[0])
    ids = _schema.per_example(da, "source_id", ("example", "source"))
    assert ids.shape == (1, da.sizes["source"])
    assert ids[0].tolist() == da.source_id.values.tolist()
