"""``python -m benchmarks run|classifiers|question-answering|masked-lm|nli|seq2seq-qa|step-scores|
report|real-size|long-attention|budgets|methods|calibrate|models``: the one entry point (see README.md)."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    from . import (
        budgets,
        calibrate,
        classify,
        harness,
        long_attention,
        masked_lm,
        methods,
        nli,
        question_answering,
        real_size,
        report,
        step_scores,
    )

    harness.parser(sub.add_parser("run", help="parity gate, then time and memory (CPU or GPU)"))
    classify.parser(sub.add_parser("classifiers", help="C1, C2: BERT-shaped classifiers"))
    question_answering.parser(
        sub.add_parser("question-answering", help="Q1: a BERT-shaped question-answering model")
    )
    masked_lm.parser(sub.add_parser("masked-lm", help="M1: a BERT-shaped masked LM (fill-mask)"))
    nli.parser(sub.add_parser("nli", help="N1: a BART-MNLI-shaped encoder-decoder classifier"))
    nli.parser(
        sub.add_parser("seq2seq-qa", help="N2: a BART-shaped encoder-decoder answerer"),
        "seq2seq_qa",
    )
    step_scores.parser(
        sub.add_parser("step-scores", help="S1: step scores against Inseq's step functions")
    )
    r = sub.add_parser("report", help="render the docs from the committed results JSON")
    r.add_argument("--cpu", default=report.CPU_RESULTS, help="CPU results JSON")
    r.add_argument("--gpu", default=report.GPU_RESULTS, help="GPU results JSON")
    real_size.parser(sub.add_parser("real-size", help="the comparison on a GPT-2-small shape"))
    long_attention.parser(
        sub.add_parser("long-attention", help="attention and rollout's memory on long inputs")
    )
    budgets.parser(sub.add_parser("budgets", help="max_memory on every benchmark workload"))
    methods.parser(sub.add_parser("methods", help="parity and time of the newer gradient methods"))
    calibrate.parser(sub.add_parser("calibrate", help="the memory estimate against measured peaks"))
    m = sub.add_parser("models", help="build the workload models and print a summary")
    m.add_argument("root", nargs="?", help="where (default benchmarks/results/models)")
    sub.add_parser("worker").add_argument("spec")  # one measurement, started by the harness
    sub.add_parser("calibrate-worker").add_argument("spec")  # one calibration measurement
    sub.add_parser("classifiers-worker").add_argument("spec")
    sub.add_parser("long-attention-worker").add_argument("spec")
    sub.add_parser("budgets-worker").add_argument("spec")
    args = p.parse_args(argv)

    if args.command == "run":
        args = harness.defaults(args)
        if args.update:  # only results of the same kind of run can be merged
            old = json.loads(args.out.read_text()) if args.out.exists() else {}
            same = ("threads", "quick", "baseline_attn")
            if old.get("status") != "ok" or any(old["meta"].get(k) != vars(args)[k] for k in same):
                p.error(f"--update: {args.out} is not an 'ok' run with the same {', '.join(same)}")
        return harness.run(args, argv)
    if args.command == "classifiers":
        return classify.run(classify.defaults(args), argv)
    if args.command == "question-answering":
        return question_answering.run(question_answering.defaults(args), argv)
    if args.command == "masked-lm":
        return masked_lm.run(masked_lm.defaults(args), argv)
    if args.command == "nli":
        return nli.run(nli.defaults(args), argv)
    if args.command == "seq2seq-qa":
        return nli.run_qa(nli.defaults(args, "seq2seq-qa"), argv)
    if args.command == "step-scores":
        return step_scores.run(step_scores.defaults(args))
    if args.command == "classifiers-worker":
        classify.worker(args.spec)
        return 0
    if args.command == "report":
        report.write_docs(args.cpu, args.gpu)
    elif args.command == "methods":
        return methods.run(args)
    elif args.command == "calibrate":
        return calibrate.run(args)
    elif args.command == "calibrate-worker":
        calibrate.worker(args.spec)
    elif args.command == "real-size":
        return real_size.run(args)
    elif args.command == "long-attention":
        return long_attention.run(args)
    elif args.command == "long-attention-worker":
        long_attention.worker(args.spec)
    elif args.command == "budgets":
        return budgets.run(args)
    elif args.command == "budgets-worker":
        budgets.worker(args.spec)
    elif args.command == "models":
        from . import workloads

        for kind, path in workloads.build_all(args.root).items():
            model, tok = workloads.load(kind, args.root)
            n = sum(p.numel() for p in model.parameters()) / 1e6
            print(f"{kind}: {path} ({n:.1f}M parameters, tokenizer vocab {len(tok)})")
    else:
        harness.worker(args.spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
