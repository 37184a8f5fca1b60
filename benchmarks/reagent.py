"""ReAGent: parity with Inseq 0.7's ``reagent`` and time, attrax vs Inseq, on W1's GPT-2.

Run from the repository root in the bench venv::

    PYTHONPATH=$PWD/src:$PWD .bench-venv/bin/python -m benchmarks.reagent [--quick] [--docs]

Inseq's ReAGent runs one target at a time: ``probes`` chains in a batch, a forward for the
update and one for the stopping rule per step. ``ax.reagent`` runs every target's chains at once,
blocks of steps in batched forwards. Both run the same model and the same draws:

- **Replacements.** Inseq's only sampler (``POSTagTokenSampler``) tags the vocabulary with NLTK's
  tagger, which it downloads (no network here). Both sides get attrax's ``"uniform"`` rule
  instead: the ``floor(u * n)``-th of the ``n`` ordinary token ids (every id of the tokenizer
  but the special ones). Inseq's sampler takes its index as ``long(u * n + offset)`` in float32,
  which can round up into the next group's first id (offsets of thousands, ``u`` within 1e-7 of a
  boundary); the given sampler has no offset, so the two rules agree.
- **Draws.** attrax's, rebuilt from its documented seeding rule (``rand(targets, probes,
  players)``, then ``rand(3, targets, probes, players)`` per step, from one CPU generator seeded
  with ``seed``), are handed to Inseq in the order it asks for them: a target's initial scores,
  then per step which tokens are replaced, their replacements, the stopping rule's replacements
  (its prefix of ``t`` tokens: the first ``t`` players).

The target is W1's text. The random-weight model ranks its tokens anywhere in its 50,257
outputs, so the stopping rule asks for the top 20,000 (``top_k``): some chains stop at once,
others run out of steps. Parity: the largest difference over the
targets where some chain stopped (Inseq's score is 0/0 = NaN where none did; attrax takes every
chain's mean there and says so in ``stopped``), and whether both agree on which targets those
are; in float64 (a stopping decision at a tie of float32 rounding would change a chain's step)
and on the float32 model. Times: float32, in the same process; attrax's the median of
``--repeats`` calls after a warm-up, Inseq's one call (it takes minutes).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from . import report, workloads
from .mixing import timed

# top_k: the random-weight model ranks the text's tokens anywhere in its 50,257 outputs (ranks 78
# to 47,318 for W1's 32); 20,000 lets some chains stop early and others run out of steps
OPTIONS = dict(probes=16, max_steps=50, replace_ratio=0.3, keep=5, top_k=20000, seed=0)
BEGIN, END = "<!-- reagent:begin -->", "<!-- reagent:end -->"
DOC = Path(__file__).resolve().parent.parent / "docs" / "methods" / "perturbation.md"


class _Feed:
    """attrax's draws for one example, handed out in the order Inseq's ReAGent asks for them."""

    def __init__(self, n_targets: int, players: int, probes: int, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.init = torch.rand((n_targets, probes, players), generator=self.generator)
        self.shape = (3, n_targets, probes, players)
        self.steps: list[torch.Tensor] = []
        self.target, self.step, self.phase = -1, 0, 0

    def ready(self, steps: int) -> None:
        """Draw the stream up to ``steps`` steps (before the clock starts)."""
        while len(self.steps) < steps:
            self.steps.append(torch.rand(self.shape, generator=self.generator))

    def reset(self) -> None:
        self.target, self.step, self.phase = -1, 0, 0

    def _at(self, kind: int, shape: tuple[int, ...]) -> torch.Tensor:
        self.ready(self.step + 1)
        return self.steps[self.step][kind, self.target, :, : shape[-1]].clone()

    def initial(self, shape: tuple[int, ...]) -> torch.Tensor:
        self.target, self.step, self.phase = self.target + 1, 0, 0
        return self.init[self.target, :, : shape[-1]].clone()

    def replaced(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self._at(0, shape)

    def replacement(self, shape: tuple[int, ...]) -> torch.Tensor:
        u = self._at(1 + self.phase, shape)
        if self.phase == 1:  # the stopping rule's draw ends the step
            self.step += 1
        self.phase = 1 - self.phase
        return u


def _patch_inseq(feed: _Feed, ordinary: torch.Tensor) -> None:
    """Hand Inseq ``feed``'s draws and attrax's ``"uniform"`` replacement rule."""
    from inseq.attr.feat.ops import reagent
    from inseq.attr.feat.ops.reagent_core import importance_score_evaluator, token_replacer
    from inseq.attr.feat.ops.reagent_core.token_sampler import TokenSampler

    class GivenSampler(TokenSampler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
            u = feed.replacement(tuple(input_ids.shape)).double()
            return ordinary[(u * ordinary.numel()).floor().long()]

    def proxy(draw):
        return SimpleNamespace(**{**vars(torch), "rand": lambda shape, **kw: draw(tuple(shape))})

    reagent.POSTagTokenSampler = GivenSampler
    importance_score_evaluator.torch = proxy(feed.initial)
    token_replacer.torch = proxy(feed.replaced)


def _ordinary(tok, rows: int) -> torch.Tensor:
    size = min(rows, len(tok))
    special = set(tok.all_special_ids)
    return torch.tensor([i for i in range(size) if i not in special])


def run(n_prompt: int, n_target: int, repeats: int, options: dict[str, Any]) -> dict[str, Any]:
    import inseq

    import attrax as ax

    torch.manual_seed(0)
    model, tok = workloads.load("gpt2")
    prompt, target = workloads.texts("gpt2", tok, n_prompt, n_target)
    am = ax.load_model(model, tokenizer=tok)
    ids = tok(prompt + target, return_tensors="pt")["input_ids"][0]
    first = len(tok(prompt)["input_ids"])
    n_targets, players = len(ids) - first, len(ids) - 1
    feed = _Feed(n_targets, players, options["probes"], options["seed"])
    feed.ready(options["max_steps"])
    _patch_inseq(feed, _ordinary(tok, model.get_input_embeddings().num_embeddings))
    im = inseq.load_model(
        model,
        "reagent",
        tokenizer=copy.deepcopy(tok),
        keep_top_n=options["keep"],
        stopping_condition_top_k=options["top_k"],
        replacing_ratio=options["replace_ratio"],
        max_probe_steps=options["max_steps"],
        num_probes=options["probes"],
    )

    def inseq_call() -> np.ndarray:
        feed.reset()
        out = im.attribute(prompt, prompt + target, show_progress=False, step_scores=[])
        seq = out.sequence_attributions[0]
        assert [t.id for t in seq.target] == ids.tolist(), "tokenizations differ"
        # [source (prompt + generated), generated, hidden] -> [target, source], one hidden entry
        return seq.target_attributions[..., 0].double().T.numpy()

    def attrax_call() -> Any:
        return ax.reagent(am, prompt, target, batch_size="auto", **options)

    # Inseq's call takes minutes (a target's chains that never stop run every step, a batch of
    # `probes` sequences a forward): timed once, its first-call costs a fraction of a percent
    theirs32, inseq_seconds = timed(inseq_call, 1, warm_up=False)
    ours32, attrax_seconds = timed(attrax_call, repeats)
    model.double()  # the same weights in float64: the algorithm's parity, not float32 ties
    theirs, ours = inseq_call(), attrax_call()
    model.float()
    return {
        "workload": f"W1 GPT-2: {n_prompt} prompt + {n_targets} target tokens",
        "options": options,
        "targets": n_targets,
        "stopped_targets": int((ours.stopped.values > 0).sum()),
        "mean_stopped_probes": float(ours.stopped.values.mean()),
        "max_abs_diff": _gap(theirs, ours),
        "max_abs_diff_float32_model": _gap(theirs32, ours32),
        "same_stopped_targets": _same_stopped(theirs, ours),
        "parity": _gap(theirs, ours) <= 1e-4 and _same_stopped(theirs, ours),
        "inseq_seconds": inseq_seconds,
        "attrax_seconds": attrax_seconds,
        "speedup": inseq_seconds / attrax_seconds,
        "threads": torch.get_num_threads(),
    }


def _same_stopped(theirs: np.ndarray, ours: Any) -> bool:
    """Inseq's score is NaN (0/0) for a target no chain stopped for; attrax's ``stopped`` is 0."""
    none = np.isnan(theirs).all(axis=1)
    return bool((none == (ours.stopped.values == 0)).all())


def _gap(theirs: np.ndarray, ours: Any) -> float:
    """The largest difference where Inseq's scores are defined (some chain stopped)."""
    values = ours.values.astype(np.float64)
    defined = ~np.isnan(theirs)
    assert np.isnan(values[defined]).sum() == 0, "attrax has NaN where Inseq has scores"
    return float(np.abs(theirs[defined] - values[defined]).max()) if defined.any() else 0.0


def render(result: dict[str, Any]) -> str:
    """The docs table of a run's ``result``."""
    o = result["options"]
    return "\n".join(
        [
            f"{result['workload']}; `probes={o['probes']}, max_steps={o['max_steps']}, "
            f"keep={o['keep']}, top_k={o['top_k']}, replace_ratio={o['replace_ratio']}`; "
            f"{result['threads']} threads.",
            "",
            "| attrax (one call) | Inseq (a call per target) | parity (float64) | "
            "parity (float32) | targets stopped | ratio |",
            "|---|---|---|---|---|---|",
            f"| `ax.reagent` | `reagent` | {result['max_abs_diff']:.1e} | "
            f"{result['max_abs_diff_float32_model']:.1e} | "
            f"{result['stopped_targets']} of {result['targets']} "
            f"({'same' if result['same_stopped_targets'] else 'NOT the same'} on both) | "
            f"{result['speedup']:.1f}\N{MULTIPLICATION SIGN} ({result['attrax_seconds']:.2f} s vs "
            f"{result['inseq_seconds']:.2f} s) |",
        ]
    )


def write_docs(result: dict[str, Any], page: Path = DOC) -> None:
    """Put :func:`render`'s table between the markers of ``page``."""
    report.write_between(page, BEGIN, END, render(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="8 + 4 tokens, 20 steps, 1 repeat")
    parser.add_argument("--out", default="benchmarks/reagent.json")
    parser.add_argument("--docs", action="store_true", help="render the table into the docs")
    parser.add_argument("--report", action="store_true", help="only render the docs from --out")
    args = parser.parse_args(argv)
    if args.report:
        write_docs(json.loads(Path(args.out).read_text()))
        return 0
    torch.set_num_threads(args.threads)
    options = dict(OPTIONS)
    if args.quick:
        options["max_steps"] = 20
        result = run(8, 4, 1, options)
    else:
        plan = workloads.plans()["W1"]
        result = run(plan.n_prompt, plan.n_target, args.repeats, options)
    print(json.dumps(result, indent=2))
    if not args.quick:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        if args.docs and result["parity"]:  # a table only after parity
            write_docs(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
