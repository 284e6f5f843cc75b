#!/usr/bin/env python3
"""Helpers for bench/tls.sh (Python 3.11 standard library only).

Subcommands (key=value lines on stdout, diagnostics on stderr; 127.0.0.1 only):
  handshake ADDR N                       N TLS handshakes (connect + handshake), ms
  cat PLAIN_ADDR PLAIN_PID TLS_ADDR TLS_PID FILE RUNS
                                         cat FILE over ws://, wss:// and a bare PTY
The project token comes in AION_TOKEN and the pinned fingerprint in
AION_FINGERPRINT (sha256:HEX); every TLS connection checks it.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
import ssl
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import termbench as tb  # noqa: E402  (the WebSocket client and the cat measurement)

CONNECT = socket.create_connection  # before cmd_cat swaps it for termbench's WS
CTX = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
CTX.check_hostname = False
CTX.verify_mode = ssl.CERT_NONE  # the fingerprint is pinned instead, below


def pinned(sock: ssl.SSLSocket) -> ssl.SSLSocket:
    der = sock.getpeercert(binary_form=True) or b""
    got = "sha256:" + hashlib.sha256(der).hexdigest()
    if got != os.environ.get("AION_FINGERPRINT", ""):
        sys.exit(f"tlsbench: the server's fingerprint is {got}, not the pinned one")
    return sock


def tls_connect(host: str, port: int) -> ssl.SSLSocket:
    raw = CONNECT((host, port), timeout=tb.IO_TIMEOUT)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return pinned(CTX.wrap_socket(raw, server_hostname="localhost"))


def cmd_handshake(addr: str, n_s: str) -> None:
    host, port = tb.check_loopback(addr)
    n = max(1, min(int(n_s), 10000))
    tcp: list[float] = []
    full: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        raw = socket.create_connection((host, port), timeout=tb.IO_TIMEOUT)
        t1 = time.perf_counter()
        s = pinned(CTX.wrap_socket(raw, server_hostname="localhost"))
        t2 = time.perf_counter()
        s.close()
        tcp.append((t1 - t0) * 1000)
        full.append((t2 - t0) * 1000)
    tb.out("hs_n", n)
    tb.out("hs_version", CTX.wrap_socket(socket.create_connection((host, port)), server_hostname="x").version())
    tb.out("hs_tcp_ms", f"{statistics.median(tcp):.3f}")
    tb.out("hs_ms", f"{statistics.median(full):.3f}")
    tb.out("hs_p99_ms", f"{tb.pct(full, 99):.3f}")


class TlsWS(tb.WS):
    """termbench's client over TLS: decrypted bytes ssl holds are read before
    waiting on the socket, which cannot show them."""

    def pump(self, on_data: Callable[[memoryview], None], timeout: float) -> bool:
        if not self.sock.pending():
            r, _, _ = select.select([self.sock], [], [], timeout)
            if not r:
                return False
        try:
            k = self.sock.recv_into(self.rbuf)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return True
        if k == 0:
            raise tb.WsClosed(f"socket closed (close code {self.close_code})")
        self.recvs += 1
        self.feed(self.rview[:k], on_data)
        return True


def open_terminal(cls: type[tb.WS], addr: str) -> tb.WS:
    ws = cls(addr, tb.token())
    got = bytearray()
    deadline = time.monotonic() + tb.IO_TIMEOUT
    while not got:
        if time.monotonic() > deadline:
            raise TimeoutError("no prompt from the shell")
        ws.pump(got.extend, 0.5)
    ws.collect(0.05, 1.0)
    return ws


def cmd_cat(plain: str, plain_pid_s: str, tls: str, tls_pid_s: str, path: str, runs_s: str) -> None:
    runs = max(1, min(int(runs_s), 10))
    size = os.path.getsize(path)
    ws = open_terminal(tb.WS, plain)
    orig = socket.create_connection
    socket.create_connection = lambda a, timeout=None: tls_connect(*a)  # type: ignore[assignment]
    try:
        wss = open_terminal(TlsWS, tls)
    finally:
        socket.create_connection = orig  # type: ignore[assignment]
    plain_pid, tls_pid = int(plain_pid_s), int(tls_pid_s)
    shell_plain, shell_tls = tb.children(plain_pid)[0], tb.children(tls_pid)[0]
    rows: dict[str, list[dict[str, float]]] = {"bare": [], "ws": [], "wss": []}
    for i in range(runs):
        rows["bare"].append(tb.bare_cat(path))
        rows["ws"].append(tb.ws_cat(ws, plain_pid, shell_plain, path))
        rows["wss"].append(tb.ws_cat(wss, tls_pid, shell_tls, path))
        tb.warn(
            f"run {i + 1}/{runs}: "
            + ", ".join(f"{k} {size / v[-1]['wall'] / 1e6:.1f} MB/s" for k, v in rows.items())
        )
    ws.close()
    wss.close()
    tb.out("cat_bytes", size)
    tb.out("cat_runs", runs)
    for k, v in rows.items():
        tb.out(f"cat_{k}_mbs", f"{statistics.median(size / r['wall'] / 1e6 for r in v):.1f}")
        if k != "bare":
            tb.out(f"cat_{k}_server_cpu_s", f"{statistics.median(r['server_cpu'] for r in v):.2f}")


def main(argv: list[str]) -> None:
    cmds = {"handshake": cmd_handshake, "cat": cmd_cat}
    if len(argv) < 2 or argv[1] not in cmds:
        sys.exit(f"usage: {argv[0]} {{{'|'.join(cmds)}}} ARGS...")
    cmds[argv[1]](*argv[2:])


if __name__ == "__main__":
    main(sys.argv)
