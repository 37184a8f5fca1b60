"""Dataset runs: shards, manifest, resuming after a SIGKILL with nothing lost or duplicated."""

from __future__ import annotations

import copy
import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

import attrax as ax
from attrax import _dataset as D
from attrax._default_model_task import make_example
from attrax.cli import main

# Runs the CLI in a child that SIGKILLs itself right after shard 1 is on disk, before the manifest
# lists it: the worst moment, a complete shard file that the run never recorded.
KILLED_RUN = """
import os, signal, sys
import attrax.io
save = attrax.io.save
def save_then_die(obj, path, **kw):
    out = save(obj, path, **kw)
    if str(path).endswith("shard-00001.nc"):
        os.kill(os.getpid(), signal.SIGKILL)
    return out
attrax.io.save = save_then_die
from attrax.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def model(default_model) -> ax.Model:
    return default_model


def _records(n: int, seed: int = 3) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        # lengths differ, so shards have different target/source widths to pad
        prompt, continuation = make_example(rng, n_digits=rng.randint(4, 6))
        record = {"input": prompt, "target": continuation}
        if i % 3 != 1:
            record["id"] = f"r{i}"
        out.append(record)
    return out


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path, model, write_jsonl):
    records = _records(7)
    data = write_jsonl([*records[:3], "", *records[3:]])  # a blank line after the third
    args = ["attribute-dataset", "--data", str(data), "--shard-size", "2", "--quiet"]
    reference = tmp_path / "reference"
    assert main([*args, "--out", str(reference)]) == 0

    out = tmp_path / "run"
    child = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # the same threads as here: same floats
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["done"] == ["shard-00000.nc"]
    assert (out / "shard-00001.nc").exists()
    (out / ".shard-00002.nc.0123456789ab.tmp").write_bytes(b"half a file")  # a kill mid-write
    with pytest.raises(ax.InputError, match=r"unfinished \(1/4 shards\)"):
        D.load_dataset_results(out)
    assert D.load_dataset_results(out, partial=True).example.values.tolist() == [0, 1]

    assert main([*args, "--out", str(out)]) == 0
    assert not list(out.glob(".*.tmp"))
    got, expected = D.load_dataset_results(out), D.load_dataset_results(reference)
    xr.testing.assert_identical(got, expected)
    # line 3 is blank: example coordinates are line numbers, each record exactly once
    assert got.example.values.tolist() == [0, 1, 2, 4, 5, 6, 7]
    assert got.id.values.tolist() == ["r0", "", "r2", "r3", "", "r5", "r6"]
    assert got.dims == ("example", "target", "source")
    # every record's array is what a direct call gives, up to the batch padding, in its line's
    # place (the resumed shards and those after the blank line too), and NaN outside its own
    # targets and sources: the two runs share the padding code, a direct call does not
    for line in got.example.values.tolist():
        prompt, continuation = _pair(data, line)
        raw = ax.saliency(model, prompt, continuation)
        # the run's default reduction, by xarray here: L2 over hidden, then L1-normalized rows
        norm = np.sqrt((raw**2).sum("hidden", min_count=1))
        direct = norm / abs(norm).sum("source", min_count=1)
        row = got.sel(example=line)
        record = row.sel(target=direct.target, source=direct.source)
        assert record.source_token.values.tolist() == direct.source_token.values.tolist()
        assert record.target_token.values.tolist() == direct.target_token.values.tolist()
        np.testing.assert_allclose(record.values, direct.values, rtol=1e-5, atol=1e-7)
        assert int(row.notnull().sum()) == int(direct.notnull().sum()), line


def _pair(data: Path, line: int) -> tuple[str, str]:
    record = json.loads(data.read_text().splitlines()[line])
    return record["input"], record["target"]


def test_a_changed_run_is_refused(tmp_path, model, write_jsonl):
    data = write_jsonl(_records(3))
    out = tmp_path / "out"
    run = D.attribute_dataset(model, data, out, shard_size=2, progress=False)
    assert (run.records, run.shards, run.skipped) == (3, 2, 0)
    again = D.attribute_dataset(model, data, out, shard_size=2, progress=False)
    assert again.skipped == 2
    (out / "shard-00000.nc").unlink()  # listed as done, but gone: recomputed
    assert D.attribute_dataset(model, data, out, shard_size=2, progress=False).skipped == 1
    assert D.load_dataset_results(out).sizes["example"] == 3
    with pytest.raises(ax.InputError, match=r"option objective: was 'probability', now 'logit'\)"):
        D.attribute_dataset(model, data, out, shard_size=2, progress=False, objective="logit")
    with pytest.raises(ax.InputError, match="shard_size: was 2, now 3"):
        D.attribute_dataset(model, data, out, shard_size=3, progress=False)
    write_jsonl(_records(3, seed=4))
    with pytest.raises(ax.InputError, match="data file: was 3 records"):
        D.attribute_dataset(model, data, out, shard_size=2, progress=False)


def test_a_checkpoint_saved_over_the_model_directory_is_another_run(tmp_path, write_jsonl):
    """A resumed run reads the model's directory again: new weights saved there are another
    model, refused (it resumed, mixing the two models' rows, until 2026-12-05). The same files
    copied elsewhere and back resume."""
    from attrax.testing import tiny_model

    data = write_jsonl([{"input": "The capital of France is", "target": " Paris"}] * 3)
    hf, tok = tiny_model("gpt2")
    directory, out = tmp_path / "m", tmp_path / "out"
    hf.save_pretrained(directory)
    tok.save_pretrained(directory)
    D.attribute_dataset(directory, data, out, shard_size=2, progress=False)
    (out / "shard-00001.nc").unlink()  # unfinished
    with torch.no_grad():
        hf.lm_head.weight.mul_(2.0)
    hf.save_pretrained(directory)
    with pytest.raises(ax.InputError, match=r"model files: was sha256 \w{12}, now sha256"):
        D.attribute_dataset(directory, data, out, shard_size=2, progress=False)
    with torch.no_grad():
        hf.lm_head.weight.mul_(0.5)
    hf.save_pretrained(directory)  # the first weights again: the same run
    assert D.attribute_dataset(directory, data, out, shard_size=2, progress=False).skipped == 1


def _log_probability(logits, ids):
    return torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]


def test_a_function_or_tensor_option_is_recorded_by_what_it_is(tmp_path, model, write_jsonl):
    """A function objective resumes (recorded by its name and code: its repr's memory address
    changed between processes, so no run resumed, until 2026-12-05); a tensor baseline is
    recorded by its contents (its repr cut a large tensor short: another with the same edges
    resumed the run)."""
    data = write_jsonl([{"input": "3 1 4 0 5 9 =", "target": " 9 5 0 4 1 3"}] * 3)
    kw = {"shard_size": 2, "progress": False}
    D.attribute_dataset(model, data, tmp_path / "f", objective=_log_probability, **kw)
    (tmp_path / "f" / "shard-00001.nc").unlink()
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert "tests.test_dataset._log_probability " in manifest["run"]["options"]["objective"]
    again = D.attribute_dataset(model, data, tmp_path / "f", objective=_log_probability, **kw)
    assert again.skipped == 1
    base = torch.zeros(1, 13, model.hidden_size)
    D.attribute_dataset(
        model, data, tmp_path / "t", method="integrated_gradients", baseline=base, **kw
    )
    (tmp_path / "t" / "shard-00001.nc").unlink()
    other = base.clone()
    other[0, 6, 5] = 1.0  # inside what a repr shows as "..."
    assert repr(other) == repr(base)
    with pytest.raises(ax.InputError, match=r"option baseline: was 'tensor \(1, 13, 128\) float32"):
        D.attribute_dataset(
            model, data, tmp_path / "t", method="integrated_gradients", baseline=other, **kw
        )


def test_a_default_given_explicitly_is_the_same_run(tmp_path, model, monkeypatch, write_jsonl):
    data = write_jsonl(_records(3))
    out = tmp_path / "out"
    ig = {"method": "integrated_gradients", "progress": False, "shard_size": 2}
    assert D.attribute_dataset(model, data, out, **ig, steps=4).skipped == 0
    with pytest.raises(ax.InputError, match="option steps: was 4, now 50"):
        D.attribute_dataset(model, data, out, **ig)
    with pytest.raises(
        ax.InputError, match=r"\(method: was 'integrated_gradients', now 'saliency'\): resume"
    ):
        D.attribute_dataset(model, data, out, **{**ig, "method": "saliency"})
    out = tmp_path / "defaults"
    D.attribute_dataset(model, data, out, **ig)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["run"]["options"]["steps"] == 50  # resolved: the defaults are recorded
    assert (
        D.attribute_dataset(model, data, out, **ig, steps=50, objective="probability").skipped == 2
    )
    # a manifest from before: the options given only, `batch_size` for the shard size
    manifest["run"]["options"] = {}
    manifest["run"]["batch_size"] = manifest["run"].pop("shard_size")
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert D.attribute_dataset(model, data, out, **ig, steps=50).skipped == 2
    assert "shard_size" in json.loads((out / "manifest.json").read_text())["run"]


def test_a_listed_shard_that_does_not_read_back_is_recomputed(tmp_path, model, write_jsonl):
    data = write_jsonl(_records(3))
    out = tmp_path / "out"
    D.attribute_dataset(model, data, out, shard_size=2, progress=False)
    expected = D.load_dataset_results(out)
    shard = out / "shard-00000.nc"
    shard.write_bytes(shard.read_bytes()[:200])  # truncated after the manifest listed it
    assert D.attribute_dataset(model, data, out, shard_size=2, progress=False).skipped == 1
    xr.testing.assert_identical(D.load_dataset_results(out), expected)


def test_a_shard_size_is_not_a_method_batch_size(tmp_path, model, write_jsonl):
    data = write_jsonl(_records(3))
    out = tmp_path / "out"
    run = D.attribute_dataset(
        model, data, out, method="smoothgrad", samples=4, batch_size=2, progress=False
    )
    assert run.shards == 1  # 8 records a shard by default
    assert '"batch_size": 2' in D.load_dataset_results(out).attrs["options"]
    with pytest.raises(ax.OptionError, match="occlusion does not take `chunk_size`"):
        D.attribute_dataset(
            model, data, tmp_path / "x", method="occlusion", chunk_size=2, progress=False
        )
    with pytest.raises(ax.OptionError, match="`shard_size` must be a positive integer"):
        D.attribute_dataset(model, data, tmp_path / "x", shard_size=0, progress=False)


@pytest.mark.parametrize(
    ("records", "match"),
    [
        (
            [{"input": "1 2 =", "target": " 2 1"}, {"input": "1 2 =", "target": "2 1"}],
            r"data\.jsonl line 2: `target` '2 1' does not continue the prompt",
        ),
        (
            [{"input": "1 2 =", "target": " 2 1"}] * 2 + [{"input": "1 2 =", "target": " 1" * 70}],
            r"data\.jsonl line 3: `input` \+ `target` have 3 \+ 70 tokens, more than the "
            "model's 64 positions",
        ),
        (
            [{"input": "1 2 ="}, {"input": "1 " * 60 + "="}],
            r"data\.jsonl line 2: `max_new_tokens` 20 does not fit `input`",
        ),
        # without a target too (until 2026-12-06 found by its shard, as `inputs[0]`)
        (
            [{"input": "1 2 ="}, {"input": "the cat"}],
            r"data\.jsonl line 2: `input` is nothing but unknown and special tokens",
        ),
    ],
)
def test_records_that_do_not_tokenize_fail_before_any_work(
    tmp_path, model, records, match, write_jsonl
):
    data = write_jsonl(records)
    out = tmp_path / "out"
    with pytest.raises(ax.InputError, match=match):
        D.attribute_dataset(model, data, out, shard_size=1, progress=False)
    assert not out.exists()


def test_positions_a_record_lacks_fail_with_its_line_before_any_shard(tmp_path, model, write_jsonl):
    """Target positions are checked against every record that gives its target before the
    first shard: a shorter record on line 2 failed as `inputs[0]` of its shard, after the first
    shard was written (until 2026-12-06)."""
    records = [
        {"input": "4 8 2 7 0 5 =", "target": " 5 0 7 2 8 4"},  # targets at 7..12
        {"input": "1 2 3 =", "target": " 3"},  # at 4
    ]
    data, out = write_jsonl(records), tmp_path / "out"
    with pytest.raises(ax.InputError, match=r"data\.jsonl line 2: `positions` contains 9, wh"):
        D.attribute_dataset(model, data, out, shard_size=1, progress=False, positions=[9])
    assert not out.exists()
    # counted from the end, every record has its last target
    D.attribute_dataset(model, data, out, shard_size=1, progress=False, positions=[-1])
    got = D.load_dataset_results(out)
    assert got.target.values.tolist() == [4, 12]


def test_what_only_a_shard_finds_names_the_records_line(tmp_path, model, write_jsonl):
    """Positions a generated target lacks, a corrupted input of another length: found when a
    shard runs, named by the file's line (until 2026-12-06 `inputs[1]` of a shard)."""
    records = [{"input": "4 8 2 7 0 5 ="}] * 3 + [{"input": "1 2 ="}]  # targets at 7..12, 3..8
    data = write_jsonl(records)
    with pytest.raises(
        ax.InputError, match=r"^data\.jsonl line 4: `positions` contains 12, .* of `in"
    ):
        D.attribute_dataset(model, data, tmp_path / "pos", shard_size=2, progress=False,
                            positions=[12], max_new_tokens=6)  # fmt: skip
    rows = [{"input": "1 2 3 =", "target": " 3 2 1", "corrupted": "1 2 4 ="}] * 2
    rows.append({"input": "1 2 3 =", "target": " 3 2 1", "corrupted": "1 2 4 4 ="})
    with pytest.raises(ax.InputError, match=r"^corrupted\.jsonl line 3: `corrupted` '1 2 4 4 =' "):
        D.attribute_dataset(
            model, write_jsonl(rows, name="corrupted.jsonl"), tmp_path / "ap",
            method="attribution_patching", shard_size=2, progress=False,
        )  # fmt: skip


def test_activation_patching_reads_each_records_corruption(tmp_path, model, write_jsonl):
    """A dataset run of activation patching takes each record's own ``corrupted``: its rows
    equal single calls."""
    rows = [
        {"input": "1 2 3 =", "target": " 3 2 1", "corrupted": "1 2 4 ="},
        {"input": "4 5 =", "target": " 5 4", "corrupted": "4 6 ="},
    ]
    out = tmp_path / "act"
    D.attribute_dataset(
        model, write_jsonl(rows), out, method="activation_patching", shard_size=1,
        progress=False, layers=1, objective="logit", reduce="sum:head,sum:layer",
    )  # fmt: skip
    got = D.load_dataset_results(out)
    assert json.loads(got.attrs["options"])["corrupted"] == "(each record's 'corrupted')"
    for e, row in enumerate(rows):
        want = ax.activation_patching(
            model, row["input"], row["target"], corrupted=row["corrupted"], layers=1,
            objective="logit",
        )  # fmt: skip
        want = want.sum(["head", "layer"], skipna=False)
        part = got.isel(example=e).sel(target=want.target, source=want.source)
        assert np.nanmax(np.abs(want.values)) > 1e-3
        np.testing.assert_allclose(part.values, want.values, rtol=1e-6, atol=1e-7)


def test_causal_tracing_reads_each_records_tokens_to_noise(tmp_path, model, write_jsonl):
    """A record's ``noise`` (a text in its input, or positions) names the tokens ROME's Gaussian
    noise corrupts; the rest of the noise is the run's ``GaussianNoise(tokens=None, ...)``."""
    rows = [
        {"input": "1 2 3 =", "target": " 3 2 1", "noise": "2 3"},
        {"input": "4 5 =", "target": " 5 4", "noise": [0]},
    ]
    out = tmp_path / "traced"
    noise = ax.GaussianNoise(samples=3, seed=2)
    D.attribute_dataset(
        model, write_jsonl(rows), out, method="activation_patching", shard_size=1,
        progress=False, corrupted=noise, site="residual", direction="denoising",
        reduce="sum:layer",
    )  # fmt: skip
    got = D.load_dataset_results(out)
    # the merged array's provenance: the records' tokens, not the first shard's
    recorded = json.loads(got.attrs["options"])["corrupted"]
    assert "(each record's 'noise')" in recorded and "scale=3.0, samples=3, seed=2" in recorded
    for e, tokens in enumerate(([1, 2], [0])):  # "2 3" is the 2nd and 3rd tokens of "1 2 3 ="
        row = rows[e]
        want = ax.activation_patching(
            model, row["input"], row["target"], site="residual", direction="denoising",
            corrupted=ax.GaussianNoise(tokens=tokens, samples=3, seed=2),
        ).sum("layer", skipna=False)  # fmt: skip
        part = got.isel(example=e).sel(target=want.target, source=want.source)
        assert np.nanmax(np.abs(want.values)) > 1e-4
        np.testing.assert_allclose(part.values, want.values, rtol=1e-6, atol=1e-8)
    # a shard whose records each give one position: one selection each, not one list for all
    ints = [{**rows[0], "noise": 1}, {**rows[1], "noise": 0}]
    D.attribute_dataset(
        model, write_jsonl(ints, name="ints.jsonl"), tmp_path / "ints",
        method="activation_patching", shard_size=2, progress=False, corrupted=noise,
        site="residual", direction="denoising", reduce="sum:layer",
    )  # fmt: skip
    for e, row in enumerate(ints):
        want = ax.activation_patching(
            model, row["input"], row["target"], site="residual", direction="denoising",
            corrupted=ax.GaussianNoise(tokens=[row["noise"]], samples=3, seed=2),
        ).sum("layer", skipna=False)  # fmt: skip
        part = D.load_dataset_results(tmp_path / "ints").isel(example=e)
        part = part.sel(target=want.target, source=want.source)
        # float32 forwards of other batch sizes: 1e-7 apart on an AVX2 CPU's kernels
        np.testing.assert_allclose(part.values, want.values, rtol=1e-4, atol=1e-6)
    bad = [{"input": "1 2 3 =", "target": " 3 2 1", "noise": "7"}]
    with pytest.raises(ax.InputError, match=r"^noise\.jsonl line 1: `noise` '7' is not a text"):
        D.attribute_dataset(
            model, write_jsonl(bad, name="noise.jsonl"), tmp_path / "bad",
            method="activation_patching", progress=False,
        )  # fmt: skip
    # found before any shard runs: nothing is written
    late = [*rows, {"input": "1 2 3 =", "target": " 3 2 1", "noise": "9"}]
    with pytest.raises(ax.InputError, match=r"^late\.jsonl line 3: `noise` '9' is not a text"):
        D.attribute_dataset(
            model, write_jsonl(late, name="late.jsonl"), tmp_path / "late",
            method="activation_patching", shard_size=1, progress=False,
        )  # fmt: skip
    assert not list((tmp_path / "late").glob("shard-*"))
    # a run of activation patching (whose `corrupted` has no default) resumes
    first = sorted(out.glob("shard-*.nc"))
    first[-1].unlink()
    D.attribute_dataset(
        model, write_jsonl(rows), out, method="activation_patching", shard_size=1,
        progress=False, corrupted=noise, site="residual", direction="denoising",
        reduce="sum:layer",
    )  # fmt: skip
    xr.testing.assert_identical(D.load_dataset_results(out), got)
    # to any other method 'noise' is a key like any other: a noise level, say
    levels = [{**row, "noise": 0.5} for row in rows]
    D.attribute_dataset(model, write_jsonl(levels), tmp_path / "sal", progress=False)
    assert D.load_dataset_results(tmp_path / "sal").sizes["example"] == 2
    both = [{**rows[0], "corrupted": "1 2 4 ="}]
    with pytest.raises(ax.InputError, match="give one of them"):
        D.attribute_dataset(
            model, write_jsonl(both), tmp_path / "both", method="activation_patching",
            progress=False,
        )  # fmt: skip


def test_generated_targets_and_reductions(tmp_path, model, write_jsonl):
    records = [{"input": p} for p in ("1 2 3 4 5 6 =", "4 5 6 7 8 9 =", "9 8 0 1 2 3 =")]
    data = write_jsonl(records)
    out = tmp_path / "out"
    D.attribute_dataset(
        model,
        data,
        out,
        method="input_x_gradient",
        reduce="sum,rescale",
        shard_size=2,
        progress=False,
        max_new_tokens=3,
    )
    da = D.load_dataset_results(out)
    assert da.attrs["reductions"] == "sum(hidden);rescale(source)"
    assert "id" not in da.coords
    assert da.sizes["example"] == 3
    assert da.sel(example=1).target_token.values.tolist() == ["9", "8", "7"]
    assert float(abs(da).max()) == pytest.approx(1.0)
    # the values too: a direct call's signed sum over hidden, rescaled (reduced here by xarray,
    # not by attrax's reductions), where every target is generated as in the run
    for line, record in enumerate(records):
        raw = ax.input_x_gradient(model, record["input"], max_new_tokens=3)
        summed = raw.sum("hidden", min_count=1)  # NaN (sources a target cannot see) stays NaN
        direct = summed / abs(summed).max("source")
        assert (direct < 0).any() and (direct > 0).any()
        got = da.sel(example=line, target=direct.target, source=direct.source)
        assert got.target_token.values.tolist() == direct.target_token.values.tolist()
        # values in [-1, 1]; a signed sum over hidden cancels, so batch padding's rounding
        # shows as ~1e-5 (float32)
        np.testing.assert_allclose(got.values, direct.values, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (['{"input": "1 2 ="}', "{oops"], "line 2: not valid JSON"),
        (['{"target": " 1"}'], "line 1 has no field 'input': its fields are \\['target'\\]"),
        (['{"input": "1 2 =", "target": " 2 1"}', '{"input": "1 2 ="}'], "1 of 2 records"),
        (['{"input": "1 2 =", "id": [1]}'], "'id' must be"),
        # failed after shards were written until 2026-12-05 (a save error, a tokenizer's)
        (
            ['{"input": "1 2 ="}', '{"input": "1 2 =", "id": "a\\u0000b"}'],
            "line 2: 'id' holds a NUL",
        ),
        (['{"input": "1 \\ud800 ="}'], "line 1: 'input' holds a lone surrogate"),
        (["", ""], "no records"),
    ],
)
def test_bad_data_is_reported_with_its_line(tmp_path, model, write_jsonl, lines, match):
    data = write_jsonl(lines)
    with pytest.raises(ax.InputError, match=match):
        D.attribute_dataset(model, data, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_one_writer_per_directory(tmp_path, model, write_jsonl):
    fcntl = pytest.importorskip("fcntl")
    data = write_jsonl(_records(1))
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ax.InputError, match="in use by another attrax process"):
            D.attribute_dataset(model, data, out, progress=False)


def test_reduce_specs():
    assert D.parse_reduce("auto") is None
    assert D.parse_reduce("none") == []
    assert D.parse_reduce("mean:head, normalize") == [("mean", "head"), ("normalize", None)]
    with pytest.raises(ax.OptionError, match="valid: l2_norm, sum"):
        D.parse_reduce("l2,normalize")
    with pytest.raises(ax.OptionError, match="reduction 'sum:' in 'sum:' names no dim"):
        D.parse_reduce("sum:")  # ran as sum over hidden until 2026-12-05
    with pytest.raises(ax.OptionError, match="available: saliency"):
        D.resolve_method("magic")


def test_dtype_loads_the_model_in_it_and_is_part_of_the_run(tmp_path, model, write_jsonl):
    data = write_jsonl(_records(2))
    half = D.attribute_dataset(None, data, tmp_path / "half", progress=False, dtype=torch.bfloat16)
    full = D.attribute_dataset(None, data, tmp_path / "full", progress=False)
    a, b = D.load_dataset_results(half.out), D.load_dataset_results(full.out)
    assert a.dtype == np.float32
    assert not np.array_equal(a.values, b.values, equal_nan=True)  # it did run in bfloat16
    np.testing.assert_allclose(a.values, b.values, atol=0.05)  # normalized rows, bfloat16 digits
    with pytest.raises(ax.InputError, match="dtype"):
        D.attribute_dataset(None, data, tmp_path / "half", progress=False)
    with pytest.raises(
        ax.OptionError, match=r"`dtype` torch\.float16 applies to a model given by path"
    ):
        D.attribute_dataset(model, data, tmp_path / "x", progress=False, dtype=torch.float16)
    # a model object's own dtype is the run's too: a resume in another mixed them, labelled
    # as one (until 2026-12-06)
    D.attribute_dataset(model, data, tmp_path / "object", progress=False)
    halved = ax.Model(copy.deepcopy(model.hf).to(torch.bfloat16), model.tokenizer, name=model.name)
    with pytest.raises(ax.InputError, match=r"holds another run \(model_dtype: was 'float32'"):
        D.attribute_dataset(halved, data, tmp_path / "object", progress=False)
    # a manifest from before the key resumes
    manifest = json.loads((tmp_path / "object" / "manifest.json").read_text())
    del manifest["run"]["model_dtype"]
    (tmp_path / "object" / "manifest.json").write_text(json.dumps(manifest))
    assert D.attribute_dataset(model, data, tmp_path / "object", progress=False).records == 2


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda m: m.pop("version"), "'version' must be 1, got None"),
        (lambda m: m.pop("run"), "'run' must be an object, got None"),
        (lambda m: m.pop("shards"), "'shards' must be a positive integer, got None"),
        (lambda m: m.update(shards=1), "'shards' is 1, but its run's 3 records in shards of 2"),
        (lambda m: m.update(done=[1, 2]), "'done' lists 1: expected names of its 2 shard files"),
        (lambda m: m.update(done=["shard-00007.nc"]), "'done' lists 'shard-00007.nc': expected"),
        (lambda m: m["done"].append("shard-00000.nc"), "'done' lists 'shard-00000.nc' twice"),
    ],
)
def test_a_damaged_manifest_is_named_on_resume_and_on_load(
    tmp_path, model, write_jsonl, damage, match
):
    data = write_jsonl(_records(3))
    out = tmp_path / "out"
    D.attribute_dataset(model, data, out, shard_size=2, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    damage(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    match = r"manifest\.json' is a damaged attrax dataset manifest: " + re.escape(match)
    with pytest.raises(ax.InputError, match=match):
        D.attribute_dataset(model, data, out, shard_size=2, progress=False)
    with pytest.raises(ax.InputError, match=match):  # never shards read twice or missing
        D.load_dataset_results(out)


def test_an_out_that_cannot_be_made_fails_before_the_model_loads(
    tmp_path, write_jsonl, monkeypatch, capsys
):
    data = write_jsonl(_records(1))

    def no_load(*args, **kwargs):  # the model given by path must not load
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(D, "load_model", no_load)
    with pytest.raises(ax.InputError, match=r"`out` '.*data\.jsonl/run' is not a directory: "):
        D.attribute_dataset(None, data, data / "run", progress=False)
    if Path("/proc/self").is_dir():  # a filesystem where no directory can be made
        with pytest.raises(ax.InputError, match="`out` '/proc/attrax-run': cannot create"):
            D.attribute_dataset(None, data, "/proc/attrax-run", progress=False)
    assert main(["attribute-dataset", "--data", str(data), "--out", str(data / "run")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_directories_a_failed_run_made_are_removed(tmp_path, model, write_jsonl):
    data = write_jsonl([{"input": "1 2 =", "target": "2 1"}])  # off a token boundary
    with pytest.raises(ax.InputError, match="does not continue the prompt"):
        D.attribute_dataset(model, data, tmp_path / "a" / "b" / "out", progress=False)
    assert not (tmp_path / "a").exists()


def test_a_run_its_first_shard_refused_leaves_nothing_and_blocks_nothing(
    tmp_path, model, write_jsonl
):
    """An option only the first shard's computation refuses: the run leaves no directory, and
    a manifest that lists no shard (a kill before the first) does not hold the corrected run
    back (until 2026-12-06 the rerun was "another run", its reduce 'sum:bogus')."""
    data, out = write_jsonl(_records(3)), tmp_path / "a" / "out"
    with pytest.raises(ax.OptionError, match="`dim` 'bogus' is not a dim"):
        D.attribute_dataset(model, data, out, reduce="sum:bogus", progress=False)
    assert not (tmp_path / "a").exists()
    # a manifest of another run that finished no shard, as a kill leaves it
    out.mkdir(parents=True)
    run = {"data": {"sha256": "0" * 64, "records": 3}, "model": "m", "method": "saliency",
           "reduce": "sum:bogus", "shard_size": 16, "options": {}}  # fmt: skip
    manifest = {"format": "attrax-dataset", "version": 1, "run": run, "data_path": str(data),
                "shards": 1, "done": []}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest))
    done = D.attribute_dataset(model, data, out, progress=False)
    assert (done.records, done.skipped) == (3, 0)
    assert json.loads((out / "manifest.json").read_text())["run"]["reduce"] == "auto"
    # one shard done: another run is refused, as ever
    with pytest.raises(ax.InputError, match="holds another run"):
        D.attribute_dataset(model, data, out, reduce="sum:bogus", progress=False)
    assert D.load_dataset_results(out).sizes["example"] == 3


def test_a_directory_of_someone_elses_shards_is_refused_and_left_as_it_was(
    tmp_path, model, write_jsonl
):
    """The refusal left its `.lock` in the user's directory (until 2026-12-06)."""
    data, out = write_jsonl(_records(1)), tmp_path / "theirs"
    out.mkdir()
    (out / "shard-00000.nc").write_text("keep")
    with pytest.raises(ax.InputError, match=r"holds shard files but no manifest\.json"):
        D.attribute_dataset(model, data, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.nc"]


def test_arguments_of_the_wrong_kind_are_named(tmp_path, model, write_jsonl):
    data, out = write_jsonl(_records(1)), tmp_path / "out"
    with pytest.raises(ax.ModelError, match=r"`model` must be an attrax Model, a path, .* got int"):
        D.attribute_dataset(3, data, out)
    with pytest.raises(ax.InputError, match="`data` must be a path, got int"):
        D.attribute_dataset(model, 3, out)
    with pytest.raises(ax.InputError, match="`out` must be a path, got int"):
        D.attribute_dataset(model, data, 3)
    # the manifest records the method by name: a function is refused, saying so
    with pytest.raises(
        ax.OptionError,
        match=r"`method` must be a method name such as 'saliency', got the function saliency: a "
        "run records its method by name",
    ):
        D.attribute_dataset(model, data, out, method=ax.saliency)
    with pytest.raises(ax.OptionError, match="`progress` must be True or False, got 'no'"):
        D.attribute_dataset(model, data, out, progress="no")
    with pytest.raises(ax.OptionError, match="`reduce` must be a reduce spec"):
        D.attribute_dataset(model, data, out, reduce=3)
    # an in-memory Model is not moved: a `device` it is not on is refused, not ignored
    with pytest.raises(ax.OptionError, match="`device` 'tpu' is not a device"):
        D.attribute_dataset(model, data, out, device="tpu")
    with pytest.raises(ax.OptionError, match="`device` 'meta' applies to a model given by path"):
        D.attribute_dataset(model, data, out, device="meta")
    assert not out.exists()
    assert D.attribute_dataset(model, data, out, device="cpu", progress=False).shards == 1


def test_each_record_is_explained_against_its_own_contrast(tmp_path, model, write_jsonl):
    # a 'contrast' field (until 2026-12-06 only one `contrast` option, which a list of records
    # refused): every record's target against its own text, in shards of the batch
    rows = [
        {"input": "1 2 3 4 5 6 =", "target": " 6 5 4 3 2 1", "contrast": " 1 1 1 1 1 1"},
        {"input": "3 1 4 1 5 9 =", "target": " 9 5 1 4 1 3", "contrast": " 2 2 2 2 2 2"},
        {"input": "2 7 1 8 =", "target": " 8 1 7 2", "contrast": " 3 3 3 3"},
    ]
    data = write_jsonl(rows)
    D.attribute_dataset(model, data, tmp_path / "run", reduce="l2_norm", shard_size=2,
                        progress=False)  # fmt: skip
    got = D.load_dataset_results(tmp_path / "run")
    assert "contrast_id" in got.coords
    for line, row in enumerate(rows):  # assertions only: one check per record
        alone = ax.l2_norm(
            ax.saliency(model, row["input"], row["target"], contrast=row["contrast"])
        )
        plain = ax.l2_norm(ax.saliency(model, row["input"], row["target"]))
        mine = got.sel(example=line, target=alone.target, source=alone.source)
        assert mine.contrast_token.values.tolist() == alone.contrast_token.values.tolist()
        np.testing.assert_allclose(mine.values, alone.values, rtol=1e-4, atol=1e-7)
        assert not np.allclose(mine.values, plain.values, rtol=1e-2, equal_nan=True)
    # a record's contrast that does not align with its target: its line, before any shard
    bad = write_jsonl([rows[0], {**rows[1], "contrast": " 2 2"}], name="bad.jsonl")
    with pytest.raises(ax.InputError, match=r"line 2: `contrast` ' 2 2' has 2 tokens but the"):
        D.attribute_dataset(model, bad, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()
    some = write_jsonl([rows[0], {"input": "1 2 =", "target": " 2 1"}], name="some.jsonl")
    with pytest.raises(ax.InputError, match="1 of 2 records have a 'contrast'"):
        D.attribute_dataset(model, some, tmp_path / "some", progress=False)
    with pytest.raises(ax.OptionError, match="`contrast` is given both as an option and by"):
        D.attribute_dataset(model, data, tmp_path / "both", contrast=" 1", progress=False)
    with pytest.raises(ax.OptionError, match="records give a 'contrast' but attention takes no"):
        D.attribute_dataset(model, data, tmp_path / "att", method="attention", progress=False)
    same = write_jsonl([{**rows[0], "contrast": rows[0]["target"]}], name="same.jsonl")
    with pytest.raises(ax.InputError, match=r"line 1: `contrast` .* is the target itself"):
        D.attribute_dataset(model, same, tmp_path / "same", progress=False)
    # one text as an option for every record: what to give instead
    plain_data = write_jsonl([{k: v for k, v in r.items() if k != "contrast"} for r in rows[:2]],
                             name="plain.jsonl")  # fmt: skip
    with pytest.raises(ax.InputError, match="give each record its own as a 'contrast' field"):
        D.attribute_dataset(model, plain_data, tmp_path / "one", contrast=" 1 1 1 1 1 1",
                            progress=False)  # fmt: skip


def test_a_classifiers_records_give_contrast_classes(tmp_path, write_jsonl):
    from attrax.testing import tiny_classifier

    model = ax.load_model(*tiny_classifier("bert"))
    rows = [
        {"input": "the plot was good", "label": "label_1", "target": "label_1", "contrast": 0},
        {"input": "a dull film", "label": "label_2", "target": "label_2", "contrast": "label_1"},
    ]
    D.attribute_dataset(model, write_jsonl(rows), tmp_path / "run", reduce="l2_norm",
                        progress=False)  # fmt: skip
    got = D.load_dataset_results(tmp_path / "run")
    for line, row in enumerate(rows):  # assertions only: one check per record
        alone = ax.l2_norm(
            ax.saliency(model, row["input"], row["target"], contrast=row["contrast"])
        )
        mine = got.sel(example=line, target=alone.target).dropna("source", how="all")
        assert mine.contrast_class.values.tolist() == alone.contrast_class.values.tolist()
        np.testing.assert_allclose(mine.values, alone.values, rtol=1e-4, atol=1e-7)
    bad = write_jsonl([{**rows[0], "contrast": "label_1"}], name="bad.jsonl")
    with pytest.raises(ax.InputError, match="line 1: `contrast` 'label_1' is the target class"):
        D.attribute_dataset(model, bad, tmp_path / "bad", progress=False)
    bad = write_jsonl([{**rows[0], "contrast": 9}], name="nine.jsonl")
    with pytest.raises(ax.InputError, match="line 1: `contrast` 9 is not a class id"):
        D.attribute_dataset(model, bad, tmp_path / "nine", progress=False)


def test_a_whitespace_target_in_a_record_is_text(tmp_path, models, write_jsonl):
    """A record's "\\n" target was refused as empty until 2026-12-06, where ax.saliency takes it;
    a tokenizer that reads nothing in it still says so, naming the line."""
    gpt2 = models["gpt2"]
    data = write_jsonl([{"input": "The capital is", "target": "\n"}])
    run = D.attribute_dataset(gpt2, data, tmp_path / "out", progress=False)
    da = ax.load_dataset_results(run.out)
    want = gpt2.tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert [int(i) for i in da.target_id.values.ravel() if i >= 0] == want
    digits = write_jsonl([{"input": "1 2 3 =", "target": "\n"}], name="digits.jsonl")
    with pytest.raises(ax.InputError, match=r"digits\.jsonl line 1: .*has no tokens"):
        D.attribute_dataset(None, digits, tmp_path / "demo", progress=False)
