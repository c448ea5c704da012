/* The node proxy's two certificate operations, in the _fastpath module (istiopy.dataplane._fastpath).
 *
 * ztunnel-py makes a key + CSR for every identity it serves and checks what the CA returns. Doing that on
 * the OpenSSL the byte path already links saves importing Python's `cryptography` (~9 MB RSS); being in
 * the same extension (not a module of its own) saves a second static OpenSSL (~3 MB RSS touched).
 *
 *   new_key_csr(uri: str) -> (key_pem: str, csr_pem: str)
 *       ECDSA P-256 key (PKCS#8 PEM) and a SHA-256 signed CSR with an empty subject and exactly one
 *       critical subjectAltName: the URI `uri`.
 *   verify_chain(chain_pems: sequence[str], roots_pems: sequence[str], key_pem: str) -> None  (PKCS#8 key)
 *       chain_pems is leaf first, one PEM certificate per item. Raises ValueError with OpenSSL's reason
 *       unless the leaf certifies key_pem's public key and the chain verifies to one of the roots
 *       (roots need not be self-signed: PARTIAL_CHAIN; validity times are not checked: NO_CHECK_TIME,
 *       the certificate manager tracks expiry and every handshake checks it again).
 *
 * No module state. Every OpenSSL result is checked, every object freed on every path, and OpenSSL's
 * thread-local error queue is emptied before returning so it cannot leak into the ssl module's errors.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>

#include "memtls.h"

/* Raise ValueError("<what>: <OpenSSL's reason>") and clear the error queue; returns NULL. */
static PyObject *ossl_error(const char *what) {
    unsigned long code = ERR_peek_last_error();
    const char *reason = code ? ERR_reason_error_string(code) : NULL;
    if (reason != NULL)
        PyErr_Format(PyExc_ValueError, "%s: %s", what, reason);
    else
        PyErr_Format(PyExc_ValueError, "%s", what);
    ERR_clear_error();
    return NULL;
}

/* PEM text of a memory BIO as a Python str (NULL with an exception on failure). */
static PyObject *bio_to_str(BIO *bio) {
    char *data = NULL;
    long len = BIO_get_mem_data(bio, &data);
    if (len <= 0 || data == NULL)
        return ossl_error("empty PEM output");
    return PyUnicode_DecodeASCII(data, (Py_ssize_t)len, "strict");
}

/* The CSR for `pkey` with one critical URI SAN; NULL on error (the OpenSSL queue says why). */
static X509_REQ *make_csr(EVP_PKEY *pkey, const char *uri, Py_ssize_t uri_len) {
    X509_REQ *req = X509_REQ_new();
    GENERAL_NAMES *names = sk_GENERAL_NAME_new_null();
    GENERAL_NAME *name = GENERAL_NAME_new();
    ASN1_IA5STRING *ia5 = ASN1_IA5STRING_new();
    X509_EXTENSION *san = NULL;
    STACK_OF(X509_EXTENSION) *exts = sk_X509_EXTENSION_new_null();
    int ok = req != NULL && names != NULL && name != NULL && ia5 != NULL && exts != NULL
             && uri_len <= INT_MAX && X509_REQ_set_version(req, X509_REQ_VERSION_1) == 1
             && X509_REQ_set_pubkey(req, pkey) == 1 && ASN1_STRING_set(ia5, uri, (int)uri_len) == 1;
    if (ok) {
        GENERAL_NAME_set0_value(name, GEN_URI, ia5); /* name owns ia5 now */
        ia5 = NULL;
        ok = sk_GENERAL_NAME_push(names, name) > 0;
        if (ok)
            name = NULL; /* names owns name now */
    }
    if (ok)
        ok = (san = X509V3_EXT_i2d(NID_subject_alt_name, 1, names)) != NULL;
    if (ok) {
        ok = sk_X509_EXTENSION_push(exts, san) > 0;
        if (ok)
            san = NULL; /* exts owns san now */
    }
    ok = ok && X509_REQ_add_extensions(req, exts) == 1 && X509_REQ_sign(req, pkey, EVP_sha256()) > 0;
    sk_X509_EXTENSION_pop_free(exts, X509_EXTENSION_free);
    X509_EXTENSION_free(san);
    GENERAL_NAMES_free(names);
    GENERAL_NAME_free(name);
    ASN1_IA5STRING_free(ia5);
    if (!ok) {
        X509_REQ_free(req);
        return NULL;
    }
    return req;
}

static PyObject *new_key_csr(PyObject *self, PyObject *args) {
    (void)self;
    const char *uri;
    Py_ssize_t uri_len;
    if (!PyArg_ParseTuple(args, "s#:new_key_csr", &uri, &uri_len))
        return NULL;
    if (uri_len == 0) {
        PyErr_SetString(PyExc_ValueError, "new_key_csr: empty URI");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < uri_len; i++) {
        if ((unsigned char)uri[i] < 0x20 || (unsigned char)uri[i] > 0x7e) {
            PyErr_SetString(PyExc_ValueError, "new_key_csr: URI must be printable ASCII (IA5)");
            return NULL;
        }
    }
    EVP_PKEY *pkey = NULL;
    X509_REQ *req = NULL;
    PKCS8_PRIV_KEY_INFO *p8 = NULL;
    BIO *key_bio = BIO_new(BIO_s_mem());
    BIO *csr_bio = BIO_new(BIO_s_mem());
    const char *failed = NULL;
    Py_BEGIN_ALLOW_THREADS;
    if (key_bio == NULL || csr_bio == NULL)
        failed = "out of memory";
    else if ((pkey = EVP_EC_gen("P-256")) == NULL)
        failed = "generating a P-256 key failed";
    else if ((req = make_csr(pkey, uri, uri_len)) == NULL)
        failed = "building the CSR failed";
    else if ((p8 = EVP_PKEY2PKCS8(pkey)) == NULL || PEM_write_bio_PKCS8_PRIV_KEY_INFO(key_bio, p8) != 1)
        failed = "writing the key PEM failed";
    else if (PEM_write_bio_X509_REQ(csr_bio, req) != 1)
        failed = "writing the CSR PEM failed";
    Py_END_ALLOW_THREADS;
    PyObject *key_pem = NULL, *csr_pem = NULL, *result = NULL;
    if (failed != NULL)
        ossl_error(failed);
    else if ((key_pem = bio_to_str(key_bio)) != NULL && (csr_pem = bio_to_str(csr_bio)) != NULL)
        result = PyTuple_Pack(2, key_pem, csr_pem);
    Py_XDECREF(key_pem);
    Py_XDECREF(csr_pem);
    PKCS8_PRIV_KEY_INFO_free(p8);
    X509_REQ_free(req);
    EVP_PKEY_free(pkey);
    BIO_free(key_bio);
    BIO_free(csr_bio);
    ERR_clear_error();
    return result;
}

/* Exactly one PEM certificate from a Python str; NULL with ValueError naming `what` otherwise. */
static X509 *load_cert(PyObject *item, const char *what, Py_ssize_t index) {
    Py_ssize_t len;
    const char *text = PyUnicode_Check(item) ? PyUnicode_AsUTF8AndSize(item, &len) : NULL;
    if (text == NULL) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_TypeError, "%s #%zd: expected str, got %s", what, index, Py_TYPE(item)->tp_name);
        return NULL;
    }
    if (len > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "%s #%zd: too large", what, index);
        return NULL;
    }
    BIO *bio = BIO_new_mem_buf(text, (int)len);
    X509 *cert = bio ? PEM_read_bio_X509(bio, NULL, NULL, NULL) : NULL;
    BIO_free(bio);
    if (cert == NULL) {
        char msg[96];
        snprintf(msg, sizeof msg, "%s #%zd: not a PEM certificate", what, index);
        ossl_error(msg);
    }
    return cert;
}

/* A new stack of the certificates in `seq` from index `from` on; NULL with an exception on error. */
static STACK_OF(X509) *load_certs(PyObject *seq, Py_ssize_t from, const char *what) {
    STACK_OF(X509) *certs = sk_X509_new_null();
    if (certs == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = from; i < n; i++) {
        X509 *cert = load_cert(PySequence_Fast_GET_ITEM(seq, i), what, i);
        if (cert == NULL || sk_X509_push(certs, cert) <= 0) {
            if (cert != NULL) {
                X509_free(cert);
                PyErr_NoMemory();
            }
            sk_X509_pop_free(certs, X509_free);
            return NULL;
        }
    }
    return certs;
}

static EVP_PKEY *load_key(const char *pem, Py_ssize_t len) {
    if (len > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "private key: too large");
        return NULL;
    }
    /* PKCS#8 directly: PEM_read_bio_PrivateKey's decoder search costs ~0.8 ms on OpenSSL 3.0. */
    BIO *bio = BIO_new_mem_buf(pem, (int)len);
    PKCS8_PRIV_KEY_INFO *p8 = bio ? PEM_read_bio_PKCS8_PRIV_KEY_INFO(bio, NULL, NULL, NULL) : NULL;
    EVP_PKEY *pkey = p8 ? EVP_PKCS82PKEY(p8) : NULL;
    PKCS8_PRIV_KEY_INFO_free(p8);
    BIO_free(bio);
    if (pkey == NULL)
        ossl_error("private key: not a PKCS#8 PEM private key");
    return pkey;
}

/* 0 when `leaf` chains through `untrusted` to a certificate in `roots`; -1 with ValueError otherwise. */
static int verify(X509 *leaf, STACK_OF(X509) *untrusted, STACK_OF(X509) *roots) {
    X509_STORE *store = X509_STORE_new();
    X509_STORE_CTX *ctx = X509_STORE_CTX_new();
    int ok = store != NULL && ctx != NULL;
    for (int i = 0; ok && i < sk_X509_num(roots); i++)
        ok = X509_STORE_add_cert(store, sk_X509_value(roots, i)) == 1;
    ok = ok && X509_STORE_CTX_init(ctx, store, leaf, untrusted) == 1;
    if (!ok) {
        X509_STORE_CTX_free(ctx);
        X509_STORE_free(store);
        ossl_error("setting up chain verification failed");
        return -1;
    }
    X509_STORE_CTX_set_flags(ctx, X509_V_FLAG_PARTIAL_CHAIN | X509_V_FLAG_NO_CHECK_TIME);
    int rc = X509_verify_cert(ctx);
    int err = X509_STORE_CTX_get_error(ctx);
    int depth = X509_STORE_CTX_get_error_depth(ctx);
    X509_STORE_CTX_free(ctx);
    X509_STORE_free(store);
    if (rc == 1)
        return 0;
    if (err != X509_V_OK)
        PyErr_Format(PyExc_ValueError, "certificate chain does not verify at depth %d: %s", depth,
                     X509_verify_cert_error_string(err));
    else
        ossl_error("certificate chain does not verify");
    ERR_clear_error();
    return -1;
}

static PyObject *verify_chain(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *chain_arg, *roots_arg;
    const char *key_pem;
    Py_ssize_t key_len;
    if (!PyArg_ParseTuple(args, "OOs#:verify_chain", &chain_arg, &roots_arg, &key_pem, &key_len))
        return NULL;
    PyObject *chain = PySequence_Fast(chain_arg, "chain_pems must be a sequence of str");
    PyObject *roots = chain ? PySequence_Fast(roots_arg, "roots_pems must be a sequence of str") : NULL;
    X509 *leaf = NULL;
    STACK_OF(X509) *untrusted = NULL, *anchors = NULL;
    EVP_PKEY *pkey = NULL;
    PyObject *result = NULL;
    if (roots == NULL)
        goto done;
    if (PySequence_Fast_GET_SIZE(chain) == 0) {
        PyErr_SetString(PyExc_ValueError, "empty certificate chain");
        goto done;
    }
    if (PySequence_Fast_GET_SIZE(roots) == 0) {
        PyErr_SetString(PyExc_ValueError, "no trust roots to verify the chain against");
        goto done;
    }
    if ((leaf = load_cert(PySequence_Fast_GET_ITEM(chain, 0), "certificate", 0)) == NULL
        || (untrusted = load_certs(chain, 1, "certificate")) == NULL
        || (anchors = load_certs(roots, 0, "root")) == NULL || (pkey = load_key(key_pem, key_len)) == NULL)
        goto done;
    if (X509_check_private_key(leaf, pkey) != 1) {
        ERR_clear_error();
        PyErr_SetString(PyExc_ValueError, "leaf certificate is for a different key");
        goto done;
    }
    if (verify(leaf, untrusted, anchors) == 0)
        result = Py_NewRef(Py_None);
done:
    EVP_PKEY_free(pkey);
    sk_X509_pop_free(anchors, X509_free);
    sk_X509_pop_free(untrusted, X509_free);
    X509_free(leaf);
    Py_XDECREF(roots);
    Py_XDECREF(chain);
    ERR_clear_error();
    return result;
}

static PyMethodDef methods[] = {
    {"new_key_csr", new_key_csr, METH_VARARGS,
     "new_key_csr(uri) -> (key_pem, csr_pem): a P-256 key and a CSR with one critical URI SAN."},
    {"verify_chain", verify_chain, METH_VARARGS,
     "verify_chain(chain_pems, roots_pems, key_pem): raise ValueError unless the leaf is for key_pem and "
     "the chain verifies to one of roots_pems."},
    {NULL, NULL, 0, NULL},
};

int fp_pki_register(PyObject *m) { return PyModule_AddFunctions(m, methods); }
