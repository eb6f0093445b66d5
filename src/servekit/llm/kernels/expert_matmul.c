/* Grouped matmul for mixture-of-experts layers: out[r] = x[r] @ W[e] for the rows r of each group,
 * group g's rows ending at ends[g] and multiplied by expert experts[g].
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

typedef float vec_t __attribute__((vector_size(LANES * sizeof(float)), aligned(4)));

int expert_panel_columns(void) { return NB; }

/* ROWS rows of x (stride k) against one panel [k][NB], into acc. */
#define PANEL_LOOP(ROWS)                                                                  \
    for (int64_t i = 0; i < k; i++) {                                                     \
        vec_t w[NV];                                                                      \
        for (int v = 0; v < NV; v++) w[v] = *(const vec_t *)(panel + i * NB + v * LANES); \
        for (int r = 0; r < (ROWS); r++) {                                                \
            const vec_t xv = (vec_t){0} + x[r * k + i];                                   \
            for (int v = 0; v < NV; v++) acc[r][v] += xv * w[v];                          \
        }                                                                                 \
    }

static void store(vec_t acc[MR][NV], int rows, float *out, int64_t ldo, int cols) {
    for (int r = 0; r < rows; r++) {
        float *dst = out + r * ldo;
        if (cols == NB) {
            for (int v = 0; v < NV; v++) *(vec_t *)(dst + v * LANES) = acc[r][v];
        } else {
            float row[NB];
            for (int v = 0; v < NV; v++) *(vec_t *)(row + v * LANES) = acc[r][v];
            for (int c = 0; c < cols; c++) dst[c] = row[c];
        }
    }
}

/* MR rows of x (stride k) against one panel [k][NB] -> out (stride ldo), cols (<= NB) columns. */
static void kernel_full(const float *x, int64_t k, const float *panel, float *out, int64_t ldo,
                        int cols) {
    vec_t acc[MR][NV];
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = (vec_t){0};
#pragma GCC unroll 1
    PANEL_LOOP(MR)
    store(acc, MR, out, ldo, cols);
}

/* The same for rows < MR. */
static void kernel_tail(const float *x, int64_t k, int rows, const float *panel, float *out,
                        int64_t ldo, int cols) {
    vec_t acc[MR][NV];
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = (vec_t){0};
    switch (rows) { /* a constant row count per case keeps the accumulators in registers */
#define TAIL_CASE(R)       \
    case R: {              \
        PANEL_LOOP(R)      \
        break;             \
    }
        TAIL_CASE(1)
        TAIL_CASE(2)
        TAIL_CASE(3)
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
    default:
        break;
    }
    store(acc, rows, out, ldo, cols);
}

/* x float32 [rows][k]; ends int32 [groups] (group g's rows end at ends[g], non-decreasing); experts
 * int32 [groups] (the expert of each group, < num_experts); w float32 [num_experts][panels][k][NB]
 * with panels = ceil(n / NB); out float32 [rows][n]. Returns 0, or -2 on bad geometry. */
int expert_matmul(const float *x, int64_t k, const int32_t *ends, const int32_t *experts, int groups,
                  int num_experts, const float *w, int64_t n, float *out, int threads) {
    if (threads < 1) threads = 1;
    if (k <= 0 || n <= 0 || groups < 0) return -2;
    const int64_t panels = (n + NB - 1) / NB;
    /* Tasks: (group, chunk of RC rows) pairs, each against every panel. */
    int64_t tasks = 0;
    int32_t start = 0;
    for (int g = 0; g < groups; g++) {
        if (ends[g] < start || experts[g] < 0 || experts[g] >= num_experts) return -2;
        tasks += (ends[g] - start + RC - 1) / RC;
        start = ends[g];
    }
    if (tasks == 0) return 0;
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
    const int64_t expert_floats = panels * k * NB;
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
            if (rows == MR)
                kernel_full(x + r * k, k, panel, out + r * n + p * NB, n, cols);
            else
                kernel_tail(x + r * k, k, rows, panel, out + r * n + p * NB, n, cols);
        }
    }
    return 0;
}
