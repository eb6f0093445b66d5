/* GGUF's block types, and the dequantisation of one block of the 32-weight ones (Q4_0, Q4_1, Q8_0), for
 * the row kernel (quantized_matmul.c) and the GEMM (quantized_gemm.c): layouts as gguf/quants.py and
 * llama.cpp define them; each weight is d * q + m (one float32 FMA) or d * q, exactly. */
#ifndef SERVEKIT_BLOCKS_H
#define SERVEKIT_BLOCKS_H

#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__)) || defined(__F16C__)
#include <immintrin.h>
#endif

enum { GGML_F32 = 0, GGML_Q4_0 = 2, GGML_Q4_1 = 3, GGML_Q8_0 = 8, GGML_Q4_K = 12, GGML_Q6_K = 14 };

static inline float half_to_float(const uint8_t *p) {
#if defined(__F16C__)
    /* vcvtph2ps writes its whole register. With AVX512-FP16, GCC turns the cast below into vcvtsh2ss,
     * which merges into its destination's old value (there: the previous block's last FMA), a false
     * dependency from block to block. Same value either way (the conversion is exact). */
    uint16_t bits;
    memcpy(&bits, p, sizeof bits);
    return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)));
#else
    _Float16 h;
    memcpy(&h, p, sizeof h);
    return (float)h;
#endif
}

/* 32 nibbles of 16 bytes (low nibbles first, then high) as floats: d * q + m. */
static inline void nibbles_to_float(const uint8_t *qs, float d, float m, float *y) {
#if defined(__AVX512F__)
    /* With the conversion above: 3.5-4.5 -> 2.8-3.0 ns a Q4_1 block on the Xeon; the GEMM at 32 rows
     * dequantises each weight once per call, ~a quarter of its time before. */
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)qs));
    const __m512i mask = _mm512_set1_epi32(0x0F);
    const __m512 vd = _mm512_set1_ps(d), vm = _mm512_set1_ps(m);
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, mask));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
    _mm512_storeu_ps(y, _mm512_fmadd_ps(vd, lo, vm));
    _mm512_storeu_ps(y + 16, _mm512_fmadd_ps(vd, hi, vm));
#elif defined(__AVX2__) && defined(__FMA__)
    const __m128i bytes = _mm_loadu_si128((const __m128i *)qs);
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(bytes, mask), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    const __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int p = 0; p < 4; p++) {
        const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[p]));
        _mm256_storeu_ps(y + 8 * p, _mm256_fmadd_ps(vd, q, vm));
    }
#else
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)(qs[j] & 15) + m;
        y[j + 16] = d * (float)(qs[j] >> 4) + m;
    }
#endif
}

static inline void dequant_q4_0(const uint8_t *b, float *y) {
    const float d = half_to_float(b);
    nibbles_to_float(b + 2, d, -8.0f * d, y);
}

static inline void dequant_q4_1(const uint8_t *b, float *y) {
    nibbles_to_float(b + 4, half_to_float(b), half_to_float(b + 2), y);
}

static inline void dequant_q8_0(const uint8_t *b, float *y) {
    const float d = half_to_float(b);
    const int8_t *qs = (const int8_t *)(b + 2);
#if defined(__AVX512F__)
    const __m512 vd = _mm512_set1_ps(d);
    for (int p = 0; p < 2; p++) {
        const __m128i bytes = _mm_loadu_si128((const __m128i *)(qs + 16 * p));
        _mm512_storeu_ps(y + 16 * p, _mm512_mul_ps(vd, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes))));
    }
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256 vd = _mm256_set1_ps(d);
    for (int p = 0; p < 4; p++) {
        const __m128i bytes = _mm_loadl_epi64((const __m128i *)(qs + 8 * p));
        _mm256_storeu_ps(y + 8 * p, _mm256_mul_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes))));
    }
#else
    for (int j = 0; j < 32; j++) y[j] = d * (float)qs[j];
#endif
}

#endif
