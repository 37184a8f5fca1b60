"""Reductions are pure, NaN-aware, take dim names, and compose with pipe."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import attrax as ax


@pytest.fixture
def da() -> xr.DataArray:
    rng = np.random.default_rng(0)
    values = rng.normal(size=(3, 4, 5))
    values[1, 2:] = np.nan  # a target row whose future is NaN
    return xr.DataArray(
        values,
        dims=("target", "source", "hidden"),
        coords={"target": [2, 3, 4], "source": [0, 1, 2, 3]},
        attrs={"method": "saliency"},
        name="attribution",
    )


def test_l2_norm(da):
    out = ax.l2_norm(da)
    assert out.dims == ("target", "source")
    np.testing.assert_allclose(out.values, np.sqrt((da.values**2).sum(-1)))
    assert out.attrs["method"] == "saliency"
    assert out.attrs["reductions"] == "l2_norm(hidden)"


@pytest.mark.parametrize(
    ("fn", "ref"),
    [
        (ax.sum, lambda v: v.sum(-1)),
        (ax.mean, lambda v: v.mean(-1)),
        (ax.max, lambda v: v.max(-1)),
        (
            ax.absmax,
            lambda v: np.take_along_axis(
                v, np.abs(np.nan_to_num(v, nan=-1)).argmax(-1)[..., None], -1
            )[..., 0],
        ),
    ],
)
def test_reductions_match_numpy(da, fn, ref):
    np.testing.assert_allclose(fn(da).values, ref(da.values))  # NaN slices stay NaN


def test_dim_name_forms(da):
    a = ax.mean(da, "source")
    b = ax.mean("source")(da)
    c = da.pipe(ax.mean, dim="source")
    d = ax.mean(da, dim="source")
    for other in (b, c, d):
        xr.testing.assert_identical(a, other)


def test_unknown_dim(da):
    with pytest.raises(ax.OptionError, match="`dim` 'layer' is not a dim of the array"):
        ax.mean(da, "layer")
    with pytest.raises(ax.OptionError, match="expected an xarray DataArray"):
        ax.l2_norm(np.zeros(3))


def test_normalize_rows_sum_to_one(da):
    out = ax.normalize(ax.l2_norm(da))
    sums = out.sum("source")
    np.testing.assert_allclose(sums.values, 1.0)
    assert np.isnan(out.values[1, 2:]).all()
    signed = ax.normalize(ax.sum(da))
    np.testing.assert_allclose(abs(signed).sum("source").values, 1.0)


def test_normalize_zero_row_stays_zero():
    zero = xr.DataArray(np.zeros((2, 3)), dims=("target", "source"))
    assert (ax.normalize(zero) == 0).all()


def test_rescale(da):
    out = ax.rescale(ax.sum(da))
    np.testing.assert_allclose(abs(out).max("source").values, 1.0)


def test_pipe_composes_left_to_right(da):
    f = ax.pipe(ax.l2_norm, ax.normalize("source"))
    xr.testing.assert_identical(f(da), ax.normalize(ax.l2_norm(da)))
    assert f(da).attrs["reductions"] == "l2_norm(hidden);normalize(source)"
    with pytest.raises(ax.OptionError, match="not callable"):
        ax.pipe(ax.l2_norm, "normalize")
    with pytest.raises(ax.OptionError, match="at least one"):
        ax.pipe()


def test_reductions_on_a_dataset(da):
    ds = xr.Dataset({"a": da, "b": da.isel(hidden=0, drop=True)})
    out = ax.l2_norm(ds)
    assert out["a"].dims == ("target", "source")
    xr.testing.assert_identical(out["b"], ds["b"])


def test_reductions_do_not_modify_input(da):
    before = da.copy(deep=True)
    ax.normalize(ax.l2_norm(da))
    xr.testing.assert_identical(da, before)
