/* Decode attention straight over the paged KV cache.
 *
 * One query token per sequence attends to the first context_len keys/values of its sequence, read
 * block by block through its block table: nothing is gathered or padded, no mask is built. The
 * query heads that share a KV head are handled together, so each key and value is loaded once per
 * KV head. Accumulation is in float32 whatever the storage types (float32, bfloat16, float16; the
 * cache may be stored narrower than the query, e.g. a bfloat16 cache for a float32 model).
 *
 * Cache layout per layer: [num_blocks][2][num_kv_heads][block_size][head_dim] (0 = key, 1 = value):
 * a KV head's keys in a block are contiguous rows.
 * Built at run time by servekit.llm.kernels with the machine's C compiler.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dtypes.h"

static inline void load_row(float *dst, const void *src, int64_t offset, int n, int dtype) {
    for (int i = 0; i < n; i++) dst[i] = load_element(src, offset + i, dtype);
}

static inline void store_row(void *dst, int64_t offset, const float *src, int n, int dtype) {
    for (int i = 0; i < n; i++) store_element(dst, offset + i, src[i], dtype);
}

typedef struct {
    const void *query;          /* [num_seqs][num_heads][head_dim] */
    const void *cache;          /* one layer, layout above */
    const int32_t *block_tables; /* [num_seqs][max_blocks] */
    const int32_t *context_lens; /* [num_seqs] */
    void *out;                  /* [num_seqs][num_heads][head_dim] */
    int num_seqs, num_heads, num_kv_heads, head_dim, block_size, max_blocks;
    int sliding_window; /* <= 0: none */
    int dtype;    /* of query and out */
    int kv_dtype; /* of the cache */
    float scale;
    int num_threads;
    int thread_index;
    int status;
} job_t;

/* Element offset of row (token `o` of cache block `block`, KV head `h`; part 0 = key, 1 = value). */
static inline int64_t row_offset(const job_t *job, int32_t block, int part, int h, int o) {
    return (((int64_t)block * 2 + part) * job->num_kv_heads + h) * job->block_size * job->head_dim +
           (int64_t)o * job->head_dim;
}


/* One vector of float32 lanes, chosen by the CPU this library is compiled on (-march=native, cached
 * per CPU): AVX-512 (16 lanes), else AVX2 + FMA + F16C (8 lanes), else the portable loop only. */
#if defined(__AVX512F__)
#include <immintrin.h>
#define LANES 16
typedef __m512 vec_t;
static inline vec_t vload(const void *base, int64_t offset, int dtype) {
    if (dtype == DTYPE_F32) return _mm512_loadu_ps((const float *)base + offset);
    __m256i half = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + offset));
    if (dtype == DTYPE_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
    return _mm512_cvtph_ps(half);
}
static inline float vsum(vec_t v) { return _mm512_reduce_add_ps(v); }
#define vset1 _mm512_set1_ps
#define vzero _mm512_setzero_ps
#define vmul _mm512_mul_ps
#define vfmadd _mm512_fmadd_ps
#define vstore _mm512_storeu_ps
#define HAVE_SIMD 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LANES 8
typedef __m256 vec_t;
static inline vec_t vload(const void *base, int64_t offset, int dtype) {
    if (dtype == DTYPE_F32) return _mm256_loadu_ps((const float *)base + offset);
    __m128i half = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + offset));
    if (dtype == DTYPE_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
    return _mm256_cvtph_ps(half);
}
static inline float vsum(vec_t v) {
    __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
    sum = _mm_add_ss(sum, _mm_shuffle_ps(sum, sum, 1));
    return _mm_cvtss_f32(sum);
}
#define vset1 _mm256_set1_ps
#define vzero _mm256_setzero_ps
#define vmul _mm256_mul_ps
#define vfmadd _mm256_fmadd_ps
#define vstore _mm256_storeu_ps
#define HAVE_SIMD 1
#else
#define HAVE_SIMD 0
#endif

#if HAVE_SIMD
#define MAX_CHUNKS (256 / LANES) /* head_dim up to 256 */
#define MAX_GROUP 64             /* query heads per KV head */
#define KEYS 4                   /* keys whose scores one pass computes together */
#define HEADS 3                  /* query heads of a group computed together */
#define TILE 4                   /* output vectors per head kept in registers while values stream */
#define PREFETCH 16              /* rows ahead to prefetch */

/* Scores of keys [0, n) for query heads q[0..hn) (hn <= HEADS, a constant at each call site):
 * per KEYS keys, hn x KEYS independent FMA chains over the head dimension, each key row loaded
 * once for all hn heads. */
static inline __attribute__((always_inline)) void head_scores(const vec_t *q, int hn, int chunks,
                                                              const void **keys, const void **values,
                                                              int n, float *sg, int64_t stride,
                                                              int kv_dtype, int row_bytes) {
    int i = 0;
    for (; i + KEYS <= n; i += KEYS) {
        /* Rows sit in 4 KiB runs (a cache block's keys of one head) scattered over the cache, where
         * the hardware prefetcher stops: fetch the keys PREFETCH rows ahead, and the values the
         * weighted sum reads next. */
        if (values != NULL && i + PREFETCH + KEYS <= n)
            for (int k = 0; k < KEYS; k++)
                for (int b = 0; b < row_bytes; b += 64) {
                    __builtin_prefetch((const char *)keys[i + PREFETCH + k] + b);
                    __builtin_prefetch((const char *)values[i + PREFETCH + k] + b);
                }
        vec_t dot[HEADS][KEYS];
        for (int g = 0; g < hn; g++)
            for (int k = 0; k < KEYS; k++) dot[g][k] = vzero();
        for (int c = 0; c < chunks; c++) {
            vec_t row[KEYS];
            for (int k = 0; k < KEYS; k++) row[k] = vload(keys[i + k], LANES * c, kv_dtype);
            for (int g = 0; g < hn; g++)
                for (int k = 0; k < KEYS; k++) dot[g][k] = vfmadd(q[g * MAX_CHUNKS + c], row[k], dot[g][k]);
        }
        for (int g = 0; g < hn; g++)
            for (int k = 0; k < KEYS; k++) sg[g * stride + i + k] = vsum(dot[g][k]);
    }
    for (; i < n; i++) {
        vec_t dot[HEADS];
        for (int g = 0; g < hn; g++) dot[g] = vzero();
        for (int c = 0; c < chunks; c++) {
            const vec_t row = vload(keys[i], LANES * c, kv_dtype);
            for (int g = 0; g < hn; g++) dot[g] = vfmadd(q[g * MAX_CHUNKS + c], row, dot[g]);
        }
        for (int g = 0; g < hn; g++) sg[g * stride + i] = vsum(dot[g]);
    }
}

/* out[g] = sum_i weights[g][i] * values[i] for heads [0, hn), TILE vectors at a time: hn x TILE
 * accumulators in registers, each value vector loaded once for all hn heads. */
static inline __attribute__((always_inline)) void head_values(const float *weights, int64_t stride, int hn,
                                                              int chunks, const void **values, int n,
                                                              vec_t *acc_out, int kv_dtype) {
    for (int c0 = 0; c0 < chunks; c0 += TILE) {
        const int width = chunks - c0 < TILE ? chunks - c0 : TILE;
        vec_t acc[HEADS][TILE];
        for (int g = 0; g < hn; g++)
            for (int c = 0; c < TILE; c++) acc[g][c] = vzero();
        if (width == TILE) {
            for (int i = 0; i < n; i++) {
                vec_t row[TILE];
                for (int c = 0; c < TILE; c++) row[c] = vload(values[i], LANES * (c0 + c), kv_dtype);
                for (int g = 0; g < hn; g++) {
                    const vec_t weight = vset1(weights[g * stride + i]);
                    for (int c = 0; c < TILE; c++) acc[g][c] = vfmadd(weight, row[c], acc[g][c]);
                }
            }
        } else {
            for (int i = 0; i < n; i++)
                for (int g = 0; g < hn; g++) {
                    const vec_t weight = vset1(weights[g * stride + i]);
                    for (int c = 0; c < width; c++)
                        acc[g][c] = vfmadd(weight, vload(values[i], LANES * (c0 + c), kv_dtype), acc[g][c]);
                }
        }
        for (int g = 0; g < hn; g++)
            for (int c = 0; c < width; c++) acc_out[g * MAX_CHUNKS + c0 + c] = acc[g][c];
    }
}

/* The same computation as the portable loop in run_job, for head_dim a multiple of LANES, in the
 * widest vectors the CPU has; `kv_dtype` is a constant at each call site, so every load is
 * specialised. Each key and value row is located once (`keys`, `values`: row pointers by
 * position), and the query heads of the group are taken HEADS at a time, so that each row loaded
 * from the cache serves all of them. */
static inline __attribute__((always_inline)) void unit_simd(const job_t *job, int s, int h, float *scores,
                                                            const void **keys, const void **values,
                                                            const int kv_dtype) {
    const int group = job->num_heads / job->num_kv_heads;
    const int d = job->head_dim, chunks = d / LANES, bs = job->block_size;
    const int len = job->context_lens[s];
    int first = 0;
    if (job->sliding_window > 0 && len > job->sliding_window) first = len - job->sliding_window;
    const int n = len > first ? len - first : 0;
    const int32_t *table = job->block_tables + (int64_t)s * job->max_blocks;
    const int64_t q_offset = ((int64_t)s * job->num_heads + (int64_t)h * group) * d;
    const int dtype = job->dtype;
    const int64_t item = kv_dtype == DTYPE_F32 ? 4 : 2;
    for (int t = first, i = 0; t < len; t++, i++) {
        const int32_t block = table[t / bs];
        keys[i] = (const char *)job->cache + row_offset(job, block, 0, h, t % bs) * item;
        values[i] = (const char *)job->cache + row_offset(job, block, 1, h, t % bs) * item;
    }
    const vec_t scale = vset1(job->scale);
    float out[MAX_CHUNKS * LANES];
    for (int g0 = 0; g0 < group; g0 += HEADS) {
        const int hn = group - g0 < HEADS ? group - g0 : HEADS;
        vec_t q[HEADS * MAX_CHUNKS], acc[HEADS * MAX_CHUNKS];
        for (int g = 0; g < hn; g++)
            for (int c = 0; c < chunks; c++)
                q[g * MAX_CHUNKS + c] =
                    vmul(vload(job->query, q_offset + (int64_t)(g0 + g) * d + LANES * c, dtype), scale);
        if (hn == 3)
            head_scores(q, 3, chunks, keys, g0 == 0 ? values : NULL, n, scores, n, kv_dtype, (int)(d * item));
        else if (hn == 2)
            head_scores(q, 2, chunks, keys, g0 == 0 ? values : NULL, n, scores, n, kv_dtype, (int)(d * item));
        else
            head_scores(q, 1, chunks, keys, g0 == 0 ? values : NULL, n, scores, n, kv_dtype, (int)(d * item));
        float total[HEADS];
        for (int g = 0; g < hn; g++) {
            float *sg = scores + (int64_t)g * n, peak = -INFINITY, sum = 0.0f;
            for (int i = 0; i < n; i++) peak = sg[i] > peak ? sg[i] : peak;
            for (int i = 0; i < n; i++) {
                sg[i] = expf(sg[i] - peak);
                sum += sg[i];
            }
            total[g] = sum;
        }
        if (hn == 3)
            head_values(scores, n, 3, chunks, values, n, acc, kv_dtype);
        else if (hn == 2)
            head_values(scores, n, 2, chunks, values, n, acc, kv_dtype);
        else
            head_values(scores, n, 1, chunks, values, n, acc, kv_dtype);
        for (int g = 0; g < hn; g++) {
            const vec_t inv = vset1(n > 0 ? 1.0f / total[g] : 0.0f);
            for (int c = 0; c < chunks; c++) vstore(out + LANES * c, vmul(acc[g * MAX_CHUNKS + c], inv));
            store_row(job->out, q_offset + (int64_t)(g0 + g) * d, out, d, dtype);
        }
    }
}

static void run_unit_simd(const job_t *job, int s, int h, float *scores, const void **keys,
                          const void **values) {
    if (job->kv_dtype == DTYPE_F32)
        unit_simd(job, s, h, scores, keys, values, DTYPE_F32);
    else if (job->kv_dtype == DTYPE_BF16)
        unit_simd(job, s, h, scores, keys, values, DTYPE_BF16);
    else
        unit_simd(job, s, h, scores, keys, values, DTYPE_F16);
}
#endif

#ifndef LANES
#define LANES_OR_ONE 1
#else
#define LANES_OR_ONE LANES
#endif

/* The work unit is one (sequence, KV head) pair; thread t takes units t, t + n, t + 2n, ... */
static void *run_job(void *arg) {
    job_t *job = (job_t *)arg;
    const int group = job->num_heads / job->num_kv_heads;
    const int d = job->head_dim;
    int max_len = 0;
    for (int s = 0; s < job->num_seqs; s++)
        if (job->context_lens[s] > max_len) max_len = job->context_lens[s];
    float *scores = malloc(sizeof(float) * (size_t)group * (size_t)(max_len > 0 ? max_len : 1));
    float *q = malloc(sizeof(float) * (size_t)group * (size_t)d);
    float *acc = malloc(sizeof(float) * (size_t)group * (size_t)d);
    float *row = malloc(sizeof(float) * (size_t)d);
    const void **rows = malloc(sizeof(void *) * 2 * (size_t)(max_len > 0 ? max_len : 1));
    if (!scores || !q || !acc || !row || !rows) {
        job->status = -1;
        free(scores), free(q), free(acc), free(row), free(rows);
        return NULL;
    }
    const int units = job->num_seqs * job->num_kv_heads;
    const int vectorised = HAVE_SIMD && d % LANES_OR_ONE == 0 && d <= 256;
    for (int unit = job->thread_index; unit < units; unit += job->num_threads) {
        const int s = unit / job->num_kv_heads;
        const int h = unit % job->num_kv_heads;
#if HAVE_SIMD
        if (vectorised) {
            run_unit_simd(job, s, h, scores, rows, rows + (max_len > 0 ? max_len : 1));
            continue;
        }
#endif
        const int len = job->context_lens[s];
        int first = 0;
        if (job->sliding_window > 0 && len > job->sliding_window) first = len - job->sliding_window;
        const int32_t *table = job->block_tables + (int64_t)s * job->max_blocks;
        const int64_t q_offset = ((int64_t)s * job->num_heads + (int64_t)h * group) * d;
        for (int g = 0; g < group; g++) {
            load_row(q + (int64_t)g * d, job->query, q_offset + (int64_t)g * d, d, job->dtype);
            for (int i = 0; i < d; i++) q[(int64_t)g * d + i] *= job->scale;
        }
        const int n = len - first;
        if (n <= 0) {
            memset(acc, 0, sizeof(float) * (size_t)group * (size_t)d);
        } else {
            for (int t = first; t < len; t++) {
                const int64_t base = row_offset(job, table[t / job->block_size], 0, h, t % job->block_size);
                load_row(row, job->cache, base, d, job->kv_dtype);
                for (int g = 0; g < group; g++) {
                    const float *qg = q + (int64_t)g * d;
                    float dot = 0.0f;
                    for (int i = 0; i < d; i++) dot += qg[i] * row[i];
                    scores[(int64_t)g * n + (t - first)] = dot;
                }
            }
            for (int g = 0; g < group; g++) {
                float *sg = scores + (int64_t)g * n;
                float peak = sg[0];
                for (int i = 1; i < n; i++) peak = sg[i] > peak ? sg[i] : peak;
                float total = 0.0f;
                for (int i = 0; i < n; i++) {
                    sg[i] = expf(sg[i] - peak);
                    total += sg[i];
                }
                const float inv = 1.0f / total;
                for (int i = 0; i < n; i++) sg[i] *= inv;
            }
            memset(acc, 0, sizeof(float) * (size_t)group * (size_t)d);
            for (int t = first; t < len; t++) {
                const int64_t base = row_offset(job, table[t / job->block_size], 1, h, t % job->block_size);
                load_row(row, job->cache, base, d, job->kv_dtype);
                for (int g = 0; g < group; g++) {
                    const float p = scores[(int64_t)g * n + (t - first)];
                    float *ag = acc + (int64_t)g * d;
                    for (int i = 0; i < d; i++) ag[i] += p * row[i];
                }
            }
        }
        for (int g = 0; g < group; g++)
            store_row(job->out, q_offset + (int64_t)g * d, acc + (int64_t)g * d, d, job->dtype);
    }
    free(scores), free(q), free(acc), free(row), free(rows);
    return NULL;
}

/* The float32 lanes of the vector path this build runs (1: the portable loop only). */
int attention_simd_lanes(void) { return HAVE_SIMD ? LANES_OR_ONE : 1; }

/* The share of thread `thread_index` of `num_threads` (KV heads t, t + n, ...: units as run_job
 * splits them) of one sequence's decode attention over float32 query/out, on the calling thread:
 * decode_step.c runs it inside its own parallel region. Returns 0, or -1 without scratch memory. */
int paged_decode_attention_share(const float *query, const void *cache, const int32_t *block_table,
                                 int32_t context_len, float *out, int num_heads, int num_kv_heads, int head_dim,
                                 int block_size, int max_blocks, int sliding_window, int kv_dtype, float scale,
                                 int thread_index, int num_threads) {
    job_t job = {query, cache, block_table, &context_len, out, 1, num_heads, num_kv_heads, head_dim,
                 block_size, max_blocks, sliding_window, DTYPE_F32, kv_dtype, scale, num_threads,
                 thread_index, 0};
    run_job(&job);
    return job.status;
}

/* Returns 0 on success, -1 when scratch memory could not be had.
 * Built with OpenMP, the threads are those of the process's OpenMP runtime: loaded after PyTorch,
 * the library binds to the libgomp PyTorch already loaded (same soname), so attention runs on the
 * same warm threads as PyTorch's own operators instead of competing with them. */
int paged_decode_attention(const void *query, const void *cache, const int32_t *block_tables,
                           const int32_t *context_lens, void *out, int num_seqs, int num_heads,
                           int num_kv_heads, int head_dim, int block_size, int max_blocks,
                           int sliding_window, int dtype, int kv_dtype, float scale,
                           int num_threads) {
    if (num_threads < 1) num_threads = 1;
    if (num_threads > 64) num_threads = 64;
    if (num_threads > num_seqs * num_kv_heads) num_threads = num_seqs * num_kv_heads;
    if (num_threads < 1) return 0;
    job_t jobs[64];
    for (int t = 0; t < num_threads; t++) {
        jobs[t] = (job_t){query, cache, block_tables, context_lens, out, num_seqs, num_heads,
                          num_kv_heads, head_dim, block_size, max_blocks, sliding_window, dtype,
                          kv_dtype, scale, num_threads, t, 0};
    }
#ifdef _OPENMP
#pragma omp parallel for num_threads(num_threads) schedule(static, 1)
    for (int t = 0; t < num_threads; t++) run_job(&jobs[t]);
#else
    pthread_t threads[64];
    int started[64] = {0};
    for (int t = 1; t < num_threads; t++) {
        if (pthread_create(&threads[t], NULL, run_job, &jobs[t]) == 0) {
            started[t] = 1;
        } else {
            run_job(&jobs[t]); /* no thread to be had: do its share here */
        }
    }
    run_job(&jobs[0]);
    for (int t = 1; t < num_threads; t++)
        if (started[t]) pthread_join(threads[t], NULL);
#endif
    int status = 0;
    for (int t = 0; t < num_threads; t++)
        if (jobs[t].status) status = jobs[t].status;
    return status;
}
