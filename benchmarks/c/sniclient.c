/* Full-handshake client with a server name per connection (h2load and wrk use one).
 *
 *   sniclient PORT NAMES_FILE PROCS [MAX_TLS [HOST]]
 *
 * NAMES_FILE holds one server name per line: connection i uses line i, sends it as
 * SNI and as Host (or HOST when given, e.g. a name the default certificate covers), does a full handshake (no session cache), one GET with
 * "Connection: close", reads to EOF and closes. PROCS processes share the lines
 * round-robin; each does one connection at a time. Connects to 127.0.0.1 only.
 * Prints "connections N ok N failed N resumed N seconds S".
 * Benchmark-only: built at run time by benchmarks/cbuild.py.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_NAME 256
#define MAX_LINES 1000000

static int one(SSL_CTX *ctx, int port, const char *name, const char *host, int *resumed) {
    int ok = 0;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return 0;
    struct timeval tv = {10, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    int yes = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &yes, sizeof yes);
    struct sockaddr_in addr = {0};
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        close(fd);
        return 0;
    }
    SSL *ssl = SSL_new(ctx);
    SSL_set_tlsext_host_name(ssl, name);
    SSL_set_fd(ssl, fd);
    if (SSL_connect(ssl) == 1) {
        *resumed += SSL_session_reused(ssl) ? 1 : 0;
        char req[MAX_NAME + 80];
        int len = snprintf(req, sizeof req,
                           "GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n",
                           host ? host : name);
        if (SSL_write(ssl, req, len) == len) {
            char buf[16384];
            int got = 0, n, first = 1;
            /* Bounded: the server closes (Connection: close) or the 10 s timeout fires. */
            while ((n = SSL_read(ssl, buf, sizeof buf)) > 0) {
                if (first && n >= 12) ok = memcmp(buf + 9, "200", 3) == 0;
                first = 0;
                got += n;
            }
            if (got == 0) ok = 0;
        }
    }
    SSL_free(ssl);
    close(fd);
    return ok;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s PORT NAMES_FILE PROCS [1.2|1.3 [HOST]]\n", argv[0]);
        return 2;
    }
    int port = atoi(argv[1]), procs = atoi(argv[3]);
    long max_version = 0;
    if (argc > 4 && strcmp(argv[4], "1.2") == 0) max_version = TLS1_2_VERSION;
    if (argc > 4 && strcmp(argv[4], "1.3") == 0) max_version = TLS1_3_VERSION;
    const char *host = argc > 5 ? argv[5] : NULL;
    if (host != NULL && strlen(host) >= MAX_NAME) return 2;
    FILE *f = fopen(argv[2], "r");
    if (f == NULL || procs < 1 || procs > 256) {
        fprintf(stderr, "cannot read %s or bad PROCS\n", argv[2]);
        return 2;
    }
    char (*names)[MAX_NAME] = NULL;
    long count = 0, cap = 0;
    char line[MAX_NAME];
    while (count < MAX_LINES && fgets(line, sizeof line, f) != NULL) {
        line[strcspn(line, "\r\n")] = 0;
        if (!line[0]) continue;
        if (count == cap) {
            cap = cap ? cap * 2 : 4096;
            names = realloc(names, (size_t)cap * MAX_NAME);
            if (names == NULL) return 1;
        }
        strcpy(names[count++], line);
    }
    fclose(f);
    int pipes[2];
    if (pipe(pipes) != 0) return 1;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int p = 0; p < procs; p++) {
        pid_t pid = fork();
        if (pid < 0) return 1;
        if (pid == 0) {
            close(pipes[0]);
            SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
            SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
            SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
            SSL_CTX_set_alpn_protos(ctx, (const unsigned char *)"\x08http/1.1", 9);
            if (max_version) SSL_CTX_set_max_proto_version(ctx, max_version);
            long ok = 0, failed = 0;
            int resumed = 0;
            for (long i = p; i < count; i += procs) {
                if (one(ctx, port, names[i], host, &resumed)) ok++; else failed++;
            }
            char out[128];
            int len = snprintf(out, sizeof out, "%ld %ld %d\n", ok, failed, resumed);
            if (write(pipes[1], out, (size_t)len) != len) _exit(1);
            _exit(0);
        }
    }
    close(pipes[1]);
    long ok = 0, failed = 0, resumed = 0;
    FILE *in = fdopen(pipes[0], "r");
    long a, b, c;
    while (fscanf(in, "%ld %ld %ld", &a, &b, &c) == 3) {
        ok += a;
        failed += b;
        resumed += c;
    }
    while (wait(NULL) > 0) {
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("connections %ld ok %ld failed %ld resumed %ld seconds %.4f\n", count, ok, failed,
           resumed, secs);
    return 0;
}
