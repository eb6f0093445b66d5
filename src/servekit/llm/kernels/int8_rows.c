/* The two passes around an int8 matrix multiply (servekit.llm.models.linear.Int8Linear), fused:
 *
 *   quantize_rows_int8:  every row of x gets its own scale (max |x| / 127) and is rounded to int8;
 *   dequantize_int32:    int32 accumulators times row scale times column scale, plus bias.
 *
 * In PyTorch each is five to eight operators (and as many temporaries); here each is one pass.
 */
#include <math.h>
#include <stdint.h>

#include "dtypes.h"

void quantize_rows_int8(const void *x, int dtype, int64_t rows, int64_t cols, int8_t *out, float *scales) {
#pragma omp parallel for schedule(static) if (rows * cols >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t base = r * cols;
        float peak = 0.0f;
        for (int64_t c = 0; c < cols; c++) {
            const float magnitude = fabsf(load_element(x, base + c, dtype));
            peak = magnitude > peak ? magnitude : peak;
        }
        const float scale = (peak > 1e-12f ? peak : 1e-12f) / 127.0f;
        const float inverse = 1.0f / scale;
        for (int64_t c = 0; c < cols; c++) {
            float q = nearbyintf(load_element(x, base + c, dtype) * inverse);
            q = q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q);
            out[base + c] = (int8_t)q;
        }
        scales[r] = scale;
    }
}

void dequantize_int32(const int32_t *acc, int64_t rows, int64_t cols, const float *row_scales,
                      const float *col_scales, const float *bias, void *out, int dtype) {
#pragma omp parallel for collapse(2) schedule(static) if (rows * cols >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t block = 0; block < (cols + 1023) / 1024; block++) {
            const float row_scale = row_scales[r];
            const int64_t end = (block + 1) * 1024 < cols ? (block + 1) * 1024 : cols;
            for (int64_t c = block * 1024; c < end; c++) {
                float value = (float)acc[r * cols + c] * row_scale * col_scales[c];
                if (bias) value += bias[c];
                store_element(out, r * cols + c, value, dtype);
            }
        }
    }
}
