/* The INT4 group search of minicpm_convert/quants/int4_search.py (its oracle), compiled for the
 * instruction set mc_simd() names: SSE2 (level 0) and AVX2 (level 1) here with 8 lanes, AVX-512F
 * (level 2) in int4_avx512.c with 16; every level gives the oracle's bits. */
#include "common.h"

#define NL 8
#define LANES_ATTR
#include "lanes.h"

#define LANES_FN(name) name##_sse2
#include "int4_lanes.h"
#undef LANES_FN

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MC_INT4_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2")
#pragma GCC optimize("O3")
#define LANES_FN(name) name##_avx2
#include "int4_lanes.h"
#undef LANES_FN
#pragma GCC pop_options
#endif

int mc_int4_16(const float *x, const float *cw, int64_t ngroups, int n, int sym, int search, uint8_t *codes,
               float *scale, uint8_t *zero, float *errors);

int mc_int4(const float *x, const float *cw, int64_t ngroups, int n, int sym, int search, uint8_t *codes,
            float *scale, uint8_t *zero, float *errors) {
    const int level = mc_simd();
#ifdef MC_HAVE_AVX512
    if (level >= 2) return mc_int4_16(x, cw, ngroups, n, sym, search, codes, scale, zero, errors);
#endif
#ifdef MC_INT4_AVX2
    if (level >= 1) return mc_int4_avx2(x, cw, ngroups, n, sym, search, codes, scale, zero, errors);
#endif
    (void)level;
    return mc_int4_sse2(x, cw, ngroups, n, sym, search, codes, scale, zero, errors);
}
