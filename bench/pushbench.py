#!/usr/bin/env python3
"""Helpers for bench/push.sh (Python 3.11 standard library only).

Every subcommand prints `key=value` lines on stdout so that push.sh can read
them; diagnostics go to stderr. All traffic goes to 127.0.0.1 only, every loop
is bounded in count and in time.

Subcommands:
  ping ADDR TOKEN [COUNT]          COUNT fresh-connection pings; median ms, statuses
  startup BIN CONFIG RUNS          exec -> first answered ping, RUNS times
  idle ADDR TOKEN PID CONNS        RSS with CONNS idle keep-alive connections open
  wrk FILE                         parse a `wrk --latency` report
  freeport                         print a free 127.0.0.1 TCP port
"""

from __future__ import annotations

import json
import math
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # no bench/__pycache__ from importing benchcli
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchcli  # noqa: E402

IO_TIMEOUT = 5.0  # seconds, for any single socket operation or startup wait


def out(key: str, value: object) -> None:
    print(f"{key}={value}", flush=True)


def check_loopback(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    if not (host.startswith("127.") or host in ("localhost", "::1")):
        sys.exit(f"pushbench: refusing non-loopback address {addr!r}")
    return host, int(port)


def ping_request(token: str, keep_alive: bool) -> bytes:
    body = json.dumps({"v": 1, "action": "ping", "token": token}, separators=(",", ":")).encode()
    conn = "keep-alive" if keep_alive else "close"
    head = (
        "POST / HTTP/1.1\r\n"
        "Host: 127.0.0.1\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Connection: {conn}\r\n\r\n"
    )
    return head.encode() + body


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Read one HTTP/1.1 response with a Content-Length body; return (status, body)."""
    buf = b""
    deadline = time.monotonic() + IO_TIMEOUT
    while b"\r\n\r\n" not in buf:
        if time.monotonic() > deadline or len(buf) > 65536:
            raise TimeoutError("response head not received")
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed after {len(buf)} bytes of head")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    while len(rest) < length:
        if time.monotonic() > deadline:
            raise TimeoutError("response body not received")
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed inside the body")
        rest += chunk
    return status, rest[:length]


def one_ping(host: str, port: int, token: str) -> tuple[int, float]:
    """Fresh connection, one ping, Connection: close. Returns (status, ms)."""
    t0 = time.perf_counter()
    with socket.create_connection((host, port), timeout=IO_TIMEOUT) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(ping_request(token, keep_alive=False))
        status, _ = read_response(s)
    return status, (time.perf_counter() - t0) * 1000.0


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, math.ceil(p / 100.0 * len(s)) - 1)]


def rss_kb(pid: int) -> dict[str, int]:
    res: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                res[key] = int(val.split()[0])
    return res


def cmd_ping(addr: str, token: str, count: str = "1") -> None:
    host, port = check_loopback(addr)
    n = max(1, min(int(count), 1000))
    times: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    for _ in range(n):
        try:
            st, ms = one_ping(host, port, token)
            statuses[st] = statuses.get(st, 0) + 1
            times.append(ms)
        except OSError as e:
            errors += 1
            print(f"pushbench: ping error: {e!r}", file=sys.stderr)
    out("ping_count", n)
    out("ping_errors", errors)
    out("ping_statuses", ",".join(f"{k}x{v}" for k, v in sorted(statuses.items())) or "none")
    if times:
        out("ping_median_ms", f"{statistics.median(times):.3f}")
        out("ping_p90_ms", f"{pct(times, 90):.3f}")


def stop(proc: subprocess.Popen[bytes]) -> tuple[int | None, float, bool]:
    """SIGTERM, wait up to 5 s, then SIGKILL. Returns (exit code, ms to exit, killed)."""
    t0 = time.perf_counter()
    killed = False
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
            killed = True
    return proc.returncode, (time.perf_counter() - t0) * 1000.0, killed


def cmd_startup(binary: str, config: str, runs: str) -> None:
    """exec -> `listening on ADDR` on stdout -> connect -> POST ping -> full answer."""
    n = max(1, min(int(runs), 500))
    token = json.load(open(config, encoding="utf-8"))
    token = next(iter(token["projects"].values()))["token"]
    req = ping_request(token, keep_alive=False)
    times: list[float] = []
    line_times: list[float] = []
    failures = 0
    non200 = 0
    bad_exit: dict[str, int] = {}
    killed = 0
    stop_times: list[float] = []
    wall_deadline = time.monotonic() + 60.0  # whole phase bounded too
    for i in range(n):
        if time.monotonic() > wall_deadline:
            print(f"pushbench: startup phase stopped after {i} runs (60 s budget)", file=sys.stderr)
            break
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [binary, config], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, cwd=os.path.dirname(config),
        )
        try:
            assert proc.stdout is not None
            sel = selectors.DefaultSelector()
            sel.register(proc.stdout, selectors.EVENT_READ)
            line = b""
            deadline = time.monotonic() + IO_TIMEOUT
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(timeout=left):
                    raise TimeoutError("no `listening on` line within 5 s")
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    raise ConnectionError(f"stdout closed, exit {proc.poll()}")
                line += chunk
            sel.close()
            t_line = time.perf_counter()
            first = line.split(b"\n", 1)[0].decode()
            if not first.startswith("listening on "):
                raise ValueError(f"unexpected first stdout line {first!r}")
            host, port = check_loopback(first[len("listening on "):].strip())
            with socket.create_connection((host, port), timeout=IO_TIMEOUT) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.sendall(req)
                status, _ = read_response(s)
            t1 = time.perf_counter()
            if status != 200:
                non200 += 1
            times.append((t1 - t0) * 1000.0)
            line_times.append((t_line - t0) * 1000.0)
        except (OSError, ValueError) as e:
            failures += 1
            print(f"pushbench: startup run {i}: {e!r}", file=sys.stderr)
        finally:
            code, ms, was_killed = stop(proc)
            if proc.stdout is not None:
                proc.stdout.close()
            stop_times.append(ms)
            killed += was_killed
            if code != 0:
                bad_exit[str(code)] = bad_exit.get(str(code), 0) + 1
    out("startup_runs", len(times) + failures)
    out("startup_failures", failures)
    out("startup_non200", non200)
    if times:
        out("startup_median_ms", f"{statistics.median(times):.2f}")
        out("startup_p90_ms", f"{pct(times, 90):.2f}")
        out("startup_min_ms", f"{min(times):.2f}")
        out("startup_max_ms", f"{max(times):.2f}")
        out("startup_line_median_ms", f"{statistics.median(line_times):.2f}")
    out("sigterm_median_ms", f"{statistics.median(stop_times):.2f}" if stop_times else "-")
    out("sigterm_killed", killed)
    out("sigterm_bad_exit", ",".join(f"code{k}x{v}" for k, v in sorted(bad_exit.items())) or "none")


def cmd_idle(addr: str, token: str, pid: str, conns: str) -> None:
    """Open CONNS keep-alive connections (each answers one ping, then idles),
    wait 1 s, read VmRSS, then time fresh pings while they stay open."""
    host, port = check_loopback(addr)
    n = max(1, min(int(conns), 2000))
    p = int(pid)
    before = rss_kb(p)
    socks: list[socket.socket] = []
    opened = answered = 0
    statuses: dict[int, int] = {}
    errors: dict[str, int] = {}
    req = ping_request(token, keep_alive=True)
    deadline = time.monotonic() + 30.0
    try:
        for _ in range(n):
            if time.monotonic() > deadline:
                errors["phase-timeout"] = errors.get("phase-timeout", 0) + 1
                break
            try:
                s = socket.create_connection((host, port), timeout=IO_TIMEOUT)
            except OSError as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                continue
            socks.append(s)
            opened += 1
            try:
                s.sendall(req)
                st, _ = read_response(s)
                statuses[st] = statuses.get(st, 0) + 1
                answered += 1
            except OSError as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
        time.sleep(1.0)
        during = rss_kb(p)
        fresh: list[float] = []
        fresh_status: dict[int, int] = {}
        for _ in range(20):
            try:
                st, ms = one_ping(host, port, token)
                fresh.append(ms)
                fresh_status[st] = fresh_status.get(st, 0) + 1
            except OSError as e:
                errors["fresh-" + type(e).__name__] = errors.get("fresh-" + type(e).__name__, 0) + 1
        # are the idle connections still open (server must not drop them within ~1 s)?
        still_open = 0
        for s in socks:
            s.setblocking(False)
            try:
                data = s.recv(1)
                if data:
                    still_open += 1  # unexpected bytes, but open
            except BlockingIOError:
                still_open += 1
            except OSError:
                pass
    finally:
        for s in socks:
            s.close()
    out("idle_rss_before_kb", before.get("VmRSS", 0))
    out("idle_threads_before", before.get("Threads", 0))
    out("idle_conns_opened", opened)
    out("idle_conns_answered", answered)
    out("idle_conns_statuses", ",".join(f"{k}x{v}" for k, v in sorted(statuses.items())) or "none")
    out("idle_conns_still_open", still_open)
    out("idle_rss_kb", during.get("VmRSS", 0))
    out("idle_threads", during.get("Threads", 0))
    out("idle_errors", ",".join(f"{k}x{v}" for k, v in sorted(errors.items())) or "none")
    if fresh:
        out("idle_fresh_ping_median_ms", f"{statistics.median(fresh):.3f}")
        out("idle_fresh_ping_max_ms", f"{max(fresh):.3f}")
    out("idle_fresh_statuses", ",".join(f"{k}x{v}" for k, v in sorted(fresh_status.items())) or "none")


def to_ms(text: str) -> float:
    units = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}
    for u in ("us", "ms", "s", "m"):
        if text.endswith(u):
            return float(text[: -len(u)]) * units[u]
    return float(text)


def cmd_wrk(path: str) -> None:
    """Parse a `wrk --latency` report into key=value lines."""
    res = {"wrk_rps": "-", "wrk_p50_ms": "-", "wrk_p99_ms": "-", "wrk_requests": "-",
           "wrk_non2xx": "0", "wrk_socket_errors": "none", "wrk_timeouts": "0"}
    with open(path, encoding="utf-8", errors="replace") as f:
        for raw in f:
            line = raw.strip()
            parts = line.split()
            if line.startswith("Requests/sec:"):
                res["wrk_rps"] = f"{float(parts[1]):.0f}"
            elif line.startswith("50%") and len(parts) == 2:
                res["wrk_p50_ms"] = f"{to_ms(parts[1]):.3f}"
            elif line.startswith("99%") and len(parts) == 2:
                res["wrk_p99_ms"] = f"{to_ms(parts[1]):.3f}"
            elif "requests in" in line:
                res["wrk_requests"] = parts[0]
            elif line.startswith("Non-2xx or 3xx responses:"):
                res["wrk_non2xx"] = parts[-1]
            elif line.startswith("Socket errors:"):
                # Socket errors: connect 0, read 0, write 0, timeout 0
                res["wrk_socket_errors"] = line.split(":", 1)[1].strip().replace(" ", "")
                for item in line.split(":", 1)[1].split(","):
                    k, _, v = item.strip().partition(" ")
                    if k == "timeout":
                        res["wrk_timeouts"] = v
    for k, v in res.items():
        out(k, v)


def cmd_freeport() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])


def main(argv: list[str]) -> None:
    cmds = {"ping": cmd_ping, "startup": cmd_startup, "idle": cmd_idle,
            "wrk": cmd_wrk, "freeport": cmd_freeport}
    benchcli.dispatch("pushbench", __doc__, cmds, argv)


if __name__ == "__main__":
    main(sys.argv)
