/* fastpath engine: the established-tunnel byte path of ztunnel-py, without Python.
 *
 * Why a separate core: the same code is linked into the CPython extension (module.c) and into the
 * libFuzzer harness (tests/fuzz/fuzz_hbone.c), so what is fuzzed is what runs.
 *
 * Threading: N worker threads (fp_engine_new(threads)), sharded rather than locked. Each worker owns its
 * epoll fd, command queue, read buffer and objects: a relay, or a connection with all of its streams, is
 * placed on one worker when created (the one with the fewest live connections + relays) and lives and dies
 * there. Ids carry the worker in their low FP_WORKER_BITS bits, so a command (fp_cmd_*, queued by Python,
 * which never touches the objects) goes straight to the owning worker's queue; a stream's id names its
 * connection's worker. So objects still live and die on one thread, there is no lock around the I/O and no
 * use-after-free window between epoll_wait and a Python call. Events of every worker go to one queue,
 * signalled through one eventfd (fp_take_events). Counters are per worker, updated atomically, and summed
 * by fp_get_stats. */
#ifndef FP_ENGINE_H
#define FP_ENGINE_H

#include <stddef.h>
#include <stdint.h>
#include <openssl/ssl.h>

typedef struct fp_engine fp_engine;

enum fp_event_kind {
    FP_EV_UP = 1,   /* id=conn, text=peer SPIFFE id ("" if none): handshake done */
    FP_EV_DOWN,     /* id=conn, text=reason: connection gone (its streams get DONE too) */
    FP_EV_REQUEST,  /* id=conn, stream=h2 stream id, up=the stream's relay id, hdrs: a request to decide */
    FP_EV_RESPONSE, /* id=stream relay, status: the answer to our CONNECT */
    FP_EV_DONE,     /* id=relay, up/down byte counts, text=reason ("" clean, "reset", "...") */
};

typedef struct fp_event {
    struct fp_event *next;
    int kind;
    uint64_t id;
    int32_t stream;
    int status;
    uint64_t up, down; /* relay: a->b and b->a; stream: app->tunnel and tunnel->app */
    char *text;
    char *hdrs;      /* name\0value\0 pairs */
    size_t hdrs_len; /* bytes in hdrs */
} fp_event;

typedef struct fp_stats {
    uint64_t conns_active, conns_total, streams_active, streams_total, relays_active, relays_total;
    uint64_t bytes_up, bytes_down, bytes_spliced;
} fp_stats;

#define FP_WORKER_BITS 4
#define FP_MAX_WORKERS (1 << FP_WORKER_BITS)

/* lifecycle */
fp_engine *fp_engine_new(int threads); /* 1..FP_MAX_WORKERS workers; NULL if out of range or no fds */
int fp_engine_start(fp_engine *e);     /* spawn the worker threads; 0 on success */
void fp_engine_free(fp_engine *e);     /* stop the threads, close everything */
int fp_engine_threads(fp_engine *e);
int fp_engine_event_fd(fp_engine *e);
fp_event *fp_take_events(fp_engine *e);
void fp_event_free(fp_event *ev);
void fp_get_stats(fp_engine *e, fp_stats *out);                  /* all workers */
int fp_get_worker_stats(fp_engine *e, int idx, fp_stats *out); /* one worker; -1 if no such worker */

/* commands (thread-safe; ids are returned at once, failures arrive as DONE/DOWN events) */
uint64_t fp_cmd_relay(fp_engine *e, int fd_a, int fd_b);
uint64_t fp_cmd_conn(fp_engine *e, int fd, SSL_CTX *ctx, int server);
uint64_t fp_cmd_open(fp_engine *e, uint64_t conn, int app_fd, const char *hdrs, size_t hdrs_len);
uint64_t fp_cmd_accept(fp_engine *e, uint64_t id, uint64_t conn, int32_t stream, int app_fd, const char *prefix,
                       size_t plen);
void fp_cmd_reject(fp_engine *e, uint64_t conn, int32_t stream, int status);
void fp_cmd_attach(fp_engine *e, uint64_t id, int app_fd, const char *prefix, size_t plen); /* open(fd=-1) */
void fp_cmd_reset(fp_engine *e, uint64_t id);
void fp_cmd_close(fp_engine *e, uint64_t conn);

/* TLS 1.3 context from PEM (chain, key, roots); NULL and a message in err on failure */
SSL_CTX *fp_tls_ctx(const char *chain, const char *key, const char *roots, int server, char *err, size_t n);

/* fuzzing entry: a plaintext connection on fd (server, or client with three CONNECT streams opened),
 * fed bytes directly on the calling thread, which plays worker 0 of a never-started engine */
typedef struct fp_conn fp_conn;
fp_conn *fp_fuzz_conn(fp_engine *e, int fd, int server);
int fp_fuzz_feed(fp_conn *c, const uint8_t *data, size_t len);
void fp_fuzz_drop(fp_engine *e); /* free every object (single-threaded use) */

#endif
