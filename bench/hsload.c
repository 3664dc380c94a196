/* hsload: the benchmark's TLS client and load generator (OpenSSL libssl, one thread).
 *
 * Modes (first argument):
 *
 *   handshake  N concurrent connections (--conns), non-blocking, driven by poll(). Each
 *              one: connect, TLS 1.3 handshake presenting --cert/--key and verifying the
 *              server against --ca and --servername, write 1 byte, read its echo (so the
 *              server has dialled its target and relayed), send close_notify, wait for the
 *              server to close, close. Then the slot starts the next connection. Runs for
 *              --duration seconds; a handshake counts when its echo byte is read.
 *              --resume: every connection offers the newest session (TLS 1.3 ticket) that
 *              any earlier connection received; the output says how many were resumed.
 *   hold       Opens --total connections (--conns at a time), each handshake + 1-byte
 *              echo, and keeps them open; prints its result line, then waits for EOF on
 *              stdin and exits (closing them all).
 *   pingpong   One connection (TLS, or plain TCP with --plain): --rounds round trips of
 *              --size bytes after 200 warm-up rounds; prints p50/p90/p99/mean/max (us).
 *   bulk       One plain TCP connection: writes --mb MiB, half-closes, reads the target's
 *              reply (the byte count, from `echod --sink`); prints MiB/s.
 *
 * Output: one JSON object on stdout. cpu_s is this process's user+system CPU time. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

static int port;
static const char *ca, *cert, *key, *servername = "localhost";
static int nconns = 50, resume, plain, rounds = 5000, size = 64, total = 1000;
static double duration = 5, conn_timeout = 10;
static long mb = 256;

static SSL_CTX *ctx;
static SSL_SESSION *latest; /* --resume: the newest resumable session received */

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           (double)ru.ru_stime.tv_usec / 1e6;
}

static void die(const char *what) {
    fprintf(stderr, "hsload: %s: %s\n", what, strerror(errno));
    ERR_print_errors_fp(stderr);
    exit(1);
}

static void make_ctx(void) {
    ctx = SSL_CTX_new(TLS_client_method());
    if (ctx == NULL)
        die("SSL_CTX_new");
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION);
    if (SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1)
        die("loading --ca");
    if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1)
        die("loading --cert");
    if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1)
        die("loading --key");
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    /* Sessions are kept by hand (SSL_get1_session), not in an internal cache. */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
}

static SSL *new_ssl(int fd) {
    SSL *ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    SSL_set_tlsext_host_name(ssl, servername);
    SSL_set1_host(ssl, servername);
    if (resume && latest != NULL)
        SSL_set_session(ssl, latest);
    return ssl;
}

static void keep_session(SSL *ssl) {
    SSL_SESSION *s = SSL_get1_session(ssl);
    if (s == NULL)
        return;
    if (!SSL_SESSION_is_resumable(s)) {
        SSL_SESSION_free(s);
        return;
    }
    if (latest != NULL)
        SSL_SESSION_free(latest);
    latest = s;
}

static int tcp_socket(int nonblocking) {
    int fd = socket(AF_INET, SOCK_STREAM | (nonblocking ? SOCK_NONBLOCK : 0), 0);
    if (fd < 0)
        die("socket");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

static struct sockaddr_in target(void) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

/* ------------------------------------------------------------------ handshake / hold */

enum state { CONNECTING, HANDSHAKE, WRITE, READ, SHUTDOWN, DRAIN, HELD };

struct conn {
    int fd;
    SSL *ssl;
    enum state st;
    short events;
    double started;
};

static long completed, resumed, errors, timeouts;
static double *times; /* connect → echo read, per completed connection (ms) */
static long ntimes, times_cap;

static void record_time(double ms) {
    if (ntimes == times_cap) {
        times_cap = times_cap ? 2 * times_cap : 4096;
        times = realloc(times, (size_t)times_cap * sizeof *times);
    }
    times[ntimes++] = ms;
}
static int hold_mode;
static struct conn **held;
static long nheld;

static void conn_free(struct conn *c) {
    if (c->ssl != NULL)
        SSL_free(c->ssl);
    if (c->fd >= 0)
        close(c->fd);
    free(c);
}

static struct conn *conn_start(void) {
    struct conn *c = calloc(1, sizeof *c);
    c->fd = tcp_socket(1);
    c->started = now();
    struct sockaddr_in a = target();
    if (connect(c->fd, (struct sockaddr *)&a, sizeof a) != 0 && errno != EINPROGRESS) {
        if (errors <= 5)
            fprintf(stderr, "hsload: connect failed: %s\n", strerror(errno));
        errors++;
        conn_free(c);
        return NULL;
    }
    c->st = CONNECTING;
    c->events = POLLOUT;
    return c;
}

static const char *const state_names[] = {"connect", "handshake", "write", "read", "shutdown", "drain", "held"};

/* The first few failures are described on stderr; later ones are only counted. */
static void report(struct conn *c, const char *what) {
    if (errors > 5)
        return;
    unsigned long e = ERR_peek_last_error();
    char buf[256] = "";
    if (e != 0)
        ERR_error_string_n(e, buf, sizeof buf);
    fprintf(stderr, "hsload: %s failed after %.3f s: %s%s%s\n", state_names[c->st], now() - c->started, what,
            buf[0] ? ": " : "", buf);
}

/* SSL call result → 1 done, 0 wait (events set), -1 failed. */
static int ssl_wait(struct conn *c, int r) {
    if (r > 0)
        return 1;
    int err = SSL_get_error(c->ssl, r);
    switch (err) {
    case SSL_ERROR_WANT_READ:
        c->events = POLLIN;
        return 0;
    case SSL_ERROR_WANT_WRITE:
        c->events = POLLOUT;
        return 0;
    default:
        if (c->st < SHUTDOWN)
            report(c, err == SSL_ERROR_SYSCALL   ? (errno ? strerror(errno) : "connection closed")
                      : err == SSL_ERROR_ZERO_RETURN ? "close_notify from the server"
                                                     : "TLS error");
        ERR_clear_error();
        return -1;
    }
}

/* Advance one connection as far as it goes. Returns 1 when its slot is free again. */
static int advance(struct conn *c) {
    char b = 'x';
    int r;
    for (;;) {
        switch (c->st) {
        case CONNECTING: {
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err != 0) {
                report(c, strerror(err));
                errors++;
                return 1;
            }
            c->ssl = new_ssl(c->fd);
            c->st = HANDSHAKE;
            break;
        }
        case HANDSHAKE:
            r = ssl_wait(c, SSL_connect(c->ssl));
            if (r <= 0) {
                errors += r < 0;
                return r < 0;
            }
            c->st = WRITE;
            break;
        case WRITE:
            r = ssl_wait(c, SSL_write(c->ssl, &b, 1));
            if (r <= 0) {
                errors += r < 0;
                return r < 0;
            }
            c->st = READ;
            break;
        case READ:
            r = ssl_wait(c, SSL_read(c->ssl, &b, 1));
            if (r <= 0) {
                errors += r < 0;
                return r < 0;
            }
            completed++;
            record_time((now() - c->started) * 1e3);
            resumed += SSL_session_reused(c->ssl);
            if (resume)
                keep_session(c->ssl);
            if (hold_mode) {
                c->st = HELD;
                held[nheld++] = c;
                return 1;
            }
            c->st = SHUTDOWN;
            break;
        case SHUTDOWN:
            r = SSL_shutdown(c->ssl);
            if (r < 0 && ssl_wait(c, r) == 0)
                return 0;
            c->st = DRAIN;
            break;
        case DRAIN: {
            char sink[256];
            r = SSL_read(c->ssl, sink, sizeof sink);
            if (r > 0)
                break;
            if (ssl_wait(c, r) == 0)
                return 0;
            /* close_notify, EOF or reset from the server: done. The server closed first, so
             * its socket would sit in TIME_WAIT; close with a reset, which ends that, so that
             * a new connection from the same port is never held up by it. */
            struct linger lg = {.l_onoff = 1, .l_linger = 0};
            setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
            return 1;
        }
        case HELD:
            return 1;
        }
    }
}

/* Keep `slots` connections going until `until` (or `limit` completions, or, in hold mode,
 * until `total` connections were started and have finished). */
static void run(int slots, double until, long limit) {
    struct conn **cs = calloc((size_t)slots, sizeof *cs);
    struct pollfd *pfd = calloc((size_t)slots, sizeof *pfd);
    long started = 0;
    for (;;) {
        double t = now();
        int active = 0;
        for (int i = 0; i < slots; i++) {
            struct conn *c = cs[i];
            if (c != NULL && t - c->started > conn_timeout) {
                timeouts++;
                conn_free(c);
                cs[i] = c = NULL;
            }
            int may_start = t < until && completed < limit && (!hold_mode || started < total);
            while (c == NULL && may_start) {
                c = cs[i] = conn_start();
                started++;
                if (c == NULL && errors > 1000)
                    die("too many connect errors");
                may_start = t < until && completed < limit && (!hold_mode || started < total);
            }
            pfd[i].fd = c != NULL ? c->fd : -1;
            pfd[i].events = c != NULL ? c->events : 0;
            pfd[i].revents = 0;
            active += c != NULL;
        }
        if (active == 0 || t >= until || completed >= limit)
            break;
        int n = poll(pfd, (nfds_t)slots, 100);
        if (n < 0 && errno != EINTR)
            die("poll");
        for (int i = 0; i < slots && n > 0; i++) {
            if (pfd[i].revents == 0 || cs[i] == NULL)
                continue;
            if (advance(cs[i])) {
                if (cs[i]->st != HELD)
                    conn_free(cs[i]);
                cs[i] = NULL;
            }
        }
    }
    for (int i = 0; i < slots; i++) /* unfinished at the deadline: abandoned */
        if (cs[i] != NULL)
            conn_free(cs[i]);
    free(cs);
    free(pfd);
}

static int cmp_double(const void *a, const void *b);

static int mode_handshake(void) {
    make_ctx();
    /* One connection first: checks the setup and, with --resume, gets a ticket. */
    run(1, now() + conn_timeout, 1);
    if (completed != 1) {
        fprintf(stderr, "hsload: the first connection failed (errors=%ld timeouts=%ld)\n", errors, timeouts);
        ERR_print_errors_fp(stderr);
        return 1;
    }
    completed = resumed = errors = timeouts = ntimes = 0;
    double cpu0 = cpu_seconds(), t0 = now();
    run(nconns, t0 + duration, 1L << 60);
    double secs = now() - t0, cpu = cpu_seconds() - cpu0;
    qsort(times, (size_t)ntimes, sizeof *times, cmp_double);
#define T(p) (ntimes ? times[(size_t)((double)(ntimes - 1) * (p) + 0.5)] : 0.0)
    printf("{\"mode\": \"handshake\", \"resume\": %s, \"conns\": %d, \"completed\": %ld, \"resumed\": %ld, "
           "\"errors\": %ld, \"timeouts\": %ld, \"seconds\": %.3f, \"rate\": %.1f, \"cpu_s\": %.3f, "
           "\"conn_p50_ms\": %.2f, \"conn_p99_ms\": %.2f, \"conn_max_ms\": %.2f}\n",
           resume ? "true" : "false", nconns, completed, resumed, errors, timeouts, secs, (double)completed / secs,
           cpu, T(0.5), T(0.99), T(1.0));
    return 0;
}

static int mode_hold(void) {
    make_ctx();
    hold_mode = 1;
    held = calloc((size_t)total, sizeof *held);
    double t0 = now();
    run(nconns, t0 + 600, 1L << 60);
    printf("{\"mode\": \"hold\", \"held\": %ld, \"errors\": %ld, \"timeouts\": %ld, \"seconds\": %.3f}\n", nheld,
           errors, timeouts, now() - t0);
    fflush(stdout);
    char buf[64];
    while (read(0, buf, sizeof buf) > 0) {
    }
    return 0;
}

/* ------------------------------------------------------------------ blocking modes */

static int blocking_connect(void) {
    int fd = tcp_socket(0);
    struct sockaddr_in a = target();
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0)
        die("connect");
    return fd;
}

static void xfer(SSL *ssl, int fd, char *buf, int n, int writing) {
    int done = 0;
    while (done < n) {
        int r;
        if (ssl != NULL)
            r = writing ? SSL_write(ssl, buf + done, n - done) : SSL_read(ssl, buf + done, n - done);
        else
            r = (int)(writing ? write(fd, buf + done, (size_t)(n - done)) : read(fd, buf + done, (size_t)(n - done)));
        if (r <= 0) {
            if (r < 0 && ssl == NULL && errno == EINTR)
                continue;
            die(writing ? "write" : "read (connection closed?)");
        }
        done += r;
    }
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int mode_pingpong(void) {
    int fd = blocking_connect();
    SSL *ssl = NULL;
    if (!plain) {
        make_ctx();
        ssl = new_ssl(fd);
        if (SSL_connect(ssl) != 1)
            die("handshake");
    }
    char *out = malloc((size_t)size), *in = malloc((size_t)size);
    for (int i = 0; i < size; i++)
        out[i] = (char)('a' + i % 26);
    double *lat = calloc((size_t)rounds, sizeof *lat);
    for (int i = 0; i < 200; i++) {
        xfer(ssl, fd, out, size, 1);
        xfer(ssl, fd, in, size, 0);
    }
    double sum = 0;
    for (int i = 0; i < rounds; i++) {
        double t = now();
        xfer(ssl, fd, out, size, 1);
        xfer(ssl, fd, in, size, 0);
        lat[i] = (now() - t) * 1e6;
        sum += lat[i];
    }
    if (memcmp(in, out, (size_t)size) != 0) {
        fprintf(stderr, "hsload: echo mismatch\n");
        return 1;
    }
    qsort(lat, (size_t)rounds, sizeof *lat, cmp_double);
#define PCT(p) lat[(size_t)((double)(rounds - 1) * (p) + 0.5)]
    printf("{\"mode\": \"pingpong\", \"rounds\": %d, \"size\": %d, \"p50_us\": %.1f, \"p90_us\": %.1f, "
           "\"p99_us\": %.1f, \"mean_us\": %.1f, \"max_us\": %.1f}\n",
           rounds, size, PCT(0.5), PCT(0.9), PCT(0.99), sum / rounds, lat[rounds - 1]);
    if (ssl != NULL) {
        SSL_shutdown(ssl);
        SSL_free(ssl);
    }
    close(fd);
    return 0;
}

static int mode_bulk(void) {
    static char chunk[1 << 20];
    int r = open("/dev/urandom", O_RDONLY);
    if (r < 0 || read(r, chunk, sizeof chunk) != (ssize_t)sizeof chunk)
        die("/dev/urandom");
    close(r);
    double t0 = now();
    int fd = blocking_connect();
    for (long i = 0; i < mb; i++)
        xfer(NULL, fd, chunk, (int)sizeof chunk, 1);
    shutdown(fd, SHUT_WR);
    char reply[64] = {0};
    size_t got = 0;
    ssize_t n;
    while (got < sizeof reply - 1 && (n = read(fd, reply + got, sizeof reply - 1 - got)) > 0)
        got += (size_t)n;
    double secs = now() - t0;
    close(fd);
    long long expect = (long long)mb << 20;
    if (atoll(reply) != expect) {
        fprintf(stderr, "hsload: the sink got %s bytes, expected %lld\n", reply, expect);
        return 1;
    }
    printf("{\"mode\": \"bulk\", \"mib\": %ld, \"seconds\": %.3f, \"mib_per_s\": %.1f}\n", mb, secs,
           (double)mb / secs);
    return 0;
}

/* ------------------------------------------------------------------ main */

int main(int argc, char **argv) {
    static struct option opts[] = {
        {"port", required_argument, 0, 'p'},     {"ca", required_argument, 0, 'a'},
        {"cert", required_argument, 0, 'c'},     {"key", required_argument, 0, 'k'},
        {"servername", required_argument, 0, 's'}, {"conns", required_argument, 0, 'n'},
        {"duration", required_argument, 0, 'd'}, {"resume", no_argument, 0, 'r'},
        {"plain", no_argument, 0, 'P'},          {"rounds", required_argument, 0, 'R'},
        {"size", required_argument, 0, 'z'},     {"total", required_argument, 0, 't'},
        {"mb", required_argument, 0, 'm'},       {"timeout", required_argument, 0, 'T'},
        {0, 0, 0, 0},
    };
    if (argc < 2) {
        fprintf(stderr, "usage: hsload handshake|hold|pingpong|bulk --port P [options]\n");
        return 2;
    }
    const char *mode = argv[1];
    signal(SIGPIPE, SIG_IGN); /* a server that reset: write() fails with EPIPE instead */
    optind = 2;
    int o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 'p': port = atoi(optarg); break;
        case 'a': ca = optarg; break;
        case 'c': cert = optarg; break;
        case 'k': key = optarg; break;
        case 's': servername = optarg; break;
        case 'n': nconns = atoi(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'r': resume = 1; break;
        case 'P': plain = 1; break;
        case 'R': rounds = atoi(optarg); break;
        case 'z': size = atoi(optarg); break;
        case 't': total = atoi(optarg); break;
        case 'm': mb = atol(optarg); break;
        case 'T': conn_timeout = atof(optarg); break;
        default: return 2;
        }
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (port <= 0) {
        fprintf(stderr, "hsload: --port is required\n");
        return 2;
    }
    if (strcmp(mode, "bulk") != 0 && !(strcmp(mode, "pingpong") == 0 && plain) &&
        (ca == NULL || cert == NULL || key == NULL)) {
        fprintf(stderr, "hsload: %s needs --ca, --cert and --key\n", mode);
        return 2;
    }
    if (strcmp(mode, "handshake") == 0)
        return mode_handshake();
    if (strcmp(mode, "hold") == 0)
        return mode_hold();
    if (strcmp(mode, "pingpong") == 0)
        return mode_pingpong();
    if (strcmp(mode, "bulk") == 0)
        return mode_bulk();
    fprintf(stderr, "hsload: unknown mode %s\n", mode);
    return 2;
}
