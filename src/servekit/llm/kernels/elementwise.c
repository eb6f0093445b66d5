/* Per-row elementwise passes of a decoder layer, each fused into one pass over memory:
 *
 *   add_norm:      hidden += delta (+ extra) when delta is given, then out = RMSNorm(hidden) * weight
 *                  or LayerNorm(hidden) * weight (+ bias); the sum delta + extra is formed first, as
 *                  a parallel block's (attention + MLP) + residual;
 *   silu_mul:      out = silu(gate) * up, for gate_up rows laid out [gate | up];
 *   gelu_tanh:     out = gelu(x) in its tanh form (GPT-2's gelu_new), as x * sigmoid(2 * inner):
 *                  0.5 * (1 + tanh(z)) == sigmoid(2 z), and expf vectorises where tanhf does not.
 *
 * PyTorch spends five to eight operators (and their dispatch, ~5 us each) on each of these; at batch
 * size 1 that overhead is a large part of a decode step.
 */
#include <math.h>
#include <stdint.h>

#include "dtypes.h"

void add_norm(void *hidden, const void *delta, const void *extra, const void *weight, const void *bias, void *out,
              int64_t rows, int64_t cols, float eps, int rms, int dtype) {
#pragma omp parallel for schedule(static) if (rows * cols >= 262144)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t base = r * cols;
        if (delta) {
            for (int64_t c = 0; c < cols; c++) {
                float added = load_element(delta, base + c, dtype);
                if (extra) added += load_element(extra, base + c, dtype);
                store_element(hidden, base + c, load_element(hidden, base + c, dtype) + added, dtype);
            }
        }
        /* From the stored (rounded) hidden row, which is in L1 by now. */
        float mean = 0.0f;
        if (!rms) {
            float sum = 0.0f;
            for (int64_t c = 0; c < cols; c++) sum += load_element(hidden, base + c, dtype);
            mean = sum / (float)cols;
        }
        float total = 0.0f;
        for (int64_t c = 0; c < cols; c++) {
            const float centred = load_element(hidden, base + c, dtype) - mean;
            total += centred * centred;
        }
        const float inverse = 1.0f / sqrtf(total / (float)cols + eps);
        for (int64_t c = 0; c < cols; c++) {
            float value = (load_element(hidden, base + c, dtype) - mean) * inverse * load_element(weight, c, dtype);
            if (bias) value += load_element(bias, c, dtype);
            store_element(out, base + c, value, dtype);
        }
    }
}

/* One float32 row [gate | up] of 2 cols: a plain loop, which the compiler vectorises (expf included).
 * decode_step.c calls it on its own threads. */
void silu_mul_row(const float *gate, float *out, int64_t cols) {
    const float *up = gate + cols;
    for (int64_t c = 0; c < cols; c++) {
        /* expf(-gate) kept finite: silu of a gate below -80 is -0 either way */
        const float minus = gate[c] < -80.0f ? 80.0f : -gate[c];
        out[c] = gate[c] / (1.0f + expf(minus)) * up[c];
    }
}

void silu_mul(const void *gate_up, void *out, int64_t rows, int64_t cols, int dtype) {
    if (dtype == DTYPE_F32) {
        const float *source = (const float *)gate_up;
        float *target = (float *)out;
#pragma omp parallel for schedule(static) if (rows * cols >= 262144)
        for (int64_t r = 0; r < rows; r++) silu_mul_row(source + r * 2 * cols, target + r * cols, cols);
        return;
    }
#pragma omp parallel for schedule(static) if (rows * cols >= 262144)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t c = 0; c < cols; c++) {
            const float gate = load_element(gate_up, r * 2 * cols + c, dtype);
            const float up = load_element(gate_up, r * 2 * cols + cols + c, dtype);
            store_element(out, r * cols + c, gate / (1.0f + expf(-gate)) * up, dtype);
        }
    }
}

static inline float gelu_tanh_one(float value) {
    /* 2 * sqrt(2 / pi) * (x + 0.044715 x^3), kept where expf(-inner) stays finite */
    float inner = 1.5957691216057308f * (value + 0.044715f * value * value * value);
    inner = inner < -80.0f ? -80.0f : inner;
    return value / (1.0f + expf(-inner));
}

void gelu_tanh(const void *x, void *out, int64_t n, int dtype) {
    if (dtype == DTYPE_F32) { /* a plain float loop, which the compiler vectorises (expf included) */
        const float *source = (const float *)x;
        float *target = (float *)out;
#pragma omp parallel for schedule(static) if (n >= 262144)
        for (int64_t start = 0; start < n; start += 4096) {
            const int64_t end = start + 4096 < n ? start + 4096 : n;
#pragma omp simd
            for (int64_t i = start; i < end; i++) target[i] = gelu_tanh_one(source[i]);
        }
        return;
    }
#pragma omp parallel for schedule(static) if (n >= 262144)
    for (int64_t i = 0; i < n; i++) store_element(out, i, gelu_tanh_one(load_element(x, i, dtype)), dtype);
}
