#!/usr/bin/env python3
"""Helper for bench/poll.sh (Python 3.11 standard library only).

Each measuring subcommand starts its own fake poll server (PROTOCOL.md §2) on
127.0.0.1, starts `aion-connector poll` against it, measures, stops the agent
with SIGTERM and prints `key=value` lines on stdout; diagnostics go to stderr.
The agent token comes from the environment variable AION_TOKEN (never argv)
and reaches the agent as AGENT_TOKEN. Every loop is bounded in count and time;
the agent (and so every session) inherits AION_BENCH_MARK, by which poll.sh
finds and kills whatever is left.

The fake server checks `Authorization: Bearer` on every request and
`X-Signature = sha256=HMAC-SHA256(token, X-Timestamp + "." + body)` on every
POST (counted in *_bad_requests), hands out pending instructions on GET
/api/agent/instructions until acked (204 when none), answers 200 to the other
POSTs, and checks every session's chunks as they arrive: seq 0, 1, 2, ... with
no gap or repeat, the stdout data hashed in order.

Subcommands (BIN: the agent binary, WORK: a scratch directory):
  idle BIN WORK SECONDS POLL_MS        CPU time of an idle agent polling every POLL_MS
  delay BIN WORK RUNS POLL_MS          instruction available -> session process running
  throughput BIN WORK MB               one session printing MB megabytes (base64 text)
  busy BIN WORK SESSIONS SECONDS KBPS  RSS with SESSIONS sessions printing KBPS kB/s each
  emit LINES_PER_S SECONDS TAG         (the session program of `busy`)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CLK_TCK = os.sysconf("SC_CLK_TCK")
POLL_VARS = (
    "SERVER_URL", "AGENT_TOKEN", "POLL_INTERVAL", "OUTPUT_FLUSH_INTERVAL", "MAX_CONCURRENT_SESSIONS",
    "STATUS_INTERVAL", "AION_SESSION_COMMAND", "AION_STATE_DIR", "DELIVERY_SECONDS", "STATE_DIRECTORY",
)
EMIT_LINE_BYTES = 100
AGENTS: list["Agent"] = []


def out(key: str, value: object) -> None:
    print(f"{key}={value}", flush=True)


def now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_REALTIME)


def token() -> str:
    tok = os.environ.get("AION_TOKEN", "")
    if not tok:
        sys.exit("pollbench: AION_TOKEN is not set")
    return tok


def ms(ns: float) -> str:
    return f"{ns / 1e6:.1f}"


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))]


# ---------------------------------------------------------------- fake server

class Session:
    def __init__(self) -> None:
        self.next_seq = 0
        self.gaps = 0
        self.repeats = 0
        self.stdout = hashlib.sha256()
        self.stdout_bytes = 0
        self.stderr_bytes = 0
        self.output_posts = 0
        self.post_bytes = 0
        self.events: list[tuple[int, str, dict]] = []  # (arrival ns, name, body)
        self.done = threading.Event()


class State:
    def __init__(self, tok: str) -> None:
        self.token = tok
        self.key = tok.encode()
        self.lock = threading.Lock()
        self.pending: list[dict] = []
        self.handed: dict[str, int] = {}  # instruction id -> first handed-out ns
        self.acked: dict[str, int] = {}  # instruction id -> ack arrival ns
        self.sessions: dict[str, Session] = {}
        self.gets: list[int] = []
        self.statuses: list[int] = []
        self.errors: list[dict] = []
        self.bad: list[str] = []
        self.requests = 0

    def session(self, sid: str) -> Session:
        with self.lock:
            return self.sessions.setdefault(sid, Session())

    def push(self, instruction: dict) -> int:
        with self.lock:
            t = now_ns()
            self.pending.append(instruction)
            return t


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The head and the body are separate writes: without TCP_NODELAY the body
    # waits for the agent's delayed ACK (~40 ms a request, the server's artifact).
    disable_nagle_algorithm = True
    server: "FakeServer"

    def log_message(self, *_args: object) -> None:
        pass

    def answer(self, status: int, body: bytes = b"") -> None:
        self.send_response(status)
        if status != 204:
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and status != 204:
            self.wfile.write(body)

    def authorized(self, st: State) -> bool:
        if self.headers.get("Authorization") != f"Bearer {st.token}":
            with st.lock:
                st.bad.append(f"{self.command} {self.path}: bad or missing Authorization")
            return False
        return True

    def do_GET(self) -> None:  # noqa: N802
        st = self.server.state
        t = now_ns()
        with st.lock:
            st.requests += 1
        if not self.authorized(st):
            self.answer(401, b'{"error":"unauthorized"}')
            return
        if self.path != "/api/agent/instructions":
            self.answer(404, b"{}")
            return
        with st.lock:
            st.gets.append(t)
            if not st.pending:
                body = None
            else:
                body = json.dumps({"instructions": st.pending}).encode()
                for i in st.pending:
                    st.handed.setdefault(i.get("id", ""), t)
        if body is None:
            self.answer(204)
        else:
            self.answer(200, body)

    def do_POST(self) -> None:  # noqa: N802
        st = self.server.state
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        t = now_ns()
        with st.lock:
            st.requests += 1
        ok = self.authorized(st)
        ts = self.headers.get("X-Timestamp", "")
        sig = self.headers.get("X-Signature", "")
        want = "sha256=" + hmac.new(st.key, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(sig, want):
            ok = False
            with st.lock:
                st.bad.append(f"POST {self.path}: bad X-Signature")
        if not ok:
            self.answer(401, b'{"error":"unauthorized"}')
            return
        try:
            doc = json.loads(body)
        except ValueError:
            with st.lock:
                st.bad.append(f"POST {self.path}: body is not JSON")
            self.answer(400, b"{}")
            return
        if self.path == "/api/agent/instructions/ack":
            ids = set(doc.get("ids", []))
            with st.lock:
                st.pending = [i for i in st.pending if i.get("id") not in ids]
                for i in ids:
                    st.acked.setdefault(i, t)
        elif self.path == "/api/agent/output":
            s = st.session(doc.get("sessionId", ""))
            with st.lock:
                s.output_posts += 1
                s.post_bytes += len(body)
                for c in doc.get("chunks", []):
                    seq = c.get("seq")
                    if seq == s.next_seq:
                        s.next_seq += 1
                    elif isinstance(seq, int) and seq < s.next_seq:
                        s.repeats += 1
                        continue
                    else:
                        s.gaps += 1
                        s.next_seq = (seq or 0) + 1
                    data = c.get("data", "").encode()
                    if c.get("stream") == "stdout":
                        s.stdout.update(data)
                        s.stdout_bytes += len(data)
                    else:
                        s.stderr_bytes += len(data)
        elif self.path == "/api/agent/events":
            s = st.session(doc.get("sessionId", ""))
            name = doc.get("event", "?")
            with st.lock:
                s.events.append((t, name, doc))
            if name in ("exited", "terminated", "rejected", "failed"):
                s.done.set()
        elif self.path == "/api/agent/status":
            with st.lock:
                st.statuses.append(t)
        elif self.path == "/api/agent/errors":
            with st.lock:
                st.errors.append(doc)
        self.answer(200, b'{"ok":true}')


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, tok: str) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = State(tok)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


# ---------------------------------------------------------------- the agent

class Agent:
    def __init__(self, bin_path: str, work: str, name: str, server: FakeServer, env: dict[str, str]) -> None:
        self.name = name
        self.state_dir = os.path.join(work, f"{name}-state")
        os.makedirs(self.state_dir, exist_ok=True)
        e = {k: v for k, v in os.environ.items() if k not in POLL_VARS and k != "AION_TOKEN"}
        e.update({
            "SERVER_URL": server.url,
            "AGENT_TOKEN": token(),
            "AION_STATE_DIR": self.state_dir,
        })
        e.update(env)
        self.err_path = os.path.join(work, f"{name}.err")
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([bin_path, "poll"], cwd=work, env=e, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err)
        self.pid = self.proc.pid
        AGENTS.append(self)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> tuple[int | None, float]:
        """SIGTERM, SIGKILL after 20 s: (exit code, ms)."""
        t = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                print(f"pollbench: agent {self.name} ignored SIGTERM for 20 s, killed", file=sys.stderr)
        return self.proc.returncode, (time.monotonic() - t) * 1000

    def cpu_ticks(self) -> int:
        with open(f"/proc/{self.pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return int(rest[11]) + int(rest[12])  # utime + stime (fields 14, 15)

    def cpu_sched_ns(self) -> int:
        """Sum of the live threads' on-CPU time (ns, /proc/PID/task/*/schedstat)."""
        total = 0
        try:
            tasks = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return 0
        for t in tasks:
            try:
                with open(f"/proc/{self.pid}/task/{t}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
        return total

    def status(self, key: str) -> int:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def log_counts(self) -> tuple[int, int]:
        with open(self.err_path, errors="replace") as f:
            text = f.read()
        warn = sum(1 for line in text.splitlines() if "[WARN]" in line or "[ERROR]" in line)
        return warn, int(token() in text)


def wait_until(cond, timeout: float, step: float = 0.01) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return cond()


def finish(prefix: str, agent: Agent, server: FakeServer) -> None:
    code, stop_ms = agent.stop()
    warn, token_logged = agent.log_counts()
    st = server.state
    out(f"{prefix}_exit", code)
    out(f"{prefix}_stop_ms", f"{stop_ms:.0f}")
    out(f"{prefix}_warn_lines", warn)
    out(f"{prefix}_token_in_log", token_logged)
    out(f"{prefix}_bad_requests", len(st.bad))
    if st.bad:
        print(f"pollbench {prefix}: bad requests: {st.bad[:3]}", file=sys.stderr)
    out(f"{prefix}_errors_posted", len(st.errors))
    server.shutdown()


def session_checks(prefix: str, s: Session) -> None:
    names = [e[1] for e in s.events]
    out(f"{prefix}_events", ",".join(names) or "none")
    out(f"{prefix}_seq_gaps", s.gaps)
    out(f"{prefix}_seq_repeats", s.repeats)
    out(f"{prefix}_chunks", s.next_seq)


# ---------------------------------------------------------------- (a) idle

def cmd_idle(bin_path: str, work: str, seconds: str, poll_ms: str) -> None:
    secs = float(seconds)
    server = FakeServer(token())
    agent = Agent(bin_path, work, "idle", server, {"POLL_INTERVAL": poll_ms})
    st = server.state
    if not wait_until(lambda: len(st.gets) >= 1, 10):
        out("idle_error", "no poll within 10 s")
    time.sleep(1.0)  # start-up done
    t0, c0, s0, g0, p0 = time.monotonic(), agent.cpu_ticks(), agent.cpu_sched_ns(), len(st.gets), len(st.statuses)
    end = t0 + secs
    rss_max = 0
    while time.monotonic() < end and agent.alive():
        rss_max = max(rss_max, agent.status("VmRSS"))
        time.sleep(min(1.0, max(0.0, end - time.monotonic())))
    t1, c1, s1 = time.monotonic(), agent.cpu_ticks(), agent.cpu_sched_ns()
    wall = t1 - t0
    cpu_ms = (c1 - c0) * 1000 / CLK_TCK
    sched_ms = (s1 - s0) / 1e6
    gets = [g for g in st.gets[g0:]]
    out("idle_seconds", f"{wall:.1f}")
    out("idle_cpu_ms", f"{cpu_ms:.0f}")
    out("idle_cpu_per_hour_s", f"{cpu_ms / wall * 3.6:.2f}")
    out("idle_sched_ms", f"{sched_ms:.1f}")
    out("idle_sched_per_hour_s", f"{sched_ms / wall * 3.6:.2f}")
    out("idle_polls", len(gets))
    out("idle_status_posts", len(st.statuses) - p0)
    if len(gets) >= 2:
        gaps = [(b - a) / 1e6 for a, b in zip(gets, gets[1:])]
        out("idle_poll_gap_min_ms", f"{min(gaps):.0f}")
        out("idle_poll_gap_median_ms", f"{statistics.median(gaps):.0f}")
        out("idle_poll_gap_max_ms", f"{max(gaps):.0f}")
    if gets:
        out("idle_cpu_per_poll_ms", f"{sched_ms / max(1, len(gets) + len(st.statuses) - p0):.2f}")
    out("idle_rss_kb", rss_max)
    out("idle_threads", agent.status("Threads"))
    finish("idle", agent, server)


# ---------------------------------------------------------------- (b) delay

def cmd_delay(bin_path: str, work: str, runs: str, poll_ms: str) -> None:
    n, interval = int(runs), int(poll_ms)
    server = FakeServer(token())
    agent = Agent(bin_path, work, "delay", server, {
        "POLL_INTERVAL": poll_ms,
        "AION_SESSION_COMMAND": json.dumps(["sh", "-c"]),
    })
    st = server.state
    wait_until(lambda: len(st.gets) >= 1, 10)
    starts = os.path.join(work, "starts")
    os.makedirs(starts, exist_ok=True)
    rng = random.Random(7)
    total, to_hand, hand_to_run, to_ack, lost = [], [], [], [], 0
    for i in range(n):
        time.sleep(rng.uniform(0, interval / 1000))  # a random phase of the poll cycle
        sid, iid = f"d{i}", f"id{i}"
        path = os.path.join(starts, sid)
        avail = st.push({"id": iid, "type": "start_session", "sessionId": sid,
                         "args": [f"date +%s%N > {path}"]})
        s = st.session(sid)
        if not s.done.wait(10 + 2 * interval / 1000):
            lost += 1
            continue
        try:
            with open(path) as f:
                start = int(f.read().strip())
        except (OSError, ValueError):
            lost += 1
            continue
        total.append(start - avail)
        handed = st.handed.get(iid, avail)
        to_hand.append(handed - avail)
        hand_to_run.append(start - handed)
        to_ack.append(st.acked.get(iid, handed) - handed)
    out("delay_runs", len(total))
    out("delay_lost", lost)
    out("delay_poll_ms", interval)
    if total:
        out("delay_median_ms", ms(statistics.median(total)))
        out("delay_p90_ms", ms(pct(total, 90)))
        out("delay_max_ms", ms(max(total)))
        out("delay_min_ms", ms(min(total)))
        out("delay_over_limit", sum(1 for d in total if d > (interval + 50) * 1e6))
        out("delay_wait_median_ms", ms(statistics.median(to_hand)))
        out("delay_wait_max_ms", ms(max(to_hand)))
        out("delay_start_median_ms", ms(statistics.median(hand_to_run)))
        out("delay_start_max_ms", ms(max(hand_to_run)))
        out("delay_ack_median_ms", ms(statistics.median(to_ack)))
    gets = st.gets
    if len(gets) >= 3:
        gaps = [(b - a) / 1e6 for a, b in zip(gets, gets[1:])]
        out("delay_poll_gap_min_ms", f"{min(gaps):.0f}")
        out("delay_poll_gap_max_ms", f"{max(gaps):.0f}")
    finish("delay", agent, server)


# ---------------------------------------------------------------- (c) throughput

def cmd_throughput(bin_path: str, work: str, mb: str) -> None:
    size = int(float(mb) * 1e6)
    data_path = os.path.join(work, "payload.b64")
    digest = hashlib.sha256()
    written = 0
    with open(data_path, "wb") as f:
        while written < size:
            raw = os.urandom(57 * 1000)  # 1000 lines of 76 base64 chars
            text = base64.encodebytes(raw)[: size - written]
            f.write(text)
            digest.update(text)
            written += len(text)
    server = FakeServer(token())
    agent = Agent(bin_path, work, "throughput", server, {
        "POLL_INTERVAL": "100",
        "AION_SESSION_COMMAND": json.dumps(["sh", "-c"]),
    })
    st = server.state
    wait_until(lambda: len(st.gets) >= 1, 10)
    rss = [0, 0]
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.is_set():
            rss[0] = max(rss[0], agent.status("VmRSS"))
            rss[1] = max(rss[1], agent.status("Threads"))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    c0, h0 = agent.cpu_ticks(), time.process_time()
    t_push = st.push({"id": "tp", "type": "start_session", "sessionId": "tp", "args": [f"cat {data_path}"]})
    s = st.session("tp")
    done = s.done.wait(max(60.0, size / 1e6 * 2))
    stop_sampling.set()
    sampler.join()
    c1, h1 = agent.cpu_ticks(), time.process_time()
    t_start = next((e[0] for e in s.events if e[1] == "started"), t_push)
    t_end = next((e[0] for e in s.events if e[1] != "started"), now_ns())
    secs = max(1e-9, (t_end - t_start) / 1e9)
    out("tp_completed", int(done))
    out("tp_bytes_expected", size)
    out("tp_bytes", s.stdout_bytes)
    out("tp_sha_ok", int(s.stdout.hexdigest() == digest.hexdigest() and s.stdout_bytes == size))
    out("tp_seconds", f"{secs:.2f}")
    out("tp_mb_per_s", f"{s.stdout_bytes / 1e6 / secs:.1f}")
    out("tp_posts", s.output_posts)
    out("tp_avg_post_kb", f"{s.post_bytes / 1024 / max(1, s.output_posts):.0f}")
    out("tp_cpu_ms", f"{(c1 - c0) * 1000 / CLK_TCK:.0f}")
    out("tp_server_cpu_ms", f"{(h1 - h0) * 1000:.0f}")
    out("tp_rss_peak_kb", rss[0])
    out("tp_hwm_kb", agent.status("VmHWM"))
    out("tp_threads_peak", rss[1])
    session_checks("tp", s)
    finish("tp", agent, server)
    os.unlink(data_path)


# ---------------------------------------------------------------- (d) busy sessions

def emit_text(tag: str, lines: int) -> bytes:
    pad = EMIT_LINE_BYTES - len(tag) - 11
    return b"".join(f"{tag} {i:08d} {'x' * pad}\n".encode() for i in range(lines))


def cmd_emit(lines_per_s: str, seconds: str, tag: str) -> None:
    """Prints lines_per_s x seconds lines of EMIT_LINE_BYTES, in bursts every 10 ms."""
    rate, secs = int(lines_per_s), float(seconds)
    total = int(rate * secs)
    pad = EMIT_LINE_BYTES - len(tag) - 11
    t0 = time.monotonic()
    i = 0
    w = sys.stdout.buffer
    while i < total:
        due = min(total, int((time.monotonic() - t0) * rate) + 1)
        if due > i:
            w.write(b"".join(f"{tag} {j:08d} {'x' * pad}\n".encode() for j in range(i, due)))
            w.flush()
            i = due
        time.sleep(0.01)


def spool_bytes(path: str) -> tuple[int, int, int]:
    """(bytes on disk, files, backlog): the backlog is what the .q files hold
    beyond the delivered offset kept in the first 8 bytes of their .pos
    (little-endian)."""
    total, files, backlog = 0, 0, 0
    try:
        # `.lock` is the spool directory's lock, not a spooled post
        names = [n for n in os.listdir(path) if n != ".lock"]
    except OSError:
        return 0, 0, 0
    for name in names:
        full = os.path.join(path, name)
        try:
            size = os.path.getsize(full)
        except OSError:
            continue
        total += size
        files += 1
        if name.endswith(".q"):
            pos = 0
            try:
                with open(full[:-2] + ".pos", "rb") as f:
                    raw = f.read(8)
                if len(raw) == 8:
                    pos = int.from_bytes(raw, "little")
            except OSError:
                pass
            backlog += max(0, size - pos)
    return total, files, backlog


def cmd_busy(bin_path: str, work: str, sessions: str, seconds: str, kbps: str) -> None:
    n, secs = int(sessions), float(seconds)
    lines_per_s = max(1, int(float(kbps) * 1000 / EMIT_LINE_BYTES))
    server = FakeServer(token())
    agent = Agent(bin_path, work, "busy", server, {
        "POLL_INTERVAL": "100",
        "MAX_CONCURRENT_SESSIONS": str(max(5, n)),
        "AION_SESSION_COMMAND": json.dumps([sys.executable, os.path.abspath(__file__), "emit"]),
    })
    st = server.state
    wait_until(lambda: len(st.gets) >= 1, 10)
    time.sleep(0.5)
    rss_before = agent.status("VmRSS")
    threads_before = agent.status("Threads")
    spool = os.path.join(agent.state_dir, "poll-outbox")
    t0 = time.monotonic()
    for i in range(n):
        st.push({"id": f"b{i}", "type": "start_session", "sessionId": f"b{i}",
                 "args": [str(lines_per_s), str(secs), f"b{i}"]})
    c0 = agent.cpu_ticks()
    samples: list[int] = []
    threads_max, spool_max, backlog_max = 0, 0, 0
    deadline = t0 + secs + 60
    while time.monotonic() < deadline:
        samples.append(agent.status("VmRSS"))
        threads_max = max(threads_max, agent.status("Threads"))
        disk, _, backlog = spool_bytes(spool)
        spool_max, backlog_max = max(spool_max, disk), max(backlog_max, backlog)
        if all(st.session(f"b{i}").done.is_set() for i in range(n)):
            break
        time.sleep(0.1)
    elapsed = time.monotonic() - t0
    c1 = agent.cpu_ticks()
    out("busy_sessions", n)
    out("busy_rate_kbps", f"{lines_per_s * EMIT_LINE_BYTES / 1000:.0f}")
    out("busy_seconds", f"{elapsed:.1f}")
    out("busy_rss_before_kb", rss_before)
    out("busy_threads_before", threads_before)
    out("busy_rss_peak_kb", max(samples) if samples else 0)
    out("busy_rss_median_kb", int(statistics.median(samples)) if samples else 0)
    out("busy_hwm_kb", agent.status("VmHWM"))
    out("busy_threads_peak", threads_max)
    out("busy_spool_peak_bytes", spool_max)
    out("busy_backlog_peak_bytes", backlog_max)
    out("busy_cpu_ms", f"{(c1 - c0) * 1000 / CLK_TCK:.0f}")
    time.sleep(0.3)
    out("busy_rss_after_kb", agent.status("VmRSS"))
    out("busy_spool_after_files", spool_bytes(spool)[1])
    complete = bad = 0
    expect_lines = int(lines_per_s * secs)
    total_bytes = 0
    for i in range(n):
        s = st.session(f"b{i}")
        total_bytes += s.stdout_bytes
        names = [e[1] for e in s.events]
        want = hashlib.sha256(emit_text(f"b{i}", expect_lines)).hexdigest()
        if names == ["started", "exited"] and s.gaps == 0 and s.repeats == 0 and s.stdout.hexdigest() == want:
            complete += 1
        else:
            bad += 1
            print(f"pollbench busy b{i}: events {names}, gaps {s.gaps}, repeats {s.repeats}, "
                  f"{s.stdout_bytes} bytes (expected {expect_lines * EMIT_LINE_BYTES})", file=sys.stderr)
    out("busy_sessions_intact", complete)
    out("busy_sessions_bad", bad)
    out("busy_bytes", total_bytes)
    finish("busy", agent, server)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    table = {"idle": (cmd_idle, 4), "delay": (cmd_delay, 4), "throughput": (cmd_throughput, 3),
             "busy": (cmd_busy, 5), "emit": (cmd_emit, 3)}
    if cmd not in table or len(args) != table[cmd][1]:
        sys.exit(__doc__)
    if cmd != "emit":
        args[1] = os.path.abspath(args[1])  # WORK: also the agent's cwd
    # SIGTERM from poll.sh's cleanup: unwind so that the agent gets stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        table[cmd][0](*args)
    finally:
        for agent in AGENTS:  # every agent is stopped, even on errors
            agent.stop()


if __name__ == "__main__":
    main()
