"""The ``attrax`` command: ``demo``, ``attribute``, ``attribute-dataset`` and ``evaluate``.

Errors that attrax raises on purpose (bad option, unreadable file, mismatched data) print one
``attrax: error: ...`` line and exit with status 2, like argparse's own usage errors; no traceback.

>>> main(["attribute", "--method", "saliency", "--input", "1 2 3 =", "--target", " 3 2 1",
...       "--reduce", "nonsense"])
2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from ._names import METHODS

if TYPE_CHECKING:
    from pathlib import Path

    import xarray as xr
    from rich.console import Console

__all__ = ["build_parser", "main"]

DTYPES = ("float32", "bfloat16", "float16")
_GRADIENT_METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "smoothgrad")
_METHOD_HELP = "attribution method: saliency (default) or any of " + ", ".join(METHODS[1:])
_REDUCE_HELP = (
    "comma-separated reductions, each NAME or NAME:DIM, applied in order; NAME is one of "
    "l2_norm, sum, mean, max, absmax, normalize, rescale. 'auto' (default): l2_norm over hidden, "
    "mean over layer/head, then normalize over source (edges are kept as they are). 'none': keep "
    "the raw array"
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``attrax`` command line; returns the exit status (0 ok, 2 error, 130 Ctrl-C)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help(sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    from ._errors import AttraxError

    # a progress bar per weight file is noise next to attrax's own output
    hf_logging.disable_progress_bar()
    tokenizer_log = logging.getLogger("transformers.tokenization_utils_base")
    tokenizer_log.addFilter(_no_length_warning)
    try:
        return int(args.handler(args))
    except (AttraxError, OSError) as err:
        message = str(err)
        if isinstance(err, OSError) and err.strerror and err.filename:
            message = f"{err.strerror}: {err.filename}"
        print(f"attrax: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = (
            "; run the same command again to resume" if args.command == "attribute-dataset" else ""
        )
        print(f"attrax: interrupted{hint}", file=sys.stderr)
        return 130
    finally:
        tokenizer_log.removeFilter(_no_length_warning)


def _no_length_warning(record: logging.LogRecord) -> bool:
    # attrax checks lengths against the model's positions itself; this would be a 2nd stderr line
    return not record.getMessage().startswith("Token indices sequence length is longer")


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are one line, as attrax's own are (argparse printed
    the whole usage block, up to 12 lines, above it); sub-parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"attrax: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``attrax`` command (one sub-parser per command)."""
    from ._version import __version__

    parser = _Parser(
        prog="attrax",
        description="Attribution for Hugging Face language models: what each generated token "
        "is based on.",
        epilog="Run 'attrax COMMAND --help' for a command's options. Docs: docs/cli.md",
    )
    parser.add_argument("--version", action="version", version=f"attrax {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="attribute an example on the built-in offline model and check it against the truth",
        description="Run the built-in model (a tiny GPT-2 that reverses 6 digits: "
        "'3 1 4 0 5 9 =' -> ' 9 5 0 4 1 3') on an example, attribute its answer, print the "
        "L2-normalised relevance and "
        "how many answer tokens put their top score on the digit they copy. With --task "
        "classification: the built-in classifier (a tiny BERT that labels a text by its one marker "
        "word, e.g. 'the plot was awful' -> negative); the check is whether the top score falls on "
        "the marker. Needs no network.",
    )
    demo.add_argument(
        "--task",
        default="generation",
        choices=("generation", "classification"),
        help="which built-in model (default: generation)",
    )
    demo.add_argument(
        "--method", default="saliency", choices=_GRADIENT_METHODS, help="(default: saliency)"
    )
    demo.add_argument(
        "--prompt", help="6 distinct digits and '=', e.g. '3 1 4 0 5 9 =' (default: a drawn one)"
    )
    demo.add_argument(
        "--text",
        help="classification: filler words with one marker, e.g. 'the plot was awful' "
        "(default: a drawn held-out text)",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the drawn example (default 0)")
    demo.add_argument("--html", metavar="FILE", help="also write an HTML heatmap to FILE")
    demo.set_defaults(handler=_demo)

    attribute = commands.add_parser(
        "attribute",
        help="attribute one input (and target) and print, save or draw the result",
        description="Attribute the target (or, without --target, the greedy continuation) of one "
        "input, reduce it to (target, source) and print it as a coloured table.",
    )
    _model_options(attribute)
    attribute.add_argument("--input", required=True, help="the prompt / source text")
    attribute.add_argument(
        "--input-pair",
        help="a classifier's second text (NLI-style (text, text_pair) input); a "
        "question-answering model's context (--input is the question)",
    )
    attribute.add_argument(
        "--target",
        help="the continuation / translation to explain (default: generate one); a classifier's "
        "label or class id, or 'all'; a question-answering model's answer, a text of the context "
        "(default: predicted)",
    )
    attribute.add_argument("--out", metavar="FILE.nc", help="save the result as netCDF (ax.save)")
    attribute.add_argument("--html", metavar="FILE", help="write an HTML heatmap (ax.show)")
    attribute.add_argument("--png", metavar="FILE", help="write a PNG heatmap (ax.plot)")
    attribute.set_defaults(handler=_attribute)

    dataset = commands.add_parser(
        "attribute-dataset",
        help="attribute a JSONL file in resumable netCDF shards",
        description='Attribute every line of a JSONL file ({"input": ..., "target": ... '
        '(optional), "id": ... (optional), "contrast": ... (optional: what the target is '
        'explained against); classifiers also "input_pair" and "label"; a '
        'question-answering model\'s "input" is the question, "input_pair" the context, "target" '
        "the answer}), one netCDF shard per --shard-size records in DIR, "
        "with a manifest. Rerun the same command after an interruption to resume. Load the "
        "result with attrax.load_dataset_results(DIR).",
    )
    _model_options(dataset)
    dataset.add_argument("--data", required=True, metavar="FILE.jsonl", help="the records")
    dataset.add_argument("--out", required=True, metavar="DIR", help="the output directory")
    dataset.add_argument(
        "--shard-size",
        type=_positive,
        default=8,
        help="records per shard, given to the method in one call (default 8)",
    )
    dataset.add_argument("--quiet", action="store_true", help="no progress bar")
    _dask_options(dataset)
    dataset.set_defaults(handler=_attribute_dataset)
    _evaluate_parser(commands)
    return parser


def _evaluate_parser(commands: Any) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="compare attribution methods on a dataset: faithfulness, plausibility, agreement",
        description="Attribute every record of --data with every method of --methods, score "
        "each attribution with --metrics and print the method-by-metric table (mean and 95% "
        "bootstrap interval over examples: attrax.evaluate, attrax.summary).",
    )
    evaluate.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help="the records: JSONL, CSV or Parquet, or a datasets save_to_disk folder",
    )
    evaluate.add_argument(
        "--methods",
        required=True,
        metavar="M1,M2",
        help="comma-separated method names (as attrax attribute --method takes them)",
    )
    evaluate.add_argument(
        "--metrics",
        default="comprehensiveness,sufficiency",
        metavar="NAMES",
        help="comma-separated: comprehensiveness, sufficiency, deletion, insertion, "
        "taucorr_loo, token_f1, iou, auprc, spearman, kendall, topk_overlap (default "
        "comprehensiveness,sufficiency)",
    )
    evaluate.add_argument(
        "--model", metavar="PATH", help="model directory or hub name (default: the built-in model)"
    )
    evaluate.add_argument("--device", help="where to run the model, e.g. cuda (default: cpu)")
    evaluate.add_argument(
        "--dtype", choices=DTYPES, help="precision to load the model in (default: as saved)"
    )
    evaluate.add_argument("--reduce", default="auto", help=_REDUCE_HELP)
    evaluate.add_argument(
        "--objective", choices=("probability", "logprob", "logit"), help="(default: probability)"
    )
    evaluate.add_argument(
        "--steps", type=_positive, help="`steps` of the methods that take it (integrated_gradients)"
    )
    evaluate.add_argument(
        "--samples", type=_positive, help="`samples` of the methods that take it (smoothgrad...)"
    )
    evaluate.add_argument(
        "--max-new-tokens",
        type=_positive,
        help="tokens to generate for records without a target (default 20)",
    )
    evaluate.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other keyword option, given to every method that takes it, VALUE as JSON or "
        "a plain string (e.g. -o baseline=pad); repeatable",
    )
    evaluate.add_argument(
        "--field",
        action="append",
        default=[],
        metavar="KEY=NAME",
        help="the data's name for input, target, label, rationale, input_pair (a classifier's "
        "second text, a question-answering model's context) or contrast (what the target is "
        "explained against), e.g. --field input=text",
    )
    evaluate.add_argument("--top-k", type=_positive, default=3, help="k of topk_overlap (3)")
    evaluate.add_argument(
        "--batch-size", type=_positive, help="perturbed copies per forward (default: auto)"
    )
    evaluate.add_argument(
        "--attributions", action="store_true", help="keep the attributions in --out"
    )
    evaluate.add_argument("--out", metavar="FILE.nc", help="save the scores as netCDF (ax.save)")
    evaluate.add_argument("--csv", metavar="FILE", help="write the summary table as CSV")
    evaluate.add_argument("--png", metavar="FILE", help="draw the summary table (ax.plot)")
    evaluate.add_argument(
        "--shard-size",
        type=_positive,
        default=16,
        help="with --workers/--scheduler: records per task, scored in one batch (default 16)",
    )
    _dask_options(evaluate)
    evaluate.set_defaults(handler=_evaluate)


def _dask_options(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--workers",
        type=_workers,
        metavar="N",
        help="run the shards on a local Dask cluster of N worker processes, one torch thread "
        "each ('auto': one per GPU with --device cuda, else one per core); needs "
        "attrax[distributed] and a --model path (default: in this process)",
    )
    where.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run the shards on the Dask cluster at ADDRESS (tcp://host:8786); its workers "
        "must reach --model",
    )


def _evaluate(args: argparse.Namespace) -> int:
    import functools

    from ._dataset import resolve_method, resolve_options
    from ._errors import OptionError
    from ._evaluate import FIELDS, evaluate, summary
    from ._model import load_model
    from .io import save, write_atomically
    from .viz import plot

    methods = {}
    given = {"objective": args.objective, "steps": args.steps, "samples": args.samples}
    given["max_new_tokens"] = args.max_new_tokens
    extra = _given_options(args)  # -o KEY=VALUE
    given |= extra
    used: set[str] = set()
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not names:
        raise OptionError(
            f"`--methods` names no method, got {args.methods!r}: give a list such as saliency,occlusion"
        )
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise OptionError(f"`--methods` names {', '.join(twice)} twice: each method is one row")
    for name in names:
        fn = resolve_method(name)
        taken = set(resolve_options(fn, {}))
        used |= taken
        methods[name] = functools.partial(
            fn, **{k: v for k, v in given.items() if v is not None and k in taken}
        )
    unused = [k for k, v in given.items() if v is not None and k not in used]
    if unused:  # each method takes what applies to it; one none takes would change nothing
        name, value = unused[0], given[unused[0]]
        said = f"-o {name}={value!r}" if name in extra else f"--{name.replace('_', '-')} {value}"
        raise OptionError(
            f"`{said}` applies to none of --methods {args.methods!r}: no method of them takes "
            f"`{name}`"
        )
    fields = {}
    for item in args.field:
        key, sep, value = item.partition("=")
        if not sep or key not in FIELDS or not value:
            raise OptionError(
                f"`--field` {item!r}: expected KEY=NAME, KEY one of {', '.join(FIELDS)}"
            )
        fields[key] = value
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    _check_outputs({"--out": args.out, "--csv": args.csv, "--png": args.png}, args.data)
    dask = {"workers": args.workers, "scheduler": args.scheduler, "shard_size": args.shard_size}
    if args.workers is None and args.scheduler is None:
        model: Any = load_model(args.model, device=_device(args.device), dtype=_dtype(args.dtype))
    else:  # each worker loads it
        model = args.model
        dask.update(device=_device(args.device), dtype=_dtype(args.dtype))
    with _flags_named(_DATA_FLAGS), _options_named(extra):
        ds = evaluate(
            model,
            args.data,
            methods,
            metrics,
            reduce=args.reduce,
            top_k=args.top_k,
            batch_size="auto" if args.batch_size is None else args.batch_size,
            attributions=args.attributions,
            fields=fields,
            **dask,
        )
    table = summary(ds)
    written = _write_outputs(
        [
            ("--out", args.out, lambda tmp: save(ds, tmp)),
            ("--csv", args.csv, lambda tmp: write_atomically(tmp, table.to_csv)),
            ("--png", args.png, lambda tmp: plot(table, path=tmp)),
        ]
    )
    console = _console()
    console.print(_summary_table(table, console.width))
    for path in written:
        console.print(f"wrote {_escape(str(path))}", soft_wrap=True)
    return 0


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", metavar="PATH", help="model directory or hub name (default: the built-in model)"
    )
    parser.add_argument("--device", help="where to run the model, e.g. cuda (default: cpu)")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        help="precision to load the model in (default: as saved); results are float32 either way",
    )
    parser.add_argument("--method", default="saliency", help=_METHOD_HELP)
    parser.add_argument("--reduce", default="auto", help=_REDUCE_HELP)
    parser.add_argument(
        "--objective",
        choices=("probability", "logprob", "logit"),
        help="(default: probability; lrp: logit)",
    )
    parser.add_argument(
        "--steps",
        type=_positive,
        help="the method's `steps`: integration points (integrated_gradients)",
    )
    parser.add_argument(
        "--samples",
        type=_positive,
        help="the method's `samples`: noisy, random or perturbed copies (smoothgrad, gradient_shap, "
        "lime, kernel_shap, sobol...)",
    )
    parser.add_argument(
        "--max-new-tokens", type=_positive, help="tokens to generate when there is no target"
    )
    parser.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other keyword option of the method, VALUE as JSON or a plain string "
        "(e.g. -o baseline=pad -o quadrature=riemann_middle; a space at either end keeps it a "
        "string: -o 'contrast= 5'); repeatable",
    )


# --- commands -------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from ._errors import OptionError

    given = "--text" if args.task == "generation" and args.text else None
    given = given or ("--prompt" if args.task == "classification" and args.prompt else None)
    if given:
        raise OptionError(f"`{given}` does not apply to `--task {args.task}`")
    if args.task == "classification":
        return _demo_classification(args)
    from ._dataset import call_method, resolve_method
    from ._default_model_task import N_DIGITS, ground_truth, make_example, solve
    from ._errors import InputError
    from ._model import load_model
    from ._reduce import l2_norm, normalize
    from .viz import show

    _check_output(args.html, "--html")
    console = _console()
    prompt = args.prompt if args.prompt is not None else make_example(args.seed, split="heldout")[0]
    try:
        expected = solve(prompt)
    except ValueError:
        expected = ""
    digits = expected.split()
    if len(digits) != N_DIGITS or len(set(digits)) != N_DIGITS:
        raise InputError(
            f"`--prompt` {prompt!r}: the built-in model reverses exactly {N_DIGITS} distinct "
            "digits followed by '=', e.g. '3 1 4 0 5 9 ='"
        )
    model = load_model()
    with console.status(f"attributing with {args.method}…"):
        # exactly the answer digits, no EOS: 12 source columns fit an 80-column terminal
        options = {"max_new_tokens": N_DIGITS}
        raw = call_method(resolve_method(args.method), model, prompt, None, options)
    relevance = normalize(l2_norm(raw))

    tokenizer = model.tokenizer
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    truth = ground_truth(prompt_ids, tokenizer(expected, add_special_tokens=False)["input_ids"])
    answer = " ".join(relevance["target_token"].values.tolist())
    correct = answer.split() == digits
    console.print(
        f"[bold]attrax demo[/] · built-in model: a tiny GPT-2 that reverses {N_DIGITS} digits"
    )
    console.print(f"  prompt  [cyan]{_escape(prompt)}[/]")
    verdict = "[green]✓ correct[/]" if correct else f"[red]✗ expected[/] {expected.strip()}"
    console.print(f"  answer  [cyan]{_escape(answer)}[/]  {verdict}")
    console.print(f"  method  {args.method} → l2_norm → normalize")
    _table(console, relevance)

    hits, marks = 0, []
    for target, source in truth.items():
        if target not in relevance["target"].values:
            continue
        row = relevance.sel(target=target)
        top = int(row["source"][int(row.fillna(-1.0).argmax("source"))])
        hits += top == source
        token = relevance["target_token"].sel(target=target).item()
        copied = row["source_token"].sel(source=top).item()
        marks.append(f"{token}←{copied}{_tick(top == source)}")
    colour = "green" if hits == len(truth) else "yellow"
    console.print(
        f"[bold {colour}]{hits}/{len(truth)}[/] answer tokens put their top score on the digit "
        "they copy (the ground truth)"
    )
    console.print(f"  [dim]answer ← top source:[/] {'  '.join(marks)}")
    if args.html:
        show(relevance, path=args.html)
        console.print(f"wrote {_escape(args.html)}", soft_wrap=True)
    else:
        others = [m for m in _GRADIENT_METHODS if m != args.method]
        console.print(f"[dim]next: attrax demo --method {others[1]} --html demo.html[/]")
    return 0


def _demo_classification(args: argparse.Namespace) -> int:
    from ._dataset import call_method, resolve_method
    from ._default_classifier_task import BUILTIN_NAME, ground_truth, label_of, make_example
    from ._errors import InputError
    from ._model import load_model
    from ._reduce import l2_norm, normalize
    from .viz import show

    _check_output(args.html, "--html")
    console = _console()
    text = args.text if args.text is not None else make_example(args.seed, split="heldout")[0]
    try:
        truth = label_of(text)
    except ValueError:
        raise InputError(
            f"`--text` {text!r}: the built-in classifier labels texts with exactly one marker "
            "word (bad, awful, okay, fine, good, great, ...), e.g. 'the plot was awful'"
        ) from None
    model = load_model(BUILTIN_NAME)
    with console.status(f"attributing with {args.method}…"):
        raw = call_method(resolve_method(args.method), model, [text], None, {})  # predicted class
    relevance = normalize(l2_norm(raw))
    row = relevance.isel(example=0)
    predicted = str(row["predicted_label"].item())
    console.print("[bold]attrax demo[/] · built-in classifier: a tiny BERT, labels by marker word")
    console.print(f"  text       [cyan]{_escape(text)}[/]")
    verdict = "[green]✓ correct[/]" if predicted == truth else f"[red]✗ expected[/] {truth}"
    console.print(
        f"  predicted  [cyan]{predicted}[/] ({float(row['predicted_probability']):.2f})  {verdict}"
    )
    console.print(f"  method     {args.method} → l2_norm → normalize, for the predicted class")
    _table(console, row.dropna("target", how="all"))
    scores = row.sel(target=predicted)
    top = int(scores.fillna(-1.0).argmax("source"))
    tokens = [str(t) for t in row["source_token"].values.tolist()]
    marker = ground_truth(tokens)
    colour = "green" if top == marker else "yellow"
    console.print(
        f"[bold {colour}]top score on {tokens[top]!r}[/]{_tick(top == marker)} · the evidence "
        f"(ground truth) is the marker {tokens[marker]!r}"
    )
    if args.html:
        show(relevance, path=args.html, labels=[truth])
        console.print(f"wrote {_escape(args.html)}", soft_wrap=True)
    else:
        console.print("[dim]next: attrax demo --task classification --html demo.html[/]")
    return 0


def _tick(ok: bool) -> str:
    return " [green]✓[/]" if ok else " [red]✗[/]"


def _attribute(args: argparse.Namespace) -> int:
    from ._dataset import call_method, parse_reduce, reduce, resolve_method
    from ._errors import InputError, OptionError
    from ._model import load_model
    from .io import save
    from .viz import plot, show

    fn = resolve_method(args.method)
    steps = parse_reduce(args.reduce)
    options = _method_options(args, fn)
    _check_outputs({"--out": args.out, "--html": args.html, "--png": args.png})
    no_source = {
        "edge_attribution_patching": "(target, sender, receiver) edges",
        "edge_patching": "(target[, circuit]) effects",
        "knowledge_neurons": "(target, layer, neuron) scores",
    }
    if args.method in no_source and (args.html or args.png):
        raise OptionError(
            f"--html and --png draw (target, source) heatmaps; {args.method}'s "
            f"{no_source[args.method]} have no source: give --out (and read it with ax.load) "
            "or print them"
        )
    pooled = {dim for name, dim in steps or () if name not in ("normalize", "rescale")}
    graphs = steps is not None and not {"layer", "query"} <= pooled  # the routes stay graphs
    if args.method == "information_flow" and args.html and graphs:
        raise OptionError(
            "--html draws a (target, source) heatmap; information_flow's routes keep 'layer' "
            "and 'query' unless --reduce pools both (the default does): draw the routes with "
            "--png"
        )
    console = _console()
    model = load_model(args.model, device=_device(args.device), dtype=_dtype(args.dtype))
    inputs: Any = args.input
    if args.input_pair is not None:
        if model.task == "generation":
            raise InputError(
                f"--input-pair is the second text of a classifier's input; {model.name} is a "
                "language model: give --input alone"
            )
        inputs = (args.input, args.input_pair)
        corrupted = options.get("corrupted")
        if isinstance(corrupted, list) and [type(c) for c in corrupted] == [str, str]:
            options["corrupted"] = tuple(corrupted)  # JSON has no tuples: a pair's two texts
    with console.status(f"attributing with {args.method}…"), _flags_named():
        raw = call_method(fn, model, inputs, _target(model, args.target), options)
    da = reduce(raw, steps)
    # saved before printing: no way of printing the result may lose the files asked for
    written = _write_outputs(
        [
            ("--out", args.out, lambda tmp: save(da, tmp)),
            ("--html", args.html, lambda tmp: show(da, path=tmp)),
            ("--png", args.png, lambda tmp: plot(da, path=tmp)),
        ]
    )
    _print_result(console, da)
    for path in written:
        console.print(f"wrote {_escape(str(path))}", soft_wrap=True)
    return 0


def _target(model: Any, target: str | None) -> str | int | None:
    """``--target`` as the method takes it: a classifier's class id (``2``) as an int, unless
    a label is named so (a data file's label column reads the same way)."""
    classifies = model.task in ("sequence-classification", "token-classification")
    if classifies and target is not None and target.isdecimal():
        return target if target in model.labels.values() else int(target)
    return target


# the Python arguments an error names, as the flags `attrax attribute` takes them
_FLAGS = {"inputs": "--input", "targets": "--target", "max_new_tokens": "--max-new-tokens"}


@contextlib.contextmanager
def _options_named(extra: dict[str, Any]) -> Iterator[None]:
    """An option that ``-o`` gave every method, named as ``-o`` where one value cannot serve
    every record (evaluate's message names a method it was bound to)."""
    from ._errors import InputError

    try:
        yield
    except InputError as err:
        found = re.match(r"`methods\['[^']*'\]` binds one `(\w+)` for (\d+) records", str(err))
        if not found or found[1] not in extra:
            raise
        if found[1] == "contrast":  # a list would not survive --workers' shards
            raise InputError(
                f"`-o contrast=...` is one text for {found[2]} records: give each record its "
                "own as a 'contrast' field"
            ) from None
        raise InputError(
            f"`-o {found[1]}=...` is one value for {found[2]} records: give a JSON list of "
            f"{found[2]}, one per record in the data's order (-o '{found[1]}=[...]')"
        ) from None


# as the data-file commands (evaluate, attribute-dataset) take them: targets are a field
_DATA_FLAGS = {
    "max_new_tokens": "--max-new-tokens",
    "targets": "a 'target' field",
    **{name: f"--{name.replace('_', '-')}" for name in (
        "data", "out", "methods", "metrics", "reduce", "top_k", "batch_size", "shard_size",
        "workers", "scheduler",
    )},
}  # fmt: skip


@contextlib.contextmanager
def _flags_named(flags: dict[str, str] = _FLAGS) -> Iterator[None]:
    """Errors inside name the flags the user typed (``--input``), not the Python arguments
    (``inputs``, or ``max_new_tokens=13``)."""
    from ._errors import AttraxError

    try:
        yield
    except AttraxError as err:
        named = "|".join(flags)

        def flag(m: re.Match[str]) -> str:
            name = flags[m[1]]
            return f"`{name}`" if name.startswith("--") else name

        message = re.sub(rf"`({named})(\[\d+\])?`", flag, str(err))
        message = re.sub(
            rf"\b({named})=(\S+)",
            lambda m: f"{flags[m[1]]} {m[2]}" if flags[m[1]].startswith("--") else m[0],
            message,
        )
        if message == str(err):
            raise
        raise type(err)(message) from None


def _attribute_dataset(args: argparse.Namespace) -> int:
    from ._dataset import attribute_dataset, parse_reduce, resolve_method

    fn = resolve_method(args.method)
    parse_reduce(args.reduce)
    options = _method_options(args, fn)
    with _flags_named(_DATA_FLAGS):
        run = attribute_dataset(
            args.model,
            args.data,
            args.out,
            method=args.method,
            reduce=args.reduce,
            shard_size=args.shard_size,
            progress=not args.quiet,
            device=_device(args.device),
            dtype=_dtype(args.dtype),
            workers=args.workers,
            scheduler=args.scheduler,
            **options,
        )
    resumed = f" ({run.skipped} already done)" if run.skipped else ""
    _console().print(
        f"[green]✓[/] {_plural(run.records, 'record')} in {_plural(run.shards, 'shard')}"
        f"{resumed} → {_escape(str(run.out))}\n"
        f"  load them with: attrax.load_dataset_results({_escape(repr(str(run.out)))})"
    )
    return 0


# --- helpers --------------------------------------------------------------------------------


def _given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``-o KEY=VALUE`` options, each VALUE as JSON or a plain string; one also set by its
    own flag (``--steps``...) is an error."""
    from ._errors import OptionError

    options: dict[str, Any] = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"`-o {item}`: expected KEY=VALUE")
        if key.strip() in options:  # the last would win without a word
            raise OptionError(f"`-o {item}`: `{key.strip()}` is given twice; give it once")
        # text with a space at either end is a string (` 1`, a target token), never JSON's 1
        plain = value != value.strip()
        try:
            options[key.strip()] = value if plain else json.loads(value)
        except ValueError:
            options[key.strip()] = value
    flags = {"objective": args.objective, "max_new_tokens": args.max_new_tokens}
    flags |= {name: getattr(args, name) for name in ("steps", "samples")}
    for name, value in flags.items():
        if value is not None and name in options:
            flag = "--" + name.replace("_", "-")
            raise OptionError(
                f"`{flag} {value}` and `-o {name}=...` both set `{name}`; give it once"
            )
    return options


def _method_options(args: argparse.Namespace, fn: Any) -> dict[str, Any]:
    import inspect

    from ._errors import OptionError

    options = _given_options(args)
    if isinstance(options.get("corrupted"), dict):
        options["corrupted"] = _noise(options["corrupted"])
    if args.objective is not None:
        options["objective"] = args.objective
    if args.max_new_tokens is not None:
        options["max_new_tokens"] = args.max_new_tokens
    parameters = inspect.signature(fn).parameters
    for name in ("steps", "samples"):
        value = getattr(args, name)
        if value is None:
            continue
        if name not in parameters:
            others = [f"--{o}" for o in ("steps", "samples") if o != name and o in parameters]
            hint = f" (it takes {others[0]})" if others else ""
            raise OptionError(
                f"`--{name} {value}` does not apply to {args.method}: it has no `{name}` "
                f"option{hint}"
            )
        options[name] = value
    return options


def _noise(fields: dict[str, Any]) -> Any:
    """``-o corrupted={...}``: a JSON object is :class:`attrax.GaussianNoise`'s fields, or
    ``{"ablation": "zero"}`` (``"mean"``), an :class:`attrax.Ablation`."""
    import dataclasses

    from ._components import Ablation, GaussianNoise
    from ._errors import OptionError

    if "ablation" in fields:
        if len(fields) > 1:
            raise OptionError(
                f"`-o corrupted={json.dumps(fields)}`: an ablation is the one key "
                '"ablation" ({"ablation": "zero"} or {"ablation": "mean"})'
            )
        return Ablation(fields["ablation"])
    names = [f.name for f in dataclasses.fields(GaussianNoise)]
    unknown = sorted(set(fields) - set(names))
    if unknown:
        raise OptionError(
            f"`-o corrupted={json.dumps(fields)}`: a JSON object is ax.GaussianNoise's fields "
            f'({", ".join(names)}) or {{"ablation": "zero" | "mean"}}, with no '
            f"{unknown[0]!r}"
        )
    return GaussianNoise(**fields)


_EXAMPLES = {"--out": "x.nc", "--html": "a.html", "--png": "a.png", "--csv": "a.csv"}


def _check_outputs(paths: dict[str, str | None], data: str | None = None) -> None:
    """Check every output flag's file before the computation: each one writable, ``--png`` a
    format matplotlib writes, no file named by two flags, and none of them the ``--data``
    the run reads."""
    import os

    from ._errors import InputError

    seen: dict[str, str] = {}
    if data is not None:
        seen[os.path.realpath(os.path.expanduser(data))] = "--data"
    for flag, path in paths.items():
        if path is None:
            continue
        real = os.path.realpath(os.path.expanduser(path))
        if seen.get(real) == "--data":  # before _check_output: replacing it would lose the data
            raise InputError(
                f"`{flag}` {path!r} is the `--data` file this run reads; write to another file"
            )
        _check_output(path, flag)
        if real in seen:
            raise InputError(
                f"`{seen[real]}` and `{flag}` both name {path!r}; give each output its own file"
            )
        seen[real] = flag


def _check_output(path: str | None, flag: str) -> None:
    """Check where ``flag`` will write before the computation, not after it."""
    if path is None:
        return
    import tempfile

    from ._errors import AttraxError, InputError
    from .io import output_path
    from .viz import figure_path

    try:
        if flag == "--png":  # also a format matplotlib writes
            directory = figure_path(path)[0].parent  # type: ignore[index]
        else:
            directory = output_path(path, _EXAMPLES.get(flag, "a.out")).parent
    except AttraxError as err:
        # io names its own argument; the user typed the flag
        raise InputError(str(err).replace("`path`", f"`{flag}`", 1)) from None
    try:
        # os.access says yes to root even where the OS refuses (/proc, read-only mounts)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as err:
        raise InputError(
            f"`{flag}` {path!r}: cannot write in {str(directory)!r} ({err.strerror})"
        ) from None


def _write_outputs(
    writes: Sequence[tuple[str, str | None, Callable[[Path], object]]],
) -> list[str]:
    """Write each ``(flag, path, write)`` given a path (``write(tmp)``) to a temp file beside it,
    then move them all into place: one that fails leaves none written. Returns the paths."""
    import contextlib
    import os
    import uuid

    from ._errors import AttraxError, InputError
    from .io import output_path

    staged: list[tuple[Path, Path]] = []
    try:
        for flag, path, write in writes:
            if path is None:
                continue
            final = output_path(path, _EXAMPLES.get(flag, "a.out"))  # a link's target
            # the real suffix (or none) last: ax.plot reads the image format from it
            tmp = final.with_name(f".{final.stem}-{uuid.uuid4().hex[:12]}-tmp{final.suffix}")
            staged.append((tmp, final))
            try:
                write(tmp)
            except (AttraxError, OSError) as err:
                cause = err if isinstance(err, OSError) else err.__cause__
                if isinstance(cause, OSError):
                    raise InputError(
                        f"`{flag}` {path!r}: cannot write in {str(final.parent)!r} "
                        f"({cause.strerror})"
                    ) from err
                raise InputError(f"`{flag}` {path!r}: {err}") from err
        for tmp, final in staged:
            os.replace(tmp, final)
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return [path for _, path, _ in writes if path is not None]


def _print_result(console: Console, da: xr.DataArray) -> None:
    reductions = da.attrs.get("reductions", "").replace(";", " → ")
    if reductions:
        console.print(f"[dim]reduced: {reductions}[/]")
    if {"target", "source"} <= set(da.dims) <= {"example", "target", "source"}:
        _table(console, da)
    elif {"target", "sender", "receiver"} <= set(da.dims):
        _ranked(console, da, ("sender", "receiver"), "{} → {}")
    elif {"target", "layer", "neuron"} <= set(da.dims) and "source" not in da.dims:
        _ranked(console, da, ("layer", "neuron"), "layer {} neuron {}")
    elif {"target", "layer", "query", "source"} <= set(da.dims):  # information flow routes
        on_route = da.where(da != 0)  # 0: off the route
        if "head" in da.dims:
            dims: tuple[str, ...] = ("layer", "head", "query", "source")
            _ranked(console, on_route, dims, "layer {} head {}: {} ← {}")
        else:
            _ranked(console, on_route, ("layer", "query", "source"), "layer {}: {} ← {}")
    elif da.attrs.get("method") == "edge_patching" and "target" in da.dims:
        _effects(console, da)
    else:
        sizes = ", ".join(f"{d}: {n}" for d, n in da.sizes.items())
        console.print(f"result dims ({sizes}); reduce to (target, source) to see a table")


def _ranked(
    console: Console, da: xr.DataArray, dims: tuple[str, ...], entry: str, top: int = 10
) -> None:
    """Each target's ``top`` entries over ``dims`` by size (edges of edge attribution patching,
    a layer's neurons of knowledge neurons, a route's edges), example by example."""
    if "example" in da.dims:
        for example in range(da.sizes["example"]):
            console.print(f"example {example}")
            _ranked(console, da.isel(example=example), dims, entry, top)
        return
    for target in da["target"].values:
        one = da.sel(target=target).stack(entry=list(dims)).dropna("entry")
        if not one.size:  # a target this example does not have (a batch's padding)
            continue
        ranked = one.sortby(abs(one), ascending=False)[:top]
        token = da["target_token"].sel(target=target).item() if "target_token" in da.coords else ""
        console.print(f"target {target} {_escape(repr(token)) if token else ''}".rstrip())
        for pair, value in zip(ranked["entry"].values, ranked.values, strict=True):
            console.print(f"  {entry.format(*pair)}: {value:+.4g}")


def _effects(console: Console, da: xr.DataArray) -> None:
    """Each target's change under edge patching (per circuit), example by example."""
    if "example" in da.dims:
        for example in range(da.sizes["example"]):
            console.print(f"example {example}")
            _effects(console, da.isel(example=example))
        return
    for target in da["target"].values:
        one = da.sel(target=target)
        if bool(one.isnull().all()):  # a target this example does not have (a batch's padding)
            continue
        token = da["target_token"].sel(target=target).item() if "target_token" in da.coords else ""
        head = f"target {target} {_escape(repr(token)) if token else ''}".rstrip()
        if "circuit" not in one.dims:
            console.print(f"{head}: {float(one):+.4g}")
            continue
        console.print(head)
        for circuit, edges, value in zip(one.circuit.values, one.edges.values, one.values,
                                         strict=True):  # fmt: skip
            console.print(f"  circuit {circuit} ({edges} edges): {value:+.4g}")


def _table(console: Console, da: xr.DataArray) -> None:
    """The coloured table, without the never-attributed last source, fitted to the terminal."""
    from .viz import table

    da = da.dropna("source", how="all")
    # two decimals when the terminal is wide enough (7 characters a column, 8 signed), else one
    column = 8 if bool((da < 0).any()) else 7
    digits = 2 if console.width >= 4 + column * da.sizes["source"] else 1
    table(da, console=console, digits=digits)
    if console.width < 4 + (column - 1) * da.sizes["source"]:
        console.print(
            "[dim](cropped to the terminal's width: widen it, or write --html / --png)[/]"
        )


def _dtype(name: str | None) -> Any:
    if name is None:
        return None
    import torch

    return getattr(torch, name)


def _device(name: str | None) -> str | None:
    """Check ``--device`` up front: torch's own errors about it are long and not attrax errors."""
    if name is None:
        return None
    import torch

    from ._errors import OptionError

    try:
        device = torch.device(name)
    except RuntimeError:
        raise OptionError(
            f"`--device` {name!r} is not a device (e.g. cpu, cuda, cuda:1, mps)"
        ) from None
    available = {
        "cuda": torch.cuda.is_available,
        "mps": lambda: torch.backends.mps.is_available(),
    }.get(device.type, lambda: True)
    if not available():
        raise OptionError(f"`--device` {name!r}: this torch has no {device.type} device available")
    return name


def _summary_table(table: Any, width: int = 10**6) -> Any:
    """An ``ax.summary`` DataFrame as a rich table: ``mean [low, high]`` per method and metric,
    methods as rows; metrics as rows where that fits ``width`` columns and the other way does
    not; cropped with a note where neither fits."""
    from rich.table import Table
    from rich.text import Text

    from ._names import HIGHER_IS_BETTER

    metrics = list(dict.fromkeys(table.columns.get_level_values(0)))
    methods = [str(m) for m in table.index]
    cell = {  # Text, not markup: rich read "[nan, nan]" as a style tag and dropped it
        (str(method), m): Text(f"{row[m, 'mean']:.3f} [{row[m, 'low']:.3f}, {row[m, 'high']:.3f}]")
        for method, row in table.iterrows()
        for m in metrics
    }
    arrows: dict[bool | None, str] = {True: " ↑", False: " ↓"}  # None: a metric with no better
    named = {m: m + arrows.get(HIGHER_IS_BETTER.get(m), "") for m in metrics}

    def needed(rows: list[str], columns: list[str]) -> int:  # rich's borders and padding
        first = max(len(r) for r in rows)
        return 4 + first + sum(3 + max(len(c), 20) for c in columns)

    by_metric = needed(methods, list(named.values())) > width and needed(
        list(named.values()), methods
    ) < needed(methods, list(named.values()))
    rows, columns = (metrics, methods) if by_metric else (methods, metrics)
    out = Table(title="mean [95% interval] over examples", title_style="bold")
    out.add_column("metric" if by_metric else "method")
    for c in columns:  # names as Text too: a method named "ig[steps=8]" keeps its brackets
        out.add_column(Text(c if by_metric else named[c]), justify="right")
    for r in rows:
        label = Text(named[r] if by_metric else r)
        out.add_row(label, *(cell[(c, r)] if by_metric else cell[(r, c)] for c in columns))
    shown = [named[r] for r in rows] if by_metric else rows
    if needed(shown, columns if by_metric else [named[c] for c in columns]) > width:
        out.caption = "(cropped to the terminal's width: widen it, or write --csv / --png)"
    return out


def _workers(value: str) -> int | str:
    return "auto" if value == "auto" else _positive(value)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _escape(text: str) -> str:
    """``text`` shown as it is in rich markup: a path or prompt with ``[/x]`` or ``[bold]``."""
    from rich.markup import escape

    return escape(text)


def _console() -> Console:
    from rich.console import Console

    return Console(highlight=False)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


if __name__ == "__main__":
    sys.exit(main())
