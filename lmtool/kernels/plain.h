/* The elementwise and attention hooks of common.h in plain C, written so that the compiler
 * vectorizes them for the instruction set it is given (-O3): loops of 16 independent lanes, no
 * calls into libm (its expf is not vectorized). Used by avx2.c, neon.c and portable.c; avx512.c has
 * hand-written ones. */
#ifndef LMTOOL_KERNELS_PLAIN_H
#define LMTOOL_KERNELS_PLAIN_H

#include "common.h"
#include "fastmath.h"

#define LANES 16

/* f32_to_bf16 without a branch (NaN chosen by a select), so that loops over it vectorize. */
static inline uint16_t round_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0 : (uint16_t)rounded;
}

/* Up to LANES elements from i of a bf16 or f32 array as floats (zeros past n), and back. */
static inline void load_lanes(const void* p, int64_t i, int64_t n, int bf16, float* v) {
    if (n == LANES && bf16) for (int l = 0; l < LANES; l++) v[l] = bf16_to_f32(((const uint16_t*)p)[i + l]);
    else if (n == LANES) for (int l = 0; l < LANES; l++) v[l] = ((const float*)p)[i + l];
    else for (int l = 0; l < LANES; l++) v[l] = l < n ? load_f32(p, i + l, bf16) : 0.0f;
}
static inline void store_lanes(void* p, int64_t i, int64_t n, int bf16, const float* v) {
    if (n == LANES && bf16) for (int l = 0; l < LANES; l++) ((uint16_t*)p)[i + l] = round_bf16(v[l]);
    else if (n == LANES) for (int l = 0; l < LANES; l++) ((float*)p)[i + l] = v[l];
    else for (int l = 0; l < n; l++) store_f32(p, i + l, bf16, v[l]);
}

#ifndef OWN_GELU_SPAN /* an instruction set's own (avx2.c) */
/* v = gelu_tanh(x) * u over one block of lanes; kept out of line, where GCC vectorizes it (inlined
   among the loads' branches it stays scalar). */
static __attribute__((noinline)) void gelu_lanes(const float* x, const float* u, float* v) {
    for (int l = 0; l < LANES; l++) {
        const float y = 0.7978845608028654f * (x[l] + 0.044715f * x[l] * x[l] * x[l]);
        v[l] = x[l] / (1.0f + exp_f32(-2.0f * y)) * u[l];
    }
}

static void gelu_span(int bf16, const void* gate, const void* up, void* out, int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += LANES) {
        const int64_t n = end - i < LANES ? end - i : LANES;
        float x[LANES], u[LANES], v[LANES];
        load_lanes(gate, i, n, bf16, x);
        if (up) load_lanes(up, i, n, bf16, u);
        else for (int l = 0; l < LANES; l++) u[l] = 1.0f;
        gelu_lanes(x, u, v);
        store_lanes(out, i, n, bf16, v);
    }
}
#endif

static float dot(int bf16, const void* a, const void* b, int64_t n) {
    float acc[LANES] = {0};
    int64_t i = 0;
    if (bf16) {
        const uint16_t *pa = a, *pb = b;
        for (; i + LANES <= n; i += LANES)
            for (int l = 0; l < LANES; l++) acc[l] += bf16_to_f32(pa[i + l]) * bf16_to_f32(pb[i + l]);
    } else {
        const float *pa = a, *pb = b;
        for (; i + LANES <= n; i += LANES)
            for (int l = 0; l < LANES; l++) acc[l] += pa[i + l] * pb[i + l];
    }
    float total = 0.0f;
    for (; i < n; i++) total += load_f32(a, i, bf16) * load_f32(b, i, bf16);
    for (int l = 0; l < LANES; l++) total += acc[l];
    return total;
}

static float exp_shifted_sum(float* sc, int64_t S, float top) {
    float sums[LANES] = {0}, total = 0.0f;
    int64_t s = 0;
    for (; s + LANES <= S; s += LANES)
        for (int l = 0; l < LANES; l++) {
            sc[s + l] = exp_f32(sc[s + l] - top);
            sums[l] += sc[s + l];
        }
    for (; s < S; s++) {
        sc[s] = exp_f32(sc[s] - top);
        total += sc[s];
    }
    for (int l = 0; l < LANES; l++) total += sums[l];
    return total;
}

static void weighted_rows(int bf16, const float* sc, const void* values, int64_t S, int64_t hd, float norm, void* o) {
    for (int64_t i = 0; i < hd; i += 64) { /* 64 accumulators at a time */
        float acc[64] = {0};
        const int64_t width = hd - i < 64 ? hd - i : 64;
        for (int64_t s = 0; s < S; s++) {
            if (sc[s] == 0.0f) continue;
            const float p = sc[s];
            if (bf16) {
                const uint16_t* row = (const uint16_t*)values + s * hd + i;
                for (int64_t l = 0; l < width; l++) acc[l] += p * bf16_to_f32(row[l]);
            } else {
                const float* row = (const float*)values + s * hd + i;
                for (int64_t l = 0; l < width; l++) acc[l] += p * row[l];
            }
        }
        for (int64_t l = 0; l < width; l += LANES) {
            float v[LANES];
            for (int j = 0; j < LANES; j++) v[j] = acc[l + j] * norm;
            store_lanes(o, i + l, width - l < LANES ? width - l : LANES, bf16, v);
        }
    }
}

#ifndef OWN_HEAD_GROUPS /* an instruction set's own dots and weighted_rows_group (avx2.c) */
static void dots(int bf16, const float* q, int64_t ldq, const void* b, int64_t n, float* out) {
    float acc[DOT_ROWS][LANES] = {{0}};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        float kb[LANES];
        load_lanes(b, i, LANES, bf16, kb);
        for (int r = 0; r < DOT_ROWS; r++)
            for (int l = 0; l < LANES; l++) acc[r][l] += q[r * ldq + i + l] * kb[l];
    }
    for (int r = 0; r < DOT_ROWS; r++) {
        float total = 0.0f;
        for (int64_t j = i; j < n; j++) total += q[r * ldq + j] * load_f32(b, j, bf16);
        for (int l = 0; l < LANES; l++) total += acc[r][l];
        out[r] = total;
    }
}

static void weighted_rows_group(int bf16, const float* p, int64_t ldp, int64_t n, const void* rows, int64_t S,
                                int64_t hd, const float* norm, void* out) {
    for (int64_t r = 0; r < n; r++) weighted_rows(bf16, p + r * ldp, rows, S, hd, norm[r], (char*)out + r * hd * (bf16 ? 2 : 4));
}
#endif

#endif
