/* The k-quants Q2_K .. Q6_K: quantize_row_<type>_ref without an importance array and
 * quantize_row_<type>_impl with one (ggml-quants.c).  The sub-block searches run 8 at a time
 * (searches.c); what is per super-block here is short and scalar. */
#include "common.h"
#include "lanes.h"

/* sigma2 = factor * (sum of x^2 over the super-block, in order) / QK_K */
static float sigma2_of(const float *x, float factor) {
    float sumx2 = 0;
    for (int j = 0; j < QK_K; ++j) sumx2 += x[j] * x[j];
    return factor * sumx2 / QK_K;
}

/* weights qw[l] * sqrtf(sigma2 + x[l]^2) for a super-block, and their sums per group of n */
static void imatrix_weights(const float *x, const float *qw, float sigma2, int n, float *w, float *sw) {
    for (int j = 0; j < QK_K; ++j) w[j] = qw[j] * sqrtf(sigma2 + x[j] * x[j]);
    for (int g = 0; g < QK_K / n; ++g) {
        float s = 0;
        for (int l = 0; l < n; ++l) s += w[n * g + l];
        sw[g] = s;
    }
}

static void pack_2bit(const uint8_t *L, uint8_t *qs) {
    for (int j = 0; j < QK_K; j += 128)
        for (int l = 0; l < 32; ++l)
            qs[j / 4 + l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
}

/* ------------------------------------------------------------------------------ Q4_K / Q5_K */

static inline void get_scale_min_k4(int j, const uint8_t *q, uint8_t *d, uint8_t *m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4));
    }
}

/* Super-blocks per search call: 128 sub-blocks, whole batches of 8 or 16 lanes. */
#define QKX_BATCH 16

/* The weights of a Q4_K/Q5_K super-block (and, with an importance array, their sums per
 * sub-block). */
static void qkx_weights(const float *x, const float *qw, float *w, float *sw) {
    if (!qw) { /* quantize_row_q{4,5}_K_ref */
        for (int j = 0; j < 8; ++j) {
            const float *xs = x + 32 * j;
            float sum_x2 = 0;
            for (int l = 0; l < 32; ++l) sum_x2 += xs[l] * xs[l];
            const float av_x = sqrtf(sum_x2 / 32);
            for (int l = 0; l < 32; ++l) w[32 * j + l] = av_x + fabsf(xs[l]);
        }
    } else { /* quantize_row_q{4,5}_K_impl */
        imatrix_weights(x, qw, sigma2_of(x, 2), 32, w, sw);
    }
}

/* One Q4_K/Q5_K super-block at y from its 8 sub-block searches (sc, mins, and sw with an
 * importance array): the scales, the fp16 d and dmin, then the levels at the stored scales. */
LANES_ATTR
static void qkx_finish(const float *x, int imatrix, int nmax, const float *sc, const float *mins, const float *sw,
                       uint8_t *y, uint8_t *L) {
    uint8_t ls[8], lm[8];
    float d_block, m_block;
    if (!imatrix) {
        float max_scale = 0, max_min = 0;
        for (int j = 0; j < 8; ++j) {
            if (sc[j] > max_scale) max_scale = sc[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
        const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
        for (int j = 0; j < 8; ++j) {
            const uint8_t a = (uint8_t)nearest_int(inv_scale * sc[j]);
            const uint8_t b = (uint8_t)nearest_int(inv_min * mins[j]);
            ls[j] = MC_MIN(63, a);
            lm[j] = MC_MIN(63, b);
        }
        d_block = max_scale / 63.f;
        m_block = max_min / 63.f;
    } else {
        d_block = mc_make_qp_quants(8, 63, sc, ls, sw);
        m_block = mc_make_qp_quants(8, 63, mins, lm, sw);
        if (nmax == 31) /* Q5_K clamps, Q4_K does not */
            for (int j = 0; j < 8; ++j) {
                ls[j] = MC_MIN(63, ls[j]);
                lm[j] = MC_MIN(63, lm[j]);
            }
    }
    uint8_t *scales = y + 4;
    for (int j = 0; j < 8; ++j) {
        if (j < 4) {
            scales[j] = ls[j];
            scales[j + 4] = lm[j];
        } else {
            scales[j + 4] = (uint8_t)((ls[j] & 0xF) | ((lm[j] & 0xF) << 4));
            scales[j - 4] |= (uint8_t)((ls[j] >> 4) << 6);
            scales[j - 0] |= (uint8_t)((lm[j] >> 4) << 6);
        }
    }
    const float dd = put_half(y, d_block);
    const float dm_ = put_half(y + 2, m_block);
    for (int j = 0; j < 8; ++j) {
        uint8_t s, m;
        get_scale_min_k4(j, scales, &s, &m);
        const float d = dd * s;
        if (!d) continue;
        const float dm = dm_ * m;
        for (int i = 0; i < 32; ++i) L[32 * j + i] = (uint8_t)clampi(nearest_int((x[32 * j + i] + dm) / d), 0, nmax);
    }
}

/* Q4_K (nmax 15) or Q5_K (31): every super-block's 8 sub-block searches, QKX_BATCH super-blocks
 * per call (their groups are consecutive in x), then pack(y, L) per super-block. */
static void qkx_rows(const float *x, uint8_t *y, int64_t nrows, int64_t n, const float *qw, int nmax, int bytes,
                     void (*pack)(uint8_t *, const uint8_t *)) {
    float w[QKX_BATCH * QK_K], sw[QKX_BATCH * 8], sc[QKX_BATCH * 8], mins[QKX_BATCH * 8];
    uint8_t L[QKX_BATCH * QK_K];
    const int64_t per_row = n / QK_K, nblocks = nrows * per_row;
    for (int64_t b0 = 0; b0 < nblocks; b0 += QKX_BATCH) {
        const int nb = (int)(nblocks - b0 < QKX_BATCH ? nblocks - b0 : QKX_BATCH);
        const float *xb = x + QK_K * b0;
        for (int j = 0; j < nb; ++j)
            qkx_weights(xb + QK_K * j, qw ? qw + QK_K * ((b0 + j) % per_row) : NULL, w + QK_K * j, sw + 8 * j);
        if (qw) mc_qkx(xb, w, 8 * nb, 32, nmax, -0.9f, 0.05f, 36, 0, sc, mins, L); /* make_qkx3_quants */
        else if (nmax == 15) mc_qkx(xb, w, 8 * nb, 32, 15, -1.0f, 0.1f, 20, 0, sc, mins, L);
        else mc_qkx(xb, w, 8 * nb, 32, 31, -0.5f, 0.1f, 15, 0, sc, mins, L);
        for (int j = 0; j < nb; ++j) {
            uint8_t *yb = y + bytes * (b0 + j);
            qkx_finish(xb + QK_K * j, qw != NULL, nmax, sc + 8 * j, mins + 8 * j, sw + 8 * j, yb, L + QK_K * j);
            pack(yb, L + QK_K * j);
        }
    }
}

static void pack_q4_k(uint8_t *y, const uint8_t *L) {
    uint8_t *qs = y + 16;
    for (int g = 0; g < 4; ++g)
        for (int l = 0; l < 32; ++l) qs[32 * g + l] = (uint8_t)(L[64 * g + l] | (L[64 * g + 32 + l] << 4));
}

static void pack_q5_k(uint8_t *y, const uint8_t *L) {
    uint8_t *qh = y + 16, *qs = y + 48;
    memset(qh, 0, 32);
    for (int g = 0; g < 4; ++g) {
        for (int l = 0; l < 32; ++l) {
            const int a = L[64 * g + l], c = L[64 * g + 32 + l];
            qh[l] |= (uint8_t)(((a >> 4) << (2 * g)) | ((c >> 4) << (2 * g + 1)));
            qs[32 * g + l] = (uint8_t)((a & 0x0F) | ((c & 0x0F) << 4));
        }
    }
}

int mc_q4_k(const float *x, uint8_t *y, int64_t nrows, int64_t n, const float *qw) {
    qkx_rows(x, y, nrows, n, qw, 15, 144, pack_q4_k);
    return 0;
}

int mc_q5_k(const float *x, uint8_t *y, int64_t nrows, int64_t n, const float *qw) {
    qkx_rows(x, y, nrows, n, qw, 31, 176, pack_q5_k);
    return 0;
}

/* ------------------------------------------------------------------------------------ Q6_K */

int mc_q6_k(const float *x, uint8_t *y, int64_t nrows, int64_t n, const float *qw) {
    int8_t L[QK_K];
    float sc[16];
    const int64_t per_row = n / QK_K;
    for (int64_t b = 0; b < nrows * per_row; ++b, x += QK_K, y += 210) {
        /* the importance array is make_qx_quants' weights as is (quantize_row_q6_K_impl) */
        mc_qx(x, qw ? qw + QK_K * (b % per_row) : NULL, 16, 16, 32, sc, L);
        float max_abs = 0, max_sc = 0;
        for (int g = 0; g < 16; ++g) {
            const float a = fabsf(sc[g]);
            if (a > max_abs) {
                max_abs = a;
                max_sc = sc[g];
            }
        }
        if (max_abs < GROUP_MAX_EPS) {
            memset(y, 0, 210);
            continue;
        }
        const float inv = -128.0f / max_sc;
        int8_t *scales = (int8_t *)(y + 192);
        const float d0 = put_half(y + 208, 1 / inv);
        for (int g = 0; g < 16; ++g) scales[g] = (int8_t)MC_MIN(127, nearest_int(inv * sc[g]));
        for (int g = 0; g < 16; ++g) {
            const float d = d0 * scales[g];
            if (!d) continue;
            for (int i = 0; i < 16; ++i) L[16 * g + i] = (int8_t)(clampi(nearest_int(x[16 * g + i] / d), -32, 31) + 32);
        }
        uint8_t *ql = y, *qh = y + 128;
        for (int h = 0; h < 2; ++h) {
            const int8_t *Lh = L + 128 * h;
            for (int l = 0; l < 32; ++l) {
                const uint8_t a = (uint8_t)Lh[l], c = (uint8_t)Lh[l + 32];
                const uint8_t e = (uint8_t)Lh[l + 64], f = (uint8_t)Lh[l + 96];
                ql[64 * h + l] = (uint8_t)((a & 0x0F) | ((e & 0x0F) << 4));
                ql[64 * h + 32 + l] = (uint8_t)((c & 0x0F) | ((f & 0x0F) << 4));
                qh[32 * h + l] = (uint8_t)((a >> 4) | ((c >> 4) << 2) | ((e >> 4) << 4) | ((f >> 4) << 6));
            }
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------ Q2_K */

int mc_q2_k(const float *x, uint8_t *y, int64_t nrows, int64_t n, const float *qw) {
    uint8_t L[QK_K];
    float w[QK_K], sw[16], sc[16], mins[16];
    const int64_t per_row = n / QK_K;
    for (int64_t b = 0; b < nrows * per_row; ++b, x += QK_K, y += 84) {
        uint8_t *scales = y, *qs = y + 16;
        float d_block, m_block;
        if (!qw) { /* quantize_row_q2_K_ref */
            for (int j = 0; j < QK_K; ++j) w[j] = fabsf(x[j]);
            mc_qkx(x, w, 16, 16, 3, -0.5f, 0.1f, 15, 1, sc, mins, L);
            float max_scale = 0, max_min = 0;
            for (int j = 0; j < 16; ++j) {
                if (sc[j] > max_scale) max_scale = sc[j];
                if (mins[j] > max_min) max_min = mins[j];
            }
            if (max_scale > 0) {
                const float iscale = 15.f / max_scale;
                for (int j = 0; j < 16; ++j) scales[j] = (uint8_t)nearest_int(iscale * sc[j]);
                d_block = max_scale / 15.f;
            } else {
                memset(scales, 0, 16);
                d_block = 0.f;
            }
            if (max_min > 0) {
                const float iscale = 15.f / max_min;
                for (int j = 0; j < 16; ++j) scales[j] |= (uint8_t)(nearest_int(iscale * mins[j]) << 4);
                m_block = max_min / 15.f;
            } else {
                m_block = 0.f;
            }
        } else { /* quantize_row_q2_K_impl */
            uint8_t ls[16], lm[16];
            imatrix_weights(x, qw + QK_K * (b % per_row), sigma2_of(x, 1), 16, w, sw);
            mc_qkx(x, w, 16, 16, 3, -0.9f, 0.05f, 36, 0, sc, mins, L); /* make_qkx3_quants */
            d_block = mc_make_qp_quants(16, 15, sc, ls, sw);
            m_block = mc_make_qp_quants(16, 15, mins, lm, sw);
            for (int j = 0; j < 16; ++j) scales[j] = (uint8_t)(ls[j] | (lm[j] << 4));
        }
        const float dd = put_half(y + 80, d_block);
        const float mm = put_half(y + 82, m_block);
        for (int j = 0; j < 16; ++j) {
            const float d = dd * (scales[j] & 0xF);
            if (!d) continue;
            const float dm = mm * (scales[j] >> 4);
            for (int i = 0; i < 16; ++i) L[16 * j + i] = (uint8_t)clampi(nearest_int((x[16 * j + i] + dm) / d), 0, 3);
        }
        pack_2bit(L, qs);
    }
    return 0;
}

/* ------------------------------------------------------------------------------------ Q3_K */

int mc_q3_k(const float *x, uint8_t *y, int64_t nrows, int64_t n, const float *qw) {
    int8_t L[QK_K];
    float w[QK_K], sw[16], sc[16];
    const int64_t per_row = n / QK_K;
    for (int64_t b = 0; b < nrows * per_row; ++b, x += QK_K, y += 110) {
        uint8_t *hmask = y, *qs = y + 32, *scales = y + 96;
        float d_block;
        int8_t ls[16];
        memset(scales, 0, 12);
        if (!qw) { /* quantize_row_q3_K_ref */
            float max_scale = 0, amax = 0;
            for (int j = 0; j < 16; ++j) {
                sc[j] = mc_make_q3_quants(16, 4, x + 16 * j, L + 16 * j);
                const float a = fabsf(sc[j]);
                if (a > amax) {
                    amax = a;
                    max_scale = sc[j];
                }
            }
            if (max_scale) {
                const float iscale = -32.f / max_scale;
                for (int j = 0; j < 16; ++j) {
                    const int8_t l = (int8_t)nearest_int(iscale * sc[j]);
                    ls[j] = (int8_t)(MC_MAX(-32, MC_MIN(31, l)) + 32);
                }
                d_block = 1 / iscale;
            } else {
                memset(ls, 0, 16);
                d_block = 0.f;
            }
        } else { /* quantize_row_q3_K_impl */
            imatrix_weights(x, qw + QK_K * (b % per_row), sigma2_of(x, 2), 16, w, sw);
            mc_qx(x, w, 16, 16, 4, sc, L);
            d_block = 0; /* set below */
            float dsc[1];
            mc_qx(sc, sw, 1, 16, 32, dsc, ls);
            d_block = dsc[0];
        }
        for (int j = 0; j < 16; ++j) {
            int l = ls[j];
            if (j < 8) scales[j] = (uint8_t)(l & 0xF);
            else scales[j - 8] |= (uint8_t)((l & 0xF) << 4);
            l >>= 4;
            scales[j % 4 + 8] |= (uint8_t)(l << (2 * (j / 4)));
        }
        const float dd = put_half(y + 108, d_block);
        for (int j = 0; j < 16; ++j) {
            int8_t s = (int8_t)(j < 8 ? scales[j] & 0xF : scales[j - 8] >> 4);
            s = (int8_t)((s | (((scales[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32);
            const float d = dd * s;
            if (!d) continue;
            for (int i = 0; i < 16; ++i) L[16 * j + i] = (int8_t)(clampi(nearest_int(x[16 * j + i] / d), -4, 3) + 4);
        }
        memset(hmask, 0, 32);
        uint8_t q[QK_K];
        for (int j = 0; j < QK_K; ++j) {
            int l = L[j];
            if (l > 3) {
                hmask[j % 32] |= (uint8_t)(1 << (j / 32));
                l -= 4;
            }
            q[j] = (uint8_t)l;
        }
        pack_2bit(q, qs);
    }
    return 0;
}
