"""Bit-packing of unsigned codes into real bytes, for any width 2..8.

Eight ``b``-bit codes fill exactly ``b`` bytes, so codes are packed eight at a time
into a 64-bit word and split into bytes: 4-bit is two codes per byte, 3-bit is
8 codes in 3 bytes. Written with torch integer ops so unpacking in a forward pass
stays vectorised (no library packs arbitrary bit widths for torch tensors).
"""

from __future__ import annotations

import torch


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes :func:`pack` writes: 8-bit codes as they are, others in whole 8-code chunks."""
    return numel if bits == 8 else ((numel + 7) // 8) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flatten and pack uint8 codes (< 2**bits) into ``packed_nbytes`` uint8 bytes."""
    if bits == 8:
        return codes.reshape(-1).to(torch.uint8)
    if 8 % bits == 0:
        # Same layout as the general path, built with cheap uint8 shifts (2 and 4 bits).
        per_byte = 8 // bits
        flat = codes.reshape(-1).to(torch.uint8)
        pad = (-flat.numel()) % 8
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        lanes = flat.reshape(-1, per_byte)
        packed = lanes[:, 0].clone()
        for lane in range(1, per_byte):
            packed |= lanes[:, lane] << (lane * bits)
        return packed
    flat = codes.reshape(-1).to(torch.int64)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    eights = flat.reshape(-1, 8)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    words = (eights << shifts).sum(dim=1)  # at most 64 bits, no overlap
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    return ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes as uint8."""
    if bits == 8:
        return packed[:numel]
    if 8 % bits == 0:
        # Same layout as the general path, read with cheap uint8 shifts (2 and 4 bits).
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
        codes = (packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(-1)[:numel]
    chunks = packed.reshape(-1, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    words = (chunks << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    codes = (words.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8)
