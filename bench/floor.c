/*
 * bench/floor.c: the floor under the ping figures of bench/vs-node.sh, which
 * measure with wrk on the same machine as the server. It is the least any
 * HTTP server can do for a ping: one thread, one epoll, a request is framed by
 * its Content-Length and answered with a fixed pong the size of ours. No JSON,
 * no token, no log line, no limits. Whatever p99 wrk measures against it is
 * the machine's (the scheduler's and wrk's own), not a server's.
 *
 * Built by vs-node.sh with the system's cc when there is one; never installed.
 * Usage: floor   (binds 127.0.0.1 on a free port and prints
 *                 "listening on 127.0.0.1:PORT"; runs until SIGTERM)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_FD 65536
#define BUF 8192

static const char PONG[] =
    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 49\r\n"
    "Connection: keep-alive\r\n\r\n{\"ok\":true,\"v\":1,\"version\":\"0.1.0\",\"uptime\":1234}";

struct conn {
    char buf[BUF];
    size_t have;
};
static struct conn *conns[MAX_FD];

/* The length of the complete request at the start of c->buf, or 0. */
static size_t complete(struct conn *c) {
    c->buf[c->have] = 0;
    char *end = memmem(c->buf, c->have, "\r\n\r\n", 4);
    if (!end)
        return 0;
    size_t head = (size_t)(end - c->buf) + 4, body = 0;
    for (char *line = c->buf; line < end;) {
        if (strncasecmp(line, "content-length:", 15) == 0)
            body = strtoul(line + 15, NULL, 10);
        char *next = memchr(line, '\n', (size_t)(end - line));
        if (!next)
            break;
        line = next + 1;
    }
    return c->have >= head + body ? head + body : 0;
}

static void drop(int ep, int fd) {
    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    free(conns[fd]);
    conns[fd] = NULL;
}

static void stop(int sig) {
    (void)sig;
    _exit(0);
}

int main(void) {
    signal(SIGTERM, stop);
    int l = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 4096) ||
        getsockname(l, (struct sockaddr *)&a, &len)) {
        perror("floor: listen");
        return 1;
    }
    printf("listening on 127.0.0.1:%u\n", ntohs(a.sin_port));
    fflush(stdout);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = l}, evs[256];
    epoll_ctl(ep, EPOLL_CTL_ADD, l, &ev);
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == l) {
                int c, one = 1;
                while ((c = accept4(l, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    if (c >= MAX_FD || !(conns[c] = calloc(1, sizeof(struct conn)))) {
                        close(c);
                        continue;
                    }
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    ev.data.fd = c;
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
                }
                continue;
            }
            struct conn *c = conns[fd];
            ssize_t r = read(fd, c->buf + c->have, BUF - 1 - c->have);
            if (r <= 0) {
                drop(ep, fd);
                continue;
            }
            c->have += (size_t)r;
            size_t used;
            while ((used = complete(c)) > 0) {
                if (write(fd, PONG, sizeof PONG - 1) != (ssize_t)(sizeof PONG - 1))
                    break;
                memmove(c->buf, c->buf + used, c->have - used);
                c->have -= used;
            }
            if (c->have == BUF - 1)
                drop(ep, fd); /* a head this long is not a ping */
        }
    }
}
