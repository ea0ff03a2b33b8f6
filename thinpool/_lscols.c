/* thinpool._lscols: C loops that read `thinpool ls`'s columns without an object per volume.
 *
 * name_rows(pages, page_numbers, nrows) -> bytes | None
 *     The catalog's name index pages (a list of 4 KiB pages, or one buffer of them in that order;
 *     thinpool/catalog_index.py: "<HH" count and bytes of names, count
 *     "<I" slots, the names joined by NUL), in name order, checked as catalog_index.py checks them when
 *     it decodes them -- each page's counts fit it and match its names, every name is 1-1,024 bytes of
 *     valid UTF-8, the names rise strictly in byte order across all pages -- and laid out by slot:
 *     the names of slots 0..nrows-1 in slot order, separated by NUL (a name never holds one).  None
 *     when the slots are not exactly 0..nrows-1, each once (the caller then takes its general path).  A page that breaks a rule raises ValueError with the
 *     message catalog_index.py gives (the caller raises MetadataCorrupt with it).
 *
 * ascending(values) -> bool
 *     Whether a 1-D buffer of int64 (format q, any stride) never decreases.
 *
 * Optional, like thinpool.cli._tablefmt: without it the Python code does the same work.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define PAGE 4096
#define MAX_NAME 1024

#include "_utf8.h"

typedef struct {
    uint32_t page;   /* index into the pages list */
    uint16_t off;    /* the name's offset in its page */
    uint16_t len;    /* its bytes (1-1,024; 0: no name for this slot yet) */
} Where;

static PyObject *
lscols_name_rows(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *pages, *numbers;
    Py_ssize_t nrows;
    if (!PyArg_ParseTuple(args, "OOn:name_rows", &pages, &numbers, &nrows))
        return NULL;
    if (!PyList_Check(numbers) || (PyList_Check(pages) && PyList_GET_SIZE(pages) != PyList_GET_SIZE(numbers))) {
        PyErr_SetString(PyExc_TypeError, "name_rows: page_numbers must be a list, pages a list of as many pages "
                        "or one buffer of them");
        return NULL;
    }
    if (nrows < 0 || nrows > (Py_ssize_t)UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "name_rows: nrows out of range");
        return NULL;
    }
    int one = !PyList_Check(pages);  /* one buffer of np whole pages */
    Py_ssize_t np = PyList_GET_SIZE(numbers), nviews = 0;
    Py_buffer *views = PyMem_Calloc((size_t)(np ? np : 1), sizeof(Py_buffer));
    const unsigned char **page_at = PyMem_Calloc((size_t)(np ? np : 1), sizeof(const unsigned char *));
    Where *at = PyMem_Calloc((size_t)(nrows ? nrows : 1), sizeof(Where));
    PyObject *out = NULL;
    if (!views || !at || !page_at) {
        PyErr_NoMemory();
        goto done;
    }
    if (one) {
        if (PyObject_GetBuffer(pages, &views[0], PyBUF_SIMPLE) < 0)
            goto done;
        nviews = 1;
        if (views[0].len != np * PAGE) {
            PyErr_Format(PyExc_ValueError, "name_rows: a buffer of %zd bytes is not %zd whole pages", views[0].len, np);
            goto done;
        }
    }
    Py_ssize_t count = 0, total = 0;
    const unsigned char *prev = NULL;
    Py_ssize_t prev_len = 0;
    int perm = 1;
    for (Py_ssize_t i = 0; i < np; i++) {
        long pno = PyLong_AsLong(PyList_GET_ITEM(numbers, i));
        if (pno == -1 && PyErr_Occurred())
            goto done;
        if (one)
            page_at[i] = (const unsigned char *)views[0].buf + i * PAGE;
        else {
            if (PyObject_GetBuffer(PyList_GET_ITEM(pages, i), &views[i], PyBUF_SIMPLE) < 0)
                goto done;
            nviews = i + 1;
            if (views[i].len < PAGE) {
                PyErr_Format(PyExc_ValueError, "catalog: name index page %ld: not a whole page", pno);
                goto done;
            }
            page_at[i] = views[i].buf;
        }
        const unsigned char *p = page_at[i];
        unsigned n = p[0] | (p[1] << 8), nb = p[2] | (p[3] << 8);
        size_t start = 4 + 4 * (size_t)n;
        if (start + nb > PAGE || n == 0 || nb == 0) {
            PyErr_Format(PyExc_ValueError, "catalog: name index page %ld: counts (%u names, %u bytes) do not fit a page",
                         pno, n, nb);
            goto done;
        }
        const unsigned char *names = p + start, *end = names + nb, *q = names;
        for (unsigned k = 0; k < n; k++) {
            const unsigned char *z = k + 1 < n ? memchr(q, 0, (size_t)(end - q)) : end;
            if (z == NULL || z == q || (k + 1 == n && memchr(q, 0, (size_t)(end - q)) != NULL)) {
                PyErr_Format(PyExc_ValueError, "catalog: name index page %ld: its names do not match its count of %u",
                             pno, n);
                goto done;
            }
            Py_ssize_t len = z - q;
            if (len > MAX_NAME) {
                PyErr_SetString(PyExc_ValueError, "catalog: name index: a name is longer than 1,024 bytes");
                goto done;
            }
            if (!valid_utf8(q, len)) {
                PyErr_SetString(PyExc_ValueError, "catalog: name index: a volume name is not UTF-8");
                goto done;
            }
            if (prev) {
                Py_ssize_t m = len < prev_len ? len : prev_len;
                int c = memcmp(prev, q, (size_t)m);
                if (c > 0 || (c == 0 && prev_len >= len)) {
                    PyErr_SetString(PyExc_ValueError, "catalog: name index: names out of order");
                    goto done;
                }
            }
            prev = q;
            prev_len = len;
            uint32_t slot = (uint32_t)p[4 + 4 * k] | ((uint32_t)p[5 + 4 * k] << 8) | ((uint32_t)p[6 + 4 * k] << 16)
                            | ((uint32_t)p[7 + 4 * k] << 24);
            if ((Py_ssize_t)slot >= nrows || at[slot].len != 0)
                perm = 0;
            else {
                at[slot].page = (uint32_t)i;
                at[slot].off = (uint16_t)(q - p);
                at[slot].len = (uint16_t)len;
            }
            total += len;
            count++;
            q = z + 1;
        }
    }
    if (!perm || count != nrows) {
        out = Py_None;
        Py_INCREF(out);
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, nrows ? total + nrows - 1 : 0);
    if (!out)
        goto done;
    char *w = PyBytes_AS_STRING(out);
    for (Py_ssize_t r = 0; r < nrows; r++) {
        if (r)
            *w++ = '\0';
        memcpy(w, (const char *)page_at[at[r].page] + at[r].off, at[r].len);
        w += at[r].len;
    }
done:
    for (Py_ssize_t i = 0; i < nviews; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(page_at);
    PyMem_Free(at);
    return out;
}

static PyObject *
lscols_ascending(PyObject *self, PyObject *values)
{
    (void)self;
    Py_buffer view;
    if (PyObject_GetBuffer(values, &view, PyBUF_STRIDES | PyBUF_FORMAT) < 0)
        return NULL;
    const char *f = view.format ? view.format : "B";
    if (*f == '@' || *f == '=' || *f == '<')
        f++;
    if (view.ndim != 1 || view.itemsize != 8 || strcmp(f, "q") != 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_TypeError, "ascending: expected a 1-D buffer of int64 (format q)");
        return NULL;
    }
    Py_ssize_t n = view.shape[0], stride = view.strides[0];
    int ok = 1;
    int64_t last = INT64_MIN;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t v;
        memcpy(&v, (const char *)view.buf + i * stride, 8);
        if (v < last) {
            ok = 0;
            break;
        }
        last = v;
    }
    PyBuffer_Release(&view);
    return PyBool_FromLong(ok);
}

static PyMethodDef methods[] = {
    {"name_rows", lscols_name_rows, METH_VARARGS,
     "name_rows(pages, page_numbers, nrows) -> bytes | None: the names by slot, NUL-separated."},
    {"ascending", lscols_ascending, METH_O, "ascending(values) -> bool: whether an int64 buffer never decreases."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_lscols", "C loops that read `thinpool ls`'s columns (see thinpool/_lscols.c).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__lscols(void)
{
    return PyModule_Create(&module);
}
