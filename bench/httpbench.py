#!/usr/bin/env python3
"""Helpers for bench/http.sh (Python 3.11 standard library only).

Every subcommand prints `key=value` lines on stdout; diagnostics go to stderr.
All traffic goes to 127.0.0.1 only; every loop is bounded in count and in time.

Subcommands:
  slowread FILE                      copy stdin to FILE slowly (4 KiB every 20 ms,
                                     about 200 KB/s): a log reader that cannot keep up
  attack ADDR TOKEN PID IDLE SLOW SECONDS
                                     hold IDLE silent and SLOW slowloris connections
                                     (one header byte each per second; any the server
                                     closes is opened again) and time a fresh-connection
                                     ping every 50 ms for SECONDS; RSS and threads of PID
  flood ADDR TOKEN COUNT             COUNT requests with a wrong token (pipelined on one
                                     keep-alive connection, 100 at a time, from a child
                                     process) while a ping every 5 ms on its own
                                     keep-alive connection is timed
  loglines FILE                      count a log's answer lines and the lines it says
                                     it dropped
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import socket
import sys
import threading
import time

IO_TIMEOUT = 10.0


def out(key: str, value: object) -> None:
    print(f"{key}={value}", flush=True)


def loopback(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host.startswith("127."):
        sys.exit(f"httpbench: refusing non-loopback address {addr!r}")
    return host, int(port)


def request(token: str) -> bytes:
    body = json.dumps({"v": 1, "action": "ping", "token": token}).encode()
    return b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body


class Reader:
    """Reads Content-Length answers off one keep-alive connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf = sock, b""

    def answer(self) -> int:
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            rest += chunk
        self.buf = rest[length:]
        return status


def pct(values: list[float], p: float) -> str:
    if not values:
        return "-"
    s = sorted(values)
    return f"{s[min(len(s) - 1, int(p * len(s)))]:.2f}"


def proc_status(pid: str) -> dict[str, str]:
    res = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                k, _, v = line.partition(":")
                res[k] = v.split()[0] if v.split() else ""
    except OSError:
        pass
    return res


def cmd_slowread(path: str) -> None:
    fd = sys.stdin.fileno()
    with open(path, "wb") as f:
        while True:
            b = os.read(fd, 4096)
            if not b:
                return
            f.write(b)
            time.sleep(0.02)


def cmd_attack(addr: str, token: str, pid: str, idle: str, slow: str, seconds: str) -> None:
    host, port = loopback(addr)
    n_idle, n_slow, secs = int(idle), int(slow), min(float(seconds), 120.0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n_idle + n_slow + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    def opened() -> socket.socket:
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect((host, port))
        except BlockingIOError:
            pass
        return s

    def held(s: socket.socket) -> bool:
        try:
            return s.recv(4096) == b"" and False  # an answer (408, 503) or a close: let go
        except BlockingIOError:
            return True
        except OSError:
            return False

    idle_socks = [opened() for _ in range(n_idle)]
    slow_socks = [opened() for _ in range(n_slow)]
    head = b"POST / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 8000
    sent = [0] * n_slow
    time.sleep(0.5)
    ping = request(token)
    lat: list[float] = []
    fails = reopened = 0
    rss_peak = threads_peak = 0
    end = time.monotonic() + secs
    next_drip = 0.0
    i = 0
    while time.monotonic() < end:
        now = time.monotonic()
        if now >= next_drip:
            for k, s in enumerate(slow_socks):
                try:
                    s.send(head[sent[k] % len(head):][:1])
                    sent[k] += 1
                except OSError:
                    s.close()
                    slow_socks[k], sent[k] = opened(), 0
                    reopened += 1
            next_drip = now + 1.0
        if i % 20 == 0:
            for k, s in enumerate(idle_socks):
                if not held(s):
                    s.close()
                    idle_socks[k] = opened()
                    reopened += 1
            st = proc_status(pid)
            rss_peak = max(rss_peak, int(st.get("VmRSS", "0") or 0))
            threads_peak = max(threads_peak, int(st.get("Threads", "0") or 0))
        t0 = time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=IO_TIMEOUT) as c:
                c.sendall(ping)
                status = Reader(c).answer()
            if status == 200:
                lat.append((time.monotonic() - t0) * 1000)
            else:
                fails += 1
        except OSError:
            fails += 1
        i += 1
        time.sleep(0.05)
    out("attack_pings", len(lat))
    out("attack_fails", fails)
    out("attack_p50_ms", pct(lat, 0.5))
    out("attack_p99_ms", pct(lat, 0.99))
    out("attack_max_ms", f"{max(lat):.2f}" if lat else "-")
    out("attack_reopened", reopened)
    out("attack_rss_peak_kb", rss_peak)
    out("attack_threads_peak", threads_peak)
    for s in idle_socks + slow_socks:
        s.close()


def cmd_flood(addr: str, token: str, count: str) -> None:
    host, port = loopback(addr)
    per = int(count)
    bad = request("wrong-" + token[:8])

    def flood(report) -> None:  # in a process of its own: it does not share the GIL with the pings
        err = "none"
        try:
            with socket.create_connection((host, port), timeout=IO_TIMEOUT) as c:
                r = Reader(c)
                done = 0
                while done < per and err == "none":
                    n = min(100, per - done)
                    c.sendall(bad * n)
                    for _ in range(n):
                        # 403, then 429 once the peer is past limits.failedTokensPerMinute
                        if r.answer() not in (403, 429):
                            err = "an answer other than 403 or 429"
                            break
                    done += n
        except OSError as e:
            err = str(e)
        report.send(err)
        report.close()

    lat: list[float] = []
    errors: list[str] = []
    with socket.create_connection((host, port), timeout=IO_TIMEOUT) as p:
        pr = Reader(p)
        ping = request(token)
        ctx = multiprocessing.get_context("fork")
        got, report = ctx.Pipe(duplex=False)
        child = ctx.Process(target=flood, args=(report,))
        t0 = time.monotonic()
        child.start()
        report.close()
        deadline = t0 + 120
        while child.is_alive() and not got.poll() and time.monotonic() < deadline:
            s = time.monotonic()
            p.sendall(ping)
            if pr.answer() == 200:
                lat.append((time.monotonic() - s) * 1000)
            time.sleep(0.005)
        took = time.monotonic() - t0
        if got.poll(10):
            errors.append(got.recv())
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
            errors.append("the flood did not end within 120 s")
    errors = [e for e in errors if e != "none"]
    out("flood_requests", per)
    out("flood_seconds", f"{took:.2f}")
    out("flood_rps", f"{per / took:.0f}")
    out("flood_errors", errors[0] if errors else "none")
    out("flood_pings", len(lat))
    out("flood_ping_p50_ms", pct(lat, 0.5))
    out("flood_ping_p99_ms", pct(lat, 0.99))
    out("flood_ping_max_ms", f"{max(lat):.2f}" if lat else "-")


def cmd_loglines(path: str) -> None:
    answers = dropped = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if " status=" in line:
                answers += 1
            elif "[WARN] log: " in line and "dropped" in line:
                dropped += int(line.split("[WARN] log: ", 1)[1].split()[0])
    out("log_answer_lines", answers)
    out("log_dropped", dropped)


def main(argv: list[str]) -> None:
    cmds = {"slowread": cmd_slowread, "attack": cmd_attack, "flood": cmd_flood, "loglines": cmd_loglines}
    if len(argv) < 2 or argv[1] not in cmds:
        sys.exit(__doc__)
    try:
        cmds[argv[1]](*argv[2:])
    except TypeError as e:
        sys.exit(f"httpbench {argv[1]}: {e}\n{__doc__}")


if __name__ == "__main__":
    main(sys.argv)
