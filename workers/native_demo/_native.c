/*
 * native_demo._native: a small, real C extension that does useful work and can also fail in
 * every way native code fails in production (segfault, abort, leak, hang with the GIL held).
 *
 * It exists so Minions can be tested and benchmarked against genuine native faults rather than
 * Python imitations of them. It must only ever be imported inside a worker process.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Inputs at least this large are checksummed with the GIL released: below it the cost of
 * dropping and re-taking the GIL outweighs what other threads could gain. */
#define CRC32_NOGIL_THRESHOLD (64 * 1024)

/* ---- crc32: the zlib / IEEE 802.3 polynomial, slicing-by-one table ----------------------- */

static uint32_t crc_table[256];

static void
crc32_init_table(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) {
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        }
        crc_table[i] = c;
    }
}

static uint32_t
crc32_compute(const unsigned char *buf, Py_ssize_t len)
{
    uint32_t c = 0xFFFFFFFFu;
    for (Py_ssize_t i = 0; i < len; i++) {
        c = crc_table[(c ^ buf[i]) & 0xFF] ^ (c >> 8);
    }
    return c ^ 0xFFFFFFFFu;
}

static PyObject *
native_crc32(PyObject *self, PyObject *arg)
{
    Py_buffer view;
    uint32_t crc;

    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (view.len >= CRC32_NOGIL_THRESHOLD) {
        /* The buffer stays valid: we hold a buffer export, so the owner cannot resize it. */
        Py_BEGIN_ALLOW_THREADS
        crc = crc32_compute((const unsigned char *)view.buf, view.len);
        Py_END_ALLOW_THREADS
    }
    else {
        crc = crc32_compute((const unsigned char *)view.buf, view.len);
    }
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(crc);
}

/* ---- count_primes: sieve of Eratosthenes, CPU-bound, GIL released ------------------------- */

static PyObject *
native_count_primes(PyObject *self, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    Py_ssize_t count = 0;
    unsigned char *composite;

    if (n == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (n <= 2) {
        return PyLong_FromLong(0);
    }
    composite = calloc((size_t)n, 1);
    if (composite == NULL) {
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 2; i < n; i++) {
        if (composite[i]) {
            continue;
        }
        count++;
        if (i <= (n - 1) / i) {
            for (Py_ssize_t j = i * i; j < n; j += i) {
                composite[j] = 1;
            }
        }
    }
    Py_END_ALLOW_THREADS
    free(composite);
    return PyLong_FromSsize_t(count);
}

/* ---- deliberate faults -------------------------------------------------------------------- */

static PyObject *
native_segfault(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    /* volatile: the compiler may not prove the write undefined and drop or replace it. */
    volatile int *volatile p = NULL;
    *p = 42;
    Py_RETURN_NONE; /* not reached */
}

static PyObject *
native_abort(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    abort();
    Py_RETURN_NONE; /* not reached */
}

/* Total leaked so far in this process, and the newest leaked block; GIL held for both.
 * The blocks are chained through their first word only so the compiler sees the allocation
 * escape: an unused malloc+memset pair is legally deleted at -O2 and RSS would never grow. */
static Py_ssize_t leaked_mib = 0;
static void *leak_head = NULL;

static PyObject *
native_leak(PyObject *self, PyObject *arg)
{
    Py_ssize_t mib = PyLong_AsSsize_t(arg);
    size_t size;
    void *block;

    if (mib == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (mib < 0) {
        PyErr_SetString(PyExc_ValueError, "leak(): mib must be >= 0");
        return NULL;
    }
    if (mib > 0) {
        size = (size_t)mib * 1024 * 1024;
        block = malloc(size);
        if (block == NULL) {
            return PyErr_NoMemory();
        }
        /* Touch every page so the leak shows in RSS, not just in virtual size. */
        memset(block, 0xA5, size);
        *(void **)block = leak_head;
        leak_head = block; /* never freed */
        leaked_mib += mib;
    }
    return PyLong_FromSsize_t(leaked_mib);
}

static PyObject *
native_spin(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    /* Holds the GIL forever: no Python signal handler or thread in this process can run again.
     * Only an external SIGKILL (or an unhandled fatal signal) ends it. */
    volatile uint64_t counter = 0;
    for (;;) {
        counter++;
    }
    Py_RETURN_NONE; /* not reached */
}

static PyObject *
native_ping(PyObject *self, PyObject *arg)
{
    if (!PyLong_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "ping() expects an int, got %.100s", Py_TYPE(arg)->tp_name);
        return NULL;
    }
    return Py_NewRef(arg);
}

/* ---- module ------------------------------------------------------------------------------- */

static PyMethodDef native_methods[] = {
    {"crc32", native_crc32, METH_O,
     "crc32(data, /) -> int\n\nCRC-32 of a bytes-like object; equals zlib.crc32(data). "
     "Releases the GIL for inputs of 64 KiB or more."},
    {"count_primes", native_count_primes, METH_O,
     "count_primes(n, /) -> int\n\nNumber of primes below n (sieve, GIL released)."},
    {"segfault", native_segfault, METH_NOARGS,
     "segfault() -> NoReturn\n\nWrite through a NULL pointer: the process dies of SIGSEGV."},
    {"abort", native_abort, METH_NOARGS,
     "abort() -> NoReturn\n\nCall C abort(): the process dies of SIGABRT."},
    {"leak", native_leak, METH_O,
     "leak(mib, /) -> int\n\nAllocate and touch mib MiB that is never freed; "
     "return the MiB leaked so far in this process."},
    {"spin", native_spin, METH_NOARGS,
     "spin() -> NoReturn\n\nLoop forever holding the GIL; only SIGKILL ends it."},
    {"ping", native_ping, METH_O, "ping(x, /) -> int\n\nReturn x unchanged (latency probe)."},
    {NULL, NULL, 0, NULL},
};

static int
native_exec(PyObject *module)
{
    crc32_init_table();
    return 0;
}

static PyModuleDef_Slot native_slots[] = {
    {Py_mod_exec, native_exec},
    {0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "native_demo._native",
    .m_doc = "Demo native extension for Minions: real work plus deliberate native faults.",
    .m_size = 0,
    .m_methods = native_methods,
    .m_slots = native_slots,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    return PyModuleDef_Init(&native_module);
}
