"""The quantization schemes and their arithmetic, in compressed-tensors' conventions.

A quantized weight W [out, in] is codes q (signed integers), a scale per (row, group) and, for the
asymmetric schemes, an integer zero point per (row, group):  W ~ (q - zero_point) * scale.

- int8: symmetric, one scale per output row (compressed-tensors' W8A16 "channel" strategy):
  scale = amax / 127, q in [-127, 127].
- int4: asymmetric, one scale and zero point per `group_size` consecutive inputs of a row
  (W4A16_ASYM "group" strategy): q and zero point in [-8, 7]. The range [lo, hi] of each group is
  chosen by a small clipping search (the shrink factors of CLIP_FACTORS applied to the group's
  min and max, keeping the one with the least squared error), not plain min/max: clipping the
  rare extreme values buys a finer step for all the others.

Everything is computed in float32 on the tensor given (callers pass one tensor, or a slice of rows,
at a time). The scale is rounded to its storage dtype *before* the codes are computed, so the
stored (codes, scale) pair is exactly what was measured.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

# Shrink factors tried on each group's [min, max] by the int4 clipping search (1.0 = plain min/max).
CLIP_FACTORS = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.79, 0.76, 0.73, 0.70, 0.67)
# Elements quantized at a time: a block's float32 temporaries (1 MB each) stay in the CPU's
# cache through the dozen passes of the clipping search, and a 256000-row embedding never becomes
# one float32 copy.
ROW_BLOCK_ELEMENTS = 2**18


@dataclass
class Quantized:
    """One quantized weight: codes int8 [out, in] (values within the scheme's range), scale
    [out, groups] in the storage dtype, zero point int8 [out, groups] or None (symmetric)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    bits: int
    group_size: int | None  # None: one group per row
    # Sums of squares of the weight and of the quantization error, gathered while quantizing.
    signal: float = 0.0
    noise: float = 0.0

    @property
    def snr_db(self) -> float:
        return _ratio_db(self.signal, self.noise)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero_point, dtype)


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """(codes - zero_point) * scale, the scale and zero point broadcast over their groups."""
    out_features, in_features = codes.shape
    groups = scale.shape[-1] if scale.dim() == 2 else 1
    values = codes.to(torch.float32).view(out_features, groups, in_features // groups)
    if zero_point is not None:
        values = values - zero_point.to(torch.float32).view(out_features, groups, 1)
    values = values * scale.to(torch.float32).reshape(-1, groups, 1)
    return values.view(out_features, in_features).to(dtype)


def _row_slices(weight: torch.Tensor) -> list[slice]:
    rows = max(1, ROW_BLOCK_ELEMENTS // max(1, weight.shape[1]))
    return [slice(start, start + rows) for start in range(0, weight.shape[0], rows)]


def quantize_int8_rows(weight: torch.Tensor, scale_dtype: torch.dtype) -> Quantized:
    """Symmetric int8 with one scale per output row."""
    # Outputs allocated once and filled block by block: no second copy from joining blocks.
    codes = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(weight.shape[0], 1, dtype=scale_dtype)
    signal = noise = 0.0
    for rows in _row_slices(weight):
        w = weight[rows].to(torch.float32)
        scale = (w.abs().amax(dim=1, keepdim=True) / 127).to(scale_dtype)
        # A row of zeros gets the smallest positive scale: its codes are 0 and nothing divides by 0.
        scale = torch.where(scale == 0, torch.finfo(scale_dtype).tiny, scale)
        scale32 = scale.to(torch.float32)
        q = torch.round(w / scale32).clamp_(-127, 127)
        signal += float(w.square().sum(dtype=torch.float64))
        noise += float((q * scale32 - w).square_().sum(dtype=torch.float64))
        codes[rows] = q
        scales[rows] = scale
    return Quantized(codes, scales, None, 8, None, signal, noise)


def _int4_params(lo: torch.Tensor, hi: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (storage dtype) and integer zero point for groups spanning [lo, hi] (lo <= 0 <= hi,
    so that the zero point lies in [-8, 7] and 0 is exactly representable)."""
    scale = ((hi - lo) / 15).to(scale_dtype)
    scale = torch.where(scale == 0, torch.finfo(scale_dtype).tiny, scale).to(torch.float32)
    zero_point = torch.round(-8 - lo / scale).clamp_(-8, 7)
    return scale, zero_point


def quantize_int4_groups(
    weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype, search: bool = True
) -> Quantized:
    """Asymmetric int4 per group of `group_size` inputs, range chosen by the clipping search."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"group size {group_size} does not divide {in_features} columns")
    groups = in_features // group_size
    factors = CLIP_FACTORS if search else CLIP_FACTORS[:1]
    codes = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(out_features, groups, dtype=scale_dtype)
    zeros = torch.empty(out_features, groups, dtype=torch.int8)
    signal = noise = 0.0
    for rows in _row_slices(weight):
        w = weight[rows].to(torch.float32).view(-1, groups, group_size)
        lo = w.amin(dim=2, keepdim=True).clamp_(max=0)
        hi = w.amax(dim=2, keepdim=True).clamp_(min=0)
        best_err = best_scale = best_zero = None
        work = torch.empty_like(w)  # one buffer for every candidate's passes (in place, in cache)
        for factor in factors:
            scale, zero = _int4_params(lo * factor, hi * factor, scale_dtype)
            torch.div(w, scale, out=work).add_(zero).round_().clamp_(-8, 7)
            err = work.sub_(zero).mul_(scale).sub_(w).square_().sum(dim=2, keepdim=True)
            if best_err is None:
                best_err, best_scale, best_zero = err, scale, zero
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_scale = torch.where(better, scale, best_scale)
                best_zero = torch.where(better, zero, best_zero)
        q = torch.round(w / best_scale + best_zero).clamp_(-8, 7)
        signal += float(w.square().sum(dtype=torch.float64))
        noise += float(best_err.sum(dtype=torch.float64))
        codes[rows] = q.view(-1, in_features)
        scales[rows] = best_scale.view(-1, groups)
        zeros[rows] = best_zero.view(-1, groups)
    return Quantized(codes, scales, zeros, 4, group_size, signal, noise)


def snr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio, 10 log10(|W|^2 / |W - W'|^2), in dB (inf when exact)."""
    signal = noise = 0.0
    for rows in _row_slices(reference):
        ref64 = reference[rows].to(torch.float64)
        signal += float(ref64.square().sum())
        noise += float((ref64 - approximation[rows].to(torch.float64)).square().sum())
    return _ratio_db(signal, noise)


def _ratio_db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


# --- compressed-tensors' packing: codes + 2^(bits-1), element 0 in the lowest bits of an int32 ---


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack signed codes (int8 [rows, cols]) along dim into int32 words of 32/bits codes each."""
    if dim == 1 and bits in (4, 8) and codes.shape[1] % (32 // bits) == 0 and sys.byteorder == "little":
        # Byte-wise: offset codes as unsigned bytes (two nibbles a byte for 4 bits), read as
        # little-endian int32 words. Same bits as the general path, without int64 temporaries.
        unsigned = (codes.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
        if bits == 4:
            unsigned = unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)
        return torch.empty(unsigned.shape, dtype=torch.uint8).copy_(unsigned).view(torch.int32)
    per_word = 32 // bits
    values = codes.to(torch.int32) + (1 << (bits - 1))
    if dim == 0:
        values = values.T
    rows, cols = values.shape
    pad = -cols % per_word
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    values = values.reshape(rows, -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int32) * bits
    # Disjoint bit fields: the sum is the bitwise or (int32 wraps the top field as two's complement).
    packed = (values << shifts).sum(dim=2, dtype=torch.int64)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    result = packed.T if dim == 0 else packed
    # A fresh row-major tensor: .contiguous() keeps odd strides on size-1 dimensions, which
    # byte-level views (the safetensors writer) refuse.
    return torch.empty(result.shape, dtype=torch.int32).copy_(result)


def unpack_int32(packed: torch.Tensor, bits: int, length: int, dim: int = 1) -> torch.Tensor:
    """The signed int8 codes of pack_int32's output; `length` codes along dim. Read as bytes
    (little-endian words: a byte holds two 4-bit codes, low nibble first, or one 8-bit code), so
    that no temporary is wider than the packed words: int32 fields per code were 4x the codes,
    and the heap kept them (an int4 Gemma-2B's zero points: about 60 MB after load)."""
    words = (packed.T if dim == 0 else packed).contiguous()
    if bits in (4, 8) and sys.byteorder == "little":
        fields = words.view(torch.uint8)
        if bits == 4:
            fields = torch.stack((fields & 15, fields >> 4), dim=-1).reshape(words.shape[0], -1)
    else:
        shifts = torch.arange(32 // bits, dtype=torch.int32) * bits
        fields = ((words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(words.shape[0], -1)
    codes = (fields[:, :length].to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    return (codes.T if dim == 0 else codes).contiguous()
