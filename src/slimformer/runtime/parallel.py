"""Tensor parallelism (Megatron style) over ``torch.distributed`` processes.

Each transformer block is split across the ``world_size`` ranks of a process group:

* attention: q/k/v (and GPT-2's fused ``c_attn``) are *column-parallel*: a rank keeps
  the output rows of whole heads, ``num_heads / tp`` query heads and the key/value
  heads they read (``num_kv_heads / tp``; or, when ``tp`` is a multiple of the KV
  heads, the one KV head its query heads share, replicated). Attention then runs on
  the local heads only, and ``o_proj`` is *row-parallel*: it reads the local heads'
  input columns and the partial outputs are summed with one ``all_reduce``.
* MLP: gate/up (``fc1``, ``c_fc``, ...) are column-parallel over the intermediate
  features, down (``fc2``, ...) row-parallel with one ``all_reduce``.

So a block costs two all-reduces of ``[tokens, hidden]``. Embeddings, norms and the LM
head stay replicated (every rank computes the same full logits). Biases of
row-parallel layers are added once, after the reduce. Compressed layers shard
themselves (``CompressedLinear.shard``): ``QuantLinear`` in its packed form (codes, scales
and zero-points sliced; a row-parallel split must fall on a quantisation-group boundary),
types with no sharded form as a dense slice of their dequantised weight (warned, the reason
in the shard's ``fallback``), and types whose input quantisation a slice cannot reproduce
are refused with a :class:`ParallelConfigError` naming the layer and why. Inference only: the all-reduce is
not differentiable.

On CPU the backend is gloo over loopback; with at least ``world_size`` GPUs it is NCCL,
one GPU per rank. On one machine with few cores TP gives no speed-up (the ranks share
the cores and add communication); it exists to split a model across machines or GPUs.
"""

from __future__ import annotations

import importlib
import os
import queue as queue_module
import socket
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from slimformer.errors import ParallelConfigError, SlimformerError
from slimformer.formats.matrix import NotNative
from slimformer.formats.primitives import choose_qparams, fake_quantize_activation
from slimformer.formats.spec import ActSpec
from slimformer.models.adapters.base import Adapter, adapter_for
from slimformer.nn.base import CompressedLinear, dense_linear
from slimformer.nn.quant_linear import QuantLinear
from slimformer.nn.registry import registered_modules
from slimformer.nn.surgery import is_linear, linear_weight, set_module

# Attention-module attributes that count heads or head-sized features and are read at
# forward time by some family (OPT views with num_heads, GPT-2 splits c_attn by
# split_size, BERT keeps all_head_size); each becomes its local value.
_QUERY_HEAD_ATTRS = ("num_heads", "num_attention_heads")
_KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads")
_WIDTH_ATTRS = ("split_size", "all_head_size", "embed_dim")


# ----------------------------------------------------------------------------- shards
def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().contiguous().clone(), requires_grad=False)


def _dense(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding exactly ``weight`` ``[out, in]`` (no random init)."""
    return dense_linear(weight, bias)


def _compressed_shard(module: CompressedLinear, rank: int, world_size: int, dim: int, index, name: str,
                      **kwargs) -> nn.Module:
    """``module.shard(...)``, its refusals as :class:`ParallelConfigError` naming the layer."""
    try:
        return module.shard(rank, world_size, dim, index, name=name, **kwargs)
    except NotNative as exc:
        raise ParallelConfigError(f"cannot shard {name} ({type(module).__name__}): {exc.reason}") from None
    except ValueError as exc:
        raise ParallelConfigError(f"{name}: {exc}") from None


def _check_linear(module: nn.Module, name: str) -> None:
    if not (is_linear(module) or isinstance(module, CompressedLinear)):
        raise ParallelConfigError(f"cannot shard {name}: {type(module).__name__} is not a Linear, Conv1D or "
                                  "compressed linear layer")


def _out_in(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, CompressedLinear):
        return module.out_features, module.in_features
    return tuple(linear_weight(module).shape)


class ColumnParallelLinear(nn.Module):
    """This rank's output rows of a linear layer: ``y_local = x @ W[rows]ᵀ + b[rows]``.

    The input is the full (replicated) activation; the output holds only this rank's
    features (e.g. its attention heads), consumed locally, so no communication.
    """

    def __init__(self, local: nn.Module, full_out_features: int, rank: int, world_size: int):
        super().__init__()
        self.local = local
        out_features, in_features = _out_in(local)
        self.in_features, self.out_features = in_features, out_features
        self.full_out_features, self.rank, self.world_size = full_out_features, rank, world_size

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int, world_size: int,
                    rows: torch.Tensor | None = None, name: str = "linear") -> "ColumnParallelLinear":
        """Shard ``linear`` (Linear, GPT-2 Conv1D or QuantLinear) to ``rows`` (output
        indices; default: the ``rank``-th of ``world_size`` equal contiguous slices)."""
        _check_linear(linear, name)
        out_features, _ = _out_in(linear)
        if rows is None:
            if out_features % world_size:
                raise ParallelConfigError(
                    f"world size {world_size} does not divide the {out_features} output features of {name}")
            per = out_features // world_size
            rows = torch.arange(rank * per, (rank + 1) * per)
        if isinstance(linear, CompressedLinear):
            local = _compressed_shard(linear, rank, world_size, 0, rows, name)
        else:
            bias = linear.bias[rows] if linear.bias is not None else None
            local = _dense(linear_weight(linear)[rows], bias)
        return cls(local, out_features, rank, world_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local(x)

    def extra_repr(self) -> str:
        return f"rank={self.rank}/{self.world_size}, out {self.out_features} of {self.full_out_features}"


class RowParallelLinear(nn.Module):
    """This rank's input columns of a linear layer; partial outputs summed over ranks.

    ``y = all_reduce_sum(x_local @ W[:, cols]ᵀ) + b``: the input is this rank's slice of
    the features (the output of a column-parallel layer), the bias is added once after
    the reduce. A QuantLinear with *dynamic* activation quantisation takes its scale
    from the whole input row, which no rank holds: the min/max are all-reduced first
    (exact), the input is fake-quantised with them, and the local shard runs weight-only.
    """

    def __init__(self, local: nn.Module, bias: torch.Tensor | None, full_in_features: int, rank: int,
                 world_size: int, group: Any = None, act_spec: ActSpec | None = None):
        super().__init__()
        self.local = local
        out_features, in_features = _out_in(local)
        self.in_features, self.out_features = in_features, out_features
        self.full_in_features, self.rank, self.world_size = full_in_features, rank, world_size
        self.bias = None if bias is None else _frozen(bias)
        self.act_spec = act_spec   # dynamic activation quantisation done here, over all ranks
        self.group = group

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int, world_size: int, group: Any = None,
                    cols: tuple[int, int] | None = None, name: str = "linear") -> "RowParallelLinear":
        """Shard ``linear`` to input columns ``cols`` = (start, stop) (default: the
        ``rank``-th of ``world_size`` equal slices)."""
        _check_linear(linear, name)
        _, in_features = _out_in(linear)
        if cols is None:
            if in_features % world_size:
                raise ParallelConfigError(
                    f"world size {world_size} does not divide the {in_features} input features of {name}")
            per = in_features // world_size
            cols = (rank * per, (rank + 1) * per)
        act_spec = None
        if isinstance(linear, QuantLinear):
            act = linear.act_spec
            global_act = act is not None and act.dynamic and world_size > 1
            local = _compressed_shard(linear, rank, world_size, 1, cols, name, keep_activation=not global_act)
            act_spec = act if global_act else None
        elif isinstance(linear, CompressedLinear):
            local = _compressed_shard(linear, rank, world_size, 1, cols, name)
        else:
            local = _dense(linear_weight(linear)[:, cols[0]:cols[1]], None)
        return cls(local, linear.bias, in_features, rank, world_size, group, act_spec)

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantise ``x`` with the qparams the unsharded input would have had."""
        flat = x.detach().float()
        if self.act_spec.granularity == "tensor":
            lo, hi = flat.amin().reshape(1), flat.amax().reshape(1)
        else:
            lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
        ends = torch.cat([hi, -lo], dim=-1)   # one MAX reduce gives the global max and min
        if self.world_size > 1:
            dist.all_reduce(ends, op=dist.ReduceOp.MAX, group=self.group)
        # choose_qparams over [min, max] equals choose_qparams over the whole row
        scale, zero = choose_qparams(torch.stack([-ends[..., 1], ends[..., 0]], dim=-1),
                                     self.act_spec.bits, self.act_spec.symmetric)
        if self.act_spec.granularity == "token":
            scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
        return fake_quantize_activation(x, self.act_spec, scale, zero)

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's un-reduced contribution (no bias)."""
        if self.act_spec is not None:
            x = self._quantize_input(x)
        return self.local(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.partial(x)
        if self.world_size > 1:
            y = y.contiguous()
            dist.all_reduce(y, op=dist.ReduceOp.SUM, group=self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"rank={self.rank}/{self.world_size}, in {self.in_features} of {self.full_in_features}"


# ----------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class TPPlan:
    """How one model splits over ``world_size`` ranks (the same for every block)."""

    world_size: int
    heads: int              # query heads of the whole model
    kv_heads: int
    head_dim: int
    intermediate: int
    local_heads: int
    local_kv_heads: int
    kv_replicated: bool     # tp is a multiple of kv_heads: each rank keeps one KV head

    def query_rows(self, rank: int) -> torch.Tensor:
        per = self.local_heads * self.head_dim
        return torch.arange(rank * per, (rank + 1) * per)

    def kv_rows(self, rank: int) -> torch.Tensor:
        if self.kv_replicated:
            first = (rank * self.local_heads) // (self.heads // self.kv_heads)
        else:
            first = rank * self.local_kv_heads
        return torch.arange(first * self.head_dim, (first + self.local_kv_heads) * self.head_dim)

    def mlp_rows(self, rank: int) -> torch.Tensor:
        per = self.intermediate // self.world_size
        return torch.arange(rank * per, (rank + 1) * per)


def _attention_path(adapter: Adapter) -> str:
    return adapter.attention_in[0].rpartition(".")[0]


def plan_tensor_parallel(model: nn.Module, world_size: int) -> TPPlan:
    """Check that ``world_size`` ranks can split ``model`` and say how; raises
    :class:`ParallelConfigError` naming the quantity that does not divide."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ParallelConfigError(f"world size must be a positive integer, got {world_size!r}")
    adapter = adapter_for(model)
    config = model.config
    heads, kv_heads = adapter.num_heads(config)
    block = adapter.get_blocks(model)[0]
    for name in adapter.linears:
        _check_linear(block.get_submodule(name), name)
    q_out = _out_in(block.get_submodule(adapter.attention_in[0]))[0]
    if len(adapter.attention_in) == 1:   # fused qkv (GPT-2): three equal parts
        if heads != kv_heads or q_out % 3:
            raise ParallelConfigError(f"cannot split fused {adapter.attention_in[0]} with {heads} heads, {kv_heads} KV heads")
        q_out //= 3
    head_dim = q_out // heads
    if len(adapter.mlp_in) == 0 or len(adapter.mlp_out) != 1 or len(adapter.attention_out) != 1:
        raise ParallelConfigError(f"family {adapter.family}: tensor parallelism needs one output projection per sub-block")
    intermediate = _out_in(block.get_submodule(adapter.mlp_in[0]))[0]
    where = f"({config.model_type}, {adapter.attention_in[0]})"
    if heads % world_size:
        raise ParallelConfigError(f"world size {world_size} does not divide the {heads} attention heads {where}")
    if kv_heads % world_size == 0:
        local_kv, replicated = kv_heads // world_size, False
    elif world_size % kv_heads == 0:
        local_kv, replicated = 1, True
    else:
        raise ParallelConfigError(
            f"world size {world_size} does not divide the {kv_heads} key/value heads {where} (nor is a multiple of them)")
    if intermediate % world_size:
        raise ParallelConfigError(
            f"world size {world_size} does not divide the MLP intermediate size {intermediate} "
            f"({config.model_type}, {adapter.mlp_in[0]})")
    return TPPlan(world_size, heads, kv_heads, head_dim, intermediate, heads // world_size, local_kv, replicated)


def _patch_attention(attn: nn.Module, plan: TPPlan) -> None:
    """Make the attention module count only its local heads."""
    for attr in _QUERY_HEAD_ATTRS:
        if isinstance(getattr(attn, attr, None), int):
            setattr(attn, attr, plan.local_heads)
    for attr in _KV_HEAD_ATTRS:
        if isinstance(getattr(attn, attr, None), int):
            setattr(attn, attr, plan.local_kv_heads)
    if isinstance(getattr(attn, "num_key_value_groups", None), int):
        # unchanged when KV heads are sharded; heads/tp when one KV head is replicated
        attn.num_key_value_groups = plan.local_heads // plan.local_kv_heads
    for attr in _WIDTH_ATTRS:
        if getattr(attn, attr, None) == plan.heads * plan.head_dim:
            setattr(attn, attr, plan.local_heads * plan.head_dim)


def _place(block: nn.Module, name: str, shard: nn.Module) -> None:
    """Put ``shard`` at ``name``, replacing a ``keeps_inner`` wrapper there too (the shard
    was cut from the wrapper, whose input scale it already holds)."""
    parent_name, _, child = name.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    if getattr(parent._modules.get(child), "keeps_inner", False):
        setattr(parent, child, shard)
    else:
        set_module(block, name, shard)


def tensor_parallel(model: nn.Module, group: Any = None, *, rank: int | None = None,
                    world_size: int | None = None) -> nn.Module:
    """Convert ``model`` in place to this rank's tensor-parallel shard and return it.

    Rank and world size come from ``group`` (default: the default process group);
    ``rank``/``world_size`` override them (e.g. to check a split without processes; the
    forward of a split model still needs the process group). Every block's projections
    (names from the architecture adapter) become :class:`ColumnParallelLinear` /
    :class:`RowParallelLinear` and each attention module is patched to its local head
    counts. Embeddings, norms and LM head stay replicated; ``model.config`` is left
    describing the full model.
    """
    if rank is None or world_size is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ParallelConfigError(
                "torch.distributed is not initialised: run inside run_tensor_parallel or call init_process_group")
        rank = dist.get_rank(group) if rank is None else rank
        world_size = dist.get_world_size(group) if world_size is None else world_size
    if getattr(model, "slimformer_tp", None) is not None:
        raise ParallelConfigError(f"model is already split for tensor parallelism ({model.slimformer_tp})")
    plan = plan_tensor_parallel(model, world_size)
    if not 0 <= rank < world_size:
        raise ParallelConfigError(f"rank {rank} is outside world size {world_size}")
    adapter = adapter_for(model)
    fused = len(adapter.attention_in) == 1
    with torch.no_grad():
        for index, block in enumerate(adapter.get_blocks(model)):
            prefix = f"{adapter.blocks}.{index}"
            for i, name in enumerate(adapter.attention_in):
                if fused:
                    full = plan.heads * plan.head_dim
                    rows = torch.cat([part * full + plan.query_rows(rank) for part in range(3)])
                else:
                    rows = plan.query_rows(rank) if i == 0 else plan.kv_rows(rank)
                shard = ColumnParallelLinear.from_linear(block.get_submodule(name), rank, world_size, rows,
                                                         f"{prefix}.{name}")
                _place(block, name, shard)
            q_cols = plan.query_rows(rank)
            for name in adapter.attention_out:
                shard = RowParallelLinear.from_linear(block.get_submodule(name), rank, world_size, group,
                                                      (int(q_cols[0]), int(q_cols[-1]) + 1), f"{prefix}.{name}")
                _place(block, name, shard)
            for name in adapter.mlp_in:
                shard = ColumnParallelLinear.from_linear(block.get_submodule(name), rank, world_size,
                                                         plan.mlp_rows(rank), f"{prefix}.{name}")
                _place(block, name, shard)
            m_cols = plan.mlp_rows(rank)
            for name in adapter.mlp_out:
                shard = RowParallelLinear.from_linear(block.get_submodule(name), rank, world_size, group,
                                                      (int(m_cols[0]), int(m_cols[-1]) + 1), f"{prefix}.{name}")
                _place(block, name, shard)
            _patch_attention(block.get_submodule(_attention_path(adapter)), plan)
    model.slimformer_tp = {"rank": rank, "world_size": world_size}
    return model


# ----------------------------------------------------------------------------- launcher
def default_backend(world_size: int) -> str:
    """NCCL when every rank can have its own GPU, else gloo (CPU)."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def local_device() -> torch.device:
    """The device this rank computes on: its GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, backend: str, threads: int, timeout_s: float,
            fn: Callable, args: tuple, results, done, plugin_modules: tuple[str, ...] = ()) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    try:
        for name in plugin_modules:   # the module types the parent knows, so saved models load here too
            importlib.import_module(name)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
        try:
            value = fn(*args)
        finally:
            dist.destroy_process_group()
        results.put((rank, "ok", value if rank == 0 else None, ""))
    except BaseException as exc:   # reported to the parent, which re-raises it
        try:
            results.put((rank, "error", exc, traceback.format_exc()))
        except Exception:   # the exception itself does not pickle
            results.put((rank, "error", None, traceback.format_exc()))
    # Tensors cross over shared memory served by this process: stay until collected.
    done.wait(timeout_s)


# Imported once by the fork server, so each rank starts in well under a second
# instead of re-importing torch and transformers (several seconds per process).
_PRELOAD = ["torch", "torch.distributed", "transformers.modeling_utils", "transformers.modeling_layers",
            "transformers.activations", "slimformer.runtime.parallel"]


def _mp_context():
    """Fresh processes, never a fork of this one (its OpenMP pool and any process group
    would not survive a fork): forked from a clean fork server where there is one. The
    server starts on first use and keeps that moment's environment and ``sys.path``."""
    import torch.multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)   # only takes effect when the server first starts
    return ctx


def run_tensor_parallel(fn: Callable, world_size: int, *args, backend: str | None = None,
                        threads: int | None = None, timeout_s: float = 600.0) -> Any:
    """Run ``fn(*args)`` in ``world_size`` fresh processes joined in one process group on
    loopback (MASTER_ADDR=127.0.0.1, a free port) and return rank 0's result.

    ``fn`` and ``args`` must be picklable (a module-level function). Inside, the ranks
    use ``torch.distributed`` (e.g. :func:`tensor_parallel`). Each process runs
    ``threads`` torch threads (default: this process's threads / world size, at least
    1). A :class:`SlimformerError` raised in any rank is re-raised here as it is; other
    failures as ``RuntimeError`` with the rank's traceback.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ParallelConfigError(f"world size must be a positive integer, got {world_size!r}")
    backend = backend or default_backend(world_size)
    threads = threads or max(1, torch.get_num_threads() // world_size)
    ctx = _mp_context()
    results, done = ctx.Queue(), ctx.Event()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, world_size, port, backend, threads, timeout_s, fn, args,
                                               results, done, registered_modules()), daemon=True)
             for rank in range(world_size)]
    for p in procs:
        p.start()
    outcome, deadline, received = None, time.monotonic() + timeout_s, 0
    try:
        while received < world_size:
            try:
                rank, status, value, tb = results.get(timeout=0.5)
            except queue_module.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"tensor-parallel rank {dead[0]} died (exit code {procs[dead[0]].exitcode})")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"tensor-parallel run exceeded {timeout_s:.0f} s")
                continue
            received += 1
            if status == "error":
                if isinstance(value, SlimformerError):
                    raise value
                raise RuntimeError(f"tensor-parallel rank {rank} failed:\n{tb}")
            if rank == 0:
                outcome = value
    finally:
        done.set()
        for p in procs:
            p.join(timeout=5 if received == world_size else 0.5)
            if p.is_alive():   # a peer failed and this rank waits in a collective
                p.terminate()
                p.join()
    return outcome


# ----------------------------------------------------------------------------- helpers
def _load_model(source) -> nn.Module:
    """A model from a ``slimformer.load`` source, or from a picklable zero-argument builder."""
    if callable(source):
        return source().eval()
    from slimformer.models.load import load

    return load(source)[0]


def _outputs(model: nn.Module, **kwargs):
    out = model(**kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _tp_forward_rank(source, input_ids: torch.Tensor, repeats: int) -> dict:
    model = tensor_parallel(_load_model(source))
    device = local_device()
    model.to(device)
    ids = input_ids.to(device)
    times = []
    with torch.inference_mode():
        for _ in range(max(1, repeats)):
            dist.barrier()   # time the ranks together, not a rank's head start
            start = time.perf_counter()
            out = _outputs(model, input_ids=ids)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return {"output": out.float().cpu(), "seconds": times}


def tp_forward(source, input_ids: torch.Tensor, world_size: int, *, repeats: int = 1,
               return_times: bool = False, **launch) -> torch.Tensor | tuple[torch.Tensor, list[float]]:
    """Logits of ``source`` (decoders; the last hidden state for encoders) on
    ``input_ids`` ``[batch, seq]``, computed by ``world_size`` tensor-parallel ranks.

    ``source``: anything :func:`slimformer.load` takes, or a picklable zero-argument
    callable returning the model. Every rank loads the model and keeps its shard;
    rank 0's output is returned (float32, CPU). With ``return_times`` also the
    forward's wall times over ``repeats`` runs (rank 0, the first one includes warm-up).
    """
    result = run_tensor_parallel(_tp_forward_rank, world_size, source, input_ids, repeats, **launch)
    return (result["output"], result["seconds"]) if return_times else result["output"]


@torch.inference_mode()
def greedy_generate(model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding with the KV cache: ``prompt_ids`` ``[batch, seq]`` plus
    ``new_tokens`` tokens (no early stop at EOS), through the runtime's one generation
    loop on the HF engine. Under a process group rank 0's choice is broadcast each step,
    so the ranks cannot diverge on float ties."""
    from slimformer.runtime.engine import HFEngine
    from slimformer.runtime.loop import generate_ids, greedy

    engine = HFEngine(model)
    pick = greedy
    if dist.is_initialized() and dist.get_world_size() > 1:
        def pick(logits: torch.Tensor) -> list[int]:
            nxt = logits.argmax(-1)
            dist.broadcast(nxt, src=0)
            return nxt.tolist()

    new = generate_ids(engine, prompt_ids.tolist(), new_tokens, pick)
    if not new_tokens:
        return prompt_ids.cpu()
    return torch.cat([prompt_ids.cpu(), torch.tensor(new, dtype=prompt_ids.dtype)], dim=1)


def _tp_generate_rank(source, prompt_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    model = tensor_parallel(_load_model(source))
    model.to(local_device())
    return greedy_generate(model, prompt_ids, new_tokens)


def tp_generate_greedy(source, prompt_ids: torch.Tensor, new_tokens: int, world_size: int,
                       **launch) -> torch.Tensor:
    """Greedy generation by ``world_size`` tensor-parallel ranks: ``[batch, seq + new_tokens]``
    token ids (``source`` as in :func:`tp_forward`)."""
    if new_tokens < 0:
        raise ParallelConfigError(f"new_tokens must be >= 0, got {new_tokens}")
    return run_tensor_parallel(_tp_generate_rank, world_size, source, prompt_ids, new_tokens, **launch)
