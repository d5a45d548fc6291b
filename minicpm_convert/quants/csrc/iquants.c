/* The IQ types: IQ4_NL/IQ4_XS (non-linear 4-bit levels) and IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS,
 * IQ2_S (signs plus a point of a lattice codebook), as quantize_iq* in ggml-quants.c.  The
 * codebook tables come from Python (iq_grids.py) through mc_iq_tables. */
#include "common.h"
#include "lanes.h"

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

/* best_index_int8(16, kvalues_iq4nl, x) per lane, with the level it picks: the nearest level, the
 * upper one on a tie (the binary search's `x - val[mu-1] < val[mu] - x`), the last for NaN. */
static inline v8i vbest_index(v8f x, v8f *q) {
    const v8i nan = x != x;
    v8f lo = vsplat(kvalues_iq4nl[0]), hi = vsplat(kvalues_iq4nl[15]);
    v8i cnt = vsplati(0);
    for (int k = 1; k < 15; ++k) { /* v[cnt] <= x < v[cnt + 1] for v[0] < x < v[15] */
        const v8f v = vsplat(kvalues_iq4nl[k]);
        const v8i le = v <= x;
        cnt -= le; /* true is -1 */
        lo = vsel(le, v, lo);
    }
    for (int k = 14; k >= 1; --k) {
        const v8f v = vsplat(kvalues_iq4nl[k]);
        hi = vsel(v > x, v, hi);
    }
    const v8i lower = x - lo < hi - x;
    v8i idx = cnt + (vsplati(1) & ~lower);
    v8f val = vsel(lower, lo, hi);
    const v8i below = x <= vsplat(kvalues_iq4nl[0]), above = (x >= vsplat(kvalues_iq4nl[15])) | nan;
    idx = (idx & ~below) & ~above;
    idx |= vsplati(15) & above;
    val = vsel(below, vsplat(kvalues_iq4nl[0]), vsel(above, vsplat(kvalues_iq4nl[15]), val));
    if (q) *q = val;
    return idx;
}

/* The per-block scale search of quantize_row_iq4_nl_impl (ntry 7: quantize_iq4_nl and
 * quantize_iq4_xs pass 7 with or without an importance array) for 8 blocks of 32 at x (block k
 * at x + 32k, weights w + 32k): scales[k], 0 for a zero block. */
LANES_ATTR
static void iq4_scales_lanes(const float *x, const float *w, float *scales) {
    const int8_t *values = kvalues_iq4nl;
    const int ntry = 7;
    v8f X[32], W[32];
    const v8f zero = vsplat(0.0f), one = vsplat(1.0f);
    for (int i = 0; i < 32; ++i)
        for (int k = 0; k < NL; ++k) {
            X[i][k] = x[32 * k + i];
            W[i][k] = w[32 * k + i];
        }
    v8f amax = zero, maxv = zero;
    for (int i = 0; i < 32; ++i) {
        const v8f a = vabs(X[i]);
        const v8i m = a > amax;
        amax = vsel(m, a, amax);
        maxv = vsel(m, X[i], maxv);
    }
    const v8i zero_lane = amax < vsplat(GROUP_MAX_EPS);
    maxv = vsel(zero_lane, one, maxv);
    v8f id = one / (-maxv / vsplat(values[0])); /* d = -max/values[0], id = 1/d */
    v8f sumqx = zero, sumq2 = zero;
    for (int i = 0; i < 32; ++i) {
        v8f q;
        vbest_index(id * X[i], &q);
        sumqx += W[i] * q * X[i];
        sumq2 += W[i] * q * q;
    }
    v8f d = vsel(sumq2 > zero, sumqx / sumq2, zero);
    v8f best = d * sumqx;
    for (int itry = -ntry; itry <= ntry; ++itry) {
        id = vsplat((float)(itry + values[0])) / maxv;
        sumqx = zero;
        sumq2 = zero;
        for (int i = 0; i < 32; ++i) {
            v8f q;
            vbest_index(id * X[i], &q);
            sumqx += W[i] * q * X[i];
            sumq2 += W[i] * q * q;
        }
        const v8i better = (sumq2 > zero) & (sumqx * sumqx > best * sumq2);
        d = vsel(better, sumqx / sumq2, d);
        best = vsel(better, d * sumqx, best);
    }
    d = vsel(zero_lane, zero, d);
    for (int k = 0; k < NL; ++k) scales[k] = d[k];
}

/* Levels best_index_int8(iscale[k] * x) for 8 blocks of 32, as nibbles q4[16i + j] =
 * L[32i + j] | L[32i + 16 + j] << 4 (block k's 16 bytes at q4 + stride*k). */
LANES_ATTR
static void iq4_levels_lanes(const float *x, const float *iscale, uint8_t *q4, int stride) {
    v8f s;
    for (int k = 0; k < NL; ++k) s[k] = iscale[k];
    uint8_t L[NL][32];
    for (int i = 0; i < 32; ++i) {
        v8f xi;
        for (int k = 0; k < NL; ++k) xi[k] = x[32 * k + i];
        const v8i l = vbest_index(s * xi, NULL);
        for (int k = 0; k < NL; ++k) L[k][i] = (uint8_t)l[k];
    }
    for (int k = 0; k < NL; ++k)
        for (int j = 0; j < 16; ++j) q4[stride * k + j] = (uint8_t)(L[k][j] | (L[k][16 + j] << 4));
}

/* weights of quantize_row_iq4_nl_impl for sbs values at x: qw * sqrtf(sigma2 + x^2) with
 * sigma2 = 2/sbs * sum x^2, or x^2 without an importance array */
static void iq4_weights(int sbs, const float *x, const float *qw, float *w) {
    float sigma2 = 0;
    for (int j = 0; j < sbs; ++j) sigma2 += x[j] * x[j];
    sigma2 *= 2.f / sbs;
    for (int j = 0; j < sbs; ++j) w[j] = qw ? qw[j] * sqrtf(sigma2 + x[j] * x[j]) : x[j] * x[j];
}

int mc_iq4_nl(const float *x, uint8_t *y, int64_t nrows, int64_t n, const float *qw) {
    const int64_t per_row = n / 32, nb = nrows * per_row;
    float xb[NL * 32], w[NL * 32], sc[NL], id[NL];
    for (int64_t b = 0; b < nb; b += NL) { /* 8 blocks at a time; a short tail is zero-padded */
        const int m = (int)(nb - b < NL ? nb - b : NL);
        memset(xb, 0, sizeof xb);
        memcpy(xb, x + 32 * b, sizeof(float) * 32 * (size_t)m);
        for (int k = 0; k < NL; ++k) iq4_weights(32, xb + 32 * k, qw ? qw + 32 * ((b + k) % per_row) : NULL, w + 32 * k);
        iq4_scales_lanes(xb, w, sc);
        uint8_t q4[NL * 16];
        for (int k = 0; k < NL; ++k) id[k] = sc[k] ? 1 / sc[k] : 0;
        iq4_levels_lanes(xb, id, q4, 16);
        for (int k = 0; k < m; ++k) {
            uint8_t *yb = y + 18 * (b + k);
            put_half(yb, sc[k]);
            memcpy(yb + 2, q4 + 16 * k, 16);
        }
    }
    return 0;
}

int mc_iq4_xs(const float *x, uint8_t *y, int64_t nrows, int64_t n, const float *qw) {
    const int64_t per_row = n / QK_K;
    float w[QK_K], scales[8], idl[8];
    for (int64_t b = 0; b < nrows * per_row; ++b, x += QK_K, y += 136) {
        iq4_weights(QK_K, x, qw ? qw + QK_K * (b % per_row) : NULL, w);
        iq4_scales_lanes(x, w, scales); /* the 8 sub-blocks of 32 are the 8 lanes */
        float max_scale = 0, amax_scale = 0;
        for (int ib = 0; ib < 8; ++ib) {
            const float a = fabsf(scales[ib]);
            if (a > amax_scale) {
                amax_scale = a;
                max_scale = scales[ib];
            }
        }
        const float d = -max_scale / 32;
        put_half(y, d);
        const float id = d ? 1 / d : 0.f;
        uint16_t sh = 0;
        for (int ib = 0; ib < 8; ++ib) {
            int l = clampi(nearest_int(id * scales[ib]), -32, 31);
            const float dl = d * l;
            idl[ib] = dl ? 1 / dl : 0.f;
            l += 32;
            if (ib % 2 == 0) y[4 + ib / 2] = (uint8_t)(l & 0xf);
            else y[4 + ib / 2] |= (uint8_t)((l & 0xf) << 4);
            sh |= (uint16_t)((l >> 4) << (2 * ib));
        }
        put_u16(y + 2, sh);
        iq4_levels_lanes(x, idl, y + 8, 16);
    }
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
 * go to L.  Returns the point, or -1 where llama.cpp's GGML_ASSERT would fail.  For groups of 8
 * the 8 coordinates of a candidate are one vector; its squared distance is still summed in
 * coordinate order, one scalar addition at a time, as the reference sums it. */
LANES_ATTR
static int best_neighbour(const mc_tables *t, int u, const float *xval, const float *weight, float scale, int8_t *L) {
    const int num = t->count[u];
    const uint16_t *cand = t->flat + t->start[u];
    float best_d2 = FLT_MAX;
    int grid_index = -1;
    const float *coords = t->flatf + (size_t)t->group * t->start[u]; /* candidate j at coords + group*j */
    if (t->group == 8) {
        v8f xv, wv;
        for (int i = 0; i < 8; ++i) {
            xv[i] = xval[i];
            wv[i] = weight[i];
        }
        const v8f sv = vsplat(scale);
        for (int j = 0; j < num; ++j) {
            v8f q;
            memcpy(&q, coords + 8 * j, sizeof q);
            const v8f diff = sv * q - xv;
            const v8f e = wv * diff * diff;
            float d2 = 0;
            for (int i = 0; i < 8; ++i) d2 += e[i];
            if (d2 < best_d2) {
                best_d2 = d2;
                grid_index = cand[j];
            }
        }
    } else { /* groups of 4: two candidates per vector, each summed in coordinate order */
        v8f xv, wv;
        for (int i = 0; i < 8; ++i) {
            xv[i] = xval[i % 4];
            wv[i] = weight[i % 4];
        }
        const v8f sv = vsplat(scale);
        for (int j = 0; j < num; j += 2) { /* a lone last candidate reads the next list (or padding) */
            v8f q;
            memcpy(&q, coords + 4 * j, sizeof q);
            const v8f diff = sv * q - xv;
            const v8f e = wv * diff * diff;
            for (int h = 0; h < 2 && j + h < num; ++h) {
                float d2 = 0;
                for (int i = 0; i < 4; ++i) d2 += e[4 * h + i];
                if (d2 < best_d2) {
                    best_d2 = d2;
                    grid_index = cand[j + h];
                }
            }
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
