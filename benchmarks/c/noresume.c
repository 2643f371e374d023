/* LD_PRELOAD shim for load generators (h2load, wrk): every TLS connection does a
 * full handshake, and the shim counts what really happened.
 *
 * - SSL_set_session() becomes a no-op, so the client never offers a saved session;
 * - SSL_clear() also drops the session a reused SSL object would otherwise resume;
 * - SSL_new() optionally caps the protocol version (NORESUME_MAX_TLS=1.2 or 1.3);
 * - SSL_do_handshake()/SSL_connect() count each completed handshake as full or
 *   resumed, and the totals go to the file named by NORESUME_STATS at exit
 *   ("full N resumed M"). h2load reuses SSL objects without SSL_free, so counting
 *   at free time missed most connections.
 * Benchmark-only: built at run time by benchmarks/cbuild.py.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static unsigned long full_handshakes, resumed_handshakes;
static long max_version;
static int allow_resumption; /* NORESUME_ALLOW=1: count only (shows the check works) */

static void *next_symbol(const char *name) {
    void *fn = dlsym(RTLD_NEXT, name);
    if (fn == NULL) {
        fprintf(stderr, "noresume: %s not found\n", name);
        abort();
    }
    return fn;
}

__attribute__((constructor)) static void noresume_init(void) {
    const char *v = getenv("NORESUME_MAX_TLS");
    if (v != NULL && strcmp(v, "1.2") == 0) max_version = TLS1_2_VERSION;
    if (v != NULL && strcmp(v, "1.3") == 0) max_version = TLS1_3_VERSION;
    allow_resumption = getenv("NORESUME_ALLOW") != NULL;
}

__attribute__((destructor)) static void noresume_report(void) {
    const char *path = getenv("NORESUME_STATS");
    if (path == NULL) return;
    FILE *f = fopen(path, "a");
    if (f == NULL) return;
    fprintf(f, "full %lu resumed %lu\n",
            __atomic_load_n(&full_handshakes, __ATOMIC_RELAXED),
            __atomic_load_n(&resumed_handshakes, __ATOMIC_RELAXED));
    fclose(f);
}

static void count(const SSL *ssl) {
    if (SSL_session_reused(ssl))
        __atomic_add_fetch(&resumed_handshakes, 1, __ATOMIC_RELAXED);
    else
        __atomic_add_fetch(&full_handshakes, 1, __ATOMIC_RELAXED);
}

int SSL_set_session(SSL *ssl, SSL_SESSION *session) {
    static int (*real)(SSL *, SSL_SESSION *);
    if (!allow_resumption) return 1;
    if (real == NULL) real = (int (*)(SSL *, SSL_SESSION *))next_symbol("SSL_set_session");
    return real(ssl, session);
}

SSL *SSL_new(SSL_CTX *ctx) {
    static SSL *(*real)(SSL_CTX *);
    if (real == NULL) real = (SSL *(*)(SSL_CTX *))next_symbol("SSL_new");
    SSL *ssl = real(ctx);
    if (ssl != NULL && max_version != 0) SSL_set_max_proto_version(ssl, max_version);
    return ssl;
}

int SSL_clear(SSL *ssl) {
    static int (*real)(SSL *);
    static int (*set_session)(SSL *, SSL_SESSION *);
    if (real == NULL) real = (int (*)(SSL *))next_symbol("SSL_clear");
    if (set_session == NULL)
        set_session = (int (*)(SSL *, SSL_SESSION *))next_symbol("SSL_set_session");
    int rc = real(ssl);
    if (!allow_resumption) set_session(ssl, NULL); /* SSL_clear keeps a good session */
    return rc;
}

int SSL_do_handshake(SSL *ssl) {
    static int (*real)(SSL *);
    if (real == NULL) real = (int (*)(SSL *))next_symbol("SSL_do_handshake");
    int rc = real(ssl);
    if (rc == 1) count(ssl);
    return rc;
}

int SSL_connect(SSL *ssl) {
    static int (*real)(SSL *);
    if (real == NULL) real = (int (*)(SSL *))next_symbol("SSL_connect");
    int rc = real(ssl);
    if (rc == 1) count(ssl);
    return rc;
}
