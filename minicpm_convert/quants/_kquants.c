/* Compiled k-quant (Q4_K, Q5_K, Q6_K) and Q8_0 quantizers, byte-identical to llama.cpp's
 * reference quantizers without an importance matrix.
 *
 * Written for minicpm-convert from the exactness rules its NumPy port (kquants.py) follows;
 * that port is the oracle in the tests (random and edge-case data, byte for byte).  What keeps
 * the bytes exact:
 *   - every value is a float32 and every operation is a single IEEE float32 operation in the
 *     source order of the reference (x86-64 SSE math; build with -ffp-contract=off and without
 *     -ffast-math so no multiply-add is fused and no sum is reassociated);
 *   - nearest_int is the "add 1.5 * 2^23 and keep the low mantissa bits" trick;
 *   - fp32 -> fp16 is round to nearest even (NaN -> 0x7E00 | sign).
 * Every entry point releases the GIL, so threads quantize chunks in parallel.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#define QK_K 256
#define EPS_GROUP_MAX 1e-15f

#if defined(__FP_FAST_FMAF) && !defined(MINICPM_ALLOW_FMA)
/* Harmless by itself (only says fmaf is fast), but a reminder of the build flags above. */
#endif

static inline int round_magic(float v) {
    float t = v + 12582912.0f; /* 1.5 * 2^23 */
    int32_t bits;
    memcpy(&bits, &t, sizeof bits);
    return (bits & 0x007FFFFF) - 0x00400000;
}

static inline uint16_t half_from_float(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t mag = u & 0x7FFFFFFFu;
    if (mag >= 0x7F800000u) { /* inf or NaN */
        return (uint16_t)(sign | (mag > 0x7F800000u ? 0x7E00u : 0x7C00u));
    }
    if (mag >= 0x477FF000u) { /* >= 65520: rounds to infinity */
        return (uint16_t)(sign | 0x7C00u);
    }
    if (mag < 0x38800000u) { /* below 2^-14: a subnormal half (or zero) */
        float a;
        memcpy(&a, &mag, sizeof a);
        /* a * 2^24 is exact; adding and removing 2^23 rounds it to an integer, ties to even. */
        volatile float scaled = a * 16777216.0f;
        volatile float rounded = scaled + 8388608.0f;
        float units = rounded - 8388608.0f;
        return (uint16_t)(sign | (uint32_t)units);
    }
    /* normal: rebias the exponent (127 -> 15) and round the 13 dropped bits to nearest even */
    const uint32_t r = mag + 0x00000FFFu + ((mag >> 13) & 1u);
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
}

static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1Fu;
    const uint32_t m = h & 0x3FFu;
    uint32_t u;
    if (e == 0) {
        /* zero or subnormal: m * 2^-24, exact in float32 */
        float v = (float)m * (1.0f / 16777216.0f);
        memcpy(&u, &v, sizeof u);
        u |= sign;
    } else if (e == 31) {
        u = sign | 0x7F800000u | (m << 13);
    } else {
        u = sign | ((e + 112u) << 23) | (m << 13);
    }
    float out;
    memcpy(&out, &u, sizeof out);
    return out;
}

static inline void put_half(uint8_t *p, float f) {
    uint16_t h = half_from_float(f);
    p[0] = (uint8_t)(h & 0xFF);
    p[1] = (uint8_t)(h >> 8);
}

static inline float get_half(const uint8_t *p) {
    return half_to_float((uint16_t)(p[0] | (p[1] << 8)));
}

static inline int clampi(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

/* ------------------------------------------------------------------ the min/scale search
 * One group of n values with weights w: levels 0..nmax, a scale and a (non-positive) minimum
 * chosen by a small grid search over the inverse scale, minimising the weighted squared error.
 * Returns the scale; *neg_min receives minus the minimum; levels go to q. */
static float search_scale_min(int n, int nmax, const float *x, const float *w, uint8_t *q, float *neg_min,
                              float rmin, float rdelta, int nstep) {
    uint8_t trial[32];
    float lo = x[0], hi = x[0];
    float sw = w[0];
    float swx = sw * x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < lo) lo = x[i];
        if (x[i] > hi) hi = x[i];
        const float wi = w[i];
        sw += wi;
        swx += wi * x[i];
    }
    if (lo > 0) lo = 0;
    if (hi == lo) {
        memset(q, 0, (size_t)n);
        *neg_min = -lo;
        return 0.0f;
    }
    const float fnmax = (float)nmax;
    float inv = fnmax / (hi - lo);
    float scale = 1 / inv;
    float best = 0;
    for (int i = 0; i < n; ++i) {
        const int l = clampi(round_magic(inv * (x[i] - lo)), 0, nmax);
        q[i] = (uint8_t)l;
        float e = scale * (float)l + lo - x[i];
        e = e * e;
        best += w[i] * e;
    }
    for (int step = 0; step <= nstep; ++step) {
        inv = (rmin + rdelta * (float)step + fnmax) / (hi - lo);
        float s_l = 0, s_l2 = 0, s_xl = 0;
        for (int i = 0; i < n; ++i) {
            const int l = clampi(round_magic(inv * (x[i] - lo)), 0, nmax);
            trial[i] = (uint8_t)l;
            const float wi = w[i];
            const float fl = (float)l;
            s_l += wi * fl;
            s_l2 += wi * fl * fl;
            s_xl += wi * fl * x[i];
        }
        const float det = sw * s_l2 - s_l * s_l;
        if (det > 0) {
            float sc = (sw * s_xl - swx * s_l) / det;
            float mn = (s_l2 * swx - s_l * s_xl) / det;
            if (mn > 0) {
                mn = 0;
                sc = s_xl / s_l2;
            }
            float err = 0;
            for (int i = 0; i < n; ++i) {
                float e = sc * (float)trial[i] + mn - x[i];
                e = e * e;
                err += w[i] * e;
            }
            if (err < best) {
                memcpy(q, trial, (size_t)n);
                best = err;
                scale = sc;
                lo = mn;
            }
        }
    }
    *neg_min = -lo;
    return scale;
}

/* Q4_K and Q5_K share everything but the level count, the search grid and the bit packing. */
/* Q4_K/Q5_K after the search: 6-bit sub-scales and mins relative to their maxima, packed into
 * 12 bytes, the fp16 super-block scale and min, and those scales as read back (for the levels).
 * Shared by the plain and the lane search. */
static void pack_k_scales(const float *sc, const float *mins, float max_scale, float max_min,
                          uint8_t *d_out, uint8_t *dmin_out, uint8_t *scales_out,
                          uint8_t *ls, uint8_t *lm, float *dd, float *dm_) {
    const float inv_scale = max_scale > 0 ? 63.0f / max_scale : 0.0f;
    const float inv_min = max_min > 0 ? 63.0f / max_min : 0.0f;
    for (int j = 0; j < 8; ++j) {
        uint8_t a = (uint8_t)round_magic(inv_scale * sc[j]);
        uint8_t b = (uint8_t)round_magic(inv_min * mins[j]);
        ls[j] = a < 63 ? a : 63;
        lm[j] = b < 63 ? b : 63;
    }
    for (int j = 0; j < 4; ++j) {
        scales_out[j] = (uint8_t)(ls[j] | ((ls[j + 4] >> 4) << 6));
        scales_out[j + 4] = (uint8_t)(lm[j] | ((lm[j + 4] >> 4) << 6));
        scales_out[j + 8] = (uint8_t)((ls[j + 4] & 0x0F) | ((lm[j + 4] & 0x0F) << 4));
    }
    put_half(d_out, max_scale / 63.0f);
    put_half(dmin_out, max_min / 63.0f);
    *dd = get_half(d_out);
    *dm_ = get_half(dmin_out);
}

static void block_qk_asym(const float *x, int nmax, float rmin, float rdelta, int nstep,
                          uint8_t *d_out, uint8_t *dmin_out, uint8_t scales_out[12], uint8_t L[QK_K]) {
    float w[32];
    float sc[8], mins[8];
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; ++j) {
        const float *xs = x + 32 * j;
        float s2 = 0;
        for (int l = 0; l < 32; ++l) s2 += xs[l] * xs[l];
        const float av = sqrtf(s2 / 32);
        for (int l = 0; l < 32; ++l) w[l] = av + fabsf(xs[l]);
        sc[j] = search_scale_min(32, nmax, xs, w, L + 32 * j, &mins[j], rmin, rdelta, nstep);
        if (sc[j] > max_scale) max_scale = sc[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    uint8_t ls[8], lm[8];
    float dd, dm_;
    pack_k_scales(sc, mins, max_scale, max_min, d_out, dmin_out, scales_out, ls, lm, &dd, &dm_);
    for (int j = 0; j < 8; ++j) {
        const float d = dd * (float)ls[j];
        if (!d) continue;
        const float dm = dm_ * (float)lm[j];
        for (int i = 0; i < 32; ++i) {
            L[32 * j + i] = (uint8_t)clampi(round_magic((x[32 * j + i] + dm) / d), 0, nmax);
        }
    }
}

/* The same as block_qk_asym, computed lane-major: the 8 groups of a super-block are 8 lanes
 * that run the search side by side (each lane keeps its own sequential sums, so the result is
 * the scalar one; the compiler turns every `for k < 8` loop into one vector operation).  Only
 * the winning inverse scale and minimum are kept; levels are recomputed at the end. */
#define NL 8
static inline int bits_round(float v) {
    union { float f; int32_t i; } u;
    u.f = v + 12582912.0f;
    return (u.i & 0x007FFFFF) - 0x00400000;
}

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define LANES_ATTR __attribute__((target_clones("avx2", "default"), optimize("O3")))
#else
#define LANES_ATTR
#endif

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8f vsel(v8i m, v8f a, v8f b) { return (v8f)(((v8i)a & m) | ((v8i)b & ~m)); }
static inline v8f vsplat(float f) { return (v8f){f, f, f, f, f, f, f, f}; }
static inline v8i vsplati(int v) { return (v8i){v, v, v, v, v, v, v, v}; }

/* MAX(0, MIN(nmax, nearest_int(v))) as float, per lane */
static inline v8f vlevel(v8f v, v8i vnmax) {
    v8i i = (v8i)(v + vsplat(12582912.0f));
    i = (i & vsplati(0x007FFFFF)) - vsplati(0x00400000);
    i = i & ~(i < vsplati(0));
    v8i over = i > vnmax;
    i = (i & ~over) | (vnmax & over);
    return __builtin_convertvector(i, v8f);
}

LANES_ATTR
static void block_qk_lanes(const float *x, int nmax, float rmin, float rdelta, int nstep,
                           uint8_t *d_out, uint8_t *dmin_out, uint8_t scales_out[12], uint8_t L[QK_K]) {
    v8f X[32], W[32], T[32];
    const v8i vnmax = vsplati(nmax);
    const v8f zero = vsplat(0.0f), one = vsplat(1.0f);
    const v8i absmask = vsplati(0x7FFFFFFF);
    for (int i = 0; i < 32; ++i)
        for (int k = 0; k < NL; ++k) X[i][k] = x[32 * k + i];
    v8f s2 = zero;
    for (int i = 0; i < 32; ++i) s2 += X[i] * X[i];
    v8f av;
    for (int k = 0; k < NL; ++k) av[k] = sqrtf(s2[k] / 32);
    for (int i = 0; i < 32; ++i) W[i] = av + (v8f)((v8i)X[i] & absmask);
    v8f lo = X[0], hi = X[0], sw = W[0];
    v8f swx = sw * X[0];
    for (int i = 1; i < 32; ++i) {
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
    for (int i = 0; i < 32; ++i) {
        v8f e = scale * vlevel(inv * (X[i] - lo), vnmax) + lo - X[i];
        e = e * e;
        best += W[i] * e;
    }
    for (int step = 0; step <= nstep; ++step) {
        const float num = rmin + rdelta * (float)step + (float)nmax;
        inv = vsplat(num) / den;
        v8f s_l = zero, s_l2 = zero, s_xl = zero, err = zero;
        for (int i = 0; i < 32; ++i) {
            const v8f fl = vlevel(inv * (X[i] - lo), vnmax);
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
        for (int i = 0; i < 32; ++i) {
            v8f e = sc * T[i] + mn - X[i];
            e = e * e;
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
    float scs[NL], mins[NL];
    float max_scale = 0, max_min = 0;
    for (int k = 0; k < NL; ++k) {
        scs[k] = early[k] ? 0.0f : scale[k];
        mins[k] = early[k] ? -lo0[k] : -lo[k];
        if (scs[k] > max_scale) max_scale = scs[k];
        if (mins[k] > max_min) max_min = mins[k];
    }
    uint8_t ls[8], lm[8];
    float dd, dm_;
    pack_k_scales(scs, mins, max_scale, max_min, d_out, dmin_out, scales_out, ls, lm, &dd, &dm_);
    v8f d, dm;
    for (int k = 0; k < NL; ++k) {
        d[k] = dd * (float)ls[k];
        dm[k] = dm_ * (float)lm[k];
    }
    const v8i has_d = d != zero;
    d = vsel(has_d, d, one);
    for (int i = 0; i < 32; ++i) {
        const v8f a = vlevel((X[i] + dm) / d, vnmax);
        const v8f b = vsel(early, zero, vlevel(l_inv * (X[i] - l_lo), vnmax));
        T[i] = vsel(has_d, a, b);
    }
    for (int k = 0; k < NL; ++k)
        for (int i = 0; i < 32; ++i) L[32 * k + i] = (uint8_t)T[i][k];
}

/* MAX(lo, MIN(hi, nearest_int(v))) as int, per lane */
static inline v8i vround_clamp(v8f v, v8i vlo, v8i vhi) {
    v8i i = (v8i)(v + vsplat(12582912.0f));
    i = (i & vsplati(0x007FFFFF)) - vsplati(0x00400000);
    v8i under = i < vlo;
    i = (i & ~under) | (vlo & under);
    v8i over = i > vhi;
    return (i & ~over) | (vhi & over);
}

/* search_scale_sym for 8 groups of 16 at once (lane k = group k of g[16*k ..]); levels in L. */
LANES_ATTR
static void sym16_lanes(const float *g, float *scale_out, int8_t *L) {
    const int nmax = 32;
    v8f X[16], Wt[16], WX[16];
    const v8f zero = vsplat(0.0f), one = vsplat(1.0f);
    const v8i vlo = vsplati(-nmax), vhi = vsplati(nmax - 1);
    const v8i absmask = vsplati(0x7FFFFFFF);
    for (int i = 0; i < 16; ++i)
        for (int k = 0; k < NL; ++k) X[i][k] = g[16 * k + i];
    v8f amax = zero, maxv = zero;
    for (int i = 0; i < 16; ++i) {
        const v8f a = (v8f)((v8i)X[i] & absmask);
        const v8i m = a > amax;
        amax = vsel(m, a, amax);
        maxv = vsel(m, X[i], maxv);
        Wt[i] = X[i] * X[i];
        WX[i] = Wt[i] * X[i];
    }
    const v8i zero_lane = amax < vsplat(EPS_GROUP_MAX);
    maxv = vsel(zero_lane, one, maxv);
    v8f inv = vsplat(-(float)nmax) / maxv;
    v8f sxl = zero, sl2 = zero;
    for (int i = 0; i < 16; ++i) {
        const v8f fl = __builtin_convertvector(vround_clamp(inv * X[i], vlo, vhi), v8f);
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
        for (int i = 0; i < 16; ++i) {
            const v8f fl = __builtin_convertvector(vround_clamp(inv * X[i], vlo, vhi), v8f);
            sxl += WX[i] * fl;
            sl2 += Wt[i] * fl * fl;
        }
        const v8i better = (sl2 > zero) & (sxl * sxl > best * sl2);
        scale = vsel(better, sxl / sl2, scale);
        best = vsel(better, scale * sxl, best);
        l_inv = vsel(better, inv, l_inv);
    }
    scale = vsel(zero_lane, zero, scale);
    for (int i = 0; i < 16; ++i) {
        v8i l = vround_clamp(l_inv * X[i], vlo, vhi) + vsplati(nmax);
        l = l & ~zero_lane;
        for (int k = 0; k < NL; ++k) L[16 * k + i] = (int8_t)l[k];
    }
    for (int k = 0; k < NL; ++k) scale_out[k] = scale[k];
}

/* Q6_K after the 16 sub-block scales `sc` (and their levels in L) are known: the super-block
 * scale (first largest |sc|, signed), int8 sub-scales, requantised levels, packing. Shared by the
 * lane and the plain search so both give the reference's bytes. */
static void q6_k_finish(const float *x, const float *sc, int8_t *L, uint8_t *y) {
    float max_abs = 0, max_sc = 0;
    for (int g = 0; g < 16; ++g) {
        const float a = fabsf(sc[g]);
        if (a > max_abs) { max_abs = a; max_sc = sc[g]; }
    }
    if (max_abs < EPS_GROUP_MAX) {
        memset(y, 0, 210);
        return;
    }
    const float inv = -128.0f / max_sc;
    uint8_t *ql = y, *qh = y + 128;
    int8_t *scales = (int8_t *)(y + 192);
    put_half(y + 208, 1 / inv);
    const float d0 = get_half(y + 208);
    for (int g = 0; g < 16; ++g) {
        const int v = round_magic(inv * sc[g]);
        scales[g] = (int8_t)(v < 127 ? v : 127);
    }
    for (int g = 0; g < 16; ++g) {
        const float d = d0 * (float)scales[g];
        if (!d) continue;
        for (int i = 0; i < 16; ++i) {
            L[16 * g + i] = (int8_t)(clampi(round_magic(x[16 * g + i] / d), -32, 31) + 32);
        }
    }
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

static void quantize_q6_k_lanes(const float *x, uint8_t *y, int64_t nb) {
    int8_t L[QK_K];
    float sc[16];
    for (int64_t b = 0; b < nb; ++b, x += QK_K, y += 210) {
        sym16_lanes(x, sc, L);
        sym16_lanes(x + 128, sc + 8, L + 128);
        q6_k_finish(x, sc, L, y);
    }
}

static int use_lanes = 1;

static void quantize_q4_k(const float *x, uint8_t *y, int64_t nb) {
    uint8_t L[QK_K];
    for (int64_t b = 0; b < nb; ++b, x += QK_K, y += 144) {
        if (use_lanes) block_qk_lanes(x, 15, -1.0f, 0.1f, 20, y, y + 2, y + 4, L);
        else block_qk_asym(x, 15, -1.0f, 0.1f, 20, y, y + 2, y + 4, L);
        uint8_t *qs = y + 16;
        for (int g = 0; g < 4; ++g) {
            for (int l = 0; l < 32; ++l) qs[32 * g + l] = (uint8_t)(L[64 * g + l] | (L[64 * g + 32 + l] << 4));
        }
    }
}

static void quantize_q5_k(const float *x, uint8_t *y, int64_t nb) {
    uint8_t L[QK_K];
    for (int64_t b = 0; b < nb; ++b, x += QK_K, y += 176) {
        if (use_lanes) block_qk_lanes(x, 31, -0.5f, 0.1f, 15, y, y + 2, y + 4, L);
        else block_qk_asym(x, 31, -0.5f, 0.1f, 15, y, y + 2, y + 4, L);
        uint8_t *qh = y + 16;
        uint8_t *qs = y + 48;
        memset(qh, 0, 32);
        for (int g = 0; g < 4; ++g) {
            for (int l = 0; l < 32; ++l) {
                const int a = L[64 * g + l], c = L[64 * g + 32 + l];
                qh[l] |= (uint8_t)(((a >> 4) << (2 * g)) | ((c >> 4) << (2 * g + 1)));
                qs[32 * g + l] = (uint8_t)((a & 0x0F) | ((c & 0x0F) << 4));
            }
        }
    }
}

/* Symmetric 16-value group, levels -nmax..nmax-1, weights x^2: scale from a grid of 19 trials. */
static float search_scale_sym(const float *x, int nmax, int8_t *L) {
    float amax = 0, maxv = 0;
    for (int i = 0; i < 16; ++i) {
        const float a = fabsf(x[i]);
        if (a > amax) { amax = a; maxv = x[i]; }
    }
    if (amax < EPS_GROUP_MAX) {
        memset(L, 0, 16);
        return 0.0f;
    }
    float inv = -(float)nmax / maxv;
    float sxl = 0, sl2 = 0;
    for (int i = 0; i < 16; ++i) {
        const int l = clampi(round_magic(inv * x[i]), -nmax, nmax - 1);
        L[i] = (int8_t)(l + nmax);
        const float w = x[i] * x[i];
        const float fl = (float)l;
        sxl += w * x[i] * fl;
        sl2 += w * fl * fl;
    }
    float scale = sl2 ? sxl / sl2 : 0.0f;
    float best = scale * sxl;
    for (int step = -9; step <= 9; ++step) {
        if (step == 0) continue;
        inv = -((float)nmax + 0.1f * (float)step) / maxv;
        sxl = 0;
        sl2 = 0;
        for (int i = 0; i < 16; ++i) {
            const int l = clampi(round_magic(inv * x[i]), -nmax, nmax - 1);
            const float w = x[i] * x[i];
            const float fl = (float)l;
            sxl += w * x[i] * fl;
            sl2 += w * fl * fl;
        }
        if (sl2 > 0 && sxl * sxl > best * sl2) {
            for (int i = 0; i < 16; ++i) {
                L[i] = (int8_t)(nmax + clampi(round_magic(inv * x[i]), -nmax, nmax - 1));
            }
            scale = sxl / sl2;
            best = scale * sxl;
        }
    }
    return scale;
}

static void quantize_q6_k(const float *x, uint8_t *y, int64_t nb) {
    int8_t L[QK_K];
    float sc[16];
    for (int64_t b = 0; b < nb; ++b, x += QK_K, y += 210) {
        for (int g = 0; g < 16; ++g) sc[g] = search_scale_sym(x + 16 * g, 32, L + 16 * g);
        q6_k_finish(x, sc, L, y);
    }
}

/* Q8_0: 32 values, d = max|x| / 127 as fp16, levels roundf(x / d) (half away from zero). */
static void quantize_q8_0(const float *x, uint8_t *y, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b, x += 32, y += 34) {
        float amax = 0;
        for (int i = 0; i < 32; ++i) {
            const float a = fabsf(x[i]);
            amax = amax > a ? amax : a;
        }
        const float d = amax / 127;
        const float id = d ? 1.0f / d : 0.0f;
        put_half(y, d);
        for (int i = 0; i < 32; ++i) y[2 + i] = (uint8_t)(int8_t)roundf(x[i] * id);
    }
}

/* ------------------------------------------------------------------ Python glue */

typedef void (*kernel_fn)(const float *, uint8_t *, int64_t);

static PyObject *run_kernel(PyObject *args, kernel_fn fn, Py_ssize_t block, Py_ssize_t type_size) {
    PyObject *src_obj, *dst_obj;
    if (!PyArg_ParseTuple(args, "OO", &src_obj, &dst_obj)) return NULL;
    Py_buffer src, dst;
    if (PyObject_GetBuffer(src_obj, &src, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (PyObject_GetBuffer(dst_obj, &dst, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    const Py_ssize_t block_bytes = block * (Py_ssize_t)sizeof(float);
    if (src.len % block_bytes != 0 || dst.len != src.len / block_bytes * type_size) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&dst);
        PyErr_SetString(PyExc_ValueError, "source is not whole blocks of float32, or destination size is wrong");
        return NULL;
    }
    const int64_t nb = (int64_t)(src.len / block_bytes);
    Py_BEGIN_ALLOW_THREADS
    fn((const float *)src.buf, (uint8_t *)dst.buf, nb);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;
}

static PyObject *py_q4_k(PyObject *self, PyObject *args) { return run_kernel(args, quantize_q4_k, QK_K, 144); }
static PyObject *py_q5_k(PyObject *self, PyObject *args) { return run_kernel(args, quantize_q5_k, QK_K, 176); }
static PyObject *py_q6_k(PyObject *self, PyObject *args) {
    return run_kernel(args, use_lanes ? quantize_q6_k_lanes : quantize_q6_k, QK_K, 210);
}
static PyObject *py_q8_0(PyObject *self, PyObject *args) { return run_kernel(args, quantize_q8_0, 32, 34); }

static void f32_to_f16(const float *x, uint8_t *y, int64_t n) {
    uint16_t *h = (uint16_t *)y;
    for (int64_t i = 0; i < n; ++i) h[i] = half_from_float(x[i]);
}

static PyObject *py_f16(PyObject *self, PyObject *args) { return run_kernel(args, f32_to_f16, 1, 2); }

static PyObject *py_set_lanes(PyObject *self, PyObject *arg) {
    use_lanes = PyObject_IsTrue(arg);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"_set_lanes", py_set_lanes, METH_O, "Test hook: lane-major (vector) kernels on or off."},
    {"q4_k", py_q4_k, METH_VARARGS, "q4_k(src_f32, dst_u8): Q4_K blocks of src into dst (GIL released)."},
    {"q5_k", py_q5_k, METH_VARARGS, "q5_k(src_f32, dst_u8): Q5_K blocks of src into dst (GIL released)."},
    {"q6_k", py_q6_k, METH_VARARGS, "q6_k(src_f32, dst_u8): Q6_K blocks of src into dst (GIL released)."},
    {"q8_0", py_q8_0, METH_VARARGS, "q8_0(src_f32, dst_u8): Q8_0 blocks of src into dst (GIL released)."},
    {"f16", py_f16, METH_VARARGS, "f16(src_f32, dst_u16): float32 -> float16, nearest even (GIL released)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kquants", "Compiled GGML quantizers.", -1, methods};

PyMODINIT_FUNC PyInit__kquants(void) { return PyModule_Create(&module); }
