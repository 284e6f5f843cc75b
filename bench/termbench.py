#!/usr/bin/env python3
"""Helpers for bench/terminal.sh and bench/vs-node-terminal.sh.

A small RFC 6455 WebSocket client (handshake, masked client frames, streaming
frame parser, ping/pong, close) and the three terminal measurements. Every
subcommand prints `key=value` lines on stdout for terminal.sh; diagnostics go
to stderr. All traffic goes to 127.0.0.1 only; every loop is bounded in count
and in time.

Subcommands:
  mkfile PATH MB                         a file of MB*10^6 printable bytes (100-byte lines)
  throughput ADDR SRV_PID FILE RUNS      cat FILE over /ws vs a bare PTY, interleaved
  echo ADDR KEYS                         keystroke echo round trips, /ws and bare PTY
  idle ADDR SRV_PID COUNT ROUNDS         connector RSS with 1 and COUNT idle terminals
  libcat ADDR FILE RUNS                  cat FILE over /ws with the `websockets` library's
                                         sync client (text frames decoded, as a browser does)
  libecho ADDR KEYS                      cooked keystroke echo with that same client
  aiocat ADDR FILE RUNS                  libcat with the library's asyncio client
                                         (`websockets.connect`, its usual API)
The lib* and aio* subcommands need the `websockets` package (pip install websockets;
bench/vs-node-terminal.sh makes a venv for it); the rest is standard library only.
The project token comes in the environment variable AION_TOKEN, never in argv.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import math
import os
import pty
import random
import resource
import select
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable

IO_TIMEOUT = 5.0  # seconds, for any single wait on the connector or a shell
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def out(key: str, value: object) -> None:
    print(f"{key}={value}", flush=True)


def warn(msg: str) -> None:
    print(f"termbench: {msg}", file=sys.stderr, flush=True)


def check_loopback(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    if not (host.startswith("127.") or host in ("localhost", "::1")):
        sys.exit(f"termbench: refusing non-loopback address {addr!r}")
    return host, int(port)


def token() -> str:
    t = os.environ.get("AION_TOKEN", "")
    if not t:
        sys.exit("termbench: AION_TOKEN is not set")
    return t


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, math.ceil(p / 100.0 * len(s)) - 1)]


# ---------------------------------------------------------------- /proc


def proc_status(pid: int) -> dict[str, int]:
    res: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key in ("VmRSS", "VmHWM", "Threads"):
                    res[key] = int(val.split()[0])
    except OSError:
        pass
    return res


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat fields after the command name: [0] is state (field 3)."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        return f.read().rpartition(")")[2].split()


def cpu_s(pid: int) -> float:
    """utime+stime of PID (all its threads), seconds."""
    f = stat_fields(pid)
    return (int(f[11]) + int(f[12])) / CLK_TCK


def children_cpu_s(pid: int) -> float:
    """cutime+cstime: CPU of the children PID has waited for, seconds."""
    f = stat_fields(pid)
    return (int(f[13]) + int(f[14])) / CLK_TCK


def children(pid: int) -> list[int]:
    kids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            f = stat_fields(int(name))
        except OSError:
            continue
        if int(f[1]) == pid and f[0] != "Z":
            kids.append(int(name))
    return kids


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------- WebSocket client


class WsClosed(Exception):
    pass


class WS:
    """RFC 6455 client over one TCP socket. Server frames are parsed as a stream:
    data-frame payload is handed to a callback as it arrives, without copying
    whole frames; pings are answered; a close frame is answered and recorded."""

    def __init__(self, addr: str, tok: str, query: str = "") -> None:
        host, port = check_loopback(addr)
        self.sock = socket.create_connection((host, port), timeout=IO_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        req = (
            f"GET /ws?token={tok}{query} HTTP/1.1\r\n"
            f"Host: {addr}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(req.encode())
        buf = b""
        deadline = time.monotonic() + IO_TIMEOUT
        while b"\r\n\r\n" not in buf:
            if time.monotonic() > deadline or len(buf) > 16384:
                raise TimeoutError("no upgrade answer")
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"closed during the handshake: {buf[:200]!r}")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 2)
        if len(status) < 2 or status[1] != "101":
            raise ConnectionError(f"upgrade refused: {lines[0]!r} {rest[:200]!r}")
        want = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
        accept = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "sec-websocket-accept":
                accept = value.strip()
        if accept != want:
            raise ConnectionError(f"bad Sec-WebSocket-Accept {accept!r}")
        self.sock.setblocking(False)
        self.pending = b""  # an incomplete frame header
        self.rem = 0  # payload bytes left in the current frame
        self.op = 0  # opcode of the current frame (continuations take the data opcode)
        self.data_op = 2
        self.ctrl = bytearray()
        self.close_code: int | None = None
        self.frames = 0  # data frames received
        self.recvs = 0  # recv calls that returned data
        self.rbuf = bytearray(1 << 20)
        self.rview = memoryview(self.rbuf)
        self.feed(memoryview(rest), lambda _: None)  # nothing is expected before input

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, data: bytes, opcode: int = 2) -> None:
        n = len(data)
        mask = os.urandom(4)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        keystream = (mask * (n // 4 + 1))[:n]
        masked = (int.from_bytes(data, "little") ^ int.from_bytes(keystream, "little")).to_bytes(n, "little")
        msg = head + mask + masked
        deadline = time.monotonic() + IO_TIMEOUT
        view = memoryview(msg)
        while view:
            try:
                k = self.sock.send(view)
                view = view[k:]
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError("send blocked") from None
                select.select([], [self.sock], [], 0.1)

    def close(self, code: int = 1000) -> None:
        try:
            if self.close_code is None:
                self.send(struct.pack("!H", code), opcode=8)
        except OSError:
            pass
        self.sock.close()

    def control(self) -> None:
        payload = bytes(self.ctrl)
        self.ctrl.clear()
        if self.op == 9:
            self.send(payload, opcode=10)
        elif self.op == 8:
            self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            try:
                self.send(payload[:2], opcode=8)
            except OSError:
                pass

    def feed(self, data: memoryview, on_data: Callable[[memoryview], None]) -> None:
        if self.pending:
            data = memoryview(self.pending + bytes(data))
            self.pending = b""
        i, n = 0, len(data)
        while i < n:
            if self.rem:
                k = min(self.rem, n - i)
                if self.op < 8:
                    on_data(data[i : i + k])
                else:
                    self.ctrl += data[i : i + k]
                self.rem -= k
                i += k
                if self.rem == 0 and self.op >= 8:
                    self.control()
                continue
            if n - i < 2:
                break
            b0, b1 = data[i], data[i + 1]
            if b1 & 0x80:
                raise ConnectionError("the server sent a masked frame")
            ln, hl = b1 & 0x7F, 2
            if ln == 126:
                hl = 4
            elif ln == 127:
                hl = 10
            if n - i < hl:
                break
            if ln == 126:
                ln = struct.unpack_from("!H", data, i + 2)[0]
            elif ln == 127:
                ln = struct.unpack_from("!Q", data, i + 2)[0]
            op = b0 & 0x0F
            if op < 8:
                self.frames += 1
            if op in (1, 2):
                self.data_op = op
            self.op = op if op else self.data_op
            i += hl
            self.rem = ln
            if ln == 0 and op >= 8:
                self.control()
        self.pending = bytes(data[i:])

    def pump(self, on_data: Callable[[memoryview], None], timeout: float) -> bool:
        """One read (waiting up to timeout s). False when nothing came."""
        r, _, _ = select.select([self.sock], [], [], timeout)
        if not r:
            return False
        try:
            k = self.sock.recv_into(self.rbuf)
        except BlockingIOError:
            return True
        if k == 0:
            raise WsClosed(f"socket closed (close code {self.close_code})")
        self.recvs += 1
        self.feed(self.rview[:k], on_data)
        return True

    def collect(self, quiet: float, limit: float) -> bytes:
        """Everything that arrives until `quiet` s pass without data (at most `limit` s)."""
        got = bytearray()
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if not self.pump(got.extend, quiet):
                break
        return bytes(got)

    def wait_for(self, needle: bytes, limit: float) -> bytes:
        got = bytearray()
        deadline = time.monotonic() + limit
        while needle not in got:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{needle!r} not seen in {limit} s; got {bytes(got[-200:])!r}")
            self.pump(got.extend, min(left, 0.5))
        return bytes(got)


def open_terminal(addr: str, tok: str) -> WS:
    """A new terminal whose shell has printed its prompt (and then been quiet)."""
    ws = WS(addr, tok)
    got = bytearray()
    deadline = time.monotonic() + IO_TIMEOUT
    while not got:
        if time.monotonic() > deadline:
            raise TimeoutError("no prompt from the shell")
        ws.pump(got.extend, 0.5)
    ws.collect(0.05, 1.0)
    return ws


# ---------------------------------------------------------------- mkfile


def cmd_mkfile(path: str, mb: str) -> None:
    size = int(mb) * 1_000_000
    rng = random.Random(4)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:-_"
    line_len = 100
    lines = ["".join(rng.choices(alphabet, k=line_len - 1)) + "\n" for _ in range(10_000)]
    block = "".join(lines).encode()  # 1,000,000 bytes
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(block[:left])
            left -= len(block)
    out("file_bytes", os.path.getsize(path))


# ---------------------------------------------------------------- 1. throughput


def bare_cat(path: str) -> dict[str, float]:
    """cat PATH on a fresh PTY (pty.fork), the master read as fast as possible."""
    c0 = self_cpu_s()
    t0 = time.perf_counter()
    pid, fd = pty.fork()
    if pid == 0:
        try:
            os.execvp("cat", ["cat", path])
        finally:
            os._exit(127)
    total = reads = 0
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            try:
                b = os.read(fd, 1 << 16)
            except OSError as e:
                if e.errno == errno.EIO:
                    break  # every holder of the slave is gone
                raise
            if not b:
                break
            total += len(b)
            reads += 1
        t1 = time.perf_counter()
    finally:
        os.close(fd)
    _, status, ru = os.wait4(pid, 0)
    if status != 0:
        warn(f"bare cat exited with status {status}")
    return {
        "wall": t1 - t0,
        "bytes": total,
        "reads": reads,
        "client_cpu": self_cpu_s() - c0,
        "cat_cpu": ru.ru_utime + ru.ru_stime,
    }


def ws_cat(ws: WS, srv_pid: int, shell_pid: int, path: str) -> dict[str, float]:
    """cat PATH in the terminal's shell; until the end marker arrives."""
    tag = os.urandom(4).hex()
    marker = f"END{tag}".encode()
    cmd = f"cat '{path}'; echo END''{tag}\n".encode()  # typed text != printed marker
    ws.collect(0.05, 1.0)
    state = {"bytes": 0, "tail": b"", "done": False}

    def on_data(chunk: memoryview) -> None:
        state["bytes"] += len(chunk)
        window = state["tail"] + bytes(chunk)  # the marker may straddle two chunks
        if marker in window:
            state["done"] = True
        state["tail"] = window[-64:]

    s0, k0, c0 = cpu_s(srv_pid), children_cpu_s(shell_pid), self_cpu_s()
    f0, r0 = ws.frames, ws.recvs
    t0 = time.perf_counter()
    ws.send(cmd)
    deadline = time.monotonic() + 90
    while not state["done"]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"cat over /ws not finished after 90 s ({state['bytes']} bytes)")
        ws.pump(on_data, 1.0)
    t1 = time.perf_counter()
    c1 = self_cpu_s()
    ws.collect(0.05, 1.0)  # the prompt after the marker
    return {
        "wall": t1 - t0,
        "bytes": state["bytes"],
        "client_cpu": c1 - c0,
        "server_cpu": cpu_s(srv_pid) - s0,
        "cat_cpu": children_cpu_s(shell_pid) - k0,
        "frames": ws.frames - f0,
        "recvs": ws.recvs - r0,
    }


def cmd_throughput(addr: str, srv_pid_s: str, path: str, runs_s: str) -> None:
    srv_pid = int(srv_pid_s)
    runs = max(1, min(int(runs_s), 10))
    size = os.path.getsize(path)
    ws = open_terminal(addr, token())
    shells = children(srv_pid)
    if len(shells) != 1:
        sys.exit(f"termbench: expected one shell under the connector, found {shells}")
    shell = shells[0]
    bare: list[dict[str, float]] = []
    over: list[dict[str, float]] = []
    for i in range(runs):
        bare.append(bare_cat(path))
        over.append(ws_cat(ws, srv_pid, shell, path))
        warn(
            f"run {i + 1}/{runs}: bare {size / bare[-1]['wall'] / 1e6:.1f} MB/s, "
            f"ws {size / over[-1]['wall'] / 1e6:.1f} MB/s"
        )
    ws.close()

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    bare_mbs = [size / r["wall"] / 1e6 for r in bare]
    ws_mbs = [size / r["wall"] / 1e6 for r in over]
    out("tp_file_bytes", size)
    out("tp_runs", runs)
    out("tp_bare_mbs", f"{statistics.median(bare_mbs):.1f}")
    out("tp_bare_all", " ".join(f"{x:.0f}" for x in bare_mbs))
    out("tp_bare_bytes", int(med(bare, "bytes")))
    out("tp_bare_wall_s", f"{med(bare, 'wall'):.3f}")
    out("tp_bare_client_cpu_s", f"{med(bare, 'client_cpu'):.2f}")
    out("tp_bare_cat_cpu_s", f"{med(bare, 'cat_cpu'):.2f}")
    out("tp_ws_mbs", f"{statistics.median(ws_mbs):.1f}")
    out("tp_ws_all", " ".join(f"{x:.0f}" for x in ws_mbs))
    out("tp_ws_bytes", int(med(over, "bytes")))
    out("tp_ws_wall_s", f"{med(over, 'wall'):.3f}")
    out("tp_bare_reads", int(med(bare, "reads")))
    out("tp_ws_frames", int(med(over, "frames")))
    out("tp_ws_recvs", int(med(over, "recvs")))
    out("tp_ws_client_cpu_s", f"{med(over, 'client_cpu'):.2f}")
    out("tp_ws_server_cpu_s", f"{med(over, 'server_cpu'):.2f}")
    out("tp_ws_cat_cpu_s", f"{med(over, 'cat_cpu'):.2f}")
    out("tp_ratio", f"{statistics.median(ws_mbs) / statistics.median(bare_mbs):.2f}")


# ---------------------------------------------------------------- 2. echo


def rtt_ws(ws: WS, keys: int) -> list[float]:
    times = []
    letters = b"abcdefghijklmnopqrstuvwxyz"
    for k in range(keys):
        c = letters[k % 26 : k % 26 + 1]
        got = bytearray()
        t0 = time.perf_counter_ns()
        ws.send(c)
        deadline = time.monotonic() + 2
        while c not in got:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no echo of {c!r} within 2 s (key {k})")
            ws.pump(got.extend, 0.5)
        times.append((time.perf_counter_ns() - t0) / 1e6)
    return times


def rtt_bare(argv: list[str], keys: int) -> list[float]:
    pid, fd = pty.fork()
    if pid == 0:
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    times = []
    letters = b"abcdefghijklmnopqrstuvwxyz"
    try:
        time.sleep(0.2)  # let stty run before the first key
        while select.select([fd], [], [], 0.05)[0]:
            os.read(fd, 4096)
        for k in range(keys):
            c = letters[k % 26 : k % 26 + 1]
            got = b""
            t0 = time.perf_counter_ns()
            os.write(fd, c)
            deadline = time.monotonic() + 2
            while c not in got:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"bare pty: no echo of {c!r} within 2 s")
                if select.select([fd], [], [], 0.5)[0]:
                    got += os.read(fd, 4096)
            times.append((time.perf_counter_ns() - t0) / 1e6)
    finally:
        os.close(fd)
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
    return times


def emit_rtt(prefix: str, times: list[float]) -> None:
    out(f"{prefix}_n", len(times))
    out(f"{prefix}_p50_ms", f"{pct(times, 50):.3f}")
    out(f"{prefix}_p99_ms", f"{pct(times, 99):.3f}")
    out(f"{prefix}_max_ms", f"{max(times):.3f}")


def cmd_echo(addr: str, keys_s: str) -> None:
    keys = max(1, min(int(keys_s), 5000))
    tok = token()
    # (a) cooked mode: `cat` reads lines, the echo comes from the tty line discipline.
    ws = open_terminal(addr, tok)
    ws.send(b"cat\n")
    ws.wait_for(b"cat\r\n", IO_TIMEOUT)
    ws.collect(0.2, 1.0)
    emit_rtt("echo_tty", rtt_ws(ws, keys))
    ws.close()
    # (b) raw mode: `cat` itself writes every byte back (a process in the loop).
    ws = open_terminal(addr, tok)
    ws.send(b"stty raw -echo; cat\n")
    ws.wait_for(b"cat\r\n", IO_TIMEOUT)
    ws.collect(0.2, 1.0)
    emit_rtt("echo_proc", rtt_ws(ws, keys))
    ws.close()
    # The same two on a bare PTY, for scale.
    emit_rtt("echo_bare_tty", rtt_bare(["cat"], keys))
    emit_rtt("echo_bare_proc", rtt_bare(["sh", "-c", "stty raw -echo; exec cat"], keys))


# ---------------------------------------------------------------- 3. idle terminals


def shells_of(srv_pid: int) -> tuple[int, int, int]:
    """(count, summed VmRSS kB, summed Pss kB) of the connector's child processes."""
    kids = children(srv_pid)
    rss = sum(proc_status(k).get("VmRSS", 0) for k in kids)
    pss = sum(pss_kb(k) for k in kids)
    return len(kids), rss, pss


def wait_no_shells(srv_pid: int, limit: float) -> int:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if not children(srv_pid):
            return 0
        time.sleep(0.1)
    return len(children(srv_pid))


def cmd_idle(addr: str, srv_pid_s: str, count_s: str, rounds_s: str) -> None:
    srv_pid = int(srv_pid_s)
    count = max(2, min(int(count_s), 500))
    rounds = max(1, min(int(rounds_s), 5))
    tok = token()
    time.sleep(0.3)
    base = proc_status(srv_pid)
    out("idle_rss0_kb", base.get("VmRSS", 0))
    out("idle_threads0", base.get("Threads", 0))
    for rnd in range(1, rounds + 1):
        socks: list[WS] = []
        try:
            socks.append(open_terminal(addr, tok))
            time.sleep(0.5)
            one = proc_status(srv_pid)
            for _ in range(count - 1):
                socks.append(open_terminal(addr, tok))
            time.sleep(1.0)
            many = proc_status(srv_pid)
            n_sh, sh_rss, sh_pss = shells_of(srv_pid)
            # Every socket is still served: one keystroke each, echoed.
            alive = 0
            for ws in socks:
                try:
                    ws.send(b"x")
                    ws.wait_for(b"x", 2.0)
                    alive += 1
                except (OSError, TimeoutError, WsClosed) as e:
                    warn(f"round {rnd}: a terminal did not echo: {e}")
        finally:
            for ws in socks:
                ws.close()
        left = wait_no_shells(srv_pid, 6.0)
        time.sleep(0.5)
        after = proc_status(srv_pid)
        p = f"idle_r{rnd}"
        out(f"{p}_rss1_kb", one.get("VmRSS", 0))
        out(f"{p}_threads1", one.get("Threads", 0))
        out(f"{p}_rssN_kb", many.get("VmRSS", 0))
        out(f"{p}_threadsN", many.get("Threads", 0))
        out(f"{p}_per_term_kb", f"{(many.get('VmRSS', 0) - one.get('VmRSS', 0)) / (count - 1):.1f}")
        out(f"{p}_shells", n_sh)
        out(f"{p}_shell_rss_kb", sh_rss)
        out(f"{p}_shell_pss_kb", sh_pss)
        out(f"{p}_echoed", alive)
        out(f"{p}_shells_left", left)
        out(f"{p}_rss_after_kb", after.get("VmRSS", 0))
        out(f"{p}_threads_after", after.get("Threads", 0))
    out("idle_count", count)
    out("idle_rounds", rounds)
    out("idle_hwm_kb", proc_status(srv_pid).get("VmHWM", 0))


# ---------------------------------------------------------------- 4. the `websockets` library's client


def lib_open(addr: str, tok: str):  # -> websockets.sync.client.ClientConnection
    """A terminal over the `websockets` sync client, its first prompt read."""
    import warnings

    from websockets.sync.client import connect  # only these subcommands need it

    warnings.simplefilter("ignore", DeprecationWarning)  # 14+: "use it as a context manager"

    check_loopback(addr)
    ws = connect(
        f"ws://{addr}/ws?token={tok}", max_size=None, compression=None, open_timeout=IO_TIMEOUT
    )
    ws.recv(timeout=IO_TIMEOUT)
    lib_drain(ws, 0.2)
    return ws


def lib_drain(ws, quiet: float) -> None:
    try:
        while True:
            ws.recv(timeout=quiet)
    except TimeoutError:
        pass


def as_bytes(m: str | bytes) -> bytes:
    return m.encode() if isinstance(m, str) else m


def cmd_libcat(addr: str, path: str, runs_s: str) -> None:
    runs = max(1, min(int(runs_s), 10))
    size = os.path.getsize(path)
    ws = lib_open(addr, token())
    mbs = []
    for i in range(runs):
        tag = os.urandom(4).hex()
        marker = f"END{tag}"
        total, tail = 0, ""
        t0 = time.perf_counter()
        ws.send(f"cat '{path}'; echo END''{tag}\n")
        deadline = time.monotonic() + 90
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"cat not finished after 90 s ({total} characters)")
            msg = ws.recv(timeout=IO_TIMEOUT)  # str for a text frame, as a browser gets it
            if isinstance(msg, bytes):
                msg = msg.decode("latin-1")
            total += len(msg)
            if marker in tail + msg[:64] or marker in msg:
                break
            tail = msg[-64:]
        wall = time.perf_counter() - t0
        lib_drain(ws, 0.1)
        mbs.append(size / wall / 1e6)
        warn(f"libcat run {i + 1}/{runs}: {mbs[-1]:.1f} MB/s, {total} characters")
    ws.close()
    out("lib_mbs", f"{statistics.median(mbs):.1f}")
    out("lib_all", " ".join(f"{x:.0f}" for x in mbs))


def cmd_libecho(addr: str, keys_s: str) -> None:
    keys = max(1, min(int(keys_s), 5000))
    ws = lib_open(addr, token())
    ws.send("cat\n")
    got = b""
    deadline = time.monotonic() + IO_TIMEOUT
    while b"cat\r\n" not in got:
        if time.monotonic() > deadline:
            raise TimeoutError("cat did not start")
        got += as_bytes(ws.recv(timeout=IO_TIMEOUT))
    lib_drain(ws, 0.2)
    times = []
    letters = "abcdefghijklmnopqrstuvwxyz"
    for k in range(keys):
        c = letters[k % 26]
        got = b""
        t0 = time.perf_counter_ns()
        ws.send(c)
        while c.encode() not in got:
            got += as_bytes(ws.recv(timeout=2))
        times.append((time.perf_counter_ns() - t0) / 1e6)
        if k % 64 == 63:  # keep cat's line short: end it, read its echo and cat's copy
            ws.send("\n")
            got = b""
            while got.count(b"\r\n") < 2:
                got += as_bytes(ws.recv(timeout=2))
    ws.close()
    emit_rtt("libecho", times)


def cmd_aiocat(addr: str, path: str, runs_s: str) -> None:
    import asyncio

    import websockets

    runs = max(1, min(int(runs_s), 10))
    size = os.path.getsize(path)
    check_loopback(addr)

    async def drain(ws, quiet: float) -> None:
        try:
            while True:
                await asyncio.wait_for(ws.recv(), quiet)
        except TimeoutError:
            pass

    async def main() -> list[float]:
        mbs = []
        url = f"ws://{addr}/ws?token={token()}"
        async with websockets.connect(url, max_size=None, compression=None) as ws:
            await asyncio.wait_for(ws.recv(), IO_TIMEOUT)
            await drain(ws, 0.2)
            for i in range(runs):
                tag = os.urandom(4).hex()
                marker, tail = f"END{tag}", ""
                t0 = time.perf_counter()
                await ws.send(f"cat '{path}'; echo END''{tag}\n")
                while True:
                    msg = await asyncio.wait_for(ws.recv(), IO_TIMEOUT)
                    if isinstance(msg, bytes):
                        msg = msg.decode("latin-1")
                    if marker in tail + msg[:64] or marker in msg:
                        break
                    tail = msg[-64:]
                mbs.append(size / (time.perf_counter() - t0) / 1e6)
                warn(f"aiocat run {i + 1}/{runs}: {mbs[-1]:.1f} MB/s")
                await drain(ws, 0.1)
        return mbs

    mbs = asyncio.run(main())
    out("aio_mbs", f"{statistics.median(mbs):.1f}")
    out("aio_all", " ".join(f"{x:.0f}" for x in mbs))


def main(argv: list[str]) -> None:
    cmds = {
        "mkfile": cmd_mkfile,
        "throughput": cmd_throughput,
        "echo": cmd_echo,
        "idle": cmd_idle,
        "libcat": cmd_libcat,
        "libecho": cmd_libecho,
        "aiocat": cmd_aiocat,
    }
    if len(argv) < 2 or argv[1] not in cmds:
        sys.exit(__doc__)
    try:
        cmds[argv[1]](*argv[2:])
    except (OSError, TimeoutError, WsClosed, ValueError, TypeError) as e:
        sys.exit(f"termbench {argv[1]}: {e!r}")


if __name__ == "__main__":
    main(sys.argv)
