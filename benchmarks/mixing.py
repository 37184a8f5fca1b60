"""Value zeroing: parity with Inseq 0.7's ``value_zeroing`` and time, attrax vs Inseq, W1 and W2.

Run from the repository root in the bench venv::

    PYTHONPATH=$PWD/src:$PWD .bench-venv/bin/python -m benchmarks.mixing [--repeats 3] [--quick]

Inseq 0.7.0's value zeroing does not run as shipped under transformers 5.24, for two reasons
fixed here by two shims that change no arithmetic:

1. its model table names GPT-2's value tensor ``value`` (transformers 4.x); transformers 5
   calls it ``value_states`` (``register_model_config`` below);
2. its patching hook assumes each block returns a tuple; transformers 5's ``GPT2Block`` and
   ``MarianDecoderLayer`` return a tensor (``_tuple_or_tensor_patch`` below: the same hook,
   accepting both).

W1 (GPT-2) compares the decoder self-attention scores; W2 (Marian) the cross-attention scores
(Inseq's ``source_attributions``) and the decoder self-attention scores (``attribute_target=True``
on both sides), Inseq's encoder self-attention scores switched off
(``output_encoder_self_scores=False``) so that both sides compute the same thing.
``nonzero_share`` is the share of scores above Inseq's 1e-5 threshold (the rest are 0 on both
sides). ``max_abs_diff`` leaves out the ``rows_at_threshold`` (target, layer) rows that hold a
distance within 1% of that threshold: there float rounding decides whether the distance is
zeroed, and the row's normalization moves with it (``max_abs_diff_with_those_rows`` keeps them).

Both sides run the same GPT-2 workload model, eager attention, cosine distance, Inseq's
aggregation (distances below 1e-5 set to 0, each row divided by its sum over sources). Parity is
the largest absolute difference over every (target, source, layer) both define, on a float64
copy of the model, attrax's cosine taking the float32 casts Inseq's takes (Inseq stores the
states of every layer but the last in float32 and takes their cosine in float32; the last
layer's clean state is rounded to float32 too): :func:`_inseq_cosine`. Without that cast (``max_abs_diff_float64_cosine``) and on the
float32 model (``max_abs_diff_float32_model``) the gaps are float32 rounding of ``1 - cos`` for
nearly parallel states (distances of 1e-5 to 1e-4 on these random-weight models; float32 rounds
``cos`` to about 6e-8), amplified by the per-row normalization. Times are on the float32 model, the median of ``--repeats`` calls each, after one
warm-up call each, in the same process.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from typing import Any

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


def timed(fn, repeats: int, warm_up: bool = True) -> tuple[Any, float]:
    """``(fn()'s last result, the median seconds of repeats calls)``, after a warm-up call
    unless ``warm_up`` is False."""
    result = fn() if warm_up else None
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - t0)
    return result, statistics.median(seconds)


def run(kind: str, n_prompt: int, n_target: int, repeats: int) -> dict[str, object]:
    import inseq

    import attrax as ax
    from attrax import _mixing

    _inseq_shims()
    torch.manual_seed(0)
    model, tok = workloads.load(kind)
    prompt, target = workloads.texts(kind, tok, n_prompt, n_target)
    im = inseq.load_model(model, "value_zeroing", tokenizer=copy.deepcopy(tok))
    am = ax.load_model(model, tokenizer=tok)
    enc_dec = kind == "marian"

    def inseq_call():
        if enc_dec:
            out = im.attribute(
                prompt,
                target,
                show_progress=False,
                step_scores=[],
                attribute_target=True,
                output_encoder_self_scores=False,
            )
            seq = out.sequence_attributions[0]
            # [encoder tokens | decoder prefix, generated, layer] -> [target, source, layer]
            sides = (seq.source_attributions, seq.target_attributions)
            return torch.cat(sides).double().transpose(0, 1).numpy()
        out = im.attribute(prompt, prompt + target, show_progress=False, step_scores=[])
        seq = out.sequence_attributions[0]
        # [source (prompt + generated), generated, layer] -> [target, source, layer]
        return seq.target_attributions.double().transpose(0, 1).numpy()

    def attrax_call():
        options = {"attribute_target": True} if enc_dec else {}
        return ax.value_zeroing(am, prompt, target, batch_size=None, **options).values

    theirs, inseq_seconds = timed(inseq_call, repeats)
    ours, attrax_seconds = timed(attrax_call, repeats)
    gap32 = _gap(theirs, ours)
    model.double()  # the same weights in float64: parity of the algorithm, not of the rounding
    theirs = inseq_call()
    gap64 = _gap(theirs, attrax_call())
    # Inseq casts both states to float32 and takes its cosine in float32: attrax's, the same way
    exact, threshold = _mixing._distance, _mixing.THRESHOLD
    _mixing._distance = _inseq_cosine(len(_mixing._layers(am, "cross" if enc_dec else "self")))
    try:
        emulated = attrax_call()
        _mixing.THRESHOLD = -1.0  # the distances themselves, unthresholded and unnormalized
        options = {"attribute_target": True} if enc_dec else {}
        raw = ax.value_zeroing(am, prompt, target, normalize=False, **options).values
    finally:
        _mixing._distance, _mixing.THRESHOLD = exact, threshold
    # a row holding a distance within 1% of the threshold: float rounding decides whether that
    # distance is zeroed, and the row's normalization changes with it
    ambiguous = (np.abs(np.nan_to_num(raw) - threshold) < 0.01 * threshold).any(1, keepdims=True)
    ambiguous = np.broadcast_to(ambiguous, raw.shape)
    gap = _gap(np.where(ambiguous, 0, theirs), np.where(ambiguous, 0, emulated))
    return {
        "workload": f"{kind}: {n_prompt} prompt + {n_target} target tokens",
        "shape": list(ours.shape),
        "max_abs_diff": gap,
        "rows_at_threshold": int(ambiguous[:, 0].sum()),
        "rows": int(np.prod(raw.shape) // raw.shape[1]),
        "max_abs_diff_with_those_rows": _gap(theirs, emulated),
        "max_abs_diff_float64_cosine": gap64,
        "max_abs_diff_float32_model": gap32,
        "parity": gap <= 1e-4,
        "nonzero_share": float((np.nan_to_num(theirs) > 0).sum() / (~np.isnan(theirs)).sum()),
        "inseq_seconds": inseq_seconds,
        "attrax_seconds": attrax_seconds,
        "speedup": inseq_seconds / attrax_seconds,
        "threads": torch.get_num_threads(),
    }


def _inseq_cosine(n_layers: int):
    """attrax's distance taken with Inseq's casts: for layers below the last, both states in
    float32 and a float32 cosine; for the last (read from the model's output, not cast), the
    clean state rounded to float32 against the zeroed one as is. attrax computes each forward's
    distances in layer order, so the call count says which layer it is."""
    calls = [0]

    def distance(zeroed: torch.Tensor, clean: torch.Tensor, similarity: str) -> torch.Tensor:
        assert similarity == "cosine"
        last = calls[0] % n_layers == n_layers - 1
        calls[0] += 1
        if last:
            clean = clean.float().to(zeroed.dtype)
        else:
            zeroed, clean = zeroed.float(), clean.float()
        return (1 - torch.nn.functional.cosine_similarity(zeroed, clean, dim=-1)).double()

    return distance


def _gap(theirs: np.ndarray, ours: np.ndarray) -> float:
    assert theirs.shape == ours.shape, (theirs.shape, ours.shape)
    assert (np.isnan(theirs) == np.isnan(ours)).all(), "NaN (unseen sources) differ"
    both = ~np.isnan(theirs)
    return float(np.abs(theirs[both] - ours[both]).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="8 + 4 tokens instead of 32 + 32")
    parser.add_argument("--workloads", default="W1,W2")
    args = parser.parse_args()
    results = {}
    for name in args.workloads.split(","):
        plan = workloads.plans(quick=False)[name]
        sizes = (8, 4) if args.quick else (plan.n_prompt, plan.n_target)
        results[name] = run(plan.kind, *sizes, args.repeats)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
