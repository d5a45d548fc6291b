/* Sinkhorn balance of a matrix's spread (int4_rescale.balance): alternately every row and every
 * column of W is divided by its standard deviation, and the column part c is kept.
 *
 * With W_ij / (r_i c_j) the balanced matrix, the row update r_i <- r_i std_j(W_ij / (r_i c_j))
 * is r_i <- std_j(W_ij / c_j), and the column update c_j <- std_i(W_ij / r_i) (r the new rows):
 * so an iteration is one pass over W, row by row. A row's sums over j give r_i; while the row
 * is in cache, W_ij / r_i is added to every column's sums, whose standard deviations are the new
 * c. The standard deviation is the unbiased one from the sums of d and d^2, d = x - x_0 (the
 * line's first value: shifted, the sums do not cancel when a line's mean is far from zero, as
 * in a column whose spread collapses),
 *     sqrt(max(0, (S2 - S1*S1/n) / (n - 1))), clamped below at 1e-30 (NaN, as for n = 1, stays),
 * and x is W_ij times a reciprocal computed once (1/c_j, 1/r_i).
 *
 * What keeps the bits equal to the oracle (_balance_numpy, NumPy): every value is a float64 and
 * every operation one IEEE float64 operation in the same order; every sum runs in index order
 * (a row's over j, a column's over i: rows are taken 4 at a time, each with its own sums, and
 * the 4 are added to a column's sums in row order); the build neither fuses (-ffp-contract=off,
 * and the AVX2 clone has no FMA) nor reassociates (no fast math); sqrt is correctly rounded. */
#include "balance.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "lanes.h"

#define BR 4 /* rows per block: 2 x 4 independent sum chains hide the add latency */

/* max(0, var) -> std, clamped below at 1e-30 (torch's clamp_min: NaN stays NaN). */
static double spread(double s1, double s2, double n) {
    double v = (s2 - s1 * s1 / n) / (n - 1.0);
    if (v < 0.0) v = 0.0; /* rounding below zero (a constant line): std 0 */
    const double s = sqrt(v);
    return s < 1e-30 ? 1e-30 : s;
}

/* 1 / std_j(w_kj * ic_j) of the n (<= BR) rows at w, each summed over j in order. */
static void row_scales(const float *w, int64_t cols, int n, const double *ic, double *ir) {
    double s1[BR] = {0}, s2[BR] = {0};
    if (n == BR) {
        const float *w0 = w, *w1 = w + cols, *w2 = w + 2 * cols, *w3 = w + 3 * cols;
        const double k0 = (double)w0[0] * ic[0], k1 = (double)w1[0] * ic[0], k2 = (double)w2[0] * ic[0],
                     k3 = (double)w3[0] * ic[0];
        double a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
        for (int64_t j = 0; j < cols; ++j) {
            const double m = ic[j];
            const double x0 = (double)w0[j] * m - k0, x1 = (double)w1[j] * m - k1, x2 = (double)w2[j] * m - k2,
                         x3 = (double)w3[j] * m - k3;
            a0 += x0, a1 += x1, a2 += x2, a3 += x3;
            b0 += x0 * x0, b1 += x1 * x1, b2 += x2 * x2, b3 += x3 * x3;
        }
        s1[0] = a0, s1[1] = a1, s1[2] = a2, s1[3] = a3;
        s2[0] = b0, s2[1] = b1, s2[2] = b2, s2[3] = b3;
    } else {
        for (int k = 0; k < n; ++k) {
            const float *wk = w + k * cols;
            const double k0 = (double)wk[0] * ic[0];
            for (int64_t j = 0; j < cols; ++j) {
                const double x = (double)wk[j] * ic[j] - k0;
                s1[k] += x;
                s2[k] += x * x;
            }
        }
    }
    for (int k = 0; k < n; ++k) ir[k] = 1.0 / spread(s1[k], s2[k], (double)cols);
}

/* The n (<= BR) rows at w, times ir[k], less the columns' first values sh, added to the column
 * sums in row order (lanes: columns). */
LANES_ATTR
static void add_columns(const float *restrict w, int64_t cols, int n, const double *ir, const double *restrict sh,
                        double *restrict s1, double *restrict s2) {
    if (n == BR) {
        const float *restrict w0 = w, *restrict w1 = w + cols, *restrict w2 = w + 2 * cols,
                    *restrict w3 = w + 3 * cols;
        const double m0 = ir[0], m1 = ir[1], m2 = ir[2], m3 = ir[3];
        for (int64_t j = 0; j < cols; ++j) {
            const double y0 = (double)w0[j] * m0 - sh[j], y1 = (double)w1[j] * m1 - sh[j],
                         y2 = (double)w2[j] * m2 - sh[j], y3 = (double)w3[j] * m3 - sh[j];
            s1[j] = s1[j] + y0 + y1 + y2 + y3;
            s2[j] = s2[j] + y0 * y0 + y1 * y1 + y2 * y2 + y3 * y3;
        }
        return;
    }
    for (int k = 0; k < n; ++k) {
        const float *restrict wk = w + k * cols;
        const double m = ir[k];
        for (int64_t j = 0; j < cols; ++j) {
            const double y = (double)wk[j] * m - sh[j];
            s1[j] = s1[j] + y;
            s2[j] = s2[j] + y * y;
        }
    }
}

int mc_balance(const float *w, int64_t rows, int64_t cols, int iters, double *c) {
    double *ic = malloc((size_t)cols * sizeof *ic), *s1 = malloc((size_t)cols * sizeof *s1),
           *s2 = malloc((size_t)cols * sizeof *s2), *sh = malloc((size_t)cols * sizeof *sh);
    unsigned char *live = calloc((size_t)cols, 1);
    if (!ic || !s1 || !s2 || !sh || !live) {
        free(ic), free(s1), free(s2), free(sh), free(live);
        return -2;
    }
    for (int64_t j = 0; j < cols; ++j) c[j] = ic[j] = 1.0;
    double ir[BR];
    for (int it = 0; it < iters; ++it) {
        memset(s1, 0, (size_t)cols * sizeof *s1);
        memset(s2, 0, (size_t)cols * sizeof *s2);
        for (int64_t i = 0; i < rows; i += BR) {
            const int n = rows - i < BR ? (int)(rows - i) : BR;
            row_scales(w + i * cols, cols, n, ic, ir);
            if (i == 0)
                for (int64_t j = 0; j < cols; ++j) sh[j] = (double)w[j] * ir[0]; /* the columns' shifts */
            add_columns(w + i * cols, cols, n, ir, sh, s1, s2);
        }
        for (int64_t j = 0; j < cols; ++j) {
            c[j] = spread(s1[j], s2[j], (double)rows);
            ic[j] = 1.0 / c[j];
        }
    }
    /* dead columns keep scale 1: a non-finite c, or a column of zeros */
    for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j) live[j] |= w[i * cols + j] != 0.0f;
    double sq = 0.0;
    for (int64_t j = 0; j < cols; ++j) {
        if (!isfinite(c[j]) || !live[j]) c[j] = 1.0;
        sq += c[j] * c[j];
    }
    const double rms = sqrt(sq / (double)cols);
    for (int64_t j = 0; j < cols; ++j) c[j] = c[j] / rms;
    free(ic), free(s1), free(s2), free(sh), free(live);
    return 0;
}
