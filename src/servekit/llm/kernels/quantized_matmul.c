/* y = x @ W.T (+ bias) with W as GGUF's quantised blocks, exactly as the file stores them.
 *
 * W is [N][row_bytes]: each output row is K / block_size blocks of one type (Q4_0, Q4_1, Q8_0: 32
 * weights a block; Q4_K, Q6_K: 256). The weights are dequantised as the kernel goes (never kept as
 * float32) and multiplied in float32 with the float32 activations as they are: the result is the one
 * of x @ dequantize(W).T up to float32 summation order.
 *
 * The schedule is the one of few rows of x (decode; many rows go to quantized_gemm.c's GEMM): each
 * weight block is read once per call and applied to every row of x (one row: two weight rows per
 * pass, gemv_blocks; more: up to four x rows per weight row, dot_blocks). Q4_0/Q4_1/Q8_0 on AVX2
 * convert each block's codes in registers and apply its scale (and offset, through per-block sums
 * of x) once per block; the K-quants, or without AVX2, the row is dequantised into an L1-resident
 * buffer first.
 * The vector width is the one of the CPU the library is compiled on (-march=native, cached per CPU):
 * AVX-512 (16 lanes), else AVX2 + FMA (8), else a portable loop the compiler vectorises as it can.
 * Threads: OpenMP over output rows, on the process's OpenMP pool (PyTorch's).
 */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#include "blocks.h"
#include "hsum.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__)) || defined(__F16C__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define QLANES 16
typedef __m512 qvec_t;
#define qload _mm512_loadu_ps
#define qzero _mm512_setzero_ps
#define qfmadd _mm512_fmadd_ps
#define qadd _mm512_add_ps
static inline float qsum(qvec_t v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
#define QLANES 8
typedef __m256 qvec_t;
#define qload _mm256_loadu_ps
#define qzero _mm256_setzero_ps
#define qfmadd _mm256_fmadd_ps
#define qadd _mm256_add_ps
static inline float qsum(qvec_t v) { return hsum256(v); }
#else
#define QLANES 1
typedef float qvec_t;
static inline qvec_t qload(const float *p) { return *p; }
static inline qvec_t qzero(void) { return 0.0f; }
static inline qvec_t qfmadd(qvec_t a, qvec_t b, qvec_t c) { return a * b + c; }
static inline qvec_t qadd(qvec_t a, qvec_t b) { return a + b; }
static inline float qsum(qvec_t v) { return v; }
#endif

#define GEMV_ROWS 2 /* weight rows of a batch-1 pass: 2 measured best on the AVX2 EPYC (3 and 4 slower) */
/* Batch 1 streams the weights from DRAM at a few bytes per cycle: the hardware prefetcher alone left
 * the 4-bit row kernel at 6.6 ns per block streamed against 4.0 cache-resident (1 thread, EPYC);
 * fetching 2 KiB ahead of each row brings it to ~4.0 (1.5 and 3 KiB measured worse). */
#define PREFETCH_BYTES 2048

int quantized_simd_lanes(void) { return QLANES; }

/* -- dequantisation of the K-quants' blocks (the 32-weight types: blocks.h) --------------------- */

static inline void q4_k_scale_min(int j, const uint8_t *s, int *scale, int *min) {
    if (j < 4) {
        *scale = s[j] & 63;
        *min = s[j + 4] & 63;
    } else {
        *scale = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
        *min = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* 256 weights: d, dmin (f16), 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32, 128 bytes of
 * nibbles (sub-blocks 2c and 2c + 1 are the low and high nibbles of bytes 32c..32c+31). */
static inline void dequant_q4_k(const uint8_t *b, float *y) {
    const float d = half_to_float(b), dmin = half_to_float(b + 2);
    const uint8_t *scales = b + 4, *qs = b + 16;
    for (int c = 0; c < 4; c++) {
        int s0, m0, s1, m1;
        q4_k_scale_min(2 * c, scales, &s0, &m0);
        q4_k_scale_min(2 * c + 1, scales, &s1, &m1);
        const float d0 = d * (float)s0, n0 = dmin * (float)m0, d1 = d * (float)s1, n1 = dmin * (float)m1;
        const uint8_t *q = qs + 32 * c;
        float *out = y + 64 * c;
        for (int i = 0; i < 32; i++) {
            out[i] = d0 * (float)(q[i] & 15) - n0;
            out[32 + i] = d1 * (float)(q[i] >> 4) - n1;
        }
    }
}

/* 256 weights: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales (one per 16), d (f16). */
static inline void dequant_q6_k(const uint8_t *b, float *y) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *scales = (const int8_t *)(b + 192);
    const float d = half_to_float(b + 208);
    for (int h = 0; h < 2; h++) {
        for (int k = 0; k < 4; k++) {
            const uint8_t *low = ql + 64 * h + 32 * (k & 1);
            const uint8_t *high = qh + 32 * h;
            float *out = y + 128 * h + 32 * k;
            const float d0 = d * (float)scales[(128 * h + 32 * k) / 16];
            const float d1 = d * (float)scales[(128 * h + 32 * k) / 16 + 1];
            for (int i = 0; i < 32; i++) {
                const int l = k >= 2 ? low[i] >> 4 : low[i] & 15;
                const int q = (l | (((high[i] >> (2 * k)) & 3) << 4)) - 32;
                out[i] = (i < 16 ? d0 : d1) * (float)q;
            }
        }
    }
}

static int block_geometry(int type, int *block_size, int *block_bytes) {
    switch (type) {
    case GGML_F32: *block_size = 32, *block_bytes = 128; return 0; /* plain floats, K whole vectors of 32 */
    case GGML_Q4_0: *block_size = 32, *block_bytes = 18; return 0;
    case GGML_Q4_1: *block_size = 32, *block_bytes = 20; return 0;
    case GGML_Q8_0: *block_size = 32, *block_bytes = 34; return 0;
    case GGML_Q4_K: *block_size = 256, *block_bytes = 144; return 0;
    case GGML_Q6_K: *block_size = 256, *block_bytes = 210; return 0;
    default: return -1;
    }
}

/* One weight row of K values into y. */
static void dequant_row(const uint8_t *row, int type, int64_t k, float *y) {
    switch (type) {
    case GGML_F32: memcpy(y, row, sizeof(float) * (size_t)k); break;
    case GGML_Q4_0: for (int64_t i = 0; i < k / 32; i++) dequant_q4_0(row + 18 * i, y + 32 * i); break;
    case GGML_Q4_1: for (int64_t i = 0; i < k / 32; i++) dequant_q4_1(row + 20 * i, y + 32 * i); break;
    case GGML_Q8_0: for (int64_t i = 0; i < k / 32; i++) dequant_q8_0(row + 34 * i, y + 32 * i); break;
    case GGML_Q4_K: for (int64_t i = 0; i < k / 256; i++) dequant_q4_k(row + 144 * i, y + 256 * i); break;
    case GGML_Q6_K: for (int64_t i = 0; i < k / 256; i++) dequant_q6_k(row + 210 * i, y + 256 * i); break;
    default: break;
    }
}

/* One weight row as K floats: the row itself for GGML_F32, else dequantised into `buf` [k]. */
static inline const float *weight_row(const uint8_t *row, int type, int64_t k, float *buf) {
    if (type == GGML_F32) return (const float *)row;
    dequant_row(row, type, k, buf);
    return buf;
}

/* -- decode: one dequantised weight row against up to four x rows ------------------------------ */

/* K is a multiple of 32, hence of 2 * QLANES (<= 32): no remainder loops. */
static inline float dot1(const float *w, const float *x, int64_t k) {
    qvec_t a0 = qzero(), a1 = qzero();
    int64_t i = 0;
    for (; i < k; i += 2 * QLANES) {
        a0 = qfmadd(qload(w + i), qload(x + i), a0);
        a1 = qfmadd(qload(w + i + QLANES), qload(x + i + QLANES), a1);
    }
    return qsum(qadd(a0, a1));
}

static inline void dot4(const float *w, const float *x, int64_t ldx, int64_t k, float *res) {
    qvec_t a[4][2];
    for (int r = 0; r < 4; r++) a[r][0] = a[r][1] = qzero();
    for (int64_t i = 0; i < k; i += 2 * QLANES) {
        const qvec_t w0 = qload(w + i), w1 = qload(w + i + QLANES);
        for (int r = 0; r < 4; r++) {
            a[r][0] = qfmadd(w0, qload(x + r * ldx + i), a[r][0]);
            a[r][1] = qfmadd(w1, qload(x + r * ldx + i + QLANES), a[r][1]);
        }
    }
    for (int r = 0; r < 4; r++) res[r] = qsum(qadd(a[r][0], a[r][1]));
}

/* Batch 1 (one x row), codes converted without widening them byte by byte: a block's code bytes
 * are loaded as 32-bit lanes and each code is masked in place (the AND leaves q * 2^s in its lane,
 * s its bit position), so one AND and one int-to-float conversion make 8 weights. The x row is
 * permuted and scaled once per call to match (`permute_block`: the weight j's x lands in the lane
 * of its code, times 2^-s), so every product is (q * 2^s) * (x * 2^-s) = q * x exactly as float32
 * rounds it (powers of two scale exactly; x below ~1e-30 would lose bits: no activation is).
 * Q4_0/Q4_1: the 16 code bytes in both halves of a vector; lane i of the low half sees byte 4i+c's
 * low nibble, of the high half its high nibble (for c = 3, shifted down 4 bits first: the top
 * nibble would be the sign). Q8_0: the 32 code bytes; lane i sees byte 4i+c, shifted to the top
 * byte (then the lane is a signed q * 2^24). */
static inline void permute_block(const float *x, int type, float *out) {
    for (int j = 0; j < 32; j++) {
        int slot, shift;
        if (type == GGML_Q8_0) {
            slot = (j & 3) * 8 + (j >> 2);
            shift = 24;
        } else {
            const int high = j >= 16, byte = j & 15, c = byte & 3;
            slot = c * 8 + high * 4 + (byte >> 2);
            shift = c < 3 ? 8 * c + 4 * high : 20 + 4 * high;
        }
        out[slot] = x[j] * (1.0f / (float)(1u << shift));
    }
}

#if defined(__AVX2__) && defined(__FMA__)
#define HAVE_FUSED_BLOCKS 1
/* The 32 integer codes of a Q4_0/Q4_1/Q8_0 block as floats in `q`, with its w = d * q + c terms
 * (`*c` is 0 for Q8_0). */
static inline __attribute__((always_inline)) void block_codes(const uint8_t *block, int type, __m256 q[4],
                                                              float *d, float *c) {
    if (type == GGML_Q8_0) {
        *d = half_to_float(block);
        *c = 0.0f;
        for (int p = 0; p < 4; p++)
            q[p] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(block + 2 + 8 * p))));
        return;
    }
    if (type == GGML_Q4_1) {
        int32_t dm;
        memcpy(&dm, block, sizeof dm);
        const __m128 both = _mm_cvtph_ps(_mm_cvtsi32_si128(dm));
        *d = _mm_cvtss_f32(both);
        *c = _mm_cvtss_f32(_mm_movehdup_ps(both));
    } else {
        *d = half_to_float(block);
        *c = -8.0f * *d;
    }
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i bytes = _mm_loadu_si128((const __m128i *)(block + (type == GGML_Q4_1 ? 4 : 2)));
    const __m128i lo = _mm_and_si128(bytes, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    q[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    q[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    q[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    q[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

/* The 32-weight types without a dequantised row: w = d * q + c per block, so a block contributes
 * d * <q, x> + c * sum(x) (sums of x per block precomputed, `xsums` [rows][blocks]). The integer
 * codes are converted in registers and each x row's block is read once per weight block. */
static inline __attribute__((always_inline)) void dot_blocks(const uint8_t *row, int type,
                                                             int64_t blocks, const float *x,
                                                             int64_t ldx, const float *xsums,
                                                             int mr, float *res) {
    __m256 acc[4];
    float offsets[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int r = 0; r < 4; r++) acc[r] = _mm256_setzero_ps();
    const int block_bytes = type == GGML_Q4_0 ? 18 : type == GGML_Q4_1 ? 20 : 34;
    for (int64_t b = 0; b < blocks; b++) {
        float d, c;
        __m256 q[4];
        block_codes(row + b * block_bytes, type, q, &d, &c);
        const __m256 vd = _mm256_set1_ps(d);
        for (int r = 0; r < 4; r++) {
            if (r < mr) {
                const float *xb = x + r * ldx + 32 * b;
                __m256 sum = _mm256_mul_ps(q[0], _mm256_loadu_ps(xb));
                sum = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xb + 8), sum);
                sum = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xb + 16), sum);
                sum = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xb + 24), sum);
                acc[r] = _mm256_fmadd_ps(vd, sum, acc[r]);
                if (type != GGML_Q8_0) offsets[r] += c * xsums[r * blocks + b];
            }
        }
    }
    for (int r = 0; r < mr; r++) res[r] = hsum256(acc[r]) + offsets[r];
}

static inline __attribute__((always_inline)) void codes_in_place(const uint8_t *codes, int type, __m256 q[4]) {
    if (type == GGML_Q8_0) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)codes);
        const __m256i top = _mm256_set1_epi32((int)0xFF000000u);
        q[0] = _mm256_cvtepi32_ps(_mm256_slli_epi32(v, 24));
        q[1] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_slli_epi32(v, 16), top));
        q[2] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_slli_epi32(v, 8), top));
        q[3] = _mm256_cvtepi32_ps(_mm256_and_si256(v, top));
        return;
    }
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)codes));
    q[0] = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_setr_epi32(0xF, 0xF, 0xF, 0xF, 0xF0, 0xF0, 0xF0, 0xF0)));
    q[1] = _mm256_cvtepi32_ps(
        _mm256_and_si256(v, _mm256_setr_epi32(0xF00, 0xF00, 0xF00, 0xF00, 0xF000, 0xF000, 0xF000, 0xF000)));
    q[2] = _mm256_cvtepi32_ps(_mm256_and_si256(
        v, _mm256_setr_epi32(0xF0000, 0xF0000, 0xF0000, 0xF0000, 0xF00000, 0xF00000, 0xF00000, 0xF00000)));
    q[3] = _mm256_cvtepi32_ps(_mm256_and_si256(
        _mm256_srli_epi32(v, 4),
        _mm256_setr_epi32(0xF00000, 0xF00000, 0xF00000, 0xF00000, 0xF000000, 0xF000000, 0xF000000, 0xF000000)));
}

/* One (permuted) x row `xp` against `nw` (<= 4) weight rows at once: each x block is loaded once
 * for all of them and the rows' accumulator chains are independent. */
static inline __attribute__((always_inline)) void gemv_blocks(const uint8_t *w, int64_t row_bytes,
                                                              int nw, int type, int64_t blocks,
                                                              const float *xp, const float *xsums,
                                                              float *res) {
    __m256 acc[4];
    float offsets[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int r = 0; r < 4; r++) acc[r] = _mm256_setzero_ps();
    const int block_bytes = type == GGML_Q4_0 ? 18 : type == GGML_Q4_1 ? 20 : 34;
    const int head = type == GGML_Q4_1 ? 4 : 2;
    for (int64_t b = 0; b < blocks; b++) {
        const float *xb = xp + 32 * b;
        const __m256 x0 = _mm256_loadu_ps(xb), x1 = _mm256_loadu_ps(xb + 8);
        const __m256 x2 = _mm256_loadu_ps(xb + 16), x3 = _mm256_loadu_ps(xb + 24);
        const float xsum = xsums[b];
        for (int r = 0; r < 4; r++) {
            if (r >= nw) break;
            const uint8_t *block = w + r * row_bytes + b * block_bytes;
            float d, c;
            if (type == GGML_Q4_1) {
                int32_t dm;
                memcpy(&dm, block, sizeof dm);
                const __m128 both = _mm_cvtph_ps(_mm_cvtsi32_si128(dm));
                d = _mm_cvtss_f32(both);
                c = _mm_cvtss_f32(_mm_movehdup_ps(both));
            } else {
                d = half_to_float(block);
                c = -8.0f * d;
            }
            __m256 q[4];
            __builtin_prefetch(block + PREFETCH_BYTES);
            codes_in_place(block + head, type, q);
            if (type != GGML_Q8_0) offsets[r] += c * xsum;
            const __m256 s01 = _mm256_fmadd_ps(q[1], x1, _mm256_mul_ps(q[0], x0));
            const __m256 s23 = _mm256_fmadd_ps(q[3], x3, _mm256_mul_ps(q[2], x2));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_add_ps(s01, s23), acc[r]);
        }
    }
    for (int r = 0; r < nw; r++) res[r] = hsum256(acc[r]) + offsets[r];
}
#else
#define HAVE_FUSED_BLOCKS 0
#endif

/* The per-block sums of x [m][k / 32], then for one row (m == 1) the row permuted for gemv_blocks [k]. */
static void fill_block_sums(const float *x, int64_t m, int64_t k, int type, float *xsums) {
    const int64_t blocks = k / 32;
    for (int64_t i = 0; i < m * blocks; i++) {
        float total = 0.0f;
        for (int e = 0; e < 32; e++) total += x[i * 32 + e];
        xsums[i] = total;
        if (m == 1) permute_block(x + i * 32, type, xsums + blocks + i * 32);
    }
}

static inline int fused_type(int type) {
    return HAVE_FUSED_BLOCKS && (type == GGML_Q4_0 || type == GGML_Q4_1 || type == GGML_Q8_0);
}

/* What the fused-block path needs of x (fill_block_sums, in memory of its own); NULL when the path
 * does not apply. */
static float *block_sums(const float *x, int64_t m, int64_t k, int type, int *status) {
    if (!fused_type(type)) return NULL;
    float *xsums = malloc(sizeof(float) * (size_t)(m * (k / 32) + (m == 1 ? k : 0)));
    if (xsums == NULL) {
        *status = -1;
        return NULL;
    }
    fill_block_sums(x, m, k, type, xsums);
    return xsums;
}

#if HAVE_FUSED_BLOCKS
/* Batch 1, output rows [j, min(j + GEMV_ROWS, end)) from the permuted row and its sums. */
static inline void gemv_group(const uint8_t *w, int64_t row_bytes, int type, int64_t blocks, const float *xsums,
                              const float *bias, float *out, int64_t j, int64_t end) {
    const float *xp = xsums + blocks; /* (fill_block_sums: the permuted row after the sums) */
    float res[4];
    if (j + GEMV_ROWS <= end) {
        const uint8_t *wj = w + j * row_bytes;
        if (type == GGML_Q4_1) gemv_blocks(wj, row_bytes, GEMV_ROWS, GGML_Q4_1, blocks, xp, xsums, res);
        else if (type == GGML_Q4_0) gemv_blocks(wj, row_bytes, GEMV_ROWS, GGML_Q4_0, blocks, xp, xsums, res);
        else /* (Q8_0 rows in pairs measured 2.5x slower streaming the LM head: one at a time) */
            for (int r = 0; r < GEMV_ROWS; r++)
                gemv_blocks(wj + r * row_bytes, row_bytes, 1, GGML_Q8_0, blocks, xp, xsums, res + r);
        for (int r = 0; r < GEMV_ROWS; r++) out[j + r] = res[r] + (bias ? bias[j + r] : 0.0f);
    } else {
        for (int64_t jj = j; jj < end; jj++) {
            gemv_blocks(w + jj * row_bytes, row_bytes, 1, type, blocks, xp, xsums, res);
            out[jj] = res[0] + (bias ? bias[jj] : 0.0f);
        }
    }
}
#endif

/* Floats of the buffer quantized_rows_range's `prep` needs for rows of k values. */
int64_t quantized_prep_floats(int64_t k) { return k + k / 32; }

/* Batch 1 for a caller that splits the output rows itself (decode_step.c): `prep` (at least
 * quantized_prep_floats(k)) filled from x for `type`; returns whether the fused-block path uses it. */
int quantized_prepare_row(const float *x, int64_t k, int type, float *prep) {
    if (!fused_type(type)) return 0;
    fill_block_sums(x, 1, k, type, prep);
    return 1;
}

/* Batch 1, output rows [j0, j1) of x @ W.T (+ bias) into out[j0..j1), on the calling thread: the
 * numbers of quantized_matmul's. `prep` from quantized_prepare_row (for this type), or NULL: each
 * weight row is dequantised into `rowbuf` [k] first. */
void quantized_rows_range(const float *x, const float *prep, int64_t k, const uint8_t *w, int64_t row_bytes,
                          int type, const float *bias, float *out, int64_t j0, int64_t j1, float *rowbuf) {
#if HAVE_FUSED_BLOCKS
    if (prep != NULL) {
        for (int64_t j = j0; j < j1; j += GEMV_ROWS) gemv_group(w, row_bytes, type, k / 32, prep, bias, out, j, j1);
        return;
    }
#endif
    (void)prep;
    for (int64_t j = j0; j < j1; j++)
        out[j] = dot1(weight_row(w + j * row_bytes, type, k, rowbuf), x, k) + (bias ? bias[j] : 0.0f);
}

/* The row-by-row schedule over output rows, shared out among the threads of the enclosing
 * parallel region (every thread of the team calls it; outside a region the caller runs it all).
 * `xsums` from block_sums (NULL: dequantise each weight row into a buffer first). */
static void rows_body(const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n, int64_t row_bytes,
                      int type, const float *bias, float *out, const float *xsums, int *status) {
#if HAVE_FUSED_BLOCKS
    if (xsums != NULL) {
        const int64_t blocks = k / 32;
        if (m == 1) {
            const int64_t groups = (n + GEMV_ROWS - 1) / GEMV_ROWS;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (int64_t g = 0; g < groups; g++) gemv_group(w, row_bytes, type, blocks, xsums, bias, out, g * GEMV_ROWS, n);
            return;
        }
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t j = 0; j < n; j++) {
            const uint8_t *row = w + j * row_bytes;
            const float b = bias ? bias[j] : 0.0f;
            int64_t i = 0;
            float res[4];
            for (; i + 4 <= m; i += 4) {
                dot_blocks(row, type, blocks, x + i * k, k, xsums + i * blocks, 4, res);
                for (int r = 0; r < 4; r++) out[(i + r) * n + j] = res[r] + b;
            }
            for (; i < m; i++) {
                dot_blocks(row, type, blocks, x + i * k, k, xsums + i * blocks, 1, res);
                out[i * n + j] = res[0] + b;
            }
        }
        return;
    }
#endif
    (void)xsums;
    float *row = aligned_alloc(64, sizeof(float) * (size_t)k);
    if (row == NULL) *status = -1;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t j = 0; j < n; j++) {
        if (row == NULL) continue;
        const float *wr = weight_row(w + j * row_bytes, type, k, row);
        const float b = bias ? bias[j] : 0.0f;
        int64_t i = 0;
        for (; i + 4 <= m; i += 4) {
            float res[4];
            dot4(wr, x + i * k, k, k, res);
            for (int r = 0; r < 4; r++) out[(i + r) * n + j] = res[r] + b;
        }
        for (; i < m; i++) out[i * n + j] = dot1(wr, x + i * k, k) + b;
    }
    free(row);
}

static int matmul_rows(const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                       int64_t row_bytes, int type, const float *bias, float *out, int threads) {
    int status = 0;
    float *xsums = block_sums(x, m, k, type, &status);
    if (status != 0) return status;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
    rows_body(x, m, k, w, n, row_bytes, type, bias, out, xsums, &status);
    free(xsums);
    return status;
}

/* A gated SiLU MLP at decode sizes in one parallel region (one thread wake-up instead of three):
 * gate_up [2 * inter][k] (gate rows, then up rows), down [k][inter], both row by row;
 * out [m][k] = down(silu(gate x) * up x); scratch: m * 3 * inter floats. */
int quantized_silu_mlp(const float *x, int64_t m, int64_t k, const uint8_t *gate_up, int64_t gate_up_bytes,
                       int gate_up_type, int64_t inter, const uint8_t *down, int64_t down_bytes, int down_type,
                       float *scratch, float *out, int threads) {
    int block_size, block_bytes;
    if (block_geometry(gate_up_type, &block_size, &block_bytes) != 0 || k % block_size != 0 ||
        gate_up_bytes != k / block_size * block_bytes)
        return -2;
    if (block_geometry(down_type, &block_size, &block_bytes) != 0 || inter % block_size != 0 ||
        down_bytes != inter / block_size * block_bytes)
        return -2;
    if (threads < 1) threads = 1;
    if (m <= 0) return 0;
    int status = 0;
    float *xsums = block_sums(x, m, k, gate_up_type, &status);
    if (status != 0) return status;
    float *projected = scratch, *act = scratch + m * 2 * inter;
    const int down_fused = fused_type(down_type);
    /* the down input's block_sums (its sums, and for one row the row permuted), made as it is computed */
    float *act_sums = down_fused ? malloc(sizeof(float) * (size_t)(m * (inter / 32) + (m == 1 ? inter : 0))) : NULL;
    if (down_fused && act_sums == NULL) {
        free(xsums);
        return -1;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
    {
        rows_body(x, m, k, gate_up, 2 * inter, gate_up_bytes, gate_up_type, NULL, projected, xsums, &status);
        /* (the implicit barrier of the loop above: every gate/up value is in) */
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t b = 0; b < m * (inter / 32); b++) {
            const int64_t i = b / (inter / 32), c0 = (b % (inter / 32)) * 32;
            float total = 0.0f;
            for (int64_t c = c0; c < c0 + 32; c++) {
                const float gate = projected[i * 2 * inter + c], up = projected[i * 2 * inter + inter + c];
                /* (the bound keeps expf finite: -ffast-math's vector expf is not defined past it) */
                const float value = gate / (1.0f + expf(fminf(-gate, 88.0f))) * up;
                act[i * inter + c] = value;
                total += value;
            }
            if (act_sums != NULL) {
                act_sums[b] = total;
                if (m == 1) permute_block(act + c0, down_type, act_sums + inter / 32 + c0);
            }
        }
        rows_body(act, m, inter, down, k, down_bytes, down_type, NULL, out, act_sums, &status);
    }
    free(xsums);
    free(act_sums);
    return status;
}

/* x float32 [m][k] contiguous, w [n][row_bytes], out float32 [m][n]; bias float32 [n] or NULL.
 * Returns 0, -1 (out of memory) or -2 (unknown type, or k not whole blocks / row_bytes wrong). */
int quantized_matmul(const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                     int64_t row_bytes, int type, const float *bias, float *out, int threads) {
    int block_size, block_bytes;
    if (block_geometry(type, &block_size, &block_bytes) != 0 || k % block_size != 0 ||
        row_bytes != k / block_size * block_bytes)
        return -2;
    if (threads < 1) threads = 1;
    if (m <= 0 || n <= 0) return 0;
    return matmul_rows(x, m, k, w, n, row_bytes, type, bias, out, threads);
}

/* Rows `indices` of w ([count] int64, each < n: the caller checks) dequantised into out [count][k]. */
int dequantize_rows(const uint8_t *w, int64_t row_bytes, int type, int64_t k, const int64_t *indices,
                    int64_t count, float *out) {
    int block_size, block_bytes;
    if (block_geometry(type, &block_size, &block_bytes) != 0 || k % block_size != 0 ||
        row_bytes != k / block_size * block_bytes)
        return -2;
    for (int64_t i = 0; i < count; i++) dequant_row(w + indices[i] * row_bytes, type, k, out + i * k);
    return 0;
}
