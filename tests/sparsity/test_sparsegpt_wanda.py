"""SparseGPT and Wanda: the algorithms against direct reference computations, the exact
sparsity patterns they promise, their layer error against magnitude pruning, joint
quantisation, the N:M permutation on their saliency, and bad input."""

import copy

import pytest
import torch

from slimformer import api
from slimformer.core.hessian import layer_output_error, obs_compress, prepare_hessian
from slimformer.core.permutation import permute_block_for_nm
from slimformer.core.runner import run_transforms
from slimformer.core.transform import BlockContext
from slimformer.errors import RecipeError, SparsityConfigError
from slimformer.formats.masks import is_nm, magnitude_mask, nm_mask, row_mask
from slimformer.models.adapters import adapter_for
from slimformer.models.tiny import tiny_model, tiny_tokenizer
from slimformer.nn.quant_linear import QuantLinear
from slimformer.nn.surgery import linear_weight
from slimformer.recipes import load_recipe
from slimformer.recipes.schema import parse_recipe
from slimformer.techniques.sparsity.calibrated import SparseGPT, Wanda, wanda_scores


def _layer(seed=0, n=48, k=128, tokens=2048):
    """A weight and correlated inputs with a few large channels, as real activations have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(tokens, k, generator=g) @ mix + 0.1 * torch.randn(tokens, k, generator=g)
    x[:, :3] *= 8
    return torch.randn(n, k, generator=g), x


def _prepared(x):
    return prepare_hessian(2 * x.T @ x / len(x), False, 0.01)


def _reference_sparsegpt(w, x, sparsity=0.0, n=0, m=0, block=32, damp=0.01):
    """SparseGPT written from the paper, column by column with full-width updates (no
    lazy batching), float64: H⁻¹ via its Cholesky factor; per block of columns, the
    unstructured mask from w²/[H⁻¹]²_jj of the weights as updated so far; N:M every M."""
    W = w.double().clone()
    H = 2 * x.double().T @ x.double() / len(x)
    H += damp * H.diagonal().mean() * torch.eye(len(H), dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    rows, cols = W.shape
    keep = torch.ones_like(W, dtype=torch.bool)
    for i in range(cols):
        if n == 0 and i % block == 0:
            stop = min(i + block, cols)
            sal = W[:, i:stop] ** 2 / U.diagonal()[i:stop] ** 2
            count = round(sparsity * rows * stop) - round(sparsity * rows * i)
            order = sal.flatten().argsort()[:count]
            keep[:, i:stop].reshape(-1)  # (a view check only)
            blockmask = torch.ones(sal.numel(), dtype=torch.bool)
            blockmask[order] = False
            keep[:, i:stop] = blockmask.view_as(sal)
        if n and i % m == 0:
            sal = W[:, i:i + m] ** 2 / U.diagonal()[i:i + m] ** 2
            drop = sal.argsort(dim=1)[:, :m - n]
            keep[:, i:i + m].scatter_(1, drop, False)
        new = W[:, i] * keep[:, i]
        err = (W[:, i] - new) / U[i, i]
        W[:, i:] -= err[:, None] * U[i, i:][None, :]
        W[:, i] = new
    return W.float(), keep


# --- the algorithms ------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", [dict(sparsity=0.5), dict(sparsity=0.3), dict(n=2, m=4), dict(n=1, m=4)])
def test_sparsegpt_matches_the_column_by_column_reference(pattern):
    w, x = _layer()
    ours = obs_compress(w, _prepared(x), block_size=32, **pattern)
    ref, keep = _reference_sparsegpt(w, x, block=32, **pattern)
    assert torch.equal(ours.mask, keep)
    torch.testing.assert_close(ours.weight, ref, rtol=1e-3, atol=1e-4)
    assert torch.equal(ours.weight != 0, keep)


@pytest.mark.parametrize("pattern", [dict(sparsity=0.5), dict(n=2, m=4)], ids=["50%", "2:4"])
def test_sparsegpt_layer_error_below_magnitude_and_wanda(pattern):
    for seed in range(3):
        w, x = _layer(seed)
        sgpt = obs_compress(w, _prepared(x), **pattern).weight
        scores = wanda_scores(w, x.norm(dim=0))
        if "n" in pattern:
            mag, wanda = w * nm_mask(w, 2, 4), w * nm_mask(scores, 2, 4)
        else:
            mag, wanda = w * magnitude_mask(w, 0.5), w * row_mask(scores, 0.5)
        e_sgpt, e_wanda, e_mag = (layer_output_error(w, a, x) for a in (sgpt, wanda, mag))
        assert e_sgpt < 0.95 * e_wanda and e_wanda < e_mag, (seed, e_sgpt, e_wanda, e_mag)


def test_sparsegpt_with_nothing_pruned_is_the_dense_layer():
    w, x = _layer()
    done = obs_compress(w, _prepared(x), sparsity=0.0)
    assert done.mask.all() and torch.equal(done.weight, w)


def test_unstructured_fraction_is_exact_per_layer_even_when_stacked():
    w, x = _layer(k=96)
    done = obs_compress(w, _prepared(x), sparsity=0.37, block_size=32, row_splits=[10, 38])
    for part in (slice(0, 10), slice(10, 48)):
        rows = done.mask[part]
        assert int((~rows).sum()) == round(0.37 * rows.numel())


def test_wanda_mask_is_the_brute_force_ranking_of_its_score():
    w, x = _layer(n=6, k=16, tokens=40)
    norms = torch.tensor([sum(float(x[t, j]) ** 2 for t in range(len(x))) ** 0.5 for j in range(16)])
    mask = row_mask(wanda_scores(w, x.norm(dim=0)), 0.5)
    for i in range(6):
        scores = [abs(float(w[i, j])) * float(norms[j]) for j in range(16)]
        kept = sorted(range(16), key=lambda j: -scores[j])[:8]
        assert set(torch.nonzero(mask[i]).flatten().tolist()) == set(kept)
    nm = nm_mask(wanda_scores(w, x.norm(dim=0)), 2, 4)
    for i in range(6):
        for g in range(4):
            scores = [abs(float(w[i, j])) * float(norms[j]) for j in range(4 * g, 4 * g + 4)]
            kept = {4 * g + j for j in sorted(range(4), key=lambda j: -scores[j])[:2]}
            assert set(torch.nonzero(nm[i, 4 * g:4 * g + 4]).flatten().add(4 * g).tolist()) == kept


def test_joint_quantisation_single_layer():
    from slimformer.formats.spec import WeightSpec

    w, x = _layer()
    spec = WeightSpec(4, False, "group", 32)
    done = obs_compress(w, _prepared(x), spec, n=2, m=4)
    deq = QuantLinear.from_float(w, None, spec, codes=done.codes, scale=done.scale, zero=done.zero).dequantized_weight()
    assert torch.equal(deq == 0, ~done.mask | (deq == 0)) and torch.equal(deq[~done.mask], torch.zeros(int((~done.mask).sum())))
    assert is_nm(deq, 2, 4) and int(done.codes.max()) <= 15
    torch.testing.assert_close(deq, done.weight)
    # jointly better than pruning then rounding the survivors to nearest
    from slimformer.formats.primitives import fake_quantize_weight

    pruned = obs_compress(w, _prepared(x), n=2, m=4).weight
    rtn_after = fake_quantize_weight(w * nm_mask(w, 2, 4), spec)
    assert layer_output_error(w, deq, x) < layer_output_error(w, rtn_after, x)
    assert layer_output_error(w, deq, x) < 1.3 * layer_output_error(w, pruned, x)


# --- as recipe stages ------------------------------------------------------------------------


def _calib(n=8, length=48, seed=0):
    return torch.randint(3, 300, (n, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _weights(model):
    adapter = adapter_for(model)
    out = {}
    for index, block in enumerate(adapter.get_blocks(model)):
        for name in adapter.linears:
            module = block.get_submodule(name)
            out[f"{index}.{name}"] = (linear_weight(module) if not isinstance(module, QuantLinear)
                                      else module.dequantized_weight()).detach()
    return out


STAGES = [SparseGPT(n=2, m=4), SparseGPT(sparsity=0.3), Wanda(n=2, m=4), Wanda(sparsity=0.3),
          SparseGPT(n=2, m=4, permute=True, search_rounds=20), Wanda(n=2, m=4, permute=True, search_rounds=20),
          SparseGPT(sparsity=0.3, true_sequential=False), Wanda(n=1, m=4, true_sequential=False)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("stage", STAGES, ids=repr)
def test_patterns_are_exactly_what_was_asked(family, stage):
    model = tiny_model(family)
    run_transforms(model, [stage], calib=_calib(), progress=False)
    for name, w in _weights(model).items():
        if stage.n is not None:
            assert is_nm(w, stage.n, stage.m), name
            assert int((w != 0).sum()) == w.numel() * stage.n // stage.m, name
        elif isinstance(stage, SparseGPT):
            assert int((w == 0).sum()) == round(0.3 * w.numel()), name
        else:
            assert ((w == 0).sum(1) == round(0.3 * w.shape[1])).all(), name


def test_sparsegpt_stage_with_nothing_pruned_reproduces_the_model():
    model = tiny_model("llama")
    ids = _calib(2, 32, seed=1)
    before = _logits(model, ids)
    run_transforms(model, [SparseGPT(sparsity=0.0)], calib=_calib(), progress=False)
    assert torch.equal(_logits(model, ids), before)


def test_sparsegpt_model_error_below_wanda_and_magnitude():
    """On a whole (random, 1-block) model; Wanda against magnitude needs the outlier input
    channels real activations have, tested on a layer above."""
    dense = tiny_model("llama", num_hidden_layers=1)
    ids = _calib(4, 48, seed=3)
    ref = _logits(dense, ids)
    errors = {}
    for label, stage in [("sparsegpt", SparseGPT(n=2, m=4)), ("wanda", Wanda(n=2, m=4))]:
        model = copy.deepcopy(dense)
        run_transforms(model, [stage], calib=_calib(16, 64), progress=False)
        errors[label] = float((_logits(model, ids) - ref).norm() / ref.norm())
    model = copy.deepcopy(dense)
    from slimformer.techniques.sparsity.oneshot import NMSparsity
    run_transforms(model, [NMSparsity(n=2, m=4)], progress=False)
    errors["magnitude"] = float((_logits(model, ids) - ref).norm() / ref.norm())
    assert errors["sparsegpt"] < 0.9 * min(errors["wanda"], errors["magnitude"]), errors


def test_wanda_stage_mask_is_the_reference_on_dense_inputs():
    """Two-pass (every layer scored on the full-precision block's inputs): each layer's
    mask is the brute-force ranking of |W|·‖X‖ over the inputs it received."""
    model = tiny_model("llama")
    block = model.model.layers[0]
    seen = {}
    handles = [block.get_submodule(n).register_forward_pre_hook(
        lambda _m, a, n=n: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]).clone()))
        for n in adapter_for(model).linears]
    dense = {n: linear_weight(block.get_submodule(n)).detach().clone() for n in adapter_for(model).linears}
    with torch.no_grad():
        model(input_ids=_calib())
    for h in handles:
        h.remove()
    run_transforms(model, [Wanda(sparsity=0.5, true_sequential=False)], calib=_calib(), batch_size=8, progress=False)
    for name, w in dense.items():
        x = torch.cat(seen[name])
        expected = w * row_mask(wanda_scores(w, x.norm(dim=0)), 0.5)
        assert torch.equal(linear_weight(block.get_submodule(name)), expected), name


def test_joint_sparsegpt_gives_quant_linears_with_exact_zeros():
    model = tiny_model("llama")
    stage = SparseGPT(n=2, m=4, bits=4, granularity="group", group_size=32, permute=True, search_rounds=10)
    run_transforms(model, [stage], calib=_calib(), progress=False)
    for index, block in enumerate(model.model.layers):
        for name in adapter_for(model).linears:
            module = block.get_submodule(name)
            assert isinstance(module, QuantLinear) and module.weight_spec.bits == 4
            codes = module.codes()
            assert int(codes.min()) >= 0 and int(codes.max()) <= 15
            w = module.dequantized_weight()
            assert is_nm(w, 2, 4)
            # the zeros are the zero code: symmetric codes are offset by 8
            assert torch.equal(w == 0, codes == 8)


@pytest.mark.parametrize("stage", [SparseGPT(n=2, m=4, permute=True, search_rounds=20),
                                   SparseGPT(n=2, m=4, bits=4, granularity="group", group_size=16, permute=True,
                                             search_rounds=20),
                                   Wanda(n=2, m=4, permute=True, search_rounds=20),
                                   Wanda(n=2, m=4, permute=True, search_rounds=20, true_sequential=False)],
                         ids=repr)
def test_permuting_inside_the_calibration_forward_keeps_the_block_consistent(stage):
    """The one-pass forward runs each layer as it will be saved (producers' rows permuted
    after they were compressed, the consumer's input permuted to match): recomputing the
    converted block gives the forward's outputs, and the kept saliency never drops."""
    model = tiny_model("llama")
    adapter = adapter_for(model)
    block = model.model.layers[0]
    from slimformer.core.runner import _forward_one_batch, capture_block_inputs

    inputs, kwargs = capture_block_inputs(model, _calib(), 8)
    ctx = BlockContext(model, adapter, 0, "model.layers.0")
    stage.prepare(block, ctx)
    during = _forward_one_batch(block, inputs, kwargs)
    stage.convert(block, ctx)
    after = _forward_one_batch(block, inputs, kwargs)
    if stage.true_sequential:
        for a, b in zip(during, after):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for name in (adapter.mlp_out[0], adapter.attention_out[0]):
        facts = ctx.layer_report[f"model.layers.0.{name}"]
        assert facts["kept_saliency_permuted"] >= facts["kept_saliency_default_order"]


def test_permutation_on_saliency_keeps_the_function_and_more_saliency():
    model = tiny_model("llama")
    adapter = adapter_for(model)
    block = model.model.layers[0]
    ids = _calib(2, 16)
    ref = _logits(model, ids)
    g = torch.Generator().manual_seed(0)
    norms = {adapter.mlp_out[0]: torch.rand(128, generator=g) * 3, adapter.attention_out[0]: torch.rand(64, generator=g)}
    down_before = linear_weight(block.mlp.down_proj).detach().clone()
    report = permute_block_for_nm(block, adapter, model.config, 2, 4, input_norms=norms, max_rounds=30)
    torch.testing.assert_close(_logits(model, ids), ref, rtol=0, atol=1e-5)
    for before, after in report.values():
        assert after > before
    # the saliency, not the magnitude, is what the permutation maximised
    down = linear_weight(block.mlp.down_proj).detach()
    perm = [int(torch.nonzero((down_before == down[:, [k]]).all(0))[0]) for k in range(128)]
    sal = wanda_scores(down, norms[adapter.mlp_out[0]][perm])
    assert report[adapter.mlp_out[0]][1] == pytest.approx(float((sal * nm_mask(sal, 2, 4)).sum() / sal.sum()), abs=1e-6)


# --- recipes and bad input -----------------------------------------------------------------


def test_builtin_recipes():
    assert load_recipe("sparsegpt-2-4").stages == [SparseGPT(n=2, m=4)]
    assert load_recipe("sparsegpt-50").stages == [SparseGPT(sparsity=0.5)]
    assert load_recipe("wanda-2-4").stages == [Wanda(n=2, m=4)]
    assert load_recipe("wanda-50").stages == [Wanda(sparsity=0.5)]
    joint = load_recipe("sparsegpt-2-4-w4-g32").stages
    assert joint[0] == SparseGPT(n=2, m=4, bits=4, granularity="group", group_size=32)
    assert type(joint[-1]).__name__ == "QuantizeEmbeddings"


@pytest.mark.parametrize("text,fragment", [
    ("SparseGPT: {sparsity: 1.0}", r"\[0, 1\)"),
    ("Wanda: {sparsity: -0.1}", r"\[0, 1\)"),
    ("SparseGPT: {n: 4, m: 4}", "N < M"),
    ("Wanda: {n: 2}", "both n and m"),
    ("SparseGPT: {n: 2, m: 4, sparsity: 0.5}", "not both"),
    ("Wanda: {sparsity: 0.5, permute: true}", "permute applies to N:M"),
    ("SparseGPT: {n: 2, m: 4, block_size: 126}", "multiple of M=4"),
    ("SparseGPT: {sparsity: 0.5, group_size: 32}", "need bits"),
    ("SparseGPT: {n: 2, m: 4, bits: 9}", "bits"),
])
def test_bad_settings_are_one_line_errors(text, fragment):
    with pytest.raises(RecipeError, match=fragment):
        parse_recipe(f"stages:\n  - {text}\n")


@pytest.mark.parametrize("stage", ["Wanda: {n: 2, m: 48}", "SparseGPT: {n: 1, m: 3, block_size: 126}"])
def test_nm_not_dividing_the_inputs_names_the_layer(stage):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(SparsityConfigError) as info:
        api.compress((model, tok), parse_recipe(f"stages:\n  - {stage}\n"), calib="pydoc", calib_samples=4,
                     seqlen=32, progress=False)
    message = str(info.value)
    assert "\n" not in message and message.startswith("model.layers.0.self_attn.q_proj: M=")
    assert "does not divide its input size 64" in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
