/* llama.cpp's scale searches (ggml-quants.c), used by the k-quant and 32-weight kernels.
 *
 * make_qx_quants and make_qkx2/3_quants run on 8 (16 with AVX-512) groups side by side ("lanes",
 * search_lanes.h): lane k holds group k, keeps its own sequential sums in source order and its
 * own decisions, so each lane's result is the scalar function's; the compiler turns every
 * NL-wide loop into one vector operation.  Only the winning inverse scale (and minimum) of a search is kept; the levels are
 * recomputed from it at the end.  make_qp_quants and make_q3_quants (short, data-dependent
 * coordinate descents on at most 16 values) stay scalar. */
#include "common.h"

#include "lanes.h"

#define LANES_FN(name) name##_8
#include "search_lanes.h"

/* The 16-lane AVX-512 searches (searches_avx512.c) where the CPU has them. */
void mc_qx_16(const float *x, const float *qw, int64_t ngroups, int n, int nmax, float *scale, int8_t *L);
void mc_qkx_16(const float *x, const float *w, int64_t ngroups, int n, int nmax, float rmin, float rdelta, int nstep,
               int use_mad, float *scale, float *the_min, uint8_t *L);

void mc_qx(const float *x, const float *qw, int64_t ngroups, int n, int nmax, float *scale, int8_t *L) {
#ifdef MC_HAVE_AVX512
    if (mc_simd() >= 2) {
        mc_qx_16(x, qw, ngroups, n, nmax, scale, L);
        return;
    }
#endif
    mc_qx_8(x, qw, ngroups, n, nmax, scale, L);
}

void mc_qkx(const float *x, const float *w, int64_t ngroups, int n, int nmax, float rmin, float rdelta, int nstep,
            int use_mad, float *scale, float *the_min, uint8_t *L) {
#ifdef MC_HAVE_AVX512
    if (mc_simd() >= 2) {
        mc_qkx_16(x, w, ngroups, n, nmax, rmin, rdelta, nstep, use_mad, scale, the_min, L);
        return;
    }
#endif
    mc_qkx_8(x, w, ngroups, n, nmax, rmin, rdelta, nstep, use_mad, scale, the_min, L);
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
