/* One pass over an image's RGB pixels for prepare's statistics (alexcli.data.stats.ImageSums):
 * adds every value into a uint16 image sum and the six distinct entries of the 3x3 Gram matrix
 * sum_p x_p x_p^T into int64, exactly. numpy forms the same sums with a pass over memory per
 * product; this reads each pixel once (see docs/performance.md, prepare).
 *
 * add(pixels, image_sum, gram): pixels is a C-contiguous buffer of n RGB uint8 triples (HWC);
 * image_sum a writable uint16 buffer of 3n values; gram a writable int64 buffer of 6 values
 * (rr, gg, bb, rg, gb, rb), added to. The caller keeps image_sum from overflowing (257 images of
 * 255 fit a uint16). The GIL is released during the loop.
 *
 * add_arrow(schema, array, image_sum, gram): the same for a PIL image's pixels as the capsules of
 * its Arrow C data interface export (Image.__arrow_c_array__(): a fixed-size list of 4 uint8 per
 * pixel, RGBX, in PIL's own memory). Reading them there saves copying them into a packed array
 * first (np.asarray(image) calls tobytes), which cost more than the sums themselves. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* uint32 partial sums stay exact for BLOCK pixels: 65536 * 255^2 < 2^32. */
#define BLOCK 65536

/* Compiled twice on x86-64 with GCC or clang, for AVX2 and for the baseline, and chosen when the
 * module loads (one build runs on any x86-64 CPU; the AVX2 loop is about 3x the baseline's). */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

/* STRIDE bytes per pixel, R G B first: 3 (packed RGB) or 4 (PIL's RGBX). A constant in each
 * caller below, so that each loop is vectorised for its own layout. */
static inline void accumulate(const uint8_t *restrict x, uint16_t *restrict s, Py_ssize_t n, int64_t *gram,
                              const int stride)
{
    for (Py_ssize_t start = 0; start < n; start += BLOCK) {
        Py_ssize_t end = start + BLOCK < n ? start + BLOCK : n;
        uint32_t rr = 0, gg = 0, bb = 0, rg = 0, gb = 0, rb = 0;
        for (Py_ssize_t p = start; p < end; p++) {
            uint32_t r = x[stride * p], g = x[stride * p + 1], b = x[stride * p + 2];
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

CLONES static void accumulate_rgb(const uint8_t *restrict x, uint16_t *restrict s, Py_ssize_t n, int64_t *gram)
{
    accumulate(x, s, n, gram, 3);
}

CLONES static void accumulate_rgbx(const uint8_t *restrict x, uint16_t *restrict s, Py_ssize_t n, int64_t *gram)
{
    accumulate(x, s, n, gram, 4);
}

/* image_sum and gram checked for N pixels; 0, or -1 with a ValueError set. */
static int check_sums(Py_buffer *sum, Py_buffer *gram, Py_ssize_t n)
{
    if (sum->len != n * 3 * 2 || sum->itemsize != 2) {
        PyErr_SetString(PyExc_ValueError, "image_sum: expected one uint16 per pixel value");
    } else if (gram->len != 6 * 8 || gram->itemsize != 8) {
        PyErr_SetString(PyExc_ValueError, "gram: expected 6 int64 values");
    } else if (!PyBuffer_IsContiguous(sum, 'C') || !PyBuffer_IsContiguous(gram, 'C')) {
        PyErr_SetString(PyExc_ValueError, "buffers must be C-contiguous");
    } else {
        return 0;
    }
    return -1;
}

static PyObject *pixsums_add(PyObject *self, PyObject *args)
{
    Py_buffer px, sum, gram;
    if (!PyArg_ParseTuple(args, "y*w*w*", &px, &sum, &gram))
        return NULL;
    PyObject *result = NULL;
    if (px.len % 3 != 0) {
        PyErr_SetString(PyExc_ValueError, "pixels: the length is not a multiple of 3 (RGB)");
    } else if (!PyBuffer_IsContiguous(&px, 'C')) {
        PyErr_SetString(PyExc_ValueError, "buffers must be C-contiguous");
    } else if (check_sums(&sum, &gram, px.len / 3) == 0) {
        Py_BEGIN_ALLOW_THREADS
        accumulate_rgb((const uint8_t *)px.buf, (uint16_t *)sum.buf, px.len / 3, (int64_t *)gram.buf);
        Py_END_ALLOW_THREADS
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&px);
    PyBuffer_Release(&sum);
    PyBuffer_Release(&gram);
    return result;
}

/* The Arrow C data interface's structures (https://arrow.apache.org/docs/format/CDataInterface.html),
 * declared here as the specification says: it is meant to be copied, not linked. */
struct ArrowSchema {
    const char *format, *name, *metadata;
    int64_t flags, n_children;
    struct ArrowSchema **children, *dictionary;
    void (*release)(struct ArrowSchema *);
    void *private_data;
};

struct ArrowArray {
    int64_t length, null_count, offset, n_buffers, n_children;
    const void **buffers;
    struct ArrowArray **children, *dictionary;
    void (*release)(struct ArrowArray *);
    void *private_data;
};

static PyObject *pixsums_add_arrow(PyObject *self, PyObject *args)
{
    PyObject *schema_cap, *array_cap;
    Py_buffer sum, gram;
    if (!PyArg_ParseTuple(args, "OOw*w*", &schema_cap, &array_cap, &sum, &gram))
        return NULL;
    PyObject *result = NULL;
    struct ArrowSchema *schema = PyCapsule_GetPointer(schema_cap, "arrow_schema");
    struct ArrowArray *array = schema ? PyCapsule_GetPointer(array_cap, "arrow_array") : NULL;
    if (array) {
        /* PIL's RGB export: a fixed-size list of 4 ("+w:4") of uint8 ("C"), no offsets, no nulls */
        struct ArrowSchema *item = schema->n_children == 1 ? schema->children[0] : NULL;
        struct ArrowArray *values = array->n_children == 1 ? array->children[0] : NULL;
        if (!schema->release || !array->release || strcmp(schema->format, "+w:4") != 0 || !item ||
            strcmp(item->format, "C") != 0 || !values || array->offset != 0 || array->null_count != 0 ||
            values->offset != 0 || values->null_count != 0 || values->n_buffers != 2 || !values->buffers[1] ||
            values->length != 4 * array->length) {
            PyErr_SetString(PyExc_ValueError, "expected the Arrow export of an RGB image (4 uint8 per pixel)");
        } else if (check_sums(&sum, &gram, array->length) == 0) {
            const uint8_t *x = values->buffers[1];
            Py_BEGIN_ALLOW_THREADS
            accumulate_rgbx(x, (uint16_t *)sum.buf, array->length, (int64_t *)gram.buf);
            Py_END_ALLOW_THREADS
            result = Py_None;
            Py_INCREF(result);
        }
    }
    PyBuffer_Release(&sum);
    PyBuffer_Release(&gram);
    return result;
}

static PyMethodDef methods[] = {
    {"add", pixsums_add, METH_VARARGS,
     "add(pixels, image_sum, gram): add an RGB uint8 image into a uint16 image sum and an int64 "
     "Gram matrix (rr, gg, bb, rg, gb, rb), exactly."},
    {"add_arrow", pixsums_add_arrow, METH_VARARGS,
     "add_arrow(schema, array, image_sum, gram): add() for the capsules of an RGB PIL image's "
     "Image.__arrow_c_array__(), read in place."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_pixsums", NULL, -1, methods};

PyMODINIT_FUNC PyInit__pixsums(void) { return PyModule_Create(&module); }
