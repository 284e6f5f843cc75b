"""Helper of bench/ops.sh: times GET /metrics scrapes over one keep-alive
connection and `status` round trips on the connector's Unix socket.

    opsbench.py scrape ADDR TOKEN N   -> scrape_p50_us, scrape_p99_us, scrape_bytes
    opsbench.py status SOCKET N       -> status_p50_us, status_p99_us, status_bytes
    opsbench.py fill ADDR TOKENS N    N runs of the fake acpx, round-robin over the
                                      projects whose tokens are the lines of the
                                      file TOKENS, each a streamed invoke read to
                                      its end -> fill_runs, fill_failed, fill_s
    opsbench.py runs ADDR TOKEN N     the `runs` action -> runs_p50_us, runs_p99_us,
                                      runs_finished, runs_bytes
"""
import json
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


def post(conn, body):
    conn.request("POST", "/", json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, resp.read()


def fill(addr, tokens_file, n):
    host, port = addr.rsplit(":", 1)
    with open(tokens_file) as f:
        tokens = [t.strip() for t in f if t.strip()]
    failed, t0 = 0, time.perf_counter()
    for i in range(n):
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        payload = {"agent": "fake", "prompt": "lines=5 interval_us=0", "session": f"h{i}", "stream": True}
        status, body = post(conn, {"token": tokens[i % len(tokens)], "action": "invoke", "payload": payload})
        conn.close()
        last = body.strip().splitlines()[-1] if body.strip() else b""
        if status != 200 or b'"complete"' not in last:
            failed += 1
            print(f"run {i}: {status} {last[:200]!r}", file=sys.stderr)
    print(f"fill_runs={n}")
    print(f"fill_failed={failed}")
    print(f"fill_s={time.perf_counter() - t0:.1f}")


def runs(addr, token, n):
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    times, size, finished = [], 0, 0
    for _ in range(n):
        t0 = time.perf_counter()
        status, body = post(conn, {"token": token, "action": "runs", "payload": {}})
        times.append(time.perf_counter() - t0)
        if status != 200:
            sys.exit(f"runs answered {status}: {body[:200]!r}")
        size = len(body)
        finished = len(json.loads(body)["finished"])
    print(f"runs_p50_us={pct(times, 0.5) * 1e6:.0f}")
    print(f"runs_p99_us={pct(times, 0.99) * 1e6:.0f}")
    print(f"runs_finished={finished}")
    print(f"runs_bytes={size}")


if __name__ == "__main__":
    if sys.argv[1] == "fill":
        fill(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif sys.argv[1] == "runs":
        runs(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif sys.argv[1] == "scrape":
        scrape(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif sys.argv[1] == "status":
        status(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit("usage: opsbench.py scrape ADDR TOKEN N | status SOCKET N | fill ADDR TOKENS N | runs ADDR TOKEN N")
