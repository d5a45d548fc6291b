/* llama.cpp's scale searches (ggml-quants.c), used by the k-quant and 32-weight kernels.
 *
 * make_qx_quants and make_qkx2/3_quants run on 8 groups side by side ("lanes"): lane k holds
 * group k, keeps its own sequential sums in source order and its own decisions, so each lane's
 * result is the scalar function's; the compiler turns every 8-wide loop into one vector
 * operation.  Only the winning inverse scale (and minimum) of a search is kept; the levels are
 * recomputed from it at the end.  make_qp_quants and make_q3_quants (short, data-dependent
 * coordinate descents on at most 16 values) stay scalar. */
#include "common.h"

#include "lanes.h"

static inline v8f vlevel(v8f v, v8i vlo, v8i vhi) { return __builtin_convertvector(vround_clamp(v, vlo, vhi), v8f); }

/* make_qx_quants(n, nmax, x, L, 1, qw) for 8 groups of n values (group k at g + n*k). */
LANES_ATTR
static void qx_lanes(const float *g, const float *qw, int n, int nmax, float *scale_out, int8_t *L) {
    v8f X[32], Wt[32], WX[32];
    const v8f zero = vsplat(0.0f), one = vsplat(1.0f);
    const v8i vlo = vsplati(-nmax), vhi = vsplati(nmax - 1);
    for (int i = 0; i < n; ++i)
        for (int k = 0; k < NL; ++k) X[i][k] = g[n * k + i];
    v8f amax = zero, maxv = zero;
    for (int i = 0; i < n; ++i) {
        const v8f a = vabs(X[i]);
        const v8i m = a > amax;
        amax = vsel(m, a, amax);
        maxv = vsel(m, X[i], maxv);
        if (qw) {
            for (int k = 0; k < NL; ++k) Wt[i][k] = qw[n * k + i];
        } else {
            Wt[i] = X[i] * X[i];
        }
        WX[i] = Wt[i] * X[i];
    }
    const v8i zero_lane = amax < vsplat(GROUP_MAX_EPS);
    maxv = vsel(zero_lane, one, maxv);
    v8f inv = vsplat(-(float)nmax) / maxv;
    v8f sxl = zero, sl2 = zero;
    for (int i = 0; i < n; ++i) {
        const v8f fl = vlevel(inv * X[i], vlo, vhi);
        sxl += WX[i] * fl;
        sl2 += Wt[i] * fl * fl;
    }
    v8f scale = vsel(sl2 != zero, sxl / sl2, zero);
    v8f best = scale * sxl;
    v8f l_inv = inv;
    for (int step = -9; step <= 9; ++step) {
        if (step == 0) continue;
        inv = vsplat(-((float)nmax + 0.1f * (float)step)) / maxv;
        sxl = zero;
        sl2 = zero;
        for (int i = 0; i < n; ++i) {
            const v8f fl = vlevel(inv * X[i], vlo, vhi);
            sxl += WX[i] * fl;
            sl2 += Wt[i] * fl * fl;
        }
        const v8i better = (sl2 > zero) & (sxl * sxl > best * sl2);
        scale = vsel(better, sxl / sl2, scale);
        best = vsel(better, scale * sxl, best);
        l_inv = vsel(better, inv, l_inv);
    }
    scale = vsel(zero_lane, zero, scale);
    for (int i = 0; i < n; ++i) {
        v8i l = vround_clamp(l_inv * X[i], vlo, vhi) + vsplati(nmax);
        l = l & ~zero_lane; /* all-zero group: L = 0 */
        for (int k = 0; k < NL; ++k) L[n * k + i] = (int8_t)l[k];
    }
    for (int k = 0; k < NL; ++k) scale_out[k] = scale[k];
}

/* make_qkx2_quants(n, nmax, x, w, L, &the_min, Laux, rmin, rdelta, nstep, use_mad) for 8 groups. */
LANES_ATTR
static void qkx_lanes(const float *x, const float *w, int n, int nmax, float rmin, float rdelta, int nstep,
                      int use_mad, float *scale_out, float *min_out, uint8_t *L) {
    v8f X[32], W[32], T[32];
    const v8i v0 = vsplati(0), vnmax = vsplati(nmax);
    const v8f zero = vsplat(0.0f), one = vsplat(1.0f);
    for (int i = 0; i < n; ++i)
        for (int k = 0; k < NL; ++k) {
            X[i][k] = x[n * k + i];
            W[i][k] = w[n * k + i];
        }
    v8f lo = X[0], hi = X[0], sw = W[0];
    v8f swx = sw * X[0];
    for (int i = 1; i < n; ++i) {
        lo = vsel(X[i] < lo, X[i], lo);
        hi = vsel(X[i] > hi, X[i], hi);
        sw += W[i];
        swx += W[i] * X[i];
    }
    lo = vsel(lo > zero, zero, lo);
    const v8i early = hi == lo;
    const v8f lo0 = lo;
    v8f den = vsel(early, one, hi - lo);
    v8f inv = vsplat((float)nmax) / den;
    v8f scale = one / inv;
    v8f best = zero;
    v8f l_inv = inv, l_lo = lo;
    for (int i = 0; i < n; ++i) {
        v8f e = scale * vlevel(inv * (X[i] - lo), v0, vnmax) + lo - X[i];
        e = use_mad ? vabs(e) : e * e;
        best += W[i] * e;
    }
    for (int step = 0; step <= nstep; ++step) {
        const float num = rmin + rdelta * (float)step + (float)nmax;
        inv = vsplat(num) / den;
        v8f s_l = zero, s_l2 = zero, s_xl = zero, err = zero;
        for (int i = 0; i < n; ++i) {
            const v8f fl = vlevel(inv * (X[i] - lo), v0, vnmax);
            const v8f wl = W[i] * fl;
            T[i] = fl;
            s_l += wl;
            s_l2 += wl * fl;
            s_xl += wl * X[i];
        }
        const v8f det = sw * s_l2 - s_l * s_l;
        const v8f a = (sw * s_xl - swx * s_l) / det;
        const v8f b = (s_l2 * swx - s_l * s_xl) / det;
        const v8i pos = b > zero;
        const v8f sc = vsel(pos, s_xl / s_l2, a);
        const v8f mn = vsel(pos, zero, b);
        for (int i = 0; i < n; ++i) {
            v8f e = sc * T[i] + mn - X[i];
            e = use_mad ? vabs(e) : e * e;
            err += W[i] * e;
        }
        const v8i better = (det > zero) & (err < best) & ~early;
        best = vsel(better, err, best);
        scale = vsel(better, sc, scale);
        l_inv = vsel(better, inv, l_inv);
        l_lo = vsel(better, lo, l_lo);
        lo = vsel(better, mn, lo);
        den = vsel(better, hi - mn, den);
    }
    for (int k = 0; k < NL; ++k) {
        scale_out[k] = early[k] ? 0.0f : scale[k];
        min_out[k] = early[k] ? -lo0[k] : -lo[k];
    }
    for (int i = 0; i < n; ++i) {
        const v8f l = vsel(early, zero, vlevel(l_inv * (X[i] - l_lo), v0, vnmax));
        for (int k = 0; k < NL; ++k) L[n * k + i] = (uint8_t)l[k];
    }
}

/* Run a lane search over any number of groups: whole batches of 8 in place, the rest through a
 * zero-padded batch (a zero group is harmless and its results are dropped). */
void mc_qx(const float *x, const float *qw, int64_t ngroups, int n, int nmax, float *scale, int8_t *L) {
    int64_t g = 0;
    for (; g + NL <= ngroups; g += NL) qx_lanes(x + n * g, qw ? qw + n * g : NULL, n, nmax, scale + g, L + n * g);
    if (g < ngroups) {
        float xb[NL * 32] = {0}, wb[NL * 32] = {0}, sb[NL];
        int8_t lb[NL * 32];
        const int64_t rest = ngroups - g;
        memcpy(xb, x + n * g, sizeof(float) * (size_t)(n * rest));
        if (qw) memcpy(wb, qw + n * g, sizeof(float) * (size_t)(n * rest));
        qx_lanes(xb, qw ? wb : NULL, n, nmax, sb, lb);
        memcpy(scale + g, sb, sizeof(float) * (size_t)rest);
        memcpy(L + n * g, lb, (size_t)(n * rest));
    }
}

void mc_qkx(const float *x, const float *w, int64_t ngroups, int n, int nmax, float rmin, float rdelta, int nstep,
            int use_mad, float *scale, float *the_min, uint8_t *L) {
    int64_t g = 0;
    for (; g + NL <= ngroups; g += NL)
        qkx_lanes(x + n * g, w + n * g, n, nmax, rmin, rdelta, nstep, use_mad, scale + g, the_min + g, L + n * g);
    if (g < ngroups) {
        float xb[NL * 32] = {0}, wb[NL * 32] = {0}, sb[NL], mb[NL];
        uint8_t lb[NL * 32];
        const int64_t rest = ngroups - g;
        memcpy(xb, x + n * g, sizeof(float) * (size_t)(n * rest));
        memcpy(wb, w + n * g, sizeof(float) * (size_t)(n * rest));
        qkx_lanes(xb, wb, n, nmax, rmin, rdelta, nstep, use_mad, sb, mb, lb);
        memcpy(scale + g, sb, sizeof(float) * (size_t)rest);
        memcpy(the_min + g, mb, sizeof(float) * (size_t)rest);
        memcpy(L + n * g, lb, (size_t)(n * rest));
    }
}

/* make_qp_quants: levels 0..nmax (no lower clamp: a negative level wraps in the uint8 store, as
 * in C) for non-negative x, weighted by w; a short coordinate descent refines them. */
float mc_make_qp_quants(int n, int nmax, const float *x, uint8_t *L, const float *w) {
    float max = 0;
    for (int i = 0; i < n; ++i) max = MC_MAX(max, x[i]);
    if (max < GROUP_MAX_EPS) {
        memset(L, 0, (size_t)n);
        return 0.0f;
    }
    float iscale = nmax / max;
    for (int i = 0; i < n; ++i) L[i] = (uint8_t)nearest_int(iscale * x[i]);
    const float scale = 1 / iscale;
    float best_mse = 0;
    for (int i = 0; i < n; ++i) {
        const float diff = x[i] - scale * L[i];
        best_mse += w[i] * diff * diff;
    }
    for (int is = -4; is <= 4; ++is) {
        if (is == 0) continue;
        const float iscale_is = (0.1f * is + nmax) / max;
        const float scale_is = 1 / iscale_is;
        float mse = 0;
        for (int i = 0; i < n; ++i) {
            const int l = MC_MIN(nmax, nearest_int(iscale_is * x[i]));
            const float diff = x[i] - scale_is * l;
            mse += w[i] * diff * diff;
        }
        if (mse < best_mse) {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        const int l = MC_MIN(nmax, nearest_int(iscale * x[i]));
        L[i] = (uint8_t)l;
        sumlx += w[i] * x[i] * l;
        suml2 += w[i] * l * l;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int n_changed = 0;
        for (int i = 0; i < n; ++i) {
            float slx = sumlx - w[i] * x[i] * L[i];
            float sl2 = suml2 - w[i] * L[i] * L[i];
            if (slx > 0 && sl2 > 0) {
                const int new_l = MC_MIN(nmax, nearest_int(x[i] * sl2 / slx));
                if (new_l != L[i]) {
                    slx += w[i] * x[i] * new_l;
                    sl2 += w[i] * new_l * new_l;
                    if (slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (uint8_t)new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        ++n_changed;
                    }
                }
            }
        }
        if (!n_changed) break;
    }
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

/* make_q3_quants(n, nmax, x, L, do_rmse = true): levels -nmax..nmax-1 by a weighted (x^2)
 * coordinate descent; L receives l + nmax (0 for an all-zero group). */
float mc_make_q3_quants(int n, int nmax, const float *x, int8_t *L) {
    float max = 0, amax = 0;
    for (int i = 0; i < n; ++i) {
        const float ax = fabsf(x[i]);
        if (ax > amax) {
            amax = ax;
            max = x[i];
        }
    }
    if (amax < GROUP_MAX_EPS) {
        memset(L, 0, (size_t)n);
        return 0.0f;
    }
    const float iscale = -nmax / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        const int l = clampi(nearest_int(iscale * x[i]), -nmax, nmax - 1);
        L[i] = (int8_t)l;
        const float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int n_changed = 0;
        for (int i = 0; i < n; ++i) {
            const float w = x[i] * x[i];
            float slx = sumlx - w * x[i] * L[i];
            if (slx > 0) {
                float sl2 = suml2 - w * L[i] * L[i];
                const int new_l = clampi(nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1);
                if (new_l != L[i]) {
                    slx += w * x[i] * new_l;
                    sl2 += w * new_l * new_l;
                    if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (int8_t)new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        ++n_changed;
                    }
                }
            }
        }
        if (!n_changed) break;
    }
    for (int i = 0; i < n; ++i) L[i] += nmax;
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}
