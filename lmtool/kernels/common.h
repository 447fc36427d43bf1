/* lmtool native CPU kernels: what every instruction set shares.
 *
 * Each of avx512.c, avx2.c, neon.c and portable.c includes this header and defines the static
 * hooks declared below with its own vector code; the drivers here (threading, parts, alignment,
 * masking, softmax bookkeeping, output rounding) are written once.
 *
 * lm_linear: y[M, N] = x[M, K] . W[N, K]^T (+ bias) for M <= 16 (decode), W row-major as stored
 * in the checkpoint, so no reorder or copy is ever needed. W may be given in several parts (q/k/v,
 * gate/up): one call computes all of them into one output, as if they were concatenated.
 * Accumulation is in float32; bfloat16 outputs are rounded to nearest even. Kinds (x, W):
 *   BF16_BF16: bf16 dot products (AVX512-BF16 / BFDOT where the CPU has them, else both widened);
 *   F32_BF16:  W widened to f32 in registers (exact), f32 FMA: a float32 model computed from
 *              bfloat16-stored weights reads half the bytes of a float32 copy;
 *   F32_F32:   f32 FMA.
 * New kernels (int8/int4 weights, recurrent steps) go beside these: a kind or an exported lm_*
 * function here, its vector body in each instruction set's file, and a row in ARGTYPES
 * (lmtool/kernels/__init__.py).
 */
#ifndef LMTOOL_KERNELS_COMMON_H
#define LMTOOL_KERNELS_COMMON_H

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct { const void* w; const void* bias; int64_t rows; } part_t;

enum { BF16_BF16 = 0, F32_BF16 = 1, F32_F32 = 2 }; /* (x, W) dtypes */

/* lm_attend_one's heads through their shared keys together: DOT_ROWS at a time (`dots`), where a
   head has at most MAX_WIDENED_HEAD elements (their queries widened on the stack). */
enum { DOT_ROWS = 4, MAX_WIDENED_HEAD = 512 };

static inline float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
/* Element i of a bf16 (bf16 != 0) or f32 array, as f32; and the store back. */
static inline float load_f32(const void* p, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t*)p)[i]) : ((const float*)p)[i];
}
static inline void store_f32(void* p, int64_t i, int bf16, float v) {
    if (bf16) ((uint16_t*)p)[i] = f32_to_bf16(v); else ((float*)p)[i] = v;
}

/* ---- hooks each instruction set defines ----------------------------------------------------- */

/* Weight elements per vector load when weight rows may be read from a vector boundary with the
 * leading lanes masked off (see lm_linear), or 0 where rows are read as they lie. */
static int64_t aligned_step(int kind);
/* One block of nb (8, 4 or 1) weight rows for all M activation rows: out[M][nb]. Row j of W is
 * read at w + j * ldw over [lead, span); next: the next block's rows (a prefetch hint) or NULL. */
static void block(int kind, const void* x, int64_t ldx, int64_t M, const void* w, int64_t ldw, int64_t span,
                  int64_t lead, int64_t nb, float* out, const void* next);
/* out[i] = gelu_tanh(gate[i]) * (up ? up[i] : 1) for i in [begin, end). */
static void gelu_span(int bf16, const void* gate, const void* up, void* out, int64_t begin, int64_t end);
/* sum_i a[i] b[i] over n elements, in f32. */
static float dot(int bf16, const void* a, const void* b, int64_t n);
/* out[r] = sum_i q[r * ldq + i] b[i] for the DOT_ROWS float32 rows of q, each summed exactly as
 * dot() sums it (dot(bf16, a, b, n) with a widened to q's row), b read once for all of them. */
static void dots(int bf16, const float* q, int64_t ldq, const void* b, int64_t n, float* out);
/* scores[s] = e^(scores[s] - top) (-inf gives 0), returning their sum. */
static float exp_shifted_sum(float* scores, int64_t n, float top);
/* out[i] = norm * sum_s p[s] rows[s][i] (rows of hd elements; p[s] == 0 skipped), rounded once. */
static void weighted_rows(int bf16, const float* p, const void* rows, int64_t S, int64_t hd, float norm, void* out);
/* weighted_rows for n <= DOT_ROWS rows of p (ldp apart) over the same rows, into out rows hd
 * apart, each as weighted_rows makes it: rows[s] read once for all of them. */
static void weighted_rows_group(int bf16, const float* p, int64_t ldp, int64_t n, const void* rows, int64_t S,
                                int64_t hd, const float* norm, void* out);

/* ---- lm_linear ------------------------------------------------------------------------------ */

/* Weight rows off a vector boundary. safetensors aligns tensor data to 8 bytes only, so most
   checkpoint tensors start 8 to 56 bytes past a 64-byte line, and every load then straddles two
   lines. At one activation row that hides under the memory stream; with several, each block is
   read again from cache, split loads and all (Gemma-2B's mapped weights at 8 rows: 27 -> 32 GB/s
   once aligned). Where the instruction set has masked loads (aligned_step > 0) and every row of a
   part starts at the same offset `lead` past a boundary (the row length is a multiple of the
   vector), the part is read from the boundary before its first element with the first `lead`
   lanes masked off, and the activations are given the same offset: a copy of x with `lead` zeros
   before each row (a few KB, made once per call and shared by the parts of equal lead). */
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

/* y[M, ldy] (columns of all parts side by side). M <= 16, nparts <= 16. */
void lm_linear(int kind, const void* x, int64_t M, int64_t K, const part_t* parts, int64_t nparts,
               void* y, int64_t ldy) {
    const int64_t width = 8; /* weight rows per parallel work item */
    int64_t starts[16], firsts[16], total = 0, col = 0;
    for (int64_t p = 0; p < nparts; p++) {
        starts[p] = total; firsts[p] = col;
        total += (parts[p].rows + width - 1) / width;
        col += parts[p].rows;
    }
    const int x_bf16 = kind == BF16_BF16;
    const size_t wsize = kind == F32_F32 ? 4 : 2, xsize = x_bf16 ? 2 : 4;
    const int64_t step = aligned_step(kind), vbytes = step * (int64_t)wsize;
    int64_t lead[16], ldx[16];
    const char* xs[16];
    size_t bytes = 0;
    for (int64_t p = 0; p < nparts; p++) {
        const uintptr_t at = (uintptr_t)parts[p].w;
        lead[p] = step && (K * wsize) % vbytes == 0 && at % wsize == 0 ? (int64_t)(at % vbytes / wsize) : 0;
        ldx[p] = lead[p] ? (lead[p] + K + step - 1) / step * step : K;
        bytes += lead[p] ? M * ldx[p] * xsize : 0;
    }
    char* buffer = bytes ? shifted_buffer(bytes) : NULL;
    for (int64_t p = 0, used = 0; p < nparts; p++) {
        xs[p] = (const char*)x;
        if (!lead[p]) continue;
        if (!buffer) { lead[p] = 0; ldx[p] = K; continue; } /* no memory: unaligned loads */
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
    /* guided: each thread starts on one large contiguous share (a sequential stream, as static gives)
       and the last items go to whichever thread is free first, so a thread that starts late or that
       the host slows does not hold the other at the barrier (Zamba2-1.2B's layers at 8 rows,
       alternating with static: 1.04-1.06x; 1 row unchanged). */
    #pragma omp parallel for schedule(guided)
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
                    if (parts[p].bias) v += load_f32(parts[p].bias, n + j, x_bf16);
                    store_f32(y, m * ldy + firsts[p] + n + j, x_bf16, v);
                }
            }
            n += nb;
        }
    }
}

/* Tiles for instruction sets without the aligned path: MB rows of x times NB rows of W over span
 * elements, accumulators (ACC) in registers, out[i * ldo + j]. XLOAD/WLOAD turn STEP elements at a
 * pointer into vector values (XV/WV); the last partial step reads zero-padded copies, so nothing
 * past a row is ever read. */
#define PADDED_TILE(NAME, XT, WT, XV, WV, ACC, STEP, XLOAD, WLOAD, MAC, ZERO, REDUCE, MB, NB)          \
static inline __attribute__((always_inline)) void tile_##NAME##_##MB##_##NB(                            \
    const XT* x, int64_t ldx, const WT* w, int64_t ldw, int64_t span, float* out, int64_t ldo) {        \
    ACC acc[MB][NB];                                                                                   \
    for (int i = 0; i < MB; i++) for (int j = 0; j < NB; j++) acc[i][j] = ZERO();                      \
    int64_t k = 0;                                                                                     \
    for (; k + STEP <= span; k += STEP) {                                                              \
        XV xv[MB];                                                                                     \
        for (int i = 0; i < MB; i++) xv[i] = XLOAD(x + i * ldx + k);                                   \
        for (int j = 0; j < NB; j++) {                                                                 \
            const WV wv = WLOAD(w + j * ldw + k);                                                      \
            for (int i = 0; i < MB; i++) acc[i][j] = MAC(acc[i][j], xv[i], wv);                        \
        }                                                                                              \
    }                                                                                                  \
    if (k < span) {                                                                                    \
        XT xt[MB][STEP] __attribute__((aligned(64)));                                                  \
        WT wt[STEP] __attribute__((aligned(64)));                                                      \
        memset(xt, 0, sizeof xt);                                                                      \
        memset(wt, 0, sizeof wt);                                                                      \
        XV xv[MB];                                                                                     \
        for (int i = 0; i < MB; i++) {                                                                 \
            memcpy(xt[i], x + i * ldx + k, (size_t)(span - k) * sizeof(XT));                           \
            xv[i] = XLOAD(xt[i]);                                                                      \
        }                                                                                              \
        for (int j = 0; j < NB; j++) {                                                                 \
            memcpy(wt, w + j * ldw + k, (size_t)(span - k) * sizeof(WT));                               \
            const WV wv = WLOAD(wt);                                                                   \
            for (int i = 0; i < MB; i++) acc[i][j] = MAC(acc[i][j], xv[i], wv);                        \
        }                                                                                              \
    }                                                                                                  \
    for (int i = 0; i < MB; i++) for (int j = 0; j < NB; j++) out[i * ldo + j] = REDUCE(acc[i][j]);    \
}

/* A software prefetch of the weight row 8 KB ahead, into L2, where an instruction set asks for it
   (avx2.c); otherwise none. */
#ifndef ROW_PREFETCH
#define ROW_PREFETCH(p) ((void)0)
#endif
/* One activation row times one weight row through four accumulators (ADD joins them), the rest
 * after the last whole group of four steps by the 1 x 1 tile: what block() runs at one activation
 * row, weight rows one after another (see avx512.c's row_* for why). */
#define PADDED_ROW(NAME, XT, WT, ACC, STEP, XLOAD, WLOAD, MAC, ZERO, REDUCE, ADD)                      \
static inline __attribute__((always_inline)) float row_##NAME(const XT* x, const WT* w, int64_t span) { \
    ACC a0 = ZERO(), a1 = ZERO(), a2 = ZERO(), a3 = ZERO();                                            \
    int64_t k = 0;                                                                                     \
    for (; k + 4 * STEP <= span; k += 4 * STEP) {                                                      \
        ROW_PREFETCH((const char*)(w + k));                                                            \
        ROW_PREFETCH((const char*)(w + k) + 64);                                                       \
        a0 = MAC(a0, XLOAD(x + k), WLOAD(w + k));                                                      \
        a1 = MAC(a1, XLOAD(x + k + STEP), WLOAD(w + k + STEP));                                        \
        a2 = MAC(a2, XLOAD(x + k + 2 * STEP), WLOAD(w + k + 2 * STEP));                                \
        a3 = MAC(a3, XLOAD(x + k + 3 * STEP), WLOAD(w + k + 3 * STEP));                                \
    }                                                                                                  \
    float rest;                                                                                        \
    tile_##NAME##_1_1(x + k, 0, w + k, 0, span - k, &rest, 1);                                         \
    return REDUCE(ADD(ADD(a0, a1), ADD(a2, a3))) + rest;                                               \
}

/* aligned_step() and block() for instruction sets whose tiles are PADDED_TILEs named tile_bb_*,
 * tile_fb_* and tile_ff_* (one per kind) of sizes 2x8, 1x8, 1x4 and 1x1, and row_bb, row_fb and
 * row_ff (PADDED_ROW, or a 1x1 tile where one accumulator is already wide): one activation row goes
 * through the weight rows one at a time; more, pairs of activation rows over 8 weight rows, then
 * single rows; 4- and 1-row blocks one activation row at a time. */
#define PADDED_RUN(NAME, XT, WT)                                                                       \
    {                                                                                                  \
        const XT* xx = (const XT*)x; const WT* ww = (const WT*)w;                                      \
        int64_t m = 0;                                                                                 \
        if (M == 1) {                                                                                  \
            for (int64_t j = 0; j < nb; j++) out[j] = row_##NAME(xx, ww + j * ldw, span);              \
        } else if (nb == 8) {                                                                          \
            for (; m + 2 <= M; m += 2) tile_##NAME##_2_8(xx + m * ldx, ldx, ww, ldw, span, out + m * 8, 8); \
            for (; m < M; m++) tile_##NAME##_1_8(xx + m * ldx, ldx, ww, ldw, span, out + m * 8, 8);    \
        } else if (nb == 4) {                                                                          \
            for (; m < M; m++) tile_##NAME##_1_4(xx + m * ldx, ldx, ww, ldw, span, out + m * 4, 4);    \
        } else {                                                                                       \
            for (; m < M; m++) tile_##NAME##_1_1(xx + m * ldx, ldx, ww, ldw, span, out + m, 1);        \
        }                                                                                              \
    }
#define PADDED_BLOCK_FUNCTIONS                                                                         \
    static int64_t aligned_step(int kind) { (void)kind; return 0; }                                    \
    static void block(int kind, const void* x, int64_t ldx, int64_t M, const void* w, int64_t ldw,     \
                      int64_t span, int64_t lead, int64_t nb, float* out, const void* next) {          \
        (void)lead; (void)next;                                                                        \
        if (kind == BF16_BF16) PADDED_RUN(bb, uint16_t, uint16_t)                                      \
        else if (kind == F32_BF16) PADDED_RUN(fb, float, uint16_t)                                     \
        else PADDED_RUN(ff, float, float)                                                              \
    }

/* ---- the decode step's elementwise and attention kernels --------------------------------------
 * A decode step of a small model is dominated by per-operation overhead, not arithmetic: BLOOM's
 * GELU is eight tensor operations and eager attention four, each a few microseconds, per layer.
 * These do each in one call. They compute in float32 and round once. */

/* out[r, i] = gelu_tanh(gate[r, i]) * (up ? up[r, i] : 1) over rows x n, rows strided.
 * gelu_tanh(x) = x/2 (1 + tanh(y)) = x / (1 + e^(-2y)), y = sqrt(2/pi) (x + 0.044715 x^3):
 * one exp and no cancellation near 0. */
void lm_gelu_tanh_mul(int bf16, const void* gate, int64_t gate_stride, const void* up, int64_t up_stride,
                      void* out, int64_t out_stride, int64_t rows, int64_t n) {
    const int64_t chunks = (n + 255) / 256, size = bf16 ? 2 : 4;
    /* two threads from 16384 elements (Gemma-2B's width): 9.1 us against 16.7 on one (AVX2; AVX-512
       5.4 against 8.1, Zen 5) */
    #pragma omp parallel for schedule(static) if (rows * n >= 16384)
    for (int64_t t = 0; t < rows * chunks; t++) {
        const int64_t r = t / chunks, begin = (t % chunks) * 256, end = begin + 256 < n ? begin + 256 : n;
        gelu_span(bf16, (const char*)gate + r * gate_stride * size,
                  up ? (const char*)up + r * up_stride * size : NULL, (char*)out + r * out_stride * size, begin, end);
    }
}

/* Attention of one new query per sequence over S cached keys (the decode step), every head:
 *   out[b, h] = softmax_s(scale q[b,h].k[b,g,s] + bias[b*H+h, s], masked keys excluded) . v[b,g,s]
 * with g = h / (H / KV). q[b,h] at q + b*q_bs + h*q_hs, keys at k + b*kv_bs + g*kv_hs + s*hd (values
 * alike), bias rows (or NULL) bias_rs apart, mask (or NULL) a byte per key, mask_bs apart per
 * sequence; out [B, H, hd] contiguous. scores: scratch of B*H*S floats. A row with every key masked
 * gives zeros. */

/* The softmax of one head's scores in place (top: their largest), returning the factor its
 * weighted values are scaled by. */
static inline float softmax_in_place(float* sc, int64_t S, float top) {
    float total = 0.0f;
    if (top > -INFINITY) total = exp_shifted_sum(sc, S, top);
    else for (int64_t s = 0; s < S; s++) sc[s] = 0.0f;
    return total > 0.0f ? 1.0f / total : 0.0f;
}

/* One head alone: q . each key, the softmax, the weighted values into out. sc: its S scores. */
static inline void attend_head(int bf16, const char* q, const char* keys, const char* values, int64_t S, int64_t hd,
                               float scale, const char* bias, const uint8_t* mask, float* sc, char* out) {
    const int64_t size = bf16 ? 2 : 4;
    float top = -INFINITY;
    for (int64_t s = 0; s < S; s++) {
        if (mask && !mask[s]) { sc[s] = -INFINITY; continue; }
        float x = dot(bf16, q, keys + s * hd * size, hd) * scale;
        if (bias) x += load_f32(bias, s, bf16);
        sc[s] = x;
        if (x > top) top = x;
    }
    weighted_rows(bf16, sc, values, S, hd, softmax_in_place(sc, S, top), out);
}

/* n (2..DOT_ROWS) heads that share their keys and values (grouped and multi-query attention), as
 * attend_head makes each: q, bias, sc and out rows q_hs, bias_rs, S and hd elements apart. Each
 * key and value row is read once for all of them (`dots`, `weighted_rows_group`), and their sums
 * are independent chains, where one head's dot product is one chain of dependent additions. The
 * sums are each head's own, in attend_head's order: the result does not depend on the grouping. */
static inline void attend_group(int bf16, const char* q, int64_t q_hs, int64_t n, const char* keys, const char* values,
                                int64_t S, int64_t hd, float scale, const char* bias, int64_t bias_rs,
                                const uint8_t* mask, float* sc, char* out) {
    const int64_t size = bf16 ? 2 : 4;
    float qf[DOT_ROWS * MAX_WIDENED_HEAD], x[DOT_ROWS], top[DOT_ROWS], norm[DOT_ROWS];
    for (int r = 0; r < DOT_ROWS; r++) /* the queries in float32 (exact), zeros past the last */
        for (int64_t i = 0; i < hd; i++) qf[r * hd + i] = r < n ? load_f32(q + r * q_hs * size, i, bf16) : 0.0f;
    /* loops over DOT_ROWS rows, not n: unrolled, top[] stays in registers */
    for (int r = 0; r < DOT_ROWS; r++) top[r] = -INFINITY;
    for (int64_t s = 0; s < S; s++) {
        if (mask && !mask[s]) {
            for (int r = 0; r < DOT_ROWS; r++) if (r < n) sc[r * S + s] = -INFINITY;
            continue;
        }
        dots(bf16, qf, hd, keys + s * hd * size, hd, x);
        for (int r = 0; r < DOT_ROWS && r < n; r++) {
            float score = x[r] * scale;
            if (bias) score += load_f32(bias + r * bias_rs * size, s, bf16);
            sc[r * S + s] = score;
            if (score > top[r]) top[r] = score;
        }
    }
    for (int64_t r = 0; r < n; r++) norm[r] = softmax_in_place(sc + r * S, S, top[r]);
    weighted_rows_group(bf16, sc, S, n, values, S, hd, norm, out);
}

/* The heads of a group go together, up to DOT_ROWS at a time, in as many parts as there are threads
 * where the batch and KV heads are fewer (Gemma-2B: 8 heads on one KV head, two threads: 4 and 4;
 * one head at a time from 8 threads). The loop runs over the parts' chunks themselves: looping
 * over a part's heads inside it ran multi-head attention (a head per part) 0.9x. Gemma-2B's heads,
 * two Zen 5 threads (benchmarks/attention.py --against REV): capped to AVX2 1.64x at 145 keys
 * (19.6 against 32.4 us), 1.66x at 1000, 1.76x at 4000; AVX-512 1.64x and 1.96x; multi-head 1.00x. */
void lm_attend_one(int bf16, const void* q, int64_t q_bs, int64_t q_hs, const void* k, const void* v,
                   int64_t kv_bs, int64_t kv_hs, int64_t B, int64_t H, int64_t KV, int64_t S, int64_t hd,
                   float scale, const void* bias, int64_t bias_rs, const uint8_t* mask, int64_t mask_bs,
                   void* out, float* scores) {
    const int64_t size = bf16 ? 2 : 4, groups = H / KV, units = B * KV, threads = omp_get_max_threads();
    const int64_t parts = (threads + units - 1) / units < groups ? (threads + units - 1) / units : groups;
    /* each part's heads (its share) in chunks of DOT_ROWS and the rest: RecurrentGemma-2B's 10 on one
       KV head, two threads: 4 + 1 and 4 + 1 (1.19-1.26x the 3 + 2 of chunks as even as they go; 4 + 4
       and 2, the chunks across the parts, left one thread with 8) */
    const int64_t most = hd <= MAX_WIDENED_HEAD ? DOT_ROWS : 1, share = (groups + parts - 1) / parts;
    const int64_t chunks = (share + most - 1) / most, together = share < most ? share : most;
    #pragma omp parallel for schedule(static) if (B * H * S * hd >= 32768)
    for (int64_t t = 0; t < units * parts * chunks; t++) {
        const int64_t b = t / (KV * parts * chunks), g = t / (parts * chunks) % KV, part = t / chunks % parts;
        const int64_t first = part * share + t % chunks * together;
        const int64_t end = (part + 1) * share < groups ? (part + 1) * share : groups;
        const int64_t n = end - first < together ? end - first : together, bh = b * H + g * groups + first;
        if (n <= 0) continue;
        const char* qh = (const char*)q + (b * q_bs + (g * groups + first) * q_hs) * size;
        const char* keys = (const char*)k + (b * kv_bs + g * kv_hs) * size;
        const char* values = (const char*)v + (b * kv_bs + g * kv_hs) * size;
        const char* bias_h = bias ? (const char*)bias + bh * bias_rs * size : NULL;
        const uint8_t* mask_b = mask ? mask + b * mask_bs : NULL;
        char* out_h = (char*)out + bh * hd * size;
        if (n == 1) attend_head(bf16, qh, keys, values, S, hd, scale, bias_h, mask_b, scores + bh * S, out_h);
        else attend_group(bf16, qh, q_hs, n, keys, values, S, hd, scale, bias_h, bias_rs, mask_b, scores + bh * S, out_h);
    }
}

#endif
