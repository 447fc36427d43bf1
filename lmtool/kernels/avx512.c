/* lmtool kernels for x86 AVX-512 with AVX512-BF16 (Cooper Lake, Sapphire Rapids and later, Zen 4
 * and later): bf16 x bf16 dot products with vdpbf16ps (as oneDNN does), masked loads, so weight
 * rows are read from a vector boundary (see common.h). */
#include <immintrin.h>
#include "common.h"
#include "fastmath.h" /* exp_ps shares its steps */

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
    TILE(NAME, XT, WT, VT, STEP, XL, XLR, WL, WLR, MAC, 4, 4)                                       \
    TILE(NAME, XT, WT, VT, STEP, XL, XLR, WL, WLR, MAC, 1, 4)                                       \
    TILE(NAME, XT, WT, VT, STEP, XL, XLR, WL, WLR, MAC, 1, 1)
TILES(bb, uint16_t, uint16_t, __m512bh, 32, ld_bh_full, ld_bh_r, ld_bh_full, ld_bh_r, mac_bh)
TILES(fb, float, uint16_t, __m512, 16, ld_ps_full, ld_ps_r, ld_bf16_as_ps_full, ld_bf16_as_ps_r, mac_ps)
TILES(ff, float, float, __m512, 16, ld_ps_full, ld_ps_r, ld_ps_full, ld_ps_r, mac_ps)

static int64_t aligned_step(int kind) { return kind == BF16_BF16 ? 32 : 16; }

/* One bfloat16 activation row: the weight rows one after another, each through four accumulators.
   A thread's rows lie end to end, so it reads one sequential stream, which the hardware prefetchers
   follow further ahead than the eight interleaved streams of a 1 x 8 tile (Gemma-2B's mapped
   weights at 2 threads, alternating: 1.04-1.18x the 1 x 8 tile; llama.cpp reads this way too).
   Float32 activations keep the 1 x 8 tile: there the row was 0.93x. Rows that start `lead`
   elements past a vector boundary are read from it, as the tiles read them (see lm_linear). */
static inline __attribute__((always_inline)) float row_bb(const uint16_t* x, const uint16_t* w, int64_t span, int64_t lead) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t k = 0;
    if (lead || span < 32) { /* first step: lanes [lead, min(span, 32)) */
        acc[0] = mac_bh(acc[0], ld_bh_r(x, lead, span < 32 ? span : 32), ld_bh_r(w, lead, span < 32 ? span : 32));
        k = 32;
    }
    for (; k + 128 <= span; k += 128)
        for (int u = 0; u < 4; u++) acc[u] = mac_bh(acc[u], ld_bh_full(x + k + 32 * u), ld_bh_full(w + k + 32 * u));
    for (; k + 32 <= span; k += 32) acc[0] = mac_bh(acc[0], ld_bh_full(x + k), ld_bh_full(w + k));
    if (k < span) acc[0] = mac_bh(acc[0], ld_bh_r(x + k, 0, span - k), ld_bh_r(w + k, 0, span - k));
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

/* With M >= 4 the 8-row block is read in several passes while the first comes from DRAM and the
   others from cache, so each pass prefetches a share of the next block's rows (`next`, or NULL)
   into L2: memory and arithmetic then overlap instead of alternating. From 4 activation rows the
   passes are 4 x 4 tiles (4 activation rows times half the block): 8 loads per 16 products where
   the 2 x 8 tile needs 10, which is what bounds a batch of 8 once the weights are in cache (single
   thread, weights in cache, 8 rows: 80 -> 91-100 GMAC/s on Zen 4). */
static void block(int kind, const void* x, int64_t ldx, int64_t M, const void* w, int64_t ldw, int64_t span,
                  int64_t lead, int64_t nb, float* out, const void* next) {
#define RUN(NAME, XT, WT)                                                                          \
    {                                                                                              \
        const XT* xx = (const XT*)x; const WT* ww = (const WT*)w; const WT* ahead = (const WT*)next; \
        int64_t m = 0;                                                                             \
        if (nb == 8 && M >= 4) {                                                                   \
            const int64_t passes = M / 4 * 2;                                                      \
            const int share = ahead ? (int)((8 + passes - 1) / passes) : 0;                        \
            float tile[2][16];                                                                     \
            for (int64_t p = 0; m + 4 <= M; m += 4) {                                              \
                for (int half = 0; half < 2; half++, p++) {                                        \
                    const int first = (int)(p * share) < 8 ? (int)(p * share) : 8;                 \
                    const int rows = first + share <= 8 ? share : 8 - first;                       \
                    tile_##NAME##_4_4(xx + m * ldx, ldx, ww + half * 4 * ldw, ldw, span, lead, tile[half], \
                                      rows ? ahead + first * ldw : ww, rows);                      \
                }                                                                                  \
                for (int i = 0; i < 4; i++)                                                        \
                    for (int j = 0; j < 8; j++) out[(m + i) * 8 + j] = tile[j / 4][i * 4 + j % 4]; \
            }                                                                                      \
            for (; m + 2 <= M; m += 2) tile_##NAME##_2_8(xx + m * ldx, ldx, ww, ldw, span, lead, out + m * 8, ww, 0); \
            for (; m < M; m++) tile_##NAME##_1_8(xx + m * ldx, ldx, ww, ldw, span, lead, out + m * 8, ww, 0); \
        } else if (nb == 8) {                                                                      \
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
    if (M == 1 && kind == BF16_BF16) {
        for (int64_t j = 0; j < nb; j++) out[j] = row_bb((const uint16_t*)x, (const uint16_t*)w + j * ldw, span, lead);
        return;
    }
    if (kind == BF16_BF16) RUN(bb, uint16_t, uint16_t)
    else if (kind == F32_BF16) RUN(fb, float, uint16_t)
    else RUN(ff, float, float)
#undef RUN
}

/* e^x for float32 lanes: x = n ln2 + r, |r| <= ln2/2, e^r by its Taylor series to degree 7
 * (relative error < 1e-8, below float32 rounding), times 2^n. -inf gives 0. */
static inline __m512 exp_ps(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-104.0f), hi = _mm512_set1_ps(88.7f);
    const __mmask16 finite = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(EXP_LOG2E)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = EXP_REDUCED(x, n, _mm512_fnmadd_ps, _mm512_set1_ps);
    const __m512 p = EXP_TAYLOR7(r, _mm512_fmadd_ps, _mm512_set1_ps);
    return _mm512_maskz_mov_ps(finite, _mm512_scalef_ps(p, n));
}

/* 16 lanes of a bf16 or f32 array as f32, and back (bf16 rounded to nearest even); `left` < 16
   is a masked tail. */
static inline __m512 ld16(const void* p, int64_t i, int bf16, int64_t left) {
    return bf16 ? ld_bf16_as_ps((const uint16_t*)p + i, left) : ld_ps((const float*)p + i, left);
}
static inline void st16(void* p, int64_t i, int bf16, __m512 v, int64_t left) {
    /* full vectors stored unmasked: a masked store is slower where it misses the cache (AMD) */
    const __mmask16 m = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
    if (!bf16) {
        if (left >= 16) _mm512_storeu_ps((float*)p + i, v);
        else _mm512_mask_storeu_ps((float*)p + i, m, v);
        return;
    }
    /* round to nearest even, NaN kept quiet: as f32_to_bf16 */
    __m512i u = _mm512_castps_si512(v);
    __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                          _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc00000));
    const __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
    if (left >= 16) _mm256_storeu_si256((__m256i*)((uint16_t*)p + i), h);
    else _mm256_mask_storeu_epi16((uint16_t*)p + i, m, h);
}


static void gelu_span(int bf16, const void* gate, const void* up, void* out, int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += 16) {
        const int64_t left = end - i;
        const __m512 x = ld16(gate, i, bf16, left);
        const __m512 y = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                       _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), x), _mm512_mul_ps(x, x), x));
        __m512 v = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_mul_ps(_mm512_set1_ps(-2.0f), y))));
        if (up) v = _mm512_mul_ps(v, ld16(up, i, bf16, left));
        st16(out, i, bf16, v, left);
    }
}

static float dot(int bf16, const void* a, const void* b, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) acc = _mm512_fmadd_ps(ld16(a, i, bf16, n - i), ld16(b, i, bf16, n - i), acc);
    return _mm512_reduce_add_ps(acc);
}

static void dots(int bf16, const float* q, int64_t ldq, const void* b, int64_t n, float* out) {
    __m512 acc[DOT_ROWS];
    for (int r = 0; r < DOT_ROWS; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        const __m512 kb = ld16(b, i, bf16, n - i);
        for (int r = 0; r < DOT_ROWS; r++) acc[r] = _mm512_fmadd_ps(ld16(q + r * ldq, i, 0, n - i), kb, acc[r]);
    }
    for (int r = 0; r < DOT_ROWS; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

static void weighted_rows_group(int bf16, const float* p, int64_t ldp, int64_t n, const void* rows, int64_t S,
                                int64_t hd, const float* norm, void* out) {
    const int64_t size = bf16 ? 2 : 4;
    for (int64_t i = 0; i < hd; i += 32) { /* 2 accumulators of 16 lanes a row: hd 32 at a time */
        __m512 acc[DOT_ROWS][2];
        for (int r = 0; r < DOT_ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        const int64_t width = hd - i < 32 ? hd - i : 32;
        for (int64_t s = 0; s < S; s++) {
            const char* row = (const char*)rows + s * hd * size;
            const __m512 v0 = ld16(row, i, bf16, width), v1 = width > 16 ? ld16(row, i + 16, bf16, width - 16) : _mm512_setzero_ps();
            for (int r = 0; r < DOT_ROWS; r++) {
                const float w = r < n ? p[r * ldp + s] : 0.0f;
                if (w == 0.0f) continue;
                acc[r][0] = _mm512_fmadd_ps(_mm512_set1_ps(w), v0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(_mm512_set1_ps(w), v1, acc[r][1]);
            }
        }
        for (int64_t r = 0; r < n; r++) {
            char* o = (char*)out + r * hd * size;
            st16(o, i, bf16, _mm512_mul_ps(acc[r][0], _mm512_set1_ps(norm[r])), width);
            if (width > 16) st16(o, i + 16, bf16, _mm512_mul_ps(acc[r][1], _mm512_set1_ps(norm[r])), width - 16);
        }
    }
}

static float exp_shifted_sum(float* sc, int64_t S, float top) {
    __m512 sum = _mm512_setzero_ps();
    for (int64_t s = 0; s < S; s += 16) {
        const __mmask16 m = S - s >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (S - s)) - 1);
        const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sc + s), _mm512_set1_ps(top)));
        _mm512_mask_storeu_ps(sc + s, m, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
    }
    return _mm512_reduce_add_ps(sum);
}

static void weighted_rows(int bf16, const float* sc, const void* values, int64_t S, int64_t hd, float norm, void* o) {
    const int64_t size = bf16 ? 2 : 4;
    for (int64_t i = 0; i < hd; i += 64) { /* 4 accumulators of 16 lanes: hd up to 64 at a time */
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        const int64_t width = hd - i < 64 ? hd - i : 64;
        for (int64_t s = 0; s < S; s++) {
            if (sc[s] == 0.0f) continue;
            const __m512 p = _mm512_set1_ps(sc[s]);
            const char* row = (const char*)values + s * hd * size;
            for (int j = 0; j * 16 < width; j++)
                acc[j] = _mm512_fmadd_ps(p, ld16(row, i + j * 16, bf16, width - j * 16), acc[j]);
        }
        for (int j = 0; j * 16 < width; j++)
            st16(o, i + j * 16, bf16, _mm512_mul_ps(acc[j], _mm512_set1_ps(norm)), width - j * 16);
    }
}
