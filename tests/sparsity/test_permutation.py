"""Channel permutation for N:M: the search keeps more magnitude (never less), and every
applied permutation leaves the block's function exactly unchanged."""

import copy
import dataclasses
import itertools

import pytest
import torch
import torch.nn as nn

from slimformer.core.permutation import (
    _heads,
    _permute_qk,
    _reorder_inputs,
    _Search,
    _top_sum,
    _window_partitions,
    permute_block_for_nm,
    permute_ffn,
    permute_heads,
    permute_qk_head_dim,
    permute_value_heads,
    search_permutation,
)
from slimformer.errors import SparsityConfigError
from slimformer.formats.masks import kept_magnitude, nm_mask
from slimformer.models.adapters import adapter_for
from slimformer.models.tiny import tiny_model

FAMILIES = ("llama", "opt", "bert", "gpt2")


def objective(weight, n, m):
    """Σ over rows and stripes of the top-n |w|, by brute force."""
    a = weight.abs().double()
    return float(a.reshape(a.shape[0], -1, m).topk(n, -1).values.sum())


def kept(weight, n, m):
    return kept_magnitude(weight, nm_mask(weight, n, m))


def is_permutation(perm, size):
    return torch.equal(perm.sort().values, torch.arange(size))


# --- the search ---------------------------------------------------------------------


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (3, 4), (4, 8), (1, 2)])
def test_swap_and_split_gains_are_the_exact_objective_change(n, m):
    torch.manual_seed(n * 10 + m)
    weight = torch.randn(24, 6 * m)
    state = _Search(weight, n, m)
    a, b = torch.tensor([0, 2, 4]), torch.tensor([1, 3, 5])
    gains, which = state.swap_gains(a, b)
    for k in range(3):
        trial = copy.deepcopy(state)
        before = objective(weight[:, trial.perm.flatten()], n, m)
        trial.apply_swaps(a[k:k + 1], b[k:k + 1], which[k:k + 1])
        after = objective(weight[:, trial.perm.flatten()], n, m)
        assert after - before == pytest.approx(float(gains[k]), abs=1e-4)
        assert trial.total() == pytest.approx(after, rel=1e-6)
        # The best swap is the best of all M² swaps, found by brute force.
        brute = []
        for i, j in itertools.product(range(m), range(m)):
            p = state.perm.clone()
            p[a[k], i], p[b[k], j] = p[b[k], j].clone(), p[a[k], i].clone()
            brute.append(objective(weight[:, p.flatten()], n, m) - before)
        assert max(brute) == pytest.approx(float(gains[k]), abs=1e-4)
    if m <= 4:
        subsets, table, columns = _window_partitions(2, m)
        assert len(table) == {2: 3, 4: 35}[m]      # C(2M, M) / 2 splits
        assert columns[0].tolist() == list(range(2 * m))
        windows = torch.tensor([[0, 5], [1, 2]])
        wgains, split = state.window_gains(windows, subsets, table)
        before = objective(weight[:, state.perm.flatten()], n, m)
        state.apply_splits(windows, columns[split])
        after = objective(weight[:, state.perm.flatten()], n, m)
        assert after - before == pytest.approx(float(wgains.sum()), abs=1e-4)
        assert float(wgains.min()) >= 0


def test_top_sum_matches_topk():
    x = torch.randn(5, 8, 7)
    for n in range(1, 8):
        torch.testing.assert_close(_top_sum(x, n, 1), x.topk(n, dim=1).values.sum(1))


@pytest.mark.parametrize("n,m,shape", [(2, 4, (64, 256)), (4, 8, (64, 256)), (2, 4, (32, 2048))])
def test_search_keeps_strictly_more_on_random_weights(n, m, shape):
    # (32, 2048) has too many stripes to score every pair: random pairings each round.
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    perm = search_permutation(weight, n, m, max_rounds=30)
    assert is_permutation(perm, shape[1])
    assert kept(weight[:, perm], n, m) > kept(weight, n, m) + 0.005


def test_search_is_deterministic_and_seeded():
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(2))
    assert torch.equal(search_permutation(weight, 2, 4, seed=3), search_permutation(weight, 2, 4, seed=3))


def test_search_never_worse_than_identity():
    # Already perfect for 2:4 (two zeros per stripe and row): kept stays 1.
    torch.manual_seed(3)
    weight = torch.randn(16, 64)
    weight[nm_mask(torch.randn(16, 64), 2, 4).logical_not()] = 0
    perm = search_permutation(weight, 2, 4)
    assert kept(weight[:, perm], 2, 4) == pytest.approx(1.0)
    # Equal magnitudes: no permutation is better, so the identity comes back.
    flat = torch.ones(8, 32)
    assert torch.equal(search_permutation(flat, 2, 4), torch.arange(32))
    # A single stripe has nothing to search.
    assert torch.equal(search_permutation(torch.randn(4, 4), 2, 4), torch.arange(4))
    for seed in range(5):
        w = torch.randn(8, 32, generator=torch.Generator().manual_seed(seed))
        assert objective(w[:, search_permutation(w, 2, 4, seed=seed)], 2, 4) >= objective(w, 2, 4)


def test_search_recovers_a_hidden_nm_structure():
    torch.manual_seed(4)
    weight = torch.randn(32, 64)
    weight[nm_mask(torch.randn(32, 64), 2, 4).logical_not()] *= 0.01
    scrambled = weight[:, torch.randperm(64)]
    perm = search_permutation(scrambled, 2, 4)
    assert kept(scrambled, 2, 4) < 0.92
    assert kept(scrambled[:, perm], 2, 4) > kept(scrambled, 2, 4) + 0.03


def _kept_with(weight, n, m, **kwargs):
    return objective(weight[:, search_permutation(weight, n, m, **kwargs)], n, m)


def test_bounded_regressions_escape_local_optima():
    # Small matrices: each round scores every pair, so a stall is a true local optimum of
    # single swaps. The trajectory is the same until it, so regressions can only add.
    wins = 0
    for seed in range(6):
        w = torch.randn(8, 32, generator=torch.Generator().manual_seed(seed))
        plain = _kept_with(w, 2, 4, stripes_per_window=0, max_regressions=0)
        regressed = _kept_with(w, 2, 4, stripes_per_window=0, max_regressions=10)
        assert regressed >= plain - 1e-6
        wins += regressed > plain + 1e-6
        # A bound of zero still admits sideways moves (no loss), never a worse result.
        assert _kept_with(w, 2, 4, stripes_per_window=0, regression_bound=0.0) >= plain - 1e-6
    assert wins >= 2


def test_narrow_and_deep_finds_moves_swaps_cannot():
    wins = 0
    for seed in range(6):
        w = torch.randn(8, 32, generator=torch.Generator().manual_seed(seed))
        swaps = _kept_with(w, 2, 4, stripes_per_window=0, max_regressions=0)
        deep = _kept_with(w, 2, 4, stripes_per_window=2, max_regressions=0)
        assert deep >= swaps - 1e-6
        wins += deep > swaps + 1e-6
    assert wins >= 2
    # A three-stripe window (5775 splits) runs too.
    w = torch.randn(8, 24, generator=torch.Generator().manual_seed(0))
    assert _kept_with(w, 2, 4, stripes_per_window=3, max_regressions=0) >= \
        _kept_with(w, 2, 4, stripes_per_window=0, max_regressions=0) - 1e-6


def test_search_rejects_bad_settings():
    w = torch.randn(8, 32)
    with pytest.raises(SparsityConfigError, match="N < M"):
        search_permutation(w, 4, 4)
    with pytest.raises(SparsityConfigError, match="down: M=8 does not divide"):
        search_permutation(torch.randn(8, 36), 4, 8, name="down")
    with pytest.raises(SparsityConfigError, match="2-D"):
        search_permutation(torch.randn(32), 2, 4)
    with pytest.raises(SparsityConfigError, match="narrow-and-deep"):
        search_permutation(torch.randn(8, 64), 4, 8, stripes_per_window=3)
    with pytest.raises(SparsityConfigError, match="patience"):
        search_permutation(w, 2, 4, max_rounds=-1)


# --- applying permutations: exact invariance ------------------------------------------


def _model(family):
    model = tiny_model(family).double()
    adapter = adapter_for(model)
    ids = torch.randint(4, 300, (2, 12), generator=torch.Generator().manual_seed(0))

    def run():
        with torch.no_grad():
            out = model(ids)
        return out.last_hidden_state if family == "bert" else out.logits

    return model, adapter, run


def _block(model, adapter, index=0):
    return adapter.get_blocks(model)[index]


@pytest.mark.parametrize("family", FAMILIES)
def test_ffn_permutation_is_exact(family):
    model, adapter, run = _model(family)
    ref = run()
    block = _block(model, adapter)
    down = block.get_submodule(adapter.mlp_out[0])
    before = down.weight.clone()
    size = before.shape[0 if family == "gpt2" else 1]
    permute_ffn(block, adapter, torch.randperm(size))
    assert not torch.equal(down.weight, before)
    torch.testing.assert_close(run(), ref, rtol=0, atol=1e-10)
    # Permuting the down projection alone does change the output: the test can fail.
    _reorder_inputs(down, torch.randperm(size))
    assert (run() - ref).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_value_head_permutation_is_exact(family):
    model, adapter, run = _model(family)
    ref = run()
    block = _block(model, adapter)
    heads, kv_heads, head_dim = _heads(adapter, model.config)
    if family == "llama":
        assert (heads, kv_heads) == (4, 2)          # grouped: two query heads per value head
    permute_value_heads(block, adapter, model.config, [torch.randperm(head_dim) for _ in range(kv_heads)])
    torch.testing.assert_close(run(), ref, rtol=0, atol=1e-10)
    # The output projection's columns alone: changed output.
    o = block.get_submodule(adapter.attention_out[0])
    _reorder_inputs(o, torch.cat([torch.randperm(head_dim), torch.arange(head_dim, heads * head_dim)]))
    assert (run() - ref).abs().max() > 1e-4


def test_value_permutation_must_follow_the_kv_group():
    # Giving one query head of a group a different order than its value head breaks it.
    model, adapter, run = _model("llama")
    ref = run()
    block = _block(model, adapter)
    head_dim = 16
    perm = torch.randperm(head_dim)
    permute_value_heads(block, adapter, model.config, [perm, None])
    torch.testing.assert_close(run(), ref, rtol=0, atol=1e-10)
    # Undo the o_proj side for query head 1 only (of group 0): no longer the same function.
    index = torch.arange(4 * head_dim)
    index[head_dim:2 * head_dim] = head_dim + perm.argsort()
    _reorder_inputs(block.self_attn.o_proj, index)
    assert (run() - ref).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["opt", "bert", "gpt2"])
def test_qk_head_dim_permutation_is_exact_without_rotary(family):
    model, adapter, run = _model(family)
    ref = run()
    block = _block(model, adapter)
    _, kv_heads, head_dim = _heads(adapter, model.config)
    for g in range(kv_heads):
        permute_qk_head_dim(block, adapter, model.config, g, torch.randperm(head_dim))
    torch.testing.assert_close(run(), ref, rtol=0, atol=1e-10)


def test_qk_head_dim_permutation_under_rotary():
    model, adapter, run = _model("llama")
    ref = run()
    block = _block(model, adapter)
    head_dim, half = 16, 8
    # Llama's rotate_half pairs i with i + head_dim/2; moving pairs together (halves kept)
    # still changes each pair's rotation frequency, so the attention changes.
    pairs = torch.randperm(half)
    pair_perm = torch.cat([pairs, pairs + half])
    _permute_qk(block, adapter, model.config, 0, pair_perm)
    assert (run() - ref).abs().max() > 1e-4
    _permute_qk(block, adapter, model.config, 0, pair_perm.argsort())
    torch.testing.assert_close(run(), ref, rtol=0, atol=1e-10)
    # Without rotary embeddings any joint q/k permutation would be exact (test above);
    # here it is refused, and the identity is accepted.
    with pytest.raises(SparsityConfigError, match="rotary"):
        permute_qk_head_dim(block, adapter, model.config, 0, pair_perm)
    permute_qk_head_dim(block, adapter, model.config, 1, torch.arange(head_dim))
    # Moving q alone (k untouched) breaks q·k in any family.
    q_rows = torch.cat([torch.randperm(head_dim), torch.arange(head_dim, 4 * head_dim)])
    with torch.no_grad():
        block.self_attn.q_proj.weight.copy_(block.self_attn.q_proj.weight[q_rows])
    assert (run() - ref).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_head_order_permutation_is_exact(family):
    model, adapter, run = _model(family)
    ref = run()
    block = _block(model, adapter)
    _, kv_heads, _ = _heads(adapter, model.config)
    kv_order = torch.arange(kv_heads).flip(0)
    permute_heads(block, adapter, model.config, kv_order)
    torch.testing.assert_close(run(), ref, rtol=0, atol=1e-10)
    if family == "llama":
        # Query heads may move within their group as well: new heads (3, 2 | 1, 0) over
        # KV heads (1 | 0).
        permute_heads(block, adapter, model.config, torch.tensor([1, 0]), torch.tensor([3, 2, 1, 0]))
        torch.testing.assert_close(run(), ref, rtol=0, atol=1e-10)
        with pytest.raises(SparsityConfigError, match="away from its key/value head"):
            permute_heads(block, adapter, model.config, torch.tensor([0, 1]), torch.tensor([0, 2, 1, 3]))


def test_permutations_are_validated():
    model, adapter, _ = _model("llama")
    block = _block(model, adapter)
    with pytest.raises(SparsityConfigError, match="permutation of 128"):
        permute_ffn(block, adapter, torch.arange(127))
    with pytest.raises(SparsityConfigError, match="permutation of 128"):
        permute_ffn(block, adapter, torch.zeros(128, dtype=torch.long))
    with pytest.raises(SparsityConfigError, match="one value permutation per key/value head"):
        permute_value_heads(block, adapter, model.config, [None])
    with pytest.raises(SparsityConfigError, match="out of range"):
        permute_qk_head_dim(block, adapter, model.config, 2, torch.arange(16))


@pytest.mark.parametrize("family", FAMILIES)
def test_permute_block_for_nm_keeps_more_and_the_function(family):
    model, adapter, run = _model(family)
    ref = run()
    block = _block(model, adapter)
    down_name, o_name = adapter.mlp_out[0], adapter.attention_out[0]
    report = permute_block_for_nm(block, adapter, model.config, 2, 4, max_rounds=30)
    assert set(report) == {down_name, o_name}
    torch.testing.assert_close(run(), ref, rtol=0, atol=1e-10)
    from slimformer.nn.surgery import linear_weight
    for name, (before, after) in report.items():
        assert after > before
        assert after == pytest.approx(kept(linear_weight(block.get_submodule(name)).float(), 2, 4), abs=1e-6)


def test_permute_block_for_nm_refusals():
    model, adapter, _ = _model("llama")
    block = _block(model, adapter)
    other = dataclasses.replace(adapter, family="mamba")
    with pytest.raises(SparsityConfigError, match="mamba family"):
        permute_block_for_nm(block, other, model.config, 2, 4)
    with pytest.raises(SparsityConfigError, match="mlp.down_proj: M=48 does not divide"):
        permute_block_for_nm(block, adapter, model.config, 2, 48)
    untouched = copy.deepcopy(block.state_dict())
    with pytest.raises(SparsityConfigError, match="head_dim 16"):
        permute_block_for_nm(block, adapter, model.config, 1, 32)
    assert all(torch.equal(v, untouched[k]) for k, v in block.state_dict().items())

    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.weight = inner.weight

    block.mlp.down_proj = Wrapped(block.mlp.down_proj)
    with pytest.raises(SparsityConfigError, match="mlp.down_proj: channel permutation needs a plain linear"):
        permute_block_for_nm(block, adapter, model.config, 2, 4)


# --- real SmolLM2 blocks ---------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    import slimformer

    model, _ = slimformer.load("smollm2-135m")
    return model


def _real_block(model, index):
    """One SmolLM2 block in float64 and a function running it on fixed inputs."""
    block = copy.deepcopy(model.model.layers[index]).double()
    gen = torch.Generator().manual_seed(index)
    hidden = torch.randn(2, 10, model.config.hidden_size, generator=gen, dtype=torch.float64)
    positions = torch.arange(10)[None]
    cos, sin = model.model.rotary_emb(hidden.float(), positions)
    mask = torch.full((10, 10), float("-inf"), dtype=torch.float64).triu(1)[None, None]

    def run():
        with torch.no_grad():
            out = block(hidden, attention_mask=mask, position_ids=positions,
                        position_embeddings=(cos.double(), sin.double()))
        return out[0] if isinstance(out, tuple) else out

    return block, run


@pytest.mark.slow
def test_smollm2_block_permutations_are_exact(smollm2):
    adapter = adapter_for(smollm2)
    config = smollm2.config
    assert _heads(adapter, config) == (9, 3, 64)
    block, run = _real_block(smollm2, 7)
    ref = run()
    permute_ffn(block, adapter, torch.randperm(1536))
    torch.testing.assert_close(run(), ref, rtol=0, atol=1e-9)
    permute_value_heads(block, adapter, config, [torch.randperm(64) for _ in range(3)])
    torch.testing.assert_close(run(), ref, rtol=0, atol=1e-9)
    permute_heads(block, adapter, config, torch.tensor([2, 0, 1]),
                  torch.tensor([8, 6, 7, 0, 2, 1, 4, 3, 5]))
    torch.testing.assert_close(run(), ref, rtol=0, atol=1e-9)
    # Rotary: a pair-preserving q/k permutation changes the attention (so it is refused).
    pairs = torch.randperm(32)
    _permute_qk(block, adapter, config, 1, torch.cat([pairs, pairs + 32]))
    assert (run() - ref).abs().max() > 1e-4


@pytest.mark.slow
def test_smollm2_search_and_block(smollm2):
    adapter = adapter_for(smollm2)
    for index in (3, 20):
        block, run = _real_block(smollm2, index)
        ref = run()
        report = permute_block_for_nm(block, adapter, smollm2.config, 2, 4)
        torch.testing.assert_close(run(), ref, rtol=0, atol=1e-9)
        for name, (before, after) in report.items():
            assert after > before + 0.004, (index, name, before, after)
    down = smollm2.model.layers[10].mlp.down_proj.weight.detach()
    perm = search_permutation(down, 4, 8, max_rounds=40)
    assert kept(down[:, perm], 4, 8) > kept(down, 4, 8) + 0.004
