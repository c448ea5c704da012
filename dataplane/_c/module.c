/* CPython binding of the fastpath engine (engine.c): istiopy.dataplane._fastpath.
 *
 * Thin on purpose: every method only queues a command or drains events, so Python never waits for the
 * byte path, and the byte path never takes the GIL. Socket fds passed in are owned by the engine from
 * then on (callers pass socket.detach()).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/crypto.h>
#include <unistd.h>

#include "engine.h"
#include "memtls.h"

typedef struct {
    PyObject_HEAD
    SSL_CTX *ctx;
    int server;
} TlsConfig;

typedef struct {
    PyObject_HEAD
    fp_engine *e;
} Engine;

/* ---- TlsConfig ----------------------------------------------------------------------------- */

static int tls_init(TlsConfig *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"chain_pem", "key_pem", "roots_pem", "server", NULL};
    const char *chain, *key, *roots;
    int server;
    char err[256] = "";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "yyyp", names, &chain, &key, &roots, &server)) return -1;
    SSL_CTX *ctx = fp_tls_ctx(chain, key, roots, server, err, sizeof err);
    if (!ctx) {
        PyErr_Format(PyExc_ValueError, "TLS configuration rejected: %s", err);
        return -1;
    }
    if (self->ctx) SSL_CTX_free(self->ctx);
    self->ctx = ctx;
    self->server = server;
    return 0;
}

static void tls_dealloc(TlsConfig *self) {
    if (self->ctx) SSL_CTX_free(self->ctx);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject TlsConfigType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "istiopy.dataplane._fastpath.TlsConfig",
    .tp_basicsize = sizeof(TlsConfig),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "TLS 1.3 mTLS configuration: TlsConfig(chain_pem, key_pem, roots_pem, server)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)tls_init,
    .tp_dealloc = (destructor)tls_dealloc,
};

/* ---- Engine -------------------------------------------------------------------------------- */

static int engine_init(Engine *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"threads", NULL};
    int threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|i", names, &threads)) return -1;
    if (threads < 1 || threads > FP_MAX_WORKERS) {
        PyErr_Format(PyExc_ValueError, "threads must be 1..%d, not %d", FP_MAX_WORKERS, threads);
        return -1;
    }
    if (self->e) return 0;
    self->e = fp_engine_new(threads);
    if (!self->e || fp_engine_start(self->e) != 0) {
        fp_engine_free(self->e);
        self->e = NULL;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static void engine_close_impl(Engine *self) {
    if (!self->e) return;
    fp_engine *e = self->e;
    self->e = NULL;
    Py_BEGIN_ALLOW_THREADS fp_engine_free(e);
    Py_END_ALLOW_THREADS
}

static void engine_dealloc(Engine *self) {
    engine_close_impl(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static fp_engine *live(Engine *self) {
    if (!self->e) PyErr_SetString(PyExc_RuntimeError, "engine closed");
    return self->e;
}

static PyObject *engine_close(Engine *self, PyObject *unused) {
    (void)unused;
    engine_close_impl(self);
    Py_RETURN_NONE;
}

static PyObject *engine_fileno(Engine *self, PyObject *unused) {
    (void)unused;
    fp_engine *e = live(self);
    return e ? PyLong_FromLong(fp_engine_event_fd(e)) : NULL;
}

static PyObject *engine_relay(Engine *self, PyObject *args) {
    int a, b;
    fp_engine *e = live(self);
    if (!e || !PyArg_ParseTuple(args, "ii", &a, &b)) return NULL;
    return PyLong_FromUnsignedLongLong(fp_cmd_relay(e, a, b));
}

static PyObject *engine_conn(Engine *self, PyObject *args) {
    int fd, server;
    PyObject *cfg;
    fp_engine *e = live(self);
    if (!e || !PyArg_ParseTuple(args, "iOp", &fd, &cfg, &server)) return NULL;
    SSL_CTX *ctx = NULL;
    if (cfg != Py_None) {
        if (!PyObject_TypeCheck(cfg, &TlsConfigType)) {
            PyErr_SetString(PyExc_TypeError, "tls must be a TlsConfig or None");
            return NULL;
        }
        if (((TlsConfig *)cfg)->server != server) {
            PyErr_SetString(PyExc_ValueError, "TlsConfig role does not match");
            return NULL;
        }
        ctx = ((TlsConfig *)cfg)->ctx;
    }
    return PyLong_FromUnsignedLongLong(fp_cmd_conn(e, fd, ctx, server));
}

/* headers: a sequence of (name, value) str pairs, flattened to name\0value\0... */
static PyObject *engine_open(Engine *self, PyObject *args) {
    unsigned long long conn;
    int fd;
    PyObject *headers;
    fp_engine *e = live(self);
    if (!e || !PyArg_ParseTuple(args, "KiO", &conn, &fd, &headers)) return NULL;
    PyObject *seq = PySequence_Fast(headers, "headers must be a sequence of (name, value)");
    if (!seq) return NULL;
    PyObject *buf = PyBytes_FromStringAndSize(NULL, 0);
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; buf && i < n; i++) {
        const char *name, *value;
        Py_ssize_t nl, vl;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "s#s#", &name, &nl, &value, &vl)) {
            Py_CLEAR(buf);
            break;
        }
        Py_ssize_t old = PyBytes_GET_SIZE(buf);
        if (_PyBytes_Resize(&buf, old + nl + vl + 2) < 0) break;
        char *p = PyBytes_AS_STRING(buf) + old;
        memcpy(p, name, (size_t)nl);
        p[nl] = 0;
        memcpy(p + nl + 1, value, (size_t)vl);
        p[nl + 1 + vl] = 0;
    }
    Py_DECREF(seq);
    if (!buf) return NULL;
    uint64_t id = fp_cmd_open(e, conn, fd, PyBytes_AS_STRING(buf), (size_t)PyBytes_GET_SIZE(buf));
    Py_DECREF(buf);
    return PyLong_FromUnsignedLongLong(id);
}

static PyObject *engine_accept(Engine *self, PyObject *args) {
    unsigned long long id, conn;
    int sid, fd;
    const char *prefix = "";
    Py_ssize_t plen = 0;
    fp_engine *e = live(self);
    if (!e || !PyArg_ParseTuple(args, "KKii|y#", &id, &conn, &sid, &fd, &prefix, &plen)) return NULL;
    if (plen > 256 * 1024) {
        PyErr_SetString(PyExc_ValueError, "prefix larger than the stream buffer");
        return NULL;
    }
    fp_cmd_accept(e, id, conn, sid, fd, prefix, (size_t)plen);
    Py_RETURN_NONE;
}

static PyObject *engine_attach(Engine *self, PyObject *args) {
    unsigned long long id;
    int fd;
    const char *prefix = "";
    Py_ssize_t plen = 0;
    fp_engine *e = live(self);
    if (!e || !PyArg_ParseTuple(args, "Ki|y#", &id, &fd, &prefix, &plen)) return NULL;
    if (plen > 256 * 1024) {
        PyErr_SetString(PyExc_ValueError, "prefix larger than the stream buffer");
        return NULL;
    }
    fp_cmd_attach(e, id, fd, prefix, (size_t)plen);
    Py_RETURN_NONE;
}

static PyObject *engine_reject(Engine *self, PyObject *args) {
    unsigned long long conn;
    int sid, status;
    fp_engine *e = live(self);
    if (!e || !PyArg_ParseTuple(args, "Kii", &conn, &sid, &status)) return NULL;
    if (status < 100 || status > 999) {
        PyErr_SetString(PyExc_ValueError, "status must have three digits");
        return NULL;
    }
    fp_cmd_reject(e, conn, sid, status);
    Py_RETURN_NONE;
}

static PyObject *engine_reset(Engine *self, PyObject *args) {
    unsigned long long id;
    fp_engine *e = live(self);
    if (!e || !PyArg_ParseTuple(args, "K", &id)) return NULL;
    fp_cmd_reset(e, id);
    Py_RETURN_NONE;
}

static PyObject *engine_close_conn(Engine *self, PyObject *args) {
    unsigned long long id;
    fp_engine *e = live(self);
    if (!e || !PyArg_ParseTuple(args, "K", &id)) return NULL;
    fp_cmd_close(e, id);
    Py_RETURN_NONE;
}

static PyObject *hdr_list(const char *h, size_t len) {
    PyObject *out = PyList_New(0);
    for (size_t off = 0; out && off < len;) {
        const char *name = h + off;
        size_t nl = strlen(name);
        const char *val = name + nl + 1;
        size_t vl = strlen(val);
        PyObject *t = Py_BuildValue("(s#s#)", name, (Py_ssize_t)nl, val, (Py_ssize_t)vl);
        if (!t) {
            /* not UTF-8: keep the bytes visible rather than failing the whole batch */
            PyErr_Clear();
            t = Py_BuildValue("(y#y#)", name, (Py_ssize_t)nl, val, (Py_ssize_t)vl);
        }
        if (!t || PyList_Append(out, t) < 0) Py_CLEAR(out);
        Py_XDECREF(t);
        off += nl + vl + 2;
    }
    return out;
}

/* events() -> list of tuples:
 *   ("up", conn, peer_id) ("down", conn, reason) ("request", conn, stream_id, relay_id, headers)
 *   ("response", relay_id, status) ("done", relay_id, up_bytes, down_bytes, reason) */
static PyObject *engine_events(Engine *self, PyObject *unused) {
    (void)unused;
    fp_engine *e = live(self);
    if (!e) return NULL;
    fp_event *list = fp_take_events(e);
    PyObject *out = PyList_New(0);
    for (fp_event *ev = list; out && ev; ev = ev->next) {
        PyObject *t = NULL;
        switch (ev->kind) {
        case FP_EV_UP:
            t = *ev->text ? Py_BuildValue("(sKs)", "up", ev->id, ev->text) : Py_BuildValue("(sKO)", "up", ev->id, Py_None);
            break;
        case FP_EV_DOWN: t = Py_BuildValue("(sKs)", "down", ev->id, ev->text); break;
        case FP_EV_REQUEST: {
            PyObject *h = ev->hdrs ? hdr_list(ev->hdrs, ev->hdrs_len) : PyList_New(0);
            if (h) t = Py_BuildValue("(sKiKN)", "request", ev->id, ev->stream, ev->up, h);
            break;
        }
        case FP_EV_RESPONSE: t = Py_BuildValue("(sKi)", "response", ev->id, ev->status); break;
        case FP_EV_DONE: t = Py_BuildValue("(sKKKs)", "done", ev->id, ev->up, ev->down, ev->text); break;
        }
        if (!t || PyList_Append(out, t) < 0) Py_CLEAR(out);
        Py_XDECREF(t);
    }
    fp_event_free(list);
    return out;
}

static PyObject *stats_dict(const fp_stats *sp) {
    fp_stats s = *sp;
    return Py_BuildValue("{sKsKsKsKsKsKsKsKsK}", "conns_active", s.conns_active, "conns_total", s.conns_total,
                         "streams_active", s.streams_active, "streams_total", s.streams_total, "relays_active",
                         s.relays_active, "relays_total", s.relays_total, "bytes_up", s.bytes_up, "bytes_down",
                         s.bytes_down, "bytes_spliced", s.bytes_spliced);
}

static PyObject *engine_stats(Engine *self, PyObject *unused) {
    (void)unused;
    fp_engine *e = live(self);
    if (!e) return NULL;
    fp_stats s;
    fp_get_stats(e, &s);
    return stats_dict(&s);
}

/* the same counters per worker thread: where connections and relays were placed */
static PyObject *engine_thread_stats(Engine *self, PyObject *unused) {
    (void)unused;
    fp_engine *e = live(self);
    if (!e) return NULL;
    int n = fp_engine_threads(e);
    PyObject *out = PyList_New(n);
    for (int i = 0; out && i < n; i++) {
        fp_stats s;
        fp_get_worker_stats(e, i, &s);
        PyObject *d = stats_dict(&s);
        if (!d) Py_CLEAR(out);
        else PyList_SET_ITEM(out, i, d);
    }
    return out;
}

static PyObject *engine_threads(Engine *self, PyObject *unused) {
    (void)unused;
    fp_engine *e = live(self);
    return e ? PyLong_FromLong(fp_engine_threads(e)) : NULL;
}

static PyMethodDef engine_methods[] = {
    {"close", (PyCFunction)engine_close, METH_NOARGS, "stop the thread and close every socket"},
    {"fileno", (PyCFunction)engine_fileno, METH_NOARGS, "eventfd readable when events() has something"},
    {"relay", (PyCFunction)engine_relay, METH_VARARGS, "relay(fd_a, fd_b) -> id: splice two plain sockets"},
    {"conn", (PyCFunction)engine_conn, METH_VARARGS, "conn(fd, tls|None, server) -> id: an HBONE connection"},
    {"open", (PyCFunction)engine_open, METH_VARARGS, "open(conn, app_fd, headers) -> id: a CONNECT stream"},
    {"accept", (PyCFunction)engine_accept, METH_VARARGS, "accept(id, conn, stream, app_fd, prefix=b''): answer 200"},
    {"attach", (PyCFunction)engine_attach, METH_VARARGS, "attach(id, app_fd, prefix=b''): app of open(fd=-1)"},
    {"reject", (PyCFunction)engine_reject, METH_VARARGS, "reject(conn, stream, status)"},
    {"reset", (PyCFunction)engine_reset, METH_VARARGS, "reset(id): abort a relay/stream/connection"},
    {"close_conn", (PyCFunction)engine_close_conn, METH_VARARGS, "close_conn(conn): GOAWAY and close"},
    {"events", (PyCFunction)engine_events, METH_NOARGS, "drain the event queue"},
    {"stats", (PyCFunction)engine_stats, METH_NOARGS, "byte and connection counters"},
    {"thread_stats", (PyCFunction)engine_thread_stats, METH_NOARGS, "stats() of each worker thread, a list"},
    {"threads", (PyCFunction)engine_threads, METH_NOARGS, "number of worker threads"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "istiopy.dataplane._fastpath.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The C byte path: Engine(threads=1), epoll worker threads running relays and HBONE connections",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)engine_init,
    .tp_dealloc = (destructor)engine_dealloc,
    .tp_methods = engine_methods,
};

/* The OpenSSL this extension runs on: setup.py links a private static one when it is built
 * (tools/openssl), else the system's; Python's ssl module reports its own (ssl.OPENSSL_VERSION). */
static PyObject *fp_openssl_version(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyUnicode_FromString(OpenSSL_version(OPENSSL_VERSION));
}

static PyMethodDef module_methods[] = {
    {"openssl_version", fp_openssl_version, METH_NOARGS, "OpenSSL_version(OPENSSL_VERSION) of the linked OpenSSL"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_fastpath", "ztunnel-py C byte path", -1, module_methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fastpath(void) {
    if (PyType_Ready(&TlsConfigType) < 0 || PyType_Ready(&EngineType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moddef);
    if (!m) return NULL;
    Py_INCREF(&TlsConfigType);
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "TlsConfig", (PyObject *)&TlsConfigType) < 0 ||
        PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0 || fp_memtls_register(m) < 0 ||
        fp_pki_register(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
