/* The INT4 group search (minicpm_convert/quants/int4_search.py is its oracle and says what it
 * does), NL groups side by side: lane k holds group k and runs the oracle's float32 operations in
 * its order, so every width gives the oracle's bits.  Included once per instruction set (int4.c:
 * SSE2 and AVX2 with NL 8, int4_avx512.c: AVX-512F with NL 16); defines LANES_FN(mc_int4).
 *
 * Every helper is always_inline: a helper left out of line is compiled for the file's default
 * target, and vectors passed to it cross an ABI boundary (slow, and once seen miscompiled). */
#define I4 static inline __attribute__((always_inline))
#define I4_FN(name) LANES_FN(name)

I4 vf I4_FN(vmin)(vf a, vf b) { return (vf)((((vi)a) & (vi)(a < b)) | (((vi)b) & ~(vi)(a < b))); }
I4 vf I4_FN(vmax)(vf a, vf b) { return (vf)((((vi)a) & (vi)(a > b)) | (((vi)b) & ~(vi)(a > b))); }
I4 vf I4_FN(vpick)(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
I4 vf I4_FN(vfill)(float f) { return (vf){} + f; }

/* np.rint(np.clip(v, lo, hi)) for |lo|, |hi| < 2^22: the 1.5 * 2^23 trick rounds ties to even. */
I4 vf I4_FN(round_clipped)(vf v, float lo, float hi) {
    v = I4_FN(vmin)(I4_FN(vmax)(v, I4_FN(vfill)(lo)), I4_FN(vfill)(hi));
    vi i = (vi)(v + I4_FN(vfill)(12582912.0f));
    i = (i & ((vi){} + 0x007FFFFF)) - ((vi){} + 0x00400000);
    return __builtin_convertvector(i, vf);
}

/* fp16_scale: the float16 value a loader sees (half_to_float(half_from_float(s)) of common.h, in
 * lanes), FP16_TINY for 0, a negative value or NaN. */
I4 vf I4_FN(fp16_scale)(vf s) {
    const vi bits = (vi)s;
    /* normal halves: round the 13 dropped mantissa bits to nearest even, in the float's bits */
    const vi normal = (bits + ((vi){} + 0x0FFF) + ((bits >> 13) & ((vi){} + 1))) & ((vi){} + ~0x1FFF);
    /* subnormal halves (below 2^-14): multiples of 2^-24, rounded to nearest even by the 2^23 trick */
    const vf units = (s * I4_FN(vfill)(16777216.0f) + I4_FN(vfill)(8388608.0f)) - I4_FN(vfill)(8388608.0f);
    const vf sub = units * I4_FN(vfill)(1.0f / 16777216.0f);
    vf h = I4_FN(vpick)(s < I4_FN(vfill)(6.103515625e-05f), sub, (vf)normal);
    h = I4_FN(vpick)(s >= I4_FN(vfill)(65520.0f), I4_FN(vfill)(__builtin_inff()), h);
    return I4_FN(vpick)(h > I4_FN(vfill)(0.0f), h, I4_FN(vfill)(MC_FP16_TINY));
}

I4 vf I4_FN(levels)(vf x, vf s, vf z) {
    const vf q = I4_FN(round_clipped)(x / s, -16.0f, 16.0f) + z;
    return I4_FN(vmin)(I4_FN(vmax)(q, I4_FN(vfill)(0.0f)), I4_FN(vfill)(15.0f));
}

I4 vf I4_FN(asym_zero)(vf xmin, vf s) {
    const vf z = I4_FN(round_clipped)(-xmin / s, 0.0f, 16.0f);
    return I4_FN(vmin)(I4_FN(vmax)(z, I4_FN(vfill)(1.0f)), I4_FN(vfill)(15.0f));
}

typedef struct {
    const vf *X, *W, *WX;
    int n;
    vf sw, swx, swxx;
    vf err, s, z, t; /* the best so far */
    int started;
} I4_FN(group);

typedef struct { vf swq, swqq, swxq; } I4_FN(sums);

I4 I4_FN(sums) I4_FN(pass)(const I4_FN(group) *g, vf s, vf z) {
    I4_FN(sums) r = {{0}, {0}, {0}};
    for (int i = 0; i < g->n; ++i) {
        const vf q = I4_FN(levels)(g->X[i], s, z);
        const vf wq = g->W[i] * q;
        r.swq = r.swq + wq;
        r.swqq = r.swqq + wq * q;
        r.swxq = r.swxq + g->WX[i] * q;
    }
    return r;
}

I4 vf I4_FN(square)(const I4_FN(group) *g, I4_FN(sums) u, vf z) {
    return (u.swqq - (2.0f * z) * u.swq) + (z * z) * g->sw;
}

I4 vf I4_FN(error)(const I4_FN(group) *g, I4_FN(sums) u, vf s, vf z) {
    const vf cross = u.swxq - z * g->swx;
    return (g->swxx - (2.0f * s) * cross) + (s * s) * I4_FN(square)(g, u, z);
}

I4 vf I4_FN(refit_scale)(const I4_FN(group) *g, I4_FN(sums) u, vf z) {
    const vf num = u.swxq - z * g->swx;
    const vf sq = I4_FN(square)(g, u, z);
    const vi pos = sq > I4_FN(vfill)(0.0f);
    /* a lane with no positive square divides by 1 instead (its quotient is dropped) */
    const vf q = num / I4_FN(vpick)(pos, sq, I4_FN(vfill)(1.0f));
    return I4_FN(fp16_scale)(I4_FN(vpick)(pos, q, I4_FN(vfill)(0.0f)));
}

I4 void I4_FN(offer)(I4_FN(group) *g, I4_FN(sums) u, vf s, vf z, vf t) {
    const vf err = I4_FN(error)(g, u, s, z);
    if (!g->started) {
        g->err = err, g->s = s, g->z = z, g->t = t, g->started = 1;
        return;
    }
    const vi better = err < g->err;
    g->err = I4_FN(vpick)(better, err, g->err);
    g->s = I4_FN(vpick)(better, s, g->s);
    g->z = I4_FN(vpick)(better, z, g->z);
    g->t = I4_FN(vpick)(better, t, g->t);
}

I4 void I4_FN(try_sym)(I4_FN(group) *g, vf absmax, vf t) {
    const vf z = I4_FN(vfill)(8.0f);
    const vf s = I4_FN(fp16_scale)(absmax / t);
    const I4_FN(sums) u = I4_FN(pass)(g, s, z);
    I4_FN(offer)(g, u, s, z, t);
    I4_FN(offer)(g, u, I4_FN(refit_scale)(g, u, z), z, t);
}

I4 void I4_FN(try_asym)(I4_FN(group) *g, vf xmin, vf xmax, vf t) {
    const vf s = I4_FN(fp16_scale)((xmax - xmin) / t);
    const vf z = I4_FN(asym_zero)(xmin, s);
    const I4_FN(sums) u = I4_FN(pass)(g, s, z);
    I4_FN(offer)(g, u, s, z, t);
    const vf one = I4_FN(vfill)(1.0f), zero = I4_FN(vfill)(0.0f);
    vf det = g->sw * u.swqq - u.swq * u.swq;
    const vi ok = det > zero;
    det = I4_FN(vpick)(ok, det, one);
    const vf a = I4_FN(fp16_scale)(I4_FN(vpick)(ok, (g->sw * u.swxq - u.swq * g->swx) / det, zero));
    const vf b = (u.swqq * g->swx - u.swq * u.swxq) / det;
    vf z2 = I4_FN(round_clipped)(-b / a, 0.0f, 16.0f);
    z2 = I4_FN(vmin)(I4_FN(vmax)(z2, one), I4_FN(vfill)(15.0f));
    z2 = I4_FN(vpick)(ok, z2, z);
    I4_FN(offer)(g, u, I4_FN(refit_scale)(g, u, z2), z2, t);
}

static const float I4_FN(sym_coarse)[] = {5.5f, 6.0f, 6.5f, 7.0f, 7.5f, 8.0f, 8.5f};
static const float I4_FN(sym_fine)[] = {0.25f, 0.125f};
static const float I4_FN(asym_coarse)[] = {12.0f, 12.5f, 13.0f, 13.5f, 14.0f, 14.5f, 15.0f, 15.5f, 16.0f, 16.5f, 17.0f};
static const float I4_FN(asym_fine)[] = {0.25f, 0.125f};

/* NL groups of n values at x + n*k; cw: n column weights or NULL. Returns 1 if a lane's plain
 * scale overflows float16 (nothing is then meaningful), else 0. */
LANES_ATTR
static int I4_FN(int4_lanes)(const float *x, const float *cw, int n, int sym, int search, uint8_t *codes,
                             float *scale_out, uint8_t *zero_out, float *errors) {
    vf X[MC_INT4_MAX_GROUP], W[MC_INT4_MAX_GROUP], WX[MC_INT4_MAX_GROUP];
    const vf zero = I4_FN(vfill)(0.0f), one = I4_FN(vfill)(1.0f);
    vf xmin = zero, xmax = zero;
    for (int i = 0; i < n; ++i) {
        for (int k = 0; k < NL; ++k) X[i][k] = x[n * k + i];
        xmin = I4_FN(vmin)(X[i], xmin); /* np.minimum over (min over the group, 0) */
        xmax = I4_FN(vmax)(X[i], xmax);
    }
    const vf absmax = I4_FN(vmax)(-xmin, xmax);
    if (sym) xmax = absmax, xmin = -absmax;
    const vi empty = (xmin == zero) & (xmax == zero);
    xmin = I4_FN(vpick)(empty, I4_FN(vfill)(-1.0f), xmin);
    xmax = I4_FN(vpick)(empty, one, xmax);
    vf s0 = I4_FN(fp16_scale)((xmax - xmin) / I4_FN(vfill)(15.0f));
    for (int k = 0; k < NL; ++k)
        if (!isfinite(s0[k])) return 1;
    vf z0;
    if (sym) {
        z0 = I4_FN(vfill)(8.0f);
    } else {
        const vi low = I4_FN(round_clipped)(-xmin / s0, 0.0f, 16.0f) < one;
        s0 = I4_FN(vpick)(low, I4_FN(fp16_scale)(xmax / I4_FN(vfill)(14.0f)), s0);
        z0 = I4_FN(asym_zero)(xmin, s0);
    }
    vf s = s0, z = z0;
    if (search) {
        if (cw) {
            for (int i = 0; i < n; ++i) W[i] = I4_FN(vfill)(cw[i]);
        } else {
            vf sxx = zero;
            for (int i = 0; i < n; ++i) sxx = sxx + X[i] * X[i];
            vf rms = sxx / I4_FN(vfill)((float)n);
            for (int k = 0; k < NL; ++k) rms[k] = sqrtf(rms[k]);
            for (int i = 0; i < n; ++i) W[i] = (vf)((vi)X[i] & ((vi){} + 0x7FFFFFFF)) + rms;
        }
        I4_FN(group) g = {X, W, WX, n, zero, zero, zero, zero, zero, zero, zero, 0};
        for (int i = 0; i < n; ++i) {
            WX[i] = W[i] * X[i];
            g.sw = g.sw + W[i];
            g.swx = g.swx + WX[i];
            g.swxx = g.swxx + WX[i] * X[i];
        }
        I4_FN(offer)(&g, I4_FN(pass)(&g, s0, z0), s0, z0, I4_FN(vfill)(sym ? 7.5f : 15.0f));
        const float *coarse = sym ? I4_FN(sym_coarse) : I4_FN(asym_coarse);
        const float *fine = sym ? I4_FN(sym_fine) : I4_FN(asym_fine);
        const int ncoarse = sym ? 7 : 11, nfine = 2;
        for (int c = 0; c < ncoarse; ++c) {
            const vf t = I4_FN(vfill)(coarse[c]);
            if (sym) I4_FN(try_sym)(&g, absmax, t);
            else I4_FN(try_asym)(&g, xmin, xmax, t);
        }
        for (int f = 0; f < nfine; ++f) { /* both steps of a level go around the best t before them */
            const vf centre = g.t;
            for (int side = -1; side <= 1; side += 2) {
                const vf t = centre + I4_FN(vfill)(side * fine[f]);
                if (sym) I4_FN(try_sym)(&g, absmax, t);
                else I4_FN(try_asym)(&g, xmin, xmax, t);
            }
        }
        s = g.s, z = g.z;
    }
    vf e = zero, e0 = zero, exx = zero;
    for (int i = 0; i < n; ++i) {
        const vf q = I4_FN(levels)(X[i], s, z), q0 = I4_FN(levels)(X[i], s0, z0);
        const vf d = X[i] - s * (q - z), d0 = X[i] - s0 * (q0 - z0);
        e = e + d * d;
        e0 = e0 + d0 * d0;
        exx = exx + X[i] * X[i];
        for (int k = 0; k < NL; ++k) codes[n * k + i] = (uint8_t)q[k];
    }
    for (int k = 0; k < NL; ++k) {
        scale_out[k] = s[k];
        zero_out[k] = (uint8_t)z[k];
        errors[3 * k] = e[k], errors[3 * k + 1] = e0[k], errors[3 * k + 2] = exx[k];
    }
    return 0;
}

/* Any number of groups: whole batches of NL in place, the rest through a zero-padded batch. */
int LANES_FN(mc_int4)(const float *x, const float *cw, int64_t ngroups, int n, int sym, int search, uint8_t *codes,
                      float *scale, uint8_t *zero, float *errors) {
    int64_t g = 0;
    for (; g + NL <= ngroups; g += NL)
        if (I4_FN(int4_lanes)(x + n * g, cw, n, sym, search, codes + n * g, scale + g, zero + g, errors + 3 * g))
            return 1;
    if (g < ngroups) {
        float xb[NL * MC_INT4_MAX_GROUP] = {0}, sb[NL], eb[3 * NL];
        uint8_t cb[NL * MC_INT4_MAX_GROUP], zb[NL];
        const int64_t rest = ngroups - g;
        memcpy(xb, x + n * g, sizeof(float) * (size_t)(n * rest));
        if (I4_FN(int4_lanes)(xb, cw, n, sym, search, cb, sb, zb, eb)) return 1;
        memcpy(codes + n * g, cb, (size_t)(n * rest));
        memcpy(scale + g, sb, sizeof(float) * (size_t)rest);
        memcpy(zero + g, zb, (size_t)rest);
        memcpy(errors + 3 * g, eb, sizeof(float) * (size_t)(3 * rest));
    }
    return 0;
}

#undef I4
#undef I4_FN
