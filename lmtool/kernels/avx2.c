/* lmtool kernels for x86 AVX2 with FMA (Haswell and later, Zen 1-3, Intel client CPUs without
 * AVX-512): bfloat16 is widened to float32 in registers (a 16-bit shift: exact) and accumulated in
 * float32 with FMA. The elementwise and attention hooks are plain.h's, vectorized for AVX2. */
#include <immintrin.h>
/* At one activation row the weight rows stream one after another (PADDED_ROW); prefetching them
   8 KB ahead into L2 streamed Gemma-2B's mapped weights 1.25x faster at two threads and 1.39x at
   one while the host's bandwidth was high (46 GB/s), 1.01-1.03x while it was 31-32 (Zen 4 capped
   to AVX2, alternating in one process). AVX-512's row was 0.80-0.85x with it, and has none. */
#define ROW_PREFETCH(p) _mm_prefetch((p) + 8192, _MM_HINT_T1)
#define OWN_GELU_SPAN
#define OWN_HEAD_GROUPS
#include "common.h"
#include "plain.h" /* and fastmath.h */

/* GeGLU in registers: plain.h's lanes stayed scalar for AVX2 in GCC (0.7 ms of each Gemma-2B decode
   step, 43 us per 16384 elements against AVX-512's 8), the same arithmetic as its gelu_lanes and
   exp_f32 (fastmath.h): n rounded to nearest even, e^r to degree 7, 2^n in two exact factors. */
static inline __m256 exp_ps(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-104.0f)), _mm256_set1_ps(89.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(EXP_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = EXP_REDUCED(x, n, _mm256_fnmadd_ps, _mm256_set1_ps);
    const __m256 p = EXP_TAYLOR7(r, _mm256_fmadd_ps, _mm256_set1_ps);
    const __m256i whole = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(whole, 1); /* floor: as exact as exp_f32's */
    const __m256i e1 = _mm256_slli_epi32(_mm256_add_epi32(half, _mm256_set1_epi32(127)), 23);
    const __m256i e2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(whole, half), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e1)), _mm256_castsi256_ps(e2));
}
static inline __m256 gelu_ps(__m256 x) {
    const __m256 y = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                   _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), x), _mm256_mul_ps(x, x), x));
    return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), exp_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), y))));
}
/* 8 elements from i of a bf16 or f32 array as float32, and back (bf16 rounded to nearest even, NaN
   kept quiet, as round_bf16) */
static inline __m256 ld8(const void* p, int64_t i, int bf16) {
    if (!bf16) return _mm256_loadu_ps((const float*)p + i);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)((const uint16_t*)p + i))), 16));
}
static inline void st8(void* p, int64_t i, int bf16, __m256 v) {
    if (!bf16) { _mm256_storeu_ps((float*)p + i, v); return; }
    const __m256i u = _mm256_castps_si256(v);
    __m256i h = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                  _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)))), 16);
    h = _mm256_blendv_epi8(h, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    _mm_storeu_si128((__m128i*)((uint16_t*)p + i), _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
}
static void gelu_span(int bf16, const void* gate, const void* up, void* out, int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + 8 <= end; i += 8) {
        __m256 v = gelu_ps(ld8(gate, i, bf16));
        if (up) v = _mm256_mul_ps(v, ld8(up, i, bf16));
        st8(out, i, bf16, v);
    }
    if (i == end) return;
    float x[8] = {0}, u[8], v[8]; /* the last few through a padded vector */
    for (int64_t l = 0; l < 8; l++) {
        x[l] = i + l < end ? load_f32(gate, i + l, bf16) : 0.0f;
        u[l] = up && i + l < end ? load_f32(up, i + l, bf16) : 1.0f;
    }
    _mm256_storeu_ps(v, _mm256_mul_ps(gelu_ps(_mm256_loadu_ps(x)), _mm256_loadu_ps(u)));
    for (int64_t l = 0; i + l < end; l++) store_f32(out, i + l, bf16, v[l]);
}

/* plain.h's dot for DOT_ROWS rows at once, in registers: each row's 16 lanes are the same chains of
   products and additions as dot's, then added in lane order (plain.h's version, as GCC vectorizes
   it, took Gemma-2B's attention to about 1.25x in a first version, where these take it to 1.64x). */
static void dots(int bf16, const float* q, int64_t ldq, const void* b, int64_t n, float* out) {
    __m256 acc[DOT_ROWS][2];
    for (int r = 0; r < DOT_ROWS; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256 k0 = ld8(b, i, bf16), k1 = ld8(b, i + 8, bf16);
        for (int r = 0; r < DOT_ROWS; r++) {
            acc[r][0] = _mm256_add_ps(acc[r][0], _mm256_mul_ps(_mm256_loadu_ps(q + r * ldq + i), k0));
            acc[r][1] = _mm256_add_ps(acc[r][1], _mm256_mul_ps(_mm256_loadu_ps(q + r * ldq + i + 8), k1));
        }
    }
    for (int r = 0; r < DOT_ROWS; r++) {
        float lanes[16], total = 0.0f;
        _mm256_storeu_ps(lanes, acc[r][0]);
        _mm256_storeu_ps(lanes + 8, acc[r][1]);
        for (int64_t j = i; j < n; j++) total += q[r * ldq + j] * load_f32(b, j, bf16);
        for (int l = 0; l < 16; l++) total += lanes[l];
        out[r] = total;
    }
}

/* plain.h's weighted_rows for n <= DOT_ROWS rows of p, 16 elements of the value rows at a time: each
   lane the same products and additions in the same order. */
static void weighted_rows_group(int bf16, const float* p, int64_t ldp, int64_t n, const void* rows, int64_t S,
                                int64_t hd, const float* norm, void* out) {
    const int64_t size = bf16 ? 2 : 4;
    if (hd % 16) {
        for (int64_t r = 0; r < n; r++) weighted_rows(bf16, p + r * ldp, rows, S, hd, norm[r], (char*)out + r * hd * size);
        return;
    }
    for (int64_t i = 0; i < hd; i += 16) {
        __m256 acc[DOT_ROWS][2];
        for (int r = 0; r < DOT_ROWS; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        for (int64_t s = 0; s < S; s++) {
            const char* row = (const char*)rows + s * hd * size;
            const __m256 v0 = ld8(row, i, bf16), v1 = ld8(row, i + 8, bf16);
            for (int r = 0; r < DOT_ROWS; r++) {
                const float w = r < n ? p[r * ldp + s] : 0.0f;
                if (w == 0.0f) continue;
                acc[r][0] = _mm256_add_ps(acc[r][0], _mm256_mul_ps(_mm256_set1_ps(w), v0));
                acc[r][1] = _mm256_add_ps(acc[r][1], _mm256_mul_ps(_mm256_set1_ps(w), v1));
            }
        }
        for (int64_t r = 0; r < n; r++) {
            st8((char*)out + r * hd * size, i, bf16, _mm256_mul_ps(acc[r][0], _mm256_set1_ps(norm[r])));
            st8((char*)out + r * hd * size, i + 8, bf16, _mm256_mul_ps(acc[r][1], _mm256_set1_ps(norm[r])));
        }
    }
}

/* 16 bf16 elements as two float32 vectors: the even elements (shifted up out of the low halves of
   the 32-bit words) and the odd ones (the high halves, low bits cleared). A dot product does not
   care about the order, so x and W split alike need no shuffle: one load and two ALU operations
   per 16 weights. */
typedef struct { __m256 even, odd; } bf16_pair;
static inline bf16_pair load_pair(const uint16_t* p) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)p);
    return (bf16_pair){_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)),
                       _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)))};
}
static inline __m256 mac_pair(__m256 acc, bf16_pair x, bf16_pair w) {
    return _mm256_fmadd_ps(x.odd, w.odd, _mm256_fmadd_ps(x.even, w.even, acc));
}
/* 8 bf16 elements widened in order (float32 activations times bf16 weights). */
static inline __m256 load_bf16_as_ps(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
static inline __m256 load_ps(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 mac_ps(__m256 acc, __m256 x, __m256 w) { return _mm256_fmadd_ps(x, w, acc); }
static inline __m256 zero_ps(void) { return _mm256_setzero_ps(); }
static inline float reduce_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 16 vector registers: tiles of at most 8 accumulators (1 x 8, 2 x 4); a 2 x 8 block is two
   2 x 4 tiles, the second reading its weight rows from cache. */
#define TILES(NAME, XT, WT, XV, WV, STEP, XLOAD, WLOAD, MAC)                                           \
    PADDED_TILE(NAME, XT, WT, XV, WV, __m256, STEP, XLOAD, WLOAD, MAC, zero_ps, reduce_ps, 1, 8)       \
    PADDED_TILE(NAME, XT, WT, XV, WV, __m256, STEP, XLOAD, WLOAD, MAC, zero_ps, reduce_ps, 2, 4)       \
    PADDED_TILE(NAME, XT, WT, XV, WV, __m256, STEP, XLOAD, WLOAD, MAC, zero_ps, reduce_ps, 1, 4)       \
    PADDED_TILE(NAME, XT, WT, XV, WV, __m256, STEP, XLOAD, WLOAD, MAC, zero_ps, reduce_ps, 1, 1)       \
    PADDED_ROW(NAME, XT, WT, __m256, STEP, XLOAD, WLOAD, MAC, zero_ps, reduce_ps, _mm256_add_ps)      \
    static inline void tile_##NAME##_2_8(const XT* x, int64_t ldx, const WT* w, int64_t ldw, int64_t span, \
                                         float* out, int64_t ldo) {                                    \
        tile_##NAME##_2_4(x, ldx, w, ldw, span, out, ldo);                                             \
        tile_##NAME##_2_4(x, ldx, w + 4 * ldw, ldw, span, out + 4, ldo);                               \
    }
TILES(bb, uint16_t, uint16_t, bf16_pair, bf16_pair, 16, load_pair, load_pair, mac_pair)
TILES(fb, float, uint16_t, __m256, __m256, 8, load_ps, load_bf16_as_ps, mac_ps)
TILES(ff, float, float, __m256, __m256, 8, load_ps, load_ps, mac_ps)

PADDED_BLOCK_FUNCTIONS /* no masked 16-bit loads: rows read as they lie */
