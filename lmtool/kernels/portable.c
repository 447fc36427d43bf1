/* lmtool kernels in plain C, for any CPU without a hand-written set: loops of 16 independent
 * float lanes that the compiler vectorizes for whatever vector unit its default target has. */
#include "common.h"
#include "plain.h"

typedef struct { float v[LANES]; } lanes_t;

static inline lanes_t zero_lanes(void) { lanes_t r; for (int l = 0; l < LANES; l++) r.v[l] = 0.0f; return r; }
static inline lanes_t load_f32_lanes(const float* p) { lanes_t r; memcpy(r.v, p, sizeof r.v); return r; }
static inline lanes_t load_bf16_lanes(const uint16_t* p) {
    lanes_t r;
    for (int l = 0; l < LANES; l++) r.v[l] = bf16_to_f32(p[l]);
    return r;
}
static inline lanes_t mac_lanes(lanes_t acc, lanes_t x, lanes_t w) {
    for (int l = 0; l < LANES; l++) acc.v[l] += x.v[l] * w.v[l];
    return acc;
}
static inline float reduce_lanes(lanes_t a) {
    float total = 0.0f;
    for (int l = 0; l < LANES; l++) total += a.v[l];
    return total;
}

#define TILES(NAME, XT, WT, XLOAD, WLOAD)                                                              \
    PADDED_TILE(NAME, XT, WT, lanes_t, lanes_t, lanes_t, LANES, XLOAD, WLOAD, mac_lanes, zero_lanes, reduce_lanes, 1, 8) \
    PADDED_TILE(NAME, XT, WT, lanes_t, lanes_t, lanes_t, LANES, XLOAD, WLOAD, mac_lanes, zero_lanes, reduce_lanes, 2, 8) \
    PADDED_TILE(NAME, XT, WT, lanes_t, lanes_t, lanes_t, LANES, XLOAD, WLOAD, mac_lanes, zero_lanes, reduce_lanes, 1, 4) \
    PADDED_TILE(NAME, XT, WT, lanes_t, lanes_t, lanes_t, LANES, XLOAD, WLOAD, mac_lanes, zero_lanes, reduce_lanes, 1, 1) \
    /* one accumulator of 16 lanes is already 4 independent vectors at 128 bits: 4 of them spill */  \
    static inline float row_##NAME(const XT* x, const WT* w, int64_t span) {                          \
        float out;                                                                                     \
        tile_##NAME##_1_1(x, 0, w, 0, span, &out, 1);                                                  \
        return out;                                                                                    \
    }
TILES(bb, uint16_t, uint16_t, load_bf16_lanes, load_bf16_lanes)
TILES(fb, float, uint16_t, load_f32_lanes, load_bf16_lanes)
TILES(ff, float, float, load_f32_lanes, load_f32_lanes)

PADDED_BLOCK_FUNCTIONS
