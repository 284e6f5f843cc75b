#!/usr/bin/env python3
"""Helpers for bench/runs.sh (Python 3.11 standard library only).

Every measuring subcommand prints `key=value` lines on stdout for runs.sh;
diagnostics go to stderr. All traffic goes to 127.0.0.1 only and every loop
is bounded in count and in time. The connector's token is read from the
environment variable AION_TOKEN, so that it never appears in argv.

Subcommands:
  burst ADDR PID LINES             LINES agent lines as fast as possible -> local callback;
                                   total time, posts/s, order, latency, RSS every 20 ms
  paced ADDR PID LINES INTERVAL_US LINES agent lines, one every INTERVAL_US -> latency
  outage ADDR PID STATEDIR SECONDS RATE
                                   callback down for SECONDS while the agent prints RATE
                                   lines/s; RSS and spool size every 0.5 s; then the
                                   callback comes up: order, count, drain time
  startup ADDR RUNS STARTS TAG     RUNS invokes (fresh sessions, one at a time):
                                   invoke -> fake acpx exec start (from the STARTS file)
  spawn FAKE RUNS STARTS           baseline: Python Popen -> the same fake's exec start
  endturn ADDR RUNS STARTS LINGER_MS
                                   RUNS invokes (fresh sessions, one at a time) of a turn
                                   of 3 chunks after which the fake lingers LINGER_MS:
                                   end_turn written -> complete received (STARTS file)
  reference COUNT                  the callback server alone: a Python keep-alive client, posts/s
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.dont_write_bytecode = True  # no bench/__pycache__ from importing pushbench
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchcli  # noqa: E402
from pushbench import check_loopback, out, pct, read_response  # noqa: E402

FINAL_PATHS = ("/internal/agent-complete", "/internal/agent-error")
LINE_RE = re.compile(r"i=(\d+) t=(\d+) ")
ECHO = "bench-echo-token"  # the payload's `token`, echoed in every body



def spool_files(spool: str) -> list[str]:
    """The spool's files, without `.lock` (the directory's lock, not a post)."""
    return sorted(n for n in os.listdir(spool) if n != ".lock") if os.path.isdir(spool) else []

def token() -> str:
    tok = os.environ.get("AION_TOKEN", "")
    if not tok:
        sys.exit("runsbench: AION_TOKEN is not set")
    return tok


def realtime_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_REALTIME)


# ---------------------------------------------------------------- callback server

class Post:
    __slots__ = ("recv_ns", "path", "body", "sig", "port")

    def __init__(self, recv_ns: int, path: str, body: bytes, sig: str | None, port: int) -> None:
        self.recv_ns, self.path, self.body, self.sig, self.port = recv_ns, path, body, sig, port


class Recorder:
    """Every POST in arrival order; an event per session when its final post came."""

    def __init__(self) -> None:
        self.posts: list[Post] = []
        self.lock = threading.Lock()
        self.finals: dict[str, threading.Event] = {}
        self.first = threading.Event()

    def final_event(self, session: str) -> threading.Event:
        with self.lock:
            return self.finals.setdefault(session, threading.Event())

    def add(self, post: Post) -> None:
        with self.lock:
            self.posts.append(post)
        self.first.set()
        if post.path in FINAL_PATHS:
            try:
                session = json.loads(post.body).get("sessionId", "")
            except ValueError:
                session = ""
            self.final_event(str(session)).set()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True
    ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}"

    def do_POST(self) -> None:  # noqa: N802 (http.server naming)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        t = realtime_ns()
        self.server.recorder.add(  # type: ignore[attr-defined]
            Post(t, self.path, body, self.headers.get("X-Aion-Signature"), self.client_address[1]))
        self.wfile.write(self.ANSWER)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class Callback:
    """A ThreadingHTTPServer on 127.0.0.1:PORT (0: ephemeral) in a thread."""

    def __init__(self, port: int = 0) -> None:
        self.recorder = Recorder()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.server.recorder = self.recorder  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------- connector side

def invoke(addr: str, session: str, prompt: str, callback: str) -> tuple[int, bytes, int, int]:
    """POST an invoke; returns (status, body, ns before send, ns after the answer)."""
    host, port = check_loopback(addr)
    payload = {"agent": "pi", "prompt": prompt, "session": session, "callback": callback, "token": ECHO}
    body = json.dumps({"v": 1, "action": "invoke", "token": token(), "payload": payload},
                      separators=(",", ":")).encode()
    req = ("POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    with socket.create_connection((host, port), timeout=5.0) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = realtime_ns()
        s.sendall(req)
        status, answer = read_response(s)
        t1 = realtime_ns()
    return status, answer, t0, t1


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


def cpu_ms(pid: int) -> float:
    """utime + stime of a process in ms."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * 1000.0 / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def dir_bytes(path: str) -> int:
    total = 0
    try:
        with os.scandir(path) as it:
            for e in it:
                try:
                    total += e.stat(follow_symlinks=False).st_size
                except OSError:
                    pass
    except OSError:
        pass
    return total


class Sampler:
    """VmRSS (and optionally a directory's size) every `interval` s in a thread."""

    def __init__(self, pid: int, interval: float, spool: str | None = None) -> None:
        self.pid, self.interval, self.spool = pid, interval, spool
        self.samples: list[tuple[float, int, int, int]] = []  # (monotonic, rss kB, threads, spool bytes)
        self.stop_ev = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        for _ in range(int(3600 / self.interval)):  # bounded: an hour at most
            st = proc_status(self.pid)
            spool = dir_bytes(self.spool) if self.spool else 0
            self.samples.append((time.monotonic(), st.get("VmRSS", 0), st.get("Threads", 0), spool))
            if self.stop_ev.wait(self.interval):
                return

    def stop(self) -> None:
        self.stop_ev.set()
        self.thread.join(timeout=5)

    def between(self, t0: float, t1: float) -> list[tuple[float, int, int, int]]:
        return [s for s in self.samples if t0 <= s[0] <= t1]


def analyse(posts: list[Post], session: str, lines: int, key: bytes) -> dict[str, object]:
    """Order, completeness, signatures and line latencies of one run's posts (arrival order)."""
    mine: list[tuple[Post, dict[str, object]]] = []
    unreadable = 0
    for p in posts:
        try:
            b = json.loads(p.body)
        except ValueError:
            unreadable += 1
            continue
        if b.get("sessionId") == session:
            mine.append((p, b))
    seqs = [b.get("seq") for _, b in mine]
    in_order = all(s == k for k, s in enumerate(seqs))
    increasing = all(isinstance(a, int) and isinstance(b, int) and a < b for a, b in zip(seqs, seqs[1:]))
    dups = len(seqs) - len(set(seqs))
    finals = [k for k, (p, _) in enumerate(mine) if p.path in FINAL_PATHS]
    outputs = [(p, b) for p, b in mine if p.path == "/internal/agent-stream"]
    other_paths = sum(1 for p, _ in mine if p.path not in FINAL_PATHS and p.path != "/internal/agent-stream")
    bad_sig = sum(1 for p, _ in mine
                  if p.sig != "sha256=" + hmac.new(key, p.body, hashlib.sha256).hexdigest())
    bad_echo = sum(1 for _, b in mine if b.get("token") != ECHO)
    lat_ms: list[float] = []
    line_misorder = 0
    idx_seen: list[int] = []
    print_ns: list[int] = []
    for p, b in outputs:
        m = LINE_RE.search(str(b.get("text", "")))
        if not m:
            continue
        i, t = int(m.group(1)), int(m.group(2))
        if idx_seen and i <= idx_seen[-1]:
            line_misorder += 1
        idx_seen.append(i)
        print_ns.append(t)
        lat_ms.append((p.recv_ns - t) / 1e6)
    final_kind = "none"
    final_detail = ""
    if finals:
        fp, fb = mine[finals[-1]]
        final_kind = "complete" if fp.path.endswith("complete") else "error"
        final_detail = str(fb.get("error", ""))[:200] if final_kind == "error" else ""
    res: dict[str, object] = {
        "posts": len(mine),
        "outputs": len(outputs),
        "lines_seen": len(set(idx_seen)),
        "lines_expected": lines,
        "missing_lines": lines - len(set(idx_seen)),
        "seq_in_order": "yes" if in_order else "no",
        "seq_strictly_increasing": "yes" if increasing else "no",
        "seq_dups": dups,
        "line_misorder": line_misorder,
        "finals": len(finals),
        "final_last": "yes" if finals == [len(mine) - 1] else "no",
        "final_kind": final_kind,
        "final_error": final_detail or "-",
        "bad_signatures": bad_sig,
        "bad_token_echo": bad_echo,
        "other_paths": other_paths,
        "unreadable_bodies": unreadable,
        "connections": len({p.port for p, _ in mine}),
    }
    if mine:
        res["first_recv_ns"] = mine[0][0].recv_ns
        res["last_recv_ns"] = mine[-1][0].recv_ns
    if lat_ms:
        res["lat_p50_ms"] = f"{pct(lat_ms, 50):.3f}"
        res["lat_p99_ms"] = f"{pct(lat_ms, 99):.3f}"
        res["lat_max_ms"] = f"{max(lat_ms):.3f}"
        res["lat_min_ms"] = f"{min(lat_ms):.3f}"
    if len(print_ns) > 1:
        res["agent_print_ms"] = f"{(print_ns[-1] - print_ns[0]) / 1e6:.1f}"
    return res


def emit_kv(prefix: str, d: dict[str, object]) -> None:
    for k, v in d.items():
        out(f"{prefix}{k}", v)


def wait_final(cb: Callback, session: str, timeout: float) -> bool:
    return cb.recorder.final_event(session).wait(timeout)


# ---------------------------------------------------------------- subcommands

def cmd_burst(addr: str, pid: str, lines: str) -> None:
    n = max(1, min(int(lines), 1_000_000))
    p = int(pid)
    key = token().encode()
    cb = Callback()
    before = proc_status(p)
    cpu0 = cpu_ms(p)
    sampler = Sampler(p, 0.02)
    session = "burst"
    t_start = time.monotonic()
    status, answer, t0, _ = invoke(addr, session, f"lines={n} interval_us=0", cb.url)
    out("burst_invoke_status", status)
    if status != 200:
        print(f"runsbench: burst invoke answered {status} {answer[:200]!r}", file=sys.stderr)
    ok = status == 200 and wait_final(cb, session, 30.0 + n / 200)
    time.sleep(0.1)
    sampler.stop()
    after = proc_status(p)
    out("burst_cpu_ms", f"{cpu_ms(p) - cpu0:.0f}")
    cb.close()
    out("burst_completed", "yes" if ok else "no (timed out)")
    a = analyse(list(cb.recorder.posts), session, n, key)
    emit_kv("burst_", a)
    if "last_recv_ns" in a:
        total_s = (int(a["last_recv_ns"]) - t0) / 1e9  # type: ignore[arg-type]
        out("burst_total_s", f"{total_s:.3f}")
        out("burst_posts_per_s", f"{int(a['posts']) / total_s:.0f}" if total_s > 0 else "-")  # type: ignore[arg-type]
        span = (int(a["last_recv_ns"]) - int(a["first_recv_ns"])) / 1e9  # type: ignore[arg-type]
        out("burst_first_post_ms", f"{(int(a['first_recv_ns']) - t0) / 1e6:.1f}")  # type: ignore[arg-type]
        out("burst_delivery_posts_per_s", f"{(int(a['posts']) - 1) / span:.0f}" if span > 0 else "-")  # type: ignore[arg-type]
    rss = [s[1] for s in sampler.between(t_start, time.monotonic())]
    out("burst_rss_before_kb", before.get("VmRSS", 0))
    out("burst_rss_peak_kb", max(rss) if rss else 0)
    out("burst_rss_samples", len(rss))
    out("burst_rss_after_kb", after.get("VmRSS", 0))
    out("burst_hwm_kb", after.get("VmHWM", 0))
    out("burst_threads_peak", max((s[2] for s in sampler.samples), default=0))


def cmd_paced(addr: str, pid: str, lines: str, interval_us: str) -> None:
    n = max(1, min(int(lines), 100_000))
    iv = max(0, min(int(interval_us), 1_000_000))
    p = int(pid)
    key = token().encode()
    cb = Callback()
    session = "paced"
    status, answer, _, _ = invoke(addr, session, f"lines={n} interval_us={iv}", cb.url)
    out("paced_invoke_status", status)
    if status != 200:
        print(f"runsbench: paced invoke answered {status} {answer[:200]!r}", file=sys.stderr)
    ok = status == 200 and wait_final(cb, session, 30.0 + n * iv / 1e6 * 2)
    time.sleep(0.1)
    cb.close()
    out("paced_completed", "yes" if ok else "no (timed out)")
    emit_kv("paced_", analyse(list(cb.recorder.posts), session, n, key))
    out("paced_rss_after_kb", proc_status(p).get("VmRSS", 0))


def cmd_outage(addr: str, pid: str, state_dir: str, seconds: str, rate: str) -> None:
    secs = max(2.0, min(float(seconds), 600.0))
    r = max(1, min(int(rate), 100_000))
    p = int(pid)
    key = token().encode()
    spool = os.path.join(state_dir, "outbox")
    # A port with nobody listening: bound, then closed; it is opened again after the outage.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    emit_s = max(1.0, secs - 2.0)  # the agent finishes just before the callback comes back
    n = int(r * emit_s)
    session = "outage"
    sampler = Sampler(p, 0.5, spool)
    t_start = time.monotonic()
    before = proc_status(p)
    status, answer, _, _ = invoke(addr, session, f"lines={n} interval_us={1e6 / r:.3f}", url)
    out("outage_invoke_status", status)
    out("outage_lines", n)
    out("outage_seconds", f"{secs:g}")
    if status != 200:
        print(f"runsbench: outage invoke answered {status} {answer[:200]!r}", file=sys.stderr)
        sampler.stop()
        return
    t_up = t_start + secs
    while time.monotonic() < t_up:
        time.sleep(min(0.2, max(0.0, t_up - time.monotonic())))
    during = sampler.between(t_start, time.monotonic())
    spool_end = dir_bytes(spool)
    files = spool_files(spool)
    rss = [x[1] for x in during]
    # RSS over the later part only (after the first 10% of the outage), to see growth.
    first_half = [x[1] for x in during if x[0] < t_start + secs / 2]
    second_half = [x[1] for x in during if x[0] >= t_start + secs / 2]
    out("outage_rss_before_kb", before.get("VmRSS", 0))
    out("outage_rss_min_kb", min(rss) if rss else 0)
    out("outage_rss_max_kb", max(rss) if rss else 0)
    out("outage_rss_max_first_half_kb", max(first_half) if first_half else 0)
    out("outage_rss_max_second_half_kb", max(second_half) if second_half else 0)
    out("outage_rss_samples", len(rss))
    out("outage_hwm_kb", proc_status(p).get("VmHWM", 0))
    out("outage_threads_max", max((x[2] for x in during), default=0))
    out("outage_spool_bytes", spool_end)
    out("outage_spool_max_bytes", max((x[3] for x in during), default=0))
    out("outage_spool_files", ",".join(f.rsplit(".", 1)[-1] for f in files) or "none")
    # The callback comes back.
    try:
        cb = Callback(port)
    except OSError as e:
        out("outage_callback_error", f"cannot listen on {port} again: {e!r}")
        sampler.stop()
        return
    up_ns = realtime_ns()
    t_up_mono = time.monotonic()
    cpu0 = cpu_ms(p)
    # Longest backoff is 30 s +25%, then the drain; both bounded.
    got_first = cb.recorder.first.wait(45.0)
    ok = got_first and wait_final(cb, session, 60.0 + n / 500)
    t_end = time.monotonic()
    out("outage_drain_cpu_ms", f"{cpu_ms(p) - cpu0:.0f}")
    time.sleep(0.3)
    sampler.stop()
    cb.close()
    out("outage_completed", "yes" if ok else ("no (no post within 45 s)" if not got_first else "no (timed out)"))
    a = analyse(list(cb.recorder.posts), session, n, key)
    for k in ("lat_p50_ms", "lat_p99_ms", "lat_max_ms", "lat_min_ms"):
        a.pop(k, None)  # latency through an outage is the outage itself
    emit_kv("outage_", a)
    if "first_recv_ns" in a:
        out("outage_first_post_after_up_s", f"{(int(a['first_recv_ns']) - up_ns) / 1e9:.2f}")  # type: ignore[arg-type]
        out("outage_final_after_up_s", f"{(int(a['last_recv_ns']) - up_ns) / 1e9:.2f}")  # type: ignore[arg-type]
        span = (int(a["last_recv_ns"]) - int(a["first_recv_ns"])) / 1e9  # type: ignore[arg-type]
        out("outage_drain_s", f"{span:.2f}")
        out("outage_drain_posts_per_s", f"{(int(a['posts']) - 1) / span:.0f}" if span > 0 else "-")  # type: ignore[arg-type]
    drain = [x[1] for x in sampler.between(t_up_mono, t_end)]
    out("outage_drain_rss_max_kb", max(drain) if drain else 0)
    out("outage_spool_after_bytes", dir_bytes(spool))
    out("outage_spool_after_files", len(spool_files(spool)))
    out("outage_rss_after_kb", proc_status(p).get("VmRSS", 0))


def read_starts(path: str) -> dict[tuple[str, str], int]:
    """`ensure NS SESSION` / `main NS PROMPT` lines written by the fake acpx."""
    res: dict[tuple[str, str], int] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                kind, _, rest = line.rstrip("\n").partition(" ")
                ns, _, what = rest.partition(" ")
                if ns.isdigit():
                    res.setdefault((kind, what), int(ns))
    except OSError:
        pass
    return res


def ms_stats(prefix: str, values: list[float]) -> None:
    if values:
        out(f"{prefix}_median_ms", f"{statistics.median(values):.2f}")
        out(f"{prefix}_p90_ms", f"{pct(values, 90):.2f}")
        out(f"{prefix}_min_ms", f"{min(values):.2f}")
        out(f"{prefix}_max_ms", f"{max(values):.2f}")
    else:
        out(f"{prefix}_median_ms", "-")


def cmd_startup(addr: str, runs: str, starts: str, tag: str) -> None:
    n = max(1, min(int(runs), 200))
    cb = Callback()
    sent: dict[int, int] = {}
    answer_ms: list[float] = []
    complete_ms: list[float] = []
    failures: dict[str, int] = {}
    deadline = time.monotonic() + 60.0  # the whole phase is bounded too
    done = 0
    for k in range(n):
        if time.monotonic() > deadline:
            print(f"runsbench: startup {tag} stopped after {k} runs (60 s budget)", file=sys.stderr)
            break
        session = f"st-{tag}-{k}"
        try:
            status, answer, t0, t1 = invoke(addr, session, f"startup {tag}-{k}", cb.url)
        except OSError as e:
            failures[type(e).__name__] = failures.get(type(e).__name__, 0) + 1
            continue
        if status != 200:
            failures[f"http{status}"] = failures.get(f"http{status}", 0) + 1
            print(f"runsbench: startup invoke {k}: {status} {answer[:200]!r}", file=sys.stderr)
            continue
        sent[k] = t0
        answer_ms.append((t1 - t0) / 1e6)
        if not wait_final(cb, session, 10.0):
            failures["no-final"] = failures.get("no-final", 0) + 1
            continue
        with cb.recorder.lock:
            fin = [p for p in cb.recorder.posts if p.path in FINAL_PATHS and session.encode() in p.body]
        if fin and fin[-1].path.endswith("error"):
            failures["error-event"] = failures.get("error-event", 0) + 1
            print(f"runsbench: startup {k}: error event {fin[-1].body[:300]!r}", file=sys.stderr)
        if fin:
            complete_ms.append((fin[-1].recv_ns - t0) / 1e6)
        done += 1
    time.sleep(0.05)
    cb.close()
    st = read_starts(starts)
    main_ms: list[float] = []
    ensure_ms: list[float] = []
    gap_ms: list[float] = []
    for k, t0 in sent.items():
        m = st.get(("main", f"startup {tag}-{k}"))
        e = st.get(("ensure", f"st-{tag}-{k}"))
        if m is not None:
            main_ms.append((m - t0) / 1e6)
        if e is not None:
            ensure_ms.append((e - t0) / 1e6)
            if m is not None:
                gap_ms.append((m - e) / 1e6)
    out("startup_runs", n)
    out("startup_done", done)
    out("startup_failures", ",".join(f"{k}x{v}" for k, v in sorted(failures.items())) or "none")
    ms_stats("startup_main", main_ms)
    ms_stats("startup_ensure", ensure_ms)
    ms_stats("startup_ensure_to_main", gap_ms)
    ms_stats("startup_answer", answer_ms)
    ms_stats("startup_complete", complete_ms)


def cmd_endturn(addr: str, runs: str, starts: str, linger_ms: str) -> None:
    n = max(1, min(int(runs), 200))
    linger = max(0, min(int(linger_ms), 10_000))
    cb = Callback()
    received: dict[str, int] = {}
    failures: dict[str, int] = {}
    deadline = time.monotonic() + 120.0 + n * linger / 1000  # the whole phase is bounded
    for k in range(n):
        if time.monotonic() > deadline:
            print(f"runsbench: endturn stopped after {k} runs (time budget)", file=sys.stderr)
            break
        session = f"et-{k}"
        prompt = f"lines=3 interval_us=0 linger_ms={linger} run={k}"
        try:
            status, answer, _, _ = invoke(addr, session, prompt, cb.url)
        except OSError as e:
            failures[type(e).__name__] = failures.get(type(e).__name__, 0) + 1
            continue
        if status != 200:
            failures[f"http{status}"] = failures.get(f"http{status}", 0) + 1
            print(f"runsbench: endturn invoke {k}: {status} {answer[:200]!r}", file=sys.stderr)
            continue
        if not wait_final(cb, session, 10.0 + linger / 1000):
            failures["no-final"] = failures.get("no-final", 0) + 1
            continue
        with cb.recorder.lock:
            fin = [p for p in cb.recorder.posts if p.path in FINAL_PATHS and session.encode() in p.body]
        if fin[-1].path.endswith("error"):
            failures["error-event"] = failures.get("error-event", 0) + 1
            continue
        received[prompt] = fin[-1].recv_ns
    cb.close()
    ends = read_starts(starts)
    lat = [(t - ends[("endturn", p)]) / 1e6 for p, t in received.items() if ("endturn", p) in ends]
    out("endturn_runs", n)
    out("endturn_measured", len(lat))
    out("endturn_failures", ",".join(f"{k}x{v}" for k, v in sorted(failures.items())) or "none")
    if lat:
        out("endturn_p50_ms", f"{pct(lat, 50):.2f}")
        out("endturn_p99_ms", f"{pct(lat, 99):.2f}")
        out("endturn_max_ms", f"{max(lat):.2f}")


def cmd_spawn(fake: str, runs: str, starts: str) -> None:
    """Baseline: how long the fake itself takes from Popen to its first line."""
    n = max(1, min(int(runs), 200))
    sent: dict[int, int] = {}
    env = dict(os.environ, AION_BENCH_STARTS=starts)
    for k in range(n):
        t0 = realtime_ns()
        proc = subprocess.Popen([fake, "--format", "json", "--approve-all", "pi", "exec", "--", f"startup spawn-{k}"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=env)
        sent[k] = t0
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    st = read_starts(starts)
    ms_stats("spawn_main", [(st[("main", f"startup spawn-{k}")] - t0) / 1e6
                            for k, t0 in sent.items() if ("main", f"startup spawn-{k}") in st])


def cmd_reference(count: str) -> None:
    """Capacity of the callback server alone: a Python keep-alive client posting
    COUNT bodies like the connector's, one at a time."""
    n = max(1, min(int(count), 100_000))
    cb = Callback()
    body = json.dumps({"sessionId": "ref", "seq": 0, "text": '{"jsonrpc":"2.0","method":"session/update",'
                       '"params":{"sessionId":"bench","update":{"sessionUpdate":"agent_message_chunk",'
                       '"content":{"type":"text","text":"i=0 t=1795241988918460109 "}}}}', "token": ECHO}).encode()
    req = ("POST /internal/agent-stream HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           f"X-Aion-Signature: sha256={'0' * 64}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    errors = 0
    deadline = time.monotonic() + 30.0
    done = 0
    with socket.create_connection(("127.0.0.1", cb.port), timeout=5.0) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        for _ in range(n):
            if time.monotonic() > deadline:
                break
            s.sendall(req)
            status, _ = read_response(s)
            errors += status != 200
            done += 1
        t1 = time.perf_counter()
    cb.close()
    out("ref_posts", done)
    out("ref_errors", errors)
    out("ref_posts_per_s", f"{done / (t1 - t0):.0f}" if t1 > t0 else "-")


def main(argv: list[str]) -> None:
    cmds = {"burst": cmd_burst, "paced": cmd_paced, "outage": cmd_outage, "startup": cmd_startup,
            "spawn": cmd_spawn, "reference": cmd_reference, "endturn": cmd_endturn}
    benchcli.dispatch("runsbench", __doc__, cmds, argv)


if __name__ == "__main__":
    main(sys.argv)
