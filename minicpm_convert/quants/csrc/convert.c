/* Float tensors in one pass (to-llama, GGUF f32/f16/bf16): each stored value (bf16, f16 or
 * f32) is widened exactly to float32, checked for NaN/Inf, optionally multiplied by `factor`
 * and divided by `divisor` (one float32 operation each, as torch computes `t * f` and `t / d`
 * for a float32 tensor and a Python float), and rounded to nearest even into bf16, f16 or f32,
 * as torch's `.to(dtype)` rounds. Rows may be permuted to ggml's rope layout on the way.
 *
 * The scalar code is the reference; on x86-64 CPUs with AVX2 and F16C (chosen at run time) the
 * casts without an operation run 8 values per instruction. Both give the same bits for every
 * finite input (vcvtps2ph rounds to nearest even like half_from_float; NaN never reaches a
 * store: a chunk holding one is refused). */
#include "common.h"

#include <stdlib.h>

#include "lanes.h"

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>
#define MC_X86 1
#endif

static int simd_best = -1;
int mc_simd_level = -1; /* -1 not chosen yet, else 0, 1, 2: see common.h */

int mc_simd_supported(void) {
    if (simd_best < 0) {
#ifdef MC_X86
        __builtin_cpu_init();
        simd_best = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") ? 1 : 0;
#ifdef MC_HAVE_AVX512
        if (simd_best == 1 && __builtin_cpu_supports("avx512f")) simd_best = 2;
#endif
#else
        simd_best = 0;
#endif
    }
    return simd_best;
}

int mc_simd(void) {
    if (mc_simd_level < 0) mc_simd_level = mc_simd_supported();
    return mc_simd_level;
}

static inline float bf16_to_float(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* torch's c10::BFloat16 from float: round to nearest even (inputs here are never NaN). */
static inline uint16_t bf16_from_float(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline int is_finite_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (u & 0x7F800000u) != 0x7F800000u;
}

static inline float load(const void *p, int kind, int64_t i) {
    if (kind == MC_BF16) return bf16_to_float(((const uint16_t *)p)[i]);
    if (kind == MC_F16) return half_to_float(((const uint16_t *)p)[i]);
    return ((const float *)p)[i];
}

static inline void store(void *p, int kind, int64_t i, float v) {
    if (kind == MC_BF16) ((uint16_t *)p)[i] = bf16_from_float(v);
    else if (kind == MC_F16) ((uint16_t *)p)[i] = half_from_float(v);
    else ((float *)p)[i] = v;
}

/* One row, scalar: returns 1 if the row holds a NaN or Inf. */
static int row_scalar(const void *x, int sk, void *y, int dk, int64_t n, const float *factor, const float *divisor) {
    uint32_t bad = 0;
    for (int64_t i = 0; i < n; ++i) {
        float v = load(x, sk, i);
        bad |= !is_finite_bits(v);
        if (factor) v = v * *factor;
        if (divisor) v = v / *divisor;
        store(y, dk, i, v);
    }
    return bad != 0;
}

/* Same kind, no operation: a copy and the check (the check reads 16 bits per bf16/f16 value). */
static int row_copy(const void *x, int sk, void *y, int64_t n) {
    if (sk == MC_F32) {
        const uint32_t *u = x;
        uint32_t bad = 0;
        for (int64_t i = 0; i < n; ++i) bad |= (u[i] & 0x7F800000u) == 0x7F800000u;
        memcpy(y, x, (size_t)n * 4);
        return bad != 0;
    }
    const uint16_t *h = x, exp = sk == MC_BF16 ? 0x7F80u : 0x7C00u;
    uint16_t bad = 0;
    for (int64_t i = 0; i < n; ++i) bad |= (uint16_t)((h[i] & exp) == exp);
    memcpy(y, x, (size_t)n * 2);
    return bad != 0;
}

#ifdef MC_X86
/* A copy that checks each value on the way (16 or 32 bits: `exp` the exponent mask). */
__attribute__((target("avx2"))) static int row_copy_avx2(const void *x, int sk, void *y, int64_t n) {
    const int64_t bytes = n * (sk == MC_F32 ? 4 : 2);
    const __m256i exp = sk == MC_F32 ? _mm256_set1_epi32(0x7F800000)
                                     : _mm256_set1_epi16((short)(sk == MC_BF16 ? 0x7F80 : 0x7C00));
    __m256i bad = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 32 <= bytes; i += 32) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)((const char *)x + i));
        const __m256i e = _mm256_and_si256(v, exp);
        bad = _mm256_or_si256(bad, sk == MC_F32 ? _mm256_cmpeq_epi32(e, exp) : _mm256_cmpeq_epi16(e, exp));
        _mm256_storeu_si256((__m256i *)((char *)y + i), v);
    }
    const int64_t done = i / (sk == MC_F32 ? 4 : 2);
    return (!_mm256_testz_si256(bad, bad)) |
           row_copy((const char *)x + i, sk, (char *)y + i, n - done);
}

/* 8 values at x + i as float32 bits: bf16 widened (exactly), float32 as stored. */
__attribute__((target("avx2"))) static inline __m256i load8(const void *x, int sk, int64_t i) {
    if (sk == MC_BF16)
        return _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + i))), 16);
    return _mm256_loadu_si256((const __m256i *)((const float *)x + i));
}

/* bf16 or f32 -> f16 (vcvtps2ph, nearest even). */
__attribute__((target("avx2,f16c"))) static int row_f16_avx2(const void *x, int sk, uint16_t *y, int64_t n) {
    const __m256i exp = _mm256_set1_epi32(0x7F800000);
    __m256i bad = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i w = load8(x, sk, i);
        bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(w, exp), exp));
        _mm_storeu_si128((__m128i *)(y + i),
                         _mm256_cvtps_ph(_mm256_castsi256_ps(w), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    return (!_mm256_testz_si256(bad, bad)) |
           row_scalar((const char *)x + i * (sk == MC_F32 ? 4 : 2), sk, y + i, MC_F16, n - i, NULL, NULL);
}

/* bf16 -> float32, times/over a constant, -> bf16 or f32: the fold of muP scalars. */
__attribute__((target("avx2"))) static int row_bf16_fold_avx2(const uint16_t *x, void *y, int dk, int64_t n,
                                                              const float *factor, const float *divisor) {
    const __m256i exp = _mm256_set1_epi32(0x7F800000), one = _mm256_set1_epi32(1),
                  half = _mm256_set1_epi32(0x7FFF);
    const __m256 f = _mm256_set1_ps(factor ? *factor : 1.0f), d = _mm256_set1_ps(divisor ? *divisor : 1.0f);
    __m256i bad = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i w = load8(x, MC_BF16, i);
        bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(w, exp), exp));
        __m256 v = _mm256_castsi256_ps(w);
        if (factor) v = _mm256_mul_ps(v, f);
        if (divisor) v = _mm256_div_ps(v, d);
        if (dk == MC_F32) {
            _mm256_storeu_ps((float *)y + i, v);
            continue;
        }
        __m256i u = _mm256_castps_si256(v); /* (u + 0x7FFF + ((u >> 16) & 1)) >> 16, packed to 16 bits */
        u = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, half), _mm256_and_si256(_mm256_srli_epi32(u, 16), one)), 16);
        const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
        _mm_storeu_si128((__m128i *)((uint16_t *)y + i), packed);
    }
    return (!_mm256_testz_si256(bad, bad)) | row_scalar(x + i, MC_BF16, (char *)y + i * (dk == MC_F32 ? 4 : 2), dk,
                                                      n - i, factor, divisor);
}
#endif

static int row(const void *x, int sk, void *y, int dk, int64_t n, const float *factor, const float *divisor) {
    const int op = factor || divisor;
#ifdef MC_X86
    if (mc_simd() >= 1) {
        if (!op && sk == dk) return row_copy_avx2(x, sk, y, n);
        if (!op && dk == MC_F16 && sk != MC_F16) return row_f16_avx2(x, sk, y, n);
        if (sk == MC_BF16 && dk != MC_F16) return row_bf16_fold_avx2(x, y, dk, n, factor, divisor);
    }
#endif
    if (!op && sk == dk) return row_copy(x, sk, y, n);
    return row_scalar(x, sk, y, dk, n, factor, divisor);
}

LANES_ATTR
int64_t mc_count_nonfinite(const float *x, int64_t n) {
    const uint32_t *u = (const uint32_t *)x;
    int64_t bad = 0;
    for (int64_t i = 0; i < n; ++i) bad += (u[i] & 0x7F800000u) == 0x7F800000u;
    return bad;
}

int64_t mc_convert(const void *x, int sk, void *y, int dk, int64_t rows, int64_t cols, const float *factor,
                   const float *divisor, int64_t half_head) {
    static const int size[] = {4, 2, 2};
    int64_t bad = 0;
    for (int64_t r = 0; r < rows; ++r) {
        int64_t s = r;
        if (half_head > 0) { /* out row 2i + j of a head <- in row j * half_head + i */
            const int64_t head = r / (2 * half_head), k = r % (2 * half_head);
            s = head * 2 * half_head + (k & 1) * half_head + k / 2;
        }
        bad += row((const char *)x + s * cols * size[sk], sk, (char *)y + r * cols * size[dk], dk, cols, factor, divisor);
    }
    return bad;
}
