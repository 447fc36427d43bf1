"""Native CPU kernels for the decode step, built once with the system C compiler and loaded with
ctypes.

Why: decoding multiplies a few activation rows by every weight matrix, so its speed is the rate
at which weights stream from memory. PyTorch's F.linear reaches about half the DRAM bandwidth
there; these kernels read the checkpoint's row-major weights as they are (memory-mapped, never
reordered or copied) and reach it. A float32 model whose checkpoint is bfloat16 keeps its
weights in bfloat16 and widens them in registers (exact), so it streams half the bytes. Beside
the linear layers, the step's GELU (gated or not) and its one-query attention are single calls
(`gelu_tanh_mul`, `attend_one`): in a small model the many few-microsecond operations they
replace cost as much as a third of the weight streaming.

The source is C with AVX-512 intrinsics (AVX512-BF16 for bfloat16 activations) and OpenMP; the
shared object links the libgomp that torch has already loaded, so it runs on torch's threads.
It is built into ~/.cache/lmtool/kernels under a hash of the source and compiler, in about a
second, the first time a model loads. Without a compiler or those CPU features, `available()`
is False and callers use oneDNN (lmtool.inference) and PyTorch's operations. LMTOOL_NATIVE=0
turns the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

# Largest number of activation rows the kernels take; prefill goes to F.linear (compute-bound,
# where oneDNN's blocked GEMM is faster).
MAX_ROWS = 16
MAX_PARTS = 16
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fopenmp", "-shared", "-fPIC"]
# (activation dtype, weight dtype) -> the kernel's `kind`
KINDS = {
    (torch.bfloat16, torch.bfloat16): 0,
    (torch.float32, torch.bfloat16): 1,
    (torch.float32, torch.float32): 2,
}

SOURCE = r"""
/* lmtool native CPU kernels: small-batch linear layers that stream weights at memory speed.
 *
 * y[M, N] = x[M, K] . W[N, K]^T (+ bias) for M <= 16 (decode), W row-major as stored in the
 * checkpoint, so no reorder or copy is ever needed. W may be given in several parts (q/k/v,
 * gate/up): one call computes all of them into one output, as if they were concatenated.
 * Accumulation is in float32; bfloat16 outputs are rounded to nearest even.
 *   x bf16, W bf16: AVX512-BF16 dot products of bf16 pairs (as oneDNN does);
 *   x f32,  W bf16: W widened to f32 in registers (exact), f32 FMA: a float32 model computed
 *                   from bfloat16-stored weights reads half the bytes of a float32 copy;
 *   x f32,  W f32:  f32 FMA.
 */
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct { const void* w; const void* bias; int64_t rows; } part_t;

static inline float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* ---- loads of one step: 32 bf16 elements (bf16 x bf16), 16 for the f32 paths; `left` < 16
 * means a masked tail ----------------------------------------------------------------------------- */
static inline __m512 ld_ps(const float* p, int64_t left) {
    if (left >= 16) return _mm512_loadu_ps(p);
    return _mm512_maskz_loadu_ps((__mmask16)((1u << left) - 1), p);
}
static inline __m512 widen_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
static inline __m512 ld_bf16_as_ps(const uint16_t* p, int64_t left) {
    return widen_bf16(left >= 16 ? _mm256_loadu_si256((const __m256i*)p)
                                 : _mm256_maskz_loadu_epi16((__mmask16)((1u << left) - 1), p));
}
/* Lanes [lo, hi) of one step, the others zero (and never read, so never a fault). */
static inline uint64_t lanes(int64_t lo, int64_t hi) { return ((1ull << hi) - 1) & ~((1ull << lo) - 1); }
static inline __m512bh ld_bh_r(const uint16_t* p, int64_t lo, int64_t hi) {
    return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)lanes(lo, hi), p);
}
static inline __m512 ld_ps_r(const float* p, int64_t lo, int64_t hi) { return _mm512_maskz_loadu_ps((__mmask16)lanes(lo, hi), p); }
static inline __m512 ld_bf16_as_ps_r(const uint16_t* p, int64_t lo, int64_t hi) {
    return widen_bf16(_mm256_maskz_loadu_epi16((__mmask16)lanes(lo, hi), p));
}

/* ---- tiles: MB rows of x times NB rows of W, accumulators in registers ------------------------
 * Each k-step loads the MB activation vectors once, then streams one vector of each of the NB
 * weight rows through all of them. NB = 8 rows at a time keep enough independent streams in
 * flight to reach DRAM bandwidth at batch 1. Row j of W is read at w + j * ldw over [lead, span):
 * a row that starts `lead` elements past a vector boundary is read from that boundary, with those
 * lanes masked off (see lm_linear), so that every load is aligned. */
#define TILE(NAME, XT, WT, VT, STEP, XLOAD, XLOADR, WLOAD, WLOADR, MAC, MB, NB)                      \
static inline __attribute__((always_inline)) void tile_##NAME##_##MB##_##NB(                        \
    const XT* x, int64_t ldx, const WT* w, int64_t ldw, int64_t span, int64_t lead,                \
    float* out /* [MB][NB] */, const WT* ahead, int ahead_rows) {                                  \
    __m512 acc[MB][NB];                                                                            \
    for (int i = 0; i < MB; i++) for (int j = 0; j < NB; j++) acc[i][j] = _mm512_setzero_ps();     \
    int64_t k = 0;                                                                                 \
    if (lead || span < STEP) { /* first step: lanes [lead, min(span, STEP)) */                      \
        const int64_t hi = span < STEP ? span : STEP;                                              \
        VT xv[MB];                                                                                 \
        for (int i = 0; i < MB; i++) xv[i] = XLOADR(x + i * ldx, lead, hi);                        \
        for (int j = 0; j < NB; j++) {                                                             \
            const VT wv = WLOADR(w + j * ldw, lead, hi);                                           \
            for (int i = 0; i < MB; i++) acc[i][j] = MAC(acc[i][j], xv[i], wv);                    \
        }                                                                                          \
        k = STEP;                                                                                  \
    }                                                                                              \
    for (; k + STEP <= span; k += STEP) {                                                          \
        for (int r = 0; r < ahead_rows; r++) _mm_prefetch((const char*)(ahead + r * ldw + k), _MM_HINT_T1); \
        VT xv[MB];                                                                                 \
        for (int i = 0; i < MB; i++) xv[i] = XLOAD(x + i * ldx + k);                               \
        for (int j = 0; j < NB; j++) {                                                             \
            const VT wv = WLOAD(w + j * ldw + k);                                                  \
            for (int i = 0; i < MB; i++) acc[i][j] = MAC(acc[i][j], xv[i], wv);                    \
        }                                                                                          \
    }                                                                                              \
    if (k < span) { /* masked tail */                                                              \
        VT xv[MB];                                                                                 \
        for (int i = 0; i < MB; i++) xv[i] = XLOADR(x + i * ldx + k, 0, span - k);                 \
        for (int j = 0; j < NB; j++) {                                                             \
            const VT wv = WLOADR(w + j * ldw + k, 0, span - k);                                    \
            for (int i = 0; i < MB; i++) acc[i][j] = MAC(acc[i][j], xv[i], wv);                    \
        }                                                                                          \
    }                                                                                              \
    for (int i = 0; i < MB; i++) for (int j = 0; j < NB; j++) out[i * NB + j] = _mm512_reduce_add_ps(acc[i][j]); \
}
static inline __m512bh ld_bh_full(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
static inline __m512 ld_ps_full(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 ld_bf16_as_ps_full(const uint16_t* p) { return ld_bf16_as_ps(p, 16); }
static inline __m512 mac_bh(__m512 acc, __m512bh x, __m512bh w) { return _mm512_dpbf16_ps(acc, x, w); }
static inline __m512 mac_ps(__m512 acc, __m512 x, __m512 w) { return _mm512_fmadd_ps(x, w, acc); }
#define TILES(NAME, XT, WT, VT, STEP, XL, XLR, WL, WLR, MAC)                                       \
    TILE(NAME, XT, WT, VT, STEP, XL, XLR, WL, WLR, MAC, 1, 8)                                       \
    TILE(NAME, XT, WT, VT, STEP, XL, XLR, WL, WLR, MAC, 2, 8)                                       \
    TILE(NAME, XT, WT, VT, STEP, XL, XLR, WL, WLR, MAC, 1, 4)                                       \
    TILE(NAME, XT, WT, VT, STEP, XL, XLR, WL, WLR, MAC, 1, 1)
TILES(bb, uint16_t, uint16_t, __m512bh, 32, ld_bh_full, ld_bh_r, ld_bh_full, ld_bh_r, mac_bh)
TILES(fb, float, uint16_t, __m512, 16, ld_ps_full, ld_ps_r, ld_bf16_as_ps_full, ld_bf16_as_ps_r, mac_ps)
TILES(ff, float, float, __m512, 16, ld_ps_full, ld_ps_r, ld_ps_full, ld_ps_r, mac_ps)

enum { BF16_BF16 = 0, F32_BF16 = 1, F32_F32 = 2 };  /* (x, W) dtypes */

/* One block of nb (8, 4 or 1) weight rows for all M activation rows: out[M][nb]. With M >= 4 the
   8-row block is read in several passes (2 activation rows each) while the first comes from DRAM
   and the others from cache, so each pass prefetches a share of the next block's rows (`next`,
   or NULL) into L2: memory and arithmetic then overlap instead of alternating. */
static void block(int kind, const void* x, int64_t ldx, int64_t M, const void* w, int64_t ldw, int64_t span,
                  int64_t lead, int64_t nb, float* out, const void* next) {
#define RUN(NAME, XT, WT)                                                                          \
    {                                                                                              \
        const XT* xx = (const XT*)x; const WT* ww = (const WT*)w; const WT* ahead = (const WT*)next; \
        int64_t m = 0;                                                                             \
        if (nb == 8) {                                                                             \
            const int64_t passes = M / 2;                                                          \
            const int share = passes >= 2 && ahead ? (int)((8 + passes - 1) / passes) : 0;         \
            for (int64_t p = 0; m + 2 <= M; m += 2, p++) {                                         \
                const int first = (int)(p * share) < 8 ? (int)(p * share) : 8;                     \
                const int rows = first + share <= 8 ? share : 8 - first;                           \
                tile_##NAME##_2_8(xx + m * ldx, ldx, ww, ldw, span, lead, out + m * 8,             \
                                  rows ? ahead + first * ldw : ww, rows);                          \
            }                                                                                      \
            for (; m < M; m++) tile_##NAME##_1_8(xx + m * ldx, ldx, ww, ldw, span, lead, out + m * 8, ww, 0); \
        } else if (nb == 4) {                                                                      \
            for (; m < M; m++) tile_##NAME##_1_4(xx + m * ldx, ldx, ww, ldw, span, lead, out + m * 4, ww, 0); \
        } else {                                                                                   \
            for (; m < M; m++) tile_##NAME##_1_1(xx + m * ldx, ldx, ww, ldw, span, lead, out + m, ww, 0); \
        }                                                                                          \
    }
    if (kind == BF16_BF16) RUN(bb, uint16_t, uint16_t)
    else if (kind == F32_BF16) RUN(fb, float, uint16_t)
    else RUN(ff, float, float)
#undef RUN
}

/* Weight rows off a vector boundary. safetensors aligns tensor data to 8 bytes only, so most
   checkpoint tensors start 8 to 56 bytes past a 64-byte line, and every load then straddles two
   lines. At one activation row that hides under the memory stream; with several, each block is
   read again from cache, split loads and all (Gemma-2B's mapped weights at 8 rows: 27 -> 32 GB/s
   once aligned). When every row of a part starts at the same offset `lead` past a boundary (the
   row length is a multiple of the vector), the part is read from the boundary before its first
   element with the first `lead` lanes masked off, and the activations are given the same offset:
   a copy of x with `lead` zeros before each row (a few KB, made once per call and shared by the
   parts of equal lead). */
static __thread char* shifted_rows;
static __thread size_t shifted_size;
static char* shifted_buffer(size_t bytes) {
    if (shifted_size < bytes) {
        free(shifted_rows);
        shifted_size = (bytes + 63) / 64 * 64;
        shifted_rows = aligned_alloc(64, shifted_size);
        if (!shifted_rows) shifted_size = 0;
    }
    return shifted_rows;
}

/* y[M, ldy] (columns of all parts side by side). M <= 16. */
void lm_linear(int kind, const void* x, int64_t M, int64_t K, const part_t* parts, int64_t nparts,
               void* y, int64_t ldy) {
    const int64_t width = 8;  /* weight rows per parallel work item */
    int64_t starts[16], firsts[16], total = 0, col = 0;
    for (int64_t p = 0; p < nparts; p++) {
        starts[p] = total; firsts[p] = col;
        total += (parts[p].rows + width - 1) / width;
        col += parts[p].rows;
    }
    const int x_bf16 = kind == BF16_BF16;
    const size_t wsize = kind == F32_F32 ? 4 : 2, xsize = x_bf16 ? 2 : 4;
    const int64_t step = x_bf16 ? 32 : 16, vbytes = step * wsize;  /* weight elements, bytes per load */
    int64_t lead[16], ldx[16];
    const char* xs[16];
    size_t bytes = 0;
    for (int64_t p = 0; p < nparts; p++) {
        const uintptr_t at = (uintptr_t)parts[p].w;
        lead[p] = (K * wsize) % vbytes == 0 && at % wsize == 0 ? (int64_t)(at % vbytes / wsize) : 0;
        ldx[p] = lead[p] ? (lead[p] + K + step - 1) / step * step : K;
        bytes += lead[p] ? M * ldx[p] * xsize : 0;
    }
    char* buffer = bytes ? shifted_buffer(bytes) : NULL;
    for (int64_t p = 0, used = 0; p < nparts; p++) {
        xs[p] = (const char*)x;
        if (!lead[p]) continue;
        if (!buffer) { lead[p] = 0; ldx[p] = K; continue; }  /* no memory: unaligned loads */
        int64_t q = 0;
        while (q < p && lead[q] != lead[p]) q++;
        if (q < p) { xs[p] = xs[q]; continue; }
        char* rows = buffer + used;
        for (int64_t m = 0; m < M; m++) {
            char* row = rows + m * ldx[p] * xsize;
            memset(row, 0, lead[p] * xsize);
            memcpy(row + lead[p] * xsize, (const char*)x + m * K * xsize, K * xsize);
            memset(row + (lead[p] + K) * xsize, 0, (ldx[p] - lead[p] - K) * xsize);
        }
        xs[p] = rows;
        used += M * ldx[p] * xsize;
    }
    #pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < total; t++) {
        int64_t p = nparts - 1;
        while (starts[p] > t) p--;
        const int64_t n0 = (t - starts[p]) * width;
        const int64_t end = n0 + width < parts[p].rows ? n0 + width : parts[p].rows;
        float out[16 * 8];
        for (int64_t n = n0; n < end;) {
            const int64_t left = end - n;
            const int64_t nb = left >= 8 ? 8 : left >= 4 ? 4 : 1;
            const char* rows = (const char*)parts[p].w + n * K * wsize;
            const void* next = n + 16 <= parts[p].rows ? rows + 8 * K * wsize : NULL;
            block(kind, xs[p], ldx[p], M, rows - lead[p] * wsize, K, lead[p] + K, lead[p], nb, out, next);
            for (int64_t m = 0; m < M; m++) {
                for (int64_t j = 0; j < nb; j++) {
                    float v = out[m * nb + j];
                    if (parts[p].bias) v += x_bf16 ? bf16_to_f32(((const uint16_t*)parts[p].bias)[n + j])
                                                   : ((const float*)parts[p].bias)[n + j];
                    const int64_t at = m * ldy + firsts[p] + n + j;
                    if (x_bf16) ((uint16_t*)y)[at] = f32_to_bf16(v); else ((float*)y)[at] = v;
                }
            }
            n += nb;
        }
    }
}

/* ---- elementwise and attention for the decode step ---------------------------------------------
 * A decode step of a small model is dominated by per-operation overhead, not arithmetic: BLOOM's
 * GELU is eight tensor operations and eager attention four, each a few microseconds, per layer.
 * These do each in one call. They compute in float32 and round once. */

/* e^x for float32 lanes: x = n ln2 + r, |r| <= ln2/2, e^r by its Taylor series to degree 7
 * (relative error < 1e-8, below float32 rounding), times 2^n. -inf gives 0. */
static inline __m512 exp_ps(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-104.0f), hi = _mm512_set1_ps(88.7f);
    const __mmask16 finite = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps(finite, _mm512_scalef_ps(p, n));
}

/* 16 lanes of a bf16 or f32 array as f32, and back (bf16 rounded to nearest even); `left` < 16
   is a masked tail. */
static inline __m512 ld16(const void* p, int64_t i, int bf16, int64_t left) {
    return bf16 ? ld_bf16_as_ps((const uint16_t*)p + i, left) : ld_ps((const float*)p + i, left);
}
static inline void st16(void* p, int64_t i, int bf16, __m512 v, int64_t left) {
    const __mmask16 m = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
    if (!bf16) { _mm512_mask_storeu_ps((float*)p + i, m, v); return; }
    /* round to nearest even, NaN kept quiet: as f32_to_bf16 */
    __m512i u = _mm512_castps_si512(v);
    __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                          _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc00000));
    _mm256_mask_storeu_epi16((uint16_t*)p + i, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}

/* out[r, i] = gelu_tanh(gate[r, i]) * (up ? up[r, i] : 1) over rows x n, rows strided.
 * gelu_tanh(x) = x/2 (1 + tanh(y)) = x / (1 + e^(-2y)), y = sqrt(2/pi) (x + 0.044715 x^3):
 * one exp and no cancellation near 0. */
void lm_gelu_tanh_mul(int bf16, const void* gate, int64_t gate_stride, const void* up, int64_t up_stride,
                      void* out, int64_t out_stride, int64_t rows, int64_t n) {
    const int64_t chunks = (n + 255) / 256, size = bf16 ? 2 : 4;
    #pragma omp parallel for schedule(static) if (rows * n >= 65536)
    for (int64_t t = 0; t < rows * chunks; t++) {
        const int64_t r = t / chunks, begin = (t % chunks) * 256, end = begin + 256 < n ? begin + 256 : n;
        const char* g = (const char*)gate + r * gate_stride * size;
        const char* u = up ? (const char*)up + r * up_stride * size : NULL;
        char* o = (char*)out + r * out_stride * size;
        for (int64_t i = begin; i < end; i += 16) {
            const int64_t left = end - i;
            const __m512 x = ld16(g, i, bf16, left);
            const __m512 y = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                           _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), x), _mm512_mul_ps(x, x), x));
            __m512 v = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_mul_ps(_mm512_set1_ps(-2.0f), y))));
            if (u) v = _mm512_mul_ps(v, ld16(u, i, bf16, left));
            st16(o, i, bf16, v, left);
        }
    }
}

/* Attention of one new query per sequence over S cached keys (the decode step), every head:
 *   out[b, h] = softmax_s(scale q[b,h].k[b,g,s] + bias[b*H+h, s], masked keys excluded) . v[b,g,s]
 * with g = h / (H / KV) (grouped and multi-query attention read each KV head once per group).
 * q[b,h] at q + b*q_bs + h*q_hs, keys at k + b*kv_bs + g*kv_hs + s*hd (values alike), bias rows
 * (or NULL) bias_rs apart, mask (or NULL) a byte per key, mask_bs apart per sequence; out
 * [B, H, hd] contiguous. scores: scratch of B*H*S floats. */
void lm_attend_one(int bf16, const void* q, int64_t q_bs, int64_t q_hs, const void* k, const void* v,
                   int64_t kv_bs, int64_t kv_hs, int64_t B, int64_t H, int64_t KV, int64_t S, int64_t hd,
                   float scale, const void* bias, int64_t bias_rs, const uint8_t* mask, int64_t mask_bs,
                   void* out, float* scores) {
    const int64_t size = bf16 ? 2 : 4, groups = H / KV;
    #pragma omp parallel for schedule(static) if (B * H * S * hd >= 32768)
    for (int64_t bh = 0; bh < B * H; bh++) {
        const int64_t b = bh / H, h = bh % H, g = h / groups;
        const char* qv = (const char*)q + (b * q_bs + h * q_hs) * size;
        const char* keys = (const char*)k + (b * kv_bs + g * kv_hs) * size;
        const char* values = (const char*)v + (b * kv_bs + g * kv_hs) * size;
        const char* brow = bias ? (const char*)bias + bh * bias_rs * size : NULL;
        float* sc = scores + bh * S;
        float top = -INFINITY;
        for (int64_t s = 0; s < S; s++) {
            if (mask && !mask[b * mask_bs + s]) { sc[s] = -INFINITY; continue; }
            __m512 acc = _mm512_setzero_ps();
            for (int64_t i = 0; i < hd; i += 16)
                acc = _mm512_fmadd_ps(ld16(qv, i, bf16, hd - i), ld16(keys + s * hd * size, i, bf16, hd - i), acc);
            float x = _mm512_reduce_add_ps(acc) * scale;
            if (brow) x += bf16 ? bf16_to_f32(((const uint16_t*)brow)[s]) : ((const float*)brow)[s];
            sc[s] = x;
            if (x > top) top = x;
        }
        float total = 0.0f;
        if (top > -INFINITY) {
            __m512 sum = _mm512_setzero_ps();
            for (int64_t s = 0; s < S; s += 16) {
                const __mmask16 m = S - s >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (S - s)) - 1);
                const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sc + s), _mm512_set1_ps(top)));
                _mm512_mask_storeu_ps(sc + s, m, e);
                sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
            }
            total = _mm512_reduce_add_ps(sum);
        } else {
            for (int64_t s = 0; s < S; s++) sc[s] = 0.0f;
        }
        const float norm = total > 0.0f ? 1.0f / total : 0.0f;  /* every key masked: zeros */
        char* o = (char*)out + bh * hd * size;
        for (int64_t i = 0; i < hd; i += 64) {  /* 4 accumulators of 16 lanes: hd up to 64 at a time */
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            const int64_t width = hd - i < 64 ? hd - i : 64;
            for (int64_t s = 0; s < S; s++) {
                if (sc[s] == 0.0f) continue;
                const __m512 p = _mm512_set1_ps(sc[s]);
                const char* row = values + s * hd * size;
                for (int j = 0; j * 16 < width; j++)
                    acc[j] = _mm512_fmadd_ps(p, ld16(row, i + j * 16, bf16, width - j * 16), acc[j]);
            }
            for (int j = 0; j * 16 < width; j++)
                st16(o, i + j * 16, bf16, _mm512_mul_ps(acc[j], _mm512_set1_ps(norm)), width - j * 16);
        }
    }
}
"""


class Part(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("rows", ctypes.c_int64)]


def cpu_has_features() -> bool:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return all(flag in flags for flag in CPU_FLAGS)


def kernel_cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lmtool" / "kernels"


def build(compiler: str, source: str = SOURCE) -> Path:
    """Compile the kernels' source once per (source, compiler version, flags); returns the shared
    object. benchmarks/kernel_sweep.py builds another revision's source beside this one."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([source, version, *CFLAGS]).encode()).hexdigest()[:16]
    target = kernel_cache() / f"lm_linear-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        c_file = Path(tmp) / "lm_linear.c"
        c_file.write_text(source)
        built = Path(tmp) / target.name
        subprocess.run([compiler, *CFLAGS, str(c_file), "-o", str(built)], check=True, capture_output=True, timeout=300)
        os.replace(built, target)  # atomic: a concurrent build of the same key is harmless
    return target


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
ARGTYPES = {
    "lm_linear": [ctypes.c_int, _ptr, _i64, _i64, ctypes.POINTER(Part), _i64, _ptr, _i64],
    "lm_gelu_tanh_mul": [ctypes.c_int, _ptr, _i64, _ptr, _i64, _ptr, _i64, _i64, _i64],
    "lm_attend_one": [
        ctypes.c_int, _ptr, _i64, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _i64,
        ctypes.c_float, _ptr, _i64, _ptr, _i64, _ptr, _ptr,
    ],
}


def load_library(path: Path) -> ctypes.CDLL:
    """A built kernels object with the argument types of the functions it has declared (an older
    revision's, built by benchmarks/kernel_sweep.py, may lack the later ones)."""
    lib = ctypes.CDLL(str(path))
    for name, argtypes in ARGTYPES.items():
        if hasattr(lib, name):
            function = getattr(lib, name)
            function.argtypes, function.restype = argtypes, None
    return lib


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None when they cannot be used here (see the module docstring)."""
    if os.environ.get("LMTOOL_NATIVE", "1") == "0" or not cpu_has_features():
        return None
    cc = compiler()
    if cc is None:
        return None
    try:
        return load_library(build(cc))
    except (OSError, subprocess.SubprocessError):
        return None


def available() -> bool:
    return library() is not None


def supports(activation: torch.dtype, weight: torch.dtype) -> bool:
    return (activation, weight) in KINDS


class NativeParts:
    """Weight parts [N_i, K] (and optional biases) multiplied by the kernels in one call, their
    outputs side by side: y[M, sum N_i] = x[M, K] . concat(W_i)^T + concat(b_i)."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None], activation: torch.dtype):
        if len(weights) > MAX_PARTS:
            raise ValueError(f"at most {MAX_PARTS} parts")
        self.weights = [w.contiguous() for w in weights]
        self.biases = [b.contiguous() if b is not None else None for b in biases]
        self.kind = KINDS[(activation, self.weights[0].dtype)]
        self.in_features = self.weights[0].shape[1]
        self.out_features = sum(w.shape[0] for w in self.weights)
        # Built once: the tensors never move, so their addresses stay valid.
        self.parts = (Part * len(weights))(
            *[Part(w.data_ptr(), b.data_ptr() if b is not None else None, w.shape[0]) for w, b in zip(self.weights, self.biases)]
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] contiguous, M <= MAX_ROWS, in the activation dtype -> [M, N]."""
        y = torch.empty(x.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        self.run(x, y)
        return y

    def run(self, x: torch.Tensor, y: torch.Tensor, lib: ctypes.CDLL | None = None) -> None:
        """y [M, N] = x [M, K] . W^T (+ b), both contiguous; lib: another build of the kernels
        (benchmarks/kernel_sweep.py), else this tree's."""
        (lib or library()).lm_linear(
            self.kind, x.data_ptr(), x.shape[0], self.in_features, self.parts, len(self.weights), y.data_ptr(),
            self.out_features,
        )


# --- the decode step's elementwise and attention kernels ------------------------------------------


def usable(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels can take these tensors: CPU, bfloat16 or float32 alike, and no
    autograd (the kernels have no backward; training keeps PyTorch's operations)."""
    present = [t for t in tensors if t is not None]
    first = present[0]
    return (
        first.device.type == "cpu"
        and first.dtype in (torch.bfloat16, torch.float32)
        and all(t.dtype == first.dtype and t.device == first.device for t in present)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in present))
        and available()
    )


def rows_of(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x as [rows, n] with unit stride along n (a view when it can be) and the row stride."""
    flat = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if flat.stride(-1) != 1 or (flat.shape[0] > 1 and flat.stride(0) < flat.shape[1]):
        flat = flat.contiguous()
    return flat, flat.stride(0)


def gelu_tanh_mul(gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """gelu(gate, approximate="tanh") * up (or just the GELU), in one pass; float32 inside, one
    rounding. gate and up may be column slices of one fused projection output."""
    g, g_stride = rows_of(gate)
    u, u_stride = rows_of(up) if up is not None else (None, 0)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    library().lm_gelu_tanh_mul(
        int(gate.dtype == torch.bfloat16), g.data_ptr(), g_stride, u.data_ptr() if u is not None else None,
        u_stride, out.data_ptr(), gate.shape[-1], g.shape[0], gate.shape[-1],
    )
    return out


def attend_one(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new query per sequence: q [B,H,1,hd], k/v [B,KV,S,hd] (views of a KV
    cache: rows of hd contiguous), bias [B*H, S] added to the scaled scores (ALiBi) or None,
    mask the step's boolean attention mask [B,1,1,S] (True = visible; layers.causal_mask) or None
    -> [B,H,1,hd] (a view of [B,1,H,hd], so the caller's transpose back is free). Softmax in
    float32."""
    B, H, _, hd = q.shape
    KV, S = k.shape[1], k.shape[2]
    if q.stride(-1) != 1:
        q = q.contiguous()
    for cached in (k, v):
        if cached.stride(-1) != 1 or cached.stride(-2) != hd or cached.stride() != k.stride():
            raise ValueError("attend_one: keys and values must be KV-cache views with rows of head_dim")
    bias, bias_stride = rows_of(bias.reshape(B * H, S)) if bias is not None else (None, 0)
    # [B,S]: the mask's one query row
    key_mask, mask_stride = rows_of(mask[:, 0, 0, :S]) if mask is not None else (None, 0)
    out = torch.empty(B, 1, H, hd, dtype=q.dtype, device=q.device)
    scores = torch.empty(B * H * S, dtype=torch.float32, device=q.device)
    library().lm_attend_one(
        int(q.dtype == torch.bfloat16), q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), v.data_ptr(),
        k.stride(0), k.stride(1), B, H, KV, S, hd, scale,
        bias.data_ptr() if bias is not None else None, bias_stride,
        key_mask.data_ptr() if key_mask is not None else None, mask_stride,
        out.data_ptr(), scores.data_ptr(),
    )
    return out.transpose(1, 2)
