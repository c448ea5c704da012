/* TLS client sessions over memory (memtls.c), registered into the _fastpath module. */
#ifndef ISTIOPY_MEMTLS_H
#define ISTIOPY_MEMTLS_H
#include <Python.h>

int fp_memtls_register(PyObject *m);

#endif
