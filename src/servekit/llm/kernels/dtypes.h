/* Element access for the three storage types the kernels accept; computation is always float32. */
#ifndef SERVEKIT_DTYPES_H
#define SERVEKIT_DTYPES_H

#include <stdint.h>
#include <string.h>

enum { DTYPE_F32 = 0, DTYPE_BF16 = 1, DTYPE_F16 = 2 };

static inline float load_element(const void *base, int64_t index, int dtype) {
    if (dtype == DTYPE_F32) return ((const float *)base)[index];
    if (dtype == DTYPE_BF16) {
        uint32_t bits = (uint32_t)((const uint16_t *)base)[index] << 16;
        float value;
        memcpy(&value, &bits, sizeof value);
        return value;
    }
    return (float)((const _Float16 *)base)[index];
}

static inline void store_element(void *base, int64_t index, float value, int dtype) {
    if (dtype == DTYPE_F32) {
        ((float *)base)[index] = value;
    } else if (dtype == DTYPE_BF16) {
        uint32_t bits;
        memcpy(&bits, &value, sizeof bits);
        bits += 0x7FFFu + ((bits >> 16) & 1u); /* round to nearest even */
        ((uint16_t *)base)[index] = (uint16_t)(bits >> 16);
    } else {
        ((_Float16 *)base)[index] = (_Float16)value;
    }
}

#endif
