"""Train attrax's built-in offline classifier: a tiny BERT that labels a text by its marker word.

Usage::

    python scripts/train_default_classifier.py            # writes src/attrax/_default_classifier/
    python scripts/train_default_classifier.py --out DIR --steps 600

The task, its generator, the held-out split and the ground truth (which token is the evidence)
are in ``attrax._default_classifier_task``. The WordPiece tokenizer is trained here on texts of
the task (``attrax.testing.train_tokenizer``, deterministic) and must hold every task word whole.
Training is deterministic on CPU (fixed seeds, one thread, ``torch.use_deterministic_algorithms``)
and takes a few seconds. Cross-entropy with label smoothing 0.1 keeps class probabilities near
0.9 instead of saturating (saturated softmaxes make gradient attributions numerically noisy).
Half the training texts lose their marker and are taught the uniform distribution: without
it, filler words pick up some of the integrated-gradients attribution (70% top-1 on the marker
instead of 100%). The script then reports held-out accuracy and how often plain-autograd saliency (L2 over hidden)
and integrated gradients (zeros baseline, summed over hidden) put their highest score on the
marker token; it refuses to save a model that misses the targets unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[1]
try:
    from attrax import _default_classifier_task as task
    from attrax.testing import train_tokenizer
except ImportError:  # running from a checkout without an installed package
    sys.path.insert(0, str(REPO / "src"))
    from attrax import _default_classifier_task as task
    from attrax.testing import train_tokenizer

SEED = 4321


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """BERT-style WordPiece trained on texts of the task; every task word is one piece."""
    rng = random.Random(SEED - 1)
    texts = [task.make_example(rng, split="train")[0] for _ in range(2000)]
    tok = train_tokenizer("wordpiece", vocab_size=vocab_size, texts=texts)
    tok.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    tok.padding_side = "right"
    words = [*task.FILLERS, *(w for ws in task.MARKERS.values() for w in ws)]
    split = [w for w in words if len(tok.tokenize(w)) != 1]
    if split:
        raise SystemExit(f"vocabulary too small: {split} are split into pieces")
    return tok


def build_model(
    tok: PreTrainedTokenizerFast, args: argparse.Namespace
) -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden,
        max_position_embeddings=32,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0,
        pad_token_id=tok.pad_token_id,
        num_labels=len(task.LABELS),
        id2label=dict(enumerate(task.LABELS)),
        label2id={label: i for i, label in enumerate(task.LABELS)},
    )
    return BertForSequenceClassification(config)


def make_batch(
    tok: PreTrainedTokenizerFast,
    rng: random.Random,
    size: int,
    split: str = "train",
    drop: float = 0.0,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[str]]:
    """Texts, their class ids and encodings; a fraction ``drop`` loses its marker (label -1)."""
    texts, labels = [], []
    for _ in range(size):
        text, label = task.make_example(rng, split=split)
        if rng.random() < drop:
            words = text.split()
            del words[task.evidence(text)]
            text, label = " ".join(words), None
        texts.append(text)
        labels.append(-1 if label is None else task.LABELS.index(label))
    enc = tok(texts, padding=True, return_tensors="pt")
    labels = torch.tensor(labels)
    return dict(enc), labels, texts


def train(model: BertForSequenceClassification, tok: PreTrainedTokenizerFast, args) -> None:
    rng = random.Random(SEED)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        enc, labels, _ = make_batch(tok, rng, args.batch, drop=args.no_marker)
        logits = model(**enc).logits
        # a text without its marker has no evidence: teach the uniform distribution
        target = torch.nn.functional.one_hot(labels.clamp(min=0), len(task.LABELS)).float()
        target[labels < 0] = 1.0 / len(task.LABELS)
        loss = torch.nn.functional.cross_entropy(
            logits, target, label_smoothing=args.label_smoothing
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(
                f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - t0:6.1f}s",
                flush=True,
            )
    model.eval()


@torch.no_grad()
def accuracy(model, tok, n: int) -> float:
    enc, labels, _ = make_batch(tok, random.Random(SEED + 1), n, split="heldout")
    return float((model(**enc).logits.argmax(-1) == labels).float().mean())


def attribution_agreement(model, tok, n: int, ig_steps: int = 32) -> tuple[float, float]:
    """Fraction of held-out texts whose top saliency / IG token (specials included) is the marker."""
    enc, _, _ = make_batch(tok, random.Random(SEED + 2), n, split="heldout")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    truth = torch.tensor([task.ground_truth(tok.convert_ids_to_tokens(row)) for row in ids])
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)
        predicted = model(**enc).logits.argmax(-1)
    rows = torch.arange(n)

    def prob(x: torch.Tensor, reps: int = 1) -> torch.Tensor:
        logits = model(
            inputs_embeds=x,
            attention_mask=mask.repeat_interleave(reps, 0),
            token_type_ids=enc["token_type_ids"].repeat_interleave(reps, 0),
        ).logits
        return torch.softmax(logits, -1)[torch.arange(len(x)), predicted.repeat_interleave(reps)]

    x = emb.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(prob(x).sum(), x)
    saliency = grad.norm(dim=-1).masked_fill(mask == 0, -1.0)
    alphas = (torch.arange(ig_steps, dtype=torch.float32) + 0.5) / ig_steps
    path = (alphas[None, :, None, None] * emb[:, None]).reshape(-1, *emb.shape[1:])
    path.requires_grad_(True)
    (g,) = torch.autograd.grad(prob(path, ig_steps).sum(), path)
    ig = (emb * g.reshape(n, ig_steps, *emb.shape[1:]).mean(1)).sum(-1)
    ig = ig.masked_fill(mask == 0, -torch.inf)
    sal = float((saliency.argmax(-1) == truth).float().mean())
    return sal, float((ig[rows].argmax(-1) == truth).float().mean())


def write_task_files(out: Path, metrics: dict) -> None:
    text, label = task.make_example(0)
    info = {
        "task": task.TASK_NAME,
        "description": "Label a text by its one marker word among filler words.",
        "labels": list(task.LABELS),
        "markers": {task.LABELS[c]: list(ws) for c, ws in task.MARKERS.items()},
        "fillers": list(task.FILLERS),
        "example_text": text,
        "example_label": label,
        "ground_truth": (
            "the marker word is the evidence; with one token per task word it is source "
            "position word_index + 1 ([CLS] first)"
        ),
        "helpers": "attrax._default_classifier_task: make_example, label_of, evidence, "
        "ground_truth, is_heldout",
        "heldout_split": "zlib.crc32(' '.join(text.split())) % 10 == 0 (never trained on)",
        "load": f"attrax.load_model({task.BUILTIN_NAME!r})",
        "training_script": "scripts/train_default_classifier.py",
        "metrics": metrics,
    }
    (out / "task.json").write_text(json.dumps(info, indent=2) + "\n")
    markers = "; ".join(f"{task.LABELS[c]}: {', '.join(ws)}" for c, ws in task.MARKERS.items())
    readme = f"""# attrax built-in classifier

A tiny BERT (`BertForSequenceClassification`, {metrics["n_params"]:,} parameters, WordPiece
vocabulary of {metrics["vocab_size"]}) trained from scratch by
`scripts/train_default_classifier.py` on a synthetic task with known evidence, so that
`attrax demo --task classification` runs offline and attributions can be checked against the
truth. Load it with `attrax.load_model({task.BUILTIN_NAME!r})`.

Task `{task.TASK_NAME}`: a text of {task.MIN_FILLERS}-{task.MAX_FILLERS} filler words with exactly
one marker word; the label is the marker's class ({markers}).

    text   {text!r}
    label  {label!r}

Ground truth: the marker is the only token the label depends on. See
`attrax._default_classifier_task.ground_truth` and `task.json`.

Trained with label smoothing {metrics["label_smoothing"]}, so class probabilities are about 0.9
rather than saturated, and with {metrics["no_marker_fraction"]:.0%} of the training texts stripped of
their marker and taught the uniform distribution, so that filler words carry no evidence.

- held-out accuracy: {metrics["heldout_accuracy"]:.1%}
- top-1 saliency token = marker: {metrics["saliency_top1_marker"]:.1%}
- top-1 integrated-gradients token = marker: {metrics["ig_top1_marker"]:.1%}
"""
    (out / "README.md").write_text(readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=task.DEFAULT_CLASSIFIER_PATH)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument(
        "--no-marker", type=float, default=0.5, help="fraction of texts trained without marker"
    )
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=300)
    parser.add_argument("--eval", type=int, default=1000, help="held-out texts for accuracy")
    parser.add_argument("--eval-attr", type=int, default=200, help="texts for attributions")
    parser.add_argument("--force", action="store_true", help="save even if checks fail")
    args = parser.parse_args(argv)

    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    tok = build_tokenizer(args.vocab)
    model = build_model(tok, args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters, vocab {len(tok)}")
    t0 = time.perf_counter()
    train(model, tok, args)
    train_s = time.perf_counter() - t0
    acc = accuracy(model, tok, args.eval)
    sal, ig = attribution_agreement(model, tok, args.eval_attr)
    print(f"training time {train_s:.1f}s")
    print(f"held-out accuracy: {acc:.2%} ({args.eval} texts)")
    print(f"top-1 token == marker: saliency {sal:.2%}, IG {ig:.2%} ({args.eval_attr} texts)")

    metrics = {
        "n_params": n_params,
        "vocab_size": len(tok),
        "train_steps": args.steps,
        "no_marker_fraction": args.no_marker,
        "label_smoothing": args.label_smoothing,
        "heldout_accuracy": acc,
        "saliency_top1_marker": sal,
        "ig_top1_marker": ig,
        "eval_texts": args.eval,
        "attribution_eval_texts": args.eval_attr,
        "attribution_methods": (
            "predicted class probability; saliency: L2 norm over hidden of the gradient w.r.t. "
            "the word embeddings; IG: zeros baseline, 32-step midpoint rule, summed over hidden; "
            "argmax over every real token, [CLS] and [SEP] included"
        ),
    }
    if not (acc >= 0.99 and sal >= 0.95 and ig >= 0.95) and not args.force:
        print("checks failed (need accuracy >= 99%, saliency/IG >= 95%); not saving")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    # load with the generic fast-tokenizer class on transformers 4.x as well as 5.x
    config_path = args.out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["model_input_names"] = tok.model_input_names
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    write_task_files(args.out, metrics)
    for f in args.out.iterdir():
        f.chmod(0o644)  # safetensors writes 0600
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"saved to {args.out} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
