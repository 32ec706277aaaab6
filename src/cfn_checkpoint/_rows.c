/* Rows of a checkpoint read and written back in C (see image.NativeRows, which types it).
 *
 * A row is the msgpack encoding of [key, type, value, has_ttl, native or false]. A
 * recovery needs, of each row, its key, its bytes (for its digest) and the commands
 * that write it back. In Python that meant a list, a bytes object a field and a tuple
 * a command, each packed again by hiredis: about 20 ms of 10,000 keys. Here a chunk
 * is cut into rows with no object made but the key and the row's bytes, and the
 * commands of the plain rows (strings and lists, most of a task) are written as RESP
 * straight from those bytes.
 *
 * Every read is bounds-checked: bytes that are not what they claim raise ValueError,
 * never read past their end.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_DEPTH 64
#define DEL_KEYS 1000

typedef struct {
    const unsigned char *p;
    const unsigned char *end;
} Cursor;

/* Why the last read failed (a static string). */
static const char *failure;

static int fail(const char *why) {
    failure = why;
    return -1;
}

static int take(Cursor *c, Py_ssize_t n, const unsigned char **out) {
    if (n < 0 || c->end - c->p < n)
        return fail("truncated");
    *out = c->p;
    c->p += n;
    return 0;
}

static int read_be(Cursor *c, int n, uint64_t *out) {
    const unsigned char *s;
    if (take(c, n, &s) < 0)
        return -1;
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = (v << 8) | s[i];
    *out = v;
    return 0;
}

/* A str or bin at the cursor: 1 and its bytes, 0 (cursor unmoved) for another type. */
static int read_raw(Cursor *c, const unsigned char **s, Py_ssize_t *len) {
    if (c->p >= c->end)
        return fail("truncated");
    unsigned char b = *c->p;
    uint64_t n;
    int width;
    if ((b & 0xe0) == 0xa0) {
        c->p++;
        n = b & 0x1f;
        width = 0;
    } else if (b == 0xd9 || b == 0xc4) {
        width = 1;
    } else if (b == 0xda || b == 0xc5) {
        width = 2;
    } else if (b == 0xdb || b == 0xc6) {
        width = 4;
    } else {
        return 0;
    }
    if (width) {
        c->p++;
        if (read_be(c, width, &n) < 0)
            return -1;
    }
    if (n > (uint64_t)(c->end - c->p))
        return fail("truncated");
    *len = (Py_ssize_t)n;
    return take(c, *len, s) < 0 ? -1 : 1;
}

/* An array at the cursor: 1 and its length, 0 (cursor unmoved) for another type. */
static int read_array(Cursor *c, Py_ssize_t *len) {
    if (c->p >= c->end)
        return fail("truncated");
    unsigned char b = *c->p;
    uint64_t n;
    if ((b & 0xf0) == 0x90) {
        c->p++;
        *len = b & 0x0f;
        return 1;
    }
    if (b != 0xdc && b != 0xdd)
        return 0;
    c->p++;
    if (read_be(c, b == 0xdc ? 2 : 4, &n) < 0)
        return -1;
    if (n > (uint64_t)(c->end - c->p)) /* each item takes a byte at least */
        return fail("truncated");
    *len = (Py_ssize_t)n;
    return 1;
}

/* Step over one object of any type. */
static int skip(Cursor *c, int depth) {
    if (depth > MAX_DEPTH)
        return fail("nested too deeply");
    const unsigned char *s;
    Py_ssize_t len;
    int got = read_raw(c, &s, &len);
    if (got)
        return got < 0 ? -1 : 0;
    got = read_array(c, &len);
    if (got < 0)
        return -1;
    if (got) {
        for (Py_ssize_t i = 0; i < len; i++)
            if (skip(c, depth + 1) < 0)
                return -1;
        return 0;
    }
    unsigned char b = *c->p++;
    uint64_t n;
    if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3)
        return 0; /* fixint, nil, booleans */
    if ((b & 0xf0) == 0x80) { /* fixmap */
        for (Py_ssize_t i = 0; i < 2 * (Py_ssize_t)(b & 0x0f); i++)
            if (skip(c, depth + 1) < 0)
                return -1;
        return 0;
    }
    switch (b) {
    case 0xcc: case 0xd0: return take(c, 1, &s);
    case 0xcd: case 0xd1: return take(c, 2, &s);
    case 0xca: case 0xce: case 0xd2: return take(c, 4, &s);
    case 0xcb: case 0xcf: case 0xd3: return take(c, 8, &s);
    case 0xd4: return take(c, 2, &s); /* fixext: type byte and data */
    case 0xd5: return take(c, 3, &s);
    case 0xd6: return take(c, 5, &s);
    case 0xd7: return take(c, 9, &s);
    case 0xd8: return take(c, 17, &s);
    case 0xc7: case 0xc8: case 0xc9: /* ext 8, 16, 32 */
        if (read_be(c, b == 0xc7 ? 1 : b == 0xc8 ? 2 : 4, &n) < 0)
            return -1;
        if (n >= (uint64_t)(c->end - c->p))
            return fail("truncated");
        return take(c, (Py_ssize_t)n + 1, &s);
    case 0xde: case 0xdf: /* map 16, 32 */
        if (read_be(c, b == 0xde ? 2 : 4, &n) < 0)
            return -1;
        for (uint64_t i = 0; i < 2 * n; i++)
            if (skip(c, depth + 1) < 0)
                return -1;
        return 0;
    default:
        return fail("an invalid type byte"); /* 0xc1 */
    }
}

static PyObject *value_error(const char *what) {
    PyErr_SetString(PyExc_ValueError, what);
    return NULL;
}

/* scan(raw, offset): the key and the bytes of each row from ``offset`` on. */
static PyObject *scan(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer view;
    Py_ssize_t offset = 0;
    if (!PyArg_ParseTuple(args, "y*|n", &view, &offset))
        return NULL;
    PyObject *keys = PyList_New(0), *rows = PyList_New(0), *out = NULL;
    if (keys == NULL || rows == NULL)
        goto done;
    if (offset < 0 || offset > view.len) {
        value_error("offset out of range");
        goto done;
    }
    Cursor c = {(const unsigned char *)view.buf + offset, (const unsigned char *)view.buf + view.len};
    while (c.p < c.end) {
        const unsigned char *start = c.p, *key = NULL;
        Py_ssize_t n = 0, klen = 0;
        int got = read_array(&c, &n);
        if (got == 0 || (got > 0 && n != 5)) {
            value_error("malformed row");
            goto done;
        }
        if (got > 0) {
            got = read_raw(&c, &key, &klen);
            if (got == 0) {
                value_error("malformed row");
                goto done;
            }
        }
        for (int i = 0; got > 0 && i < 4; i++)
            if (skip(&c, 1) < 0)
                got = -1;
        if (got < 0) {
            value_error(failure);
            goto done;
        }
        PyObject *k = PyBytes_FromStringAndSize((const char *)key, klen);
        if (k == NULL || PyList_Append(keys, k) < 0) {
            Py_XDECREF(k);
            goto done;
        }
        Py_DECREF(k);
        PyObject *r = PyBytes_FromStringAndSize((const char *)start, c.p - start);
        if (r == NULL || PyList_Append(rows, r) < 0) {
            Py_XDECREF(r);
            goto done;
        }
        Py_DECREF(r);
    }
    out = PyTuple_Pack(2, keys, rows);
done:
    Py_XDECREF(keys);
    Py_XDECREF(rows);
    PyBuffer_Release(&view);
    return out;
}

/* A plain row: a string or a list of strings, no native type. */
typedef struct {
    const unsigned char *key;
    Py_ssize_t klen;
    int is_list;
    const unsigned char *value; /* a string's bytes, or a list's first item */
    Py_ssize_t vlen;            /* a string's length, or a list's item count */
    const unsigned char *end;   /* the row's end */
    int has_ttl;
} Plain;

static int equals(const unsigned char *s, Py_ssize_t len, const char *word) {
    return (size_t)len == strlen(word) && memcmp(s, word, len) == 0;
}

/* 1 and its fields if ``row`` (a row's bytes) is plain, 0 if it is not, -1 if damaged. */
static int read_plain(const char *row, Py_ssize_t size, Plain *out) {
    Cursor c = {(const unsigned char *)row, (const unsigned char *)row + size};
    Py_ssize_t n;
    const unsigned char *type;
    Py_ssize_t tlen;
    int got = read_array(&c, &n);
    if (got <= 0 || n != 5)
        return got < 0 ? -1 : 0;
    if ((got = read_raw(&c, &out->key, &out->klen)) <= 0)
        return got;
    if ((got = read_raw(&c, &type, &tlen)) <= 0)
        return got;
    if (equals(type, tlen, "string")) {
        out->is_list = 0;
        if ((got = read_raw(&c, &out->value, &out->vlen)) <= 0)
            return got;
    } else if (equals(type, tlen, "list")) {
        out->is_list = 1;
        if ((got = read_array(&c, &out->vlen)) <= 0)
            return got;
        out->value = c.p;
        for (Py_ssize_t i = 0; i < out->vlen; i++) {
            const unsigned char *s;
            Py_ssize_t len;
            if ((got = read_raw(&c, &s, &len)) <= 0)
                return got;
        }
    } else {
        return 0;
    }
    if (c.end - c.p < 2)
        return fail("truncated");
    unsigned char ttl = c.p[0], native = c.p[1];
    if ((ttl != 0xc2 && ttl != 0xc3) || native != 0xc2)
        return 0; /* a TTL flag that is not a boolean, or a native type */
    if (c.p + 2 != c.end)
        return fail("bytes after the row");
    out->has_ttl = ttl == 0xc3;
    out->end = c.end;
    return 1;
}

/* classify(rows, expiries): where ``rows`` holds anything but a plain row as stored
 * whose TTL flag agrees with its expiry (None: no TTL). */
static PyObject *classify(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *rows, *expiries;
    if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &rows, &PyList_Type, &expiries))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(rows);
    if (PyList_GET_SIZE(expiries) != count)
        return value_error("rows and expiries differ in length");
    PyObject *odd = PyList_New(0);
    if (odd == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *row = PyList_GET_ITEM(rows, i);
        Plain plain;
        int got = PyBytes_CheckExact(row)
                      ? read_plain(PyBytes_AS_STRING(row), PyBytes_GET_SIZE(row), &plain)
                      : 0;
        if (got == 1 && plain.has_ttl == (PyList_GET_ITEM(expiries, i) != Py_None))
            continue;
        PyObject *index = PyLong_FromSsize_t(i);
        if (index == NULL || PyList_Append(odd, index) < 0) {
            Py_XDECREF(index);
            Py_DECREF(odd);
            return NULL;
        }
        Py_DECREF(index);
    }
    return odd;
}

/* -- RESP ------------------------------------------------------------------------------- */

/* Bytes written at ``data`` (or, while it is NULL, only counted): the commands are sized
 * in a first pass and written in a second straight into the bytes returned, as three
 * growing buffers cost two more copies and fresh pages of 3.7 MB at 10,000 keys. */
typedef struct {
    char *data;
    size_t len;
    size_t cap; /* bytes that may be written at ``data`` */
} Out;

static void put(Out *o, const void *s, size_t n) {
    if (o->data && o->len + n <= o->cap)
        memcpy(o->data + o->len, s, n);
    o->len += n; /* past ``cap``: found after the pass, nothing written there */
}

/* The decimal digits of ``n`` written backwards from ``end``; returns where they begin. */
static char *digits(char *end, long long n) {
    unsigned long long u = n < 0 ? 0ULL - (unsigned long long)n : (unsigned long long)n;
    do {
        *--end = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (n < 0)
        *--end = '-';
    return end;
}

static void put_header(Out *o, char kind, long long n) {
    char text[32];
    char *end = text + sizeof text - 2;
    end[0] = '\r';
    end[1] = '\n';
    char *start = digits(end, n);
    *--start = kind;
    put(o, start, (size_t)(text + sizeof text - start));
}

static void put_bulk(Out *o, const unsigned char *s, Py_ssize_t n) {
    put_header(o, '$', n);
    put(o, s, (size_t)n);
    put(o, "\r\n", 2);
}

static void put_word(Out *o, const char *word) {
    put_bulk(o, (const unsigned char *)word, (Py_ssize_t)strlen(word));
}

static void put_number(Out *o, long long n) {
    char text[32];
    char *start = digits(text + sizeof text, n);
    put_bulk(o, (const unsigned char *)start, text + sizeof text - start);
}

/* A list's items, each a str or bin (checked by read_plain). */
static void put_items(Out *o, const Plain *row) {
    Cursor c = {row->value, row->end};
    for (Py_ssize_t i = 0; i < row->vlen; i++) {
        const unsigned char *s;
        Py_ssize_t len;
        read_raw(&c, &s, &len);
        put_bulk(o, s, len);
    }
}

static int append_index(PyObject *list, Py_ssize_t i) {
    PyObject *index = PyLong_FromSsize_t(i);
    int failed = index == NULL || PyList_Append(list, index) < 0;
    Py_XDECREF(index);
    return failed ? -1 : 0;
}

typedef struct {
    PyObject *rows, *expiries;
    long long captured, elapsed_locks, elapsed_others;
    Py_buffer lock;
    /* Found by the first pass. */
    PyObject *lapsed, *others;
    Py_ssize_t rebuilt, plain, commands;
} Restore;

/* One pass over the rows: the DELs of lists (``del``), the MSET's pairs (``plain``), the
 * other commands (``body``). The first (``first``, counting bytes only) also fills in
 * what it found; the second writes, its DEL headers sized by the lists the first found. */
static int emit(Restore *r, Out *del, Out *plain, Out *body, int first) {
    Py_ssize_t rebuilt = 0;
    /* The lengths are checked at each step: a list appended to may run a finalizer. */
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(r->rows); i++) {
        if (i >= PyList_GET_SIZE(r->expiries)) {
            PyErr_SetString(PyExc_RuntimeError, "the rows changed while they were written");
            return -1;
        }
        PyObject *row = PyList_GET_ITEM(r->rows, i), *expiry = PyList_GET_ITEM(r->expiries, i);
        if (!PyBytes_CheckExact(row)) {
            if (first && append_index(r->others, i) < 0)
                return -1;
            continue;
        }
        Plain p;
        int got = read_plain(PyBytes_AS_STRING(row), PyBytes_GET_SIZE(row), &p);
        if (got != 1) {
            value_error(got < 0 ? failure : "not a plain row");
            return -1;
        }
        long long pttl = -1;
        int has_ttl = expiry != Py_None;
        if (has_ttl) {
            if (!PyLong_CheckExact(expiry)) { /* no __index__ to run between the passes */
                PyErr_SetString(PyExc_TypeError, "an expiry is not an int");
                return -1;
            }
            long long at = PyLong_AsLongLong(expiry), left;
            if (at == -1 && PyErr_Occurred())
                return -1; /* OverflowError: the caller writes such a row in Python */
            int lock = p.klen >= r->lock.len && memcmp(p.key, r->lock.buf, r->lock.len) == 0;
            if (__builtin_sub_overflow(at, r->captured, &left) ||
                __builtin_sub_overflow(left, lock ? r->elapsed_locks : r->elapsed_others, &pttl)) {
                PyErr_SetString(PyExc_OverflowError, "an expiry out of range");
                return -1;
            }
            if (pttl <= 0) {
                if (first && append_index(r->lapsed, i) < 0)
                    return -1;
                continue;
            }
        }
        if (!p.is_list && !has_ttl) {
            put_bulk(plain, p.key, p.klen);
            put_bulk(plain, p.value, p.vlen);
            r->plain += first;
        } else if (!p.is_list) {
            put_header(body, '*', 5);
            put_word(body, "SET");
            put_bulk(body, p.key, p.klen);
            put_bulk(body, p.value, p.vlen);
            put_word(body, "PX");
            put_number(body, pttl);
            r->commands += first;
        } else {
            if (!first && rebuilt % DEL_KEYS == 0) {
                Py_ssize_t left = r->rebuilt - rebuilt;
                put_header(del, '*', 1 + (left < DEL_KEYS ? left : DEL_KEYS));
                put_word(del, "DEL");
            }
            rebuilt++;
            put_bulk(del, p.key, p.klen);
            if (p.vlen == 0)
                continue; /* the key stays deleted: Redis keeps no empty list */
            put_header(body, '*', 2 + p.vlen);
            put_word(body, "RPUSH");
            put_bulk(body, p.key, p.klen);
            put_items(body, &p);
            r->commands += first;
            if (has_ttl) {
                put_header(body, '*', 3);
                put_word(body, "PEXPIRE");
                put_bulk(body, p.key, p.klen);
                put_number(body, pttl);
                r->commands += first;
            }
        }
    }
    if (first) {
        r->rebuilt = rebuilt;
        for (Py_ssize_t done = 0; done < rebuilt; done += DEL_KEYS) {
            Py_ssize_t left = rebuilt - done;
            put_header(del, '*', 1 + (left < DEL_KEYS ? left : DEL_KEYS));
            put_word(del, "DEL");
            r->commands++;
        }
    }
    return 0;
}

/* restore(rows, expiries, captured_at_ms, elapsed_locks, elapsed_others, lock_prefix):
 * the RESP of the commands that write the plain rows, as restore_commands makes them:
 * (bytes, number of commands, indexes of rows whose TTL ran out, indexes of the items
 * that are not rows as stored). */
static PyObject *restore(PyObject *self, PyObject *args) {
    (void)self;
    Restore r = {0};
    if (!PyArg_ParseTuple(args, "O!O!LLLy*", &PyList_Type, &r.rows, &PyList_Type, &r.expiries,
                          &r.captured, &r.elapsed_locks, &r.elapsed_others, &r.lock))
        return NULL;
    PyObject *out = NULL, *resp = NULL;
    r.lapsed = PyList_New(0);
    r.others = PyList_New(0);
    if (r.lapsed == NULL || r.others == NULL)
        goto done;
    if (PyList_GET_SIZE(r.expiries) != PyList_GET_SIZE(r.rows)) {
        value_error("rows and expiries differ in length");
        goto done;
    }
    Out del = {NULL, 0, 0}, plain = {NULL, 0, 0}, body = {NULL, 0, 0}, mset = {NULL, 0, 0};
    if (emit(&r, &del, &plain, &body, 1) < 0)
        goto done;
    if (r.plain) {
        put_header(&mset, '*', 1 + 2 * r.plain);
        put_word(&mset, "MSET");
        r.commands++;
    }
    resp = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(del.len + mset.len + plain.len + body.len));
    if (resp == NULL)
        goto done;
    char *at = PyBytes_AS_STRING(resp);
    Out d = {at, 0, del.len}, m = {at + del.len, 0, mset.len};
    Out p = {at + del.len + mset.len, 0, plain.len};
    Out b = {at + del.len + mset.len + plain.len, 0, body.len};
    if (r.plain) {
        put_header(&m, '*', 1 + 2 * r.plain);
        put_word(&m, "MSET");
    }
    if (emit(&r, &d, &p, &b, 0) < 0)
        goto done;
    if (d.len != del.len || m.len != mset.len || p.len != plain.len || b.len != body.len) {
        PyErr_SetString(PyExc_RuntimeError, "the rows changed while they were written");
        goto done;
    }
    out = Py_BuildValue("OnOO", resp, r.commands, r.lapsed, r.others);
done:
    Py_XDECREF(resp);
    Py_XDECREF(r.lapsed);
    Py_XDECREF(r.others);
    PyBuffer_Release(&r.lock);
    return out;
}

/* -- packing rows (a capture) ------------------------------------------------------------ */

/* A msgpack length header: ``fix | n`` below ``fixed``, else ``b16`` and 16 bits, else
 * the next byte and 32 bits. */
static size_t header(unsigned char *out, size_t n, size_t fixed, unsigned char fix,
                     unsigned char b16) {
    if (n < fixed) {
        out[0] = (unsigned char)(fix | n);
        return 1;
    }
    if (n < 65536) {
        out[0] = b16, out[1] = (unsigned char)(n >> 8), out[2] = (unsigned char)n;
        return 3;
    }
    out[0] = (unsigned char)(b16 + 1), out[1] = (unsigned char)(n >> 24);
    out[2] = (unsigned char)(n >> 16), out[3] = (unsigned char)(n >> 8), out[4] = (unsigned char)n;
    return 5;
}

/* The header of a str of ``n`` bytes as msgpack-python packs bytes with
 * use_bin_type=False (fixstr, then str16 and str32: no str8), and of an array. */
static size_t raw_header(unsigned char *out, size_t n) { return header(out, n, 32, 0xa0, 0xda); }

static size_t array_header(unsigned char *out, size_t n) { return header(out, n, 16, 0x90, 0xdc); }

/* The longest str or array msgpack packs (its lengths are 32 bits). */
#define MAX_RAW 0xffffffffLL

/* Bytes a str of ``n`` bytes takes, its header included. */
static size_t raw_size(size_t n) { return (n < 32 ? 1 : n < 65536 ? 3 : 5) + n; }

static unsigned char *put_raw(unsigned char *at, const char *s, size_t n) {
    at += raw_header(at, n);
    memcpy(at, s, n);
    return at + n;
}

static PyObject *sort_keys; /* the flat list being sorted (qsort has no context) */

static int by_key(const void *a, const void *b) {
    PyObject *x = PyList_GET_ITEM(sort_keys, 4 * *(const Py_ssize_t *)a);
    PyObject *y = PyList_GET_ITEM(sort_keys, 4 * *(const Py_ssize_t *)b);
    Py_ssize_t nx = PyBytes_GET_SIZE(x), ny = PyBytes_GET_SIZE(y);
    int c = memcmp(PyBytes_AS_STRING(x), PyBytes_AS_STRING(y), (size_t)(nx < ny ? nx : ny));
    return c ? c : (nx > ny) - (nx < ny);
}

static int by_key_pair(PyObject *flat, Py_ssize_t a, Py_ssize_t b) {
    PyObject *saved = sort_keys;
    sort_keys = flat;
    int c = by_key(&a, &b);
    sort_keys = saved;
    return c;
}

/* pack(flat, now_ms): a capture's rows in key order, as image.packed_rows packs them:
 * (keys, expiries, rows). ValueError for anything it does not take (a key twice,
 * a value of another type): the caller packs those in Python. */
static PyObject *pack(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *flat;
    long long now;
    if (!PyArg_ParseTuple(args, "OL", &flat, &now))
        return NULL;
    if (!PyList_CheckExact(flat))
        return value_error("a capture reply is a list");
    Py_ssize_t size = PyList_GET_SIZE(flat);
    if (size % 4)
        return value_error("a capture reply holds four items a key");
    Py_ssize_t n = size / 4;
    /* The lists first: making one may run the cyclic collector (and so any finalizer),
     * which must not change ``flat`` once it has been checked. They grow by appending,
     * never holding an empty slot that a collection could show to Python code. */
    PyObject *keys = PyList_New(0), *expiries = PyList_New(0), *rows = PyList_New(0), *out = NULL;
    Py_ssize_t *order = NULL;
    long long *instants = NULL;
    if (keys == NULL || expiries == NULL || rows == NULL)
        goto done;
    order = PyMem_Malloc(sizeof(Py_ssize_t) * (n ? n : 1));
    instants = PyMem_Malloc(sizeof(long long) * (n ? n : 1));
    if (order == NULL || instants == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    /* Everything that can refuse the input is checked before the lists are filled:
     * an exception made while they hold empty slots could run the collector. */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key = PyList_GET_ITEM(flat, 4 * i), *type = PyList_GET_ITEM(flat, 4 * i + 1);
        PyObject *expiry = PyList_GET_ITEM(flat, 4 * i + 2), *value = PyList_GET_ITEM(flat, 4 * i + 3);
        int ok = PyBytes_CheckExact(key) && PyBytes_CheckExact(type) && PyLong_CheckExact(expiry);
        ok = ok && PyBytes_GET_SIZE(key) <= MAX_RAW && PyBytes_GET_SIZE(type) <= MAX_RAW;
        if (ok && PyList_CheckExact(value)) {
            ok = PyList_GET_SIZE(value) <= MAX_RAW;
            for (Py_ssize_t j = 0; ok && j < PyList_GET_SIZE(value); j++) {
                PyObject *item = PyList_GET_ITEM(value, j);
                ok = PyBytes_CheckExact(item) && PyBytes_GET_SIZE(item) <= MAX_RAW;
            }
        } else if (ok) {
            ok = PyBytes_CheckExact(value) && PyBytes_GET_SIZE(value) <= MAX_RAW;
        }
        if (!ok) {
            value_error("not a capture's item");
            goto done;
        }
        int overflow = 0;
        instants[i] = PyLong_AsLongLongAndOverflow(expiry, &overflow);
        if (overflow) {
            value_error("an expiry beyond 64 bits");
            goto done;
        }
        order[i] = i;
    }
    sort_keys = flat;
    qsort(order, (size_t)n, sizeof *order, by_key);
    sort_keys = NULL;
    for (Py_ssize_t k = 1; k < n; k++) {
        if (by_key_pair(flat, order[k - 1], order[k]) == 0) {
            value_error("a key twice");
            goto done;
        }
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        Py_ssize_t i = order[k];
        PyObject *key = PyList_GET_ITEM(flat, 4 * i), *type = PyList_GET_ITEM(flat, 4 * i + 1);
        PyObject *expiry = PyList_GET_ITEM(flat, 4 * i + 2), *value = PyList_GET_ITEM(flat, 4 * i + 3);
        long long at = instants[i];
        const char *t = PyBytes_AS_STRING(type);
        Py_ssize_t tlen = PyBytes_GET_SIZE(type);
        int dump = tlen >= 5 && memcmp(t, "dump:", 5) == 0;
        size_t bytes = 1 + raw_size((size_t)PyBytes_GET_SIZE(key)) + (dump ? raw_size(4) : raw_size((size_t)tlen)) + 2;
        bytes += dump ? raw_size((size_t)tlen - 5) - 1 : 0; /* the native type for false */
        if (PyList_CheckExact(value)) {
            Py_ssize_t m = PyList_GET_SIZE(value);
            bytes += m < 16 ? 1 : m < 65536 ? 3 : 5;
            for (Py_ssize_t j = 0; j < m; j++)
                bytes += raw_size((size_t)PyBytes_GET_SIZE(PyList_GET_ITEM(value, j)));
        } else {
            bytes += raw_size((size_t)PyBytes_GET_SIZE(value));
        }
        PyObject *row = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)bytes);
        if (row == NULL)
            goto done;
        unsigned char *w = (unsigned char *)PyBytes_AS_STRING(row);
        *w++ = 0x95;
        w = put_raw(w, PyBytes_AS_STRING(key), (size_t)PyBytes_GET_SIZE(key));
        w = dump ? put_raw(w, "dump", 4) : put_raw(w, t, (size_t)tlen);
        if (PyList_CheckExact(value)) {
            Py_ssize_t m = PyList_GET_SIZE(value);
            w += array_header(w, (size_t)m);
            for (Py_ssize_t j = 0; j < m; j++) {
                PyObject *item = PyList_GET_ITEM(value, j);
                w = put_raw(w, PyBytes_AS_STRING(item), (size_t)PyBytes_GET_SIZE(item));
            }
        } else {
            w = put_raw(w, PyBytes_AS_STRING(value), (size_t)PyBytes_GET_SIZE(value));
        }
        *w++ = at >= 0 ? 0xc3 : 0xc2;
        if (dump)
            w = put_raw(w, t + 5, (size_t)tlen - 5);
        else
            *w++ = 0xc2;
        if ((size_t)(w - (unsigned char *)PyBytes_AS_STRING(row)) != bytes) {
            Py_DECREF(row);
            PyErr_SetString(PyExc_RuntimeError, "a row was sized wrong");
            goto done;
        }
        int failed = PyList_Append(rows, row) < 0;
        Py_DECREF(row);
        if (failed || PyList_Append(keys, key) < 0)
            goto done;
        PyObject *kept = at < 0 || at > now ? (Py_INCREF(expiry), expiry) : PyLong_FromLongLong(now);
        failed = kept == NULL || PyList_Append(expiries, kept) < 0;
        Py_XDECREF(kept);
        if (failed)
            goto done;
    }
    out = PyTuple_Pack(3, keys, expiries, rows);
done:
    PyMem_Free(order);
    PyMem_Free(instants);
    Py_XDECREF(keys);
    Py_XDECREF(expiries);
    Py_XDECREF(rows);
    return out;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, "The key and the bytes of each row of a msgpack stream of rows."},
    {"classify", classify, METH_VARARGS, "Where rows are not plain rows as stored, or disagree with their expiry."},
    {"restore", restore, METH_VARARGS, "The RESP of the commands that write the plain rows."},
    {"pack", pack, METH_VARARGS, "A capture's rows in key order: keys, expiries, rows."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_rows", NULL, -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__rows(void) { return PyModule_Create(&module); }
