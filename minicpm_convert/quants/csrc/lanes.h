/* Eight independent groups side by side ("lanes") in GCC vector extensions: lane k of every
 * vector belongs to group k, so each group keeps its own sequential sums and decisions (the
 * scalar reference's), and the compiler emits one vector instruction per 8-wide operation. */
#ifndef MC_LANES_H
#define MC_LANES_H

#include <stdint.h>

#define NL 8

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
static inline v8f vabs(v8f a) { return (v8f)((v8i)a & vsplati(0x7FFFFFFF)); }

/* MAX(lo, MIN(hi, nearest_int(v))) per lane */
static inline v8i vround_clamp(v8f v, v8i vlo, v8i vhi) {
    v8i i = (v8i)(v + vsplat(12582912.0f));
    i = (i & vsplati(0x007FFFFF)) - vsplati(0x00400000);
    v8i under = i < vlo;
    i = (i & ~under) | (vlo & under);
    v8i over = i > vhi;
    return (i & ~over) | (vhi & over);
}

#endif
