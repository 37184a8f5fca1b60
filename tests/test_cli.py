"""The ``attrax`` command, run in-process through ``main`` on the built-in model."""

from __future__ import annotations

import inspect
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import attrax as ax
from attrax import _evaluate, _model
from attrax.cli import main
from tests.conftest import IG_RULE

PROMPT, TARGET = "3 1 4 0 5 9 =", " 9 5 0 4 1 3"
LONG = " ".join(["1"] * 100) + " ="  # more tokens than the built-in model's 64 positions


@pytest.fixture
def no_computation(monkeypatch):
    """Loading a model or evaluating fails the test: what is checked must be checked before."""

    def computed(*args, **kwargs):
        raise AssertionError("the computation started before the outputs were checked")

    monkeypatch.setattr(_model, "load_model", computed)
    monkeypatch.setattr(_evaluate, "evaluate", computed)


def test_demo_reports_the_ground_truth(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "prompt" in out and "answer" in out
    assert "rows: target · columns: source" in out
    hits = re.search(r"(\d+)/6 answer tokens put their top score", out)
    assert hits is not None and int(hits[1]) >= 5
    assert len(out.splitlines()) < 30


def test_demo_with_a_prompt_and_html(tmp_path, capsys):
    page = tmp_path / "demo.html"
    args = ["demo", "--method", "integrated_gradients", "--prompt", PROMPT, "--html", str(page)]
    assert main(args) == 0
    assert "6/6 answer tokens" in capsys.readouterr().out
    assert "<table" in page.read_text()


def test_demo_classification_reports_the_marker(tmp_path, capsys):
    assert main(["demo", "--task", "classification"]) == 0
    out = capsys.readouterr().out
    assert "predicted" in out and "✓ correct" in out
    assert "rows: target · columns: source" in out
    hit = re.search(
        r"top score on '(\w+)' ✓ · the evidence \(ground truth\) is the marker '(\w+)'", out
    )
    assert hit is not None and hit[1] == hit[2]
    assert len(out.splitlines()) < 20
    page = tmp_path / "demo.html"
    text = "the music was really boring"
    args = ["demo", "--task", "classification", "--method", "integrated_gradients"]
    assert main([*args, "--text", text, "--html", str(page)]) == 0
    out = capsys.readouterr().out
    assert "negative" in out and "top score on 'boring' ✓" in out
    html = page.read_text()
    assert 'class="ax-rows"' in html and "boring</span>" in html and "negative (0." in html


def test_demo_classification_refuses_what_it_cannot_label(capsys):
    assert main(["demo", "--task", "classification", "--text", "good and bad"]) == 2
    assert "exactly one marker" in capsys.readouterr().err
    assert main(["demo", "--task", "classification", "--prompt", PROMPT]) == 2
    assert "`--prompt` does not apply" in capsys.readouterr().err
    assert main(["demo", "--text", "the plot was good"]) == 2


def test_attribute_the_builtin_classifier(capsys, tmp_path):
    args = ["attribute", "--model", "attrax:classifier", "--input", "a good film", "--target"]
    assert main([*args, "all"]) == 0
    out = capsys.readouterr().out
    assert "negative" in out and "neutral" in out and "positive" in out
    # a class id, as the API and a data file's label take it (refused until 2026-12-06)
    model = ax.load_model("attrax:classifier")
    for target in ("2", model.labels[2]):
        assert (
            main([*args, target, "--reduce", "none", "--out", str(tmp_path / f"{target}.nc")]) == 0
        )
    by_id, by_name = (ax.load(tmp_path / f"{t}.nc") for t in ("2", model.labels[2]))
    assert by_id.target.values.tolist() == [model.labels[2]]
    np.testing.assert_array_equal(by_id.values, by_name.values)


def test_attribute_writes_what_it_prints(tmp_path, capsys, default_model):
    nc, html, png = tmp_path / "r.nc", tmp_path / "r.html", tmp_path / "r.png"
    args = ["attribute", "--input", PROMPT, "--target", TARGET, "--out", str(nc)]
    assert main([*args, "--html", str(html), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "saliency" in out and "l2_norm(hidden) → normalize(source)" in out
    expected = ax.pipe(ax.saliency, ax.l2_norm, ax.normalize)(default_model, PROMPT, TARGET)
    got = ax.load(nc)
    assert got.dims == ("target", "source")
    assert got.attrs["model"] == "attrax-default"
    assert abs(got - expected).max() < 1e-6
    assert html.stat().st_size > 0 and png.read_bytes()[:4] == b"\x89PNG"


def test_attribute_passes_method_options(tmp_path, capsys):
    nc = tmp_path / "ig.nc"
    args = ["attribute", "--method", "integrated_gradients", "--input", PROMPT]
    args += ["--steps", "4", "-o", f"{IG_RULE}=riemann_middle", "--objective", "logprob"]
    args += ["--max-new-tokens", "2", "--reduce", "sum,rescale", "--out", str(nc)]
    assert main(args) == 0
    da = ax.load(nc)
    assert da.attrs["objective"] == "logprob"
    assert f'"{IG_RULE}": "riemann_middle"' in da.attrs["options"]
    assert '"steps": 4' in da.attrs["options"]
    assert da.sizes["target"] == 2
    assert da.attrs["reductions"] == "sum(hidden);rescale(source)"


def test_an_option_with_a_space_at_either_end_is_a_string(tmp_path, default_model):
    """` 5` is a token of the built-in model: JSON would have read it as the number 5."""
    nc = tmp_path / "contrast.nc"
    args = ["attribute", "--input", PROMPT, "--target", " 9", "-o", "contrast= 5"]
    assert main([*args, "--reduce", "none", "--out", str(nc)]) == 0
    want = ax.saliency(default_model, PROMPT, " 9", contrast=" 5")
    np.testing.assert_allclose(ax.load(nc).values, want.values, rtol=1e-6)


def test_a_json_object_for_corrupted_is_gaussian_noise(tmp_path, default_model):
    """Causal tracing from the command line: ``-o corrupted={...}`` holds ax.GaussianNoise's
    fields."""
    nc = tmp_path / "traced.nc"
    args = ["attribute", "--method", "activation_patching", "--input", PROMPT, "--target", TARGET]
    args += ["-o", 'corrupted={"tokens": [0, 1], "samples": 2}', "-o", "site=residual"]
    args += ["-o", "direction=denoising", "--reduce", "none", "--out", str(nc)]
    assert main(args) == 0
    noise = ax.GaussianNoise(tokens=[0, 1], samples=2)
    want = ax.activation_patching(
        default_model, PROMPT, TARGET, corrupted=noise, site="residual", direction="denoising"
    )
    np.testing.assert_allclose(ax.load(nc).values, want.values, rtol=1e-6)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--reduce", "l2_norm,nope"], "unknown reduction 'nope'"),
        (["--method", "activation_patching", "-o", 'corrupted={"samples": 2}'],
         "GaussianNoise(tokens=None) noises nothing: give `tokens`"),
        (["--method", "activation_patching", "-o", 'corrupted={"tokens": 0, "noise": 2}'],
         "is ax.GaussianNoise's fields (tokens, scale, samples, seed, std) or "
         '{"ablation": "zero" | "mean"}, with no \'noise\''),
        (["--method", "activation_patching", "-o", 'corrupted={"ablation": "half"}'],
         "`Ablation.kind` must be one of ('zero', 'mean'), got 'half'"),
        (["--method", "magic"], "unknown method 'magic'; available: saliency"),
        (["-o", "colour=red"], "saliency has no option 'colour'"),
        (["--steps", "3"], "`--steps 3` does not apply to saliency: it has no `steps` option"),
        (["--samples", "3"], "`--samples 3` does not apply to saliency: it has no `samples`"),
        (["--method", "smoothgrad", "--steps", "3"], "smoothgrad: it has no `steps` option (it"),
        (["--method", "integrated_gradients", "--samples", "3"], "(it takes --steps)"),
        (["--model", "/nonexistent/model"], "does not exist locally"),
        (["--target", "9 5"], "does not continue the prompt"),
        # the flags named, not the Python arguments (until 2026-12-05)
        (["--max-new-tokens", "60"], "`--max-new-tokens` 60 does not fit `--input`: 7 prompt"),
        (["--max-new-tokens", "60"], "pass --max-new-tokens 57 or fewer"),  # not max_new_tokens=57
        (["--target", ""], "`--target` is empty: there is nothing to attribute"),
        # whitespace is text (a newline target), but this tokenizer drops it
        (["--target", " "], "`--target` ' ' has no tokens to attribute: the tokenizer reads"),
        (["--reduce", "mean:layer"], "'layer' is not a dim"),
        (["--device", "nope"], "is not a device"),
        (["-o", "steps"], "expected KEY=VALUE"),
        # two values for one option: the last won without a word (until 2026-12-06)
        (["--method", "integrated_gradients", "-o", "steps=2", "--steps", "8"],
         "`--steps 8` and `-o steps=...` both set `steps`"),
        (["-o", "objective=logit", "--objective", "logprob"], "both set `objective`"),
        (["-o", "objective=logit", "-o", "objective=logprob"], "`objective` is given twice"),
        # draws held through the call: a raw allocator traceback (until 2026-12-06)
        (["--method", "smoothgrad", "--samples", str(10**15)], f"`samples`={10**15} needs"),
        (["--method", "sobol", "--samples", str(10**15)], "for its designs"),
        (["--method", "lime", "--samples", str(2**70)], "`samples` must be at most 2**62"),
    ],
)  # fmt: skip
def test_errors_exit_2_with_one_line(capsys, extra, message):
    assert main(["attribute", "--input", PROMPT, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attrax: error: ") and message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "args",
    [
        ["attribute", "--input", PROMPT, "--model", "~nosuchuser0/m"],
        ["attribute-dataset", "--data", "~nosuchuser0/d.jsonl", "--out", "zz"],
        ["evaluate", "--data", "~nosuchuser0/d.jsonl", "--methods", "saliency"],
    ],
)
def test_a_home_that_does_not_exist_is_one_line(capsys, args):
    """A `~user` of no such user was pathlib's RuntimeError with a traceback (until 2026-12-06)."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("attrax: error: ") and "no home directory for its `~`" in err, err
    assert err.count("\n") == 1, err


def test_samples_and_steps_are_separate_flags(tmp_path):
    args = ["attribute", "--input", PROMPT, "--target", TARGET, "--reduce", "none"]
    assert (
        main([*args, "--method", "smoothgrad", "--samples", "3", "--out", str(tmp_path / "s.nc")])
        == 0
    )
    assert '"samples": 3' in ax.load(tmp_path / "s.nc").attrs["options"]
    assert (
        main(
            [
                *args,
                "--method",
                "integrated_gradients",
                "--steps",
                "3",
                "--out",
                str(tmp_path / "i.nc"),
            ]
        )
        == 0
    )
    assert '"steps": 3' in ax.load(tmp_path / "i.nc").attrs["options"]


def test_output_paths_are_checked_before_the_computation(tmp_path, capsys, no_computation):
    (tmp_path / "file.txt").write_text("")
    cases = [
        (["--out", str(tmp_path)], f"`--out` {str(tmp_path)!r} is a directory"),
        (["--html", str(tmp_path / "no" / "x.html")], "directory .*no' does not exist"),
        (["--png", str(tmp_path / "file.txt" / "x.png")], "file.txt' is not a directory"),
        (["--png", str(tmp_path / "x.txt")], "`--png` .*matplotlib cannot write 'txt' files"),
    ]
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append((["--out", str(locked / "r.nc")], "is not writable"))
    if os.path.isdir("/proc/self"):  # os.access lets root write here; the OS refuses
        cases.append((["--out", "/proc/x.nc"], "`--out` '/proc/x.nc': cannot write in '/proc'"))
    for extra, message in cases:
        args = ["attribute", "--input", PROMPT, "--target", TARGET, "--out", str(tmp_path / "r.nc")]
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("attrax: error: ") and re.search(message, err), err
        assert len(err.splitlines()) == 1
    assert main(["demo", "--html", str(tmp_path / "no" / "demo.html")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert set(os.listdir(tmp_path)) <= {"file.txt", "locked"}


def test_evaluate_checks_every_output_before_the_computation(
    tmp_path, capsys, write_jsonl, no_computation
):
    data = write_jsonl([{"input": PROMPT, "target": TARGET}])
    args = [
        "evaluate",
        "--data",
        str(data),
        "--methods",
        "saliency",
        "--out",
        str(tmp_path / "e.nc"),
    ]
    cases = [
        (["--csv", str(tmp_path / "no" / "x.csv")], "`--csv` .*: directory .*no' does not exist"),
        (["--png", str(tmp_path / "x.txt")], "`--png` .*matplotlib cannot write 'txt' files"),
        (["--out", str(tmp_path)], f"`--out` {str(tmp_path)!r} is a directory"),
        # a Python message, and a row silently dropped, until 2026-12-05
        (["--methods", ","], "`--methods` names no method, got ','"),
        # netCDF written into a .json file, HTML into .csv (until 2026-12-05)
        (
            ["--out", str(tmp_path / "e.json")],
            r"`--out` .*e\.json' ends in \.json, another format's: this writes nc files",
        ),
        (["--methods", "saliency,saliency"], "`--methods` names saliency twice"),
    ]
    # the run's own --data replaced by netCDF or CSV, with exit status 0, until 2026-12-06
    for flag in ("--out", "--csv"):
        cases.append(([flag, str(data)], f"`{flag}` .*data.jsonl' is the `--data` file this run"))
    before = data.read_bytes()
    for extra, message in cases:
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("attrax: error: ") and re.search(message, err), err
        assert len(err.splitlines()) == 1
    assert os.listdir(tmp_path) == ["data.jsonl"] and data.read_bytes() == before


@pytest.mark.parametrize(
    ("command", "first", "second"),
    [
        # names no flag refuses for its format (an .nc given to --html is, since 2026-12-05)
        (["attribute", "--input", PROMPT], ("--out", "x"), ("--html", "x")),
        (["attribute", "--input", PROMPT], ("--html", "x.eps"), ("--png", "sub/../x.eps")),
        (["evaluate", "--methods", "saliency"], ("--out", "same"), ("--csv", "./same")),
    ],
)
def test_two_outputs_naming_one_file_are_refused(
    tmp_path, capsys, write_jsonl, no_computation, command, first, second
):
    (tmp_path / "sub").mkdir()
    if command[0] == "evaluate":
        command = [*command, "--data", str(write_jsonl([{"input": PROMPT}]))]
    args = [*command, first[0], str(tmp_path / first[1]), second[0], str(tmp_path / second[1])]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"attrax: error: `{first[0]}` and `{second[0]}` both name ")
    assert len(err.splitlines()) == 1


def test_an_output_that_cannot_be_drawn_leaves_none_written(tmp_path, capsys):
    nc, png = tmp_path / "raw.nc", tmp_path / "raw.png"
    args = ["attribute", "--input", PROMPT, "--target", TARGET, "--reduce", "none"]
    assert main([*args, "--out", str(nc), "--png", str(png)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"attrax: error: `--png` {str(png)!r}: `da` has dims")
    assert len(err.splitlines()) == 1
    assert os.listdir(tmp_path) == []  # neither --out nor a temp file


@pytest.mark.parametrize(
    ("spec", "dims"), [("sum:hidden,sum:source", ("target",)), ("l2_norm,sum:target", ("source",))]
)
def test_a_result_that_is_no_table_is_saved_and_its_dims_printed(tmp_path, capsys, spec, dims):
    nc = tmp_path / "r.nc"
    args = ["attribute", "--input", PROMPT, "--target", TARGET, "--reduce", spec]
    assert main([*args, "--out", str(nc)]) == 0
    out = capsys.readouterr().out
    assert f"result dims ({dims[0]}: " in out and f"wrote {nc}" in out
    assert ax.load(nc).dims == dims


@pytest.mark.parametrize("command", ["attribute", "attribute-dataset", "evaluate", "demo"])
def test_a_too_long_input_prints_only_the_attrax_error(tmp_path, capsys, write_jsonl, command):
    data = str(write_jsonl([{"input": LONG}]))
    args = {
        "attribute": ["attribute", "--input", LONG],
        "attribute-dataset": ["attribute-dataset", "--data", data, "--out", str(tmp_path / "o")],
        "evaluate": ["evaluate", "--data", data, "--methods", "saliency"],
        "demo": ["demo", "--task", "classification", "--text", "the " * 100 + "good"],
    }[command]
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    # transformers' own handler writes to the stderr of pytest's start, out of capsys' sight
    logging.getLogger("transformers").addHandler(handler)
    try:
        assert main(args) == 2
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    err = capsys.readouterr().err
    assert err.startswith("attrax: error: ") and len(err.splitlines()) == 1
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []


def test_a_model_name_that_is_not_local_fails_at_once(capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(_model, "_hub_reachable", lambda: False)  # no network, on any machine
    start = time.perf_counter()
    assert main(["attribute", "--input", PROMPT, "--model", "no/such-model"]) == 2
    assert time.perf_counter() - start < 2.0
    err = capsys.readouterr().err
    assert err.startswith("attrax: error: `model` 'no/such-model' does not exist locally")
    assert len(err.splitlines()) == 1


def test_dtype_runs_the_model_in_half_precision(tmp_path):
    runs = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.nc"
        args = ["attribute", "--input", PROMPT, "--target", TARGET, "--out", str(out)]
        assert main([*args, "--dtype", dtype]) == 0
        runs[dtype] = ax.load(out)
    half, full = runs["bfloat16"], runs["float32"]
    assert half.dtype == np.float32
    assert not np.array_equal(half.values, full.values, equal_nan=True)
    np.testing.assert_allclose(half.values, full.values, atol=0.05)


def test_demo_refuses_a_prompt_the_model_cannot_solve(capsys):
    assert main(["demo", "--prompt", "1 2 3 ="]) == 2
    assert "exactly 6 distinct digits" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command", [[], ["demo"], ["attribute"], ["attribute-dataset"], ["evaluate"]]
)
def test_help(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "usage: attrax" in out
    assert "%%" not in out  # argparse %-formats help= strings but not descriptions
    if command == ["evaluate"]:
        assert "95% bootstrap interval" in " ".join(out.split())


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["attribute"])
    assert exit_.value.code == 2
    assert "--input" in capsys.readouterr().err
    assert main([]) == 2
    capsys.readouterr()  # the help main([]) prints
    # argparse's own errors are one line too: it printed the usage block above (until 2026-12-06)
    for args in (["attribute", "--input", "a", "--steps", "-3"], ["bogus"], ["evaluate"]):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("attrax: error: "), err
        assert err.count("\n") == 1 and "--help')" in err, err


def test_attribute_dataset_command(tmp_path, capsys, write_jsonl):
    first = {"input": "1 2 3 4 5 6 =", "target": " 6 5 4 3 2 1", "id": "a"}
    data = write_jsonl([first, {"input": "4 5 6 7 8 9 ="}])
    out = tmp_path / "out"
    assert main(["attribute-dataset", "--data", str(data), "--out", str(out), "--quiet"]) == 2
    assert "1 of 2 records have a 'target'" in capsys.readouterr().err
    write_jsonl([first])
    assert main(["attribute-dataset", "--data", str(data), "--out", str(out), "--quiet"]) == 0
    assert "1 record in 1 shard" in capsys.readouterr().out
    assert ax.load(out / "shard-00000.nc").id.values.tolist() == ["a"]


def test_attribute_dataset_resumes_with_a_default_given_and_names_bad_lines(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"input": "1 2 3 =", "target": " 3 2 1"}\n' * 3)
    out = tmp_path / "out"
    args = ["attribute-dataset", "--data", str(data), "--out", str(out), "--quiet"]
    args += ["--method", "integrated_gradients", "--shard-size", "2"]
    assert main([*args, "--steps", "8"]) == 0
    assert main([*args, "--steps", "8", "-o", "baseline=zeros"]) == 0  # the default
    assert "(2 already done)" in capsys.readouterr().out
    assert main([*args, "--steps", "9"]) == 2
    assert "option steps: was 8, now 9" in capsys.readouterr().err
    data.write_text(data.read_text() + '{"input": "1 2 3 =", "target": "3 2 1"}\n')
    assert main([*args, "--steps", "8", "--out", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attrax: error: data.jsonl line 4: `target` '3 2 1' does not continue")


def test_help_and_import_load_neither_torch_nor_transformers():
    """`import attrax` and `attrax --help` answer at once: heavy imports wait for a name's use."""
    code = (
        "import sys, attrax\n"
        "from attrax.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'xarray') if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "attribute-dataset" in run.stdout
    assert run.stdout.strip().splitlines()[-1] == "[]"


def test_every_public_name_resolves():
    """In a fresh interpreter (nothing imported yet), every name of ``__all__`` imports lazily to
    an object that attrax defines, and once."""
    code = (
        "import attrax as ax\n"
        "for name in ax.__all__:\n"
        "    obj = getattr(ax, name)\n"
        "    print(name, 'str' if isinstance(obj, str) else obj.__module__)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rows = [line.split() for line in run.stdout.splitlines()]
    names = [name for name, _ in rows]
    assert len(names) == len(set(names)) > 0
    assert {name: module for name, module in rows if not module.startswith("attrax")} == {
        "__version__": "str"
    }
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ax.nope  # noqa: B018


def test_type_checking_imports_mirror_the_public_table():
    """``__init__``'s imports for type checkers name each public name from its table module."""
    import ast
    from pathlib import Path

    from attrax._names import PUBLIC

    source = Path(ax.__file__).read_text()
    found = {}
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 1
            and node.module
            not in (
                "_names",
                "_version",
            )
        ):
            for alias in node.names:
                found[alias.name] = f".{node.module}"
    assert found == PUBLIC


def test_every_attribution_method_can_be_named_by_the_cli_and_datasets():
    """The methods a CLI call or a dataset run may name are every public function of a method
    family but the scores and metrics (conductance was public and unknown to the CLI)."""
    from attrax._names import METHODS, PUBLIC

    families = {
        n: getattr(ax, n).attrax_family for n in PUBLIC if hasattr(getattr(ax, n), "attrax_family")
    }
    metrics = ("faithfulness", "step_scores", "circuit_faithfulness")
    methods = {n for n, family in families.items() if family not in metrics}
    assert methods == set(METHODS)


def test_the_cli_page_names_every_command_and_method():
    """docs/cli.md's command count and ``--method`` list, and ``-o``'s example, follow the code."""
    from pathlib import Path

    from attrax._names import METHODS
    from attrax.cli import build_parser

    page = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    count = ["no", "One", "Two", "Three", "Four", "Five", "Six"][len(commands)]
    assert f"{count} commands, each with `--help`" in page
    row = next(line for line in page.splitlines() if line.startswith("| `--method` |"))
    assert tuple(re.findall(r"`(\w+)`", row)) == METHODS
    help_text = next(a for a in build_parser()._actions if a.dest == "command")
    attribute = help_text.choices["attribute"].format_help()
    example = re.search(r"-o baseline=(\w+) -o (\w+)=", " ".join(attribute.split()))
    assert example and example[2] in inspect.signature(ax.integrated_gradients).parameters


def test_the_packages_modules_import_one_way():
    """No module imports one that imports it back, inside functions included: the Dask layer
    imported the dataset runs and evaluations that import it until 2026-12-06."""
    import ast

    root = Path(ax.__file__).parent
    modules = {path.stem: path for path in root.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        graph[name] = (deps & set(modules)) - {name}
    order: list[str] = []
    while len(order) < len(graph):  # peel modules whose imports are all placed: fails on a cycle
        ready = [m for m, deps in graph.items() if m not in order and deps <= set(order)]
        assert ready, f"import cycle among {sorted(set(graph) - set(order))}"
        order += ready


def test_paths_texts_and_undefined_intervals_print_as_they_are(tmp_path, capsys):
    """rich read them as markup: a path with "[/x]" was a raw MarkupError after the files were
    written, and a summary's "nan [nan, nan]" showed as "nan" (a point value) until 2026-12-06."""
    import pandas as pd
    from rich.console import Console

    from attrax.cli import _summary_table

    folder = tmp_path / "d[" / "x]"  # the path reads "d[/x]/a.html"
    folder.mkdir(parents=True)
    html = folder / "a.html"
    assert main(["demo", "--html", str(html)]) == 0
    assert html.is_file() and str(html) in capsys.readouterr().out
    columns = pd.MultiIndex.from_product([["auprc"], ["mean", "low", "high"]])
    table = pd.DataFrame([[0.1, np.nan, np.inf]], index=["ig[steps=8]"], columns=columns)
    console = Console(file=__import__("io").StringIO(), width=120)
    console.print(_summary_table(table, console.width))
    assert "0.100 [nan, inf]" in console.file.getvalue()
    assert "ig[steps=8]" in console.file.getvalue()  # a method's name, not a style tag
