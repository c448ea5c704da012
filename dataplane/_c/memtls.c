/* TLS client sessions over memory, on the extension's own OpenSSL: istiopy.dataplane._fastpath.
 *
 * Why: ztunnel-py's control-plane connections (xDS, CA) need a TLS client too. Doing them here, instead of
 * with Python's ssl module, means the node proxy runs one OpenSSL (the one its byte path is linked with)
 * rather than two: Python's ssl pulls the system libssl/libcrypto in, ~4 MB of RSS before any handshake.
 * Sans-I/O, like ssl.SSLObject over MemoryBIOs: Python moves the ciphertext (feed/take), this only runs the
 * TLS state machine. Used from one thread at a time (the event loop's); it never blocks.
 *
 *   ctx = TlsClientContext(roots_pem, chain_pem=None, key_pem=None, alpn=(b"h2",))
 *   s = ctx.session("istiod.istio-system.svc")   # SNI + host name (or IP address) verification
 *   s.feed(ciphertext); s.handshake() -> bool; s.read() -> bytes; s.write(plaintext); s.take() -> bytes
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <string.h>

#include "memtls.h"

static PyObject *TlsError; /* subclass of ConnectionError: callers treat it as a failed connection */

typedef struct {
    PyObject_HEAD
    SSL_CTX *ctx;
} ClientContext;

typedef struct {
    PyObject_HEAD
    SSL *ssl;
    BIO *in;  /* ciphertext fed by Python */
    BIO *out; /* ciphertext for Python to send */
    int peer_closed;
} Session;

static PyTypeObject SessionType;

/* The first queued OpenSSL error (with the verify result when a certificate was refused). */
static PyObject *tls_error(SSL *ssl, const char *what) {
    unsigned long e = ERR_peek_error();
    char buf[256];
    const char *reason = e ? ERR_reason_error_string(e) : NULL;
    snprintf(buf, sizeof buf, "%s", reason ? reason : "tls error");
    long v = ssl ? SSL_get_verify_result(ssl) : X509_V_OK;
    if (v != X509_V_OK) /* say which check failed, whatever error OpenSSL queued on the way out */
        snprintf(buf, sizeof buf, "certificate verify failed: %s", X509_verify_cert_error_string(v));
    ERR_clear_error();
    PyErr_Format(TlsError, "%s: %s", what, buf);
    return NULL;
}

static int load_pem_certs(const char *pem, Py_ssize_t len, X509_STORE *store, SSL_CTX *chain_ctx) {
    BIO *b = BIO_new_mem_buf(pem, (int)len);
    X509 *x;
    int count = 0;
    while (b && (x = PEM_read_bio_X509(b, NULL, NULL, NULL))) {
        int ok;
        if (store) {
            ok = X509_STORE_add_cert(store, x);
            X509_free(x);
        } else if (count == 0) {
            ok = SSL_CTX_use_certificate(chain_ctx, x);
            X509_free(x);
        } else {
            ok = SSL_CTX_add_extra_chain_cert(chain_ctx, x); /* takes our reference */
            if (!ok) X509_free(x);
        }
        if (!ok) {
            BIO_free(b);
            return -1;
        }
        count++;
    }
    BIO_free(b);
    ERR_clear_error(); /* the end of the PEM reads as an error */
    return count;
}

static int ctx_init(ClientContext *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"roots_pem", "chain_pem", "key_pem", "alpn", NULL};
    const char *roots, *chain = NULL, *key = NULL;
    Py_ssize_t roots_len, chain_len = 0, key_len = 0;
    PyObject *alpn = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "y#|z#z#O", names, &roots, &roots_len, &chain, &chain_len, &key,
                                     &key_len, &alpn))
        return -1;
    if ((chain == NULL) != (key == NULL)) {
        PyErr_SetString(PyExc_ValueError, "chain_pem and key_pem come together");
        return -1;
    }
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) {
        tls_error(NULL, "SSL_CTX_new");
        return -1;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    if (load_pem_certs(roots, roots_len, SSL_CTX_get_cert_store(ctx), NULL) <= 0) {
        SSL_CTX_free(ctx);
        PyErr_SetString(PyExc_ValueError, "roots_pem: no usable certificate");
        return -1;
    }
    if (chain) {
        if (load_pem_certs(chain, chain_len, NULL, ctx) <= 0) {
            SSL_CTX_free(ctx);
            PyErr_SetString(PyExc_ValueError, "chain_pem: no usable certificate");
            return -1;
        }
        BIO *b = BIO_new_mem_buf(key, (int)key_len);
        EVP_PKEY *pk = b ? PEM_read_bio_PrivateKey(b, NULL, NULL, NULL) : NULL;
        BIO_free(b);
        int ok = pk && SSL_CTX_use_PrivateKey(ctx, pk) && SSL_CTX_check_private_key(ctx);
        EVP_PKEY_free(pk);
        ERR_clear_error();
        if (!ok) {
            SSL_CTX_free(ctx);
            PyErr_SetString(PyExc_ValueError, "key_pem: not a private key for the chain's first certificate");
            return -1;
        }
    }
    if (alpn && alpn != Py_None) { /* a sequence of protocol names (bytes) -> the wire list */
        unsigned char wire[256];
        size_t n = 0;
        PyObject *seq = PySequence_Fast(alpn, "alpn must be a sequence of bytes");
        if (!seq) {
            SSL_CTX_free(ctx);
            return -1;
        }
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
            PyObject *p = PySequence_Fast_GET_ITEM(seq, i);
            char *s;
            Py_ssize_t l;
            if (PyBytes_AsStringAndSize(p, &s, &l) < 0 || l == 0 || l > 255 || n + 1 + (size_t)l > sizeof wire) {
                Py_DECREF(seq);
                SSL_CTX_free(ctx);
                if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "alpn: each name 1..255 bytes");
                return -1;
            }
            wire[n++] = (unsigned char)l;
            memcpy(wire + n, s, (size_t)l);
            n += (size_t)l;
        }
        Py_DECREF(seq);
        if (n && SSL_CTX_set_alpn_protos(ctx, wire, (unsigned int)n) != 0) {
            SSL_CTX_free(ctx);
            PyErr_SetString(PyExc_ValueError, "alpn rejected");
            return -1;
        }
    }
    if (self->ctx) SSL_CTX_free(self->ctx);
    self->ctx = ctx;
    return 0;
}

static void ctx_dealloc(ClientContext *self) {
    if (self->ctx) SSL_CTX_free(self->ctx);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *ctx_session(ClientContext *self, PyObject *args) {
    const char *host;
    if (!PyArg_ParseTuple(args, "s", &host)) return NULL;
    if (!self->ctx) {
        PyErr_SetString(PyExc_ValueError, "TlsClientContext not initialised");
        return NULL;
    }
    Session *s = PyObject_New(Session, &SessionType);
    if (!s) return NULL;
    s->peer_closed = 0;
    s->ssl = SSL_new(self->ctx);
    s->in = BIO_new(BIO_s_mem());
    s->out = BIO_new(BIO_s_mem());
    if (!s->ssl || !s->in || !s->out) {
        if (s->in) BIO_free(s->in);
        if (s->out) BIO_free(s->out);
        s->in = s->out = NULL;
        Py_DECREF(s);
        return tls_error(NULL, "SSL_new");
    }
    BIO_set_mem_eof_return(s->in, -1); /* an empty input BIO means "wait", not EOF */
    SSL_set_bio(s->ssl, s->in, s->out);   /* the SSL owns both now */
    SSL_set_connect_state(s->ssl);
    unsigned char ip[16];
    int is_ip = inet_pton(AF_INET, host, ip) == 1 || inet_pton(AF_INET6, host, ip) == 1;
    X509_VERIFY_PARAM *vp = SSL_get0_param(s->ssl);
    int ok = is_ip ? X509_VERIFY_PARAM_set1_ip_asc(vp, host) : (SSL_set_tlsext_host_name(s->ssl, host) && SSL_set1_host(s->ssl, host));
    if (!ok) {
        Py_DECREF(s);
        PyErr_Format(PyExc_ValueError, "server name %R rejected", PyTuple_GET_ITEM(args, 0));
        return NULL;
    }
    return (PyObject *)s;
}

static PyMethodDef ctx_methods[] = {
    {"session", (PyCFunction)ctx_session, METH_VARARGS, "session(server_hostname) -> TlsSession (client side)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ClientContextType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "istiopy.dataplane._fastpath.TlsClientContext",
    .tp_basicsize = sizeof(ClientContext),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "TLS client configuration: TlsClientContext(roots_pem, chain_pem=None, key_pem=None, alpn=None)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)ctx_init,
    .tp_dealloc = (destructor)ctx_dealloc,
    .tp_methods = ctx_methods,
};

/* ---- Session --------------------------------------------------------------------------------- */

static void session_dealloc(Session *self) {
    if (self->ssl) SSL_free(self->ssl); /* frees both BIOs */
    PyObject_Free(self);
}

static PyObject *session_feed(Session *self, PyObject *arg) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    int ok = b.len == 0 || BIO_write(self->in, b.buf, (int)b.len) == (int)b.len;
    PyBuffer_Release(&b);
    if (!ok) return tls_error(NULL, "feed");
    Py_RETURN_NONE;
}

static PyObject *session_handshake(Session *self, PyObject *unused) {
    (void)unused;
    ERR_clear_error();
    int r = SSL_do_handshake(self->ssl);
    if (r == 1) Py_RETURN_TRUE;
    int err = SSL_get_error(self->ssl, r);
    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) Py_RETURN_FALSE;
    return tls_error(self->ssl, "TLS handshake failed");
}

/* Every plaintext byte available now (b"" when none); EOF shows as peer_closed. */
static PyObject *session_read(Session *self, PyObject *unused) {
    (void)unused;
    char buf[16384];
    PyObject *out = PyBytes_FromStringAndSize(NULL, 0);
    if (!out) return NULL;
    for (;;) {
        ERR_clear_error();
        int r = SSL_read(self->ssl, buf, sizeof buf);
        if (r > 0) {
            PyObject *chunk = PyBytes_FromStringAndSize(buf, r);
            if (!chunk) {
                Py_DECREF(out);
                return NULL;
            }
            PyBytes_ConcatAndDel(&out, chunk);
            if (!out) return NULL;
            continue;
        }
        int err = SSL_get_error(self->ssl, r);
        if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) return out;
        if (err == SSL_ERROR_ZERO_RETURN) {
            self->peer_closed = 1;
            return out;
        }
        Py_DECREF(out);
        return tls_error(self->ssl, "TLS read failed");
    }
}

static PyObject *session_write(Session *self, PyObject *arg) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    const char *p = b.buf;
    Py_ssize_t left = b.len;
    while (left > 0) {
        ERR_clear_error();
        int r = SSL_write(self->ssl, p, left > (1 << 30) ? (1 << 30) : (int)left);
        if (r <= 0) {
            PyBuffer_Release(&b);
            return tls_error(self->ssl, "TLS write failed");
        }
        p += r;
        left -= r;
    }
    PyBuffer_Release(&b);
    Py_RETURN_NONE;
}

/* The ciphertext queued for the socket (b"" when none). */
static PyObject *session_take(Session *self, PyObject *unused) {
    (void)unused;
    char *data;
    long n = BIO_get_mem_data(self->out, &data);
    PyObject *out = PyBytes_FromStringAndSize(n > 0 ? data : NULL, n > 0 ? n : 0);
    if (out && n > 0) (void)BIO_reset(self->out);
    return out;
}

static PyObject *session_close_notify(Session *self, PyObject *unused) {
    (void)unused;
    ERR_clear_error();
    (void)SSL_shutdown(self->ssl); /* queues close_notify; we do not wait for the peer's */
    ERR_clear_error();
    Py_RETURN_NONE;
}

static PyObject *session_alpn(Session *self, PyObject *unused) {
    (void)unused;
    const unsigned char *p;
    unsigned int n;
    SSL_get0_alpn_selected(self->ssl, &p, &n);
    if (!n) Py_RETURN_NONE;
    return PyUnicode_DecodeASCII((const char *)p, n, "replace");
}

static PyObject *session_peer_closed(Session *self, void *closure) {
    (void)closure;
    return PyBool_FromLong(self->peer_closed);
}

static PyObject *session_version(Session *self, void *closure) {
    (void)closure;
    return PyUnicode_FromString(SSL_get_version(self->ssl));
}

static PyMethodDef session_methods[] = {
    {"feed", (PyCFunction)session_feed, METH_O, "feed(ciphertext): bytes read from the socket"},
    {"handshake", (PyCFunction)session_handshake, METH_NOARGS, "True once the handshake completed (TlsError if it failed)"},
    {"read", (PyCFunction)session_read, METH_NOARGS, "all plaintext available now (b'' when none)"},
    {"write", (PyCFunction)session_write, METH_O, "write(plaintext): encrypt (after the handshake)"},
    {"take", (PyCFunction)session_take, METH_NOARGS, "ciphertext to send (b'' when none)"},
    {"close_notify", (PyCFunction)session_close_notify, METH_NOARGS, "queue a close_notify alert"},
    {"alpn", (PyCFunction)session_alpn, METH_NOARGS, "the negotiated ALPN protocol, or None"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef session_getset[] = {
    {"peer_closed", (getter)session_peer_closed, NULL, "the peer sent close_notify", NULL},
    {"version", (getter)session_version, NULL, "the negotiated protocol version", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject SessionType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "istiopy.dataplane._fastpath.TlsSession",
    .tp_basicsize = sizeof(Session),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One TLS client session over memory (from TlsClientContext.session)",
    .tp_dealloc = (destructor)session_dealloc,
    .tp_methods = session_methods,
    .tp_getset = session_getset,
};

int fp_memtls_register(PyObject *m) {
    if (PyType_Ready(&ClientContextType) < 0 || PyType_Ready(&SessionType) < 0) return -1;
    TlsError = PyErr_NewExceptionWithDoc("istiopy.dataplane._fastpath.TlsError",
                                         "A TLS session failed (handshake, verification, record)",
                                         PyExc_ConnectionError, NULL);
    if (!TlsError) return -1;
    Py_INCREF(&ClientContextType);
    Py_INCREF(&SessionType);
    if (PyModule_AddObject(m, "TlsClientContext", (PyObject *)&ClientContextType) < 0 ||
        PyModule_AddObject(m, "TlsSession", (PyObject *)&SessionType) < 0 ||
        PyModule_AddObject(m, "TlsError", TlsError) < 0)
        return -1;
    return 0;
}
