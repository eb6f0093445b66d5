/* The GEMM's tile path on AMX-BF16 CPUs for Q4_0, Q4_1 and Q8_0 blocks, exact like the vector path.
 *
 *   y[m][n] = sum_b d[n,b] S[m,n,b] (+ min[n,b] X[m,b] for Q4_1),  S = sum_j x[m,32b+j] q[n,b,j],
 *   X = sum_j x[m,32b+j]
 *
 * The integer codes q (Q4_0's q - 8, Q4_1's q, Q8_0's q) are exact in bf16, and each float32 of x is
 * split into three bf16 parts (hi + mid + lo: its whole 24-bit significand), so three `tdpbf16ps` a
 * block, accumulating in float32, give S without rounding the activations. Each block's tile of S is
 * then scaled into float32 accumulators laid out as the vector path's ([column][PM row]), stored by the
 * same store_tile. Error against a float64 product: the same order as the vector path's (summation
 * order only; benchmarks/RESULTS.md, "Fourteenth session").
 *
 * Tiles: 3 accumulators of 16 weight rows x 16 x rows (a group's 48 rows), 3 of weights, 1 of x.
 * x is packed by gemm_pack next to its float32 panels, per panel of PM = 32 rows, per block, per part,
 * per 16 rows: [16 pairs of k][16 rows] of bf16 pairs (the layout `tdpbf16ps` reads), and its block
 * sums [16]. The tile configuration is loaded at every entry and released at every exit: the
 * threads are OpenMP's, shared with oneDNN, which loads its own.
 * Only where the compiler targets AMX-BF16 (-march=native on such a CPU) and the kernel grants the
 * process the tile state (arch_prctl); elsewhere AMX_TILES is 0 and the vector path runs. */
#ifndef SERVEKIT_AMX_TILES_H
#define SERVEKIT_AMX_TILES_H

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define AMX_TILES 1
#include <immintrin.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "blocks.h"

#define AMX_FROM_ROWS 16 /* x rows from which the tiles run (one tile of x rows) */
#define AMX_GROUP 48     /* weight rows of a group: 3 tiles */

/* -1 not asked yet, 0 refused or switched off, 1 on. */
static atomic_int amx_state = -1;

static int amx_enabled(void) {
    int state = atomic_load(&amx_state);
    if (state < 0) { /* ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA; a race asks twice, same answer */
        state = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
        atomic_store(&amx_state, state);
    }
    return state;
}

typedef struct {
    uint8_t palette, start;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config_t;

static void amx_begin(void) {
    amx_config_t config = {0};
    config.palette = 1;
    for (int t = 0; t < 8; t++) {
        config.rows[t] = 16;
        config.colsb[t] = 64;
    }
    _tile_loadconfig(&config);
}

/* Floats the tile path packs after x's float32 panels: per panel, per block, per tile of 16 rows,
 * 3 parts of 256 pairs and 16 block sums. */
static inline int64_t amx_packed_floats(int64_t m, int64_t k, int64_t pm) {
    return (m + pm - 1) / pm * (k / 32) * (pm / 16) * (3 * 256 + 16);
}

static inline __m512 bf16_to_float(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* r[i] (element j: [i][j]) becomes r[j] (element i: [i][j]), 16 x 16 32-bit elements. */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) { /* per 128-bit lane: [a0 b0 a1 b1], [a2 b2 a3 b3] */
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* u[4i + c], lane L: column 4L + c of rows 4i..4i+3 */
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int c = 0; c < 4; c++) { /* a 4 x 4 transpose of the lanes of r[c], r[4 + c], r[8 + c], r[12 + c] */
        const __m512i s0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44), s1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xEE);
        const __m512i s2 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44);
        const __m512i s3 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xEE);
        t[c] = _mm512_shuffle_i32x4(s0, s2, 0x88);
        t[4 + c] = _mm512_shuffle_i32x4(s0, s2, 0xDD);
        t[8 + c] = _mm512_shuffle_i32x4(s1, s3, 0x88);
        t[12 + c] = _mm512_shuffle_i32x4(s1, s3, 0xDD);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* Panel `panel` (pm rows of x [m][k], zeros past m; k a multiple of 32, pm of 16: the GEMM's panel)
 * into `packed` (amx_packed_floats(m, k, pm)): its bf16 parts, then its block sums. Per 16 rows and
 * block: each row's three parts as 16 bf16 pairs, then a transpose, so a tile row holds one pair of
 * all 16 rows. */
static void amx_pack(const float *x, int64_t m, int64_t k, int64_t pm, int64_t panel, float *packed) {
    const int64_t blocks = k / 32, panels = (m + pm - 1) / pm, tiles = pm / 16;
    uint32_t *pairs = (uint32_t *)packed;
    float *sums = packed + panels * blocks * tiles * 3 * 256;
    for (int64_t tile = 0; tile < tiles; tile++) {
        const int64_t row0 = panel * pm + tile * 16;
        for (int64_t b = 0; b < blocks; b++) {
            __m512i h[3][16];
            float *sum = sums + ((panel * blocks + b) * tiles + tile) * 16;
            for (int lane = 0; lane < 16; lane++) {
                __m512 v0 = _mm512_setzero_ps(), v1 = v0;
                if (row0 + lane < m) {
                    v0 = _mm512_loadu_ps(x + (row0 + lane) * k + 32 * b);
                    v1 = _mm512_loadu_ps(x + (row0 + lane) * k + 32 * b + 16);
                }
                sum[lane] = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
                for (int part = 0; part < 3; part++) {
                    h[part][lane] = (__m512i)_mm512_cvtne2ps_pbh(v1, v0);
                    v0 = _mm512_sub_ps(v0, bf16_to_float(_mm512_castsi512_si256(h[part][lane])));
                    v1 = _mm512_sub_ps(v1, bf16_to_float(_mm512_extracti64x4_epi64(h[part][lane], 1)));
                }
            }
            for (int part = 0; part < 3; part++) {
                transpose16(h[part]);
                uint32_t *dst = pairs + (((panel * blocks + b) * 3 + part) * tiles + tile) * 256;
                for (int j = 0; j < 16; j++) _mm512_store_si512(dst + j * 16, h[part][j]);
            }
        }
    }
}

/* Weight rows [first, first + count) (count <= AMX_GROUP) into codes [tile][block][16][32] bf16 and
 * scales/mins [tile][block][16] (zeros past count). */
static void amx_convert(const uint8_t *w, int64_t row_bytes, int type, int64_t first, int64_t count,
                        int64_t blocks, uint16_t *codes, float *scales, float *mins) {
    const int ntiles = (int)((count + 15) / 16);
    /* Q4_0/Q4_1: a nibble's bf16 code by table (q - 8 or q, exact), 32 a block in one permute */
    const __m512 ramp = _mm512_sub_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                      _mm512_set1_ps(type == GGML_Q4_0 ? 8.0f : 0.0f));
    const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(ramp, ramp);
    const __m128i low_nibbles = _mm_set1_epi8(0x0F);
    for (int r = 0; r < ntiles * 16; r++) {
        const int tile = r / 16, lane = r % 16;
        for (int64_t b = 0; b < blocks; b++) {
            uint16_t *dst = codes + ((tile * blocks + b) * 16 + lane) * 32;
            const int64_t at = (tile * blocks + b) * 16 + lane;
            if (r >= count) {
                memset(dst, 0, 64);
                scales[at] = mins[at] = 0.0f;
                continue;
            }
            const uint8_t *block = w + (first + r) * row_bytes;
            if (type == GGML_Q8_0) {
                block += b * 34;
                const __m256i q = _mm256_loadu_si256((const __m256i *)(block + 2));
                const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
                const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
                _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
                mins[at] = 0.0f;
            } else {
                const int q4_1 = type == GGML_Q4_1;
                block += b * (q4_1 ? 20 : 18);
                const __m128i bytes = _mm_loadu_si128((const __m128i *)(block + (q4_1 ? 4 : 2)));
                const __m128i lo = _mm_and_si128(bytes, low_nibbles);
                const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_nibbles);
                const __m512i nibbles = _mm512_cvtepu8_epi16(_mm256_set_m128i(hi, lo)); /* weights 0-15, 16-31 */
                _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(nibbles, table));
                mins[at] = q4_1 ? half_to_float(block + 2) : 0.0f;
            }
            scales[at] = half_to_float(block);
        }
    }
}

/* The x tiles of one panel (`mtiles` of 16 rows; `pairs` their parts at block 0, [block][part][tile]
 * of 256 pairs; `sums` their block sums, [block][tile] of 16) against `ntiles` weight tiles:
 * acc [ntiles * 16 columns][pm] += the scaled tiles, block by block, each block's weight tiles loaded
 * once for every x tile. */
static void amx_panel(const uint32_t *pairs, const float *sums, int mtiles, const uint16_t *codes,
                      const float *scales, const float *mins, int64_t blocks, int ntiles, int with_mins, float *acc,
                      int64_t pm) {
    float tiles[3][16][16] __attribute__((aligned(64)));
    const int64_t tile_stride = 256, part_stride = pm / 16 * 256, block_stride = 3 * part_stride;
    for (int64_t b = 0; b < blocks; b++) {
        _tile_loadd(3, codes + b * 512, 64);
        if (ntiles > 1) _tile_loadd(4, codes + (blocks + b) * 512, 64);
        if (ntiles > 2) _tile_loadd(5, codes + (2 * blocks + b) * 512, 64);
        for (int mt = 0; mt < mtiles; mt++) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            for (int part = 0; part < 3; part++) {
                _tile_loadd(6, pairs + b * block_stride + part * part_stride + mt * tile_stride, 64);
                _tile_dpbf16ps(0, 3, 6);
                if (ntiles > 1) _tile_dpbf16ps(1, 4, 6);
                if (ntiles > 2) _tile_dpbf16ps(2, 5, 6);
            }
            _tile_stored(0, tiles[0], 64);
            if (ntiles > 1) _tile_stored(1, tiles[1], 64);
            if (ntiles > 2) _tile_stored(2, tiles[2], 64);
            const __m512 xsum = _mm512_loadu_ps(sums + (b * (pm / 16) + mt) * 16);
            for (int t = 0; t < ntiles; t++) {
                const float *d = scales + (t * blocks + b) * 16, *mn = mins + (t * blocks + b) * 16;
                for (int r = 0; r < 16; r++) {
                    float *a = acc + (t * 16 + r) * pm + mt * 16;
                    __m512 v = _mm512_fmadd_ps(_mm512_set1_ps(d[r]), _mm512_load_ps(tiles[t][r]), _mm512_load_ps(a));
                    if (with_mins) v = _mm512_fmadd_ps(_mm512_set1_ps(mn[r]), xsum, v);
                    _mm512_store_ps(a, v);
                }
            }
        }
    }
}

#else
#define AMX_TILES 0
#endif

#endif
