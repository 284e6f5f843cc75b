"""Helper of bench/ops.sh: times GET /metrics scrapes over one keep-alive
connection and `status` round trips on the connector's Unix socket.

    opsbench.py scrape ADDR TOKEN N   -> scrape_p50_us, scrape_p99_us, scrape_bytes
    opsbench.py status SOCKET N       -> status_p50_us, status_p99_us, status_bytes
"""
import http.client
import socket
import sys
import time


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def scrape(addr, token, n):
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    times, size = [], 0
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("GET", "/metrics", headers={"Authorization": "Bearer " + token})
        resp = conn.getresponse()
        body = resp.read()
        times.append(time.perf_counter() - t0)
        if resp.status != 200:
            sys.exit(f"scrape answered {resp.status}")
        size = len(body)
    print(f"scrape_p50_us={pct(times, 0.5) * 1e6:.0f}")
    print(f"scrape_p99_us={pct(times, 0.99) * 1e6:.0f}")
    print(f"scrape_bytes={size}")


def status(path, n):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    f = s.makefile("rb")
    times, size = [], 0
    for _ in range(n):
        t0 = time.perf_counter()
        s.sendall(b'{"op":"status"}\n')
        line = f.readline()
        times.append(time.perf_counter() - t0)
        if b'"ok":true' not in line:
            sys.exit(f"status answered {line[:200]!r}")
        size = len(line)
    print(f"status_p50_us={pct(times, 0.5) * 1e6:.0f}")
    print(f"status_p99_us={pct(times, 0.99) * 1e6:.0f}")
    print(f"status_bytes={size}")


if __name__ == "__main__":
    if sys.argv[1] == "scrape":
        scrape(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif sys.argv[1] == "status":
        status(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit("usage: opsbench.py scrape ADDR TOKEN N | status SOCKET N")
