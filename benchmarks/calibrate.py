"""``python -m benchmarks calibrate``: the planner's memory estimate against measured peaks.

Per architecture family (GPT-2; Llama-style with RMSNorm and a gated MLP; encoder-decoder; a
BERT and a BART sequence classifier, every class of a 20-class head as the targets), a model of a few
million parameters built from a config with random weights runs saliency with one
target per backward and with all at once, and occlusion with one copy per forward and with all
at once, each in a fresh process. The peak is the process's peak RSS above its RSS before the
call (``VmHWM`` after ``/proc/self/clear_refs``), after a warm-up call on a short input and
``malloc_trim``, so that neither first-touch code pages nor the warm-up's freed heap count. The
differences give the bytes per target of the backward, per point of the forward and per copy of
a forward without gradients; divided by the estimate's unit (``[B, L, width]`` elements) they give
the ``LIVE_TENSORS`` constants of ``attrax._memory``. Head attribution (``heads_one``,
``heads_all``: 8 steps, one step and target a pass, and a layer's steps with every target) and
attention x gradient (``attention_all``: every target a pass) check their own estimate, which
adds the probes' gradients to the engine's. The table printed
(and written to ``benchmarks/calibration.json``) compares the estimate with the measured peak.
``--dtype bfloat16`` casts the models (the half-precision units of ``FLOAT32_TENSORS``), ``--attn``
runs another attention than the shape's, each in rows of their own; ``--meter tensors`` measures
the peak of torch's allocator instead (:func:`tensor_peak`, ``calibration-tensors.json``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from .harness import peak_meter

OUT = Path(__file__).resolve().parent / "calibration.json"
TENSORS_OUT = OUT.with_name("calibration-tensors.json")

# family -> (tiny_model arch, config overrides, prompt words, target words, attention); for
# "classifier": (tiny_classifier arch, overrides, words per text, classes, attention), every class
# of each text a target, and "texts" overrides (default 1) in the config are the batch
SHAPES: dict[str, list[tuple[str, dict[str, Any], int, int, str]]] = {
    "gpt2": [
        ("gpt2", dict(n_embd=256, n_layer=4, n_head=4, n_positions=1024), 96, 32, "eager"),
        ("gpt2", dict(n_embd=64, n_layer=4, n_head=16, n_positions=1024), 50, 16, "eager"),
    ],
    "llama": [
        ("llama", dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=1024), 96, 32, "eager"),
        ("llama", dict(hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                       num_attention_heads=16, num_key_value_heads=4,
                       max_position_embeddings=1024), 50, 16, "eager"),
    ],
    # Gemma 3 (priced as "llama"): norms after attention and MLP too, query and key norms,
    # a local layer (96-token window) and a global one
    "gemma": [
        ("gemma3", dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                        max_position_embeddings=1024, sliding_window=96,
                        layer_types=["sliding_attention", "full_attention"] * 2), 96, 32, "eager"),
    ],
    "encoder-decoder": [
        ("marian", dict(d_model=256, encoder_layers=3, decoder_layers=3, encoder_ffn_dim=1024,
                        decoder_ffn_dim=1024, encoder_attention_heads=4,
                        decoder_attention_heads=4, max_position_embeddings=1024), 96, 32, "eager"),
        ("t5", dict(d_model=256, d_kv=64, d_ff=1024, num_layers=3, num_heads=4), 96, 32, "eager"),
    ],
    "classifier": [
        ("bert", dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                      intermediate_size=1024, max_position_embeddings=512), 160, 20, "eager"),
        ("bert", dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                      intermediate_size=1024, max_position_embeddings=512, texts=4), 40, 20,
         "eager"),
        # BART-MNLI's head: the decoder reads the source again (priced as a translator's two
        # stacks over twice the source's tokens)
        ("bart", dict(d_model=256, encoder_layers=3, decoder_layers=3, encoder_ffn_dim=1024,
                      decoder_ffn_dim=1024, encoder_attention_heads=4,
                      decoder_attention_heads=4, max_position_embeddings=1024), 96, 20, "eager"),
    ],
}  # fmt: skip

HALF = ("bfloat16", "float16")
COPIES = 64  # perturbed copies per forward in the many-copies run
POINTS = 8  # IG points per forward in the many-points run
# (method, options): one target / copy per pass, and everything (or COPIES copies) at once
RUNS = {
    "backward_one": ("saliency", {"chunk_size": 1, "batch_size": None}),
    "backward_all": ("saliency", {"chunk_size": None, "batch_size": None}),
    "points": ("integrated_gradients", {"steps": POINTS, "chunk_size": 1, "batch_size": None}),
    "inference_one": ("occlusion", {"batch_size": 1}),
    "inference_all": ("occlusion", {"batch_size": COPIES}),
    # head attribution (one layer's POINTS steps a forward, its "auto" form): its own estimate
    "heads_one": ("head_attribution", {"steps": POINTS, "batch_size": 1, "chunk_size": 1}),
    "heads_all": ("head_attribution", {"steps": POINTS, "batch_size": POINTS, "chunk_size": None}),
    "attention_all": ("attention_x_gradient", {"chunk_size": None}),
}
# the attention-gradient runs: (the worker's estimate, points, targets a pass (None: all))
HEAD_RUNS = {
    "heads_one": ("heads", 1, 1),
    "heads_all": ("heads", POINTS, None),
    "attention_all": ("attention", 1, None),
}
ENGINE = ("backward_one", "backward_all", "points", "inference_one", "inference_all")


def _texts(tok: Any, n_prompt: int, n_target: int) -> tuple[str, str]:
    from attrax.testing import corpus

    words = " ".join(corpus()).split()
    return " ".join(words[:n_prompt]), " " + " ".join(words[n_prompt : n_prompt + n_target])


def _workload(
    family: str,
    arch: str,
    config: dict[str, Any],
    n_prompt: int,
    n_target: int,
    attn: str,
    dtype: str = "float32",
) -> tuple[Any, Any, Any, tuple[Any, Any]]:
    """``(model, inputs, targets, warm_up)``: a shape's attrax model in ``dtype``, its call's
    inputs and targets, and a short ``(inputs, targets)`` pair to warm up on."""
    import torch

    import attrax as ax
    from attrax.testing import corpus, tiny_classifier, tiny_model

    precision = getattr(torch, dtype)
    if family != "classifier":
        hf, tok = tiny_model(arch, **config)
        model = ax.load_model(hf.to(precision), tokenizer=tok, attn_implementation=attn)
        return model, *_texts(tok, n_prompt, n_target), _texts(tok, 6, 3)
    config = dict(config)
    n_texts = config.pop("texts", 1)
    hf, tok = tiny_classifier(arch, num_labels=n_target, **config)
    model = ax.load_model(hf.to(precision), tokenizer=tok, attn_implementation=attn)
    words = " ".join(corpus()).split()
    texts = [" ".join(words[i * n_prompt : (i + 1) * n_prompt]) for i in range(n_texts)]
    return model, texts if n_texts > 1 else texts[0], "all", (" ".join(words[:6]), "all")  # fmt: skip


def _problem(model: Any, inputs: Any, targets: Any) -> Any:
    """The engine's ``Problem`` of a call (the default objective of the model's task), whose
    ``cost()`` is the planner's estimate."""
    from attrax._engine import Problem
    from attrax._inputs import prepare
    from attrax._objectives import resolve

    objective = resolve("probability" if model.task == "generation" else "logit")[1]
    return Problem.build(model, prepare(model, inputs, targets), objective, False)


def _heads_cost(model: Any, problem: Any, probed: int | None) -> Any:
    """The attention-gradient methods' estimate (``attrax._heads._cost``) over the model's
    default maps, ``probed`` layers' maps a backward: head attribution's one (as ``batch_size``
    at most ``steps`` runs it), attention x gradient's all (None)."""
    from attrax import _heads

    maps = _heads.resolve_maps(model, None)
    stacks = _heads._stacks(model, maps, False, "target")
    layers = _heads._chosen(stacks, None, _heads._counts(model))
    weights = _heads._weights(problem, [(stack, layer) for stack in stacks for layer in layers])
    return _heads._cost(problem, weights, probed)


def worker(spec: str) -> None:
    """One measurement: prints a JSON line with the peak above the start and the estimate."""
    import torch

    import attrax as ax

    s = json.loads(spec)
    torch.set_num_threads(s["threads"])
    model, inputs, targets, warm_up = _workload(
        s["family"], s["arch"], s["config"], s["prompt"], s["target"], s["attn"], s["dtype"]
    )
    method, options = RUNS[s["run"]]
    fn = getattr(ax, method)
    fn(model, *warm_up, **options)  # warm-up: code pages, lazy imports
    if s.get("meter") == "tensors":
        peak_mb = tensor_peak(lambda: fn(model, inputs, targets, **options)) / 2**20
    else:
        start, stop = peak_meter("cpu")
        base = start()
        fn(model, inputs, targets, **options)
        peak_mb = stop(base) / 2**20
    problem = _problem(model, inputs, targets)
    cost, inference = problem.cost(), problem.cost(saved=False)
    x = problem.inputs[0]
    tokens = sum(xi.shape[1] for xi in problem.inputs)
    if problem.decoder_embeds is not None:
        tokens += problem.decoder_embeds.shape[1]
    print(
        json.dumps(
            {
                "peak_mb": peak_mb,
                "targets": int(problem.tensors.valid.shape[1]),
                "tokens": tokens,
                "sources": sum(xi.shape[1] for xi in problem.inputs),
                "hidden": x.shape[-1],
                "cost": list(cost),
                "inference": list(inference),
                "heads": list(_heads_cost(model, problem, 1)),
                "attention": list(_heads_cost(model, problem, None)),
            }
        )
    )


def tensor_peak(call: Any) -> int:
    """The peak bytes of tensors that ``call()`` holds above those it started with, as torch's
    CPU allocator counts them (its profiler's allocation events): the tensors alone, what a
    GPU's allocator would hold of the same tensors, without the heap's or the kernels' own."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            fields = node.extra_fields
            events.append((node.start_time_ns, fields.alloc_size, fields.total_allocated))
        stack.extend(node.children)
    if not events:
        return 0
    events.sort()
    start = events[0][2] - events[0][1]
    return max(total for _, _, total in events) - start


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks", "calibrate-worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> int:
    from attrax._memory import Cost, format_bytes

    if args.out is None:
        args.out = str(TENSORS_OUT if args.meter == "tensors" else OUT)
    if args.report:
        print(report(args.out), end="")
        return 0

    out = Path(args.out) if args.out else None
    committed = json.loads(out.read_text()) if out and out.exists() else []
    runs = args.runs.split(",")
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        raise SystemExit(f"calibrate: unknown runs {unknown}: {', '.join(RUNS)}")
    if set(runs) & set(ENGINE) and not set(ENGINE) <= set(runs):
        raise SystemExit(f"calibrate: the engine's runs are measured together: {', '.join(ENGINE)}")
    rows, families = [], args.families.split(",")
    for family in families:
        for arch, config, n_prompt, n_target, shape_attn in SHAPES[family][
            : 1 if args.first_shape else None
        ]:
            archs = getattr(args, "archs", "")
            if archs and arch not in archs.split(","):
                continue
            attn = args.attn or shape_attn
            base = dict(
                family=family, arch=arch, config=config, prompt=n_prompt, target=n_target,
                attn=attn, dtype=args.dtype, meter=args.meter,
            )  # fmt: skip
            got = {run: _measure({**base, "run": run, "threads": args.threads}) for run in runs}
            new = {"family": family, "arch": arch, "config": config, "measured": {}, "estimate": {}}
            if args.dtype != "float32":
                new["dtype"] = args.dtype
            if attn != shape_attn:
                new["attn"] = attn
            row = next((r for r in committed if _key(r) == _key(new)), new)
            row = _measured_row(row, got) if set(ENGINE) <= set(got) else row
            any_run = next(iter(got.values()))
            k, mb = any_run["targets"], 2**20
            row.update(tokens=any_run["tokens"], targets=k)
            for run, (estimate, points, chunk) in HEAD_RUNS.items():
                if run in got:
                    row["measured"][run] = got[run]["peak_mb"] * mb
                    row["estimate"][run] = Cost(*any_run[estimate]).at(points, chunk or k)
            rows.append(row)
            print(f"{family} ({arch}, {args.dtype}, {attn}, {row['tokens']} tokens, {k} targets):")
            for run in runs:
                m, e = row["measured"][run], row["estimate"][run]
                print(
                    f"  {run:14s} measured {format_bytes(int(m)):>9s}  "
                    f"estimate {format_bytes(int(e)):>9s}  ratio {e / m:.2f}"
                )
            for part in PARTS if set(ENGINE) <= set(got) else ():
                m, e = row[part]["measured"], row[part]["estimate"]
                print(f"  {part:14s} measured {format_bytes(int(m)):>9s}  "
                      f"estimate {format_bytes(int(e)):>9s}  ratio {e / max(m, 1):.2f}")  # fmt: skip
    if out:
        # shapes not measured now keep their committed rows
        now = {_key(r) for r in rows}
        kept = [r for r in committed if _key(r) not in now]
        rows = sorted(kept + rows, key=_order)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1) + "\n")
        tmp.replace(out)  # complete or not written
    return 0


def _key(row: dict[str, Any]) -> tuple[str, str, str, str, str]:
    """A row's shape: its family, architecture, config, precision and attention where that is
    not the shape's."""
    dtype = row.get("dtype", "float32")
    return row["family"], row["arch"], json.dumps(row["config"]), dtype, row.get("attn", "")


def _order(row: dict[str, Any]) -> tuple[int, str, int]:
    """Rows in order: float32's, then each half precision's; the shape's attention first; then
    ``SHAPES``' order."""
    shapes = [(f, shape[0], json.dumps(shape[1])) for f in SHAPES for shape in SHAPES[f]]
    family, arch, config, dtype, attn = _key(row)
    return ("float32", *HALF).index(dtype), attn, shapes.index((family, arch, config))


def _measured_row(row: dict[str, Any], got: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``row`` with the engine's runs of ``got`` and the slopes they give."""
    one, every = got["backward_one"], got["backward_all"]
    k, mb = every["targets"], 2**20
    per_target = (every["peak_mb"] - one["peak_mb"]) * mb / max(k - 1, 1)
    copies = min(COPIES, every["sources"])
    per_copy = (
        (got["inference_all"]["peak_mb"] - got["inference_one"]["peak_mb"])
        * mb
        / max(copies - 1, 1)
    )
    per_cotangent, per_point, fixed = every["cost"][:3]
    # IG's extra forward (the completeness gap) runs after the passes: not in the peak
    per_point_measured = (got["points"]["peak_mb"] - one["peak_mb"]) * mb / (POINTS - 1)
    per_point_measured -= per_target
    return {
        **row,
        "measured": {**row["measured"], **{run: got[run]["peak_mb"] * mb for run in ENGINE}},
        "estimate": {
            **row["estimate"],
            "backward_one": fixed + per_point + per_cotangent,
            "backward_all": fixed + per_point + k * per_cotangent,
            "points": fixed + POINTS * (per_point + per_cotangent),
            "inference_one": got["inference_one"]["inference"][1]
            + got["inference_one"]["inference"][2],
            "inference_all": copies * got["inference_all"]["inference"][1]
            + got["inference_all"]["inference"][2],
        },
        "per_target": {"measured": per_target, "estimate": per_cotangent},
        "per_copy": {"measured": per_copy, "estimate": every["inference"][1]},
        "per_point": {"measured": per_point_measured, "estimate": per_point},
    }


def estimates(row: dict[str, Any]) -> dict[str, float]:
    """The current estimate (``attrax._memory``'s constants now) of each run of a measured row."""

    shape = next(
        shape for shape in SHAPES[row["family"]] if shape[:2] == (row["arch"], row["config"])
    )
    family, arch, config, n_prompt, n_target, attn = row["family"], *shape
    model, inputs, targets, _ = _workload(
        family, arch, config, n_prompt, n_target, row.get("attn", attn), row.get("dtype", "float32")
    )
    problem = _problem(model, inputs, targets)
    cost, inference = problem.cost(), problem.cost(saved=False)
    k = int(problem.tensors.valid.shape[1])
    copies = min(COPIES, sum(x.shape[1] for x in problem.inputs))
    heads = {
        "heads": _heads_cost(model, problem, 1),
        "attention": _heads_cost(model, problem, None),
    }
    return {
        **{run: heads[e].at(points, chunk or k) for run, (e, points, chunk) in HEAD_RUNS.items()},
        "backward_one": cost.at(1, 1),
        "backward_all": cost.at(1, k),
        "points": cost.at(POINTS, 1),
        "inference_one": inference.at(1, 0),
        "inference_all": inference.at(copies, 0),
        "per_target": cost.per_cotangent,
        "per_point": cost.per_point,
        "per_copy": inference.per_point,
    }


def report(path: str | Path = OUT) -> str:
    """A markdown table of the measured peaks of ``path`` against the current estimate."""
    rows = json.loads(Path(path).read_text())
    lines = [
        "| family | model | tokens | targets | run | measured | estimate | estimate / measured |",
        "|---|---|---|---|---|---|---|---|",
    ]
    mib = 2**20
    for row in rows:
        now = estimates(row)
        measured = {**row["measured"]}
        measured.update({part: row[part]["measured"] for part in PARTS if part in row})
        for name in [*ENGINE, *PARTS, *HEAD_RUNS]:
            if name not in measured:  # a run this row did not measure
                continue
            m, e = measured[name], now[name]
            lines.append(
                f"| {row['family']} | {_model(row)} | {_tokens(row)} | {row['targets']} | "
                f"{LABELS[name]} | {m / mib:.1f} MiB | {e / mib:.1f} MiB | "
                f"{e / m if m > 0 else float('inf'):.2f} |"
            )
    return "\n".join(lines) + "\n"


def _model(row: dict[str, Any]) -> str:
    """The row's architecture, with its precision where that is not float32 and its attention
    where that is not the shape's."""
    dtype, attn = row.get("dtype", "float32"), row.get("attn")
    return ", ".join([row["arch"], *([dtype] if dtype != "float32" else []), *filter(None, [attn])])


def _tokens(row: dict[str, Any]) -> str:
    """Tokens of the measured input: ``texts x padded length`` for a batch of texts."""
    texts = row["config"].get("texts", 1)
    return f"{texts} \u00d7 {row['tokens']}" if texts > 1 else str(row["tokens"])


def half_precision(paths: tuple[str | Path, ...] = (OUT, TENSORS_OUT)) -> str:
    """A markdown table of what each shape measured per target, point and copy in half
    precision against float32, in each results file of ``paths`` (resident memory, tensors)."""
    lines = [
        "| family | model | attention | measured as | per target | per point | per copy |",
        "|---|---|---|---|---|---|---|",
    ]
    mib = 2**20
    for path in paths:
        rows = [r for r in json.loads(Path(path).read_text()) if PARTS[0] in r]
        meter = "tensors" if Path(path).name == TENSORS_OUT.name else "resident memory"
        full = {
            _key(r)[:3] + _key(r)[4:]: r for r in rows if r.get("dtype", "float32") == "float32"
        }
        for half in (r for r in rows if r.get("dtype", "float32") != "float32"):
            key = _key(half)
            base = full.get(key[:3] + key[4:])
            if base is None:
                continue
            attn = half.get("attn") or next(
                shape[4]
                for shape in SHAPES[half["family"]]
                if shape[:2] == (half["arch"], half["config"])
            )
            cells = [
                f"{half[p]['measured'] / mib:.1f} / {base[p]['measured'] / mib:.1f} MiB: "
                f"{half[p]['measured'] / base[p]['measured']:.2f}"
                for p in PARTS
            ]
            lines.append(
                f"| {half['family']} | {half['arch']}, {half['dtype']} | {attn} | {meter} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines) + "\n"


PARTS = ("per_target", "per_point", "per_copy")
LABELS = {
    "backward_one": "saliency, 1 target per backward",
    "backward_all": "saliency, all targets at once",
    "points": f"IG, {POINTS} points at once, 1 target",
    "inference_one": "occlusion, 1 copy per forward",
    "inference_all": f"occlusion, {COPIES} copies per forward",
    "heads_one": f"head attribution, {POINTS} steps, 1 step and 1 target per pass",
    "heads_all": f"head attribution, {POINTS} steps, a layer's steps and all targets per pass",
    "attention_all": "attention × gradient, all targets per pass",  # noqa: RUF001
    "per_target": "per target (slope)",
    "per_point": "per point (slope)",
    "per_copy": "per copy (slope)",
}


def parser(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m benchmarks calibrate``."""
    p.add_argument("--families", default=",".join(SHAPES), help="default: all")
    p.add_argument("--first-shape", action="store_true", help="only the first shape per family")
    p.add_argument("--archs", default="", help="only the shapes of these architectures (a,b)")
    p.add_argument(
        "--runs",
        default=",".join(RUNS),
        help="default: all; the engine's five together, and/or heads_one, heads_all, "
        "attention_all (merged "
        "into the committed rows)",
    )
    p.add_argument(
        "--dtype", default="float32", choices=("float32", *HALF),
        help="the models' precision (rows of each precision are kept apart)",
    )  # fmt: skip
    p.add_argument("--attn", default="", choices=("", "eager", "sdpa"), help="default: the shape's")
    p.add_argument(
        "--meter", default="rss", choices=("rss", "tensors"),
        help="rss: the process's peak resident memory (what the estimate is calibrated on); "
        "tensors: the peak of torch's CPU allocator, the tensors alone (tensor_peak)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--out", default=None,
        help="results JSON ('' for none; default benchmarks/calibration.json, with --meter "
        "tensors benchmarks/calibration-tensors.json)",
    )  # fmt: skip
    p.add_argument(
        "--report",
        action="store_true",
        help="measure nothing: print the results JSON against the current estimate (markdown)",
    )
