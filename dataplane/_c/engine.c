/* fastpath engine (see engine.h): plain relays with splice(2), and HBONE connections (TLS 1.3 via
 * OpenSSL, HTTP/2 via nghttp2) whose CONNECT streams are pumped to and from app sockets.
 *
 * Bounds and back-pressure:
 *  - plain relay: at most one pipe (PIPE_CAP) in flight per direction; a full pipe stops reading.
 *  - app -> tunnel: at most UP_CAP bytes read ahead per stream; nghttp2 takes them only as the peer's
 *    flow-control windows allow, so a slow peer stops us reading the app.
 *  - tunnel -> app: received DATA is acknowledged (nghttp2_session_consume) only once written to the app,
 *    so a stream buffers at most its 4 MiB window and a connection at most 16 MiB (ztunnel's defaults).
 *  - TLS output: at most one OUT_CAP batch of frames pending per connection.
 * Half-close: app EOF -> END_STREAM; END_STREAM -> shutdown(SHUT_WR) of the app. Reset: an app RST ->
 * RST_STREAM(CANCEL); RST_STREAM -> app closed with SO_LINGER 0 (RST). A dying connection resets its streams.
 */
#define _GNU_SOURCE
#include "engine.h"

#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <nghttp2/nghttp2.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#define PIPE_CAP (256 * 1024)
#define UP_CAP (256 * 1024)
#define UP_HEAD 16 /* headroom before app bytes: a DATA frame header is written there (no payload copy) */
#define OUT_CAP (256 * 1024)
#define READ_BUF (256 * 1024)     /* per worker: decrypted records gathered for one nghttp2 feed */
#define TLS_READ_BUF (128 * 1024) /* per connection: ciphertext per recv() (in_bio), records served from it */
#define STREAM_WINDOW (4 * 1024 * 1024)
#define CONN_WINDOW (16 * 1024 * 1024)
#define MAX_FRAME (1024 * 1024)
#define SEND_FRAME (256 * 1024) /* DATA payload per frame (peer's max permitting): one app send() each */
#define MAX_STREAMS 100
#define MAX_HDRS (64 * 1024)
#define NBUCKETS 4096

enum { T_RELAY = 1, T_CONN, T_STREAM };
enum { H_WAKE = 1, H_RELAY0, H_RELAY1, H_CONN, H_APP };

typedef struct handle { int kind; void *obj; } handle;
typedef struct worker worker;

typedef struct obj {
    uint64_t id;
    int type;
    int dead;
    struct obj *hnext;     /* id table chain */
    struct obj *gnext;     /* graveyard */
} obj;

struct fp_engine;

/* ---- plain relay --------------------------------------------------------------------------- */
typedef struct rdir {
    int pipe[2];
    size_t inpipe;
    int eof, shut;
    uint64_t bytes;
} rdir;

typedef struct relay {
    obj o;
    int fd[2];
    handle h[2];
    uint32_t ev[2];
    int reg[2];
    rdir d[2]; /* d[0]: fd[0] -> fd[1] */
} relay;

/* ---- HBONE connection and streams ---------------------------------------------------------- */
typedef struct stream stream;

struct fp_conn {
    obj o;
    struct worker *w;
    int fd;
    handle h;
    uint32_t ev;
    int reg;
    SSL *ssl;
    /* TLS output lands in enc (through out_bio) and leaves in one send(): one syscall for many records */
    uint8_t *enc;
    size_t enc_len, enc_off, enc_cap;
    /* TLS input: one recv() fills inb with many records; in_bio hands OpenSSL exactly what it asks for */
    uint8_t *inb;
    size_t in_len, in_off;
    int in_eof;
    int server, up;
    int want_write; /* SSL needs the socket writable to make progress */
    nghttp2_session *s;
    uint8_t *out;
    size_t out_len, out_off, out_cap;
    size_t down_pending; /* tunnel bytes queued toward apps in this read batch */
    int paused;          /* send_data_cb stopped nghttp2 because ciphertext piled up */
    stream *streams;
    char *peer;
};

struct stream {
    obj o;
    struct fp_conn *c;
    stream *next, *prev;
    int32_t sid;
    int app_fd;
    handle h;
    uint32_t ev;
    int reg;
    int open;        /* response 200 sent or received: bytes flow */
    int client;
    /* app -> tunnel */
    uint8_t *up;
    size_t up_len, up_off;
    int app_eof, deferred, end_sent;
    /* tunnel -> app */
    uint8_t *down;
    size_t down_len, down_off, down_cap;
    int remote_end, app_shut;
    int h2_closed;
    uint64_t sent, received;
    /* request being received (server) */
    char *hdrs;
    size_t hdrs_len;
    int hdrs_bad;
    int status; /* client: the :status of the answer */
};

typedef struct cmd {
    struct cmd *next;
    int op;
    uint64_t id, conn;
    int fd, fd2, status, server;
    int32_t stream;
    SSL_CTX *ctx;
    char *hdrs;
    size_t hdrs_len;
} cmd;
enum { C_RELAY = 1, C_CONN, C_OPEN, C_ACCEPT, C_REJECT, C_RESET, C_CLOSE, C_ATTACH };

/* One event-loop thread and everything it owns: its epoll set, its command queue, its objects (id table,
 * graveyard) and its read buffer. Nothing here is touched by another worker; Python touches only cmds
 * (under mu) and the atomic counters. */
struct worker {
    struct fp_engine *e;
    int idx;
    int ep, wake_fd;
    handle wake_h;
    pthread_t thr;
    int started;
    pthread_mutex_t mu; /* guards cmds only */
    cmd *cmds, **cmds_tail;
    obj *table[NBUCKETS];
    obj *grave;
    fp_stats st;   /* this worker's counters (atomic: read from other threads) */
    uint64_t load; /* connections + relays placed here and not yet gone (atomic): placement of new ones */
    uint8_t rbuf[READ_BUF];
};

struct fp_engine {
    int nworkers, ev_fd, stop;
    worker *w[FP_MAX_WORKERS];
    pthread_mutex_t mu; /* guards the event queue only */
    fp_event *evs, **evs_tail;
    uint64_t next_seq; /* atomic */
    unsigned rr;       /* atomic: where placement starts looking, so ties rotate */
};

/* Ids carry their worker in the low bits, so a command finds its thread without a shared table. */
static uint64_t new_id(fp_engine *e, int idx) {
    return (__atomic_add_fetch(&e->next_seq, 1, __ATOMIC_RELAXED) << FP_WORKER_BITS) | (uint64_t)idx;
}

static worker *worker_of(fp_engine *e, uint64_t id) {
    return e->w[(id & ((1u << FP_WORKER_BITS) - 1)) % (unsigned)e->nworkers];
}

static void conn_fail(struct fp_conn *c, const char *why);
static void stream_finish(stream *st, const char *why, int reset_app, uint32_t rst_code);
static void conn_flush(struct fp_conn *c);
static size_t enc_pending(struct fp_conn *c);
static void stream_pump_app(stream *st);

/* ---- small helpers ------------------------------------------------------------------------- */

static void *xcalloc(size_t n, size_t sz) {
    void *p = calloc(n, sz);
    if (!p) abort(); /* out of memory in the byte path: nothing sensible to do */
    return p;
}

static char *xstrdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *p = xcalloc(1, n);
    memcpy(p, s, n);
    return p;
}

static void set_nonblock(int fd) {
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0) fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void close_rst(int fd) {
    struct linger l = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
    close(fd);
}

static void close_fd(int fd, int rst) {
    if (rst) close_rst(fd);
    else close(fd);
}

static void tbl_add(worker *w, obj *o) {
    obj **b = &w->table[o->id % NBUCKETS];
    o->hnext = *b;
    *b = o;
}

static obj *tbl_get(worker *w, uint64_t id) {
    for (obj *o = w->table[id % NBUCKETS]; o; o = o->hnext)
        if (o->id == id && !o->dead) return o;
    return NULL;
}

static void tbl_del(worker *w, obj *o) {
    for (obj **p = &w->table[o->id % NBUCKETS]; *p; p = &(*p)->hnext)
        if (*p == o) {
            *p = o->hnext;
            return;
        }
}

/* Dead objects are freed at the end of the event batch: later events of the same batch may still
 * point at them (they check o->dead). */
static void bury(worker *w, obj *o) {
    o->dead = 1;
    tbl_del(w, o);
    o->gnext = w->grave;
    w->grave = o;
}

static void free_grave(worker *w) {
    while (w->grave) {
        obj *o = w->grave;
        w->grave = o->gnext;
        if (o->type == T_STREAM) {
            stream *st = (stream *)o;
            free(st->up);
            free(st->down);
            free(st->hdrs);
        } else if (o->type == T_CONN) {
            struct fp_conn *c = (struct fp_conn *)o;
            free(c->out);
            free(c->enc);
            free(c->inb);
            free(c->peer);
        }
        free(o);
    }
}

static void emit(worker *w, int kind, uint64_t id, int32_t sid, int status, uint64_t up, uint64_t down,
                 const char *text, char *hdrs, size_t hdrs_len) {
    fp_event *ev = xcalloc(1, sizeof *ev);
    ev->kind = kind;
    ev->id = id;
    ev->stream = sid;
    ev->status = status;
    ev->up = up;
    ev->down = down;
    ev->text = xstrdup(text ? text : "");
    ev->hdrs = hdrs; /* ownership moves to the event */
    ev->hdrs_len = hdrs_len;
    fp_engine *e = w->e; /* every worker's events go to the one queue Python reads */
    pthread_mutex_lock(&e->mu);
    int first = e->evs == NULL;
    *e->evs_tail = ev;
    e->evs_tail = &ev->next;
    pthread_mutex_unlock(&e->mu);
    /* Signal only the empty -> non-empty step: whoever made the queue non-empty signals, and the reader
     * takes the whole queue after clearing the eventfd, so a later event is never stranded. */
    uint64_t one = 1;
    if (first && write(e->ev_fd, &one, sizeof one) < 0) { /* counter saturated: the reader is signalled */
    }
}

/* Register, modify or remove an fd's interest; an empty interest removes it so HUP/ERR cannot spin. */
static void watch(worker *w, int fd, handle *h, uint32_t *cur, int *reg, uint32_t want) {
    if (fd < 0) return;
    if (want == 0) {
        if (*reg) epoll_ctl(w->ep, EPOLL_CTL_DEL, fd, NULL);
        *reg = 0;
        *cur = 0;
        return;
    }
    if (*reg && *cur == want) return;
    struct epoll_event ev = {.events = want, .data.ptr = h};
    if (epoll_ctl(w->ep, *reg ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, fd, &ev) == 0) {
        *reg = 1;
        *cur = want;
    }
}

/* ---- plain relay (splice) ------------------------------------------------------------------ */

static void relay_end(worker *w, relay *r, const char *why, int reset) {
    for (int i = 0; i < 2; i++) {
        watch(w, r->fd[i], &r->h[i], &r->ev[i], &r->reg[i], 0);
        if (r->fd[i] >= 0) close_fd(r->fd[i], reset);
        r->fd[i] = -1;
        for (int j = 0; j < 2; j++)
            if (r->d[i].pipe[j] >= 0) close(r->d[i].pipe[j]);
    }
    __atomic_sub_fetch(&w->st.relays_active, 1, __ATOMIC_RELAXED);
    __atomic_sub_fetch(&w->load, 1, __ATOMIC_RELAXED);
    emit(w, FP_EV_DONE, r->o.id, 0, 0, r->d[0].bytes, r->d[1].bytes, why, NULL, 0);
    bury(w, &r->o);
}

static void relay_pump(worker *w, relay *r) {
    for (int i = 0; i < 2; i++) {
        rdir *d = &r->d[i];
        int src = r->fd[i], dst = r->fd[1 - i];
        size_t budget = 4 * PIPE_CAP; /* fairness between relays on one thread */
        while (budget > 0 && !d->shut) {
            if (d->inpipe > 0) {
                ssize_t n = splice(d->pipe[0], NULL, dst, NULL, d->inpipe, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
                if (n > 0) {
                    d->inpipe -= (size_t)n;
                    d->bytes += (uint64_t)n;
                    __atomic_add_fetch(&w->st.bytes_spliced, (uint64_t)n, __ATOMIC_RELAXED);
                    budget = budget > (size_t)n ? budget - (size_t)n : 0;
                    continue;
                }
                if (n < 0 && errno == EAGAIN) {
                    if (d->eof) break;
                } else if (n < 0 && errno != EINTR) {
                    relay_end(w, r, "reset", 1);
                    return;
                }
            }
            if (d->eof) {
                if (d->inpipe == 0) {
                    shutdown(dst, SHUT_WR);
                    d->shut = 1;
                }
                break;
            }
            if (d->inpipe >= PIPE_CAP) break;
            ssize_t n = splice(src, NULL, d->pipe[1], NULL, PIPE_CAP - d->inpipe, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            if (n > 0) {
                d->inpipe += (size_t)n;
            } else if (n == 0) {
                d->eof = 1;
            } else if (errno == EAGAIN) {
                break;
            } else if (errno != EINTR) {
                relay_end(w, r, "reset", 1);
                return;
            }
        }
    }
    if (r->d[0].shut && r->d[1].shut) {
        relay_end(w, r, "", 0);
        return;
    }
    for (int i = 0; i < 2; i++) {
        uint32_t want = 0;
        if (!r->d[i].eof && r->d[i].inpipe < PIPE_CAP) want |= EPOLLIN;
        if (r->d[1 - i].inpipe > 0 && !r->d[1 - i].shut) want |= EPOLLOUT;
        watch(w, r->fd[i], &r->h[i], &r->ev[i], &r->reg[i], want);
    }
}

static void relay_on_event(worker *w, relay *r, int side, uint32_t events) {
    if (events & EPOLLERR) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(r->fd[side], SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            relay_end(w, r, "reset", 1);
            return;
        }
    }
    relay_pump(w, r);
}

static void do_relay(worker *w, uint64_t id, int a, int b) {
    relay *r = xcalloc(1, sizeof *r);
    r->o.id = id;
    r->o.type = T_RELAY;
    r->fd[0] = a;
    r->fd[1] = b;
    for (int i = 0; i < 2; i++) {
        r->h[i].kind = i ? H_RELAY1 : H_RELAY0;
        r->h[i].obj = r;
        r->d[i].pipe[0] = r->d[i].pipe[1] = -1;
    }
    tbl_add(w, &r->o);
    __atomic_add_fetch(&w->st.relays_active, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&w->st.relays_total, 1, __ATOMIC_RELAXED);
    for (int i = 0; i < 2; i++) {
        if (pipe2(r->d[i].pipe, O_NONBLOCK | O_CLOEXEC) < 0) {
            relay_end(w, r, "pipe failed", 1);
            return;
        }
        fcntl(r->d[i].pipe[1], F_SETPIPE_SZ, PIPE_CAP);
    }
    set_nonblock(a);
    set_nonblock(b);
    relay_pump(w, r);
}

/* ---- streams ------------------------------------------------------------------------------- */

static void stream_watch(stream *st) {
    uint32_t want = 0;
    if (st->app_fd < 0) return;
    if (st->open && !st->app_eof && st->up_len - st->up_off < UP_CAP / 2) want |= EPOLLIN;
    if (st->down_len > st->down_off) want |= EPOLLOUT;
    watch(st->c->w, st->app_fd, &st->h, &st->ev, &st->reg, want);
}

/* Free-standing finish: close the app side, tell nghttp2 (RST_STREAM unless it already closed), report.
 * A broken TCP leg (app reset or error, or a reset Python asked for) is RST_STREAM(CONNECT_ERROR), as
 * RFC 9113 section 8.5 and Envoy do for CONNECT; CANCEL stays for streams given up before they opened. */
static void stream_finish(stream *st, const char *why, int reset_app, uint32_t rst_code) {
    struct fp_conn *c = st->c;
    worker *w = c->w;
    if (st->o.dead) return;
    if (st->app_fd >= 0) {
        watch(w, st->app_fd, &st->h, &st->ev, &st->reg, 0);
        close_fd(st->app_fd, reset_app);
        st->app_fd = -1;
    }
    if (st->sid > 0 && c->s) {
        nghttp2_session_set_stream_user_data(c->s, st->sid, NULL);
        if (!st->h2_closed) nghttp2_submit_rst_stream(c->s, NGHTTP2_FLAG_NONE, st->sid, rst_code);
    }
    if (st->prev) st->prev->next = st->next;
    else c->streams = st->next;
    if (st->next) st->next->prev = st->prev;
    __atomic_sub_fetch(&w->st.streams_active, 1, __ATOMIC_RELAXED);
    emit(w, FP_EV_DONE, st->o.id, st->sid, 0, st->sent, st->received, why, NULL, 0);
    bury(w, &st->o);
}

static stream *stream_new(struct fp_conn *c, uint64_t id) {
    stream *st = xcalloc(1, sizeof *st);
    st->o.id = id;
    st->o.type = T_STREAM;
    st->c = c;
    st->app_fd = -1;
    st->h.kind = H_APP;
    st->h.obj = st;
    st->next = c->streams;
    if (c->streams) c->streams->prev = st;
    c->streams = st;
    tbl_add(c->w, &st->o);
    __atomic_add_fetch(&c->w->st.streams_active, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&c->w->st.streams_total, 1, __ATOMIC_RELAXED);
    return st;
}

/* Both directions over and the buffer toward the app drained: the stream is done. */
static void stream_maybe_done(stream *st) {
    if (st->o.dead) return;
    if (st->h2_closed && st->end_sent && st->remote_end && st->down_off == st->down_len && st->app_shut)
        stream_finish(st, "", 0, NGHTTP2_NO_ERROR);
}

/* Write buffered tunnel bytes to the app and acknowledge them to the peer (opens its window). */
static void stream_flush_down(stream *st) {
    size_t done = 0;
    while (st->app_fd >= 0 && st->down_off < st->down_len) {
        ssize_t n = send(st->app_fd, st->down + st->down_off, st->down_len - st->down_off, MSG_NOSIGNAL);
        if (n > 0) {
            st->down_off += (size_t)n;
            done += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && errno == EAGAIN) {
            break;
        } else {
            stream_finish(st, "reset", 1, NGHTTP2_CONNECT_ERROR);
            return;
        }
    }
    if (st->down_off == st->down_len) st->down_off = st->down_len = 0;
    if (done) {
        st->received += done;
        __atomic_add_fetch(&st->c->w->st.bytes_down, done, __ATOMIC_RELAXED);
        if (st->c->s && !st->h2_closed) nghttp2_session_consume(st->c->s, st->sid, done);
        else if (st->c->s) nghttp2_session_consume_connection(st->c->s, done);
    }
    if (st->app_fd >= 0 && st->remote_end && st->down_off == st->down_len && !st->app_shut) {
        shutdown(st->app_fd, SHUT_WR);
        st->app_shut = 1;
    }
}

static void stream_up_init(stream *st) {
    if (!st->up) {
        st->up = xcalloc(1, UP_HEAD + UP_CAP);
        st->up_off = st->up_len = UP_HEAD;
    }
}

/* Read from the app into the up buffer (bounded) and wake nghttp2's deferred DATA. */
static void stream_read_app(stream *st) {
    stream_up_init(st);
    if (st->up_off == st->up_len) {
        st->up_off = st->up_len = UP_HEAD;
    } else if (st->up_off > UP_HEAD && UP_HEAD + UP_CAP - st->up_len < UP_CAP / 4) { /* tail short: compact */
        memmove(st->up + UP_HEAD, st->up + st->up_off, st->up_len - st->up_off);
        st->up_len -= st->up_off - UP_HEAD;
        st->up_off = UP_HEAD;
    }
    while (!st->app_eof && st->up_len < UP_HEAD + UP_CAP) {
        ssize_t n = recv(st->app_fd, st->up + st->up_len, UP_HEAD + UP_CAP - st->up_len, 0);
        if (n > 0) {
            st->up_len += (size_t)n;
        } else if (n == 0) {
            st->app_eof = 1;
        } else if (errno == EINTR) {
            continue;
        } else if (errno == EAGAIN) {
            break;
        } else {
            stream_finish(st, "reset", 1, NGHTTP2_CONNECT_ERROR);
            return;
        }
    }
    if (st->deferred && (st->up_len > st->up_off || st->app_eof)) {
        st->deferred = 0;
        nghttp2_session_resume_data(st->c->s, st->sid);
    }
}

static void stream_pump_app(stream *st) {
    if (st->o.dead || st->app_fd < 0) return;
    stream_flush_down(st);
    if (st->o.dead) return;
    if (st->open) stream_read_app(st);
    if (st->o.dead) return;
    stream_maybe_done(st);
    if (st->o.dead) return;
    stream_watch(st);
}

static ssize_t data_read_cb(nghttp2_session *s, int32_t sid, uint8_t *buf, size_t length, uint32_t *flags,
                                  nghttp2_data_source *src, void *user) {
    (void)s;
    (void)sid;
    (void)user;
    stream *st = src->ptr;
    if (!st || st->o.dead) return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    size_t avail = st->up_len - st->up_off;
    if (avail == 0) {
        if (st->app_eof) {
            *flags |= NGHTTP2_DATA_FLAG_EOF;
            st->end_sent = 1;
            return 0;
        }
        st->deferred = 1;
        return NGHTTP2_ERR_DEFERRED;
    }
    size_t n = avail < length ? avail : length;
    if (st->c->ssl) { /* TLS: send_data_cb encrypts straight from the up buffer */
        *flags |= NGHTTP2_DATA_FLAG_NO_COPY;
        if (n == avail && st->app_eof) {
            *flags |= NGHTTP2_DATA_FLAG_EOF;
            st->end_sent = 1;
        }
        return (ssize_t)n;
    }
    memcpy(buf, st->up + st->up_off, n);
    st->up_off += n;
    st->sent += n;
    __atomic_add_fetch(&st->c->w->st.bytes_up, n, __ATOMIC_RELAXED);
    if (st->up_off == st->up_len && st->app_eof) {
        *flags |= NGHTTP2_DATA_FLAG_EOF;
        st->end_sent = 1;
    }
    stream_watch(st); /* room again: resume reading the app */
    return (ssize_t)n;
}

static ssize_t read_length_cb(nghttp2_session *s, uint8_t type, int32_t sid, int32_t swin, int32_t cwin,
                                    uint32_t remote_max_frame, void *user) {
    (void)s;
    (void)type;
    (void)sid;
    (void)user;
    int32_t n = swin < cwin ? swin : cwin;
    if ((uint32_t)n > remote_max_frame) n = (int32_t)remote_max_frame;
    if (n > SEND_FRAME) n = SEND_FRAME;
    return n > 0 ? n : 1;
}

static int tls_write_raw(struct fp_conn *c, const uint8_t *p, size_t n);

/* A DATA frame chosen by data_read_cb (NO_COPY): gathered control frames first, then the 9-byte header
 * written into the headroom just before the payload (those bytes were sent already) so header and payload
 * go into TLS as one piece. Pauses nghttp2 once enough ciphertext waits for the socket. */
static int send_data_cb(nghttp2_session *s, nghttp2_frame *frame, const uint8_t *framehd, size_t length,
                        nghttp2_data_source *src, void *user) {
    (void)s;
    struct fp_conn *c = user;
    stream *st = src->ptr;
    if (!st || st->o.dead || frame->data.padlen > 0 || st->up_len - st->up_off < length)
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    if (c->out_len) {
        if (tls_write_raw(c, c->out, c->out_len) < 0) return NGHTTP2_ERR_CALLBACK_FAILURE;
        c->out_len = 0;
    }
    uint8_t *p = st->up + st->up_off;
    int rc;
    if (st->up_off >= 9) {
        memcpy(p - 9, framehd, 9);
        rc = tls_write_raw(c, p - 9, length + 9);
    } else {
        rc = tls_write_raw(c, framehd, 9);
        if (rc == 0) rc = tls_write_raw(c, p, length);
    }
    if (rc < 0) return NGHTTP2_ERR_CALLBACK_FAILURE;
    st->up_off += length;
    st->sent += length;
    __atomic_add_fetch(&c->w->st.bytes_up, length, __ATOMIC_RELAXED);
    stream_watch(st); /* room again: resume reading the app */
    if (enc_pending(c) >= OUT_CAP) {
        c->paused = 1;
        return NGHTTP2_ERR_PAUSE;
    }
    return 0;
}

/* ---- nghttp2 callbacks --------------------------------------------------------------------- */

static int on_begin_headers(nghttp2_session *s, const nghttp2_frame *f, void *user) {
    struct fp_conn *c = user;
    if (!c->server || f->hd.type != NGHTTP2_HEADERS || f->headers.cat != NGHTTP2_HCAT_REQUEST) return 0;
    stream *st = stream_new(c, new_id(c->w->e, c->w->idx));
    st->sid = f->hd.stream_id;
    nghttp2_session_set_stream_user_data(s, st->sid, st);
    return 0;
}

static int on_header(nghttp2_session *s, const nghttp2_frame *f, const uint8_t *name, size_t nlen,
                     const uint8_t *value, size_t vlen, uint8_t flags, void *user) {
    (void)flags;
    (void)user;
    stream *st = nghttp2_session_get_stream_user_data(s, f->hd.stream_id);
    if (!st) return 0;
    if (st->client) { /* response: only :status matters */
        if (nlen == 7 && memcmp(name, ":status", 7) == 0 && vlen == 3) {
            int v = 0;
            for (size_t i = 0; i < 3; i++) v = v * 10 + (value[i] - '0');
            st->status = v;
        }
        return 0;
    }
    if (st->hdrs_len + nlen + vlen + 2 > MAX_HDRS || memchr(name, 0, nlen) || memchr(value, 0, vlen)) {
        st->hdrs_bad = 1; /* too large or not representable as C strings: the stream is refused here */
        return 0;
    }
    char *p = realloc(st->hdrs, st->hdrs_len + nlen + vlen + 2);
    if (!p) abort();
    st->hdrs = p;
    memcpy(p + st->hdrs_len, name, nlen);
    p[st->hdrs_len + nlen] = 0;
    memcpy(p + st->hdrs_len + nlen + 1, value, vlen);
    p[st->hdrs_len + nlen + 1 + vlen] = 0;
    st->hdrs_len += nlen + vlen + 2;
    return 0;
}

static int on_frame_recv(nghttp2_session *s, const nghttp2_frame *f, void *user) {
    struct fp_conn *c = user;
    if (f->hd.type != NGHTTP2_HEADERS && f->hd.type != NGHTTP2_DATA) return 0;
    stream *st = nghttp2_session_get_stream_user_data(s, f->hd.stream_id);
    if (!st || st->o.dead) return 0;
    if (f->hd.type == NGHTTP2_HEADERS && f->headers.cat == NGHTTP2_HCAT_REQUEST) {
        if (st->hdrs_bad) {
            stream_finish(st, "bad request headers", 0, NGHTTP2_PROTOCOL_ERROR);
            return 0;
        }
        char *h = st->hdrs;
        size_t hl = st->hdrs_len;
        st->hdrs = NULL;
        st->hdrs_len = 0;
        emit(c->w, FP_EV_REQUEST, c->o.id, st->sid, 0, st->o.id, 0, "", h, hl);
    } else if (f->hd.type == NGHTTP2_HEADERS && f->headers.cat == NGHTTP2_HCAT_RESPONSE && st->client) {
        int status = st->status;
        emit(c->w, FP_EV_RESPONSE, st->o.id, st->sid, status, 0, 0, "", NULL, 0);
        if (status == 200) {
            st->open = 1;
            stream_pump_app(st);
        } else {
            stream_finish(st, "refused", 1, NGHTTP2_CANCEL);
            return 0;
        }
    }
    if (!st->o.dead && (f->hd.flags & NGHTTP2_FLAG_END_STREAM)) {
        st->remote_end = 1;
        if (!st->open) {
            /* END_STREAM before the stream was open: a request with a body end or a bodiless answer */
            if (st->client) stream_finish(st, "refused", 1, NGHTTP2_CANCEL);
            return 0;
        }
        stream_pump_app(st);
    }
    return 0;
}

static int on_data_chunk(nghttp2_session *s, uint8_t flags, int32_t sid, const uint8_t *data, size_t len,
                         void *user) {
    (void)flags;
    (void)user;
    stream *st = nghttp2_session_get_stream_user_data(s, sid);
    if (!st || st->o.dead) {
        nghttp2_session_consume_connection(s, len);
        return 0;
    }
    /* Straight to the app when nothing is queued before it (the read loop hands nghttp2 many TLS records
     * at once, so chunks are large); the rest is queued and acknowledged only once the app took it. */
    size_t off = 0;
    if (st->app_fd >= 0 && st->down_off == st->down_len) {
        while (off < len) {
            ssize_t n = send(st->app_fd, data + off, len - off, MSG_NOSIGNAL);
            if (n > 0) off += (size_t)n;
            else if (n < 0 && errno == EINTR) continue;
            else if (n < 0 && errno == EAGAIN) break;
            else {
                nghttp2_session_consume_connection(s, len);
                stream_finish(st, "reset", 1, NGHTTP2_CONNECT_ERROR);
                return 0;
            }
        }
        if (off) {
            st->received += off;
            __atomic_add_fetch(&st->c->w->st.bytes_down, off, __ATOMIC_RELAXED);
            nghttp2_session_consume(s, sid, off);
        }
    }
    if (off < len) st->c->down_pending += len - off;
    if (off < len) { /* the rest waits; bounded by the stream window we advertised */
        size_t need = st->down_len + (len - off);
        if (need > st->down_cap) {
            size_t cap = st->down_cap ? st->down_cap : 64 * 1024;
            while (cap < need) cap *= 2;
            uint8_t *p = realloc(st->down, cap);
            if (!p) abort();
            st->down = p;
            st->down_cap = cap;
        }
        memcpy(st->down + st->down_len, data + off, len - off);
        st->down_len += len - off;
    }
    return 0;
}

static int on_stream_close(nghttp2_session *s, int32_t sid, uint32_t code, void *user) {
    (void)user;
    stream *st = nghttp2_session_get_stream_user_data(s, sid);
    if (!st || st->o.dead) return 0;
    st->h2_closed = 1;
    if (code != NGHTTP2_NO_ERROR || !st->open) {
        stream_finish(st, "reset", 1, code);
        return 0;
    }
    /* NO_ERROR close: both END_STREAMs were exchanged; drain what the app has not taken yet */
    st->remote_end = 1;
    st->end_sent = 1;
    stream_pump_app(st);
    return 0;
}

/* ---- connections --------------------------------------------------------------------------- */

static void conn_watch(struct fp_conn *c) {
    if (c->fd < 0) return;
    uint32_t want = EPOLLIN;
    if (c->out_off < c->out_len || c->want_write || enc_pending(c) > 0) want |= EPOLLOUT;
    watch(c->w, c->fd, &c->h, &c->ev, &c->reg, want);
}

static void conn_fail(struct fp_conn *c, const char *why) {
    worker *w = c->w;
    if (c->o.dead) return;
    while (c->streams) {
        stream *st = c->streams;
        st->h2_closed = 1; /* no RST_STREAM on a dead connection */
        stream_finish(st, why && *why ? why : "connection closed", 1, NGHTTP2_CANCEL);
    }
    if (c->fd >= 0) {
        watch(w, c->fd, &c->h, &c->ev, &c->reg, 0);
        close(c->fd);
        c->fd = -1;
    }
    if (c->s) nghttp2_session_del(c->s);
    c->s = NULL;
    if (c->ssl) SSL_free(c->ssl);
    c->ssl = NULL;
    __atomic_sub_fetch(&w->st.conns_active, 1, __ATOMIC_RELAXED);
    __atomic_sub_fetch(&w->load, 1, __ATOMIC_RELAXED);
    emit(w, FP_EV_DOWN, c->o.id, 0, 0, 0, 0, why, NULL, 0);
    bury(w, &c->o);
}

static const char *ssl_reason(void) {
    unsigned long err = ERR_get_error();
    ERR_clear_error();
    const char *r = err ? ERR_reason_error_string(err) : NULL;
    return r ? r : "tls error";
}

/* A write-only BIO appending OpenSSL's records to c->enc (no zeroing, no extra copy, unlike a mem BIO). */
static int out_bio_write(BIO *b, const char *data, int len) {
    struct fp_conn *c = BIO_get_data(b);
    if (len <= 0) return 0;
    if (c->enc_off > 0 && c->enc_len + (size_t)len > c->enc_cap) { /* compact before growing */
        memmove(c->enc, c->enc + c->enc_off, c->enc_len - c->enc_off);
        c->enc_len -= c->enc_off;
        c->enc_off = 0;
    }
    if (c->enc_len + (size_t)len > c->enc_cap) {
        size_t cap = c->enc_cap ? c->enc_cap : OUT_CAP;
        while (cap < c->enc_len + (size_t)len) cap *= 2;
        uint8_t *q = realloc(c->enc, cap);
        if (!q) abort();
        c->enc = q;
        c->enc_cap = cap;
    }
    memcpy(c->enc + c->enc_len, data, (size_t)len);
    c->enc_len += (size_t)len;
    return len;
}

static long out_bio_ctrl(BIO *b, int cmd, long num, void *ptr) {
    (void)num;
    (void)ptr;
    struct fp_conn *c = BIO_get_data(b);
    switch (cmd) {
    case BIO_CTRL_FLUSH: return 1;
    case BIO_CTRL_WPENDING:
    case BIO_CTRL_PENDING: return c ? (long)(c->enc_len - c->enc_off) : 0;
    default: return 0;
    }
}

static int out_bio_create(BIO *b) {
    BIO_set_init(b, 1);
    return 1;
}

/* A read-only BIO over c->inb, refilled by one large recv() when empty. Why not OpenSSL's read-ahead on a
 * socket BIO: its record layer moves every buffered byte to the front of its buffer on each SSL_read (one
 * record per call), so a 128 KiB read-ahead copied each byte ~4 times (12% of a receiving proxy's CPU).
 * Here, without read-ahead, OpenSSL asks for a header and then exactly one record: each byte is copied
 * once, and the syscall count stays that of a 128 KiB read. */
static int in_bio_read(BIO *b, char *out, int len) {
    struct fp_conn *c = BIO_get_data(b);
    BIO_clear_retry_flags(b);
    if (len <= 0) return 0;
    if (c->in_off == c->in_len) {
        if (!c->inb) c->inb = xcalloc(1, TLS_READ_BUF);
        c->in_off = c->in_len = 0;
        ssize_t n;
        do n = recv(c->fd, c->inb, TLS_READ_BUF, 0);
        while (n < 0 && errno == EINTR);
        if (n < 0) {
            if (errno == EAGAIN) BIO_set_retry_read(b);
            return -1;
        }
        if (n == 0) {
            c->in_eof = 1;
            return 0;
        }
        c->in_len = (size_t)n;
    }
    size_t n = c->in_len - c->in_off;
    if (n > (size_t)len) n = (size_t)len;
    memcpy(out, c->inb + c->in_off, n);
    c->in_off += n;
    return (int)n;
}

static long in_bio_ctrl(BIO *b, int cmd, long num, void *ptr) {
    (void)num;
    (void)ptr;
    struct fp_conn *c = BIO_get_data(b);
    switch (cmd) {
    case BIO_CTRL_PENDING: return c ? (long)(c->in_len - c->in_off) : 0;
    case BIO_CTRL_EOF: return c ? c->in_eof : 1;
    default: return 0;
    }
}

static BIO_METHOD *out_method, *in_method;
static pthread_once_t out_once = PTHREAD_ONCE_INIT;

static void out_method_init(void) {
    out_method = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "fastpath-out");
    BIO_meth_set_write(out_method, out_bio_write);
    BIO_meth_set_ctrl(out_method, out_bio_ctrl);
    BIO_meth_set_create(out_method, out_bio_create);
    in_method = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "fastpath-in");
    BIO_meth_set_read(in_method, in_bio_read);
    BIO_meth_set_ctrl(in_method, in_bio_ctrl);
    BIO_meth_set_create(in_method, out_bio_create);
}

static size_t enc_pending(struct fp_conn *c) { return c->enc_len - c->enc_off; }

/* Write pending ciphertext to the socket. Returns -1 if the connection died, else the bytes still pending. */
static long tls_push(struct fp_conn *c) {
    while (c->enc_off < c->enc_len) {
        ssize_t w = send(c->fd, c->enc + c->enc_off, c->enc_len - c->enc_off, MSG_NOSIGNAL);
        if (w > 0) {
            c->enc_off += (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno == EAGAIN) return (long)enc_pending(c);
        conn_fail(c, "connection reset");
        return -1;
    }
    c->enc_off = c->enc_len = 0;
    return 0;
}

/* Encrypt plaintext into enc (always completes: the BIO takes everything); -1 on a TLS failure. */
static int tls_write_raw(struct fp_conn *c, const uint8_t *p, size_t n) {
    while (n > 0) {
        int chunk = n > (1u << 30) ? (1 << 30) : (int)n;
        ERR_clear_error();
        int r = SSL_write(c->ssl, p, chunk);
        if (r <= 0) return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static int tls_write(struct fp_conn *c, const uint8_t *p, size_t n) {
    if (tls_write_raw(c, p, n) == 0) return 0;
    conn_fail(c, ssl_reason());
    return -1;
}

/* Send everything nghttp2 has queued, through TLS, as far as the socket takes it. Small frames are
 * gathered in c->out so they share TLS records; large DATA frames are encrypted straight from nghttp2's
 * buffer (no copy). At most OUT_CAP of ciphertext waits for the socket: beyond that we stop asking
 * nghttp2, which stops taking app bytes (back-pressure). */
static void conn_flush(struct fp_conn *c) {
    while (!c->o.dead && c->s) {
        if (c->ssl) {
            long pending = tls_push(c);
            if (pending < 0) return;
            if (pending >= OUT_CAP) break; /* the socket is full: wait for EPOLLOUT */
        } else if (c->out_off < c->out_len) {
            ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EINTR) continue;
                if (errno == EAGAIN) break;
                conn_fail(c, "connection reset");
                return;
            }
            c->out_off += (size_t)n;
            continue;
        }
        c->out_off = c->out_len = 0;
        c->paused = 0;
        size_t produced = 0;
        while (produced < OUT_CAP && !c->paused) {
            const uint8_t *p;
            ssize_t n = nghttp2_session_mem_send(c->s, &p);
            if (n < 0) {
                conn_fail(c, nghttp2_strerror((int)n));
                return;
            }
            if (n == 0) break;
            produced += (size_t)n;
            if (c->ssl && n >= 16384) { /* big frame: flush gathered small ones, then encrypt in place */
                if (c->out_len && tls_write(c, c->out, c->out_len) < 0) return;
                c->out_len = 0;
                if (tls_write(c, p, (size_t)n) < 0) return;
                continue;
            }
            if (c->out_len + (size_t)n > c->out_cap) {
                size_t cap = c->out_cap ? c->out_cap : OUT_CAP;
                while (cap < c->out_len + (size_t)n) cap *= 2;
                uint8_t *q = realloc(c->out, cap);
                if (!q) abort();
                c->out = q;
                c->out_cap = cap;
            }
            memcpy(c->out + c->out_len, p, (size_t)n);
            c->out_len += (size_t)n;
        }
        if (c->ssl && c->out_len) {
            if (tls_write(c, c->out, c->out_len) < 0) return;
            c->out_len = 0;
        }
        if (produced == 0 && !c->paused) {
            if (c->ssl && tls_push(c) < 0) return;
            break;
        }
    }
    if (c->o.dead) return;
    if (c->s && !nghttp2_session_want_read(c->s) && !nghttp2_session_want_write(c->s) &&
        c->out_off == c->out_len && enc_pending(c) == 0) {
        conn_fail(c, "closed");
        return;
    }
    conn_watch(c);
}

static int conn_start_h2(struct fp_conn *c) {
    nghttp2_session_callbacks *cb;
    nghttp2_option *opt;
    nghttp2_session_callbacks_new(&cb);
    nghttp2_session_callbacks_set_on_begin_headers_callback(cb, on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(cb, on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cb, on_frame_recv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, on_data_chunk);
    nghttp2_session_callbacks_set_on_stream_close_callback(cb, on_stream_close);
    nghttp2_session_callbacks_set_data_source_read_length_callback(cb, read_length_cb);
    nghttp2_session_callbacks_set_send_data_callback(cb, send_data_cb);
    nghttp2_option_new(&opt);
    nghttp2_option_set_no_auto_window_update(opt, 1); /* we acknowledge only what the app took */
    nghttp2_option_set_max_send_header_block_length(opt, MAX_HDRS);
    int rv = c->server ? nghttp2_session_server_new2(&c->s, cb, c, opt) : nghttp2_session_client_new2(&c->s, cb, c, opt);
    nghttp2_option_del(opt);
    nghttp2_session_callbacks_del(cb);
    if (rv != 0) return rv;
    nghttp2_settings_entry iv[] = {
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, MAX_STREAMS},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW},
        {NGHTTP2_SETTINGS_MAX_FRAME_SIZE, MAX_FRAME},
        {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HDRS},
        {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
    };
    size_t n = sizeof iv / sizeof iv[0];
    if (c->server) n--; /* ENABLE_PUSH is a client setting */
    rv = nghttp2_submit_settings(c->s, NGHTTP2_FLAG_NONE, iv, n);
    if (rv == 0) rv = nghttp2_session_set_local_window_size(c->s, NGHTTP2_FLAG_NONE, 0, CONN_WINDOW);
    return rv;
}

/* The peer's SPIFFE id: the first spiffe:// URI SAN of its leaf certificate. */
static char *peer_spiffe(SSL *ssl) {
    X509 *cert = SSL_get1_peer_certificate(ssl);
    char *out = NULL;
    if (!cert) return NULL;
    GENERAL_NAMES *names = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);
    for (int i = 0; names && i < sk_GENERAL_NAME_num(names) && !out; i++) {
        GENERAL_NAME *g = sk_GENERAL_NAME_value(names, i);
        if (g->type != GEN_URI) continue;
        const unsigned char *d = ASN1_STRING_get0_data(g->d.uniformResourceIdentifier);
        int len = ASN1_STRING_length(g->d.uniformResourceIdentifier);
        if (len > 9 && memcmp(d, "spiffe://", 9) == 0 && !memchr(d, 0, (size_t)len)) {
            out = xcalloc(1, (size_t)len + 1);
            memcpy(out, d, (size_t)len);
        }
    }
    GENERAL_NAMES_free(names);
    X509_free(cert);
    return out;
}

static void conn_up(struct fp_conn *c) {
    c->up = 1;
    if (c->ssl) {
        if (SSL_get_verify_result(c->ssl) != X509_V_OK) {
            conn_fail(c, "peer certificate not verified");
            return;
        }
        c->peer = peer_spiffe(c->ssl);
    }
    if (conn_start_h2(c) != 0) {
        conn_fail(c, "nghttp2 setup failed");
        return;
    }
    emit(c->w, FP_EV_UP, c->o.id, 0, 0, 0, 0, c->peer ? c->peer : "", NULL, 0);
}

/* Hand the bytes queued in this read batch to the apps. */
static void conn_flush_streams(struct fp_conn *c) {
    c->down_pending = 0;
    for (stream *st = c->streams, *next; st && !c->o.dead; st = next) {
        next = st->next;
        if (st->down_len > st->down_off && st->app_fd >= 0) {
            stream_flush_down(st);
            if (st->o.dead) continue;
            stream_maybe_done(st);
            if (!st->o.dead) stream_watch(st);
        }
    }
}

/* Bytes from the wire into nghttp2 (the fuzzer calls this directly). */
static int conn_feed(struct fp_conn *c, const uint8_t *data, size_t len) {
    ssize_t rv = nghttp2_session_mem_recv(c->s, data, len);
    if (rv < 0) {
        conn_fail(c, nghttp2_strerror((int)rv));
        return -1;
    }
    return 0;
}

static void conn_on_event(struct fp_conn *c, uint32_t events) {
    worker *w = c->w;
    (void)events;
    c->want_write = 0;
    if (!c->up) {
        ERR_clear_error();
        int r = SSL_do_handshake(c->ssl);
        if (tls_push(c) < 0) return;
        if (r != 1) {
            int err = SSL_get_error(c->ssl, r);
            if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
                c->want_write = err == SSL_ERROR_WANT_WRITE;
                conn_watch(c);
                return;
            }
            /* drop what the peer sent that is still unread (e.g. plain text instead of TLS), so the close
             * is a FIN, not an RST */
            for (int i = 0; i < 16 && recv(c->fd, w->rbuf, READ_BUF, MSG_DONTWAIT) > 0; i++) {
            }
            conn_fail(c, err == SSL_ERROR_SYSCALL ? "connection closed during handshake" : ssl_reason());
            return;
        }
        conn_up(c);
        if (c->o.dead) return;
    }
    for (;;) {
        ssize_t n;
        if (c->ssl) {
            ERR_clear_error();
            /* gather several records (SSL_read returns one at a time) so nghttp2 sees big chunks */
            size_t got = 0;
            int err = SSL_ERROR_NONE;
            while (got < READ_BUF - 16384) {
                int r = SSL_read(c->ssl, w->rbuf + got, (int)(READ_BUF - got));
                if (r <= 0) {
                    err = SSL_get_error(c->ssl, r);
                    break;
                }
                got += (size_t)r;
            }
            if (got == 0) {
                if (err == SSL_ERROR_WANT_READ) break;
                if (err == SSL_ERROR_WANT_WRITE) {
                    c->want_write = 1;
                    break;
                }
                conn_fail(c, err == SSL_ERROR_ZERO_RETURN ? "closed by peer"
                             : err == SSL_ERROR_SYSCALL   ? "connection reset"
                                                          : ssl_reason());
                return;
            }
            n = (ssize_t)got; /* an error after data is seen again by the next SSL_read */
        } else {
            n = recv(c->fd, w->rbuf, READ_BUF, 0);
            if (n < 0 && errno == EINTR) continue;
            if (n < 0 && errno == EAGAIN) break;
            if (n <= 0) {
                conn_fail(c, n == 0 ? "closed by peer" : "connection reset");
                return;
            }
        }
        if (conn_feed(c, w->rbuf, (size_t)n) < 0) return;
        if (c->down_pending > 0) conn_flush_streams(c);
    }
    if (c->down_pending > 0) conn_flush_streams(c);
    if (c->o.dead) return;
    conn_flush(c);
}

static void do_conn(worker *w, uint64_t id, int fd, SSL_CTX *ctx, int server) {
    struct fp_conn *c = xcalloc(1, sizeof *c);
    c->o.id = id;
    c->o.type = T_CONN;
    c->w = w;
    c->fd = fd;
    c->server = server;
    c->h.kind = H_CONN;
    c->h.obj = c;
    tbl_add(w, &c->o);
    __atomic_add_fetch(&w->st.conns_active, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&w->st.conns_total, 1, __ATOMIC_RELAXED);
    set_nonblock(fd);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* fails harmlessly on non-TCP */
    if (!ctx) {
        conn_up(c);
        if (!c->o.dead) conn_flush(c);
        return;
    }
    c->ssl = SSL_new(ctx);
    SSL_CTX_free(ctx); /* the command held a reference */
    pthread_once(&out_once, out_method_init);
    BIO *rbio = in_method ? BIO_new(in_method) : NULL;
    BIO *wbio = out_method ? BIO_new(out_method) : NULL;
    if (!c->ssl || !rbio || !wbio) {
        BIO_free(rbio);
        BIO_free(wbio);
        conn_fail(c, "SSL_new failed");
        return;
    }
    BIO_set_data(rbio, c);
    BIO_set_data(wbio, c);
    SSL_set_bio(c->ssl, rbio, wbio); /* the SSL owns both BIOs now */
    if (server) SSL_set_accept_state(c->ssl);
    else SSL_set_connect_state(c->ssl);
    conn_on_event(c, EPOLLOUT);
}

static void do_open(worker *w, uint64_t id, uint64_t conn_id, int app_fd, char *hdrs, size_t hl) {
    obj *o = tbl_get(w, conn_id);
    if (!o || o->type != T_CONN || !((struct fp_conn *)o)->up) {
        if (app_fd >= 0) close_rst(app_fd);
        emit(w, FP_EV_DONE, id, 0, 0, 0, 0, "no such connection", NULL, 0);
        return;
    }
    struct fp_conn *c = (struct fp_conn *)o;
    nghttp2_nv nva[64];
    size_t n = 0;
    for (size_t off = 0; off < hl && n < 64;) {
        const char *name = hdrs + off;
        size_t nl = strlen(name);
        const char *val = name + nl + 1;
        size_t vl = strlen(val);
        nva[n++] = (nghttp2_nv){(uint8_t *)name, (uint8_t *)val, nl, vl, NGHTTP2_NV_FLAG_NONE};
        off += nl + vl + 2;
    }
    stream *st = stream_new(c, id);
    st->client = 1;
    st->app_fd = app_fd; /* -1: the app is attached later (fp_cmd_attach), tunnel bytes wait meanwhile */
    if (app_fd >= 0) set_nonblock(app_fd);
    nghttp2_data_provider prd = {.source.ptr = st, .read_callback = data_read_cb};
    int32_t sid = nghttp2_submit_request(c->s, NULL, nva, n, &prd, st);
    if (sid < 0) {
        stream_finish(st, nghttp2_strerror(sid), 1, NGHTTP2_CANCEL);
        return;
    }
    st->sid = sid;
    conn_flush(c);
}

/* Answer a request: 200 and relay to app_fd (prefix: app bytes Python had already read, sent first),
 * or status with END_STREAM when app_fd < 0. */
static void do_answer(worker *w, uint64_t id, uint64_t conn_id, int32_t sid, int app_fd, int status,
                      const char *prefix, size_t plen) {
    obj *o = tbl_get(w, conn_id);
    struct fp_conn *c = o && o->type == T_CONN ? (struct fp_conn *)o : NULL;
    stream *st = c && c->s ? nghttp2_session_get_stream_user_data(c->s, sid) : NULL;
    if (!st || st->o.dead) {
        if (app_fd >= 0) close_rst(app_fd);
        if (id) emit(w, FP_EV_DONE, id, sid, 0, 0, 0, "stream gone", NULL, 0);
        (void)status;
        return;
    }
    char code[4];
    snprintf(code, sizeof code, "%03d", status);
    nghttp2_nv nv = {(uint8_t *)":status", (uint8_t *)code, 7, 3, NGHTTP2_NV_FLAG_NONE};
    if (app_fd < 0) { /* reject: headers with END_STREAM, then forget the stream */
        nghttp2_submit_response(c->s, sid, &nv, 1, NULL);
        st->h2_closed = 1; /* nghttp2 closes it; no RST needed */
        nghttp2_session_set_stream_user_data(c->s, sid, NULL);
        stream_finish(st, "rejected", 0, NGHTTP2_NO_ERROR);
        conn_flush(c);
        return;
    }
    /* accept: the stream keeps the id Python learnt from the REQUEST event */
    st->app_fd = app_fd;
    set_nonblock(app_fd);
    st->open = 1;
    if (plen > 0 && plen <= UP_CAP) {
        stream_up_init(st);
        memcpy(st->up + st->up_len, prefix, plen);
        st->up_len += plen;
    }
    nghttp2_data_provider prd = {.source.ptr = st, .read_callback = data_read_cb};
    if (nghttp2_submit_response(c->s, sid, &nv, 1, &prd) != 0) {
        stream_finish(st, "submit failed", 1, NGHTTP2_INTERNAL_ERROR);
        conn_flush(c);
        return;
    }
    stream_pump_app(st);
    conn_flush(c);
}

/* Give an open client stream its app socket (and bytes Python had already read from it). */
static void do_attach(worker *w, uint64_t id, int app_fd, const char *prefix, size_t plen) {
    obj *o = tbl_get(w, id);
    stream *st = o && o->type == T_STREAM ? (stream *)o : NULL;
    if (!st || st->app_fd >= 0) {
        close_rst(app_fd);
        if (!st) emit(w, FP_EV_DONE, id, 0, 0, 0, 0, "stream gone", NULL, 0);
        return;
    }
    st->app_fd = app_fd;
    set_nonblock(app_fd);
    if (plen > 0) { /* nothing was read from the app yet, so the whole buffer is free */
        stream_up_init(st);
        size_t room = UP_HEAD + UP_CAP - st->up_len;
        size_t n = plen < room ? plen : room;
        memcpy(st->up + st->up_len, prefix, n);
        st->up_len += n;
        if (st->deferred) {
            st->deferred = 0;
            nghttp2_session_resume_data(st->c->s, st->sid);
        }
    }
    struct fp_conn *c = st->c;
    stream_pump_app(st);
    if (!c->o.dead) conn_flush(c);
}

static void do_reset(worker *w, uint64_t id) {
    obj *o = tbl_get(w, id);
    if (!o) return;
    if (o->type == T_RELAY) relay_end(w, (relay *)o, "reset", 1);
    else if (o->type == T_STREAM) {
        struct fp_conn *c = ((stream *)o)->c;
        stream_finish((stream *)o, "reset", 1, NGHTTP2_CONNECT_ERROR);
        conn_flush(c);
    } else if (o->type == T_CONN) conn_fail((struct fp_conn *)o, "reset");
}

static void do_close(worker *w, uint64_t id) {
    obj *o = tbl_get(w, id);
    if (!o || o->type != T_CONN) return;
    struct fp_conn *c = (struct fp_conn *)o;
    if (c->s) {
        nghttp2_submit_goaway(c->s, NGHTTP2_FLAG_NONE, nghttp2_session_get_last_proc_stream_id(c->s),
                              NGHTTP2_NO_ERROR, NULL, 0);
        conn_flush(c);
    }
    if (!c->o.dead) conn_fail(c, "closed");
}

/* ---- the loop ------------------------------------------------------------------------------ */

static void run_cmds(worker *w) {
    pthread_mutex_lock(&w->mu);
    cmd *list = w->cmds;
    w->cmds = NULL;
    w->cmds_tail = &w->cmds;
    pthread_mutex_unlock(&w->mu);
    while (list) {
        cmd *c = list;
        list = c->next;
        switch (c->op) {
        case C_RELAY: do_relay(w, c->id, c->fd, c->fd2); break;
        case C_CONN: do_conn(w, c->id, c->fd, c->ctx, c->server); break;
        case C_OPEN: do_open(w, c->id, c->conn, c->fd, c->hdrs, c->hdrs_len); break;
        case C_ACCEPT: do_answer(w, c->id, c->conn, c->stream, c->fd, 200, c->hdrs, c->hdrs_len); break;
        case C_REJECT: do_answer(w, 0, c->conn, c->stream, -1, c->status, NULL, 0); break;
        case C_RESET: do_reset(w, c->id); break;
        case C_CLOSE: do_close(w, c->id); break;
        case C_ATTACH: do_attach(w, c->id, c->fd, c->hdrs, c->hdrs_len); break;
        }
        free(c->hdrs);
        free(c);
    }
}

static void *loop(void *arg) {
    worker *w = arg;
    struct epoll_event evs[64];
    while (!__atomic_load_n(&w->e->stop, __ATOMIC_ACQUIRE)) {
        int n = epoll_wait(w->ep, evs, 64, -1);
        for (int i = 0; i < n; i++) {
            handle *h = evs[i].data.ptr;
            uint32_t ev = evs[i].events;
            if (h->kind == H_WAKE) {
                uint64_t v;
                if (read(w->wake_fd, &v, sizeof v) < 0) { /* spurious wake */
                }
                run_cmds(w);
                continue;
            }
            obj *o = h->obj;
            if (o->dead) continue;
            if (h->kind == H_RELAY0 || h->kind == H_RELAY1) relay_on_event(w, (relay *)o, h->kind == H_RELAY1, ev);
            else if (h->kind == H_CONN) conn_on_event((struct fp_conn *)o, ev);
            else if (h->kind == H_APP) {
                stream *st = (stream *)o;
                struct fp_conn *c = st->c;
                if ((ev & EPOLLERR) && !(ev & EPOLLIN)) stream_finish(st, "reset", 1, NGHTTP2_CONNECT_ERROR);
                else stream_pump_app(st);
                if (!c->o.dead) conn_flush(c);
            }
        }
        free_grave(w);
    }
    return NULL;
}

static void worker_free(worker *w) {
    if (!w) return;
    if (w->ep >= 0) close(w->ep);
    if (w->wake_fd >= 0) close(w->wake_fd);
    pthread_mutex_destroy(&w->mu);
    free(w);
}

static worker *worker_new(fp_engine *e, int idx) {
    worker *w = xcalloc(1, sizeof *w);
    w->e = e;
    w->idx = idx;
    pthread_mutex_init(&w->mu, NULL);
    w->cmds_tail = &w->cmds;
    w->ep = epoll_create1(EPOLL_CLOEXEC);
    w->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (w->ep < 0 || w->wake_fd < 0) {
        worker_free(w);
        return NULL;
    }
    w->wake_h.kind = H_WAKE;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &w->wake_h};
    epoll_ctl(w->ep, EPOLL_CTL_ADD, w->wake_fd, &ev);
    return w;
}

fp_engine *fp_engine_new(int threads) {
    if (threads < 1 || threads > FP_MAX_WORKERS) return NULL;
    /* Stream buffers (256 KiB) come and go with streams. glibc raises its mmap threshold once such a
     * buffer is freed, so later ones come from the worker threads' heaps and stay resident after their
     * streams end; a fixed threshold keeps them mmap'd and returned on free (about 1-2 MB less RSS per
     * proxy after a benchmark run, throughput unchanged). Process-wide, but this process is the proxy. */
    mallopt(M_MMAP_THRESHOLD, 128 * 1024);
    fp_engine *e = xcalloc(1, sizeof *e);
    pthread_mutex_init(&e->mu, NULL);
    e->evs_tail = &e->evs;
    e->ev_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (e->ev_fd < 0) {
        fp_engine_free(e);
        return NULL;
    }
    for (int i = 0; i < threads; i++) {
        e->w[i] = worker_new(e, i);
        if (!e->w[i]) {
            fp_engine_free(e);
            return NULL;
        }
        e->nworkers = i + 1;
    }
    return e;
}

int fp_engine_start(fp_engine *e) {
    for (int i = 0; i < e->nworkers; i++) {
        if (pthread_create(&e->w[i]->thr, NULL, loop, e->w[i]) != 0) return -1; /* fp_engine_free joins */
        e->w[i]->started = 1;
    }
    return 0;
}

int fp_engine_threads(fp_engine *e) { return e->nworkers; }

static void wake(worker *w) {
    uint64_t one = 1;
    if (write(w->wake_fd, &one, sizeof one) < 0) { /* already pending */
    }
}

/* Close every live object (engine threads stopped, or single-threaded fuzz use). */
void fp_fuzz_drop(fp_engine *e) {
    for (int i = 0; i < e->nworkers; i++) {
        worker *w = e->w[i];
        for (int b = 0; b < NBUCKETS; b++) {
            while (w->table[b]) {
                obj *o = w->table[b];
                if (o->type == T_RELAY) relay_end(w, (relay *)o, "engine closed", 1);
                else if (o->type == T_CONN) conn_fail((struct fp_conn *)o, "engine closed");
                else { /* a stream whose connection is elsewhere in the table: its conn closes it */
                    conn_fail(((stream *)o)->c, "engine closed");
                }
            }
        }
        free_grave(w);
    }
    pthread_mutex_lock(&e->mu);
    fp_event *ev = e->evs;
    e->evs = NULL;
    e->evs_tail = &e->evs;
    pthread_mutex_unlock(&e->mu);
    fp_event_free(ev);
}

void fp_engine_free(fp_engine *e) {
    if (!e) return;
    __atomic_store_n(&e->stop, 1, __ATOMIC_RELEASE);
    for (int i = 0; i < e->nworkers; i++) {
        if (!e->w[i]->started) continue;
        wake(e->w[i]);
        pthread_join(e->w[i]->thr, NULL);
        e->w[i]->started = 0;
    }
    /* every thread has stopped: from here one thread tidies all workers */
    for (int i = 0; i < e->nworkers; i++) run_cmds(e->w[i]); /* take ownership of queued fds to close them */
    fp_fuzz_drop(e);
    for (int i = 0; i < e->nworkers; i++) worker_free(e->w[i]);
    if (e->ev_fd >= 0) close(e->ev_fd);
    pthread_mutex_destroy(&e->mu);
    free(e);
}

int fp_engine_event_fd(fp_engine *e) { return e->ev_fd; }

fp_event *fp_take_events(fp_engine *e) {
    uint64_t v;
    if (read(e->ev_fd, &v, sizeof v) < 0) { /* nothing signalled */
    }
    pthread_mutex_lock(&e->mu);
    fp_event *ev = e->evs;
    e->evs = NULL;
    e->evs_tail = &e->evs;
    pthread_mutex_unlock(&e->mu);
    return ev;
}

void fp_event_free(fp_event *ev) {
    while (ev) {
        fp_event *n = ev->next;
        free(ev->text);
        free(ev->hdrs);
        free(ev);
        ev = n;
    }
}

static void add_stats(const fp_stats *src, fp_stats *dst) {
    const uint64_t *s = (const uint64_t *)src;
    uint64_t *d = (uint64_t *)dst;
    for (size_t i = 0; i < sizeof *dst / sizeof(uint64_t); i++) d[i] += __atomic_load_n(&s[i], __ATOMIC_RELAXED);
}

void fp_get_stats(fp_engine *e, fp_stats *out) {
    memset(out, 0, sizeof *out);
    for (int i = 0; i < e->nworkers; i++) add_stats(&e->w[i]->st, out);
}

int fp_get_worker_stats(fp_engine *e, int idx, fp_stats *out) {
    if (idx < 0 || idx >= e->nworkers) return -1;
    memset(out, 0, sizeof *out);
    add_stats(&e->w[idx]->st, out);
    return 0;
}

/* Where a new connection or relay goes: the worker with the fewest live ones (ties rotate), counted when
 * placed rather than when the thread gets to the command, so a burst of new connections spreads too. */
static worker *place(fp_engine *e) {
    unsigned start = __atomic_fetch_add(&e->rr, 1, __ATOMIC_RELAXED);
    worker *best = NULL;
    uint64_t least = UINT64_MAX;
    for (int k = 0; k < e->nworkers; k++) {
        worker *w = e->w[(start + (unsigned)k) % (unsigned)e->nworkers];
        uint64_t load = __atomic_load_n(&w->load, __ATOMIC_RELAXED);
        if (load < least) {
            least = load;
            best = w;
        }
    }
    __atomic_add_fetch(&best->load, 1, __ATOMIC_RELAXED);
    return best;
}

/* Queue a command for its worker; returns its id (read before the worker may run and free it). */
static uint64_t push(worker *w, cmd *c) {
    uint64_t id = c->id;
    pthread_mutex_lock(&w->mu);
    *w->cmds_tail = c;
    w->cmds_tail = &c->next;
    pthread_mutex_unlock(&w->mu);
    wake(w);
    return id;
}

uint64_t fp_cmd_relay(fp_engine *e, int a, int b) {
    cmd *c = xcalloc(1, sizeof *c);
    c->op = C_RELAY;
    c->fd = a;
    c->fd2 = b;
    worker *w = place(e);
    c->id = new_id(e, w->idx);
    return push(w, c);
}

uint64_t fp_cmd_conn(fp_engine *e, int fd, SSL_CTX *ctx, int server) {
    cmd *c = xcalloc(1, sizeof *c);
    c->op = C_CONN;
    c->fd = fd;
    c->ctx = ctx;
    if (ctx) SSL_CTX_up_ref(ctx);
    c->server = server;
    worker *w = place(e);
    c->id = new_id(e, w->idx);
    return push(w, c);
}

uint64_t fp_cmd_open(fp_engine *e, uint64_t conn, int app_fd, const char *hdrs, size_t hl) {
    cmd *c = xcalloc(1, sizeof *c);
    c->op = C_OPEN;
    c->conn = conn;
    c->fd = app_fd;
    c->hdrs = xcalloc(1, hl + 1);
    memcpy(c->hdrs, hdrs, hl);
    c->hdrs_len = hl;
    worker *w = worker_of(e, conn); /* a stream lives on its connection's thread */
    c->id = new_id(e, w->idx);
    return push(w, c);
}

uint64_t fp_cmd_accept(fp_engine *e, uint64_t id, uint64_t conn, int32_t sid, int app_fd, const char *prefix,
                       size_t plen) {
    cmd *c = xcalloc(1, sizeof *c);
    c->op = C_ACCEPT;
    c->id = id;
    if (plen) {
        c->hdrs = xcalloc(1, plen);
        memcpy(c->hdrs, prefix, plen);
        c->hdrs_len = plen;
    }
    c->conn = conn;
    c->stream = sid;
    c->fd = app_fd;
    return push(worker_of(e, conn), c);
}

void fp_cmd_reject(fp_engine *e, uint64_t conn, int32_t sid, int status) {
    cmd *c = xcalloc(1, sizeof *c);
    c->op = C_REJECT;
    c->conn = conn;
    c->stream = sid;
    c->status = status;
    push(worker_of(e, conn), c);
}

void fp_cmd_attach(fp_engine *e, uint64_t id, int app_fd, const char *prefix, size_t plen) {
    cmd *c = xcalloc(1, sizeof *c);
    c->op = C_ATTACH;
    c->id = id;
    c->fd = app_fd;
    if (plen) {
        c->hdrs = xcalloc(1, plen);
        memcpy(c->hdrs, prefix, plen);
        c->hdrs_len = plen;
    }
    push(worker_of(e, id), c);
}

void fp_cmd_reset(fp_engine *e, uint64_t id) {
    cmd *c = xcalloc(1, sizeof *c);
    c->op = C_RESET;
    c->id = id;
    push(worker_of(e, id), c);
}

void fp_cmd_close(fp_engine *e, uint64_t conn) {
    cmd *c = xcalloc(1, sizeof *c);
    c->op = C_CLOSE;
    c->id = conn;
    push(worker_of(e, conn), c);
}

/* ---- TLS ----------------------------------------------------------------------------------- */

static int alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen, const unsigned char *in,
                       unsigned int inlen, void *arg) {
    (void)ssl;
    (void)arg;
    for (unsigned int i = 0; i < inlen; i += 1u + in[i]) {
        if (in[i] == 2 && i + 2 < inlen && in[i + 1] == 'h' && in[i + 2] == '2') {
            *out = in + i + 1;
            *outlen = 2;
            return SSL_TLSEXT_ERR_OK;
        }
    }
    return SSL_TLSEXT_ERR_ALERT_FATAL; /* HBONE is h2 only */
}

SSL_CTX *fp_tls_ctx(const char *chain, const char *key, const char *roots, int server, char *err, size_t n) {
    SSL_CTX *ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
    BIO *b = NULL;
    X509 *x = NULL;
    EVP_PKEY *pk = NULL;
    int count = 0;
    if (!ctx) goto fail;
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
    SSL_CTX_set_read_ahead(ctx, 0); /* in_bio reads many records per recv(); OpenSSL takes one at a time */
    /* AES-128-GCM first (OpenSSL's default prefers AES-256: 40% more rounds for no mesh benefit); the
     * server's order decides, so a C server picks it with any client offering it (all do). */
    SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256");
    SSL_CTX_set_options(ctx, SSL_OP_CIPHER_SERVER_PREFERENCE);
    SSL_CTX_set_num_tickets(ctx, 0);
    b = BIO_new_mem_buf(chain, -1);
    while (b && (x = PEM_read_bio_X509(b, NULL, NULL, NULL))) {
        int ok = count++ == 0 ? SSL_CTX_use_certificate(ctx, x) : SSL_CTX_add_extra_chain_cert(ctx, x);
        if (count == 1) X509_free(x); /* use_certificate took its own reference; add_extra took ours */
        x = NULL;
        if (!ok) goto fail;
    }
    BIO_free(b);
    b = NULL;
    ERR_clear_error();
    if (count == 0) {
        snprintf(err, n, "no certificate in the chain PEM");
        goto out;
    }
    b = BIO_new_mem_buf(key, -1);
    pk = b ? PEM_read_bio_PrivateKey(b, NULL, NULL, NULL) : NULL;
    BIO_free(b);
    b = NULL;
    if (!pk || !SSL_CTX_use_PrivateKey(ctx, pk) || !SSL_CTX_check_private_key(ctx)) goto fail;
    EVP_PKEY_free(pk);
    pk = NULL;
    X509_STORE *store = SSL_CTX_get_cert_store(ctx);
    b = BIO_new_mem_buf(roots, -1);
    count = 0;
    while (b && (x = PEM_read_bio_X509(b, NULL, NULL, NULL))) {
        X509_STORE_add_cert(store, x);
        X509_free(x);
        count++;
    }
    BIO_free(b);
    b = NULL;
    ERR_clear_error();
    if (count == 0) {
        snprintf(err, n, "no certificate in the roots PEM");
        goto out;
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    static const unsigned char alpn[] = {2, 'h', '2'};
    if (!server) SSL_CTX_set_alpn_protos(ctx, alpn, sizeof alpn);
    else SSL_CTX_set_alpn_select_cb(ctx, alpn_select, NULL);
    return ctx;
fail:
    snprintf(err, n, "%s", ssl_reason());
out:
    BIO_free(b);
    EVP_PKEY_free(pk);
    SSL_CTX_free(ctx);
    return NULL;
}

/* ---- fuzzing ------------------------------------------------------------------------------- */

fp_conn *fp_fuzz_conn(fp_engine *e, int fd, int server) {
    worker *w = e->w[0]; /* single-threaded: the caller plays worker 0 (the engine is never started) */
    uint64_t id = new_id(e, 0);
    __atomic_add_fetch(&w->load, 1, __ATOMIC_RELAXED);
    do_conn(w, id, fd, NULL, server);
    obj *o = tbl_get(w, id);
    if (!o || server) return o ? (fp_conn *)o : NULL;
    /* client: three CONNECT streams (one app attached later), whose answers the input then carries */
    static const char hdrs[] = ":method\0CONNECT\0:authority\00010.0.0.5:8080\0";
    for (int i = 0; i < 3; i++) {
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) break;
        close(sv[1]);
        if (i == 2) {
            close(sv[0]);
            sv[0] = -1;
        }
        do_open(w, new_id(e, 0), id, sv[0], (char *)hdrs, sizeof hdrs - 1);
        if (o->dead) break;
    }
    return o->dead ? NULL : (fp_conn *)o;
}

int fp_fuzz_feed(fp_conn *c, const uint8_t *data, size_t len) {
    if (c->o.dead) return -1;
    if (conn_feed(c, data, len) < 0) return -1;
    conn_flush_streams(c);
    if (c->o.dead) return -1;
    conn_flush(c);
    /* answer requests the way Python would: alternately accept (with a socketpair app) and reject;
     * attach an app to an answered client stream that had none */
    fp_event *ev = fp_take_events(c->w->e);
    for (fp_event *p = ev; p && !c->o.dead; p = p->next) {
        if (p->kind == FP_EV_RESPONSE && p->status == 200) {
            int sv[2];
            if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0) {
                close(sv[1]);
                do_attach(c->w, p->id, sv[0], "early", 5);
            }
            continue;
        }
        if (p->kind != FP_EV_REQUEST) continue;
        if (p->stream % 4 == 1) {
            int sv[2];
            if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0) {
                close(sv[1]);
                do_answer(c->w, p->up, c->o.id, p->stream, sv[0], 200, "x", 1);
            }
        } else {
            do_answer(c->w, 0, c->o.id, p->stream, -1, 401, NULL, 0);
        }
    }
    fp_event_free(ev);
    /* the graveyard is freed by fp_engine_free: c must stay readable between feeds */
    return c->o.dead ? -1 : 0;
}
