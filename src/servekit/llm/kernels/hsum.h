/* The sum of a 256-bit vector's 8 float32 lanes, for the kernels that keep AVX accumulators. */
#ifndef SERVEKIT_HSUM_H
#define SERVEKIT_HSUM_H

#if defined(__AVX__)
#include <immintrin.h>

static inline float hsum256(__m256 a) {
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    v = _mm_add_ss(v, _mm_shuffle_ps(v, v, 1));
    return _mm_cvtss_f32(v);
}
#endif

#endif
