"""Captum 0.9 and Inseq 0.7 adapters: raw attributions in attrax's layout, and their wall time.

``BaselineResult.attributions`` is ``[n_target, n_source, hidden]`` (attention: ``[.., layer,
head]``), float32, NaN where nothing is attributed. Decoder-only: the targets are the forced
continuation tokens (positions P..P+G-1), the sources all P+G positions, NaN at ``source >= target
position``. Encoder-decoder: the sources are the encoder tokens (``</s>`` included), the targets the
decoder tokens after the start token; with ``attribute_target=True`` the decoder side comes in
``target_side``, ``[n_target, 1 + n_target, hidden]``. ``seconds`` times the attribution only (not
model loading, nor ``inseq.load_model``). The conventions found are in ``benchmarks/README.md``.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

CAPTUM_METHODS = (
    "saliency",
    "input_x_gradient",
    "integrated_gradients",
    "guided_backprop",
    "deconvolution",
)
CAPTUM_NOISE_METHODS = (
    "gradient_shap", "squaregrad", "vargrad", "feature_ablation", "shapley_sampling",
)  # fmt: skip
INSEQ_METHODS = (
    "saliency",
    "input_x_gradient",
    "integrated_gradients",
    "attention",
    "sequential_integrated_gradients",
    "discretized_integrated_gradients",
)
# Captum's modified-ReLU methods hook the nn.ReLU modules of a Module they are given
_CAPTUM_MODULE_METHODS = {"guided_backprop": "GuidedBackprop", "deconvolution": "Deconvolution"}


@dataclass
class BaselineResult:
    """Raw attributions ``[n_target, n_source, ...]`` and what they are over."""

    attributions: np.ndarray
    seconds: float
    target_ids: np.ndarray
    source_ids: np.ndarray
    target_positions: np.ndarray  # attrax's ``target`` coordinate (position in the sequence)
    target_side: np.ndarray | None = None  # enc-dec attribute_target: [n_target, 1 + n_target, ..]
    step_scores: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def _is_enc_dec(model) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def _objective(logits: torch.Tensor, target_ids: torch.Tensor, objective: str) -> torch.Tensor:
    """``logits [B, V]``, ``target_ids [B]`` -> ``[B]``."""
    if objective == "probability":
        scores = logits.softmax(-1)
    elif objective in ("log_probability", "logprob"):
        scores = logits.log_softmax(-1)
    elif objective == "logit":
        scores = logits
    else:
        raise ValueError(f"unknown objective {objective!r}")
    return scores.gather(-1, target_ids.reshape(-1, 1)).squeeze(-1)


def inseq_style_baseline_ids(model, tok, ids: torch.Tensor, keep_first: bool = False):
    """Inseq 0.7's IG baseline ids: unk (else pad, else EOS) everywhere, EOS kept; ``keep_first``
    keeps position 0 (the decoder start token of encoder-decoder targets)."""
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    unk = tok.unk_token_id
    if unk is None:
        unk = tok.pad_token_id if tok.pad_token_id is not None else model.config.pad_token_id
    if unk is None:
        unk = eos
    out = torch.where(ids == eos, torch.full_like(ids, eos), torch.full_like(ids, unk))
    if keep_first:
        out[..., 0] = ids[..., 0]
    return out


def _baseline_embeds(model, tok, emb, ids, baseline, keep_first: bool, scale: float = 1.0):
    if baseline == "zeros" or baseline is None:
        return None  # Captum's default: zeros
    if baseline == "inseq":
        bids = inseq_style_baseline_ids(model, tok, ids, keep_first=keep_first)
    elif isinstance(baseline, int):
        bids = torch.full_like(ids, baseline)
    else:
        raise ValueError(f"unknown baseline {baseline!r}")
    return emb(bids).detach() * scale


def _tokenize_decoder_only(tok, prompt: str, target: str) -> tuple[torch.Tensor, int]:
    p = tok(prompt, return_tensors="pt")["input_ids"][0]
    full = tok(prompt + target, return_tensors="pt")["input_ids"][0]
    if not torch.equal(full[: len(p)], p):
        raise ValueError("prompt + target does not start with the prompt's tokens")
    return full, len(p)


# --------------------------------------------------------------------------------------------------
# Captum, one attribute call per target token, as a user would run it
# --------------------------------------------------------------------------------------------------
def captum_attribute(
    model,
    tok,
    prompt: str,
    target: str,
    method: str = "saliency",
    *,
    n_steps: int = 50,
    ig_method: str = "gausslegendre",
    baseline: str | int = "zeros",
    objective: str = "probability",
    abs: bool = False,
    internal_batch_size: int | None = None,
    attribute_target: bool = False,
    last_logits_only: bool = False,
) -> BaselineResult:
    """Captum ``Saliency`` / ``InputXGradient`` / ``IntegratedGradients`` on the input embeddings.

    One ``attribute`` call per target token, on the embeddings of its prefix; the forward returns
    that token's ``objective`` ("probability", "log_probability", "logit"). ``baseline`` (IG):
    "zeros" (Captum's default), "inseq" (Inseq's unk/EOS embeddings) or a token id. ``abs``:
    saliency only (Captum's own default is True). ``attribute_target``: encoder-decoder only, also
    attribute the decoder input embeddings. ``last_logits_only``: ``logits_to_keep=1``, a tuned
    variant no typical user (nor Inseq) runs. Marian's encoder embeddings are attributed after
    ``embed_scale``, which is what the encoder computes from ids.
    """
    from captum.attr import InputXGradient, IntegratedGradients, Saliency

    if method not in CAPTUM_METHODS:
        raise ValueError(f"method must be one of {CAPTUM_METHODS}")
    enc_dec = _is_enc_dec(model)
    if attribute_target and not enc_dec:
        raise ValueError("attribute_target is for encoder-decoder models")
    model.eval()
    emb, dev = model.get_input_embeddings(), model.device
    fkw = {"logits_to_keep": 1} if last_logits_only else {}
    out_tgt = None
    if enc_dec:
        src = tok(prompt, return_tensors="pt")["input_ids"][0].to(dev)
        tgt_ids = tok(text_target=target, return_tensors="pt")["input_ids"][0]
        dec = torch.cat([torch.tensor([model.config.decoder_start_token_id]), tgt_ids]).to(dev)
        scale = float(getattr(model.get_encoder(), "embed_scale", 1.0) or 1.0)
        if attribute_target and float(getattr(model.get_decoder(), "embed_scale", 1.0) or 1.0) != 1:
            # transformers 5.x MarianDecoder scales decoder inputs_embeds itself, 4.x did not
            raise NotImplementedError("attribute_target with embed_scale != 1 is ambiguous")
        with torch.no_grad():  # the encoder scales only ids it embeds itself: pre-scale here
            src_embeds = (emb(src[None]) * scale).detach()
            dec_embeds = emb(dec[None]).detach()
            base_src = _baseline_embeds(model, tok, emb, src[None], baseline, False, scale)
            base_dec = _baseline_embeds(model, tok, emb, dec[None], baseline, True)
        n_target, first = len(dec) - 1, 1
        mask = torch.ones(1, len(src), dtype=torch.long, device=dev)

        def forward(x_src, x_dec, tgt, attention_mask):
            key = "decoder_inputs_embeds" if attribute_target else "decoder_input_ids"
            kw = {key: x_dec, **fkw}
            logits = model(inputs_embeds=x_src, attention_mask=attention_mask, **kw).logits[:, -1]
            return _objective(logits, tgt[:, 0], objective)

        def step(t: int):
            """-> (inputs, baselines, extra forward args, inputs without grad for the score)."""
            x_src = src_embeds.clone().requires_grad_(True)
            tgt = dec[t].reshape(1, 1)
            if attribute_target:
                x_dec = dec_embeds[:, :t].clone().requires_grad_(True)
                base = None if base_src is None else (base_src, base_dec[:, :t])
                return (x_src, x_dec), base, (tgt, mask), (src_embeds, dec_embeds[:, :t])
            return x_src, base_src, (dec[None, :t], tgt, mask), (src_embeds,)

        out = np.full((n_target, len(src), src_embeds.shape[-1]), np.nan, dtype=np.float32)
        if attribute_target:
            out_tgt = np.full((n_target, n_target + 1, out.shape[-1]), np.nan, dtype=np.float32)
        ids, target_ids, source_ids = dec, dec[1:], src
    else:
        ids, first = _tokenize_decoder_only(tok, prompt, target)
        ids = ids.to(dev)
        n_target = len(ids) - first
        with torch.no_grad():
            embeds = emb(ids[None]).detach()  # [1, L, H]
            base_embeds = _baseline_embeds(model, tok, emb, ids[None], baseline, False)

        def forward(x: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
            return _objective(model(inputs_embeds=x, **fkw).logits[:, -1], tgt[:, 0], objective)

        def step(t: int):
            """-> (inputs, baselines, extra forward args, inputs without grad for the score)."""
            base = None if base_embeds is None else base_embeds[:, :t]
            x = embeds[:, :t].clone().requires_grad_(True)
            return x, base, (ids[t].reshape(1, 1),), (embeds[:, :t],)

        out = np.full((n_target, len(ids), embeds.shape[-1]), np.nan, dtype=np.float32)
        target_ids, source_ids = ids[first:], ids
    if method in _CAPTUM_MODULE_METHODS:
        import captum.attr

        algo = getattr(captum.attr, _CAPTUM_MODULE_METHODS[method])(_Forward(model, forward))
    else:
        algo = {"saliency": Saliency, "input_x_gradient": InputXGradient}.get(
            method, IntegratedGradients
        )(forward)
    common: dict[str, Any] = {"abs": abs} if method == "saliency" else {}
    if method == "integrated_gradients":
        common = dict(n_steps=n_steps, method=ig_method, internal_batch_size=internal_batch_size)
    scores = np.zeros(n_target, dtype=np.float32)
    t0 = time.perf_counter()
    for j in range(n_target):
        t = first + j
        inputs, base, extra, plain = step(t)
        kw = {"additional_forward_args": extra, **common}
        if method == "integrated_gradients" and base is not None:
            kw["baselines"] = base
        a = algo.attribute(inputs, **kw)
        parts = a if isinstance(a, tuple) else (a,)
        out[j, : parts[0].shape[1]] = parts[0][0].detach().float().cpu().numpy()
        if out_tgt is not None:
            out_tgt[j, :t] = parts[1][0].detach().float().cpu().numpy()
        with torch.no_grad():
            scores[j] = forward(*plain, *extra).item()
    seconds = time.perf_counter() - t0
    return BaselineResult(
        attributions=out,
        seconds=seconds,
        target_ids=target_ids.cpu().numpy(),
        source_ids=source_ids.cpu().numpy(),
        target_positions=np.arange(first, first + n_target),
        target_side=out_tgt,
        step_scores={objective: scores},
        info=dict(library="captum", method=method, objective=objective, n_steps=n_steps,
                  ig_method=ig_method, baseline=baseline, abs=abs,
                  attribute_target=attribute_target, last_logits_only=last_logits_only),
    )  # fmt: skip


class _Forward(torch.nn.Module):
    """A forward function as a Module holding the model, so Captum finds its ReLU modules."""

    def __init__(self, model, fn) -> None:
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *args):
        return self.fn(*args)


def captum_llm_attribute(
    model,
    tok,
    prompt: str,
    target: str,
    method: str = "layer_integrated_gradients",
    *,
    n_steps: int = 50,
    ig_method: str = "gausslegendre",
    baseline_token: int | str = 0,
) -> BaselineResult:
    """``LLMGradientAttribution`` around ``LayerIntegratedGradients`` or
    ``LayerGradientXActivation`` on the input embeddings (decoder-only).

    Captum 0.9 gives token-level scores (summed over hidden) for the *prompt* tokens only, w.r.t.
    the target token's *log*-probability; IG's baseline is ``TextTokenInput(baselines=...)``.
    ``attributions`` is therefore ``[n_target, n_prompt]``.
    """
    from captum.attr import (
        LayerGradientXActivation,
        LayerIntegratedGradients,
        LLMGradientAttribution,
        TextTokenInput,
    )

    if _is_enc_dec(model):
        raise NotImplementedError("LLMGradientAttribution supports decoder-only models only")
    ids, first = _tokenize_decoder_only(tok, prompt, target)
    layer = model.get_input_embeddings()
    if method == "layer_integrated_gradients":
        algo, kw = LayerIntegratedGradients(model, layer), dict(n_steps=n_steps, method=ig_method)
    elif method == "layer_gradient_x_activation":
        algo, kw = LayerGradientXActivation(model, layer), {}
    else:
        raise ValueError(method)
    llm = LLMGradientAttribution(algo, tok)
    t0 = time.perf_counter()
    res = llm.attribute(TextTokenInput(prompt, tok, baselines=baseline_token), target=target, **kw)
    seconds = time.perf_counter() - t0
    return BaselineResult(
        attributions=res.token_attr.detach().float().cpu().numpy(),
        seconds=seconds,
        target_ids=ids[first:].cpu().numpy(),
        source_ids=ids[:first].cpu().numpy(),
        target_positions=np.arange(first, len(ids)),
        info=dict(library="captum-llm", method=method, objective="log_probability",
                  n_steps=n_steps, ig_method=ig_method, baseline_token=baseline_token),
    )  # fmt: skip


@contextlib.contextmanager
def given_draws(alpha=None, index=None, noise=None):
    """Captum's GradientShap / NoiseTunnel with given draws: ``np.random.uniform`` returns
    ``alpha``, ``np.random.choice`` returns ``index`` and ``torch.normal(0, std)`` returns
    ``std * noise`` for the duration (each is drawn once per ``attribute`` call)."""
    import unittest.mock as mock

    patches = []
    if alpha is not None:
        patches.append(mock.patch.object(np.random, "uniform", lambda *a, **k: alpha.copy()))
    if index is not None:
        patches.append(mock.patch.object(np.random, "choice", lambda *a, **k: index.copy()))
    if noise is not None:
        patches.append(mock.patch.object(torch, "normal", lambda mean, std: std * noise))
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield


def captum_noise_attribute(
    model,
    tok,
    prompt: str,
    target: str,
    method: str,
    *,
    samples: int | None = None,
    noise_level: float | None = None,
    stdevs: float | None = None,
    permutations: int | None = None,
    seed: int | None = None,
) -> BaselineResult:
    """Captum ``GradientShap``, ``NoiseTunnel(Saliency)`` (``smoothgrad_sq``/``vargrad``),
    ``FeatureAblation`` and ``ShapleyValueSampling``, one ``attribute`` call per target token.

    The draws are attrax's, rebuilt here from its documented seeding rules and given to Captum:
    SmoothGrad noise ``randn(samples, L, H)`` (in the embeddings' dtype) from ``Generator().manual_seed(seed)`` times
    ``noise_level * (max - min)`` of the example's embeddings; GradientShap ``randint(2,
    (samples,))``, ``rand(samples)``, ``randn(samples, L, H)`` from one such generator, baselines
    zeros and Inseq's unk/EOS embeddings; Shapley orders ``rand(P, M, float64).argsort(-1)`` (``M`` the
    example's players: every encoder token, or every decoder-only token but the last), each
    restricted to the tokens a target's prefix has. Perturbations: one feature per token
    (``feature_mask`` over the hidden dim), zero baseline, Captum's ``perturbations_per_eval=1``.
    ``attributions``: ``[n_target, n_source, hidden]`` (gradients), ``[n_target, n_source]``
    (perturbations).
    """
    from captum.attr import (
        FeatureAblation,
        GradientShap,
        NoiseTunnel,
        Saliency,
        ShapleyValueSampling,
    )

    from . import workloads

    samples = samples or workloads.NOISE_SAMPLES
    noise_level = workloads.NOISE_LEVEL if noise_level is None else noise_level
    stdevs = workloads.SHAP_STDEVS if stdevs is None else stdevs
    permutations = permutations or workloads.PERMUTATIONS
    seed = workloads.SEED if seed is None else seed
    if method not in CAPTUM_NOISE_METHODS:
        raise ValueError(f"method must be one of {CAPTUM_NOISE_METHODS}")
    enc_dec = _is_enc_dec(model)
    model.eval()
    emb, dev = model.get_input_embeddings(), model.device
    if enc_dec:
        src = tok(prompt, return_tensors="pt")["input_ids"][0].to(dev)
        tgt_ids = tok(text_target=target, return_tensors="pt")["input_ids"][0]
        dec = torch.cat([torch.tensor([model.config.decoder_start_token_id]), tgt_ids]).to(dev)
        scale = float(getattr(model.get_encoder(), "embed_scale", 1.0) or 1.0)
        with torch.no_grad():
            embeds = (emb(src[None]) * scale).detach()
            base = _baseline_embeds(model, tok, emb, src[None], "inseq", False, scale)
        n_target, first, players = len(dec) - 1, 1, len(src)
        mask = torch.ones(1, len(src), dtype=torch.long, device=dev)

        def forward(x, prefix, tgt, attention_mask):
            logits = model(inputs_embeds=x, attention_mask=attention_mask, decoder_input_ids=prefix)
            return _objective(logits.logits[:, -1], tgt[:, 0], "probability")

        def step(t: int):
            return embeds, (dec[None, :t], dec[t].reshape(1, 1), mask)

        target_ids, source_ids = dec[1:], src
    else:
        ids, first = _tokenize_decoder_only(tok, prompt, target)
        ids = ids.to(dev)
        n_target, players = len(ids) - first, len(ids) - 1
        with torch.no_grad():
            embeds = emb(ids[None]).detach()
            base = _baseline_embeds(model, tok, emb, ids[None], "inseq", False)

        def forward(x, tgt):
            return _objective(model(inputs_embeds=x).logits[:, -1], tgt[:, 0], "probability")

        def step(t: int):
            return embeds[:, :t], (ids[t].reshape(1, 1),)

        target_ids, source_ids = ids[first:], ids
    length, hidden = embeds.shape[1], embeds.shape[2]
    gradient = method in ("gradient_shap", "squaregrad", "vargrad")
    shape = (n_target, length, hidden) if gradient else (n_target, length)
    out = np.full(shape, np.nan, dtype=np.float32)
    generator = torch.Generator().manual_seed(seed)
    draws: dict[str, Any] = {}
    if method == "gradient_shap":
        index = torch.randint(2, (samples,), generator=generator).numpy()
        alpha = torch.rand(samples, generator=generator, dtype=embeds.dtype).numpy()
        noise = torch.randn((samples, length, hidden), generator=generator, dtype=embeds.dtype)
        noise = noise.to(dev)
        bases = torch.cat([torch.zeros_like(embeds), base])  # [2, L, H]
        algo: Any = GradientShap(forward)
    elif gradient:
        noise = torch.randn((samples, length, hidden), generator=generator, dtype=embeds.dtype)
        noise = noise.to(dev)
        sigma = float(noise_level * (embeds.max() - embeds.min()))
        algo = NoiseTunnel(Saliency(forward))
    elif method == "shapley_sampling":
        keys = torch.rand((permutations, players), generator=generator, dtype=torch.float64)
        orders = list(keys.argsort(dim=-1))
        algo = ShapleyValueSampling(forward)
    else:
        algo = FeatureAblation(forward)
    t0 = time.perf_counter()
    for j in range(n_target):
        t = first + j
        x, extra = step(t)
        width = x.shape[1]
        x = x.clone().requires_grad_(gradient)
        kw: dict[str, Any] = {"additional_forward_args": extra}
        if method == "gradient_shap":
            kw.update(baselines=bases[:, :width], n_samples=samples, stdevs=stdevs)
            draws = dict(alpha=alpha, index=index, noise=noise[:, :width])
        elif gradient:
            nt_type = "smoothgrad_sq" if method == "squaregrad" else "vargrad"
            kw.update(nt_type=nt_type, nt_samples=samples, stdevs=sigma, abs=False)
            draws = dict(noise=noise[:, :width])
        else:
            kw["feature_mask"] = torch.arange(width, device=dev).view(1, width, 1)
            if method == "shapley_sampling":
                given = [o[o < width].tolist() for o in orders]
                algo.permutation_generator = lambda n, k, given=given: iter(given)
                kw["n_samples"] = permutations
        with given_draws(**draws):
            a = algo.attribute(x, **kw)
        a = a[0].detach().float().cpu().numpy()
        out[j, :width] = a if gradient else a[:, 0]
    seconds = time.perf_counter() - t0
    return BaselineResult(
        attributions=out,
        seconds=seconds,
        target_ids=target_ids.cpu().numpy(),
        source_ids=source_ids.cpu().numpy(),
        target_positions=np.arange(first, first + n_target),
        info=dict(library="captum", method=method, objective="probability", samples=samples,
                  noise_level=noise_level, stdevs=stdevs, permutations=permutations, seed=seed),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Inseq
# --------------------------------------------------------------------------------------------------
def inseq_load(model, tok, method: str):
    """``(inseq.load_model(model, method, tokenizer=copy), seconds)``.

    The tokenizer is copied because Inseq mutates it (``padding_side="left"``, pad/unk when
    missing); Inseq also sets ``model.config.pad_token_id`` to EOS when it is None.
    """
    import inseq

    t0 = time.perf_counter()
    im = inseq.load_model(model, method, tokenizer=copy.deepcopy(tok))
    return im, time.perf_counter() - t0


def inseq_attribute(
    model,
    tok,
    prompt: str,
    target: str,
    method: str = "saliency",
    *,
    n_steps: int = 50,
    ig_method: str = "gausslegendre",
    abs: bool = False,
    attribute_target: bool = False,
    step_scores: tuple[str, ...] = ("probability",),
    attributed_fn: str | None = None,
    internal_batch_size: int | None = None,
    inseq_model=None,
) -> BaselineResult:
    """Inseq's raw (not aggregated) tensors in attrax's layout.

    Decoder-only: ``attribute(prompt, prompt + target)``; ``target_attributions`` ``[P+G, G, ..]``
    transposed. Encoder-decoder: ``source_attributions`` ``[S, T, ..]`` transposed, and
    ``target_attributions`` as ``target_side``. Attention: trailing dims ``(layer, head)``; for
    encoder-decoder models the source side is the cross-attention. ``attributed_fn`` None: Inseq's
    default, the probability.
    """
    if method not in INSEQ_METHODS:
        raise ValueError(f"method must be one of {INSEQ_METHODS}")
    load_seconds = 0.0
    if inseq_model is None:
        inseq_model, load_seconds = inseq_load(model, tok, method)
    enc_dec = _is_enc_dec(model)
    if attribute_target and not enc_dec:
        raise ValueError("attribute_target is for encoder-decoder models")
    kw: dict[str, Any] = dict(show_progress=False, step_scores=list(step_scores))
    if attributed_fn is not None:
        kw["attributed_fn"] = attributed_fn
    if method == "saliency":
        kw["abs"] = abs
    elif method in (
        "integrated_gradients",
        "sequential_integrated_gradients",
        "discretized_integrated_gradients",
    ):
        # Captum's method= collides with attribute(method=...): Captum's options go in a dict
        ig_args: dict[str, Any] = dict(n_steps=n_steps, method=ig_method)
        if method == "discretized_integrated_gradients":  # its method= is the path strategy
            ig_args = dict(n_steps=n_steps)
        if internal_batch_size is not None:
            ig_args["internal_batch_size"] = internal_batch_size
        kw["attribution_args"] = ig_args
    elif method == "attention":
        kw["step_scores"] = []  # final-step methods do not support step scores
    if enc_dec:
        kw["attribute_target"] = attribute_target
    t0 = time.perf_counter()
    out = inseq_model.attribute(prompt, target if enc_dec else prompt + target, **kw)
    seconds = time.perf_counter() - t0
    seq = out.sequence_attributions[0]
    info = dict(
        library="inseq", method=method, n_steps=n_steps, ig_method=ig_method, abs=abs,
        attributed_fn=out.info.get("attributed_fn"), load_seconds=load_seconds,
        inseq_exec_time=out.info.get("exec_time"),
        source_tokens=[t.token for t in seq.source], target_tokens=[t.token for t in seq.target],
    )  # fmt: skip
    ids = np.array([t.id for t in seq.target])
    first = 1 if enc_dec else seq.attr_pos_start  # enc-dec: seq.target starts with the start token

    def host(x):
        return None if x is None else x.detach().float().transpose(0, 1).contiguous().numpy()

    raw = seq.source_attributions if enc_dec else seq.target_attributions
    return BaselineResult(
        attributions=host(raw),
        seconds=seconds,
        target_ids=ids[first:],
        source_ids=np.array([t.id for t in seq.source]) if enc_dec else ids,
        target_positions=np.arange(first, len(ids)),
        target_side=host(seq.target_attributions) if enc_dec else None,
        step_scores={
            k: v.detach().float().cpu().numpy() for k, v in (seq.step_scores or {}).items()
        },
        info=info,
    )


# --------------------------------------------------------------------------------------------------
# Classifiers: Captum as its BERT tutorials run it, Interpreto 0.5.2's classification explainers
# --------------------------------------------------------------------------------------------------
CAPTUM_CLASSIFIER_METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "occlusion")
INTERPRETO_CLASSIFIER_METHODS = ("saliency", "input_x_gradient", "occlusion")


def reference_ids(tok, ids: torch.Tensor) -> torch.Tensor:
    """Captum's BERT-tutorial IG reference: ``[PAD]`` everywhere, ``[CLS]``/``[SEP]`` kept."""
    keep = (ids == tok.cls_token_id) | (ids == tok.sep_token_id)
    return torch.where(keep, ids, torch.full_like(ids, tok.pad_token_id))


def captum_classify(
    model,
    tok,
    texts: list[str],
    classes: list[list[int]],
    method: str,
    *,
    n_steps: int = 50,
    ig_method: str = "gausslegendre",
    internal_batch_size: int | None = None,
    from_texts: bool = True,
    perturbations_per_eval: int = 8,
) -> BaselineResult:
    """Captum on a ``*ForSequenceClassification``: ``[example, class, source, hidden]``.

    Saliency (``abs=False``) and InputXGradient on ``inputs_embeds``; IG as
    ``LayerIntegratedGradients`` on ``model.bert.embeddings.word_embeddings`` (the same quantity
    as IG on ``inputs_embeds``) from :func:`reference_ids`; occlusion as ``Occlusion`` on
    ``inputs_embeds`` with one-token windows replaced by ``[MASK]``'s embedding
    (``perturbations_per_eval`` copies per forward), ``[example, class, source]`` (every hidden
    element of a window holds the window's difference; NaN at special tokens, which Captum
    occludes too but attrax keeps). The forward returns the softmax
    probabilities; one batched ``attribute`` call per class column of ``classes`` (every example
    has the same number of classes), as a user loops over classes.

    ``from_texts``: the clock starts at the texts, as attrax's and Interpreto's do (the
    tokenizer call and the embedding lookup a Captum user writes are timed); else at the
    tokenized, embedded batch.
    """
    from captum.attr import InputXGradient, LayerIntegratedGradients, Occlusion, Saliency

    if method not in CAPTUM_CLASSIFIER_METHODS:
        raise ValueError(f"method must be one of {CAPTUM_CLASSIFIER_METHODS}")
    if method == "integrated_gradients":
        # attrax gets its baseline built before its clock too
        first = tok(texts, return_tensors="pt", padding=True)["input_ids"].to(model.device)
        reference = reference_ids(tok, first)

    def from_embeds(x, mask, types):
        return model(inputs_embeds=x, attention_mask=mask, token_type_ids=types).logits.softmax(-1)

    def from_ids(x, mask, types):
        return model(input_ids=x, attention_mask=mask, token_type_ids=types).logits.softmax(-1)

    def tokenized():
        enc = tok(texts, return_tensors="pt", padding=True).to(model.device)
        ids, mask, types = enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]
        if method == "integrated_gradients":
            return ids, mask, types
        with torch.no_grad():
            return model.get_input_embeddings()(ids).detach(), mask, types

    if method == "integrated_gradients":
        layer = model.bert.embeddings.word_embeddings
        algo = LayerIntegratedGradients(from_ids, layer)
        kw = dict(
            baselines=reference, n_steps=n_steps, method=ig_method,
            internal_batch_size=internal_batch_size,
        )  # fmt: skip
    elif method == "occlusion":
        algo = Occlusion(from_embeds)
        width = model.config.hidden_size
        with torch.no_grad():
            masked = model.get_input_embeddings()(
                torch.tensor(tok.mask_token_id, device=model.device)
            )
        kw = dict(
            sliding_window_shapes=(1, width), strides=(1, width),
            perturbations_per_eval=perturbations_per_eval,
        )  # fmt: skip
    else:
        algo = (Saliency if method == "saliency" else InputXGradient)(from_embeds)
        kw = {"abs": False} if method == "saliency" else {}
    if not from_texts:
        ready = tokenized()
    columns = []
    t0 = time.perf_counter()
    inputs, mask, types = tokenized() if from_texts else ready
    for k in range(len(classes[0])):
        target = [c[k] for c in classes]
        if method == "occlusion":
            kw["baselines"] = masked.expand_as(inputs)
            got = algo.attribute(inputs, target=target, additional_forward_args=(mask, types), **kw)
            columns.append(got.detach()[..., 0])
            continue
        x = inputs if method == "integrated_gradients" else inputs.clone().requires_grad_(True)
        got = algo.attribute(x, target=target, additional_forward_args=(mask, types), **kw)
        columns.append(got.detach())
    _synchronize(model)  # a GPU's kernels are asynchronous: the clock stops when they are done
    seconds = time.perf_counter() - t0
    out = torch.stack(columns, 1).float().cpu().numpy()  # [B, K, L(, H)]
    if method == "occlusion":
        # attrax keeps [CLS]/[SEP] (never occluded): Captum's windows on them are not compared
        enc = tok(texts, padding=True, return_special_tokens_mask=True, return_tensors="np")
        out[np.broadcast_to(enc["special_tokens_mask"][:, None].astype(bool), out.shape)] = np.nan
    ids = tok(texts, return_tensors="pt", padding=True)["input_ids"]
    return BaselineResult(out, seconds, np.asarray(classes), ids.numpy(), np.arange(0))


def _synchronize(model) -> None:
    """Wait for the model's GPU (nothing on the CPU)."""
    import torch

    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interpreto_classify(
    model, tok, texts: list[str], classes: list[list[int]], method: str, *, batch_size: int = 16
) -> BaselineResult:
    """Interpreto 0.5.2's classification explainers, token level, on the softmax probabilities:
    ``[example, class, source]``.

    ``saliency`` is its ``Saliency(input_x_gradient=False)``: ``mean_h |grad|``;
    ``input_x_gradient`` its ``Saliency(input_x_gradient=True)``: ``mean_h |x * grad|``
    (all tokens, special ones included). ``occlusion``: its ``Occlusion``, which replaces one
    non-special token at a time by ``[MASK]`` (NaN at the special tokens).
    """
    from interpreto import Granularity, Occlusion, Saliency
    from interpreto.attributions import InferenceModes

    if method not in INTERPRETO_CLASSIFIER_METHODS:
        raise ValueError(f"method must be one of {INTERPRETO_CLASSIFIER_METHODS}")
    common = dict(batch_size=batch_size, inference_mode=InferenceModes.SOFTMAX)
    if method == "occlusion":
        explainer = Occlusion(model, tok, granularity=Granularity.TOKEN, **common)
    else:
        explainer = Saliency(
            model, tok, granularity=Granularity.ALL_TOKENS,
            input_x_gradient=method == "input_x_gradient", **common,
        )  # fmt: skip
    t0 = time.perf_counter()
    outs = explainer.explain(texts, targets=torch.tensor(classes))
    _synchronize(model)
    seconds = time.perf_counter() - t0
    ids = tok(texts, padding=True)["input_ids"]
    out = np.full((len(texts), len(classes[0]), len(ids[0])), np.nan, dtype=np.float32)
    for b, res in enumerate(outs):
        got = res.attributions.float().cpu().numpy()  # [K, tokens]
        if method == "occlusion":
            special = tok.get_special_tokens_mask(ids[b], already_has_special_tokens=True)
            where = [i for i, s in enumerate(special) if not s]
            out[b][:, where] = got
        else:
            out[b, :, : got.shape[1]] = got
    return BaselineResult(out, seconds, np.asarray(classes), np.asarray(ids), np.arange(0))
