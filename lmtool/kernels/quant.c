/* lmtool's weight-only int8 and int4 decode kernels: y[M, N] = x[M, K] . W[N, K]^T for M <= 16
 * activation rows, W stored as compressed-tensors stores it and read where it lies (memory-mapped,
 * never copied), except int4 on x86 with bfloat16 activations: its rows are interleaved by blocks
 * of 8 at load (lm_int4_interleave, a copy that replaces the mapped pages; see "int4 rows
 * interleaved by 8" below).
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
 * float32 for the float32 tiles, or, for the integer tiles (AVX-512 and AVX2, bfloat16
 * activations), rounded per block: to int16 for int8 weights (at most 2^-15 of the block's largest
 * element), to int8 for int4 weights (llama.cpp's Q8_0 rounding, which its Q4_0 dot products use).
 * That is the one rounding besides the output's: every other product is exact and sums are
 * float32 (int32 within a block); the output is rounded once to the activation dtype.
 * Output rows are shared among torch's OpenMP threads in blocks of 4 (TILE_ROWS); within a block
 * the activation rows are taken 8, 4, 2 or 1 at a time against 1, 2 or 4 weight rows (tiles whose
 * accumulators stay in registers), so the weights are read from memory once whatever M is.
 *
 * Per instruction set: AVX-512 multiplies int8 weights by int16 activations (vpdpwssd) and int4
 * nibbles by int8 activations (vpdpbusd); with float32 activations it widens the int8 codes to
 * float32 for FMAs and looks int4 nibbles up in a table of the group's dequantized floats
 * (vpermps). AVX2 does the same integer products with vpmaddwd and vpmaddubsw, and converts int4
 * to float32 for FMAs with float32 activations. At one activation row both read the weight rows
 * one after another. NEON and portable builds use plain C the compiler vectorizes.
 * Tiles that multiply the stored nibbles u rather than the dequantized weights (the integer ones,
 * AVX2's float32 one) scale each group's (or lane's) sums once; the driver then takes away the
 * zero point's share, sum_g scale_g (8 + zero_point_g) sum_(k in g) x_k.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if (defined(__AVX512F__) && defined(__AVX512BF16__)) || defined(__AVX2__)
#include <immintrin.h>
#endif

enum { TILE_ROWS = 4 };
/* Chains of sums a tile keeps per (activation row, weight row), over alternate steps: each step adds
   into its sum, so one chain is bound by that instruction's latency, not its rate, where a tile has
   fewer than four sums to interleave (the 1 x 1 tile of one activation row). */
#define SUM_CHAINS(MB, NB) ((MB) * (NB) < 4 ? 2 : 1)
/* Activation elements per int16 block (I16_TILES): 4 steps of 32. Each int32 lane then sums at most
   8 products of |code| <= 127 and |x| <= 2^15, far from overflowing. */
enum { I16_BLOCK = 128 };
/* Activation elements per int8 block (I8_TILES, INT8_X8): llama.cpp's Q8_0 blocks. */
enum { I8_BLOCK = 32 };
/* How far ahead of its loads a tile prefetches its weight stream, in bytes (a thread's rows are one
   contiguous stream), and into L2 (T1). Without it a single core streamed int8 codes at ~10 GB/s
   where bf16 reached 20-24 (Zen 4): the hardware prefetcher alone keeps too few lines in flight
   for the shorter rows. One block ahead (4 rows) was ~15, 8 KB ~19-23, 4 KB (a 4K alias of the
   load) ~10, 16-64 KB ~17. Into L1 (T0) the int4 tiles streamed 1.4x slower than into L2, at one
   core as at two (alternating in one process): L1's few miss buffers held the stream back. */
#define PREFETCH_AHEAD 8192
/* The interleaved tiles (int4_x8_tile, int8_x8_tile) prefetch their stream non-temporally (NTA).
   How a CPU keeps such lines out of its caches is its own (AMD's guides: into L1, never evicted into
   L2, so never into the L3 that L2's victims fill); what it does here is keep the weight stream
   from flushing the L3 that holds what runs between the step's calls (the interpreter, the other
   kernels, the activations). Gemma-2B int4's 72 projections called as a decode step calls them,
   Python between the calls: 1.019-1.027x where memory answered at 55 GB/s or more, 1.00x where
   slower; its int8 head called back to back 0.996-0.999x (capped to AVX2, Zen 5, alternating in
   one process). The row tiles keep T1: AVX-512's int8 rows (Gemma's head) ran 0.92-0.98x with NTA. */
#define STREAM_PREFETCH(p) __builtin_prefetch((p), 0, 0)
/* The group of the weight at byte b of a row of nibbles, 2b / group, as a multiply and a shift by a
   reciprocal computed once per tile: no division, and no chain from one step to the next (exact
   while b < 2^32 / group). */
static inline uint64_t group_reciprocal(int64_t group) { return ((2ull << 32) + (uint64_t)group - 1) / (uint64_t)group; }
static inline int64_t group_of(int64_t b, uint64_t recip) { return (int64_t)(((uint64_t)b * recip) >> 32); }
/* Where a tile of nb weight rows (ldw bytes apart) prefetches row j's stream at byte b: as far
   ahead of its loads as PREFETCH_AHEAD bytes of the whole tile's stream, that is PREFETCH_AHEAD / nb
   along each row, and past a row's end at the same place in the same row of the next tile (the
   rows nb further on: a thread's tiles follow one another). A plain 8 KB on is the same for one row
   or rows of at most 2 KB, but four rows of 8 KB (Gemma's down projection in int4) then prefetched
   each other's current lines, and their nibbles streamed 1.2-1.3x slower than short rows' (AVX2,
   two threads, from memory; 1.21-1.30x faster with this). */
typedef struct { int64_t rest, skip, wrap; } ahead_t;
static inline ahead_t weights_ahead(int64_t ldw, int64_t nb) {
    if (nb == 1) return (ahead_t){PREFETCH_AHEAD, 0, 0}; /* the same addresses, without dividing by ldw */
    const int64_t distance = PREFETCH_AHEAD / nb;
    return (ahead_t){distance % ldw, distance / ldw * nb * ldw, (nb - 1) * ldw};
}
static inline void prefetch_row(const void* row, int64_t b, int64_t ldw, ahead_t ahead) {
    const int64_t at = b + ahead.rest;
    __builtin_prefetch((const char*)row + at + ahead.skip + (at >= ldw ? ahead.wrap : 0), 0, 2); /* into L2 */
}

static inline float bf16_value(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t bf16_rounded(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* Bytes of a row of int4 nibbles that come 4 at a time every `stride` bytes: 4 for a row as stored
   (contiguous), 4 * ROW_BLOCK for a row of interleaved blocks (lm_int4_interleave). */
#define ROW_BYTE(p, j, stride) ((p)[(j) / 4 * (stride) + (j) % 4])
#if defined(__AVX2__)
static inline __m128i row_bytes8(const uint8_t* p, int64_t stride) {
    if (stride == 4) return _mm_loadl_epi64((const __m128i*)p);
    int32_t a, b;
    memcpy(&a, p, 4), memcpy(&b, p + stride, 4);
    return _mm_setr_epi32(a, b, 0, 0);
}
#endif

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
 * its weight rows ahead into L2 (prefetch_row). */

/* Loops over a tile's rows, unrolled before GCC decides where the accumulators live (left to its
   later unrolling, it keeps the 8 x 1 tiles' accumulators in memory and stores them every step). */
#define UNROLLED _Pragma("GCC unroll 16")
/* The int4 integer tiles are inlined into the driver's block loop: no call per weight row, and
   their setup (the group reciprocal's division among it) free to move out of the rows. Gemma-2B
   int4's decode kernels were 1.06x faster capped to AVX2 (two runs of 21 rounds alternating in one
   process, 20 and 17 faster; Zen 5), where the int8 head, whose code did not change, ran 1.08-1.19x
   faster too (the code's layout moved), and 1.015x on AVX-512 (noise). */
#define INLINED_TILE inline __attribute__((always_inline))

#if defined(__AVX512F__) && defined(__AVX512BF16__)

#define INT8_TILE(MB, NB)                                                                                      \
static void int8_tile_##MB##_##NB(const float* xs, int64_t ldxs, int64_t K, const int8_t* w, float* out)       \
{                                                                                                              \
    const ahead_t ahead = weights_ahead(K, NB);                                                                \
    __m512 acc[MB][NB];                                                                                        \
    UNROLLED for (int i = 0; i < MB; i++) for (int j = 0; j < NB; j++) acc[i][j] = _mm512_setzero_ps();        \
    /* One path through the loop (the masked tail after it): a branch inside keeps GCC from                    \
       holding the accumulators in registers. */                                                               \
    int64_t k = 0;                                                                                             \
    for (; k + 16 <= K; k += 16) {                                                                             \
        __m512 wv[NB];                                                                                         \
        UNROLLED for (int j = 0; j < NB; j++) {                                                                \
            prefetch_row(w + j * K, k, K, ahead);                                                               \
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
    const ahead_t ahead = weights_ahead(K / 2, NB);                                                            \
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
                prefetch_row(w + j * ldw, b, ldw, ahead);                                                       \
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
/* One activation row: int8 weight rows one at a time (1 x 1 tiles), each thread reading one
   sequential stream, as lm_linear's bfloat16 rows do: Gemma-sized int8 rows 24.8 -> 34.9 GB/s at 2
   threads (Zen 4), though the 1 x 4 tiles compute faster from cache. The int4 integer tiles, closer
   to their arithmetic bound and prefetching into L2, keep 1 x 4 tiles (see lm_int4_linear). */
#define INT8_ROW_BY_ROW 1
/* 32 weights of NB rows at k (masked by MASK) times MB activation rows, into the sums PART. */
#define INT8_I16_STEP(MB, NB, PART, K0, MASK)                                                                  \
    {                                                                                                          \
        const int64_t at = (K0);                                                                               \
        const __mmask32 mask = (__mmask32)(MASK);                                                              \
        __m512i wv[NB];                                                                                        \
        UNROLLED for (int j = 0; j < NB; j++) {                                                                \
            prefetch_row(w + j * K, at, K, ahead);                                                             \
            wv[j] = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, w + j * K + at));                       \
        }                                                                                                      \
        UNROLLED for (int i = 0; i < MB; i++) {                                                                \
            const __m512i xv = _mm512_loadu_si512(xs + i * ldxs + at);                                         \
            UNROLLED for (int j = 0; j < NB; j++) PART[i][j] = _mm512_dpwssd_epi32(PART[i][j], xv, wv[j]);     \
        }                                                                                                      \
    }
#define INT8_I16_TILE(MB, NB)                                                                                  \
static void int8_tile_i16_##MB##_##NB(const int16_t* xs, int64_t ldxs, const float* xscale, int64_t ldscale,    \
    int64_t K, const int8_t* w, float* out)                                                                    \
{                                                                                                              \
    const ahead_t ahead = weights_ahead(K, NB);                                                                \
    /* SUM_CHAINS of vpdpwssd; the int32 sums are exact, so the chains add up to the same total */     \
    enum { CHAINS = SUM_CHAINS(MB, NB) };                                                                      \
    __m512 total[MB][NB];                                                                                      \
    UNROLLED for (int i = 0; i < MB; i++) UNROLLED for (int j = 0; j < NB; j++) total[i][j] = _mm512_setzero_ps(); \
    for (int64_t b = 0; b * I16_BLOCK < K; b++) {                                                              \
        __m512i part[CHAINS][MB][NB];                                                                          \
        UNROLLED for (int c = 0; c < CHAINS; c++)                                                              \
            UNROLLED for (int i = 0; i < MB; i++) UNROLLED for (int j = 0; j < NB; j++) part[c][i][j] = _mm512_setzero_si512(); \
        const int64_t end = (b + 1) * I16_BLOCK < K ? (b + 1) * I16_BLOCK : K;                                 \
        int64_t k = b * I16_BLOCK;                                                                             \
        for (; k + 32 * CHAINS <= end; k += 32 * CHAINS)                                                       \
            UNROLLED for (int c = 0; c < CHAINS; c++) INT8_I16_STEP(MB, NB, part[c], k + 32 * c, 0xffffffffu)   \
        for (; k < end; k += 32) /* the block's last steps, masked */                                          \
            INT8_I16_STEP(MB, NB, part[0], k, end - k < 32 ? (1u << (end - k)) - 1u : 0xffffffffu)             \
        UNROLLED for (int i = 0; i < MB; i++) {                                                                \
            const __m512 scale = _mm512_set1_ps(xscale[i * ldscale + b]);                                      \
            UNROLLED for (int j = 0; j < NB; j++) {                                                            \
                __m512i sums = part[0][i][j];                                                                  \
                UNROLLED for (int c = 1; c < CHAINS; c++) sums = _mm512_add_epi32(sums, part[c][i][j]);        \
                total[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, total[i][j]);                  \
            }                                                                                                  \
        }                                                                                                      \
    }                                                                                                          \
    UNROLLED for (int i = 0; i < MB; i++) UNROLLED for (int j = 0; j < NB; j++) out[i * TILE_ROWS + j] = _mm512_reduce_add_ps(total[i][j]); \
}

/* bfloat16 activations with int4 weights as integers, as llama.cpp's Q4_0 dot products do: the
   activations rounded to int8 per block of 32 (I8_BLOCK, scale max|x| / 127, llama.cpp's Q8_0),
   split into even and odd elements as the nibbles are, and vpdpbusd (AVX512-VNNI) multiplies the
   stored nibbles u (unsigned, 0..15) by them 64 pairs at a time into 16 int32 lanes, exactly. One
   64-byte load is 128 weights: its low nibbles (one AND) meet the even activations, its high ones
   (a shift and an AND) the odd ones, and lane l sums weights 8l..8l+7 of the step, so each lane
   lies in one group and one activation block: its sum is scaled once by their two scales (a
   vector of the step's group scales times one of its activation-block scales). No widening and
   no float arithmetic per weight: 5 integer operations per 128 weights, then a conversion, a
   multiply and an FMA per step, where the bfloat16 tile it replaced needed 16 operations and a
   group's bookkeeping (in-cache, one core: 25 -> 32 G weights/s). The driver takes away the zero
   point's share,
   sum_g scale_g (8 + zero_point_g) sum_(k in g) xq_k, over the rounded activations. */
#define I8_TILES 1
#define INT4_I8_STEP(MB, NB, BYTES)                                                                            \
    __m512i even[MB], odd[MB]; __m512 xsc[MB];                                                                 \
    UNROLLED for (int i = 0; i < MB; i++) {                                                                    \
        even[i] = _mm512_loadu_si512(xs + i * ldxs + b); odd[i] = _mm512_loadu_si512(xs + i * ldxs + half + b); \
        xsc[i] = _mm512_loadu_ps(xscale + i * ldscale + b / 4);                                                \
    }                                                                                                          \
    UNROLLED for (int j = 0; j < NB; j++) {                                                                    \
        prefetch_row(w + j * ldw, b, ldw, ahead);                                                              \
        __m512i bytes = BYTES;                                                                                 \
        __asm__("" : "+v"(bytes));                                                                             \
        const __m512i lo = _mm512_and_si512(bytes, low4), hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low4); \
        const __m512 ws = _mm512_permutexvar_ps(lane_group, _mm512_castps128_ps512(_mm_loadu_ps(s + j * groups + g0))); \
        UNROLLED for (int i = 0; i < MB; i++) {                                                                \
            const __m512i sums = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, even[i]), hi, odd[i]); \
            total[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(ws, xsc[i]), total[i][j]);   \
        }                                                                                                      \
    }
#define INT4_I8_TILE(MB, NB)                                                                                   \
static INLINED_TILE void int4_tile_i8_##MB##_##NB(const int8_t* xs, int64_t ldxs, int64_t half,             \
    const float* xscale, int64_t ldscale, int64_t K, const uint8_t* w, int64_t group, const float* s,          \
    int64_t groups, float* out)                                                                                \
{                                                                                                              \
    const ahead_t ahead = weights_ahead(K / 2, NB);                                                            \
    const __m512i low4 = _mm512_set1_epi8(0x0f);                                                               \
    /* lane l's group within the step (weights 8l..8l+7; I8_GROUP: 32, 64 or a multiple of 128) */            \
    const __m512i lane_group = group >= 128 ? _mm512_setzero_si512()                                           \
        : _mm512_srli_epi32(_mm512_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120), \
                            group == 32 ? 5 : 6);                                                              \
    const int64_t ldw = K / 2;                                                                                 \
    const uint64_t recip = group_reciprocal(group);                                                            \
    __m512 total[MB][NB];                                                                                      \
    UNROLLED for (int i = 0; i < MB; i++) UNROLLED for (int j = 0; j < NB; j++) total[i][j] = _mm512_setzero_ps(); \
    int64_t b = 0;                                                                                             \
    for (; b + 64 <= ldw; b += 64) {                                                                           \
        const int64_t g0 = group_of(b, recip);                                                                \
        INT4_I8_STEP(MB, NB, _mm512_loadu_si512(w + j * ldw + b))                                              \
    }                                                                                                          \
    if (b < ldw) { /* the last 16, 32 or 48 bytes */                                                           \
        const int64_t g0 = group_of(b, recip);                                                                \
        const __mmask64 mask = ((__mmask64)1 << (ldw - b)) - 1;                                                \
        INT4_I8_STEP(MB, NB, _mm512_maskz_loadu_epi8(mask, w + j * ldw + b))                                   \
    }                                                                                                          \
    UNROLLED for (int i = 0; i < MB; i++) for (int j = 0; j < NB; j++) out[i * TILE_ROWS + j] = _mm512_reduce_add_ps(total[i][j]); \
}

/* Prefill's dequantized tiles in bfloat16, 16 or 32 weights an instruction where the plain loops
   below managed about 13 (int8) and 6 (int4) G weights/s on two cores: the same float32 values,
   (code - zero point) * scale, rounded once to nearest even (vcvtneps2bf16). Whole vectors are
   stored unmasked, the mask kept for a row's or group's tail: a tile is 8 MB, past L2, and a
   masked store that misses the cache is slow on AMD (Gemma-2B's 2048 x 2048 tiles on Zen 5, two
   threads: 7.2 -> 32.8 G weights/s int8, 12.7 -> 33.2 int4). */
#define BF16_DEQUANT 1
/* 16 int8 codes times the scale, in float32. */
static inline __m512 scaled_codes(__m128i codes, __m512 scale) { return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes)), scale); }
static void int8_row_to_bf16(const int8_t* codes, float scale, int64_t K, uint16_t* out) {
    const __m512 s = _mm512_set1_ps(scale);
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        const __m256i c = _mm256_loadu_si256((const __m256i*)(codes + k));
        const __m512 lo = scaled_codes(_mm256_castsi256_si128(c), s), hi = scaled_codes(_mm256_extracti128_si256(c, 1), s);
        _mm512_storeu_si512(out + k, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
    for (; k < K; k += 16) {
        const __mmask16 mask = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
        _mm256_mask_storeu_epi16(out + k, mask, (__m256i)_mm512_cvtneps_pbh(scaled_codes(_mm_maskz_loadu_epi8(mask, codes + k), s)));
    }
}
/* One group of `group` weights (even) from its bytes: the group's 16 possible values as bfloat16 in
   a table, then per 16 bytes one vpermw whose 32-bit lanes index the low nibble in their low half
   and the high nibble in their high half: the two weights of a byte land side by side, in order. */
static inline __m512i looked_up_pairs(__m128i bytes, __m512i table) {
    const __m512i v = _mm512_cvtepu8_epi32(bytes);
    const __m512i index = _mm512_or_si512(_mm512_and_si512(v, _mm512_set1_epi32(15)), _mm512_slli_epi32(_mm512_srli_epi32(v, 4), 16));
    return _mm512_permutexvar_epi16(index, table);
}
/* A group's 16 dequantized values (u - z) * s in bfloat16, the table looked_up_pairs reads. */
static inline __m512i group_table(float s, float z) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(z)), _mm512_set1_ps(s))));
}
/* A group of a row as stored (contiguous bytes); interleaved rows go through int4_block_group_to_bf16. */
static void int4_group_to_bf16(const uint8_t* bytes, float s, float z, int64_t group, uint16_t* out) {
    const __m512i table = group_table(s, z);
    int64_t b = 0;
    for (; b + 16 <= group / 2; b += 16)
        _mm512_storeu_si512(out + 2 * b, looked_up_pairs(_mm_loadu_si128((const __m128i*)(bytes + b)), table));
    if (b < group / 2) {
        const __mmask16 mask = (__mmask16)((1u << (group / 2 - b)) - 1);
        _mm512_mask_storeu_epi32(out + 2 * b, mask, looked_up_pairs(_mm_maskz_loadu_epi8(mask, bytes + b), table));
    }
}
/* One interleaved block's 8 rows, group g, in bfloat16 (rows ld_out apart): four chunks (32 weights
   of each row) in two loads, each row's 16 bytes gathered from them by one permute, where reading a
   row at a time took four loads and three inserts per 16 bytes (AVX-512 int4 prefill 0.88x
   bfloat16 that way). */
static void int4_block_group_to_bf16(const uint8_t* block, const float* s, const float* z, int64_t g, int64_t group,
                                     uint16_t* out, int64_t ld_out) {
    __m512i table[8];
    for (int r = 0; r < 8; r++) table[r] = group_table(s[r], z[r]);
    for (int64_t c = g * group / 8; c < (g + 1) * group / 8; c += 4) {
        const __m512i first = _mm512_loadu_si512(block + c * 32), second = _mm512_loadu_si512(block + c * 32 + 64);
        for (int r = 0; r < 8; r++) {
            const __m512i row = _mm512_permutex2var_epi32(first, _mm512_setr_epi32(r, 8 + r, 16 + r, 24 + r, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), second);
            _mm512_storeu_si512(out + r * ld_out + c * 8, looked_up_pairs(_mm512_castsi512_si128(row), table[r]));
        }
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
    const ahead_t ahead = weights_ahead(K, NB);                                                                \
    __m256 acc[MB][NB];                                                                                        \
    UNROLLED for (int i = 0; i < MB; i++) for (int j = 0; j < NB; j++) acc[i][j] = _mm256_setzero_ps();        \
    for (int64_t k = 0; k < K; k += 8) { /* load8's branch is taken only at the tail: kept out of line */      \
        __m256 wv[NB];                                                                                         \
        UNROLLED for (int j = 0; j < NB; j++) {                                                                \
            prefetch_row(w + j * K, k, K, ahead);                                                              \
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
   integer operations per activation row where the float32 tile needs two steps of three. Four
   steps (a cache line of each weight row) per iteration with one prefetch, over SUM_CHAINS chains
   of sums, and the block's last steps (a tail's masked load among them) after it. A step at a time,
   with a prefetch and the tail's test in each, the loop ran 51-53 G weights/s in cache on two Zen 5
   cores, below the 61 GB/s bfloat16 streamed from memory when the host's memory answered fast
   (Gemma-2B int8 then decoded at 76 % of bfloat16's bytes per second); this way 67-79 G/s. */
#define I16_TILES 1
#define INT8_ROW_BY_ROW 1
#define I16_NARROW 1 /* partial sums and totals: see BLOCK */
#define INT8_I16_STEP(MB, NB, PART, K0, LOAD)                                                                  \
    {                                                                                                          \
        const int64_t at = (K0);                                                                               \
        __m256i wv[NB];                                                                                        \
        UNROLLED for (int j = 0; j < NB; j++) wv[j] = _mm256_cvtepi8_epi16(LOAD);                             \
        UNROLLED for (int i = 0; i < MB; i++) {                                                                \
            const __m256i xv = _mm256_loadu_si256((const __m256i*)(xs + i * ldxs + at));                       \
            UNROLLED for (int j = 0; j < NB; j++) PART[i][j] = _mm256_add_epi32(PART[i][j], _mm256_madd_epi16(xv, wv[j])); \
        }                                                                                                      \
    }
#define INT8_I16_TILE(MB, NB)                                                                                  \
static void int8_tile_i16_##MB##_##NB(const int16_t* xs, int64_t ldxs, const float* xscale, int64_t ldscale,    \
    int64_t K, const int8_t* w, float* out)                                                                    \
{                                                                                                              \
    const ahead_t ahead = weights_ahead(K, NB);                                                                \
    enum { CHAINS = SUM_CHAINS(MB, NB) };                                                                      \
    __m256 total[MB][NB];                                                                                      \
    UNROLLED for (int i = 0; i < MB; i++) UNROLLED for (int j = 0; j < NB; j++) total[i][j] = _mm256_setzero_ps(); \
    for (int64_t b = 0; b * I16_BLOCK < K; b++) {                                                              \
        __m256i part[CHAINS][MB][NB];                                                                          \
        UNROLLED for (int c = 0; c < CHAINS; c++)                                                              \
            UNROLLED for (int i = 0; i < MB; i++) UNROLLED for (int j = 0; j < NB; j++) part[c][i][j] = _mm256_setzero_si256(); \
        const int64_t end = (b + 1) * I16_BLOCK < K ? (b + 1) * I16_BLOCK : K;                                 \
        int64_t k = b * I16_BLOCK;                                                                             \
        for (; k + 64 <= end; k += 64) {                                                                       \
            UNROLLED for (int j = 0; j < NB; j++) prefetch_row(w + j * K, k, K, ahead);                        \
            UNROLLED for (int s = 0; s < 4; s++)                                                               \
                INT8_I16_STEP(MB, NB, part[s % CHAINS], k + 16 * s, _mm_loadu_si128((const __m128i*)(w + j * K + at))) \
        }                                                                                                      \
        for (; k < end; k += 16) INT8_I16_STEP(MB, NB, part[0], k, load16(w + j * K + at, end - at))           \
        UNROLLED for (int i = 0; i < MB; i++) {                                                                \
            const __m256 scale = _mm256_set1_ps(xscale[i * ldscale + b]);                                      \
            UNROLLED for (int j = 0; j < NB; j++) {                                                            \
                __m256i sums = part[0][i][j];                                                                  \
                UNROLLED for (int c = 1; c < CHAINS; c++) sums = _mm256_add_epi32(sums, part[c][i][j]);        \
                total[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, total[i][j]);                  \
            }                                                                                                  \
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
    const ahead_t ahead = weights_ahead(K / 2, NB);                                                            \
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
                prefetch_row(w + j * ldw, b, ldw, ahead);                                                      \
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

/* bfloat16 activations with int4 weights as integers, as AVX-512's INT4_I8_TILE (see there), 64
   weights a step: vpmaddubsw multiplies the nibbles by the int8 activations into int16 pairs (at
   most 2 x 15 x 127 each, never saturating), the even and odd halves are added, and vpmaddwd by
   ones sums them into 8 int32 lanes of 8 weights each. 11 operations per 64 weights where the
   float32 tile needs 28. */
#define I8_TILES 1
#define INT4_I8_STEP(MB, NB, BYTES, B, C)                                                                      \
    UNROLLED for (int j = 0; j < NB; j++) {                                                                    \
        prefetch_row(w + j * ldw, B, ldw, ahead);                                                              \
        __m256i bytes = BYTES;                                                                                 \
        __asm__("" : "+x"(bytes));                                                                             \
        const __m256i lo = _mm256_and_si256(bytes, low4), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4); \
        const __m256 ws = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(s + j * groups + group_of(B, recip))), lane_group); \
        UNROLLED for (int i = 0; i < MB; i++) {                                                                \
            const __m256i even = _mm256_loadu_si256((const __m256i*)(xs + i * ldxs + (B)));                    \
            const __m256i odd = _mm256_loadu_si256((const __m256i*)(xs + i * ldxs + half + (B)));              \
            const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, even), _mm256_maddubs_epi16(hi, odd)); \
            const __m256 scale = _mm256_mul_ps(ws, _mm256_loadu_ps(xscale + i * ldscale + (B) / 4));          \
            total[C][i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones)), scale, total[C][i][j]); \
        }                                                                                                      \
    }
#define INT4_I8_TILE(MB, NB)                                                                                   \
static INLINED_TILE void int4_tile_i8_##MB##_##NB(const int8_t* xs, int64_t ldxs, int64_t half,             \
    const float* xscale, int64_t ldscale, int64_t K, const uint8_t* w, int64_t group, const float* s,          \
    int64_t groups, float* out)                                                                                \
{                                                                                                              \
    const ahead_t ahead = weights_ahead(K / 2, NB);                                                            \
    const __m256i low4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);                                  \
    /* lane l's group within the step (weights 8l..8l+7): groups of 32 are two a step */                       \
    const __m256i lane_group = group == 32 ? _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1) : _mm256_setzero_si256(); \
    const int64_t ldw = K / 2;                                                                                 \
    const uint64_t recip = group_reciprocal(group);                                                            \
    enum { CHAINS = SUM_CHAINS(MB, NB) }; /* of FMAs */                                                        \
    __m256 total[CHAINS][MB][NB];                                                                              \
    UNROLLED for (int c = 0; c < CHAINS; c++)                                                                  \
        UNROLLED for (int i = 0; i < MB; i++) UNROLLED for (int j = 0; j < NB; j++) total[c][i][j] = _mm256_setzero_ps(); \
    int64_t b = 0;                                                                                             \
    for (; b + 32 * CHAINS <= ldw; b += 32 * CHAINS)                                                           \
        UNROLLED for (int c = 0; c < CHAINS; c++)                                                              \
            INT4_I8_STEP(MB, NB, _mm256_loadu_si256((const __m256i*)(w + j * ldw + b + 32 * c)), b + 32 * c, c) \
    for (; b + 32 <= ldw; b += 32) {                                                                           \
        INT4_I8_STEP(MB, NB, _mm256_loadu_si256((const __m256i*)(w + j * ldw + b)), b, 0)                      \
    }                                                                                                          \
    if (b < ldw) { /* the last 16 bytes */                                                                     \
        INT4_I8_STEP(MB, NB, _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i*)(w + j * ldw + b))), b, 0) \
    }                                                                                                          \
    UNROLLED for (int i = 0; i < MB; i++) UNROLLED for (int j = 0; j < NB; j++) {                              \
        UNROLLED for (int c = 1; c < CHAINS; c++) total[0][i][j] = _mm256_add_ps(total[0][i][j], total[c][i][j]); \
        out[i * TILE_ROWS + j] = reduce8(total[0][i][j]);                                                      \
    }                                                                                                          \
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

/* Prefill's float32 int4 tiles (float32 models, and bfloat16 ones on CPUs that multiply bfloat16
   by emulation): 16 weights per 8 bytes, each byte's two nibbles side by side after an unpack, the
   same float32 (u - 8 - zero point) * scale as the plain loop, which ran at 1.4 G weights/s on two
   cores, a tenth of Gemma-2B's capped-to-AVX2 prefill. */
#if defined(__AVX2__)
#define F32_DEQUANT 1
static void int4_group_to_f32(const uint8_t* bytes, int64_t stride, float s, float z, int64_t group, float* out) {
    const __m256 scale = _mm256_set1_ps(s), zero = _mm256_set1_ps(z);
    const __m256i low4 = _mm256_set1_epi32(15);
    int64_t b = 0;
    for (; b + 8 <= group / 2; b += 8) {
        const __m256i v = _mm256_cvtepu8_epi32(row_bytes8(bytes + b / 4 * stride, stride));
        const __m256 lo = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, low4)), zero), scale);
        const __m256 hi = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), zero), scale);
        /* per 128-bit half: [lo0 hi0 lo1 hi1 | lo4 hi4 lo5 hi5] and [lo2 hi2 lo3 hi3 | lo6 hi6 lo7 hi7] */
        const __m256 first = _mm256_unpacklo_ps(lo, hi), second = _mm256_unpackhi_ps(lo, hi);
        _mm256_storeu_ps(out + 2 * b, _mm256_permute2f128_ps(first, second, 0x20));
        _mm256_storeu_ps(out + 2 * b + 8, _mm256_permute2f128_ps(first, second, 0x31));
    }
    for (; b < group / 2; b++) {
        out[2 * b] = ((float)(ROW_BYTE(bytes, b, stride) & 15) - z) * s;
        out[2 * b + 1] = ((float)(ROW_BYTE(bytes, b, stride) >> 4) - z) * s;
    }
}
#endif

/* ---- int4 rows interleaved by 8, for the integer tiles of x86 ----------------------------------
 * Read row by row, int4's decode was bound by its arithmetic, not by memory, wherever AVX2 did it:
 * the int32 sums of each 8 weights need their own scale (a group's times an activation block's),
 * a conversion and an FMA every 64 weights, and each row re-reads the activations and their
 * scales. Gemma-2B int4 streamed 71 % of bfloat16's bytes per second capped to AVX2, 46 GB/s
 * where bfloat16 reached 61-66 (Zen 5, two threads, one process).
 * So at load (lmtool.quantize.linear.prepare), where this build's kernel multiplies in integers,
 * the weight's rows are interleaved by blocks of ROW_BLOCK = 8 (lm_int4_interleave): chunk c of a
 * block is 4 bytes (8 weights, 8c..8c+7) of each of its 8 rows, 32 bytes, one vector whose lane r
 * is row r. The block's scales are interleaved the same way, [groups][8], and so are its zero
 * points, as 8 + zero point in a nibble each (PACKED_ZEROS): half the bytes of int8 ones, 1 % of
 * an int4 g64 weight's. Rows past the last whole block stay as they were. One 32-byte load then
 * feeds 8 rows with the same 8 activations (a 4-byte broadcast of the even ones, one of the odd),
 * the sums of an activation block of 32 stay integers (4 chunks), and they are scaled once per
 * block for all 8 rows by one vector of the rows' group scales; the zero points' share is one
 * vector per group.
 * Per 64 weights: 7 integer operations (AVX2: and, shift, and, two vpmaddubsw, two 16-bit adds:
 * each 16-bit lane sums at most 8 products of 15 x 127, 30480) or 5 (AVX-512 VNNI's vpdpbusd
 * into 32-bit lanes), and a quarter of a conversion and FMA, where a row took 11. Against the row
 * tiles (Zen 5, two threads, alternating in one process): in cache 1.35-1.50x capped to AVX2 and
 * 1.21x on AVX-512; Gemma-2B int4's decode kernels from memory 1.03-1.25x, the more the faster the
 * host's memory answered (1.49x at four activation rows); its whole decode steps 1.12x capped to
 * AVX2 and 1.10x on AVX-512. */
#if I8_TILES && defined(__AVX2__)
#define ROW_BLOCK 8
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define X8_PRODUCTS(SUMS, LO, HI, EVEN, ODD) SUMS = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(SUMS, LO, EVEN), HI, ODD)
#define X8_INT32(SUMS) (SUMS)
#else
#define X8_PRODUCTS(SUMS, LO, HI, EVEN, ODD) \
    SUMS = _mm256_add_epi16(SUMS, _mm256_add_epi16(_mm256_maddubs_epi16(LO, EVEN), _mm256_maddubs_epi16(HI, ODD)))
#define X8_INT32(SUMS) _mm256_madd_epi16(SUMS, _mm256_set1_epi16(1))
#endif
/* the 8 rows' scales of group g, as float32 */
static inline __m256 block_scales(const void* s, int scale_bf16, int64_t g) {
    if (scale_bf16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)((const uint16_t*)s + g * 8))), 16));
    return _mm256_loadu_ps((const float*)s + g * 8);
}
/* the 8 rows' 8 + zero point of group g, as float32, from the block's packed zero points */
static inline __m256 block_zeros(const uint8_t* z, int64_t g) {
    uint32_t word;
    memcpy(&word, z + g * 4, 4);
    const __m256i nibbles = _mm256_srlv_epi32(_mm256_set1_epi32((int)word), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
    return _mm256_cvtepi32_ps(_mm256_and_si256(nibbles, _mm256_set1_epi32(15)));
}
/* out[i * 8 + r] = x row i . weight row r of one interleaved block, for MB activation rows: xs as
   quantize_activations_i8 leaves them (xscale: its lane scales, xsum: its group sums). */
#define X8_TILE(MB)                                                                                            \
static INLINED_TILE void int4_x8_tile_##MB(const int8_t* xs, int64_t ldxs, int64_t half, const float* xscale,    \
    int64_t ldscale, const float* xsum, int64_t K, const uint8_t* w, const void* s, int scale_bf16,             \
    const uint8_t* z, int64_t group, float* out)                                                               \
{                                                                                                              \
    const __m256i low4 = _mm256_set1_epi8(0x0f);                                                               \
    const int64_t groups = K / group, blocks_per_group = group / 32;                                           \
    __m256 total[MB];                                                                                          \
    UNROLLED for (int i = 0; i < MB; i++) total[i] = _mm256_setzero_ps();                                      \
    const uint8_t* chunk = w;                                                                                  \
    for (int64_t g = 0; g < groups; g++) {                                                                     \
        const __m256 scale = block_scales(s, scale_bf16, g);                                                   \
        { /* the zero points' share, s (8 + zero point) xsum, with the group's scale: in a loop of its   \
             own after the groups' (reading the block's zero points at its end) int4 ran 0.90-0.97x in  \
             cache and Gemma-2B's down projections 0.94x from memory (AVX2 and AVX-512, Zen 5) */      \
            const __m256 shift = _mm256_mul_ps(scale, z ? block_zeros(z, g) : _mm256_set1_ps(8.0f));           \
            UNROLLED for (int i = 0; i < MB; i++) total[i] = _mm256_fnmadd_ps(shift, _mm256_broadcast_ss(xsum + i * groups + g), total[i]); \
        }                                                                                                      \
        for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; b++) {                          \
            __m256i sums[MB];                                                                                  \
            UNROLLED for (int i = 0; i < MB; i++) sums[i] = _mm256_setzero_si256();                            \
            UNROLLED for (int c = 0; c < 4; c++, chunk += 32) {                                                \
                if (c % 2 == 0) STREAM_PREFETCH(chunk + PREFETCH_AHEAD); /* a line: two chunks */             \
                const __m256i bytes = _mm256_loadu_si256((const __m256i*)chunk);                               \
                const __m256i lo = _mm256_and_si256(bytes, low4), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4); \
                UNROLLED for (int i = 0; i < MB; i++) {                                                        \
                    int32_t even, odd; /* the chunk's 4 even and 4 odd activations */                          \
                    memcpy(&even, xs + i * ldxs + (b * 4 + c) * 4, 4);                                         \
                    memcpy(&odd, xs + i * ldxs + half + (b * 4 + c) * 4, 4);                                   \
                    X8_PRODUCTS(sums[i], lo, hi, _mm256_set1_epi32(even), _mm256_set1_epi32(odd));             \
                }                                                                                              \
            }                                                                                                  \
            UNROLLED for (int i = 0; i < MB; i++)                                                              \
                total[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(X8_INT32(sums[i])),                              \
                                           _mm256_mul_ps(scale, _mm256_broadcast_ss(xscale + i * ldscale + b * 4)), total[i]); \
        }                                                                                                      \
    }                                                                                                          \
    UNROLLED for (int i = 0; i < MB; i++) _mm256_storeu_ps(out + i * ROW_BLOCK, total[i]);                     \
}
X8_TILE(1)
X8_TILE(2)
X8_TILE(4)

/* int8 rows interleaved by 8 likewise (lm_int8_interleave): chunk c of a block is 4 bytes (4
   weights, 4c..4c+3) of each of its 8 rows, 32 bytes. Read row by row with int16 activations, the
   AVX2 int8 tile took about 6 cycles per 64 weights on one Zen 5 thread in L2: 3 operations per 16
   weights (widen, vpmaddwd, add) and as much again in each row's per-block scaling and final
   horizontal sum; Gemma-2B int8 then streamed 87 % of bfloat16's bytes per second where memory
   answered fast. Here the activations are rounded to int8 per block of 32 (llama.cpp's Q8_0, as
   for int4) and a chunk's 32 products are vpmaddubsw's, unsigned times signed, by the sign trick
   (llama.cpp's Q8_0 on AVX2): |x| times w with x's sign; 4 operations per 32 weights (vpsignb,
   vpmaddubsw, vpmaddwd, add; |x| is rounded with x), and a block's 8 rows scaled at once: about
   3.4 cycles per 64 weights in a microbenchmark; 1.29-1.38x the row tiles in cache on two threads,
   and Gemma-2B int8's whole decode steps 1.02-1.19x where bfloat16 streamed 58-62 GB/s (1.00x where
   memory is the bound; with the copy in 2 MB pages: in 4 KB pages 0.91-0.95x, lmtool.quantize.
   linear._in_huge_pages). vpsignb cannot negate -128: lm_int8_interleave counts such codes
   (lmtool's quantizer writes none) and the rows of a weight holding one stay as stored. A pair of
   products is at most 2 x 127 x 127 in 16 bits, and an int32 lane sums 32 products of a block.
   AVX2 only: AVX-512 multiplies int8 weights by int16 activations in 512 bits (vpdpwssd) as fast as
   its memory streams them. */
#if !defined(__AVX512F__)
#define INT8_X8 1
#define X8_I8_PRODUCTS(SUMS, CODES, X, SIZE) \
    SUMS = _mm256_add_epi32(SUMS, _mm256_madd_epi16(_mm256_maddubs_epi16(SIZE, _mm256_sign_epi8(CODES, X)), _mm256_set1_epi16(1)))
/* chunk k / 4 of the block's 32-byte chunks times the MB rows' 4 activations at k (FETCH: a line
   ahead, every other chunk) */
#define X8_I8_CHUNK(MB, k, FETCH)                                                                              \
    {                                                                                                          \
        const int8_t* chunk = w + (k) * ROW_BLOCK;                                                             \
        if (FETCH) STREAM_PREFETCH(chunk + PREFETCH_AHEAD);                                                    \
        const __m256i codes = _mm256_loadu_si256((const __m256i*)chunk);                                       \
        UNROLLED for (int i = 0; i < MB; i++) {                                                                \
            int32_t four, size; /* the chunk's 4 activations and their magnitudes */                          \
            memcpy(&four, xs + i * ldxs + (k), 4);                                                             \
            memcpy(&size, xabs + i * ldxs + (k), 4);                                                           \
            X8_I8_PRODUCTS(sums[i], codes, _mm256_set1_epi32(four), _mm256_set1_epi32(size));                 \
        }                                                                                                      \
    }
/* out[i * 8 + r] = x row i . weight row r of one interleaved block (before the rows' scales), for
   MB activation rows: xs and their magnitudes xabs in natural order, xscale their lane scales
   (quantize_activations_i8 with natural order). K % 4 == 0. */
#define X8_I8_TILE(MB)                                                                                         \
static INLINED_TILE void int8_x8_tile_##MB(const int8_t* xs, const int8_t* xabs, int64_t ldxs, const float* xscale, \
                                           int64_t ldscale, int64_t K, const int8_t* w, float* out)            \
{                                                                                                              \
    __m256 total[MB];                                                                                          \
    UNROLLED for (int i = 0; i < MB; i++) total[i] = _mm256_setzero_ps();                                      \
    for (int64_t b = 0; b * I8_BLOCK < K; b++) {                                                               \
        const int64_t begin = b * I8_BLOCK, end = begin + I8_BLOCK < K ? begin + I8_BLOCK : K;                 \
        __m256i sums[MB];                                                                                      \
        UNROLLED for (int i = 0; i < MB; i++) sums[i] = _mm256_setzero_si256();                                \
        if (end - begin == I8_BLOCK) { /* a whole block: its 8 chunks unrolled */                              \
            UNROLLED for (int c = 0; c < I8_BLOCK / 4; c++) X8_I8_CHUNK(MB, begin + 4 * c, c % 2 == 0)          \
        } else {                                                                                               \
            for (int64_t k = begin; k < end; k += 4) X8_I8_CHUNK(MB, k, k % 8 == 0)                            \
        }                                                                                                      \
        UNROLLED for (int i = 0; i < MB; i++)                                                                  \
            total[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[i]), _mm256_broadcast_ss(xscale + i * ldscale + b * 4), total[i]); \
    }                                                                                                          \
    UNROLLED for (int i = 0; i < MB; i++) _mm256_storeu_ps(out + i * ROW_BLOCK, total[i]);                     \
}
X8_I8_TILE(1)
X8_I8_TILE(2)
X8_I8_TILE(4)
#endif
#else
#define ROW_BLOCK 1 /* the plain C builds read the rows as stored */
#endif

/* Zero points of interleaved rows (lm_int4_interleave): per block of ROW_BLOCK rows and group, the
   rows' 8 + zero point in a nibble each, row r in nibble r (the low one first) of the group's
   ZERO_BYTES: [blocks][groups][ZERO_BYTES], PACKED_ZEROS(interleaved, groups) bytes for the
   interleaved rows. The rows after them follow as stored, one int8 per group (stored_zeros).
   Every int4 zero point fits a nibble (-8..7: lmtool's own and compressed-tensors'), and
   lmtool.quantize.linear interleaves no weight with one that does not. */
enum { ZERO_BYTES = (ROW_BLOCK + 1) / 2 };
#define PACKED_ZEROS(rows, groups) ((rows) / ROW_BLOCK * (groups) * ZERO_BYTES)
static inline float packed_zero(const uint8_t* block_zeros, int64_t g, int r) {
    return (float)(block_zeros[g * ZERO_BYTES + r / 2] >> (r % 2 * 4) & 15);
}
static inline const int8_t* stored_zeros(const int8_t* zero_point, int64_t interleaved, int64_t groups) {
    return zero_point ? zero_point + PACKED_ZEROS(interleaved, groups) : NULL;
}

/* ---- the drivers, shared by every instruction set ---------------------------------------------- */

#ifndef I8_TILES
#define I8_TILES 0 /* no int8-activation tiles: int4 weights take the float32 tiles */
#endif
#ifndef INT8_ROW_BY_ROW
#define INT8_ROW_BY_ROW 0 /* one activation row: 1 x 4 tiles */
#endif
#ifndef INT4_NARROW
#define INT4_NARROW 0
#endif
#ifndef I16_NARROW
#define I16_NARROW 0
#endif
#ifndef INT8_X8
#define INT8_X8 0 /* int8 rows as stored, always */
#endif
#ifndef I16_TILES
#define I16_TILES 0 /* no int16 tiles: int8 weights take the float32 or bfloat16 tiles */
#endif
#ifndef BF16_DEQUANT
#define BF16_DEQUANT 0 /* the plain loops of lm_int8_dequantize / lm_int4_dequantize */
#endif
#ifndef F32_DEQUANT
#define F32_DEQUANT 0
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
#if I8_TILES
TILE_SHAPES(INT4_I8_TILE)
#endif
#if I16_TILES
TILE_SHAPES(INT8_I16_TILE)
#endif

/* One block of nb <= TILE_ROWS weight rows against all M activation rows: CALL(MB, NB, j, m) runs
   the tile of activation rows [m, m + MB) and weight rows [j, j + NB) of the block. BY_ROW: one
   activation row goes through the weight rows one at a time (INT8_ROW_BY_ROW, the int8-activation tiles).
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

/* The activations as the float32 tiles read them: M rows of ldxs float32 elements; for int4 (split)
   each row's even elements, then at `half` its odd ones; zero padded to a multiple of 32 elements.
   xsum (with `sums`): each row's sum over each group ([M, groups]), for the zero-point correction
   of tiles that sum the stored codes. */
typedef struct { void* rows; int64_t ldxs, half; float* xsum; } activations_t;

static int widen_activations(int bf16, const void* x, int64_t ldx, int64_t M, int64_t K, int split,
                             int64_t group, int with_sums, activations_t* a) {
    const int64_t used = split ? K / 2 : K, width = (used + 31) / 32 * 32, groups = K / group;
    a->half = width;
    a->ldxs = split ? 2 * width : width;
    const size_t row_bytes = (size_t)(M * a->ldxs) * sizeof(float) + SCRATCH_TAIL * sizeof(float);
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
            ((float*)a->rows)[at] = bf16 ? bf16_value(((const uint16_t*)row)[k]) : ((const float*)row)[k];
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

/* n <= size bfloat16 activations widened into v[size] (zeros after them), returning the largest
   magnitude among them, found on the bits: non-negative floats order as their bit patterns, and an
   infinity or NaN lies above every finite one (*finite says which). Loops without branches or libm
   calls, which the compiler vectorizes. Shared by the int16 and int8 roundings below. */
static inline float widen_block(const uint16_t* h, int64_t n, int size, float* v, int* finite) {
    uint32_t bits[I16_BLOCK], top = 0; /* size <= I16_BLOCK */
    for (int64_t k = 0; k < n; k++) bits[k] = (uint32_t)h[k] << 16;
    for (int64_t k = n; k < size; k++) bits[k] = 0;
    for (int k = 0; k < size; k++) {
        const uint32_t magnitude = bits[k] & 0x7fffffffu;
        top = magnitude > top ? magnitude : top;
    }
    memcpy(v, bits, (size_t)size * sizeof(float));
    float largest;
    memcpy(&largest, &top, 4);
    *finite = top < 0x7f800000u;
    return largest;
}

/* The bfloat16 activations as int16 for the int16 tiles: x[m, k] ~ q[m, k] * scale[m, k / I16_BLOCK],
   each block's scale the power of two 2^(e - 15) with 2^e just above the block's largest |x|, q
   rounded to nearest (an exact multiple where x has no bits below the scale: every bfloat16 within
   2^8 of the block's largest). Rows of ldxs (K padded to 32) int16, then the scales [M, blocks]. */
typedef struct { int16_t* rows; int64_t ldxs; float* scale; int64_t blocks; } int16_activations_t;

static int quantize_activations(const uint16_t* x, int64_t ldx, int64_t M, int64_t K, int16_activations_t* a) {
    a->ldxs = (K + 31) / 32 * 32;
    a->blocks = (K + I16_BLOCK - 1) / I16_BLOCK;
    const size_t row_bytes = ((size_t)(M * a->ldxs) * sizeof(int16_t) + 63) / 64 * 64;
    float* buffer = scratch_floats(row_bytes / 4 + (size_t)(M * a->blocks));
    if (!buffer) return -1;
    a->rows = (int16_t*)buffer;
    a->scale = buffer + row_bytes / 4;
    memset(a->rows, 0, row_bytes);
    for (int64_t m = 0; m < M; m++) {
        for (int64_t b = 0; b < a->blocks; b++) {
            const int64_t begin = b * I16_BLOCK, n = begin + I16_BLOCK < K ? I16_BLOCK : K - begin;
            float v[I16_BLOCK];
            int finite, e = 0;
            const float largest = widen_block(x + m * ldx + begin, n, I16_BLOCK, v, &finite);
            if (finite && largest > 0.0f) frexpf(largest, &e); /* largest < 2^e */
            const float up = ldexpf(1.0f, 15 - e);
            /* an infinite or NaN activation makes its block's sums NaN, as a float product would */
            a->scale[m * a->blocks + b] = finite ? ldexpf(1.0f, e - 15) : NAN;
            int16_t* q = a->rows + m * a->ldxs + begin;
            for (int64_t k = 0; k < n; k++) {
                /* to nearest even by the 1.5 * 2^23 trick (|v up| < 2^15) */
                float r = (v[k] * up + 12582912.0f) - 12582912.0f;
                r = r > 32767.0f ? 32767.0f : r < -32767.0f ? -32767.0f : r;
                q[k] = (int16_t)(finite ? r : 0.0f); /* no conversion of a NaN (the scale is NaN) */
            }
        }
    }
    return 0;
}

/* The activations as int8 for the int4 integer tiles (I8_TILES), as llama.cpp's Q8_0 rounds them:
   per block of I8_BLOCK elements d = max|x| / 127 and q = x / d rounded to nearest even (x times
   1 / d, in float32). Each row: the even elements' q (`half` bytes, a multiple of 64, zero
   padded), then the odd ones'; each lane's scale (a lane: 8 consecutive elements, 4 bytes of each
   half; ldscale a row) and each group's sum of d q, for the zero points. An infinite or NaN
   activation makes its block's scales NaN, and so its output rows, as a float product would.
   Where asked (the interleaved int8 tile), also each row in natural order and its magnitudes |q|. */
typedef struct {
    int8_t *rows, *natural, *magnitude;
    int64_t ldxs, half;
    float* lane_scale;
    int64_t ldscale;
    float* xsum;
} int8_activations_t;

/* Groups the int8-activation tiles take: a lane of 8 weights in one group, and a step's groups
   found without a division (32 and 64: 4 and 2 in a 128-weight step; a multiple of 128: one). */
static int i8_group(int64_t group) { return group == 32 || group == 64 || (group > 0 && group % 128 == 0); }

/* Whether lm_int4_linear rounds these activations to int8 (for the tests' reference). */
int lm_int4_int8_activations(int bf16, int64_t group) { return I8_TILES && bf16 && i8_group(group); }

/* The rows lm_int4_linear wants interleaved together (lm_int4_interleave) for these activations:
   ROW_BLOCK where it multiplies them in integers on x86, else 1 (the rows as stored). */
int lm_int4_row_block(int bf16, int64_t group) { return lm_int4_int8_activations(bf16, group) ? ROW_BLOCK : 1; }

#if defined(__AVX2__)
/* One full block of 32 bfloat16 activations rounded to int8 as above, in registers: each 32-bit pair of
   bfloat16s is already an even element (its low half, shifted up) and an odd one (its high half,
   masked), so the halves need no shuffle until the packed bytes' one permute. The same values as
   plain_block_i8 (vcvtps2dq rounds the same float32 product to nearest even), about 3x faster: a
   call's cost grew ~1.1 ns an element with the plain loop, ~0.37 with this, ~1 ms of Gemma-2B's
   int4 step in one thread before (AVX2, Zen 5). Returns the block's sum of q, or INT32_MIN without
   writing anything when an element is infinite or NaN (plain_block_i8 handles those). */
static inline int32_t vector_block_i8(const uint16_t* x, int8_t* even, int8_t* odd, float* d_out) {
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u), magnitude = _mm256_set1_epi32(0x7fffffff);
    const __m256i a = _mm256_loadu_si256((const __m256i*)x), b = _mm256_loadu_si256((const __m256i*)(x + 16));
    const __m256i v[4] = {_mm256_slli_epi32(a, 16), _mm256_slli_epi32(b, 16), _mm256_and_si256(a, high), _mm256_and_si256(b, high)};
    __m256i top = _mm256_max_epu32(_mm256_max_epu32(_mm256_and_si256(v[0], magnitude), _mm256_and_si256(v[1], magnitude)),
                                   _mm256_max_epu32(_mm256_and_si256(v[2], magnitude), _mm256_and_si256(v[3], magnitude)));
    __m128i top4 = _mm_max_epu32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));
    top4 = _mm_max_epu32(top4, _mm_shuffle_epi32(top4, 0x4e));
    top4 = _mm_max_epu32(top4, _mm_shuffle_epi32(top4, 0xb1));
    const uint32_t top_bits = (uint32_t)_mm_cvtsi128_si32(top4);
    if (top_bits >= 0x7f800000u) return INT32_MIN;
    float largest;
    memcpy(&largest, &top_bits, 4);
    const float d = largest / 127.0f;
    const __m256 inverse = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
    __m256i q[4];
    for (int i = 0; i < 4; i++) {
        q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_castsi256_ps(v[i]), inverse));
        q[i] = _mm256_max_epi32(_mm256_min_epi32(q[i], _mm256_set1_epi32(127)), _mm256_set1_epi32(-127));
    }
    __m256i sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i sum4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    sum4 = _mm_add_epi32(sum4, _mm_shuffle_epi32(sum4, 0x4e));
    sum4 = _mm_add_epi32(sum4, _mm_shuffle_epi32(sum4, 0xb1));
    /* bytes per 128-bit lane: even 0-3, 8-11, odd 0-3, 8-11 | even 4-7, 12-15, odd 4-7, 12-15 */
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    const __m256i ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm_storeu_si128((__m128i*)even, _mm256_castsi256_si128(ordered));
    _mm_storeu_si128((__m128i*)odd, _mm256_extracti128_si256(ordered, 1));
    *d_out = d;
    return _mm_cvtsi128_si32(sum4);
}
#endif

/* Any block of n <= 32 activations rounded so, in plain C: their even and odd elements' q (the
   block's 16 of each, zeros past n), d through d_out (NaN, and every q 0, when an element is
   infinite or NaN), and the sum of q. */
static int32_t plain_block_i8(const uint16_t* x, int64_t n, int8_t* even, int8_t* odd, float* d_out) {
    float v[I8_BLOCK], r[I8_BLOCK];
    int finite;
    const float largest = widen_block(x, n, I8_BLOCK, v, &finite);
    const float d = largest / 127.0f, inverse = d > 0.0f && finite ? 1.0f / d : 0.0f;
    for (int k = 0; k < I8_BLOCK; k++) {
        /* to nearest even by the 1.5 * 2^23 trick (|x / d| <= 127 and a bit) */
        const float rounded = (v[k] * inverse + 12582912.0f) - 12582912.0f;
        r[k] = !finite ? 0.0f : rounded > 127.0f ? 127.0f : rounded < -127.0f ? -127.0f : rounded;
    }
    int32_t total = 0;
    for (int k = 0; k < I8_BLOCK / 2; k++) {
        const int8_t qe = (int8_t)(int)r[2 * k], qo = (int8_t)(int)r[2 * k + 1];
        even[k] = qe;
        odd[k] = qo;
        total += qe + qo;
    }
    *d_out = finite ? d : NAN;
    return total;
}

/* n even and n odd int8 activations (n a multiple of 16) back in their order, and their magnitudes */
static void natural_order_i8(const int8_t* even, const int8_t* odd, int64_t n, int8_t* natural, int8_t* magnitude) {
#if defined(__AVX2__)
    for (int64_t k = 0; k < n; k += 16) {
        const __m128i e = _mm_loadu_si128((const __m128i*)(even + k)), o = _mm_loadu_si128((const __m128i*)(odd + k));
        const __m128i low = _mm_unpacklo_epi8(e, o), high = _mm_unpackhi_epi8(e, o);
        _mm_storeu_si128((__m128i*)(natural + 2 * k), low);
        _mm_storeu_si128((__m128i*)(natural + 2 * k + 16), high);
        _mm_storeu_si128((__m128i*)(magnitude + 2 * k), _mm_abs_epi8(low));
        _mm_storeu_si128((__m128i*)(magnitude + 2 * k + 16), _mm_abs_epi8(high));
    }
#else
    for (int64_t k = 0; k < n; k++) {
        natural[2 * k] = even[k];
        natural[2 * k + 1] = odd[k];
        magnitude[2 * k] = (int8_t)abs(even[k]);
        magnitude[2 * k + 1] = (int8_t)abs(odd[k]);
    }
#endif
}

static int quantize_activations_i8(const uint16_t* x, int64_t ldx, int64_t M, int64_t K, int64_t group, int natural,
                                   int8_activations_t* a) {
    const int64_t half = (K / 2 + 63) / 64 * 64, groups = K / group, blocks = (K + I8_BLOCK - 1) / I8_BLOCK;
    a->half = half;
    a->ldxs = 2 * half;
    a->ldscale = half / 4;
    const size_t row_floats = (size_t)(M * a->ldxs) / 4 * (natural ? 3 : 1) + SCRATCH_TAIL;
    float* buffer = scratch_floats(row_floats + (size_t)(M * (a->ldscale + groups)));
    if (!buffer) return -1;
    memset(buffer, 0, (row_floats + (size_t)(M * (a->ldscale + groups))) * sizeof(float));
    a->rows = (int8_t*)buffer;
    a->natural = natural ? a->rows + M * a->ldxs : NULL;
    a->magnitude = natural ? a->natural + M * a->ldxs : NULL;
    a->lane_scale = buffer + row_floats;
    a->xsum = a->lane_scale + M * a->ldscale;
    for (int64_t m = 0; m < M; m++) {
        const uint16_t* row = x + m * ldx;
        int8_t *even = a->rows + m * a->ldxs, *odd = even + half;
        for (int64_t c = 0; c < blocks; c++) {
            const int64_t begin = c * I8_BLOCK, n = begin + I8_BLOCK < K ? I8_BLOCK : K - begin;
            float d;
            int32_t total = INT32_MIN;
#if defined(__AVX2__)
            if (n == I8_BLOCK) total = vector_block_i8(row + begin, even + begin / 2, odd + begin / 2, &d);
#endif
            if (total == INT32_MIN) total = plain_block_i8(row + begin, n, even + begin / 2, odd + begin / 2, &d);
            for (int l = 0; l < I8_BLOCK / 8; l++) a->lane_scale[m * a->ldscale + begin / 8 + l] = d;
            a->xsum[m * groups + begin / group] += d * (float)total; /* NaN with d */
        }
        if (natural) natural_order_i8(even, odd, half, a->natural + m * a->ldxs, a->magnitude + m * a->ldxs);
    }
    return 0;
}

/* sum_i a[i] b[i] in independent lanes, which the compiler vectorizes (a plain float sum it may not
   reorder: this runs groups x M x N times a call), the lanes then added as a tree, not in one
   chain of dependent additions. */
static float dot_lanes(const float* a, const float* b, int64_t n) {
    float l[8] = {0}, total = 0.0f;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) l[k] += a[i + k] * b[i + k];
    for (; i < n; i++) total += a[i] * b[i];
    return total + (((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7])));
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

/* The rows lm_int8_linear wants interleaved together (lm_int8_interleave) for these activations:
   ROW_BLOCK where it multiplies bfloat16 ones in int8 on AVX2 and K is whole chunks, else 1. */
int lm_int8_row_block(int bf16, int64_t K) { return INT8_X8 && bf16 && K % 4 == 0 ? ROW_BLOCK : 1; }

#if INT8_X8
/* x row . one weight row as int8_x8_tile sums it (the same int32 block sums and float32 FMAs, so the
   same value): the rows after the last whole block. */
static float int8_row_i8(const int8_t* xs, const float* xscale, int64_t K, const int8_t* w) {
    float total = 0.0f;
    for (int64_t b = 0; b * I8_BLOCK < K; b++) {
        const int64_t begin = b * I8_BLOCK, end = begin + I8_BLOCK < K ? begin + I8_BLOCK : K;
        int32_t sum = 0;
        for (int64_t k = begin; k < end; k++) sum += (int32_t)xs[k] * w[k];
        total = fmaf((float)sum, xscale[b * 4], total);
    }
    return total;
}

/* lm_int8_linear over rows interleaved by ROW_BLOCK up to `interleaved` (the rows after them as
   stored), bfloat16 activations rounded to int8 for all of them. */
static int int8_linear_x8(const uint16_t* x, int64_t ldx, int64_t M, int64_t K, const int8_t* codes, const float* scale,
                          int64_t N, int64_t interleaved, uint16_t* y, int64_t ldy) {
    int8_activations_t q = {0};
    if (quantize_activations_i8(x, ldx, M, K, K, 1, &q)) return -1;
    #pragma omp parallel for schedule(guided) /* as interleaved_blocks' (lm_int4_linear) */
    for (int64_t block = 0; block < (N + ROW_BLOCK - 1) / ROW_BLOCK; block++) {
        const int64_t n0 = block * ROW_BLOCK;
        if (n0 >= interleaved) {
            for (int64_t n = n0; n < N && n < n0 + ROW_BLOCK; n++)
                for (int64_t i = 0; i < M; i++)
                    y[i * ldy + n] = bf16_rounded(int8_row_i8(q.natural + i * q.ldxs, q.lane_scale + i * q.ldscale, K, codes + n * K) * scale[n]);
            continue;
        }
        float out[16 * ROW_BLOCK];
#define X8_I8_CALL(MB, m) int8_x8_tile_##MB(q.natural + (m) * q.ldxs, q.magnitude + (m) * q.ldxs, q.ldxs, \
                                            q.lane_scale + (m) * q.ldscale, q.ldscale, K, codes + n0 * K, out + (m) * ROW_BLOCK)
        int64_t m = 0;
        for (; M - m >= 4; m += 4) X8_I8_CALL(4, m);
        for (; M - m >= 2; m += 2) X8_I8_CALL(2, m);
        for (; m < M; m++) X8_I8_CALL(1, m);
        for (int64_t i = 0; i < M; i++)
            for (int r = 0; r < ROW_BLOCK; r++) y[i * ldy + n0 + r] = bf16_rounded(out[i * ROW_BLOCK + r] * scale[n0 + r]);
    }
    return 0;
}
#endif

/* Whether lm_int8_linear rounds these activations to int8 for weights with `interleaved` rows (for
   the tests' reference): where it reads interleaved rows at all. */
int lm_int8_int8_activations(int bf16, int64_t K, int64_t interleaved) {
    return interleaved > 0 && lm_int8_row_block(bf16, K) == ROW_BLOCK;
}

/* y[M, N] (row stride ldy) = x[M, K] (bf16 != 0: bfloat16, else float32; row stride ldx) times the
   int8 weight codes [N, K] with one float32 scale per row. The first `interleaved` rows (a multiple
   of ROW_BLOCK, 0 for none) are interleaved as lm_int8_interleave leaves them: only where
   lm_int8_row_block says so. Returns 0, -1 when memory could not be allocated, -2 for interleaved
   rows this build or these activations do not take. */
int lm_int8_linear(int bf16, const void* x, int64_t ldx, int64_t M, int64_t K, const int8_t* codes,
                   const float* scale, int64_t N, void* y, int64_t ldy, int64_t interleaved) {
    if (interleaved && (lm_int8_row_block(bf16, K) == 1 || interleaved % ROW_BLOCK || interleaved > N)) return -2;
#if INT8_X8
    if (interleaved) return int8_linear_x8(x, ldx, M, K, codes, scale, N, interleaved, y, ldy);
#endif
    const int as_i16 = I16_TILES && bf16;
    activations_t a = {0};
    int16_activations_t q = {0};
    if (as_i16 ? quantize_activations(x, ldx, M, K, &q) : widen_activations(bf16, x, ldx, M, K, 0, K, 0, &a))
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

#if ROW_BLOCK > 1
/* lm_int4_linear's interleaved blocks of rows, shared among the threads of its parallel region (an
   orphaned `omp for`, without the barrier: the rows after them follow). A function of its own:
   inlined into lm_int4_linear with the rows' tiles, it slowed those to 0.72x (AVX2, Zen 5). */
__attribute__((noinline)) static void interleaved_blocks(const int8_activations_t* q, int64_t M, int64_t K, const uint8_t* nibbles,
    const void* scale, int scale_bf16, const int8_t* zero_point, int64_t group, int64_t interleaved, void* y, int64_t ldy) {
    const int64_t groups = K / group;
    /* guided, as lm_linear's bfloat16 rows (common.h): each thread starts on one large contiguous
       share and the last blocks go to whichever thread is free first. With static shares, one
       thread waited 1-7 us for the other at the end of each call (rdtsc per thread, Gemma-2B int4
       shapes: 7 for gate/up, 5 for down), 72 calls a step. Whole Gemma-2B int4 steps ran 1.024x
       faster in the median of 150 alternating rounds (1.026x in their fastest third; runs of 60
       and 80 rounds gave 1.027x and 0.99x; capped to AVX2, Zen 5). */
    #pragma omp for schedule(guided) nowait
    for (int64_t block = 0; block < interleaved / ROW_BLOCK; block++) {
        const int64_t n0 = block * ROW_BLOCK;
        const uint8_t* w = nibbles + n0 * (K / 2);
        const void* s = (const char*)scale + n0 * groups * (scale_bf16 ? 2 : 4);
        const uint8_t* z = zero_point ? (const uint8_t*)zero_point + PACKED_ZEROS(n0, groups) : NULL;
        float out[16 * ROW_BLOCK];
#define X8_CALL(MB, m) int4_x8_tile_##MB(q->rows + (m) * q->ldxs, q->ldxs, q->half, q->lane_scale + (m) * q->ldscale, q->ldscale, \
                                         q->xsum + (m) * groups, K, w, s, scale_bf16, z, group, out + (m) * ROW_BLOCK)
        int64_t m = 0;
        for (; M - m >= 4; m += 4) X8_CALL(4, m);
        for (; M - m >= 2; m += 2) X8_CALL(2, m);
        for (; m < M; m++) X8_CALL(1, m);
        for (int64_t i = 0; i < M; i++)
            for (int r = 0; r < ROW_BLOCK; r++) ((uint16_t*)y)[i * ldy + n0 + r] = bf16_rounded(out[i * ROW_BLOCK + r]);
    }
}
#endif

/* y[M, N] = x[M, K] times the int4 weight: nibbles [N, K/2]; scale [N, K/group] (scale_bf16:
   bfloat16, else float32; row stride ld_scale); zero_point int8 [N, K/group] contiguous, or NULL
   (symmetric). group even, dividing K. The first `interleaved` rows (a multiple of ROW_BLOCK, 0 for
   none) are interleaved as lm_int4_interleave leaves them, nibbles, scales (then contiguous) and
   zero points alike: only where lm_int4_row_block says so. Returns 0, -1 when memory could not be
   allocated, -2 for interleaved rows this build or these activations do not take. */
int lm_int4_linear(int bf16, const void* x, int64_t ldx, int64_t M, int64_t K, const uint8_t* nibbles,
                   const void* scale, int scale_bf16, int64_t ld_scale, const int8_t* zero_point, int64_t group,
                   int64_t N, void* y, int64_t ldy, int64_t interleaved) {
    const int as_i8 = lm_int4_int8_activations(bf16, group), sums_codes = as_i8 || INT4_SUMS_CODES;
    const int64_t groups = K / group, PREFETCH_ROWS = PREFETCH_AHEAD / (K / 2) + TILE_ROWS;
    if (interleaved && (lm_int4_row_block(bf16, group) == 1 || interleaved % ROW_BLOCK || interleaved > N || ld_scale != groups))
        return -2;
    activations_t a = {0};
    int8_activations_t q = {0};
    if (as_i8 ? quantize_activations_i8(x, ldx, M, K, group, 0, &q) : widen_activations(bf16, x, ldx, M, K, 1, group, sums_codes, &a))
        return -1;
    const float* xsum = as_i8 ? q.xsum : a.xsum;
    const int8_t* tail_zeros = stored_zeros(zero_point, interleaved, groups); /* of the rows after the interleaved ones */
    int failed = 0;
    #pragma omp parallel
    {
#if ROW_BLOCK > 1
        interleaved_blocks(&q, M, K, nibbles, scale, scale_bf16, zero_point, group, interleaved, y, ldy);
#endif
        /* Each block's scales, 8 + zero points and their products as float32, TILE_ROWS rows of
           groups; zeroed, for the int8 tiles' reads of up to 3 scales past a row's last group
           (always multiplied by zero sums there). */
        float* sz = N > interleaved ? calloc((size_t)(3 * TILE_ROWS * groups + 4), sizeof(float)) : NULL;
        if (N > interleaved && !sz) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static) /* the rows as stored (all, or those after the interleaved blocks) */
        for (int64_t t = 0; t < (N - interleaved + TILE_ROWS - 1) / TILE_ROWS; t++) {
            if (!sz) continue;
            const int64_t n0 = interleaved + t * TILE_ROWS, nb = N - n0 < TILE_ROWS ? N - n0 : TILE_ROWS;
            float *s = sz, *z = sz + TILE_ROWS * groups, *shift = sz + 2 * TILE_ROWS * groups;
            /* the scales and zero points of the rows whose nibbles the tiles prefetch now (without:
               0.955-0.975x, each matrix with scales of its own, alternating) */
            if (n0 + PREFETCH_ROWS + TILE_ROWS <= N) {
                for (int64_t b = 0; b < TILE_ROWS * groups * (scale_bf16 ? 2 : 4); b += 64)
                    __builtin_prefetch((const char*)scale + (n0 + PREFETCH_ROWS) * ld_scale * (scale_bf16 ? 2 : 4) + b);
                for (int64_t b = 0; tail_zeros && b < TILE_ROWS * groups; b += 64)
                    __builtin_prefetch(tail_zeros + (n0 - interleaved + PREFETCH_ROWS) * groups + b);
            }
            /* one pass per row, which the compiler vectorizes (and unswitches): as many operations a
               group as the integer tiles spend on it; separate passes over s and z paid a store
               forwarding stall per vector reload */
            for (int64_t j = 0; j < nb; j++) {
                const int64_t row = n0 + j;
                for (int64_t g = 0; g < groups; g++) {
                    const float sg = scale_bf16 ? bf16_value(((const uint16_t*)scale)[row * ld_scale + g])
                                                : ((const float*)scale)[row * ld_scale + g];
                    const float zg = 8.0f + (tail_zeros ? (float)tail_zeros[(row - interleaved) * groups + g] : 0.0f);
                    s[j * groups + g] = sg;
                    z[j * groups + g] = zg;
                    shift[j * groups + g] = sg * zg;
                }
            }
            const uint8_t* w = nibbles + n0 * (K / 2);
            float out[16 * TILE_ROWS];
            if (!as_i8) {
                const float* xs = a.rows;
                const int64_t ldxs = a.ldxs, half = a.half;
#define INT4_CALL(MB, NB, j, m)                                                                        \
    int4_tile_##MB##_##NB(xs + (m) * ldxs, ldxs, half, K, w + (j) * (K / 2), group, s + (j) * groups, z + (j) * groups, \
                          groups, out + (m) * TILE_ROWS + (j))
                BLOCK(M, nb, INT4_CALL, 0, INT4_NARROW)
            }
#if I8_TILES
            else {
                const int8_t* xs = q.rows;
#define INT4_I8_CALL(MB, NB, j, m)                                                                     \
    int4_tile_i8_##MB##_##NB(xs + (m) * q.ldxs, q.ldxs, q.half, q.lane_scale + (m) * q.ldscale, q.ldscale, K, \
                             w + (j) * (K / 2), group, s + (j) * groups, groups, out + (m) * TILE_ROWS + (j))
                /* at one activation row the weight rows one at a time, a thread's rows one
                   sequential stream: every decode kernel of Gemma-2B int4 (its int8 head too),
                   from memory, 1.10x faster on AVX-512 and on AVX2 than through 1 x 4 tiles (61
                   rounds alternating in one process, 56-60 of them faster; Zen 5), though 0.88x
                   and 0.93x in cache, where four independent rows had run 1.06-1.2x faster */
                BLOCK(M, nb, INT4_I8_CALL, 1, 0)
            }
#endif
            if (sums_codes) /* the tiles summed s x u, and w = (u - z) s: take away sum_g s z xsum */
                for (int64_t m = 0; m < M; m++)
                    for (int64_t j = 0; j < nb; j++)
                        out[m * TILE_ROWS + j] -= dot_lanes(shift + j * groups, xsum + m * groups, groups);
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

/* Row r of an int8 weight whose first rows are interleaved by ROW_BLOCK (from codes, its first
   row; r < interleaved), put back in order into row (K bytes). */
static void int8_interleaved_row(const int8_t* codes, int64_t K, int64_t r, int8_t* row) {
    const int8_t* block = codes + r / ROW_BLOCK * ROW_BLOCK * K + r % ROW_BLOCK * 4;
    for (int64_t c = 0; c < K / 4; c++) memcpy(row + 4 * c, block + c * 4 * ROW_BLOCK, 4);
}

/* out[rows, K] = rows [0, rows) of the int8 codes [., K] (the first `interleaved` of them
   interleaved, as lm_int8_linear reads them) times their float32 row scales, rounded once to the
   output dtype. */
void lm_int8_dequantize(const int8_t* codes, const float* scale, int64_t K, int64_t rows, int out_bf16, void* out,
                        int64_t interleaved) {
    const size_t size = out_bf16 ? 2 : 4;
    #pragma omp parallel
    {
        int8_t gathered[interleaved ? K : 1]; /* an interleaved row, in order (K bytes: a few KB) */
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const int8_t* row = codes + r * K;
            if (r < interleaved) {
                int8_interleaved_row(codes, K, r, gathered);
                row = gathered;
            }
#if BF16_DEQUANT
            if (out_bf16) {
                int8_row_to_bf16(row, scale[r], K, (uint16_t*)out + r * K);
                continue;
            }
#endif
            for (int64_t k = 0; k < K; k += DEQUANT_CHUNK) {
                const int64_t n = K - k < DEQUANT_CHUNK ? K - k : DEQUANT_CHUNK;
                float values[DEQUANT_CHUNK];
                for (int64_t i = 0; i < n; i++) values[i] = (float)row[k + i] * scale[r];
                store_values((char*)out + (r * K + k) * size, out_bf16, values, n);
            }
        }
    }
}

/* The first `rows` rows (a multiple of ROW_BLOCK) of int8 codes [.., K] (K % 4 == 0) interleaved by
   blocks of ROW_BLOCK into out, as lm_int8_linear reads them: chunk c of a block holds 4 bytes of
   each of its rows. Returns how many of the codes are -128, which the AVX2 tile cannot negate
   (the caller then keeps the rows as stored). */
int64_t lm_int8_interleave(const int8_t* codes, int64_t K, int64_t rows, int8_t* out) {
    int64_t unnegatable = 0;
    #pragma omp parallel for schedule(static) reduction(+ : unnegatable)
    for (int64_t block = 0; block < rows / ROW_BLOCK; block++) {
        int8_t* to = out + block * ROW_BLOCK * K;
        for (int64_t c = 0; c < K / 4; c++)
            for (int r = 0; r < ROW_BLOCK; r++) memcpy(to + c * 4 * ROW_BLOCK + r * 4, codes + (block * ROW_BLOCK + r) * K + c * 4, 4);
        for (int64_t i = 0; i < ROW_BLOCK * K; i++) unnegatable += to[i] == -128;
    }
    return unnegatable;
}

/* One row of an int4 weight dequantized (a group at a time: its scale and zero point are constants
   of the inner loop). Its bytes come 4 at a time every `stride` bytes, its scales `step` elements
   apart: 4 and 1 for a row as stored, 4 * ROW_BLOCK and ROW_BLOCK for a row of an interleaved
   block (read in place: putting a block back in row order first made Gemma-2B int4's prefill 0.74x
   bfloat16, capped to AVX2). Its zero points: one int8 per group, or with packed_row >= 0 its
   block's packed ones (packed_zero), it being that row of the block. */
static void int4_row_dequantize(const uint8_t* nibbles, int64_t stride, const void* scale, int scale_bf16,
                                const int8_t* zero_point, int packed_row, int64_t step, int64_t group, int64_t K,
                                int out_bf16, void* out) {
    const size_t size = out_bf16 ? 2 : 4;
    for (int64_t g = 0; g < K / group; g++) {
        const float s = scale_bf16 ? bf16_value(((const uint16_t*)scale)[g * step]) : ((const float*)scale)[g * step];
        const float z = !zero_point ? 8.0f
                        : packed_row >= 0 ? packed_zero((const uint8_t*)zero_point, g, packed_row) : 8.0f + (float)zero_point[g];
        const uint8_t* bytes = &ROW_BYTE(nibbles, g * (group / 2), stride);
#if BF16_DEQUANT
        if (out_bf16 && stride == 4) { /* rows as stored; interleaved ones take lm_int4_dequantize's block path */
            int4_group_to_bf16(bytes, s, z, group, (uint16_t*)out + g * group);
            continue;
        }
#endif
#if F32_DEQUANT
        if (!out_bf16) {
            int4_group_to_f32(bytes, stride, s, z, group, (float*)out + g * group);
            continue;
        }
#endif
        for (int64_t k = 0; k < group; k += DEQUANT_CHUNK) {
            const int64_t n = group - k < DEQUANT_CHUNK ? group - k : DEQUANT_CHUNK; /* even */
            float values[DEQUANT_CHUNK];
            for (int64_t i = 0; i < n / 2; i++) {
                const uint8_t byte = ROW_BYTE(bytes, k / 2 + i, stride);
                values[2 * i] = ((float)(byte & 15) - z) * s;
                values[2 * i + 1] = ((float)(byte >> 4) - z) * s;
            }
            store_values((char*)out + (g * group + k) * size, out_bf16, values, n);
        }
    }
}

/* to[b][a] = from[a][b] for an [A][B] matrix of `unit`-byte units (1, 2 or 4). */
#define TRANSPOSED(T) for (int64_t a = 0; a < A; a++) for (int64_t b = 0; b < B; b++) ((T*)to)[b * A + a] = ((const T*)from)[a * B + b]
static void transpose_units(const void* from, int64_t A, int64_t B, int64_t unit, void* to) {
    if (unit == 4) TRANSPOSED(uint32_t);
    else if (unit == 2) TRANSPOSED(uint16_t);
    else TRANSPOSED(uint8_t);
}

/* out[rows, K] = rows [0, rows) of an int4 weight (lm_int4_linear's arguments, pointers at the
   first row; the first `interleaved` of them interleaved, as lm_int4_linear reads them, the scales
   then contiguous). */
void lm_int4_dequantize(const uint8_t* nibbles, const void* scale, int scale_bf16, int64_t ld_scale,
                       const int8_t* zero_point, int64_t group, int64_t K, int64_t rows, int out_bf16, void* out,
                       int64_t interleaved) {
    const int64_t groups = K / group, scale_size = scale_bf16 ? 2 : 4;
    const size_t size = out_bf16 ? 2 : 4;
    int64_t first = 0; /* the first row left to the row loop */
#if BF16_DEQUANT && ROW_BLOCK == 8
    if (out_bf16 && interleaved) { /* whole blocks (see int4_block_group_to_bf16), then the rows after them */
        first = interleaved;
        #pragma omp parallel for schedule(static)
        for (int64_t r0 = 0; r0 < interleaved; r0 += ROW_BLOCK)
            for (int64_t g = 0; g < groups; g++) {
                float s[ROW_BLOCK], z[ROW_BLOCK];
                for (int r = 0; r < ROW_BLOCK; r++) {
                    const int64_t at = r0 * groups + g * ROW_BLOCK + r;
                    s[r] = scale_bf16 ? bf16_value(((const uint16_t*)scale)[at]) : ((const float*)scale)[at];
                    z[r] = zero_point ? packed_zero((const uint8_t*)zero_point + PACKED_ZEROS(r0, groups), g, r) : 8.0f;
                }
                int4_block_group_to_bf16(nibbles + r0 * (K / 2), s, z, g, group, (uint16_t*)out + r0 * K, K);
            }
    }
#endif
    #pragma omp parallel for schedule(static)
    for (int64_t r = first; r < rows; r++) {
        const int64_t r0 = r < interleaved ? r / ROW_BLOCK * ROW_BLOCK : r, j = r - r0; /* block, row in it */
        const int64_t stride = r < interleaved ? 4 * ROW_BLOCK : 4, step = r < interleaved ? ROW_BLOCK : 1;
        const char* s = (const char*)scale + (r < interleaved ? (r0 * groups + j) * scale_size : r * ld_scale * scale_size);
        const int8_t* zeros = !zero_point ? NULL
                              : r < interleaved ? zero_point + PACKED_ZEROS(r0, groups)
                                                : stored_zeros(zero_point, interleaved, groups) + (r - interleaved) * groups;
        int4_row_dequantize(nibbles + r0 * (K / 2) + 4 * j, stride, s, scale_bf16, zeros, r < interleaved ? (int)j : -1,
                            step, group, K, out_bf16, (char*)out + r * K * size);
    }
}

/* The first `rows` rows (a multiple of ROW_BLOCK) of an int4 weight interleaved by blocks of
   ROW_BLOCK, as lm_int4_linear reads them: nibbles [rows, K/2] in units of 4 bytes and scales
   (contiguous, scale_size bytes each) [rows, groups] one by one, each block's [ROW_BLOCK][units]
   becoming [units][ROW_BLOCK]; zero points (int8 [rows, groups], or NULL) packed so (see
   packed_zero) into PACKED_ZEROS(rows, groups) bytes. */
void lm_int4_interleave(const uint8_t* nibbles, const void* scale, int64_t scale_size, const int8_t* zero_point,
                        int64_t groups, int64_t K, int64_t rows, uint8_t* to_nibbles, void* to_scale, int8_t* to_zero_point) {
    #pragma omp parallel for schedule(static)
    for (int64_t r0 = 0; r0 < rows / ROW_BLOCK * ROW_BLOCK; r0 += ROW_BLOCK) {
        transpose_units(nibbles + r0 * (K / 2), ROW_BLOCK, K / 8, 4, to_nibbles + r0 * (K / 2));
        transpose_units((const char*)scale + r0 * groups * scale_size, ROW_BLOCK, groups, scale_size, (char*)to_scale + r0 * groups * scale_size);
        if (!zero_point) continue;
        uint8_t* packed = (uint8_t*)to_zero_point + PACKED_ZEROS(r0, groups);
        memset(packed, 0, PACKED_ZEROS(ROW_BLOCK, groups));
        for (int64_t g = 0; g < groups; g++)
            for (int r = 0; r < ROW_BLOCK; r++)
                packed[g * ZERO_BYTES + r / 2] |= (uint8_t)(((zero_point[(r0 + r) * groups + g] + 8) & 15) << (r % 2 * 4));
    }
}
