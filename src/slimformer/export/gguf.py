"""The GGUF exporter: one file llama.cpp (and transformers' GGUF loader) reads.

Llama family (``llama``, and ``mistral`` without an active sliding window), written as
llama.cpp's ``llama`` architecture:

- every compressed linear's :meth:`matrix` description goes into a GGUF block type
  **without requantising** when one holds it exactly: 4-bit (and 2-3-bit) symmetric codes
  -> Q4_0, asymmetric -> Q4_1, 5-8-bit symmetric -> Q8_0, for any group size that is a
  multiple of 32 (a group of 64, or one scale per row, is its scale repeated in each of
  its 32-column blocks: the same numbers), with float16 scales. Q4_1 stores its offset
  ``m = -zero * scale`` as float16; where that product is not a float16 value it is
  rounded (codes and scales stay exact), warned and recorded in ``slimformer.rounded_offsets``;
- a quantised layer no GGUF type holds (groups not a multiple of 32, asymmetric 8-bit,
  activation formats, centroid tables, ...) is refused with one line naming it, unless
  ``requantize=True``: then its dequantised weight is quantised again by the ``gguf``
  package (llama.cpp's reference rounding) to the nearest type, warned and recorded in
  ``slimformer.requantized``;
- dense 2-D weights are written in ``outtype`` (f32, f16 default, q8_0, q4_0, q4_1; the
  quantised ones by the ``gguf`` package), 1-D tensors (norms) in F32;
- an embedding module with a ``matrix()`` (a quantised table) is written as its blocks
  too; a tied LM head gets no ``output`` tensor (llama.cpp reads ``token_embd`` for it);
- Q and K rows are permuted into llama.cpp's rotary order (each head's two RoPE halves
  interleaved) by :meth:`CompressedMatrix.select_rows`: codes are moved, not requantised;
- tokenizer metadata: copied verbatim (every ``tokenizer.*`` key) from the GGUF the model
  came from when there is one, else built from the fast (byte-level BPE) tokenizer.

The file is written to a temporary path next to ``out`` and renamed.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from slimformer.errors import ExportError, ModelLoadError, SlimformerError, UnsupportedArchitectureError
from slimformer.export import register_exporter
from slimformer.formats.gguf import GGUF_BLOCK, to_gguf_blocks
from slimformer.formats.matrix import F32, Q4, Q8, CompressedMatrix, NotNative, from_dense, pack_nibbles
from slimformer.models.adapters import adapter_for
from slimformer.nn.base import CompressedModule
from slimformer.util.atomic import atomic_file

OUTTYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")
ARCHITECTURES = ("llama", "mistral")
_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}
# token types (llama.cpp's llama_token_type)
_NORMAL, _UNUSED, _CONTROL, _USER_DEFINED = 1, 5, 3, 4


class GGUFExportWarning(UserWarning):
    """A layer written differently from the model's own numbers (requantised, rounded)."""


# ----------------------------------------------------------------------- row order
def rotary_row_order(n_rows: int, n_head: int) -> torch.Tensor:
    """Rows of a Hugging Face Q/K projection in llama.cpp's order: GGUF row ``g`` is HF row
    ``order[g]``. Each head's rows ``[first half | second half]`` of the rotary dimension
    become interleaved pairs (llama.cpp rotates adjacent pairs); transformers' GGUF
    loader undoes exactly this when it reads the file."""
    if n_rows % (2 * n_head):
        raise ExportError(f"{n_rows} Q/K rows do not split into {n_head} heads of an even size")
    return torch.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).transpose(1, 2).reshape(-1)


# ----------------------------------------------------------------------- block types
def exact_blocks(m: CompressedMatrix) -> tuple[str, np.ndarray, str | None]:
    """``(GGUF type, data, note)`` holding ``m`` without requantising its codes, or
    :class:`NotNative` (with why) when no GGUF type holds it. ``note`` is set when a Q4_1
    offset had to be rounded to float16 (the codes and scales are exact; the note says by
    how much the weights moved)."""
    why = _no_exact_type(m)
    if why:
        raise NotNative(why)
    if m.kind == F32:
        return (*to_gguf_blocks(m), None)
    reps = m.gs // GGUF_BLOCK
    G = m.K // GGUF_BLOCK

    def per_block(t):   # [N, groups] -> [N, K/32]: each group's value in each of its blocks
        return None if t is None else t.reshape(m.N, -1).repeat_interleave(reps, dim=1).contiguous()

    scale = per_block(m.scale.float()).half()
    offset = m.offset()
    offset = None if offset is None else per_block(offset)
    if m.kind == Q8:
        q = m.w
        if offset is not None and bool(offset.any()):
            shift = (offset / scale.float()).round()
            q = (m.w.to(torch.int16).reshape(m.N, G, GGUF_BLOCK) + shift.to(torch.int16)[..., None]).reshape(m.N, m.K)
            q = q.to(torch.int8)
        b = m.replace(gs=GGUF_BLOCK, w=q.contiguous(), scale=scale, minv=None, zero=None)
        return (*to_gguf_blocks(b), None)
    # Q4
    zero_point = None if offset is None else -offset / scale.float()   # integers where the grid is
    if zero_point is not None and torch.equal(zero_point, zero_point.round()) and bool((zero_point == 8).all()):
        b = m.replace(gs=GGUF_BLOCK, scale=scale, minv=-8.0 * scale, zero=None)
        return (*to_gguf_blocks(b), None)
    if zero_point is not None and _shiftable_to_q4_0(m, zero_point):
        codes = m.codes().to(torch.int16).reshape(m.N, G, GGUF_BLOCK) + (8 - zero_point).to(torch.int16)[..., None]
        b = m.replace(gs=GGUF_BLOCK, w=pack_nibbles(codes.reshape(m.N, m.K)), scale=scale, minv=-8.0 * scale,
                      zero=None)
        return (*to_gguf_blocks(b), None)
    if offset is None:
        offset = torch.zeros(m.N, G)
    rounded = offset.half()
    note = None
    if not torch.equal(rounded.float(), offset):
        step = (rounded.float() - offset).abs() / scale.float().clamp_min(torch.finfo(torch.float16).tiny)
        note = (f"Q4_1 offsets (-zero x scale) rounded to float16: weights moved by at most "
                f"{float((rounded.float() - offset).abs().max()):.3g} ({float(step.max()):.2g} of a step)")
    b = m.replace(gs=GGUF_BLOCK, scale=scale, minv=rounded, zero=None)
    return (*to_gguf_blocks(b), note)


def _shiftable_to_q4_0(m: CompressedMatrix, zero_point: torch.Tensor) -> bool:
    """Symmetric 2-3-bit codes (zero-point 2 or 4) fit Q4_0 once shifted by ``8 - zero``."""
    if not torch.equal(zero_point, zero_point.round()):
        return False
    codes = m.codes().to(torch.int16).reshape(m.N, -1, GGUF_BLOCK)
    shifted = codes + (8 - zero_point).to(torch.int16)[..., None]
    return bool(shifted.min() >= 0) and bool(shifted.max() <= 15) and bool(m.symmetric)


def _no_exact_type(m: CompressedMatrix) -> str | None:
    """Why no GGUF block type holds ``m`` as it is (None: one does)."""
    if m.kind == F32:
        return None
    if m.kind not in (Q8, Q4):
        return f"{m.format} quantises activations too (GGUF blocks hold weights only)"
    if m.K % GGUF_BLOCK or m.gs % GGUF_BLOCK:
        return f"groups of {m.gs} over {m.K} columns are not whole {GGUF_BLOCK}-column blocks"
    scale = m.scale.float()
    if not (torch.isfinite(scale.half()).all() and torch.equal(scale.half().float(), scale)):
        return "its scales are not float16 values"
    if m.kind == Q8:
        offset = m.offset()
        if offset is not None and bool(offset.any()):
            G = m.groups
            shift = offset / scale
            if not torch.equal(shift, shift.round()):
                return "8-bit codes with an offset (Q8_0 has none)"
            q = m.w.to(torch.int16).reshape(m.N, G, m.gs) + shift.round().to(torch.int16)[..., None]
            if bool(q.min() < -128) or bool(q.max() > 127):
                return "asymmetric 8-bit codes (zero-points) do not fit Q8_0's signed int8"
    return None


def nearest_type(module, m: CompressedMatrix | None) -> str:
    """The GGUF type a layer that does not fit exactly is requantised to."""
    spec = getattr(module, "weight_spec", None) or getattr(getattr(module, "inner", None), "weight_spec", None)
    bits = spec.bits if spec is not None else (m.bits if m is not None else 8)
    symmetric = spec.symmetric if spec is not None else (m.symmetric if m is not None else True)
    if bits <= 4:
        return "Q4_0" if symmetric is not False else "Q4_1"
    return "Q8_0"


def dense_blocks(weight: torch.Tensor, qtype: str) -> tuple[str, np.ndarray]:
    """A float ``[N, K]`` weight as ``qtype`` (F32, F16, or Q8_0/Q4_0/Q4_1 by the gguf
    package's quantiser: llama.cpp's reference rounding)."""
    import gguf

    w = weight.detach().float().contiguous().numpy()
    if qtype == "F32":
        return "F32", w
    if qtype == "F16":
        return "F16", w.astype(np.float16)
    data = gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])
    return qtype, np.ascontiguousarray(data, dtype=np.uint8)


def _describe(module, m: CompressedMatrix | None) -> str:
    spec = getattr(module, "weight_spec", None)
    what = type(module).__name__
    if spec is not None:
        what += f" {spec.describe()}"
    if getattr(module, "act_spec", None) is not None:
        what += f" a{module.act_spec.bits}"
    elif m is not None and spec is None:
        what += f" {m.format} g{m.gs}"
    return what


# ----------------------------------------------------------------------- the exporter
class _Plan:
    """The tensors of one file and what was done differently from the model's numbers."""

    def __init__(self, outtype: str, requantize: bool):
        self.outtype, self.requantize = outtype, requantize
        self.tensors: list[tuple[str, str, np.ndarray]] = []
        self.requantized: list[str] = []
        self.rounded: list[str] = []
        self.dense_fallbacks: list[str] = []
        self.linear_types: dict[str, int] = {}
        self.pre_guessed = False

    def add(self, name: str, qtype: str, data: np.ndarray, linear: bool = True) -> None:
        self.tensors.append((name, qtype, data))
        if linear:
            self.linear_types[qtype] = self.linear_types.get(qtype, 0) + int(data.nbytes)

    def warn(self, message: str) -> None:
        warnings.warn(message, GGUFExportWarning, stacklevel=4)

    def warn_summary(self) -> None:
        """One warning per kind of difference (each layer is listed in the file's metadata)."""
        for items, what, key in (
                (self.requantized, "requantised (no exact GGUF type)", "slimformer.requantized"),
                (self.rounded, "written with Q4_1 offsets rounded to float16 (codes and scales exact)",
                 "slimformer.rounded_offsets"),
                (self.dense_fallbacks, "written as F16 instead of the outtype", "slimformer.dense_fallbacks")):
            if items:
                more = f" and {len(items) - 1} more" if len(items) > 1 else ""
                self.warn(f"slimformer: GGUF export: {len(items)} layer(s) {what}: {items[0]}{more} (listed in the "
                          f"file's {key})")

    def matrix(self, tensor: str, label: str, module, rows: torch.Tensor | None = None) -> None:
        """Write one weight matrix (a linear layer or an embedding table)."""
        m, why_not = _matrix_of(label, module)
        quantised = _is_quantised(module, m, why_not)
        if m is not None and rows is not None:
            m = m.select_rows(rows)
        if m is not None and m.kind != F32:
            why = why_not or _no_exact_type(m)
            if why is None:
                qtype, data, note = exact_blocks(m)
                if note:
                    self.rounded.append(f"{label}: {note}")
                self.add(tensor, qtype, data)
                return
            why_not = why
        if quantised:
            target = nearest_type(module, m)
            fits = "Q4_0 / Q4_1 / Q8_0 hold codes of up to 4 or 8 bits with float16 scales per group of a multiple " \
                   "of 32 columns"
            if not self.requantize:
                raise ExportError(f"layer {label} ({_describe(module, m)}) has no exact GGUF block type: {why_not}; "
                                  f"{fits}; pass --requantize to requantise it to {target}")
            weight = _dense_weight(label, module, m)
            if rows is not None and m is None:
                weight = weight[rows]
            if weight.shape[-1] % GGUF_BLOCK:   # no block type at all: the nearest is F16
                target = "F16"
            qtype, data = dense_blocks(weight, target)
            self.requantized.append(f"{label}: {_describe(module, m)} -> {qtype} ({why_not})")
            self.add(tensor, qtype, data)
            return
        weight = m.w if m is not None else _dense_weight(label, module, None)
        if m is None and rows is not None:
            weight = weight[rows]
        self.dense(tensor, label, weight)

    def dense(self, tensor: str, label: str, weight: torch.Tensor) -> None:
        qtype = self.outtype.upper()
        if qtype in ("Q8_0", "Q4_0", "Q4_1") and weight.shape[-1] % GGUF_BLOCK:
            self.dense_fallbacks.append(f"{label}: {weight.shape[-1]} columns are not whole blocks of "
                                        f"{GGUF_BLOCK}: F16 instead of {qtype}")
            qtype = "F16"
        self.add(tensor, *dense_blocks(weight, qtype))


def _matrix_of(label: str, module) -> tuple[CompressedMatrix | None, str | None]:
    """``(description, None)``, or ``(None, why not)`` for a compressed module without one,
    or ``(None, None)`` for a plain module (nn.Linear / nn.Embedding)."""
    if hasattr(module, "matrix"):   # a compressed layer or table describes itself
        try:
            return module.matrix(label), None
        except NotNative as exc:
            return None, exc.reason
    if isinstance(module, torch.nn.Linear):
        return from_dense(label, module.weight, module.bias), None
    if isinstance(module, torch.nn.Embedding):
        return from_dense(label, module.weight, None), None
    return None, None


def _is_quantised(module, m: CompressedMatrix | None, why_not: str | None) -> bool:
    """Whether the layer's numbers are a quantisation (not fitting: refused or requantised)
    rather than float values (pruned, smoothed: written in ``outtype`` like any dense layer)."""
    if m is not None and m.kind != F32:
        return True
    if getattr(module, "weight_spec", None) is not None or getattr(module, "act_spec", None) is not None:
        return True
    inner = getattr(module, "inner", None)
    if inner is not None and (getattr(inner, "weight_spec", None) is not None or hasattr(inner, "matrix")):
        return True
    if why_not is not None and not getattr(module, "dense_equivalent", True):
        return True
    return m is None and why_not is not None and not hasattr(module, "storage_dtype")


def _dense_weight(label: str, module, m: CompressedMatrix | None) -> torch.Tensor:
    if m is not None:
        return m.dequantize()
    if hasattr(module, "dequantized_weight"):
        return module.dequantized_weight().float()
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.detach().float()
    raise ExportError(f"layer {label} ({type(module).__name__}) has no weight matrix to write")


def _bias(module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, torch.Tensor) and bool(bias.detach().any()) else None


@register_exporter("gguf", "one GGUF file for llama.cpp (Llama family): quantised layers as Q4_0/Q4_1/Q8_0 blocks, "
                   "the rest in --outtype", options=("requantize", "outtype"), single_file=True)
def write_gguf(model, tokenizer, out: Path, *, overwrite: bool = False, requantize: bool = False,
               outtype: str | None = None) -> Path:
    """Write ``model`` as one GGUF file at ``out`` (see the module doc)."""
    import gguf

    outtype = (outtype or "f16").lower()
    if outtype not in OUTTYPES:
        raise ExportError(f"GGUF outtype '{outtype}' is not one of {', '.join(OUTTYPES)}")
    out = Path(out)
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ExportError(f"GGUF export knows the Llama family ({', '.join(ARCHITECTURES)}), not architecture "
                          f"'{model_type}'")
    try:
        adapter = adapter_for(model)
        spec = adapter.decoder_spec(model)
    except UnsupportedArchitectureError as exc:
        raise ExportError(f"GGUF export: {exc}") from None
    _check_llama(model, spec)
    plan = _Plan(outtype, requantize)

    blocks = adapter.get_blocks(model)
    names = dict(adapter.gguf_linears)
    handled: set[int] = set()
    emb = model.get_submodule(adapter.embed_tokens)
    head = model.get_submodule(adapter.lm_head) if adapter.lm_head else None
    plan.matrix("token_embd.weight", adapter.embed_tokens, emb)
    handled.add(id(emb))
    for i, block in enumerate(blocks):
        prefix = f"{adapter.blocks}.{i}"
        plan.add(f"blk.{i}.attn_norm.weight", "F32", _vector(block, adapter.attn_norm), linear=False)
        for gguf_name, path in names.items():
            module = block.get_submodule(path)
            label = f"{prefix}.{path}"
            bias = _bias(module)
            if bias is not None:
                raise ExportError(f"layer {label} has a bias; the GGUF llama architecture has none")
            rows = None
            if gguf_name == "attn_q":
                rows = rotary_row_order(module.out_features, spec.n_heads)
            elif gguf_name == "attn_k":
                rows = rotary_row_order(module.out_features, spec.n_kv_heads)
            plan.matrix(f"blk.{i}.{gguf_name}.weight", label, module, rows)
            handled.update(id(sub) for sub in module.modules())
            if gguf_name == "attn_output":
                plan.add(f"blk.{i}.ffn_norm.weight", "F32", _vector(block, adapter.mlp_norm), linear=False)
    plan.add("output_norm.weight", "F32", model.get_submodule(adapter.final_norm).weight.detach().float().numpy(),
             linear=False)
    if head is not None and not _tied(emb, head):
        plan.matrix("output.weight", adapter.lm_head, head)
    if head is not None:
        handled.update(id(sub) for sub in head.modules())
    handled.update(id(sub) for sub in emb.modules())
    for name, module in model.named_modules():
        if isinstance(module, CompressedModule) and id(module) not in handled:
            raise ExportError(f"module {name} ({type(module).__name__}) has no place in a GGUF llama file")

    tokenizer_keys, tokenizer_note = _tokenizer_metadata(model, tokenizer, spec.vocab, plan)
    plan.warn_summary()
    try:
        with atomic_file(out, overwrite) as tmp:
            writer = gguf.GGUFWriter(str(tmp), "llama")
            try:
                _write_header(writer, model, spec, plan, tokenizer_keys, tokenizer_note)
                for name, qtype, data in plan.tensors:
                    raw = None if qtype in ("F32", "F16") else gguf.GGMLQuantizationType[qtype]
                    writer.add_tensor(name, data, raw_dtype=raw)
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_tensors_to_file()
            finally:
                writer.close()
    except SlimformerError:
        raise
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot write {out}: {exc}") from None
    return out


def _tied(emb, head) -> bool:
    """Whether the LM head multiplies with the embedding table itself."""
    if head is emb:
        return True
    hw, ew = getattr(head, "weight", None), getattr(emb, "weight", None)
    if isinstance(hw, torch.Tensor) and hw is ew:
        return True
    if hasattr(head, "matrix") and hasattr(emb, "matrix") and not isinstance(head, torch.nn.Linear):
        try:
            a, b = head.matrix("lm_head"), emb.matrix("embed_tokens")
        except NotNative:
            return False
        return (a.kind, a.N, a.K, a.gs) == (b.kind, b.N, b.K, b.gs) and all(
            (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
            for x, y in ((a.w, b.w), (a.scale, b.scale), (a.offset(), b.offset())))
    return False


def _vector(block, path: str) -> np.ndarray:
    return block.get_submodule(path).weight.detach().float().contiguous().numpy()


def _check_llama(model, spec) -> None:
    """What the llama architecture of llama.cpp cannot express: refused (one line)."""
    config = model.config
    if spec.rope_type != "default":
        raise ExportError(f"GGUF export: {spec.rope_type} RoPE scaling is not written (default RoPE only)")
    if any(w is not None for w in spec.sliding_windows):
        raise ExportError(f"GGUF export: sliding-window attention ({config.model_type}) is not written by the llama "
                          "architecture")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ExportError(f"GGUF export: the llama architecture uses SiLU, this model {act}")
    if spec.norm != "rms":
        raise ExportError("GGUF export: the llama architecture uses RMSNorm")


def _source_gguf(model) -> Path | None:
    """The GGUF file the model was loaded or compressed from, if there is one."""
    from slimformer.runtime.decoder import gguf_source_path

    meta = getattr(model, "slimformer_meta", None) or {}
    candidates = []
    if meta.get("source"):
        candidates.append(str(meta["source"]))
    qc = getattr(model.config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) else getattr(qc, "to_dict", lambda: {})()
    if isinstance(qc, dict) and qc.get("gguf_file") and getattr(model.config, "_name_or_path", None):
        candidates.append(str(Path(model.config._name_or_path) / qc["gguf_file"]))
    for source in candidates:
        try:
            path = gguf_source_path(source)
        except ModelLoadError:
            path = None
        if path is not None:
            return path
    return None


def _tokenizer_metadata(model, tokenizer, vocab: int, plan: _Plan) -> tuple[list[tuple], str]:
    """``[(key, value, type, sub_type)]`` of the tokenizer and where they came from."""
    import gguf

    source = _source_gguf(model)
    if source is not None:
        reader = gguf.GGUFReader(str(source))
        keys = []
        for key, field in reader.fields.items():
            if not key.startswith("tokenizer."):
                continue
            main = field.types[0]
            if main == gguf.GGUFValueType.ARRAY:
                sub = field.types[-1]
                if sub == gguf.GGUFValueType.STRING:
                    value = [bytes(field.parts[i]) for i in field.data]
                else:
                    value = [field.parts[i].tolist()[0] for i in field.data]
                keys.append((key, value, main, sub))
            elif main == gguf.GGUFValueType.STRING:
                keys.append((key, bytes(field.parts[field.data[0]]), main, None))
            else:
                keys.append((key, field.parts[field.data[0]].tolist()[0], main, None))
        tokens = next((k for k in keys if k[0] == "tokenizer.ggml.tokens"), None)
        if tokens is not None and len(tokens[1]) == vocab:
            return keys, f"copied from {source.name}"
    return _tokenizer_from_hf(tokenizer, vocab, plan), "built from the Hugging Face tokenizer"


def _pre_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a byte-level BPE pre-tokenizer we recognise, else None."""
    if not pre:
        return None
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    return None


def _tokenizer_from_hf(tokenizer, vocab: int, plan: _Plan) -> list[tuple]:
    import gguf

    T = gguf.GGUFValueType
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("GGUF export needs a fast (tokenizers) tokenizer to write the vocabulary")
    state = json.loads(backend.to_str())
    bpe = state.get("model") or {}
    if bpe.get("type") != "BPE" or "ByteLevel" not in json.dumps(state.get("pre_tokenizer")):
        raise ExportError(f"GGUF export writes byte-level BPE tokenizers (gpt2), not a {bpe.get('type')} tokenizer "
                          f"with pre-tokenizer {(state.get('pre_tokenizer') or {}).get('type')}")
    tokens: list[str | None] = [None] * vocab
    types = [_NORMAL] * vocab
    for token, idx in bpe.get("vocab", {}).items():
        if idx >= vocab:
            raise ExportError(f"GGUF export: tokenizer token {token!r} has id {idx}, beyond the model's {vocab}")
        tokens[idx] = token
    for added in state.get("added_tokens") or []:
        idx = added["id"]
        if idx >= vocab:
            raise ExportError(f"GGUF export: added token {added['content']!r} has id {idx}, beyond the model's {vocab}")
        tokens[idx] = added["content"]
        types[idx] = _CONTROL if added.get("special") else _USER_DEFINED
    for idx, token in enumerate(tokens):
        if token is None:
            tokens[idx], types[idx] = f"[PAD{idx}]", _UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    pre = _pre_name(state.get("pre_tokenizer"))
    keys = [("tokenizer.ggml.model", "gpt2", T.STRING, None)]
    if pre is None:
        pre = "gpt-2"
        plan.pre_guessed = True
        plan.warn("slimformer: GGUF export: the tokenizer's pre-tokenizer is not one slimformer recognises; "
                  "tokenizer.ggml.pre is set to 'gpt-2' (recorded as slimformer.tokenizer_pre_guessed)")
    keys += [("tokenizer.ggml.pre", pre, T.STRING, None),
             ("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
             ("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32)]
    if merges:
        keys.append(("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING))
    for key, attr in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("unknown_token_id", "unk_token_id"), ("padding_token_id", "pad_token_id")):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int) and 0 <= value < vocab:
            keys.append((f"tokenizer.ggml.{key}", value, T.UINT32, None))
    bos = getattr(tokenizer, "bos_token_id", None)
    probe = tokenizer("a").input_ids if callable(tokenizer) else []
    keys.append(("tokenizer.ggml.add_bos_token", bool(bos is not None and probe and probe[0] == bos), T.BOOL, None))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        keys.append(("tokenizer.chat_template", template, T.STRING, None))
    return keys


def _write_header(writer, model, spec, plan: _Plan, tokenizer_keys: list[tuple], tokenizer_note: str) -> None:
    import gguf

    from slimformer._version import __version__

    T = gguf.GGUFValueType
    config = model.config
    meta = getattr(model, "slimformer_meta", None) or {}
    name = str(getattr(config, "_model_name_or_path", None) or Path(str(getattr(config, "_name_or_path", "") or
                                                                         "model")).name)
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(spec.max_positions)
    writer.add_embedding_length(spec.hidden)
    writer.add_block_count(spec.n_layers)
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(spec.n_heads)
    writer.add_head_count_kv(spec.n_kv_heads)
    if spec.head_dim * spec.n_heads != spec.hidden:
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_layer_norm_rms_eps(spec.norm_eps)
    writer.add_vocab_size(spec.vocab)
    main = max(plan.linear_types, key=plan.linear_types.get) if plan.linear_types else "F32"
    writer.add_file_type(_FILE_TYPES[main])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value, vtype, sub in tokenizer_keys:
        writer.add_key_value(key, value, vtype, sub)
    writer.add_string("slimformer.version", __version__)
    source = meta.get("source") or _source_gguf(model) or getattr(config, "_name_or_path", "") or "unknown"
    writer.add_string("slimformer.source", str(source))
    if meta.get("recipe"):
        writer.add_string("slimformer.recipe", str(meta["recipe"]))
    writer.add_string("slimformer.outtype", plan.outtype)
    writer.add_string("slimformer.tokenizer", tokenizer_note)
    if plan.pre_guessed:
        writer.add_bool("slimformer.tokenizer_pre_guessed", True)
    for key, items in (("slimformer.requantized", plan.requantized), ("slimformer.rounded_offsets", plan.rounded),
                       ("slimformer.dense_fallbacks", plan.dense_fallbacks)):
        if items:
            writer.add_key_value(key, items, T.ARRAY, T.STRING)
