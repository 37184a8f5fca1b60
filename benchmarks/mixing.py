"""Value zeroing: parity with Inseq 0.7's ``value_zeroing`` and time, attrax vs Inseq, on W1.

Run from the repository root in the bench venv::

    PYTHONPATH=$PWD/src:$PWD .bench-venv/bin/python -m benchmarks.mixing [--repeats 3] [--quick]

Inseq 0.7.0's value zeroing does not run as shipped under transformers 5.24, for two reasons
fixed here by two shims that change no arithmetic:

1. its model table names GPT-2's value tensor ``value`` (transformers 4.x); transformers 5
   calls it ``value_states`` (``register_model_config`` below);
2. its patching hook assumes each block returns a tuple; transformers 5's ``GPT2Block`` returns
   a tensor (``_tuple_or_tensor_patch`` below: the same hook, accepting both).

Both sides run the same GPT-2 workload model, eager attention, cosine distance, Inseq's
aggregation (distances below 1e-5 set to 0, each row divided by its sum over sources). Parity is
the largest absolute difference over every (target, source, layer) both define, on a float64
copy of the model (Inseq then still compares its states in float32); the float32 gap is recorded
too (float32 rounding of ``1 - cos`` for nearly parallel states, amplified by the per-row
normalization). Times are on the float32 model, the median of ``--repeats`` calls each, after one
warm-up call each, in the same process.
Encoder-decoder models (W2) are not compared: attrax's value zeroing refuses them (ModelError).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import numpy as np
import torch

from . import workloads


def _inseq_shims() -> None:
    from inseq.attr.feat.ops.value_zeroing import ValueZeroing
    from inseq.models.model_config import register_model_config

    register_model_config(
        "GPT2LMHeadModel",
        {"self_attention_module": "attn", "value_vector": "value_states"},
        overwrite=True,
        allow_partial=True,
    )

    def _tuple_or_tensor_patch(self, block_idx: int, hidden_state_idx: int = 0):
        def hook(module, args, output):
            is_tuple = isinstance(output, tuple)
            hidden = output[hidden_state_idx] if is_tuple else output
            self.corrupted_block_output_states[block_idx] = hidden.clone().float().detach().cpu()
            clean = self.clean_block_output_states[block_idx].to(hidden.device)
            if not is_tuple:
                return clean
            return (*output[:hidden_state_idx], clean, *output[hidden_state_idx + 1 :])

        return hook

    ValueZeroing.get_states_extract_and_patch_hook = _tuple_or_tensor_patch


def _timed(fn, repeats: int) -> tuple[object, float]:
    result = fn()  # warm-up
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - t0)
    return result, statistics.median(seconds)


def run(n_prompt: int, n_target: int, repeats: int) -> dict[str, object]:
    import inseq

    import attrax as ax

    _inseq_shims()
    torch.manual_seed(0)
    model, tok = workloads.load("gpt2")
    prompt, target = workloads.texts("gpt2", tok, n_prompt, n_target)
    im = inseq.load_model(model, "value_zeroing", tokenizer=copy.deepcopy(tok))
    am = ax.load_model(model, tokenizer=tok)

    def inseq_call():
        out = im.attribute(prompt, prompt + target, show_progress=False, step_scores=[])
        seq = out.sequence_attributions[0]
        # [source (prompt + generated), generated, layer] -> [target, source, layer]
        return seq.target_attributions.double().transpose(0, 1).numpy()

    def attrax_call():
        return ax.value_zeroing(am, prompt, target, batch_size=None).values

    theirs, inseq_seconds = _timed(inseq_call, repeats)
    ours, attrax_seconds = _timed(attrax_call, repeats)
    gap32 = _gap(theirs, ours)
    model.double()  # the same weights in float64: parity of the algorithm, not of the rounding
    gap = _gap(inseq_call(), attrax_call())
    return {
        "workload": f"W1 (GPT-2, {n_prompt} prompt + {n_target} target tokens)",
        "shape": list(ours.shape),
        "max_abs_diff": gap,
        "max_abs_diff_float32": gap32,
        "parity": gap <= 1e-4,
        "inseq_seconds": inseq_seconds,
        "attrax_seconds": attrax_seconds,
        "speedup": inseq_seconds / attrax_seconds,
        "threads": torch.get_num_threads(),
    }


def _gap(theirs: np.ndarray, ours: np.ndarray) -> float:
    assert theirs.shape == ours.shape, (theirs.shape, ours.shape)
    assert (np.isnan(theirs) == np.isnan(ours)).all(), "NaN (unseen sources) differ"
    both = ~np.isnan(theirs)
    return float(np.abs(theirs[both] - ours[both]).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="8 + 4 tokens instead of W1's 32 + 32")
    args = parser.parse_args()
    plan = workloads.plans(quick=False)["W1"]
    sizes = (8, 4) if args.quick else (plan.n_prompt, plan.n_target)
    print(json.dumps(run(*sizes, args.repeats), indent=2))


if __name__ == "__main__":
    main()
