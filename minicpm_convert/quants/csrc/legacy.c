/* The 32-weight block types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (quantize_row_*_ref and, with an
 * importance array, quantize_row_*_impl of ggml-quants.c). */
#include "common.h"

#include <stdlib.h>

/* (int8_t) of a float as x86-64 converts it: truncate; NaN or out of range -> low byte of
 * 0x80000000, i.e. 0. */
static inline int8_t to_int8(float v) { return fabsf(v) < 2147483648.0f ? (int8_t)(int32_t)v : (int8_t)0; }

static inline void pack_qh(uint8_t *p, const uint8_t *L) {
    uint32_t qh = 0;
    for (int j = 0; j < 16; ++j) {
        qh |= ((L[j] & 0x10u) >> 4) << j;
        qh |= ((L[j + 16] & 0x10u) >> 4) << (j + 16);
    }
    put_u32(p, qh);
}

/* The weights of the importance paths: qw[j] * sqrtf(sigma2 + x[j]^2), sigma2 the row's mean
 * square (sum in source order over the whole row). */
static void row_weights(const float *x, const float *qw, int64_t n, float *w) {
    float sum_x2 = 0;
    for (int64_t j = 0; j < n; ++j) sum_x2 += x[j] * x[j];
    const float sigma2 = sum_x2 / n;
    for (int64_t j = 0; j < n; ++j) w[j] = qw[j] * sqrtf(sigma2 + x[j] * x[j]);
}

/* Q4_0 / Q5_0: one fp16 scale d = max/-nmax (max: the value of largest magnitude). */
static int symmetric(const float *x, uint8_t *y, int64_t nrows, int64_t n, const float *qw, int nmax) {
    const int64_t nb = n / 32;
    const int bytes = nmax == 8 ? 18 : 22;
    float *w = NULL, *sc = NULL;
    int8_t *L = NULL;
    if (qw) {
        w = malloc(sizeof(float) * (size_t)n);
        sc = malloc(sizeof(float) * (size_t)nb);
        L = malloc((size_t)n);
        if (!w || !sc || !L) {
            free(w), free(sc), free(L);
            return -2;
        }
    }
    for (int64_t r = 0; r < nrows; ++r, x += n) {
        if (qw) {
            row_weights(x, qw, n, w);
            mc_qx(x, w, nb, 32, nmax, sc, L);
        }
        for (int64_t b = 0; b < nb; ++b, y += bytes) {
            const float *xb = x + 32 * b;
            uint8_t q[32];
            float d;
            if (qw) {
                d = sc[b];
                memcpy(q, L + 32 * b, 32);
            } else {
                float amax = 0, max = 0;
                for (int j = 0; j < 32; ++j) {
                    if (amax < fabsf(xb[j])) {
                        amax = fabsf(xb[j]);
                        max = xb[j];
                    }
                }
                d = max / -nmax;
                const float id = d ? 1.0f / d : 0.0f;
                for (int j = 0; j < 32; ++j) q[j] = (uint8_t)MC_MIN(2 * nmax - 1, to_int8(xb[j] * id + (nmax + 0.5f)));
            }
            put_half(y, d);
            uint8_t *qs = y + (nmax == 8 ? 2 : 6);
            if (nmax == 16) pack_qh(y + 2, q);
            for (int j = 0; j < 16; ++j) {
                qs[j] = nmax == 8 ? (uint8_t)(q[j] | (q[j + 16] << 4)) : (uint8_t)((q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4));
            }
        }
    }
    free(w), free(sc), free(L);
    return 0;
}

/* Q4_1 / Q5_1: fp16 scale d and minimum m. */
static int asymmetric(const float *x, uint8_t *y, int64_t nrows, int64_t n, const float *qw, int nmax) {
    const int64_t nb = n / 32;
    const int bytes = nmax == 15 ? 20 : 24;
    float *w = NULL, *sc = NULL, *mn = NULL;
    uint8_t *L = NULL;
    if (qw) {
        w = malloc(sizeof(float) * (size_t)n);
        sc = malloc(sizeof(float) * (size_t)nb);
        mn = malloc(sizeof(float) * (size_t)nb);
        L = malloc((size_t)n);
        if (!w || !sc || !mn || !L) {
            free(w), free(sc), free(mn), free(L);
            return -2;
        }
    }
    for (int64_t r = 0; r < nrows; ++r, x += n) {
        if (qw) {
            row_weights(x, qw, n, w);
            mc_qkx(x, w, nb, 32, nmax, -0.9f, 0.05f, 36, 0, sc, mn, L); /* make_qkx3_quants */
        }
        for (int64_t b = 0; b < nb; ++b, y += bytes) {
            const float *xb = x + 32 * b;
            uint8_t q[32];
            float d, m;
            if (qw) {
                d = sc[b];
                m = -mn[b];
                memcpy(q, L + 32 * b, 32);
            } else {
                float min = FLT_MAX, max = -FLT_MAX;
                for (int j = 0; j < 32; ++j) {
                    if (xb[j] < min) min = xb[j];
                    if (xb[j] > max) max = xb[j];
                }
                d = (max - min) / nmax;
                m = min;
                const float id = d ? 1.0f / d : 0.0f;
                for (int j = 0; j < 32; ++j) {
                    const int8_t v = to_int8((xb[j] - min) * id + 0.5f);
                    q[j] = nmax == 15 ? (uint8_t)MC_MIN(15, v) : (uint8_t)v;
                }
            }
            put_half(y, d);
            put_half(y + 2, m);
            uint8_t *qs = y + (nmax == 15 ? 4 : 8);
            if (nmax == 31) pack_qh(y + 4, q);
            for (int j = 0; j < 16; ++j) {
                qs[j] = nmax == 15 ? (uint8_t)(q[j] | (q[j + 16] << 4)) : (uint8_t)((q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4));
            }
        }
    }
    free(w), free(sc), free(mn), free(L);
    return 0;
}

int mc_q4_0(const float *x, uint8_t *y, int64_t nrows, int64_t n, const float *qw) { return symmetric(x, y, nrows, n, qw, 8); }
int mc_q5_0(const float *x, uint8_t *y, int64_t nrows, int64_t n, const float *qw) { return symmetric(x, y, nrows, n, qw, 16); }
int mc_q4_1(const float *x, uint8_t *y, int64_t nrows, int64_t n, const float *qw) { return asymmetric(x, y, nrows, n, qw, 15); }
int mc_q5_1(const float *x, uint8_t *y, int64_t nrows, int64_t n, const float *qw) { return asymmetric(x, y, nrows, n, qw, 31); }

/* Q8_0: d = max|x| / 127 as fp16, levels roundf(x / d); quantize_q8_0 ignores the importance array. */
int mc_q8_0(const float *x, uint8_t *y, int64_t nrows, int64_t n, const float *qw) {
    (void)qw;
    const int64_t nb = nrows * n / 32;
    for (int64_t b = 0; b < nb; ++b, x += 32, y += 34) {
        float amax = 0;
        for (int i = 0; i < 32; ++i) amax = MC_MAX(amax, fabsf(x[i]));
        const float d = amax / 127;
        const float id = d ? 1.0f / d : 0.0f;
        put_half(y, d);
        for (int i = 0; i < 32; ++i) y[2 + i] = (uint8_t)to_int8(roundf(x[i] * id));
    }
    return 0;
}
