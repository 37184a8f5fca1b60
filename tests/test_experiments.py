"""The experiment workflow's CLI and plot: ``attrax evaluate``, ``ax.plot`` of a summary table."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import attrax as ax
from attrax.cli import main

RECORDS = [
    {"text": "3 1 4 0 5 9 =", "answer": " 9 5 0 4 1 3", "why": [1, 1, 1, 1, 1, 1, 0]},
    {"text": "2 7 1 8 6 4 =", "answer": " 4 6 8 1 7 2", "why": [1, 1, 1, 1, 1, 1, 0]},
]


def _table() -> pd.DataFrame:
    columns = pd.MultiIndex.from_product(
        [["comprehensiveness", "auprc", "spearman"], ["mean", "low", "high"]],
        names=("metric", "stat"),
    )
    rows = [
        [0.5, 0.4, 0.6, 0.9, 0.85, 0.95, 0.2, 0.1, 0.3],
        [0.3, 0.1, 0.5, 0.7, 0.6, 0.8, 0.2, 0.1, 0.3],
    ]
    return pd.DataFrame(rows, pd.Index(["ig", "saliency"], name="method"), columns)


def test_plot_of_a_summary_table(tmp_path):
    fig = ax.plot(_table(), path=tmp_path / "t.png", title="methods")
    panels = [a for a in fig.axes if a.get_title()]
    # agreement has no better direction (it read "higher better" until 2026-12-06)
    assert [a.get_title() for a in panels] == [
        "comprehensiveness (higher better)",
        "auprc (higher better)",
        "spearman",
    ]
    # the error bars span each method's interval, centred where the table says
    bars = panels[0].containers[0]
    centres = bars.lines[0].get_xdata()
    np.testing.assert_allclose(centres, [0.5, 0.3])
    segments = bars.lines[2][0].get_segments()
    np.testing.assert_allclose([[s[0][0], s[1][0]] for s in segments], [[0.4, 0.6], [0.1, 0.5]])
    assert [t.get_text() for t in panels[0].get_yticklabels()] == ["ig", "saliency"]
    assert (tmp_path / "t.png").stat().st_size > 0
    with pytest.raises(ax.InputError, match=r"ax\.summary"):
        ax.plot(pd.DataFrame({"a": [1.0]}))


def test_a_mean_outside_its_bootstrap_interval_is_drawn(tmp_path):
    # a narrow bootstrap interval need not hold the sample mean: the bar stops at the mean
    table = _table()
    table.loc["ig", ("comprehensiveness", "low")] = 0.55  # above the mean 0.5
    fig = ax.plot(table, path=tmp_path / "t.png")
    bars = next(a for a in fig.axes if a.get_title()).containers[0]
    segments = bars.lines[2][0].get_segments()
    np.testing.assert_allclose([[s[0][0], s[1][0]] for s in segments], [[0.5, 0.6], [0.1, 0.5]])
    assert (tmp_path / "t.png").stat().st_size > 0


def test_cli_evaluate_equals_the_api(tmp_path, capsys, default_model):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    argv = ["evaluate", "--data", str(data), "--methods", "saliency,integrated_gradients"]
    argv += ["--steps", "8", "--metrics", "sufficiency,iou,spearman"]
    argv += ["--field", "input=text", "--field", "target=answer", "--field", "rationale=why"]
    argv += ["--out", str(tmp_path / "e.nc"), "--csv", str(tmp_path / "t.csv")]
    argv += ["--png", str(tmp_path / "t.png")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "integrated_gradi" in out and "sufficiency" in out
    import functools

    methods = {
        "saliency": ax.saliency,
        "integrated_gradients": functools.partial(ax.integrated_gradients, steps=8),
    }
    fields = {"input": "text", "target": "answer", "rationale": "why"}
    expected = ax.evaluate(
        default_model, data, methods, ["sufficiency", "iou", "spearman"], fields=fields
    )
    saved = ax.load(tmp_path / "e.nc")
    for metric in ("sufficiency", "iou", "spearman"):
        np.testing.assert_allclose(saved[metric].values, expected[metric].values, rtol=1e-5)
    table = pd.read_csv(tmp_path / "t.csv", header=[0, 1], index_col=0)
    np.testing.assert_allclose(
        table.to_numpy(), ax.summary(expected).to_numpy(), rtol=1e-5, equal_nan=True
    )
    assert (tmp_path / "t.png").exists()


def test_cli_evaluate_taucorr_loo(tmp_path, capsys, default_model):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    argv = ["evaluate", "--data", str(data), "--methods", "saliency,occlusion"]
    argv += ["--metrics", "taucorr_loo", "--field", "input=text", "--field", "target=answer"]
    assert main([*argv, "--out", str(tmp_path / "e.nc")]) == 0
    assert "taucorr_loo ↑" in capsys.readouterr().out
    methods = {"saliency": ax.saliency, "occlusion": ax.occlusion}
    fields = {"input": "text", "target": "answer"}
    want = ax.evaluate(default_model, data, methods, ["taucorr_loo"], fields=fields)
    got = ax.load(tmp_path / "e.nc")["taucorr_loo"]
    np.testing.assert_allclose(got.values, want["taucorr_loo"].values, rtol=1e-6)


def test_cli_evaluate_errors(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(RECORDS[0]) + "\n")
    base = ["evaluate", "--data", str(data), "--field", "input=text"]
    assert main([*base, "--methods", "nonsense"]) == 2
    assert "unknown method 'nonsense'" in capsys.readouterr().err
    assert main([*base, "--methods", "saliency", "--field", "inputs"]) == 2
    assert "--field" in capsys.readouterr().err
    # the flags, not the Python arguments (`metrics`, `methods`, `reduce` until 2026-12-06)
    assert main([*base, "--methods", "saliency", "--metrics", "speed"]) == 2
    assert "`--metrics` must be a non-empty list" in capsys.readouterr().err
    assert main([*base, "--methods", "saliency", "--metrics", "spearman"]) == 2
    assert "give `--methods` two or more" in capsys.readouterr().err
    assert main([*base, "--methods", "saliency", "--reduce", "sum:foo"]) == 2
    assert "`--reduce` 'sum:foo' on the attribution" in capsys.readouterr().err
    # a CSV given to attribute-dataset, which reads JSON Lines
    table = tmp_path / "data.csv"
    table.write_text("input,target\n1 2 =, 2 1\n")
    assert main(["attribute-dataset", "--data", str(table), "--out", str(tmp_path / "o")]) == 2
    assert "this reads JSON Lines, one record per line (evaluate reads CSV too)" in (
        capsys.readouterr().err
    )
    # no listed method takes --steps: it was dropped without a word
    assert main([*base, "--methods", "saliency,occlusion", "--steps", "8"]) == 2
    assert "`--steps 8` applies to none of --methods" in capsys.readouterr().err
    assert main([*base, "--methods", "saliency", "-o", "baseline=pad"]) == 2
    assert "`-o baseline='pad'` applies to none of --methods" in capsys.readouterr().err
    # one contrast for every record: how to give one per record (until 2026-12-06 "`contrast`
    # must match `inputs`", a Python argument the command line has not)
    data.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    assert main([*base, "--field", "target=answer", "--methods", "saliency",
                 "-o", "contrast= 1 1 1 1 1 1"]) == 2  # fmt: skip
    assert "`-o contrast=...` is one text for 2 records: give each record its own as a" in (
        capsys.readouterr().err
    )


def test_cli_evaluate_generates_with_max_new_tokens_and_takes_options(tmp_path, capsys):
    """Records without a target are generated with --max-new-tokens (a long prompt had no room
    for the default 20 and no flag to say fewer, until 2026-12-06); -o goes to every method
    that takes it, and the faithfulness metrics regenerate as the attributions did."""
    import functools

    model = ax.load_model()
    records = [{"input": "4 8 2 7 0 5 ="}, {"input": " ".join(["1"] * 50) + " ="}]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    argv = ["evaluate", "--data", str(data), "--methods", "saliency,integrated_gradients"]
    argv += ["--metrics", "sufficiency", "--out", str(tmp_path / "e.nc")]
    assert main(argv) == 2
    err = capsys.readouterr().err  # the record's line, and the flag to give (until 2026-12-06
    # `inputs[1]` of a batch, and a Python argument the command does not take)
    assert "`--max-new-tokens` 20 does not fit `input` of data.jsonl line 2" in err
    assert "pass --max-new-tokens 13 or fewer" in err
    assert main([*argv, "--max-new-tokens", "8", "-o", "baseline=pad", "--steps", "4"]) == 0
    methods = {
        "saliency": functools.partial(ax.saliency, max_new_tokens=8),
        "integrated_gradients": functools.partial(
            ax.integrated_gradients, max_new_tokens=8, baseline="pad", steps=4
        ),
    }
    want = ax.evaluate(model, records, methods, ["sufficiency"])
    got = ax.load(tmp_path / "e.nc")
    # the reversal's 6 digits and its end token, then the long prompt's 8 generated tokens
    assert got.target.values.tolist() == [*range(7, 14), *range(51, 59)]
    np.testing.assert_allclose(got["sufficiency"].values, want["sufficiency"].values, rtol=1e-6)


def test_cli_dataset_worker_options(tmp_path, capsys):
    base = ["attribute-dataset", "--data", "x.jsonl", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_:
        main([*base, "--workers", "0"])
    assert exit_.value.code == 2 and "positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([*base, "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"])
    assert exit_.value.code == 2 and "not allowed with" in capsys.readouterr().err


# --- evaluate on Dask distributed ----------------------------------------------------------------

# three records of two lengths: shards of different widths, joined with padding
DASK_RECORDS = [
    {"text": "3 1 4 0 5 9 =", "answer": " 9 5 0 4 1 3", "why": [1, 1, 1, 1, 1, 1, 0], "y": "a"},
    {"text": "2 7 1 =", "answer": " 1 7 2", "why": [0, 1, 1, 0], "y": "b"},
    {"text": "8 6 4 5 =", "answer": " 5 4 6 8", "why": [1, 0, 0, 1, 0], "y": "a"},
]
FIELDS = {"input": "text", "target": "answer", "rationale": "why", "label": "y"}


@pytest.fixture(scope="module")
def scheduler():
    """One 2-worker local cluster for the module's Dask tests (a start costs seconds)."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, dashboard_address=None, silence_logs=50
    ) as cluster:
        yield cluster.scheduler_address


def test_evaluate_on_a_cluster_equals_in_process(scheduler, default_model):
    import functools

    methods = {
        "saliency": "saliency",  # by name
        "ig": functools.partial(ax.integrated_gradients, steps=4),
        "norm": ax.pipe(ax.input_x_gradient, ax.normalize),
    }
    metrics = ["sufficiency", "iou", "spearman"]
    kwargs = {"fields": FIELDS, "attributions": True}
    serial = ax.evaluate(default_model, DASK_RECORDS, methods, metrics, **kwargs)
    dask = ax.evaluate(
        None, DASK_RECORDS, methods, metrics, scheduler=scheduler, shard_size=2, **kwargs
    )
    assert serial.sizes["source"] > 0 and np.isnan(serial["attribution"].values).any()
    _same(dask, serial)
    pd.testing.assert_frame_equal(ax.summary(dask), ax.summary(serial), rtol=1e-6)


def test_each_records_contrast_reaches_its_shard(scheduler, default_model):
    # a shard holds some records: each gets its own contrast there, not the first ones'
    contrasts = [" 1 1 1 1 1 1", " 2 2 2", " 3 3 3 3"]
    records = [{**r, "foil": c} for r, c in zip(DASK_RECORDS, contrasts, strict=True)]
    fields = {**FIELDS, "contrast": "foil"}
    kwargs = {"fields": fields, "attributions": True}
    methods = {"saliency": "saliency", "occlusion": "occlusion"}
    serial = ax.evaluate(default_model, records, methods, ["sufficiency"], **kwargs)
    dask = ax.evaluate(
        None, records, methods, ["sufficiency"], scheduler=scheduler, shard_size=2, **kwargs
    )
    _same(dask, serial)
    tokens = serial.contrast_token.values
    assert [set(row[row != ""]) for row in tokens] == [{"1"}, {"2"}, {"3"}]


def _same(a: xr.Dataset, b: xr.Dataset) -> None:
    """Coords, attrs, padding identical; values up to float32 rounding (a shard pads its batch
    to its own longest record, which changes the order of float sums, not the result)."""
    xr.testing.assert_identical(a.drop_vars(list(a.data_vars)), b.drop_vars(list(b.data_vars)))
    assert list(a.data_vars) == list(b.data_vars)
    for name in a.data_vars:
        assert a[name].dims == b[name].dims and a[name].dtype == b[name].dtype
        np.testing.assert_allclose(a[name].values, b[name].values, rtol=1e-5, atol=1e-6)


def test_cli_evaluate_on_a_cluster_equals_the_api(scheduler, tmp_path, monkeypatch):
    from attrax._default_model_task import DEFAULT_MODEL_PATH

    # a relative --model path: the workers get it absolute, the result names it as given
    monkeypatch.chdir(DEFAULT_MODEL_PATH.parent)
    model = DEFAULT_MODEL_PATH.name
    data = tmp_path / "data.csv"
    pd.DataFrame(DASK_RECORDS).drop(columns="why").to_csv(data, index=False)
    argv = ["evaluate", "--data", str(data), "--methods", "saliency,integrated_gradients"]
    argv += ["--steps", "4", "--metrics", "comprehensiveness,kendall", "--shard-size", "1"]
    argv += ["--field", "input=text", "--field", "target=answer", "--field", "label=y"]
    argv += ["--scheduler", scheduler, "--out", str(tmp_path / "e.nc"), "--model", model]
    assert main(argv) == 0
    import functools

    methods = {
        "saliency": ax.saliency,
        "integrated_gradients": functools.partial(ax.integrated_gradients, steps=4),
    }
    fields = {"input": "text", "target": "answer", "label": "y"}
    expected = ax.evaluate(model, data, methods, ["comprehensiveness", "kendall"], fields=fields)
    assert expected.attrs["model"] == model
    _same(ax.load(tmp_path / "e.nc"), expected)


def test_evaluate_dask_options_are_checked(tmp_path, default_model, capsys, monkeypatch):
    import threading

    pytest.importorskip("distributed")
    import functools

    methods = {"saliency": ax.saliency}
    with pytest.raises(ax.OptionError, match="in-memory Model"):
        ax.evaluate(default_model, DASK_RECORDS, methods, fields=FIELDS, workers=2)
    with pytest.raises(ax.OptionError, match="not both"):
        ax.evaluate(None, DASK_RECORDS, methods, workers=1, scheduler="tcp://127.0.0.1:1")
    with pytest.raises(ax.OptionError, match="`workers` must be a positive integer"):
        ax.evaluate(None, DASK_RECORDS, methods, workers=0)
    with pytest.raises(ax.OptionError, match="`shard_size` must be a positive integer"):
        ax.evaluate(None, DASK_RECORDS, methods, workers=2, shard_size=0)
    bare = [*DASK_RECORDS, {"text": "1 2 =", "answer": " 2 1", "y": "b"}]  # 3: no rationale
    with pytest.raises(ax.InputError, match="record 3 has no rationale"):
        ax.evaluate(None, bare, methods, ["iou"], fields=FIELDS, workers=2, shard_size=2)
    locked = functools.partial(ax.saliency, objective=threading.Lock())
    with pytest.raises(ax.OptionError, match=r"`methods\['locked'\]`.*does not pickle"):
        ax.evaluate(None, DASK_RECORDS, {"locked": locked}, workers=2)
    # the CLI: --workers reaches evaluate with the model as a path, never loaded here
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(RECORDS[0]) + "\n")
    base = ["evaluate", "--data", str(data), "--field", "input=text", "--methods", "saliency"]
    with pytest.raises(SystemExit) as exit_:
        main([*base, "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"])
    assert exit_.value.code == 2 and "not allowed with" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([*base, "--workers", "0"])
    assert exit_.value.code == 2 and "positive integer" in capsys.readouterr().err
    seen = {}

    def fake(model, data, methods, metrics, **options):  # type: ignore[no-untyped-def]
        seen.update(options, model=model)
        raise ax.InputError("stop here")

    monkeypatch.setattr("attrax._evaluate.evaluate", fake)
    assert main([*base, "--workers", "2", "--shard-size", "4", "--dtype", "bfloat16"]) == 2
    assert seen["model"] is None and (seen["workers"], seen["shard_size"]) == (2, 4)
    assert str(seen["dtype"]) == "torch.bfloat16" and seen["scheduler"] is None


def test_the_cli_table_turns_or_says_it_is_cropped_where_it_is_too_wide():
    """Eleven metrics at 80 columns showed every cell as `0.8…` without a word (until
    2026-12-06): metrics become the rows where that fits, and a table that fits neither way
    says it is cropped."""
    from rich.console import Console

    from attrax.cli import _summary_table

    metrics = ["comprehensiveness", "sufficiency", "taucorr_loo", "iou", "auprc", "spearman"]
    columns = pd.MultiIndex.from_product([metrics, ["mean", "low", "high"]])
    rng = np.random.default_rng(0)

    def printed(methods: list[str], width: int) -> str:
        table = pd.DataFrame(rng.random((len(methods), len(columns))), methods, columns)
        console = Console(width=width, record=True, highlight=False)
        console.print(_summary_table(table, console.width))
        return console.export_text()

    text = printed(["saliency", "integrated_gradients"], 80)
    assert "…" not in text and "cropped" not in text
    assert text.splitlines()[2].split("┃")[1].strip() == "metric"  # metrics are the rows
    assert "spearman " in text and "spearman ↑" not in text and "sufficiency ↓" in text
    assert "(cropped to the terminal's width" in printed([f"m{i}" for i in range(5)], 80)
    wide = printed(["saliency", "integrated_gradients"], 250)
    assert wide.splitlines()[2].split("┃")[1].strip() == "method"  # fits: methods as rows
