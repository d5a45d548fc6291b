/* Independent groups side by side ("lanes") in GCC vector extensions: lane k of every vector
 * belongs to group k, so each group keeps its own sequential sums and decisions (the scalar
 * reference's), and the compiler emits one vector instruction per NL-wide operation.
 *
 * NL is 8 (AVX2 or SSE2, chosen by target_clones) unless the including file sets 16 (AVX-512,
 * searches_avx512.c); vf/vi are the vectors of NL floats/ints, v8f/v8i their 8-lane names. */
#ifndef MC_LANES_H
#define MC_LANES_H

#include <stdint.h>

#ifndef NL
#define NL 8
#endif

#ifndef LANES_ATTR
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define LANES_ATTR __attribute__((target_clones("avx2", "default"), optimize("O3")))
#else
#define LANES_ATTR
#endif
#endif

typedef float vf __attribute__((vector_size(4 * NL)));
typedef int32_t vi __attribute__((vector_size(4 * NL)));
#if NL == 8
typedef vf v8f;
typedef vi v8i;
#endif

static inline vf vsel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
static inline vf vsplat(float f) { return (vf){} + f; }
static inline vi vsplati(int v) { return (vi){} + v; }
static inline vf vabs(vf a) { return (vf)((vi)a & vsplati(0x7FFFFFFF)); }

/* MAX(lo, MIN(hi, nearest_int(v))) per lane */
static inline vi vround_clamp(vf v, vi vlo, vi vhi) {
    vi i = (vi)(v + vsplat(12582912.0f));
    i = (i & vsplati(0x007FFFFF)) - vsplati(0x00400000);
    vi under = i < vlo;
    i = (i & ~under) | (vlo & under);
    vi over = i > vhi;
    return (i & ~over) | (vhi & over);
}

#endif
