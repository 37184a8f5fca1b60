"""Reductions are pure, NaN-aware, take dim names, and compose with pipe."""

from __future__ import annotations

import math

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


# -- plain-Python references: one 1-D slice at a time, NaN skipped, an all-NaN slice gives NaN ----


def _kept(values: np.ndarray) -> list[float]:
    return [float(v) for v in values if not math.isnan(v)]


def _l2_norm(values):
    kept = _kept(values)
    return math.sqrt(math.fsum(v * v for v in kept)) if kept else math.nan


def _sum(values):
    kept = _kept(values)
    return math.fsum(kept) if kept else math.nan


def _mean(values):
    kept = _kept(values)
    return math.fsum(kept) / len(kept) if kept else math.nan


def _max(values):
    kept = _kept(values)
    return max(kept) if kept else math.nan


def _absmax(values):
    best = math.nan
    for v in _kept(values):  # the first of equal magnitudes wins
        if math.isnan(best) or abs(v) > abs(best):
            best = v
    return best


def _scaled(values, total):
    # NaN entries stay NaN; a slice whose scale is 0 (all zero) stays as it is
    return [v if (math.isnan(v) or total == 0) else v / total for v in values]


def _normalize(values):
    kept = _kept(values)
    return _scaled(values, math.fsum(abs(v) for v in kept) if kept else math.nan)


def _rescale(values):
    kept = _kept(values)
    return _scaled(values, max(abs(v) for v in kept) if kept else math.nan)


REFERENCES = {
    "l2_norm": (ax.l2_norm, _l2_norm),
    "sum": (ax.sum, _sum),
    "mean": (ax.mean, _mean),
    "max": (ax.max, _max),
    "absmax": (ax.absmax, _absmax),
    "normalize": (ax.normalize, _normalize),
    "rescale": (ax.rescale, _rescale),
}
KEEPS_DIM = ("normalize", "rescale")
DIMS = ("example", "target", "source", "hidden")


def reference(values: np.ndarray, axis: int, fn) -> np.ndarray:
    """``fn`` applied to every 1-D slice along ``axis`` with a plain loop over the others."""
    moved = np.moveaxis(values, axis, -1)
    out = None
    for index in np.ndindex(*moved.shape[:-1]):
        result = np.asarray(fn(moved[index]), dtype=np.float64)
        if out is None:
            out = np.empty(moved.shape[:-1] + result.shape)
        out[index] = result
    return np.moveaxis(out, -1, axis) if out.ndim == values.ndim else out


def scattered(dim: str, seed: int = 0) -> xr.DataArray:
    """4-D array, ~30% NaN at random places; along ``dim``: an all-NaN slice, an all-zero slice,
    a zero slice with one NaN, and a slice with a single value."""
    rng = np.random.default_rng(seed)
    shape = (3, 4, 5, 6)
    values = rng.standard_normal(shape)
    values[rng.random(shape) < 0.3] = np.nan
    axis = DIMS.index(dim)
    moved = np.moveaxis(values, axis, -1)  # a view: writes go to ``values``
    n = moved.shape[-1]
    cells = [tuple(rng.integers(0, m) for m in moved.shape[:-1]) for _ in range(4)]
    while len(set(cells)) < 4:
        cells = [tuple(rng.integers(0, m) for m in moved.shape[:-1]) for _ in range(4)]
    moved[cells[0]] = np.nan
    moved[cells[1]] = 0.0
    moved[cells[2]] = 0.0
    moved[cells[2] + (int(rng.integers(0, n)),)] = np.nan
    moved[cells[3]] = np.nan
    moved[cells[3] + (int(rng.integers(0, n)),)] = -2.5
    coords = {d: np.arange(m) + 10 * i for i, (d, m) in enumerate(zip(DIMS, shape, strict=True))}
    coords["source_token"] = ("source", np.array([f"t{i}" for i in range(shape[2])]))
    coords["label"] = (("example", "target"), rng.integers(0, 9, shape[:2]))
    return xr.DataArray(values, dims=DIMS, coords=coords, attrs={"method": "x"}, name="a")


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("name", list(REFERENCES))
def test_scattered_nan_equals_plain_reference(name, dim):
    fn, ref = REFERENCES[name]
    da = scattered(dim, seed=DIMS.index(dim))
    want = reference(da.values, DIMS.index(dim), ref)
    got = fn(da, dim)
    assert np.isnan(da.values).any(axis=DIMS.index(dim)).any()  # the NaN reach the reduced slices
    assert got.shape == want.shape
    assert np.array_equal(np.isnan(got.values), np.isnan(want)), "NaN pattern differs"
    np.testing.assert_allclose(got.values, want, rtol=1e-12, atol=1e-12)
    # float32 in, float32 arithmetic: same up to its rounding
    got32 = fn(da.astype(np.float32), dim)
    assert got32.dtype == np.float32  # mean's int count made it float64 until 2026-12-06
    assert np.array_equal(np.isnan(got32.values), np.isnan(want))
    np.testing.assert_allclose(got32.values, want, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("name", REFERENCES)
def test_only_the_named_dim_is_reduced(name, dim):
    fn = REFERENCES[name][0]
    da = scattered(dim, seed=5)
    got = fn(da, dim)
    if name in KEEPS_DIM:
        assert got.dims == da.dims and got.shape == da.shape
        kept = da.coords
    else:
        assert got.dims == tuple(d for d in DIMS if d != dim)
        kept = da.drop_vars([c for c in da.coords if dim in da[c].dims]).coords
        assert dim not in got.coords
    # every other dim keeps its labels and its non-index coords, untouched
    assert set(got.coords) == set(kept)
    for name_ in kept:
        xr.testing.assert_identical(got[name_].variable, kept[name_].variable)
    assert got.attrs["method"] == "x" and got.name == "a"
    # the result does not depend on where the dim sits: transposing commutes with the reduction
    order = tuple(reversed(DIMS))
    moved = fn(da.transpose(*order), dim)
    xr.testing.assert_allclose(moved.transpose(*got.dims), got, rtol=1e-12, atol=1e-12)
    # and a slice along another dim is the reduction of that slice
    other = next(d for d in DIMS if d != dim)
    part = fn(da.isel({other: [1]}), dim)
    xr.testing.assert_allclose(part, got.isel({other: [1]}), rtol=1e-12, atol=1e-12)


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
    # a reduction first gets a model's call: named, not a raw TypeError (until 2026-12-05)
    wrong = ax.pipe(ax.l2_norm, ax.saliency)
    with pytest.raises(
        ax.OptionError, match=r"first function, l2_norm, is a reduction .*got str, str"
    ):
        wrong("model", "1 2 3 =")
    with pytest.raises(ax.OptionError, match=r"first function, .* is a reduction"):
        ax.pipe(ax.normalize("source"))(da, "more")


def test_reductions_on_a_dataset(da):
    ds = xr.Dataset({"a": da, "b": da.isel(hidden=0, drop=True)})
    out = ax.l2_norm(ds)
    assert out["a"].dims == ("target", "source")
    xr.testing.assert_identical(out["b"], ds["b"])


def test_reductions_of_a_dataset_record_themselves():
    """The reduced variable and the Dataset record the reductions (a Dataset's map put back the
    old attrs until 2026-12-06); a variable without the dim keeps its own."""
    attribution = xr.DataArray(
        np.ones((2, 3, 4)), dims=("target", "source", "hidden"), attrs={"reductions": "first"}
    )
    score = xr.DataArray(np.ones(2), dims="target", attrs={"score": "probability"})
    ds = xr.Dataset({"attribution": attribution, "probability": score}, attrs={"method": "m"})
    out = ax.normalize(ax.l2_norm(ds))
    want = "first;l2_norm(hidden);normalize(source)"
    assert out["attribution"].attrs["reductions"] == want
    assert out.attrs == {"method": "m", "reductions": "l2_norm(hidden);normalize(source)"}
    assert out["probability"].attrs == {"score": "probability"}
    np.testing.assert_allclose(out["attribution"].values, 1 / 3)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16])
def test_narrow_integers_do_not_wrap_around(dtype):
    values = np.array([[100, 5, 0], [-128 if dtype != np.uint8 else 200, 3, 1]], dtype=dtype)
    da = xr.DataArray(values, dims=("source", "hidden"))
    wide = values.astype(np.float64)  # the reference: plain float64 arithmetic
    np.testing.assert_allclose(ax.l2_norm(da).values, np.sqrt((wide**2).sum(-1)))
    np.testing.assert_allclose(ax.absmax(da).values, wide[np.arange(2), np.abs(wide).argmax(-1)])
    row = xr.DataArray(values[1], dims="source")
    np.testing.assert_allclose(ax.normalize(row).values, wide[1] / np.abs(wide[1]).sum())
    np.testing.assert_allclose(ax.rescale(row).values, wide[1] / np.abs(wide[1]).max())


def test_a_chain_of_reductions_takes_a_dataset_and_names_its_steps():
    values = np.arange(6.0).reshape(2, 3)
    ds = xr.Dataset({"a": xr.DataArray(values, dims=("target", "source"))})
    chain = ax.pipe(ax.sum("source"), ax.normalize("target"))
    assert chain.__name__ == "pipe(sum(source), normalize(target))"
    sums = values.sum(-1)
    np.testing.assert_allclose(chain(ds)["a"].values, sums / np.abs(sums).sum())
    with pytest.raises(ax.OptionError, match=r"sum\(source\), is a reduction"):
        chain("not an array")


def test_float16_sums_do_not_overflow():
    # 4 * 300**2 is past float16's 65504: the reductions compute in float32
    values = np.full((2, 4), 300, dtype=np.float16)
    da = xr.DataArray(values, dims=("source", "hidden"))
    np.testing.assert_allclose(ax.l2_norm(da).values, [600.0, 600.0])
    row = xr.DataArray(np.full(300, 300, dtype=np.float16), dims="source")
    np.testing.assert_allclose(ax.normalize(row).values, 1 / 300, rtol=1e-6)


def test_absmax_of_a_lazily_loaded_result_equals_a_plain_loop(tmp_path):
    # a chunked (dask) array cannot be indexed by argmax's lazy result: absmax picks by a mask
    pytest.importorskip("dask")
    rng = np.random.default_rng(3)
    values = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)
    values[0, :, 4] = np.nan  # padding
    values[1, 2, 1, 3] = -values[1, 2, 1].__abs__().max() - 1  # a negative winner
    values[2, 0, 0, :2] = 7.0  # a tie: the first wins
    da = xr.DataArray(values, dims=("example", "target", "source", "hidden"), name="attribution")
    path = ax.save(da, tmp_path / "r.nc")
    lazy = ax.load(path, chunks={"example": 1})
    want = np.full(values.shape[:-1], np.nan)
    for idx in np.ndindex(*values.shape[:-1]):
        row = values[idx]
        if not np.isnan(row).all():
            want[idx] = row[np.nanargmax(np.abs(row))]
    np.testing.assert_array_equal(ax.absmax(lazy).compute().values, want)
    np.testing.assert_array_equal(ax.absmax(da).values, want)


def test_reductions_do_not_modify_input(da):
    before = da.copy(deep=True)
    ax.normalize(ax.l2_norm(da))
    xr.testing.assert_identical(da, before)


def test_a_dataset_without_the_dim_is_an_error(da):
    with pytest.raises(ax.OptionError, match=r"sum: `dim` 'nope' is not a dim of any variable"):
        ax.sum(xr.Dataset({"a": da}), "nope")
    with pytest.raises(ax.OptionError, match=r"`dim` 'hidden'"):
        ax.l2_norm(xr.Dataset({"a": da.isel(hidden=0, drop=True)}))


@pytest.mark.parametrize(
    "name", ["l2_norm", "sum", "mean", "max", "absmax", "normalize", "rescale"]
)
def test_empty_dims_and_strings_are_input_errors(name):
    empty = xr.DataArray(np.zeros((2, 0)), dims=("source", "hidden"))
    with pytest.raises(ax.InputError, match=rf"{name}: `dim` 'hidden' has length 0"):
        getattr(ax, name)(empty, "hidden")
    words = xr.DataArray(np.array([["a", "bb"]]), dims=("source", "hidden"))
    with pytest.raises(ax.InputError, match=rf"{name}: `da` must hold numbers.*<U2"):
        getattr(ax, name)(words, "hidden")
