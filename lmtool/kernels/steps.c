/* lmtool's recurrent decode-step kernels: the one-token steps of the causal convolution, the
 * RG-LRU (RecurrentGemma) and the Mamba2 state update (Zamba2), each one pass over its data.
 *
 * Why: at batch 1 these steps are a few thousand elements (the Mamba2 state a megabyte per layer),
 * and as PyTorch operations each costs a dozen allocations and passes; in a 1-2B model they took a
 * sixth to a third of the decode step. Here each is one call.
 *
 * Rounding: every intermediate that PyTorch rounds to bfloat16 (the model dtype) is rounded here at
 * the same place, to nearest even, so a bfloat16 model's outputs match PyTorch's operations to the
 * last bit except where the library functions (exp, sqrt) differ by an ulp before that rounding.
 * `bf` selects bfloat16 (1) or float32 (0) activations; float32 rounds nowhere. Built into every
 * instruction set's library (lmtool.kernels) with its flags and -ffp-contract=off: PyTorch rounds a
 * product before adding it, and so must these loops.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fastmath.h"

typedef uint16_t bf16_t;

static inline float bf_to_f(bf16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline bf16_t f_to_bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t nan = (u & 0x7fffffffu) > 0x7f800000u;
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (bf16_t)(nan ? ((u >> 16) | 0x40u) : rounded);
}

/* Rounding to the model dtype: to bfloat16 and back, or nothing for float32. */
static inline float rnd(float v, int bf) { return bf ? bf_to_f(f_to_bf(v)) : v; }
static inline float ld(const void *p, int64_t i, int bf) {
    return bf ? bf_to_f(((const bf16_t *)p)[i]) : ((const float *)p)[i];
}
static inline void st(void *p, int64_t i, float v, int bf) {
    if (bf) ((bf16_t *)p)[i] = f_to_bf(v);
    else ((float *)p)[i] = v;
}

static inline float sigmoid(float x) { return 1.0f / (1.0f + exp_f32(-x)); }

/* --- causal depthwise convolution, one step ------------------------------------------------
 * y[b, c] = bias[c] + sum_k history[b, k, c] w[k, c], history = (state[b, 0..K-2, c], x[b, c]):
 * each product rounded, the sum in float32 rounded once, then the bias added and rounded (as
 * `(history * weight.T).sum(1) + bias`); silu != 0 then applies SiLU (rounded). The state (the
 * last K-1 inputs, model dtype, [B, K-1, C] contiguous) shifts by one in place. x and y rows have
 * strides x_stride and y_stride (elements); w [K, C] float32 (the conv weight transposed, so
 * every loop runs along channels); bias (model dtype) may be NULL. */
#define CONV_TILE 256

static inline __attribute__((always_inline)) void conv_step_row(
    int bf, const void *x, int64_t x_stride, void *state, const float *w, const void *bias, int64_t b,
    int64_t K, int64_t C, int silu, void *y, int64_t y_stride) {
    int64_t size = bf ? 2 : 4;
    char *s = (char *)state + b * (K - 1) * C * size;
    for (int64_t c0 = 0; c0 < C; c0 += CONV_TILE) {
        int64_t width = C - c0 < CONV_TILE ? C - c0 : CONV_TILE;
        float acc[CONV_TILE], xv[CONV_TILE];
        for (int64_t c = 0; c < width; c++) {
            xv[c] = ld(x, b * x_stride + c0 + c, bf);
            acc[c] = 0.0f;
        }
        for (int64_t k = 0; k < K - 1; k++)
            for (int64_t c = 0; c < width; c++) acc[c] += rnd(ld(s, k * C + c0 + c, bf) * w[k * C + c0 + c], bf);
        for (int64_t c = 0; c < width; c++) {
            float v = rnd(acc[c] + rnd(xv[c] * w[(K - 1) * C + c0 + c], bf), bf);
            if (bias) v = rnd(v + ld(bias, c0 + c, bf), bf);
            if (silu) v = rnd(v * sigmoid(v), bf);
            st(y, b * y_stride + c0 + c, v, bf);
        }
    }
    /* the window moves on by one input */
    if (K > 1) {
        memmove(s, s + C * size, (K - 2) * C * size);
        for (int64_t c = 0; c < C; c++) st(s, (K - 2) * C + c, ld(x, b * x_stride + c, bf), bf);
    }
}

/* Rows of the row-wise steps (conv, norms) share their rows among the threads from this many
 * elements: 8 rows of Zamba2-1.2B's conv (8 x 4224 channels) or gated norm (8 x 4096) took 0.1-0.2 ms
 * per layer on one thread while the other waited. Each loop calls a row function specialized for
 * the dtype (a constant bf inlined): inside an OpenMP region's outlined body a variable bf would
 * keep the compiler from vectorizing it. */
#define ROWS_IN_PARALLEL 16384

void lm_conv_step(int bf, const void *x, int64_t x_stride, void *state, const float *w, const void *bias,
                  int64_t B, int64_t K, int64_t C, int silu, void *y, int64_t y_stride) {
#pragma omp parallel for schedule(static) if (B > 1 && B * C >= ROWS_IN_PARALLEL)
    for (int64_t b = 0; b < B; b++) {
        if (bf) conv_step_row(1, x, x_stride, state, w, bias, b, K, C, silu, y, y_stride);
        else conv_step_row(0, x, x_stride, state, w, bias, b, K, C, silu, y, y_stride);
    }
}

/* --- RG-LRU, one step ------------------------------------------------------------------------
 * From the two gates before their sigmoid (model dtype, rows of L with strides gi_stride and
 * gr_stride), the input x, and softplus(recurrent_param) in the model dtype (sp [L]):
 *   log_a = (-8 sigmoid(g_r)) sp;  a = exp(log_a);  m = sqrt(1 - exp(2 log_a))
 *   (a row at its sequence's start, positions[b] == 0: a = 0, m = 1)
 *   h = a h0 + (x sigmoid(g_i)) m   with h0, h float32 (state [B, L], updated in place);
 * out [B, L] = h in the model dtype. Each model-dtype operation rounded as PyTorch does. */
static inline __attribute__((always_inline)) void rglru_step_body(
    int bf, const void *x, int64_t x_stride, const void *gi, int64_t gi_stride, const void *gr, int64_t gr_stride,
    const void *sp, const int64_t *positions, int64_t positions_stride, float *h, int64_t B, int64_t L, void *out) {
    for (int64_t b = 0; b < B; b++) {
        int starts = positions && positions[b * positions_stride] == 0;
        for (int64_t j = 0; j < L; j++) {
            float input_gate = rnd(sigmoid(ld(gi, b * gi_stride + j, bf)), bf);
            float recurrent_gate = rnd(sigmoid(ld(gr, b * gr_stride + j, bf)), bf);
            float log_a = rnd(-8.0f * recurrent_gate * ld(sp, j, bf), bf); /* -8 g is exact */
            float a = rnd(exp_f32(log_a), bf);
            float m = rnd(sqrtf(rnd(1.0f - rnd(exp_f32(2.0f * log_a), bf), bf)), bf);
            if (starts) { a = 0.0f; m = 1.0f; }
            float normalized = rnd(rnd(ld(x, b * x_stride + j, bf) * input_gate, bf) * m, bf);
            float decayed = a * h[b * L + j];
            float next = decayed + normalized;
            h[b * L + j] = next;
            st(out, b * L + j, next, bf);
        }
    }
}

void lm_rglru_step(int bf, const void *x, int64_t x_stride, const void *gi, int64_t gi_stride, const void *gr,
                   int64_t gr_stride, const void *sp, const int64_t *positions, int64_t positions_stride, float *h,
                   int64_t B, int64_t L, void *out) {
    if (bf) rglru_step_body(1, x, x_stride, gi, gi_stride, gr, gr_stride, sp, positions, positions_stride, h, B, L, out);
    else rglru_step_body(0, x, x_stride, gi, gi_stride, gr, gr_stride, sp, positions, positions_stride, h, B, L, out);
}

/* --- Mamba2 state update, one step -------------------------------------------------------------
 * Per row b and head h (of H, P channels each, group g = h / (H / G)), with the state S [P, N]
 * float32 (state [B, H, P, N], updated in place):
 *   S = exp(dt A_h) S + (dt B_g) x_p          (dt B and its product with x rounded)
 *   y_p = S_rounded . C_g  (+ x_p D_h)        (float32 sum, rounded; then the D term as PyTorch)
 * x rows [B, H*P] with stride x_stride, dt [B, H] with stride dt_stride, B and C rows [B, G*N]
 * with strides b_stride and c_stride, A [H] float32, D [H] model dtype or NULL, y [B, H*P] contiguous. */
#define MAX_STATE 512

static inline __attribute__((always_inline)) void ssd_step_head(
    int bf, float *S, const void *x, int64_t x_off, float dt, float decay, const void *Bm, int64_t b_off,
    const void *Cm, int64_t c_off, float d, int has_d, int64_t P, int64_t N, void *y, int64_t y_off) {
    float dtB[MAX_STATE], c[MAX_STATE], rounded[MAX_STATE];
    for (int64_t n = 0; n < N; n++) {
        dtB[n] = rnd(dt * ld(Bm, b_off + n, bf), bf);
        c[n] = ld(Cm, c_off + n, bf);
    }
    float parts[16][16];
    for (int64_t p0 = 0; p0 < P; p0 += 16) {
        int64_t rows = P - p0 < 16 ? P - p0 : 16;
        float tail[16];
        for (int64_t r = 0; r < rows; r++) {
            int64_t p = p0 + r;
            float xv = ld(x, x_off + p, bf);
            float *row = S + p * N;
            for (int64_t n = 0; n < N; n++) {
                float decayed = row[n] * decay;
                float next = decayed + rnd(dtB[n] * xv, bf);
                row[n] = next;
                rounded[n] = rnd(next, bf);
            }
            for (int i = 0; i < 16; i++) parts[r][i] = 0.0f;
            int64_t n = 0;
            for (; n + 16 <= N; n += 16)
                for (int i = 0; i < 16; i++) parts[r][i] += rounded[n + i] * c[n + i];
            float t = 0.0f;
            for (; n < N; n++) t += rounded[n] * c[n];
            tail[r] = t;
        }
        for (int64_t r = rows; r < 16; r++) {
            for (int i = 0; i < 16; i++) parts[r][i] = 0.0f;
            tail[r] = 0.0f;
        }
        /* The 16 rows' sums side by side, lanes adding across rows: a chain of 15 scalar additions
         * per row cost a fifth of the step at N = 64. */
        float acc[16];
        for (int r = 0; r < 16; r++) acc[r] = tail[r];
        for (int i = 0; i < 16; i++)
            for (int r = 0; r < 16; r++) acc[r] += parts[r][i];
        for (int64_t r = 0; r < rows; r++) {
            int64_t p = p0 + r;
            float xv = ld(x, x_off + p, bf);
            float v = rnd(acc[r], bf);
            if (has_d) v = rnd(v + rnd(xv * d, bf), bf);
            st(y, y_off + p, v, bf);
        }
    }
}

int lm_ssd_step(int bf, float *state, const void *x, int64_t x_stride, const void *dt, int64_t dt_stride,
                const float *A, const void *Bm, int64_t b_stride, const void *Cm, int64_t c_stride, const void *D,
                int64_t Bsz, int64_t H, int64_t G, int64_t P, int64_t N, void *y) {
    if (N > MAX_STATE) return -1;
    int64_t R = H / G;
#pragma omp parallel for schedule(static) if (Bsz * H * P * N >= 65536)
    for (int64_t bh = 0; bh < Bsz * H; bh++) {
        int64_t b = bh / H, h = bh % H, g = h / R;
        float dtv = ld(dt, b * dt_stride + h, bf);
        float decay = exp_f32(dtv * A[h]);
        float d = D ? ld(D, h, bf) : 0.0f;
        float *S = state + bh * P * N;
        int64_t x_off = b * x_stride + h * P, b_off = b * b_stride + g * N, c_off = b * c_stride + g * N;
        if (bf) ssd_step_head(1, S, x, x_off, dtv, decay, Bm, b_off, Cm, c_off, d, D != 0, P, N, y, bh * P);
        else ssd_step_head(0, S, x, x_off, dtv, decay, Bm, b_off, Cm, c_off, d, D != 0, P, N, y, bh * P);
    }
    return 0;
}

/* --- the Mamba2 scan over a prompt (prefill) ----------------------------------------------------
 * The recurrence of lm_ssd_step over T positions, in float32 throughout (nothing rounded to the model
 * dtype: what lmtool.recurrent.ssd_chunk_scan and transformers' chunked form compute):
 *     S_t = exp(dt_t A_h) S_{t-1} + (dt_t x_t) B_t^T,    y_t = S_t C_t + D_h x_t,
 * position by position, one (row, head) per thread at a time, so that its state [P, N] stays in the
 * core's cache for the whole prompt; the chunked form in PyTorch moves chunk-sized intermediates
 * through memory in some twenty operations per chunk. The same sums in another order (and fused
 * multiply-adds where the CPU has them): within float32 noise of the chunked form.
 * Inputs float32 (the caller widens bfloat16 ones once: every head reads its group's B and C rows).
 * x, dt, B and C have one row per position (b * T + t) with strides; A [H]; D [H] or NULL;
 * state [Bsz, H, P, N], updated in place; y [Bsz, T, H, P]. Returns 0, -1 for a state size or head
 * width above MAX_STATE, -2 when memory runs out. */

/* a * b + c in one rounding where the CPU has the instruction (a libm call elsewhere would cost more
 * than it saves). Only for sums PyTorch does not round step by step, as this scan's. */
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
#define MUL_ADD(a, b, c) fmaf((a), (b), (c))
#else
#define MUL_ADD(a, b, c) ((a) * (b) + (c))
#endif

int lm_ssd_scan(float *state, const float *x, int64_t x_stride, const float *dt, int64_t dt_stride, const float *A,
                const float *Bm, int64_t b_stride, const float *Cm, int64_t c_stride, const float *D, int64_t Bsz,
                int64_t T, int64_t H, int64_t G, int64_t P, int64_t N, float *y) {
    if (N > MAX_STATE || P > MAX_STATE) return -1;
    int64_t R = H / G;
    int failed = 0;
#pragma omp parallel
    {
        /* The head's state transposed, [N, P]: the loops then run along P in vector lanes, and each
         * lane's output sum over n stays in its lane (in the stored [P, N] layout every position
         * would end with P horizontal sums, which cost as much as the updates). */
        float *St = malloc(sizeof(float) * N * P);
        if (!St) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic)
        for (int64_t bh = 0; bh < Bsz * H; bh++) {
            if (!St) continue;
            int64_t b = bh / H, h = bh % H, g = h / R;
            float d = D ? D[h] : 0.0f;
            float *S = state + bh * P * N;
            float dx[MAX_STATE], acc[MAX_STATE];
            for (int64_t p = 0; p < P; p++)
                for (int64_t n = 0; n < N; n++) St[n * P + p] = S[p * N + n];
            for (int64_t t = 0; t < T; t++) {
                int64_t row = b * T + t;
                float dtv = dt[row * dt_stride + h];
                float decay = exp_f32(dtv * A[h]);
                const float *Bt = Bm + row * b_stride + g * N, *Ct = Cm + row * c_stride + g * N;
                const float *xv = x + row * x_stride + h * P;
                for (int64_t p = 0; p < P; p++) {
                    dx[p] = dtv * xv[p];
                    acc[p] = 0.0f;
                }
                for (int64_t n = 0; n < N; n++) {
                    const float bn = Bt[n], cn = Ct[n];
                    float *st = St + n * P;
                    for (int64_t p = 0; p < P; p++) {
                        float next = MUL_ADD(st[p], decay, dx[p] * bn);
                        st[p] = next;
                        acc[p] = MUL_ADD(next, cn, acc[p]);
                    }
                }
                float *out = y + (row * H + h) * P;
                for (int64_t p = 0; p < P; p++) out[p] = acc[p] + d * xv[p];
            }
            for (int64_t p = 0; p < P; p++)
                for (int64_t n = 0; n < N; n++) S[p * N + n] = St[n * P + p];
        }
        free(St);
    }
    return failed ? -2 : 0;
}

/* --- RMS norms ---------------------------------------------------------------------------------
 * out[r] = x[r] rsqrt(mean(x[r]^2) + eps), in float32, then scaled by `scale` [n] float32:
 * after_cast == 0: rounded once after the product (Gemma: (h * (1 + w)).to(dtype));
 * after_cast != 0: h rounded to the model dtype first, then the product rounded (Llama, Zamba2:
 * w.to(dtype) * h.to(dtype)). Rows of x have stride x_stride; out [rows, n] contiguous. */
static inline float sum_squares(const void *x, int64_t off, int64_t n, int bf) {
    float part[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) {
            float v = ld(x, off + i + j, bf);
            part[j] += v * v;
        }
    float total = 0.0f;
    for (int j = 0; j < 16; j++) total += part[j];
    for (; i < n; i++) {
        float v = ld(x, off + i, bf);
        total += v * v;
    }
    return total;
}

static inline __attribute__((always_inline)) void rms_norm_row(
    int bf, const void *x, int64_t x_stride, int64_t r, int64_t n, const float *scale, int after_cast, float eps,
    void *out) {
    float inv = 1.0f / sqrtf(sum_squares(x, r * x_stride, n, bf) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) {
        float h = ld(x, r * x_stride + i, bf) * inv;
        st(out, r * n + i, after_cast ? scale[i] * rnd(h, bf) : h * scale[i], bf);
    }
}

void lm_rms_norm(int bf, const void *x, int64_t x_stride, int64_t rows, int64_t n, const float *scale, int after_cast,
                 float eps, void *out) {
#pragma omp parallel for schedule(static) if (rows > 1 && rows * n >= ROWS_IN_PARALLEL)
    for (int64_t r = 0; r < rows; r++) {
        if (bf) rms_norm_row(1, x, x_stride, r, n, scale, after_cast, eps, out);
        else rms_norm_row(0, x, x_stride, r, n, scale, after_cast, eps, out);
    }
}

/* The residual add before an RMSNorm: sum = x + delta, rounded to the model dtype as PyTorch's add
 * (sum may be x itself: the residual stream updated in place), then out = lm_rms_norm(sum). Rows
 * of x and delta have strides; sum and out [rows, n] contiguous.
 * Why: at batch 1 a decode step's small operations cost what their code and data take to come
 * back into the caches after the weights streamed through them, not their arithmetic: Gemma-2B's
 * 36 residual adds took 0.17-0.21 ms of each step as PyTorch operations (5 us each, 1.2 us when
 * hot; Zen 5 capped to AVX2, int4). One call instead of two per residual add. */
void lm_add_rms_norm(int bf, const void *x, int64_t x_stride, const void *delta, int64_t delta_stride, int64_t rows,
                     int64_t n, const float *scale, int after_cast, float eps, void *sum, void *out) {
#pragma omp parallel for schedule(static) if (rows > 1 && rows * n >= ROWS_IN_PARALLEL)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t i = 0; i < n; i++)
            st(sum, r * n + i, ld(x, r * x_stride + i, bf) + ld(delta, r * delta_stride + i, bf), bf); /* st rounds */
        if (bf) rms_norm_row(1, sum, n, r, n, scale, after_cast, eps, out);
        else rms_norm_row(0, sum, n, r, n, scale, after_cast, eps, out);
    }
}

/* Mamba2's gated norm: h = y silu(z) in float32, normalized over each of `groups` equal parts of
 * a row, times the weight (model dtype), as transformers' Zamba2RMSNormGated. y in the model dtype
 * (the decode step): the normalized h is rounded to it before the product, which is rounded too.
 * y_f32 != 0, y float32 (after a prefill scan): nothing is rounded until the product, rounded to the
 * model dtype (the caller's cast). y and z rows have strides; out [rows, n] contiguous. */
static inline __attribute__((always_inline)) void gated_rms_norm_row(
    int bf, const void *y, int64_t y_stride, int y_f32, const void *z, int64_t z_stride, int64_t r, int64_t n,
    int64_t groups, const void *weight, float eps, void *out) {
    int64_t width = n / groups;
    float h[n];
    for (int64_t i = 0; i < n; i++) {
        float g = ld(z, r * z_stride + i, bf);
        h[i] = ld(y, r * y_stride + i, y_f32 ? 0 : bf) * (g * sigmoid(g));
    }
    for (int64_t k = 0; k < groups; k++) {
        float *part = h + k * width;
        float inv = 1.0f / sqrtf(sum_squares(part, 0, width, 0) / (float)width + eps);
        for (int64_t i = 0; i < width; i++) {
            float normed = part[i] * inv;
            st(out, r * n + k * width + i, ld(weight, k * width + i, bf) * (y_f32 ? normed : rnd(normed, bf)), bf);
        }
    }
}

static void gated_rms_norm_rows(int bf, const void *y, int64_t y_stride, int y_f32, const void *z, int64_t z_stride,
                                int64_t rows, int64_t n, int64_t groups, const void *weight, float eps, void *out) {
#pragma omp parallel for schedule(static) if (rows > 1 && rows * n >= ROWS_IN_PARALLEL)
    for (int64_t r = 0; r < rows; r++) {
        if (bf) gated_rms_norm_row(1, y, y_stride, y_f32, z, z_stride, r, n, groups, weight, eps, out);
        else gated_rms_norm_row(0, y, y_stride, y_f32, z, z_stride, r, n, groups, weight, eps, out);
    }
}

int lm_gated_rms_norm(int bf, const void *y, int64_t y_stride, int y_f32, const void *z, int64_t z_stride, int64_t rows,
                      int64_t n, int64_t groups, const void *weight, float eps, void *out) {
    if (groups <= 0 || n % groups) return -1;
    gated_rms_norm_rows(bf, y, y_stride, y_f32, z, z_stride, rows, n, groups, weight, eps, out);
    return 0;
}

/* --- logit soft-cap ------------------------------------------------------------------------------
 * x = tanh(x / cap) * cap in place over n values, each of the three operations rounded to the model
 * dtype (as PyTorch's div, tanh, mul). tanh from its odd Taylor series near 0 (|y| < 0.3, where
 * 1 - 2 / (e^2y + 1) would cancel) and from exp beyond: within a few float32 ulps. */
static inline float tanh_f32(float y) {
    float a = y < 0.0f ? -y : y;
    float a2 = a * a;
    float series = a * (1.0f + a2 * (-1.0f / 3.0f + a2 * (2.0f / 15.0f + a2 * (-17.0f / 315.0f +
                   a2 * (62.0f / 2835.0f + a2 * (-1382.0f / 155925.0f))))));
    float far = 1.0f - 2.0f / (exp_f32(2.0f * a) + 1.0f);
    float t = a < 0.3f ? series : far;
    return y < 0.0f ? -t : t;
}

static inline __attribute__((always_inline)) void soft_cap_span(int bf, void *x, int64_t begin, int64_t end, float cap) {
    for (int64_t i = begin; i < end; i++) {
        float y = rnd(ld(x, i, bf) / cap, bf);
        st(x, i, rnd(tanh_f32(y), bf) * cap, bf);
    }
}

void lm_soft_cap(int bf, void *x, int64_t n, float cap) {
    const int64_t span = 4096; /* spans specialized for the dtype, as the row-wise steps above */
#pragma omp parallel for schedule(static) if (n >= 65536)
    for (int64_t begin = 0; begin < n; begin += span) {
        const int64_t end = begin + span < n ? begin + span : n;
        if (bf) soft_cap_span(1, x, begin, end, cap);
        else soft_cap_span(0, x, begin, end, cap);
    }
}

/* --- a whole Mamba2 mixer step between its two projections ---------------------------------------
 * From in_proj's output rows [Bsz, d_inner + conv_dim + H] = (z, xBC, dt) with stride row_stride:
 * xBC = silu(conv step(xBC)) (conv_state shifted in place), dt = softplus(dt + dt_bias) (model
 * dtype, no clamp: the decode step), the state update and output (lm_ssd_step), then the gated
 * norm of the output by z: out [Bsz, d_inner], what out_proj reads. The same functions and
 * roundings as the separate calls; one call instead of about thirty operations per layer.
 * Returns 0, or -1 for a state size above MAX_STATE, -2 when memory runs out. */
static inline float softplus_f32(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

int lm_mamba2_step(int bf, const void *zxbcdt, int64_t row_stride, int64_t Bsz, int64_t d_inner, int64_t conv_dim,
                   int64_t H, int64_t G, int64_t P, int64_t N, int64_t K, void *conv_state, const float *conv_w_kc,
                   const void *conv_bias, const void *dt_bias, const float *A, const void *D, float *ssm_state,
                   const void *norm_weight, int64_t norm_groups, float eps, void *out) {
    if (N > MAX_STATE) return -1;
    int64_t size = bf ? 2 : 4;
    const char *rows = (const char *)zxbcdt;
    char *xbc = malloc(Bsz * conv_dim * size), *dt = malloc(Bsz * H * size), *y = malloc(Bsz * H * P * size);
    if (!xbc || !dt || !y) {
        free(xbc), free(dt), free(y);
        return -2;
    }
    lm_conv_step(bf, rows + d_inner * size, row_stride, conv_state, conv_w_kc, conv_bias, Bsz, K, conv_dim, 1, xbc,
                 conv_dim);
    for (int64_t b = 0; b < Bsz; b++)
        for (int64_t h = 0; h < H; h++) {
            float raw = ld(rows, b * row_stride + d_inner + conv_dim + h, bf);
            st(dt, b * H + h, rnd(softplus_f32(rnd(raw + ld(dt_bias, h, bf), bf)), bf), bf);
        }
    int64_t GN = G * N;
    lm_ssd_step(bf, ssm_state, xbc, conv_dim, dt, H, A, xbc + d_inner * size, conv_dim, xbc + (d_inner + GN) * size,
                conv_dim, D, Bsz, H, G, P, N, y);
    gated_rms_norm_rows(bf, y, H * P, 0, rows, row_stride, Bsz, d_inner, norm_groups, norm_weight, eps, out);
    free(xbc), free(dt), free(y);
    return 0;
}

/* --- LayerNorm after a residual add (BLOOM) ------------------------------------------------------
 * sum = x + delta, rounded to the model dtype as PyTorch's add, then out = LayerNorm(sum) with
 * weight and bias [n] (model dtype): the mean and biased variance of the rounded sum, then
 * fma((v - mean) rstd, weight, bias) in float32 (PyTorch's CPU layer_norm fuses that last
 * multiply-add), rounded once. delta NULL: out = LayerNorm(x) and sum is not written. The moments
 * are taken in double: correctly rounded, where PyTorch's float32 Welford sums come within an ulp,
 * so an output can differ from PyTorch's by an ulp (float32) or, at a rounding tie, one bfloat16
 * step (about one element in a thousand).
 * Why: BLOOM's decode step ran each of its two adds and two LayerNorms per layer as PyTorch
 * operations (an allocation and a dispatch each); this is one pass. Rows of x and delta have
 * strides; sum and out [rows, n] contiguous. */
static inline __attribute__((always_inline)) void add_layer_norm_row(
    int bf, const void *x, int64_t x_stride, const void *delta, int64_t delta_stride, int64_t r, int64_t n,
    const void *weight, const void *bias, float eps, void *sum, void *out) {
    float v[n];
    double total = 0.0;
    for (int64_t i = 0; i < n; i++) {
        float a = ld(x, r * x_stride + i, bf);
        if (delta) {
            a = rnd(a + ld(delta, r * delta_stride + i, bf), bf);
            st(sum, r * n + i, a, bf);
        }
        v[i] = a;
        total += a;
    }
    double mean = total / (double)n, squares = 0.0;
    for (int64_t i = 0; i < n; i++) squares += ((double)v[i] - mean) * ((double)v[i] - mean);
    float mean_f = (float)mean, rstd = 1.0f / sqrtf((float)(squares / (double)n) + eps);
    for (int64_t i = 0; i < n; i++)
        st(out, r * n + i, fmaf((v[i] - mean_f) * rstd, ld(weight, i, bf), ld(bias, i, bf)), bf);
}

void lm_add_layer_norm(int bf, const void *x, int64_t x_stride, const void *delta, int64_t delta_stride, int64_t rows,
                       int64_t n, const void *weight, const void *bias, float eps, void *sum, void *out) {
#pragma omp parallel for schedule(static) if (rows > 1 && rows * n >= ROWS_IN_PARALLEL)
    for (int64_t r = 0; r < rows; r++) {
        if (bf) add_layer_norm_row(1, x, x_stride, delta, delta_stride, r, n, weight, bias, eps, sum, out);
        else add_layer_norm_row(0, x, x_stride, delta, delta_stride, r, n, weight, bias, eps, sum, out);
    }
}

/* --- one step's keys and values into a KV cache ---------------------------------------------------
 * keys[b, h, position] = k[b, h] and values[b, h, position] = v[b, h] (rows of hd, copied as they
 * are): k and v rows at b * sb + h * sh (views into a fused projection's output, never copied
 * out of it first), keys and values [B, H, max_len, hd] contiguous. One call instead of the slicing
 * and two copies per layer of an indexed assignment. */
void lm_kv_append(int bf, const void *k, int64_t k_sb, int64_t k_sh, const void *v, int64_t v_sb, int64_t v_sh,
                  void *keys, void *values, int64_t B, int64_t H, int64_t max_len, int64_t hd, int64_t position) {
    int64_t size = bf ? 2 : 4;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            int64_t slot = ((b * H + h) * max_len + position) * hd * size;
            memcpy((char *)keys + slot, (const char *)k + (b * k_sb + h * k_sh) * size, hd * size);
            memcpy((char *)values + slot, (const char *)v + (b * v_sb + h * v_sh) * size, hd * size);
        }
}

/* --- rotary embedding of one step's queries or keys, in place --------------------------------
 * Head h of batch row b at x + b * x_sb + h * x_sh (elements), its first d (even) channels rotated
 * by that row's cos and sin [B, d] (model dtype): out_i = x_i cos_i + r_i sin_i with
 * r = (-x[d/2:d], x[:d/2]), each product rounded to the model dtype, then their sum, as
 * lmtool.layers.apply_rotary computes it; channels from d on are left as they are. */
void lm_rope(int bf, void *x, int64_t x_sb, int64_t x_sh, int64_t B, int64_t H, int64_t d, const void *cos,
             const void *sin) {
    const int64_t half = d / 2;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            const int64_t at = b * x_sb + h * x_sh;
            for (int64_t i = 0; i < half; i++) {
                const float first = ld(x, at + i, bf), second = ld(x, at + half + i, bf);
                const float c1 = ld(cos, b * d + i, bf), s1 = ld(sin, b * d + i, bf);
                const float c2 = ld(cos, b * d + half + i, bf), s2 = ld(sin, b * d + half + i, bf);
                st(x, at + i, rnd(first * c1, bf) + rnd(-second * s1, bf), bf);
                st(x, at + half + i, rnd(second * c2, bf) + rnd(first * s2, bf), bf);
            }
        }
}

/* --- one decode step's attention over a KV cache, in one call --------------------------------------
 * A q/k/v projection's rows [B, width]: query head h at h * head_stride, key and value head h at
 * k_offset and v_offset + h * head_stride (elements; Gemma and Zamba2's shared blocks lay out
 * [H query heads | KV key heads | KV value heads] of hd, BLOOM [q | k | v] per head). RoPE on the
 * queries' and keys' first rope_d channels (cos and sin [B, rope_d]; cos NULL: none), the KV append
 * at `position`, and one-query attention over the position + 1 cached keys (bias: ALiBi's rows
 * bias_rs apart, or NULL; key_mask [B, position + 1] or NULL) into context [B, H * hd] (scores:
 * lm_attend_one's scratch): one call instead of four per layer (see lm_add_rms_norm for why that
 * matters; in Gemma-2B's steps the four took 0.6-0.8 ms, the one 0.47-0.65, most of it now the
 * cold KV cache's reads). lm_attend_one is each instruction set's own (common.h), linked into the
 * same library. */
void lm_attend_one(int bf16, const void *q, int64_t q_bs, int64_t q_hs, const void *k, const void *v, int64_t kv_bs,
                   int64_t kv_hs, int64_t B, int64_t H, int64_t KV, int64_t S, int64_t hd, float scale, const void *bias,
                   int64_t bias_rs, const uint8_t *mask, int64_t mask_bs, void *out, float *scores);

void lm_attention_step(int bf, void *qkv, int64_t width, int64_t head_stride, int64_t k_offset, int64_t v_offset,
                       int64_t B, int64_t H, int64_t KV, int64_t hd, int64_t rope_d, const void *cos, const void *sin,
                       void *keys, void *values, int64_t max_len, int64_t position, float scale, const void *bias,
                       int64_t bias_rs, const uint8_t *key_mask, void *context, float *scores) {
    const int64_t size = bf ? 2 : 4, S = position + 1;
    char *q = (char *)qkv, *k = q + k_offset * size, *v = q + v_offset * size;
    if (cos) {
        lm_rope(bf, q, width, head_stride, B, H, rope_d, cos, sin);
        lm_rope(bf, k, width, head_stride, B, KV, rope_d, cos, sin);
    }
    lm_kv_append(bf, k, width, head_stride, v, width, head_stride, keys, values, B, KV, max_len, hd, position);
    lm_attend_one(bf, q, width, head_stride, keys, values, KV * max_len * hd, max_len * hd, B, H, KV, S, hd, scale, bias,
                  bias_rs, key_mask, S, context, scores);
}
