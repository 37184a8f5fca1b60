"""Activation patching against real patching written here: one plain transformers forward per
layer, position and head, the activation set by a hook to the donor run's, the score read from
the logits. Also its identities: a corruption that changes nothing moves nothing, and patching
the last layer's residual stream where a target is read gives that target the corrupted run's
score."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

import attrax as ax
from attrax.testing import tiny_classifier, tiny_model
from tests.conftest import PAIRS, tiny_mixtral
from tests.test_components import full_double

SOURCE, TARGET = PAIRS[0]
CORRUPTED = "The capital of Spain is"  # as many tokens as SOURCE in both tiny tokenizers
ED_TARGET = " Paris is a city"
TEXT, BAD_TEXT = "the cat sat on the mat", "the dog sat on the mat"


@pytest.fixture(scope="module")
def models64() -> dict[str, ax.Model]:
    built = {}
    for arch in ("gpt2", "llama"):
        hf, tok = tiny_model(arch)
        built[arch] = ax.load_model(full_double(hf), tokenizer=tok)
    for arch in ("marian",):
        hf, tok = tiny_model(arch)
        built[arch] = ax.load_model(hf.double(), tokenizer=tok)
    hf, tok = tiny_classifier("bert", "sequence")
    built["bert"] = ax.load_model(hf.double(), tokenizer=tok)
    return built


# --- the reference: plain forwards with one hook each --------------------------------------


def site_module(hf, stack: str, layer: int, site: str) -> tuple[torch.nn.Module, str, int]:
    """The module whose input (``"pre"``) or output (``"post"``) holds ``site``'s activation at
    ``layer``, and the column where it starts there (GPT-2's fused queries, keys, values)."""
    kind = hf.config.model_type
    if kind == "gpt2":
        block = hf.transformer.h[layer]
        width = hf.config.n_embd
        fused = {"queries": 0, "keys": width, "values": 2 * width}
        if site in fused:
            return block.attn.c_attn, "post", fused[site]
        return {
            "heads": (block.attn.c_proj, "pre", 0),
            "mlp": (block.mlp, "post", 0),
            "neurons": (block.mlp.c_proj, "pre", 0),
            "residual": (block, "post", 0),
        }[site]
    if kind == "llama":
        block = hf.model.layers[layer]
        attn = block.self_attn
        return {
            "queries": (attn.q_proj, "post", 0),
            "keys": (attn.k_proj, "post", 0),
            "values": (attn.v_proj, "post", 0),
            "heads": (attn.o_proj, "pre", 0),
            "mlp": (block.mlp, "post", 0),
            "neurons": (block.mlp.down_proj, "pre", 0),  # act(gate) * up
            "residual": (block, "post", 0),
        }[site]
    if kind == "bert":
        block = hf.bert.encoder.layer[layer]
        return {
            "heads": (block.attention.output.dense, "pre", 0),
            "mlp": (block.output.dense, "post", 0),
            "neurons": (block.output.dense, "pre", 0),  # the intermediate's GELU
            "residual": (block, "post", 0),
        }[site]
    assert kind == "marian"
    part = hf.get_encoder() if stack == "encoder" else hf.get_decoder()
    block = part.layers[layer]
    attention = block.encoder_attn if stack == "cross" else block.self_attn
    return {
        "queries": (attention.q_proj, "post", 0),
        "keys": (attention.k_proj, "post", 0),
        "values": (attention.v_proj, "post", 0),
        "heads": (attention.out_proj, "pre", 0),
        "mlp": (block.fc2, "post", 0),
        "neurons": (block.fc2, "pre", 0),
        "residual": (block, "post", 0),
    }[site]


class Reference:
    """One model's plain forwards: ``run(ids, edit)`` gives every target's score, ``edit``
    (layer, site, function of the activation ``[L, width]``) applied by a hook."""

    def __init__(self, model: ax.Model, source: str, target: str | None, stack: str = "self"):
        self.model, self.hf, self.stack = model, model.hf, stack
        tok = model.tokenizer
        kind = self.hf.config.model_type
        self.decoder_ids: list[int] | None = None
        if kind == "bert":  # every class of the one sequence
            self.classes = list(range(self.hf.config.num_labels))
        elif kind == "marian":
            self.target_ids = tok(text_target=target).input_ids
            self.decoder_ids = [self.hf.config.decoder_start_token_id, *self.target_ids]
        else:
            src = tok(source)["input_ids"]
            full = tok(source + target)["input_ids"]
            assert full[: len(src)] == src
            self.prefix, self.target_ids = len(src), full[len(src) :]

    def ids(self, text: str) -> list[int]:
        """The token ids the model reads (decoder-only: the text and the targets)."""
        ids = self.model.tokenizer(text)["input_ids"]
        if self.decoder_ids is None and self.hf.config.model_type != "bert":
            ids = ids + self.target_ids
        return ids

    def logits(self, ids: list[int], edit=None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The logits that score the targets (``[K, V]``; a classifier's ``[classes]``), with
        ``edit`` (one or a list) applied and ``noise`` ``[L, H]`` added to the token
        embeddings."""
        handles = []
        if noise is not None:
            table = self.hf.get_input_embeddings()
            handles.append(table.register_forward_hook(lambda m, a, o: o + noise[None]))
        edits = edit if isinstance(edit, list) else [] if edit is None else [edit]
        for layer, site, change in edits:
            module, kind, _ = site_module(self.hf, self.stack, layer, site)

            def put(x: torch.Tensor, change=change) -> torch.Tensor:
                x = x.clone()
                x[0] = change(x[0])
                return x

            if kind == "pre":
                handles.append(
                    module.register_forward_pre_hook(lambda m, a, put=put: (put(a[0]), *a[1:]))
                )
            else:
                handles.append(
                    module.register_forward_hook(
                        lambda m, a, o, put=put: (
                            (put(o[0]), *o[1:]) if isinstance(o, tuple) else put(o)
                        )
                    )
                )
        try:
            with torch.no_grad():
                if self.decoder_ids is not None:
                    return self.hf(
                        input_ids=torch.tensor([ids]),
                        decoder_input_ids=torch.tensor([self.decoder_ids]),
                        use_cache=False,
                    ).logits[0, : len(self.target_ids)]
                if self.hf.config.model_type == "bert":
                    return self.hf(input_ids=torch.tensor([ids])).logits[0]
                logits = self.hf(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
                return logits[torch.arange(len(self.target_ids)) + self.prefix - 1]
        finally:
            for h in handles:
                h.remove()

    def run(self, ids: list[int], edit=None, noise: torch.Tensor | None = None) -> np.ndarray:
        """Every target's logit (a classifier's: every class's)."""
        logits = self.logits(ids, edit, noise)
        if self.hf.config.model_type == "bert":
            return logits.numpy()
        return logits[torch.arange(len(self.target_ids)), self.target_ids].numpy()

    def probability(
        self, ids: list[int], edit=None, noise: torch.Tensor | None = None
    ) -> np.ndarray:
        """Every target's probability, from the whole vocabulary's softmax."""
        probs = torch.softmax(self.logits(ids, edit, noise), -1)
        return probs[torch.arange(len(self.target_ids)), self.target_ids].numpy()

    def capture(
        self, ids: list[int], layer: int, site: str, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        seen = []

        def keep(x: torch.Tensor) -> torch.Tensor:
            seen.append(x.clone())
            return x

        self.run(ids, (layer, site, keep), noise)
        return seen[0]


def real_patching(
    ref: Reference,
    clean: str,
    corrupted: str,
    site: str,
    layers: int,
    heads: int,
    direction: str = "noising",
    noise: torch.Tensor | None = None,
    score: str = "run",
) -> np.ndarray:
    """``[targets, positions, layers, heads]``: the patched run's scores less the unpatched
    run's, one forward per layer, position and head (``heads`` 1 for a site without heads).
    ``noise`` is added to the corrupted run's embeddings; ``score`` the Reference method that
    scores (``"run"``: logits, ``"probability"``)."""
    base, donor = (ref.ids(clean), None), (ref.ids(corrupted), noise)
    if direction == "denoising":
        base, donor = donor, base
    scored = getattr(ref, score)
    unpatched = scored(base[0], None, base[1])
    out = None
    for layer in range(layers):
        _, _, offset = site_module(ref.hf, ref.stack, layer, site)
        given = ref.capture(donor[0], layer, site, donor[1])
        length = given.shape[0]
        d = (given.shape[1] - offset) // heads if site != "residual" and heads > 1 else None
        if site in ("queries", "keys", "values") and ref.hf.config.model_type == "gpt2":
            d = ref.hf.config.n_embd // heads
        for p in range(length):
            for h in range(heads):
                cols = slice(None) if d is None else slice(offset + h * d, offset + (h + 1) * d)

                def change(
                    x: torch.Tensor, p: int = p, cols: slice = cols, given: torch.Tensor = given
                ) -> torch.Tensor:
                    x[p, cols] = given[p, cols]
                    return x

                scores = scored(base[0], (layer, site, change), base[1]) - unpatched
                if out is None:
                    out = np.zeros((len(scores), length, layers, heads))
                out[:, p, layer, h] = scores
    assert out is not None
    return out


def heads_of(model: ax.Model, site: str) -> int:
    config = model.hf.config
    if site in ("mlp", "residual"):
        return 1
    if site in ("keys", "values"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return getattr(config, "num_attention_heads", None) or config.encoder_attention_heads


def first_difference(model: ax.Model, clean: str, corrupted: str) -> int:
    a, b = (model.tokenizer(text)["input_ids"] for text in (clean, corrupted))
    return next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)


def visible(got, want: np.ndarray, check: Callable[[np.ndarray, np.ndarray], None]) -> None:
    """``got`` against ``want`` where the target sees the position (NaN in ``got`` elsewhere,
    where real patching moves nothing)."""
    values = got.values if got.ndim == want.ndim else got.values[..., None]
    hidden = np.isnan(values)
    np.testing.assert_array_equal(want[hidden], 0.0)
    check(np.where(hidden, 0.0, values), want)


# --- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("site", ["heads", "mlp", "residual", "queries", "keys", "values"])
def test_decoder_only_equals_real_patching(models64, arch, site):
    model = models64[arch]
    got = ax.activation_patching(
        model, SOURCE, TARGET, corrupted=CORRUPTED, site=site, objective="logit"
    )
    heads = heads_of(model, site)
    want = real_patching(Reference(model, SOURCE, TARGET), SOURCE, CORRUPTED, site, 2, heads)
    assert got.dims[:3] == ("target", "source", "layer")
    assert np.abs(want).max() > 1e-3  # the corruption moves the scores
    # Llama's eager softmax runs in float32 even in a float64 model
    tol = {"rtol": 1e-5, "atol": 1e-7} if arch == "llama" else {"rtol": 1e-9, "atol": 1e-11}
    visible(got, want, lambda a, b: np.testing.assert_allclose(a, b, **tol))
    # before the first corrupted token both runs are the same: those patches move nothing at all
    first = first_difference(model, SOURCE, CORRUPTED)
    np.testing.assert_array_equal(want[:, :first], 0.0)
    np.testing.assert_array_equal(got.values[:, :first], 0.0)


@pytest.mark.parametrize("site", ["heads", "residual"])
def test_denoising_restores_the_clean_activation_in_the_corrupted_run(models64, site):
    model = models64["gpt2"]
    got = ax.activation_patching(
        model, SOURCE, TARGET, corrupted=CORRUPTED, site=site, direction="denoising"
    )
    ref = Reference(model, SOURCE, TARGET)
    heads = heads_of(model, site)
    want = real_patching(ref, SOURCE, CORRUPTED, site, 2, heads, "denoising")
    # the default objective of a language model: the probability, read here from the logits
    base, restored = ref.ids(CORRUPTED), ref.ids(SOURCE)
    assert base != restored
    probs = np.zeros_like(want)
    for layer in range(2):
        given = ref.capture(restored, layer, site)
        d = given.shape[1] // heads
        for p in range(given.shape[0]):
            for h in range(heads):
                cols = slice(h * d, (h + 1) * d) if heads > 1 else slice(None)

                def change(x, p=p, cols=cols, given=given):
                    x[p, cols] = given[p, cols]
                    return x

                probs[:, p, layer, h] = ref.probability(base, (layer, site, change))
    probs -= ref.probability(base)[:, None, None, None]
    assert np.abs(want).max() > 1e-3
    visible(got, probs, lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12))


@pytest.mark.parametrize("site", ["heads", "mlp", "residual"])
def test_an_encoder_classifier_equals_real_patching(models64, site):
    model = models64["bert"]
    got = ax.activation_patching(
        model, TEXT, "all", corrupted=BAD_TEXT, site=site, objective="logit"
    )
    ref = Reference(model, TEXT, None)
    assert len(ref.ids(TEXT)) == len(ref.ids(BAD_TEXT))
    heads = heads_of(model, site)
    want = real_patching(ref, TEXT, BAD_TEXT, site, model.hf.config.num_hidden_layers, heads)
    assert got.sizes["target"] == model.hf.config.num_labels
    assert np.abs(want).max() > 1e-4
    visible(got, want, lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12))


@pytest.mark.parametrize(
    ("stack", "site"),
    [
        ("encoder", "heads"),
        ("cross", "heads"),
        ("decoder", "heads"),
        ("decoder", "mlp"),
        ("cross", "keys"),
        ("cross", "queries"),
        ("encoder", "values"),
    ],
)
def test_an_encoder_decoder_equals_real_patching(models64, stack, site):
    model = models64["marian"]
    got = ax.activation_patching(
        model, SOURCE, ED_TARGET, corrupted=CORRUPTED, stack=stack, site=site, objective="logit"
    )
    ref = Reference(model, SOURCE, ED_TARGET, stack)
    config = model.hf.config
    layers = config.encoder_layers if stack == "encoder" else config.decoder_layers
    heads = 1 if site == "mlp" else config.decoder_attention_heads
    want = real_patching(ref, SOURCE, CORRUPTED, site, layers, heads)
    # the decoder positions are the target side of the source index; cross-attention's keys and
    # values live on the encoder's
    if stack == "decoder" or (stack == "cross" and site in ("heads", "queries")):
        assert set(got["side"].values) == {"target"}
    else:
        assert "side" not in got.coords or set(got["side"].values) == {"source"}
    assert np.abs(want).max() > 1e-4
    visible(got, want, lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12))


@pytest.mark.parametrize(
    ("site", "changed"),
    [
        # every layer's head outputs, MLPs and residuals from the first corrupted token on
        ("heads", lambda first, length, layers: layers * (length - first)),
        ("residual", lambda first, length, layers: layers * (length - first)),
        # a layer-0 query reads its own token only: the corrupted token's, then all after it
        ("queries", lambda first, length, layers: 1 + (layers - 1) * (length - first)),
    ],
)
def test_only_patches_that_change_an_activation_run(models64, site, changed):
    """A patch whose donor activation equals the clean one changes nothing, nor does one where
    no target reads (the target token's own position): neither is run. Counted as the copies of the batch the first block sees (three unpatched forwards: the
    donor run, the clean run's activations and the unpatched scores)."""
    model = models64["gpt2"]
    block = model.hf.transformer.h[0]
    rows = []
    handle = block.register_forward_pre_hook(lambda _, args: rows.append(args[0].shape[0]))
    try:
        ax.activation_patching(model, SOURCE, TARGET, corrupted=CORRUPTED, site=site)
    finally:
        handle.remove()
    first = first_difference(model, SOURCE, CORRUPTED)
    # the prompt's positions: the last one, the target's, is read by no target
    length = len(model.tokenizer(SOURCE)["input_ids"])
    heads = heads_of(model, site)
    assert sum(rows) == 3 + heads * changed(first, length, model.hf.config.n_layer)


def test_a_corruption_that_changes_nothing_moves_nothing(models64):
    for arch in ("gpt2", "bert"):
        model = models64[arch]
        text, target = (SOURCE, TARGET) if arch == "gpt2" else (TEXT, None)
        for site in ("heads", "keys", "residual"):
            da = ax.activation_patching(model, text, target, corrupted=text, site=site)
            # no patch runs: every donor equals the clean activation
            assert np.nanmax(np.abs(da.values)) == 0.0, (arch, site)


def test_the_last_residual_at_a_targets_position_gives_it_the_corrupted_score(models64):
    """After the last layer nothing mixes positions: patching the residual stream where target k
    is read swaps in the whole state the head reads, so k's score becomes the corrupted run's."""
    model = models64["llama"]
    got = ax.activation_patching(
        model, SOURCE, TARGET, corrupted=CORRUPTED, site="residual", layers=-1, objective="logit"
    )
    ref = Reference(model, SOURCE, TARGET)
    change = ref.run(ref.ids(CORRUPTED)) - ref.run(ref.ids(SOURCE))
    for k in range(got.sizes["target"]):
        read = ref.prefix - 1 + k
        np.testing.assert_allclose(got.values[k, read, 0], change[k], rtol=1e-6, atol=1e-9)
        # and every earlier position's own patch leaves k's score as it would through attention
        assert np.isnan(got.values[k, read + 1 :, 0]).all()


def test_selections_batches_and_budgets_give_the_full_arrays_entries(models64):
    model = models64["gpt2"]
    full = ax.activation_patching(model, SOURCE, TARGET, corrupted=CORRUPTED)
    few = ax.activation_patching(
        model, SOURCE, TARGET, corrupted=CORRUPTED, layers=[1], heads=[0, 1], sources=[5, 2]
    )
    assert few.dims == full.dims
    assert few.source.values.tolist() == [5, 2]
    want = full.sel(layer=[1], head=[0, 1]).isel(source=[5, 2])
    np.testing.assert_array_equal(few.values, want.values)
    # one patched copy a forward, or three (chunks that straddle layers): the same entries
    for size in (1, 3):
        chunked = ax.activation_patching(
            model, SOURCE, TARGET, corrupted=CORRUPTED, batch_size=size
        )
        np.testing.assert_allclose(chunked.values, full.values, rtol=1e-9, atol=1e-15)
    # one target kept: the positions after the one it is read from are not patched (NaN)
    longer = ax.activation_patching(model, SOURCE, " Paris is a", corrupted=CORRUPTED)
    first = ax.activation_patching(model, SOURCE, " Paris is a", corrupted=CORRUPTED, positions=[5])
    assert longer.sizes["target"] == 3
    np.testing.assert_allclose(first.values[0], longer.values[0], rtol=1e-9, atol=1e-15)
    # a batch of two, each with its own corruption ("Hallo" aligns with "Hello"): each as alone
    inputs, targets, corrupted = [SOURCE, "Hello"], [TARGET, " world"], [CORRUPTED, "Hallo"]
    both = ax.activation_patching(model, inputs, targets, corrupted=corrupted)
    for e in range(2):
        single = ax.activation_patching(model, inputs[e], targets[e], corrupted=corrupted[e])
        assert np.nanmax(np.abs(single.values)) > 1e-6
        part = both.isel(example=e).dropna("target", how="all")
        part = part.isel(source=slice(0, single.sizes["source"]))
        np.testing.assert_allclose(part.values, single.values, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({}, ax.OptionError, "`corrupted` is required"),
        ({"corrupted": "1 2 4 5 ="}, ax.InputError, "has 5 tokens but its clean input has 4"),
        ({"corrupted": "1 2 4 =", "site": "mlp", "heads": 0}, ax.OptionError, "`heads` applies"),
        ({"corrupted": "1 2 4 =", "sources": 9}, ax.OptionError, "`sources` contains 9"),
        ({"corrupted": "1 2 4 =", "direction": "up"}, ax.OptionError, "`direction` must be"),
        ({"corrupted": "1 2 4 =", "window": 0}, ax.OptionError, "`window` must be a positive"),
        (
            {"corrupted": "1 2 4 =", "site": "attention", "heads": 1},
            ax.OptionError,
            "`heads` applies",
        ),
        ({"corrupted": "1 2 4 =", "chunk_size": 2}, ax.OptionError, "chunk_size"),
        ({"corrupted": "1 2 4 =", "stack": "cross"}, ax.OptionError, "needs an encoder-decoder"),
        ({"corrupted": "1 2 4 =", "layers": 5}, ax.OptionError, "`layers` contains 5"),
        ({"corrupted": "1 2 4 =", "max_memory": "1kB"}, ax.OptionError, "cannot be met"),
    ],
)
def test_bad_options_are_refused(default_model, options, error, match):
    with pytest.raises(error, match=match):
        ax.activation_patching(default_model, "1 2 3 =", " 3 2 1", **options)


def test_per_layer_embeddings_are_looked_up_by_the_corrupted_ids():
    """Gemma 4 adds a per-layer embedding of each token id to every layer's stream: the
    corrupted run reads the corrupted ids (the clean ones moved this score by 4e-5 until
    2026-12-06), so the last layer's residual at the target's position carries the corrupted
    run's score exactly."""
    from tests.test_support import FAMILIES

    model = FAMILIES["Gemma 4"]()
    tok = model.tokenizer
    prompt, bad = tok(SOURCE)["input_ids"], tok(CORRUPTED)["input_ids"]
    target = tok(SOURCE + TARGET)["input_ids"][len(prompt) :]
    assert len(prompt) == len(bad) and len(target) == 1

    def score(ids: list[int]) -> float:
        with torch.no_grad():
            logits = model.hf(input_ids=torch.tensor([ids + target])).logits[0]
        return float(logits[len(prompt) - 1, target[0]])

    got = ax.activation_patching(
        model, SOURCE, TARGET, corrupted=CORRUPTED, site="residual", layers=-1, objective="logit"
    )
    want = score(bad) - score(prompt)
    np.testing.assert_allclose(got.values[0, len(prompt) - 1, 0], want, rtol=2e-6, atol=1e-7)


def test_keys_and_values_that_later_layers_reuse_are_refused():
    """Gemma 4's shared key-value layers reuse an earlier layer's keys and values, stored before
    the attention function where both patchings replace them: refused, queries still run."""
    import transformers

    from tests.test_architectures import SIZES

    _, tok = tiny_model("gpt2")
    # the last layer reuses the first's keys and values (layers of one kind)
    config = transformers.Gemma4TextConfig(
        vocab_size=len(tok), intermediate_size=64, num_key_value_heads=2, head_dim=8,
        global_head_dim=16, hidden_size_per_layer_input=8, vocab_size_per_layer_input=len(tok),
        layer_types=["full_attention"] * SIZES["num_hidden_layers"], num_kv_shared_layers=1,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, **SIZES,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    assert hf.base_model.layers[-1].self_attn.is_kv_shared_layer
    model = ax.load_model(hf, tokenizer=tok)
    for fn in (ax.activation_patching, ax.attribution_patching):
        for site in ("keys", "values"):
            with pytest.raises(ax.ModelError, match="reuse an earlier layer's keys and values"):
                fn(model, SOURCE, TARGET, corrupted=CORRUPTED, site=site)
        assert fn(model, SOURCE, TARGET, corrupted=CORRUPTED, site="queries").sizes["head"] > 0


# --- causal tracing: Gaussian noise on some tokens' embeddings ------------------------------


def noises(model: ax.Model, length: int, tokens: list[int], samples: int, seed: int, scale=3.0):
    """``[samples, length, H]``: the documented draws (one CPU generator seeded with ``seed``,
    standard normal in float32 for the tokens only), at ``scale`` times the standard deviation
    of the embedding table's entries."""
    table = model.hf.get_input_embeddings().weight.detach().double()
    std = float(table.std(correction=0))
    draws = torch.randn(
        samples, len(tokens), table.shape[1], generator=torch.Generator().manual_seed(seed)
    )
    out = torch.zeros(samples, length, table.shape[1], dtype=table.dtype)
    out[:, tokens] = draws.double() * (scale * std)
    return out


@pytest.mark.parametrize(
    ("site", "direction", "objective"),
    [
        ("residual", "denoising", "probability"),
        ("mlp", "denoising", "probability"),
        ("heads", "denoising", "logit"),
        ("heads", "noising", "logit"),
    ],
)
def test_gaussian_noise_equals_causal_tracing_in_loops(models64, site, direction, objective):
    """Causal tracing (Meng et al. 2022): the tokens' embeddings noised, one forward per sample,
    layer, position and head, the scores' changes averaged over the samples."""
    model = models64["gpt2"]
    tokens, samples, seed = [1, 2], 3, 5
    noise = ax.GaussianNoise(tokens=tokens, samples=samples, seed=seed)
    got = ax.activation_patching(
        model, SOURCE, TARGET, corrupted=noise, site=site, direction=direction, objective=objective
    )
    ref = Reference(model, SOURCE, TARGET)
    heads = heads_of(model, site)
    score = "run" if objective == "logit" else "probability"
    draws = noises(model, len(ref.ids(SOURCE)), tokens, samples, seed)
    want = np.mean(
        [
            real_patching(ref, SOURCE, SOURCE, site, 2, heads, direction, noise, score)
            for noise in draws
        ],
        axis=0,
    )
    assert np.abs(want).max() > 1e-4
    visible(got, want, lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12))
    # before the first noised token both runs agree: exactly nothing moves there
    np.testing.assert_array_equal(got.values[:, : tokens[0]], 0.0)


def test_restoring_the_last_residual_where_a_target_is_read_gives_its_clean_score(models64):
    """Causal tracing's end point: the clean state the head reads, restored into each noisy run,
    gives the clean score; the effect is the clean score less the noisy runs' mean."""
    model = models64["llama"]
    noise = ax.GaussianNoise(tokens=[0, 1, 2], samples=4, seed=1)
    got = ax.activation_patching(
        model,
        SOURCE,
        " Paris is",
        corrupted=noise,
        site="residual",
        layers=-1,
        direction="denoising",
        objective="logit",
    )
    ref = Reference(model, SOURCE, " Paris is")
    ids = ref.ids(SOURCE)
    draws = noises(model, len(ids), [0, 1, 2], 4, 1)
    noisy = np.mean([ref.run(ids, None, d) for d in draws], axis=0)
    change = ref.run(ids) - noisy
    assert np.abs(change).min() > 1e-3
    for k in range(got.sizes["target"]):
        read = ref.prefix - 1 + k
        np.testing.assert_allclose(got.values[k, read, 0], change[k], rtol=1e-5, atol=1e-8)


def test_gaussian_noise_batched_equals_single(models64):
    model = models64["gpt2"]
    inputs, targets, tokens = [SOURCE, "Hello"], [TARGET, " world"], [[1, -2], [0]]
    both = ax.activation_patching(
        model,
        inputs,
        targets,
        corrupted=ax.GaussianNoise(tokens=tokens, samples=2),
        direction="denoising",
        site="mlp",
    )
    for e in range(2):
        single = ax.activation_patching(
            model,
            inputs[e],
            targets[e],
            corrupted=ax.GaussianNoise(tokens=tokens[e], samples=2),
            direction="denoising",
            site="mlp",
        )
        assert np.nanmax(np.abs(single.values)) > 1e-6
        part = both.isel(example=e).dropna("target", how="all")
        part = part.isel(source=slice(0, single.sizes["source"]))
        np.testing.assert_allclose(part.values, single.values, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize(
    ("make", "options", "error", "match"),
    [
        (lambda: ax.GaussianNoise(tokens=[0], scale=0), {}, ax.OptionError, "scale"),
        (lambda: ax.GaussianNoise(tokens=[0], samples=0), {}, ax.OptionError, "samples"),
        (lambda: ax.GaussianNoise(tokens=1.5), {}, ax.OptionError, "tokens` must be an int"),
        (lambda: ax.GaussianNoise(tokens=[7]), {}, ax.InputError, r"tokens` contains 7"),
        (lambda: ax.GaussianNoise(tokens=[[0], [1]]), {}, ax.OptionError, "one per example"),
        (lambda: ax.GaussianNoise(tokens=[None]), {}, ax.OptionError, "must be an int, a list"),
        (lambda: ax.GaussianNoise(tokens=[1.5, 2]), {}, ax.OptionError, "must be an int, a"),
        (
            lambda: ax.GaussianNoise(tokens=[0]),
            {"method": "attribution_patching"},
            ax.OptionError,
            "activation patching's corruption",
        ),
    ],
)
def test_bad_noise_is_refused(default_model, make, options, error, match):
    with pytest.raises(error, match=match):
        method = getattr(ax, options.get("method", "activation_patching"))
        method(default_model, "1 2 3 =", " 3 2 1", corrupted=make())


def test_gaussian_noise_on_an_encoder_classifier_equals_causal_tracing_in_loops(models64):
    model = models64["bert"]
    tokens, samples = [2, 3], 2
    got = ax.activation_patching(
        model,
        TEXT,
        "all",
        corrupted=ax.GaussianNoise(tokens=tokens, samples=samples, seed=3),
        site="heads",
        direction="denoising",
        objective="logit",
    )
    ref = Reference(model, TEXT, None)
    draws = noises(model, len(ref.ids(TEXT)), tokens, samples, 3)
    heads = heads_of(model, "heads")
    layers = model.hf.config.num_hidden_layers
    want = np.mean(
        [real_patching(ref, TEXT, TEXT, "heads", layers, heads, "denoising", d) for d in draws],
        axis=0,
    )
    assert np.abs(want).max() > 1e-4
    visible(got, want, lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12))


def windowed_patching(
    ref: Reference, clean: str, corrupted: str, site: str, layers: int, window: int
) -> np.ndarray:
    """``[targets, positions, layers]``: each patch sets one position at every layer of ROME's
    window around its layer (``max(0, l - window // 2)`` up to ``l + ceil(window / 2)``)."""
    base, donor = ref.ids(clean), ref.ids(corrupted)
    unpatched = ref.run(base)
    given = [ref.capture(donor, layer, site) for layer in range(layers)]
    out = np.zeros((len(unpatched), len(base), layers))
    for center in range(layers):
        low, high = max(0, center - window // 2), min(layers, center + (window + 1) // 2)
        for p in range(len(base)):
            edits = []
            for layer in range(low, high):

                def change(x: torch.Tensor, p: int = p, layer: int = layer) -> torch.Tensor:
                    x[p] = given[layer][p]
                    return x

                edits.append((layer, site, change))
            out[:, p, center] = ref.run(base, edits) - unpatched
    return out


@pytest.mark.parametrize("window", [2, 3])
@pytest.mark.parametrize(("site", "hooked"), [("mlp", "mlp"), ("attention", "heads")])
def test_a_window_patches_the_layers_around_each_one(models64, window, site, hooked):
    """ROME's window: every layer of it set at once. ``site="attention"`` is the heads' site
    with every head of the layer patched together (the output projection's whole input)."""
    model = models64["llama"]
    got = ax.activation_patching(
        model, SOURCE, TARGET, corrupted=CORRUPTED, site=site, window=window, objective="logit"
    )
    want = windowed_patching(Reference(model, SOURCE, TARGET), SOURCE, CORRUPTED, hooked, 2, window)
    assert got.dims == ("target", "source", "layer")
    assert np.abs(want).max() > 1e-3
    visible(got, want, lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7))
    # one layer chosen: its window still reaches the layer below
    last = ax.activation_patching(
        model,
        SOURCE,
        TARGET,
        corrupted=CORRUPTED,
        site=site,
        window=window,
        layers=[1],
        objective="logit",
    )
    np.testing.assert_allclose(last.values, got.sel(layer=[1]).values, rtol=1e-6, atol=1e-9)


def test_the_attention_site_is_every_head_at_once(models64):
    model = models64["gpt2"]
    kw = {"corrupted": CORRUPTED, "objective": "logit"}
    got = ax.activation_patching(model, SOURCE, TARGET, site="attention", **kw)
    want = real_patching(Reference(model, SOURCE, TARGET), SOURCE, CORRUPTED, "heads", 2, 1)
    visible(got, want, lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11))
    # attribution patching's estimate is linear in the activation: the heads' sum
    atp = ax.attribution_patching(model, SOURCE, TARGET, site="attention", **kw)
    heads = ax.attribution_patching(model, SOURCE, TARGET, site="heads", **kw)
    assert atp.dims == got.dims
    np.testing.assert_allclose(atp.values, heads.sum("head", skipna=False).values, rtol=1e-12)


def test_noise_on_a_text_noises_the_tokens_it_covers(models64):
    model = models64["gpt2"]
    tokens = model.tokenizer.convert_ids_to_tokens(model.tokenizer(SOURCE)["input_ids"])
    assert tokens[1:3] == ["Ġcapital", "Ġof"]

    def traced(inputs, targets, where):
        noise = ax.GaussianNoise(tokens=where, samples=2, seed=4)
        return ax.activation_patching(
            model, inputs, targets, corrupted=noise, site="mlp", direction="denoising"
        )

    want = traced(SOURCE, TARGET, [1, 2])
    for subject in ("capital of", " capital of", "apital o"):  # a part of a token is that token
        np.testing.assert_array_equal(traced(SOURCE, TARGET, subject).values, want.values)
    inputs, targets = [SOURCE, "Hello world"], [TARGET, "!"]
    both = traced(inputs, targets, ["capital of", "world"])
    # "world" is 3 tokens of the tiny tokenizer: "Ġw", "or", "ld"
    for e, single in enumerate((want, traced(inputs[1], targets[1], [4, 5, 6]))):
        part = both.isel(example=e).dropna("target", how="all")
        part = part.isel(source=slice(0, single.sizes["source"]))
        np.testing.assert_allclose(part.values, single.values, rtol=1e-9, atol=1e-15)
    with pytest.raises(ax.InputError, match="is not a text in the input"):
        traced(SOURCE, TARGET, "Spain")
    clf = models64["bert"]
    with pytest.raises(ax.InputError, match="pair"):
        ax.activation_patching(
            clf, ("the cat", "sat down"), corrupted=ax.GaussianNoise(tokens="cat"), site="mlp"
        )


def test_the_noise_unit_is_the_deviation_of_the_embeddings_it_is_added_to():
    """Gemma 3 scales its embeddings inside the embedding module (by sqrt(d)): the noise's unit
    is the deviation of those scaled rows, not of the raw table (the tokens' noise would be
    sqrt(d) times too small against them)."""
    hf, tok = tiny_model("gemma3")
    model = ax.load_model(hf, tokenizer=tok)
    table = hf.get_input_embeddings()
    with torch.no_grad():
        rows = table(torch.arange(table.weight.shape[0])).double()
    scaled, raw = float(rows.std(correction=0)), float(table.weight.double().std(correction=0))
    assert scaled > 3 * raw  # the module's scale

    def traced(**kw):
        noise = ax.GaussianNoise(tokens=[1, 2], samples=2, **kw)
        return ax.activation_patching(
            model, SOURCE, TARGET, corrupted=noise, site="residual", direction="denoising"
        ).values

    np.testing.assert_allclose(traced(), traced(std=scaled), rtol=1e-6, atol=1e-9)
    assert np.nanmax(np.abs(traced() - traced(std=raw))) > 1e-4


def test_noise_tokens_may_be_numpy_and_the_noise_is_hashable():
    given = ax.GaussianNoise(tokens=np.array([1, 2]), samples=2)
    assert given == ax.GaussianNoise(tokens=[np.int64(1), 2], samples=2)
    assert hash(given) == hash(ax.GaussianNoise(tokens=(1, 2), samples=2))
    assert ax.GaussianNoise(tokens=[[0, 1], "cat"]).tokens == ((0, 1), "cat")


def test_noise_on_a_batch_of_pairs_given_as_two_lists(models64):
    """A classifier's batch as (texts, text_pairs), two lists, is the batch of its pairs."""
    model = models64["bert"]
    texts, pairs = ["the cat sat", "a dog ran"], ["on the mat", "off"]

    def traced(inputs, tokens):
        noise = ax.GaussianNoise(tokens=tokens, samples=2)
        return ax.activation_patching(model, inputs, "all", corrupted=noise, site="mlp").values

    as_lists = traced((texts, pairs), [[1], [2]])
    np.testing.assert_array_equal(
        as_lists, traced(list(zip(texts, pairs, strict=True)), [[1], [2]])
    )


def test_the_noise_unit_follows_a_changed_table():
    """The unit is kept per model between calls, but not past a change to the table."""
    hf, tok = tiny_model("gpt2")
    model = ax.load_model(hf, tokenizer=tok)

    def traced(**kw):
        noise = ax.GaussianNoise(tokens=[1, 2], samples=2, **kw)
        return ax.activation_patching(
            model, SOURCE, TARGET, corrupted=noise, site="residual", direction="denoising"
        ).values

    before = traced()
    with torch.no_grad():
        hf.get_input_embeddings().weight.mul_(2.0)
    std = float(hf.get_input_embeddings().weight.double().std(correction=0))
    after = traced()
    assert np.nanmax(np.abs(after - before)) > 1e-6
    np.testing.assert_allclose(after, traced(std=std), rtol=1e-5, atol=1e-9)


# --- MLP neurons -------------------------------------------------------------------------------


def neuron_patching(
    ref: Reference, clean: str, corrupted: str, layers: int, neurons: list[int]
) -> np.ndarray:
    """``[targets, positions, layers, len(neurons)]``: one forward per layer, position and
    neuron, that one entry of the MLP output projection's input set to the corrupted run's."""
    base, unpatched = ref.ids(clean), ref.run(ref.ids(clean))
    out = None
    for layer in range(layers):
        given = ref.capture(ref.ids(corrupted), layer, "neurons")
        for p in range(given.shape[0]):
            for j, n in enumerate(neurons):

                def change(x: torch.Tensor, p: int = p, n: int = n, given=given) -> torch.Tensor:
                    x[p, n] = given[p, n]
                    return x

                scores = ref.run(base, (layer, "neurons", change)) - unpatched
                if out is None:
                    out = np.zeros((len(scores), given.shape[0], layers, len(neurons)))
                out[:, p, layer, j] = scores
    assert out is not None
    return out


@pytest.mark.parametrize(
    ("arch", "stack"),
    [("gpt2", None), ("llama", None), ("bert", None), ("marian", "encoder"), ("marian", "decoder")],
)
def test_neurons_equal_real_patching(models64, arch, stack):
    """One neuron at one position a patch: GPT-2's Conv1D, Llama's gated MLP (the neuron is
    ``act(gate) * up``), BERT's intermediate and Marian's encoder and decoder ``fc2`` inputs."""
    model = models64[arch]
    text, target, bad = {
        "bert": (TEXT, "all", BAD_TEXT),
        "marian": (SOURCE, ED_TARGET, CORRUPTED),
    }.get(arch, (SOURCE, TARGET, CORRUPTED))
    neurons = [0, 5, 17, 63]
    got = ax.activation_patching(
        model, text, target, corrupted=bad, site="neurons", stack=stack, neurons=neurons,
        objective="logit",
    )  # fmt: skip
    assert got.dims == ("target", "source", "layer", "neuron")
    assert got["neuron"].values.tolist() == neurons
    ref = Reference(model, text, None if arch == "bert" else target, stack or "self")
    want = neuron_patching(ref, text, bad, 2, neurons)
    assert np.abs(want).max() > 1e-5
    tol = {"rtol": 1e-5, "atol": 1e-8} if arch == "llama" else {"rtol": 1e-9, "atol": 1e-12}
    visible(got, want, lambda a, b: np.testing.assert_allclose(a, b, **tol))


def test_neuron_selections_batches_and_errors(models64):
    model = models64["gpt2"]
    kw = {"corrupted": CORRUPTED, "site": "neurons"}
    full = ax.activation_patching(model, SOURCE, TARGET, layers=1, neurons=range(8), **kw)
    few = ax.activation_patching(
        model, SOURCE, TARGET, layers=[1], neurons=[6, -1], sources=[5, 3], **kw
    )
    n = model.hf.config.n_embd * 4
    assert few["neuron"].values.tolist() == [6, n - 1]
    np.testing.assert_array_equal(
        few.sel(neuron=[6]).values, full.sel(neuron=[6]).isel(source=[5, 3]).values
    )
    for size in (1, 5):  # chunks of single patches and of patches straddling positions
        chunked = ax.activation_patching(
            model, SOURCE, TARGET, layers=1, neurons=range(8), batch_size=size, **kw
        )
        np.testing.assert_allclose(chunked.values, full.values, rtol=1e-9, atol=1e-15)
    inputs, targets, corrupted = [SOURCE, "Hello"], [TARGET, " world"], [CORRUPTED, "Hallo"]
    both = ax.activation_patching(
        model, inputs, targets, corrupted=corrupted, site="neurons", neurons=[1, 9]
    )
    for e in range(2):
        single = ax.activation_patching(
            model, inputs[e], targets[e], corrupted=corrupted[e], site="neurons", neurons=[1, 9]
        )
        part = both.isel(example=e).dropna("target", how="all")
        part = part.isel(source=slice(0, single.sizes["source"]))
        np.testing.assert_allclose(part.values, single.values, rtol=1e-9, atol=1e-15)
    # the neurons a result names, as its coordinate's values (numpy): the same selection
    picked = few["neuron"].values
    again = ax.activation_patching(
        model, SOURCE, TARGET, layers=[1], neurons=picked, sources=np.array([5, 3]), **kw
    )
    np.testing.assert_array_equal(again.values, few.values)
    for method in (ax.activation_patching, ax.attribution_patching):
        with pytest.raises(ax.OptionError, match="`neurons` must be an int or a list of ints"):
            method(model, SOURCE, TARGET, neurons=np.array([[0, 1]]), **kw)
        with pytest.raises(ax.OptionError, match="`neurons` applies to site='neurons'"):
            method(model, SOURCE, TARGET, corrupted=CORRUPTED, neurons=0)
        with pytest.raises(ax.OptionError, match="`heads` applies"):
            method(model, SOURCE, TARGET, corrupted=CORRUPTED, site="neurons", heads=0)
        with pytest.raises(ax.OptionError, match=f"`neurons` contains {n}"):
            method(model, SOURCE, TARGET, corrupted=CORRUPTED, site="neurons", neurons=n)


def test_a_mixture_of_experts_has_no_neurons_to_patch():
    model = tiny_mixtral()
    for method in (ax.activation_patching, ax.attribution_patching):
        with pytest.raises(ax.ModelError, match=r"layer 0's MLP .* is a mixture of experts"):
            method(model, SOURCE, TARGET, corrupted=CORRUPTED, site="neurons")


# --- the blocks below a patch ----------------------------------------------------------------


def test_the_blocks_below_a_chunks_patches_are_not_run_again(models64, monkeypatch):
    """A copy patched at layer 1 runs block 0 as the base run did: block 0 runs in the three
    unpatched forwards only (donors, base run, unpatched scores), and the effects are real
    patching's (the tests above run with it on; here against it off)."""
    from attrax import _components

    model = models64["gpt2"]
    blocks = list(model.hf.transformer.h)
    calls = [0] * len(blocks)
    for i, block in enumerate(blocks):  # counts the module's own forward, not the hooks
        monkeypatch.setattr(
            block,
            "forward",
            lambda *a, i=i, run=block.forward, **k: (
                calls.__setitem__(i, calls[i] + 1) or run(*a, **k)
            ),
        )
    kw = {"corrupted": CORRUPTED, "objective": "logit", "site": "heads", "layers": 1}
    reused = ax.activation_patching(model, SOURCE, TARGET, batch_size=1, **kw)
    patched_forwards = calls[1] - 3
    assert patched_forwards > 1 and calls[0] == 3, calls
    monkeypatch.setattr(_components, "SKIP_BELOW", False)
    calls[:] = [0, 0]
    every = ax.activation_patching(model, SOURCE, TARGET, batch_size=1, **kw)
    assert calls[0] == calls[1] == 3 + patched_forwards, calls
    np.testing.assert_allclose(reused.values, every.values, rtol=1e-12, atol=1e-15)
    # a window reaching block 0 runs it again: the lowest layer a chunk patches decides
    monkeypatch.setattr(_components, "SKIP_BELOW", True)
    calls[:] = [0, 0]
    ax.activation_patching(model, SOURCE, TARGET, batch_size=1, window=2, **kw)
    assert calls[0] == calls[1], calls
    # keys patched in layer 1's attention: block 0 reused too
    calls[:] = [0, 0]
    ax.activation_patching(model, SOURCE, TARGET, batch_size=1, **{**kw, "site": "keys"})
    assert calls[0] == 3 and calls[1] > 4, calls


def test_reused_blocks_keep_a_users_hooks_and_shared_blocks(models64, monkeypatch):
    """A user's forward hook that changes a block's output changes it once in a reused block
    too (the output is kept before it runs); a block listed twice (shared layers) is not reused
    and leaves no replaced forward behind; and only blocks below some patch are kept."""
    from attrax import _components

    model = models64["gpt2"]
    kw = {"corrupted": CORRUPTED, "objective": "logit", "site": "residual", "layers": [1]}
    steer = torch.zeros(model.hf.config.n_embd, dtype=torch.float64)
    steer[0] = 3.0
    block = model.hf.transformer.h[0]
    handle = block.register_forward_hook(lambda _m, _a, out: out + steer)
    try:
        reused = ax.activation_patching(model, SOURCE, TARGET, **kw)
        monkeypatch.setattr(_components, "SKIP_BELOW", False)
        every = ax.activation_patching(model, SOURCE, TARGET, **kw)
    finally:
        handle.remove()
    plain = ax.activation_patching(model, SOURCE, TARGET, **kw)
    assert np.nanmax(np.abs(every.values - plain.values)) > 1e-3  # the hook moves the effects
    np.testing.assert_allclose(reused.values, every.values, rtol=1e-12, atol=1e-15)
    monkeypatch.setattr(_components, "SKIP_BELOW", True)
    # only the blocks below the highest layer patched are kept: none for layer 0
    kept: list[int] = []
    outputs = _components._outputs
    monkeypatch.setattr(
        _components,
        "_outputs",
        lambda blocks, rows: kept.append(len(blocks)) or outputs(blocks, rows),
    )
    ax.activation_patching(model, SOURCE, TARGET, **{**kw, "layers": 0})
    ax.activation_patching(model, SOURCE, TARGET, **{**kw, "layers": [1, 0]})
    assert kept == [0, 1]
    # GPT-2 with its first block in both places: run, not reused, and put back as it was
    hf, tok = tiny_model("gpt2", n_layer=3)
    blocks = hf.transformer.h
    blocks[1] = blocks[0]
    shared = ax.load_model(full_double(hf), tokenizer=tok)
    ids = torch.tensor([tok("The capital of Italy is")["input_ids"]])
    with torch.no_grad():
        before = shared.hf(ids, use_cache=False).logits
    got = ax.activation_patching(shared, SOURCE, TARGET, **{**kw, "layers": [2]})
    assert np.isfinite(got.values).any()
    assert all("forward" not in b.__dict__ for b in blocks)
    with torch.no_grad():
        torch.testing.assert_close(shared.hf(ids, use_cache=False).logits, before)


def test_a_decoder_stacks_copies_reuse_the_encoder(models64, monkeypatch):
    """Patches on Marian's decoder positions leave its encoder's input as the base run's: every
    encoder block, and the decoder blocks below each patch, return the base run's outputs."""
    from attrax import _components

    model = models64["marian"]
    encoder = list(model.hf.get_encoder().layers)
    calls = [0] * len(encoder)
    for i, block in enumerate(encoder):
        monkeypatch.setattr(
            block,
            "forward",
            lambda *a, i=i, run=block.forward, **k: (
                calls.__setitem__(i, calls[i] + 1) or run(*a, **k)
            ),
        )
    kw = {"corrupted": CORRUPTED, "objective": "logit", "site": "mlp", "stack": "decoder"}
    reused = ax.activation_patching(model, SOURCE, ED_TARGET, batch_size=2, **kw)
    assert calls == [3] * len(encoder), calls  # the donor, base and unpatched runs only
    monkeypatch.setattr(_components, "SKIP_BELOW", False)
    every = ax.activation_patching(model, SOURCE, ED_TARGET, batch_size=2, **kw)
    assert min(calls) > 6, calls
    # effects near 0 differ by the rounding between batch sizes (1e-15 absolute)
    np.testing.assert_allclose(reused.values, every.values, rtol=1e-12, atol=1e-13)


# --- zero and mean ablation ------------------------------------------------------------------


def ablated(seen: torch.Tensor, kind: str, prompt: int) -> torch.Tensor:
    """``seen`` ``[L, width]`` ablated by hand: zeros, or every row the mean of the first
    ``prompt`` rows (the prompt's: the targets' rows are not averaged)."""
    if kind == "zero":
        return torch.zeros_like(seen)
    return seen[:prompt].mean(0, keepdim=True).expand_as(seen).clone()


def real_ablation(ref: Reference, text: str, site: str, layers: int, heads: int, kind: str):
    """``[targets, positions, layers, heads]``: one activation (a head's columns) of the clean
    run ablated per forward, less the clean run's scores."""
    ids = ref.ids(text)
    unpatched = ref.run(ids)
    out = None
    for layer in range(layers):
        _, _, offset = site_module(ref.hf, ref.stack, layer, site)
        seen = ref.capture(ids, layer, site)
        given = ablated(seen, kind, ref.prefix)
        d = ref.hf.config.hidden_size // ref.hf.config.num_attention_heads
        if site == "mlp" or site == "residual":
            d = None
        elif site in ("keys", "values") and heads != ref.hf.config.num_attention_heads:
            d = ref.hf.config.hidden_size // ref.hf.config.num_attention_heads
        for p in range(seen.shape[0]):
            for h in range(heads):
                cols = slice(None) if d is None else slice(offset + h * d, offset + (h + 1) * d)

                def change(x, p=p, cols=cols, given=given):
                    x[p, cols] = given[p, cols]
                    return x

                scores = ref.run(ids, (layer, site, change)) - unpatched
                if out is None:
                    out = np.zeros((len(scores), seen.shape[0], layers, heads))
                out[:, p, layer, h] = scores
    assert out is not None
    return out


@pytest.mark.parametrize(
    ("arch", "site", "kind"),
    [
        *((arch, site, kind) for arch, site in (("gpt2", "heads"), ("gpt2", "mlp"),
          ("gpt2", "keys"), ("llama", "residual"), ("llama", "values")) for kind in ("zero", "mean")),
        ("llama", "queries", "zero"),
    ],
)  # fmt: skip
def test_ablation_equals_real_ablation(models64, arch, site, kind):
    """Each activation set to zero, or to its mean over the input's positions, one forward a
    patch (queries and keys are ablated after their rotary embeddings: a zero is a zero
    before them too, a mean is not, so Llama's queries are checked at zero only)."""
    model = models64[arch]
    got = ax.activation_patching(
        model, SOURCE, TARGET, corrupted=ax.Ablation(kind), site=site, objective="logit"
    )
    want = real_ablation(
        Reference(model, SOURCE, TARGET), SOURCE, site, 2, heads_of(model, site), kind
    )
    assert np.abs(want).max() > 1e-3
    tol = {"rtol": 1e-5, "atol": 1e-7} if arch == "llama" else {"rtol": 1e-9, "atol": 1e-11}
    visible(got, want, lambda a, b: np.testing.assert_allclose(a, b, **tol))


@pytest.mark.parametrize("kind", ["zero", "mean"])
@pytest.mark.parametrize("site", ["heads", "mlp", "neurons"])
def test_attribution_patching_ablation_is_the_gradient_times_the_change(models64, site, kind):
    """AtP with an ablation: each target's gradient at the activation (one backward per target
    here) times the ablated value less the clean one, summed over the head's or MLP's
    columns (each neuron its own)."""
    model = models64["gpt2"]
    got = ax.attribution_patching(
        model, SOURCE, TARGET, corrupted=ax.Ablation(kind), site=site, objective="logit"
    )
    ref = Reference(model, SOURCE, TARGET)
    ids = torch.tensor([ref.ids(SOURCE)])
    heads = model.hf.config.n_head
    per_layer = []
    for layer in range(2):
        module, kind_of_hook, _ = site_module(model.hf, "self", layer, site)
        seen = ref.capture(ref.ids(SOURCE), layer, site)
        leaf = seen.clone().requires_grad_(True)
        if kind_of_hook == "pre":
            handle = module.register_forward_pre_hook(lambda m, a, v=leaf: (v[None], *a[1:]))
        else:
            handle = module.register_forward_hook(lambda m, a, o, v=leaf: v[None])
        try:
            logits = model.hf(input_ids=ids).logits[0]
        finally:
            handle.remove()
        change = ablated(seen, kind, ref.prefix) - seen
        rows = []
        for k, token in enumerate(ref.target_ids):
            (grad,) = torch.autograd.grad(
                logits[ref.prefix - 1 + k, token], leaf, retain_graph=True
            )
            product = grad * change  # [L, width]
            if site == "heads":
                product = product.unflatten(-1, (heads, -1)).sum(-1)
            elif site == "mlp":
                product = product.sum(-1, keepdim=True)
            rows.append(product.detach())
        per_layer.append(torch.stack(rows))  # [K, L, heads | 1 | neurons]
    want = torch.stack(per_layer, dim=2).numpy()  # [K, L, layers, ...]
    if site == "mlp":
        want = want[..., 0]
    values = got.values
    finite = ~np.isnan(values)
    np.testing.assert_allclose(values[finite], want[finite], rtol=1e-8, atol=1e-12)
    assert np.abs(want).max() > 1e-4


def test_mean_ablation_of_a_batch_is_over_every_examples_real_tokens(models64):
    """A batch is the reference set: the mean is over both examples' prompt tokens, padding
    and targets left out (here computed by hand from each example's own run)."""
    model = models64["gpt2"]
    texts, targets = [SOURCE, "Hello"], [TARGET, " world"]
    got = ax.activation_patching(
        model, texts, targets, corrupted=ax.Ablation("mean"), site="mlp", layers=1,
        objective="logit",
    )  # fmt: skip
    refs = [Reference(model, s, t) for s, t in zip(texts, targets, strict=True)]
    seen = [r.capture(r.ids(s), 1, "mlp") for r, s in zip(refs, texts, strict=True)]
    mean = torch.cat([s[: r.prefix] for s, r in zip(seen, refs, strict=True)]).mean(0)
    for b, (ref, text) in enumerate(zip(refs, texts, strict=True)):
        ids = ref.ids(text)
        unpatched = ref.run(ids)
        want = np.zeros((len(ref.target_ids), len(ids)))
        for p in range(len(ids)):

            def change(x, p=p):
                x[p] = mean
                return x

            want[:, p] = ref.run(ids, (1, "mlp", change)) - unpatched
        row = got.isel(example=b, layer=0).dropna("target", how="all").dropna("source", how="all")
        mine = row.values
        np.testing.assert_allclose(
            np.nan_to_num(mine),
            np.where(np.isnan(mine), 0, want[:, : mine.shape[1]]),
            rtol=1e-9,
            atol=1e-11,
        )
    # the batch's mean is not one example's: the single call differs
    single = ax.activation_patching(
        model, SOURCE, TARGET, corrupted=ax.Ablation("mean"), site="mlp", layers=1,
        objective="logit",
    )  # fmt: skip
    assert not np.allclose(
        np.nan_to_num(single.values),
        np.nan_to_num(got.isel(example=0).sel(source=single["source"]).values),
    )


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda m: ax.activation_patching(m, SOURCE, TARGET, corrupted=ax.Ablation(), direction="denoising"), ax.OptionError, "an ax.Ablation has no run of its own"),
        (lambda m: ax.Ablation("half"), ax.OptionError, "`Ablation.kind` must be one of"),
        (lambda m: ax.attribution_patching(m, SOURCE, TARGET, corrupted=ax.GaussianNoise(tokens=0)), ax.OptionError, "a corrupted text .* or an ax.Ablation"),
        (lambda m: ax.attribution_patching(m, SOURCE, TARGET, corrupted=3), ax.OptionError, "a list of strings or an ax.Ablation"),
    ],
)  # fmt: skip
def test_bad_ablations_are_refused(models64, call, error, match):
    with pytest.raises(error, match=match):
        call(models64["gpt2"])


def test_the_cli_takes_an_ablation(tmp_path):
    from attrax.cli import main

    out = tmp_path / "a.nc"
    given = ["attribute", "--method", "activation_patching", "--input", "1 2 3 =",
             "--target", " 3 2 1", "-o", "site=mlp", "--reduce", "none", "--out", str(out)]  # fmt: skip
    assert main([*given, "-o", 'corrupted={"ablation": "mean"}']) == 0
    mine = ax.load(out)
    want = ax.activation_patching(
        ax.load_model(), "1 2 3 =", " 3 2 1", corrupted=ax.Ablation("mean"), site="mlp"
    )
    np.testing.assert_allclose(mine.values, want.values, rtol=1e-6, equal_nan=True)
    assert main([*given, "-o", 'corrupted={"ablation": "mean", "seed": 1}']) == 2
    assert main([*given, "-o", 'corrupted={"ablation": "half"}']) == 2


def test_a_mean_ablation_reads_no_target_token(models64):
    """The mean is the prompt's: a target's effects do not depend on the targets after it."""
    model = models64["gpt2"]
    for method in (ax.activation_patching, ax.attribution_patching):
        one, other = (
            method(model, SOURCE, t, corrupted=ax.Ablation("mean"), site="mlp", objective="logit")
            for t in (" Paris, the city", " Paris; a town")
        )
        # both targets 0 are " Paris" after SOURCE, which reads the sources up to it
        seen = int(one["target"][0]) + 1
        first = one.isel(target=0, source=slice(0, seen)).values
        again = other.isel(target=0, source=slice(0, seen)).values
        np.testing.assert_allclose(first, again, rtol=1e-12, atol=1e-15)
        assert np.nanmax(np.abs(first)) > 1e-4


def test_attribution_patching_mean_ablation_of_a_padded_batch(models64):
    """AtP on a batch of two prompts of different lengths: each example's gradient (autograd,
    one backward per target) times the mean over both prompts' tokens less its activation."""
    model = models64["gpt2"]
    texts, targets = [SOURCE, "Hello"], [TARGET, " world"]
    got = ax.attribution_patching(
        model, texts, targets, corrupted=ax.Ablation("mean"), site="mlp", objective="logit"
    )
    refs = [Reference(model, s, t) for s, t in zip(texts, targets, strict=True)]
    mean = {
        layer: torch.cat(
            [
                r.capture(r.ids(s), layer, "mlp")[: r.prefix]
                for r, s in zip(refs, texts, strict=True)
            ]
        ).mean(0)
        for layer in range(2)
    }
    for b, (ref, text) in enumerate(zip(refs, texts, strict=True)):
        ids = torch.tensor([ref.ids(text)])
        want = np.full((len(ref.target_ids), ids.shape[1], 2), np.nan)
        for layer in range(2):
            seen = ref.capture(ref.ids(text), layer, "mlp")
            leaf = seen.clone().requires_grad_(True)
            handle = model.hf.transformer.h[layer].mlp.register_forward_hook(
                lambda m, a, o, v=leaf: v[None]
            )
            try:
                logits = model.hf(input_ids=ids).logits[0]
            finally:
                handle.remove()
            for k, token in enumerate(ref.target_ids):
                t = ref.prefix + k
                (grad,) = torch.autograd.grad(logits[t - 1, token], leaf, retain_graph=True)
                want[k, :t, layer] = ((mean[layer] - seen) * grad).sum(-1)[:t].detach().numpy()
        positions = [ref.prefix + k for k in range(len(ref.target_ids))]
        mine = got.isel(example=b).sel(target=positions).values[:, : ids.shape[1]]
        np.testing.assert_allclose(mine, want, rtol=1e-9, atol=1e-12, equal_nan=True)


def test_mean_ablation_on_an_encoder_decoder(models64):
    """The encoder's mean is over both sources' tokens (padding left out): by hand, from each
    source's own run; the decoder stacks' positions are the targets': refused."""
    model = models64["marian"]
    texts, targets = [SOURCE, "Hello"], [ED_TARGET, " world"]
    got = ax.activation_patching(
        model, texts, targets, corrupted=ax.Ablation("mean"), site="mlp", stack="encoder",
        layers=1, objective="logit",
    )  # fmt: skip
    refs = [Reference(model, s, t, "encoder") for s, t in zip(texts, targets, strict=True)]
    seen = [r.capture(r.ids(s), 1, "mlp") for r, s in zip(refs, texts, strict=True)]
    mean = torch.cat(seen).mean(0)
    for b, (ref, text) in enumerate(zip(refs, texts, strict=True)):
        ids = ref.ids(text)
        unpatched = ref.run(ids)
        for p in range(len(ids)):

            def change(x, p=p):
                x[p] = mean
                return x

            want = ref.run(ids, (1, "mlp", change)) - unpatched
            mine = got.isel(example=b, layer=0, source=p).values[: len(want)]
            np.testing.assert_allclose(mine, want, rtol=1e-9, atol=1e-11)
    for method in (ax.activation_patching, ax.attribution_patching):
        with pytest.raises(ax.OptionError, match="decoder positions are the targets"):
            method(model, SOURCE, ED_TARGET, corrupted=ax.Ablation("mean"), stack="decoder")
        method(model, SOURCE, ED_TARGET, corrupted=ax.Ablation("zero"), stack="decoder")
