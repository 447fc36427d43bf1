"""Running quantized checkpoints: the module swap at load.

When a checkpoint carries compressed-tensors weights, `swap_quantized` replaces each quantized
nn.Linear by a QuantizedLinear and a quantized input embedding by a QuantizedEmbedding (with a tied
LM head over the same codes) before the remaining tensors are assigned. Both hold the checkpoint's
memory-mapped codes and scales: no full-size dequantized copy is ever made.

Every product goes through `quantized_matmul`. Decode (up to kernels.MAX_ROWS activation rows)
runs on lmtool's own kernels (lmtool/kernels/quant.c), which read the stored int8 codes and int4
nibbles where they lie: a step streams the compressed bytes once, at memory speed. On x86 with
bfloat16 activations the int4 kernel wants rows interleaved by blocks of 8 (`interleave`): that
copy is made at load and replaces the mapping rather than adding to it (its pages are dropped);
layers that read the same input (q/k/v, gate/up) are interleaved into one joined copy and called
as one FusedQuantizedLinear (`join_interleaved`), as dense layers are fused.
PyTorch's int8 and int4 CPU kernels remain the fallback (LMTOOL_NATIVE=0, no C compiler, float16
models), with copies that replace the mapping in the same way: llm-compressor's 8-bit
pack-quantized bytes become int8 codes (always), and int4 weights are repacked into the layout of
torch's int4 kernel (only where lmtool's kernel cannot take them).
"""

from __future__ import annotations

import ctypes
import functools
import mmap

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..checkpoint import Checkpoint
from ..errors import CheckpointError
from ..inference import owner_prefix, prefill_linear
from .format import ROW_BLOCK, QuantizedWeight, packed_zero_bytes, quantized_modules, read_weight

# Weight elements dequantized at a time by the tiled path (bounds its temporary buffers: 8 MB in
# bfloat16). Large enough that every tile is a wide product: at 2**20 a down projection's input
# width (16384) left tiles of 64 rows, and its prefill ran at 0.78x bfloat16 against 0.89x at
# 2**22 (2**23: the LM head's slower again). Float32 tiles take half as many (8 MB too): 16 MB
# ones no longer stayed in cache between the dequantizing and the product (the int4 dequant ran
# at 3.8 G weights/s into 16 MB, 6.1 into 8 MB, capped to AVX2).
TILE_ELEMENTS = 2**22
# Codes converted to the int4 CPU kernel's layout at a time, in whole blocks of 64 rows (its row
# blocks): small temporaries, which the allocator reuses instead of keeping large freed ones.
PACK_ELEMENTS = 2**20
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _in_huge_pages(tensor: torch.Tensor) -> torch.Tensor:
    """A fresh tensor (not yet touched) asked to be backed by 2 MB pages (MADV_HUGEPAGE, where
    Linux has transparent huge pages in madvise mode, the usual default): the kernels stream the
    interleaved copies made at load as they stream the mapped file's 2 MB folios. In 4 KB pages
    Gemma-2B int8's interleaved decode streamed 2-9 % slower than the same weights as stored when
    memory answered fast (Zen 5), and each 4 KB page faulted in on its own at load (seconds for
    2.4 GB in a VM). Elsewhere nothing changes."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    size = tensor.numel() * tensor.element_size()
    if advice is None or size < HUGE_PAGE:
        return tensor
    start = -(-tensor.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    end = (tensor.data_ptr() + size) // HUGE_PAGE * HUGE_PAGE
    if end > start:
        _libc().madvise(start, end - start, advice)  # an error (no transparent huge pages) changes nothing
    return tensor


HUGE_PAGE = 2 << 20


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _int8_rows(weight: QuantizedWeight, x: torch.Tensor) -> bool:
    # CPU only: the CUDA build of the op is untested here (no GPU), the tiled path is exact anywhere.
    # Rows interleaved for lmtool's kernel go to the tiled path (it puts them back in order).
    return (
        weight.bits == 8 and weight.zero_point is None and weight.groups == 1 and not weight.interleaved
        and x.dtype in KERNEL_DTYPES and x.device.type == "cpu"
    )


def native_kernel(weight: QuantizedWeight, dtype: torch.dtype) -> bool:
    """Whether lmtool's int8/int4 kernels take this weight with activations of dtype: on CPU,
    bfloat16 or float32 activations, the kernels built here, and a layout they read (int8: one
    scale per row and no zero point; int4: groups of an even size, so that no byte straddles two).
    Kept on the weight per dtype, build and layout: a decode step asks for its LM head and
    embedding, and each check costs tens of microseconds once the weights' stream has evicted
    the code and data it touches."""
    stored = weight.codes if weight.bits == 8 else weight.nibbles
    key = (dtype, kernels.active_isa(), None if stored is None else stored.data_ptr(), weight.interleaved)
    answer = weight._native_answers.get(key)
    if answer is None:
        answer = weight._native_answers[key] = _kernel_takes(weight, stored, dtype)
    return answer


def _kernel_takes(weight: QuantizedWeight, stored: torch.Tensor | None, dtype: torch.dtype) -> bool:
    if stored is None or stored.device.type != "cpu" or dtype not in (torch.bfloat16, torch.float32):
        return False
    if not (stored.is_contiguous() and kernels.available()):
        return False
    if weight.interleaved and row_block(weight, dtype) != ROW_BLOCK:
        return False  # interleaved for bfloat16 activations; others take the dequantized tiles
    if weight.bits == 8:
        return weight.zero_point is None and weight.groups == 1
    return weight.group_size % 2 == 0 and (weight.zero_point is None or weight.zero_point.is_contiguous())


def row_block(weight: QuantizedWeight, dtype: torch.dtype) -> int:
    """The rows lmtool's int8 or int4 kernel reads interleaved together for activations of dtype (1:
    as stored)."""
    bf16 = int(dtype == torch.bfloat16)
    if weight.bits == 8:
        return kernels.library().lm_int8_row_block(bf16, weight.in_features)
    return kernels.library().lm_int4_row_block(bf16, weight.group_size)


def native_matmul(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """x [M <= kernels.MAX_ROWS, in] (rows may be strided) @ W.T on lmtool's kernels, reading the
    stored codes in place; float32 accumulation, the output rounded once to x's dtype."""
    rows, row_stride = kernels.rows_of(x)
    out = torch.empty(rows.shape[0], weight.out_features, dtype=x.dtype)
    kernel, arguments = native_call(weight, int(x.dtype == torch.bfloat16), rows.data_ptr(), row_stride, rows.shape[0],
                                    out.data_ptr(), weight.out_features)
    check_status(kernel(*arguments), weight)
    return out


def native_call(weight: QuantizedWeight, bf16: int, x: int, ldx: int, rows: int, y: int, ldy: int) -> tuple:
    """The kernel function and its arguments for y = x . W^T on addresses: x rows ldx elements
    apart (bfloat16 where bf16, else float32), output rows ldy apart."""
    K, N = weight.in_features, weight.out_features
    lib = kernels.library()
    if weight.bits == 8:
        return lib.lm_int8_linear, (bf16, x, ldx, rows, K, weight.codes.data_ptr(), weight.row_scale(torch.float32).data_ptr(),
                                    N, y, ldy, weight.interleaved)
    scale, zero = weight.group_scale(), weight.zero_point
    return lib.lm_int4_linear, (bf16, x, ldx, rows, K, weight.nibbles.data_ptr(), scale.data_ptr(),
                                int(scale.dtype == torch.bfloat16), scale.stride(0),
                                zero.data_ptr() if zero is not None else None, weight.group_size, N, y, ldy,
                                weight.interleaved)


def check_status(status: int, weight: QuantizedWeight) -> None:
    """The kernel's status (0: done) as the exception it stands for."""
    if status == -1:
        raise MemoryError(f"the int{weight.bits} kernel could not allocate its activation copy")
    if status:
        raise RuntimeError(f"the int{weight.bits} kernel does not take {weight.name}'s layout (status {status})")


def bind_native_matmul_at(weight: QuantizedWeight, bf16: int, x: int, ldx: int, rows: int, y: int, ldy: int):
    """native_call's kernel call with its arguments bound (a captured decode step binds it once and
    calls it every token, lmtool.captured)."""
    kernel, arguments = native_call(weight, bf16, x, ldx, rows, y, ldy)
    call = kernels.bound(kernel, *arguments)

    def run() -> None:
        if status := call():
            check_status(status, weight)

    return run


def prepare(weight: QuantizedWeight, checkpoint: Checkpoint, dtype: torch.dtype) -> None:
    """The layout a 4-bit weight on CPU is read in, made at load from the stored one (which depends
    on the CPU, so it is made here and never stored), a copy that replaces the mapped pages (they
    are dropped), never one beside them. Where lmtool's kernel multiplies in integers (x86, bfloat16
    activations): its rows interleaved by blocks (`interleave`). Where it runs otherwise: nothing,
    it reads the mapped nibbles, and prefill dequantizes tiles of them. Where it cannot run: the
    layout of torch's int4 CPU kernel, a block of rows at a time."""
    if native_kernel(weight, dtype):
        interleave(weight, checkpoint, dtype)
        return
    if not (
        weight.bits == 4 and weight.nibbles.device.type == "cpu" and weight.out_features % 16 == 0
        and weight.group_size in (32, 64, 128, 256) and weight.in_features % weight.group_size == 0
    ):
        return
    packed = torch.empty_like(weight.nibbles, memory_format=torch.contiguous_format)
    step = max(64, PACK_ELEMENTS // weight.in_features // 64 * 64)
    for start in range(0, weight.out_features, step):
        rows = weight.nibbles[start : start + step]
        codes = torch.stack((rows & 15, rows >> 4), dim=-1).view(rows.shape[0], -1).to(torch.int32)
        packed[start : start + step] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    weight.int4pack = packed
    checkpoint.release(weight.nibbles)
    if dtype in KERNEL_DTYPES:
        weight.scale_and_zeros(dtype)  # the kernel's copy of the scales, made now...
        checkpoint.release(weight.scale)  # ...so the mapped ones leave memory too


def interleave(weight: QuantizedWeight, checkpoint: Checkpoint, dtype: torch.dtype) -> None:
    """Interleave a weight's rows by blocks of ROW_BLOCK where lmtool's kernel reads them so, for
    activations of dtype: int4 nibbles, scales and zero points (lm_int4_interleave), int8 codes
    (lm_int8_interleave, AVX2 only; their scales are one per row already side by side). One 32-byte
    load then feeds 8 rows, and their sums are scaled once per block of activations for all 8
    (quant.c says why and by how much). The copies go in 2 MB pages where Linux gives them. Rows
    after the last whole block stay as stored; stored() keeps giving the checkpoint's own tensors
    (the mapped views from before)."""
    rows = weight.out_features // ROW_BLOCK * ROW_BLOCK
    if rows == 0 or not _interleavable(weight, dtype):
        return
    if weight.bits == 8:
        _interleave_codes(weight, checkpoint, rows)
        return
    made = _kernel_copies(weight, weight.out_features)
    _interleave_into(weight, rows, made)
    _replace_stored(weight, checkpoint)
    weight.nibbles, weight.scale, weight.zero_point = made
    weight.interleaved = rows
    weight._group_scale = None


def _interleave_codes(weight: QuantizedWeight, checkpoint: Checkpoint, rows: int) -> None:
    """An int8 weight's first `rows` codes interleaved (lm_int8_interleave) into a copy, a slab at a
    time, each slab's mapped pages dropped once copied (Gemma's 0.5 GB int8 head in one piece raised
    the int4 model's peak from 1.07x to 1.21x its bytes). Left as stored where a code is -128, which
    the AVX2 tile cannot negate (lmtool's quantizer writes none), or where the codes are not the
    checkpoint's own (8-bit pack-quantized ones unpacked at load: stored() gives those)."""
    stored = weight.codes
    if not checkpoint.holds(stored) or bool((stored[rows:] == -128).any()):
        return
    codes = _in_huge_pages(stored.new_empty(stored.shape))
    codes[rows:] = stored[rows:]  # the rows after the last block, as stored
    step = max(ROW_BLOCK, PACK_ELEMENTS * 32 // weight.in_features // ROW_BLOCK * ROW_BLOCK)  # 32 MB
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        if kernels.library().lm_int8_interleave(stored[start].data_ptr(), weight.in_features, stop - start,
                                                codes[start].data_ptr()):
            return
        checkpoint.release(stored[start:stop])
    weight._stored_before = weight.stored()
    checkpoint.release(stored)
    # the scales copied too: read from the mapping, each (a few KB) mapped back the whole 2 MB folio
    # of released codes around it, 166 MB over Gemma-2B int8's first decode step
    weight.codes, weight.scale, weight.interleaved = codes, weight.scale.clone(), rows
    weight._row_scales.clear()


def join_interleaved(parts: list[QuantizedWeight], checkpoint: Checkpoint, dtype: torch.dtype) -> QuantizedWeight | None:
    """Quantized layers that read the same input (an owner's `fusion`: q/k/v, gate/up) as one
    weight: each part's rows interleaved (as `interleave` does) into its rows of one joined copy, so
    that lmtool's kernel takes their input once (one rounding of the activations to int8, one
    parallel region) where it took it once per part; Gemma-2B int4's k and v projections ran at a
    third of the memory's rate on their own. None unless every part would be interleaved whole,
    alike (group size, scale dtype, zero points or none). The parts' stored() keep giving their own
    tensors (the mapped views, pages dropped)."""
    first = parts[0]

    def alike(weight: QuantizedWeight) -> bool:
        return (
            weight.bits == 4 and _interleavable(weight, dtype) and weight.out_features % ROW_BLOCK == 0
            and weight.in_features == first.in_features and weight.group_size == first.group_size
            and (weight.zero_point is None) == (first.zero_point is None)
            and weight.group_scale().dtype == first.group_scale().dtype
        )

    if len(parts) < 2 or not all(alike(weight) for weight in parts):
        return None
    rows = sum(weight.out_features for weight in parts)
    nibbles, scale, zero_point = _kernel_copies(first, rows)
    start = 0
    for weight in parts:
        stop = start + weight.out_features
        zeros = None if zero_point is None else zero_point.view(-1)[packed_zero_bytes(start, first.groups):]
        _interleave_into(weight, weight.out_features, (nibbles[start:stop], scale[start:stop], zeros))
        _replace_stored(weight, checkpoint)
        start = stop
    return QuantizedWeight("+".join(weight.name for weight in parts), rows, first.in_features, 4, scale, zero_point,
                           nibbles=nibbles, interleaved=rows, _stored_before={})


def _interleavable(weight: QuantizedWeight, dtype: torch.dtype) -> bool:
    """Whether lmtool's kernel reads this weight's rows interleaved, for activations of dtype, and
    they are not yet: not where a zero point would not fit the nibble it is packed into (-8..7, as
    every int4 one of lmtool's and compressed-tensors' is)."""
    if weight.interleaved or not native_kernel(weight, dtype) or row_block(weight, dtype) != ROW_BLOCK:
        return False
    if weight.zero_point is None:
        return True
    lowest, highest = torch.aminmax(weight.zero_point)
    return bool(-8 <= lowest and highest <= 7)


def _kernel_copies(weight: QuantizedWeight, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Empty nibbles, scales (as the kernel reads them: float16 ones as float32) and zero points of
    weight's layout for `rows` rows."""
    scale = weight.group_scale()
    return (
        _in_huge_pages(weight.nibbles.new_empty(rows, weight.nibbles.shape[1])),
        scale.new_empty(rows, scale.shape[1]),
        None if weight.zero_point is None else weight.zero_point.new_empty(rows, weight.zero_point.shape[1]),
    )


def _interleave_into(weight: QuantizedWeight, rows: int, made: tuple) -> None:
    """weight's first `rows` rows (whole blocks) interleaved into made (nibbles and scales with
    weight's rows; zero points packed for those rows, as QuantizedWeight.zero_points_at reads them),
    the rows after them copied as stored."""
    # the scales as the kernel reads them, one per tensor (stride 0) made whole
    stored = (weight.nibbles, weight.group_scale().contiguous(), weight.zero_point)
    for old, new in zip(stored[:2], made[:2]):
        new[rows:] = old[rows:]  # the rows after the last block, as stored
    if weight.zero_point is not None:  # ...and their zero points after the packed ones
        tail = weight.zero_point[rows:].reshape(-1)
        start = packed_zero_bytes(rows, weight.groups)
        made[2].view(-1)[start : start + tail.numel()] = tail
    address = [None if t is None else t.data_ptr() for t in stored + made]
    kernels.library().lm_int4_interleave(address[0], address[1], stored[1].element_size(), address[2], weight.groups,
                                         weight.in_features, rows, *address[3:])


def _replace_stored(weight: QuantizedWeight, checkpoint: Checkpoint) -> None:
    """Once weight's tensors are copied: stored() keeps giving them (the mapped views), their pages
    are dropped."""
    replaced = (weight.nibbles, weight.scale, weight.zero_point)
    weight._stored_before = weight.stored()
    for tensor in replaced:
        if tensor is not None and tensor.is_contiguous():
            checkpoint.release(tensor)


def quantized_matmul(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """x [M, in] @ W.T -> [M, out] for a quantized W.

    Where lmtool's kernels take the weight: decode (M <= kernels.MAX_ROWS) on native_matmul,
    prefill on tiled_matmul. Else symmetric int8 with one scale per row: torch's
    _weight_int8pack_mm, which reads the int8 codes where they lie; int4 repacked at load: torch's
    _weight_int4pack_mm_for_cpu. Anything else (other devices, zero points on int8, odd shapes):
    dequantize the weight a tile of rows at a time and multiply densely, so no full-size float copy
    exists at any moment."""
    native = native_kernel(weight, x.dtype) and kernels.usable(x)
    if native and x.shape[0] <= kernels.MAX_ROWS:
        return native_matmul(x, weight)
    if native:
        return tiled_matmul(x, weight)
    x = x.contiguous()
    if _int8_rows(weight, x):
        return torch._weight_int8pack_mm(x, weight.codes, weight.row_scale(x.dtype))
    if weight.int4pack is not None and x.dtype in KERNEL_DTYPES:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, weight.int4pack, weight.group_size, weight.scale_and_zeros(x.dtype)
        )
    out = x.new_empty(x.shape[0], weight.out_features)
    rows = max(1, TILE_ELEMENTS // weight.in_features)
    for start in range(0, weight.out_features, rows):
        stop = min(start + rows, weight.out_features)
        out[:, start:stop] = F.linear(x, weight.dequantize_rows(slice(start, stop), x.dtype))
    return out


def tiled_matmul(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """Prefill over a weight lmtool's kernels take: each tile of rows dequantized natively (one
    pass, into one reused buffer) and multiplied by the dense matmul (prefill_linear, as dense
    layers: oneDNN's in float32). bfloat16 where the CPU multiplies it natively, else float32
    (PyTorch emulates bfloat16 products there), rounded once."""
    dtype = x.dtype
    compute = torch.float32 if dtype == torch.bfloat16 and not kernels.fast_bf16_matmul() else dtype
    x = x.to(compute).contiguous()
    out = x.new_empty(x.shape[0], weight.out_features)
    rows = max(1, TILE_ELEMENTS * 2 // x.element_size() // weight.in_features)  # 8 MB, float32 or bfloat16
    if weight.interleaved:
        rows = max(ROW_BLOCK, rows // ROW_BLOCK * ROW_BLOCK)  # whole blocks of interleaved rows
    tile = torch.empty(min(rows, weight.out_features), weight.in_features, dtype=compute)
    for start in range(0, weight.out_features, rows):
        stop = min(start + rows, weight.out_features)
        dense = tile[: stop - start]
        dequantize_native(weight, start, stop, dense.data_ptr(), int(compute == torch.bfloat16))
        out[:, start:stop] = prefill_linear(x, dense, None)
    return out.to(dtype)


def dequantize_native(weight: QuantizedWeight, start: int, stop: int, out: int, out_bf16: int) -> None:
    """Rows start:stop of a weight the kernels take, dequantized by them into out (the address of
    [stop - start, in] float32, or bfloat16 where out_bf16, contiguous), as
    lmtool.quantize.schemes.dequantize computes them. Where rows are interleaved, start is the
    first row of a block and stop ends one (or the interleaved rows). Addresses computed here, no
    tensor indexed: a decode step's embedding lookup calls it."""
    lib, K, interleaved = kernels.library(), weight.in_features, max(0, min(stop, weight.interleaved) - start)
    if weight.bits == 8:
        scale = weight.row_scale(torch.float32)
        lib.lm_int8_dequantize(weight.codes.data_ptr() + start * K, scale.data_ptr() + start * 4, K, stop - start,
                               out_bf16, out, interleaved)
    else:
        scale, zero = weight.group_scale(), weight.zero_point
        lib.lm_int4_dequantize(
            weight.nibbles.data_ptr() + start * (K // 2), scale.data_ptr() + start * scale.stride(0) * scale.element_size(),
            int(scale.dtype == torch.bfloat16), scale.stride(0),
            zero.data_ptr() + weight.zero_points_at(start) if zero is not None else None, weight.group_size, K, stop - start,
            out_bf16, out, interleaved,
        )


class QuantizedLinear(nn.Module):
    """A linear layer over a quantized weight (the bias stays a float parameter)."""

    def __init__(self, weight: QuantizedWeight, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.quantized = weight
        self.dtype = dtype
        self.in_features, self.out_features = weight.in_features, weight.out_features
        # Assigned from the checkpoint with the other float tensors.
        self.bias = nn.Parameter(torch.empty(weight.out_features, device="meta")) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = quantized_matmul(flat.to(self.dtype), self.quantized).view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def forward_parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.forward(x)]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # the bias
        _save_stored(self.quantized, destination, prefix)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (a full copy: for code that inspects it, not for inference)."""
        return self.quantized.dequantize_rows(slice(None), self.dtype)

    def extra_repr(self) -> str:
        w = self.quantized
        return f"in={w.in_features}, out={w.out_features}, bits={w.bits}, group_size={w.group_size}"


class FusedQuantizedLinear(QuantizedLinear):
    """Quantized layers that read the same input called as one over their joined weight
    (join_interleaved), as lmtool.inference fuses dense ones (an owner's `fusion`). parts: each
    layer's name and weight as stored, and its bias or None: a state_dict holds them under the
    layers' own names."""

    def __init__(self, joined: QuantizedWeight, parts: list[tuple[str, QuantizedWeight, torch.Tensor | None]],
                 dtype: torch.dtype):
        super().__init__(joined, False, dtype)
        self.parts = parts
        biases = [bias for _, _, bias in parts]
        self.bias = None if biases[0] is None else torch.cat(biases)

    def forward_parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.forward(x).split([weight.out_features for _, weight, _ in self.parts], dim=-1))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        owner = owner_prefix(prefix)
        for name, weight, bias in self.parts:
            _save_stored(weight, destination, f"{owner}{name}.")
            if bias is not None:
                destination[f"{owner}{name}.bias"] = bias


class QuantizedEmbedding(nn.Module):
    """An input embedding that dequantizes only the rows it looks up."""

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype):
        super().__init__()
        self.quantized = weight
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = weight.out_features, weight.in_features
        self._block = None  # a block of interleaved rows, dequantized for one lookup

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.reshape(-1)
        if ids.numel() <= kernels.MAX_ROWS and native_kernel(self.quantized, self.dtype):
            rows = self._looked_up(ids.tolist())
        else:
            rows = self.quantized.dequantize_rows(ids, self.dtype)
        return rows.view(*input_ids.shape, self.embedding_dim)

    def _looked_up(self, ids: list[int]) -> torch.Tensor:
        """A decode step's few rows, each dequantized by one kernel call into the output (an
        interleaved row out of its whole block of ROW_BLOCK rows, in a buffer kept for it). The
        tensor-indexing path (dequantize_rows) took some twenty PyTorch operations, 0.29 ms of each
        Gemma-2B int4 step once the weights' stream had evicted them from the caches; this takes
        0.09-0.17 ms (Zen 5 capped to AVX2)."""
        weight, K = self.quantized, self.embedding_dim
        rows = torch.empty(len(ids), K, dtype=self.dtype)
        out, size, bf16 = rows.data_ptr(), rows.element_size(), int(self.dtype == torch.bfloat16)
        for i, row in enumerate(ids):
            if not -weight.out_features <= row < weight.out_features:
                raise IndexError(f"index {row} is out of bounds for an embedding of {weight.out_features} rows")
            row %= weight.out_features
            if row < weight.interleaved:
                if self._block is None:
                    self._block = torch.empty(ROW_BLOCK, K, dtype=self.dtype)
                first, block = row - row % ROW_BLOCK, self._block.data_ptr()
                dequantize_native(weight, first, first + ROW_BLOCK, block, bf16)
                ctypes.memmove(out + i * K * size, block + (row - first) * K * size, K * size)
            else:
                dequantize_native(weight, row, row + 1, out + i * K * size, bf16)
        return rows

    @property
    def weight(self) -> torch.Tensor:
        return self.quantized.dequantize_rows(slice(None), self.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        _save_stored(self.quantized, destination, prefix)


def _save_stored(weight: QuantizedWeight, destination: dict, prefix: str) -> None:
    """A state_dict holds the stored (compressed) tensors, never a dequantized copy."""
    for name, tensor in weight.stored().items():
        destination[prefix + name] = tensor


def quantized_head(model: nn.Module, weight: QuantizedWeight, dtype: torch.dtype, tied: bool) -> nn.Module:
    """The LM head over a quantized weight; a tied one leaves its tensors to the embedding's entry."""
    from ..inference import FrozenCausalLMHead

    class QuantizedCausalLMHead(FrozenCausalLMHead):
        def _save_to_state_dict(self, destination, prefix, keep_vars):
            if not tied:
                _save_stored(weight, destination, prefix)

    return QuantizedCausalLMHead(model.head, [QuantizedLinear(weight, False, dtype)])


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, attr = name.rpartition(".")
    return (model.get_submodule(owner) if owner else model), attr


def swap_quantized(model: nn.Module, checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device, source: str,
                   fuse: bool = True) -> set[str]:
    """Put QuantizedLinear / QuantizedEmbedding modules where the checkpoint has quantized
    weights (model built on meta); returns the checkpoint keys they consumed. fuse: layers an owner
    declares to be called as one (`fusion`) become one FusedQuantizedLinear where their weights
    join (join_interleaved; their biases read here, as lmtool.inference's freeze_linears does)."""
    rename = model.family.rename_key or (lambda key: key)
    backbone = model.backbone
    embed_attr = next(n for n, m in backbone.named_children() if m is backbone.embed_tokens)
    embed_name = f"{model.backbone_prefix}.{embed_attr}"
    consumed: set[str] = set()
    weights: dict[str, tuple[QuantizedWeight, str]] = {}  # our module name -> weight, the checkpoint's name
    for stored in quantized_modules(checkpoint):
        weight, used = read_weight(checkpoint, stored, source)
        weights[rename(f"{stored}.weight")[: -len(".weight")]] = (weight.to(device), stored)
        consumed.update(used)
    return_freed_memory()  # the reads' temporaries, before the copies: else on top of them at the peak
    if fuse:
        consumed.update(_fuse_groups(model, weights, checkpoint, dtype, source))
    for ours, (weight, stored) in weights.items():
        prepare(weight, checkpoint, dtype)
        if ours == embed_name:
            target = backbone.embed_tokens
            setattr(backbone, embed_attr, QuantizedEmbedding(weight, dtype))
            if model.tied:
                setattr(model, model.head_name, quantized_head(model, weight, dtype, tied=True))
        elif model.task == "causal-lm" and ours == model.head_name:
            target = model.head
            setattr(model, model.head_name, quantized_head(model, weight, dtype, tied=False))
        else:
            target = _linear_at(model, ours, stored, source)
            if target is None:
                continue  # a tensor this task's model does not use (another task's head)
            owner, attr = _parent(model, ours)
            setattr(owner, attr, QuantizedLinear(weight, target.bias is not None, dtype))
        _check_shape(weight, target, stored, source)
    return_freed_memory()
    return consumed


def _fuse_groups(model: nn.Module, weights: dict, checkpoint: Checkpoint, dtype: torch.dtype, source: str) -> set[str]:
    """swap_quantized's fusion: each owner whose `fusion` group is quantized alike gets one
    FusedQuantizedLinear in place of the group's layers, whose weights leave `weights`; returns the
    checkpoint keys of the biases it read."""
    from ..inference import fusable

    consumed = set()
    for prefix, owner in list(model.named_modules()):
        group = fusable(owner)
        names = [f"{prefix}.{name}" if prefix else name for name in group[1]] if group else []
        if not names or not all(name in weights for name in names):
            continue
        targets = [_linear_at(model, name, weights[name][1], source) for name in names]
        if any(target is None for target in targets) or len({target.bias is None for target in targets}) > 1:
            continue
        for name, target in zip(names, targets):
            _check_shape(weights[name][0], target, weights[name][1], source)
        joined = join_interleaved([weights[name][0] for name in names], checkpoint, dtype)
        if joined is None:
            continue
        parts = []
        for attr, name, target in zip(group[1], names, targets):
            weight, stored = weights.pop(name)
            bias = None
            if target.bias is not None:
                key = f"{stored}.bias"
                if key not in checkpoint.where:
                    raise CheckpointError(f"{source}: missing tensor '{key}'")
                bias = checkpoint.tensor(key).to(dtype)
                consumed.add(key)
            parts.append((attr, weight, bias))
            delattr(owner, attr)
        setattr(owner, group[0], FusedQuantizedLinear(joined, parts, dtype))
    return consumed


def _linear_at(model: nn.Module, name: str, stored: str, source: str) -> nn.Linear | None:
    """The linear layer a quantized weight replaces; None where this task's model has none."""
    try:
        target = model.get_submodule(name)
    except AttributeError:
        return None
    if not isinstance(target, nn.Linear):
        raise CheckpointError(f"{source}: '{stored}' is quantized, but lmtool's {type(target).__name__} there cannot run quantized")
    return target


def _check_shape(weight: QuantizedWeight, target: nn.Module, stored: str, source: str) -> None:
    expected = (target.weight.shape[0], target.weight.shape[1])
    if (weight.out_features, weight.in_features) != expected:
        raise CheckpointError(f"{source}: quantized '{stored}' is [{weight.out_features}, "
                              f"{weight.in_features}], the config implies {list(expected)}")


def return_freed_memory() -> None:
    """glibc keeps the heap that loading's temporaries freed instead of returning it: repacking for
    torch's int4 kernel (a third of the int4 bytes on a 285M-weight model), and unpacking packed
    int4 zero points (8 bytes of int32 fields per zero point: 0.13x of Gemma-2B int4 g64's bytes
    stayed resident). Hand it back, once per load. Nothing to do elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
