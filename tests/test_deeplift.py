"""DeepLIFT (Rescale) and DeepLiftSHAP against plain per-target loops with hooks written here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import attrax as ax
from attrax import _deeplift
from attrax.cli import main
from attrax.testing import tiny_classifier, tiny_model
from tests import _naive
from tests.conftest import PAIRS, assert_close
from tests.test_architectures import _family

# the elementwise activation modules of the tiny models, named here (not read from attrax)
EVERY = (
    "ReLU",
    "GELU",
    "SiLU",
    "Tanh",
    "Sigmoid",
    "NewGELUActivation",
    "GELUActivation",
    "SiLUActivation",
    "GELUTanh",
    "PytorchGELUTanh",
    "FastGELUActivation",
    "ReLUSquaredActivation",
)
CAPTUM = ("ReLU", "Tanh", "Sigmoid")  # what Captum's DeepLift hooks among them
EPS = 1e-10


def _rescaled(hf, names, reference_forward, attributed_forward):
    """Run ``reference_forward()`` recording each named module's input, then return
    ``attributed_forward()`` run with backward hooks passing ``dy * (f(u) - f(u0)) / (u - u0)``."""
    modules = [m for m in hf.modules() if type(m).__name__ in names]
    seen: dict[int, list[torch.Tensor]] = {id(m): [] for m in modules}
    handles = [
        m.register_forward_pre_hook(lambda m, a: seen[id(m)].append(a[0].detach())) for m in modules
    ]
    try:
        with torch.no_grad():
            reference_forward()
    finally:
        for h in handles:
            h.remove()
    references = {key: list(value) for key, value in seen.items()}
    calls = {id(m): 0 for m in modules}

    def pre(m, args):
        u = args[0]
        u0 = references[id(m)][calls[id(m)]]
        calls[id(m)] += 1
        with torch.no_grad():
            delta = u - u0
            secant = (m.forward(u) - m.forward(u0)) / delta  # no hooks
        m._dl = (delta, secant)

    def backward(m, grad_input, grad_output):
        delta, secant = m._dl
        return (torch.where(delta.abs() < EPS, grad_input[0], grad_output[0] * secant),)

    handles = [m.register_forward_pre_hook(pre) for m in modules]
    handles += [m.register_full_backward_hook(backward) for m in modules]
    try:
        return attributed_forward()
    finally:
        for h in handles:
            h.remove()


def naive_deeplift(
    model, source, target, baseline="zeros", names=EVERY, attribute_target=False
) -> np.ndarray:
    """``[target, source, hidden]``: ``(x - x0) * g`` per target, one backward each; future NaN."""
    source_ids, target_ids = _naive.token_ids(model, source, target)
    run = _naive.Runner(model, source_ids, target_ids)
    x = run.embeddings()
    if isinstance(baseline, torch.Tensor):
        x0 = baseline.to(x[0].dtype).expand_as(x[0])
    elif baseline == "zeros":
        x0 = torch.zeros_like(x[0])
    else:  # the pad token's embedding everywhere
        pad = model.hf.get_input_embeddings()(torch.tensor([[model.pad_token_id]])).detach()
        x0 = pad.expand_as(x[0])
    reference = [x0, *x[1:]]  # an encoder-decoder keeps its decoder input...
    if attribute_target:  # ...unless it is attributed too (a zero reference)
        reference[1] = torch.zeros_like(x[1])

    def attributed():
        return run.gradients(x, _naive.probability, None)

    grads = _rescaled(model.hf, names, lambda: run.logits(reference), attributed)
    sides = 2 if attribute_target else 1
    rows = []
    for t, g in zip(run.targets(), grads, strict=True):
        parts = [(x[i][0] - reference[i][0]) * g[i] for i in range(sides)]
        row = torch.cat(parts).numpy().astype(np.float64)
        _naive.future_to_nan(row, model, t, len(source_ids), attribute_target)
        rows.append(row)
    return np.stack(rows)


@pytest.fixture(scope="module")
def double_models():
    built = {}
    for arch in ("gpt2", "llama", "marian", "bart"):
        hf, tok = tiny_model(arch)
        built[arch] = ax.load_model(hf.double(), tokenizer=tok)
    hf, tok = tiny_model("gpt2", activation_function="relu")
    built["gpt2-relu"] = ax.load_model(hf.double(), tokenizer=tok)
    hf, tok = tiny_model("gpt2", activation_function="relu2")  # Arcee's, Nemotron's relu(x)**2
    built["gpt2-relu2"] = ax.load_model(hf.double(), tokenizer=tok)
    return built


# --------------------------------------------------------------------------------------------------
# the rule itself: exact summation-to-delta where it covers every nonlinearity
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kinds",
    [
        ("relu", "relu"),
        ("tanh", "gelu"),
        ("sigmoid", "silu"),
        ("gelu_tanh", "tanh"),
        ("relu2", "silu"),
    ],
)
def test_rescale_rule_sums_to_delta_on_an_mlp(kinds):
    # an MLP: linear -> act -> linear -> act -> linear; every nonlinearity is rescaled, so the
    # attributions of every output add up to f(x) - f(x0) exactly (vmapped over outputs)
    g = torch.Generator().manual_seed(0)
    w1, w2, w3 = (
        torch.randn(s, generator=g, dtype=torch.float64) for s in ((7, 5), (6, 7), (4, 6))
    )
    b1, b2 = (torch.randn(s, generator=g, dtype=torch.float64) for s in (7, 6))
    x, x0 = torch.randn(5, generator=g, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)

    def f(v, references=None):
        u1 = w1 @ v + b1
        h1 = _deeplift.activation_value(u1, kinds[0])
        if references is not None:
            h1 = _deeplift._Rescale.apply(u1, references[0], kinds[0])[0]
        u2 = w2 @ h1 + b2
        h2 = _deeplift.activation_value(u2, kinds[1])
        if references is not None:
            h2 = _deeplift._Rescale.apply(u2, references[1], kinds[1])[0]
        return w3 @ h2, (u1, u2)

    _, refs = f(x0)
    out, pullback = torch.func.vjp(lambda v: f(v, refs)[0], x)
    (grads,) = torch.vmap(pullback)(torch.eye(4, dtype=torch.float64))
    attributions = (x - x0) * grads
    np.testing.assert_allclose(attributions.sum(-1), out - f(x0)[0], rtol=1e-12, atol=1e-12)
    # forward mode is the same linear map
    jac = torch.func.jacfwd(lambda v: f(v, refs)[0])(x)
    np.testing.assert_allclose(jac, grads, rtol=1e-12, atol=1e-12)
    # and it is not the gradient
    plain = torch.func.jacrev(lambda v: f(v)[0])(x)
    assert not torch.allclose(plain, grads)


@pytest.mark.parametrize("kind", ["tanh", "sigmoid"])
def test_tanh_and_sigmoid_kinds_match_autograd(kind):
    from attrax import _model

    fn = {"tanh": torch.tanh, "sigmoid": torch.sigmoid}[kind]
    x = torch.linspace(-6, 6, 101, dtype=torch.float64).requires_grad_(True)
    y, d = _model.activation_value_and_derivative(x.detach(), kind)
    (want,) = torch.autograd.grad(fn(x).sum(), x)
    np.testing.assert_allclose(y, fn(x).detach(), rtol=1e-14)
    np.testing.assert_allclose(d, want, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------------------------------
# against the hooked loop
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama", "marian", "bart", "gpt2-relu", "gpt2-relu2"])
def test_deeplift_equals_hooked_loop(double_models, arch):
    model = double_models[arch]
    source, target = PAIRS[0]
    got = ax.deeplift(model, source, target)
    assert got.dims == ("target", "source", "hidden")
    want = naive_deeplift(model, source, target)
    assert_close(got.values, want)
    # the rule changes something: it is not input x gradient
    plain = ax.input_x_gradient(model, source, target).values
    assert not np.allclose(got.values[~np.isnan(want)], plain[~np.isnan(want)], atol=1e-8)
    # the completeness gap: the sum minus f(x) - f(x0), f from the model run here
    source_ids, target_ids = _naive.token_ids(model, source, target)
    run = _naive.Runner(model, source_ids, target_ids)
    x = run.embeddings()
    reference = [torch.zeros_like(x[0]), *x[1:]]
    delta = [
        run.score(t, x, _naive.probability) - run.score(t, reference, _naive.probability)
        for t in run.targets()
    ]
    np.testing.assert_allclose(
        got.completeness_gap.values, np.nansum(want, axis=(1, 2)) - delta, rtol=1e-6, atol=1e-12
    )


def test_pad_baseline_chunks_and_forward_mode(double_models):
    model = double_models["gpt2"]
    source, target = PAIRS[1]
    got = ax.deeplift(model, source, target, baseline="pad", chunk_size=1)  # cut sequences
    assert_close(got.values, naive_deeplift(model, source, target, baseline="pad"))
    whole = ax.deeplift(model, source, target, baseline="pad")
    assert_close(whole.values, got.values, rtol=1e-9)
    forward = ax.deeplift(
        model, source, target, baseline="pad", reduce_hidden="sum", mode="forward"
    )
    assert_close(forward.values, got.sum("hidden", skipna=False).values, rtol=1e-9)
    np.testing.assert_allclose(forward.completeness_gap, got.completeness_gap, rtol=1e-9)


def test_captum_activations_leave_gelu_alone(double_models):
    # Captum hooks nn.ReLU/Tanh/Sigmoid, not GELU: on a GELU GPT-2 its DeepLift is
    # (x - x0) * the gradient at x, i.e. input x gradient for a zero baseline
    model = double_models["gpt2"]
    got = ax.deeplift(model, *PAIRS[0], activations="captum")
    want = naive_deeplift(model, *PAIRS[0], names=CAPTUM)
    assert_close(got.values, want)
    assert_close(got.values, ax.input_x_gradient(model, *PAIRS[0]).values, rtol=1e-9)
    relu = double_models["gpt2-relu"]  # a ReLU model: both settings mean the same
    assert_close(
        ax.deeplift(relu, *PAIRS[0], activations="captum").values,
        ax.deeplift(relu, *PAIRS[0]).values,
        rtol=1e-12,
    )


# --------------------------------------------------------------------------------------------------
# DeepLiftSHAP
# --------------------------------------------------------------------------------------------------
def test_deeplift_shap_is_the_mean_over_baselines(double_models):
    model = double_models["gpt2"]
    source, target = PAIRS[0]
    noise = torch.randn(1, 1, model.hf.config.n_embd, generator=torch.Generator().manual_seed(1))
    baselines = ["zeros", "pad", noise.double()]
    got = ax.deeplift_shap(model, source, target, baselines=baselines)
    wants = [naive_deeplift(model, source, target, baseline=b) for b in ("zeros", "pad", noise)]
    assert_close(got.values, np.mean(wants, axis=0))
    singles = [ax.deeplift(model, source, target, baseline=b) for b in baselines]
    assert_close(got.values, np.mean([s.values for s in singles], axis=0), rtol=1e-9)
    # the gap: sum minus f(x) - mean f(b), so the mean of the single gaps
    gaps = np.mean([s.completeness_gap.values for s in singles], axis=0)
    np.testing.assert_allclose(got.completeness_gap, gaps, rtol=1e-8, atol=1e-14)
    # batch_size=1: one baseline per forward, the same sums
    one = ax.deeplift_shap(model, source, target, baselines=baselines, batch_size=1)
    assert_close(one.values, got.values, rtol=1e-9)
    np.testing.assert_allclose(one.completeness_gap, got.completeness_gap, rtol=1e-8, atol=1e-14)
    # forward mode: the baselines' points are one input expanded, which jvp's duals cannot alias
    forward = ax.deeplift_shap(
        model, source, target, baselines=baselines, reduce_hidden="sum", mode="forward"
    )
    assert_close(forward.values, got.sum("hidden", skipna=False).values, rtol=1e-9)


def _opt() -> ax.Model:
    """A tiny random OPT in float64 (ReLU), on the GPT-2 test tokenizer: its MLP runs on the rows
    and tokens flattened into one dim, ``[rows * L, H]``."""
    _, tok = tiny_model("gpt2")
    hf = _family("opt", tok, attn_implementation="eager")
    return ax.load_model(hf.double().eval(), tokenizer=tok)


def test_deeplift_shap_on_a_model_that_flattens_its_tokens():
    """Each baseline's activations are read row by row: with two baselines the early targets'
    cut sequences took the first rows of the flattened reference, the first baseline's (OPT's
    DeepLiftSHAP depended on the baselines' order, 12% off their mean)."""
    model = _opt()
    source, target = PAIRS[0]
    wants = [naive_deeplift(model, source, target, baseline=b) for b in ("zeros", "pad")]
    for baselines in (["zeros", "pad"], ["pad", "zeros"]):
        got = ax.deeplift_shap(model, source, target, baselines=baselines)
        assert_close(got.values, np.mean(wants, axis=0))
    batched = ax.deeplift_shap(model, [PAIRS[0][0], PAIRS[1][0]], [PAIRS[0][1], PAIRS[1][1]])
    single = ax.deeplift_shap(model, *PAIRS[1])
    picked = batched.isel(example=1).sel(target=single.target, source=single.source)
    assert_close(picked.values, single.values, rtol=1e-9)


def test_deeplift_shap_samples_draw_the_baselines(double_models):
    model = double_models["gpt2"]
    source, target = PAIRS[0]
    baselines = ["zeros", "pad"]
    got = ax.deeplift_shap(model, source, target, baselines=baselines, samples=5, seed=3)
    picks = torch.randint(2, (5,), generator=torch.Generator().manual_seed(3)).tolist()
    singles = {b: ax.deeplift(model, source, target, baseline=b).values for b in baselines}
    want = np.mean([singles[baselines[i]] for i in picks], axis=0)
    assert_close(got.values, want, rtol=1e-9)


@pytest.mark.parametrize("arch", ["gpt2", "bart"])
@pytest.mark.parametrize("samples", [None, 3])
def test_deeplift_shap_batched_equals_single(double_models, arch, samples):
    # Inseq dropped DeepLiftSHAP because its batched results differed from single ones
    model = double_models[arch]
    sources, targets = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    options = {"baselines": ["zeros", "pad"], "samples": samples}
    batched = ax.deeplift_shap(model, sources, targets, **options)
    for i, (source, target) in enumerate(PAIRS):
        single = ax.deeplift_shap(model, source, target, **options)
        row = batched.isel(example=i).sel(target=single.target, source=single.source)
        np.testing.assert_allclose(row.values, single.values, rtol=1e-9, atol=1e-14)
        gap = batched.completeness_gap.isel(example=i).sel(target=single.target)
        np.testing.assert_allclose(gap, single.completeness_gap, rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("arch", ["marian", "bart"])
def test_attribute_target_equals_hooked_loop(double_models, arch):
    model = double_models[arch]
    source, target = PAIRS[2]
    got = ax.deeplift(model, source, target, attribute_target=True)
    assert set(got.side.values) == {"source", "target"}
    assert_close(got.values, naive_deeplift(model, source, target, attribute_target=True))
    shap = ax.deeplift_shap(model, source, target, attribute_target=True, baselines=["zeros"])
    assert_close(shap.values, got.values, rtol=1e-9)


# --------------------------------------------------------------------------------------------------
# classifiers
# --------------------------------------------------------------------------------------------------
def naive_classifier(model, text, names=EVERY) -> np.ndarray:
    """``[class, token, hidden]`` for a sequence classifier, one backward per class."""
    ids = model.tokenizer(text, return_tensors="pt")
    hf = model.hf
    x = hf.get_input_embeddings()(ids["input_ids"]).detach()
    extra = {k: v for k, v in ids.items() if k == "token_type_ids"}

    def probabilities(embeds):
        return torch.softmax(hf(inputs_embeds=embeds, **extra).logits[0], -1)

    def attributed():
        leaf = x.clone().requires_grad_(True)
        p = probabilities(leaf)
        grads = [torch.autograd.grad(p[c], leaf, retain_graph=True)[0] for c in range(len(p))]
        return [(x * g)[0].numpy() for g in grads]

    return np.stack(_rescaled(hf, names, lambda: probabilities(torch.zeros_like(x)), attributed))


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_classifiers_equal_hooked_loop(arch):
    hf, tok = tiny_classifier(arch, hidden_act="relu") if arch == "bert" else tiny_classifier(arch)
    model = ax.load_model(hf.double(), tokenizer=tok)
    text = "the capital of france is paris"
    got = ax.deeplift(model, text, "all")
    assert_close(got.values, naive_classifier(model, text))
    if arch == "bert":  # ReLU layers and a tanh pooler: Captum's hooks cover the same
        assert_close(ax.deeplift(model, text, "all", activations="captum").values, got.values)
        shap = ax.deeplift_shap(model, [text, "hello world"], "all", baselines=["zeros", "mask"])
        single = ax.deeplift_shap(model, "hello world", "all", baselines=["zeros", "mask"])
        row = shap.isel(example=1).sel(source=single.source).values
        np.testing.assert_allclose(row, single.values, rtol=1e-9, atol=1e-14)


# --------------------------------------------------------------------------------------------------
# errors, CLI, datasets
# --------------------------------------------------------------------------------------------------
def test_bad_options_are_refused(default_model):
    run = ("1 2 =", " 2 1")
    with pytest.raises(ax.OptionError, match="`baseline`"):
        ax.deeplift(default_model, *run, baseline="nope")
    with pytest.raises(ax.OptionError, match="does not broadcast"):
        ax.deeplift(default_model, *run, baseline=torch.zeros(3, 5, 7))
    with pytest.raises(ax.OptionError, match="`baselines`"):
        ax.deeplift_shap(default_model, *run, baselines=[])
    with pytest.raises(ax.OptionError, match="`baselines`"):
        ax.deeplift_shap(default_model, *run, baselines=["zeros", 3])
    with pytest.raises(ax.OptionError, match="`samples`"):
        ax.deeplift_shap(default_model, *run, samples=0)
    with pytest.raises(ax.OptionError, match="activations"):
        ax.deeplift(default_model, *run, activations="relu")
    with pytest.raises(ax.OptionError, match="has no option 'baselines'"):
        ax.deeplift(default_model, *run, baselines=["zeros"])


def test_memory_plan_counts_the_reference_inputs(default_model):
    from attrax._protocol import Call

    call = Call("deeplift", default_model, "1 2 3 =", " 3 2 1", {})
    plain = call.problem.cost()
    counted = _deeplift._WithGap(call, lambda: None).problem.cost()
    config, x = default_model.hf.config, call.problem.inputs[0]
    layers = config.num_hidden_layers if hasattr(config, "num_hidden_layers") else config.n_layer
    width = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    width = width or 4 * x.shape[-1]
    kept = x.shape[0] * x.shape[1] * width * x.element_size() * layers
    assert counted.per_point - plain.per_point == kept
    assert counted.per_cotangent == plain.per_cotangent and counted.fixed == plain.fixed


def test_unknown_activations_are_refused():
    hf, tok = tiny_model("gpt2", activation_function="quick_gelu")
    model = ax.load_model(hf, tokenizer=tok)
    with pytest.raises(ax.ModelError, match=r"QuickGELUActivation.*activations='captum'"):
        ax.deeplift(model, *PAIRS[0])
    # Captum hooks no QuickGELU either: its DeepLift keeps the gradient there, as attrax then does
    got = ax.deeplift(model, *PAIRS[0], activations="captum")
    np.testing.assert_allclose(got.values, ax.input_x_gradient(model, *PAIRS[0]).values, rtol=1e-5)
    hf, tok = tiny_model("gpt2")
    hf.transformer.h[0].mlp.act = torch.nn.ELU()  # Captum hooks nn.ELU; attrax has no rule
    with pytest.raises(ax.ModelError, match=r"'transformer.h.0.mlp.act' \(ELU\)"):
        ax.deeplift(ax.load_model(hf, tokenizer=tok), *PAIRS[0], activations="captum")


def test_cli_and_dataset_run(tmp_path, default_model, write_jsonl):
    nc = tmp_path / "dl.nc"
    args = ["attribute", "--method", "deeplift", "--input", "3 1 4 =", "--target", " 4 1 3"]
    assert main([*args, "--reduce", "sum", "--out", str(nc)]) == 0
    da = ax.load(nc)
    assert da.attrs["method"] == "deeplift" and "completeness_gap" in da.coords
    want = ax.deeplift(default_model, "3 1 4 =", " 4 1 3", reduce_hidden="sum")
    np.testing.assert_allclose(da.values, want.values, rtol=1e-5, atol=1e-7)
    data = write_jsonl(
        [{"input": "3 1 4 =", "target": " 4 1 3"}, {"input": "5 9 =", "target": " 9 5"}]
    )
    out = tmp_path / "run"
    run = ax.attribute_dataset(
        default_model, data, out, method="deeplift_shap", progress=False, samples=2
    )
    assert run.records == 2
    loaded = ax.load_dataset_results(out)
    assert loaded.attrs["method"] == "deeplift_shap"
    assert json.loads((out / "manifest.json").read_text())["run"]["options"]["samples"] == 2


# --------------------------------------------------------------------------------------------------
# layers=: Captum's LayerDeepLift / LayerDeepLiftShap (the layer's output)
# --------------------------------------------------------------------------------------------------
def naive_layer_deeplift(model, arch, source, target, layers, baseline="zeros", names=EVERY):
    """``[target, source, layer, hidden]``: per layer and target, the rescaled gradient at the
    block's output (one hooked backward each) times ``h_l(x) - h_l(x0)``; future NaN."""
    from tests.test_layers import layer_gradients, stream

    run = _naive.Runner(model, *_naive.token_ids(model, source, target))
    x = run.embeddings()
    if baseline == "zeros":
        x0 = torch.zeros_like(x[0])
    else:  # the pad token's embedding everywhere
        pad = model.hf.get_input_embeddings()(torch.tensor([[model.pad_token_id]])).detach()
        x0 = pad.expand_as(x[0])
    reference = [x0, *x[1:]]
    blocks = arch.split("-")[0]  # gpt2-relu keeps GPT-2's blocks
    per_layer = []
    for layer in layers:
        h = stream(run, model, blocks, layer, x)
        h0 = stream(run, model, blocks, layer, reference)
        grads = _rescaled(
            model.hf,
            names,
            lambda: run.logits(reference),
            lambda h=h, layer=layer: layer_gradients(run, model, blocks, layer, x, h),
        )
        per_layer.append(torch.stack(grads) * (h - h0))
    out = torch.stack(per_layer, dim=2).numpy().copy()  # [K, L, layers, H]
    if not model.is_encoder_decoder:
        for k, t in enumerate(run.targets()):
            out[k, t:] = np.nan
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama", "marian", "gpt2-relu"])
def test_deeplift_at_layers_equals_hooked_loop(double_models, arch):
    model = double_models[arch]
    source, target = PAIRS[0]
    layers = [0, 1, -1]
    got = ax.deeplift(model, source, target, layers=layers)
    assert got.dims == ("target", "source", "layer", "hidden")
    assert got.completeness_gap.dims == ("target", "layer")
    count = int(got.layer.values[-1])
    want = naive_layer_deeplift(model, arch, source, target, [0, 1, count])
    assert_close(got.values, want)
    # the rule reaches the layers: not layer input x gradient times h_l(x) - h_l(x0)
    plain = ax.integrated_gradients(model, source, target, layers=layers, steps=1).values
    ok = ~np.isnan(want)
    assert not np.allclose(got.values[ok], plain[ok], atol=1e-8)
    # the gap per layer: the layer's sum minus f(x) - f(x0), f from the model run here
    run = _naive.Runner(model, *_naive.token_ids(model, source, target))
    x = run.embeddings()
    reference = [torch.zeros_like(x[0]), *x[1:]]
    delta = np.array(
        [
            float(run.score(t, x, _naive.probability) - run.score(t, reference, _naive.probability))
            for t in run.targets()
        ]
    )
    np.testing.assert_allclose(
        got.completeness_gap.values,
        np.nansum(want, axis=(1, 3)) - delta[:, None],
        rtol=1e-6,
        atol=1e-12,
    )
    # layer 0 with an embedding-only baseline is the embeddings' DeepLIFT (positions cancel)
    if arch in ("llama", "gpt2"):
        whole = ax.deeplift(model, source, target)
        assert_close(got.isel(layer=0).values, whole.values, rtol=1e-9)


def test_deeplift_at_layers_pad_baseline_chunks(double_models):
    model = double_models["gpt2-relu"]
    source, target = PAIRS[1]
    got = ax.deeplift(model, source, target, baseline="pad", layers=[2, 1], chunk_size=1)
    want = naive_layer_deeplift(model, "gpt2-relu", source, target, [2, 1], baseline="pad")
    assert_close(got.values, want)
    whole = ax.deeplift(model, source, target, baseline="pad", layers=[2, 1])
    assert_close(whole.values, got.values, rtol=1e-9)
    np.testing.assert_allclose(whole.completeness_gap, got.completeness_gap, rtol=1e-8)
    # the gap on a ReLU GPT-2 is not zero at a hidden layer: layer norms and attention downstream
    # keep their gradient (Captum's LayerDeepLift has the same delta)
    assert np.abs(got.completeness_gap.values).max() > 1e-6


def test_deeplift_shap_at_layers_is_the_mean_over_baselines(double_models):
    model = double_models["gpt2-relu"]
    source, target = PAIRS[0]
    noise = torch.randn(1, 1, model.hf.config.n_embd, generator=torch.Generator().manual_seed(1))
    baselines = ["zeros", "pad", noise.double()]
    got = ax.deeplift_shap(model, source, target, baselines=baselines, layers="all")
    singles = [ax.deeplift(model, source, target, baseline=b, layers="all") for b in baselines]
    assert_close(got.values, np.mean([s.values for s in singles], axis=0), rtol=1e-9)
    gaps = np.mean([s.completeness_gap.values for s in singles], axis=0)
    np.testing.assert_allclose(got.completeness_gap, gaps, rtol=1e-8, atol=1e-14)
    # one baseline per forward: the same sums
    one = ax.deeplift_shap(model, source, target, baselines=baselines, layers="all", batch_size=1)
    assert_close(one.values, got.values, rtol=1e-9)
    np.testing.assert_allclose(one.completeness_gap, got.completeness_gap, rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("arch", ["gpt2", "marian"])
def test_deeplift_at_layers_batched_equals_single(double_models, arch):
    model = double_models[arch]
    sources, targets = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    options = {"baselines": ["zeros", "pad"], "samples": 3, "layers": [1, -1]}
    batched = ax.deeplift_shap(model, sources, targets, **options)
    for i, (source, target) in enumerate(PAIRS):
        single = ax.deeplift_shap(model, source, target, **options)
        row = batched.isel(example=i).sel(target=single.target, source=single.source)
        np.testing.assert_allclose(row.values, single.values, rtol=1e-9, atol=1e-14)
        gap = batched.completeness_gap.isel(example=i).sel(target=single.target)
        np.testing.assert_allclose(gap, single.completeness_gap, rtol=1e-8, atol=1e-14)


def test_deeplift_at_the_last_layer_of_a_classifier_sums_to_delta():
    # BERT's last block output feeds only the pooler (dense, tanh) and a linear classifier: with
    # the logit as objective the Rescale rule covers every nonlinearity downstream, so the last
    # layer's attributions add up to f(x) - f(x0) exactly; earlier layers (attention and norms
    # downstream) keep a gap
    hf, tok = tiny_classifier("bert", hidden_act="relu")
    model = ax.load_model(hf.double(), tokenizer=tok)
    text = "the capital of france is paris"
    got = ax.deeplift(model, text, "all", objective="logit", layers=[1, -1])
    gap = np.abs(got.completeness_gap.values)
    scale = np.abs(got.sum(("source", "hidden")).values).max()
    assert scale > 1e-3
    assert gap[:, -1].max() < 1e-10 * max(scale, 1.0)
    assert gap[:, 0].max() > 1e-6
    # and it is the hooked gradient at that output times h_L(x) - h_L(x0)
    from tests.test_layers import at_layer

    enc = tok(text, return_tensors="pt")
    last = int(got.layer.values[-1])
    embed = hf.get_input_embeddings()

    def run(reference: bool, edit=None):
        # the zero baseline replaces the token embeddings (positions and types are added after)
        zero = embed.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
        if not reference:
            zero.remove()
        try:
            with at_layer(model, "bert", last, edit or (lambda h: h)):
                return hf(**enc).logits[0]
        finally:
            zero.remove()

    def stream_at(reference: bool) -> torch.Tensor:
        kept = []
        with torch.no_grad():
            run(reference, lambda h: kept.append(h) or h)
        return kept[0]

    h, h0 = stream_at(False), stream_at(True)

    def attributed():
        leaf = h.clone().requires_grad_(True)
        logits = run(False, lambda _h: leaf)
        return [torch.autograd.grad(v, leaf, retain_graph=True)[0] for v in logits]

    def reference_forward():
        with torch.no_grad():
            run(True)

    grads = _rescaled(hf, EVERY, reference_forward, attributed)
    want = np.stack([((h - h0) * g)[0].numpy() for g in grads])
    assert_close(got.isel(layer=-1).values, want)


def test_deeplift_layers_cli_and_dataset(tmp_path, default_model, write_jsonl):
    out = tmp_path / "dl.nc"
    args = ["attribute", "--method", "deeplift", "--input", "1 2 =", "--target", " 2 1"]
    assert main([*args, "--option", "layers=[0, 2]", "--reduce", "l2_norm", "--out", str(out)]) == 0
    da = ax.load(out)
    assert da.dims == ("target", "source", "layer")
    assert da.completeness_gap.dims == ("target", "layer")
    data = write_jsonl(
        [{"input": "3 1 4 =", "target": " 4 1 3"}, {"input": "5 9 =", "target": " 9 5"}]
    )
    out = tmp_path / "run"
    ax.attribute_dataset(
        default_model, data, out, method="deeplift_shap", layers=[0, -1], reduce="l2_norm",
        progress=False,
    )  # fmt: skip
    loaded = ax.load_dataset_results(out)
    assert "layer" in loaded.dims and loaded.attrs["method"] == "deeplift_shap"


def test_llama4s_stacked_experts_are_refused_and_its_dense_layers_run():
    """Llama 4's experts run on every token's input stacked expert by expert ``[experts, tokens,
    width]``: refused, naming them. A Llama 4 without expert layers (chunked local layers,
    weightless query and key norms, a NoPE layer) equals the hooked loop."""
    from tests.test_architectures import _family

    _, tok = tiny_model("gpt2")
    model = ax.load_model(_family("llama4", tok), tokenizer=tok)
    with pytest.raises(ax.ModelError, match=r"feed_forward.experts.*Llama4TextExperts"):
        ax.deeplift(model, *PAIRS[0])
    hf = _family("llama4", tok)
    hf.config.moe_layers = []
    torch.manual_seed(0)
    dense = ax.load_model(type(hf)(hf.config).double().eval(), tokenizer=tok)
    assert not any(type(m).__name__ == "Llama4TextMoe" for m in dense.hf.modules())
    assert_close(ax.deeplift(dense, *PAIRS[0]).values, naive_deeplift(dense, *PAIRS[0]))


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_routed_experts_are_refused(arch):
    """A mixture's experts run on the (token, expert) pairs their router picks: under
    transformers' default grouped implementation one activation call over the pairs sorted by
    expert, otherwise a call per expert. The zero baseline routes its tokens elsewhere, so the
    i-th row of the reference forward's activations is another pair's input than the input's
    i-th (the rows the Rescale rule would pair, before 2026-12-05: silently). DeepLIFT and
    DeepLiftSHAP refuse, naming the experts."""
    _, tok = tiny_model("gpt2")
    model = ax.load_model(_family(arch, tok), tokenizer=tok)
    picks = []
    router = next(m for m in model.hf.modules() if type(m).__name__.endswith("Router"))
    hook = router.register_forward_hook(lambda m, i, out: picks.append(out[-1]))
    ids = tok(PAIRS[0][0] + PAIRS[0][1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for embeds in (model.embed(ids), torch.zeros_like(model.embed(ids))):
            model.hf(inputs_embeds=embeds)
    hook.remove()
    assert not torch.equal(picks[0], picks[1])  # the pairs the two forwards' rows stand for
    for method in (ax.deeplift, ax.deeplift_shap):
        with pytest.raises(ax.ModelError, match=r"mlp\.experts.*Experts.*router picks"):
            method(model, *PAIRS[0])
