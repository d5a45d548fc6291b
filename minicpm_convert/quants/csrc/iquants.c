/* The IQ types: IQ4_NL/IQ4_XS (non-linear 4-bit levels) and IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS,
 * IQ2_S (signs plus a point of a lattice codebook), as quantize_iq* in ggml-quants.c.  The
 * codebook tables come from Python (iq_grids.py) through mc_iq_tables. */
#include "common.h"

mc_tables mc_iq_tables[5];

/* ============================================================================= IQ4_NL / IQ4_XS */

static const int8_t kvalues_iq4nl[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

static inline int best_index_int8(int n, const int8_t *val, float x) {
    if (x <= val[0]) return 0;
    if (x >= val[n - 1]) return n - 1;
    int ml = 0, mu = n - 1;
    while (mu - ml > 1) {
        const int mav = (ml + mu) / 2;
        if (x < val[mav]) mu = mav;
        else ml = mav;
    }
    return x - val[mu - 1] < val[mu] - x ? mu - 1 : mu;
}

/* quantize_row_iq4_nl_impl with block_size 32 and ntry 7 (quantize_iq4_nl and quantize_iq4_xs
 * pass 7 with or without an importance array).  sbs: 32 (IQ4_NL) or 256 (IQ4_XS). */
static void iq4_block(int sbs, const float *x, const float *qw, uint8_t *dh, uint8_t *q4, uint8_t *scales_h,
                      uint8_t *scales_l) {
    const int8_t *values = kvalues_iq4nl;
    const int ntry = 7;
    float scales[QK_K / 32], weight[32];
    uint8_t L[QK_K];
    float sigma2 = 0;
    for (int j = 0; j < sbs; ++j) sigma2 += x[j] * x[j];
    sigma2 *= 2.f / sbs;
    memset(q4, 0, (size_t)(sbs / 2));
    float max_scale = 0, amax_scale = 0;
    for (int ib = 0; ib < sbs / 32; ++ib) {
        const float *xb = x + 32 * ib;
        uint8_t *Lb = L + 32 * ib;
        if (qw) {
            for (int j = 0; j < 32; ++j) weight[j] = qw[32 * ib + j] * sqrtf(sigma2 + xb[j] * xb[j]);
        } else {
            for (int j = 0; j < 32; ++j) weight[j] = xb[j] * xb[j];
        }
        float amax = 0, max = 0;
        for (int j = 0; j < 32; ++j) {
            const float ax = fabsf(xb[j]);
            if (ax > amax) {
                amax = ax;
                max = xb[j];
            }
        }
        if (amax < GROUP_MAX_EPS) {
            scales[ib] = 0;
            continue;
        }
        float d = -max / values[0];
        float id = 1 / d;
        float sumqx = 0, sumq2 = 0;
        for (int j = 0; j < 32; ++j) {
            const int l = best_index_int8(16, values, id * xb[j]);
            Lb[j] = (uint8_t)l;
            const float q = values[l];
            sumqx += weight[j] * q * xb[j];
            sumq2 += weight[j] * q * q;
        }
        d = sumq2 > 0 ? sumqx / sumq2 : 0.f;
        float best = d * sumqx;
        for (int itry = -ntry; itry <= ntry; ++itry) {
            id = (itry + values[0]) / max;
            sumqx = sumq2 = 0;
            for (int j = 0; j < 32; ++j) {
                const float q = values[best_index_int8(16, values, id * xb[j])];
                sumqx += weight[j] * q * xb[j];
                sumq2 += weight[j] * q * q;
            }
            if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
                d = sumqx / sumq2;
                best = d * sumqx;
            }
        }
        scales[ib] = d;
        const float abs_d = fabsf(d);
        if (abs_d > amax_scale) {
            amax_scale = abs_d;
            max_scale = d;
        }
    }
    if (sbs > 32) {
        const float d = -max_scale / 32;
        put_half(dh, d);
        const float id = d ? 1 / d : 0.f;
        uint16_t sh = 0;
        for (int ib = 0; ib < sbs / 32; ++ib) {
            int l = clampi(nearest_int(id * scales[ib]), -32, 31);
            const float dl = d * l;
            const float idl = dl ? 1 / dl : 0.f;
            for (int j = 0; j < 32; ++j) L[32 * ib + j] = (uint8_t)best_index_int8(16, values, idl * x[32 * ib + j]);
            l += 32;
            if (ib % 2 == 0) scales_l[ib / 2] = (uint8_t)(l & 0xf);
            else scales_l[ib / 2] |= (uint8_t)((l & 0xf) << 4);
            sh |= (uint16_t)((l >> 4) << (2 * (ib % 8)));
        }
        put_u16(scales_h, sh);
    } else {
        put_half(dh, scales[0]);
        const float id = scales[0] ? 1 / scales[0] : 0;
        for (int j = 0; j < 32; ++j) L[j] = (uint8_t)best_index_int8(16, values, id * x[j]);
    }
    for (int i = 0; i < sbs / 32; ++i)
        for (int j = 0; j < 16; ++j) q4[16 * i + j] = (uint8_t)(L[32 * i + j] | (L[32 * i + 16 + j] << 4));
}

int mc_iq4_nl(const float *x, uint8_t *y, int64_t nrows, int64_t n, const float *qw) {
    const int64_t per_row = n / 32;
    for (int64_t b = 0; b < nrows * per_row; ++b, x += 32, y += 18)
        iq4_block(32, x, qw ? qw + 32 * (b % per_row) : NULL, y, y + 2, NULL, NULL);
    return 0;
}

int mc_iq4_xs(const float *x, uint8_t *y, int64_t nrows, int64_t n, const float *qw) {
    const int64_t per_row = n / QK_K;
    for (int64_t b = 0; b < nrows * per_row; ++b, x += QK_K, y += 136)
        iq4_block(QK_K, x, qw ? qw + QK_K * (b % per_row) : NULL, y, y + 8, y + 2, y + 4);
    return 0;
}

/* ============================================================================ codebook types */

/* What differs between quantize_row_iq{2_xxs,2_xs,2_s,3_xxs,3_s}_impl. */
typedef struct {
    int slot;          /* mc_iq_tables index */
    int block;         /* weights per sub-block */
    int kmax;          /* kMaxQ */
    int is_first, is_last;
    float is_step;
    float sigma;       /* sigma2 = sigma*sumx2/QK_K */
    float eps;         /* skip a sub-block with max < eps; eps < 0: only when max == 0 (IQ3_S) */
    int parity;        /* 7 sign bits per 8 weights */
    int on_grid_start; /* is_on_grid before the trials */
    int refine_all;    /* re-snap every group at the final scale (else the off-grid ones only) */
    int qp_start;      /* IQ2_XXS */
} grid_spec;

static const grid_spec IQ2_XXS = {0, 32, 3, -6, 6, 0.1f, 1.f, GROUP_MAX_EPS, 1, 1, 1, 1};
static const grid_spec IQ2_XS = {1, 16, 3, -9, 9, 0.1f, 1.f, GROUP_MAX_EPS, 1, 1, 0, 0};
static const grid_spec IQ2_S = {2, 16, 3, -9, 9, 0.1f, 2.f, 1e-8f, 0, 1, 0, 0};
static const grid_spec IQ3_XXS = {3, 32, 8, -15, 15, 0.2f, 2.f, 1e-8f, 1, 1, 0, 0};
static const grid_spec IQ3_S = {4, 32, 8, -9, 9, 0.2f, 2.f, -1.f, 0, 0, 1, 0};

/* iq{2,3}_find_best_neighbour: the candidate point nearest (weighted) to xval/scale; its levels
 * go to L.  Returns the point, or -1 where llama.cpp's GGML_ASSERT would fail. */
static int best_neighbour(const mc_tables *t, int u, const float *xval, const float *weight, float scale, int8_t *L) {
    const int num = t->count[u];
    const uint16_t *cand = t->flat + t->start[u];
    float best_d2 = FLT_MAX;
    int grid_index = -1;
    for (int j = 0; j < num; ++j) {
        const int8_t *pg = t->grid + t->group * cand[j];
        float d2 = 0;
        for (int i = 0; i < t->group; ++i) {
            const float q = pg[i];
            const float diff = scale * q - xval[i];
            d2 += weight[i] * diff * diff;
        }
        if (d2 < best_d2) {
            best_d2 = d2;
            grid_index = cand[j];
        }
    }
    if (grid_index < 0) return -1;
    const int8_t *pg = t->grid + t->group * grid_index;
    for (int i = 0; i < t->group; ++i) L[i] = (int8_t)((pg[i] - 1) / 2);
    return grid_index;
}

static inline int pattern(const mc_tables *t, const int8_t *L) {
    const int bits = t->group == 8 ? 2 : 3;
    int u = 0;
    for (int i = 0; i < t->group; ++i) u |= L[i] << (bits * i);
    return u;
}

/* Snap the group at L (levels of xval at 1/iscale) to the codebook: the point if it is one,
 * else the best neighbour at `scale`.  Returns the point (-1: abort), *on = whether it was one. */
static int snap(const mc_tables *t, int8_t *L, const float *xval, const float *waux, float scale, int *on) {
    const int u = pattern(t, L);
    const int gi = t->index[u];
    *on = gi >= 0;
    if (gi >= 0) return gi;
    if (t->count[u] <= 0) return -1;
    return best_neighbour(t, u, xval, waux, scale, L);
}

/* The sub-block loop body of one codebook quantizer: levels, signs and points for one sub-block.
 * Returns its scale (0: skipped), or -1 on abort; *done = 0 for a skipped sub-block. */
static float grid_subblock(const grid_spec *g, const float *xb, const float *weight, int8_t *L, uint8_t *signs,
                           int *points, int *done) {
    const mc_tables *t = &mc_iq_tables[g->slot];
    const int bs = g->block, group = t->group, ng = bs / group, kmax = g->kmax;
    float xval[32], waux[32];
    int8_t Laux[32];
    int on_grid[8], on_aux[8];
    for (int i = 0; i < bs; ++i) waux[i] = sqrtf(weight[i]);
    for (int k = 0; k < bs / 8; ++k) {
        int nflip = 0;
        uint8_t s = 0;
        for (int i = 0; i < 8; ++i) {
            if (xb[8 * k + i] >= 0) xval[8 * k + i] = xb[8 * k + i];
            else {
                xval[8 * k + i] = -xb[8 * k + i];
                ++nflip;
                s |= (uint8_t)(1 << i);
            }
        }
        if (g->parity) {
            if (nflip % 2) {
                int imin = 0;
                float min = weight[8 * k] * xb[8 * k] * xb[8 * k];
                for (int i = 1; i < 8; ++i) {
                    const float ax = weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i];
                    if (ax < min) {
                        min = ax;
                        imin = i;
                    }
                }
                xval[8 * k + imin] = -xval[8 * k + imin];
                s ^= (uint8_t)(1 << imin);
            }
            s &= 127;
        }
        signs[k] = s;
    }
    float max = xval[0];
    for (int i = 1; i < bs; ++i) max = MC_MAX(max, xval[i]);
    memset(L, 0, (size_t)bs);
    *done = 0;
    if (g->eps < 0 ? !max : max < g->eps) return 0.f;
    float scale, denom;
    if (g->qp_start) {
        scale = mc_make_qp_quants(32, kmax + 1, xval, (uint8_t *)L, weight);
        denom = scale * kmax; /* eff_max */
        if (denom <= 0) {
            memset(L, 0, (size_t)bs);
            return 0.f;
        }
    } else {
        scale = max / (2 * kmax - 1);
        denom = max;
    }
    *done = 1;
    float best = 0;
    for (int k = 0; k < ng; ++k) on_grid[k] = g->on_grid_start;
    for (int is = g->is_first; is <= g->is_last; ++is) {
        const float id = (2 * kmax - 1 + is * g->is_step) / denom;
        const float this_scale = 1 / id;
        for (int k = 0; k < ng; ++k) {
            for (int i = 0; i < group; ++i) {
                const int l = nearest_int(0.5f * (id * xval[group * k + i] - 1));
                Laux[group * k + i] = (int8_t)MC_MAX(0, MC_MIN(kmax - 1, l));
            }
            if (snap(t, Laux + group * k, xval + group * k, waux + group * k, this_scale, &on_aux[k]) < 0) return -1.f;
        }
        float sumqx = 0, sumq2 = 0;
        for (int i = 0; i < bs; ++i) {
            const float w = weight[i];
            const float q = 2 * Laux[i] + 1;
            sumqx += w * xval[i] * q;
            sumq2 += w * q * q;
        }
        if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
            scale = sumqx / sumq2;
            best = scale * sumqx;
            memcpy(L, Laux, (size_t)bs);
            for (int k = 0; k < ng; ++k) on_grid[k] = on_aux[k];
        }
    }
    int n_not_ongrid = 0;
    for (int k = 0; k < ng; ++k) n_not_ongrid += !on_grid[k];
    if ((g->qp_start || n_not_ongrid > 0) && scale > 0) {
        const float id = 1 / scale;
        for (int k = 0; k < ng; ++k) {
            if (!g->qp_start && !g->refine_all && on_grid[k]) continue;
            for (int i = 0; i < group; ++i) {
                const int l = nearest_int(0.5f * (id * xval[group * k + i] - 1));
                L[group * k + i] = (int8_t)MC_MAX(0, MC_MIN(kmax - 1, l));
            }
            int on;
            if (snap(t, L + group * k, xval + group * k, waux + group * k, scale, &on) < 0) return -1.f;
        }
        float sumqx = 0, sumq2 = 0;
        for (int i = 0; i < bs; ++i) {
            const float w = weight[i];
            const float q = 2 * L[i] + 1;
            sumqx += w * xval[i] * q;
            sumq2 += w * q * q;
        }
        if (sumq2 > 0) scale = sumqx / sumq2;
    }
    if (scale < 0) { /* "should never happen": flip the scale and the signs */
        scale = -scale;
        for (int k = 0; k < bs / 8; ++k) signs[k] = (uint8_t)(g->parity ? (~signs[k]) & 127 : ~signs[k]);
    }
    for (int k = 0; k < ng; ++k) {
        points[k] = t->index[pattern(t, L + group * k)];
        if (points[k] < 0) return -1.f; /* "Oops: found point not on grid" */
    }
    return scale;
}

/* The per-type driver: sub-blocks of one super-block, then the 4-bit sub-scales. */
static int grid_quantize(const grid_spec *g, const float *x, uint8_t *y, int64_t nrows, int64_t n, const float *qw,
                         int type_size, float fudge) {
    const int bs = g->block, per = QK_K / bs;
    const int64_t per_row = n / QK_K;
    float weight[32], scales[16];
    int8_t L[32];
    uint8_t signs[16][4];
    int points[16][8], done[16];
    for (int64_t b = 0; b < nrows * per_row; ++b, x += QK_K, y += type_size) {
        const float *q = qw ? qw + QK_K * (b % per_row) : NULL;
        float sumx2 = 0;
        for (int i = 0; i < QK_K; ++i) sumx2 += x[i] * x[i];
        const float sigma2 = g->sigma * sumx2 / QK_K;
        float max_scale = 0;
        for (int ib = 0; ib < per; ++ib) {
            const float *xb = x + bs * ib;
            if (q) {
                for (int i = 0; i < bs; ++i) weight[i] = q[bs * ib + i] * sqrtf(sigma2 + xb[i] * xb[i]);
            } else if (g->slot == 2) { /* IQ2_S */
                for (int i = 0; i < bs; ++i) weight[i] = 0.25f * sigma2 + xb[i] * xb[i];
            } else {
                for (int i = 0; i < bs; ++i) weight[i] = xb[i] * xb[i];
            }
            scales[ib] = grid_subblock(g, xb, weight, L, signs[ib], points[ib], &done[ib]);
            if (scales[ib] < 0) return -1;
            if (done[ib]) max_scale = MC_MAX(max_scale, scales[ib]);
        }
        memset(y, 0, (size_t)type_size);
        const int nonzero = max_scale != 0;
        const float d = max_scale / 31;
        const float id = 1 / d;
        int l[16];
        for (int ib = 0; ib < per; ++ib) l[ib] = nonzero ? clampi(nearest_int(0.5f * (id * scales[ib] - 1)), 0, 15) : 0;
        if (nonzero) put_half(y, d * fudge);
        switch (g->slot) {
        case 0: /* IQ2_XXS: per sub-block two words: 4 points, then 4 x 7 sign bits | scale << 28 */
            if (!nonzero) break;
            for (int ib = 0; ib < per; ++ib) {
                uint32_t w0 = 0, w1 = 0;
                if (done[ib])
                    for (int k = 0; k < 4; ++k) {
                        w0 |= (uint32_t)points[ib][k] << (8 * k);
                        w1 |= (uint32_t)signs[ib][k] << (7 * k);
                    }
                put_u32(y + 2 + 8 * ib, w0);
                put_u32(y + 6 + 8 * ib, w1 | ((uint32_t)l[ib] << 28));
            }
            break;
        case 1: /* IQ2_XS: 16-bit point | signs << 9 per group; 4-bit scales */
            if (!nonzero) break;
            for (int ib = 0; ib < per; ++ib) {
                for (int k = 0; k < 2; ++k)
                    put_u16(y + 2 + 2 * (2 * ib + k), done[ib] ? (uint16_t)(points[ib][k] | (signs[ib][k] << 9)) : 0);
                if (ib % 2 == 0) y[66 + ib / 2] = (uint8_t)l[ib];
                else y[66 + ib / 2] |= (uint8_t)(l[ib] << 4);
            }
            break;
        case 2: /* IQ2_S: low point bytes, sign bytes, high point bits, 4-bit scales */
            for (int ib = 0; ib < per; ++ib) {
                if (!done[ib]) continue;
                for (int k = 0; k < 2; ++k) {
                    const int i8 = 2 * ib + k;
                    y[2 + i8] = (uint8_t)(points[ib][k] & 255);
                    y[2 + 64 + i8 / 4] |= (uint8_t)((points[ib][k] >> 8) << (2 * (i8 % 4)));
                    y[2 + 32 + i8] = signs[ib][k];
                }
            }
            for (int ib = 0; ib < per && nonzero; ++ib) {
                if (ib % 2 == 0) y[74 + ib / 2] = (uint8_t)l[ib];
                else y[74 + ib / 2] |= (uint8_t)(l[ib] << 4);
            }
            break;
        case 3: /* IQ3_XXS: 8 point bytes per sub-block, then a word of 4 x 7 sign bits | scale << 28 */
            if (!nonzero) break;
            for (int ib = 0; ib < per; ++ib) {
                uint32_t s = 0;
                if (done[ib])
                    for (int k = 0; k < 8; ++k) y[2 + 8 * ib + k] = (uint8_t)points[ib][k];
                if (done[ib]) s = signs[ib][0] | (signs[ib][1] << 7) | (signs[ib][2] << 14) | ((uint32_t)signs[ib][3] << 21);
                put_u32(y + 2 + 64 + 4 * ib, s | ((uint32_t)l[ib] << 28));
            }
            break;
        case 4: { /* IQ3_S: qs and signs advance only past processed sub-blocks; qh by position */
            uint8_t *qs = y + 2, *qh = y + 66, *sg = y + 74, *sc = y + 106;
            for (int ib = 0; ib < per; ++ib) {
                if (!done[ib]) continue;
                for (int k = 0; k < 8; ++k) {
                    qs[k] = (uint8_t)(points[ib][k] & 255);
                    qh[(ib * 8 + k) / 8] |= (uint8_t)((points[ib][k] >> 8) << ((ib * 8 + k) % 8));
                }
                qs += 8;
                memcpy(sg, signs[ib], 4);
                sg += 4;
            }
            for (int ib = 0; ib < per && nonzero; ib += 2) sc[ib / 2] = (uint8_t)(l[ib] | (l[ib + 1] << 4));
            break;
        }
        }
    }
    return 0;
}

int mc_iq2_xxs(const float *x, uint8_t *y, int64_t r, int64_t n, const float *qw) { return grid_quantize(&IQ2_XXS, x, y, r, n, qw, 66, 1.0f); }
int mc_iq2_xs(const float *x, uint8_t *y, int64_t r, int64_t n, const float *qw) { return grid_quantize(&IQ2_XS, x, y, r, n, qw, 74, 1.0f); }
int mc_iq2_s(const float *x, uint8_t *y, int64_t r, int64_t n, const float *qw) { return grid_quantize(&IQ2_S, x, y, r, n, qw, 82, 0.9875f); }
int mc_iq3_xxs(const float *x, uint8_t *y, int64_t r, int64_t n, const float *qw) { return grid_quantize(&IQ3_XXS, x, y, r, n, qw, 98, 1.0125f); }
int mc_iq3_s(const float *x, uint8_t *y, int64_t r, int64_t n, const float *qw) { return grid_quantize(&IQ3_S, x, y, r, n, qw, 110, 1.033f); }
