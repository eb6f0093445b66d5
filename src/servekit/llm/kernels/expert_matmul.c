/* Grouped matmul for mixture-of-experts layers: out[r] = x[r] @ W[e] for the rows r of each group,
 * group g's rows ending at ends[g] and multiplied by expert experts[g]; optionally the rows of x are
 * gathered (x_rows), and the results scaled and written to other rows (out_rows, scale), so a layer's
 * dispatch (tokens sorted by expert: expert_order) and combine (each token's top-k results weighted,
 * in slot order) need no separate gather, multiply or scatter.
 *
 * With a batch of B tokens over E experts, top-k, each expert meets about B * k / E rows (8 at
 * batch 32 with 8 experts, top-2): a GEMM library's small-M path, or a loop of per-expert matmuls,
 * then spends its time packing weights and waiting on memory, at a few GFLOP/s. Here the weights are
 * packed once, at load, into column panels ([E][N / NB][K][NB]: every panel one contiguous stream),
 * so each panel is read from memory once per call and meets all its group's rows from L1:
 *
 *  - a group's rows are taken in chunks of RC (x chunk L2-resident), and each chunk in blocks of MR
 *    rows; an MR x NB micro-kernel keeps MR x NB / LANES vector accumulators in registers: per k,
 *    NB / LANES contiguous loads of the panel and MR broadcasts of x feed MR x NB / LANES FMAs;
 *  - one float32 sum per output over K in order; columns past N are zero-padded in the panels and
 *    never written.
 * Vector width by the CPU the library is built for (-march=native, cached per CPU): AVX-512 16 lanes,
 * AVX2 + FMA 8, else 4 (GCC's generic vectors), from one source.
 * Threads: OpenMP over (group, row chunk, panel) tasks, on the process's OpenMP pool (PyTorch's).
 */
#include <math.h>
#include <stdint.h>

#if defined(__AVX512F__)
#define LANES 16
#define MR 12 /* 32 registers: 12 x 2 accumulators, 2 panel loads, 1 broadcast */
#elif defined(__AVX2__) && defined(__FMA__)
#define LANES 8
#define MR 6 /* 16 registers: 6 x 2 accumulators, 2 panel loads, 1 broadcast */
#else
#define LANES 4
#define MR 6
#endif
#define NV 2              /* vectors of a panel row */
#define NB (NV * LANES)   /* columns of a panel */
#define RC 48             /* rows of x met by a panel per pass */
/* Bytes of the panel stream requested ahead of the loads. With few rows per expert the panels come
 * from memory (every expert's weights, once per call) and the hardware prefetcher alone left the
 * loop waiting on them: 10-30% slower at 2-16 rows per expert (1 thread, 48 MB of experts). */
#define PREFETCH 2048

typedef float vec_t __attribute__((vector_size(LANES * sizeof(float)), aligned(4)));

/* Requests the cache lines of the panel row PREFETCH bytes after `row` (a prefetch never faults, so
 * past the last panel it is harmless). */
static inline void fetch_ahead(const float *row) {
    for (int b = 0; b < NB * (int)sizeof(float); b += 64) __builtin_prefetch((const char *)row + PREFETCH + b, 0, 0);
}

int expert_panel_columns(void) { return NB; }

/* ROWS rows (pointers xr) against one panel [k][NB], into acc; with SPLIT, even and odd k into two
 * accumulator sets (few rows: one FMA chain per vector would wait on its own latency). */
#define PANEL_LOOP(ROWS)                                                                  \
    for (int64_t i = 0; i < k; i++) {                                                     \
        vec_t w[NV];                                                                      \
        fetch_ahead(panel + i * NB);                                                      \
        for (int v = 0; v < NV; v++) w[v] = *(const vec_t *)(panel + i * NB + v * LANES); \
        for (int r = 0; r < (ROWS); r++) {                                                \
            const vec_t xv = (vec_t){0} + xr[r][i];                                       \
            for (int v = 0; v < NV; v++) acc[r][v] += xv * w[v];                          \
        }                                                                                 \
    }
#define PANEL_LOOP_SPLIT(ROWS)                                                                  \
    {                                                                                           \
        vec_t odd[ROWS][NV];                                                                    \
        for (int r = 0; r < (ROWS); r++)                                                        \
            for (int v = 0; v < NV; v++) odd[r][v] = (vec_t){0};                                \
        int64_t i = 0;                                                                          \
        for (; i + 1 < k; i += 2) {                                                             \
            vec_t w0[NV], w1[NV];                                                               \
            fetch_ahead(panel + i * NB);                                                        \
            fetch_ahead(panel + (i + 1) * NB);                                                  \
            for (int v = 0; v < NV; v++) {                                                      \
                w0[v] = *(const vec_t *)(panel + i * NB + v * LANES);                           \
                w1[v] = *(const vec_t *)(panel + (i + 1) * NB + v * LANES);                     \
            }                                                                                   \
            for (int r = 0; r < (ROWS); r++) {                                                  \
                const vec_t x0 = (vec_t){0} + xr[r][i], x1 = (vec_t){0} + xr[r][i + 1];         \
                for (int v = 0; v < NV; v++) {                                                  \
                    acc[r][v] += x0 * w0[v];                                                    \
                    odd[r][v] += x1 * w1[v];                                                    \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
        for (; i < k; i++)                                                                      \
            for (int r = 0; r < (ROWS); r++)                                                    \
                for (int v = 0; v < NV; v++)                                                    \
                    acc[r][v] += ((vec_t){0} + xr[r][i]) * *(const vec_t *)(panel + i * NB + v * LANES); \
        for (int r = 0; r < (ROWS); r++)                                                        \
            for (int v = 0; v < NV; v++) acc[r][v] += odd[r][v];                                \
    }

/* acc rows to their destinations, times their scales, cols (<= NB) columns. */
static void store(vec_t acc[MR][NV], int rows, float *const *dst, const float *scale, int cols) {
    for (int r = 0; r < rows; r++) {
        const vec_t s = (vec_t){0} + scale[r];
        if (cols == NB) {
            for (int v = 0; v < NV; v++) *(vec_t *)(dst[r] + v * LANES) = acc[r][v] * s;
        } else {
            float row[NB];
            for (int v = 0; v < NV; v++) *(vec_t *)(row + v * LANES) = acc[r][v] * s;
            for (int c = 0; c < cols; c++) dst[r][c] = row[c];
        }
    }
}

/* `rows` rows of x (xr) against one panel [k][NB] -> dst rows (times scale), cols columns. */
static void run_block(const float *const *xr, int64_t k, int rows, const float *panel,
                      float *const *dst, const float *scale, int cols) {
    vec_t acc[MR][NV];
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = (vec_t){0};
    switch (rows) { /* a constant row count per case keeps the accumulators in registers */
    case MR: {
#pragma GCC unroll 1
        PANEL_LOOP(MR)
        break;
    }
#define SPLIT_CASE(R)          \
    case R: {                  \
        PANEL_LOOP_SPLIT(R)    \
        break;                 \
    }
#define TAIL_CASE(R)       \
    case R: {              \
        PANEL_LOOP(R)      \
        break;             \
    }
        SPLIT_CASE(1)
        SPLIT_CASE(2)
        SPLIT_CASE(3)
        TAIL_CASE(4)
        TAIL_CASE(5)
#if MR > 6
        TAIL_CASE(6)
        TAIL_CASE(7)
        TAIL_CASE(8)
        TAIL_CASE(9)
        TAIL_CASE(10)
        TAIL_CASE(11)
#endif
#undef TAIL_CASE
#undef SPLIT_CASE
    default:
        break;
    }
    store(acc, rows, dst, scale, cols);
}

/* Tokens' chosen experts (int64 [slots], slot = token * top_k + j) sorted by expert, stably:
 * order[r] the slot of sorted row r, tokens[r] its token, ends[e] the end of expert e's rows.
 * Returns 0, or -2 when an expert id is out of range. */
int expert_order(const int64_t *chosen, int64_t slots, int top_k, int num_experts, int32_t *order,
                 int32_t *tokens, int32_t *ends) {
    if (top_k < 1 || num_experts < 1) return -2;
    for (int e = 0; e < num_experts; e++) ends[e] = 0;
    for (int64_t s = 0; s < slots; s++) {
        if (chosen[s] < 0 || chosen[s] >= num_experts) return -2;
        ends[chosen[s]]++;
    }
    int32_t next[num_experts];
    int32_t total = 0;
    for (int e = 0; e < num_experts; e++) {
        next[e] = total;
        total += ends[e];
        ends[e] = total;
    }
    for (int64_t s = 0; s < slots; s++) {
        const int32_t r = next[chosen[s]]++;
        order[r] = (int32_t)s;
        tokens[r] = (int32_t)(s / top_k);
    }
    return 0;
}

/* x float32 [.][k]; sorted row r reads x row x_rows[r] (x_rows NULL: row r); ends int32 [groups]
 * (group g's sorted rows end at ends[g], non-decreasing); experts int32 [groups] (< num_experts);
 * w float32 [num_experts][panels][k][NB], panels = ceil(n / NB); sorted row r's result goes to out
 * row out_rows[r] (NULL: row r), times scale[that out row] (scale NULL: 1). out_rows must not repeat.
 * x has x_count rows; every index is checked against its range. gated: W's columns are [gate | up]
 * (n a multiple of 2 * NB) and out gets silu(gate) * up, n / 2 columns (SwiGLU's up projection).
 * Returns 0, or -2 on bad geometry. */
int expert_matmul(const float *x, int64_t x_count, int64_t k, const int32_t *x_rows, const int32_t *ends,
                  const int32_t *experts, int groups, int num_experts, const float *w, int64_t n,
                  float *out, const int32_t *out_rows, const float *scale, int gated, int threads) {
    if (threads < 1) threads = 1;
    if (k <= 0 || n <= 0 || groups < 0 || (gated && n % (2 * NB))) return -2;
    const int64_t all_panels = (n + NB - 1) / NB;
    /* gated: out panel p is silu(gate panel p) * (up panel p + half), out has n / 2 columns */
    const int64_t panels = gated ? all_panels / 2 : all_panels, ldo = gated ? n / 2 : n;
    /* Tasks: (group, chunk of RC rows) pairs, each against every panel. */
    int64_t tasks = 0;
    int32_t start = 0;
    for (int g = 0; g < groups; g++) {
        if (ends[g] < start || experts[g] < 0 || experts[g] >= num_experts) return -2;
        tasks += (ends[g] - start + RC - 1) / RC;
        start = ends[g];
    }
    if (tasks == 0) return 0;
    for (int32_t r = 0; r < start; r++) { /* start: the rows of out */
        if ((x_rows ? x_rows[r] : r) >= x_count || (x_rows && x_rows[r] < 0)) return -2;
        if (out_rows && (out_rows[r] < 0 || out_rows[r] >= start)) return -2;
    }
    int32_t task_group[tasks], task_row[tasks];
    tasks = 0;
    start = 0;
    for (int g = 0; g < groups; g++) {
        for (int32_t r = start; r < ends[g]; r += RC) {
            task_group[tasks] = g;
            task_row[tasks] = r;
            tasks++;
        }
        start = ends[g];
    }
    const int64_t expert_floats = all_panels * k * NB;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static) if (tasks * panels * k >= 4096)
#endif
    for (int64_t job = 0; job < tasks * panels; job++) {
        const int64_t t = job / panels, p = job % panels;
        const int g = task_group[t];
        const int32_t first = task_row[t];
        const int32_t last = first + RC < ends[g] ? first + RC : ends[g];
        const float *panel = w + experts[g] * expert_floats + p * k * NB;
        const int cols = (int)(n - p * NB < NB ? n - p * NB : NB);
        for (int32_t r = first; r < last; r += MR) {
            const int rows = last - r < MR ? last - r : MR;
            const float *xr[MR];
            float *dst[MR];
            float sc[MR];
            for (int i = 0; i < rows; i++) {
                const int64_t src = x_rows ? x_rows[r + i] : r + i;
                const int64_t row = out_rows ? out_rows[r + i] : r + i;
                xr[i] = x + src * k;
                dst[i] = out + row * ldo + p * NB;
                sc[i] = scale ? scale[row] : 1.0f;
            }
            if (!gated) {
                run_block(xr, k, rows, panel, dst, sc, cols);
                continue;
            }
            float gate[MR * NB], up[MR * NB];
            float *gate_rows[MR], *up_rows[MR];
            float ones[MR];
            for (int i = 0; i < rows; i++) {
                ones[i] = 1.0f;
                gate_rows[i] = gate + i * NB;
                up_rows[i] = up + i * NB;
            }
            run_block(xr, k, rows, panel, gate_rows, ones, NB);
            run_block(xr, k, rows, panel + panels * k * NB, up_rows, ones, NB);
            for (int i = 0; i < rows; i++)
                for (int c = 0; c < NB; c++) {
                    const float v = gate[i * NB + c];
                    dst[i][c] = sc[i] * (v / (1.0f + expf(-v)) * up[i * NB + c]);
                }
        }
    }
    return 0;
}
