/* libFuzzer harness: arbitrary peer bytes into the engine's HBONE handling. The first byte picks the side:
 * even - a server receiving a client's frames (HTTP/2 parsing by nghttp2 plus our header collection,
 * CONNECT handling, accept/reject answers, flow control, stream teardown); odd - a client with CONNECT
 * streams open receiving a server's answers (status handling, attach after 200, END_STREAM/RST).
 * TLS is left out on purpose: it is OpenSSL's parser, and the bytes after it are exactly these.
 * Built and run by `make fuzz` (bounded; corpus in tests/fuzz/corpus). */
#include <stdint.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include "engine.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    int sv[2];
    if (size == 0) return 0;
    int server = (data[0] & 1) == 0;
    data++;
    size--;
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv) != 0) return 0;
    fp_engine *e = fp_engine_new(1);
    if (!e) abort();
    fp_conn *c = fp_fuzz_conn(e, sv[0], server); /* the engine owns sv[0] now */
    /* feed in a few pieces so frames straddle reads, as they do on a socket */
    size_t off = 0, step = size / 3 + 1;
    while (c && off < size) {
        size_t n = size - off < step ? size - off : step;
        if (fp_fuzz_feed(c, data + off, n) < 0) break;
        off += n;
    }
    fp_engine_free(e);
    close(sv[1]);
    return 0;
}
