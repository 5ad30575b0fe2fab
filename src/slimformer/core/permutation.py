"""Channel permutations for N:M sparsity (Pool & Yu 2021), applied without changing
what the network computes.

N:M pruning keeps the N largest |w| in every group ("stripe") of M consecutive input
columns. Which columns share a stripe is arbitrary: permuting a layer's input channels
(and the producer's output channels to match) changes the groups, and a good
permutation keeps more magnitude. :func:`search_permutation` finds one;
:func:`permute_block_for_nm` applies it to a block where it is function-preserving.

Search (objective: Σ over rows and stripes of the top-N |w|, so stripes score
independently and any move's gain is exact and local):

* Greedy channel swaps between stripes. A round pairs stripes (every pair when the
  matrix is small enough to score them all, else a random disjoint pairing) and scores
  all M² single-column swaps of each pair in closed form: replacing column i of a
  stripe by value x changes a row's top-N sum by ``max(x, t_i) - c_i``, where
  ``c_i = |w_i|`` and ``t_i`` = the (N+1)-th largest if i is kept, else both are the
  N-th largest. A round thus costs O(pairs · M² · rows) with no sorting per candidate.
  The best swap of each improving pair is applied, pairs taken greedily by gain so no
  stripe moves twice in a round. When every pair is scored, the scores are kept and
  only pairs with a stripe that changed are scored again.
* Narrow-and-deep: when swaps stall, windows of ``stripes_per_window`` stripes are
  searched exhaustively — every way to split the window's columns into stripes (35 for
  two stripes of 4, 5775 for three) — which finds multi-column moves no single swap
  reaches. Only windows with at most ``_MAX_WINDOW_SUBSETS`` candidate stripes
  (C(wM, M)) are enumerated; for larger M (a pair of 4:8 stripes has 12870) the search
  uses swaps alone.
* Bounded regressions: when neither finds an improvement, up to ``max_regressions``
  times the least-bad swap is taken if it loses at most ``regression_bound`` of the
  objective (relative), and its pair is barred until a new best is found, so the next
  round cannot simply undo it. The best permutation seen is returned: never worse than
  the identity, where the search starts.

Why swaps carry the search (measured on SmolLM2-135M, one thread): on down_proj
[576, 1536] at 2:4, after 100 swap rounds one round of exhaustive pair splits cost as
much as ~30 more swap rounds and gained 20-70x less; swaps alone give +1.1 points of
kept magnitude in 100 rounds (~0.6 s). Narrow-and-deep and regressions matter on small
matrices, where swaps reach a true local optimum: on random 8×32 matrices each improves
the result for most seeds (tests); on SmolLM2's o_proj groups regressions add ~0.03
points and narrow-and-deep ~0.

Where a permutation is function-preserving (a block's linear maps; norms, residuals and
heads untouched):

* FFN: the intermediate dimension — rows (and biases) of the up/gate projections,
  columns of the down projection. Elementwise activations commute with it.
* V/O: within one key/value head, the value rows and, for every query head that reads
  that KV head (grouped-query attention), the same permutation of its o_proj column
  block. One permutation per KV group, searched on its query heads' o_proj column
  blocks stacked vertically (N:M stripes lie inside a head when M divides head_dim).
* Head order: KV heads with their query-head groups (q rows, k/v rows, o_proj column
  blocks); query heads may also be reordered within their group.
* Q/K head dimension: a joint permutation of the q rows of every query head of a KV
  group and the k rows of that KV head leaves q·k unchanged, but only without rotary
  embeddings. Rotary position embeddings (Llama) rotate the pair (i, i + head_dim/2)
  with a frequency fixed by i, so moving a pair — even keeping its two halves together
  — changes its frequency and the attention scores (tested); such permutations are
  refused. No N:M layer consumes the Q/K head dimension anyway (q/k/v, gate and up read
  the residual stream, which cannot be permuted per layer), so those layers are pruned
  in default order; only down_proj and o_proj gain from a permutation.
"""

from __future__ import annotations

import contextlib
import itertools
import math

import torch
import torch.nn as nn

from slimformer.errors import SparsityConfigError
from slimformer.formats.masks import check_nm, check_nm_fits, kept_magnitude, nm_mask
from slimformer.nn.surgery import linear_weight

# Windows for narrow-and-deep are enumerated only up to this many candidate stripes.
_MAX_WINDOW_SUBSETS = 1000
# Elements (candidates × rows) scored at once: bounds the temporary memory of a round.
_CHUNK_ELEMENTS = 1 << 22
# Score every pair of stripes each round (not a random pairing) below this many elements.
_ALL_PAIRS_ELEMENTS = 1 << 24


def _window_partitions(w: int, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All ways to split ``w * m`` columns into ``w`` unordered stripes of ``m``.

    Returns (subsets ``[n_sub, m]``: every stripe that occurs; table ``[n_part, w]``:
    each split's stripes as subset indices; columns ``[n_part, w*m]``: each split's
    column order). Split 0 is the current order ({0..m-1}, {m..2m-1}, ...)."""
    splits: list[list[tuple[int, ...]]] = []

    def extend(rest: list[int], groups: list[tuple[int, ...]]) -> None:
        if not rest:
            splits.append(groups)
            return
        first, others = rest[0], rest[1:]
        for tail in itertools.combinations(others, m - 1):
            group = (first, *tail)
            extend([c for c in others if c not in tail], groups + [group])

    extend(list(range(w * m)), [])
    subsets = sorted({g for split in splits for g in split})
    index = {g: i for i, g in enumerate(subsets)}
    table = torch.tensor([[index[g] for g in split] for split in splits])
    columns = torch.tensor([[c for g in split for c in g] for split in splits])
    return torch.tensor(subsets), table, columns


def _top_sum(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """Sum of the ``n`` largest values along a short ``dim``: an insertion network of
    elementwise max/min, several times faster than ``topk`` when the dim is 4 or 8."""
    values = x.unbind(dim)
    if 2 * n > len(values):
        return x.sum(dim) + _top_sum(-x, len(values) - n, dim)
    slots: list[torch.Tensor] = []
    for v in values:
        for i, slot in enumerate(slots):
            slots[i], v = torch.maximum(slot, v), torch.minimum(slot, v)
        if len(slots) < n:
            slots.append(v)
    return torch.stack(slots).sum(0)


class _Search:
    """The state of one search: |w| laid out stripe-major and the permutation so far."""

    def __init__(self, weight: torch.Tensor, n: int, m: int):
        a = weight.detach().abs().float()
        rows, cols = a.shape
        self.n, self.m, self.rows = n, m, rows
        self.stripes = cols // m
        self.x = a.t().reshape(self.stripes, m, rows).contiguous()   # [S, M, R]
        self.perm = torch.arange(cols).reshape(self.stripes, m)       # original column at each slot
        self.c = torch.empty_like(self.x)
        self.t = torch.empty_like(self.x)
        self.c_sum = torch.empty(self.stripes, m, dtype=torch.float64)
        self.score = torch.empty(self.stripes, dtype=torch.float64)
        self.tick = 0                                                  # refreshes so far
        self.stamp = torch.zeros(self.stripes, dtype=torch.long)       # tick of each stripe's last change
        self.refresh(torch.arange(self.stripes))

    def refresh(self, stripes: torch.Tensor) -> None:
        """Recompute the swap statistics and scores of ``stripes`` after they changed."""
        x = self.x[stripes]                                           # [k, M, R]
        top = x.topk(self.n + 1, dim=1)
        nth, next_ = top.values[:, self.n - 1:self.n], top.values[:, self.n:self.n + 1]
        kept = torch.zeros_like(x, dtype=torch.bool).scatter_(1, top.indices[:, :self.n], True)
        c = torch.where(kept, x, nth)
        self.c[stripes] = c
        self.t[stripes] = torch.where(kept, next_, nth)
        self.c_sum[stripes] = c.sum(-1).double()
        self.score[stripes] = top.values[:, :self.n].sum((1, 2)).double()
        self.tick += 1
        self.stamp[stripes] = self.tick

    def total(self) -> float:
        return float(self.score.sum())

    def swap_gains(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Best single-column swap between stripes ``a[k]`` and ``b[k]``: (gain, i * M + j)."""
        m = self.m
        gains = torch.empty(len(a), m * m, dtype=torch.float64)
        step = max(1, _CHUNK_ELEMENTS // (m * m * self.rows))
        for s in range(0, len(a), step):
            ia, ib = a[s:s + step], b[s:s + step]
            xa, xb = self.x[ia], self.x[ib]
            # Stripe a loses column i and gains b's column j, and the reverse.
            into_a = torch.maximum(xb[:, None, :, :], self.t[ia][:, :, None, :]).sum(-1)
            into_b = torch.maximum(xa[:, :, None, :], self.t[ib][:, None, :, :]).sum(-1)
            g = (into_a + into_b).double() - self.c_sum[ia][:, :, None] - self.c_sum[ib][:, None, :]
            gains[s:s + step] = g.reshape(len(ia), m * m)
        return gains.max(-1)

    def apply_swaps(self, a: torch.Tensor, b: torch.Tensor, which: torch.Tensor) -> None:
        i, j = which // self.m, which % self.m
        xa, pa = self.x[a, i].clone(), self.perm[a, i].clone()
        self.x[a, i], self.perm[a, i] = self.x[b, j], self.perm[b, j]
        self.x[b, j], self.perm[b, j] = xa, pa
        self.refresh(torch.cat([a, b]))

    def window_gains(self, windows: torch.Tensor, subsets: torch.Tensor, table: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Best split of each window ``[k, w]`` of stripes: (gain over the current split, split index)."""
        k, w = windows.shape
        sub_scores = torch.empty(k, len(subsets), dtype=torch.float64)
        step = max(1, _CHUNK_ELEMENTS // (len(subsets) * self.m * self.rows))
        for s in range(0, k, step):
            xw = self.x[windows[s:s + step]].reshape(-1, w * self.m, self.rows)
            sub_scores[s:s + step] = _top_sum(xw[:, subsets], self.n, 2).sum(-1).double()
        split_scores = sub_scores[:, table].sum(-1)
        best, index = split_scores.max(-1)
        return best - split_scores[:, 0], index

    def apply_splits(self, windows: torch.Tensor, columns: torch.Tensor) -> None:
        k, w = windows.shape
        flat = windows.flatten()
        xw = self.x[windows].reshape(k, w * self.m, self.rows)
        pw = self.perm[windows].reshape(k, w * self.m)
        self.x[flat] = torch.gather(xw, 1, columns[:, :, None].expand_as(xw)).reshape(-1, self.m, self.rows)
        self.perm[flat] = torch.gather(pw, 1, columns).reshape(-1, self.m)
        self.refresh(flat)


class _Cached:
    """The best move of every candidate in a fixed list (every pair, or every window),
    kept between rounds: only candidates with a stripe changed since are scored again."""

    def __init__(self, state: _Search, candidates: torch.Tensor, score):
        self.state, self.candidates, self.score = state, candidates, score
        self.gains = torch.empty(len(candidates), dtype=torch.float64)
        self.moves = torch.empty(len(candidates), dtype=torch.long)
        self.scored_at = torch.full((len(candidates),), -1)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        stale = (self.state.stamp[self.candidates] > self.scored_at[:, None]).any(-1)
        if stale.any():
            self.gains[stale], self.moves[stale] = self.score(self.candidates[stale])
            self.scored_at[stale] = self.state.tick
        return self.candidates, self.gains.clone(), self.moves


def _disjoint(gains: torch.Tensor, windows: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices of candidates with gain > threshold, best first, none sharing a stripe."""
    order = torch.nonzero(gains > threshold).flatten()
    order = order[gains[order].argsort(descending=True)]
    used: set[int] = set()
    chosen = []
    for idx in order.tolist():
        members = windows[idx].tolist()
        if used.isdisjoint(members):
            used.update(members)
            chosen.append(idx)
    return torch.tensor(chosen, dtype=torch.long)


def search_permutation(weight: torch.Tensor, n: int, m: int, *, max_rounds: int = 100,
                       max_regressions: int = 10, regression_bound: float = 1e-4,
                       stripes_per_window: int = 2, patience: int = 3, seed: int = 0,
                       progress: bool = False, name: str = "weight") -> torch.Tensor:
    """A permutation ``perm`` of the input columns of ``weight`` ``[out, in]`` such that
    N:M pruning of ``weight[:, perm]`` keeps at least as much magnitude as pruning
    ``weight`` (the best permutation seen; the identity if nothing better was found).

    ``max_rounds`` bounds the rounds (swap, deep or regression); ``patience`` is how many
    rounds of random pairings without gain count as a stall (a round over every pair
    stalls at once); ``stripes_per_window`` is the window of the exhaustive
    narrow-and-deep search (< 2 turns it off); ``max_regressions`` non-improving swaps,
    each losing at most ``regression_bound`` of the objective, may be taken to leave a
    local optimum. See the module docstring for the method."""
    check_nm(n, m)
    if weight.dim() != 2:
        raise SparsityConfigError(f"{name}: channel permutation needs a 2-D weight, got shape {tuple(weight.shape)}")
    check_nm_fits(name, weight.shape[1], m)
    if max_rounds < 0 or max_regressions < 0 or regression_bound < 0 or patience < 1:
        raise SparsityConfigError(
            f"{name}: max_rounds, max_regressions and regression_bound must be >= 0 and patience >= 1")
    deep = stripes_per_window >= 2 and math.comb(stripes_per_window * m, m) <= _MAX_WINDOW_SUBSETS
    if stripes_per_window > 2 and not deep:
        raise SparsityConfigError(
            f"{name}: a window of {stripes_per_window} stripes of {m} has {math.comb(stripes_per_window * m, m)} "
            f"candidate stripes, more than the {_MAX_WINDOW_SUBSETS} narrow-and-deep can enumerate")
    with _one_thread():
        return _search(weight, n, m, max_rounds, max_regressions, regression_bound, deep, stripes_per_window,
                       patience, seed, progress, name)


@contextlib.contextmanager
def _one_thread():
    # A search is thousands of small tensor ops: with a second intra-op thread each one
    # waits on a sync, and on a busy machine (another job on the other core) the search
    # ran 25x slower with 2 threads than with 1 (SmolLM2 down_proj, 15 s against 0.6 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _search(weight, n, m, max_rounds, max_regressions, regression_bound, deep, stripes_per_window, patience,
            seed, progress, name) -> torch.Tensor:
    state = _Search(weight, n, m)
    if state.stripes < 2:
        return torch.arange(weight.shape[1])
    stripes, rows = state.stripes, state.rows
    gen = torch.Generator().manual_seed(seed)

    def random_windows(size: int) -> torch.Tensor:
        return torch.randperm(stripes, generator=gen)[: stripes // size * size].reshape(-1, size)

    def score_swaps(pairs):
        return state.swap_gains(pairs[:, 0], pairs[:, 1])

    def random_swaps():
        pairs = random_windows(2)
        return (pairs, *score_swaps(pairs))

    # Small enough: score every pair (cached), so a round without gain is a true local
    # optimum of single swaps. Else a fresh random pairing each round.
    swap_round = random_swaps
    if math.comb(stripes, 2) * m * m * rows <= _ALL_PAIRS_ELEMENTS:
        swap_round = _Cached(state, torch.combinations(torch.arange(stripes), 2), score_swaps)
    deep_round = None
    if deep:
        w = min(stripes_per_window, stripes)
        subsets, table, split_columns = _window_partitions(w, m)

        def score_windows(windows):
            return state.window_gains(windows, subsets, table)

        def random_splits():
            windows = random_windows(w)
            return (windows, *score_windows(windows))

        deep_round = random_splits
        if math.comb(stripes, w) * len(subsets) * m * rows <= _ALL_PAIRS_ELEMENTS:
            deep_round = _Cached(state, torch.combinations(torch.arange(stripes), w), score_windows)

    best_total = state.total()
    best_perm = state.perm.clone()
    # Gains below this are rounding noise, not improvements (float32 |w| summed over rows).
    eps = 1e-6 * best_total / stripes
    barred = torch.empty(0, dtype=torch.long)   # pairs (a * S + b, a < b) regressed since the last new best
    regressions = stalled = rounds = 0

    from tqdm.auto import tqdm

    bar = tqdm(total=max_rounds, desc=f"permutation {name}", disable=not progress, leave=False)
    while rounds < max_rounds:
        rounds += 1
        bar.update(1)
        pairs, gains, which = swap_round()
        if len(barred):
            key = pairs.min(-1).values * stripes + pairs.max(-1).values
            gains[torch.isin(key, barred)] = -math.inf
        chosen = _disjoint(gains, pairs, eps)
        if len(chosen):
            state.apply_swaps(pairs[chosen, 0], pairs[chosen, 1], which[chosen])
            stalled = 0
        else:
            stalled += 1
            if swap_round is random_swaps and stalled < patience:
                continue
            stalled = 0
            # Stalled: narrow-and-deep first, then a bounded regression, else stop.
            improved = False
            if deep_round is not None and rounds < max_rounds:
                rounds += 1
                bar.update(1)
                windows, wgains, split = deep_round()
                chosen = _disjoint(wgains, windows, eps)
                if len(chosen):
                    state.apply_splits(windows[chosen], split_columns[split[chosen]])
                    improved = True
            if not improved:
                pick = int(gains.argmax()) if len(gains) else -1
                if (regressions >= max_regressions or pick < 0
                        or -float(gains[pick]) > regression_bound * state.total()):
                    break
                regressions += 1
                a, b = sorted(pairs[pick].tolist())
                barred = torch.cat([barred, torch.tensor([a * stripes + b])])
                state.apply_swaps(pairs[pick:pick + 1, 0], pairs[pick:pick + 1, 1], which[pick:pick + 1])
        total = state.total()
        if total > best_total + eps:
            best_total, best_perm = total, state.perm.clone()
            barred = barred[:0]
            bar.set_postfix(kept=f"{best_total / float(state.x.sum(dtype=torch.float64)):.4f}")
    bar.close()
    return best_perm.flatten()


# ---------------------------------------------------------------------------------------
# Applying permutations to a block.

# Families whose block structure the functions below know (see the adapter's names).
_SUPPORTED_FAMILIES = ("llama", "opt", "bert", "gpt2")
# Families with rotary position embeddings on q and k.
_ROTARY_FAMILIES = ("llama",)


def _check_family(adapter) -> None:
    if adapter.family not in _SUPPORTED_FAMILIES:
        raise SparsityConfigError(
            f"channel permutation does not support the {adapter.family} family "
            f"(supported: {', '.join(_SUPPORTED_FAMILIES)})")


def _check_perm(perm, size: int, what: str) -> torch.Tensor:
    perm = torch.as_tensor(perm, dtype=torch.long).flatten()
    if perm.numel() != size or not torch.equal(perm.sort().values, torch.arange(size)):
        raise SparsityConfigError(f"{what}: expected a permutation of {size} indices, got {perm.numel()} values "
                                  f"that are not one")
    return perm


def _linear(block: nn.Module, name: str) -> nn.Module:
    """A plain Linear (or GPT-2 Conv1D) at ``name``: permuting a quantised or wrapped
    layer would have to permute its scales too, which only its own code knows."""
    module = block.get_submodule(name)
    if not (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
        raise SparsityConfigError(
            f"{name}: channel permutation needs a plain linear layer, got {type(module).__name__} "
            f"(permute before quantising or wrapping it)")
    return module


def _transposed(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"   # weight stored [in, out]


@torch.no_grad()
def _reorder_outputs(module: nn.Module, index: torch.Tensor) -> None:
    """Output feature k becomes the old output feature ``index[k]`` (weight and bias)."""
    dim = 1 if _transposed(module) else 0
    module.weight.copy_(module.weight.index_select(dim, index))
    if module.bias is not None:
        module.bias.copy_(module.bias[index])


@torch.no_grad()
def _reorder_inputs(module: nn.Module, index: torch.Tensor) -> None:
    """Input feature k becomes the old input feature ``index[k]`` (the bias is untouched)."""
    dim = 0 if _transposed(module) else 1
    module.weight.copy_(module.weight.index_select(dim, index))


def _out_features(module: nn.Module) -> int:
    return module.weight.shape[1 if _transposed(module) else 0]


def _in_features(module: nn.Module) -> int:
    return module.weight.shape[0 if _transposed(module) else 1]


def _heads(adapter, config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head_dim)."""
    heads, kv_heads = adapter.num_heads(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if heads % kv_heads:
        raise SparsityConfigError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")
    return heads, kv_heads, head_dim


def _qkv(block: nn.Module, adapter, config) -> dict[str, tuple[str, int]]:
    """Where q, k and v live: role → (module name, offset of its rows). GPT-2's fused
    ``c_attn`` holds q | k | v along its outputs."""
    heads, kv_heads, head_dim = _heads(adapter, config)
    names = adapter.attention_in
    if len(names) == 3:
        return {"q": (names[0], 0), "k": (names[1], 0), "v": (names[2], 0)}
    if len(names) == 1:
        return {"q": (names[0], 0), "k": (names[0], heads * head_dim),
                "v": (names[0], (heads + kv_heads) * head_dim)}
    raise SparsityConfigError(f"{adapter.family}: expected q, k, v or one fused q|k|v projection, got {names}")


class _Reorder:
    """Index maps built per module, then applied once each (several roles may share a
    module, as in a fused q|k|v)."""

    def __init__(self, block: nn.Module):
        self.block = block
        self.outputs: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, torch.Tensor] = {}

    def output_index(self, name: str) -> torch.Tensor:
        if name not in self.outputs:
            self.outputs[name] = torch.arange(_out_features(_linear(self.block, name)))
        return self.outputs[name]

    def input_index(self, name: str) -> torch.Tensor:
        if name not in self.inputs:
            self.inputs[name] = torch.arange(_in_features(_linear(self.block, name)))
        return self.inputs[name]

    def apply(self) -> dict[str, dict[str, torch.Tensor]]:
        """Reorder the modules; returns the maps ``{"outputs": {name: index}, "inputs": {...}}``
        (new channel k = old channel ``index[k]``), e.g. to reorder what was saved beside a module."""
        for name, index in self.outputs.items():
            _reorder_outputs(self.block.get_submodule(name), index)
        for name, index in self.inputs.items():
            _reorder_inputs(self.block.get_submodule(name), index)
        return {"outputs": dict(self.outputs), "inputs": dict(self.inputs)}


def permute_ffn(block: nn.Module, adapter, perm) -> dict:
    """Reorder the FFN's intermediate dimension in place: new channel k is old channel
    ``perm[k]`` — rows (and biases) of every input projection (up, gate), columns of the
    output projection (down). The block computes the same function. Returns the index
    maps applied (see ``_Reorder.apply``)."""
    _check_family(adapter)
    if len(adapter.mlp_out) != 1:
        raise SparsityConfigError(f"{adapter.family}: expected one FFN output projection, got {adapter.mlp_out}")
    out_name = adapter.mlp_out[0]
    size = _in_features(_linear(block, out_name))
    perm = _check_perm(perm, size, f"{out_name} intermediate dimension")
    plan = _Reorder(block)
    for name in adapter.mlp_in:
        if _out_features(_linear(block, name)) != size:
            raise SparsityConfigError(f"{name}: {_out_features(block.get_submodule(name))} outputs do not match "
                                      f"{out_name}'s {size} inputs")
        plan.output_index(name)[:] = perm
    plan.input_index(out_name)[:] = perm
    return plan.apply()


def permute_value_heads(block: nn.Module, adapter, config, perms) -> dict:
    """Reorder the head dimension of each key/value head's values in place: ``perms[g]``
    (``None`` = unchanged) applies to v's rows of KV head ``g`` and to the output
    projection's column block of every query head that reads KV head ``g``. Returns the
    index maps applied."""
    _check_family(adapter)
    heads, kv_heads, head_dim = _heads(adapter, config)
    perms = list(perms)
    if len(perms) != kv_heads:
        raise SparsityConfigError(f"expected one value permutation per key/value head ({kv_heads}), got {len(perms)}")
    v_name, v_offset = _qkv(block, adapter, config)["v"]
    o_name = adapter.attention_out[0]
    group = heads // kv_heads
    plan = _Reorder(block)
    v_index, o_index = plan.output_index(v_name), plan.input_index(o_name)
    for g, perm in enumerate(perms):
        if perm is None:
            continue
        perm = _check_perm(perm, head_dim, f"{v_name} key/value head {g}")
        start = v_offset + g * head_dim
        v_index[start:start + head_dim] = start + perm
        for h in range(g * group, (g + 1) * group):
            o_index[h * head_dim:(h + 1) * head_dim] = h * head_dim + perm
    return plan.apply()


def _permute_qk(block: nn.Module, adapter, config, kv_head: int, perm: torch.Tensor) -> None:
    heads, kv_heads, head_dim = _heads(adapter, config)
    parts = _qkv(block, adapter, config)
    group = heads // kv_heads
    plan = _Reorder(block)
    q_name, q_offset = parts["q"]
    k_name, k_offset = parts["k"]
    q_index, k_index = plan.output_index(q_name), plan.output_index(k_name)
    for h in range(kv_head * group, (kv_head + 1) * group):
        start = q_offset + h * head_dim
        q_index[start:start + head_dim] = start + perm
    start = k_offset + kv_head * head_dim
    k_index[start:start + head_dim] = start + perm
    plan.apply()


def permute_qk_head_dim(block: nn.Module, adapter, config, kv_head: int, perm) -> None:
    """Reorder the head dimension of q (every query head of KV group ``kv_head``) and k
    (KV head ``kv_head``) jointly, in place, which leaves every q·k unchanged.

    Refused (SparsityConfigError) under rotary embeddings: each dimension pair is rotated
    at a frequency fixed by its slot, so any non-identity permutation changes the
    attention scores. No N:M layer reads this dimension; it is here for completeness and
    for the families with learned or no position embeddings in q·k."""
    _check_family(adapter)
    _, kv_heads, head_dim = _heads(adapter, config)
    if not 0 <= kv_head < kv_heads:
        raise SparsityConfigError(f"key/value head {kv_head} out of range (the model has {kv_heads})")
    perm = _check_perm(perm, head_dim, f"q/k head dimension of key/value head {kv_head}")
    if adapter.family in _ROTARY_FAMILIES and not torch.equal(perm, torch.arange(head_dim)):
        raise SparsityConfigError(
            f"{adapter.family}: q/k head-dimension permutations change the attention under rotary embeddings "
            f"(each dimension pair rotates at the frequency of its slot); only head order can be permuted")
    _permute_qk(block, adapter, config, kv_head, perm)


def permute_heads(block: nn.Module, adapter, config, kv_order, q_order=None) -> None:
    """Reorder the attention heads in place: new KV head g is old KV head ``kv_order[g]``
    (its k and v rows) and new query head h is old query head ``q_order[h]`` (its q rows
    and output-projection column block). ``q_order`` must move each query head with its
    KV head (old head ``q_order[h]`` must belong to old group ``kv_order[h // group]``);
    by default it keeps the order inside each group."""
    _check_family(adapter)
    heads, kv_heads, head_dim = _heads(adapter, config)
    group = heads // kv_heads
    kv_order = _check_perm(kv_order, kv_heads, "key/value head order")
    if q_order is None:
        q_order = (kv_order[:, None] * group + torch.arange(group)).flatten()
    q_order = _check_perm(q_order, heads, "query head order")
    if not torch.equal(q_order // group, kv_order.repeat_interleave(group)):
        raise SparsityConfigError("query head order moves a query head away from its key/value head "
                                  f"(groups of {group} query heads per key/value head)")
    parts = _qkv(block, adapter, config)
    o_name = adapter.attention_out[0]
    plan = _Reorder(block)
    dims = torch.arange(head_dim)
    for role, order in (("q", q_order), ("k", kv_order), ("v", kv_order)):
        name, offset = parts[role]
        index = plan.output_index(name)
        index[offset:offset + len(order) * head_dim] = offset + (order[:, None] * head_dim + dims).flatten()
    plan.input_index(o_name)[:] = (q_order[:, None] * head_dim + dims).flatten()
    plan.apply()


def _saliency(weight: torch.Tensor, input_norms: torch.Tensor | None) -> torch.Tensor:
    """What N:M pruning should keep: |W| (magnitude), or Wanda's |W_ij|·‖X_j‖ when the
    norms of the layer's inputs over calibration tokens are given (a good proxy of
    SparseGPT's saliency too)."""
    a = weight.detach().abs().float()
    if input_norms is None:
        return a
    norms = torch.as_tensor(input_norms, dtype=torch.float32).flatten()
    if norms.numel() != a.shape[1]:
        raise SparsityConfigError(f"{norms.numel()} input norms for a layer with {a.shape[1]} inputs")
    return a * norms


def _kept(scores: torch.Tensor, n: int, m: int) -> float:
    return kept_magnitude(scores, nm_mask(scores, n, m))


def _check_block(block, adapter, config, n, m, names) -> None:
    """Every check of :func:`permute_block_for_nm` before the first change, so a refusal
    leaves the block as it was."""
    _check_family(adapter)
    check_nm(n, m)
    down_name, o_name = adapter.mlp_out[0], adapter.attention_out[0]
    if down_name in names:
        check_nm_fits(down_name, _in_features(_linear(block, down_name)), m)
    if o_name in names:
        check_nm_fits(o_name, _in_features(_linear(block, o_name)), m)
        head_dim = _heads(adapter, config)[2]
        if head_dim % m:
            raise SparsityConfigError(f"{o_name}: M={m} does not divide head_dim {head_dim}, so its N:M groups "
                                      f"straddle heads and no per-head permutation keeps the function")


def permute_ffn_for_nm(block: nn.Module, adapter, n: int, m: int, input_norms=None, **search_kwargs
                       ) -> tuple[float, float, dict]:
    """Search and apply the permutation of the FFN intermediate dimension that keeps the
    most saliency (:func:`_saliency`) when the down projection is pruned N:M. Returns
    (kept fraction before, after, the index maps applied)."""
    _check_family(adapter)
    check_nm(n, m)
    down_name = adapter.mlp_out[0]
    down = linear_weight(_linear(block, down_name))
    check_nm_fits(down_name, down.shape[1], m)
    scores = _saliency(down, input_norms)
    perm = search_permutation(scores, n, m, name=down_name, **search_kwargs)
    maps = permute_ffn(block, adapter, perm)
    return _kept(scores, n, m), _kept(scores[:, perm], n, m), maps


def permute_values_for_nm(block: nn.Module, adapter, config, n: int, m: int, input_norms=None, **search_kwargs
                          ) -> tuple[float, float, dict]:
    """Per key/value head, search and apply the permutation of the value head dimension
    that keeps the most saliency when the attention output projection is pruned N:M.
    Returns (kept fraction before, after, the index maps applied)."""
    o_name = adapter.attention_out[0]
    _check_block(block, adapter, config, n, m, (o_name,))
    out = linear_weight(_linear(block, o_name))
    heads, kv_heads, head_dim = _heads(adapter, config)
    scores = _saliency(out, input_norms)
    group = heads // kv_heads
    perms = []
    for g in range(kv_heads):
        # Every query head of the group must take the same order: search them stacked.
        stacked = torch.cat([scores[:, h * head_dim:(h + 1) * head_dim] for h in range(g * group, (g + 1) * group)])
        perms.append(search_permutation(stacked, n, m, name=f"{o_name} key/value head {g}", **search_kwargs))
    maps = permute_value_heads(block, adapter, config, perms)
    index = maps["inputs"][o_name]
    return _kept(scores, n, m), _kept(scores[:, index], n, m), maps


def permute_block_for_nm(block: nn.Module, adapter, config, n: int, m: int, input_norms: dict | None = None,
                         **search_kwargs) -> dict:
    """Search and apply, in place, the permutations of one block that help N:M pruning:
    the FFN intermediate dimension (for the down projection) and, per key/value head,
    the value head dimension (for the attention output projection). The block computes
    the same function. q/k/v, gate and up read the residual stream, which cannot be
    permuted per block, so they are pruned in default order.

    ``input_norms``: {layer name: ‖X_j‖ per input channel} of the down and output
    projections, to maximise Wanda's kept saliency |W|·‖X‖ instead of kept |W|.
    Returns ``{layer name: (kept fraction before, after)}`` at N:M for the down and
    output projections. ``search_kwargs`` go to :func:`search_permutation`."""
    down_name, o_name = adapter.mlp_out[0], adapter.attention_out[0]
    _check_block(block, adapter, config, n, m, (down_name, o_name))
    norms = input_norms or {}
    result = {}
    before, after, _ = permute_ffn_for_nm(block, adapter, n, m, norms.get(down_name), **search_kwargs)
    result[down_name] = (before, after)
    before, after, _ = permute_values_for_nm(block, adapter, config, n, m, norms.get(o_name), **search_kwargs)
    result[o_name] = (before, after)
    return result
