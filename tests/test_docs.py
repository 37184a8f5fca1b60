"""Every code block of README.md and docs/**/*.md runs (or is checked) here.

One test per block, its id ``page:line`` (the line of the opening fence). The blocks of a page run
in document order in one namespace and one fresh temporary working directory, as a reader pasting
them one after the other would; running a single block first runs the page's earlier blocks.

- ```python blocks are executed. A block that is not valid Python but reads
  ``[name =] ax.function(parameters) [-> type]`` is a signature: its parameters (names, kinds,
  defaults) must equal ``inspect.signature`` of the public function.
- ```bash blocks: each ``attrax ...`` command (``\\`` continuations joined, ``#`` comments
  dropped) runs in-process through ``attrax.cli.main`` and must exit 0. Lines in ``SKIP`` are
  not run, for the reason given there; any other line fails the test until it is run or skipped.
- ```console blocks: each ``$ attrax ...`` command runs through ``main``; its output must equal
  the lines shown (trailing spaces and blank lines aside) and its exit status must be 2 when the
  output is an ``attrax: error:``, else 0.
- Plain ``` blocks that start with ``attrax COMMAND`` are usage synopses: they must name every
  option of that command's parser and no other, with the parser's choices where they list
  ``a|b|c``, and ``[...]`` around exactly the options that are not required.
- The generated benchmark pages (docs/benchmarks*.md) contribute their python blocks only.

Placeholders: the docs use the built-in model (``ax.load_model()``) or a model they save
themselves. Two files stand for what a CLI user brings, and are created in a page's directory
when the page names them (``FIXTURES``): ``my-gpt2/`` (a tiny offline GPT-2 with a byte-level
BPE tokenizer, ``attrax.testing.save_tiny_model``) and ``prompts.jsonl`` (held-out prompts of
the built-in model's task, with their answers).

Stand-ins: commands a page calls that this machine lacks (``COMMANDS``) are written to the page
directory's ``bin/``, first on ``PATH`` while its blocks run, when the page names them: SLURM's
``sbatch`` and ``scancel`` for docs/experiments.md's dask-jobqueue example (the job scripts run
here, in the background).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import io
import json
import os
import re
import shlex
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import attrax as ax
from attrax._default_model_task import make_example
from attrax.cli import build_parser, main
from attrax.testing import save_tiny_model

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
GENERATED = ("docs/benchmarks.md", "docs/benchmarks-gpu.md")  # written by benchmarks/
RUN = ("python", "bash", "console")

# shell lines a test cannot run, by how they start
SKIP = {
    "python3 -m venv": "creates a virtual environment and installs packages from the network",
    ".venv/bin/pip": "installs packages from the network",
    "bash .ci/run": "installs everything, then runs the whole test suite (this file included)",
}

# a signature block: `[name =] ax.function(parameters) [-> type]`
SIGNATURE = re.compile(r"^(?:\w+\s*=\s*)?ax\.(\w+)\((.*)\)\s*(?:->.*)?$", re.S)


def _write_prompts(path: Path) -> None:
    # 48 records: docs/cli.md selects example 41
    records = [make_example(seed, split="heldout") for seed in range(48)]
    lines = [json.dumps({"input": prompt, "target": target}) for prompt, target in records]
    path.write_text("\n".join(lines) + "\n")


FIXTURES: dict[str, Callable[[Path], object]] = {
    "my-gpt2": lambda path: save_tiny_model("gpt2", path),
    "prompts.jsonl": _write_prompts,
}


# sbatch runs the job script on this machine, in the background and in a session of its own (so
# scancel ends the job's whole process tree), and answers as SLURM's does
_SBATCH = """#!/usr/bin/env bash
# a stand-in for SLURM's sbatch (tests/test_docs.py): runs the job script on this machine
set -euo pipefail
jobs="$(cd "$(dirname "$0")/.." && pwd -P)/slurm-jobs"
mkdir -p "$jobs"
id=$$
cp "$1" "$jobs/$id.sh"  # the submitter may delete its script once sbatch returns
setsid bash "$jobs/$id.sh" >"$jobs/$id.log" 2>&1 </dev/null &
echo $! >"$jobs/$id.pid"
echo "Submitted batch job $id"
"""
_SCANCEL = """#!/usr/bin/env bash
# a stand-in for SLURM's scancel (tests/test_docs.py): ends each job's process group
jobs="$(dirname "$0")/../slurm-jobs"
for id in "$@"; do
  kill -TERM -- "-$(cat "$jobs/$id.pid")" 2>/dev/null || true
  rm -f "$jobs/$id.pid"
done
"""
COMMANDS = {"sbatch": _SBATCH, "scancel": _SCANCEL}


@dataclass
class Block:
    page: str  # relative to the repository root
    line: int  # of the opening fence
    lang: str
    text: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def read_blocks(page: Path) -> list[Block]:
    """The fenced blocks of ``page`` whose language is in ``RUN``."""
    name = page.relative_to(ROOT).as_posix()
    blocks, lines, i = [], page.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^```(\S*)", lines[i])
        if fence is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        lang = fence[1]
        text = "\n".join(lines[i + 1 : end])
        synopsis = lang == "" and text.startswith("attrax ")
        if (lang in RUN or synopsis) and (name not in GENERATED or lang == "python"):
            blocks.append(Block(name, i + 1, lang, text))
        i = end + 1
    return blocks


BLOCKS = [block for page in PAGES for block in read_blocks(page)]


@dataclass
class PageRun:
    """One page's namespace and directory, and how far through its blocks it has run."""

    directory: Path
    namespace: dict = field(default_factory=dict)
    done: int = 0
    failed: Block | None = None  # the first block that failed and that later blocks may need
    errors: dict[int, BaseException] = field(default_factory=dict)  # by index in the page


@pytest.fixture(scope="session")
def page_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], PageRun]]:
    runs: dict[str, PageRun] = {}

    def get(page: str) -> PageRun:
        if page not in runs:
            directory = tmp_path_factory.mktemp(re.sub(r"\W", "_", page))
            text = (ROOT / page).read_text(encoding="utf-8")
            for name, make in FIXTURES.items():
                if name in text:
                    make(directory / name)
            for name, script in COMMANDS.items():
                if name in text:
                    (directory / "bin").mkdir(exist_ok=True)
                    (directory / "bin" / name).write_text(script)
                    (directory / "bin" / name).chmod(0o755)
            runs[page] = PageRun(directory)
        return runs[page]

    yield get
    # a stand-in SLURM job that a block which failed before closing its cluster left running
    # (its pid file is still there): killed if that pid still runs this job's script
    for run in runs.values():
        for pid_file in (run.directory / "slurm-jobs").glob("*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text())
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
                if str(pid_file.resolve().with_suffix(".sh")).encode() in command:
                    os.killpg(pid, signal.SIGKILL)


def _cli(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = main(argv)
    return status, out.getvalue()


def _shell_lines(text: str) -> list[str]:
    return [line.strip() for line in text.replace("\\\n", " ").splitlines() if line.strip()]


def _argv(line: str) -> list[str] | None:
    """The arguments of an ``attrax`` command line, or None for another command."""
    words = shlex.split(line, comments=True)
    if words and (words[0] == "attrax" or words[0].endswith("/bin/attrax")):
        return words[1:]
    return None


def _check_signature(block: Block, name: str, parameters: str) -> None:
    documented = ast.parse(f"def f({parameters}): pass").body[0].args
    positional = documented.posonlyargs + documented.args
    defaults = [None] * (len(positional) - len(documented.defaults)) + documented.defaults
    written = [(a.arg, "positional", d) for a, d in zip(positional, defaults, strict=True)]
    written += [
        (a.arg, "keyword", d)
        for a, d in zip(documented.kwonlyargs, documented.kw_defaults, strict=True)
    ]
    actual = inspect.signature(getattr(ax, name)).parameters.values()
    expected = [
        (p.name, "keyword" if p.kind is p.KEYWORD_ONLY else "positional", p.default)
        for p in actual
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    assert [(n, k) for n, k, _ in written] == [(n, k) for n, k, _ in expected], (
        f"{block}: the signature of ax.{name} in the docs differs from the code's "
        f"{inspect.signature(getattr(ax, name))}"
    )
    for (n, _, doc_default), (_, _, default) in zip(written, expected, strict=True):
        doc_value = (
            inspect.Parameter.empty if doc_default is None else ast.literal_eval(doc_default)
        )
        assert doc_value == default, f"{block}: ax.{name}'s `{n}` defaults to {default!r}"


def _is_signature(block: Block) -> bool:
    if block.lang != "python" or SIGNATURE.match(block.text) is None:
        return False
    try:
        compile(block.text, str(block), "exec")
    except SyntaxError:
        return True
    return False


def _run_python(block: Block, namespace: dict) -> None:
    if _is_signature(block):
        signature = SIGNATURE.match(block.text)
        _check_signature(block, signature[1], signature[2])
    else:
        exec(compile(block.text, str(block), "exec"), namespace)


def _run_bash(block: Block) -> None:
    for line in _shell_lines(block.text):
        if line.startswith("#"):
            continue
        argv = _argv(line)
        if argv is None:
            reason = next((why for start, why in SKIP.items() if line.startswith(start)), None)
            assert reason is not None, f"{block}: a line the harness neither runs nor skips: {line}"
            continue
        status, out = _cli(argv)
        assert status == 0, f"{block}: `{line}` exited {status}:\n{out}"


def _check_synopsis(block: Block) -> None:
    words = shlex.split(block.text)
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = commands.choices[words[1]]
    actions = [a for a in command._actions if not isinstance(a, argparse._HelpAction)]
    known = {option: a for a in actions for option in a.option_strings}
    # `[--opt X]`, `--opt X`, `[-o KEY=VALUE ...]`, `[--a X | --b Y]` (one or the other): an
    # option and whether it is bracketed
    shown: dict[str, tuple[bool, str | None]] = {}
    pattern = r"(\[|\| )?(?<![\w-])(--?[a-z][\w-]*)(?:\s+([^\s\]]+))?"
    for match in re.finditer(pattern, block.text):
        shown[match[2]] = (match[1] in ("[", "| "), match[3])
    unknown = sorted(set(shown) - set(known))
    assert not unknown, f"{block}: `attrax {words[1]}` has no option {unknown}"
    missing = [a.option_strings[-1] for a in actions if not set(a.option_strings) & set(shown)]
    assert not missing, f"{block}: the synopsis of `attrax {words[1]}` leaves out {missing}"
    for option, (optional, value) in shown.items():
        action = known[option]
        assert optional == (not action.required), (
            f"{block}: {option} is required: {action.required}"
        )
        if action.choices and value and "|" in value:
            assert tuple(value.split("|")) == tuple(action.choices), (
                f"{block}: {option} takes {'|'.join(action.choices)}"
            )


def _run_console(block: Block) -> None:
    # a command (`$ ...`) followed by the output it prints
    transcripts = re.split(r"^\$ ", block.text, flags=re.M)[1:]
    for transcript in transcripts:
        command, _, shown = transcript.partition("\n")
        argv = _argv(command)
        assert argv is not None, f"{block}: only `attrax` commands run here: {command}"
        status, out = _cli(argv)

        def lines(text: str) -> list[str]:
            return [line.rstrip() for line in text.splitlines() if line.strip()]

        expected = lines(shown)
        error = bool(expected) and expected[0].startswith("attrax: error:")
        assert status == (2 if error else 0), f"{block}: `{command}` exited {status}:\n{out}"
        if error:  # wrapped in the docs
            assert " ".join(lines(out)) == " ".join(expected), f"{block}: {command}"
        else:
            assert lines(out) == expected, f"{block}: `{command}` printed:\n{out}"


@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_doc_block(
    block: Block, page_runs: Callable[[str], PageRun], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = page_runs(block.page)
    monkeypatch.chdir(run.directory)
    if (run.directory / "bin").is_dir():  # the page's stand-in commands come first
        monkeypatch.setenv("PATH", f"{run.directory / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("COLUMNS", "80")  # the width the console transcripts were taken at
    monkeypatch.setenv("MPLBACKEND", "Agg")
    page = [b for b in BLOCKS if b.page == block.page]
    index = page.index(block)
    while run.done <= index:
        current = page[run.done]
        run.done += 1
        # synopses and signatures neither need nor change what earlier blocks made
        stateful = current.lang != "" and not _is_signature(current)
        try:
            if stateful and run.failed is not None:
                pytest.fail(f"{current} needs {run.failed}, which failed")
            if current.lang == "python":
                _run_python(current, run.namespace)
            elif current.lang == "":
                _check_synopsis(current)
            elif current.lang == "bash":
                _run_bash(current)
            else:
                _run_console(current)
        except (Exception, pytest.fail.Exception) as err:
            run.errors[run.done - 1] = err
            if stateful and run.failed is None:
                run.failed = current
    # raised here, also when the block ran earlier as another block's prerequisite
    if index in run.errors:
        raise run.errors[index]


def test_every_page_is_collected() -> None:
    """The pages with code, so a page renamed or moved out of docs/ is noticed."""
    pages = {block.page for block in BLOCKS}
    assert {"README.md", "docs/quickstart.md", "docs/recipes.md", "docs/cli.md"} <= pages
    assert all(block.text.strip() for block in BLOCKS)
