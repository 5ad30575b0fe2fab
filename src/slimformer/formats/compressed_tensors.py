"""The compressed-tensors checkpoint format (what vLLM and transformers load), as plain data.

Learned from the format's definition (compressed-tensors 0.20.1 writes it); nothing here
imports that package. Pieces the exporter and the importer share:

- **Packing** (``pack-quantized``): ``b``-bit integers ``q`` in ``[-2^(b-1), 2^(b-1)-1]``
  are stored offset to unsigned ``u = q + 2^(b-1)`` and packed densely into int32 words
  along a dimension: element ``i`` of a row occupies bits ``i*b .. i*b+b-1`` of the row's
  bit stream, word ``i*b // 32`` from its least significant bit (an element may straddle
  two words; a row is padded with zero bits to whole words). Weights pack along their
  input dimension (``weight_packed [out, ceil(in*b/32)]``); asymmetric zero-points along
  the output dimension (``weight_zero_point [ceil(out*b/32), groups]``).
- **Values**: ``w = (q - zp) * scale`` with ``q`` and ``zp`` signed. slimformer's codes are
  unsigned ``c`` with ``w = (c - 2^(b-1)) * s`` (symmetric) or ``(c - z) * s`` with a uint8
  zero ``z`` (asymmetric): ``q = c - 2^(b-1)`` and ``zp = z - 2^(b-1)``, so the stored
  unsigned value ``u`` of a packed code *is* our code ``c``, and a packed zero-point *is* ``z``.
- **int-quantized** / **naive-quantized**: ``weight`` stored as int8 ``q`` (unpacked),
  ``weight_scale``, and ``weight_zero_point`` (int8 ``zp``) when asymmetric.
- **The config**: ``config.json``'s ``quantization_config`` (:func:`build_config`,
  :func:`parse_config`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

QUANT_METHOD = "compressed-tensors"
# The version of the format's schema this module writes and was checked against
# (compressed-tensors records its own version here; readers only display it).
SCHEMA_VERSION = "0.20.1"
PACK_QUANTIZED = "pack-quantized"
INT_QUANTIZED = "int-quantized"
NAIVE_QUANTIZED = "naive-quantized"
READABLE_FORMATS = (PACK_QUANTIZED, INT_QUANTIZED, NAIVE_QUANTIZED)
STRATEGIES = ("tensor", "channel", "group")


class FormatError(ValueError):
    """A config or tensor that does not follow the format (message names the field)."""


# ------------------------------------------------------------------------------ packing
def packed_words(count: int, bits: int) -> int:
    return math.ceil(count * bits / 32)


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``bits``-bit values ``[rows, cols]`` (any integer dtype, each in
    ``0..2^bits-1``) → int32 ``[rows, ceil(cols*bits/32)]``, dense, least significant bit first."""
    if not 1 <= bits <= 8:
        raise FormatError(f"packing takes 1 to 8 bits, got {bits}")
    rows, cols = values.shape
    v = values.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise FormatError(f"values outside 0..{(1 << bits) - 1} cannot be packed in {bits} bits")
    padded = math.ceil(cols / 32) * 32
    if padded > cols:
        v = torch.nn.functional.pad(v, (0, padded - cols))
    # 32 values of b bits fill exactly b words: pack each block of 32 values on its own
    blocks = v.reshape(rows, padded // 32, 32)
    words = torch.zeros(rows, padded // 32, bits, dtype=torch.int64)
    for j in range(32):
        start = j * bits
        word, offset = divmod(start, 32)
        words[:, :, word] |= (blocks[:, :, j] << offset) & 0xFFFFFFFF
        if offset + bits > 32:
            words[:, :, word + 1] |= blocks[:, :, j] >> (32 - offset)
    words = words.reshape(rows, -1)[:, :packed_words(cols, bits)]
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The inverse of :func:`pack_int32`: int32 ``[rows, words]`` → uint8 ``[rows, cols]``."""
    if not 1 <= bits <= 8:
        raise FormatError(f"unpacking takes 1 to 8 bits, got {bits}")
    rows, n_words = packed.shape
    if n_words != packed_words(cols, bits):
        raise FormatError(f"{n_words} packed words per row cannot hold {cols} values of {bits} bits "
                          f"(expected {packed_words(cols, bits)})")
    w = packed.to(torch.int64) & 0xFFFFFFFF
    n_blocks = math.ceil(cols / 32)
    full = n_blocks * bits
    if full > n_words:
        w = torch.nn.functional.pad(w, (0, full - n_words))
    blocks = w.reshape(rows, n_blocks, bits)
    mask = (1 << bits) - 1
    out = torch.empty(rows, n_blocks, 32, dtype=torch.int64)
    for j in range(32):
        word, offset = divmod(j * bits, 32)
        value = blocks[:, :, word] >> offset
        if offset + bits > 32:
            value = value | (blocks[:, :, word + 1] << (32 - offset))
        out[:, :, j] = value & mask
    return out.reshape(rows, -1)[:, :cols].to(torch.uint8).contiguous()


def pack_columns(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along dimension 0 (how zero-points ``[out, groups]`` are stored)."""
    return pack_int32(values.t(), bits).t().contiguous()


def unpack_columns(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    return unpack_int32(packed.t().contiguous(), bits, rows).t().contiguous()


# ------------------------------------------------------------------------------ the config
@dataclass(frozen=True)
class Args:
    """One ``QuantizationArgs`` (the subset of the format slimformer's modules hold)."""

    num_bits: int
    symmetric: bool
    strategy: str             # tensor | channel | group (weights); token | tensor (activations)
    group_size: int | None = None
    dynamic: bool = False

    def to_json(self) -> dict:
        # the keys and order compressed-tensors itself writes for integer args
        return {
            "dynamic": self.dynamic,
            "group_size": self.group_size,
            "num_bits": self.num_bits,
            "strategy": self.strategy,
            "symmetric": self.symmetric,
            "type": "int",
        }


@dataclass(frozen=True)
class Scheme:
    """One config group: the weights' args, the input activations' (or None), the format."""

    weights: Args
    input_activations: Args | None
    format: str


def build_config(groups: list[tuple[Scheme, list[str]]], ignore: list[str]) -> dict:
    """``quantization_config`` for ``groups`` (scheme, targets) with ``ignore`` layers."""
    formats = sorted({scheme.format for scheme, _ in groups})
    config_groups = {}
    for index, (scheme, targets) in enumerate(groups):
        config_groups[f"group_{index}"] = {
            "format": scheme.format,
            "input_activations": None if scheme.input_activations is None else scheme.input_activations.to_json(),
            "output_activations": None,
            "targets": list(targets),
            "weights": scheme.weights.to_json(),
        }
    return {
        "config_groups": config_groups,
        "format": formats[0] if len(formats) == 1 else "mixed-precision",
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "quant_method": QUANT_METHOD,
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": SCHEMA_VERSION,
    }


_ARG_KEYS = {"num_bits", "type", "symmetric", "group_size", "strategy", "block_structure", "dynamic", "actorder",
             "scale_dtype", "zp_dtype", "observer", "observer_kwargs"}


def _parse_args(value, where: str, activation: bool) -> Args:
    if not isinstance(value, dict):
        raise FormatError(f"{where}: expected an object, found {type(value).__name__}")
    unknown = sorted(set(value) - _ARG_KEYS)
    if unknown:
        raise FormatError(f"{where}.{unknown[0]}: unknown field")
    kind = value.get("type", "int")
    if kind != "int":
        raise FormatError(f"{where}.type: {kind!r} quantisation is not read (only int)")
    bits = value.get("num_bits", 8)
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise FormatError(f"{where}.num_bits: {bits!r} is not read (2 to 8)")
    symmetric = value.get("symmetric", True)
    if not isinstance(symmetric, bool):
        raise FormatError(f"{where}.symmetric: expected true or false, found {symmetric!r}")
    group_size = value.get("group_size")
    strategy = value.get("strategy")
    if strategy is None:   # the format's inference from group_size
        strategy = "tensor" if group_size is None else "group" if isinstance(group_size, int) and group_size > 0 \
            else "channel" if group_size == -1 else None
    if not isinstance(strategy, str):
        raise FormatError(f"{where}.strategy: missing and not implied by group_size {group_size!r}")
    strategy = strategy.lower()
    allowed = ("token", "tensor") if activation else STRATEGIES
    if strategy not in allowed:
        raise FormatError(f"{where}.strategy: {strategy!r} is not read (only {', '.join(allowed)})")
    if strategy == "group":
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
            raise FormatError(f"{where}.group_size: strategy group needs a positive integer, found {group_size!r}")
    elif group_size not in (None, -1):
        raise FormatError(f"{where}.group_size: {group_size!r} with strategy {strategy}")
    else:
        group_size = None
    if value.get("block_structure") is not None:
        raise FormatError(f"{where}.block_structure: block quantisation is not read")
    if value.get("actorder") not in (None, False, "weight", "static"):
        raise FormatError(f"{where}.actorder: {value.get('actorder')!r} is not read")
    dynamic = value.get("dynamic", False)
    if dynamic not in (True, False):
        raise FormatError(f"{where}.dynamic: {dynamic!r} is not read (true or false)")
    if not activation and dynamic:
        raise FormatError(f"{where}.dynamic: dynamic weight quantisation is not a stored format")
    if activation and strategy == "token" and not dynamic:
        raise FormatError(f"{where}.dynamic: per-token activations must be dynamic")
    return Args(bits, symmetric, strategy, group_size, bool(dynamic))


def parse_config(qc, where: str = "quantization_config") -> tuple[list[tuple[Scheme, list[str]]], list[str]]:
    """Validate ``quantization_config`` and return its groups ``(scheme, targets)`` and
    ``ignore``. Anything this reader does not hold exactly raises :class:`FormatError`
    naming the field."""
    if not isinstance(qc, dict):
        raise FormatError(f"{where}: expected an object")
    if qc.get("quant_method") != QUANT_METHOD:
        raise FormatError(f"{where}.quant_method: expected {QUANT_METHOD!r}, found {qc.get('quant_method')!r}")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise FormatError(f"{where}.quantization_status: {status!r} checkpoints hold float weights with "
                          "quantisation parameters, not compressed ones: not read (only 'compressed')")
    top_format = qc.get("format")
    for key in ("kv_cache_scheme",):
        if qc.get(key) is not None:
            raise FormatError(f"{where}.{key}: KV-cache quantisation is not read")
    for key in ("sparsity_config", "transform_config", "moe_sparsity_config"):
        if qc.get(key):
            raise FormatError(f"{where}.{key}: not read (only an empty one)")
    ignore = qc.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
        raise FormatError(f"{where}.ignore: expected a list of strings")
    config_groups = qc.get("config_groups")
    if not isinstance(config_groups, dict) or not config_groups:
        raise FormatError(f"{where}.config_groups: expected a non-empty object")
    groups = []
    for name, group in config_groups.items():
        at = f"{where}.config_groups.{name}"
        if not isinstance(group, dict):
            raise FormatError(f"{at}: expected an object")
        targets = group.get("targets")
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise FormatError(f"{at}.targets: expected a non-empty list of strings")
        fmt = group.get("format") or top_format
        if fmt not in READABLE_FORMATS:
            raise FormatError(f"{at}.format: {fmt!r} is not read (only {', '.join(READABLE_FORMATS)})")
        if group.get("weights") is None:
            raise FormatError(f"{at}.weights: missing (activation-only schemes are not read)")
        weights = _parse_args(group["weights"], f"{at}.weights", activation=False)
        acts = group.get("input_activations")
        acts = None if acts is None else _parse_args(acts, f"{at}.input_activations", activation=True)
        if acts is not None and not (acts.dynamic and acts.strategy == "token" and acts.num_bits == 8
                                     and acts.symmetric):
            raise FormatError(f"{at}.input_activations: only dynamic symmetric 8-bit per-token activations are read")
        if group.get("output_activations") is not None:
            raise FormatError(f"{at}.output_activations: output quantisation is not read")
        if fmt == PACK_QUANTIZED and not weights.symmetric and weights.strategy == "tensor":
            raise FormatError(f"{at}.weights: pack-quantized per-tensor asymmetric weights are not read")
        groups.append((Scheme(weights, acts, fmt), list(targets)))
    return groups, list(ignore)
