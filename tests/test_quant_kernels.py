"""The weight-only int8 and int4 kernels (lmtool/kernels/quant.c) against a float64 product of the
dequantized weights: odd shapes (input widths off the vector widths, 1..37 output rows, 1..16
activation rows, groups of 2 to a whole row), bfloat16 and float32 activations and scales, zero
points or none, strided activation rows; the dispatch of lmtool.quantize.linear around them; on
every instruction set this CPU runs (a subprocess per lower one), and the NEON builds under
qemu-user where an aarch64 cross compiler and qemu are installed."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lmtool import kernels
from lmtool.quantize import linear
from lmtool.quantize.format import ROW_BLOCK, QuantizedWeight, compressed_tensors
from lmtool.quantize.linear import native_kernel, native_matmul, prepare, quantized_matmul, tiled_matmul
from lmtool.quantize.schemes import quantize_int4_groups, quantize_int8_rows

from helpers import other_instruction_sets, rerun_tests_on_instruction_set

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler for the kernels")

DTYPES = [torch.float32, torch.bfloat16]
ROWS = [1, 2, 3, 4, 5, 7, 8, 9, 12, 16]


class NoFile:
    """prepare() drops a checkpoint's pages through it; these weights are in memory."""

    def release(self, tensor: torch.Tensor) -> None:
        pass

    def holds(self, tensor: torch.Tensor) -> bool:
        return True


def int8_weight(out_features: int, in_features: int, scale_dtype: torch.dtype) -> QuantizedWeight:
    q = quantize_int8_rows(torch.randn(out_features, in_features), scale_dtype)
    stored = compressed_tensors(q, (out_features, in_features))
    return QuantizedWeight("w", out_features, in_features, 8, stored["weight_scale"], None, codes=stored["weight"])


def int4_weight(out_features: int, in_features: int, group: int, scale_dtype: torch.dtype, symmetric: bool) -> QuantizedWeight:
    """An int4 weight as read from a checkpoint: the packed int32 words seen as bytes; symmetric:
    no zero point (as read_weight leaves it when every zero point is 0)."""
    q = quantize_int4_groups(torch.randn(out_features, in_features), group, scale_dtype, search=False)
    stored = compressed_tensors(q, (out_features, in_features))
    return QuantizedWeight("w", out_features, in_features, 4, q.scale, None if symmetric else q.zero_point,
                           nibbles=stored["weight_packed"].view(torch.uint8))


def rounded_to_int8_blocks(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """x as llama.cpp's Q8_0 rounds activations, in float64: per block of 32 elements of a row
    d = max|x| / 127 and q = round-half-even(x * (1 / d)) in float32, giving q d."""
    rows, width = x.shape
    blocks = torch.nn.functional.pad(x.float(), (0, -width % block)).view(rows, -1, block)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.round(blocks * torch.where(d > 0, 1 / d, torch.zeros_like(d))).clamp(-127, 127)
    return (q.double() * d.double()).view(rows, -1)[:, :width]


def kernel_activations(x: torch.Tensor, weight: QuantizedWeight, lib=None) -> torch.Tensor:
    """The activations the kernel multiplies: bfloat16 ones meeting int4 weights, or int8 weights
    whose rows were interleaved at load, are rounded to int8 blocks where the CPU's kernels multiply
    so in integers (the build says where; lib: another build than this process's, or False for one
    that never rounds)."""
    lib = kernels.library() if lib is None else lib
    bf16 = int(x.dtype == torch.bfloat16)
    if weight.bits == 4 and lib and lib.lm_int4_int8_activations(bf16, weight.group_size):
        return rounded_to_int8_blocks(x)
    if weight.bits == 8 and lib and lib.lm_int8_int8_activations(bf16, weight.in_features, weight.interleaved):
        return rounded_to_int8_blocks(x)
    return x.double()


def summed_terms(weight: QuantizedWeight) -> torch.Tensor:
    """|W| as the kernels sum it, [out, in] float64: the dequantized weight for int8; for int4 the
    stored nibble u and the zero point's share apart, |s| (u + |8 + zero point|) (the kernels
    that multiply the nibbles take the zero point's share away at the end), so float32 rounding
    is measured against what was actually added up."""
    w = weight.dequantize_rows(slice(None), torch.float32).double()
    if weight.bits == 8:
        return w.abs()
    packed = weight.nibbles
    u = torch.stack((packed & 15, packed >> 4), dim=-1).view(packed.shape[0], -1).double()
    zero = 8.0 + (weight.zero_point.double() if weight.zero_point is not None else torch.zeros(u.shape[0], weight.groups, dtype=torch.float64))
    scale = weight.scale.double().expand(u.shape[0], -1)
    return (scale.abs() * zero.abs()).repeat_interleave(weight.group_size, 1) + scale.abs().repeat_interleave(weight.group_size, 1) * u


def reference(x: torch.Tensor, weight: QuantizedWeight, lib=None) -> tuple[torch.Tensor, torch.Tensor]:
    """x . W^T in float64 from the float32 dequantized weight (what schemes.dequantize gives) and
    the activations as the kernel rounds them, and |x| . summed_terms^T, the scale of float32
    accumulation errors."""
    w = weight.dequantize_rows(slice(None), torch.float32).double()
    x64 = kernel_activations(x, weight, lib)
    return x64 @ w.T, x64.abs() @ summed_terms(weight).T


def assert_matches(got: torch.Tensor, x: torch.Tensor, weight: QuantizedWeight, lib=None) -> None:
    """float32: float32 accumulation apart; bfloat16: that and one rounding of the output."""
    want, magnitude = reference(x, weight, lib)
    assert got.dtype == x.dtype and got.shape == want.shape
    allowed = 1e-5 * magnitude + 1e-30
    if x.dtype == torch.bfloat16:
        allowed = allowed + 2**-8 * want.abs()
    error = (got.double() - want).abs()
    assert (error <= allowed).all(), f"max error {error.max().item():.3g}, worst excess {(error - allowed).max().item():.3g}"


def strided_rows(rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """[rows, width] rows of a wider buffer, as a fused projection's slice."""
    return torch.randn(rows, width + 3, dtype=torch.float32).to(dtype)[:, 3:]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_features,in_features", [(1, 16), (5, 33), (37, 100), (16, 257), (9, 2048)])
def test_int8_kernel_matches_the_dequantized_product(dtype, out_features, in_features):
    torch.manual_seed(out_features * in_features)
    for scale_dtype in (torch.bfloat16, torch.float32):
        weight = int8_weight(out_features, in_features, scale_dtype)
        loaded = prepared(weight, dtype)  # as a model of this dtype loads it: rows interleaved where the kernel wants
        assert native_kernel(weight, dtype) and native_kernel(loaded, dtype)
        for rows in ROWS:
            x = torch.randn(rows, in_features).to(dtype)
            assert_matches(native_matmul(x, weight), x, weight)
            assert_matches(native_matmul(x, loaded), x, loaded)
        x = strided_rows(3, in_features, dtype)
        assert_matches(native_matmul(x, weight), x, weight)
        assert_matches(native_matmul(x, loaded), x, loaded)
        assert all(torch.equal(loaded.stored()[k], t) for k, t in weight.stored().items())


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_int8_kernel_keeps_small_activations_beside_a_large_one_in_another_block(rows):
    """Where bfloat16 activations go to int16 for the integer products (rows as stored), each block
    of 128 has its own scale, and where they go to int8 (rows interleaved at load, AVX2) each block
    of 32: a block of values around 1e-3 after a block holding 1000 keeps its precision. The weights
    are zero over the first block, so the output is the small block's alone (with one scale per row
    it would round to 0). 14 rows: a block of 8 interleaved and 6 after it."""
    torch.manual_seed(rows)
    dense = torch.randn(14, 256)
    dense[:, :128] = 0
    stored = compressed_tensors(quantize_int8_rows(dense, torch.float32), (14, 256))
    weight = QuantizedWeight("w", 14, 256, 8, stored["weight_scale"], None, codes=stored["weight"])
    x = (torch.randn(rows, 256) * 1e-3).to(torch.bfloat16)
    x[:, 5] = 1000.0
    assert_matches(native_matmul(x, weight), x, weight)
    loaded = prepared(weight, torch.bfloat16)
    assert_matches(native_matmul(x, loaded), x, loaded)


def test_int8_rows_holding_minus_128_stay_as_stored():
    """AVX2's int8 tile multiplies by the sign trick, which cannot negate -128 (a code other tools'
    int8 may hold; lmtool's quantizer writes none): such a weight keeps its rows as stored, and the
    kernel's products stay exact."""
    torch.manual_seed(0)
    for row in (3, 12):  # in the interleaved block, and after it
        weight = int8_weight(13, 64, torch.float32)
        weight.codes[row, 5] = -128
        loaded = copy.deepcopy(weight)
        prepare(loaded, NoFile(), torch.bfloat16)
        assert loaded.interleaved == 0 and torch.equal(loaded.codes, weight.codes)
        x = -torch.rand(4, 64).to(torch.bfloat16)
        assert_matches(native_matmul(x, loaded), x, loaded)


def test_int8_kernel_gives_nan_for_an_infinite_or_nan_activation():
    weight = int8_weight(13, 300, torch.float32)
    for loaded in (weight, prepared(weight, torch.bfloat16)):
        for bad in (float("nan"), float("inf")):
            x = torch.randn(2, 300).to(torch.bfloat16)
            x[0, 7] = bad
            got = native_matmul(x, loaded).float()
            assert not got[0].isfinite().any() and got[1].isfinite().all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "out_features,in_features,group",
    [(1, 8, 8), (5, 24, 2), (37, 96, 32), (16, 128, 64), (7, 200, 40), (9, 256, 128), (3, 72, 72), (6, 2048, 64),
     (11, 320, 64), (4, 160, 32), (5, 384, 128), (3, 768, 256), (2, 1152, 384)],
)
def test_int4_kernel_matches_the_dequantized_product(dtype, out_features, in_features, group):
    torch.manual_seed(out_features * in_features + group)
    for scale_dtype, symmetric in ((torch.bfloat16, False), (torch.float32, False), (torch.bfloat16, True)):
        weight = int4_weight(out_features, in_features, group, scale_dtype, symmetric)
        loaded = prepared(weight, dtype)  # as a model of this dtype loads it: rows interleaved where the kernel wants
        assert native_kernel(weight, dtype) and native_kernel(loaded, dtype)
        for rows in ROWS:
            x = torch.randn(rows, in_features).to(dtype)
            assert_matches(native_matmul(x, weight), x, weight)
            assert_matches(native_matmul(x, loaded), x, loaded)
        x = strided_rows(3, in_features, dtype)
        assert_matches(native_matmul(x, weight), x, weight)
        assert_matches(native_matmul(x, loaded), x, loaded)


def prepared(weight: QuantizedWeight, dtype: torch.dtype) -> QuantizedWeight:
    """A copy of weight prepared for a model of dtype, checked to be interleaved exactly where this
    build's kernel reads rows interleaved (x86, bfloat16 activations; int4: groups of 32, 64 or
    multiples of 128, int8: rows of whole 4-byte chunks), over its whole blocks of rows."""
    loaded = copy.deepcopy(weight)
    prepare(loaded, NoFile(), dtype)
    bf16 = int(dtype == torch.bfloat16)
    block = (kernels.library().lm_int8_row_block(bf16, weight.in_features) if weight.bits == 8
             else kernels.library().lm_int4_row_block(bf16, weight.group_size))
    assert block in (1, ROW_BLOCK)
    assert loaded.interleaved == (weight.out_features // ROW_BLOCK * ROW_BLOCK if block > 1 else 0)
    return loaded


@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_zero_points_go_into_nibbles_where_they_fit(dtype):
    """Interleaved rows keep their zero points as 8 + zero point in a nibble each: the extremes -8
    and 7 come back exact, in the blocks and in the rows after them; a weight holding one that does
    not fit (another producer's 9) is left as stored. Both give the dequantized rows and product."""
    torch.manual_seed(5)
    block = kernels.library().lm_int4_row_block(int(dtype == torch.bfloat16), 32)
    for low, high in ((-8, 7), (-8, 9)):
        weight = int4_weight(21, 128, 32, torch.bfloat16, symmetric=False)
        for row, group, value in ((0, 0, low), (9, 3, high), (15, 1, high), (20, 2, low), (17, 0, high)):
            weight.zero_point[row, group] = value
        loaded = copy.deepcopy(weight)
        prepare(loaded, NoFile(), dtype)
        assert loaded.interleaved == (16 if block > 1 and high <= 7 else 0)
        assert torch.equal(loaded.dequantize_rows(slice(None), torch.float32), weight.dequantize_rows(slice(None), torch.float32))
        assert torch.equal(tiled_matmul(torch.eye(128, dtype=dtype), loaded).T, weight.dequantize_rows(slice(None), dtype))
        x = torch.randn(3, 128).to(dtype)
        assert_matches(native_matmul(x, loaded), x, weight)


@pytest.mark.parametrize("out_features", [8, 13, 37])
def test_interleaved_rows_give_back_the_stored_tensors_and_rows(out_features):
    """A weight whose rows were interleaved at load still saves the checkpoint's tensors and
    dequantizes any rows (a slice, indices across blocks and the rows after them) as stored."""
    torch.manual_seed(out_features)
    weights = [int4_weight(out_features, 128, 32, torch.bfloat16, symmetric) for symmetric in (False, True)]
    for weight in weights + [int8_weight(out_features, 128, torch.bfloat16)]:
        loaded = prepared(weight, torch.bfloat16)
        for name, tensor in weight.stored().items():
            assert torch.equal(loaded.stored()[name], tensor), name
        for rows in (slice(None), slice(3, 11), torch.tensor([out_features - 1, 0, 9 % out_features, 7, 7])):
            assert torch.equal(loaded.dequantize_rows(rows, torch.float32), weight.dequantize_rows(rows, torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_features", [8, 13, 37])
def test_embedding_lookups_are_the_dequantized_rows(dtype, out_features):
    """A quantized embedding's few lookups of a decode step (one kernel call per row, from its
    block where rows are interleaved) give exactly the rows dequantize_rows gives, and a prompt's
    many lookups too; an index out of range is refused as nn.Embedding refuses it."""
    torch.manual_seed(out_features)
    weights = [int4_weight(out_features, 128, 32, torch.bfloat16, symmetric) for symmetric in (False, True)]
    for weight in weights + [int8_weight(out_features, 128, torch.bfloat16)]:
        for loaded in (weight, prepared(weight, dtype)):
            embedding = linear.QuantizedEmbedding(loaded, dtype)
            for ids in ([[out_features - 1, 0, 9 % out_features]], [[7], [out_features - 1]], [list(range(out_features)) * 2]):
                ids = torch.tensor(ids)
                want = weight.dequantize_rows(ids.reshape(-1), dtype).view(*ids.shape, -1)
                assert torch.equal(embedding(ids), want)
            with pytest.raises(IndexError):
                embedding(torch.tensor([[out_features]]))


def test_int4_kernel_rounds_bfloat16_activations_to_int8_only_where_it_multiplies_in_integers():
    """AVX-512 (VNNI) and AVX2 multiply int4 nibbles by int8 activations, for groups a step's lanes
    divide (32, 64, multiples of 128); float32 activations, other groups and the plain C builds keep
    the activations as they are."""
    answer = kernels.library().lm_int4_int8_activations
    integer_isa = kernels.active_isa().name in ("avx512", "avx2")
    for group in (32, 64, 128, 256, 384):
        assert answer(1, group) == integer_isa and answer(0, group) == 0
    for group in (2, 8, 16, 40, 72, 96, 160):
        assert answer(1, group) == 0


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_int4_kernel_keeps_small_activations_beside_a_large_one_in_another_block(rows):
    """Where bfloat16 activations go to int8 (AVX-512, AVX2), each block of 32 has its own scale: a
    block of values around 1e-3 beside one holding 1000 keeps its precision. The weights are zero
    over the large one's group, so the output is the small blocks' alone (with one scale per row
    they would round to 0)."""
    torch.manual_seed(rows)
    dense = torch.randn(6, 256)
    dense[:, :64] = 0
    q = quantize_int4_groups(dense, 64, torch.float32, search=False)
    stored = compressed_tensors(q, (6, 256))
    weight = QuantizedWeight("w", 6, 256, 4, q.scale, q.zero_point, nibbles=stored["weight_packed"].view(torch.uint8))
    x = (torch.randn(rows, 256) * 1e-3).to(torch.bfloat16)
    x[:, 5] = 1000.0
    got = native_matmul(x, weight)
    assert_matches(got, x, weight)
    assert (got.abs() < 1).all() and (got != 0).all()


def test_int4_kernel_gives_nan_for_an_infinite_or_nan_activation():
    weight = int4_weight(13, 320, 64, torch.bfloat16, symmetric=False)
    for loaded in (weight, prepared(weight, torch.bfloat16)):
        for bad in (float("nan"), float("inf")):
            x = torch.randn(2, 320).to(torch.bfloat16)
            x[0, 7] = bad
            got = native_matmul(x, loaded).float()
            assert not got[0].isfinite().any() and got[1].isfinite().all()


def test_int4_kernel_reads_one_scale_per_tensor_and_float16_scales():
    """A scale broadcast over rows (stride 0, one per tensor) and a float16 one (copied to float32),
    as stored and interleaved at load; stored() still gives the scale as the checkpoint has it."""
    torch.manual_seed(1)
    weight = int4_weight(12, 64, 32, torch.float32, symmetric=False)
    weight.scale = weight.scale[:1].expand(12, -1)
    x = torch.randn(4, 64).bfloat16()
    for scale_dtype in (torch.float32, torch.float16):
        weight.scale = weight.scale.to(scale_dtype)
        loaded = prepared(weight, torch.bfloat16)
        assert_matches(native_matmul(x, weight), x, weight)
        assert_matches(native_matmul(x, loaded), x, weight)
        kept = loaded.stored()["weight_scale"]
        assert kept.dtype == scale_dtype and torch.equal(kept, weight.scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_matmul_runs_the_kernel_for_decode_and_torch_beyond(bits, dtype, monkeypatch):
    """Up to MAX_ROWS rows go to the kernel; more to the fallback path; both agree with the reference
    (bfloat16 prefill multiplies the weight rounded to bfloat16: within 1 %). The weight prepared as
    a model of that dtype loads it (for bfloat16 on x86, its rows interleaved)."""
    torch.manual_seed(bits)
    weight = int8_weight(48, 128, torch.bfloat16) if bits == 8 else int4_weight(48, 128, 32, torch.bfloat16, False)
    as_stored = copy.deepcopy(weight)
    prepare(weight, NoFile(), dtype)
    calls = []
    monkeypatch.setattr("lmtool.quantize.linear.native_matmul", lambda x, w: calls.append(x.shape[0]) or native_matmul(x, w))
    for rows in (1, kernels.MAX_ROWS, kernels.MAX_ROWS + 1, 40):
        x = torch.randn(rows, 128).to(dtype)
        got = quantized_matmul(x, weight)
        if dtype == torch.float32 or rows <= kernels.MAX_ROWS:
            assert_matches(got, x, weight)
        else:
            want = reference(x, as_stored)[0]
            assert (got.double() - want).abs().max() <= 1e-2 * (1 + want.abs().max())
    assert calls == [1, kernels.MAX_ROWS]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,out_features,in_features,group",
                         [(8, 37, 100, None), (8, 43, 256, None), (4, 37, 96, 32), (4, 9, 200, 40), (4, 5, 24, 2), (4, 43, 256, 64)])
@pytest.mark.parametrize("tile", [7, 13])
def test_prefill_tiles_are_the_dequantized_weight_exactly(dtype, bits, out_features, in_features, group, tile, monkeypatch):
    """Prefill's tiles (lm_int8_dequantize / lm_int4_dequantize) are bit for bit what
    schemes.dequantize gives, rounded once to the model dtype: the identity times the weight
    returns them through the dense matmul unchanged. Small tiles: several per weight, some (13)
    ending past the interleaved rows."""
    torch.manual_seed(out_features + in_features)
    monkeypatch.setattr(linear, "TILE_ELEMENTS", tile * in_features)
    weight = int8_weight(out_features, in_features, torch.bfloat16) if bits == 8 else int4_weight(
        out_features, in_features, group, torch.bfloat16, symmetric=False)
    identity = torch.eye(in_features, dtype=dtype)
    loaded = copy.deepcopy(weight)
    prepare(loaded, NoFile(), torch.bfloat16)  # rows interleaved where the kernel wants
    for tiles_of in (weight, loaded):
        assert torch.equal(tiled_matmul(identity, tiles_of).T, weight.dequantize_rows(slice(None), dtype))
    x = torch.randn(kernels.MAX_ROWS + 3, in_features).to(dtype)
    want = x.float() @ weight.dequantize_rows(slice(None), dtype).float().T
    assert (quantized_matmul(x, weight).float() - want).abs().max() <= 1e-2 * (1 + want.abs().max())


def test_prepare_keeps_the_mapped_nibbles_where_the_kernel_reads_them_as_stored():
    """No repack into torch's int4 layout (the load-time copy that raised peak memory) when the
    kernel takes the weight: float32 models read the mapped nibbles, bfloat16 ones interleaved
    rows where the kernel multiplies in integers (a copy that replaces the mapped pages, which
    are released); float16 models, which it does not take, still get torch's repack."""
    torch.manual_seed(2)
    released = []

    class File:
        def release(self, tensor):
            released.append(tensor)

    weight = int4_weight(64, 128, 64, torch.bfloat16, False)
    nibbles = weight.nibbles
    prepare(weight, File(), torch.float32)
    assert weight.int4pack is None and weight.nibbles is nibbles and not released
    interleaved = copy.deepcopy(weight)
    stored = (interleaved.nibbles, interleaved.scale, interleaved.zero_point)
    prepare(interleaved, File(), torch.bfloat16)
    if interleaved.interleaved:
        assert interleaved.int4pack is None and [t.data_ptr() for t in released] == [t.data_ptr() for t in stored]
    prepare(weight, File(), torch.float16)
    assert weight.int4pack is not None


@pytest.mark.parametrize("isa", other_instruction_sets())
def test_every_other_instruction_set_this_cpu_runs_matches_too(isa):
    """The same tests on the other instruction sets' builds (quant.c is compiled into each)."""
    rerun_tests_on_instruction_set(__file__, isa)


# --- the NEON builds, under qemu-user --------------------------------------------------------------

DRIVER = r"""
#include <stdio.h>
#include "quant.c"
/* Reads cases from stdin, one a line: "int8 BF16 M K N X W SCALE OUT" or
   "int4 BF16 M K N GROUP SCALE_BF16 X W SCALE ZERO|- OUT"; files hold the raw tensors. */
static void* slurp(const char* path) {
    FILE* f = fopen(path, "rb");
    if (!f) { perror(path); exit(2); }
    fseek(f, 0, SEEK_END);
    const long n = ftell(f);
    rewind(f);
    void* p = malloc((size_t)n + 64);
    if (fread(p, 1, (size_t)n, f) != (size_t)n) exit(3);
    fclose(f);
    return p;
}
int main(void) {
    char kind[8], x[4096], w[4096], s[4096], z[4096], o[4096];
    long bf16, M, K, N, group, scale_bf16;
    while (scanf("%7s", kind) == 1) {
        int status;
        void* y;
        if (!strcmp(kind, "int8")) {
            if (scanf("%ld %ld %ld %ld %4095s %4095s %4095s %4095s", &bf16, &M, &K, &N, x, w, s, o) != 8) return 4;
            y = malloc((size_t)(M * N * 4));
            status = lm_int8_linear((int)bf16, slurp(x), K, M, K, slurp(w), slurp(s), N, y, N, 0);
        } else {
            if (scanf("%ld %ld %ld %ld %ld %ld %4095s %4095s %4095s %4095s %4095s", &bf16, &M, &K, &N, &group, &scale_bf16,
                      x, w, s, z, o) != 11) return 4;
            y = malloc((size_t)(M * N * 4));
            status = lm_int4_linear((int)bf16, slurp(x), K, M, K, slurp(w), slurp(s), (int)scale_bf16, K / group,
                                    strcmp(z, "-") ? slurp(z) : NULL, group, N, y, N, 0);
        }
        if (status) return 5;
        FILE* f = fopen(o, "wb");
        fwrite(y, bf16 ? 2 : 4, (size_t)(M * N), f);
        fclose(f);
    }
    return 0;
}
"""
CROSS, QEMU = "aarch64-linux-gnu-gcc", "qemu-aarch64"


@pytest.mark.parametrize("isa", ["neon", "neon-bf16"])
def test_neon_builds_match_under_qemu(isa, tmp_path):
    """quant.c as the NEON builds compile it, run under qemu-user on the same cases' files."""
    missing = [tool for tool in (CROSS, QEMU) if not shutil.which(tool)]
    if missing:
        pytest.skip(f"needs {' and '.join(missing)} (apt-get install gcc-aarch64-linux-gnu qemu-user)")
    (tmp_path / "driver.c").write_text(DRIVER)
    binary = tmp_path / "driver"
    flags = [f for f in kernels.CFLAGS if f not in ("-shared", "-fPIC")]
    done = subprocess.run([CROSS, *flags, *kernels.BY_NAME[isa].cflags, "-I", str(kernels.SOURCE_DIR), str(tmp_path / "driver.c"),
                           "-o", str(binary), "-static"], capture_output=True, text=True)
    assert done.returncode == 0, kernels.first_error(done.stderr)
    torch.manual_seed(5)
    lines, checks = [], []

    def save(tensor: torch.Tensor) -> str:
        path = tmp_path / f"in{len(list(tmp_path.iterdir()))}.bin"
        path.write_bytes(tensor.contiguous().view(torch.uint8).numpy().tobytes())
        return str(path)

    for dtype in DTYPES:
        bf16 = int(dtype == torch.bfloat16)
        for rows in (1, 3, 9, 16):
            weight = int8_weight(37, 100, torch.bfloat16)
            x = torch.randn(rows, 100).to(dtype)
            out = str(tmp_path / f"out{len(checks)}.bin")
            lines.append(f"int8 {bf16} {rows} 100 37 {save(x)} {save(weight.codes)} {save(weight.row_scale(torch.float32))} {out}")
            checks.append((out, x, weight))
            for group, symmetric in ((32, False), (40, True)):
                weight = int4_weight(13, 160, group, torch.bfloat16, symmetric)
                x = torch.randn(rows, 160).to(dtype)
                out = str(tmp_path / f"out{len(checks)}.bin")
                zero = save(weight.zero_point) if weight.zero_point is not None else "-"
                lines.append(f"int4 {bf16} {rows} 160 13 {group} 1 {save(x)} {save(weight.nibbles)} {save(weight.scale)} {zero} {out}")
                checks.append((out, x, weight))
    done = subprocess.run([QEMU, "-cpu", "max", str(binary)], input="\n".join(lines) + "\n", capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr[-2000:]
    for out, x, weight in checks:
        got = torch.frombuffer(bytearray(Path(out).read_bytes()), dtype=x.dtype).view(x.shape[0], weight.out_features)
        assert_matches(got, x, weight, lib=False)  # the plain C tiles: activations as they are


def test_interleaved_copies_ask_for_huge_pages_over_their_whole_aligned_span(monkeypatch):
    """The copies made at load ask for 2 MB pages (MADV_HUGEPAGE) over exactly the 2 MB-aligned
    pages inside them, before anything is written there; a copy under 2 MB asks for nothing."""
    import mmap

    if not hasattr(mmap, "MADV_HUGEPAGE"):
        pytest.skip("no MADV_HUGEPAGE on this platform")
    calls = []

    class FakeLibc:
        def madvise(self, start, length, advice):
            calls.append((start, length, advice))
            return 0

    monkeypatch.setattr(linear, "_libc", lambda: FakeLibc())
    huge = linear.HUGE_PAGE
    big = torch.empty(5 * huge + 123, dtype=torch.uint8)
    assert linear._in_huge_pages(big) is big
    (start, length, advice), = calls
    assert advice == mmap.MADV_HUGEPAGE and start % huge == 0 and length % huge == 0 and length >= 4 * huge
    assert big.data_ptr() <= start < big.data_ptr() + huge and start + length <= big.data_ptr() + big.numel()
    calls.clear()
    linear._in_huge_pages(torch.empty(huge - 1, dtype=torch.uint8))
    assert calls == []
