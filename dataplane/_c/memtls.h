/* What memtls.c (TLS client sessions over memory) and pki.c (key/CSR, chain checks) add to _fastpath. */
#ifndef ISTIOPY_MEMTLS_H
#define ISTIOPY_MEMTLS_H
#include <Python.h>

int fp_memtls_register(PyObject *m);
int fp_pki_register(PyObject *m);

#endif
