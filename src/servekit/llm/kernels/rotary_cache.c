/* The step of an attention layer between its q/k/v projection and attention, for a row-major
 * [tokens][q | k | v] buffer, in one pass:
 *
 *   rotary embedding (rotate-half form: dims i and i + rotary_dim / 2 rotate together) on every
 *   query and key head, in place, from per-token cos and signed sin rows ([-sin | sin], as
 *   ``RotaryEmbedding`` builds its tables);
 *   the rotated keys and the values written into their paged-cache slots (layer cache
 *   [blocks][2][kv_heads][block_size][head_dim], stored as the cache's dtype).
 *
 * PyTorch spends ~20 operators per layer on this (two rotations, two indexed cache writes), which
 * at batch size 1 cost more than the layer's attention itself.
 */
#include <stdint.h>
#include <string.h>

#include "dtypes.h"

static void rotate(float *x, const float *cos, const float *sin, int64_t half) {
    for (int64_t i = 0; i < half; i++) {
        const float a = x[i], b = x[i + half];
        x[i] = a * cos[i] + b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* One token's KV head h: its query heads [h * group, (h + 1) * group) of q and key head h of k rotated
 * in place (cos NULL: no rotary), then key and value head h written into cache slot (block, offset).
 * decode_step.c calls it for the KV heads of one thread. */
void rotary_write_kv_head(float *q, float *k, const float *v, const float *cos, const float *sin, int64_t half,
                          int64_t h, int64_t group, int64_t kv_heads, int64_t head_dim, void *cache,
                          int cache_dtype, int64_t block, int64_t offset, int64_t block_size) {
    if (cos != NULL) {
        for (int64_t g = h * group; g < (h + 1) * group; g++) rotate(q + g * head_dim, cos, sin, half);
        rotate(k + h * head_dim, cos, sin, half);
    }
    for (int part = 0; part < 2; part++) {
        const float *source = (part == 0 ? k : v) + h * head_dim;
        const int64_t base = (((block * 2 + part) * kv_heads + h) * block_size + offset) * head_dim;
        if (cache_dtype == DTYPE_F32) {
            memcpy((float *)cache + base, source, sizeof(float) * (size_t)head_dim);
        } else {
            for (int64_t d = 0; d < head_dim; d++) store_element(cache, base + d, source[d], cache_dtype);
        }
    }
}

/* qkv float32 [tokens][row_stride] (q at column 0, k at heads * head_dim, v after k); cos, sin
 * float32 [tokens][rotary_dim] (NULL: no rotary); slots int64 [tokens]: block * block_size + offset. */
void rotary_write_kv(float *qkv, int64_t row_stride, const float *cos, const float *sin, int64_t rotary_dim,
                     const int64_t *slots, void *cache, int cache_dtype, int64_t tokens, int64_t heads,
                     int64_t kv_heads, int64_t head_dim, int64_t block_size) {
    for (int64_t t = 0; t < tokens; t++) {
        float *q = qkv + t * row_stride, *k = q + heads * head_dim;
        const float *v = k + kv_heads * head_dim;
        const float *c = cos != NULL ? cos + t * rotary_dim : NULL, *s = sin != NULL ? sin + t * rotary_dim : NULL;
        for (int64_t h = 0; h < kv_heads; h++)
            rotary_write_kv_head(q, k, v, c, s, rotary_dim / 2, h, heads / kv_heads, kv_heads, head_dim, cache,
                                 cache_dtype, slots[t] / block_size, slots[t] % block_size, block_size);
    }
}
