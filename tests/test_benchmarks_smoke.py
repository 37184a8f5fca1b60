"""The benchmark package without Captum or Inseq: parity arithmetic, the attrax adapter, the report.

The reference libraries are not needed: parity is checked against attrax's own reductions on the
tiny default model, and the report is rendered from the committed results.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from benchmarks import adapters, parity, report

import attrax as ax

BENCH = Path(report.__file__).resolve().parent


def _future_nan(a: np.ndarray, first: int) -> np.ndarray:
    a = a.copy()
    for j in range(a.shape[0]):
        a[j, first + j :] = np.nan
    return a


def test_parity_accepts_equal_and_rejects_different():
    rng = np.random.default_rng(0)
    b = _future_nan(rng.normal(size=(3, 7, 5)).astype(np.float32), 4)
    same = parity.parity(b.copy(), b, "saliency")
    assert same["ok"] and same["errors"]["l2_normalize"] == 0.0
    bad = parity.parity(b * np.float32(1 + 1e-3), b, "saliency")
    assert not bad["ok"] and any("sum" in f for f in bad["failures"])
    att = np.abs(b)
    assert not parity.parity(att * np.float32(1.01), att, "attention")["ok"]  # raw sees a scale
    holes = b.copy()
    holes[0, 0] = np.nan
    assert not parity.parity(holes, b, "saliency")["ok"]  # a different NaN pattern


def test_parity_sum_cancellation_uses_l1_scale():
    rng = np.random.default_rng(1)
    b = rng.normal(size=(2, 4, 6))
    b -= b.mean(-1, keepdims=True)  # sums over hidden are rounding noise, as for GPT-2 gradients
    res = parity.parity(b + rng.normal(size=b.shape) * 1e-9, b, "saliency")
    assert res["ok"], res
    assert "sum_plain" in res["errors"] and res["errors"]["sum"] < 1e-6


def test_attrax_aggregates_match_numpy():
    model = ax.load_model()
    for method in ("saliency", "integrated_gradients", "attention"):
        da, seconds = adapters.attrax_attribute(model, "1 2 3 =", " 3 2 1", method, steps=4)
        res = parity.parity(adapters.attrax_aggregates(da, method), da.values, method)
        assert res["ok"] and seconds > 0, (method, res)
        assert max(v for k, v in res["errors"].items() if k != "sum_plain") < 1e-6


def test_inseq_baseline_is_unk_with_eos_kept():
    model = ax.load_model()
    unk, eos = model.tokenizer.unk_token_id, model.eos_token_id
    if unk is None:
        pytest.skip("the default model's tokenizer has no unk token")
    base = adapters.inseq_baseline(model, "1 2 3 =", " 3 2 1")[0].numpy()
    rows = [model.embed(torch.tensor([[i]]))[0, 0].detach().numpy() for i in (unk, eos)]
    assert base.shape[-1] == model.hidden_size
    assert np.allclose(base[0], rows[0])
    assert all(np.allclose(r, rows[0]) or np.allclose(r, rows[1]) for r in base)


def _run(wl: str, lib: str, seconds: float, k: int, lo: float, hi: float) -> dict:
    return dict(
        workload=wl, method="saliency", library=lib, median_s=seconds, median_range=[lo, hi],
        calls=3, targets_run=k, n_target=8, rss_peak_mb=500.0, rss_attribution_mb=20.0,
        rss_setup_mb=480.0,
    )  # fmt: skip


def test_speedups_scale_subsets_and_pair_rounds():
    runs = [
        _run("W1", "attrax", 0.1, 8, 0.08, 0.12),
        _run("W1", "captum", 1.5, 8, 1.2, 1.5),
        _run("W3", "attrax", 0.1, 8, 0.1, 0.1),
        _run("W3", "inseq", 1.5, 2, 1.5, 1.5),  # 2 of 8 targets: its time counts 4 times
    ]
    w1, w3 = report.speedups(runs, report.CPU_GOALS)
    assert w1["speedup"] == pytest.approx(15.0) and w1["met"] and not w1["extrapolated"]
    assert w1["speedup_range"] == pytest.approx([1.2 / 0.12, 1.5 / 0.08])
    assert w3["speedup"] == pytest.approx(1.5 * 4 / 0.1) and w3["extrapolated"]


def test_committed_docs_are_rendered_from_the_committed_results():
    # fails when docs/benchmarks*.md or the results JSON drift apart, or a hand edit slips in
    for name, text in report.render_all().items():
        assert (report.DOCS / name).read_text() == text, (
            f"run `python -m benchmarks report`: {name}"
        )


def test_the_layer_tables_are_rendered_from_their_results():
    # the pages' DeepLIFT-at-layers and layer-method tables are what `--report` renders from the
    # JSON (whose parity the benchmark checked before writing it)
    from benchmarks import deeplift, layers

    root = Path(__file__).parent.parent
    result = json.loads((root / "benchmarks" / "deeplift-layers.json").read_text())
    assert deeplift.render_layers(result) in (root / "docs/methods/propagation.md").read_text()
    result = json.loads((root / "benchmarks" / "layers.json").read_text())
    block = f"{layers.BEGIN}\n{layers.render(result)}\n{layers.END}"
    assert block in layers.DOCS.read_text()


def test_the_gpu_page_names_the_w3_option_its_rows_ran():
    # a run with the folded SDPA: W3's attrax rows take the fastest variant, and the page says so
    from benchmarks import gpu

    results = report.load(report.GPU_RESULTS)
    variants = [
        dict(attn="eager", chunk_size=32, median_s=0.279),
        dict(attn="sdpa", chunk_size=32, median_s=0.201, sdpa_backwards=16),
        dict(attn="sdpa", chunk_size=None, median_s=0.230, sdpa_backwards=4),
    ]
    best = gpu.fastest(variants)
    assert (best["attn"], best["chunk_size"]) == ("sdpa", 32)
    meta = dict(results["meta"], plans={"W3": dict(attn_implementation="sdpa", chunk_size=32)})
    text = report.render_gpu(dict(results, variants=variants, meta=meta))
    assert "`chunk_size=32` 201 ms (16 fused backwards)" in text
    assert "run the fastest of these, sdpa attention and `chunk_size=32`" in text
    assert "one fused backward per attention call and chunk" in text
    assert "not measured yet" not in text.split("**Below the goal")[1].split("\n")[0]


def test_plot_renders(tmp_path):
    report.plot_speedups(report.load(report.CPU_RESULTS), tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_modules_import_one_way():
    """No module imports one that imports it back; nothing edits sys.path."""
    graph = {}
    for path in BENCH.glob("*.py"):
        tree = ast.parse(path.read_text())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module} if node.module else {a.name for a in node.names}
        graph[path.stem] = deps
        assert "sys.path" not in path.read_text(), path.name
    order: list[str] = []
    while len(order) < len(graph):  # peel modules whose imports are all placed: fails on a cycle
        ready = [m for m, deps in graph.items() if m not in order and deps <= set(order)]
        assert ready, f"import cycle among {sorted(set(graph) - set(order))}"
        order += ready


def test_every_module_imports_without_the_reference_libraries():
    """The command line imports every module: a broken name fails here, not in a bench run."""
    import importlib

    for path in sorted(BENCH.glob("*.py")):
        importlib.import_module(f"benchmarks.{path.stem}")


def test_classifier_parity_and_the_attrax_adapter():
    from benchmarks import classify

    from attrax.testing import tiny_classifier

    rng = np.random.default_rng(2)
    grads = rng.normal(size=(2, 3, 5, 4))
    assert classify.compare(grads, grads.copy(), "captum", "saliency")["ok"]
    assert not classify.compare(grads * 1.001, grads, "captum", "saliency")["ok"]
    interpreto = np.abs(grads).mean(-1)  # its reduction over hidden
    assert classify.compare(grads, interpreto, "interpreto", "saliency")["ok"]
    assert not classify.compare(grads, interpreto * 1.001, "interpreto", "saliency")["ok"]
    hf, tok = tiny_classifier("bert", "sequence")
    model = ax.load_model(hf, tokenizer=tok)
    texts = ["the capital of france is paris", "hello world"]
    values, seconds = adapters.attrax_classify(model, texts, [[2], [0]], "saliency")
    every = ax.saliency(model, texts, "all", abs=False)
    assert values.shape[:2] == (2, 1) and seconds > 0
    # float32 backwards of other shapes (one target, every target): ~1e-8 apart on values to 0.4
    close = {"rtol": 1e-4, "atol": 1e-7}
    np.testing.assert_allclose(values[0, 0], every.isel(example=0, target=2).values, **close)
    np.testing.assert_allclose(values[1, 0], every.isel(example=1, target=0).values, **close)


@pytest.mark.parametrize("method", ["saliency", "input_x_gradient", "integrated_gradients"])
def test_question_answering_equals_captums_loop_over_start_and_end(method):
    pytest.importorskip("captum")  # the bench venv's (benchmarks/setup_bench_env.sh)
    from benchmarks import question_answering as qa
    from benchmarks.parity import parity

    from attrax.testing import tiny_classifier

    hf, tok = tiny_classifier("bert", "question-answering")
    model = ax.load_model(hf, tokenizer=tok)
    given = [("who was good", "the plot was good"), ("who was good", "the story was good")]
    spans = qa.predicted_spans(model, given)
    assert spans != [(0, 0), (0, 0)] and all(s <= e for s, e in spans)
    ours, _ = qa.attrax_qa(model, given, spans, method, steps=8)
    theirs, seconds = qa.captum_qa(hf, tok, given, spans, method, steps=8)
    assert ours.shape == theirs.shape == (2, 2, 23, hf.config.hidden_size) and seconds > 0
    flat = (-1, *ours.shape[2:])
    assert parity(ours.reshape(flat), theirs.reshape(flat), method)["ok"]
    # the slots are not interchangeable: the end's attribution is not the start's
    assert not parity(ours[:, ::-1].reshape(flat), theirs.reshape(flat), method)["ok"]


@pytest.mark.parametrize("method", ["saliency", "input_x_gradient", "integrated_gradients"])
def test_masked_lm_equals_captums_loop_over_masks(method, monkeypatch):
    pytest.importorskip("captum")  # the bench venv's (benchmarks/setup_bench_env.sh)
    from benchmarks import masked_lm
    from benchmarks.parity import parity

    from attrax.testing import tiny_classifier

    hf, tok = tiny_classifier("bert", "fill-mask")
    model = ax.load_model(hf, tokenizer=tok)
    monkeypatch.setattr(masked_lm, "MASKS", (2, 4))
    texts = ["the [MASK] cat [MASK] again", "a [MASK] dog [MASK] bread"]  # equal lengths
    tokens = masked_lm.predicted(model, texts)
    ours, _ = masked_lm.attrax_mlm(model, texts, tokens, method, steps=8)
    theirs, seconds = masked_lm.captum_mlm(hf, tok, texts, tokens, method, steps=8)
    assert ours.shape == theirs.shape and ours.shape[:2] == (2, 2) and seconds > 0
    flat = (-1, *ours.shape[2:])
    assert parity(ours.reshape(flat), theirs.reshape(flat), method)["ok"]
    assert not parity(ours[:, ::-1].reshape(flat), theirs.reshape(flat), method)["ok"]


def test_the_masked_lm_section_renders_from_a_recorded_run():
    results = {
        "meta": dict(
            quick=True, command="python -m benchmarks masked-lm --quick", started="s",
            finished="f", threads=2, texts=[16, 48], masks=[12, 30], steps=16, repeats=1,
            spec=dict(hidden=256, layers=4), versions={"captum": "0.9.0"},
        ),
        "runs": [dict(method="integrated_gradients", attrax_s=2.0, captum_s=3.0, speedup=1.5)],
        "parity": [dict(method="integrated_gradients", ok=True, errors={"raw": 4e-7})],
    }  # fmt: skip
    text = "\n".join(report._masked_lm_section(results))
    assert "## Masked LM (M1)" in text and "positions 12 and 30" in text
    assert "| integrated gradients | 2.00 | 3.00 | **1.50\u00d7** |" in text


def test_the_question_answering_section_renders_from_a_recorded_run():
    from benchmarks import question_answering as qa

    results = {
        "meta": dict(
            quick=False, command="python -m benchmarks question-answering", started="s",
            finished="f", threads=2, pairs=list(qa.PAIRS), steps=50, repeats=5,
            spec=dict(hidden=256, layers=4), versions={"captum": "0.9.0"},
        ),
        "runs": [dict(method="saliency", attrax_s=0.1, captum_s=0.25, speedup=2.5)],
        "parity": [dict(method="saliency", ok=True, errors={"raw": 1e-7})],
    }  # fmt: skip
    text = "\n".join(report._question_answering_section(results))
    assert "## Question answering (Q1)" in text
    assert "| saliency | 0.100 | 0.250 | **2.5\u00d7** |" in text
    assert "- saliency: ok (raw 1.0e-07)" in text


def test_the_classifier_section_renders_from_a_recorded_run():
    run = dict(median_s=1.0, rss_peak_mb=500.0, load1_before=1.0, scale=1.0, calls=1)
    results = {
        "meta": dict(
            quick=True, command="python -m benchmarks classifiers --quick", started="s",
            finished="f", threads=2, texts=[16, 48], versions={}, goals={"C1": 1.0, "C2": 5.0},
            spec=dict(hidden=256, layers=4, heads=4, vocab_size=30522),
            cases={"C2": dict(steps=16, baseline_classes=4)},
        ),
        "runs": [
            run | dict(workload="C2", method="saliency", library="attrax"),
            run | dict(workload="C2", method="saliency", library="captum", scale=5.0),
        ],
        "speedups": [
            dict(workload="C2", method="saliency", baseline="captum", speedup=5.0, goal=5.0,
                 met=True, extrapolated=True)
        ],
        "parity": [dict(workload="C2", method="saliency", baseline="captum", ok=True,
                        errors={"raw": 1e-7})],
    }  # fmt: skip
    text = "\n".join(report._classifier_section(results))
    assert "## Classifiers (C1, C2)" in text
    assert (
        "| C2 | saliency | 1.00 | 5.00\\* (**5.0\u00d7**) | \u2014 | 500 / 500 / \u2014 MB |"
        in text
    )


def test_the_real_size_section_shows_a_gate_run_in_another_dtype():
    meta = dict(
        shape="llama-1b",
        prompt=16,
        target=8,
        threads=2,
        repeats=1,
        steps=20,
        first_targets=2,
        max_memory="8GB",
    )
    row = dict(
        method="saliency",
        seconds={"attrax": 2.0, "captum": 20.0},
        peak_bytes={"attrax": 2**20, "captum": 2**21},
        parity={"captum": {"float32": 1.6e-6, "bfloat16": 4.1e-2}},
    )  # fmt: skip
    text = "\n".join(report._real_size_section({"f.json": {"meta": meta, "rows": [row]}}))
    assert "| saliency | 2.00, 1 | 20.0\\*, 2 | **10.0\u00d7** |" in text
    assert "captum 1.6e-06 (float32 gate), bfloat16 4.1e-02 |" in text
    # the loop's own bfloat16 rounding and attrax's, per aggregate: the largest, named
    row["parity"]["captum"] |= {
        "captum bfloat16 vs float32": {"raw": 0.01, "sum": 0.04, "l2_normalize": 0.002},
        "attrax bfloat16 vs captum float32": {"raw": 0.012, "sum": 0.03, "l2_normalize": 0.05},
    }
    text = "\n".join(report._real_size_section({"f.json": {"meta": meta, "rows": [row]}}))
    assert (
        "captum 1.6e-06 (float32 gate), bfloat16 4.1e-02, captum bfloat16 vs float32 4.0e-02 "
        "(sum), attrax bfloat16 vs captum float32 5.0e-02 (l2_normalize) |"
    ) in text


def test_long_attention_measures_a_short_input(tmp_path, monkeypatch):
    from benchmarks import __main__ as cli

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak RSS needs Linux's /proc/self/clear_refs")
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)  # python -m benchmarks from here
    out = tmp_path / "long.json"
    argv = ["long-attention", "--tokens", "40", "--layers", "2", "--heads", "2", "--hidden", "16",
            "--targets", "3", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["attention", "rollout"]
    for row in rows:
        assert row["input_tokens"] == 40
        assert row["every_map_bytes"] == 40 * 40 * 2 * 2 * 4
        assert row["peak_bytes"] > 0
    assert rows[0]["shape"] == {"target": 3, "source": 40, "layer": 2, "head": 2}


def test_the_real_size_section_shows_a_loop_that_ran_out_of_memory():
    meta = dict(
        shape="llama3-8b",
        prompt=8192,
        target=128,
        threads=2,
        repeats=1,
        steps=20,
        first_targets=4,
        max_memory="60GB",
        parity_dtype="same",
        tolerance=5e-2,
    )
    row = dict(method="saliency", seconds={"attrax": 2.0}, peak_bytes={"attrax": 2**20},
               parity={}, out_of_memory=["captum"])  # fmt: skip
    text = "\n".join(report._real_size_section({"f.json": {"meta": meta, "rows": [row]}}, gpu=True))
    assert "## Real size and long context (GPU)" in text
    assert "parity gated in bfloat16 at 0.05 relative" in text
    assert "| saliency | 2.00, 1 | out of memory | — |" in text


def test_budgets_retries_at_the_smallest_budget_the_planner_names():
    from benchmarks import budgets

    from attrax._memory import parse_bytes

    model = ax.load_model()
    for method in (ax.saliency, ax.occlusion):  # their messages differ ("need", "needs")
        with pytest.raises(ax.OptionError) as refused:
            method(model, "3 1 4 0 5 9 =", " 9 5 0 4 1 3", max_memory="1kB")
        smallest = parse_bytes(budgets._SMALLEST.search(str(refused.value)).group(1))
        assert smallest > 1000
        budget = budgets._rounded_up(smallest)
        assert smallest <= budget < smallest * 1.01 + 2**20
        got = method(model, "3 1 4 0 5 9 =", " 9 5 0 4 1 3", max_memory=budget)
        assert got.attrs["options"]


def test_budgets_runs_a_workload_in_the_precision_it_is_given(monkeypatch, capsys):
    """``--dtype bfloat16``: the measured call gets the workload's model cast to bfloat16."""
    from benchmarks import budgets

    built = ax.load_model()
    monkeypatch.setattr(
        budgets, "_inputs", lambda name, w3: (built, "3 1 4 0 5 9 =", " 9 5 0 4 1 3", None)
    )
    seen, saliency = [], ax.saliency

    def spy(model, *args, **options):
        seen.append((model.hf.dtype, options.get("max_memory")))
        return saliency(model, *args, **options)

    monkeypatch.setattr(ax, "saliency", spy)
    spec = dict(
        workload="W1", method="saliency", steps=16, w3_targets=32, threads=1, device="cpu",
        dtype="bfloat16", budget=2**30,
    )  # fmt: skip
    budgets.worker(json.dumps(spec))
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["peak_bytes"] >= 0
    assert seen == [(torch.bfloat16, None), (torch.bfloat16, 2**30)]  # the warm-up, the call


def test_a_budgets_table_says_which_calls_did_not_apply_or_were_not_measured(tmp_path):
    from benchmarks import budgets

    rows = [
        dict(workload="C2", method="saliency", unbounded_bytes=300 * 2**20,
             budget_bytes=100 * 2**20, bounded_bytes=50 * 2**20, smallest=False, ok=True),
        dict(workload="C2", method="alti_logit", skipped="post-norm"),
        dict(workload="C2", method="pgd", not_measured="stopped for time"),
        dict(workload="C1", method="pgd", not_measured="stopped for time"),
    ]  # fmt: skip
    (tmp_path / "b.json").write_text(json.dumps({"meta": {"steps": 16}, "rows": rows}))
    assert budgets.table(tmp_path / "b.json").splitlines()[2:] == [
        "| C2 | saliency | 300 MiB | 100 MiB | 50 MiB |",
        "| C2 | ALTI-Logit | not for this model | | |",
        "| C2 | PGD, 2 steps | not measured: stopped for time | | |",  # WORKLOAD_SIZES
        "| C1 | PGD | not measured: stopped for time | | |",
    ]


def test_the_memory_doc_shows_the_committed_budgets_runs():
    """docs/memory.md shows the committed runs, and the every-method ones (float32, bfloat16)
    cover every method that takes ``max_memory`` (a new one is measured before it lands)."""
    from benchmarks import budgets

    doc = (report.DOCS / "memory.md").read_text()
    runs = ("budgets-cpu.json", "budgets-every-cpu.json", "budgets-every-cpu-bfloat16.json")
    for name in runs:
        assert budgets.table(BENCH / name) in doc, f"paste `budgets.table({name!r})` into the doc"
    for name in runs[1:]:
        every: dict[str, list[str]] = {}
        for row in json.loads((BENCH / name).read_text())["rows"]:
            methods = every.setdefault(row["workload"], [])
            if row["method"] not in methods:  # a method's variants (--options) follow it
                methods.append(row["method"])
        assert every and all(m == list(budgets.every_method()) for m in every.values()), every


def test_the_real_size_section_shows_attrax_alone():
    """``gpu_memory.sh long-lrp`` runs attrax alone: no ratio columns, no gate claimed."""
    meta = dict(shape="llama3-8b", prompt=2048, target=128, threads=8, repeats=1, steps=20,
                first_targets=0, max_memory="60GB", parity_dtype="same", tolerance=5e-2,
                libraries="attrax")  # fmt: skip
    row = dict(method="lrp", seconds={"attrax": 3.0}, peak_bytes={"attrax": 2**30}, parity={})
    text = "\n".join(report._real_size_section({"f.json": {"meta": meta, "rows": [row]}}, gpu=True))
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table == [
        "| method | attrax (s, peak MiB) | parity |",
        "|---|---|---|",
        "| AttnLRP | 3.00, 1024 | — (attrax alone) |",
    ], table
    assert "parity gated" not in text


def test_every_method_the_gpu_script_names_runs_through_the_adapter():
    """The methods each ``gpu_memory.sh`` part passes to ``real-size`` are ones the attrax
    adapter knows (an unknown one would fail on the device, after building an 8B model)."""
    import re

    script = (BENCH / "gpu_memory.sh").read_text()
    named = set()
    for line in script.splitlines():
        call = re.match(r"\s*(?:[\w-]+\)\s*)?(?:for .*?do\s*)?llama \S+ (\S+) ", line)
        if call:
            named.update(call.group(1).split(","))
    assert {"saliency", "input_x_gradient", "integrated_gradients", "lrp"} <= named, named
    model = ax.load_model()
    for method in sorted(named):
        da, seconds = adapters.attrax_attribute(model, "1 2 3 =", " 3 2 1", method, steps=3)
        assert da.sizes["target"] == 3 and seconds > 0, method  # " 3", " 2", " 1"


def test_the_memory_doc_shows_the_calibration_against_the_current_estimate():
    """``docs/memory.md``'s calibration table is ``calibrate --report`` of the committed
    measurements against the estimate of the code as it is, its half-precision table is that of
    the committed rows, and nothing else leaked in."""
    from benchmarks import calibrate

    doc = (report.DOCS / "memory.md").read_text()
    assert calibrate.report() in doc
    half = calibrate.half_precision()
    assert half.count("\n") > 2 + 4, "a row per family measured both ways"
    assert half in doc
    assert "[transformers]" not in doc


def test_calibrate_measures_head_attribution_into_the_committed_rows(tmp_path, monkeypatch):
    """``calibrate --runs heads_one,heads_all,attention_all`` adds the runs to each shape's row,
    keeping its engine runs and every other shape's row, a precision's rows apart from the
    others'; the engine's runs go together."""
    import argparse

    from benchmarks import calibrate

    out = tmp_path / "calibration.json"
    out.write_text((BENCH / "calibration.json").read_text())
    committed = json.loads(out.read_text())
    fake = {"targets": 37, "tokens": 219, "heads": [10, 20, 30, 5], "attention": [1, 2, 3, 4]}
    peaks = {"heads_one": 1.0, "heads_all": 2.0, "attention_all": 3.0}
    monkeypatch.setattr(calibrate, "_measure", lambda spec: {**fake, "peak_mb": peaks[spec["run"]]})
    args = dict(
        report=False, families="gpt2", first_shape=True, threads=1, out=str(out),
        dtype="float32", attn="", meter="rss",
    )  # fmt: skip
    calibrate.run(argparse.Namespace(**args, runs="heads_one,heads_all,attention_all"))
    rows = json.loads(out.read_text())
    assert len(rows) == len(committed)
    first = rows[0]
    assert first["measured"]["heads_one"] == 2**20 and first["measured"]["heads_all"] == 2 * 2**20
    # Cost(10, 20, 30, 5).at(points, targets): 30 + 5 k + p (20 + 10 k)
    assert first["estimate"]["heads_one"] == 30 + 5 + 20 + 10
    assert first["estimate"]["heads_all"] == 30 + 5 * 37 + calibrate.POINTS * (20 + 10 * 37)
    assert first["estimate"]["attention_all"] == 3 + 4 * 37 + (2 + 1 * 37)  # one point
    for run in calibrate.ENGINE:
        assert first["measured"][run] == committed[0]["measured"][run], run
    assert rows[1:] == committed[1:]
    half = next(i for i, r in enumerate(committed) if r.get("dtype") == "bfloat16")
    assert committed[half]["family"] == "gpt2", "the committed rows: float32's, then bfloat16's"
    peaks = {"heads_one": 4.0, "heads_all": 5.0, "attention_all": 6.0}
    calibrate.run(
        argparse.Namespace(
            **{**args, "dtype": "bfloat16"}, runs="heads_one,heads_all,attention_all"
        )
    )
    again = json.loads(out.read_text())
    assert again[half]["measured"]["heads_one"] == 4 * 2**20
    assert again[:half] == rows[:half] and again[half + 1 :] == rows[half + 1 :]
    with pytest.raises(SystemExit, match="measured together"):
        calibrate.run(argparse.Namespace(**args, runs="backward_one"))


def test_the_gpu_scripts_long_parts_run_on_a_tiny_shape(tmp_path):
    """``gpu_memory.sh``'s long parts, as the device would run them but on a miniature of the
    Llama-3-8B shape on the CPU: they complete, write their results, and the GPU page renders
    them (a failure here would otherwise show only after building 8B on a lent GPU). Captum and
    Inseq are needed for ``long`` and ``long-ig``: with the bench extra only."""
    import importlib.util
    import os
    import subprocess
    import sys

    parts = ["long-lrp"]
    if all(importlib.util.find_spec(m) for m in ("captum", "inseq")):
        parts += ["long", "long-ig"]
    env = dict(os.environ, PY=sys.executable, SHAPE="llama-tiny", DEVICE="cpu", LONG="40 56",
               TARGETS="6", RESULTS=str(tmp_path), THREADS="2")  # fmt: skip
    done = subprocess.run(
        ["bash", str(BENCH / "gpu_memory.sh"), *parts],
        cwd=BENCH.parent, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    written = {"long-lrp": ["40-lrp"], "long": ["40", "56"], "long-ig": ["40-ig"]}
    files = {}
    for name in (f"real-size-llama-tiny-{n}-cpu.json" for part in parts for n in written[part]):
        result = json.loads((tmp_path / name).read_text())
        assert result["meta"]["shape"] == "llama-tiny" and result["meta"]["target"] == 6
        assert all(row["seconds"]["attrax"] > 0 for row in result["rows"]), result["rows"]
        files[name] = result
    text = "\n".join(report._real_size_section(files, gpu=True))
    assert "| AttnLRP |" in text and "— (attrax alone)" in text, text


def _real_size_args(tmp_path, *options):
    import argparse

    from benchmarks import real_size

    p = argparse.ArgumentParser()
    real_size.parser(p)
    return p.parse_args(
        ["--shape", "llama-tiny", "--prompt", "12", "--target", "4", "--methods", "saliency",
         "--libraries", "attrax", "--first-targets", "2", "--parity-dtype", "same",
         "--tolerance", "0.05", "--out", str(tmp_path / "out.json"), *options]
    )  # fmt: skip


@pytest.mark.parametrize("on_failure", ["record", "stop"])
def test_real_size_times_on_the_parity_call_and_records_a_failed_gate(
    tmp_path, monkeypatch, on_failure
):
    """``--repeats 0``: attrax runs once on all targets (after one warm-up on the first ones), an
    extrapolated library once more than its parity call; a baseline 10% off fails the 5% gate:
    ``record`` keeps and marks the row with the error, ``stop`` exits 2 and writes nothing. The
    baseline is attrax's own first targets scaled by 1.1: error 0.1 / 1.1 on every aggregate."""
    from benchmarks import real_size

    calls, last = [], {}
    original = real_size._calls

    def with_a_baseline(method, hf, model, tok, prompt, target, short, args):
        ours = original(method, hf, model, tok, prompt, target, short, args)["attrax"]

        def attrax():
            calls.append(("attrax", target == short))
            last["raw"] = ours().values
            return ours()

        def baseline():
            calls.append(("baseline", False))
            return last["raw"][:2] * 1.1

        return {"attrax": attrax, "baseline": baseline}

    monkeypatch.setattr(real_size, "_calls", with_a_baseline)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the suite's, left as it is
    args = _real_size_args(tmp_path, "--repeats", "0", "--on-parity-failure", on_failure)
    code = real_size.run(args)
    out = tmp_path / "out.json"
    if on_failure == "stop":
        assert code == 2 and not out.exists()
        return
    assert code == 0
    # the warm-up on the first targets, the parity call; the baseline's parity and timed calls
    assert [c for c in calls if c[0] == "attrax"] == [("attrax", True), ("attrax", False)]
    assert calls.count(("baseline", False)) == 2
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert result["meta"]["complete"] is True and result["meta"]["repeats"] == 0
    assert result["meta"]["attrax_source"]["sha256_src"] and "torch" in result["meta"]["versions"]
    assert row["parity_failed"] == ["baseline"]
    assert row["parity"]["baseline"] == pytest.approx(0.1 / 1.1, rel=1e-3)
    assert any(f.startswith("raw: relative error 9.09") for f in row["parity_failures"])
    assert set(row["seconds"]) == {"attrax", "baseline"}


def test_the_real_size_section_marks_a_failed_gate_and_an_incomplete_run():
    """A row over the gate is marked per library, a file the run left before its last method
    says so, and ``repeats=0`` says how it was timed."""
    meta = dict(shape="llama3-8b", prompt=2048, target=128, threads=2, repeats=0, steps=20,
                first_targets=4, max_memory="120GB", parity_dtype="same", tolerance=5e-2,
                complete=False)  # fmt: skip
    rows = [
        dict(method="saliency", seconds={"attrax": 2.0, "captum": 8.0, "inseq": 4.0},
             peak_bytes={"attrax": 2**30, "captum": 2**29, "inseq": 2**29},
             parity={"captum": 0.17, "inseq": 0.02}, parity_failed=["captum"]),
    ]  # fmt: skip
    text = "\n".join(report._real_size_section({"f.json": {"meta": meta, "rows": rows}}, gpu=True))
    (line,) = [row for row in text.splitlines() if row.startswith("| saliency")]
    assert line.endswith("| captum 1.7e-01 **over the gate**; inseq 2.0e-02 |"), line
    assert "**4.0\u00d7** | **2.0\u00d7**" in line
    assert "**Incomplete**" in text and "timed on its parity call" in text
    assert "--on-parity-failure record" in text
    assert "predates the objectives' softmax in float32" in text  # no attrax_source: older
    meta["attrax_source"] = {"git_head": "abc"}
    text = "\n".join(report._real_size_section({"f.json": {"meta": meta, "rows": rows}}, gpu=True))
    assert "**over the gate**" in text and "predates" not in text
    meta.update(repeats=3, complete=True)
    rows[0].pop("parity_failed")
    text = "\n".join(report._real_size_section({"f.json": {"meta": meta, "rows": rows}}, gpu=True))
    assert "over the gate" not in text and "Incomplete" not in text and "3 timed call(s)" in text


def test_the_gpu_page_names_the_real_size_parts_not_measured():
    """Each GPU real-size file that is missing is named with the device command that makes it;
    with all four there, nothing is."""
    one = {report.REAL_SIZE_GPU[0]: {}}
    (text,) = report._real_size_missing(one)
    assert "8,192 tokens" in text and "integrated gradients" in text and "AttnLRP" in text
    assert "`bash benchmarks/device_run.sh long:8192 long-ig long-lrp`" in text
    assert "input \u00d7 gradient over 2,048" not in text  # that one is there
    assert report._real_size_missing({name: {} for name in report.REAL_SIZE_GPU}) == []


def test_a_later_w3_options_run_is_compared_within_itself():
    """The re-run of W3's options names each option's time, the fastest SDPA against the
    fastest eager option, and gives no ratio against the earlier run's baselines."""
    rerun = {
        "meta": dict(started="2026-12-04 17:11:49 UTC", device_name="GPU", note="a note",
                     versions={"torch": "2.11.0"}, attrax_source={"git_head": "abc"}),
        "variants": [dict(attn="eager", chunk_size=None, median_s=0.3),
                     dict(attn="eager", chunk_size=32, median_s=0.2),
                     dict(attn="sdpa", chunk_size=None, median_s=0.16, sdpa_backwards=4),
                     dict(attn="sdpa", chunk_size=32, median_s=0.25, sdpa_backwards=16)],
    }  # fmt: skip
    (text,) = report._w3_options_rerun(rerun)
    assert "sdpa, `chunk_size=32` 250 ms" in text and "eager, `chunk_size=None` 300 ms" in text
    assert "160 ms against eager's best 200 ms (1.25\u00d7)" in text
    assert "2026-12-04" in text and "a note" in text


def test_device_run_starts_no_part_past_its_deadline(tmp_path):
    """``device_run.sh`` gives each part the time left and starts none with under a minute:
    with no time, every part is named as not started, the exit status is 124, the log is in
    ``$OUT``."""
    import os
    import subprocess

    env = dict(os.environ, OUT=str(tmp_path / "out"), RESULTS=str(tmp_path / "results"),
               DEADLINE="30", WHEELS=str(tmp_path / "none"))  # fmt: skip
    done = subprocess.run(
        ["bash", str(BENCH / "device_run.sh"), "long:2048", "harness"],
        cwd=BENCH.parent, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 124, done.stdout + done.stderr
    log = (tmp_path / "out" / "log").read_text()
    assert "long:2048 not started" in log and "harness not started" in log


def test_real_size_reports_each_dtypes_rounding_next_to_the_float32_gate(tmp_path, monkeypatch):
    """Gated on a float32 copy, each baseline is also compared with itself across the two dtypes,
    and attrax's bfloat16 result with the baseline's float32 one, per aggregate. The baseline
    here is attrax's own result in float32 and 1.1 times it in bfloat16: the gate sees 0, the
    baseline's own difference is about 10%, attrax's only bfloat16's rounding."""
    from benchmarks import real_size

    last = {}
    original = real_size._calls

    def with_a_baseline(method, hf, model, tok, prompt, target, short, args):
        ours = original(method, hf, model, tok, prompt, target, short, args)["attrax"]
        factor = 1.0 if hf.dtype == torch.float32 else 1.1

        def attrax():
            last["raw"] = ours().values
            return ours()

        return {"attrax": attrax, "baseline": lambda: last["raw"][:2] * factor}

    monkeypatch.setattr(real_size, "_calls", with_a_baseline)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the suite's, left as it is
    args = _real_size_args(tmp_path, "--repeats", "1", "--parity-dtype", "float32")
    args.tolerance = 1e-5
    assert real_size.run(args) == 0
    (row,) = json.loads((tmp_path / "out.json").read_text())["rows"]
    error = row["parity"]["baseline"]
    assert error["float32"] < 1e-6
    own = error["baseline bfloat16 vs float32"]
    attrax = error["attrax bfloat16 vs baseline float32"]
    assert set(own) == set(attrax) == {"raw", "l2_normalize", "sum"}
    assert 0.08 < own["raw"] < 0.12 and attrax["raw"] < 0.05
    assert "parity_failed" not in row


@pytest.mark.parametrize("method", ["saliency", "input_x_gradient", "integrated_gradients"])
def test_nli_equals_captums_loop_over_classes_on_both_embedding_layers(method):
    pytest.importorskip("captum")  # the bench venv's (benchmarks/setup_bench_env.sh)
    from benchmarks import nli
    from benchmarks.parity import parity

    from attrax.testing import tiny_classifier

    hf, tok = tiny_classifier("bart")
    hf.config.id2label = dict(enumerate(nli.LABELS))
    model = ax.load_model(hf, tokenizer=tok)
    given = [("a cat sat on the mat", "the cat sat"), ("the cat sat on a mat", "a cat sat")]
    assert len({len(tok(p, h)["input_ids"]) for p, h in given}) == 1  # nothing padded
    ours, _ = nli.attrax_nli(model, given, method, steps=8)
    theirs, seconds = nli.captum_nli(hf, tok, given, method, steps=8)
    assert ours.shape == theirs.shape and ours.shape[:2] == (2, 3) and seconds > 0
    flat = (-1, *ours.shape[2:])
    assert parity(ours.reshape(flat), theirs.reshape(flat), method)["ok"]
    # the encoder's rows alone (a Captum user hooking one layer) are not the attribution
    encoder_only = nli.captum_nli(hf, tok, given, method, steps=8, decoder=False)[0]
    assert not parity(ours.reshape(flat), encoder_only.reshape(flat), method)["ok"]


@pytest.mark.parametrize("method", ["saliency", "input_x_gradient", "integrated_gradients"])
def test_seq2seq_qa_equals_captums_loop_over_start_and_end_on_both_embedding_layers(method):
    pytest.importorskip("captum")
    from benchmarks import nli, question_answering
    from benchmarks.parity import parity

    from attrax.testing import tiny_classifier

    hf, tok = tiny_classifier("bart", "question-answering")
    model = ax.load_model(hf, tokenizer=tok)
    given = [
        ("where did the cat sit", "a cat sat on the mat"),
        ("where did the dog sit", "a dog sat on the mat"),
    ]
    assert len({len(tok(q, c)["input_ids"]) for q, c in given}) == 1  # nothing padded
    spans = question_answering.predicted_spans(model, given)
    ours, _ = question_answering.attrax_qa(model, given, spans, method, steps=8)
    theirs, seconds = nli.captum_qa(hf, tok, given, spans, method, steps=8)
    assert ours.shape == theirs.shape and ours.shape[:2] == (2, 2) and seconds > 0
    flat = (-1, *ours.shape[2:])
    assert parity(ours.reshape(flat), theirs.reshape(flat), method)["ok"]


def test_the_nli_section_renders_from_a_recorded_run():
    from benchmarks import nli

    results = {
        "meta": dict(
            quick=False, command="python -m benchmarks nli", started="s", finished="f",
            threads=2, pairs=list(nli.PAIRS), steps=50, repeats=5, spec=nli.SPEC,
            versions={"captum": "0.9.0"},
        ),
        "runs": [dict(method="integrated_gradients", attrax_s=1.0, captum_s=2.0, speedup=2.0)],
        "parity": [dict(method="integrated_gradients", ok=True, errors={"raw": 2e-7})],
    }  # fmt: skip
    text = "\n".join(report._nli_section(results))
    assert "## Encoder-decoder NLI classifier (N1)" in text and "30 + 12 tokens, 46" in text
    assert "`<pad>`, `<s>` and `</s>` kept" in text and "[PAD]" not in text
    assert "| integrated gradients | 1.00 | 2.00 | **2.0\u00d7** |" in text
    results["meta"]["pairs"] = list(nli.QA_PAIRS)
    text = "\n".join(report._seq2seq_qa_section(results))
    assert "## Encoder-decoder question answering (N2)" in text and "12 + 33 tokens, 49" in text


# not the tiny Marian: it scales its embeddings, which Inseq 0.7 does twice (benchmarks/README.md)
@pytest.mark.parametrize("arch", ["gpt2", "bart"])
def test_step_scores_equal_inseqs_step_functions_as_inseq_states_them(arch):
    pytest.importorskip("inseq")  # the bench venv's (benchmarks/setup_bench_env.sh)
    from benchmarks import step_scores
    from benchmarks.baselines import inseq_load

    from attrax.testing import tiny_model

    hf, tok = tiny_model(arch)
    hf = hf.double()
    model = ax.load_model(hf, tokenizer=tok)
    target, contrast = " 3 2 1 0", " 3 2 7 0"
    encode = {"add_special_tokens": arch != "gpt2"}
    ids = [tok(t, **encode)["input_ids"] for t in (target, contrast)]
    assert len(ids[0]) == len(ids[1])
    first = next(i for i, (a, b) in enumerate(zip(*ids, strict=True)) if a != b)
    c = step_scores.Case(arch, ["1 2 3 =", "4 5 6 ="], target, contrast, first)
    handle, _ = inseq_load(hf, tok, "dummy")
    for group in step_scores.GROUPS:
        if group == "pair" and c.decoder_only:
            continue  # Inseq's crossentropy fails on one sequence
        ours = step_scores.attrax_scores(model, c, group)[0]
        theirs = step_scores.inseq_scores(handle, c, group)[0]
        rows = step_scores.compare(ours, theirs, c, group)
        assert all(r["ok"] for r in rows), rows
        # the comparison can fail: Inseq's own perplexity and P-CXMI are not attrax's
        for name in {"pair": "perplexity", "inputs": "pcxmi"}.get(group, ()):
            if name in ours:
                assert step_scores.rel_err(ours[name], theirs[name]) > 1e-2


def test_the_step_scores_section_renders_from_a_recorded_run():
    results = {
        "meta": dict(
            quick=True, command="python -m benchmarks step-scores --quick", started="s",
            finished="f", threads=2, lengths=[32, 32], repeats=1, versions={"inseq": "0.7.0"},
        ),
        "runs": [dict(workload="W1", group="inputs", attrax_s=0.25, inseq_s=40.0, speedup=160.0)],
        "parity": [
            dict(workload="W1", first_difference=17),
            dict(workload="W1", group="inputs", score="in_context_pvi", inseq="pcxmi",
                 error=1.7e-14, ok=True),
        ],
    }  # fmt: skip
    text = "\n".join(report._step_scores_section(results))
    assert "## Step scores against Inseq (S1)" in text and "W1: step 17" in text
    assert "| W1 | kl_divergence, pcxmi (and Inseq's in_context_pvi) | 0.250 | 40.0" in text
    assert "- W1 in_context_pvi (pcxmi): ok (1.7e-14)" in text


def test_the_reagent_table_is_rendered_from_its_results():
    # the perturbation page's ReAGent row is what `--report` renders from the JSON (whose parity
    # with Inseq the benchmark checked before writing it)
    from benchmarks import reagent

    result = json.loads((BENCH / "reagent.json").read_text())
    assert result["parity"]
    block = f"{reagent.BEGIN}\n{reagent.render(result)}\n{reagent.END}"
    assert block in reagent.DOC.read_text()


def test_the_decompx_reference_table_is_rendered_from_its_record():
    # internals.md's parity rows against DecompX's and GlobEnc's authors' code are what
    # `decompx_ref.py --docs` renders from the record it writes after the parity held
    from benchmarks import decompx_ref

    record = json.loads((BENCH / "decompx-ref.json").read_text())
    assert all(v <= record["tolerance"] for got in record["results"].values() for v in got.values())
    block = f"{decompx_ref.BEGIN}\n{decompx_ref.render(record)}\n{decompx_ref.END}"
    assert block in decompx_ref.DOC.read_text()


def test_knowledge_neurons_equal_eleuthers_on_a_tiny_bert():
    """benchmarks/neurons.py's three identities against EleutherAI's knowledge-neurons, on a
    tiny masked LM; a wrong layer order fails them."""
    pytest.importorskip("knowledge_neurons")  # the bench venv's (benchmarks/setup_bench_env.sh)
    from benchmarks import neurons

    from attrax.testing import tiny_classifier

    hf, tok = tiny_classifier("bert", "fill-mask")
    model = ax.load_model(hf, tokenizer=tok)
    kn = neurons.eleuther(hf, tok)
    text, token = "the capital of [MASK] is paris", "paris"
    assert max(neurons.parity(model, kn, text, token).values()) <= 1e-4
    ours = neurons.ours(model, text, token, steps=1, quadrature="riemann_left")[0]
    theirs = neurons.their_scores(kn, text, token, 1)
    assert np.abs(ours[::-1] - theirs).max() > 1e-3 * np.abs(theirs).max()
