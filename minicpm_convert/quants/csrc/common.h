/* Shared pieces of the compiled quantizers (minicpm-convert), byte-identical to llama.cpp's
 * ggml-quants.c as built for x86-64 without fused multiply-add.
 *
 * What keeps the bytes exact, in every file here:
 *   - every value is a float32 and every operation one IEEE float32 operation, in the order of
 *     the C reference (the build uses -ffp-contract=off and no -ffast-math: nothing is fused or
 *     reassociated, so each sum runs in source order);
 *   - nearest_int is the "add 1.5 * 2^23 and keep the low mantissa bits" trick, also outside
 *     its asserted domain (llama.cpp builds with NDEBUG);
 *   - fp32 -> fp16 rounds to nearest even (NaN -> 0x7E00 | sign), as GGML_FP32_TO_FP16.
 * The NumPy ports (the .py modules of minicpm_convert.quants) are the oracle of every kernel here.
 */
#ifndef MC_COMMON_H
#define MC_COMMON_H

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define QK_K 256
#define GROUP_MAX_EPS 1e-15f

#define MC_MAX(a, b) ((a) > (b) ? (a) : (b)) /* ggml's MAX/MIN, including their NaN/-0.0 behaviour */
#define MC_MIN(a, b) ((a) < (b) ? (a) : (b))

static inline int nearest_int(float v) {
    float t = v + 12582912.0f; /* 1.5 * 2^23 */
    int32_t bits;
    memcpy(&bits, &t, sizeof bits);
    return (bits & 0x007FFFFF) - 0x00400000;
}

static inline int clampi(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

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

/* Store f as fp16 at p (little endian) and return the float it reads back as. */
static inline float put_half(uint8_t *p, float f) {
    const uint16_t h = half_from_float(f);
    p[0] = (uint8_t)(h & 0xFF);
    p[1] = (uint8_t)(h >> 8);
    return half_to_float(h);
}

static inline void put_u16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)(v & 0xFF);
    p[1] = (uint8_t)(v >> 8);
}

static inline void put_u32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; ++i) p[i] = (uint8_t)(v >> (8 * i));
}

/* A row kernel: nrows rows of n_per_row floats -> their blocks, back to back; qw is llama.cpp's
 * quant_weights (one per column, shared by the rows) or NULL.  Returns 0, or -1 where llama.cpp
 * would abort (GGML_ASSERT: no codebook point found). */
typedef int (*mc_kernel)(const float *x, uint8_t *y, int64_t nrows, int64_t n_per_row, const float *qw);

/* ---- searches.c: llama.cpp's scale searches ---- */

/* make_qx_quants(n, nmax, x, L, rmse_type = 1, qw) for `ngroups` groups of n (16 or 32) values
 * at x + n*g; qw NULL means weights x*x.  Levels l + nmax go to L, scales to scale. */
void mc_qx(const float *x, const float *qw, int64_t ngroups, int n, int nmax, float *scale, int8_t *L);

/* make_qkx2_quants / make_qkx3_quants (the same arithmetic once the weights are given) for
 * `ngroups` groups of n (16 or 32) values at x + n*g with weights w + n*g. */
void mc_qkx(const float *x, const float *w, int64_t ngroups, int n, int nmax, float rmin, float rdelta, int nstep,
            int use_mad, float *scale, float *the_min, uint8_t *L);

float mc_make_qp_quants(int n, int nmax, const float *x, uint8_t *L, const float *w);
float mc_make_q3_quants(int n, int nmax, const float *x, int8_t *L);

/* ---- the row kernels ---- */
int mc_q4_0(const float *, uint8_t *, int64_t, int64_t, const float *);
int mc_q4_1(const float *, uint8_t *, int64_t, int64_t, const float *);
int mc_q5_0(const float *, uint8_t *, int64_t, int64_t, const float *);
int mc_q5_1(const float *, uint8_t *, int64_t, int64_t, const float *);
int mc_q8_0(const float *, uint8_t *, int64_t, int64_t, const float *);
int mc_q2_k(const float *, uint8_t *, int64_t, int64_t, const float *);
int mc_q3_k(const float *, uint8_t *, int64_t, int64_t, const float *);
int mc_q4_k(const float *, uint8_t *, int64_t, int64_t, const float *);
int mc_q5_k(const float *, uint8_t *, int64_t, int64_t, const float *);
int mc_q6_k(const float *, uint8_t *, int64_t, int64_t, const float *);
int mc_tq1_0(const float *, uint8_t *, int64_t, int64_t, const float *);
int mc_tq2_0(const float *, uint8_t *, int64_t, int64_t, const float *);
int mc_iq4_nl(const float *, uint8_t *, int64_t, int64_t, const float *);
int mc_iq4_xs(const float *, uint8_t *, int64_t, int64_t, const float *);
int mc_iq3_xxs(const float *, uint8_t *, int64_t, int64_t, const float *);
int mc_iq3_s(const float *, uint8_t *, int64_t, int64_t, const float *);
int mc_iq2_xxs(const float *, uint8_t *, int64_t, int64_t, const float *);
int mc_iq2_xs(const float *, uint8_t *, int64_t, int64_t, const float *);
int mc_iq2_s(const float *, uint8_t *, int64_t, int64_t, const float *);

/* The codebook tables of an IQ type (built in Python, see iq_grids.py), copied in once. */
typedef struct {
    int8_t *grid;       /* [n_points][group]: 2*l + 1 */
    float *gridf;       /* the same as floats */
    float *flatf;       /* the candidates' coordinates as floats, list after list (streamed, not gathered) */
    int32_t *index;     /* [kmap_size]: point of a level pattern, or -1 */
    int32_t *start;     /* [kmap_size]: first candidate of an off-grid pattern in flat */
    int32_t *count;     /* [kmap_size]: number of candidates */
    uint16_t *flat;
    int64_t kmap_size;
    int group;
} mc_tables;

/* ---- convert.c: float tensors in one pass ---- */
enum { MC_F32 = 0, MC_F16 = 1, MC_BF16 = 2 };

/* The number of NaN and Inf among n floats (a block quantizer's input check). */
int64_t mc_count_nonfinite(const float *x, int64_t n);

/* rows x cols values of kind sk -> kind dk (times *factor, over *divisor when not NULL); with
 * half_head > 0 the rows go to ggml's rope layout (heads of 2 * half_head rows). Returns the
 * number of rows holding NaN or Inf (their output is unspecified). */
int64_t mc_convert(const void *x, int sk, void *y, int dk, int64_t rows, int64_t cols, const float *factor,
                   const float *divisor, int64_t half_head);

/* ---- int4.c: the INT4 group search (quants/int4_search.py is its oracle) ---- */
#define MC_INT4_MAX_GROUP 256
#define MC_FP16_TINY 5.9604644775390625e-08f /* 2^-24: the smallest positive float16 */

/* `ngroups` groups of n (<= MC_INT4_MAX_GROUP) values at x + n*g, column weights cw (n) or NULL
 * (|x| + rms): codes (n per group), float16-valued scales, zeros, and errors (3 per group: the
 * squared error of the codes, of plain rounding, the sum of squares). Returns 1 if a plain scale
 * overflows float16 (the outputs are then unspecified), else 0. */
int mc_int4(const float *x, const float *cw, int64_t ngroups, int n, int sym, int search, uint8_t *codes,
            float *scale, uint8_t *zero, float *errors);

/* The instruction set the kernels use: 0 portable C, 1 AVX2 + F16C (the float casts), 2 also
 * AVX-512F (16-lane searches); the best this CPU supports (mc_simd_supported), unless tests set
 * mc_simd_level lower to run the other code. (The lane searches' AVX2 / SSE2 choice below 2 is
 * target_clones', see lanes.h.) Every level gives the same bits. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MC_HAVE_AVX512 1 /* searches_avx512.c is compiled */
#endif
extern int mc_simd_level;
int mc_simd(void);
int mc_simd_supported(void);

/* slot: 0 IQ2_XXS, 1 IQ2_XS, 2 IQ2_S, 3 IQ3_XXS, 4 IQ3_S */
extern mc_tables mc_iq_tables[5];

#endif
