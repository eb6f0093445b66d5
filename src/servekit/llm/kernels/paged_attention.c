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
#ifndef PREFETCH_ROWS
#define PREFETCH_ROWS 32 /* rows ahead of the one being read to prefetch */
#endif

/* The rows a thread reads, in the order it reads them: the keys of its current unit, its values,
 * then the keys and values of its next unit (n 0: none). Rows sit in 4 KiB runs (one cache block's
 * keys or values of one KV head) scattered over the cache, where the hardware prefetcher stops and
 * every run would start with a miss: each row read prefetches the one PREFETCH_ROWS further on,
 * across the end of the unit into the next one. */
typedef struct {
    const void **keys, **values;
    int n;
    const void **next_keys, **next_values;
    int next_n;
    int row_bytes;
} stream_t;

static inline void prefetch_row(const stream_t *st, int position) {
    const void *row;
    if (position < st->n)
        row = st->keys[position];
    else if ((position -= st->n) < st->n)
        row = st->values[position];
    else if ((position -= st->n) < st->next_n)
        row = st->next_keys[position];
    else if ((position -= st->next_n) < st->next_n)
        row = st->next_values[position];
    else
        return;
    for (int b = 0; b < st->row_bytes; b += 64) __builtin_prefetch((const char *)row + b);
}

/* Scores of keys [0, n) for query heads q[0..hn) (hn <= HEADS, a constant at each call site):
 * per KEYS keys, hn x KEYS independent FMA chains over the head dimension, each key row loaded
 * once for all hn heads. */
static inline __attribute__((always_inline)) void head_scores(const vec_t *q, int hn, int chunks,
                                                              const void **keys, const stream_t *st,
                                                              int n, float *sg, int64_t stride,
                                                              int kv_dtype) {
    int i = 0;
    for (; i + KEYS <= n; i += KEYS) {
        if (st != NULL)
            for (int k = 0; k < KEYS; k++) prefetch_row(st, i + k + PREFETCH_ROWS);
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
        if (st != NULL) prefetch_row(st, i + PREFETCH_ROWS);
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
                                                              vec_t *acc_out, int kv_dtype, const stream_t *st) {
    for (int c0 = 0; c0 < chunks; c0 += TILE) {
        const int width = chunks - c0 < TILE ? chunks - c0 : TILE;
        const stream_t *ahead = c0 == 0 ? st : NULL; /* the first pass over the values prefetches */
        vec_t acc[HEADS][TILE];
        for (int g = 0; g < hn; g++)
            for (int c = 0; c < TILE; c++) acc[g][c] = vzero();
        if (width == TILE) {
            for (int i = 0; i < n; i++) {
                if (ahead != NULL) prefetch_row(ahead, n + i + PREFETCH_ROWS);
                vec_t row[TILE];
                for (int c = 0; c < TILE; c++) row[c] = vload(values[i], LANES * (c0 + c), kv_dtype);
                for (int g = 0; g < hn; g++) {
                    const vec_t weight = vset1(weights[g * stride + i]);
                    for (int c = 0; c < TILE; c++) acc[g][c] = vfmadd(weight, row[c], acc[g][c]);
                }
            }
        } else {
            for (int i = 0; i < n; i++) {
                if (ahead != NULL) prefetch_row(ahead, n + i + PREFETCH_ROWS);
                for (int g = 0; g < hn; g++) {
                    const vec_t weight = vset1(weights[g * stride + i]);
                    for (int c = 0; c < width; c++)
                        acc[g][c] = vfmadd(weight, vload(values[i], LANES * (c0 + c), kv_dtype), acc[g][c]);
                }
            }
        }
        for (int g = 0; g < hn; g++)
            for (int c = 0; c < width; c++) acc_out[g * MAX_CHUNKS + c0 + c] = acc[g][c];
    }
}

/* The rows of unit (s, h) by position, keys and values (its first visible key first); returns
 * their count. */
static int locate_rows(const job_t *job, int s, int h, const void **keys, const void **values) {
    const int bs = job->block_size, len = job->context_lens[s];
    int first = 0;
    if (job->sliding_window > 0 && len > job->sliding_window) first = len - job->sliding_window;
    const int32_t *table = job->block_tables + (int64_t)s * job->max_blocks;
    const int64_t item = job->kv_dtype == DTYPE_F32 ? 4 : 2;
    const int64_t row_bytes = (int64_t)job->head_dim * item;
    int i = 0;
    for (int t = first; t < len;) { /* block by block: one table look-up per block, not per row */
        const int32_t block = table[t / bs];
        const char *key = (const char *)job->cache + row_offset(job, block, 0, h, t % bs) * item;
        const char *value = (const char *)job->cache + row_offset(job, block, 1, h, t % bs) * item;
        const int end = (t / bs + 1) * bs < len ? (t / bs + 1) * bs : len;
        for (int64_t o = 0; t < end; t++, i++, o += row_bytes) {
            keys[i] = key + o;
            values[i] = value + o;
        }
    }
    return len > first ? len - first : 0;
}

/* The same computation as the portable loop in run_job, for head_dim a multiple of LANES, in the
 * widest vectors the CPU has; `kv_dtype` is a constant at each call site, so every load is
 * specialised. Each key and value row is located once (`st`: the unit's row pointers by position,
 * and the next unit's to prefetch), and the query heads of the group are taken HEADS at a time, so
 * that each row loaded from the cache serves all of them. */
static inline __attribute__((always_inline)) void unit_simd(const job_t *job, int s, int h, float *scores,
                                                            const stream_t *st, const int kv_dtype) {
    const int group = job->num_heads / job->num_kv_heads;
    const int d = job->head_dim, chunks = d / LANES;
    const int n = st->n;
    const void **keys = st->keys, **values = st->values;
    const int64_t q_offset = ((int64_t)s * job->num_heads + (int64_t)h * group) * d;
    const int dtype = job->dtype;
    const vec_t scale = vset1(job->scale);
    float out[MAX_CHUNKS * LANES];
    for (int g0 = 0; g0 < group; g0 += HEADS) {
        const int hn = group - g0 < HEADS ? group - g0 : HEADS;
        const stream_t *ahead = g0 == 0 ? st : NULL; /* later head groups find the rows in cache */
        vec_t q[HEADS * MAX_CHUNKS], acc[HEADS * MAX_CHUNKS];
        for (int g = 0; g < hn; g++)
            for (int c = 0; c < chunks; c++)
                q[g * MAX_CHUNKS + c] =
                    vmul(vload(job->query, q_offset + (int64_t)(g0 + g) * d + LANES * c, dtype), scale);
        if (hn == 3)
            head_scores(q, 3, chunks, keys, ahead, n, scores, n, kv_dtype);
        else if (hn == 2)
            head_scores(q, 2, chunks, keys, ahead, n, scores, n, kv_dtype);
        else
            head_scores(q, 1, chunks, keys, ahead, n, scores, n, kv_dtype);
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
            head_values(scores, n, 3, chunks, values, n, acc, kv_dtype, ahead);
        else if (hn == 2)
            head_values(scores, n, 2, chunks, values, n, acc, kv_dtype, ahead);
        else
            head_values(scores, n, 1, chunks, values, n, acc, kv_dtype, ahead);
        for (int g = 0; g < hn; g++) {
            const vec_t inv = vset1(n > 0 ? 1.0f / total[g] : 0.0f);
            for (int c = 0; c < chunks; c++) vstore(out + LANES * c, vmul(acc[g * MAX_CHUNKS + c], inv));
            store_row(job->out, q_offset + (int64_t)(g0 + g) * d, out, d, dtype);
        }
    }
}

static void run_unit_simd(const job_t *job, int s, int h, float *scores, const stream_t *st) {
    if (job->kv_dtype == DTYPE_F32)
        unit_simd(job, s, h, scores, st, DTYPE_F32);
    else if (job->kv_dtype == DTYPE_BF16)
        unit_simd(job, s, h, scores, st, DTYPE_BF16);
    else
        unit_simd(job, s, h, scores, st, DTYPE_F16);
}

/* Thread job->thread_index's units, each one's rows located while the previous one runs, so that its
 * first rows are prefetched before it starts. `rows`: 4 x max_len pointers of scratch. */
static void run_units_simd(const job_t *job, float *scores, const void **rows, int max_len) {
    const int units = job->num_seqs * job->num_kv_heads;
    const void **buffers[2] = {rows, rows + 2 * (int64_t)max_len};
    const int64_t item = job->kv_dtype == DTYPE_F32 ? 4 : 2;
    int unit = job->thread_index, current = 0;
    if (unit >= units) return;
    stream_t st = {buffers[0], buffers[0] + max_len, 0, NULL, NULL, 0, (int)(job->head_dim * item)};
    st.n = locate_rows(job, unit / job->num_kv_heads, unit % job->num_kv_heads, st.keys, st.values);
    for (; unit < units; unit += job->num_threads) {
        const int next = unit + job->num_threads;
        st.next_keys = buffers[1 - current];
        st.next_values = st.next_keys + max_len;
        st.next_n = next < units ? locate_rows(job, next / job->num_kv_heads, next % job->num_kv_heads,
                                               st.next_keys, st.next_values)
                                 : 0;
        run_unit_simd(job, unit / job->num_kv_heads, unit % job->num_kv_heads, scores, &st);
        current = 1 - current;
        st.keys = st.next_keys, st.values = st.next_values, st.n = st.next_n;
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
    const int rows_len = max_len > 0 ? max_len : 1;
    const void **rows = malloc(sizeof(void *) * 4 * (size_t)rows_len);
    if (!scores || !q || !acc || !row || !rows) {
        job->status = -1;
        free(scores), free(q), free(acc), free(row), free(rows);
        return NULL;
    }
    const int units = job->num_seqs * job->num_kv_heads;
#if HAVE_SIMD
    if (d % LANES == 0 && d <= 256) {
        run_units_simd(job, scores, rows, rows_len);
        free(scores), free(q), free(acc), free(row), free(rows);
        return NULL;
    }
#endif
    for (int unit = job->thread_index; unit < units; unit += job->num_threads) {
        const int s = unit / job->num_kv_heads;
        const int h = unit % job->num_kv_heads;
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
