/* thinpool.cli._tablefmt: the CLI's text tables (`thinpool ls`) written in C.
 *
 * table(header, columns, left, headers, as_text=False, fd=-1) -> bytes (str with as_text; None with fd)
 *     The UTF-8 bytes (with as_text: the str, made in place when it is ASCII) of what thinpool.cli.ops._columns_table writes for the same cells: the columns
 *     right-justified (the first `left` left-justified) to the widest cell's length in code points
 *     (Python's len()), separated by two spaces, lines joined by "\n" (none at the end), the header
 *     line right-stripped, and every line right-stripped (str.rstrip: Unicode whitespace) when the
 *     last column holds strings.  A column is one of
 *       - a list of str;
 *       - ("nul", blob, n): the n cells are the UTF-8 texts of the bytes-like blob separated by NUL
 *         (thinpool._lscols.name_rows' names by slot), valid UTF-8, exactly n of them;
 *       - a list of int, or a 1-D buffer of 8-byte integers (format q, Q, l, L, n or N, any stride,
 *         e.g. a strided memoryview of a device table): printed as %d prints them;
 *       - ("map", values, keys, cells): values (a list of int or such a buffer) each printed as the
 *         str in `cells` at the index of its value in `keys` (a list of distinct ints);
 *       - ("suffix", cells, flags, suffix): cells (a list of str or a "nul" tuple), each followed by the str `suffix` where
 *         the matching item of `flags` (a list of int/bool, or a bytes-like object) is true.
 *     With fd >= 0 the table and a final newline are written to that file descriptor instead, a
 *     quarter of a megabyte at a time (no copy of the whole table in memory), after every cell was
 *     checked: a bad cell writes nothing; NotImplemented, nothing written, when a cell holds an escape
 *     character (click strips ANSI escape sequences from text it writes to a pipe: its text path then).
 *     Integers must lie in [-2**63, 2**64); every column must have the same length.  Wrong types,
 *     lengths or values raise TypeError, ValueError, OverflowError or KeyError; a str that UTF-8
 *     cannot encode (a lone surrogate) raises UnicodeEncodeError.
 *
 * write_text(fd, text)
 *     The UTF-8 of str `text` written to file descriptor fd, all of it (an ASCII str's own bytes, no
 *     encoded copy of a table of megabytes); OSError (BrokenPipeError for EPIPE) when a write fails.
 *
 * distinct(values) -> list[int]
 *     The distinct values of a list of int or 8-byte integer buffer, in order of first appearance.
 *
 * Loaded without numpy or numba (the CLI's light commands import neither); optional: the CLI falls
 * back to its Python renderer when this module was not built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "../_utf8.h"

typedef __int128 i128;

/* ------------------------------------------------------------------ integer sources */

enum { SRC_LIST, SRC_BUF_S, SRC_BUF_U };

typedef struct {
    int kind;
    PyObject *list;      /* borrowed (SRC_LIST) */
    Py_buffer view;      /* SRC_BUF_* (released by ints_release) */
    int has_view;
    Py_ssize_t n;
} IntSource;

static int
ints_open(PyObject *obj, IntSource *s, const char *what)
{
    memset(s, 0, sizeof(*s));
    if (PyList_Check(obj)) {
        s->kind = SRC_LIST;
        s->list = obj;
        s->n = PyList_GET_SIZE(obj);
        return 0;
    }
    if (!PyObject_CheckBuffer(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a list of int or a buffer of 8-byte integers, not %.80s",
                     what, Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (PyObject_GetBuffer(obj, &s->view, PyBUF_STRIDES | PyBUF_FORMAT) < 0)
        return -1;
    s->has_view = 1;
    const char *f = s->view.format ? s->view.format : "B";
    if (*f == '@' || *f == '=' || *f == '<' || *f == '!' || *f == '>') {
        if (*f == '>' || *f == '!') {
            PyErr_Format(PyExc_TypeError, "%s: big-endian buffers are not supported", what);
            return -1;
        }
        f++;
    }
    if (s->view.ndim != 1 || s->view.itemsize != 8 || f[0] == 0 || f[1] != 0 || !strchr("qQlLnN", f[0])) {
        PyErr_Format(PyExc_TypeError, "%s: expected a 1-D buffer of 8-byte integers (format q or Q), got format "
                     "%.20s, item size %zd, %d dimension(s)", what, s->view.format ? s->view.format : "B",
                     s->view.itemsize, s->view.ndim);
        return -1;
    }
    s->kind = strchr("QLN", f[0]) ? SRC_BUF_U : SRC_BUF_S;
    s->n = s->view.shape[0];
    return 0;
}

static void
ints_release(IntSource *s)
{
    if (s->has_view)
        PyBuffer_Release(&s->view);
    s->has_view = 0;
}

/* value i of s into *out; -1 with an exception set on a bad item */
static inline __attribute__((always_inline)) int
ints_get(IntSource *s, Py_ssize_t i, i128 *out, const char *what)
{
    if (s->kind == SRC_LIST) {
        if (i >= PyList_GET_SIZE(s->list)) {
            PyErr_Format(PyExc_RuntimeError, "%s: a list changed while it was read", what);
            return -1;
        }
        PyObject *v = PyList_GET_ITEM(s->list, i);
        if (!PyLong_Check(v)) {
            PyErr_Format(PyExc_TypeError, "%s: item %zd is %.80s, not int", what, i, Py_TYPE(v)->tp_name);
            return -1;
        }
        int overflow = 0;
        long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (x == -1 && PyErr_Occurred())
            return -1;
        if (overflow == 0) {
            *out = (i128)x;
            return 0;
        }
        if (overflow > 0) {
            unsigned long long u = PyLong_AsUnsignedLongLong(v);
            if (!(u == (unsigned long long)-1 && PyErr_Occurred())) {
                *out = (i128)u;
                return 0;
            }
            PyErr_Clear();
        }
        PyErr_Format(PyExc_OverflowError, "%s: item %zd is out of range (integers must lie in [-2**63, 2**64))",
                     what, i);
        return -1;
    }
    const char *p = (const char *)s->view.buf + i * (s->view.strides ? s->view.strides[0] : 8);
    if (s->kind == SRC_BUF_S) {
        int64_t x;
        memcpy(&x, p, 8);
        *out = (i128)x;
    } else {
        uint64_t u;
        memcpy(&u, p, 8);
        *out = (i128)u;
    }
    return 0;
}

/* decimal text of v into the end of a buffer ending at `end`; returns its start (every value lies in
 * [-2**63, 2**64), so its magnitude fits 64 bits and the digits come from 64-bit arithmetic) */
static const char DIGITS2[201] =
    "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
    "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
    "8081828384858687888990919293949596979899";

static char *
int_text(i128 v, char *end)
{
    char *p = end;
    int neg = v < 0;
    uint64_t u = neg ? (uint64_t)(-v) : (uint64_t)v;
    while (u >= 100) {  /* two digits a step */
        unsigned k = (unsigned)(u % 100) * 2;
        u /= 100;
        *--p = DIGITS2[k + 1];
        *--p = DIGITS2[k];
    }
    if (u >= 10) {
        *--p = DIGITS2[u * 2 + 1];
        *--p = DIGITS2[u * 2];
    } else
        *--p = (char)('0' + (int)u);
    if (neg)
        *--p = '-';
    return p;
}

static Py_ssize_t
int_len(i128 v)
{
    int neg = v < 0;
    uint64_t u = neg ? (uint64_t)(-v) : (uint64_t)v;
    Py_ssize_t k = 1;
    while (u >= 10000) {
        u /= 10000;
        k += 4;
    }
    k += (u >= 10) + (u >= 100) + (u >= 1000);
    return k + neg;
}

/* ------------------------------------------------------------------ strings */

typedef struct {
    const char *utf8;
    Py_ssize_t nbytes;
    Py_ssize_t nchars;
} Text;

static int
text_of(PyObject *s, Text *t, const char *what, Py_ssize_t i)
{
    if (!PyUnicode_Check(s)) {
        PyErr_Format(PyExc_TypeError, "%s: item %zd is %.80s, not str", what, i, Py_TYPE(s)->tp_name);
        return -1;
    }
    t->utf8 = PyUnicode_AsUTF8AndSize(s, &t->nbytes);  /* cached in the str: valid while it lives */
    if (t->utf8 == NULL)
        return -1;
    t->nchars = PyUnicode_GET_LENGTH(s);
    return 0;
}

/* a column of text cells: a list of str, or ("nul", blob, n), read in row order */
typedef struct {
    PyObject *list;      /* borrowed; NULL for a blob */
    Py_buffer blob;
    int has_blob;
    Py_ssize_t pos;      /* the blob's next cell starts here ... */
    Py_ssize_t next;     /* ... and is this row's */
    Py_ssize_t n;
} TextSource;

static void
texts_release(TextSource *t)
{
    if (t->has_blob)
        PyBuffer_Release(&t->blob);
    t->has_blob = 0;
}

static int
is_tagged3(PyObject *spec, const char *tag)
{
    if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 3)
        return 0;
    PyObject *t = PyTuple_GET_ITEM(spec, 0);
    return PyUnicode_Check(t) && PyUnicode_CompareWithASCIIString(t, tag) == 0;
}

static int
texts_open(PyObject *obj, TextSource *t, const char *what)
{
    memset(t, 0, sizeof(*t));
    if (PyList_Check(obj)) {
        t->list = obj;
        t->n = PyList_GET_SIZE(obj);
        return 0;
    }
    if (!is_tagged3(obj, "nul")) {
        PyErr_Format(PyExc_TypeError, "%s: text cells must be a list of str or (\"nul\", blob, n)", what);
        return -1;
    }
    t->n = PyLong_AsSsize_t(PyTuple_GET_ITEM(obj, 2));
    if (t->n == -1 && PyErr_Occurred())
        return -1;
    if (PyObject_GetBuffer(PyTuple_GET_ITEM(obj, 1), &t->blob, PyBUF_SIMPLE) < 0)
        return -1;
    t->has_blob = 1;
    if (t->n < 0 || (t->n == 0 && t->blob.len != 0)) {
        PyErr_Format(PyExc_ValueError, "%s: a blob of %zd bytes does not hold %zd cells", what, t->blob.len, t->n);
        return -1;
    }
    return 0;
}

static int
texts_get(TextSource *t, Py_ssize_t i, Text *out, const char *what)
{
    if (t->list) {
        if (i >= PyList_GET_SIZE(t->list)) {
            PyErr_Format(PyExc_RuntimeError, "%s: a list changed while it was read", what);
            return -1;
        }
        return text_of(PyList_GET_ITEM(t->list, i), out, what, i);
    }
    if (i == 0)
        t->pos = t->next = 0;
    if (i != t->next || i >= t->n) {
        PyErr_Format(PyExc_SystemError, "%s: a blob's cells are read in order", what);
        return -1;
    }
    const unsigned char *base = (const unsigned char *)t->blob.buf, *s = base + t->pos;
    Py_ssize_t left = t->blob.len - t->pos;
    const unsigned char *z = left > 0 ? memchr(s, 0, (size_t)left) : NULL;
    Py_ssize_t nb = z ? z - s : left, nc = 0, j = 0;
    if ((i + 1 < t->n) != (z != NULL)) {
        PyErr_Format(PyExc_ValueError, "%s: the blob does not hold %zd cells separated by NUL", what, t->n);
        return -1;
    }
    t->pos += nb + 1;
    t->next = i + 1;
    uint64_t high = 0;  /* ASCII (the usual name) checked eight bytes a step */
    for (; j + 8 <= nb; j += 8) {
        uint64_t w;
        memcpy(&w, s + j, 8);
        high |= w;
    }
    for (; j < nb; j++)
        high |= s[j];
    if (high & 0x8080808080808080ULL) {
        if (!valid_utf8(s, nb)) {
            PyErr_Format(PyExc_ValueError, "%s: cell %zd is not UTF-8", what, i);
            return -1;
        }
        for (j = 0; j < nb; j++)
            nc += (s[j] & 0xC0) != 0x80;
    } else
        nc = nb;
    out->utf8 = (const char *)s;
    out->nbytes = nb;
    out->nchars = nc;
    return 0;
}

/* ------------------------------------------------------------------ int -> index map (open addressing) */

typedef struct {
    i128 *keys;
    Py_ssize_t *idx;   /* -1: empty */
    size_t mask;
} IntMap;

static uint64_t
mix(i128 v)
{
    uint64_t x = (uint64_t)v ^ (uint64_t)(v >> 64) * 0x9E3779B97F4A7C15ULL;
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return x;
}

static int
map_init(IntMap *m, Py_ssize_t n)
{
    size_t cap = 16;
    while (cap < (size_t)n * 2 + 2)
        cap <<= 1;
    m->keys = PyMem_Malloc(cap * sizeof(i128));
    m->idx = PyMem_Malloc(cap * sizeof(Py_ssize_t));
    if (!m->keys || !m->idx) {
        PyMem_Free(m->keys);
        PyMem_Free(m->idx);
        m->keys = NULL;
        m->idx = NULL;
        PyErr_NoMemory();
        return -1;
    }
    memset(m->idx, 0xff, cap * sizeof(Py_ssize_t));
    m->mask = cap - 1;
    return 0;
}

static void
map_free(IntMap *m)
{
    PyMem_Free(m->keys);
    PyMem_Free(m->idx);
    m->keys = NULL;
    m->idx = NULL;
}

/* the slot of key v (found or the empty one where it goes) */
static size_t
map_slot(const IntMap *m, i128 v)
{
    size_t h = (size_t)mix(v) & m->mask;
    while (m->idx[h] != -1 && m->keys[h] != v)
        h = (h + 1) & m->mask;
    return h;
}

/* ------------------------------------------------------------------ columns */

enum { COL_STR, COL_INT, COL_MAP, COL_SUFFIX };

typedef struct {
    int kind;
    TextSource texts;      /* COL_STR, COL_SUFFIX: the cells */
    IntSource ints;        /* COL_INT, COL_MAP: the values */
    Text *cells;           /* COL_MAP: the distinct cells */
    Py_ssize_t ncells;
    unsigned char *at8;    /* COL_MAP: each row's cell, with at most 256 cells ... */
    uint32_t *at32;        /* ... or more */
    IntSource flags;       /* COL_SUFFIX: list or bytes-like (has_view -> bytes) */
    int flags_bytes;
    Py_buffer flag_view;
    Text suffix;
    unsigned char *flag;   /* COL_SUFFIX: each row's flag */
    Py_ssize_t width;      /* in code points */
    Py_ssize_t extra;      /* sum over rows of (utf-8 bytes - code points) */
    Py_ssize_t max_extra;  /* the most of a row's */
    int has_esc;           /* a cell holds an escape character (0x1b) */
} Column;

static void
column_free(Column *c)
{
    ints_release(&c->ints);
    texts_release(&c->texts);
    if (c->flags_bytes)
        PyBuffer_Release(&c->flag_view);
    c->flags_bytes = 0;
    PyMem_Free(c->cells);
    PyMem_Free(c->at8);
    PyMem_Free(c->at32);
    PyMem_Free(c->flag);
    c->cells = NULL;
    c->at8 = NULL;
    c->at32 = NULL;
    c->flag = NULL;
}

static int
flag_at(Column *c, Py_ssize_t i, int *out)
{
    if (c->flags_bytes) {
        *out = ((const unsigned char *)c->flag_view.buf)[i] != 0;
        return 0;
    }
    if (i >= PyList_GET_SIZE(c->flags.list)) {
        PyErr_SetString(PyExc_RuntimeError, "table: a list of flags changed while it was read");
        return -1;
    }
    int r = PyObject_IsTrue(PyList_GET_ITEM(c->flags.list, i));
    if (r < 0)
        return -1;
    *out = r;
    return 0;
}

/* set up column `spec`, measuring its width and extra bytes; its length into *n_out */
static int
column_open(PyObject *spec, Column *c, Py_ssize_t *n_out, char *what)
{
    memset(c, 0, sizeof(*c));
    if (PyTuple_Check(spec)) {
        Py_ssize_t k = PyTuple_GET_SIZE(spec);
        PyObject *tag = k ? PyTuple_GET_ITEM(spec, 0) : NULL;
        if (k == 4 && tag && PyUnicode_Check(tag) && PyUnicode_CompareWithASCIIString(tag, "map") == 0) {
            PyObject *keys = PyTuple_GET_ITEM(spec, 2), *cells = PyTuple_GET_ITEM(spec, 3);
            if (!PyList_Check(keys) || !PyList_Check(cells)) {
                PyErr_Format(PyExc_TypeError, "%s: a map column's keys and cells must be lists", what);
                return -1;
            }
            if (PyList_GET_SIZE(keys) != PyList_GET_SIZE(cells)) {
                PyErr_Format(PyExc_ValueError, "%s: a map column has %zd keys and %zd cells", what,
                             PyList_GET_SIZE(keys), PyList_GET_SIZE(cells));
                return -1;
            }
            c->kind = COL_MAP;
            if (ints_open(PyTuple_GET_ITEM(spec, 1), &c->ints, what) < 0)
                return -1;
            Py_ssize_t nk = PyList_GET_SIZE(keys), n = c->ints.n;
            c->ncells = nk;
            c->cells = PyMem_Malloc((nk ? nk : 1) * sizeof(Text));
            if (nk > (Py_ssize_t)UINT32_MAX) {
                PyErr_Format(PyExc_ValueError, "%s: a map column has too many keys", what);
                return -1;
            }
            if (nk <= 256)
                c->at8 = PyMem_Malloc(n ? n : 1);
            else
                c->at32 = PyMem_Malloc((n ? n : 1) * sizeof(uint32_t));
            if (!c->cells || (!c->at8 && !c->at32)) {
                PyErr_NoMemory();
                return -1;
            }
            IntSource ks;
            IntMap m = {NULL, NULL, 0};
            if (ints_open(keys, &ks, what) < 0 || map_init(&m, nk) < 0)
                return -1;
            int rc = -1;
            for (Py_ssize_t i = 0; i < nk; i++) {
                i128 v;
                if (ints_get(&ks, i, &v, what) < 0 || text_of(PyList_GET_ITEM(cells, i), &c->cells[i], what, i) < 0)
                    goto done;
                if (memchr(c->cells[i].utf8, 0x1b, (size_t)c->cells[i].nbytes))
                    c->has_esc = 1;
                size_t h = map_slot(&m, v);
                if (m.idx[h] != -1) {
                    PyErr_Format(PyExc_ValueError, "%s: a map column's keys repeat a value (key %zd)", what, i);
                    goto done;
                }
                m.keys[h] = v;
                m.idx[h] = i;
            }
            for (Py_ssize_t i = 0; i < n; i++) {
                i128 v;
                if (ints_get(&c->ints, i, &v, what) < 0)
                    goto done;
                size_t h = map_slot(&m, v);
                if (m.idx[h] == -1) {
                    PyErr_Format(PyExc_KeyError, "%s: value of row %zd is not among the map column's keys", what, i);
                    goto done;
                }
                Text *t = &c->cells[m.idx[h]];
                if (c->at8)
                    c->at8[i] = (unsigned char)m.idx[h];
                else
                    c->at32[i] = (uint32_t)m.idx[h];
                if (t->nchars > c->width)
                    c->width = t->nchars;
                c->extra += t->nbytes - t->nchars;
                if (t->nbytes - t->nchars > c->max_extra)
                    c->max_extra = t->nbytes - t->nchars;
            }
            rc = 0;
        done:
            map_free(&m);
            *n_out = n;
            return rc;
        }
        if (k == 4 && tag && PyUnicode_Check(tag) && PyUnicode_CompareWithASCIIString(tag, "suffix") == 0) {
            PyObject *cells = PyTuple_GET_ITEM(spec, 1), *flags = PyTuple_GET_ITEM(spec, 2);
            c->kind = COL_SUFFIX;
            if (texts_open(cells, &c->texts, what) < 0)
                return -1;
            if (text_of(PyTuple_GET_ITEM(spec, 3), &c->suffix, what, 3) < 0)
                return -1;
            if (memchr(c->suffix.utf8, 0x1b, (size_t)c->suffix.nbytes))
                c->has_esc = 1;
            Py_ssize_t n = c->texts.n, nf;
            if (PyList_Check(flags)) {
                c->flags.kind = SRC_LIST;
                c->flags.list = flags;
                nf = PyList_GET_SIZE(flags);
            } else {
                if (PyObject_GetBuffer(flags, &c->flag_view, PyBUF_SIMPLE) < 0)
                    return -1;
                c->flags_bytes = 1;
                nf = c->flag_view.len;
            }
            if (nf != n) {
                PyErr_Format(PyExc_ValueError, "%s: a suffix column has %zd cells and %zd flags", what, n, nf);
                return -1;
            }
            c->flag = PyMem_Malloc(n ? n : 1);
            if (!c->flag) {
                PyErr_NoMemory();
                return -1;
            }
            /* the flags first: a flag's __bool__ may run Python code, which must not run once the
             * cells' UTF-8 pointers are taken */
            for (Py_ssize_t i = 0; i < n; i++) {
                int f;
                if (flag_at(c, i, &f) < 0)
                    return -1;
                c->flag[i] = (unsigned char)f;
            }
            for (Py_ssize_t i = 0; i < n; i++) {
                Text t;
                int f = c->flag[i];
                if (texts_get(&c->texts, i, &t, what) < 0)
                    return -1;
                Py_ssize_t w = t.nchars + (f ? c->suffix.nchars : 0);
                if (w > c->width)
                    c->width = w;
                if (memchr(t.utf8, 0x1b, (size_t)t.nbytes))
                    c->has_esc = 1;
                Py_ssize_t e = (t.nbytes - t.nchars) + (f ? c->suffix.nbytes - c->suffix.nchars : 0);
                c->extra += e;
                if (e > c->max_extra)
                    c->max_extra = e;
            }
            *n_out = n;
            return 0;
        }
        if (!is_tagged3(spec, "nul")) {
            PyErr_Format(PyExc_TypeError, "%s: a tuple column must be (\"map\", values, keys, cells), "
                         "(\"suffix\", cells, flags, suffix) or (\"nul\", blob, n)", what);
            return -1;
        }
    }
    if (PyTuple_Check(spec) ||
        (PyList_Check(spec) && PyList_GET_SIZE(spec) > 0 && PyUnicode_Check(PyList_GET_ITEM(spec, 0)))) {
        c->kind = COL_STR;
        if (texts_open(spec, &c->texts, what) < 0)
            return -1;
        Py_ssize_t n = c->texts.n;
        for (Py_ssize_t i = 0; i < n; i++) {
            Text t;
            if (texts_get(&c->texts, i, &t, what) < 0)
                return -1;
            if (t.nchars > c->width)
                c->width = t.nchars;
            c->extra += t.nbytes - t.nchars;
            if (t.nbytes - t.nchars > c->max_extra)
                c->max_extra = t.nbytes - t.nchars;
            if (memchr(t.utf8, 0x1b, (size_t)t.nbytes))
                c->has_esc = 1;
        }
        *n_out = n;
        return 0;
    }
    c->kind = COL_INT;
    if (ints_open(spec, &c->ints, what) < 0)
        return -1;
    i128 lo = 0, hi = 0;  /* the longest text is the smallest's or the largest's (as ops._columns_table has it) */
    for (Py_ssize_t i = 0; i < c->ints.n; i++) {
        i128 v;
        if (ints_get(&c->ints, i, &v, what) < 0)
            return -1;
        if (i == 0 || v < lo)
            lo = v;
        if (i == 0 || v > hi)
            hi = v;
    }
    if (c->ints.n) {
        Py_ssize_t a = int_len(lo), b = int_len(hi);
        c->width = a > b ? a : b;
    }
    *n_out = c->ints.n;
    return 0;
}

/* ------------------------------------------------------------------ writing */

static inline __attribute__((always_inline)) char *
put_spaces(char *p, Py_ssize_t k)
{
    if (k > 16) {
        memset(p, ' ', (size_t)k);
        return p + k;
    }
    while (k-- > 0)  /* (a cell's padding is a few bytes: no call) */
        *p++ = ' ';
    return p;
}

static inline __attribute__((always_inline)) char *
put_bytes(char *p, const char *s, Py_ssize_t n)
{
    if (n > 16) {
        memcpy(p, s, (size_t)n);
        return p + n;
    }
    while (n-- > 0)  /* (a cell is a few bytes: no call) */
        *p++ = *s++;
    return p;
}

static inline __attribute__((always_inline)) char *
put_text(char *p, const char *s, Py_ssize_t nbytes, Py_ssize_t pad, int left)
{
    if (!left)
        p = put_spaces(p, pad);
    p = put_bytes(p, s, nbytes);
    if (left)
        p = put_spaces(p, pad);
    return p;
}

/* strip trailing Unicode whitespace (str.rstrip()) of the UTF-8 text [start, end) */
static char *
rstrip_utf8(char *start, char *end)
{
    while (end > start) {
        char *q = end - 1;
        while (q > start && (((unsigned char)*q) & 0xC0) == 0x80)
            q--;
        unsigned char b0 = (unsigned char)*q;
        Py_UCS4 cp;
        Py_ssize_t len = end - q;
        if (b0 < 0x80)
            cp = b0;
        else if (len == 2)
            cp = ((Py_UCS4)(b0 & 0x1F) << 6) | (q[1] & 0x3F);
        else if (len == 3)
            cp = ((Py_UCS4)(b0 & 0x0F) << 12) | ((Py_UCS4)(q[1] & 0x3F) << 6) | (q[2] & 0x3F);
        else if (len == 4)
            cp = ((Py_UCS4)(b0 & 0x07) << 18) | ((Py_UCS4)(q[1] & 0x3F) << 12) | ((Py_UCS4)(q[2] & 0x3F) << 6)
                 | (q[3] & 0x3F);
        else
            break;
        if (!Py_UNICODE_ISSPACE(cp))
            break;
        end = q;
    }
    return end;
}

/* write all of [s, s + n) to fd; -1 with OSError set (BrokenPipeError for EPIPE) */
static int
write_all_fd(int fd, const char *s, Py_ssize_t n)
{
    while (n > 0) {
        Py_ssize_t chunk = n > (1 << 30) ? (1 << 30) : n, done;
        Py_BEGIN_ALLOW_THREADS
        done = write(fd, s, (size_t)chunk);
        Py_END_ALLOW_THREADS
        if (done < 0) {
            if (errno == EINTR) {
                if (PyErr_CheckSignals() < 0)
                    return -1;
                continue;
            }
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        s += done;
        n -= done;
    }
    return 0;
}

static PyObject *
tablefmt_table(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *header, *columns;
    Py_ssize_t left;
    int headers, as_text = 0, fd = -1;
    if (!PyArg_ParseTuple(args, "OOnp|pi:table", &header, &columns, &left, &headers, &as_text, &fd))
        return NULL;
    if (fd < -1) {
        PyErr_SetString(PyExc_ValueError, "table: fd must be a file descriptor (or -1)");
        return NULL;
    }
    if (!PyList_Check(header) && !PyTuple_Check(header)) {
        PyErr_SetString(PyExc_TypeError, "table: header must be a list or tuple of str");
        return NULL;
    }
    if (!PyList_Check(columns) && !PyTuple_Check(columns)) {
        PyErr_SetString(PyExc_TypeError, "table: columns must be a list or tuple");
        return NULL;
    }
    Py_ssize_t ncols = PySequence_Fast_GET_SIZE(columns);
    if (PySequence_Fast_GET_SIZE(header) != ncols) {
        PyErr_Format(PyExc_ValueError, "table: %zd header cells for %zd columns", PySequence_Fast_GET_SIZE(header),
                     ncols);
        return NULL;
    }
    if (ncols == 0) {
        if (fd >= 0)
            Py_RETURN_NONE;
        return as_text ? PyUnicode_FromStringAndSize("", 0) : PyBytes_FromStringAndSize("", 0);
    }
    Py_ssize_t n = -1, opened = 0;
    Column *cols = PyMem_Calloc((size_t)ncols, sizeof(Column));
    Text *heads = PyMem_Calloc((size_t)ncols, sizeof(Text));
    PyObject *out = NULL;
    if (!cols || !heads) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t j = 0; j < ncols; j++) {
        char what[48];
        PyOS_snprintf(what, sizeof what, "table: column %zd", j);
        Py_ssize_t nj = 0;
        opened = j + 1;
        if (column_open(PySequence_Fast_GET_ITEM(columns, j), &cols[j], &nj, what) < 0)
            goto fail;
        if (n >= 0 && nj != n) {
            PyErr_Format(PyExc_ValueError, "table: column %zd has %zd rows, column 0 has %zd", j, nj, n);
            goto fail;
        }
        n = nj;
        if (text_of(PySequence_Fast_GET_ITEM(header, j), &heads[j], "table: header", j) < 0)
            goto fail;
        if (headers && heads[j].nchars > cols[j].width)
            cols[j].width = heads[j].nchars;
    }
    if (n == 0 && !headers) {
        if (fd >= 0) {
            out = Py_None;
            Py_INCREF(out);
        } else
            out = as_text ? PyUnicode_FromStringAndSize("", 0) : PyBytes_FromStringAndSize("", 0);
        goto fail;  /* (cleanup) */
    }
    if (fd >= 0) {  /* click strips ANSI escape sequences from text written to a pipe: the caller's */
        int esc = 0;
        for (Py_ssize_t j = 0; j < ncols; j++)
            esc |= cols[j].has_esc || (headers && memchr(heads[j].utf8, 0x1b, (size_t)heads[j].nbytes));
        if (esc) {
            out = Py_NotImplemented;
            Py_INCREF(out);
            goto fail;  /* (cleanup; nothing written) */
        }
    }
    /* the last column holds strings: every line right-stripped (an empty list counts as strings) */
    int strip = cols[ncols - 1].kind != COL_INT || cols[ncols - 1].ints.n == 0;
    size_t line = 2 * (size_t)(ncols - 1) + 1, total = 0;
    for (Py_ssize_t j = 0; j < ncols; j++) {
        line += (size_t)cols[j].width;
        total += (size_t)cols[j].extra;
    }
    if (headers)
        for (Py_ssize_t j = 0; j < ncols; j++)
            total += (size_t)(heads[j].nbytes - heads[j].nchars);
    /* no cell has a byte past ASCII: a str is written in place (no bytes to decode) */
    int ascii_text = as_text && total == 0 && fd < 0;
    /* to a file descriptor: through a buffer of whole lines, flushed when the longest line might not fit */
    size_t maxline = line + 1, cap = 0;
    for (Py_ssize_t j = 0; j < ncols; j++)
        maxline += (size_t)cols[j].max_extra + (size_t)(heads[j].nbytes - heads[j].nchars);
    total += line * (size_t)(n + (headers ? 1 : 0));
    if (fd >= 0) {
        cap = maxline * 2 > (1 << 18) ? maxline * 2 : (1 << 18);
        out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)cap);
    } else
        out = ascii_text ? PyUnicode_New((Py_ssize_t)total, 127) : PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (!out)
        goto fail;
    char *base = ascii_text ? (char *)PyUnicode_1BYTE_DATA(out) : PyBytes_AS_STRING(out), *p = base;
    if (headers) {
        char *ls = p;
        for (Py_ssize_t j = 0; j < ncols; j++) {
            if (j)
                p = put_spaces(p, 2);
            p = put_text(p, heads[j].utf8, heads[j].nbytes, cols[j].width - heads[j].nchars, j < left);
        }
        p = rstrip_utf8(ls, p);
        if (n)
            *p++ = '\n';
    }
    char num[48];
    for (Py_ssize_t i = 0; i < n; i++) {
        if (fd >= 0 && cap - (size_t)(p - base) < maxline) {
            if (write_all_fd(fd, base, p - base) < 0)
                goto fail;
            p = base;
        }
        char *ls = p;
        for (Py_ssize_t j = 0; j < ncols; j++) {
            Column *c = &cols[j];
            int lj = j < left;
            if (j)
                p = put_spaces(p, 2);
            if (c->kind == COL_INT) {
                i128 v;
                if (ints_get(&c->ints, i, &v, "table") < 0)
                    goto fail;
                char *s = int_text(v, num + sizeof num);
                Py_ssize_t k = (num + sizeof num) - s;
                if (k > c->width) {
                    PyErr_SetString(PyExc_RuntimeError, "table: a column changed while it was written");
                    goto fail;
                }
                p = put_text(p, s, k, c->width - k, lj);
            } else if (c->kind == COL_MAP) {
                Text *t = &c->cells[c->at8 ? (Py_ssize_t)c->at8[i] : (Py_ssize_t)c->at32[i]];
                p = put_text(p, t->utf8, t->nbytes, c->width - t->nchars, lj);
            } else {
                Text t;
                /* (measured again: no Python code has run since -- the flags were read first -- so a
                 * list's str are those measured; a blob's cells are read in order) */
                if (texts_get(&c->texts, i, &t, "table") < 0)
                    goto fail;
                if (c->kind == COL_SUFFIX) {
                    int f = c->flag[i];
                    Py_ssize_t w = t.nchars + (f ? c->suffix.nchars : 0);
                    if (w > c->width) {
                        PyErr_SetString(PyExc_RuntimeError, "table: a column changed while it was written");
                        goto fail;
                    }
                    if (!lj)
                        p = put_spaces(p, c->width - w);
                    p = put_bytes(p, t.utf8, t.nbytes);
                    if (f)
                        p = put_bytes(p, c->suffix.utf8, c->suffix.nbytes);
                    if (lj)
                        p = put_spaces(p, c->width - w);
                } else {
                    if (t.nchars > c->width) {
                        PyErr_SetString(PyExc_RuntimeError, "table: a column changed while it was written");
                        goto fail;
                    }
                    p = put_text(p, t.utf8, t.nbytes, c->width - t.nchars, lj);
                }
            }
        }
        if (strip)
            p = rstrip_utf8(ls, p);
        if (i + 1 < n)
            *p++ = '\n';
    }
    if ((size_t)(p - base) > (fd >= 0 ? cap : total)) {  /* cannot happen: the sizes were measured above */
        PyErr_SetString(PyExc_SystemError, "table: output overran its measured size");
        goto fail;
    }
    if (fd >= 0) {  /* the last line and its newline (as click.echo ends text) */
        *p++ = '\n';
        if (write_all_fd(fd, base, p - base) < 0)
            goto fail;
        Py_DECREF(out);
        out = Py_None;
        Py_INCREF(out);
        for (Py_ssize_t j = 0; j < opened; j++)
            column_free(&cols[j]);
        PyMem_Free(cols);
        PyMem_Free(heads);
        return out;
    }
    for (Py_ssize_t j = 0; j < opened; j++)
        column_free(&cols[j]);
    PyMem_Free(cols);
    PyMem_Free(heads);
    if (ascii_text) {
        *p = 0;
        if (PyUnicode_Resize(&out, p - base) < 0)
            return NULL;
        return out;
    }
    if (_PyBytes_Resize(&out, p - base) < 0)
        return NULL;
    if (as_text) {
        PyObject *text = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(out), PyBytes_GET_SIZE(out), "strict");
        Py_DECREF(out);
        return text;
    }
    return out;
fail:
    if (cols)
        for (Py_ssize_t j = 0; j < opened; j++)
            column_free(&cols[j]);
    PyMem_Free(cols);
    PyMem_Free(heads);
    if (PyErr_Occurred()) {
        Py_XDECREF(out);
        return NULL;
    }
    return out;
}

static PyObject *
tablefmt_distinct(PyObject *self, PyObject *values)
{
    (void)self;
    IntSource s;
    IntMap m = {NULL, NULL, 0};
    if (ints_open(values, &s, "distinct") < 0) {
        ints_release(&s);
        return NULL;
    }
    if (map_init(&m, s.n) < 0) {
        ints_release(&s);
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (!out)
        goto fail;
    for (Py_ssize_t i = 0; i < s.n; i++) {
        i128 v;
        if (ints_get(&s, i, &v, "distinct") < 0)
            goto fail;
        size_t h = map_slot(&m, v);
        if (m.idx[h] != -1)
            continue;
        m.keys[h] = v;
        m.idx[h] = i;
        PyObject *x = v < 0 ? PyLong_FromLongLong((long long)v) : PyLong_FromUnsignedLongLong((unsigned long long)v);
        if (!x || PyList_Append(out, x) < 0) {
            Py_XDECREF(x);
            goto fail;
        }
        Py_DECREF(x);
    }
    map_free(&m);
    ints_release(&s);
    return out;
fail:
    Py_XDECREF(out);
    map_free(&m);
    ints_release(&s);
    return NULL;
}

/* write_text(fd, text): the UTF-8 of str `text` written to file descriptor fd, all of it (an ASCII
 * str's own bytes: no encoded copy); OSError (BrokenPipeError for EPIPE) when a write fails */
static PyObject *
tablefmt_write_text(PyObject *self, PyObject *args)
{
    (void)self;
    int fd;
    PyObject *text;
    if (!PyArg_ParseTuple(args, "iU:write_text", &fd, &text))
        return NULL;
    Py_ssize_t n;
    const char *p = PyUnicode_AsUTF8AndSize(text, &n);
    if (p == NULL)
        return NULL;
    while (n > 0) {
        Py_ssize_t chunk = n > (1 << 30) ? (1 << 30) : n, done;
        Py_BEGIN_ALLOW_THREADS
        done = write(fd, p, (size_t)chunk);
        Py_END_ALLOW_THREADS
        if (done < 0) {
            if (errno == EINTR) {
                if (PyErr_CheckSignals() < 0)
                    return NULL;
                continue;
            }
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        p += done;
        n -= done;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"table", tablefmt_table, METH_VARARGS,
     "table(header, columns, left, headers, as_text=False, fd=-1) -> bytes, str or None: the text table."},
    {"write_text", tablefmt_write_text, METH_VARARGS,
     "write_text(fd, text): the UTF-8 of str text written to file descriptor fd, all of it (no encoded copy)."},
    {"distinct", tablefmt_distinct, METH_O,
     "distinct(values) -> list[int]: the distinct values of a list of int or 8-byte integer buffer, in order."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_tablefmt",
    "thinpool's CLI tables written in C (thinpool.cli.tables uses it when it was built).", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__tablefmt(void)
{
    return PyModule_Create(&module);
}
