/* lmtool's weight-only int8 and int4 decode kernels: y[M, N] = x[M, K] . W[N, K]^T for M <= 16
 * activation rows, W stored as compressed-tensors stores it and read where it lies (memory-mapped,
 * never repacked or copied).
 *
 * Why: decoding is bound by the rate at which weights stream from memory, so an int8 weight should
 * cost half of a bfloat16 one and an int4 weight a quarter. That needs a kernel that reads the
 * stored bytes once per call for all activation rows and does little work per byte; PyTorch's
 * int8/int4 CPU kernels run at about bfloat16's speed, and its int4 one needs a copy of the codes
 * in its own layout.
 *
 *   int8 ("naive-quantized"): codes int8 [N, K], one float32 scale per row:
 *        y[m, n] = scale[n] * sum_k x[m, k] q[n, k]
 *   int4 ("pack-quantized"): bytes [N, K/2], byte j of a row holding element 2j in its low nibble
 *        and 2j+1 in its high one, each the code + 8 (u in [0, 15]); a scale (bfloat16 or float32)
 *        and an int8 zero point (or none) per row and group of `group` inputs:
 *        w = (u - 8 - zero_point) * scale, exactly as lmtool.quantize.schemes.dequantize computes it
 *        in float32.
 *
 * The activations are first copied once per call into a scratch buffer, zero padded (for int4
 * split into their even and odd elements, the order of the low and high nibbles): widened to
 * float32 for the float32 tiles, kept in bfloat16 for the int4 bfloat16 tiles (AVX512-BF16,
 * bfloat16 activations), rounded to int16 per block for the int8 integer tiles (AVX-512 and AVX2,
 * bfloat16 activations: the one rounding besides the output's). Every other product is exact and
 * sums are float32 (int32 within a block); the output is rounded once to the activation dtype.
 * Output rows are shared among torch's OpenMP threads in blocks of 4 (TILE_ROWS); within a block
 * the activation rows are taken 8, 4, 2 or 1 at a time against 1, 2 or 4 weight rows (tiles whose
 * accumulators stay in registers), so the weights are read from memory once whatever M is.
 *
 * Per instruction set: AVX-512 int8 with bfloat16 activations multiplies in integers (the
 * activations rounded to int16 per block of 128, vpdpwssd), with float32 activations it widens the
 * codes to float32 and FMAs; int4 turns the nibbles into bfloat16 128 + u by a logic operation for
 * vdpbf16ps, or, for float32 activations, looks them up in a table of the group's dequantized
 * floats (vpermps). At one activation row AVX-512 reads the weight rows one after another.
 * AVX2 multiplies int8 in integers too (vpmaddwd) and converts int4 to float32 for FMAs. NEON and
 * portable builds use plain C the compiler vectorizes.
 * Tiles that multiply the stored nibbles u (or 128 + u) rather than the dequantized weights
 * (AVX-512 bfloat16, AVX2) scale each group's sums once; the driver then takes away the offset's
 * and the zero point's share,
 * sum_g scale_g (NIBBLE_OFFSET + 8 + zero_point_g) sum_(k in g) x_k.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if (defined(__AVX512F__) && defined(__AVX512BF16__)) || defined(__AVX2__)
#include <immintrin.h>
#endif

enum { TILE_ROWS = 4 };
/* Activation elements per int16 block (I16_TILES): 4 steps of 32. Each int32 lane then sums at most
   8 products of |code| <= 127 and |x| <= 2^15, far from overflowing. */
enum { I16_BLOCK = 128 };
/* How far ahead of its loads a tile prefetches its weight stream, in bytes (a thread's rows are one
   contiguous stream). Without it a single core streamed int8 codes at ~10 GB/s where bf16 reached
   20-24 (Zen 4): the hardware prefetcher alone keeps too few lines in flight for the shorter rows.
   One block ahead (4 rows) was ~15, 8 KB ~19-23, 4 KB (a 4K alias of the load) ~10, 16-64 KB ~17. */
#define PREFETCH_AHEAD 8192

static inline float bf16_value(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t bf16_rounded(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* The float32 copy of the activations, reused from call to call (per calling thread). */
static __thread float* scratch;
static __thread size_t scratch_size;
static float* scratch_floats(size_t n) {
    const size_t bytes = (n * sizeof(float) + 63) / 64 * 64;
    if (scratch_size < bytes) {
        free(scratch);
        scratch = aligned_alloc(64, bytes);
        scratch_size = scratch ? bytes : 0;
    }
    return scratch;
}

/* Padding after the last scratch row: a tile may read up to 64 bytes past a row's end, where the
   weights are masked to zero (the padding only has to be finite). */
enum { SCRATCH_TAIL = 16 };

/* ---- the tiles of each instruction set --------------------------------------------------------
 * INT8_TILE(MB, NB) defines int8_tile_MB_NB(...): out[i * TILE_ROWS + j] = sum_k xs[i * ldxs + k]
 * w[j * K + k] for MB activation rows and NB weight rows.
 * INT4_TILE(MB, NB): the same over dequantized nibbles; xs rows hold the even elements, then (at
 * + half) the odd ones; s and z hold each weight row's scale and 8 + zero point per group (groups
 * apart). Macros, as common.h's tiles, so that the accumulator arrays have their exact sizes and
 * live in registers (sized for the largest tile, GCC keeps them in memory). Each also prefetches
 * its weight rows PREFETCH_AHEAD bytes ahead into L1. */

/* Loops over a tile's rows, unrolled before GCC decides where the accumulators live (left to its
   later unrolling, it keeps the 8 x 1 tiles' accumulators in memory and stores them every step). */
#define UNROLLED _Pragma("GCC unroll 16")

#if defined(__AVX512F__) && defined(__AVX512BF16__)

#define INT8_TILE(MB, NB)                                                                                      \
static void int8_tile_##MB##_##NB(const float* xs, int64_t ldxs, int64_t K, const int8_t* w, float* out)       \
{                                                                                                              \
    __m512 acc[MB][NB];                                                                                        \
    UNROLLED for (int i = 0; i < MB; i++) for (int j = 0; j < NB; j++) acc[i][j] = _mm512_setzero_ps();        \
    /* One path through the loop (the masked tail after it): a branch inside keeps GCC from                    \
       holding the accumulators in registers. */                                                               \
    int64_t k = 0;                                                                                             \
    for (; k + 16 <= K; k += 16) {                                                                             \
        __m512 wv[NB];                                                                                         \
        UNROLLED for (int j = 0; j < NB; j++) {                                                                \
            _mm_prefetch((const char*)(w + j * K + k) + PREFETCH_AHEAD, _MM_HINT_T0);               \
            wv[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + j * K + k)))); \
        }                                                                                                      \
        UNROLLED for (int i = 0; i < MB; i++) {                                                                \
            const __m512 xv = _mm512_loadu_ps(xs + i * ldxs + k);                                              \
            UNROLLED for (int j = 0; j < NB; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);           \
        }                                                                                                      \
    }                                                                                                          \
    if (k < K) {                                                                                               \
        const __mmask16 mask = (__mmask16)((1u << (K - k)) - 1);                                               \
        __m512 wv[NB];                                                                                         \
        UNROLLED for (int j = 0; j < NB; j++) wv[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, w + j * K + k))); \
        UNROLLED for (int i = 0; i < MB; i++) {                                                                \
            const __m512 xv = _mm512_loadu_ps(xs + i * ldxs + k); /* zero padded to a multiple of 32 */        \
            UNROLLED for (int j = 0; j < NB; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);           \
        }                                                                                                      \
    }                                                                                                          \
    UNROLLED for (int i = 0; i < MB; i++) for (int j = 0; j < NB; j++) out[i * TILE_ROWS + j] = _mm512_reduce_add_ps(acc[i][j]); \
}

/* 16 bytes (32 weights) a step: each byte widened into a 32-bit lane, and the lane's low 4 bits
   (then, shifted, its high 4) index a 16-float table of the group's dequantized values
   (u - 8 - zero point) * scale: one vpermps gives 16 weights ready for the FMA. Two accumulators
   per (activation row, weight row), even and odd elements. */
#define INT4_TILE(MB, NB)                                                                                      \
static void int4_tile_##MB##_##NB(const float* xs, int64_t ldxs, int64_t half, int64_t K,                      \
    const uint8_t* w, int64_t group, const float* s, const float* z, int64_t groups, float* out)               \
{                                                                                                              \
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);                  \
    const int64_t ldw = K / 2, group_bytes = group / 2;                                                        \
    __m512 acc[MB][NB][2];                                                                                     \
    UNROLLED for (int i = 0; i < MB; i++) for (int j = 0; j < NB; j++) acc[i][j][0] = acc[i][j][1] = _mm512_setzero_ps(); \
    for (int64_t g = 0; g < groups; g++) {                                                                     \
        __m512 table[NB];                                                                                      \
        UNROLLED for (int j = 0; j < NB; j++)                                                                  \
            table[j] = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(z[j * groups + g])), _mm512_set1_ps(s[j * groups + g])); \
        const int64_t end = (g + 1) * group_bytes;                                                             \
        int64_t b = g * group_bytes;                                                                           \
        for (; b + 16 <= end; b += 16) { /* one path through the loop: the tail after it */                    \
            __m512 lo[NB], hi[NB];                                                                             \
            UNROLLED for (int j = 0; j < NB; j++) {                                                            \
                _mm_prefetch((const char*)(w + j * ldw + b) + PREFETCH_AHEAD, _MM_HINT_T0);         \
                const __m512i lanes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w + j * ldw + b))); \
                lo[j] = _mm512_permutexvar_ps(lanes, table[j]);                                                \
                hi[j] = _mm512_permutexvar_ps(_mm512_srli_epi32(lanes, 4), table[j]);                          \
            }                                                                                                  \
            UNROLLED for (int i = 0; i < MB; i++) {                                                            \
                const __m512 even = _mm512_loadu_ps(xs + i * ldxs + b), odd = _mm512_loadu_ps(xs + i * ldxs + half + b); \
                UNROLLED for (int j = 0; j < NB; j++) {                                                        \
                    acc[i][j][0] = _mm512_fmadd_ps(lo[j], even, acc[i][j][0]);                                 \
                    acc[i][j][1] = _mm512_fmadd_ps(hi[j], odd, acc[i][j][1]);                                  \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
        if (b < end) {                                                                                         \
            __m512 lo[NB], hi[NB];                                                                             \
            {                                                                                                  \
                const __mmask16 mask = (__mmask16)((1u << (end - b)) - 1);                                     \
                UNROLLED for (int j = 0; j < NB; j++) {                                                        \
                    const __m512i lanes = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, w + j * ldw + b));   \
                    lo[j] = _mm512_maskz_permutexvar_ps(mask, lanes, table[j]);                                \
                    hi[j] = _mm512_maskz_permutexvar_ps(mask, _mm512_srli_epi32(lanes, 4), table[j]);          \
                }                                                                                              \
            }                                                                                                  \
            UNROLLED for (int i = 0; i < MB; i++) {                                                            \
                const __m512 even = _mm512_loadu_ps(xs + i * ldxs + b), odd = _mm512_loadu_ps(xs + i * ldxs + half + b); \
                UNROLLED for (int j = 0; j < NB; j++) {                                                        \
                    acc[i][j][0] = _mm512_fmadd_ps(lo[j], even, acc[i][j][0]);                                 \
                    acc[i][j][1] = _mm512_fmadd_ps(hi[j], odd, acc[i][j][1]);                                  \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
    }                                                                                                          \
    UNROLLED for (int i = 0; i < MB; i++)                                                                      \
        UNROLLED for (int j = 0; j < NB; j++) out[i * TILE_ROWS + j] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][j][0], acc[i][j][1])); \
}

/* bfloat16 activations with int8 weights as integers: the activations are first rounded to int16
   in blocks of I16_BLOCK elements, each with its own power-of-two scale (block floating point,
   see quantize_activations), and vpdpwssd (AVX512-VNNI) multiplies 32 int16 pairs a step into 16
   int32 lanes, exactly; each block's sums are scaled once into float32. Per 32 weights that is one
   widening of the codes (vpmovsxbw) and one vpdpwssd per activation row, where the float32 tile
   needs two widenings, two conversions and two FMAs: the difference between a kernel bound by its
   arithmetic and one that streams at the memory's rate. The rounding of the activations adds at
   most 2^-15 of each block's largest |x| per element, far below the bfloat16 rounding of the
   output (a bfloat16 activation with an exponent within 8 of the block's largest is exact). */
#define I16_TILES 1
/* One activation row: weight rows one at a time (1 x 1 tiles), each thread reading one sequential
   stream, as lm_linear's bfloat16 rows do: Gemma-sized int8 rows 24.8 -> 34.9 GB/s, int4 19.0 ->
   27.0 at 2 threads (Zen 4), though the 1 x 4 tiles compute faster from cache. Where a tile is
   bound by its arithmetic (AVX2's float32 int4 tile) the 1 x 4 tiles stay. */
#define INT8_ROW_BY_ROW 1
#define INT4_ROW_BY_ROW 1
#define INT8_I16_TILE(MB, NB)                                                                                  \
static void int8_tile_i16_##MB##_##NB(const int16_t* xs, int64_t ldxs, const float* xscale, int64_t ldscale,    \
    int64_t K, const int8_t* w, float* out)                                                                    \
{                                                                                                              \
    __m512 total[MB][NB];                                                                                      \
    UNROLLED for (int i = 0; i < MB; i++) UNROLLED for (int j = 0; j < NB; j++) total[i][j] = _mm512_setzero_ps(); \
    for (int64_t b = 0; b * I16_BLOCK < K; b++) {                                                              \
        __m512i part[MB][NB];                                                                                  \
        UNROLLED for (int i = 0; i < MB; i++) UNROLLED for (int j = 0; j < NB; j++) part[i][j] = _mm512_setzero_si512(); \
        const int64_t end = (b + 1) * I16_BLOCK < K ? (b + 1) * I16_BLOCK : K;                                 \
        for (int64_t k = b * I16_BLOCK; k < end; k += 32) {                                                    \
            /* a masked load chosen without a branch (one path through the loop) */                            \
            const uint32_t left = end - k < 32 ? (uint32_t)(end - k) : 32;                                     \
            const __mmask32 mask = (__mmask32)(0xffffffffu >> (32 - left));                                    \
            __m512i wv[NB];                                                                                    \
            UNROLLED for (int j = 0; j < NB; j++) {                                                            \
                _mm_prefetch((const char*)(w + j * K + k) + PREFETCH_AHEAD, _MM_HINT_T0);                      \
                wv[j] = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, w + j * K + k));                    \
            }                                                                                                  \
            UNROLLED for (int i = 0; i < MB; i++) {                                                            \
                const __m512i xv = _mm512_loadu_si512(xs + i * ldxs + k);                                      \
                UNROLLED for (int j = 0; j < NB; j++) part[i][j] = _mm512_dpwssd_epi32(part[i][j], xv, wv[j]); \
            }                                                                                                  \
        }                                                                                                      \
        UNROLLED for (int i = 0; i < MB; i++) {                                                                \
            const __m512 scale = _mm512_set1_ps(xscale[i * ldscale + b]);                                      \
            UNROLLED for (int j = 0; j < NB; j++) total[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(part[i][j]), scale, total[i][j]); \
        }                                                                                                      \
    }                                                                                                          \
    UNROLLED for (int i = 0; i < MB; i++) UNROLLED for (int j = 0; j < NB; j++) out[i * TILE_ROWS + j] = _mm512_reduce_add_ps(total[i][j]); \
}

/* bfloat16 activations with int4 weights, read as they are: each nibble byte widened to a 16-bit
   lane, whose low 4 bits (then, shifted, its high 4) become the bfloat16 number 128 + u by setting
   the bits of 128.0 above them (0x4300 | u: at exponent 7 the mantissa's last bit is 1, so this is
   exact), one logic operation instead of a table lookup (vpermw, a shuffle, of which Zen 4 has
   few: 19 -> 22+ G weights/s per core). vdpbf16ps multiplies 32 pairs into 16 float32 sums, each
   product exact; the scale is applied per group and the driver takes away the offset's and the
   zero point's share, (128 + 8 + zero point) * scale * sum(x) (NIBBLE_OFFSET). */
#define BF16_TILES 1
#define NIBBLE_OFFSET 128
/* The pieces of INT4_BF16_TILE: a group's sums start at zero, each 32-byte step (64 nibbles, BYTES the
   load of row j's) adds its products, the group's end scales them into the totals. Even and odd
   products go to separate sums: two dependency chains, not one twice as long. */
#define INT4_BF16_GROUP_START(MB, NB)                                                                                \
    __m512 part[MB][NB][2];                                                                                    \
    UNROLLED for (int i = 0; i < MB; i++) for (int j = 0; j < NB; j++) part[i][j][0] = part[i][j][1] = _mm512_setzero_ps();
#define INT4_BF16_STEP(MB, NB, b, BYTES, MASK)                                                                             \
    {                                                                                                          \
        __m512bh lo[NB], hi[NB];                                                                               \
        UNROLLED for (int j = 0; j < NB; j++) {                                                                \
            _mm_prefetch((const char*)(w + j * ldw + (b)) + PREFETCH_AHEAD, _MM_HINT_T0);                      \
            const __m512i bytes = _mm512_cvtepu8_epi16(BYTES);                                                 \
            /* (bytes & low4) | bits128, and past a group's end (MASK) zeros, not 128s */                       \
            lo[j] = (__m512bh)_mm512_maskz_mov_epi16(MASK, _mm512_ternarylogic_epi32(bytes, low4, bits128, 0xEA)); \
            hi[j] = (__m512bh)_mm512_maskz_mov_epi16(MASK, _mm512_or_si512(_mm512_srli_epi16(bytes, 4), bits128)); \
        }                                                                                                      \
        UNROLLED for (int i = 0; i < MB; i++) {                                                                \
            const __m512bh even = (__m512bh)_mm512_loadu_si512(xs + i * ldxs + (b));                           \
            const __m512bh odd = (__m512bh)_mm512_loadu_si512(xs + i * ldxs + half + (b));                     \
            UNROLLED for (int j = 0; j < NB; j++) {                                                            \
                part[i][j][0] = _mm512_dpbf16_ps(part[i][j][0], lo[j], even);                                  \
                part[i][j][1] = _mm512_dpbf16_ps(part[i][j][1], hi[j], odd);                                   \
            }                                                                                                  \
        }                                                                                                      \
    }
#define INT4_BF16_GROUP_END(MB, NB)                                                                                \
    UNROLLED for (int j = 0; j < NB; j++) {                                                                    \
        const __m512 scale = _mm512_set1_ps(s[j * groups + g]);                                                \
        UNROLLED for (int i = 0; i < MB; i++)                                                                  \
            total[i][j] = _mm512_fmadd_ps(_mm512_add_ps(part[i][j][0], part[i][j][1]), scale, total[i][j]);   \
    }
#define INT4_BF16_TILE(MB, NB)                                                                                 \
static void int4_tile_bf16_##MB##_##NB(const uint16_t* xs, int64_t ldxs, int64_t half, int64_t K,              \
    const uint8_t* w, int64_t group, const float* s, int64_t groups, float* out)                               \
{                                                                                                              \
    const __m512i low4 = _mm512_set1_epi16(0x000f), bits128 = _mm512_set1_epi16(0x4300);                      \
    const int64_t ldw = K / 2, group_bytes = group / 2;                                                        \
    const int whole = group_bytes % 32 == 0; /* no partial steps (groups of 64, 128...): no mask to compute */ \
    __m512 total[MB][NB];                                                                                      \
    UNROLLED for (int i = 0; i < MB; i++) for (int j = 0; j < NB; j++) total[i][j] = _mm512_setzero_ps();      \
    /* Groups of 64 (one 32-byte step each, the default): a flat loop over groups, no masks; the general   \
       loop's bookkeeping per group cost as much as the group's arithmetic. */                                 \
    if (group_bytes == 32) {                                                                                   \
        for (int64_t g = 0; g < groups; g++) {                                                                 \
            INT4_BF16_GROUP_START(MB, NB)                                                                      \
            INT4_BF16_STEP(MB, NB, g * 32, _mm256_loadu_si256((const __m256i*)(w + j * ldw + g * 32)), (__mmask32)~0u)                 \
            INT4_BF16_GROUP_END(MB, NB)                                                                        \
        }                                                                                                      \
    } else {                                                                                                   \
        for (int64_t g = 0; g < groups; g++) {                                                                 \
            INT4_BF16_GROUP_START(MB, NB)                                                                      \
            const int64_t end = (g + 1) * group_bytes;                                                         \
            for (int64_t b = g * group_bytes; b < end; b += 32) {                                              \
                /* a masked load chosen without a branch (a branch in the loop keeps GCC from holding          \
                   the accumulators in registers) */                                                           \
                const uint32_t left = whole || end - b >= 32 ? 32 : (uint32_t)(end - b);                       \
                const __mmask32 mask = (__mmask32)(0xffffffffu >> (32 - left));                                \
                INT4_BF16_STEP(MB, NB, b, _mm256_maskz_loadu_epi8(mask, w + j * ldw + b), mask)                              \
            }                                                                                                  \
            INT4_BF16_GROUP_END(MB, NB)                                                                        \
        }                                                                                                      \
    }                                                                                                          \
    UNROLLED for (int i = 0; i < MB; i++) for (int j = 0; j < NB; j++) out[i * TILE_ROWS + j] = _mm512_reduce_add_ps(total[i][j]); \
}

/* Prefill's dequantized tiles in bfloat16, 16 or 32 weights an instruction where the plain loops
   below managed about 13 (int8) and 6 (int4) G weights/s on two cores: the same float32 values,
   (code - zero point) * scale, rounded once to nearest even (vcvtneps2bf16). */
#define BF16_DEQUANT 1
static void int8_row_to_bf16(const int8_t* codes, float scale, int64_t K, uint16_t* out) {
    const __m512 s = _mm512_set1_ps(scale);
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 mask = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
        const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, codes + k))), s);
        _mm256_mask_storeu_epi16(out + k, mask, (__m256i)_mm512_cvtneps_pbh(v));
    }
}
/* One group of `group` weights (even) from its bytes: the group's 16 possible values as bfloat16 in
   a table, then per 16 bytes one vpermw whose 32-bit lanes index the low nibble in their low half
   and the high nibble in their high half: the two weights of a byte land side by side, in order. */
static void int4_group_to_bf16(const uint8_t* bytes, float s, float z, int64_t group, uint16_t* out) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i table = _mm512_castsi256_si512(
        (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(z)), _mm512_set1_ps(s))));
    for (int64_t b = 0; b < group / 2; b += 16) {
        const int64_t left = group / 2 - b;
        const __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
        const __m512i v = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, bytes + b));
        const __m512i index = _mm512_or_si512(_mm512_and_si512(v, _mm512_set1_epi32(15)),
                                              _mm512_slli_epi32(_mm512_srli_epi32(v, 4), 16));
        _mm512_mask_storeu_epi32(out + 2 * b, mask, _mm512_permutexvar_epi16(index, table));
    }
}

#elif defined(__AVX2__)

static inline float reduce8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
/* 8 bytes at p, or the n < 8 that are left followed by zeros (nothing past them is read). */
static inline __m128i load8(const void* p, int64_t n) {
    if (__builtin_expect(n >= 8, 1)) return _mm_loadl_epi64((const __m128i*)p);
    uint64_t v = 0;
    memcpy(&v, p, (size_t)n);
    return _mm_cvtsi64_si128((long long)v);
}

#define INT8_TILE(MB, NB)                                                                                      \
static void int8_tile_##MB##_##NB(const float* xs, int64_t ldxs, int64_t K, const int8_t* w, float* out)       \
{                                                                                                              \
    __m256 acc[MB][NB];                                                                                        \
    UNROLLED for (int i = 0; i < MB; i++) for (int j = 0; j < NB; j++) acc[i][j] = _mm256_setzero_ps();        \
    for (int64_t k = 0; k < K; k += 8) { /* load8's branch is taken only at the tail: kept out of line */      \
        __m256 wv[NB];                                                                                         \
        UNROLLED for (int j = 0; j < NB; j++) {                                                                \
            _mm_prefetch((const char*)(w + j * K + k) + PREFETCH_AHEAD, _MM_HINT_T0);               \
            wv[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(load8(w + j * K + k, K - k)));                     \
        }                                                                                                      \
        UNROLLED for (int i = 0; i < MB; i++) {                                                                \
            const __m256 xv = _mm256_loadu_ps(xs + i * ldxs + k);                                              \
            UNROLLED for (int j = 0; j < NB; j++) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);           \
        }                                                                                                      \
    }                                                                                                          \
    UNROLLED for (int i = 0; i < MB; i++) for (int j = 0; j < NB; j++) out[i * TILE_ROWS + j] = reduce8(acc[i][j]); \
}

/* 16 bytes at p, or the n < 16 that are left followed by zeros. */
static inline __m128i load16(const void* p, int64_t n) {
    if (__builtin_expect(n >= 16, 1)) return _mm_loadu_si128((const __m128i*)p);
    uint8_t v[16] = {0};
    memcpy(v, p, (size_t)n);
    return _mm_loadu_si128((const __m128i*)v);
}

/* bfloat16 activations with int8 weights as integers, as AVX-512's INT8_I16_TILE (see there) but
   with vpmaddwd and an add (no VNNI on most AVX2 CPUs): 16 weights a step, one widening and two
   integer operations per activation row where the float32 tile needs two steps of three. */
#define I16_TILES 1
#define INT8_ROW_BY_ROW 1
#define I16_NARROW 1 /* partial sums and totals: see BLOCK */
#define INT8_I16_TILE(MB, NB)                                                                                  \
static void int8_tile_i16_##MB##_##NB(const int16_t* xs, int64_t ldxs, const float* xscale, int64_t ldscale,    \
    int64_t K, const int8_t* w, float* out)                                                                    \
{                                                                                                              \
    __m256 total[MB][NB];                                                                                      \
    UNROLLED for (int i = 0; i < MB; i++) UNROLLED for (int j = 0; j < NB; j++) total[i][j] = _mm256_setzero_ps(); \
    for (int64_t b = 0; b * I16_BLOCK < K; b++) {                                                              \
        __m256i part[MB][NB];                                                                                  \
        UNROLLED for (int i = 0; i < MB; i++) UNROLLED for (int j = 0; j < NB; j++) part[i][j] = _mm256_setzero_si256(); \
        const int64_t end = (b + 1) * I16_BLOCK < K ? (b + 1) * I16_BLOCK : K;                                 \
        for (int64_t k = b * I16_BLOCK; k < end; k += 16) { /* load16's branch: only at the tail */            \
            __m256i wv[NB];                                                                                    \
            UNROLLED for (int j = 0; j < NB; j++) {                                                            \
                _mm_prefetch((const char*)(w + j * K + k) + PREFETCH_AHEAD, _MM_HINT_T0);                      \
                wv[j] = _mm256_cvtepi8_epi16(load16(w + j * K + k, end - k));                                  \
            }                                                                                                  \
            UNROLLED for (int i = 0; i < MB; i++) {                                                            \
                const __m256i xv = _mm256_loadu_si256((const __m256i*)(xs + i * ldxs + k));                    \
                UNROLLED for (int j = 0; j < NB; j++)                                                          \
                    part[i][j] = _mm256_add_epi32(part[i][j], _mm256_madd_epi16(xv, wv[j]));                   \
            }                                                                                                  \
        }                                                                                                      \
        UNROLLED for (int i = 0; i < MB; i++) {                                                                \
            const __m256 scale = _mm256_set1_ps(xscale[i * ldscale + b]);                                      \
            UNROLLED for (int j = 0; j < NB; j++) total[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(part[i][j]), scale, total[i][j]); \
        }                                                                                                      \
    }                                                                                                          \
    UNROLLED for (int i = 0; i < MB; i++) UNROLLED for (int j = 0; j < NB; j++) out[i * TILE_ROWS + j] = reduce8(total[i][j]); \
}

/* 8 bytes (16 weights) a step: each byte in a 32-bit lane, its nibbles converted to float and
   multiplied as they are (u, 0..15); a group's sums are scaled once, and the driver takes away the
   zero point's share (INT4_SUMS_CODES). Bytes past a group's end load as 0, which adds nothing. */
#define INT4_SUMS_CODES 1
#define INT4_NARROW 1 /* partial sums and totals: see BLOCK */
#define INT4_TILE(MB, NB)                                                                                      \
static void int4_tile_##MB##_##NB(const float* xs, int64_t ldxs, int64_t half, int64_t K,                      \
    const uint8_t* w, int64_t group, const float* s, const float* z, int64_t groups, float* out)               \
{                                                                                                              \
    (void)z;                                                                                                   \
    const int64_t ldw = K / 2, group_bytes = group / 2;                                                        \
    const __m256i low4 = _mm256_set1_epi32(15);                                                                \
    __m256 acc[MB][NB];                                                                                        \
    UNROLLED for (int i = 0; i < MB; i++) UNROLLED for (int j = 0; j < NB; j++) acc[i][j] = _mm256_setzero_ps(); \
    for (int64_t g = 0; g < groups; g++) {                                                                     \
        __m256 part[MB][NB];                                                                                   \
        UNROLLED for (int i = 0; i < MB; i++) UNROLLED for (int j = 0; j < NB; j++) part[i][j] = _mm256_setzero_ps(); \
        const int64_t end = (g + 1) * group_bytes;                                                             \
        for (int64_t b = g * group_bytes; b < end; b += 8) {                                                   \
            UNROLLED for (int j = 0; j < NB; j++) {                                                            \
                _mm_prefetch((const char*)(w + j * ldw + b) + PREFETCH_AHEAD, _MM_HINT_T0);         \
                const __m256i lanes = _mm256_cvtepu8_epi32(load8(w + j * ldw + b, end - b));                   \
                const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(lanes, low4));                           \
                const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(lanes, 4));                             \
                UNROLLED for (int i = 0; i < MB; i++) {                                                        \
                    part[i][j] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xs + i * ldxs + b), part[i][j]);          \
                    part[i][j] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xs + i * ldxs + half + b), part[i][j]);   \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
        UNROLLED for (int j = 0; j < NB; j++) {                                                                \
            const __m256 scale = _mm256_set1_ps(s[j * groups + g]);                                            \
            UNROLLED for (int i = 0; i < MB; i++) acc[i][j] = _mm256_fmadd_ps(part[i][j], scale, acc[i][j]);   \
        }                                                                                                      \
    }                                                                                                          \
    UNROLLED for (int i = 0; i < MB; i++) UNROLLED for (int j = 0; j < NB; j++) out[i * TILE_ROWS + j] = reduce8(acc[i][j]); \
}

#else /* plain C: 16 independent lanes a step, which the compiler vectorizes (NEON, portable) */

enum { LANES = 16 };

#define INT8_TILE(MB, NB)                                                                                      \
static void int8_tile_##MB##_##NB(const float* xs, int64_t ldxs, int64_t K, const int8_t* w, float* out)       \
{                                                                                                              \
    float acc[MB][NB][LANES];                                                                                  \
    memset(acc, 0, sizeof acc);                                                                                \
    for (int64_t k = 0; k < K; k += LANES) {                                                                   \
        const int64_t n = K - k < LANES ? K - k : LANES;                                                       \
        float wv[NB][LANES];                                                                                   \
        UNROLLED for (int j = 0; j < NB; j++)                                                                  \
            for (int l = 0; l < LANES; l++) wv[j][l] = l < n ? (float)w[j * K + k + l] : 0.0f;                 \
        UNROLLED for (int i = 0; i < MB; i++)                                                                  \
            UNROLLED for (int j = 0; j < NB; j++)                                                              \
                for (int l = 0; l < LANES; l++) acc[i][j][l] += xs[i * ldxs + k + l] * wv[j][l];               \
    }                                                                                                          \
    UNROLLED for (int i = 0; i < MB; i++)                                                                      \
        UNROLLED for (int j = 0; j < NB; j++) {                                                                \
            float total = 0.0f;                                                                                \
            for (int l = 0; l < LANES; l++) total += acc[i][j][l];                                             \
            out[i * TILE_ROWS + j] = total;                                                                    \
        }                                                                                                      \
}

#define INT4_TILE(MB, NB)                                                                                      \
static void int4_tile_##MB##_##NB(const float* xs, int64_t ldxs, int64_t half, int64_t K,                      \
    const uint8_t* w, int64_t group, const float* s, const float* z, int64_t groups, float* out)               \
{                                                                                                              \
    const int64_t ldw = K / 2, group_bytes = group / 2;                                                        \
    float acc[MB][NB][LANES];                                                                                  \
    memset(acc, 0, sizeof acc);                                                                                \
    for (int64_t g = 0; g < groups; g++) {                                                                     \
        const int64_t end = (g + 1) * group_bytes;                                                             \
        for (int64_t b = g * group_bytes; b < end; b += LANES) {                                               \
            const int64_t n = end - b < LANES ? end - b : LANES;                                               \
            float lo[NB][LANES], hi[NB][LANES];                                                                \
            UNROLLED for (int j = 0; j < NB; j++) {                                                            \
                const float scale = s[j * groups + g], zero = z[j * groups + g];                               \
                for (int l = 0; l < LANES; l++) {                                                              \
                    const uint8_t byte = l < n ? w[j * ldw + b + l] : 0;                                       \
                    lo[j][l] = l < n ? ((float)(byte & 15) - zero) * scale : 0.0f;                             \
                    hi[j][l] = l < n ? ((float)(byte >> 4) - zero) * scale : 0.0f;                             \
                }                                                                                              \
            }                                                                                                  \
            UNROLLED for (int i = 0; i < MB; i++)                                                              \
                UNROLLED for (int j = 0; j < NB; j++)                                                          \
                    for (int l = 0; l < LANES; l++)                                                            \
                        acc[i][j][l] += lo[j][l] * xs[i * ldxs + b + l] + hi[j][l] * xs[i * ldxs + half + b + l]; \
        }                                                                                                      \
    }                                                                                                          \
    UNROLLED for (int i = 0; i < MB; i++)                                                                      \
        UNROLLED for (int j = 0; j < NB; j++) {                                                                \
            float total = 0.0f;                                                                                \
            for (int l = 0; l < LANES; l++) total += acc[i][j][l];                                             \
            out[i * TILE_ROWS + j] = total;                                                                    \
        }                                                                                                      \
}

#endif

/* ---- the drivers, shared by every instruction set ---------------------------------------------- */

#ifndef BF16_TILES
#define BF16_TILES 0 /* no bfloat16 tiles: bfloat16 activations are widened to float32 */
#endif
#ifndef INT8_ROW_BY_ROW
#define INT8_ROW_BY_ROW 0 /* one activation row: 1 x 4 tiles */
#endif
#ifndef INT4_ROW_BY_ROW
#define INT4_ROW_BY_ROW 0
#endif
#ifndef INT4_NARROW
#define INT4_NARROW 0
#endif
#ifndef I16_NARROW
#define I16_NARROW 0
#endif
#ifndef I16_TILES
#define I16_TILES 0 /* no int16 tiles: int8 weights take the float32 or bfloat16 tiles */
#endif
#ifndef BF16_DEQUANT
#define BF16_DEQUANT 0 /* the plain loops of lm_int8_dequantize / lm_int4_dequantize */
#endif
#ifndef NIBBLE_OFFSET
#define NIBBLE_OFFSET 0
#endif
#ifndef INT4_SUMS_CODES
#define INT4_SUMS_CODES 0 /* the float32 int4 tiles multiply dequantized weights */
#endif

/* (activation rows, weight rows) of the tiles: 8 activation rows against one weight row down to one
   against four, so that a tile always has at least 4 independent accumulators (at one activation
   row, 4 weight rows are read side by side). */
#define TILE_SHAPES(X) X(1, 1) X(2, 1) X(4, 1) X(1, 4) X(2, 4) X(4, 2) X(8, 1)
TILE_SHAPES(INT8_TILE)
TILE_SHAPES(INT4_TILE)
#if BF16_TILES
TILE_SHAPES(INT4_BF16_TILE)
#endif
#if I16_TILES
TILE_SHAPES(INT8_I16_TILE)
#endif

/* One block of nb <= TILE_ROWS weight rows against all M activation rows: CALL(MB, NB, j, m) runs
   the tile of activation rows [m, m + MB) and weight rows [j, j + NB) of the block. BY_ROW: one
   activation row goes through the weight rows one at a time (INT8_ROW_BY_ROW, INT4_ROW_BY_ROW).
   NARROW: tiles that hold a group's partial sums beside their totals need two registers per
   (activation row, weight row), and 16 registers (AVX2) hold at most 4 x 2 of them without
   spilling: there the 8 x 1, 4 x 2 and 2 x 4 tiles run as two tiles of 4 x 1, 4 x 1 and 1 x 4. */
#define TILE_8_1(CALL, NARROW, j, m) if (NARROW) { CALL(4, 1, j, m); CALL(4, 1, j, (m) + 4); } else CALL(8, 1, j, m);
#define TILE_4_2(CALL, NARROW, j, m) if (NARROW) { CALL(4, 1, j, m); CALL(4, 1, (j) + 1, m); } else CALL(4, 2, j, m);
#define TILE_2_4(CALL, NARROW, j, m) if (NARROW) { CALL(1, 4, j, m); CALL(1, 4, j, (m) + 1); } else CALL(2, 4, j, m);
#define BLOCK(M, nb, CALL, BY_ROW, NARROW)                                                             \
    {                                                                                                  \
        int64_t m = 0;                                                                                 \
        if ((nb) == TILE_ROWS) {                                                                       \
            for (; M - m >= 8; m += 8) for (int j = 0; j < TILE_ROWS; j++) { TILE_8_1(CALL, NARROW, j, m) } \
            for (; M - m >= 4; m += 4) for (int j = 0; j < TILE_ROWS; j += 2) { TILE_4_2(CALL, NARROW, j, m) } \
            for (; M - m >= 2; m += 2) { TILE_2_4(CALL, NARROW, 0, m) }                                \
            if (M == 1 && (BY_ROW)) for (int j = 0; j < TILE_ROWS; j++) CALL(1, 1, j, 0);            \
            else for (; m < M; m++) CALL(1, 4, 0, m);                                                  \
        } else {                                                                                       \
            for (int j = 0; j < (nb); j++) {                                                           \
                for (m = 0; M - m >= 8; m += 8) { TILE_8_1(CALL, NARROW, j, m) }                       \
                for (; M - m >= 4; m += 4) CALL(4, 1, j, m);                                           \
                for (; M - m >= 2; m += 2) CALL(2, 1, j, m);                                           \
                for (; m < M; m++) CALL(1, 1, j, m);                                                   \
            }                                                                                          \
        }                                                                                              \
    }

/* The activations as the tiles read them: M rows of ldxs elements, float32, or bfloat16 where the
   bfloat16 tiles run (as_bf16); for int4 (split) each row's even elements, then at `half` its odd
   ones; zero padded to a multiple of 32 elements. xsum (with `sums`): each row's sum over each
   group ([M, groups]), for the zero-point correction of tiles that sum the stored codes. */
typedef struct { void* rows; int64_t ldxs, half; float* xsum; } activations_t;

static int widen_activations(int bf16, int as_bf16, const void* x, int64_t ldx, int64_t M, int64_t K, int split,
                             int64_t group, int with_sums, activations_t* a) {
    const int64_t used = split ? K / 2 : K, width = (used + 31) / 32 * 32, groups = K / group;
    const size_t size = as_bf16 ? 2 : 4;
    a->half = width;
    a->ldxs = split ? 2 * width : width;
    const size_t row_bytes = (size_t)(M * a->ldxs) * size + SCRATCH_TAIL * sizeof(float);
    const size_t sums = with_sums ? (size_t)(M * groups) : 0;
    float* buffer = scratch_floats((row_bytes + 3) / 4 + sums);
    if (!buffer) return -1;
    memset(buffer, 0, row_bytes);
    a->rows = buffer;
    a->xsum = sums ? buffer + (row_bytes + 3) / 4 : NULL;
    for (int64_t m = 0; m < M; m++) {
        const char* row = (const char*)x + m * ldx * (bf16 ? 2 : 4);
        for (int64_t k = 0; k < K; k++) {
            const int64_t at = m * a->ldxs + (split ? (k & 1) * width + k / 2 : k);
            if (as_bf16) ((uint16_t*)a->rows)[at] = ((const uint16_t*)row)[k];
            else ((float*)a->rows)[at] = bf16 ? bf16_value(((const uint16_t*)row)[k]) : ((const float*)row)[k];
        }
        for (int64_t g = 0; a->xsum && g < groups; g++) {
            float total = 0.0f;
            for (int64_t k = g * group; k < (g + 1) * group; k++)
                total += bf16 ? bf16_value(((const uint16_t*)row)[k]) : ((const float*)row)[k];
            a->xsum[m * groups + g] = total;
        }
    }
    return 0;
}

/* The activations as int16 for the int16 tiles: x[m, k] ~ q[m, k] * scale[m, k / I16_BLOCK], each
   block's scale the power of two 2^(e - 15) with 2^e just above the block's largest |x|, q rounded
   to nearest (an exact multiple where x has no bits below the scale: every bfloat16 within 2^8 of
   the block's largest). Rows of ldxs (K padded to 32) int16, then the scales [M, blocks]. */
typedef struct { int16_t* rows; int64_t ldxs; float* scale; int64_t blocks; } int16_activations_t;

static int quantize_activations(int bf16, const void* x, int64_t ldx, int64_t M, int64_t K, int16_activations_t* a) {
    a->ldxs = (K + 31) / 32 * 32;
    a->blocks = (K + I16_BLOCK - 1) / I16_BLOCK;
    const size_t row_bytes = ((size_t)(M * a->ldxs) * sizeof(int16_t) + 63) / 64 * 64;
    float* buffer = scratch_floats(row_bytes / 4 + (size_t)(M * a->blocks));
    if (!buffer) return -1;
    a->rows = (int16_t*)buffer;
    a->scale = buffer + row_bytes / 4;
    memset(a->rows, 0, row_bytes);
    for (int64_t m = 0; m < M; m++) {
        const char* row = (const char*)x + m * ldx * (bf16 ? 2 : 4);
        for (int64_t b = 0; b < a->blocks; b++) {
            const int64_t begin = b * I16_BLOCK, n = begin + I16_BLOCK < K ? I16_BLOCK : K - begin;
            /* loops without branches or libm calls, which the compiler vectorizes */
            float v[I16_BLOCK], largest = 0.0f;
            if (bf16) {
                const uint16_t* h = (const uint16_t*)row + begin;
                for (int64_t k = 0; k < n; k++) { const uint32_t u = (uint32_t)h[k] << 16; memcpy(v + k, &u, 4); }
            } else {
                memcpy(v, (const float*)row + begin, (size_t)n * sizeof(float));
            }
            int nans = 0;
            for (int64_t k = 0; k < n; k++) {
                const float mag = v[k] < 0.0f ? -v[k] : v[k];
                largest = mag > largest ? mag : largest;
                nans |= v[k] != v[k];
            }
            int e = 0;
            if (largest > 0.0f) frexpf(largest, &e); /* largest < 2^e */
            const float up = ldexpf(1.0f, 15 - e);
            /* an infinite or NaN activation makes its block's sums NaN, as a float product would */
            a->scale[m * a->blocks + b] = isfinite(largest) && !nans ? ldexpf(1.0f, e - 15) : NAN;
            int16_t* q = a->rows + m * a->ldxs + begin;
            for (int64_t k = 0; k < n; k++) {
                /* to nearest even by the 1.5 * 2^23 trick (|v up| < 2^15) */
                float r = (v[k] * up + 12582912.0f) - 12582912.0f;
                r = r > 32767.0f ? 32767.0f : r < -32767.0f ? -32767.0f : r;
                q[k] = (int16_t)r;
            }
        }
    }
    return 0;
}

/* sum_i a[i] b[i] in independent lanes, which the compiler vectorizes (a plain float sum it may not
   reorder: this runs groups x M x N times a call, as much as the tiles' own work at 8 rows). */
static float dot_lanes(const float* a, const float* b, int64_t n) {
    float lanes[16] = {0}, total = 0.0f;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) lanes[l] += a[i + l] * b[i + l];
    for (; i < n; i++) total += a[i] * b[i];
    for (int l = 0; l < 16; l++) total += lanes[l];
    return total;
}

static void store_block(int bf16, void* y, int64_t ldy, int64_t M, int64_t n0, int64_t nb, const float* out,
                        const float* row_scale) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t j = 0; j < nb; j++) {
            const float v = out[m * TILE_ROWS + j] * (row_scale ? row_scale[n0 + j] : 1.0f);
            if (bf16) ((uint16_t*)y)[m * ldy + n0 + j] = bf16_rounded(v);
            else ((float*)y)[m * ldy + n0 + j] = v;
        }
}

/* y[M, N] (row stride ldy) = x[M, K] (bf16 != 0: bfloat16, else float32; row stride ldx) times the
   int8 codes [N, K] scaled per row. Returns 0, or -1 when the scratch copy could not be allocated. */
int lm_int8_linear(int bf16, const void* x, int64_t ldx, int64_t M, int64_t K, const int8_t* codes,
                   const float* scale, int64_t N, void* y, int64_t ldy) {
    const int as_i16 = I16_TILES && bf16;
    activations_t a = {0};
    int16_activations_t q = {0};
    if (as_i16 ? quantize_activations(bf16, x, ldx, M, K, &q) : widen_activations(bf16, 0, x, ldx, M, K, 0, K, 0, &a))
        return -1;
    const int64_t ldxs = as_i16 ? q.ldxs : a.ldxs;
    #pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < (N + TILE_ROWS - 1) / TILE_ROWS; t++) {
        const int64_t n0 = t * TILE_ROWS, nb = N - n0 < TILE_ROWS ? N - n0 : TILE_ROWS;
        const int8_t* w = codes + n0 * K;
        float out[16 * TILE_ROWS];
        if (as_i16) {
#if I16_TILES
            const int16_t* xs = q.rows;
#define INT8_I16_CALL(MB, NB, j, m)                                                                    \
    int8_tile_i16_##MB##_##NB(xs + (m) * ldxs, ldxs, q.scale + (m) * q.blocks, q.blocks, K, w + (j) * K,  \
                              out + (m) * TILE_ROWS + (j))
            BLOCK(M, nb, INT8_I16_CALL, INT8_ROW_BY_ROW, I16_NARROW)
#endif
        } else {
            const float* xs = a.rows;
#define INT8_CALL(MB, NB, j, m) int8_tile_##MB##_##NB(xs + (m) * ldxs, ldxs, K, w + (j) * K, out + (m) * TILE_ROWS + (j))
            BLOCK(M, nb, INT8_CALL, 0, 0)
        }
        store_block(bf16, y, ldy, M, n0, nb, out, scale);
    }
    return 0;
}

/* y[M, N] = x[M, K] times the int4 weight: nibbles [N, K/2]; scale [N, K/group] (scale_bf16:
   bfloat16, else float32; row stride ld_scale); zero_point int8 [N, K/group] contiguous, or NULL
   (symmetric). group even, dividing K. Returns 0, or -1 when memory could not be allocated. */
int lm_int4_linear(int bf16, const void* x, int64_t ldx, int64_t M, int64_t K, const uint8_t* nibbles,
                   const void* scale, int scale_bf16, int64_t ld_scale, const int8_t* zero_point, int64_t group,
                   int64_t N, void* y, int64_t ldy) {
    const int as_bf16 = BF16_TILES && bf16, sums_codes = as_bf16 || INT4_SUMS_CODES;
    activations_t a;
    if (widen_activations(bf16, as_bf16, x, ldx, M, K, 1, group, sums_codes, &a)) return -1;
    const int64_t groups = K / group, ldxs = a.ldxs, half = a.half;
    int failed = 0;
    #pragma omp parallel
    {
        /* Each block's scales, 8 + zero points and their products as float32, TILE_ROWS rows of groups. */
        float* sz = malloc((size_t)(3 * TILE_ROWS * groups) * sizeof(float));
        if (!sz) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < (N + TILE_ROWS - 1) / TILE_ROWS; t++) {
            if (!sz) continue;
            const int64_t n0 = t * TILE_ROWS, nb = N - n0 < TILE_ROWS ? N - n0 : TILE_ROWS;
            float *s = sz, *z = sz + TILE_ROWS * groups, *shift = sz + 2 * TILE_ROWS * groups;
            for (int64_t j = 0; j < nb; j++)
                for (int64_t g = 0; g < groups; g++) {
                    const int64_t at = (n0 + j) * ld_scale + g;
                    s[j * groups + g] = scale_bf16 ? bf16_value(((const uint16_t*)scale)[at]) : ((const float*)scale)[at];
                    z[j * groups + g] = (as_bf16 ? 8.0f + NIBBLE_OFFSET : 8.0f) + (zero_point ? (float)zero_point[(n0 + j) * groups + g] : 0.0f);
                    shift[j * groups + g] = s[j * groups + g] * z[j * groups + g];
                }
            const uint8_t* w = nibbles + n0 * (K / 2);
            float out[16 * TILE_ROWS];
            if (!as_bf16) {
                const float* xs = a.rows;
#define INT4_CALL(MB, NB, j, m)                                                                        \
    int4_tile_##MB##_##NB(xs + (m) * ldxs, ldxs, half, K, w + (j) * (K / 2), group, s + (j) * groups, z + (j) * groups, \
                          groups, out + (m) * TILE_ROWS + (j))
                BLOCK(M, nb, INT4_CALL, 0, INT4_NARROW)
            }
#if BF16_TILES
            else {
                const uint16_t* xs = a.rows;
#define INT4_BF16_CALL(MB, NB, j, m)                                                                   \
    int4_tile_bf16_##MB##_##NB(xs + (m) * ldxs, ldxs, half, K, w + (j) * (K / 2), group, s + (j) * groups, groups, \
                               out + (m) * TILE_ROWS + (j))
                BLOCK(M, nb, INT4_BF16_CALL, INT4_ROW_BY_ROW, 0)
            }
#endif
            if (sums_codes) /* the tiles summed s x u, and w = (u - z) s: take away sum_g s z xsum */
                for (int64_t m = 0; m < M; m++)
                    for (int64_t j = 0; j < nb; j++)
                        out[m * TILE_ROWS + j] -= dot_lanes(shift + j * groups, a.xsum + m * groups, groups);
            store_block(bf16, y, ldy, M, n0, nb, out, NULL);
        }
        free(sz);
    }
    return failed ? -1 : 0;
}

/* ---- prefill: dequantized tiles for the dense GEMM ---------------------------------------------
 * Beyond MAX_ROWS activation rows the product is compute-bound and goes to the dense matmul
 * (oneDNN), over the weight dequantized a tile of rows at a time into a small reused buffer. These
 * write such a tile in one pass, as lmtool.quantize.schemes.dequantize computes it (float32
 * (code - zero point) * scale, rounded once to the output dtype). */

/* f32 -> bf16 to nearest even without a branch (NaN by a select), so that loops over it vectorize. */
static inline uint16_t bf16_rounded_lanes(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0 : (uint16_t)rounded;
}

/* out[n] (bf16 or f32) = values[n]: the one rounding. */
static inline void store_values(void* out, int out_bf16, const float* values, int64_t n) {
    if (out_bf16) for (int64_t i = 0; i < n; i++) ((uint16_t*)out)[i] = bf16_rounded_lanes(values[i]);
    else memcpy(out, values, (size_t)n * sizeof(float));
}

enum { DEQUANT_CHUNK = 256 }; /* elements dequantized into float32 before the rounding pass */

/* out[rows, K] = rows [0, rows) of the int8 codes [., K] times their float32 row scales. */
void lm_int8_dequantize(const int8_t* codes, const float* scale, int64_t K, int64_t rows, int out_bf16, void* out) {
    const size_t size = out_bf16 ? 2 : 4;
#if BF16_DEQUANT
    if (out_bf16) {
        #pragma omp parallel for schedule(static)
        for (int64_t r = 0; r < rows; r++) int8_row_to_bf16(codes + r * K, scale[r], K, (uint16_t*)out + r * K);
        return;
    }
#endif
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t k = 0; k < K; k += DEQUANT_CHUNK) {
            const int64_t n = K - k < DEQUANT_CHUNK ? K - k : DEQUANT_CHUNK;
            float values[DEQUANT_CHUNK];
            for (int64_t i = 0; i < n; i++) values[i] = (float)codes[r * K + k + i] * scale[r];
            store_values((char*)out + (r * K + k) * size, out_bf16, values, n);
        }
}

/* out[rows, K] = rows [0, rows) of an int4 weight (lm_int4_linear's arguments, pointers at the
   first row). A group at a time: its scale and zero point are constants of the inner loop. */
void lm_int4_dequantize(const uint8_t* nibbles, const void* scale, int scale_bf16, int64_t ld_scale,
                        const int8_t* zero_point, int64_t group, int64_t K, int64_t rows, int out_bf16, void* out) {
    const int64_t groups = K / group;
    const size_t size = out_bf16 ? 2 : 4;
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t g = 0; g < groups; g++) {
            const int64_t at = r * ld_scale + g;
            const float s = scale_bf16 ? bf16_value(((const uint16_t*)scale)[at]) : ((const float*)scale)[at];
            const float z = 8.0f + (zero_point ? (float)zero_point[r * groups + g] : 0.0f);
            const uint8_t* bytes = nibbles + r * (K / 2) + g * (group / 2);
#if BF16_DEQUANT
            if (out_bf16) {
                int4_group_to_bf16(bytes, s, z, group, (uint16_t*)out + r * K + g * group);
                continue;
            }
#endif
            for (int64_t k = 0; k < group; k += DEQUANT_CHUNK) {
                const int64_t n = group - k < DEQUANT_CHUNK ? group - k : DEQUANT_CHUNK; /* even */
                float values[DEQUANT_CHUNK];
                for (int64_t i = 0; i < n / 2; i++) {
                    values[2 * i] = ((float)(bytes[k / 2 + i] & 15) - z) * s;
                    values[2 * i + 1] = ((float)(bytes[k / 2 + i] >> 4) - z) * s;
                }
                store_values((char*)out + (r * K + g * group + k) * size, out_bf16, values, n);
            }
        }
}
