"""Captum 0.9 / Inseq 0.7 baseline runners producing raw attributions in attrax's layout.

Every runner returns a :class:`BaselineResult` whose ``attributions`` array is

    [n_target, n_source, hidden]       (float32, NaN where nothing is attributed)

* decoder-only: ``target`` runs over the forced continuation tokens (positions P..P+G-1 of
  prompt+target); ``source`` runs over all P+G positions of prompt+target, and entries with
  ``source >= target position`` are NaN (the future, and the token itself).
* encoder-decoder: ``source`` = encoder tokens (the appended ``</s>`` included); ``target`` = the
  decoder tokens predicted after the decoder start token (the final ``</s>`` included).  With
  ``attribute_target=True`` the decoder-side attributions come separately in ``target_side``,
  ``[n_target, 1 + n_target, hidden]`` over decoder *input* positions (0 = decoder start token),
  NaN at ``source >= target position``.

``seconds`` is the wall time of the attribution itself (Captum loop / ``inseq_model.attribute``),
excluding model loading and Inseq's ``load_model`` wrapper set-up (reported in ``info``).

Conventions found (Captum 0.9.0, Inseq 0.7.0, transformers 5.24.0) are summarised in
benchmarks/README.md.  Short version:

* Captum ``Saliency`` takes ``abs`` of the gradient by default (``abs=True``); Inseq's "saliency"
  inherits that default.  Pass ``abs=False`` to either to get the signed gradient.
* Inseq's default attributed function is the *probability* (softmax) of the target token; Captum's
  ``LLMGradientAttribution`` hard-codes the *log*-probability.
* Inseq's IG baseline is NOT zeros: it is the embedding of ``unk_token_id`` at every position
  except EOS tokens, which keep the EOS embedding (``include_eos_baseline=False``); it cannot be
  overridden through ``attribute()`` ("baselines" is a reserved argument).  Captum's default
  (``baselines=None``) is zeros.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# --------------------------------------------------------------------------------------------------
# Result container and helpers
# --------------------------------------------------------------------------------------------------


@dataclass
class BaselineResult:
    attributions: (
        np.ndarray
    )  # [n_target, n_source, hidden] (attention: [n_target, n_source, layer, head])
    seconds: float
    target_ids: np.ndarray  # [n_target] ids of the attributed tokens
    source_ids: np.ndarray  # [n_source] ids along the source axis
    target_positions: (
        np.ndarray
    )  # [n_target] attrax `target` coordinate (position in the model's sequence)
    target_side: np.ndarray | None = (
        None  # enc-dec attribute_target: [n_target, 1 + n_target, hidden]
    )
    step_scores: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def reduce_hidden(a: np.ndarray, how: str = "l2") -> np.ndarray:
    """``[..., hidden]`` -> ``[...]`` by L2 norm or sum (NaN stays NaN)."""
    if how == "l2":
        return np.sqrt(np.sum(np.square(a, dtype=np.float64), axis=-1))
    if how == "sum":
        return np.sum(a, axis=-1, dtype=np.float64)
    raise ValueError(how)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """``max|a-b| / max|b|`` over entries finite in both; raises if the NaN patterns differ."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    if not np.array_equal(np.isnan(a), np.isnan(b)):
        raise ValueError("NaN patterns differ")
    ok = ~np.isnan(a)
    denom = np.max(np.abs(b[ok])) if ok.any() else 0.0
    return (
        float(np.max(np.abs(a[ok] - b[ok])) / denom) if denom > 0 else float(np.max(np.abs(a[ok])))
    )


def compare(a: BaselineResult | np.ndarray, b: BaselineResult | np.ndarray) -> dict[str, float]:
    """Relative errors of two results after L2-over-hidden, sum-over-hidden and on the raw tensors."""
    a = a.attributions if isinstance(a, BaselineResult) else a
    b = b.attributions if isinstance(b, BaselineResult) else b
    return {
        "raw": rel_err(a, b),
        "l2": rel_err(reduce_hidden(a, "l2"), reduce_hidden(b, "l2")),
        "sum": rel_err(reduce_hidden(a, "sum"), reduce_hidden(b, "sum")),
    }


def _is_enc_dec(model) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def _encoder_embed_scale(model) -> float:
    enc = model.get_encoder()
    return float(getattr(enc, "embed_scale", 1.0) or 1.0)


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


def inseq_style_baseline_ids(
    model, tok, ids: torch.Tensor, keep_first: bool = False
) -> torch.Tensor:
    """Baseline ids as Inseq 0.7 builds them (``include_eos_baseline=False``).

    Every token becomes ``unk_token_id`` (Inseq falls back to the pad id, then the EOS id, when the
    tokenizer has no unk token) except EOS tokens, which stay EOS.  ``keep_first`` keeps position 0
    (Inseq prepends the decoder start token to the baseline of encoder-decoder targets).
    """
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


def _tokenize_decoder_only(tok, prompt: str, target: str) -> tuple[torch.Tensor, int]:
    p = tok(prompt, return_tensors="pt")["input_ids"][0]
    full = tok(prompt + target, return_tensors="pt")["input_ids"][0]
    if not torch.equal(full[: len(p)], p):
        raise ValueError("prompt + target does not start with the prompt's tokens")
    return full, len(p)


def _tokenize_enc_dec(model, tok, source: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    src = tok(source, return_tensors="pt")["input_ids"][0]
    tgt = tok(text_target=target, return_tensors="pt")["input_ids"][0]
    start = model.config.decoder_start_token_id
    dec = torch.cat([torch.tensor([start]), tgt])  # decoder inputs; targets are dec[1:]
    return src, dec


# --------------------------------------------------------------------------------------------------
# Captum, per target token, "as a user would run it"
# --------------------------------------------------------------------------------------------------
CAPTUM_METHODS = ("saliency", "input_x_gradient", "integrated_gradients")


def _captum_method(name: str, forward: Callable):
    from captum.attr import InputXGradient, IntegratedGradients, Saliency

    return {
        "saliency": Saliency,
        "input_x_gradient": InputXGradient,
        "integrated_gradients": IntegratedGradients,
    }[name](forward)


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
    """Captum ``Saliency`` / ``InputXGradient`` / ``IntegratedGradients`` on the input embeddings,
    one ``attribute`` call per target token (the forward returns the objective of that token).

    * ``ig_method``: Captum's approximation method, ``"gausslegendre"`` (Captum's default) or
      ``"riemann_trapezoid"`` / ``"riemann_left"`` / ``"riemann_right"`` / ``"riemann_middle"``.
    * ``baseline`` (IG only): ``"zeros"`` (Captum default), ``"inseq"`` (Inseq's UNK/EOS
      embeddings) or a token id whose embedding is used at every position.
    * ``objective``: ``"probability"`` (Inseq default), ``"log_probability"``, ``"logit"``.
    * ``abs``: only for saliency (Captum's own default is True; here False = signed gradient).
    * ``attribute_target``: encoder-decoder only; also attribute the decoder input embeddings.
    * ``last_logits_only``: pass ``logits_to_keep=1`` so the LM head runs on the last position only
      (a tuned variant; a typical user, and Inseq, compute logits for every position).
    """
    if method not in CAPTUM_METHODS:
        raise ValueError(f"method must be one of {CAPTUM_METHODS}")
    model.eval()
    emb = model.get_input_embeddings()
    if _is_enc_dec(model):
        return _captum_enc_dec(
            model,
            tok,
            prompt,
            target,
            method,
            emb,
            n_steps,
            ig_method,
            baseline,
            objective,
            abs,
            internal_batch_size,
            attribute_target,
            last_logits_only,
        )
    if attribute_target:
        raise ValueError("attribute_target is for encoder-decoder models")

    ids, P = _tokenize_decoder_only(tok, prompt, target)
    ids = ids.to(model.device)
    L, G = len(ids), len(ids) - P
    with torch.no_grad():
        embeds = emb(ids[None]).detach()  # [1, L, H]
        base_embeds = _baseline_embeds(model, tok, emb, ids[None], baseline, keep_first=False)
    H = embeds.shape[-1]
    out = np.full((G, L, H), np.nan, dtype=np.float32)
    scores = np.zeros(G, dtype=np.float32)

    fkw = {"logits_to_keep": 1} if last_logits_only else {}

    def forward(x: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        logits = model(inputs_embeds=x, **fkw).logits[:, -1]
        return _objective(logits, tgt[:, 0], objective)

    algo = _captum_method(method, forward)
    t0 = time.perf_counter()
    for j in range(G):
        t = P + j
        x = embeds[:, :t].clone().requires_grad_(True)
        tgt = ids[t].reshape(1, 1)
        kw: dict[str, Any] = {"additional_forward_args": (tgt,)}
        if method == "saliency":
            kw["abs"] = abs
        elif method == "integrated_gradients":
            kw.update(n_steps=n_steps, method=ig_method, internal_batch_size=internal_batch_size)
            if base_embeds is not None:
                kw["baselines"] = base_embeds[:, :t]
        a = algo.attribute(x, **kw)
        out[j, :t] = a[0].detach().float().cpu().numpy()
        with torch.no_grad():
            scores[j] = forward(embeds[:, :t], tgt).item()
    seconds = time.perf_counter() - t0
    return BaselineResult(
        attributions=out,
        seconds=seconds,
        target_ids=ids[P:].cpu().numpy(),
        source_ids=ids.cpu().numpy(),
        target_positions=np.arange(P, L),
        step_scores={objective: scores},
        info=dict(
            library="captum",
            method=method,
            objective=objective,
            n_steps=n_steps,
            ig_method=ig_method,
            baseline=baseline,
            abs=abs,
            last_logits_only=last_logits_only,
        ),
    )


def _baseline_embeds(model, tok, emb, ids, baseline, keep_first: bool, scale: float = 1.0):
    if baseline == "zeros" or baseline is None:
        return None  # Captum default: zeros
    if baseline == "inseq":
        bids = inseq_style_baseline_ids(model, tok, ids, keep_first=keep_first)
    elif isinstance(baseline, int):
        bids = torch.full_like(ids, baseline)
    else:
        raise ValueError(f"unknown baseline {baseline!r}")
    return emb(bids).detach() * scale


def _captum_enc_dec(
    model,
    tok,
    source,
    target,
    method,
    emb,
    n_steps,
    ig_method,
    baseline,
    objective,
    abs,
    internal_batch_size,
    attribute_target,
    last_logits_only=False,
) -> BaselineResult:
    src, dec = _tokenize_enc_dec(model, tok, source, target)
    src, dec = src.to(model.device), dec.to(model.device)
    S, T = len(src), len(dec) - 1
    scale = _encoder_embed_scale(model)
    dec_scale = float(getattr(model.get_decoder(), "embed_scale", 1.0) or 1.0)
    if attribute_target and dec_scale != 1.0:
        # transformers 5.x MarianDecoder multiplies decoder inputs_embeds by embed_scale itself,
        # 4.x did not: refuse rather than silently pick one convention.
        raise NotImplementedError(
            "attribute_target with embed_scale != 1 is ambiguous across transformers versions"
        )
    with torch.no_grad():
        # the encoder applies embed_scale only when it embeds ids itself, so pre-scale here
        src_embeds = (emb(src[None]) * scale).detach()
        dec_embeds = emb(dec[None]).detach()
        base_src = _baseline_embeds(
            model, tok, emb, src[None], baseline, keep_first=False, scale=scale
        )
        base_dec = _baseline_embeds(model, tok, emb, dec[None], baseline, keep_first=True)
    H = src_embeds.shape[-1]
    out = np.full((T, S, H), np.nan, dtype=np.float32)
    out_tgt = np.full((T, T + 1, H), np.nan, dtype=np.float32) if attribute_target else None
    scores = np.zeros(T, dtype=np.float32)
    mask = torch.ones(1, S, dtype=torch.long, device=model.device)
    fkw = {"logits_to_keep": 1} if last_logits_only else {}

    if attribute_target:

        def forward(x_src, x_dec, tgt, attention_mask):
            logits = model(
                inputs_embeds=x_src,
                attention_mask=attention_mask,
                decoder_inputs_embeds=x_dec,
                **fkw,
            ).logits[:, -1]
            return _objective(logits, tgt[:, 0], objective)
    else:

        def forward(x_src, dec_ids, tgt, attention_mask):
            logits = model(
                inputs_embeds=x_src, attention_mask=attention_mask, decoder_input_ids=dec_ids, **fkw
            ).logits[:, -1]
            return _objective(logits, tgt[:, 0], objective)

    algo = _captum_method(method, forward)
    t0 = time.perf_counter()
    for j in range(T):
        t = j + 1  # decoder position of the predicted token
        tgt = dec[t].reshape(1, 1)
        x_src = src_embeds.clone().requires_grad_(True)
        if attribute_target:
            inputs = (x_src, dec_embeds[:, :t].clone().requires_grad_(True))
            extra = (tgt, mask)
        else:
            inputs = x_src
            extra = (dec[None, :t], tgt, mask)
        kw: dict[str, Any] = {"additional_forward_args": extra}
        if method == "saliency":
            kw["abs"] = abs
        elif method == "integrated_gradients":
            kw.update(n_steps=n_steps, method=ig_method, internal_batch_size=internal_batch_size)
            if base_src is not None:
                kw["baselines"] = (base_src, base_dec[:, :t]) if attribute_target else base_src
        a = algo.attribute(inputs, **kw)
        if attribute_target:
            out[j] = a[0][0].detach().float().cpu().numpy()
            out_tgt[j, :t] = a[1][0].detach().float().cpu().numpy()
        else:
            out[j] = a[0].detach().float().cpu().numpy()
        with torch.no_grad():
            x_dec = dec_embeds[:, :t] if attribute_target else dec[None, :t]
            scores[j] = forward(src_embeds, x_dec, tgt, mask).item()
    seconds = time.perf_counter() - t0
    return BaselineResult(
        attributions=out,
        seconds=seconds,
        target_ids=dec[1:].cpu().numpy(),
        source_ids=src.cpu().numpy(),
        target_positions=np.arange(1, T + 1),
        target_side=out_tgt,
        step_scores={objective: scores},
        info=dict(
            library="captum",
            method=method,
            objective=objective,
            n_steps=n_steps,
            ig_method=ig_method,
            baseline=baseline,
            abs=abs,
            attribute_target=attribute_target,
            last_logits_only=last_logits_only,
            decoder_input_ids=dec.cpu().numpy(),
        ),
    )


# --------------------------------------------------------------------------------------------------
# Captum LLMGradientAttribution (decoder-only only)
# --------------------------------------------------------------------------------------------------
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
    """``captum.attr.LLMGradientAttribution`` wrapping ``LayerIntegratedGradients`` or
    ``LayerGradientXActivation`` on the input embedding layer.

    What this API gives (Captum 0.9.0): token-level scores only (it sums over hidden itself), for
    the *prompt* tokens only (attributions to earlier target tokens are cut off), w.r.t. the target
    token's *log*-probability; IG's baseline is the embedding of ``TextTokenInput(baselines=...)``
    (token id 0 by default).  Decoder-only models only (the forward calls ``model(input_ids)``).

    ``attributions`` is therefore ``[n_target, n_prompt]`` (already summed over hidden).
    """
    from captum.attr import (
        LayerGradientXActivation,
        LayerIntegratedGradients,
        LLMGradientAttribution,
        TextTokenInput,
    )

    if _is_enc_dec(model):
        raise NotImplementedError("LLMGradientAttribution supports decoder-only models only")
    ids, P = _tokenize_decoder_only(tok, prompt, target)
    layer = model.get_input_embeddings()
    if method == "layer_integrated_gradients":
        algo = LayerIntegratedGradients(model, layer)
        kw = dict(n_steps=n_steps, method=ig_method)
    elif method == "layer_gradient_x_activation":
        algo = LayerGradientXActivation(model, layer)
        kw = {}
    else:
        raise ValueError(method)
    llm = LLMGradientAttribution(algo, tok)
    inp = TextTokenInput(prompt, tok, baselines=baseline_token)
    t0 = time.perf_counter()
    res = llm.attribute(inp, target=target, **kw)
    seconds = time.perf_counter() - t0
    return BaselineResult(
        attributions=res.token_attr.detach().float().cpu().numpy(),
        seconds=seconds,
        target_ids=ids[P:].cpu().numpy(),
        source_ids=ids[:P].cpu().numpy(),
        target_positions=np.arange(P, len(ids)),
        info=dict(
            library="captum-llm",
            method=method,
            objective="log_probability",
            n_steps=n_steps,
            ig_method=ig_method,
            baseline_token=baseline_token,
            layout="[n_target, n_prompt], summed over hidden",
        ),
    )


# --------------------------------------------------------------------------------------------------
# Inseq
# --------------------------------------------------------------------------------------------------
INSEQ_METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "attention")


def inseq_load(model, tok, method: str):
    """``inseq.load_model(model, method, tokenizer=copy_of_tok)``; returns (inseq_model, seconds).

    The tokenizer is deep-copied because Inseq mutates it (``padding_side="left"`` for decoder-only,
    sets ``pad_token`` / ``unk_token_id`` when missing).  Inseq also sets ``model.config.pad_token_id``
    when it is None (to the EOS id); it does not replace the embedding module for HF models.
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
    """Run Inseq and return its raw (non-aggregated) per-hidden-dim tensors in attrax's layout.

    Decoder-only: ``attribute(prompt, prompt + target)`` (Inseq requires the generated text to start
    with the input text, tokenizes both and attributes the tokens after the prompt).  The raw tensor
    is ``out.sequence_attributions[0].target_attributions``, ``[P+G, G, hidden]`` with NaN for the
    future; we return it transposed to ``[G, P+G, hidden]``.

    Encoder-decoder: ``attribute(source, target, attribute_target=...)``; raw
    ``source_attributions`` is ``[S, T, hidden]`` -> ``[T, S, hidden]`` and (attribute_target)
    ``target_attributions`` ``[1+T, T, hidden]`` -> ``target_side`` ``[T, 1+T, hidden]``.

    ``abs=False`` is passed to saliency (Inseq's default is Captum's ``abs=True``).
    ``attention``: the trailing dims are ``(layer, head)`` instead of ``hidden``; for enc-dec the
    source side is the cross-attention.  ``attributed_fn`` None = Inseq's default "probability".
    """
    if method not in INSEQ_METHODS:
        raise ValueError(f"method must be one of {INSEQ_METHODS}")
    load_seconds = 0.0
    if inseq_model is None:
        inseq_model, load_seconds = inseq_load(model, tok, method)
    enc_dec = _is_enc_dec(model)
    kw: dict[str, Any] = dict(show_progress=False, step_scores=list(step_scores))
    if attributed_fn is not None:
        kw["attributed_fn"] = attributed_fn
    if method == "saliency":
        kw["abs"] = abs
    elif method == "integrated_gradients":
        # Captum IG's `method=` collides with attribute(method=<attribution method>): pass the
        # Captum arguments through Inseq's `attribution_args=` dict instead.
        ig_args: dict[str, Any] = dict(n_steps=n_steps, method=ig_method)
        if internal_batch_size is not None:
            ig_args["internal_batch_size"] = internal_batch_size
        kw["attribution_args"] = ig_args
    elif method == "attention":
        kw["step_scores"] = []  # final-step methods do not support step scores
    if enc_dec:
        kw["attribute_target"] = attribute_target
        gen = target
    else:
        if attribute_target:
            raise ValueError("attribute_target is for encoder-decoder models")
        gen = prompt + target
    t0 = time.perf_counter()
    out = inseq_model.attribute(prompt, gen, **kw)
    seconds = time.perf_counter() - t0
    seq = out.sequence_attributions[0]
    scores = {k: v.detach().float().cpu().numpy() for k, v in (seq.step_scores or {}).items()}
    info = dict(
        library="inseq",
        method=method,
        n_steps=n_steps,
        ig_method=ig_method,
        abs=abs,
        attributed_fn=out.info.get("attributed_fn"),
        load_seconds=load_seconds,
        inseq_exec_time=out.info.get("exec_time"),
        source_tokens=[t.token for t in seq.source],
        target_tokens=[t.token for t in seq.target],
    )
    target_ids = np.array([t.id for t in seq.target])
    if enc_dec:
        raw = seq.source_attributions.detach().float()  # [S, T, ...]
        attributions = raw.transpose(0, 1).contiguous().numpy()
        target_side = None
        if seq.target_attributions is not None:
            target_side = (
                seq.target_attributions.detach().float().transpose(0, 1).contiguous().numpy()
            )
        return BaselineResult(
            attributions=attributions,
            seconds=seconds,
            target_ids=target_ids[1:],  # seq.target includes the decoder start token
            source_ids=np.array([t.id for t in seq.source]),
            target_positions=np.arange(1, len(target_ids)),
            target_side=target_side,
            step_scores=scores,
            info=info,
        )
    raw = seq.target_attributions.detach().float()  # [P+G, G, ...]
    attributions = raw.transpose(0, 1).contiguous().numpy()
    P = seq.attr_pos_start
    return BaselineResult(
        attributions=attributions,
        seconds=seconds,
        target_ids=target_ids[P:],
        source_ids=target_ids,
        target_positions=np.arange(P, len(target_ids)),
        step_scores=scores,
        info=info,
    )
