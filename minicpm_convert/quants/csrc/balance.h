/* csrc/balance.c: the column scales of int4_rescale.balance (minicpm-convert), whose oracle is
 * int4_rescale._balance_numpy (the same float64 operations in the same order, so the same bits). */
#ifndef MC_BALANCE_H
#define MC_BALANCE_H

#include <stdint.h>

/* c[cols] (float64, RMS 1) of a rows x cols float32 matrix w (C order) after `iters` Sinkhorn
 * iterations on the spread. Returns 0, or -2 when memory runs out (c is then unspecified). */
int mc_balance(const float *w, int64_t rows, int64_t cols, int iters, double *c);

#endif
