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

/* The same computation as the portable loop in run_job, for head_dim a multiple of LANES, in the
 * widest vectors the CPU has. Keys are walked block by block (no division per key) and each key or
 * value is loaded once for all the query heads of its group. */
static void run_unit_simd(const job_t *job, int s, int h, float *scores) {
    const int group = job->num_heads / job->num_kv_heads;
    const int d = job->head_dim, chunks = d / LANES, bs = job->block_size;
    const int len = job->context_lens[s];
    int first = 0;
    if (job->sliding_window > 0 && len > job->sliding_window) first = len - job->sliding_window;
    const int n = len - first;
    const int32_t *table = job->block_tables + (int64_t)s * job->max_blocks;
    const int64_t q_offset = ((int64_t)s * job->num_heads + (int64_t)h * group) * d;
    const int dtype = job->dtype, kv_dtype = job->kv_dtype;
    const vec_t scale = vset1(job->scale);
    vec_t q[group * chunks], acc[group * chunks], row[MAX_CHUNKS];
    for (int g = 0; g < group; g++)
        for (int c = 0; c < chunks; c++) {
            q[g * chunks + c] = vmul(vload(job->query, q_offset + (int64_t)g * d + LANES * c, dtype), scale);
            acc[g * chunks + c] = vzero();
        }
    float total[group], peak[group];
    for (int g = 0; g < group; g++) peak[g] = -INFINITY, total[g] = 0.0f;
    if (n > 0) {
        for (int pass = 0; pass < 2; pass++) {
            int index = 0;
            for (int b = first / bs; b <= (len - 1) / bs; b++) {
                const int from = b == first / bs ? first % bs : 0;
                const int to = b == (len - 1) / bs ? (len - 1) % bs + 1 : bs;
                int64_t base = row_offset(job, table[b], pass, h, from);
                int o = from;
                /* Scores of four keys at a time: four independent dot-product chains instead of one
                 * chain of dependent FMAs per key. */
                for (; pass == 0 && o + 4 <= to; o += 4, index += 4, base += 4 * (int64_t)d) {
                    for (int g = 0; g < group; g++) {
                        vec_t dot[4];
                        for (int k = 0; k < 4; k++) dot[k] = vzero();
                        for (int c = 0; c < chunks; c++) {
                            const vec_t qc = q[g * chunks + c];
                            for (int k = 0; k < 4; k++)
                                dot[k] = vfmadd(qc, vload(job->cache, base + (int64_t)k * d + LANES * c, kv_dtype),
                                                dot[k]);
                        }
                        for (int k = 0; k < 4; k++) {
                            const float score = vsum(dot[k]);
                            scores[(int64_t)g * n + index + k] = score;
                            peak[g] = score > peak[g] ? score : peak[g];
                        }
                    }
                }
                for (; o < to; o++, index++, base += d) {
                    for (int c = 0; c < chunks; c++) row[c] = vload(job->cache, base + LANES * c, kv_dtype);
                    if (pass == 0) {
                        for (int g = 0; g < group; g++) {
                            vec_t dot = vmul(q[g * chunks], row[0]);
                            for (int c = 1; c < chunks; c++) dot = vfmadd(q[g * chunks + c], row[c], dot);
                            const float score = vsum(dot);
                            scores[(int64_t)g * n + index] = score;
                            peak[g] = score > peak[g] ? score : peak[g];
                        }
                    } else {
                        for (int g = 0; g < group; g++) {
                            const vec_t weight = vset1(scores[(int64_t)g * n + index]);
                            for (int c = 0; c < chunks; c++)
                                acc[g * chunks + c] = vfmadd(weight, row[c], acc[g * chunks + c]);
                        }
                    }
                }
            }
            if (pass == 0) {
                for (int g = 0; g < group; g++) {
                    float *sg = scores + (int64_t)g * n;
                    for (int i = 0; i < n; i++) {
                        sg[i] = expf(sg[i] - peak[g]);
                        total[g] += sg[i];
                    }
                }
            }
        }
    }
    float out[MAX_CHUNKS * LANES];
    for (int g = 0; g < group; g++) {
        const vec_t inv = vset1(n > 0 ? 1.0f / total[g] : 0.0f);
        for (int c = 0; c < chunks; c++) vstore(out + LANES * c, vmul(acc[g * chunks + c], inv));
        store_row(job->out, q_offset + (int64_t)g * d, out, d, dtype);
    }
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
    if (!scores || !q || !acc || !row) {
        job->status = -1;
        free(scores), free(q), free(acc), free(row);
        return NULL;
    }
    const int units = job->num_seqs * job->num_kv_heads;
    const int vectorised = HAVE_SIMD && d % LANES_OR_ONE == 0 && d <= 256;
    for (int unit = job->thread_index; unit < units; unit += job->num_threads) {
        const int s = unit / job->num_kv_heads;
        const int h = unit % job->num_kv_heads;
#if HAVE_SIMD
        if (vectorised) {
            run_unit_simd(job, s, h, scores);
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
    free(scores), free(q), free(acc), free(row);
    return NULL;
}

/* The float32 lanes of the vector path this build runs (1: the portable loop only). */
int attention_simd_lanes(void) { return HAVE_SIMD ? LANES_OR_ONE : 1; }

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
