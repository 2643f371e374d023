/* Opens COUNT TLS connections to 127.0.0.1:PORT, sends one keep-alive GET on each,
 * reads its response, and holds them all open until stdin closes (or a line
 * arrives): a proxy's memory per idle keep-alive connection is then measurable.
 *
 *   holdconns PORT COUNT CONCURRENCY HOST [1.2|1.3]
 *
 * One process, non-blocking sockets and epoll, at most CONCURRENCY connections
 * between connect and response at once; SNI and Host are HOST, ALPN http/1.1, full
 * handshakes (no session cache), buffers released while idle (~few kB each here).
 * Prints "held N failed M seconds S" once every connection is held or failed, and
 * "released N closed_early K" at the end (K: held connections the server closed
 * before release, which would make the measurement wrong).
 * Benchmark-only: built at run time by benchmarks/cbuild.py.
 */
#define _GNU_SOURCE /* POLLRDHUP */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { CONNECTING, HANDSHAKE, WRITING, READING, HELD, FAILED };

struct conn {
    int fd, state, got;
    SSL *ssl;
    char buf[1024];
};

static struct conn *conns;
static int epfd, port, active, held, failed;
static char request[512];
static SSL_CTX *ctx;

static void finish(struct conn *c, int ok) {
    active--;
    if (ok) {
        c->state = HELD;
        held++;
        struct epoll_event ev = {.events = EPOLLRDHUP, .data.ptr = c};
        epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
        return;
    }
    c->state = FAILED;
    failed++;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    if (c->ssl) SSL_free(c->ssl);
    c->ssl = NULL;
    close(c->fd);
}

static int start(struct conn *c, const char *host) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) return 0;
    int yes = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &yes, sizeof yes);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) != 0 && errno != EINPROGRESS) {
        close(c->fd);
        return 0;
    }
    c->ssl = SSL_new(ctx);
    SSL_set_tlsext_host_name(c->ssl, host);
    SSL_set_fd(c->ssl, c->fd);
    SSL_set_connect_state(c->ssl);
    c->state = HANDSHAKE;
    active++;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
    return 1;
}

/* The response is complete once its head and Content-Length bytes of body arrived. */
static int complete(struct conn *c) {
    c->buf[c->got] = 0;
    char *end = strstr(c->buf, "\r\n\r\n");
    if (end == NULL) return 0;
    long length = 0;
    for (char *p = c->buf; p && p < end; p = strstr(p, "\r\n")) {
        p += (p[0] == '\r') ? 2 : 0;
        if (strncasecmp(p, "content-length:", 15) == 0) length = atol(p + 15);
    }
    return c->got >= (end + 4 - c->buf) + length;
}

static void step(struct conn *c) {
    int rc;
    ERR_clear_error();
    if (c->state == HANDSHAKE) {
        rc = SSL_do_handshake(c->ssl);
        if (rc != 1) {
            int e = SSL_get_error(c->ssl, rc);
            if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) finish(c, 0);
            return;
        }
        c->state = WRITING;
    }
    if (c->state == WRITING) {
        rc = SSL_write(c->ssl, request, (int)strlen(request));
        if (rc <= 0) {
            int e = SSL_get_error(c->ssl, rc);
            if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) finish(c, 0);
            return;
        }
        c->state = READING;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
    }
    while (c->state == READING) {
        rc = SSL_read(c->ssl, c->buf + c->got, (int)sizeof c->buf - 1 - c->got);
        if (rc <= 0) {
            if (SSL_get_error(c->ssl, rc) != SSL_ERROR_WANT_READ) finish(c, 0);
            return;
        }
        c->got += rc;
        if (complete(c)) finish(c, memcmp(c->buf, "HTTP/1.1 200", 12) == 0);
        else if (c->got >= (int)sizeof c->buf - 1) finish(c, 0);
    }
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s PORT COUNT CONCURRENCY HOST [1.2|1.3]\n", argv[0]);
        return 2;
    }
    port = atoi(argv[1]);
    int count = atoi(argv[2]), concurrency = atoi(argv[3]);
    const char *host = argv[4];
    if (count < 1 || concurrency < 1 || strlen(host) > 200) return 2;
    snprintf(request, sizeof request, "GET / HTTP/1.1\r\nHost: %s\r\n\r\n", host);
    ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_alpn_protos(ctx, (const unsigned char *)"\x08http/1.1", 9);
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    if (argc > 5 && strcmp(argv[5], "1.2") == 0) SSL_CTX_set_max_proto_version(ctx, TLS1_2_VERSION);
    if (argc > 5 && strcmp(argv[5], "1.3") == 0) SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION);
    conns = calloc((size_t)count, sizeof *conns);
    epfd = epoll_create1(0);
    if (conns == NULL || epfd < 0) return 1;
    struct epoll_event events[256];
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int next = 0;
    while (held + failed < count) {
        while (next < count && active < concurrency) {
            if (!start(&conns[next], host)) {
                conns[next].state = FAILED;
                failed++;
            }
            next++;
        }
        int n = epoll_wait(epfd, events, 256, 10000);
        if (n == 0) break; /* nothing moved in 10 s: give up on the rest */
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (c->state == HELD) epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL); /* closed */
            else if (c->state != FAILED) step(c);
        }
    }
    failed = count - held;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("held %d failed %d seconds %.3f\n", held, failed,
           (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
    fflush(stdout);
    char line[64];
    if (fgets(line, sizeof line, stdin) == NULL) { /* EOF or a line: release */ }
    int closed_early = 0;
    for (int i = 0; i < count; i++) {
        struct conn *c = &conns[i];
        if (c->state != HELD) continue;
        struct pollfd p = {.fd = c->fd, .events = POLLIN | POLLRDHUP};
        if (poll(&p, 1, 0) == 1 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR))) closed_early++;
        SSL_free(c->ssl);
        close(c->fd);
    }
    printf("released %d closed_early %d\n", held, closed_early);
    return 0;
}
