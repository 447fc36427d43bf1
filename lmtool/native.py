"""Native CPU kernels for linear layers at small batch (decode), built once with the system
C compiler and loaded with ctypes.

Why: decoding multiplies a few activation rows by every weight matrix, so its speed is the rate
at which weights stream from memory. PyTorch's F.linear reaches about half the DRAM bandwidth
there; these kernels read the checkpoint's row-major weights as they are (memory-mapped, never
reordered or copied) and reach it. A float32 model whose checkpoint is bfloat16 keeps its
weights in bfloat16 and widens them in registers (exact), so it streams half the bytes.

The source is C with AVX-512 intrinsics (AVX512-BF16 for bfloat16 activations) and OpenMP; the
shared object links the libgomp that torch has already loaded, so it runs on torch's threads.
It is built into ~/.cache/lmtool/kernels under a hash of the source and compiler, in about a
second, the first time a model loads. Without a compiler or those CPU features, `available()`
is False and callers use oneDNN (lmtool.prepack). LMTOOL_NATIVE=0 turns the kernels off.
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
#include <string.h>

typedef struct { const void* w; const void* bias; int64_t rows; } part_t;

static inline float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* ---- loads of one k-step; `left` < step means a masked tail --------------------------------- */
/* bf16 x bf16: 32 elements per step */
static inline __m512bh ld_bh(const uint16_t* p, int64_t left) {
    if (left >= 32) return (__m512bh)_mm512_loadu_si512(p);
    return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1ull << left) - 1), p);
}
/* 16 elements per step for the f32 paths */
static inline __m512 ld_ps(const float* p, int64_t left) {
    if (left >= 16) return _mm512_loadu_ps(p);
    return _mm512_maskz_loadu_ps((__mmask16)((1u << left) - 1), p);
}
static inline __m512 ld_bf16_as_ps(const uint16_t* p, int64_t left) {
    __m256i h = left >= 16 ? _mm256_loadu_si256((const __m256i*)p)
                           : _mm256_maskz_loadu_epi16((__mmask16)((1u << left) - 1), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* ---- tiles: MB rows of x times NB rows of W, accumulators in registers ------------------------
 * Each k-step loads the MB activation vectors once, then streams one vector of each of the NB
 * weight rows through all of them. NB = 8 rows at a time keep enough independent streams in
 * flight to reach DRAM bandwidth at batch 1. */
#define TILE(NAME, XT, WT, VT, STEP, XLOAD, XLOADM, WLOAD, WLOADM, MAC, MB, NB)                      \
static inline __attribute__((always_inline)) void tile_##NAME##_##MB##_##NB(                        \
    const XT* x, int64_t ldx, const WT* w, int64_t K, float* out /* [MB][NB] */,                   \
    const WT* ahead, int ahead_rows) {                                                             \
    __m512 acc[MB][NB];                                                                            \
    for (int i = 0; i < MB; i++) for (int j = 0; j < NB; j++) acc[i][j] = _mm512_setzero_ps();     \
    int64_t k = 0;                                                                                 \
    for (; k + STEP <= K; k += STEP) {                                                             \
        for (int r = 0; r < ahead_rows; r++) _mm_prefetch((const char*)(ahead + r * K + k), _MM_HINT_T1); \
        VT xv[MB];                                                                                 \
        for (int i = 0; i < MB; i++) xv[i] = XLOAD(x + i * ldx + k);                               \
        for (int j = 0; j < NB; j++) {                                                             \
            const VT wv = WLOAD(w + j * K + k);                                                    \
            for (int i = 0; i < MB; i++) acc[i][j] = MAC(acc[i][j], xv[i], wv);                    \
        }                                                                                          \
    }                                                                                              \
    if (k < K) { /* masked tail: missing elements load as zeros */                                 \
        VT xv[MB];                                                                                 \
        for (int i = 0; i < MB; i++) xv[i] = XLOADM(x + i * ldx + k, K - k);                       \
        for (int j = 0; j < NB; j++) {                                                             \
            const VT wv = WLOADM(w + j * K + k, K - k);                                            \
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
#define TILES(NAME, XT, WT, VT, STEP, XL, XLM, WL, WLM, MAC)                                       \
    TILE(NAME, XT, WT, VT, STEP, XL, XLM, WL, WLM, MAC, 1, 8)                                       \
    TILE(NAME, XT, WT, VT, STEP, XL, XLM, WL, WLM, MAC, 2, 8)                                       \
    TILE(NAME, XT, WT, VT, STEP, XL, XLM, WL, WLM, MAC, 1, 4)                                       \
    TILE(NAME, XT, WT, VT, STEP, XL, XLM, WL, WLM, MAC, 1, 1)
TILES(bb, uint16_t, uint16_t, __m512bh, 32, ld_bh_full, ld_bh, ld_bh_full, ld_bh, mac_bh)
TILES(fb, float, uint16_t, __m512, 16, ld_ps_full, ld_ps, ld_bf16_as_ps_full, ld_bf16_as_ps, mac_ps)
TILES(ff, float, float, __m512, 16, ld_ps_full, ld_ps, ld_ps_full, ld_ps, mac_ps)

enum { BF16_BF16 = 0, F32_BF16 = 1, F32_F32 = 2 };  /* (x, W) dtypes */

/* One block of nb (8, 4 or 1) weight rows for all M activation rows: out[M][nb]. With M >= 4 the
   8-row block is read in several passes (2 activation rows each) while the first comes from DRAM
   and the others from cache, so each pass prefetches a share of the next block's rows (`next`,
   or NULL) into L2: memory and arithmetic then overlap instead of alternating. */
static void block(int kind, const void* x, int64_t M, const void* w, int64_t K, int64_t nb, float* out,
                  const void* next) {
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
                tile_##NAME##_2_8(xx + m * K, K, ww, K, out + m * 8, rows ? ahead + first * K : ww, rows); \
            }                                                                                      \
            for (; m < M; m++) tile_##NAME##_1_8(xx + m * K, K, ww, K, out + m * 8, ww, 0);        \
        } else if (nb == 4) {                                                                      \
            for (; m < M; m++) tile_##NAME##_1_4(xx + m * K, K, ww, K, out + m * 4, ww, 0);        \
        } else {                                                                                   \
            for (; m < M; m++) tile_##NAME##_1_1(xx + m * K, K, ww, K, out + m, ww, 0);            \
        }                                                                                          \
    }
    if (kind == BF16_BF16) RUN(bb, uint16_t, uint16_t)
    else if (kind == F32_BF16) RUN(fb, float, uint16_t)
    else RUN(ff, float, float)
#undef RUN
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
    const size_t wsize = kind == F32_F32 ? 4 : 2;
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
            block(kind, x, M, rows, K, nb, out, next);
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


def build(compiler: str) -> Path:
    """Compile SOURCE once per (source, compiler version, flags); returns the shared object."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE, version, *CFLAGS]).encode()).hexdigest()[:16]
    target = kernel_cache() / f"lm_linear-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source = Path(tmp) / "lm_linear.c"
        source.write_text(SOURCE)
        built = Path(tmp) / target.name
        subprocess.run([compiler, *CFLAGS, str(source), "-o", str(built)], check=True, capture_output=True, timeout=300)
        os.replace(built, target)  # atomic: a concurrent build of the same key is harmless
    return target


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None when they cannot be used here (see the module docstring)."""
    if os.environ.get("LMTOOL_NATIVE", "1") == "0" or not cpu_has_features():
        return None
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return None
    try:
        lib = ctypes.CDLL(str(build(compiler)))
    except (OSError, subprocess.SubprocessError):
        return None
    lib.lm_linear.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(Part), ctypes.c_int64,
        ctypes.c_void_p, ctypes.c_int64,
    ]
    lib.lm_linear.restype = None
    return lib


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
        rows = x.shape[0]
        y = torch.empty(rows, self.out_features, dtype=x.dtype, device=x.device)
        library().lm_linear(
            self.kind, x.data_ptr(), rows, self.in_features, self.parts, len(self.weights), y.data_ptr(),
            self.out_features,
        )
        return y
