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

/* make_qkx2_quants(n, nmax, x, w, L, &the_min, Laux, rmin, rdelta, nstep, use_mad) for NL groups. */
LANES_ATTR
static void qkx_lanes(const float *x, const float *w, int n, int nmax, float rmin, float rdelta, int nstep,
                      int use_mad, float *scale_out, float *min_out, uint8_t *L) {
    vf X[32], W[32], T[32];
    const vi v0 = vsplati(0), vnmax = vsplati(nmax);
    const vf zero = vsplat(0.0f), one = vsplat(1.0f);
    for (int i = 0; i < n; ++i)
        for (int k = 0; k < NL; ++k) {
            X[i][k] = x[n * k + i];
            W[i][k] = w[n * k + i];
        }
    vf lo = X[0], hi = X[0], sw = W[0];
    vf swx = sw * X[0];
    for (int i = 1; i < n; ++i) {
        lo = vsel(X[i] < lo, X[i], lo);
        hi = vsel(X[i] > hi, X[i], hi);
        sw += W[i];
        swx += W[i] * X[i];
    }
    lo = vsel(lo > zero, zero, lo);
    const vi early = hi == lo;
    const vf lo0 = lo;
    vf den = vsel(early, one, hi - lo);
    vf inv = vsplat((float)nmax) / den;
    vf scale = one / inv;
    vf best = zero;
    vf l_inv = inv, l_lo = lo;
    for (int i = 0; i < n; ++i) {
        vf e = scale * vlevel(inv * (X[i] - lo), v0, vnmax) + lo - X[i];
        e = use_mad ? vabs(e) : e * e;
        best += W[i] * e;
    }
    for (int step = 0; step <= nstep; ++step) {
        const float num = rmin + rdelta * (float)step + (float)nmax;
        inv = vsplat(num) / den;
        vf s_l = zero, s_l2 = zero, s_xl = zero, err = zero;
        for (int i = 0; i < n; ++i) {
            const vf fl = vlevel(inv * (X[i] - lo), v0, vnmax);
            const vf wl = W[i] * fl;
            T[i] = fl;
            s_l += wl;
            s_l2 += wl * fl;
            s_xl += wl * X[i];
        }
        const vf det = sw * s_l2 - s_l * s_l;
        const vf a = (sw * s_xl - swx * s_l) / det;
        const vf b = (s_l2 * swx - s_l * s_xl) / det;
        const vi pos = b > zero;
        const vf sc = vsel(pos, s_xl / s_l2, a);
        const vf mn = vsel(pos, zero, b);
        for (int i = 0; i < n; ++i) {
            vf e = sc * T[i] + mn - X[i];
            e = use_mad ? vabs(e) : e * e;
            err += W[i] * e;
        }
        const vi better = (det > zero) & (err < best) & ~early;
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
        const vf l = vsel(early, zero, vlevel(l_inv * (X[i] - l_lo), v0, vnmax));
        for (int k = 0; k < NL; ++k) L[n * k + i] = (uint8_t)l[k];
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

void LANES_FN(mc_qkx)(const float *x, const float *w, int64_t ngroups, int n, int nmax, float rmin, float rdelta, int nstep,
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
