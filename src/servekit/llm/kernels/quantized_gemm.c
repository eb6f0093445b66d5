/* Prefill: y = x @ W.T (+ bias) for many rows of x, W as GGUF's quantised blocks.
 *
 * The same numbers as quantized_matmul.c (the weights dequantised exactly, float32 products with the
 * activations unrounded, one float32 sum per output over K in order), laid out for compute rather than
 * for bytes read: prefill has M rows of x per weight row, so dequantising a weight row once per call
 * costs 1/M of its multiply-adds, and what is left is a register-blocked GEMM.
 *
 *  - x is packed once per call into panels of PM rows, k-major ([K][PM]), zero-padded past M;
 *  - each thread takes groups of GN weight rows, dequantises them into its own scratch (GN x K floats,
 *    a bounded buffer of L2 size; no float32 weight survives the call): Q4_0/Q4_1/Q8_0 block by block
 *    inside the micro-kernels of the group's first panel (blocks.h; the scratch blocked per slice of
 *    NC rows), the K-quants beforehand with quantized_matmul.c's dequantize_rows ([GN][K]);
 *  - a PM x NC micro-kernel keeps PM/LANES x NC vector accumulators in registers: per k, PM/LANES
 *    vector loads of x and NC broadcasts of weights feed PM/LANES x NC FMAs.
 * Vector width by the CPU the library is built for (-march=native, cached per CPU): AVX-512 16 lanes,
 * AVX2 + FMA 8, else 4 (SSE, NEON or scalar code: what the compiler makes of GCC's generic vectors),
 * all from one source.
 * Threads: OpenMP over weight-row groups, on the process's OpenMP pool (PyTorch's).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx_tiles.h"
#include "blocks.h"

/* quantized_matmul.c: rows `indices` of w dequantised into out [count][k]; 0 or -2 (bad geometry). */
int dequantize_rows(const uint8_t *w, int64_t row_bytes, int type, int64_t k, const int64_t *indices,
                    int64_t count, float *out);

#if defined(__AVX512F__)
#define LANES 16
#define NC 12 /* 32 registers: 2 x 12 accumulators */
#elif defined(__AVX2__) && defined(__FMA__)
#define LANES 8
#define NC 6 /* 16 registers: 2 x 6 accumulators, 2 x loads, 1 broadcast */
#else
#define LANES 4
#define NC 6
#endif
#define MV 2                 /* vectors of x rows per micro-kernel */
#define PM (MV * LANES)      /* x rows of a panel */
#define GN (4 * NC)          /* weight rows dequantised together */
#if AMX_TILES && GN != AMX_GROUP
#error "the tile path's group is the vector path's"
#endif
#ifndef FUSED_DEQUANT
#define FUSED_DEQUANT 1 /* the 32-weight types dequantised inside the first panel's micro-kernel */
#endif
#ifndef XBLOCK_BYTES
#define XBLOCK_BYTES (512 * 1024) /* x rows met by each dequantised weight group: about L2 */
#endif

typedef float vec_t __attribute__((vector_size(LANES * sizeof(float))));

int quantized_gemm_lanes(void) { return LANES; }

/* The tile path (amx_tiles.h): `enable` 0 switches it off, 1 on where the CPU and kernel allow it,
 * -1 asks. Returns whether it is on. (A switch for tests and benchmarks, between calls.) */
int quantized_gemm_tiles(int enable) {
#if AMX_TILES
    if (enable == 0) atomic_store(&amx_state, 0);
    if (enable == 1 && atomic_load(&amx_state) == 0) atomic_store(&amx_state, -1);
    return amx_enabled();
#else
    (void)enable;
    return 0;
#endif
}

/* Whether x of m rows goes through the tiles (then packed for them too) where its width allows. */
static int tiles_for_rows(int64_t m) {
#if AMX_TILES
    return m >= AMX_FROM_ROWS && amx_enabled();
#else
    (void)m;
    return 0;
#endif
}
static int tiles_for(int64_t m, int64_t k) { return k % 32 == 0 && tiles_for_rows(m); }

/* The 32-weight block types: dequantised inside the micro-kernels, and the ones the tiles take. */
static inline int block32_type(int type) { return type == GGML_Q4_0 || type == GGML_Q4_1 || type == GGML_Q8_0; }

/* x rows [first, first + rows) (rows <= PM) into panel [k][PM], zeros past `rows`. */
static void pack_panel(const float *x, int64_t k, int64_t first, int64_t rows, float *panel) {
    if (rows < PM) memset(panel, 0, sizeof(float) * (size_t)(k * PM));
    for (int64_t r = 0; r < rows; r++) {
        const float *src = x + (first + r) * k;
        for (int64_t i = 0; i < k; i++) panel[i * PM + r] = src[i];
    }
}

/* One block of 32 weights of a Q4_0/Q4_1/Q8_0 row into y (`type` a constant at each call site). */
static inline __attribute__((always_inline)) void dequant_block(const uint8_t *block, int type, float *y) {
    if (type == GGML_Q4_1)
        dequant_q4_1(block, y);
    else if (type == GGML_Q4_0)
        dequant_q4_0(block, y);
    else
        dequant_q8_0(block, y);
}

static inline int block_bytes_of(int type) { return type == GGML_Q4_0 ? 18 : type == GGML_Q4_1 ? 20 : 34; }

/* acc_out[c][r] = sum_i panel[i][r] * w(c, i) for the first mv * LANES rows of the panel (mv <= MV, a
 * constant at each call site: a last panel of at most LANES rows costs half a panel, not a whole one)
 * against a slice of NC weight rows, w(c, i) = w[(i / 32) * bstride + c * cstride + i % 32]: the
 * scratch as dequantize_rows writes it (cstride K, bstride 32) or blocked (cstride 32, bstride NC * 32:
 * the slice's rows block by block, so the NC weights of each k are one pointer and constant offsets).
 *
 * `type` 0: w is ready. Q4_0/Q4_1/Q8_0 (blocked scratch only): the slice is dequantised on the way,
 * from `live` (<= NC; the rows past it are zeros already) rows of blocks at `wrows`, `row_bytes`
 * apart: block b + 1 of each row while the FMAs run on block b, and the next slice's bytes (its rows
 * follow) are prefetched as they go. The conversion then sits a few hundred instructions from the FMAs
 * it overlaps with (the out-of-order window), not a group of rows before them, and the weights stream
 * in behind the FMAs: at 32 rows of x a weight feeds only 2 vector FMAs. Same floats in w, same FMAs
 * in the same order as dequantize_rows then the ready case: the results are bit-identical. */
static inline __attribute__((always_inline)) void micro_kernel(const float *panel, float *w, int64_t cstride,
                                                               int64_t bstride, int64_t k, float *acc_out,
                                                               const int mv, const int type,
                                                               const uint8_t *wrows, int64_t row_bytes,
                                                               int live) {
    const int64_t blocks = k / 32, bytes = type ? block_bytes_of(type) : 0;
    vec_t acc[MV][NC];
    for (int v = 0; v < mv; v++)
        for (int c = 0; c < NC; c++)
            acc[v][c] = (vec_t){0};
    if (type)
        for (int c = 0; c < live; c++) dequant_block(wrows + c * row_bytes, type, w + c * cstride);
    for (int64_t b = 0; b < blocks; b++) {
        if (type) {
            const uint8_t *next = wrows + NC * row_bytes + b * NC * bytes;
            for (int64_t line = 0; line < NC * bytes; line += 64) __builtin_prefetch(next + line, 0, 3);
            if (b + 1 < blocks)
                for (int c = 0; c < live; c++)
                    dequant_block(wrows + c * row_bytes + (b + 1) * bytes, type, w + (b + 1) * bstride + c * cstride);
        }
        const float *wb = w + b * bstride;
        const float *pb = panel + b * 32 * PM;
        for (int j = 0; j < 32; j++) {
            vec_t xv[MV];
            for (int v = 0; v < mv; v++) xv[v] = *(const vec_t *)(pb + j * PM + v * LANES);
            for (int c = 0; c < NC; c++) {
                const vec_t wv = (vec_t){0} + wb[c * cstride + j];
                for (int v = 0; v < mv; v++) acc[v][c] += xv[v] * wv;
            }
        }
    }
    for (int c = 0; c < NC; c++)
        for (int v = 0; v < mv; v++) *(vec_t *)(acc_out + c * PM + v * LANES) = acc[v][c];
}

/* One panel against one slice (micro_kernel), its constants fixed per call site: `dequant` (the first
 * panel of a group of a 32-weight type), the scratch's layout (blocked for those types), `mv`. */
static void slice_kernel(const float *panel, float *w, int64_t k, float *acc_out, int mr, int type, int blocked,
                         int dequant, const uint8_t *wrows, int64_t row_bytes, int live) {
#define SLICE(MVC)                                                                                     \
    do {                                                                                               \
        if (!blocked)                                                                                  \
            micro_kernel(panel, w, k, 32, k, acc_out, MVC, 0, NULL, 0, 0);                             \
        else if (!dequant)                                                                             \
            micro_kernel(panel, w, 32, NC * 32, k, acc_out, MVC, 0, NULL, 0, 0);                       \
        else if (type == GGML_Q4_1)                                                                    \
            micro_kernel(panel, w, 32, NC * 32, k, acc_out, MVC, GGML_Q4_1, wrows, row_bytes, live);   \
        else if (type == GGML_Q4_0)                                                                    \
            micro_kernel(panel, w, 32, NC * 32, k, acc_out, MVC, GGML_Q4_0, wrows, row_bytes, live);   \
        else                                                                                           \
            micro_kernel(panel, w, 32, NC * 32, k, acc_out, MVC, GGML_Q8_0, wrows, row_bytes, live);   \
    } while (0)
    if (mr <= LANES)
        SLICE(1);
    else
        SLICE(MV);
#undef SLICE
}

#if defined(__AVX2__) /* AVX-512 CPUs too: 8 x 8 tiles of the 16-lane accumulators */
#include <immintrin.h>
/* r[j] (lane i: element [i][j]) becomes r[i] (lane j: element [i][j]). */
static inline void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}
#define TILE_T 8
#else
#define TILE_T 0
#endif

/* acc [columns][PM] (column c of the group: x rows of the panel) into dst [rows][ldd] (+ bias [count]):
 * full 8 x 8 tiles through registers (a scalar copy reading one float of each vector stored by the
 * micro-kernel cost ~10% of a 32-row GEMM), the edges one by one. */
static void store_tile(const float *acc, int rows, int64_t count, const float *bias, float *dst, int64_t ldd) {
    int r0 = 0;
#if TILE_T
    const int64_t full_cols = count / TILE_T * TILE_T;
    for (; r0 + TILE_T <= rows; r0 += TILE_T) {
        for (int64_t c0 = 0; c0 < full_cols; c0 += TILE_T) {
            __m256 v[8];
            for (int j = 0; j < 8; j++) v[j] = _mm256_load_ps(acc + (c0 + j) * PM + r0);
            transpose8(v);
            const __m256 b = bias ? _mm256_loadu_ps(bias + c0) : _mm256_setzero_ps();
            for (int i = 0; i < 8; i++) _mm256_storeu_ps(dst + (r0 + i) * ldd + c0, _mm256_add_ps(v[i], b));
        }
        for (int r = r0; r < r0 + TILE_T; r++)
            for (int64_t c = full_cols; c < count; c++) dst[r * ldd + c] = acc[c * PM + r] + (bias ? bias[c] : 0.0f);
    }
#endif
    for (int r = r0; r < rows; r++)
        for (int64_t c = 0; c < count; c++) dst[r * ldd + c] = acc[c * PM + r] + (bias ? bias[c] : 0.0f);
}

#if AMX_TILES
/* gemm_group on the tiles: x rows [m0, m1) of the m packed in `tiles_x` (amx_pack's panels); wbuf
 * holds the group's codes and scales (27 k floats of its GN k), acc the same [GN][PM] as the vectors'. */
static void tile_group(const float *tiles_x, int64_t m, int64_t m0, int64_t m1, int64_t k, const uint8_t *w,
                       int64_t n, int64_t row_bytes, int type, const float *bias, float *out, int64_t ldo, int64_t g,
                       float *wbuf, float *acc) {
    const int64_t first = g * GN, count = n - first < GN ? n - first : GN;
    const int64_t blocks = k / 32, panels = (m + PM - 1) / PM, tiles = PM / 16;
    uint16_t *codes = (uint16_t *)wbuf;
    float *scales = wbuf + 3 * blocks * 256, *mins = scales + 3 * blocks * 16;
    amx_convert(w, row_bytes, type, first, count, blocks, codes, scales, mins);
    const int ntiles = (int)((count + 15) / 16);
    const uint32_t *pairs = (const uint32_t *)tiles_x;
    const float *sums = tiles_x + panels * blocks * tiles * 3 * 256;
    amx_begin();
    for (int64_t p0 = m0; p0 < m1; p0 += PM) {
        const int mr = (int)(m1 - p0 < PM ? m1 - p0 : PM);
        const int64_t panel = p0 / PM;
        memset(acc, 0, sizeof(float) * (size_t)(ntiles * 16 * PM));
        amx_panel(pairs + panel * blocks * 3 * tiles * 256, sums + panel * blocks * tiles * 16, (mr + 15) / 16, codes,
                  scales, mins, blocks, ntiles, type == GGML_Q4_1, acc, PM);
        store_tile(acc, mr, count, bias ? bias + first : NULL, out + p0 * ldo + first, ldo);
    }
    _tile_release();
}
#endif

/* Weight-row group g of w (rows [g GN, g GN + GN) of n) against x rows [m0, m1) of `packed` (panels of
 * PM rows from pack_panel, m0 a multiple of PM): out [m][ldo] columns of the group (+ bias), through the
 * thread's scratch wbuf [GN][k] and acc [GN][PM]. The group is dequantised afresh (cheap next to the
 * m1 - m0 multiply-adds per weight): the 32-weight types inside the first panel's kernels. With
 * `tiles_x` (x of m rows packed for the tiles too), those types run on the tiles instead. */
static void gemm_group(const float *packed, const float *tiles_x, int64_t m, int64_t m0, int64_t m1, int64_t k,
                       const uint8_t *w, int64_t n, int64_t row_bytes, int type, const float *bias, float *out,
                       int64_t ldo, int64_t g, float *wbuf, float *acc) {
#if AMX_TILES
    if (tiles_x != NULL && block32_type(type)) {
        tile_group(tiles_x, m, m0, m1, k, w, n, row_bytes, type, bias, out, ldo, g, wbuf, acc);
        return;
    }
#else
    (void)tiles_x;
    (void)m;
#endif
    const int fused = FUSED_DEQUANT && block32_type(type);
    const int64_t first = g * GN;
    const int64_t count = n - first < GN ? n - first : GN;
    const int64_t padded = (count + NC - 1) / NC * NC;
    const float *ready = wbuf; /* the group's float32 rows [padded][k], unless fused */
    if (type == GGML_F32) { /* the weight rows themselves; a last group short of whole slices copied */
        const float *rows = (const float *)(w + first * row_bytes);
        if (padded == count) {
            ready = rows;
        } else {
            memcpy(wbuf, rows, sizeof(float) * (size_t)(count * k));
            memset(wbuf + count * k, 0, sizeof(float) * (size_t)((padded - count) * k));
        }
    } else if (fused) { /* blocked scratch, written by the first panel's kernels; zero rows past n */
        if (padded > count) memset(wbuf + (padded - NC) * k, 0, sizeof(float) * (size_t)(NC * k));
    } else {
        int64_t indices[GN];
        for (int64_t r = 0; r < count; r++) indices[r] = first + r;
        dequantize_rows(w, row_bytes, type, k, indices, count, wbuf);
        if (padded > count) memset(wbuf + count * k, 0, sizeof(float) * (size_t)((padded - count) * k));
    }
    for (int64_t p0 = m0; p0 < m1; p0 += PM) {
        const int mr = (int)(m1 - p0 < PM ? m1 - p0 : PM);
        for (int64_t s = 0; s < padded; s += NC)
            /* (slice_kernel writes into its weights only when it dequantises: wbuf, never `ready`'s rows) */
            slice_kernel(packed + p0 * k, (float *)(fused ? wbuf : ready) + s * k, k, acc + s * PM, mr, type, fused,
                         fused && p0 == m0, w + (first + s) * row_bytes, row_bytes,
                         (int)(count - s < NC ? count - s : NC));
        store_tile(acc, mr, count, bias ? bias + first : NULL, out + p0 * ldo + first, ldo);
    }
}

/* x rows met by each dequantised weight group at a time: about L2, whole panels. */
static int64_t x_block_rows(int64_t k) {
    const int64_t rows = XBLOCK_BYTES / (int64_t)sizeof(float) / k / PM * PM;
    return rows < PM ? PM : rows;
}

/* -- the pieces decode_step.c runs inside its own parallel region ----------------------------- */

int64_t gemm_group_rows(void) { return GN; }

/* The packed x: float32 panels (pack_panel's), then, when the tiles take x, its tile parts. */
static int64_t panel_floats(int64_t m, int64_t k) { return (m + PM - 1) / PM * PM * k; }
static const float *tiles_part(const float *packed, int64_t m, int64_t k) {
    return tiles_for(m, k) ? packed + panel_floats(m, k) : NULL;
}

/* Floats of the packed x of m rows of k (gemm_pack) and of a thread's scratch (gemm_groups). */
int64_t gemm_packed_floats(int64_t m, int64_t k) {
#if AMX_TILES
    /* (by rows alone: a caller sizes one buffer by its widest k for narrower ones too) */
    if (tiles_for_rows(m)) return panel_floats(m, k) + amx_packed_floats(m, k, PM);
#endif
    return panel_floats(m, k);
}
int64_t gemm_scratch_floats(int64_t k) { return GN * k + GN * PM; }

/* x [m][k] packed (64-byte aligned `packed` of gemm_packed_floats(m, k)). */
void gemm_pack(const float *x, int64_t m, int64_t k, float *packed) {
    float *tiles_x = (float *)tiles_part(packed, m, k);
    for (int64_t p = 0; p * PM < m; p++) {
        const int64_t rows = m - p * PM < PM ? m - p * PM : PM;
        pack_panel(x, k, p * PM, rows, packed + p * PM * k);
#if AMX_TILES
        if (tiles_x != NULL) amx_pack(x, m, k, PM, p, tiles_x);
#else
        (void)tiles_x;
#endif
    }
}

/* Groups [g0, g1) of x @ W.T (+ bias) for all m rows of the packed x into out [m][ldo]: the numbers
 * quantized_gemm computes. scratch: 64-byte aligned, gemm_scratch_floats(k). */
void gemm_groups(const float *packed, int64_t m, int64_t k, const uint8_t *w, int64_t n, int64_t row_bytes,
                 int type, const float *bias, float *out, int64_t ldo, int64_t g0, int64_t g1, float *scratch) {
    const int64_t block_rows = x_block_rows(k);
    const float *tiles_x = tiles_part(packed, m, k);
    for (int64_t g = g0; g < g1; g++)
        for (int64_t m0 = 0; m0 < m; m0 += block_rows)
            gemm_group(packed, tiles_x, m, m0, m - m0 < block_rows ? m : m0 + block_rows, k, w, n, row_bytes, type,
                       bias, out, ldo, g, scratch, scratch + GN * k);
}

/* x float32 [m][k] contiguous, w [n][row_bytes] blocks of GGML `type`, out float32 [m][n]; bias
 * float32 [n] or NULL. Returns 0, -1 (out of memory) or -2 (unknown type or wrong geometry). */
int quantized_gemm(const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                   int64_t row_bytes, int type, const float *bias, float *out, int threads) {
    if (dequantize_rows(w, row_bytes, type, k, NULL, 0, NULL) != 0) return -2; /* geometry only */
    if (threads < 1) threads = 1;
    if (m <= 0 || n <= 0) return 0;
    const int64_t panels = (m + PM - 1) / PM, groups = (n + GN - 1) / GN;
    const int64_t block_rows = x_block_rows(k);
    float *packed = aligned_alloc(64, sizeof(float) * (size_t)gemm_packed_floats(m, k));
    if (packed == NULL) return -1;
    const float *tiles_x = tiles_part(packed, m, k);
    int status = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
    {
        float *wbuf = aligned_alloc(64, sizeof(float) * (size_t)(GN * k));
        float *acc = aligned_alloc(64, sizeof(float) * (size_t)(GN * PM));
        if (wbuf == NULL || acc == NULL) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            status = -1;
        }
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t p = 0; p < panels; p++) {
            const int64_t rows = m - p * PM < PM ? m - p * PM : PM;
            pack_panel(x, k, p * PM, rows, packed + p * PM * k);
#if AMX_TILES
            if (tiles_x != NULL) amx_pack(x, m, k, PM, p, (float *)tiles_x);
#endif
        }
        /* x in blocks of `block_rows` rows (L2-sized), each met by every weight group: the groups
         * are dequantised again per block (cheap next to block_rows multiply-adds per weight). */
        for (int64_t m0 = 0; m0 < m; m0 += block_rows) {
            const int64_t m1 = m - m0 < block_rows ? m : m0 + block_rows;
#ifdef _OPENMP
#pragma omp for schedule(static) nowait
#endif
            for (int64_t g = 0; g < groups; g++)
                if (wbuf != NULL && acc != NULL)
                    gemm_group(packed, tiles_x, m, m0, m1, k, w, n, row_bytes, type, bias, out, n, g, wbuf, acc);
        }
        free(wbuf);
        free(acc);
    }
    free(packed);
    return status;
}
