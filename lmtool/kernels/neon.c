/* lmtool kernels for aarch64 NEON (Apple silicon, Graviton, Ampere, Cortex-A). Built twice: with
 * the bf16 extension (-march=armv8.2-a+bf16: Graviton 3, Apple M2 and later, Neoverse V1/N2) bf16 x
 * bf16 uses BFDOT (pairs of bf16 products summed into float32 lanes); without it both sides are
 * widened to float32 (a 16-bit shift: exact) and accumulated with FMA. The elementwise and
 * attention hooks are plain.h's, vectorized for NEON. */
#include <arm_neon.h>
#include "common.h"
#include "plain.h"

static inline float32x4_t zero_ps(void) { return vdupq_n_f32(0.0f); }
static inline float reduce_ps(float32x4_t v) { return vaddvq_f32(v); }
static inline float32x4_t load_ps(const float* p) { return vld1q_f32(p); }
static inline float32x4_t load_bf16_as_ps(const uint16_t* p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
static inline float32x4_t mac_ps(float32x4_t acc, float32x4_t x, float32x4_t w) { return vfmaq_f32(acc, x, w); }

#ifdef __ARM_FEATURE_BF16_VECTOR_ARITHMETIC
typedef bfloat16x8_t bf16_vec;
static inline bf16_vec load_bf16(const uint16_t* p) { return vreinterpretq_bf16_u16(vld1q_u16(p)); }
static inline float32x4_t mac_bf16(float32x4_t acc, bf16_vec x, bf16_vec w) { return vbfdotq_f32(acc, x, w); }
#else
typedef struct { float32x4_t lo, hi; } bf16_vec; /* 8 bf16 elements widened */
static inline bf16_vec load_bf16(const uint16_t* p) {
    const uint16x8_t v = vld1q_u16(p);
    return (bf16_vec){vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(v), 16)),
                      vreinterpretq_f32_u32(vshll_high_n_u16(v, 16))};
}
static inline float32x4_t mac_bf16(float32x4_t acc, bf16_vec x, bf16_vec w) {
    return vfmaq_f32(vfmaq_f32(acc, x.lo, w.lo), x.hi, w.hi);
}
#endif

/* 32 vector registers: up to 2 x 8 accumulators, as on AVX-512. */
#define TILES(NAME, XT, WT, XV, WV, STEP, XLOAD, WLOAD, MAC)                                           \
    PADDED_TILE(NAME, XT, WT, XV, WV, float32x4_t, STEP, XLOAD, WLOAD, MAC, zero_ps, reduce_ps, 1, 8)  \
    PADDED_TILE(NAME, XT, WT, XV, WV, float32x4_t, STEP, XLOAD, WLOAD, MAC, zero_ps, reduce_ps, 2, 8)  \
    PADDED_TILE(NAME, XT, WT, XV, WV, float32x4_t, STEP, XLOAD, WLOAD, MAC, zero_ps, reduce_ps, 1, 4)  \
    PADDED_TILE(NAME, XT, WT, XV, WV, float32x4_t, STEP, XLOAD, WLOAD, MAC, zero_ps, reduce_ps, 1, 1)  \
    PADDED_ROW(NAME, XT, WT, float32x4_t, STEP, XLOAD, WLOAD, MAC, zero_ps, reduce_ps, vaddq_f32)
TILES(bb, uint16_t, uint16_t, bf16_vec, bf16_vec, 8, load_bf16, load_bf16, mac_bf16)
TILES(fb, float, uint16_t, float32x4_t, float32x4_t, 4, load_ps, load_bf16_as_ps, mac_ps)
TILES(ff, float, float, float32x4_t, float32x4_t, 4, load_ps, load_ps, mac_ps)

PADDED_BLOCK_FUNCTIONS
