/*
 * Open-loop gRPC load generator for benchmarks/bench_server.py.
 *
 * A Python gRPC client costs about 0.4 ms of CPU per call, as much as the
 * server's own gRPC layer, and it runs on the same two cores as the server:
 * at 2,000 calls/s it takes most of a core from the server it measures.
 * This client costs ~0.04 ms per call (HTTP/2 from libnghttp2, one thread,
 * poll()), so the figures are the server's.
 *
 *   loadgen HOST PORT PATH PAYLOADS RATE OUT [CONNECTIONS] [TIMEOUT_S] [IN_FLIGHT]
 *
 * PAYLOADS: records of [uint32 little-endian length][protobuf message]; each
 * is sent as one unary gRPC request on PATH. Request i is due at
 * t0 + i / RATE, whatever happened to earlier ones (open loop), on
 * connection i % CONNECTIONS; its latency is measured from that due time.
 * OUT: per request, int64 due_ns, int64 done_ns (-1: no answer) from t0,
 * int32 grpc-status (-1: none seen), int32 HTTP :status.
 * IN_FLIGHT > 0 makes it a closed loop: a request is also held back while
 * that many are unanswered, and its due time is when it is sent (saturation).
 * Prints one line on stdout: "sent N done N ok N cpu_s X". With LOADGEN_MESSAGES=1 in the
 * environment it also prints "MSG i TEXT" on stderr for every grpc-message received (the first
 * 200 bytes), so a benchmark can tell refusals apart by their text.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    int64_t due_ns;
    int64_t done_ns;
    int32_t grpc_status;
    int32_t http_status;
} Result;

typedef struct {
    const uint8_t *body; /* 5-byte gRPC prefix + message */
    size_t len;
    size_t sent;
    int64_t index;
} Request;

typedef struct {
    int fd;
    nghttp2_session *session;
    int dead;
} Conn;

static Result *results;
static Request *requests;
static int64_t n_done, n_ok;
static int print_messages;
static struct timespec t0;

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)(t.tv_sec - t0.tv_sec) * 1000000000LL + (t.tv_nsec - t0.tv_nsec);
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static ssize_t send_cb(nghttp2_session *s, const uint8_t *data, size_t len, int flags, void *user) {
    (void)s;
    (void)flags;
    Conn *c = user;
    ssize_t w = send(c->fd, data, len, MSG_NOSIGNAL);
    if (w < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return NGHTTP2_ERR_WOULDBLOCK;
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    }
    return w;
}

static ssize_t read_body(nghttp2_session *s, int32_t stream_id, uint8_t *buf, size_t len, uint32_t *flags,
                         nghttp2_data_source *src, void *user) {
    (void)s;
    (void)stream_id;
    (void)user;
    Request *r = src->ptr;
    size_t k = r->len - r->sent;
    if (k > len)
        k = len;
    memcpy(buf, r->body + r->sent, k);
    r->sent += k;
    if (r->sent == r->len)
        *flags |= NGHTTP2_DATA_FLAG_EOF;
    return (ssize_t)k;
}

static int on_header(nghttp2_session *s, const nghttp2_frame *frame, const uint8_t *name, size_t namelen,
                     const uint8_t *value, size_t valuelen, uint8_t flags, void *user) {
    (void)flags;
    (void)user;
    if (frame->hd.type != NGHTTP2_HEADERS)
        return 0;
    Request *r = nghttp2_session_get_stream_user_data(s, frame->hd.stream_id);
    if (r == NULL)
        return 0;
    char text[16];
    size_t k = valuelen < sizeof(text) - 1 ? valuelen : sizeof(text) - 1;
    memcpy(text, value, k);
    text[k] = 0;
    if (namelen == 11 && memcmp(name, "grpc-status", 11) == 0)
        results[r->index].grpc_status = atoi(text);
    else if (namelen == 7 && memcmp(name, ":status", 7) == 0)
        results[r->index].http_status = atoi(text);
    else if (print_messages && namelen == 12 && memcmp(name, "grpc-message", 12) == 0 && valuelen > 0)
        fprintf(stderr, "MSG %lld %.*s\n", (long long)r->index, (int)(valuelen > 200 ? 200 : valuelen),
                (const char *)value);
    return 0;
}

static int on_close(nghttp2_session *s, int32_t stream_id, uint32_t error_code, void *user) {
    (void)error_code;
    (void)user;
    Request *r = nghttp2_session_get_stream_user_data(s, stream_id);
    if (r == NULL)
        return 0;
    Result *res = &results[r->index];
    if (res->done_ns < 0) {
        res->done_ns = now_ns();
        n_done++;
        if (res->grpc_status == 0 && res->http_status == 200)
            n_ok++;
    }
    return 0;
}

static int connect_to(const char *host, const char *port) {
    struct addrinfo hints = {0}, *ai;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(host, port, &hints, &ai) != 0) {
        fprintf(stderr, "loadgen: cannot resolve %s:%s\n", host, port);
        exit(2);
    }
    int fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
    if (fd < 0)
        die("socket");
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0)
        die("connect");
    freeaddrinfo(ai);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

static uint8_t *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        die(path);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *data = malloc(size > 0 ? (size_t)size : 1);
    if (data == NULL || (size > 0 && fread(data, 1, (size_t)size, f) != (size_t)size))
        die("read payloads");
    fclose(f);
    *len = (size_t)size;
    return data;
}

#define HDR(n, v) {(uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, strlen(v), NGHTTP2_NV_FLAG_NONE}

int main(int argc, char **argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: loadgen HOST PORT PATH PAYLOADS RATE OUT [CONNECTIONS] [TIMEOUT_S] [IN_FLIGHT]\n");
        return 2;
    }
    const char *host = argv[1], *port = argv[2], *path = argv[3];
    print_messages = getenv("LOADGEN_MESSAGES") != NULL && strcmp(getenv("LOADGEN_MESSAGES"), "1") == 0;
    double rate = atof(argv[5]);
    int nconn = argc > 7 ? atoi(argv[7]) : 1;
    double timeout_s = argc > 8 ? atof(argv[8]) : 30.0;
    int64_t in_flight = argc > 9 ? atoll(argv[9]) : 0;
    if (rate <= 0 || nconn < 1) {
        fprintf(stderr, "loadgen: RATE and CONNECTIONS must be positive\n");
        return 2;
    }

    /* Frame every payload once, up front: [0][uint32 big-endian length][message]. */
    size_t flen;
    uint8_t *file = read_file(argv[4], &flen);
    int64_t n = 0;
    for (size_t off = 0; off + 4 <= flen; n++) {
        uint32_t k;
        memcpy(&k, file + off, 4);
        off += 4 + k;
    }
    requests = calloc(n ? n : 1, sizeof(Request));
    results = calloc(n ? n : 1, sizeof(Result));
    uint8_t *framed = malloc(flen + (size_t)n + 1);
    if (!requests || !results || !framed)
        die("malloc");
    size_t off = 0, fo = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t k;
        memcpy(&k, file + off, 4);
        off += 4;
        uint8_t *b = framed + fo;
        b[0] = 0;
        b[1] = (uint8_t)(k >> 24);
        b[2] = (uint8_t)(k >> 16);
        b[3] = (uint8_t)(k >> 8);
        b[4] = (uint8_t)k;
        memcpy(b + 5, file + off, k);
        off += k;
        requests[i] = (Request){b, (size_t)k + 5, 0, i};
        fo += (size_t)k + 5;
        results[i] = (Result){0, -1, -1, -1};
    }

    nghttp2_session_callbacks *cbs;
    nghttp2_session_callbacks_new(&cbs);
    nghttp2_session_callbacks_set_send_callback(cbs, send_cb);
    nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_close);

    char authority[300];
    snprintf(authority, sizeof(authority), "%s:%s", host, port);
    Conn *conns = calloc((size_t)nconn, sizeof(Conn));
    struct pollfd *pfd = calloc((size_t)nconn, sizeof(struct pollfd));
    for (int c = 0; c < nconn; c++) {
        conns[c].fd = connect_to(host, port);
        if (nghttp2_session_client_new(&conns[c].session, cbs, &conns[c]) != 0)
            die("nghttp2_session_client_new");
        nghttp2_settings_entry iv[] = {{NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, 100000},
                                       {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 1 << 24}};
        nghttp2_submit_settings(conns[c].session, NGHTTP2_FLAG_NONE, iv, 2);
        nghttp2_session_set_local_window_size(conns[c].session, NGHTTP2_FLAG_NONE, 0, 1 << 30);
        nghttp2_session_send(conns[c].session);
    }

    nghttp2_nv hdrs[] = {
        HDR(":method", "POST"), HDR(":scheme", "http"), HDR(":path", path), HDR(":authority", authority),
        HDR("content-type", "application/grpc"), HDR("te", "trailers"),
    };
    const int nhdrs = sizeof(hdrs) / sizeof(hdrs[0]);

    clock_gettime(CLOCK_MONOTONIC, &t0);
    const double stride_ns = 1e9 / rate;
    int64_t next = 0, seen_done = 0, progress_at = 0;
    uint8_t buf[65536];
    for (;;) {
        int64_t t = now_ns();
        while (next < n && (int64_t)(next * stride_ns) <= t && (in_flight <= 0 || next - n_done < in_flight)) {
            Conn *c = &conns[next % nconn];
            results[next].due_ns = in_flight > 0 ? t : (int64_t)(next * stride_ns);
            nghttp2_data_provider dp;
            dp.source.ptr = &requests[next];
            dp.read_callback = read_body;
            if (!c->dead && nghttp2_submit_request(c->session, NULL, hdrs, nhdrs, &dp, &requests[next]) < 0)
                c->dead = 1;
            next++;
        }
        int alive = 0;
        for (int c = 0; c < nconn; c++) {
            if (conns[c].dead)
                continue;
            if (nghttp2_session_send(conns[c].session) != 0)
                conns[c].dead = 1;
            alive += !conns[c].dead;
        }
        if (n_done == n || !alive)
            break;
        t = now_ns();
        if (n_done != seen_done) {
            seen_done = n_done;
            progress_at = t;
        }
        if (next > n_done && t - progress_at > (int64_t)(timeout_s * 1e9))
            break; /* calls outstanding and no answer for TIMEOUT_S: give up on them */
        int wait_ms = 100;
        if (next < n && (in_flight <= 0 || next - n_done < in_flight)) {
            int64_t until = (int64_t)(next * stride_ns) - t;
            wait_ms = until <= 0 ? 0 : (int)((until + 999999) / 1000000);
        }
        for (int c = 0; c < nconn; c++) {
            pfd[c].fd = conns[c].dead ? -1 : conns[c].fd;
            pfd[c].events = POLLIN | (nghttp2_session_want_write(conns[c].session) ? POLLOUT : 0);
            pfd[c].revents = 0;
        }
        if (poll(pfd, (nfds_t)nconn, wait_ms) < 0 && errno != EINTR)
            die("poll");
        for (int c = 0; c < nconn; c++) {
            if (conns[c].dead || !(pfd[c].revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
            for (;;) {
                ssize_t r = recv(conns[c].fd, buf, sizeof(buf), 0);
                if (r > 0) {
                    if (nghttp2_session_mem_recv(conns[c].session, buf, (size_t)r) < 0) {
                        conns[c].dead = 1;
                        break;
                    }
                    continue;
                }
                if (r == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
                    conns[c].dead = 1;
                break;
            }
        }
    }

    FILE *out = fopen(argv[6], "wb");
    if (out == NULL || (n && fwrite(results, sizeof(Result), (size_t)n, out) != (size_t)n))
        die(argv[6]);
    fclose(out);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
    printf("sent %lld done %lld ok %lld cpu_s %.3f\n", (long long)next, (long long)n_done, (long long)n_ok, cpu);
    for (int c = 0; c < nconn; c++) {
        nghttp2_session_del(conns[c].session);
        close(conns[c].fd);
    }
    nghttp2_session_callbacks_del(cbs);
    return 0;
}
