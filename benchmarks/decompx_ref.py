"""``ax.decompx`` and ``ax.attention_norm`` (GlobEnc) against their authors' code: parity.

DecompX's authors ship a modified ``modeling_bert.py`` / ``modeling_roberta.py`` written for
transformers 4.18 (github.com/mohsenfayyaz/DecompX, MIT); GlobEnc's authors one more
(github.com/mohsenfayyaz/GlobEnc). They run under transformers 4.57 (with three helpers it moved
from ``modeling_utils`` put back), not 5.x, so they run in a second environment, in a
subprocess, on the same saved weights and token ids, as ``lrp_lxt.py`` runs LXT::

    python3 -m venv /work/lxt-venv
    /work/lxt-venv/bin/pip install torch==2.13.0 transformers==4.57.6
    git clone https://github.com/mohsenfayyaz/DecompX /tmp/DecompX
    git clone https://github.com/mohsenfayyaz/GlobEnc /tmp/GlobEnc

Then, from the repository root, in attrax's environment::

    PYTHONPATH=src:. python benchmarks/decompx_ref.py --ref-python /work/lxt-venv/bin/python \\
        --decompx /tmp/DecompX --globenc /tmp/GlobEnc

Steps: ``prepare`` saves tiny BERT and RoBERTa sequence classifiers (``attrax.testing``, float32,
their biases and norm parameters drawn away from 0 and 1 so that the bias shares count) and the
token ids of two texts, padded; ``ref`` (the second environment) runs the authors' classes with
the paper's configuration (absdot bias shares, both LayerNorms, the feed-forward by its
zero-origin ratio, the classifier with its pooler, vector aggregation) and GlobEnc's
``output_norms`` (N-Enc per layer, then its rollout), and dumps them; ``compare`` runs
``ax.decompx`` and ``ax.attention_norm(include="encoder")`` on the same ids and checks
``max |attrax - theirs| / max |theirs| <= 1e-4`` on the real tokens. No timing: neither is in
Captum, Inseq, LXT or Interpreto, and the authors' code is one forward too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE / "results" / "decompx"
RECORD = HERE / "decompx-ref.json"  # the committed record
DOC = HERE.parent / "docs" / "methods" / "internals.md"
BEGIN, END = "<!-- decompx-ref:begin -->", "<!-- decompx-ref:end -->"
TOLERANCE = 1e-4
NAMES = {"bert": "BERT", "roberta": "RoBERTa"}
TEXTS = ["a deep and meaningful film", "the plot was good , but the acting was not"]
ARCHS = ("bert", "roberta")


# --------------------------------------------------------------------------------------------------
# prepare and compare: attrax's environment
# --------------------------------------------------------------------------------------------------
def prepare(root: Path) -> None:
    import torch

    from attrax.testing import tiny_classifier

    root.mkdir(parents=True, exist_ok=True)
    for arch in ARCHS:
        hf, tok = tiny_classifier(arch)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if name.endswith("bias") or "LayerNorm" in name:
                    p.add_(0.3 * torch.randn(p.shape, generator=generator))
        hf.save_pretrained(root / arch)
        tok.save_pretrained(root / arch)
        enc = tok(TEXTS, padding=True)
        (root / arch / "inputs.json").write_text(json.dumps({k: list(v) for k, v in enc.items()}))


def compare(root: Path) -> dict:
    import numpy as np

    import attrax as ax

    results = {}
    for arch in ARCHS:
        model = ax.load_model(str(root / arch))
        theirs = json.loads((root / arch / "reference.json").read_text())
        lengths = [
            sum(m) for m in json.loads((root / arch / "inputs.json").read_text())["attention_mask"]
        ]
        ours = ax.decompx(model, TEXTS, "all").values  # [B, classes, L]
        rolled = ax.attention_norm(model, TEXTS, "all", include="encoder", aggregate=True).values
        layers = ax.attention_norm(model, TEXTS, "all", include="encoder").values
        rows: dict[str, list] = {
            name: [] for name in ("decompx", "globenc", "n_enc") if name in theirs
        }
        for b, n in enumerate(lengths):
            ref = np.asarray(theirs["decompx"][b])[:n]  # [L, classes]
            rows["decompx"].append((ours[b, :, :n].T, ref))
            if "globenc" not in theirs:
                continue
            # GlobEnc's rows are every query; a classifier's target row is [CLS]'s (query 0)
            rows["globenc"].append((rolled[b, 0, :n], np.asarray(theirs["globenc"][b])[0, :n]))
            n_enc = np.asarray(theirs["n_enc"][b])[:, 0, :n]  # [layers, L]: query 0's row
            rows["n_enc"].append((layers[b, 0, :n].T, n_enc))
        results[arch] = {
            name: float(
                max(np.abs(a - r).max() for a, r in pairs) / max(np.abs(r).max() for _, r in pairs)
            )
            for name, pairs in rows.items()
        }
    return results


def render(record: dict) -> str:
    """The docs' table of a ``decompx-ref.json`` record."""
    lines = [
        '| model | `ax.decompx` vs DecompX | `ax.attention_norm(include="encoder")` vs GlobEnc\'s '
        "N-Enc | its rollout vs GlobEnc |",
        "|---|---|---|---|",
    ]
    for arch, got in record["results"].items():
        glob = [f"{got[k]:.1e}" if k in got else "—" for k in ("n_enc", "globenc")]
        if "n_enc" not in got:
            glob[0] = "— (GlobEnc's code is BERT's)"
        lines.append(f"| {NAMES.get(arch, arch)} | {got['decompx']:.1e} | {glob[0]} | {glob[1]} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# ref: the authors' environment (transformers 4.x)
# --------------------------------------------------------------------------------------------------
def ref(root: Path, decompx_repo: Path, globenc_repo: Path) -> None:
    import importlib
    import sys as system

    import torch
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    # transformers 4.x moved these to pytorch_utils; the authors' files import them from here
    for name in (
        "apply_chunking_to_forward",
        "find_pruneable_heads_and_indices",
        "prune_linear_layer",
    ):
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))

    def load(repo: Path, module: str):
        system.path.insert(0, str(repo))
        try:
            for cached in [m for m in system.modules if m == "src" or m.startswith("src.")]:
                del system.modules[cached]
            return importlib.import_module(module)
        finally:
            system.path.remove(str(repo))

    decompx_bert = load(decompx_repo, "src.modeling_bert")
    decompx_roberta = load(decompx_repo, "src.modeling_roberta")
    # the paper's configuration (their modeling_bert imports the config class)
    config = decompx_bert.DecompXConfig(
        include_biases=True, bias_decomp_type="absdot", include_LN1=True, include_FFN=True,
        FFN_approx_type="GeLU_ZO", include_LN2=True, aggregation="vector",
        include_classifier_w_pooler=True, tanh_approx_type="ZO", output_all_layers=False,
        output_classifier=True,
    )  # fmt: skip
    classes = {
        "bert": decompx_bert.BertForSequenceClassification,
        "roberta": decompx_roberta.RobertaForSequenceClassification,
    }
    globenc_bert = load(globenc_repo, "src.modeling.modeling_bert")
    for arch in ARCHS:
        inputs = {
            k: torch.tensor(v)
            for k, v in json.loads((root / arch / "inputs.json").read_text()).items()
        }
        model = classes[arch].from_pretrained(root / arch).eval()
        with torch.no_grad():
            out = model(**inputs, return_dict=False, decompx_config=config)
        decomposed = out[-1].classifier  # [B, L, classes]
        dumped = {"decompx": decomposed.tolist()}
        # GlobEnc's released code is BERT's (and ELECTRA's) alone
        globenc_class = globenc_bert.BertForSequenceClassification
        glob = globenc_class.from_pretrained(root / arch).eval() if arch == "bert" else None
        if glob is not None:
            with torch.no_grad():
                _, _, norms = glob(
                    **inputs, output_attentions=True, output_norms=True, return_dict=False
                )
            n_enc = torch.stack([layer[4] for layer in norms], dim=1)  # [B, layers, L, L]
            rolled = n_enc[:, 0]
            for layer in range(1, n_enc.shape[1]):
                rolled = n_enc[:, layer] @ rolled
            dumped |= {"n_enc": n_enc.tolist(), "globenc": rolled.tolist()}
        (root / arch / "reference.json").write_text(json.dumps(dumped))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--step", choices=("all", "prepare", "ref", "compare"), default="all")
    p.add_argument("--ref-python", default="/work/lxt-venv/bin/python")
    p.add_argument("--decompx", default="/tmp/DecompX", help="a checkout of the DecompX repo")
    p.add_argument("--globenc", default="/tmp/GlobEnc", help="a checkout of the GlobEnc repo")
    p.add_argument("--root", default=str(ROOT))
    p.add_argument("--docs", action="store_true", help="write decompx-ref.json and the docs' table")
    args = p.parse_args(argv)
    root = Path(args.root)
    if args.step == "ref":
        ref(root, Path(args.decompx), Path(args.globenc))
        return 0
    if args.step in ("all", "prepare"):
        prepare(root)
    if args.step == "all":
        subprocess.run(
            [args.ref_python, __file__, "--step", "ref", "--root", str(root),
             "--decompx", args.decompx, "--globenc", args.globenc],
            check=True,
        )  # fmt: skip
    if args.step in ("all", "compare"):
        results = compare(root)
        ok = all(v <= TOLERANCE for r in results.values() for v in r.values())
        record = {"tolerance": TOLERANCE, "results": results}
        (root / "decompx-ref.json").write_text(json.dumps(record, indent=1) + "\n")
        print(json.dumps(results, indent=1), "parity ok" if ok else "PARITY FAILED")
        if ok and args.docs:  # the committed record and the docs' table
            from benchmarks.report import write_between

            RECORD.write_text(json.dumps(record, indent=1) + "\n")
            write_between(DOC, BEGIN, END, render(record))
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
