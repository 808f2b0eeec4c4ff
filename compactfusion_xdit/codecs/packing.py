"""Bit packing of small unsigned codes along the last dimension (least significant bits first)."""

import torch


def packed_width(c: int, bits: int) -> int:
    """Bytes per row for c codes of `bits` bits."""
    per_byte = 8 // bits
    return -(-c // per_byte)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, C) uint8 codes < 2**bits -> (N, ceil(C*bits/8)) uint8; element c at byte c//k, bits (c%k)*bits."""
    if bits == 8:
        return codes.contiguous()
    n, c = codes.shape
    per_byte = 8 // bits
    width = packed_width(c, bits)
    if width * per_byte != c:
        codes = torch.nn.functional.pad(codes, (0, width * per_byte - c))
    codes = codes.reshape(n, width, per_byte)
    out = codes[..., 0].clone()
    for j in range(1, per_byte):
        out |= codes[..., j] << (j * bits)
    return out


def unpack(data: torch.Tensor, bits: int, c: int) -> torch.Tensor:
    """Inverse of `pack`: (N, B) uint8 -> (N, c) uint8 codes."""
    if bits == 8:
        return data
    per_byte = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=data.device)
    codes = (data.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(data.shape[0], -1)[:, :c]
