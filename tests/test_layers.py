"""``layers=`` for the gradient methods: against a plain autograd loop per target and per layer.

The reference runs the Hugging Face model from ids, with the residual stream at layer ``l`` read
or replaced by hooks on the blocks named here per architecture (layer 0: the first block's
input; layer ``l``: block ``l``'s output), and takes one ``torch.autograd.grad`` per target.
"""

from __future__ import annotations

import contextlib
import itertools
import json

import numpy as np
import pytest
import torch
import xarray as xr

import attrax as ax
from attrax.testing import tiny_classifier, tiny_model
from tests import _naive

# where each architecture keeps its blocks, written out here (attrax finds them by itself)
BLOCKS = {
    "gpt2": "transformer.h",
    "llama": "model.layers",
    "marian": "model.encoder.layers",
    "bart": "model.encoder.layers",
    "t5": "encoder.block",
    "bert": "bert.encoder.layer",
}
SOURCE, TARGET = "The capital of France is", " Paris"


@pytest.fixture(scope="module")
def double() -> dict[str, ax.Model]:
    """float64 tiny models, for tight tolerances."""
    out = {}
    for arch in ("gpt2", "llama", "marian", "t5"):
        hf, tok = tiny_model(arch)
        out[arch] = ax.load_model(hf.double(), tokenizer=tok)
    return out


@contextlib.contextmanager
def at_layer(model, arch: str, layer: int, edit):
    """The residual stream at ``layer`` passes through ``edit(h) -> h`` while the model runs."""
    blocks = model.hf.get_submodule(BLOCKS[arch])
    if layer == 0:

        def pre(_module, args, kwargs):
            if args:
                return (edit(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}

        handle = blocks[0].register_forward_pre_hook(pre, with_kwargs=True)
    else:

        def post(_module, _args, output):
            if isinstance(output, torch.Tensor):
                return edit(output)
            return (edit(output[0]), *output[1:])

        handle = blocks[layer - 1].register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


def stream(run: _naive.Runner, model, arch: str, layer: int, embeds) -> torch.Tensor:
    """``h_layer`` ``[L, H]`` of the run with these token embeddings."""
    kept = []
    with torch.no_grad(), at_layer(model, arch, layer, lambda h: kept.append(h) or h):
        run.logits(list(embeds))
    return kept[0][0]


def layer_gradients(run, model, arch, layer, embeds, value) -> list[torch.Tensor]:
    """Per target: d score / d h_layer at ``value`` (put in place of layer ``layer``'s output),
    the model running from ``embeds``; one backward per target."""
    leaf = value.clone().requires_grad_(True)
    with at_layer(model, arch, layer, lambda h: leaf[None].expand_as(h)):
        logits = run.logits(list(embeds))
    out = []
    for t in run.targets():
        score = _naive.probability(logits[t - 1], run.sequence[t])
        out.append(torch.autograd.grad(score, leaf, retain_graph=True)[0])
    return out


def naive(model, arch, method, layers, steps=6, source=SOURCE, target=TARGET) -> np.ndarray:
    """``[target, source, layer, hidden]``: saliency, input x gradient or IG (zero baseline,
    midpoint rule) at each layer, NaN for the future."""
    run = _naive.Runner(model, *_naive.token_ids(model, source, target))
    x = run.embeddings()
    per_layer = []
    for layer in layers:
        h = stream(run, model, arch, layer, x)
        if method == "integrated_gradients":
            zero = [torch.zeros_like(x[0]), *x[1:]]
            h0 = stream(run, model, arch, layer, zero)
            totals = 0
            for i in range(steps):
                a = (i + 0.5) / steps
                grads = layer_gradients(run, model, arch, layer, x, h0 + a * (h - h0))
                totals = totals + torch.stack(grads) / steps
            per_layer.append(totals * (h - h0))
        else:
            grads = torch.stack(layer_gradients(run, model, arch, layer, x, h))
            per_layer.append(grads * h if method == "input_x_gradient" else grads)
    out = torch.stack(per_layer, dim=2).numpy().copy()  # [K, L, layers, H]
    if not model.is_encoder_decoder:
        for k, t in enumerate(run.targets()):
            out[k, t:] = np.nan
    return out


def close(got, want: np.ndarray, tol: float = 1e-9) -> None:
    got = np.asarray(got)
    assert got.shape == want.shape
    assert np.array_equal(np.isnan(got), np.isnan(want))
    finite = ~np.isnan(want)
    scale = np.abs(want[finite]).max()
    assert scale > 0
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-7, atol=tol * scale)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "marian", "t5"])
@pytest.mark.parametrize("method", ["saliency", "input_x_gradient"])
def test_gradient_at_every_layer_equals_naive_loop(double, arch, method):
    model = double[arch]
    da = getattr(ax, method)(model, SOURCE, TARGET, layers="all")
    assert da.dims == ("target", "source", "layer", "hidden")
    assert da["layer"].values.tolist() == [0, 1, 2]
    close(da.values, naive(model, arch, method, [0, 1, 2]))


@pytest.mark.parametrize("arch", ["gpt2", "marian"])
def test_layer_integrated_gradients_equal_naive_loop(double, arch):
    model = double[arch]
    da = ax.integrated_gradients(
        model, SOURCE, TARGET, layers=[2, 0], steps=6, quadrature="riemann_middle"
    )
    assert da["layer"].values.tolist() == [2, 0]
    close(da.values, naive(model, arch, "integrated_gradients", [2, 0]))
    assert da["completeness_gap"].dims == ("target", "layer")


def test_layer_integrated_gradients_are_complete(double):
    """Each layer's attributions add up to f(x) - f(x'): layer l's path starts at h_l(x')."""
    model = double["gpt2"]
    da = ax.integrated_gradients(model, SOURCE, TARGET, layers="all", steps=128, objective="logit")
    run = _naive.Runner(model, *_naive.token_ids(model, SOURCE, TARGET))
    x = run.embeddings()
    zero = [torch.zeros_like(x[0])]
    for k, t in enumerate(run.targets()):
        change = run.score(t, x, _naive.logit) - run.score(t, zero, _naive.logit)
        assert abs(change) > 0.01
        sums = da.isel(target=k).sum(("source", "hidden")).values
        np.testing.assert_allclose(sums, change, atol=1e-8)
        np.testing.assert_allclose(
            da["completeness_gap"].isel(target=k).values, sums - change, atol=1e-12
        )


def test_hook_layers_are_hugging_face_hidden_states(double):
    """Layers 0..L-1 are ``output_hidden_states``' entries; L is the last block's output, which
    Hugging Face's last entry shows after the final norm (``ln_f``)."""
    model = double["gpt2"]
    run = _naive.Runner(model, *_naive.token_ids(model, SOURCE, TARGET))
    x = run.embeddings()
    with torch.no_grad():
        states = model.hf(input_ids=run.ids, output_hidden_states=True).hidden_states
    for layer in (0, 1):
        torch.testing.assert_close(stream(run, model, "gpt2", layer, x), states[layer][0])
    last = stream(run, model, "gpt2", 2, x)
    torch.testing.assert_close(model.hf.transformer.ln_f(last), states[2][0])


@pytest.mark.parametrize("method", ["smoothgrad", "gradient_shap", "guided_backprop", "vargrad"])
def test_layer_zero_of_llama_is_the_embeddings(double, method):
    """Llama's layer 0 is its token embeddings: every method reads the same there."""
    model = double["llama"]
    kw = {} if method == "guided_backprop" else {"samples": 3}
    at_zero = getattr(ax, method)(model, SOURCE, TARGET, layers=0, **kw)
    plain = getattr(ax, method)(model, SOURCE, TARGET, **kw)
    close(at_zero.isel(layer=0).values, plain.values, tol=1e-12)


def test_layer_zero_of_gpt2_adds_positions(double):
    """GPT-2's layer 0 is token + position embeddings: the same gradient and the same IG path
    difference, but input x gradient multiplies by h_0 = x + p."""
    model = double["gpt2"]
    for method in ("saliency", "integrated_gradients"):
        at_zero = getattr(ax, method)(model, SOURCE, TARGET, layers=0)
        close(at_zero.isel(layer=0).values, getattr(ax, method)(model, SOURCE, TARGET).values)
    grads = ax.saliency(model, SOURCE, TARGET)
    at_zero = ax.input_x_gradient(model, SOURCE, TARGET, layers=0).isel(layer=0)
    run = _naive.Runner(model, *_naive.token_ids(model, SOURCE, TARGET))
    positions = model.hf.transformer.wpe.weight[: run.ids.shape[1]]
    h0 = (run.embeddings()[0][0] + positions).detach().numpy()
    close(at_zero.values, grads.values * h0[None])
    assert not np.allclose(at_zero.fillna(0), ax.input_x_gradient(model, SOURCE, TARGET).fillna(0))


def test_smoothgrad_at_a_layer_reads_noise_on_the_embeddings(double):
    """SmoothGrad at layer l: the noisy copies are of the embeddings, the gradient is read at
    layer l; at the last layer against the naive loop with attrax's documented draws."""
    model = double["gpt2"]
    samples, noise, seed = 3, 0.1, 0
    da = ax.smoothgrad(model, SOURCE, TARGET, layers=-1, samples=samples, noise=noise, seed=seed)
    assert da["layer"].values.tolist() == [2]
    run = _naive.Runner(model, *_naive.token_ids(model, SOURCE, TARGET))
    x = run.embeddings()[0]
    gen = torch.Generator().manual_seed(seed)
    # drawn in float32, then cast (the documented draws, whatever the model's dtype)
    draws = torch.randn((samples, *x.shape[1:]), generator=gen).to(x.dtype)
    spread = x.max() - x.min()
    total = 0
    for i in range(samples):
        noisy = [x + noise * spread * draws[i][None]]
        h = stream(run, model, "gpt2", 2, noisy)
        total = total + torch.stack(layer_gradients(run, model, "gpt2", 2, noisy, h)) / samples
    want = total.numpy().copy()
    for k, t in enumerate(run.targets()):
        want[k, t:] = np.nan
    close(da.isel(layer=0).values, want)


def test_batched_equals_single(double):
    model = double["gpt2"]
    pairs = [(SOURCE, TARGET), ("Hello", " world, café")]
    for method in (ax.input_x_gradient, ax.integrated_gradients, ax.gradient_shap):
        kw = {"steps": 4} if method is ax.integrated_gradients else {}
        kw = {"samples": 3} if method is ax.gradient_shap else kw
        batched = method(model, [p[0] for p in pairs], [p[1] for p in pairs], layers=[1, -1], **kw)
        for b, (source, target) in enumerate(pairs):
            single = method(model, source, target, layers=[1, -1], **kw)
            got = batched.isel(example=b).sel(target=single["target"], source=single["source"])
            close(got.values, single.values, tol=1e-12)


def test_chunked_targets_equal_one_chunk(double):
    """Decoder-only chunks cut the sequence after their last target: the probes are cut too."""
    model = double["gpt2"]
    whole = ax.input_x_gradient(model, SOURCE, " Paris and Rome", layers="all", chunk_size=None)
    chunked = ax.input_x_gradient(model, SOURCE, " Paris and Rome", layers="all", chunk_size=1)
    close(chunked.values, whole.values, tol=1e-12)
    ig = ax.integrated_gradients(model, SOURCE, " Paris and", layers=[0, 2], steps=4, batch_size=1)
    ig_whole = ax.integrated_gradients(model, SOURCE, " Paris and", layers=[0, 2], steps=4)
    close(ig.values, ig_whole.values, tol=1e-12)


def test_classifier_layers_equal_naive_loop():
    hf, tok = tiny_classifier("bert")
    model = ax.load_model(hf.double(), tokenizer=tok)
    text = "a fine film"
    da = ax.input_x_gradient(model, text, layers=[0, 2])
    enc = tok(text, return_tensors="pt")
    want = []
    for layer in (0, 2):
        kept = []
        with torch.no_grad(), at_layer(model, "bert", layer, lambda h, k=kept: k.append(h) or h):
            hf(**enc)
        leaf = kept[0].clone().requires_grad_(True)
        with at_layer(model, "bert", layer, lambda h, v=leaf: v):
            logits = hf(**enc).logits[0]
        cls = int(da["target_class"].values[0])
        score = torch.softmax(logits, -1)[cls]
        want.append((torch.autograd.grad(score, leaf)[0] * leaf)[0].detach())
    expected = torch.stack(want, dim=1).numpy()  # [L, layers, H]
    close(da.isel(target=0).values, expected)


def test_reductions_and_save_load(double, tmp_path):
    model = double["gpt2"]
    full = ax.integrated_gradients(model, SOURCE, TARGET, layers="all", steps=4)
    piped = ax.pipe(ax.integrated_gradients, ax.l2_norm)(
        model, SOURCE, TARGET, layers="all", steps=4
    )
    assert piped.dims == ("target", "source", "layer")
    close(piped.values, np.sqrt((full**2).sum("hidden", skipna=False)).values, tol=1e-12)
    summed = ax.input_x_gradient(model, SOURCE, TARGET, layers=[1], reduce_hidden="sum")
    plain = ax.input_x_gradient(model, SOURCE, TARGET, layers=[1])
    close(summed.values, plain.sum("hidden", skipna=False).values)
    path = tmp_path / "layers.nc"
    ax.save(full, path)
    back = ax.load(path)
    close(back.values, full.values, tol=0)
    assert back["layer"].values.tolist() == [0, 1, 2]
    assert back["completeness_gap"].dims == ("target", "layer")
    assert json.loads(back.attrs["options"])["layers"] == "all"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"layers": 3}, "layer 3 is out of range; this model has layers 0..2"),
        ({"layers": -4}, "layer -4 is out of range"),
        ({"layers": [1, -2]}, "names a layer twice"),
        (
            {"layers": "first"},
            "`layers` must be None, an int, a non-empty list of ints, a slice or 'all'",
        ),
        (
            {"layers": slice(5, 9)},
            "`layers=slice(5, 9, None)` selects nothing; this model has layers 0..2",
        ),
        ({"layers": []}, "`layers` must be"),
        ({"layers": True}, "`layers` must be"),
        ({"layers": 1, "mode": "forward"}, "mode='reverse'"),
    ],
)
def test_bad_layers_are_refused(double, options, message):
    with pytest.raises(ax.OptionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ax.saliency(double["gpt2"], SOURCE, TARGET, **options)


def test_layers_as_a_slice_or_numpy_ints(double):
    """A slice over the layers 0..L (as the attention methods' `layers` take), and numpy ints
    (np.argmax's), give what the list of their ints gives; so do the attention methods' numpy
    ints (a bare one was refused until 2026-12-05)."""
    model = double["gpt2"]
    want = ax.lrp(model, SOURCE, TARGET, layers=[1, 2])
    for given in (slice(1, None), slice(-2, None), [np.int64(1), np.int64(2)]):
        got = ax.lrp(model, SOURCE, TARGET, layers=given)
        xr.testing.assert_identical(got.drop_attrs(), want.drop_attrs())
    last = ax.alti(model, SOURCE, TARGET, aggregate=False, layers=[1])
    got = ax.alti(model, SOURCE, TARGET, aggregate=False, layers=np.int64(1))
    xr.testing.assert_identical(got.drop_attrs(), last.drop_attrs())


def test_methods_without_a_layer_variant_refuse(double):
    model = double["gpt2"]
    for method in (
        ax.sequential_integrated_gradients,
        ax.discretized_integrated_gradients,
        ax.guided_integrated_gradients,
    ):
        with pytest.raises(ax.OptionError, match="does not take `layers`"):
            method(model, SOURCE, TARGET, layers=1)
    with pytest.raises(ax.OptionError, match="attribute_target"):
        ax.saliency(double["marian"], SOURCE, TARGET, layers=1, attribute_target=True)


def test_cli_and_dataset_take_layers(tmp_path, write_jsonl, default_model):
    from attrax.cli import main

    out = tmp_path / "a.nc"
    code = main(
        [
            "attribute",
            "--method",
            "input_x_gradient",
            "--input",
            "1 2 3 =",
            "--target",
            " 3 2 1",
            "--option",
            "layers=[0, -1]",
            "--reduce",
            "l2_norm",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    da = ax.load(out)
    assert da.dims == ("target", "source", "layer")
    data = write_jsonl(
        [{"input": "1 2 3 =", "target": " 3 2 1"}, {"input": "4 5 =", "target": " 5 4"}]
    )
    ax.attribute_dataset(
        default_model, data, tmp_path / "runs", layers="all", reduce="l2_norm", progress=False
    )
    back = ax.load_dataset_results(tmp_path / "runs")
    assert back.dims == ("example", "target", "source", "layer")
    assert back.sizes["example"] == 2
    # out of range: refused before the run starts (nothing written), by Model and by path
    for model in (default_model, None):
        with pytest.raises(ax.OptionError, match="layer 9 is out of range"):
            ax.attribute_dataset(model, data, tmp_path / "bad", layers=[0, 9], progress=False)
        assert not (tmp_path / "bad").exists()


def test_gradient_shap_at_a_layer_equals_naive_loop(double):
    """Captum's LayerGradientShap: the gradient at layer l at points b + a (x - b) of the
    embeddings, times h_l(x) - h_l(b); one zero baseline, no noise, attrax's documented draws."""
    model = double["gpt2"]
    samples, seed = 3, 5
    da = ax.gradient_shap(
        model, SOURCE, TARGET, layers=[1, 2], baselines="zeros", samples=samples, seed=seed
    )
    run = _naive.Runner(model, *_naive.token_ids(model, SOURCE, TARGET))
    x = run.embeddings()[0]
    gen = torch.Generator().manual_seed(seed)
    torch.randint(1, (samples,), generator=gen)  # the baseline drawn (there is one)
    alphas = torch.rand(samples, generator=gen).to(x.dtype)
    per_layer = []
    for layer in (1, 2):
        total = 0
        for a in alphas:
            point = [a * x]
            h = stream(run, model, "gpt2", layer, point)
            grads = torch.stack(layer_gradients(run, model, "gpt2", layer, point, h))
            total = total + grads / samples
        ends = stream(run, model, "gpt2", layer, [x]) - stream(run, model, "gpt2", layer, [0 * x])
        per_layer.append(total * ends)
    want = torch.stack(per_layer, dim=2).numpy().copy()
    for k, t in enumerate(run.targets()):
        want[k, t:] = np.nan
    close(da.values, want)


def test_decoder_only_classifier_layer_zero_is_the_embeddings_gradient():
    """A GPT-2 sequence classifier pools its last token; layer 0 = token + position embeddings,
    so its gradient is the embeddings' gradient; numpy ints are layers too."""
    hf, tok = tiny_classifier("gpt2")
    model = ax.load_model(hf.double(), tokenizer=tok)
    texts = ["a fine film", "not good at all"]
    da = ax.saliency(model, texts, layers=[np.int64(0), -1])
    assert da.dims == ("example", "target", "source", "layer", "hidden")
    assert da["layer"].values.tolist() == [0, 2]
    close(da.isel(layer=0).values, ax.saliency(model, texts).values, tol=1e-12)


def naive_conductance(model, arch, layers, nodes, source=SOURCE, target=TARGET) -> np.ndarray:
    """``[target, source, layer, hidden]``: Dhamdhere et al.'s conductance as Captum computes it,
    one backward per target, node and layer: the gradient at layer ``l`` at node ``a_k`` of the
    path ``a x`` (zero baseline) times ``h_l(a_{k+1} x) - h_l(a_k x)``."""
    run = _naive.Runner(model, *_naive.token_ids(model, source, target))
    x = run.embeddings()
    per_layer = []
    for layer in layers:
        total = 0
        for a, b in itertools.pairwise(nodes):
            here = [a * x[0], *x[1:]]
            h = stream(run, model, arch, layer, here)
            grads = torch.stack(layer_gradients(run, model, arch, layer, here, h))
            total = total + grads * (stream(run, model, arch, layer, [b * x[0], *x[1:]]) - h)
        per_layer.append(total)
    out = torch.stack(per_layer, dim=2).numpy().copy()
    if not model.is_encoder_decoder:
        for k, t in enumerate(run.targets()):
            out[k, t:] = np.nan
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama", "marian"])
def test_conductance_equals_naive_loop(double, arch):
    """Nodes 0, 1/5, ..., 1 written here (riemann_trapezoid's six); layers out of order."""
    model = double[arch]
    da = ax.conductance(
        model, SOURCE, TARGET, layers=[2, 0, 1], steps=5, quadrature="riemann_trapezoid"
    )
    assert da.dims == ("target", "source", "layer", "hidden")
    assert da["layer"].values.tolist() == [2, 0, 1]
    close(da.values, naive_conductance(model, arch, [2, 0, 1], [i / 5 for i in range(6)]))


def test_conductance_takes_captums_gauss_legendre_nodes(double):
    """Captum's default: the ``steps + 1`` Gauss-Legendre nodes on [0, 1] (its
    ``alphas_func(n_steps + 1)``), computed here from the Legendre polynomial's roots."""
    model = double["gpt2"]
    steps = 4
    roots = np.sort(np.polynomial.Legendre.basis(steps + 1).roots())
    nodes = [(r + 1) / 2 for r in roots]
    da = ax.conductance(model, SOURCE, TARGET, layers=[1], steps=steps, batch_size=2)
    close(da.values, naive_conductance(model, "gpt2", [1], nodes))


def test_conductance_is_complete_as_the_nodes_fill_the_path(double):
    """Each layer's row sums to f(x) - f(x') up to the Riemann-Stieltjes sum's error, which
    falls as 1/steps; the gap coordinate is that sum minus the change the test computes."""
    model = double["gpt2"]
    run = _naive.Runner(model, *_naive.token_ids(model, SOURCE, TARGET))
    x = run.embeddings()
    zero = [torch.zeros_like(x[0])]
    change = np.array(
        [run.score(t, x, _naive.logit) - run.score(t, zero, _naive.logit) for t in run.targets()]
    )
    assert np.abs(change).min() > 0.01
    worst = []
    for steps in (128, 512):
        da = ax.conductance(
            model, SOURCE, TARGET, layers="all", steps=steps, quadrature="riemann_trapezoid",
            objective="logit",
        )  # fmt: skip
        sums = da.sum(("source", "hidden")).values  # [target, layer]
        np.testing.assert_allclose(
            da["completeness_gap"].values, sums - change[:, None], atol=1e-10
        )
        worst.append(np.abs(sums - change[:, None]).max())
    # the units' shares cancel: the error is small against their size, not against the change
    assert worst[1] < 1e-3 * float(abs(da).sum(("source", "hidden")).max())
    assert 2.5 < worst[0] / worst[1] < 6  # first order: a quarter of the error at 4x the steps


def test_conductance_at_the_embeddings_is_integrated_gradients_on_its_nodes(double):
    """Without ``layers``: (x - x') times the gradients at a_0..a_{n-1} weighted by a_{k+1} - a_k,
    integrated gradients whose nodes and weights are conductance's (the test's own loop); the
    same at layer 0 (GPT-2's adds positions, which the path does not move) and in forward mode."""
    model = double["gpt2"]  # Llama's RMSNorm has a huge gradient at the zero node
    steps = 4
    da = ax.conductance(model, SOURCE, TARGET, steps=steps, quadrature="riemann_trapezoid")
    run = _naive.Runner(model, *_naive.token_ids(model, SOURCE, TARGET))
    x = run.embeddings()[0]
    total = 0
    for k in range(steps):
        grads = run.gradients([k / steps * x], _naive.probability, None)
        total = total + torch.stack([g[0] for g in grads]) / steps
    want = (total * x).numpy().copy()
    for k, t in enumerate(run.targets()):
        want[k, t:] = np.nan
    close(da.values, want)
    at_zero = ax.conductance(
        model, SOURCE, TARGET, steps=steps, quadrature="riemann_trapezoid", layers=0
    )
    close(at_zero.isel(layer=0).values, da.values, tol=1e-12)
    forward = ax.conductance(
        model, SOURCE, TARGET, steps=steps, quadrature="riemann_trapezoid", mode="forward",
        reduce_hidden="sum",
    )  # fmt: skip
    close(forward.values, da.sum("hidden", skipna=False).values, tol=1e-12)


def test_conductance_batched_and_chunked_equal_single(double):
    model = double["gpt2"]
    pairs = [(SOURCE, TARGET), ("Hello", " world, café")]
    kw = {"layers": [1, -1], "steps": 3}
    batched = ax.conductance(model, [p[0] for p in pairs], [p[1] for p in pairs], **kw)
    for b, (source, target) in enumerate(pairs):
        single = ax.conductance(model, source, target, **kw)
        got = batched.isel(example=b).sel(target=single["target"], source=single["source"])
        close(got.values, single.values, tol=1e-12)
        close(got["completeness_gap"].values, single["completeness_gap"].values, tol=1e-12)
    one = ax.conductance(model, SOURCE, " Paris and", batch_size=1, chunk_size=1, **kw)
    whole = ax.conductance(model, SOURCE, " Paris and", batch_size=None, chunk_size=None, **kw)
    close(one.values, whole.values, tol=1e-12)


def test_conductance_on_a_classifier_equals_naive_loop():
    hf, tok = tiny_classifier("bert")
    model = ax.load_model(hf.double(), tokenizer=tok)
    text, steps = "a fine film", 3
    da = ax.conductance(model, text, layers=[1, 2], steps=steps, quadrature="riemann_trapezoid")
    enc = tok(text, return_tensors="pt")
    cls = int(da["target_class"].values[0])
    embed = hf.get_input_embeddings()
    x = embed(enc["input_ids"]).detach()

    def run(scale, layer, value=None):
        """h_layer, and with ``value`` in its place the class probability's gradient there."""
        kept = []
        if value is None:
            with torch.no_grad(), at_layer(model, "bert", layer, lambda h: kept.append(h) or h):
                hf(inputs_embeds=scale * x, attention_mask=enc["attention_mask"])
            return kept[0]
        with at_layer(model, "bert", layer, lambda h: value):
            logits = hf(inputs_embeds=scale * x, attention_mask=enc["attention_mask"]).logits
        return torch.autograd.grad(torch.softmax(logits[0], -1)[cls], value)[0]

    want = []
    for layer in (1, 2):
        total = 0
        for k in range(steps):
            h = run(k / steps, layer)
            grad = run(k / steps, layer, h.clone().requires_grad_(True))
            total = total + grad * (run((k + 1) / steps, layer) - h)
        want.append(total[0])
    close(da.isel(target=0).values, torch.stack(want, dim=1).numpy())


def test_conductance_refuses_more_gauss_legendre_nodes_than_it_computes(double):
    with pytest.raises(ax.OptionError, match="needs 1001 Gauss-Legendre nodes"):
        ax.conductance(double["gpt2"], SOURCE, TARGET, steps=1000)


@pytest.mark.parametrize("arch", ["gpt2", "marian"])
def test_internal_influence_equals_naive_loop(double, arch):
    """Captum's InternalInfluence: the gradient at layer l averaged over path points a x (zero
    baseline), with the test's own midpoint nodes; one backward per target, point and layer."""
    model = double[arch]
    steps = 4
    da = ax.internal_influence(
        model, SOURCE, TARGET, layers=[2, 0], steps=steps, quadrature="riemann_middle"
    )
    assert da.dims == ("target", "source", "layer", "hidden")
    run = _naive.Runner(model, *_naive.token_ids(model, SOURCE, TARGET))
    x = run.embeddings()
    per_layer = []
    for layer in (2, 0):
        total = 0
        for k in range(steps):
            point = [(k + 0.5) / steps * x[0], *x[1:]]
            h = stream(run, model, arch, layer, point)
            total = total + torch.stack(layer_gradients(run, model, arch, layer, point, h)) / steps
        per_layer.append(total)
    want = torch.stack(per_layer, dim=2).numpy().copy()
    if not model.is_encoder_decoder:
        for k, t in enumerate(run.targets()):
            want[k, t:] = np.nan
    close(da.values, want)


def test_internal_influence_at_the_embeddings_times_the_path_is_integrated_gradients(double):
    """IG is internal influence at the embeddings times ``x - x'`` (the same nodes)."""
    model = double["gpt2"]
    run = _naive.Runner(model, *_naive.token_ids(model, SOURCE, TARGET))
    x = run.embeddings()[0]
    base = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    kw = {"steps": 5, "baseline": base}
    influence = ax.internal_influence(model, SOURCE, TARGET, **kw)
    ig = ax.integrated_gradients(model, SOURCE, TARGET, **kw)
    close((influence * (x - base)[0].detach().numpy()).values, ig.values, tol=1e-12)


def test_bidirectional_layers_chunked_equal_one_chunk(double):
    """A bidirectional model's targets share one forward; ``chunk_size`` groups their backwards,
    each group summed before the next (until 2026-12-06 every target's gradients at every layer
    were held at once, over ``max_memory`` on a 20-class classifier): the same sums."""
    kw = {"layers": "all", "steps": 3}
    whole = ax.internal_influence(
        double["marian"], SOURCE, " Paris and Rome", chunk_size=None, **kw
    )
    grouped = ax.internal_influence(double["marian"], SOURCE, " Paris and Rome", chunk_size=2, **kw)
    assert whole.sizes["target"] > 2
    close(grouped.values, whole.values, tol=1e-12)
    hf, tok = tiny_classifier("bert")
    model = ax.load_model(hf.double(), tokenizer=tok)
    whole = ax.conductance(model, "a fine film", targets="all", chunk_size=None, **kw)
    single = ax.conductance(model, "a fine film", targets="all", chunk_size=1, **kw)
    assert whole.sizes["target"] > 1
    close(single.values, whole.values, tol=1e-12)
    close(single.completeness_gap.values, whole.completeness_gap.values, tol=1e-12)
