/* One pass over an image's RGB pixels for prepare's statistics (alexcli.data.stats.ImageSums):
 * adds every value into a uint16 image sum and the six distinct entries of the 3x3 Gram matrix
 * sum_p x_p x_p^T into int64, exactly. numpy forms the same sums with a pass over memory per
 * product; this reads each pixel once (see docs/performance.md, prepare).
 *
 * add(pixels, image_sum, gram): pixels is a C-contiguous buffer of n RGB uint8 triples (HWC);
 * image_sum a writable uint16 buffer of 3n values; gram a writable int64 buffer of 6 values
 * (rr, gg, bb, rg, gb, rb), added to. The caller keeps image_sum from overflowing (257 images of
 * 255 fit a uint16). The GIL is released during the loop. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* uint32 partial sums stay exact for BLOCK pixels: 65536 * 255^2 < 2^32. */
#define BLOCK 65536

/* Compiled twice on x86-64 with GCC or clang, for AVX2 and for the baseline, and chosen when the
 * module loads (one build runs on any x86-64 CPU; the AVX2 loop is about 3x the baseline's). */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

CLONES static void accumulate(const uint8_t *restrict x, uint16_t *restrict s, Py_ssize_t n, int64_t *gram)
{
    for (Py_ssize_t start = 0; start < n; start += BLOCK) {
        Py_ssize_t end = start + BLOCK < n ? start + BLOCK : n;
        uint32_t rr = 0, gg = 0, bb = 0, rg = 0, gb = 0, rb = 0;
        for (Py_ssize_t p = start; p < end; p++) {
            uint32_t r = x[3 * p], g = x[3 * p + 1], b = x[3 * p + 2];
            s[3 * p] += (uint16_t)r;
            s[3 * p + 1] += (uint16_t)g;
            s[3 * p + 2] += (uint16_t)b;
            rr += r * r; gg += g * g; bb += b * b;
            rg += r * g; gb += g * b; rb += r * b;
        }
        gram[0] += rr; gram[1] += gg; gram[2] += bb;
        gram[3] += rg; gram[4] += gb; gram[5] += rb;
    }
}

static PyObject *pixsums_add(PyObject *self, PyObject *args)
{
    Py_buffer px, sum, gram;
    if (!PyArg_ParseTuple(args, "y*w*w*", &px, &sum, &gram))
        return NULL;
    PyObject *result = NULL;
    if (px.len % 3 != 0) {
        PyErr_SetString(PyExc_ValueError, "pixels: the length is not a multiple of 3 (RGB)");
    } else if (sum.len != px.len * 2 || sum.itemsize != 2) {
        PyErr_SetString(PyExc_ValueError, "image_sum: expected one uint16 per pixel value");
    } else if (gram.len != 6 * 8 || gram.itemsize != 8) {
        PyErr_SetString(PyExc_ValueError, "gram: expected 6 int64 values");
    } else if (!PyBuffer_IsContiguous(&px, 'C') || !PyBuffer_IsContiguous(&sum, 'C') ||
               !PyBuffer_IsContiguous(&gram, 'C')) {
        PyErr_SetString(PyExc_ValueError, "buffers must be C-contiguous");
    } else {
        Py_BEGIN_ALLOW_THREADS
        accumulate((const uint8_t *)px.buf, (uint16_t *)sum.buf, px.len / 3, (int64_t *)gram.buf);
        Py_END_ALLOW_THREADS
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&px);
    PyBuffer_Release(&sum);
    PyBuffer_Release(&gram);
    return result;
}

static PyMethodDef methods[] = {
    {"add", pixsums_add, METH_VARARGS,
     "add(pixels, image_sum, gram): add an RGB uint8 image into a uint16 image sum and an int64 "
     "Gram matrix (rr, gg, bb, rg, gb, rb), exactly."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_pixsums", NULL, -1, methods};

PyMODINIT_FUNC PyInit__pixsums(void) { return PyModule_Create(&module); }
