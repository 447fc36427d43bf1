/* lmtool kernels for x86 AVX2 with FMA (Haswell and later, Zen 1-3, Intel client CPUs without
 * AVX-512): bfloat16 is widened to float32 in registers (a 16-bit shift: exact) and accumulated in
 * float32 with FMA. The elementwise and attention hooks are plain.h's, vectorized for AVX2. */
#include <immintrin.h>
/* At one activation row the weight rows stream one after another (PADDED_ROW); prefetching them
   8 KB ahead into L2 streamed Gemma-2B's mapped weights 1.25x faster at two threads and 1.39x at
   one while the host's bandwidth was high (46 GB/s), 1.01-1.03x while it was 31-32 (Zen 4 capped
   to AVX2, alternating in one process). AVX-512's row was 0.80-0.85x with it, and has none. */
#define ROW_PREFETCH(p) _mm_prefetch((p) + 8192, _MM_HINT_T1)
#include "common.h"
#include "plain.h"

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
