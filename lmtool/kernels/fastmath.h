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

/* The steps shared with the vector kernels' exp_ps (avx2.c, avx512.c), for any vector type:
   FNMADD(a, b, c) = c - a b, FMADD(a, b, c) = a b + c, SET1 a broadcast. */
#define EXP_LOG2E 1.44269504088896341f
#define EXP_REDUCED(x, n, FNMADD, SET1) FNMADD(n, SET1(1.42860682030941723212e-6f), FNMADD(n, SET1(0.693145751953125f), x))
#define EXP_TAYLOR7(r, FMADD, SET1)                                                                    \
    FMADD(FMADD(FMADD(FMADD(FMADD(FMADD(FMADD(SET1(1.0f / 5040), r, SET1(1.0f / 720)), r, SET1(1.0f / 120)), r, \
                                    SET1(1.0f / 24)), r, SET1(1.0f / 6)), r, SET1(0.5f)), r, SET1(1.0f)), r, SET1(1.0f))
#define EXP_SCALAR_FNMADD(a, b, c) ((c) - (a) * (b))
#define EXP_SCALAR_FMADD(a, b, c) ((a) * (b) + (c))
#define EXP_SCALAR_SET1(v) (v)

static inline float exp_f32(float x) {
    x = x < -104.0f ? -104.0f : (x > 89.0f ? 89.0f : x);
    const float n = (x * EXP_LOG2E + 12582912.0f) - 12582912.0f;
    const float r = EXP_REDUCED(x, n, EXP_SCALAR_FNMADD, EXP_SCALAR_SET1);
    const float p = EXP_TAYLOR7(r, EXP_SCALAR_FMADD, EXP_SCALAR_SET1);
    const int32_t half = (int32_t)n / 2;
    const uint32_t e1 = (uint32_t)(half + 127) << 23, e2 = (uint32_t)((int32_t)n - half + 127) << 23;
    float s1, s2;
    memcpy(&s1, &e1, 4);
    memcpy(&s2, &e2, 4);
    return p * s1 * s2;
}

#endif
