/* The INT4 group search (int4_lanes.h) with 16 lanes, for CPUs with AVX-512F: chosen at run time
 * (mc_simd() == 2), never needed at build time (the target is this file's alone). */
#include "common.h"

#ifdef MC_HAVE_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f")
#pragma GCC optimize("O3")
#define NL 16
#define LANES_ATTR
#include "lanes.h"
#define LANES_FN(name) name##_16
#include "int4_lanes.h"
#pragma GCC pop_options
#else
typedef int mc_no_avx512_int4; /* ISO C wants a declaration in every file */
#endif
