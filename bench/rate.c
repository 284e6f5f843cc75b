/*
 * bench/rate.c: pings at a fixed rate (open loop), for bench/vs-node.sh.
 *
 * wrk sends the next request as soon as an answer comes (closed loop): it
 * keeps the server and the machine saturated, and its p99 is mostly the
 * scheduler's. A platform does not saturate a connector; it sends at its own
 * pace. This client sends RATE pings a second over CONNS keep-alive
 * connections for SECONDS, on a fixed schedule, and times each answer from
 * the moment its request was due, not from when it could be sent: a server
 * that falls behind is charged for the wait (no "coordinated omission").
 *
 * Usage: rate HOST:PORT RATE SECONDS CONNS   (the token in AION_TOKEN)
 * Prints key=value lines: rate_sent, rate_ok, rate_non200, rate_errors,
 * rate_achieved, rate_p50_ms, rate_p90_ms, rate_p99_ms, rate_p999_ms,
 * rate_max_ms. Only 127.0.0.1 is accepted.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 256
#define BUF 4096

struct conn {
    int fd;
    int busy;
    double due; /* when its request in flight was due */
    char buf[BUF];
    size_t have;
};

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The length of the complete answer at the start of c->buf (0: not yet),
 * framed by Content-Length or chunked, and whether it was a 200. */
static size_t answer(struct conn *c, int *ok) {
    c->buf[c->have] = 0;
    char *end = memmem(c->buf, c->have, "\r\n\r\n", 4);
    if (!end)
        return 0;
    size_t head = (size_t)(end - c->buf) + 4, body = 0;
    int chunked = 0;
    for (char *line = c->buf; line < end;) {
        if (strncasecmp(line, "content-length:", 15) == 0)
            body = strtoul(line + 15, NULL, 10);
        if (strncasecmp(line, "transfer-encoding:", 18) == 0 && strcasestr(line, "chunked") &&
            strcasestr(line, "chunked") < end)
            chunked = 1;
        char *next = memchr(line, '\n', (size_t)(end - line));
        if (!next)
            break;
        line = next + 1;
    }
    *ok = strncmp(c->buf, "HTTP/1.1 200", 12) == 0;
    if (!chunked)
        return c->have >= head + body ? head + body : 0;
    /* Chunks: SIZE CRLF DATA CRLF ..., up to the last one, 0 CRLF CRLF (the
     * Node original answers so). No trailers are expected. */
    size_t at = head;
    for (;;) {
        char *eol = memmem(c->buf + at, c->have - at, "\r\n", 2);
        if (!eol)
            return 0;
        size_t size = strtoul(c->buf + at, NULL, 16);
        at = (size_t)(eol - c->buf) + 2;
        if (size == 0)
            return c->have >= at + 2 ? at + 2 : 0;
        at += size + 2;
        if (at > c->have)
            return 0;
    }
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: rate 127.0.0.1:PORT RATE SECONDS CONNS\n");
        return 2;
    }
    char *colon = strrchr(argv[1], ':');
    double rate = atof(argv[2]), secs = atof(argv[3]);
    int nconn = atoi(argv[4]);
    const char *token = getenv("AION_TOKEN");
    if (!colon || strncmp(argv[1], "127.0.0.1:", 10) != 0 || rate <= 0 || secs <= 0 || nconn < 1 ||
        nconn > MAX_CONNS || !token) {
        fprintf(stderr, "rate: bad arguments (127.0.0.1 only; AION_TOKEN must be set)\n");
        return 2;
    }
    char body[512], req[1024];
    int blen = snprintf(body, sizeof body, "{\"v\":1,\"action\":\"ping\",\"token\":\"%s\"}", token);
    int rlen = snprintf(req, sizeof req,
                        "POST / HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                        "Content-Length: %d\r\n\r\n%s",
                        argv[1], blen, body);
    if (blen >= (int)sizeof body || rlen >= (int)sizeof req) {
        fprintf(stderr, "rate: token too long\n");
        return 2;
    }
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(colon + 1))};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    static struct conn conns[MAX_CONNS];
    int ep = epoll_create1(0);
    for (int i = 0; i < nconn; i++) {
        int one = 1, fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a)) {
            perror("rate: connect");
            return 1;
        }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        conns[i].fd = fd;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (unsigned)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    }
    size_t total = (size_t)(rate * secs), sent = 0, done = 0, ok = 0, non200 = 0, errors = 0;
    double *lat = malloc(total * sizeof(double));
    if (!lat) {
        perror("rate: malloc");
        return 1;
    }
    double start = now() + 0.01, end_by = start + secs + 5.0;
    int next_idle = 0, coarse = 0;
    struct epoll_event evs[MAX_CONNS];
    while (done + errors < total && now() < end_by) {
        /* Every request that is due goes out on an idle connection; one due
         * while none is idle waits, and its wait counts. */
        double t = now();
        int stalled = 0; /* a ping is due and every connection is busy */
        while (sent < total && start + (double)sent / rate <= t) {
            int k = -1;
            for (int j = 0; j < nconn; j++) {
                int c = (next_idle + j) % nconn;
                if (!conns[c].busy) {
                    k = c;
                    break;
                }
            }
            if (k < 0) {
                stalled = 1;
                break;
            }
            next_idle = (k + 1) % nconn;
            if (write(conns[k].fd, req, (size_t)rlen) != rlen) {
                errors++;
                sent++;
                continue;
            }
            conns[k].busy = 1;
            conns[k].due = start + (double)sent / rate;
            sent++;
        }
        /* Stalled, nothing can go out before an answer frees a connection:
         * wait for one instead of spinning beside the server. */
        double wait = stalled ? end_by - now() : sent < total ? start + (double)sent / rate - now() : 0.1;
        if (wait < 0)
            wait = 0;
        struct timespec ts = {.tv_sec = (time_t)wait, .tv_nsec = (long)((wait - (double)(time_t)wait) * 1e9)};
        int n = coarse ? -1 : epoll_pwait2(ep, evs, MAX_CONNS, &ts, NULL);
        if (n < 0 && (coarse || errno == ENOSYS)) {
            /* Before Linux 5.11: millisecond waits (rounded up; sends late by
             * up to 1 ms are charged to the server, so say so). */
            if (!coarse)
                fprintf(stderr, "rate: no epoll_pwait2 here; waits are rounded to 1 ms\n");
            coarse = 1;
            n = epoll_wait(ep, evs, MAX_CONNS, (int)(wait * 1e3 + 0.999));
        }
        if (n < 0 && errno != EINTR) {
            perror("rate: epoll_pwait2");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = &conns[evs[i].data.u32];
            ssize_t r = read(c->fd, c->buf + c->have, BUF - 1 - c->have);
            if (r <= 0) {
                fprintf(stderr, "rate: the server closed a connection\n");
                return 1;
            }
            c->have += (size_t)r;
            int good = 0;
            size_t used = answer(c, &good);
            if (used && !c->busy) {
                fprintf(stderr, "rate: an answer to no request\n");
                return 1;
            }
            if (used) {
                double took = now() - c->due;
                lat[done++] = took * 1e3;
                if (good)
                    ok++;
                else
                    non200++;
                memmove(c->buf, c->buf + used, c->have - used);
                c->have -= used;
                c->busy = 0;
            } else if (c->have == BUF - 1) {
                fprintf(stderr, "rate: an answer over %d bytes\n", BUF);
                return 1;
            }
        }
    }
    double took = now() - start;
    qsort(lat, done, sizeof(double), cmp);
#define PCT(p) (done ? lat[(size_t)((double)(done - 1) * (p))] : 0.0)
    printf("rate_sent=%zu\nrate_ok=%zu\nrate_non200=%zu\nrate_errors=%zu\nrate_achieved=%.0f\n", sent, ok,
           non200, errors, (double)done / took);
    printf("rate_p50_ms=%.3f\nrate_p90_ms=%.3f\nrate_p99_ms=%.3f\nrate_p999_ms=%.3f\nrate_max_ms=%.3f\n",
           PCT(0.50), PCT(0.90), PCT(0.99), PCT(0.999), done ? lat[done - 1] : 0.0);
    return done == total ? 0 : 1;
}
