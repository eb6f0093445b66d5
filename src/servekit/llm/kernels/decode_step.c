/* One batch-1 decode step of a Llama-layout model on GGUF blocks, in one native call.
 *
 * embedding row -> per layer: RMSNorm, q/k/v rows, rotary + paged KV write, decode attention, o rows
 * + residual, RMSNorm, gate/up rows, SiLU * up, down rows + residual -> final RMSNorm -> LM head:
 * float32 logits. The per-step Python path costs ~450 PyTorch operators and ~90 OpenMP regions (each
 * wakes the passive partner thread: ~20 us); here one parallel region runs the whole step, each
 * phase's output rows (or KV heads) split among the threads, and between the phases that need each
 * other's rows a barrier of our own: it spins with pause for a bounded time (BARRIER_SPIN_NS, so a
 * thread whose partner was preempted stops burning the core others need), then sleeps on a futex.
 * Cheap work (RMSNorm, SiLU * up, preparing x for the row kernels) is done by every thread itself
 * instead of behind one more barrier.
 *
 * The numbers are those of the row kernels (quantized_matmul.c), rotary_cache.c and
 * paged_attention.c, which this file calls; the models' shapes and weight pointers come gathered
 * once at load (servekit.llm.kernels.decode_step) as the structs below.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#include <sched.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() __asm__ __volatile__("" ::: "memory")
#endif

/* from quantized_matmul.c, rotary_cache.c, paged_attention.c */
int64_t quantized_prep_floats(int64_t k);
int quantized_prepare_row(const float *x, int64_t k, int type, float *prep);
void quantized_rows_range(const float *x, const float *prep, int64_t k, const uint8_t *w, int64_t row_bytes,
                          int type, const float *bias, float *out, int64_t j0, int64_t j1, float *rowbuf);
int dequantize_rows(const uint8_t *w, int64_t row_bytes, int type, int64_t k, const int64_t *indices,
                    int64_t count, float *out);
void rotary_write_kv_head(float *q, float *k, const float *v, const float *cos, const float *sin, int64_t half,
                          int64_t h, int64_t group, int64_t kv_heads, int64_t head_dim, void *cache,
                          int cache_dtype, int64_t block, int64_t offset, int64_t block_size);
int paged_decode_attention_share(const float *query, const void *cache, const int32_t *block_table,
                                 int32_t context_len, float *out, int num_heads, int num_kv_heads, int head_dim,
                                 int block_size, int max_blocks, int sliding_window, int kv_dtype, float scale,
                                 int thread_index, int num_threads);

/* How long a thread spins at a barrier before it sleeps: the phases of a step are 10-200 us apart
 * on 2 threads, so a partner that runs arrives within this; one that was preempted is slept on. */
#define BARRIER_SPIN_NS 40000
#define MAX_PARTS 4
#define MAX_THREADS 64

/* One weight matrix as GGUF blocks: [rows][row_bytes] of GGML type `type`. */
typedef struct {
    const uint8_t *data;
    const float *bias; /* [rows] or NULL */
    int64_t rows, row_bytes, type;
} dmatrix_t;

/* A projection: its parts' output rows one after the other (fused q/k/v, gate/up). */
typedef struct {
    dmatrix_t part[MAX_PARTS];
    int64_t parts, rows;
} dprojection_t;

typedef struct {
    const float *attn_norm, *mlp_norm; /* [hidden] */
    dprojection_t qkv, o, gate_up, down;
    void *cache;    /* this layer's [blocks][2][kv_heads][block_size][head_dim] */
    int64_t window; /* sliding window, 0: none */
} dlayer_t;

typedef struct {
    int64_t layers, hidden, heads, kv_heads, head_dim, inter, vocab, rotary_dim, block_size, cache_dtype;
    double eps, scale;
    const uint8_t *embed; /* [vocab][embed_row_bytes] of embed_type; -1: float32 rows */
    int64_t embed_type, embed_row_bytes;
    const float *final_norm;
    dprojection_t lm_head;
    const dlayer_t *layer;
    /* shared scratch, float32: residual [hidden], qkv [(heads + 2 kv_heads) head_dim],
     * attn [heads head_dim], delta [hidden], gate_up [2 inter] */
    float *residual, *qkv, *attn, *delta, *gate_up;
} dmodel_t;

/* -- the barrier ------------------------------------------------------------------------------- */

typedef struct {
    atomic_int arrived, generation, sleepers;
} barrier_t;

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* `threads`: the team's size, the same in every thread */
static void barrier_wait(barrier_t *b, int threads) {
    if (threads <= 1) return;
    const int generation = atomic_load(&b->generation);
    if (atomic_fetch_add(&b->arrived, 1) == threads - 1) { /* the last one in releases the others */
        atomic_store(&b->arrived, 0);
        atomic_fetch_add(&b->generation, 1);
#ifdef __linux__
        if (atomic_load(&b->sleepers) > 0) syscall(SYS_futex, &b->generation, FUTEX_WAKE_PRIVATE, MAX_THREADS, NULL, NULL, 0);
#endif
        return;
    }
    const int64_t deadline = now_ns() + BARRIER_SPIN_NS;
    for (int spin = 1;; spin++) {
        if (atomic_load(&b->generation) != generation) return;
        cpu_relax();
        if ((spin & 31) == 0 && now_ns() > deadline) break;
    }
    atomic_fetch_add(&b->sleepers, 1);
    while (atomic_load(&b->generation) == generation) {
#ifdef __linux__
        /* (returns at once if the generation already moved: the wake-up cannot be missed) */
        syscall(SYS_futex, &b->generation, FUTEX_WAIT_PRIVATE, generation, NULL, NULL, 0);
#else
        sched_yield();
#endif
    }
    atomic_fetch_sub(&b->sleepers, 1);
}

/* -- the phases -------------------------------------------------------------------------------- */

/* The same loop as elementwise.c's add_rms_norm (float32), so the same rounding. */
static void rms_norm(const float *x, const float *weight, float *out, int64_t n, float eps) {
    float total = 0.0f;
    for (int64_t c = 0; c < n; c++) total += x[c] * x[c];
    const float inverse = 1.0f / sqrtf(total / (float)n + eps);
    for (int64_t c = 0; c < n; c++) out[c] = x[c] * inverse * weight[c];
}

/* Rows [begin, end) of thread t's share of n rows, on GEMV_ROWS-pair boundaries. */
static void share(int64_t n, int t, int threads, int64_t *begin, int64_t *end) {
    const int64_t pairs = (n + 1) / 2;
    *begin = 2 * (pairs * t / threads);
    *end = 2 * (pairs * (t + 1) / threads);
    if (*begin > n) *begin = n;
    if (*end > n) *end = n;
}

typedef struct {
    float *prep, *rowbuf;
} thread_scratch_t;

/* This thread's share of x @ W.T (+ bias) into out [rows]. */
static void project(const dprojection_t *p, const float *x, int64_t k, float *out, int t, int threads,
                    const thread_scratch_t *s) {
    int64_t begin, end;
    share(p->rows, t, threads, &begin, &end);
    int64_t first = 0;
    int prepared = -1; /* the type `prep` holds */
    for (int64_t i = 0; i < p->parts; i++) {
        const dmatrix_t *m = &p->part[i];
        const int64_t lo = begin > first ? begin : first;
        const int64_t hi = end < first + m->rows ? end : first + m->rows;
        if (lo < hi) {
            if (prepared != (int)m->type) prepared = quantized_prepare_row(x, k, (int)m->type, s->prep) ? (int)m->type : -2;
            const float *prep = prepared == (int)m->type ? s->prep : NULL;
            quantized_rows_range(x, prep, k, m->data, m->row_bytes, (int)m->type, m->bias, out + first, lo - first,
                                 hi - first, s->rowbuf);
        }
        first += m->rows;
    }
}

static int step_body(const dmodel_t *m, int64_t token, int64_t position, const int32_t *table, int64_t table_len,
                     const float *cos, const float *sin, float *logits, int t, int threads, barrier_t *barrier) {
    const int64_t hidden = m->hidden, inter = m->inter, hd = m->head_dim;
    const int64_t q_width = m->heads * hd, kv_width = m->kv_heads * hd;
    const int64_t widest = hidden > inter ? (hidden > q_width ? hidden : q_width) : (inter > q_width ? inter : q_width);
    const float eps = (float)m->eps;
    float *own = malloc(sizeof(float) * (size_t)(hidden + inter + quantized_prep_floats(widest) + widest + 16));
    int status = own == NULL ? -1 : 0;
    /* (every thread goes through every barrier whatever its status, so none waits forever) */
    float *normed = own, *act = own + hidden;
    thread_scratch_t scratch = {act + inter, act + inter + quantized_prep_floats(widest)};
    const int64_t block = table[position / m->block_size], offset = position % m->block_size;
    if (status == 0) {
        if (m->embed_type < 0)
            memcpy(normed, (const float *)m->embed + token * hidden, sizeof(float) * (size_t)hidden);
        else
            dequantize_rows(m->embed, m->embed_row_bytes, (int)m->embed_type, hidden, &token, 1, normed);
        if (t == 0) memcpy(m->residual, normed, sizeof(float) * (size_t)hidden);
    }
    for (int64_t l = 0; l < m->layers; l++) {
        const dlayer_t *layer = &m->layer[l];
        /* layer 0 reads this thread's own copy of the embedding row: thread 0's copy into hidden is
         * only certain after the next barrier */
        if (status == 0) {
            rms_norm(l == 0 ? normed : m->residual, layer->attn_norm, normed, hidden, eps);
            project(&layer->qkv, normed, hidden, m->qkv, t, threads, &scratch);
        }
        barrier_wait(barrier, threads);
        if (status == 0) {
            float *q = m->qkv, *k = q + q_width;
            /* the KV heads of this thread's attention units (paged_attention.c: t, t + threads, ...):
             * their keys are in the cache before this thread reads them, no barrier between */
            for (int64_t h = t; h < m->kv_heads; h += threads)
                rotary_write_kv_head(q, k, k + kv_width, cos, sin, m->rotary_dim / 2, h,
                                     m->heads / m->kv_heads, m->kv_heads, hd, layer->cache, (int)m->cache_dtype,
                                     block, offset, m->block_size);
            if (paged_decode_attention_share(q, layer->cache, table, (int32_t)(position + 1), m->attn,
                                             (int)m->heads, (int)m->kv_heads, (int)hd, (int)m->block_size,
                                             (int)table_len, (int)layer->window, (int)m->cache_dtype,
                                             (float)m->scale, t, threads) != 0)
                status = -1;
        }
        barrier_wait(barrier, threads);
        if (status == 0) {
            int64_t begin, end;
            project(&layer->o, m->attn, q_width, m->delta, t, threads, &scratch);
            share(hidden, t, threads, &begin, &end);
            for (int64_t j = begin; j < end; j++) m->residual[j] += m->delta[j];
        }
        barrier_wait(barrier, threads);
        if (status == 0) {
            rms_norm(m->residual, layer->mlp_norm, normed, hidden, eps);
            project(&layer->gate_up, normed, hidden, m->gate_up, t, threads, &scratch);
        }
        barrier_wait(barrier, threads);
        if (status == 0) {
            for (int64_t c = 0; c < inter; c++) {
                const float gate = m->gate_up[c], up = m->gate_up[inter + c];
                /* (quantized_silu_mlp's expression: the bound keeps -ffast-math's vector expf finite) */
                act[c] = gate / (1.0f + expf(fminf(-gate, 88.0f))) * up;
            }
            int64_t begin, end;
            project(&layer->down, act, inter, m->delta, t, threads, &scratch);
            share(hidden, t, threads, &begin, &end);
            for (int64_t j = begin; j < end; j++) m->residual[j] += m->delta[j];
        }
        barrier_wait(barrier, threads);
    }
    if (status == 0) {
        rms_norm(m->residual, m->final_norm, normed, hidden, eps);
        project(&m->lm_head, normed, hidden, logits, t, threads, &scratch);
    }
    free(own);
    return status;
}

/* One decode step of one sequence: `token` at `position` (its keys/values go to the slot the block
 * table gives; the context is positions 0..position), `table` [table_len] its block ids; cos, sin
 * float32 [rotary_dim] the rotary rows of `position` (NULL when rotary_dim is 0); logits [vocab].
 * Threads: one parallel region of `threads` (OpenMP's pool). Returns 0, -1 (out of memory) or -2
 * (arguments out of range). */
int decode_step(const dmodel_t *m, int64_t token, int64_t position, const int32_t *table, int64_t table_len,
                const float *cos, const float *sin, float *logits, int threads) {
    if (token < 0 || token >= m->vocab || position < 0 || position / m->block_size >= table_len) return -2;
    if (m->rotary_dim > 0 && (cos == NULL || sin == NULL)) return -2;
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    barrier_t barrier;
    atomic_init(&barrier.arrived, 0);
    atomic_init(&barrier.generation, 0);
    atomic_init(&barrier.sleepers, 0);
    int status = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
    {
        /* (the team the runtime gave: maybe fewer than asked) */
        const int own = step_body(m, token, position, table, table_len, cos, sin, logits, omp_get_thread_num(),
                                  omp_get_num_threads(), &barrier);
        if (own != 0) {
#pragma omp atomic write
            status = own;
        }
    }
#else
    status = step_body(m, token, position, table, table_len, cos, sin, logits, 0, 1, &barrier);
#endif
    return status;
}

/* The test hook for the barrier: `threads` threads each run `rounds` rounds; in round r thread t
 * writes slots[t] = r, waits at the barrier, then checks every slot holds r, waits again. Returns
 * the number of stale slots seen (0 when the barrier holds). */
int64_t decode_barrier_check(int threads, int64_t rounds) {
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    barrier_t barrier;
    atomic_init(&barrier.arrived, 0);
    atomic_init(&barrier.generation, 0);
    atomic_init(&barrier.sleepers, 0);
    volatile int64_t slots[MAX_THREADS];
    int64_t stale = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(+ : stale)
    {
        const int t = omp_get_thread_num(), team = omp_get_num_threads();
        for (int64_t r = 0; r < rounds; r++) {
            slots[t] = r;
            barrier_wait(&barrier, team);
            for (int i = 0; i < team; i++) stale += slots[i] != r;
            barrier_wait(&barrier, team);
        }
    }
#else
    (void)rounds, (void)slots, (void)barrier;
#endif
    return stale;
}
