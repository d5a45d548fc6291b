/* The lane searches of searches.c, compiled once per lane width: searches.c includes this with
 * NL 8 (AVX2 or SSE2), searches_avx512.c with NL 16. Every lane runs the scalar function's
 * operations in its order whatever the width, so both give the same bits (tests/quants/
 * test_compiled.py runs both). Defines LANES_FN(mc_qx) and LANES_FN(mc_qkx). */

static inline vf vlevel(vf v, vi vlo, vi vhi) { return __builtin_convertvector(vround_clamp(v, vlo, vhi), vf); }

/* make_qx_quants(n, nmax, x, L, 1, qw) for NL groups of n values (group k at g + n*k). */
LANES_ATTR
static void qx_lanes(const float *g, const float *qw, int n, int nmax, float *scale_out, int8_t *L) {
    vf X[32], Wt[32], WX[32];
    const vf zero = vsplat(0.0f), one = vsplat(1.0f);
    const vi vlo = vsplati(-nmax), vhi = vsplati(nmax - 1);
    for (int i = 0; i < n; ++i)
        for (int k = 0; k < NL; ++k) X[i][k] = g[n * k + i];
    vf amax = zero, maxv = zero;
    for (int i = 0; i < n; ++i) {
        const vf a = vabs(X[i]);
        const vi m = a > amax;
        amax = vsel(m, a, amax);
        maxv = vsel(m, X[i], maxv);
        if (qw) {
            for (int k = 0; k < NL; ++k) Wt[i][k] = qw[n * k + i];
        } else {
            Wt[i] = X[i] * X[i];
        }
        WX[i] = Wt[i] * X[i];
    }
    const vi zero_lane = amax < vsplat(GROUP_MAX_EPS);
    maxv = vsel(zero_lane, one, maxv);
    vf inv = vsplat(-(float)nmax) / maxv;
    vf sxl = zero, sl2 = zero;
    for (int i = 0; i < n; ++i) {
        const vf fl = vlevel(inv * X[i], vlo, vhi);
        sxl += WX[i] * fl;
        sl2 += Wt[i] * fl * fl;
    }
    vf scale = vsel(sl2 != zero, sxl / sl2, zero);
    vf best = scale * sxl;
    vf l_inv = inv;
    for (int step = -9; step <= 9; ++step) {
        if (step == 0) continue;
        inv = vsplat(-((float)nmax + 0.1f * (float)step)) / maxv;
        sxl = zero;
        sl2 = zero;
        for (int i = 0; i < n; ++i) {
            const vf fl = vlevel(inv * X[i], vlo, vhi);
            sxl += WX[i] * fl;
            sl2 += Wt[i] * fl * fl;
        }
        const vi better = (sl2 > zero) & (sxl * sxl > best * sl2);
        scale = vsel(better, sxl / sl2, scale);
        best = vsel(better, scale * sxl, best);
        l_inv = vsel(better, inv, l_inv);
    }
    scale = vsel(zero_lane, zero, scale);
    for (int i = 0; i < n; ++i) {
        vi l = vround_clamp(l_inv * X[i], vlo, vhi) + vsplati(nmax);
        l = l & ~zero_lane; /* all-zero group: L = 0 */
        for (int k = 0; k < NL; ++k) L[n * k + i] = (int8_t)l[k];
    }
    for (int k = 0; k < NL; ++k) scale_out[k] = scale[k];
}

/* make_qkx2_quants(n, nmax, x, w, L, &the_min, Laux, rmin, rdelta, nstep, use_mad) for QH groups:
 * QH_V vectors of NL lanes side by side in every loop, so that the CPU overlaps their sums (each
 * sum is a chain of dependent additions, which a single vector would wait on). */
#define QH_V 2
#define QH (QH_V * NL)
LANES_ATTR
static void qkx_lanes(const float *x, const float *w, int n, int nmax, float rmin, float rdelta, int nstep,
                      int use_mad, float *scale_out, float *min_out, uint8_t *L) {
    vf X[32][QH_V], W[32][QH_V], T[32][QH_V];
    vf lo[QH_V], hi[QH_V], sw[QH_V], swx[QH_V], lo0[QH_V], den[QH_V], inv[QH_V], scale[QH_V], best[QH_V];
    vf l_inv[QH_V], l_lo[QH_V], s_l[QH_V], s_l2[QH_V], s_xl[QH_V], err[QH_V], det[QH_V], sc[QH_V], mn[QH_V];
    vi early[QH_V];
    const vi v0 = vsplati(0), vnmax = vsplati(nmax);
    const vf zero = vsplat(0.0f), one = vsplat(1.0f);
    for (int h = 0; h < QH_V; ++h)
        for (int i = 0; i < n; ++i)
            for (int k = 0; k < NL; ++k) {
                X[i][h][k] = x[n * (NL * h + k) + i];
                W[i][h][k] = w[n * (NL * h + k) + i];
            }
    for (int h = 0; h < QH_V; ++h) {
        lo[h] = X[0][h], hi[h] = X[0][h], sw[h] = W[0][h];
        swx[h] = sw[h] * X[0][h];
    }
    for (int i = 1; i < n; ++i)
        for (int h = 0; h < QH_V; ++h) {
            lo[h] = vsel(X[i][h] < lo[h], X[i][h], lo[h]);
            hi[h] = vsel(X[i][h] > hi[h], X[i][h], hi[h]);
            sw[h] += W[i][h];
            swx[h] += W[i][h] * X[i][h];
        }
    for (int h = 0; h < QH_V; ++h) {
        lo[h] = vsel(lo[h] > zero, zero, lo[h]);
        early[h] = hi[h] == lo[h];
        lo0[h] = lo[h];
        den[h] = vsel(early[h], one, hi[h] - lo[h]);
        inv[h] = vsplat((float)nmax) / den[h];
        scale[h] = one / inv[h];
        best[h] = zero;
        l_inv[h] = inv[h], l_lo[h] = lo[h];
    }
    for (int i = 0; i < n; ++i)
        for (int h = 0; h < QH_V; ++h) {
            vf e = scale[h] * vlevel(inv[h] * (X[i][h] - lo[h]), v0, vnmax) + lo[h] - X[i][h];
            e = use_mad ? vabs(e) : e * e;
            best[h] += W[i][h] * e;
        }
    for (int step = 0; step <= nstep; ++step) {
        const float num = rmin + rdelta * (float)step + (float)nmax;
        for (int h = 0; h < QH_V; ++h) {
            inv[h] = vsplat(num) / den[h];
            s_l[h] = zero, s_l2[h] = zero, s_xl[h] = zero, err[h] = zero;
        }
        for (int i = 0; i < n; ++i)
            for (int h = 0; h < QH_V; ++h) {
                const vf fl = vlevel(inv[h] * (X[i][h] - lo[h]), v0, vnmax);
                const vf wl = W[i][h] * fl;
                T[i][h] = fl;
                s_l[h] += wl;
                s_l2[h] += wl * fl;
                s_xl[h] += wl * X[i][h];
            }
        for (int h = 0; h < QH_V; ++h) {
            det[h] = sw[h] * s_l2[h] - s_l[h] * s_l[h];
            const vf a = (sw[h] * s_xl[h] - swx[h] * s_l[h]) / det[h];
            const vf b = (s_l2[h] * swx[h] - s_l[h] * s_xl[h]) / det[h];
            const vi pos = b > zero;
            sc[h] = vsel(pos, s_xl[h] / s_l2[h], a);
            mn[h] = vsel(pos, zero, b);
        }
        for (int i = 0; i < n; ++i)
            for (int h = 0; h < QH_V; ++h) {
                vf e = sc[h] * T[i][h] + mn[h] - X[i][h];
                e = use_mad ? vabs(e) : e * e;
                err[h] += W[i][h] * e;
            }
        for (int h = 0; h < QH_V; ++h) {
            const vi better = (det[h] > zero) & (err[h] < best[h]) & ~early[h];
            best[h] = vsel(better, err[h], best[h]);
            scale[h] = vsel(better, sc[h], scale[h]);
            l_inv[h] = vsel(better, inv[h], l_inv[h]);
            l_lo[h] = vsel(better, lo[h], l_lo[h]);
            lo[h] = vsel(better, mn[h], lo[h]);
            den[h] = vsel(better, hi[h] - mn[h], den[h]);
        }
    }
    for (int h = 0; h < QH_V; ++h)
        for (int k = 0; k < NL; ++k) {
            scale_out[NL * h + k] = early[h][k] ? 0.0f : scale[h][k];
            min_out[NL * h + k] = early[h][k] ? -lo0[h][k] : -lo[h][k];
        }
    for (int i = 0; i < n; ++i)
        for (int h = 0; h < QH_V; ++h) {
            const vf l = vsel(early[h], zero, vlevel(l_inv[h] * (X[i][h] - l_lo[h]), v0, vnmax));
            for (int k = 0; k < NL; ++k) L[n * (NL * h + k) + i] = (uint8_t)l[k];
        }
}

/* Run a lane search over any number of groups: whole batches of NL in place, the rest through a
 * zero-padded batch (a zero group is harmless and its results are dropped). */
void LANES_FN(mc_qx)(const float *x, const float *qw, int64_t ngroups, int n, int nmax, float *scale, int8_t *L) {
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

void LANES_FN(mc_qkx)(const float *x, const float *w, int64_t ngroups, int n, int nmax, float rmin, float rdelta,
                      int nstep, int use_mad, float *scale, float *the_min, uint8_t *L) {
    int64_t g = 0;
    for (; g + QH <= ngroups; g += QH)
        qkx_lanes(x + n * g, w + n * g, n, nmax, rmin, rdelta, nstep, use_mad, scale + g, the_min + g, L + n * g);
    if (g < ngroups) {
        float xb[QH * 32] = {0}, wb[QH * 32] = {0}, sb[QH], mb[QH];
        uint8_t lb[QH * 32];
        const int64_t rest = ngroups - g;
        memcpy(xb, x + n * g, sizeof(float) * (size_t)(n * rest));
        memcpy(wb, w + n * g, sizeof(float) * (size_t)(n * rest));
        qkx_lanes(xb, wb, n, nmax, rmin, rdelta, nstep, use_mad, sb, mb, lb);
        memcpy(scale + g, sb, sizeof(float) * (size_t)rest);
        memcpy(the_min + g, mb, sizeof(float) * (size_t)rest);
        memcpy(L + n * g, lb, (size_t)(n * rest));
    }
}
