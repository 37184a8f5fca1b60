"""One runner for the three libraries: the same quantity from attrax, Captum and Inseq.

Conventions that make the sides compute the same thing: the objective is the probability of the
target token (Inseq's default); saliency is signed (``abs=False``) everywhere; IG uses the same
points and quadrature and Inseq's baseline (the unk embedding everywhere, EOS kept) on every side;
attention is that of the query predicting each target, every layer and head. Every call into
attrax goes through :func:`attrax_attribute`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from . import workloads
from .workloads import IG_QUADRATURE, IG_STEPS, Plan

LIBRARIES = ("attrax", "captum", "inseq")
SUPPORTS = {
    "attrax": set(workloads.METHODS),
    "captum": set(workloads.METHODS) - {"attention"},  # Captum has no attention method
    # Inseq draws its own noise and permutations: no parity with given draws
    "inseq": set(workloads.CORE_METHODS),
}


def inseq_baseline(model, prompt: str, target: str):
    """Inseq 0.7's IG baseline as an attrax baseline tensor ``[1, L, H]`` (source side).

    Every token -> unk (else pad, else EOS), EOS tokens kept; embedding-table rows
    (``model.embed``: attrax applies any embedding scale itself).
    """
    import torch

    from attrax._inputs import prepare, to_tensors  # internal, only to read the token ids

    ids = to_tensors(prepare(model, prompt, target), model).ids
    tok, eos = model.tokenizer, model.eos_token_id
    unk = tok.unk_token_id
    if unk is None:
        unk = tok.pad_token_id if tok.pad_token_id is not None else model.hf.config.pad_token_id
    if unk is None:
        unk = eos
    base_ids = torch.where(ids == eos, torch.full_like(ids, eos), torch.full_like(ids, unk))
    with torch.no_grad():
        return model.embed(base_ids, "source").detach()


def attrax_attribute(
    model,
    prompt: str,
    target: str,
    method: str,
    *,
    steps: int = IG_STEPS,
    quadrature: str = IG_QUADRATURE,
    chunk_size: int | str | None = None,
    batch_size: int | str | None = None,
    activations: str = "all",
    max_memory: int | str | None = None,
) -> tuple[Any, float]:
    """``(DataArray, seconds)`` of one attrax method: the only place the benchmarks call attrax.

    ``seconds`` covers the public call (tokenizing, attributing, labelling); the IG baseline tensor
    is built before the clock starts (a user builds it once).
    """
    import attrax as ax

    kwargs: dict[str, Any] = {}
    if method != "attention":
        kwargs["max_memory"] = max_memory
    if method != "attention" and method not in workloads.PERTURBATION_METHODS:
        kwargs["chunk_size"] = chunk_size
    if method == "saliency":
        kwargs["abs"] = False
    elif method in ("integrated_gradients", "sequential_integrated_gradients"):
        baseline = inseq_baseline(model, prompt, target)
        kwargs.update(steps=steps, quadrature=quadrature, baseline=baseline, batch_size=batch_size)
    elif method in ("guided_backprop", "deconvolution"):
        kwargs.update(activations=activations)
    elif method == "discretized_integrated_gradients":  # Inseq's baseline: unk, EOS kept
        kwargs.update(steps=steps, baseline="unk", batch_size=batch_size)
    elif method == "gradient_shap":
        baseline = inseq_baseline(model, prompt, target)
        kwargs.update(
            baselines=["zeros", baseline], samples=workloads.NOISE_SAMPLES,
            stdevs=workloads.SHAP_STDEVS, seed=workloads.SEED, batch_size=batch_size,
        )  # fmt: skip
    elif method in ("squaregrad", "vargrad"):
        kwargs.update(
            samples=workloads.NOISE_SAMPLES, noise=workloads.NOISE_LEVEL, seed=workloads.SEED,
            batch_size=batch_size,
        )  # fmt: skip
    elif method == "shapley_sampling":
        kwargs.update(permutations=workloads.PERMUTATIONS, seed=workloads.SEED)
    elif method not in ("input_x_gradient", "lrp", "attention", "feature_ablation"):
        raise ValueError(f"unknown method {method!r}")
    t0 = time.perf_counter()
    da = getattr(ax, method)(model, prompt, target, **kwargs)
    return da, time.perf_counter() - t0


def attrax_aggregates(da, method: str) -> dict[str, np.ndarray]:
    """The parity aggregates, computed with attrax's own reductions (so those are checked too)."""
    import attrax as ax

    if method == "attention":
        return {"raw": da.values, "head_mean_normalize": ax.normalize(ax.mean(da, "head")).values}
    if method in workloads.PERTURBATION_METHODS:
        return {"raw": da.values, "normalize": ax.normalize(da).values}
    return {
        "raw": da.values,
        "l2_normalize": ax.pipe(ax.l2_norm, ax.normalize)(da).values,
        "sum": ax.sum(da).values,
    }


class Runner:
    """One library with one model (loaded once) and one method."""

    def __init__(
        self,
        library: str,
        kind: str,
        method: str,
        device: str = "cpu",
        baseline_attn="eager",
        dtype: str = "float32",
        attrax_attn: str = "auto",
    ):
        self.library, self.kind, self.method = library, kind, method
        # attrax picks its attention per call (its "auto"); Inseq's attention needs eager maps
        attn = "eager" if library == "attrax" or method == "attention" else baseline_attn
        self.hf, self.tok = workloads.load(kind, attn_implementation=attn)
        if dtype == "float64":  # the parity gate of comparisons float32 cannot resolve
            self.hf.double()
        self.hf.to(device)  # Inseq keeps a model's device; so do the others
        self.handle: Any = None
        if library == "attrax":
            import attrax as ax

            self.handle = ax.load_model(
                self.hf, tokenizer=self.tok, attn_implementation=attrax_attn
            )
        elif library == "inseq":
            from .baselines import inseq_load

            self.handle, _ = inseq_load(self.hf, self.tok, method)
        elif library != "captum":
            raise ValueError(f"unknown library {library!r}")

    def __call__(
        self, prompt: str, target: str, plan: Plan | None = None
    ) -> tuple[np.ndarray, float, dict[str, np.ndarray] | None]:
        """``(raw attributions, seconds, attrax's aggregates or None)``."""
        steps = plan.steps if plan else IG_STEPS
        if self.library == "attrax":
            da, seconds = attrax_attribute(
                self.handle, prompt, target, self.method, steps=steps,
                chunk_size=plan.chunk_size if plan else None,
                batch_size=plan.batch_size if plan else None,
            )  # fmt: skip
            return da.values, seconds, attrax_aggregates(da, self.method)
        from .baselines import captum_attribute, captum_noise_attribute, inseq_attribute

        if self.method in workloads.NOISE_METHODS:
            res = captum_noise_attribute(self.hf, self.tok, prompt, target, self.method)
            return res.attributions, res.seconds, None

        ibs = plan.internal_batch_size if plan else None
        common: dict[str, Any] = dict(
            n_steps=steps,
            ig_method=IG_QUADRATURE,
            abs=False,
            internal_batch_size=ibs if self.method == "integrated_gradients" else None,
        )
        if self.library == "captum":
            res = captum_attribute(
                self.hf, self.tok, prompt, target, self.method, baseline="inseq", **common
            )
        else:  # no step scores: Inseq's default
            res = inseq_attribute(
                self.hf, self.tok, prompt, target, self.method, step_scores=(),
                inseq_model=self.handle, **common,
            )  # fmt: skip
        return res.attributions, res.seconds, None


def attrax_classify(
    model,
    texts: list[str],
    classes: list[list[int]],
    method: str,
    *,
    steps: int = IG_STEPS,
    batch_size: int | None = None,
) -> tuple[np.ndarray, float]:
    """``([example, class, source(, hidden)], seconds)`` of one attrax method on a sequence
    classifier: the classes of ``classes[b]`` in that order. One call: a class per example when
    each row has one, ``targets="all"`` when each row is every class.

    IG starts from Captum's BERT-tutorial reference (``[PAD]`` with ``[CLS]``/``[SEP]`` kept),
    built before the clock starts; occlusion replaces a token's embedding by ``[MASK]``'s.
    """
    import torch

    import attrax as ax

    every = all(list(c) == list(range(len(model.labels))) for c in classes)
    targets: Any = "all" if every else [c[0] for c in classes]
    if not every and any(len(c) != 1 for c in classes):
        raise ValueError("classes: one per example, or every class for every example")
    kwargs: dict[str, Any] = {}
    if method == "saliency":
        kwargs["abs"] = False
    elif method == "integrated_gradients":
        from .baselines import reference_ids

        enc = model.tokenizer(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            base = model.embed(reference_ids(model.tokenizer, enc["input_ids"])).detach()
        kwargs.update(steps=steps, quadrature=IG_QUADRATURE, baseline=base, batch_size=batch_size)
    elif method == "occlusion":
        kwargs.update(baseline="mask", batch_size=batch_size)
    elif method != "input_x_gradient":
        raise ValueError(f"unknown method {method!r}")
    t0 = time.perf_counter()
    da = getattr(ax, method)(model, texts, targets, **kwargs)
    seconds = time.perf_counter() - t0
    held = da.target_class.values  # [example, target]: the class each column holds, -1 none
    pick = np.array([[list(held[b]).index(c) for c in row] for b, row in enumerate(classes)])
    values = da.values[np.arange(len(classes))[:, None], pick]
    return values, seconds
