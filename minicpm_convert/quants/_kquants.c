/* minicpm_convert.quants._kquants: the compiled GGML quantizers (csrc/ sources), byte-identical to
 * llama.cpp's ggml_quantize_chunk with and without an importance array.  Reached only through
 * minicpm_convert.quants.registry, which keeps the NumPy ports as their oracle.
 *
 *   quantize(type, src_f32, dst_u8, n_per_row, imatrix_f32_or_None) -> NaN/Inf count (0: written;
 *                                                                  else nothing is; GIL released)
 *   set_tables(type, grid, index, start, count, flat)               (IQ codebooks, once)
 *   f16(src_f32, dst_f16)                                            (GGML_FP32_TO_FP16)
 *   convert(src, src_kind, dst, dst_kind, cols, factor, divisor, half_head) -> rows with NaN/Inf
 *   balance(src_f32, rows, cols, iters, out_f64)                    (int4_rescale's column scales;
 *                                                                  GIL released)
 *   simd(level=None) -> the instruction set in use (0 portable C, 1 AVX2 + F16C, 2 also
 *                       AVX-512F); another level (at most the CPU's) may be set, for tests
 *   TYPES: the ggml type numbers implemented
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdlib.h>

#include "csrc/common.h"

typedef struct {
    int type;          /* enum ggml_type */
    int block, bytes;  /* weights per block, bytes per block */
    int table;         /* mc_iq_tables slot, or -1 */
    mc_kernel fn;
} kernel_entry;

static const kernel_entry KERNELS[] = {
    {2, 32, 18, -1, mc_q4_0},     {3, 32, 20, -1, mc_q4_1},     {6, 32, 22, -1, mc_q5_0},
    {7, 32, 24, -1, mc_q5_1},     {8, 32, 34, -1, mc_q8_0},     {10, 256, 84, -1, mc_q2_k},
    {11, 256, 110, -1, mc_q3_k},  {12, 256, 144, -1, mc_q4_k},  {13, 256, 176, -1, mc_q5_k},
    {14, 256, 210, -1, mc_q6_k},  {16, 256, 66, 0, mc_iq2_xxs}, {17, 256, 74, 1, mc_iq2_xs},
    {18, 256, 98, 3, mc_iq3_xxs}, {20, 32, 18, -1, mc_iq4_nl},  {21, 256, 110, 4, mc_iq3_s},
    {22, 256, 82, 2, mc_iq2_s},   {23, 256, 136, -1, mc_iq4_xs}, {34, 256, 54, -1, mc_tq1_0},
    {35, 256, 66, -1, mc_tq2_0},
};
#define N_KERNELS ((int)(sizeof KERNELS / sizeof KERNELS[0]))

static const kernel_entry *find_kernel(int type) {
    for (int i = 0; i < N_KERNELS; ++i)
        if (KERNELS[i].type == type) return &KERNELS[i];
    return NULL;
}

static PyObject *py_quantize(PyObject *self, PyObject *args) {
    int type;
    Py_ssize_t n_per_row;
    PyObject *src_obj, *dst_obj, *qw_obj;
    if (!PyArg_ParseTuple(args, "iOOnO", &type, &src_obj, &dst_obj, &n_per_row, &qw_obj)) return NULL;
    const kernel_entry *k = find_kernel(type);
    if (!k) return PyErr_Format(PyExc_ValueError, "no compiled kernel for ggml type %d", type);
    if (k->table >= 0 && !mc_iq_tables[k->table].grid)
        return PyErr_Format(PyExc_RuntimeError, "ggml type %d: codebook tables not set", type);
    if (n_per_row <= 0 || n_per_row % k->block) return PyErr_Format(PyExc_ValueError, "bad row length %zd", n_per_row);
    Py_buffer src, dst, qw = {0};
    if (PyObject_GetBuffer(src_obj, &src, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (PyObject_GetBuffer(dst_obj, &dst, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    const int has_qw = qw_obj != Py_None;
    if (has_qw && PyObject_GetBuffer(qw_obj, &qw, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&dst);
        return NULL;
    }
    const Py_ssize_t row_values = n_per_row, row_out = n_per_row / k->block * k->bytes;
    const Py_ssize_t nrows = src.len / (Py_ssize_t)sizeof(float) / row_values;
    const char *bad = NULL;
    if (src.len != nrows * row_values * (Py_ssize_t)sizeof(float)) bad = "source is not whole rows of float32";
    else if (dst.len != nrows * row_out) bad = "destination size is wrong";
    else if (has_qw && qw.len != row_values * (Py_ssize_t)sizeof(float)) bad = "importance array is not one float32 per column";
    int rc = 0;
    int64_t nonfinite = 0;
    if (!bad) {
        Py_BEGIN_ALLOW_THREADS
        nonfinite = mc_count_nonfinite((const float *)src.buf, (int64_t)nrows * (int64_t)n_per_row);
        if (!nonfinite)
            rc = k->fn((const float *)src.buf, (uint8_t *)dst.buf, (int64_t)nrows, (int64_t)n_per_row,
                       has_qw ? (const float *)qw.buf : NULL);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    if (has_qw) PyBuffer_Release(&qw);
    if (bad) return PyErr_Format(PyExc_ValueError, "%s", bad);
    if (rc == -2) return PyErr_NoMemory();
    if (rc < 0)
        return PyErr_Format(PyExc_ValueError, "ggml type %d: no codebook point within float range "
                            "(llama.cpp aborts on this input)", type);
    return PyLong_FromLongLong(nonfinite);
}

static void *copy_buffer(PyObject *obj, Py_ssize_t itemsize, Py_ssize_t *n) {
    Py_buffer b;
    if (PyObject_GetBuffer(obj, &b, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    void *p = malloc(b.len ? (size_t)b.len : 1);
    if (p) memcpy(p, b.buf, (size_t)b.len);
    else PyErr_NoMemory();
    *n = b.len / itemsize;
    PyBuffer_Release(&b);
    return p;
}

static PyObject *py_set_tables(PyObject *self, PyObject *args) {
    int type;
    PyObject *grid, *index, *start, *count, *flat;
    if (!PyArg_ParseTuple(args, "iOOOOO", &type, &grid, &index, &start, &count, &flat)) return NULL;
    const kernel_entry *k = find_kernel(type);
    if (!k || k->table < 0) return PyErr_Format(PyExc_ValueError, "ggml type %d has no codebook", type);
    mc_tables t = {0};
    Py_ssize_t n_grid, n_index, n_start, n_count, n_flat;
    t.grid = copy_buffer(grid, 1, &n_grid);
    t.index = copy_buffer(index, 4, &n_index);
    t.start = copy_buffer(start, 4, &n_start);
    t.count = copy_buffer(count, 4, &n_count);
    t.flat = copy_buffer(flat, 2, &n_flat);
    t.group = k->table <= 2 ? 8 : 4;
    t.kmap_size = n_index;
    int ok = t.grid && t.index && t.start && t.count && t.flat && n_start == n_index && n_count == n_index;
    if (ok) {
        t.gridf = malloc((size_t)n_grid * sizeof(float));
        t.flatf = malloc((size_t)(n_flat + 2) * (size_t)t.group * sizeof(float));
        if (t.gridf && t.flatf) {
            for (Py_ssize_t i = 0; i < n_grid; ++i) t.gridf[i] = t.grid[i];
        } else {
            PyErr_NoMemory();
        }
        ok = t.gridf && t.flatf;
    }
    for (Py_ssize_t i = 0; ok && i < n_index; ++i) /* every lookup stays inside the tables */
        ok = t.index[i] < n_grid / t.group && t.count[i] >= 0 && t.start[i] >= 0 && t.start[i] + t.count[i] <= n_flat;
    for (Py_ssize_t i = 0; ok && i < n_flat; ++i) ok = t.flat[i] < n_grid / t.group;
    for (Py_ssize_t i = 0; ok && i < n_flat; ++i)
        for (int c = 0; c < t.group; ++c) t.flatf[t.group * i + c] = t.gridf[t.group * t.flat[i] + c];
    if (ok) memset(t.flatf + t.group * n_flat, 0, 2 * (size_t)t.group * sizeof(float)); /* read past a list end, unused */
    if (!ok) {
        free(t.grid), free(t.gridf), free(t.flatf), free(t.index), free(t.start), free(t.count), free(t.flat);
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "inconsistent codebook tables");
        return NULL;
    }
    mc_tables *slot = &mc_iq_tables[k->table];
    if (slot->grid) { /* already set: the tables are deterministic, and a running kernel may read them */
        free(t.grid), free(t.gridf), free(t.flatf), free(t.index), free(t.start), free(t.count), free(t.flat);
    } else {
        *slot = t;
    }
    Py_RETURN_NONE;
}

static PyObject *py_f16(PyObject *self, PyObject *args) {
    PyObject *src_obj, *dst_obj;
    if (!PyArg_ParseTuple(args, "OO", &src_obj, &dst_obj)) return NULL;
    Py_buffer src, dst;
    if (PyObject_GetBuffer(src_obj, &src, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (PyObject_GetBuffer(dst_obj, &dst, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    const int ok = src.len % 4 == 0 && dst.len == src.len / 2;
    if (ok) {
        const float *x = (const float *)src.buf;
        uint16_t *h = (uint16_t *)dst.buf;
        const Py_ssize_t n = src.len / 4;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; ++i) h[i] = half_from_float(x[i]);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    if (!ok) return PyErr_Format(PyExc_ValueError, "f16: destination must hold one float16 per float32");
    Py_RETURN_NONE;
}

/* kinds: 0 float32, 1 float16, 2 bfloat16 (MC_F32, MC_F16, MC_BF16) */
static PyObject *py_convert(PyObject *self, PyObject *args) {
    PyObject *src_obj, *dst_obj, *factor_obj, *divisor_obj;
    int sk, dk;
    Py_ssize_t cols, half_head;
    if (!PyArg_ParseTuple(args, "OiOinOOn", &src_obj, &sk, &dst_obj, &dk, &cols, &factor_obj, &divisor_obj,
                          &half_head))
        return NULL;
    float factor = 0, divisor = 0;
    if (factor_obj != Py_None && (factor = (float)PyFloat_AsDouble(factor_obj)) == -1.0f && PyErr_Occurred()) return NULL;
    if (divisor_obj != Py_None && (divisor = (float)PyFloat_AsDouble(divisor_obj)) == -1.0f && PyErr_Occurred())
        return NULL;
    if (sk < 0 || sk > 2 || dk < 0 || dk > 2 || cols <= 0 || half_head < 0)
        return PyErr_Format(PyExc_ValueError, "convert: bad kinds, row length or head size");
    Py_buffer src, dst;
    if (PyObject_GetBuffer(src_obj, &src, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (PyObject_GetBuffer(dst_obj, &dst, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    static const Py_ssize_t size[] = {4, 2, 2};
    const Py_ssize_t rows = src.len / (cols * size[sk]);
    const int ok = src.len == rows * cols * size[sk] && dst.len == rows * cols * size[dk] &&
                   (half_head == 0 || rows % (2 * half_head) == 0);
    int64_t bad = 0;
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        bad = mc_convert(src.buf, sk, dst.buf, dk, rows, cols, factor_obj != Py_None ? &factor : NULL,
                         divisor_obj != Py_None ? &divisor : NULL, half_head);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    if (!ok) return PyErr_Format(PyExc_ValueError, "convert: sizes do not match whole rows (and heads)");
    return PyLong_FromLongLong(bad);
}

/* int4_search(x_f32 [G*n], n, cw_f32_or_None [n], sym, search, codes_u8 [G*n], scales_f32 [G],
 * zeros_u8 [G], errors_f32 [G*3]) -> 1 if a plain scale overflows float16, else 0 (GIL released) */
static PyObject *py_int4_search(PyObject *self, PyObject *args) {
    PyObject *x_obj, *cw_obj, *codes_obj, *scales_obj, *zeros_obj, *errors_obj;
    int n, sym, search;
    if (!PyArg_ParseTuple(args, "OiOiiOOOO", &x_obj, &n, &cw_obj, &sym, &search, &codes_obj, &scales_obj,
                          &zeros_obj, &errors_obj))
        return NULL;
    if (n <= 0 || n > MC_INT4_MAX_GROUP) return PyErr_Format(PyExc_ValueError, "int4_search: group size %d", n);
    PyObject *objs[6] = {x_obj, cw_obj, codes_obj, scales_obj, zeros_obj, errors_obj};
    Py_buffer b[6];
    int got = 0;
    for (; got < 6; ++got) {
        if (got == 1 && cw_obj == Py_None) {
            b[1].buf = NULL, b[1].len = 0, b[1].obj = NULL;
            continue;
        }
        if (PyObject_GetBuffer(objs[got], &b[got], PyBUF_C_CONTIGUOUS | (got >= 2 ? PyBUF_WRITABLE : 0)) < 0) break;
    }
    int result = -1;
    if (got == 6) {
        const Py_ssize_t groups = b[0].len / (4 * (Py_ssize_t)n);
        const int ok = b[0].len == groups * n * 4 && (cw_obj == Py_None || b[1].len == 4 * (Py_ssize_t)n) &&
                       b[2].len == groups * n && b[3].len == groups * 4 && b[4].len == groups &&
                       b[5].len == groups * 12;
        if (ok) {
            Py_BEGIN_ALLOW_THREADS
            result = mc_int4((const float *)b[0].buf, (const float *)b[1].buf, groups, n, sym, search,
                             (uint8_t *)b[2].buf, (float *)b[3].buf, (uint8_t *)b[4].buf, (float *)b[5].buf);
            Py_END_ALLOW_THREADS
        }
    }
    for (int i = 0; i < got; ++i)
        if (i != 1 || cw_obj != Py_None) PyBuffer_Release(&b[i]);
    if (got < 6) return NULL;
    if (result < 0) return PyErr_Format(PyExc_ValueError, "int4_search: buffer sizes do not match %d-value groups", n);
    return PyLong_FromLong(result);
}

/* balance(src_f32, rows, cols, iters, out_f64): int4_rescale's column scales (csrc/balance.c). */
#include "csrc/balance.h"

static PyObject *py_balance(PyObject *self, PyObject *args) {
    PyObject *src_obj, *dst_obj;
    Py_ssize_t rows, cols;
    int iters;
    if (!PyArg_ParseTuple(args, "OnniO", &src_obj, &rows, &cols, &iters, &dst_obj)) return NULL;
    if (rows <= 0 || cols <= 0 || iters < 0) return PyErr_Format(PyExc_ValueError, "balance: bad shape or iterations");
    Py_buffer src, dst;
    if (PyObject_GetBuffer(src_obj, &src, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (PyObject_GetBuffer(dst_obj, &dst, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    const Py_ssize_t n = src.len / (Py_ssize_t)sizeof(float);
    const int ok = n / rows == cols && n % rows == 0 && src.len % sizeof(float) == 0 &&
                   dst.len == cols * (Py_ssize_t)sizeof(double);
    int rc = 0;
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        rc = mc_balance((const float *)src.buf, (int64_t)rows, (int64_t)cols, iters, (double *)dst.buf);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    if (!ok) return PyErr_Format(PyExc_ValueError, "balance: the source must be rows x cols float32, the out cols float64");
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_simd(PyObject *self, PyObject *args) {
    int level = -1;
    if (!PyArg_ParseTuple(args, "|i", &level)) return NULL;
    const int best = mc_simd_supported();
    if (level >= 0) mc_simd_level = level < best ? level : best;
    return PyLong_FromLong(mc_simd());
}

static PyMethodDef methods[] = {
    {"quantize", py_quantize, METH_VARARGS,
     "quantize(type, src_f32, dst_u8, n_per_row, imatrix_or_None): ggml_quantize_chunk's bytes unless the "
     "source holds NaN/Inf; returns their count (GIL released)."},
    {"set_tables", py_set_tables, METH_VARARGS, "set_tables(type, grid, index, start, count, flat): IQ codebook."},
    {"f16", py_f16, METH_VARARGS, "f16(src_f32, dst_f16): float32 -> float16, nearest even (GIL released)."},
    {"convert", py_convert, METH_VARARGS,
     "convert(src, src_kind, dst, dst_kind, cols, factor, divisor, half_head): rows cast (folded, permuted) "
     "in one pass; returns the number of rows holding NaN/Inf (GIL released)."},
    {"int4_search", py_int4_search, METH_VARARGS,
     "int4_search(x, n, cw, sym, search, codes, scales, zeros, errors): the INT4 group search of "
     "int4_search.py (GIL released); 1 if a scale overflows float16."},
    {"simd", py_simd, METH_VARARGS, "simd(level=None): the instruction set in use; another level (at most the CPU's) may be set."},
    /* int4_rescale.balance (csrc/balance.c) */
    {"balance", py_balance, METH_VARARGS,
     "balance(src_f32, rows, cols, iters, out_f64): Sinkhorn column scales of int4_rescale, RMS 1 (GIL released)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kquants", "Compiled GGML quantizers.", -1, methods};

PyMODINIT_FUNC PyInit__kquants(void) {
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    PyObject *types = PyTuple_New(N_KERNELS);
    if (!types) return NULL;
    for (int i = 0; i < N_KERNELS; ++i) PyTuple_SET_ITEM(types, i, PyLong_FromLong(KERNELS[i].type));
    if (PyModule_AddObject(m, "TYPES", types) < 0) return NULL;
    return m;
}
