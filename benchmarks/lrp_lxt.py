"""``ax.lrp`` against LXT 2.1 (``lxt.efficient``, the AttnLRP authors' library): parity, then time.

LXT needs transformers 4.x, attrax 5.x, so LXT runs in its own virtual environment, in a
subprocess, on the same saved weights and the same token ids::

    python3 -m venv /work/lxt-venv
    /work/lxt-venv/bin/pip install torch==2.13.0 transformers==4.57.6
    /work/lxt-venv/bin/pip install --no-deps lxt==2.1 zennit

(LXT imports torchvision for its ViT patches and zennit its ResNet canonizers; neither is used on
language models, and ``benchmarks/lxt_stub`` stands in for torchvision.) Then, from the
repository root, in attrax's environment::

    PYTHONPATH=src:. python benchmarks/lrp_lxt.py [--lxt-python /work/lxt-venv/bin/python]

Steps: ``prepare`` saves the models (tiny GPT-2, Llama and BERT classifier from
``attrax.testing``; tiny Qwen2, Qwen3 and Gemma 3 built here from their configs, random norm
weights; the W1 GPT-2 of ``benchmarks/workloads.py``) and the token ids attrax
attributes; ``lxt`` (LXT's environment) runs LXT's per-target loop and dumps each target's
relevance summed over hidden; ``compare`` runs ``ax.lrp`` and checks
``max |attrax - LXT| / max |LXT| <= 1e-4`` per case before timing both (the minimum of
``--repeats`` runs, ``--threads`` threads each). Results: ``benchmarks/results/lrp/lrp-lxt.json``
(gitignored) and the summary printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE / "results" / "lrp"
STUB = HERE / "lxt_stub"
TOLERANCE = 1e-4
# case -> (architecture, rules LXT has for it); LXT's BERT patch has no CP-LRP variant
CASES = {
    "gpt2-tiny": ("gpt2", ("attnlrp", "cp-lrp")),
    "llama-tiny": ("llama", ("attnlrp", "cp-lrp")),
    "bert-tiny": ("bert", ("attnlrp",)),
    "qwen2-tiny": ("qwen2", ("attnlrp", "cp-lrp")),
    "qwen3-tiny": ("qwen3", ("attnlrp", "cp-lrp")),
    "gemma3-tiny": ("gemma3", ("attnlrp", "cp-lrp")),
    "gpt2-w1": ("gpt2", ("attnlrp", "cp-lrp")),
}
# the families built here from their configs (transformers' class-name stems), and the config
# keys they take beyond the shared sizes; both transformers versions read the saved config alike
FAMILIES = {
    "qwen2": ("Qwen2", {}),
    "qwen3": ("Qwen3", {"head_dim": 8}),  # query and key norms
    # a local layer (3-token window, its own RoPE base) and a global one, norms after each part
    "gemma3": (
        "Gemma3Text",
        {
            "head_dim": 8,
            "layer_types": ["sliding_attention", "full_attention"],
            "sliding_window": 3,
        },
    ),
}
# with --real-size: GPT-2 small's shape (768 wide, 12 layers, 12 heads), random weights, W1's texts
REAL_SIZE = {"gpt2-124m": ("gpt2", ("attnlrp",))}
PROMPT, TARGET = "The capital of France is Paris, and the capital of", " Italy is Rome."


# --------------------------------------------------------------------------------------------------
# prepare and compare: attrax's environment
# --------------------------------------------------------------------------------------------------
def prepare(root: Path, real_size: bool = False, only: list[str] | None = None) -> dict:
    import attrax as ax
    from attrax.testing import tiny_classifier, tiny_model
    from benchmarks import workloads

    root.mkdir(parents=True, exist_ok=True)
    cases = {}
    for name, (arch, rules) in (CASES | (REAL_SIZE if real_size else {})).items():
        if only and name not in only:
            continue
        path = root / "models" / name
        if name == "gpt2-124m":
            import torch
            from transformers import GPT2Config, GPT2LMHeadModel

            w1, tok = workloads.load("gpt2")
            config = GPT2Config(
                vocab_size=w1.config.vocab_size, n_positions=1024, n_embd=768, n_layer=12,
                n_head=12, bos_token_id=w1.config.bos_token_id, eos_token_id=w1.config.eos_token_id,
            )  # fmt: skip
            torch.manual_seed(workloads.SEED)
            if not (path / "config.json").exists():
                GPT2LMHeadModel(config).eval().save_pretrained(path)
                tok.save_pretrained(path)
            prompt, target = workloads.texts("gpt2", tok, 32, 32)
        elif name == "gpt2-w1":
            path = workloads.build_all()["gpt2"]
            _, tok = workloads.load("gpt2")
            prompt, target = workloads.texts("gpt2", tok, 32, 32)
        else:
            if arch in FAMILIES:
                hf, tok = _family(arch)
            else:
                hf, tok = tiny_classifier("bert") if arch == "bert" else tiny_model(arch)
            hf.save_pretrained(path)
            tok.save_pretrained(path)
            prompt, target = (
                ("the plot was good and the cast was great", None)
                if arch == "bert"
                else (PROMPT, TARGET)
            )
        model = ax.load_model(path, attn_implementation="eager")
        da = ax.lrp(model, prompt, target, reduce_hidden="sum")
        classifier = model.task != "generation"
        cases[name] = {
            "arch": arch,
            "rules": list(rules),
            "path": str(path),
            "prompt": prompt,
            "target": target,
            "ids": da.source_id.values.tolist(),
            # the position whose logits explain target k, and the token (class) explained
            "positions": [0] * da.sizes["target"]
            if classifier
            else (da.target.values - 1).tolist(),
            "targets": (da.target_class if classifier else da.target_id).values.tolist(),
            "classifier": classifier,
        }
    (root / "cases.json").write_text(json.dumps(cases, indent=1))
    return cases


def _family(arch: str) -> tuple:
    """A tiny random causal LM of ``arch`` (:data:`FAMILIES`) on the tiny Llama's tokenizer, its
    norm weights random (Gemma's scale by ``1 + weight``, initialised at 0)."""
    import torch
    import transformers

    from attrax.testing import tiny_model

    stem, extra = FAMILIES[arch]
    _, tok = tiny_model("llama")
    config = getattr(transformers, f"{stem}Config")(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=None, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for module in hf.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.normal_(0.0 if stem.startswith("Gemma") else 1.0, 0.3)
    return hf, tok


def compare(root: Path, threads: int, repeats: int) -> dict:
    import numpy as np
    import torch

    import attrax as ax

    torch.set_num_threads(threads)
    cases = json.loads((root / "cases.json").read_text())
    report = {"threads": threads, "tolerance": TOLERANCE, "cases": {}}
    for name, case in cases.items():
        model = ax.load_model(case["path"], attn_implementation="eager")
        for rule in case["rules"]:
            lxt = np.load(root / f"lxt-{name}-{rule}.npz")
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                da = ax.lrp(model, case["prompt"], case["target"], rule=rule, reduce_hidden="sum")
                times.append(time.perf_counter() - start)
            got = np.nan_to_num(da.values)
            want = lxt["relevance"]
            error = float(np.abs(got - want).max() / np.abs(want).max())
            entry = {
                "targets": len(case["targets"]),
                "tokens": len(case["ids"]),
                "max_relative_error": error,
                "parity": error <= TOLERANCE,
                "attrax_s": min(times),
                "lxt_loop_s": float(lxt["loop_s"]),
                "lxt_retained_s": float(lxt["retained_s"]),
            }
            entry["speedup_vs_loop"] = entry["lxt_loop_s"] / entry["attrax_s"]
            entry["speedup_vs_retained"] = entry["lxt_retained_s"] / entry["attrax_s"]
            report["cases"][f"{name}/{rule}"] = entry
    (root / "lrp-lxt.json").write_text(json.dumps(report, indent=1))
    return report


# --------------------------------------------------------------------------------------------------
# lxt: LXT's environment (torch, transformers 4.x, lxt; no attrax)
# --------------------------------------------------------------------------------------------------
def run_lxt(root: Path, rule: str, threads: int, repeats: int) -> None:
    import numpy as np
    import torch
    import transformers
    from lxt.efficient import monkey_patch
    from lxt.efficient.models import bert, gemma3, gpt2, llama, qwen2, qwen3

    torch.set_num_threads(threads)
    maps = {
        "gpt2": (transformers.models.gpt2.modeling_gpt2, gpt2),
        "llama": (transformers.models.llama.modeling_llama, llama),
        "bert": (transformers.models.bert.modeling_bert, bert),
        "qwen2": (transformers.models.qwen2.modeling_qwen2, qwen2),
        "qwen3": (transformers.models.qwen3.modeling_qwen3, qwen3),
        "gemma3": (transformers.models.gemma3.modeling_gemma3, gemma3),
    }
    cases = json.loads((root / "cases.json").read_text())
    patched = set()
    for name, case in cases.items():
        arch = case["arch"]
        if rule not in case["rules"]:
            continue
        if arch not in patched:  # LXT patches classes: before the model is built
            module, patches = maps[arch]
            monkey_patch(module, patches.attnLRP if rule == "attnlrp" else patches.cp_LRP)
            patched.add(arch)
        auto = (
            transformers.AutoModelForSequenceClassification
            if case["classifier"]
            else transformers.AutoModelForCausalLM
        )
        model = auto.from_pretrained(case["path"], attn_implementation="eager").eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        ids = torch.tensor([case["ids"]])
        pairs = list(zip(case["positions"], case["targets"], strict=True))

        def logits(embeds: torch.Tensor, model=model, ids=ids, case=case) -> torch.Tensor:
            kwargs = {"inputs_embeds": embeds, "attention_mask": torch.ones_like(ids)}
            if case["classifier"]:
                kwargs["token_type_ids"] = torch.zeros_like(ids)
                return model(**kwargs).logits[:, None]
            return model(**kwargs, use_cache=False).logits

        def loop(retain: bool, model=model, ids=ids, pairs=pairs) -> np.ndarray:
            """LXT's way: relevance = embeddings * gradient of one logit, target by target;
            a forward per target, or (``retain``) one forward and a retained graph."""
            rows = []
            out = None
            for position, target in pairs:
                embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
                if out is None or not retain:
                    out = logits(embeds)
                    leaf = embeds
                out[0, position, target].backward(retain_graph=retain)
                rows.append((leaf * leaf.grad).sum(-1)[0].detach().numpy())
                leaf.grad = None
            return np.stack(rows)

        relevance = loop(False)
        timed = {}
        for retain in (False, True):
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                loop(retain)
                times.append(time.perf_counter() - start)
            timed[retain] = min(times)
        np.savez(
            root / f"lxt-{name}-{rule}.npz",
            relevance=relevance,
            loop_s=timed[False],
            retained_s=timed[True],
        )
        print(f"lxt {name} {rule}: {len(pairs)} targets, {timed[False]:.3f}s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "step", nargs="?", default="all", choices=("all", "prepare", "lxt", "compare")
    )
    parser.add_argument("--rule", default="attnlrp", choices=("attnlrp", "cp-lrp"))
    parser.add_argument(
        "--lxt-python", default=os.environ.get("LXT_PYTHON", "/work/lxt-venv/bin/python")
    )
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--real-size", action="store_true", help="also GPT-2 small's shape")
    parser.add_argument("--cases", help=f"comma-separated, of {', '.join(CASES)} (default: all)")
    args = parser.parse_args()
    if args.step == "lxt":
        run_lxt(args.root, args.rule, args.threads, args.repeats)
        return 0
    if args.step in ("all", "prepare"):
        prepare(args.root, args.real_size, args.cases.split(",") if args.cases else None)
    if args.step == "all":
        env = {**os.environ, "PYTHONPATH": str(STUB)}
        for rule in ("attnlrp", "cp-lrp"):
            command = [args.lxt_python, __file__, "lxt", "--rule", rule, "--root", str(args.root)]
            command += ["--threads", str(args.threads), "--repeats", str(args.repeats)]
            subprocess.run(command, check=True, env=env)
    if args.step in ("all", "compare"):
        report = compare(args.root, args.threads, args.repeats)
        for key, entry in report["cases"].items():
            print(
                f"{key:22s} targets {entry['targets']:3d}  error {entry['max_relative_error']:.1e} "
                f"({'ok' if entry['parity'] else 'FAIL'})  attrax {entry['attrax_s']:.3f}s  "
                f"LXT loop {entry['lxt_loop_s']:.3f}s ({entry['speedup_vs_loop']:.1f}x)  "
                f"retained {entry['lxt_retained_s']:.3f}s ({entry['speedup_vs_retained']:.1f}x)"
            )
        return 0 if all(e["parity"] for e in report["cases"].values()) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
