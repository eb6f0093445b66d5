/* Probe, not part of the library: an exact GEMM on AMX-BF16 for Q4_1 blocks, timed against the
 * library's AVX-512 `quantized_gemm` in the same run (1 thread, thread CPU time, best of 15,
 * interleaved), errors of both against a float64 product with the dequantised weights.
 *
 *   y[m][n] = sum_b d[n,b] * S[m,n,b] + min[n,b] * X[m,b],  S = sum_j x[m,32b+j] q[n,b,j],  X = sum_j x
 *
 * The 4-bit codes q are exact in bf16, and x is split into three bf16 parts (hi + mid + lo: its whole
 * 24-bit mantissa), so three `tdpbf16ps` per block, accumulating in float32, give S without rounding
 * the activations; each block's 16 x 16 tile is then scaled into float32 accumulators.
 * -DPROBE_NO_SCALING leaves the scaling out (wrong numbers; it times the tiles alone).
 * Only on a CPU with amx_tile and amx_bf16 (and a kernel that grants XTILEDATA):
 *
 *   K=src/servekit/llm/kernels; gcc -O3 -march=native -ffast-math -fopenmp -I$K \
 *       benchmarks/amx_gemm_probe.c $K/quantized_gemm.c $K/quantized_matmul.c -o /tmp/amx_probe -lm
 *   OMP_NUM_THREADS=1 /tmp/amx_probe
 *
 * Figures: benchmarks/RESULTS.md, "Thirteenth session". */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "blocks.h"

int quantized_gemm(const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n, int64_t row_bytes, int type,
                   const float *bias, float *out, int threads);
int dequantize_rows(const uint8_t *w, int64_t row_bytes, int type, int64_t k, const int64_t *indices, int64_t count,
                    float *out);

typedef struct {
    uint8_t palette, start;
    uint8_t res[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tilecfg;

// px: [mg][part][b][16 r][16 uint32 pairs] ; xs: [mg][b][16]
static void pack_x(const float *x, int64_t M, int64_t K, uint16_t *px16, float *xs) {
    uint32_t *px = (uint32_t *)px16;
    int64_t MG = (M + 15) / 16, B = K / 32;
    for (int64_t mg = 0; mg < MG; mg++)
        for (int mi = 0; mi < 16; mi++) {
            int64_t m = mg * 16 + mi;
            for (int64_t b = 0; b < B; b++) {
                __m512 v0 = _mm512_setzero_ps(), v1 = v0;
                if (m < M) { v0 = _mm512_loadu_ps(x + m * K + 32 * b); v1 = _mm512_loadu_ps(x + m * K + 32 * b + 16); }
                xs[(mg * B + b) * 16 + mi] = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
                for (int p = 0; p < 3; p++) {
                    __m512i h = (__m512i)_mm512_cvtne2ps_pbh(v1, v0);
                    uint32_t pairs[16] __attribute__((aligned(64)));
                    _mm512_store_si512(pairs, h);
                    uint32_t *dst = px + ((mg * 3 + p) * B + b) * 256 + mi;
                    for (int r = 0; r < 16; r++) dst[r * 16] = pairs[r];
                    __m512 h0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)), 16));
                    __m512 h1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(h, 1)), 16));
                    v0 = _mm512_sub_ps(v0, h0);
                    v1 = _mm512_sub_ps(v1, h1);
                }
            }
        }
}

// weights of 16 rows (n0..) all blocks: wa [b][16][32] bf16, d/mm [b][16]
static void convert_w(const uint8_t *w, int64_t row_bytes, int64_t n0, int64_t N, int64_t B, uint16_t *wa, float *d,
                      float *mm) {
    for (int r = 0; r < 16; r++) {
        int64_t n = n0 + r;
        for (int64_t b = 0; b < B; b++) {
            uint16_t *dst = wa + (b * 16 + r) * 32;
            if (n >= N) {
                memset(dst, 0, 64);
                d[b * 16 + r] = 0;
                mm[b * 16 + r] = 0;
                continue;
            }
            const uint8_t *blk = w + n * row_bytes + b * 20;
            d[b * 16 + r] = half_to_float(blk);
            mm[b * 16 + r] = half_to_float(blk + 2);
            __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(blk + 4)));
            __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15)));
            __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
            _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
    }
}

static void amx_gemm(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, int64_t row_bytes,
                     float *out) {
    int64_t MG = (M + 15) / 16, B = K / 32, NG = (N + 15) / 16;
    uint16_t *px = aligned_alloc(64, (size_t)(MG + 1) * 3 * B * 1024);
    float *xs = aligned_alloc(64, (size_t)(MG + 1) * B * 64);
    pack_x(x, M, K, px, xs);
    if (MG % 2) {
        memset(px + MG * 3 * B * 512, 0, 3 * B * 1024);
        memset(xs + MG * B * 16, 0, B * 64);
    }
    uint16_t *wa = aligned_alloc(64, 2 * B * 1024);
    float *d = aligned_alloc(64, 2 * B * 64), *mm = aligned_alloc(64, 2 * B * 64);
    float cbuf[4][16][16] __attribute__((aligned(64)));
    float acc[4][16][16] __attribute__((aligned(64)));
    for (int64_t ng = 0; ng < NG; ng += 2) {
        convert_w(w, row_bytes, ng * 16, N, B, wa, d, mm);
        convert_w(w, row_bytes, ng * 16 + 16, N, B, wa + B * 512, d + B * 16, mm + B * 16);
        for (int64_t mg = 0; mg < MG; mg += 2) {
            memset(acc, 0, sizeof acc);
            const uint16_t *p0 = px + mg * 3 * B * 512, *p1 = px + (mg + 1) * 3 * B * 512;
            for (int64_t b = 0; b < B; b++) {
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                _tile_loadd(4, wa + b * 512, 64);
                _tile_loadd(5, wa + B * 512 + b * 512, 64);
                for (int p = 0; p < 3; p++) {
                    _tile_loadd(6, p0 + (p * B + b) * 512, 64);
                    _tile_loadd(7, p1 + (p * B + b) * 512, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                }
                _tile_stored(0, cbuf[0], 64);
                _tile_stored(1, cbuf[1], 64);
                _tile_stored(2, cbuf[2], 64);
                _tile_stored(3, cbuf[3], 64);
#ifndef PROBE_NO_SCALING
                for (int t = 0; t < 4; t++) {
                    const int ns = t / 2, ms = t % 2;
                    const float *dd = d + ns * B * 16 + b * 16, *m2 = mm + ns * B * 16 + b * 16;
                    const __m512 xsum = _mm512_load_ps(xs + ((mg + ms) * B + b) * 16);
                    for (int r = 0; r < 16; r++) {
                        __m512 a = _mm512_load_ps(acc[t][r]);
                        a = _mm512_fmadd_ps(_mm512_set1_ps(dd[r]), _mm512_load_ps(cbuf[t][r]), a);
                        a = _mm512_fmadd_ps(_mm512_set1_ps(m2[r]), xsum, a);
                        _mm512_store_ps(acc[t][r], a);
                    }
                }
#endif
            }
            for (int t = 0; t < 4; t++) {
                const int64_t n0 = ng * 16 + (t / 2) * 16, mb = (mg + t % 2) * 16;
                if (n0 + 16 <= N && mb + 16 <= M) {
                    for (int c = 0; c < 16; c++) {
                        __m512 col = _mm512_i32gather_ps(_mm512_mullo_epi32(_mm512_set1_epi32(16), _mm512_setr_epi32(0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15)), &acc[t][0][c], 4);
                        _mm512_storeu_ps(out + (mb + c) * N + n0, col);
                    }
                } else
                    for (int c = 0; c < 16; c++)
                        for (int r = 0; r < 16; r++)
                            if (n0 + r < N && mb + c < M) out[(mb + c) * N + n0 + r] = acc[t][r][c];
            }
        }
    }
    free(px);
    free(xs);
    free(wa);
    free(d);
    free(mm);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
    if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) {
        printf("no AMX permission\n");
        return 1;
    }
    tilecfg cfg = {0};
    cfg.palette = 1;
    for (int i = 0; i < 8; i++) {
        cfg.rows[i] = 16;
        cfg.colsb[i] = 64;
    }
    _tile_loadconfig(&cfg);
    int shapes[3][2] = {{1536, 576}, {576, 1536}, {3072, 576}};
    int Ms[3] = {32, 64, 256};
    srand(1);
    for (int si = 0; si < 3; si++)
        for (int mi = 0; mi < 3; mi++) {
            int N = shapes[si][0], K = shapes[si][1], M = Ms[mi];
            int64_t rb = K / 32 * 20;
            uint8_t *w = malloc(N * rb);
            for (int64_t i = 0; i < N * rb; i++) w[i] = rand();
            for (int n = 0; n < N; n++)
                for (int b = 0; b < K / 32; b++) {
                    uint8_t *blk = w + n * rb + b * 20;
                    float dv = 0.002f + 0.01f * rand() / RAND_MAX, mv = -8 * dv * (0.5f + (float)rand() / RAND_MAX);
                    uint16_t hd = _cvtss_sh(dv, 0), hm = _cvtss_sh(mv, 0);
                    memcpy(blk, &hd, 2);
                    memcpy(blk + 2, &hm, 2);
                }
            float *x = malloc(sizeof(float) * M * K), *o1 = malloc(sizeof(float) * M * N),
                  *o2 = malloc(sizeof(float) * M * N), *wf = malloc(sizeof(float) * N * K);
            for (int i = 0; i < M * K; i++) x[i] = (float)rand() / RAND_MAX * 2 - 1;
            int64_t *idx = malloc(8 * N); for (int i = 0; i < N; i++) idx[i] = i;
            dequantize_rows(w, rb, 3, K, idx, N, wf); free(idx);
            double t1 = 1e9, t2 = 1e9;
            for (int rep = 0; rep < 15; rep++) {
                double t = now();
                quantized_gemm(x, M, K, w, N, rb, 3, NULL, o1, 1);
                t = now() - t;
                if (t < t1) t1 = t;
                t = now();
                amx_gemm(x, M, K, w, N, rb, o2);
                t = now() - t;
                if (t < t2) t2 = t;
            }
            double e1 = 0, e2 = 0, mx = 0;
            for (int m = 0; m < M; m++)
                for (int n = 0; n < N; n++) {
                    double ref = 0;
                    for (int k = 0; k < K; k++) ref += (double)x[m * K + k] * wf[n * K + k];
                    e1 = fmax(e1, fabs(o1[m * N + n] - ref));
                    e2 = fmax(e2, fabs(o2[m * N + n] - ref));
                    mx = fmax(mx, fabs(ref));
                }
            printf("N=%d K=%d M=%d  f32 gemm %.3f ms  amx %.3f ms  %.2fx   maxerr f32 %.2e amx %.2e (|ref| %.1f)\n", N, K,
                   M, t1 * 1e3, t2 * 1e3, t1 / t2, e1, e2, mx);
            free(w);
            free(x);
            free(o1);
            free(o2);
            free(wf);
        }
    _tile_release();
    return 0;
}
