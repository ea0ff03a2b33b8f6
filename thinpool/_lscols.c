/* thinpool._lscols: C loops that read `thinpool ls`'s columns without an object per volume.
 *
 * name_rows(pages, page_numbers, nrows) -> (blob, starts, lengths) | None
 *     The catalog's name index pages (thinpool/catalog_index.py: "<HH" count and bytes of names, count
 *     "<I" slots, the names joined by NUL), in name order, checked as catalog_index.py checks them when
 *     it decodes them -- each page's counts fit it and match its names, every name is 1-1,024 bytes of
 *     valid UTF-8, the names rise strictly in byte order across all pages -- and laid out by slot:
 *     `blob` holds the names, `starts` and `lengths` (bytes of native int64, one per slot 0..nrows-1)
 *     where slot s's name lies in it.  None when the slots are not exactly 0..nrows-1, each once (the
 *     caller then takes its general path).  A page that breaks a rule raises ValueError with the
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

static PyObject *
lscols_name_rows(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *pages, *numbers;
    Py_ssize_t nrows;
    if (!PyArg_ParseTuple(args, "OOn:name_rows", &pages, &numbers, &nrows))
        return NULL;
    if (!PyList_Check(pages) || !PyList_Check(numbers) || PyList_GET_SIZE(pages) != PyList_GET_SIZE(numbers)) {
        PyErr_SetString(PyExc_TypeError, "name_rows: pages and page_numbers must be lists of the same length");
        return NULL;
    }
    if (nrows < 0 || nrows > (PY_SSIZE_T_MAX / 16)) {
        PyErr_SetString(PyExc_ValueError, "name_rows: nrows out of range");
        return NULL;
    }
    Py_ssize_t np = PyList_GET_SIZE(pages);
    PyObject *blob = PyBytes_FromStringAndSize(NULL, np * PAGE > 0 ? np * PAGE : 1);
    PyObject *starts = PyBytes_FromStringAndSize(NULL, (nrows ? nrows : 1) * 8);
    PyObject *lens = PyBytes_FromStringAndSize(NULL, (nrows ? nrows : 1) * 8);
    if (!blob || !starts || !lens)
        goto fail;
    char *out = PyBytes_AS_STRING(blob);
    int64_t *st = (int64_t *)PyBytes_AS_STRING(starts), *ln = (int64_t *)PyBytes_AS_STRING(lens);
    for (Py_ssize_t r = 0; r < nrows; r++)
        ln[r] = -1;  /* (no name yet) */
    Py_ssize_t used = 0, count = 0;
    const char *prev = NULL;
    Py_ssize_t prev_len = 0;
    int perm = 1;
    for (Py_ssize_t i = 0; i < np; i++) {
        Py_buffer view;
        long pno = PyLong_AsLong(PyList_GET_ITEM(numbers, i));
        if (pno == -1 && PyErr_Occurred())
            goto fail;
        if (PyObject_GetBuffer(PyList_GET_ITEM(pages, i), &view, PyBUF_SIMPLE) < 0)
            goto fail;
        if (view.len < PAGE) {
            PyBuffer_Release(&view);
            PyErr_Format(PyExc_ValueError, "catalog: name index page %ld: not a whole page", pno);
            goto fail;
        }
        const unsigned char *p = view.buf;
        unsigned n = p[0] | (p[1] << 8), nb = p[2] | (p[3] << 8);
        size_t start = 4 + 4 * (size_t)n;
        if (start + nb > PAGE || n == 0 || nb == 0) {
            PyBuffer_Release(&view);
            PyErr_Format(PyExc_ValueError, "catalog: name index page %ld: counts (%u names, %u bytes) do not fit a page",
                         pno, n, nb);
            goto fail;
        }
        const unsigned char *names = p + start, *end = names + nb, *q = names;
        memcpy(out + used, names, nb);
        for (unsigned k = 0; k < n; k++) {
            const unsigned char *z = k + 1 < n ? memchr(q, 0, (size_t)(end - q)) : end;
            if (z == NULL || z == q || (k + 1 == n && memchr(q, 0, (size_t)(end - q)) != NULL)) {
                PyBuffer_Release(&view);
                PyErr_Format(PyExc_ValueError, "catalog: name index page %ld: its names do not match its count of %u",
                             pno, n);
                goto fail;
            }
            Py_ssize_t len = z - q;
            if (len > MAX_NAME) {
                PyBuffer_Release(&view);
                PyErr_SetString(PyExc_ValueError, "catalog: name index: a name is longer than 1,024 bytes");
                goto fail;
            }
            if (!valid_utf8(q, len)) {
                PyBuffer_Release(&view);
                PyErr_SetString(PyExc_ValueError, "catalog: name index: a volume name is not UTF-8");
                goto fail;
            }
            const char *mine = out + used + (q - names);
            if (prev) {
                Py_ssize_t m = len < prev_len ? len : prev_len;
                int c = memcmp(prev, mine, (size_t)m);
                if (c > 0 || (c == 0 && prev_len >= len)) {
                    PyBuffer_Release(&view);
                    PyErr_SetString(PyExc_ValueError, "catalog: name index: names out of order");
                    goto fail;
                }
            }
            prev = mine;
            prev_len = len;
            uint32_t slot = (uint32_t)p[4 + 4 * k] | ((uint32_t)p[5 + 4 * k] << 8) | ((uint32_t)p[6 + 4 * k] << 16)
                            | ((uint32_t)p[7 + 4 * k] << 24);
            if ((Py_ssize_t)slot >= nrows || ln[slot] != -1)
                perm = 0;
            else {
                st[slot] = (int64_t)(mine - out);
                ln[slot] = (int64_t)len;
            }
            count++;
            q = z + 1;
        }
        used += nb;
        PyBuffer_Release(&view);
    }
    if (!perm || count != nrows) {
        Py_DECREF(blob);
        Py_DECREF(starts);
        Py_DECREF(lens);
        Py_RETURN_NONE;
    }
    if (_PyBytes_Resize(&blob, used) < 0) {
        blob = NULL;
        goto fail;
    }
    if (nrows == 0 && (_PyBytes_Resize(&starts, 0) < 0 || _PyBytes_Resize(&lens, 0) < 0)) {
        starts = lens = NULL;
        goto fail;
    }
    return Py_BuildValue("(NNN)", blob, starts, lens);
fail:
    Py_XDECREF(blob);
    Py_XDECREF(starts);
    Py_XDECREF(lens);
    return NULL;
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
     "name_rows(pages, page_numbers, nrows) -> (blob, starts, lengths) | None: the name index by slot."},
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
