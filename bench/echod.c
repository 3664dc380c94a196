/* echod: the benchmark's target, a small single-threaded epoll TCP server on 127.0.0.1.
 *
 *   echod [--sink | --once] [PORT]
 *
 * Echo mode (default): every byte read is written back; after the peer's EOF (once all
 * is written back) the connection is closed.
 * --sink: reads to EOF and discards, then writes the decimal byte count and closes.
 * --once: echoes what the first read returns, then closes. For the handshake runs: the
 *   target closes first, so the TIME_WAIT state stays on its side of each connection, and
 *   the server measured never runs short of ephemeral ports for dialling it (on loopback,
 *   thousands of connections a second would otherwise fill the port range in seconds).
 *
 * Prints the port it listens on as the first line of stdout, then serves until killed.
 * Written in C so that the target costs the same little CPU for every peer measured. */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF (64 * 1024)

struct conn {
    int fd;
    size_t len, off; /* echo: pending bytes buf[off..len) */
    uint64_t total;  /* sink: bytes read */
    char buf[BUF];
};

static int sink_mode, once_mode;
static int ep;
static char sink_buf[256 * 1024];

static void drop(struct conn *c) {
    close(c->fd); /* also removes it from the epoll set */
    free(c);
}

static void want(struct conn *c, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static void on_sink(struct conn *c) {
    for (;;) {
        ssize_t n = read(c->fd, sink_buf, sizeof sink_buf);
        if (n > 0) {
            c->total += (uint64_t)n;
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        if (n == 0) {
            char reply[32];
            int k = snprintf(reply, sizeof reply, "%llu", (unsigned long long)c->total);
            ssize_t w = write(c->fd, reply, (size_t)k);
            (void)w;
        }
        drop(c);
        return;
    }
}

static void on_echo(struct conn *c, uint32_t events) {
    if (c->off < c->len) { /* flushing what a short write left */
        if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
            return;
        ssize_t w = write(c->fd, c->buf + c->off, c->len - c->off);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return;
            drop(c);
            return;
        }
        c->off += (size_t)w;
        if (c->off < c->len)
            return;
        c->off = c->len = 0;
        if (once_mode) {
            drop(c);
            return;
        }
        want(c, EPOLLIN);
        return;
    }
    for (int i = 0; i < 16; i++) {
        ssize_t n = read(c->fd, c->buf, BUF);
        if (n == 0) {
            drop(c);
            return;
        }
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return;
            drop(c);
            return;
        }
        ssize_t w = write(c->fd, c->buf, (size_t)n);
        if (w < 0) {
            if (errno != EAGAIN && errno != EINTR) {
                drop(c);
                return;
            }
            w = 0;
        }
        if (w < n) {
            c->off = (size_t)w;
            c->len = (size_t)n;
            want(c, EPOLLOUT);
            return;
        }
        if (once_mode) {
            drop(c);
            return;
        }
        if (n < BUF)
            return;
    }
}

int main(int argc, char **argv) {
    int port = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--sink") == 0)
            sink_mode = 1;
        else if (strcmp(argv[i], "--once") == 0)
            once_mode = 1;
        else
            port = atoi(argv[i]);
    }
    signal(SIGPIPE, SIG_IGN); /* a peer that reset: write() fails with EPIPE instead */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) != 0 || listen(ls, 4096) != 0) {
        perror("echod: bind/listen");
        return 1;
    }
    socklen_t alen = sizeof a;
    getsockname(ls, (struct sockaddr *)&a, &alen);
    printf("%d\n", ntohs(a.sin_port));
    fflush(stdout);

    ep = epoll_create1(0);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &lev);
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("echod: epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c == NULL) {
                for (;;) {
                    int fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
                    if (fd < 0)
                        break;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct conn *nc = calloc(1, sink_mode ? offsetof(struct conn, buf) : sizeof *nc);
                    if (nc == NULL) {
                        close(fd);
                        continue;
                    }
                    nc->fd = fd;
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = nc};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                }
                continue;
            }
            if (sink_mode)
                on_sink(c);
            else
                on_echo(c, evs[i].events);
        }
    }
}
