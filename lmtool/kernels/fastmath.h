/* e^x in float32 for the plain-C kernels (plain.h, steps.c), written so that loops over it
 * vectorize: libm's expf is a call per element.
 *
 * x = n ln2 + r with |r| <= ln2/2 (ln2 in two parts, the first exact in float), e^r by its Taylor
 * series to degree 7 (relative error under 1e-8 there), times 2^n put into the exponent bits in two
 * factors, so that results down to the subnormals (n to -150) and up to 2^128 (inf) stay exact.
 * n is rounded by adding and taking away 1.5 * 2^23, not by a call. Within about an ulp of expf. */
#ifndef LMTOOL_KERNELS_FASTMATH_H
#define LMTOOL_KERNELS_FASTMATH_H

#include <stdint.h>
#include <string.h>

static inline float exp_f32(float x) {
    x = x < -104.0f ? -104.0f : (x > 89.0f ? 89.0f : x);
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693145751953125f;
    r = r - n * 1.42860682030941723212e-6f;
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t half = (int32_t)n / 2;
    const uint32_t e1 = (uint32_t)(half + 127) << 23, e2 = (uint32_t)((int32_t)n - half + 127) << 23;
    float s1, s2;
    memcpy(&s1, &e1, 4);
    memcpy(&s2, &e2, 4);
    return p * s1 * s2;
}

#endif
