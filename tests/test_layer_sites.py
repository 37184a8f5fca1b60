"""``site=`` with ``layers=``: the gradient methods read at what each block's attention adds,
what its MLP adds, or its MLP's neurons, against a plain autograd loop per target and layer.

The reference hooks the modules written out here per architecture (attrax finds them by
itself): the attention's output projection and the MLP (their outputs), and the MLP's output
projection (its input, the neurons). It runs the Hugging Face model from ids with the site's
activation read or replaced, and takes one ``torch.autograd.grad`` per target.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import attrax as ax
from attrax.testing import tiny_classifier, tiny_model
from tests import _naive
from tests.conftest import tiny_mixtral
from tests.test_layers import close

# (module, whether the activation is its input) per site, per architecture; {} is the layer
SITES = {
    "gpt2": {
        "attention": ("transformer.h.{}.attn.c_proj", False),
        "mlp": ("transformer.h.{}.mlp", False),
        "neurons": ("transformer.h.{}.mlp.c_proj", True),
        "heads": ("transformer.h.{}.attn.c_proj", True),
    },
    "llama": {
        "attention": ("model.layers.{}.self_attn.o_proj", False),
        "mlp": ("model.layers.{}.mlp", False),
        "neurons": ("model.layers.{}.mlp.down_proj", True),
        "heads": ("model.layers.{}.self_attn.o_proj", True),
    },
    "marian": {
        "attention": ("model.encoder.layers.{}.self_attn.out_proj", False),
        "mlp": ("model.encoder.layers.{}.fc2", False),
        "neurons": ("model.encoder.layers.{}.fc2", True),
        "heads": ("model.encoder.layers.{}.self_attn.out_proj", True),
    },
    "t5": {
        "attention": ("encoder.block.{}.layer.0.SelfAttention.o", False),
        "mlp": ("encoder.block.{}.layer.1.DenseReluDense", False),
        "neurons": ("encoder.block.{}.layer.1.DenseReluDense.wo", True),
        "heads": ("encoder.block.{}.layer.0.SelfAttention.o", True),
    },
    "bert": {
        "attention": ("bert.encoder.layer.{}.attention.output.dense", False),
        "mlp": ("bert.encoder.layer.{}.output.dense", False),
        "neurons": ("bert.encoder.layer.{}.output.dense", True),
        "heads": ("bert.encoder.layer.{}.attention.output.dense", True),
    },
}
SOURCE, TARGET = "The capital of France is", " Paris"


@contextlib.contextmanager
def at_site(model, arch: str, site: str, layer: int, edit):
    """The activation of ``site`` at block ``layer`` passes through ``edit(a) -> a``."""
    name, is_input = SITES[arch][site]
    module = model.hf.get_submodule(name.format(layer))
    if is_input:
        handle = module.register_forward_pre_hook(lambda _m, args: (edit(args[0]), *args[1:]))
    else:
        handle = module.register_forward_hook(lambda _m, _a, out: edit(out))
    try:
        yield
    finally:
        handle.remove()


def read(run, model, arch, site, layer, embeds) -> torch.Tensor:
    kept = []
    with torch.no_grad(), at_site(model, arch, site, layer, lambda a: kept.append(a) or a):
        run.logits(list(embeds))
    return kept[0][0]


def site_gradients(run, model, arch, site, layer, embeds, value) -> list[torch.Tensor]:
    """Per target: d score / d a at ``value`` put in place of the site's activation, the model
    running from ``embeds``; one backward per target."""
    leaf = value.clone().requires_grad_(True)
    with at_site(model, arch, site, layer, lambda a: leaf[None].expand_as(a)):
        logits = run.logits(list(embeds))
    out = []
    for t in run.targets():
        score = _naive.probability(logits[t - 1], run.sequence[t])
        out.append(torch.autograd.grad(score, leaf, retain_graph=True)[0])
    return out


def naive(model, arch, site, method, layers, steps=5) -> np.ndarray:
    """``[target, source, layer, width]``: saliency, input x gradient or layer IG (zero baseline
    embeddings, midpoint rule, the site's activation interpolated) at ``site``."""
    run = _naive.Runner(model, *_naive.token_ids(model, SOURCE, TARGET))
    x = run.embeddings()
    per_layer = []
    for layer in layers:
        a = read(run, model, arch, site, layer, x)
        if method == "integrated_gradients":
            a0 = read(run, model, arch, site, layer, [torch.zeros_like(x[0]), *x[1:]])
            total = 0
            for i in range(steps):
                alpha = (i + 0.5) / steps
                grads = site_gradients(run, model, arch, site, layer, x, a0 + alpha * (a - a0))
                total = total + torch.stack(grads) / steps
            per_layer.append(total * (a - a0))
        else:
            grads = torch.stack(site_gradients(run, model, arch, site, layer, x, a))
            per_layer.append(grads * a if method == "input_x_gradient" else grads)
    out = torch.stack(per_layer, dim=2).numpy().copy()
    if not model.is_encoder_decoder:
        for k, t in enumerate(run.targets()):
            out[k, t:] = np.nan
    return out


@pytest.mark.parametrize("site", ["attention", "mlp", "neurons"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "marian", "t5"])
def test_sites_equal_naive_loop(doubles, arch, site):
    model = doubles[arch]
    feature = "neuron" if site == "neurons" else "hidden"
    for method in ("saliency", "input_x_gradient"):
        da = getattr(ax, method)(model, SOURCE, TARGET, layers="all", site=site)
        assert da.dims == ("target", "source", "layer", feature)
        assert da["layer"].values.tolist() == [0, 1]  # blocks 0..L-1
        close(da.values, naive(model, arch, site, method, [0, 1]))
    ig = ax.integrated_gradients(
        model, SOURCE, TARGET, layers=[1, 0], site=site, steps=5, quadrature="riemann_middle"
    )
    close(ig.values, naive(model, arch, site, "integrated_gradients", [1, 0]))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "marian", "t5"])
def test_heads_equal_the_naive_loop_at_the_projections_input(doubles, arch):
    """site='heads': the attention output projection's input, the loop's one vector, split into
    the config's heads; layer IG too (its path per layer, every head together)."""
    model = doubles[arch]
    heads = model.hf.config.get_text_config().num_attention_heads
    for method in ("saliency", "input_x_gradient"):
        da = getattr(ax, method)(model, SOURCE, TARGET, layers="all", site="heads")
        assert da.dims == ("target", "source", "layer", "head", "hidden")
        assert da.sizes["head"] == heads and da["head"].values.tolist() == list(range(heads))
        close(da.values.reshape(*da.shape[:3], -1), naive(model, arch, "heads", method, [0, 1]))
    ig = ax.integrated_gradients(
        model, SOURCE, TARGET, layers=[1], site="heads", steps=5, quadrature="riemann_middle"
    )
    want = naive(model, arch, "heads", "integrated_gradients", [1])
    close(ig.values.reshape(*ig.shape[:3], -1), want)
    summed = ax.input_x_gradient(model, SOURCE, TARGET, layers="all", site="heads",
                                 reduce_hidden="sum")  # fmt: skip
    assert summed.dims == ("target", "source", "layer", "head")
    full = ax.input_x_gradient(model, SOURCE, TARGET, layers="all", site="heads")
    close(summed.values, full.sum("hidden", skipna=False).values)


def test_neuron_widths_are_the_mlps_inner_width(doubles):
    """GPT-2's tiny MLP is 4 x 32 wide, Llama's and Marian's 64 (their configs')."""
    widths = {"gpt2": 128, "llama": 64, "marian": 64, "t5": 64}
    for arch, width in widths.items():
        da = ax.saliency(doubles[arch], SOURCE, TARGET, layers=-1, site="neurons")
        assert da.sizes["neuron"] == width
        assert da["layer"].values.tolist() == [1]


def test_classifier_sites_equal_naive_loop():
    hf, tok = tiny_classifier("bert")
    model = ax.load_model(hf.double(), tokenizer=tok)
    text = "a fine film"
    enc = tok(text, return_tensors="pt")
    for site in ("attention", "neurons", "heads"):
        da = ax.input_x_gradient(model, text, layers=[1], site=site)
        if site == "heads":  # the projection's input, split per head
            assert da.sizes["head"] == hf.config.num_attention_heads
            da = da.stack(feature=("head", "hidden"))
        cls = int(da["target_class"].values[0])
        kept = []
        with torch.no_grad(), at_site(model, "bert", site, 1, lambda a, k=kept: k.append(a) or a):
            hf(**enc)
        leaf = kept[0].clone().requires_grad_(True)
        with at_site(model, "bert", site, 1, lambda _a, v=leaf: v):
            score = torch.softmax(hf(**enc).logits[0], -1)[cls]
        want = (torch.autograd.grad(score, leaf)[0] * leaf)[0].detach().numpy()
        close(da.isel(target=0, layer=0).values, want)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
def test_layer_ig_at_a_site_is_complete(doubles, arch):
    """The residual stream carries x past an MLP: layer IG there integrates from the model run
    on x with that one MLP's output (or neurons) at its value for the baseline. Each layer's row
    adds up to f(x) minus that, computed here by hand, and the gap says so (T5's ReLUs put
    kinks in the path, which quadrature converges on slowly)."""
    model = doubles[arch]
    tol = 1e-2 if arch == "t5" else 1e-5
    run = _naive.Runner(model, *_naive.token_ids(model, SOURCE, TARGET))
    x = run.embeddings()
    zero = [torch.zeros_like(x[0]), *x[1:]]
    for site in ("mlp", "neurons", "attention", "heads"):
        da = ax.integrated_gradients(
            model, SOURCE, TARGET, layers="all", site=site, steps=128, objective="logit"
        )
        assert da["completeness_gap"].dims == ("target", "layer")
        for j, layer in enumerate(da["layer"].values.tolist()):
            start = read(run, model, arch, site, layer, zero)
            with at_site(model, arch, site, layer, lambda a, s=start: s[None].expand_as(a)):
                patched = [run.score(t, x, _naive.logit) for t in run.targets()]
            for k, t in enumerate(run.targets()):
                change = run.score(t, x, _naive.logit) - patched[k]
                total = float(da.isel(target=k, layer=j).sum())
                assert abs(total - change) < tol * max(1.0, abs(change)), (site, layer, k)
                assert abs(float(da["completeness_gap"][k, j]) - (total - change)) < 1e-10
        assert float(abs(da.sum(("source", *da.dims[3:]))).max()) > 1e-4  # not all zero


def test_conductance_and_deeplift_at_a_site_have_no_gap(doubles):
    """What flows through one MLP of a residual network sums to no quantity of the model's
    output: no completeness_gap there (the residual stream, a cut, keeps its own)."""
    model = doubles["gpt2"]
    for method in (ax.conductance, ax.deeplift):
        kw = {"steps": 8} if method is ax.conductance else {}
        assert (
            "completeness_gap"
            not in method(model, SOURCE, TARGET, layers="all", site="mlp", **kw).coords
        )
        assert "completeness_gap" in method(model, SOURCE, TARGET, layers="all", **kw).coords


def test_reductions_name_the_neuron_dim(doubles):
    model = doubles["gpt2"]
    full = ax.input_x_gradient(model, SOURCE, TARGET, layers=[0], site="neurons")
    summed = ax.input_x_gradient(
        model, SOURCE, TARGET, layers=[0], site="neurons", reduce_hidden="sum"
    )
    assert summed.dims == ("target", "source", "layer")
    assert summed.attrs["reductions"] == "sum(neuron)"
    close(summed.values, full.sum("neuron", skipna=False).values)
    normed = ax.l2_norm(full, "neuron")
    close(normed.values, np.sqrt((full**2).sum("neuron", skipna=False)).values)


def test_batched_and_chunked_equal_single(doubles):
    model = doubles["gpt2"]
    pairs = [(SOURCE, TARGET), ("Hello", " world, café")]
    kw = {"layers": [1, 0], "site": "neurons", "steps": 4}
    batched = ax.integrated_gradients(model, [p[0] for p in pairs], [p[1] for p in pairs], **kw)
    for b, (source, target) in enumerate(pairs):
        single = ax.integrated_gradients(model, source, target, **kw)
        got = batched.isel(example=b).sel(target=single["target"], source=single["source"])
        close(got.values, single.values, tol=1e-12)
        chunked = ax.integrated_gradients(model, source, target, chunk_size=1, batch_size=1, **kw)
        close(chunked.values, single.values, tol=1e-12)
        close(chunked["completeness_gap"].values, single["completeness_gap"].values, tol=1e-9)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"site": "neurons"}, ax.OptionError, "`site='neurons'` is read at layers: give `layers`"),
        ({"site": "head", "layers": 0}, ax.OptionError, "`site` must be one of"),
        (
            {"site": "mlp", "layers": 2},
            ax.OptionError,
            "layer 2 is out of range; this model has blocks 0..1",
        ),
        ({"site": "mlp", "layers": -3}, ax.OptionError, "layer -3 is out of range"),
    ],
)
def test_bad_sites_are_refused(doubles, options, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        ax.saliency(doubles["gpt2"], SOURCE, TARGET, **options)


def test_methods_without_a_layer_variant_refuse_a_site(doubles):
    with pytest.raises(ax.OptionError, match="does not take `site`"):
        ax.sequential_integrated_gradients(doubles["gpt2"], SOURCE, TARGET, site="mlp")


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap over grouped matmuls
def test_a_mixture_of_experts_neurons_are_refused():
    model = tiny_mixtral()
    with pytest.raises(ax.ModelError, match=r"layer 0's MLP .* is a mixture of experts"):
        ax.saliency(model, SOURCE, TARGET, layers=0, site="neurons")
    # its MLP's output (the routed experts' weighted sum) is a site like any other
    assert ax.saliency(model, SOURCE, TARGET, layers=0, site="mlp").sizes["layer"] == 1


def test_a_site_the_forward_skips_is_refused(doubles):
    """A module the model's forward computes around (here GPT-2's MLP projection done by hand)
    would leave zero gradients: a ModelError instead."""
    model = doubles["gpt2"]
    mlp = model.hf.transformer.h[1].mlp
    original = mlp.forward

    def by_hand(hidden_states):
        inner = mlp.act(mlp.c_fc(hidden_states))
        return inner @ mlp.c_proj.weight + mlp.c_proj.bias

    mlp.forward = by_hand
    try:
        with pytest.raises(ax.ModelError, match="layer 1's Conv1D did not run in the forward"):
            ax.saliency(model, SOURCE, TARGET, layers="all", site="neurons")
    finally:
        mlp.forward = original


def test_cli_and_dataset_take_a_site(tmp_path, write_jsonl, default_model):
    from attrax.cli import main

    out = tmp_path / "a.nc"
    code = main(
        [
            "attribute", "--method", "integrated_gradients", "--input", "1 2 3 =",
            "--target", " 3 2 1", "--option", "layers=all", "--option", "site=neurons",
            "--option", "steps=4", "--reduce", "none", "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    assert ax.load(out).dims == ("target", "source", "layer", "neuron")
    data = write_jsonl([{"input": "1 2 3 =", "target": " 3 2 1"}])
    ax.attribute_dataset(
        default_model, data, tmp_path / "runs", method="saliency", layers="all",
        site="neurons", progress=False,
    )  # fmt: skip
    back = ax.load_dataset_results(tmp_path / "runs")
    assert back.dims == ("example", "target", "source")  # auto: l2 over neurons, mean over layers
    blocks = default_model.hf.config.n_layer
    with pytest.raises(ax.OptionError, match=f"layer {blocks} is out of range"):
        ax.attribute_dataset(
            default_model, data, tmp_path / "bad", layers=blocks, site="mlp", progress=False
        )
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    ("arch", "module"),
    [("gpt2", "transformers.models.gpt2.modeling_gpt2"),
     ("llama", "transformers.models.llama.modeling_llama")],
)  # fmt: skip
def test_a_head_is_its_own_slice_of_the_projections_input(doubles, arch, module, monkeypatch):
    """The layout site='heads' assumes, checked in the model's own attention: zeroing query head
    ``h``'s output (where the attention function returns ``[B, T, heads, head_dim]``) changes
    slice ``h`` of the output projection's input, and no other."""
    import importlib

    model = doubles[arch]
    source = importlib.import_module(module)
    eager, zeroed = source.eager_attention_forward, [None]

    def attention(*args, **kwargs):
        out, weights = eager(*args, **kwargs)
        if zeroed[0] is not None:
            out = out.clone()
            out[:, :, zeroed[0]] = 0
        return out, weights

    monkeypatch.setattr(source, "eager_attention_forward", attention)
    heads = model.hf.config.num_attention_heads
    run = _naive.Runner(model, *_naive.token_ids(model, SOURCE, TARGET))
    x = run.embeddings()
    base = read(run, model, arch, "heads", 0, x).unflatten(-1, (heads, -1))
    for h in range(heads):
        zeroed[0] = h
        moved = (read(run, model, arch, "heads", 0, x).unflatten(-1, (heads, -1)) - base).abs()
        assert moved.amax(dim=(0, 2)).nonzero().flatten().tolist() == [h]
    zeroed[0] = None
    da = ax.saliency(model, SOURCE, TARGET, layers=0, site="heads")
    assert da.sizes["head"] == heads


def test_heads_refused_where_the_projection_reads_no_one_slice_per_head():
    """DiffLlama's projection reads differential heads (two query heads each); BitNet's, one
    RMSNorm over every head: neither splits into the query heads' outputs."""
    import transformers as T

    _, tok = tiny_model("gpt2")
    small = {"vocab_size": len(tok), "hidden_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64}  # fmt: skip
    for config in (T.DiffLlamaConfig(**small), T.BitNetConfig(**small)):
        torch.manual_seed(0)
        model = ax.load_model(T.AutoModelForCausalLM.from_config(config), tokenizer=tok)
        with pytest.raises(ax.ModelError, match="not one slice per query head"):
            ax.saliency(model, SOURCE, TARGET, layers=0, site="heads")
        ax.saliency(model, SOURCE, TARGET, layers=0, site="mlp")  # its other sites run


def test_the_auto_reduction_norms_a_heads_features_first(doubles):
    """A head's features are its own: averaged across heads before the norm, the auto reduction
    would depend on each head's feature order."""
    from attrax._dataset import reduce

    da = ax.input_x_gradient(doubles["gpt2"], SOURCE, TARGET, layers="all", site="heads")
    want = ax.normalize(ax.mean(ax.mean(ax.l2_norm(da, "hidden"), "layer"), "head"), "source")
    close(reduce(da, None).values, want.values)
    shuffled = da.copy(data=da.values[..., ::-1].copy())  # each head's features reversed
    close(reduce(shuffled, None).values, want.values)
