"""attrax.io: exact netCDF round trips, atomic writes, clear errors."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

import attrax as ax
from attrax import io
from tests._arrays import ALL, batch, dataset, encoder_decoder, single


def assert_same(a: xr.DataArray | xr.Dataset, b: xr.DataArray | xr.Dataset) -> None:
    """assert_identical plus what it does not check: types, dtypes and index kinds."""
    assert type(a) is type(b)
    xr.testing.assert_identical(a, b)
    if isinstance(a, xr.DataArray):
        assert a.name == b.name
        assert a.dtype == b.dtype
    for name, var in a.variables.items() if isinstance(a, xr.Dataset) else a.coords.items():
        assert var.dtype == b[name].dtype, name
    assert {k: type(v) for k, v in a.xindexes.items()} == {
        k: type(v) for k, v in b.xindexes.items()
    }


@pytest.mark.parametrize("make", [*ALL.values(), dataset], ids=[*ALL, "dataset"])
def test_round_trip_is_exact(tmp_path: Path, make) -> None:
    obj = make()
    path = io.save(obj, tmp_path / "a.nc")
    assert path == tmp_path / "a.nc"
    loaded = io.load(path)
    assert_same(obj, loaded)


def test_round_trip_details(tmp_path: Path) -> None:
    da = batch()
    loaded = io.load(io.save(da, str(tmp_path / "b.nc")))
    assert loaded.dtype == np.float32
    assert np.isnan(loaded.values).sum() == np.isnan(da.values).sum() > 0
    assert loaded.source_token.dims == ("example", "source")
    assert loaded.source_token.values[0, -1] == ""  # padding survives as "", not NaN
    assert loaded.source_id.values[0, -1] == -1
    assert "Ġcafé" in loaded.source_token.values
    ed = io.load(io.save(encoder_decoder(), tmp_path / "ed.nc"))
    assert ed.indexes["source"].names == ["side", "position"]
    assert np.isnan(ed.sel(target=2, source=("target", 2)))  # nothing attributed to the future
    assert not np.isnan(ed.sel(target=2, source=("target", 1)))


@pytest.mark.parametrize("name", [None, "source", 3, "日本"])
def test_dataarray_names(tmp_path: Path, name) -> None:
    # "source" is also a coordinate name, which a naive to_dataset(name=...) cannot store.
    da = single().rename(name)
    assert_same(da, io.load(io.save(da, tmp_path / "n.nc")))


def test_dataset_with_multiindex_and_variable_attrs(tmp_path: Path) -> None:
    ed = encoder_decoder()
    ds = xr.Dataset(
        {"a": ed, "b": (ed * 2).assign_attrs(note="twice"), "c": ("target", np.arange(3))},
        attrs={"title": "Straße 日本 🙂", "empty": "", "vec": np.array([1.5, 2.5])},
    )
    assert_same(ds, io.load(io.save(ds, tmp_path / "d.nc")))


def test_object_and_fixed_width_strings_keep_their_dtype(tmp_path: Path) -> None:
    da = xr.DataArray(
        [1.0, 2.0],
        dims="source",
        coords={
            "source_token": ("source", np.array(["a", "日本🙂"], dtype=object)),
            "fixed": ("source", np.array(["x", "yz"], dtype="<U7")),
        },
    )
    loaded = io.load(io.save(da, tmp_path / "s.nc"))
    assert loaded.source_token.dtype == object
    assert loaded.fixed.dtype == np.dtype("<U7")
    assert_same(da, loaded)


def test_variable_width_strings_load_back_as_fixed_width(tmp_path: Path) -> None:
    """numpy's StringDType (pandas' string dtype, ``ax.stack_models``' model names until
    2026-12-06) saved, then failed to load: its dtype has no string to restore it by."""
    import pandas as pd

    variable = np.array(["p", "qr"], dtype=np.dtypes.StringDType())
    da = xr.DataArray(
        [1.0, 2.0],
        dims="model",
        coords={"model": pd.Index(["a", "bc"], dtype="str"), "tag": ("model", variable)},
    )
    loaded = io.load(io.save(da, tmp_path / "s.nc"))
    assert loaded.tag.values.tolist() == ["p", "qr"] and loaded.tag.dtype.kind == "U"
    assert loaded["model"].values.tolist() == ["a", "bc"]
    np.testing.assert_array_equal(loaded.values, da.values)


def test_half_precision_round_trips(tmp_path: Path) -> None:
    # netCDF has no float16; a half-precision model's attributions must still come back as such.
    da = single().astype(np.float16)
    loaded = io.load(io.save(da, tmp_path / "h.nc"))
    assert loaded.dtype == np.float16
    assert_same(da, loaded)


def test_reloaded_and_sliced_arrays_save_again(tmp_path: Path) -> None:
    # Encodings left from the first file (chunk sizes of the full array) must not leak.
    first = io.load(io.save(batch(), tmp_path / "a.nc"))
    part = first.isel(example=[1], source=slice(0, 3))
    assert_same(part, io.load(io.save(part, tmp_path / "b.nc")))


def test_compression_shrinks_big_arrays(tmp_path: Path) -> None:
    values = np.tile(np.linspace(0, 1, 500, dtype=np.float32), (400, 1))
    da = xr.DataArray(values, dims=("target", "source"))
    plain = io.save(da, tmp_path / "plain.nc", compress=False)
    packed = io.save(da, tmp_path / "packed.nc")
    best = io.save(da, tmp_path / "best.nc", compress=9)
    assert packed.stat().st_size < plain.stat().st_size / 4
    assert best.stat().st_size <= packed.stat().st_size
    for p in (plain, packed, best):
        assert_same(da, io.load(p))


@pytest.mark.parametrize("bad", [-1, 10, 2.5, "zlib"])
def test_bad_compress(tmp_path: Path, bad) -> None:
    with pytest.raises(ax.OptionError, match=r"`compress`"):
        io.save(single(), tmp_path / "x.nc", compress=bad)


def _failing_writer(self, path, *args, **kwargs):
    Path(path).write_bytes(b"partial garbage")
    raise RuntimeError("disk on fire")


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xr.Dataset, "to_netcdf", _failing_writer)
    # netCDF4's own RuntimeError (HDF5 on a full disk): one line naming the path, not a traceback
    with pytest.raises(ax.InputError, match=r"a\.nc'.*could not write it.*disk on fire"):
        io.save(single(), tmp_path / "a.nc")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_existing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = io.save(single(), tmp_path / "a.nc")
    before = path.read_bytes()
    monkeypatch.setattr(xr.Dataset, "to_netcdf", _failing_writer)
    with pytest.raises(ax.InputError):
        io.save(batch(), path)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]
    monkeypatch.undo()
    assert_same(single(), io.load(path))


def test_interrupt_mid_write_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(self, path, *args, **kwargs):
        Path(path).write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(xr.Dataset, "to_netcdf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        io.save(single(), tmp_path / "a.nc")
    assert list(tmp_path.iterdir()) == []


def test_loaded_file_is_closed(tmp_path: Path) -> None:
    path = io.save(single(), tmp_path / "a.nc")
    first = io.load(path)
    if Path("/proc/self/fd").is_dir():
        open_files = {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}
        assert str(path.resolve()) not in open_files
    io.save(batch(), path)  # overwrite the file we just read
    assert_same(batch(), io.load(path))
    assert_same(single(), first)  # nothing lazy still pointing at the old file
    path.unlink()
    assert not path.exists()


def test_plain_netcdf_files_load(tmp_path: Path) -> None:
    ds = xr.Dataset({"x": ("t", np.arange(3.0))}, coords={"t": [10, 20, 30]}, attrs={"a": 1})
    ds.to_netcdf(tmp_path / "plain.nc", engine="netcdf4")
    assert_same(ds, io.load(tmp_path / "plain.nc"))
    da = xr.DataArray(np.arange(4.0), dims="t")
    da.to_netcdf(tmp_path / "da.nc", engine="netcdf4")
    assert_same(da, io.load(tmp_path / "da.nc"))


def test_files_are_readable_by_plain_xarray(tmp_path: Path) -> None:
    path = io.save(single(), tmp_path / "a.nc")
    with xr.open_dataarray(path, engine="netcdf4") as da:
        np.testing.assert_array_equal(da.values, single().values)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ax.InputError, match=r"`path`.*is a directory"):
        io.load(tmp_path)
    with pytest.raises(ax.InputError, match=r"`path`.*does not exist"):
        io.load(tmp_path / "missing.nc")
    (tmp_path / "junk.nc").write_text("not netcdf")
    with pytest.raises(ax.InputError, match=r"`path`.*not a readable netCDF4 file"):
        io.load(tmp_path / "junk.nc")
    with pytest.raises(ax.InputError, match=r"`path` must be"):
        io.load(3)  # type: ignore[arg-type]


def test_save_errors(tmp_path: Path) -> None:
    da = single()
    with pytest.raises(ax.InputError, match=r"`path`.*is a directory"):
        io.save(da, tmp_path)
    with pytest.raises(ax.InputError, match=r"`path`.*does not exist"):
        io.save(da, tmp_path / "no" / "such" / "a.nc")
    with pytest.raises(ax.InputError, match=r"`obj` must be"):
        io.save(da.values, tmp_path / "a.nc")  # type: ignore[arg-type]
    with pytest.raises(ax.InputError, match=r"'flag'.*not netCDF-friendly"):
        io.save(da.assign_attrs(flag=True), tmp_path / "a.nc")
    with pytest.raises(ax.InputError, match=r"'cfg'.*not netCDF-friendly"):
        io.save(da.assign_attrs(cfg={"a": 1}), tmp_path / "a.nc")
    with pytest.raises(ax.InputError, match=r"'scale_factor'.*change the data"):
        io.save(da.assign_attrs(scale_factor=2.0), tmp_path / "a.nc")
    with pytest.raises(ax.InputError, match=r"`obj.name`"):
        io.save(da.rename(("a", "b")), tmp_path / "a.nc")
    # numbers that would load as dates (they did until 2026-12-05), on a coordinate too
    with pytest.raises(ax.InputError, match=r"'units' = 'days since 2000-01-01' reads as a time"):
        io.save(da.assign_attrs(units="days since 2000-01-01"), tmp_path / "a.nc")
    with pytest.raises(ax.InputError, match=r"'units' = 'seconds since start'"):
        io.save(
            da.assign_coords(target=da.target.assign_attrs(units="seconds since start")),
            tmp_path / "a.nc",
        )
    assert list(tmp_path.iterdir()) == []


def test_links_are_followed_and_what_is_no_file_refused(tmp_path: Path) -> None:
    """A symbolic link's target is the file written (the link stays); a FIFO (as a device
    such as /dev/null, which root's writes replaced until 2026-12-05) is refused."""
    da = single()
    real, link = tmp_path / "real.nc", tmp_path / "link.nc"
    real.write_bytes(b"old")
    link.symlink_to(real.name)
    io.save(da, link)
    assert link.is_symlink() and link.resolve() == real.resolve()
    xr.testing.assert_identical(io.load(real), da)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ax.InputError, match=r"`path` '.*fifo' is no regular file"):
        io.save(da, fifo)
    assert fifo.exists() and not fifo.is_file()


def test_unwritable_location_is_an_input_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(self, path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    with monkeypatch.context() as m:
        m.setattr(xr.Dataset, "to_netcdf", refused)
        with pytest.raises(ax.InputError, match=r"`path`.*cannot write.*Permission denied"):
            io.save(single(), tmp_path / "a.nc")
    assert list(tmp_path.iterdir()) == []
    if Path("/proc/self").is_dir():  # a real refusal, for root too
        with pytest.raises(ax.InputError, match=r"`path` '/proc/a.nc'"):
            io.save(single(), "/proc/a.nc")


def test_save_refuses_strings_that_netcdf_would_cut(tmp_path: Path) -> None:
    da = single()
    tokens = da.source_token.values.astype(object)
    tokens[1] = "a\x00b"
    with pytest.raises(ax.InputError, match=r"coordinate 'source_token' holds 'a\\x00b'"):
        io.save(da.assign_coords(source_token=("source", tokens)), tmp_path / "a.nc")
    fixed = tokens.astype(str)  # fixed width: the padding NULs are not the string's own
    with pytest.raises(ax.InputError, match=r"coordinate 'source_token'"):
        io.save(da.assign_coords(source_token=("source", fixed)), tmp_path / "a.nc")
    with pytest.raises(ax.InputError, match=r"`obj` holds"):
        io.save(xr.DataArray(np.array(["ok", "\x00x"])), tmp_path / "a.nc")
    with pytest.raises(ax.InputError, match=r"'note'.*NUL"):
        io.save(da.assign_attrs(note="a\x00b"), tmp_path / "a.nc")
    assert list(tmp_path.iterdir()) == []
    short = xr.DataArray(np.array(["a", "bcd"]), dims="source")  # padded to <U3, saved as is
    assert_same(short, io.load(io.save(short, tmp_path / "s.nc")))


@pytest.mark.parametrize(
    "bad", ["foo", 2.5, True, 0, -2, (2, 3), [2], {1: 2}, {"target": "x"}, {"target": ()}]
)
def test_load_bad_chunks_is_an_option_error(tmp_path: Path, bad) -> None:
    pytest.importorskip("dask")
    path = io.save(single(), tmp_path / "a.nc")
    with pytest.raises(ax.OptionError, match=r"`chunks` must be"):
        io.load(path, chunks=bad)


def test_load_chunks_that_do_not_fit_the_file(tmp_path: Path) -> None:
    pytest.importorskip("dask")
    path = io.save(single(), tmp_path / "a.nc")
    with pytest.raises(ax.OptionError, match=r"`chunks` names dims \['nope'\]"):
        io.load(path, chunks={"nope": 2})
    with pytest.raises(ax.OptionError, match=r"`chunks` .* does not fit"):
        io.load(path, chunks={"target": (1,) * 8})
    assert io.load(path, chunks={"target": -1}).chunks[0] == (5,)


def test_staged_copy_to_host_is_exact(monkeypatch):
    # the GPU path copies through a small reused buffer, chunk by chunk; the chunking is the same
    # on the CPU (only the buffer is not pinned), so odd sizes and chunk boundaries are checked here
    from attrax import _memory as _label

    monkeypatch.setattr(_label, "_STAGE_BYTES", 1000)
    monkeypatch.setattr(_label, "_stages", {})
    for dtype in (torch.float32, torch.float64, torch.int64):
        x = (torch.randn(7, 13, 11) * 100).to(dtype)
        out = _label._staged_to_host(x[:, 1:])  # a non-contiguous view
        assert out.dtype == x.numpy().dtype
        np.testing.assert_array_equal(out, x[:, 1:].numpy())


def test_what_netcdf_cannot_store_or_name_is_an_input_error(tmp_path: Path) -> None:
    """Each raised netCDF4's, xarray's or the OS's own error until 2026-12-05 (a traceback)."""
    base = xr.DataArray([1.0, 2.0], dims="x")
    for da in (
        base.assign_attrs(a="b\ud800"),  # a lone surrogate
        xr.DataArray([1 + 2j], dims="x"),
        xr.DataArray([1.0], dims="a/b"),
        base.assign_attrs(n=2**70),
    ):
        with pytest.raises(ax.InputError, match=r"`obj` cannot be stored as netCDF4 \("):
            io.save(da, tmp_path / "a.nc")
    with pytest.raises(ax.InputError, match=r"File name too long"):
        io.save(base, tmp_path / ("x" * 300 + ".nc"))
    with pytest.raises(ax.InputError, match=r"is no UTF-8 text"):
        io.save(base, tmp_path / "bad\udcff.nc")
    assert list(tmp_path.iterdir()) == []


def test_a_name_of_another_format_is_refused(tmp_path: Path) -> None:
    """save to "r.json" wrote netCDF4 into it, ax.show to "a.png" HTML (until 2026-12-05)."""
    # the name suggested is the one given, in the format written ('x.nc' until 2026-12-06)
    with pytest.raises(ax.InputError, match=r"\.json, another format's: .*name it as 'r\.nc'"):
        io.save(single(), tmp_path / "r.json")
    with pytest.raises(ax.InputError, match=r"\.png, another format's: .*as 'same\.html'"):
        ax.show(single(), path=tmp_path / "same.png")
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_marker_is_an_input_error(tmp_path: Path) -> None:
    import netCDF4

    path = io.save(single(), tmp_path / "a.nc")
    with netCDF4.Dataset(path, "a") as f:
        f.setncattr("attrax_io", '{"kind": "DataArray", "dtypes": "abc"}')
    with pytest.raises(ax.InputError, match=r"corrupt 'attrax_io' attribute \(AttributeError"):
        io.load(path)
