/* Few rows of x against GGUF's 32-weight blocks with 8-bit activations (quantization=int8's batch-1 step).
 *
 * Each 32-block of an x row is quantised to int8 with one scale d = max|x| / 127 (q = rint(x / d)), as
 * llama.cpp's Q8 activations; a weight block's codes then meet the activation codes in an integer dot
 * (exact in int32) and the block adds d_w * d_x * <q_w, q_x> + c_w * d_x * sum(q_x) in float32, c_w being
 * the block's offset (Q4_1: its min; Q4_0: -8 d_w; Q8_0: 0). Not the exact path's numbers: opt-in only.
 *
 * The integer dot by what the CPU has (-march=native, cached per CPU): AVX-512 VL + VNNI or AVX-VNNI
 * `vpdpbusd` (unsigned weight codes x signed activations, 4 products summed per int32 lane), else AVX2
 * `pmaddubsw` + `pmaddwd`, else a scalar loop. Q8_0's signed codes go in as |w| with x given w's sign.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dtypes.h"
#include "hsum.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

enum { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 };
/* The weights stream from DRAM at batch 1: fetch ahead of each block as quantized_matmul.c does. */
#define PREFETCH_BYTES 2048

int q8_supports(int type) { return type == Q4_0 || type == Q4_1 || type == Q8_0; }

/* Floats of q8_prepare_row's buffer for a row of k values: d [k/32], s [k/32], then the k int8 codes. */
int64_t q8_prep_floats(int64_t k) { return 2 * (k / 32) + (k + 3) / 4; }

/* x [k] (k a multiple of 32) into prep: per block d, s = d * sum(q), and q [k]. */
void q8_prepare_row(const float *x, int64_t k, float *prep) {
    const int64_t blocks = k / 32;
    float *d = prep, *s = prep + blocks;
    int8_t *q = (int8_t *)(prep + 2 * blocks);
    for (int64_t b = 0; b < blocks; b++) {
        const float *xb = x + 32 * b;
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(xb[i]));
        const float scale = amax / 127.0f, inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
        int total = 0;
        for (int i = 0; i < 32; i++) {
            const int v = (int)rintf(xb[i] * inverse);
            q[32 * b + i] = (int8_t)v;
            total += v;
        }
        d[b] = scale;
        s[b] = scale * (float)total;
    }
}

/* A block's d and offset c (w = d * code + c, codes as stored: Q4 nibbles unsigned, Q8_0 signed). */
static inline void block_scales(const uint8_t *block, int type, float *d, float *c) {
    *d = load_element(block, 0, DTYPE_F16); /* (blocks and rows are of even bytes: aligned halves) */
    *c = type == Q4_1 ? load_element(block, 1, DTYPE_F16) : type == Q4_0 ? -8.0f * *d : 0.0f;
}

#if defined(__AVX2__)
/* 8 int32 lanes, each the sum of 4 products of u (unsigned bytes) and s (signed bytes). */
static inline __m256i dot_u8_s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* <codes, q> of one block as 8 int32 partial sums. */
static inline __m256i block_dot(const uint8_t *block, int type, __m256i xq) {
    if (type == Q8_0) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)(block + 2));
        return dot_u8_s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xq, w));
    }
    const __m128i bytes = _mm_loadu_si128((const __m128i *)(block + (type == Q4_1 ? 4 : 2)));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m256i codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask), _mm_and_si128(bytes, mask));
    return dot_u8_s8(codes, xq);
}

#endif

/* Weight row `row` (blocks of `type`) against the prepared x. */
static inline float row_dot(const float *prep, int64_t blocks, const uint8_t *row, int type) {
    const int block_bytes = type == Q4_0 ? 18 : type == Q4_1 ? 20 : 34;
    const float *dx = prep, *sx = prep + blocks;
    const int8_t *q = (const int8_t *)(prep + 2 * blocks);
    float offset = 0.0f;
#if defined(__AVX2__)
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *block = row + b * block_bytes;
        __builtin_prefetch(block + PREFETCH_BYTES);
        float d, c;
        block_scales(block, type, &d, &c);
        const __m256i xq = _mm256_loadu_si256((const __m256i *)(q + 32 * b));
        const __m256 products = _mm256_cvtepi32_ps(block_dot(block, type, xq));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * dx[b]), products, acc);
        offset += c * sx[b];
    }
    return hsum256(acc) + offset;
#else
    float total = 0.0f;
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *block = row + b * block_bytes;
        float d, c;
        block_scales(block, type, &d, &c);
        int32_t dot = 0;
        for (int i = 0; i < 32; i++) {
            int code;
            if (type == Q8_0) code = ((const int8_t *)(block + 2))[i];
            else code = i < 16 ? block[block_bytes - 16 + i] & 15 : block[block_bytes - 16 + i - 16] >> 4;
            dot += code * q[32 * b + i];
        }
        total += d * dx[b] * (float)dot;
        offset += c * sx[b];
    }
    return total + offset;
#endif
}

#if defined(__AVX2__)
/* Two 4-bit weight rows at once (res[0], res[1]): each x block is loaded once for both, and the two
 * accumulator chains are independent (measured on the Xeon, Q4_1 576 -> 3072, 1 thread: ~15% faster
 * than one row per pass; Q8_0 rows stay one at a time, as in quantized_matmul.c). */
static inline void row_dot2(const float *prep, int64_t blocks, const uint8_t *row, int64_t row_bytes, int type,
                            float *res) {
    const int block_bytes = type == Q4_0 ? 18 : 20;
    const float *dx = prep, *sx = prep + blocks;
    const int8_t *q = (const int8_t *)(prep + 2 * blocks);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float offset0 = 0.0f, offset1 = 0.0f;
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *b0 = row + b * block_bytes, *b1 = b0 + row_bytes;
        __builtin_prefetch(b0 + PREFETCH_BYTES);
        __builtin_prefetch(b1 + PREFETCH_BYTES);
        const __m256i xq = _mm256_loadu_si256((const __m256i *)(q + 32 * b));
        float d0, c0, d1, c1;
        block_scales(b0, type, &d0, &c0);
        block_scales(b1, type, &d1, &c1);
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d0 * dx[b]), _mm256_cvtepi32_ps(block_dot(b0, type, xq)), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d1 * dx[b]), _mm256_cvtepi32_ps(block_dot(b1, type, xq)), acc1);
        offset0 += c0 * sx[b];
        offset1 += c1 * sx[b];
    }
    res[0] = hsum256(acc0) + offset0;
    res[1] = hsum256(acc1) + offset1;
}
#endif

/* Up to Q8_GROUP x rows against one weight row at once (res[r] for x row r of `prep`, rows `stride`
 * floats apart): each weight block's scales and codes are unpacked once for all of them, as the exact
 * path's dot_blocks does with four x rows (measured on the Zen 5, 1 thread, the default model's decode
 * step at 4 rows: one x row per pass made int8 1.1-1.4x slower than the exact kernels). Per x row the
 * same operations in the same order as row_dot: the same numbers. */
#define Q8_GROUP 4
static inline __attribute__((always_inline)) void rows_dot(const float *prep, int64_t stride, const int m,
                                                           int64_t blocks, const uint8_t *row, int type,
                                                           float *res) {
#if defined(__AVX2__)
    const int block_bytes = type == Q4_0 ? 18 : type == Q4_1 ? 20 : 34;
    __m256 acc[Q8_GROUP];
    float offset[Q8_GROUP];
    for (int r = 0; r < m; r++) {
        acc[r] = _mm256_setzero_ps();
        offset[r] = 0.0f;
    }
    const __m128i mask = _mm_set1_epi8(0x0F);
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *block = row + b * block_bytes;
        __builtin_prefetch(block + PREFETCH_BYTES);
        float d, c;
        block_scales(block, type, &d, &c);
        __m256i codes, signs = _mm256_setzero_si256();
        if (type == Q8_0) {
            signs = _mm256_loadu_si256((const __m256i *)(block + 2));
            codes = _mm256_sign_epi8(signs, signs);
        } else {
            const __m128i bytes = _mm_loadu_si128((const __m128i *)(block + (type == Q4_1 ? 4 : 2)));
            codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask), _mm_and_si128(bytes, mask));
        }
        for (int r = 0; r < m; r++) {
            const float *p = prep + r * stride;
            __m256i xq = _mm256_loadu_si256((const __m256i *)((const int8_t *)(p + 2 * blocks) + 32 * b));
            if (type == Q8_0) xq = _mm256_sign_epi8(xq, signs);
            const __m256 products = _mm256_cvtepi32_ps(dot_u8_s8(codes, xq));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * p[b]), products, acc[r]);
            offset[r] += c * p[blocks + b];
        }
    }
    for (int r = 0; r < m; r++) res[r] = hsum256(acc[r]) + offset[r];
#else
    for (int r = 0; r < m; r++) res[r] = row_dot(prep + r * stride, blocks, row, type);
#endif
}

/* Output rows [j0, j1) of x @ W.T (+ bias) for `m` (1..Q8_GROUP) prepared x rows, out rows n apart. */
static void group_range(const float *prep, int64_t stride, int m, int64_t k, const uint8_t *w, int64_t row_bytes,
                        int type, const float *bias, float *out, int64_t n, int64_t j0, int64_t j1) {
    float res[Q8_GROUP];
    for (int64_t j = j0; j < j1; j++) {
        const uint8_t *row = w + j * row_bytes;
        switch (m) { /* constant group sizes: the accumulators stay in registers */
        case 2: rows_dot(prep, stride, 2, k / 32, row, type, res); break;
        case 3: rows_dot(prep, stride, 3, k / 32, row, type, res); break;
        default: rows_dot(prep, stride, Q8_GROUP, k / 32, row, type, res); break;
        }
        for (int r = 0; r < m; r++) out[r * n + j] = res[r] + (bias ? bias[j] : 0.0f);
    }
}

/* Output rows [j0, j1) of x @ W.T (+ bias) into out[j0..j1) from q8_prepare_row's `prep`, on the
 * calling thread (decode_step.c splits the rows among its threads). */
void q8_rows_range(const float *prep, int64_t k, const uint8_t *w, int64_t row_bytes, int type, const float *bias,
                   float *out, int64_t j0, int64_t j1) {
    int64_t j = j0;
#if defined(__AVX2__)
    if (type != Q8_0)
        for (; j + 2 <= j1; j += 2) {
            row_dot2(prep, k / 32, w + j * row_bytes, row_bytes, type, out + j);
            for (int r = 0; r < 2; r++) out[j + r] += bias ? bias[j + r] : 0.0f;
        }
#endif
    for (; j < j1; j++) {
        out[j] = row_dot(prep, k / 32, w + j * row_bytes, type) + (bias ? bias[j] : 0.0f);
    }
}

/* x float32 [m][k], w [n][row_bytes] of Q4_0/Q4_1/Q8_0, out float32 [m][n]; bias [n] or NULL. Every x
 * row quantised once, then OpenMP over output rows, x rows in groups of Q8_GROUP. Returns 0, -1 (out of memory) or -2 (bad type or
 * geometry). The numbers of q8_rows_range (the native step's). */
int q8_matmul(const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n, int64_t row_bytes, int type,
              const float *bias, float *out, int threads) {
    if (!q8_supports(type) || k % 32 != 0 || row_bytes != k / 32 * (type == Q4_0 ? 18 : type == Q4_1 ? 20 : 34))
        return -2;
    if (threads < 1) threads = 1;
    if (m <= 0 || n <= 0) return 0;
    const int64_t stride = q8_prep_floats(k);
    float *prep = malloc(sizeof(float) * (size_t)(m * stride));
    if (prep == NULL) return -1;
    for (int64_t i = 0; i < m; i++) q8_prepare_row(x + i * k, k, prep + i * stride);
    const int64_t chunks = (n + 15) / 16; /* whole pairs of rows for row_dot2 */
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads)
#endif
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t j0 = 16 * c, j1 = 16 * c + 16 < n ? 16 * c + 16 : n;
        for (int64_t i = 0; i < m; i += Q8_GROUP) {
            const int group = m - i < Q8_GROUP ? (int)(m - i) : Q8_GROUP;
            if (group == 1) q8_rows_range(prep + i * stride, k, w, row_bytes, type, bias, out + i * n, j0, j1);
            else group_range(prep + i * stride, stride, group, k, w, row_bytes, type, bias, out + i * n, n, j0, j1);
        }
    }
    free(prep);
    return 0;
}
