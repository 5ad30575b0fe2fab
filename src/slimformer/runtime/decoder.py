"""Native KV-cached decoder for Llama-family models (Llama, Mistral with its sliding
window, Qwen2, Qwen3 with its per-head q/k norm, SmolLM2), built from the adapter's
:class:`~slimformer.models.adapters.DecoderSpec` and module paths.

Prefill (many tokens) runs in torch: packed variable-length sequences (no padding),
fp32 GEMMs on tiles of dequantised weights, ``scaled_dot_product_attention`` per
sequence. Decode (one token per sequence) is one call into ``kernels/decoder.cpp`` that runs
the whole step in a single OpenMP region over a preallocated KV cache: no Python per
layer and no allocation per step. Both write the same cache.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from slimformer.errors import ModelLoadError, SlimformerError, UnsupportedArchitectureError
from slimformer.formats.gguf_check import check_gguf
from slimformer.kernels._build import disabled as kernels_disabled
from slimformer.kernels.abi import CLayer, CLinear, CModel, CScratch
from slimformer.models.adapters.base import DecoderSpec, adapter_for
from slimformer.nn.quant_embedding import QuantEmbedding
from slimformer.runtime import weights as W
from slimformer.runtime.weights import RtLinear

ACTIVATIONS = ("fp32", "int8")  # how decode multiplies quantised weights (see NativeDecoder.from_model)
HEADS = ("model", "int8")  # the LM head as the model has it, or rounded to int8


class GenerationError(SlimformerError):
    """Bad generation input: prompt too long, bad sampling options, ..."""


# ----------------------------------------------------------------------- ctypes mirror (kernels/abi.py)
_P = ctypes.c_void_p
_CLinear, _CLayer, _CScratch, _CModel = CLinear, CLayer, CScratch, CModel


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _c_linear(lin: RtLinear) -> _CLinear:
    return _CLinear(lin.kind, lin.N, lin.K, lin.gs, int(lin.half), _ptr(lin.w), _ptr(lin.scale), _ptr(lin.minv),
                    _ptr(lin.zero), _ptr(lin.bias), _ptr(lin.corr))


def native_available() -> tuple[bool, str]:
    """Whether the native decode library loads here, and if not, why (one line). The one
    check engine selection makes: ``SLIMFORMER_DISABLE_KERNELS=1``, a CPU without
    AVX2/FMA, no compiler or a failed build all answer ``(False, reason)``."""
    if kernels_disabled():   # read now: the library may have loaded before the switch was set
        return False, "the native library is disabled by SLIMFORMER_DISABLE_KERNELS"
    try:
        native_library()
    except Exception as exc:  # noqa: BLE001 - any failure to build or load means: not available
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return False, f"the native library is unavailable: {first}"
    return True, ""


def native_library() -> ctypes.CDLL:
    """The native library (slimformer.kernels, built once and cached); raises RuntimeError if unavailable."""
    from slimformer import kernels

    return kernels.library()


# ----------------------------------------------------------------------- the model
@dataclass
class Layer:
    attn_norm: torch.Tensor
    qkv: RtLinear
    o: RtLinear
    mlp_norm: torch.Tensor
    gate_up: RtLinear
    down: RtLinear
    q_norm: torch.Tensor | None = None  # [head_dim] per-head RMSNorm weights (Qwen3)
    k_norm: torch.Tensor | None = None
    window: int | None = None  # sliding window (Mistral): the last `window` positions

    def linears(self) -> list[RtLinear]:
        return [self.qkv, self.o, self.gate_up, self.down]


@dataclass
class NativeSession:
    """A preallocated KV cache and scratch for up to ``batch`` sequences of ``max_len``
    tokens (implements :class:`slimformer.runtime.engine.Session`)."""

    batch: int
    max_len: int
    k_cache: torch.Tensor  # [layers, batch, kv heads, max_len, head_dim]
    v_cache: torch.Tensor
    lengths: list[int]
    logits: torch.Tensor  # [batch, vocab]
    tokens: torch.Tensor  # [batch] int64
    positions: torch.Tensor  # [batch] int32
    buffers: dict = field(default_factory=dict)
    c_model: _CModel | None = None


Session = NativeSession  # the name this type had before the engine protocol


class NativeDecoder:
    """A Llama-family decoder held in runtime formats (see :mod:`slimformer.runtime.weights`);
    implements :class:`slimformer.runtime.engine.Engine`."""

    name = "native"

    def __init__(self, spec: DecoderSpec, layers: list[Layer], final_norm: torch.Tensor, lm_head: RtLinear,
                 embed: RtLinear, inv_freq: torch.Tensor, attention_scaling: float = 1.0,
                 activations: str = "fp32"):
        if activations not in ACTIVATIONS:
            raise GenerationError(f"unknown activations '{activations}' (choose from {', '.join(ACTIVATIONS)})")
        self.activations = activations
        self.spec = spec
        self.layers, self.final_norm, self.lm_head, self.embed = layers, final_norm, lm_head, embed
        self.hidden = spec.hidden
        self.n_heads = spec.n_heads
        self.n_kv = spec.n_kv_heads
        self.head_dim = spec.head_dim
        self.inter = layers[0].gate_up.N // 2
        self.vocab = lm_head.N
        self.max_positions = spec.max_positions
        self.eps = float(spec.norm_eps)
        self.inv_freq = inv_freq.float()
        self.attention_scaling = float(attention_scaling)
        self._cos, self._sin = self._rope_tables(self.max_positions)
        self._layer_structs = (_CLayer * len(layers))(*[
            _CLayer(_ptr(l.attn_norm), _c_linear(l.qkv), _c_linear(l.o), _ptr(l.mlp_norm), _c_linear(l.gate_up),
                    _c_linear(l.down), _ptr(l.q_norm), _ptr(l.k_norm), int(l.window or 0)) for l in layers])
        self._linear_structs = {id(lin): _c_linear(lin) for l in layers for lin in l.linears()}
        self._linear_structs[id(lm_head)] = _c_linear(lm_head)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model, gguf_path: str | Path | None = None, activations: str = "fp32",
                   head: str = "model") -> "NativeDecoder":
        """Build from a loaded HF model (nn.Linear or QuantLinear projections). With
        ``gguf_path`` the linear weights come from that file's own quantised blocks.
        ``activations``: how decode multiplies int4/int8 weights — ``fp32`` (exact: the
        dequantised model's arithmetic) or ``int8`` (activations rounded per block of 32,
        integer dot products as in llama.cpp: faster, a small rounding error).
        ``head``: ``model`` keeps the LM head as the model has it; ``int8`` rounds an fp32
        head to int8 per output row (RTN, symmetric), as llama.cpp ships Q8_0 heads: the
        head is a fifth of SmolLM2's weights, so in fp32 it alone costs 113 MB per token."""
        if head not in HEADS:
            raise GenerationError(f"unknown head '{head}' (choose from {', '.join(HEADS)})")
        check_supported(model)
        ok, why = native_available()
        if not ok:
            raise GenerationError(f"native engine unavailable: {why}")
        adapter = adapter_for(model)
        spec = adapter.decoder_spec(model)
        blocks = adapter.get_blocks(model)
        gguf = _gguf_linears(gguf_path, spec, adapter) if gguf_path is not None else {}

        def matching(lin: RtLinear, module) -> RtLinear:
            """A GGUF matrix stands in for ``module`` only with its exact shape (the kernels
            trust N and K)."""
            want = _matrix_shape(module)
            if (lin.N, lin.K) != want:
                raise ModelLoadError(f"{gguf_path}: GGUF tensor for {lin.name} is [{lin.N}, {lin.K}], "
                                     f"but the model's is {list(want)}")
            return lin

        def lin(i: int, name: str) -> RtLinear:
            full = f"{adapter.blocks}.{i}.{name}"
            if full in gguf:
                return matching(gguf[full], blocks[i].get_submodule(name))
            return W.from_module(full, blocks[i].get_submodule(name))

        def weight(module_or_block, path: str | None) -> torch.Tensor | None:
            if path is None:
                return None
            return module_or_block.get_submodule(path).weight.detach().float().contiguous()

        layers = []
        for i, block in enumerate(blocks):
            layers.append(Layer(
                attn_norm=weight(block, adapter.attn_norm),
                qkv=W.concat(f"{adapter.blocks}.{i}.qkv", [lin(i, n) for n in adapter.attention_in]),
                o=lin(i, adapter.attention_out[0]),
                mlp_norm=weight(block, adapter.mlp_norm),
                gate_up=W.concat(f"{adapter.blocks}.{i}.gate_up", [lin(i, n) for n in adapter.mlp_in]),
                down=lin(i, adapter.mlp_out[0]),
                q_norm=weight(block, adapter.q_norm), k_norm=weight(block, adapter.k_norm),
                window=spec.sliding_windows[i],
            ))
        emb_module = model.get_submodule(adapter.embed_tokens)
        head_module = model.get_submodule(adapter.lm_head) if adapter.lm_head else None
        emb_weight = getattr(emb_module, "weight", None)
        # tied: one table (a dense Parameter shared by both, or an int8 head reading the embedding's codes)
        tied = head_module is not None and (getattr(head_module, "embedding", None) is emb_module or (
            emb_weight is not None and getattr(head_module, "weight", None) is emb_weight))
        for key, module in (("lm_head", head_module), ("embed_tokens", emb_module)):
            if key in gguf:
                matching(gguf[key], module if module is not None else emb_module)
        if "lm_head" in gguf:
            lm_head = gguf["lm_head"]
        elif tied and "embed_tokens" in gguf:
            lm_head = gguf["embed_tokens"]
        else:
            lm_head = W.from_module("lm_head", head_module)
        rounded_here = head == "int8" and lm_head.kind == W.F32
        if rounded_here:  # the embedding stays exact: only the head's matvec gets cheaper
            lm_head = W.quantize_rtn("lm_head", lm_head.w, lm_head.bias, bits=8)
        if "embed_tokens" in gguf and gguf["embed_tokens"].kind in (W.F32, W.Q8):
            embed = gguf["embed_tokens"]
        elif tied and not rounded_here and lm_head.kind in (W.F32, W.Q8):
            embed = lm_head  # one copy of the tied table: rows looked up, the same bytes multiplied
        elif isinstance(emb_module, QuantEmbedding):
            embed = emb_module.matrix("embed_tokens")   # Q8 rows, looked up (the decoder dequantises them)
        else:
            embed = W.from_dense("embed_tokens", emb_module.weight, None)
        rotary = model.get_submodule(adapter.rotary)
        inv_freq = getattr(rotary, "inv_freq", None)
        if inv_freq is None:  # the default RoPE from theta (what HF's default initialisation computes)
            inv_freq = 1.0 / spec.rope_theta ** (torch.arange(0, spec.head_dim, 2, dtype=torch.int64).float()
                                                 / spec.head_dim)
        return cls(spec, layers, weight(model, adapter.final_norm), lm_head, embed, inv_freq.detach(),
                   getattr(rotary, "attention_scaling", 1.0), activations)

    def _rope_tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        # The same float ops as HF's LlamaRotaryEmbedding, so positions match exactly.
        freqs = torch.arange(n, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        return ((freqs.cos() * self.attention_scaling).contiguous(),
                (freqs.sin() * self.attention_scaling).contiguous())

    # ------------------------------------------------------------------ sizes
    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads (every linear once, plus the norms)."""
        total = sum(lin.nbytes() for l in self.layers for lin in l.linears()) + self.lm_head.nbytes()
        return total + 4 * (len(self.layers) * 2 + 1) * self.hidden

    def describe(self) -> dict:
        kinds = sorted({W.KIND_NAMES[lin.kind] for l in self.layers for lin in l.linears()})
        return {"engine": "native", "layers": kinds, "lm_head": W.KIND_NAMES[self.lm_head.kind],
                "activations": self.activations,
                "bytes_per_token": self.weight_bytes_per_token()}

    # ------------------------------------------------------------------ sessions
    def new_session(self, batch: int, max_len: int) -> NativeSession:
        """Allocate the KV cache and every scratch buffer once, for a whole generation."""
        if max_len > self.max_positions:
            raise GenerationError(f"{max_len} tokens exceed the model's context of {self.max_positions}")
        L, D, hd = len(self.layers), self.hidden, self.head_dim
        k = torch.zeros(L, batch, self.n_kv, max_len, hd)
        v = torch.zeros_like(k)
        max_k = max(D, self.inter, self.n_heads * hd)
        buf = {
            "x": torch.empty(batch, D), "qkv": torch.empty(batch, (self.n_heads + 2 * self.n_kv) * hd),
            "att": torch.empty(batch, self.n_heads * hd), "gu": torch.empty(batch, 2 * self.inter),
            "act": torch.empty(batch, self.inter), "scores": torch.empty(batch, self.n_heads, max_len),
        }
        threads = max(1, torch.get_num_threads())
        per_thread = [{
            "h": torch.empty(batch, max_k), "xg": torch.empty(batch, max_k // 16 + 1),
            "xb": torch.empty(batch, max_k // 32 + 1), "qx": torch.empty(batch, max_k, dtype=torch.int8),
            "sx": torch.empty(batch, max_k // 32 + 1), "qsum": torch.empty(batch, dtype=torch.int32),
        } for _ in range(threads)]
        scratch = (_CScratch * threads)(*[_CScratch(*[_ptr(t[n]) for n in ("h", "xg", "xb", "qx", "sx", "qsum")])
                                          for t in per_thread])
        buf["per_thread"], buf["scratch_structs"] = per_thread, scratch
        sess = NativeSession(batch, max_len, k, v, [0] * batch, torch.empty(batch, self.vocab),
                       torch.zeros(batch, dtype=torch.int64), torch.zeros(batch, dtype=torch.int32), buf)
        sess.c_model = _CModel(
            L, D, self.n_heads, self.n_kv, hd, self.inter, self.vocab, max_len, batch, self.max_positions, self.eps,
            int(self.activations == "int8"), threads, ctypes.addressof(self._layer_structs), _ptr(self.final_norm),
            _c_linear(self.lm_head), _c_linear(self.embed), _ptr(self._cos), _ptr(self._sin), _ptr(k), _ptr(v),
            *[_ptr(buf[n]) for n in ("x", "qkv", "att", "gu", "act", "scores")], ctypes.addressof(scratch))
        return sess

    # ------------------------------------------------------------------ prefill (torch)
    def _matmul(self, x: torch.Tensor, lin: RtLinear) -> torch.Tensor:
        lib = native_library()
        struct = self._linear_structs.get(id(lin)) or _c_linear(lin)

        def dequant_rows(_lin, n0, n1, out):
            lib.sf_dequant_rows(ctypes.byref(struct), n0, n1, out.data_ptr(), torch.get_num_threads())

        return W.dense_matmul(x, lin, dequant_rows)

    def _embed_rows(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.embed
        if e.kind == W.F32:
            return F.embedding(ids, e.w)
        return W.select_rows(e, ids).dequantize()

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def _head_rms(self, t: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        """Qwen3's per-head RMSNorm over the last (head) dimension; identity without weights."""
        return t if w is None else self._rms(t, w)

    @staticmethod
    def _window_mask(n: int, window: int | None) -> torch.Tensor | None:
        """Causal mask restricted to the last ``window`` positions (HF: kv > q - window),
        or None when plain causal attention is the same thing."""
        if window is None or n <= window:
            return None
        i = torch.arange(n)
        return (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)

    def _rope(self, t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        c, s = self._cos[pos][:, None, :], self._sin[pos][:, None, :]
        h = t.shape[-1] // 2
        a, b = t[..., :h], t[..., h:]
        return torch.cat([a * c - b * s, b * c + a * s], dim=-1)

    def _forward_packed(self, sess: NativeSession | None, seqs: list[list[int]], rows: list[int]) -> torch.Tensor:
        """Run sequences (concatenated, no padding) from position 0; write their K/V into
        ``sess`` rows ``rows``. Returns the final hidden states ``[total tokens, hidden]``."""
        lengths = [len(s) for s in seqs]
        ids = torch.tensor([t for s in seqs for t in s], dtype=torch.int64)
        pos = torch.cat([torch.arange(n) for n in lengths])
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        x = self._embed_rows(ids)
        T = x.shape[0]
        for li, layer in enumerate(self.layers):
            h = self._rms(x, layer.attn_norm)
            qkv = self._matmul(h, layer.qkv)
            q = self._rope(self._head_rms(qkv[:, : nh * hd].reshape(T, nh, hd), layer.q_norm), pos)
            k = self._rope(self._head_rms(qkv[:, nh * hd: (nh + nkv) * hd].reshape(T, nkv, hd), layer.k_norm), pos)
            v = qkv[:, (nh + nkv) * hd:].reshape(T, nkv, hd)
            out = torch.empty(T, nh * hd)
            for i, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
                qi, ki, vi = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
                if sess is not None:
                    sess.k_cache[li, rows[i], :, : b - a] = ki[0]
                    sess.v_cache[li, rows[i], :, : b - a] = vi[0]
                mask = self._window_mask(b - a, layer.window)
                if mask is None:
                    o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=nh != nkv)
                else:
                    o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, enable_gqa=nh != nkv)
                out[a:b] = o[0].transpose(0, 1).reshape(b - a, nh * hd)
            x = x + self._matmul(out, layer.o)
            gu = self._matmul(self._rms(x, layer.mlp_norm), layer.gate_up)
            x = x + self._matmul(F.silu(gu[:, : self.inter]) * gu[:, self.inter:], layer.down)
        return x

    @torch.inference_mode()
    def prefill(self, sess: NativeSession, seqs: list[list[int]]) -> torch.Tensor:
        """Fill the cache with ``seqs`` (one per session row, from position 0) and return
        the logits of each sequence's last token ``[len(seqs), vocab]``."""
        if len(seqs) > sess.batch:
            raise GenerationError(f"{len(seqs)} prompts for a session of {sess.batch}")
        for s in seqs:
            if not s:
                raise GenerationError("empty prompt: give at least one token")
            if len(s) > sess.max_len:
                raise GenerationError(f"prompt of {len(s)} tokens exceeds the session's {sess.max_len}")
        x = self._forward_packed(sess, seqs, list(range(len(seqs))))
        ends = torch.tensor([sum(len(s) for s in seqs[: i + 1]) - 1 for i in range(len(seqs))])
        for i, s in enumerate(seqs):
            sess.lengths[i] = len(s)
        return self._matmul(self._rms(x[ends], self.final_norm), self.lm_head)

    @torch.inference_mode()
    def forward_logits(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Logits at every position of one sequence ``[T, vocab]`` (no cache kept): the
        path perplexity is measured on."""
        seq = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        x = self._forward_packed(None, [seq], [0])
        return self._matmul(self._rms(x, self.final_norm), self.lm_head)

    def native_linear(self, sess: NativeSession, lin: RtLinear, x: torch.Tensor) -> torch.Tensor:
        """``x [M, K] @ W^T`` through the decode kernel (M <= the session's batch), for
        tests and benchmarks; the decode step calls the same code."""
        x = x.float().contiguous()
        if x.shape[0] > sess.batch:
            raise GenerationError(f"{x.shape[0]} rows for a session of {sess.batch}")
        y = torch.empty(x.shape[0], lin.N)
        struct = self._linear_structs.get(id(lin)) or _c_linear(lin)
        native_library().sf_linear(ctypes.addressof(sess.c_model), ctypes.byref(struct), x.data_ptr(), x.shape[0],
                                   y.data_ptr(), torch.get_num_threads())
        return y

    # ------------------------------------------------------------------ decode (native)
    def decode(self, sess: NativeSession, tokens: list[int] | torch.Tensor) -> torch.Tensor:
        """Append one token to each of the first ``len(tokens)`` sequences; returns their
        next-token logits ``[B, vocab]`` (a view of the session's buffer)."""
        B = len(tokens)
        for b in range(B):
            if sess.lengths[b] >= sess.max_len:
                raise GenerationError(f"sequence {b} reached the session's {sess.max_len} tokens")
            sess.positions[b] = sess.lengths[b]
            sess.lengths[b] += 1
        sess.tokens[:B] = torch.as_tensor(tokens, dtype=torch.int64)
        native_library().sf_decode_step(ctypes.addressof(sess.c_model), B, sess.tokens.data_ptr(),
                                        sess.positions.data_ptr(), sess.logits.data_ptr(), torch.get_num_threads())
        return sess.logits[:B]


# ----------------------------------------------------------------------- support checks
_ROPE_TYPES = ("default", "linear", "llama3")  # a fixed inv_freq table, as the rotary module holds it


def check_supported(model) -> None:
    """Raise UnsupportedArchitectureError (one line, naming the feature) when the native
    decoder cannot run ``model``; callers then fall back to the Hugging Face path. Every
    fact comes from the model's adapter."""
    adapter = adapter_for(model)
    spec = adapter.decoder_spec(model) if adapter.is_decoder else None
    what = spec.model_type if spec is not None else adapter.family

    def no(feature: str) -> None:
        raise UnsupportedArchitectureError(
            f"native decoder runs Llama-family decoders (RMSNorm, RoPE, gated SiLU MLP); {what} {feature}")

    if spec is None:
        no("is not a decoder")
    missing = [n for n in ("embed_tokens", "final_norm", "rotary", "attn_norm", "mlp_norm")
               if getattr(adapter, n) is None]
    if missing:
        no(f"has no RoPE/RMSNorm pre-norm layout (its adapter names no {', '.join(missing)})")
    if len(adapter.attention_in) != 3 or len(adapter.mlp_in) != 2:
        no("has no separate q/k/v and gate/up projections")
    if spec.mlp != "gated_silu":
        no(f"uses a {spec.mlp} MLP, not gated SiLU")
    if spec.norm != "rms":
        no(f"uses {spec.norm} norms, not RMSNorm")
    if spec.rope_type not in _ROPE_TYPES:
        no(f"uses {spec.rope_type} RoPE (supported: {', '.join(_ROPE_TYPES)})")
    if spec.head_dim % 2:
        no(f"has an odd head dimension ({spec.head_dim})")


# ----------------------------------------------------------------------- GGUF blocks
def _gguf_row_order(n_rows: int, n_head: int) -> torch.Tensor:
    """llama.cpp's converter interleaves the two RoPE halves of each Q/K head; this is
    the row order transformers' GGUF loader restores (so ours matches its weights)."""
    idx = torch.arange(n_rows)
    return idx.reshape(n_head, n_rows // n_head // 2, 2).transpose(1, 2).reshape(-1)


def _gguf_linears(path: str | Path, spec: DecoderSpec, adapter) -> dict[str, RtLinear]:
    """Linear weights of a Llama GGUF file, repacked block for block (no requantisation);
    tensor names mapped to projections by the adapter."""
    import gguf

    names, blocks = dict(adapter.gguf_linears), adapter.blocks
    if not names:
        raise UnsupportedArchitectureError(f"no GGUF tensor names known for {spec.model_type}")
    check_gguf(path)   # sizes, offsets, counts and types, before the reader maps anything
    reader = gguf.GGUFReader(str(path))
    out: dict[str, RtLinear] = {}
    n_head, n_kv = spec.n_heads, spec.n_kv_heads
    for t in reader.tensors:
        parts = t.name.split(".")
        qtype = t.tensor_type.name
        K, N = int(t.shape[0]), int(t.shape[1]) if len(t.shape) > 1 else 1
        is_linear = len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in names \
            and parts[3] == "weight"
        if (is_linear or t.name in ("token_embd.weight", "output.weight")) and len(t.shape) != 2:
            raise ModelLoadError(f"{path}: GGUF tensor {t.name!r} dims: {len(t.shape)} dims, expected a matrix")
        if is_linear:
            name = f"{blocks}.{parts[1]}.{names[parts[2]]}"
            lin = W.from_gguf_tensor(name, qtype, t.data, N, K)
            if parts[2] in ("attn_q", "attn_k"):
                heads = n_head if parts[2] == "attn_q" else n_kv
                if N % (2 * heads):
                    raise ModelLoadError(f"{path}: GGUF tensor {t.name!r} dims: {N} rows are not {heads} heads "
                                         "of an even size")
                lin = W.select_rows(lin, _gguf_row_order(N, heads))
            out[name] = lin
        elif t.name == "token_embd.weight":
            out["embed_tokens"] = W.from_gguf_tensor("embed_tokens", qtype, t.data, N, K)
        elif t.name == "output.weight":
            out["lm_head"] = W.from_gguf_tensor("lm_head", qtype, t.data, N, K)
    return out


def _matrix_shape(module) -> tuple[int, int]:
    """(rows, columns) of a linear or embedding module's weight matrix."""
    if hasattr(module, "out_features") and hasattr(module, "in_features"):
        return int(module.out_features), int(module.in_features)
    if hasattr(module, "num_embeddings"):
        return int(module.num_embeddings), int(module.embedding_dim)
    weight = module.weight
    return int(weight.shape[0]), int(weight.shape[1])


def gguf_source_path(source: str) -> Path | None:
    """The .gguf file behind a model source (a built-in or a path), else None."""
    from slimformer.models.builtin import BUILTINS, builtin_path

    path = builtin_path(source) if source in BUILTINS else Path(source).expanduser()
    return path if path.is_file() and path.suffix == ".gguf" else None


def roofline_tokens_per_s(bytes_per_token: int, bandwidth_bytes_per_s: float) -> float:
    return bandwidth_bytes_per_s / bytes_per_token if bytes_per_token else math.inf
