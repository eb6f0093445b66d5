/* A decode step of a Llama-layout model on GGUF blocks, in one native call: of one sequence
 * (decode_step) or of a batch (decode_step_batch).
 *
 * embedding row -> per layer: RMSNorm, q/k/v rows, rotary + paged KV write, decode attention, o rows
 * + residual, RMSNorm, gate/up rows, SiLU * up, down rows + residual -> final RMSNorm -> LM head:
 * float32 logits. The per-step Python path costs ~450 PyTorch operators and ~90 OpenMP regions (each
 * wakes the passive partner thread: ~20 us); here one parallel region runs the whole step. Each phase's
 * work is cut in chunks (output rows; KV heads for attention) that the threads take one at a time, and
 * a thread goes on to the next phase once every chunk of this one is finished: it spins with pause for
 * a bounded time (WAIT_SPIN_NS), then sleeps on a futex. So a thread that the machine's other
 * processes preempted holds up nobody unless it holds a chunk (the others take its share), and a
 * waiting thread stops burning a core others need. Cheap work (RMSNorm, SiLU * up, preparing x for
 * the row kernels) is done by every thread itself instead of as one more phase.
 *
 * The batch step runs the same phases over B rows, its projections as GEMMs (quantized_gemm.c's
 * groups of weight rows as chunks, every thread packing the B rows of x for itself), its attention
 * one (sequence, KV head) a chunk: from the batch sizes where the PyTorch path switches to the GEMM,
 * it saves that path's ~450 operators and ~90 regions per step too (a 32-sequence step of the
 * default model on the Zen 5 EPYC: 0.74x the PyTorch path's time under the passive wait policy).
 *
 * The numbers are those of the row kernels (quantized_matmul.c) or of the GEMM (quantized_gemm.c),
 * rotary_cache.c, elementwise.c and paged_attention.c, which this file calls; the models' shapes and
 * weight pointers come gathered once at load (servekit.llm.kernels.decode_step) as the structs below.
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

/* from quantized_matmul.c, q8_rows.c, rotary_cache.c, paged_attention.c */
int64_t quantized_prep_floats(int64_t k);
int quantized_prepare_row(const float *x, int64_t k, int type, float *prep);
void quantized_rows_range(const float *x, const float *prep, int64_t k, const uint8_t *w, int64_t row_bytes,
                          int type, const float *bias, float *out, int64_t j0, int64_t j1, float *rowbuf);
int dequantize_rows(const uint8_t *w, int64_t row_bytes, int type, int64_t k, const int64_t *indices,
                    int64_t count, float *out);
int q8_supports(int type);
void q8_prepare_row(const float *x, int64_t k, float *prep);
void q8_rows_range(const float *prep, int64_t k, const uint8_t *w, int64_t row_bytes, int type, const float *bias,
                   float *out, int64_t j0, int64_t j1);
void rotary_write_kv_head(float *q, float *k, const float *v, const float *cos, const float *sin, int64_t half,
                          int64_t h, int64_t group, int64_t kv_heads, int64_t head_dim, void *cache,
                          int cache_dtype, int64_t block, int64_t offset, int64_t block_size);
void silu_mul_row(const float *gate, float *out, int64_t cols);
int64_t gemm_group_rows(void);
int64_t gemm_packed_floats(int64_t m, int64_t k);
int64_t gemm_scratch_floats(int64_t k);
void gemm_pack(const float *x, int64_t m, int64_t k, float *packed);
void gemm_groups(const float *packed, int64_t m, int64_t k, const uint8_t *w, int64_t n, int64_t row_bytes,
                 int type, const float *bias, float *out, int64_t ldo, int64_t g0, int64_t g1, float *scratch);
int paged_decode_attention_share(const float *query, const void *cache, const int32_t *block_table,
                                 int32_t context_len, float *out, int num_heads, int num_kv_heads, int head_dim,
                                 int block_size, int max_blocks, int sliding_window, int kv_dtype, float scale,
                                 int thread_index, int num_threads);

/* How long a thread waiting for a phase's last chunk spins before it sleeps: chunks take 5-100 us
 * (2 threads, the default model), so a partner that runs finishes within this; one that was
 * preempted is slept on instead of spun on. */
#define WAIT_SPIN_NS 40000
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
    int64_t q8; /* 1: the 32-weight block types with 8-bit activations (q8_rows.c; quantization=int8) */
} dmodel_t;

/* -- the phases' work sharing ------------------------------------------------------------------ */

/* A phase's work is `chunks` pieces (row ranges, KV heads) the threads take one at a time (`next`);
 * `done` counts the finished ones. A thread moves on once the phase is done, not once every thread
 * has arrived: a thread that was preempted (the machine's other processes) holds up nobody unless it
 * holds a chunk, and the others take its share meanwhile. */
typedef struct {
    atomic_int next, done;
} phase_t;

typedef struct {
    phase_t *phase; /* every phase of the step, in order */
    atomic_int sleepers;
    int threads;
} sched_t;

/* `phases` phases with nothing taken, for a team of `threads` (clamped to 1..MAX_THREADS: it sizes
 * the chunks; the team may be smaller, any team takes them all). Returns the clamped count, or 0
 * without memory. Free s->phase after the region. */
static int sched_init(sched_t *s, int64_t phases, int threads) {
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    s->phase = malloc(sizeof(phase_t) * (size_t)(phases > 0 ? phases : 1));
    if (s->phase == NULL) return 0;
    for (int64_t p = 0; p < phases; p++) {
        atomic_init(&s->phase[p].next, 0);
        atomic_init(&s->phase[p].done, 0);
    }
    atomic_init(&s->sleepers, 0);
    s->threads = threads;
    return threads;
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* The next chunk of phase p for this thread, or -1 when all are taken. */
static inline int take(phase_t *p, int chunks) {
    if (atomic_load(&p->next) >= chunks) return -1; /* (no write to the shared line once all are taken) */
    const int c = atomic_fetch_add(&p->next, 1);
    return c < chunks ? c : -1;
}

static inline void finish(sched_t *s, phase_t *p, int chunks) {
    if (atomic_fetch_add(&p->done, 1) == chunks - 1 && atomic_load(&s->sleepers) > 0) {
#ifdef __linux__
        syscall(SYS_futex, &p->done, FUTEX_WAKE_PRIVATE, MAX_THREADS, NULL, NULL, 0);
#endif
    }
}

/* Until every chunk of phase p is finished: spin with pause for at most WAIT_SPIN_NS, then sleep. */
static void wait_done(sched_t *s, phase_t *p, int chunks) {
    if (atomic_load(&p->done) >= chunks) return;
    const int64_t deadline = now_ns() + WAIT_SPIN_NS;
    for (int spin = 1;; spin++) {
        if (atomic_load(&p->done) >= chunks) return;
        cpu_relax();
        if ((spin & 31) == 0 && now_ns() > deadline) break;
    }
    atomic_fetch_add(&s->sleepers, 1);
    for (int seen; (seen = atomic_load(&p->done)) < chunks;) {
#ifdef __linux__
        /* (returns at once if `done` moved since: the finisher's wake-up cannot be missed) */
        syscall(SYS_futex, &p->done, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
#else
        sched_yield();
#endif
    }
    atomic_fetch_sub(&s->sleepers, 1);
}

/* -- the phases -------------------------------------------------------------------------------- */

/* The same loop as elementwise.c's add_norm (float32), so the same rounding. */
static void rms_norm(const float *x, const float *weight, float *out, int64_t n, float eps) {
    float total = 0.0f;
    for (int64_t c = 0; c < n; c++) total += x[c] * x[c];
    const float inverse = 1.0f / sqrtf(total / (float)n + eps);
    for (int64_t c = 0; c < n; c++) out[c] = x[c] * inverse * weight[c];
}

#define PREPARED_Q8 (-3)
typedef struct {
    float *prep, *rowbuf;
    int prepared; /* the block type `prep` holds for this phase's x (-1: none yet, -2: not a fused type,
                   * PREPARED_Q8: x's 8-bit blocks) */
    int q8;       /* dmodel_t's */
} thread_scratch_t;

/* Rows [begin, end) of x @ W.T (+ bias) into out [rows]. */
static void project_rows(const dprojection_t *p, const float *x, int64_t k, float *out, int64_t begin, int64_t end,
                         thread_scratch_t *s) {
    int64_t first = 0;
    for (int64_t i = 0; i < p->parts; i++) {
        const dmatrix_t *m = &p->part[i];
        const int64_t lo = begin > first ? begin : first;
        const int64_t hi = end < first + m->rows ? end : first + m->rows;
        if (lo < hi && s->q8 && q8_supports((int)m->type)) {
            if (s->prepared != PREPARED_Q8) q8_prepare_row(x, k, s->prep);
            s->prepared = PREPARED_Q8;
            q8_rows_range(s->prep, k, m->data, m->row_bytes, (int)m->type, m->bias, out + first, lo - first,
                          hi - first);
        } else if (lo < hi) {
            if (s->prepared != (int)m->type)
                s->prepared = quantized_prepare_row(x, k, (int)m->type, s->prep) ? (int)m->type : -2;
            const float *prep = s->prepared == (int)m->type ? s->prep : NULL;
            quantized_rows_range(x, prep, k, m->data, m->row_bytes, (int)m->type, m->bias, out + first, lo - first,
                                 hi - first, s->rowbuf);
        }
        first += m->rows;
    }
}

/* Chunks of a projection's rows: about 4 per thread, whole GEMV_ROWS pairs. */
static int64_t chunk_rows(int64_t rows, int threads) {
    int64_t size = (rows + 4 * threads - 1) / (4 * threads);
    size += size & 1;
    return size < 2 ? 2 : size;
}

static inline int projection_chunks(const dprojection_t *p, int threads) {
    const int64_t size = chunk_rows(p->rows, threads);
    return (int)((p->rows + size - 1) / size);
}

/* Whether some chunk of a phase is still to be taken: else a thread skips the work it would do to
 * take part (norming, preparing x): the shared buffers it reads may already hold a later phase's
 * values, and it has nothing left to compute with them. When a chunk is left, nothing after this
 * phase has started, so what the thread read before taking it was this phase's input. */
static inline int pending(phase_t *phase, int chunks) { return atomic_load(&phase->next) < chunks; }

/* Phase p: out = x @ W.T, chunk by chunk; with `residual`, residual += out over the same rows. */
static void project_phase(sched_t *s, phase_t *phase, const dprojection_t *p, const float *x, int64_t k, float *out,
                          float *residual, thread_scratch_t *scratch) {
    const int64_t size = chunk_rows(p->rows, s->threads);
    const int chunks = projection_chunks(p, s->threads);
    scratch->prepared = -1;
    for (int c; (c = take(phase, chunks)) >= 0;) {
        const int64_t begin = c * size, end = begin + size < p->rows ? begin + size : p->rows;
        project_rows(p, x, k, out, begin, end, scratch);
        if (residual != NULL)
            for (int64_t j = begin; j < end; j++) residual[j] += out[j];
        finish(s, phase, chunks);
    }
    wait_done(s, phase, chunks);
}

/* The widest input a projection of the model reads: hidden, inter or the attention's q width. */
static int64_t widest_input(const dmodel_t *m) {
    const int64_t q_width = m->heads * m->head_dim;
    const int64_t wider = m->hidden > m->inter ? m->hidden : m->inter;
    return wider > q_width ? wider : q_width;
}

static int step_body(const dmodel_t *m, int64_t token, int64_t position, const int32_t *table, int64_t table_len,
                     const float *cos, const float *sin, float *logits, sched_t *s) {
    const int64_t hidden = m->hidden, inter = m->inter, hd = m->head_dim;
    const int64_t q_width = m->heads * hd, kv_width = m->kv_heads * hd;
    const int64_t widest = widest_input(m);
    const float eps = (float)m->eps;
    float *own = malloc(sizeof(float) * (size_t)(hidden + inter + quantized_prep_floats(widest) + widest + 16));
    if (own == NULL) return -1; /* (a thread without scratch takes no chunk: the others do them all) */
    int status = 0;
    float *normed = own, *act = own + hidden;
    thread_scratch_t scratch = {act + inter, act + inter + quantized_prep_floats(widest), -1, (int)m->q8};
    const int64_t block = table[position / m->block_size], offset = position % m->block_size;
    phase_t *phase = s->phase;
    if (take(phase, 1) == 0) {
        if (m->embed_type < 0)
            memcpy(m->residual, (const float *)m->embed + token * hidden, sizeof(float) * (size_t)hidden);
        else
            dequantize_rows(m->embed, m->embed_row_bytes, (int)m->embed_type, hidden, &token, 1, m->residual);
        finish(s, phase, 1);
    }
    wait_done(s, phase, 1);
    phase++;
    for (int64_t l = 0; l < m->layers; l++, phase += 5) {
        const dlayer_t *layer = &m->layer[l];
        /* (each thread norms a phase's input itself: no phase for it) */
        if (pending(&phase[0], projection_chunks(&layer->qkv, s->threads)))
            rms_norm(m->residual, layer->attn_norm, normed, hidden, eps);
        project_phase(s, &phase[0], &layer->qkv, normed, hidden, m->qkv, NULL, &scratch);
        {
            float *q = m->qkv, *k = q + q_width;
            const int chunks = (int)m->kv_heads;
            /* one KV head a chunk: its query and key heads rotated, its key and value cached, then
             * its attention (paged_attention.c's unit h of kv_heads) */
            for (int h; (h = take(&phase[1], chunks)) >= 0;) {
                rotary_write_kv_head(q, k, k + kv_width, cos, sin, m->rotary_dim / 2, h, m->heads / m->kv_heads,
                                     m->kv_heads, hd, layer->cache, (int)m->cache_dtype, block, offset, m->block_size);
                if (paged_decode_attention_share(q, layer->cache, table, (int32_t)(position + 1), m->attn,
                                                 (int)m->heads, (int)m->kv_heads, (int)hd, (int)m->block_size,
                                                 (int)table_len, (int)layer->window, (int)m->cache_dtype,
                                                 (float)m->scale, h, chunks) != 0)
                    status = -1;
                finish(s, &phase[1], chunks);
            }
            wait_done(s, &phase[1], chunks);
        }
        project_phase(s, &phase[2], &layer->o, m->attn, q_width, m->delta, m->residual, &scratch);
        if (pending(&phase[3], projection_chunks(&layer->gate_up, s->threads)))
            rms_norm(m->residual, layer->mlp_norm, normed, hidden, eps);
        project_phase(s, &phase[3], &layer->gate_up, normed, hidden, m->gate_up, NULL, &scratch);
        if (pending(&phase[4], projection_chunks(&layer->down, s->threads)))
            for (int64_t c = 0; c < inter; c++) {
                const float gate = m->gate_up[c], up = m->gate_up[inter + c];
                /* (quantized_silu_mlp's expression: the bound keeps -ffast-math's vector expf finite) */
                act[c] = gate / (1.0f + expf(fminf(-gate, 88.0f))) * up;
            }
        project_phase(s, &phase[4], &layer->down, act, inter, m->delta, m->residual, &scratch);
    }
    if (pending(phase, projection_chunks(&m->lm_head, s->threads)))
        rms_norm(m->residual, m->final_norm, normed, hidden, eps);
    project_phase(s, phase, &m->lm_head, normed, hidden, logits, NULL, &scratch);
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
    sched_t sched;
    threads = sched_init(&sched, 2 + 5 * m->layers, threads);
    if (threads == 0) return -1;
    int status = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
    {
        const int own = step_body(m, token, position, table, table_len, cos, sin, logits, &sched);
        if (own != 0) {
#pragma omp atomic write
            status = own;
        }
    }
#else
    status = step_body(m, token, position, table, table_len, cos, sin, logits, &sched);
#endif
    free(sched.phase);
    return status;
}

/* -- the batched step: B sequences' decode tokens, the projections as GEMMs ----------------------- */

/* A thread's scratch for the batched step: x rows [B][widest] (normed or SiLU * up), their packed
 * panels, the GEMM's weight-group and accumulator buffers. */
typedef struct {
    float *rows, *packed, *gemm;
} batch_scratch_t;

/* Chunks a thread of a batched projection's phase: fine, so that a thread the machine's other
 * processes preempt holds little of a phase (the default model, 32 sequences, one CPU-bound
 * neighbour: x1.45-1.74 of alone against x1.52-2.07 with 8; alone the same). */
#ifndef CHUNKS_PER_THREAD
#define CHUNKS_PER_THREAD 32
#endif
/* The GEMM's weight-row groups of a matrix, and the chunks of `size` groups they make. */
static inline int64_t matrix_groups(const dmatrix_t *m) {
    return (m->rows + gemm_group_rows() - 1) / gemm_group_rows();
}
static inline int64_t matrix_chunks(const dmatrix_t *m, int64_t size) { return (matrix_groups(m) + size - 1) / size; }

/* Weight-row groups a chunk of a batched projection covers. */
static int64_t chunk_groups(const dprojection_t *p, int threads) {
    int64_t groups = 0;
    for (int64_t i = 0; i < p->parts; i++) groups += matrix_groups(&p->part[i]);
    const int64_t size = groups / (CHUNKS_PER_THREAD * threads);
    return size < 1 ? 1 : size;
}

static int batch_chunks(const dprojection_t *p, int threads) {
    const int64_t size = chunk_groups(p, threads);
    int64_t chunks = 0;
    for (int64_t i = 0; i < p->parts; i++) chunks += matrix_chunks(&p->part[i], size);
    return (int)chunks;
}

/* Phase p of the batched step: out [B][p->rows] = x @ W.T with x the B rows in the thread's packed
 * panels, chunk by chunk (groups of one part: quantized_gemm's numbers per part); with `residual`
 * ([B][p->rows]), residual += out over the chunk's columns. */
static void gemm_phase(sched_t *s, phase_t *phase, const dprojection_t *p, int64_t batch, int64_t k, float *out,
                       float *residual, const batch_scratch_t *scratch) {
    const int64_t gn = gemm_group_rows(), size = chunk_groups(p, s->threads);
    const int chunks = batch_chunks(p, s->threads);
    for (int c; (c = take(phase, chunks)) >= 0;) {
        int64_t first = 0, part = 0, index = c;
        for (; index >= matrix_chunks(&p->part[part], size); part++) { /* chunk c's part, its range there */
            index -= matrix_chunks(&p->part[part], size);
            first += p->part[part].rows;
        }
        const dmatrix_t *m = &p->part[part];
        const int64_t groups = matrix_groups(m), g0 = index * size;
        const int64_t g1 = g0 + size < groups ? g0 + size : groups;
        gemm_groups(scratch->packed, batch, k, m->data, m->rows, m->row_bytes, (int)m->type, m->bias, out + first,
                    p->rows, g0, g1, scratch->gemm);
        if (residual != NULL) {
            const int64_t j0 = first + g0 * gn, j1 = first + (g1 * gn < m->rows ? g1 * gn : m->rows);
            for (int64_t r = 0; r < batch; r++)
                for (int64_t j = j0; j < j1; j++) residual[r * p->rows + j] += out[r * p->rows + j];
        }
        finish(s, phase, chunks);
    }
    wait_done(s, phase, chunks);
}

/* The batched step's shared buffers: residual [B][hidden], qkv [B][qkv rows], attn [B][q width],
 * delta [B][hidden], gate_up [B][2 inter]. */
typedef struct {
    float *residual, *qkv, *attn, *delta, *gate_up;
} batch_buffers_t;

/* Every thread's x rows, RMSNormed from the shared residual and packed, when a chunk of `phase` is
 * left to take (pending's reasoning). */
static void norm_pack(const dmodel_t *m, const float *residual, const float *weight, int64_t batch, phase_t *phase,
                      int chunks, const batch_scratch_t *scratch) {
    if (!pending(phase, chunks)) return;
    for (int64_t r = 0; r < batch; r++)
        rms_norm(residual + r * m->hidden, weight, scratch->rows + r * m->hidden, m->hidden, (float)m->eps);
    gemm_pack(scratch->rows, batch, m->hidden, scratch->packed);
}

static int batch_body(const dmodel_t *m, const int64_t *tokens, const int64_t *positions, const int32_t *tables,
                      int64_t max_blocks, const float *cos_table, const float *sin_table, float *logits,
                      int64_t batch, const batch_buffers_t *b, sched_t *s) {
    const int64_t hidden = m->hidden, inter = m->inter, hd = m->head_dim;
    const int64_t q_width = m->heads * hd, kv_width = m->kv_heads * hd, qkv_rows = q_width + 2 * kv_width;
    const int64_t widest = widest_input(m);
    const int64_t rows_floats = (batch * widest + 15) / 16 * 16, packed_floats = gemm_packed_floats(batch, widest);
    float *own = aligned_alloc(64, sizeof(float) * (size_t)(rows_floats + packed_floats + gemm_scratch_floats(widest)));
    if (own == NULL) return -1; /* (a thread without scratch takes no chunk: the others do them all) */
    const batch_scratch_t scratch = {own, own + rows_floats, own + rows_floats + packed_floats};
    int status = 0;
    phase_t *phase = s->phase;
    for (int r; (r = take(phase, (int)batch)) >= 0;) {
        float *row = b->residual + r * hidden;
        if (m->embed_type < 0)
            memcpy(row, (const float *)m->embed + tokens[r] * hidden, sizeof(float) * (size_t)hidden);
        else
            dequantize_rows(m->embed, m->embed_row_bytes, (int)m->embed_type, hidden, &tokens[r], 1, row);
        finish(s, phase, (int)batch);
    }
    wait_done(s, phase, (int)batch);
    phase++;
    for (int64_t l = 0; l < m->layers; l++, phase += 5) {
        const dlayer_t *layer = &m->layer[l];
        norm_pack(m, b->residual, layer->attn_norm, batch, &phase[0], batch_chunks(&layer->qkv, s->threads), &scratch);
        gemm_phase(s, &phase[0], &layer->qkv, batch, hidden, b->qkv, NULL, &scratch);
        {
            /* one (sequence, KV head) a chunk: its query and key heads rotated, its key and value
             * cached, then its attention */
            const int chunks = (int)(batch * m->kv_heads);
            for (int c; (c = take(&phase[1], chunks)) >= 0;) {
                const int64_t seq = c / m->kv_heads, h = c % m->kv_heads, position = positions[seq];
                const int32_t *table = tables + seq * max_blocks;
                float *q = b->qkv + seq * qkv_rows, *k = q + q_width;
                const float *cos = m->rotary_dim > 0 ? cos_table + position * m->rotary_dim : NULL;
                const float *sin = m->rotary_dim > 0 ? sin_table + position * m->rotary_dim : NULL;
                rotary_write_kv_head(q, k, k + kv_width, cos, sin, m->rotary_dim / 2, h, m->heads / m->kv_heads,
                                     m->kv_heads, hd, layer->cache, (int)m->cache_dtype,
                                     table[position / m->block_size], position % m->block_size, m->block_size);
                if (paged_decode_attention_share(q, layer->cache, table, (int32_t)(position + 1),
                                                 b->attn + seq * q_width, (int)m->heads, (int)m->kv_heads, (int)hd,
                                                 (int)m->block_size, (int)max_blocks, (int)layer->window,
                                                 (int)m->cache_dtype, (float)m->scale, (int)h, (int)m->kv_heads) != 0)
                    status = -1;
                finish(s, &phase[1], chunks);
            }
            wait_done(s, &phase[1], chunks);
        }
        if (pending(&phase[2], batch_chunks(&layer->o, s->threads))) gemm_pack(b->attn, batch, q_width, scratch.packed);
        gemm_phase(s, &phase[2], &layer->o, batch, q_width, b->delta, b->residual, &scratch);
        norm_pack(m, b->residual, layer->mlp_norm, batch, &phase[3], batch_chunks(&layer->gate_up, s->threads),
                  &scratch);
        gemm_phase(s, &phase[3], &layer->gate_up, batch, hidden, b->gate_up, NULL, &scratch);
        if (pending(&phase[4], batch_chunks(&layer->down, s->threads))) {
            for (int64_t r = 0; r < batch; r++)
                silu_mul_row(b->gate_up + r * 2 * inter, scratch.rows + r * inter, inter);
            gemm_pack(scratch.rows, batch, inter, scratch.packed);
        }
        gemm_phase(s, &phase[4], &layer->down, batch, inter, b->delta, b->residual, &scratch);
    }
    norm_pack(m, b->residual, m->final_norm, batch, phase, batch_chunks(&m->lm_head, s->threads), &scratch);
    gemm_phase(s, phase, &m->lm_head, batch, hidden, logits, NULL, &scratch);
    free(own);
    return status;
}

/* One decode step of `batch` sequences, the projections as GEMMs over the B rows (quantized_gemm's
 * numbers; what the PyTorch path computes from gemm_group_rows()-sized batches up): tokens and
 * positions [batch], tables [batch][max_blocks] their block ids (rows padded with any id), cos_table
 * and sin_table float32 [positions][rotary_dim] from position 0 past every position (NULL when
 * rotary_dim is 0), logits [batch][vocab]. Not with 8-bit activations (the model's q8). Returns 0, -1
 * (out of memory) or -2 (arguments out of range). */
int decode_step_batch(const dmodel_t *m, const int64_t *tokens, const int64_t *positions, const int32_t *tables,
                      int64_t max_blocks, const float *cos_table, const float *sin_table, float *logits, int64_t batch,
                      int threads) {
    if (m->q8 || batch < 1 || max_blocks < 1) return -2;
    if (m->rotary_dim > 0 && (cos_table == NULL || sin_table == NULL)) return -2;
    for (int64_t r = 0; r < batch; r++)
        if (tokens[r] < 0 || tokens[r] >= m->vocab || positions[r] < 0 || positions[r] / m->block_size >= max_blocks)
            return -2;
    const int64_t hidden = m->hidden, q_width = m->heads * m->head_dim;
    const int64_t qkv_rows = q_width + 2 * m->kv_heads * m->head_dim;
    float *shared = malloc(sizeof(float) * (size_t)(batch * (2 * hidden + qkv_rows + q_width + 2 * m->inter)));
    sched_t sched;
    threads = sched_init(&sched, 2 + 5 * m->layers, threads);
    if (shared == NULL || threads == 0) {
        free(shared);
        if (threads != 0) free(sched.phase);
        return -1;
    }
    const batch_buffers_t buffers = {shared, shared + batch * hidden, shared + batch * (hidden + qkv_rows),
                                     shared + batch * (hidden + qkv_rows + q_width),
                                     shared + batch * (2 * hidden + qkv_rows + q_width)};
    int status = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
    {
        const int own = batch_body(m, tokens, positions, tables, max_blocks, cos_table, sin_table, logits, batch,
                                   &buffers, &sched);
        if (own != 0) {
#pragma omp atomic write
            status = own;
        }
    }
#else
    status = batch_body(m, tokens, positions, tables, max_blocks, cos_table, sin_table, logits, batch, &buffers,
                        &sched);
#endif
    free(sched.phase);
    free(shared);
    return status;
}

/* The test hook for the phases: `threads` threads through `rounds` phases of 4 chunks a thread;
 * chunk c of phase r writes slots[c] = r; past the phase's wait every slot must hold r or later.
 * Returns the number of stale slots seen (0 when a phase's wait holds). */
int64_t decode_phases_check(int threads, int64_t rounds) {
    sched_t sched;
    threads = sched_init(&sched, rounds, threads);
    if (threads == 0) return -1;
    const int chunks = 4 * threads;
    atomic_llong slots[4 * MAX_THREADS];
    for (int c = 0; c < chunks; c++) atomic_init(&slots[c], -1);
    int64_t stale = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(+ : stale)
#endif
    {
        for (int64_t r = 0; r < rounds; r++) {
            for (int c; (c = take(&sched.phase[r], chunks)) >= 0;) {
                atomic_store(&slots[c], r);
                finish(&sched, &sched.phase[r], chunks);
            }
            wait_done(&sched, &sched.phase[r], chunks);
            for (int c = 0; c < chunks; c++) stale += atomic_load(&slots[c]) < r;
        }
    }
    free(sched.phase);
    return stale;
}
