/* The ternary types TQ1_0 and TQ2_0 (quantize_row_tq{1,2}_0_ref; the importance array is ignored). */
#include "common.h"

/* -1, 0, 1 -> 0, 1, 2 */
static inline int trit(float v, float id) { return (int)lroundf(v * id) + 1; }

static float block_scale(const float *x, float *id) {
    float amax = 0;
    for (int j = 0; j < QK_K; ++j) amax = MC_MAX(amax, fabsf(x[j]));
    *id = amax ? 1.0f / amax : 0.0f;
    return amax;
}

int mc_tq1_0(const float *x, uint8_t *y, int64_t nrows, int64_t n, const float *qw) {
    (void)qw;
    for (int64_t b = 0; b < nrows * n / QK_K; ++b, y += 54) {
        float id;
        const float d = block_scale(x, &id);
        uint8_t *qs = y, *qh = y + 48;
        for (int m = 0; m < 32; ++m) { /* five trits per byte, along 32 bytes */
            uint8_t q = 0;
            for (int k = 0; k < 5; ++k) q = (uint8_t)(q * 3 + trit(x[m + 32 * k], id));
            qs[m] = (uint8_t)(((uint16_t)q * 256 + (243 - 1)) / 243); /* ceiling division */
        }
        x += 160;
        for (int m = 0; m < 16; ++m) { /* along 16 bytes */
            uint8_t q = 0;
            for (int k = 0; k < 5; ++k) q = (uint8_t)(q * 3 + trit(x[m + 16 * k], id));
            qs[32 + m] = (uint8_t)(((uint16_t)q * 256 + (243 - 1)) / 243);
        }
        x += 80;
        for (int j = 0; j < 4; ++j) { /* four trits per byte, the first one most significant of five */
            uint8_t q = 0;
            for (int m = 0; m < 4; ++m) q = (uint8_t)(q * 3 + trit(x[j + 4 * m], id));
            q = (uint8_t)(q * 3);
            qh[j] = (uint8_t)(((uint16_t)q * 256 + (243 - 1)) / 243);
        }
        x += 16;
        put_half(y + 52, d);
    }
    return 0;
}

int mc_tq2_0(const float *x, uint8_t *y, int64_t nrows, int64_t n, const float *qw) {
    (void)qw;
    for (int64_t b = 0; b < nrows * n / QK_K; ++b, x += QK_K, y += 66) {
        float id;
        const float d = block_scale(x, &id);
        for (int j = 0; j < 64; j += 32)
            for (int m = 0; m < 32; ++m) {
                uint8_t q = 0;
                for (int k = 0; k < 4; ++k) q = (uint8_t)(q + ((trit(x[4 * j + m + 32 * k], id) & 3) << (2 * k)));
                y[j + m] = q;
            }
        put_half(y + 64, d);
    }
    return 0;
}
