#!/usr/bin/env python3
"""Helper for bench/lease.sh: a reference Aion lease server (PROTOCOL.md §3,
Aion's guide) and the measurements around it. Standard library only; answers
in key=value lines on stdout.

Subcommands:
  closes BIN SOCK APPS CLOSES SCALE INTERVAL_MS
        serve SOCK, run `BIN lease --app … (APPS keys) --seconds 60 --socket SOCK
        -- sleep 30` with AION_LEASE_TIME_SCALE=SCALE, wait until every app is
        leased, push CLOSES lease.can_close.request (one every INTERVAL_MS, open
        loop, nine in ten for a held app and one in ten for an app it does not
        hold), time each request -> reply, then stop the wrapper (SIGTERM, then
        SIGKILL to it and its command's group after 2 s).
  serve SOCK KVFILE
        serve SOCK until SIGTERM/SIGINT, then write the counters to KVFILE.
  hyperfine JSON NAME...
        median/mean/p90/min/max (ms) of each command of a hyperfine JSON export.
  loop RUNS NAME -- CMD...
        the same figures from RUNS plain subprocess runs (no hyperfine).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

MIN_SECONDS, MAX_SECONDS = 60, 1800


def pct(values, p):
    """Nearest-rank percentile."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))
    return s[k]


def ms(v):
    return "-" if v is None else f"{v * 1000:.3f}"


class Conn:
    def __init__(self, cid, sock):
        self.id = cid
        self.sock = sock
        self.wlock = threading.Lock()
        self.holder = None

    def send(self, msg):
        data = (json.dumps(msg, separators=(",", ":")) + "\n").encode()
        with self.wlock:
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                return False


class LeaseServer:
    """Handshake, lease bounds, one holder per connection, leases with expiry
    (on a clock `scale` times faster), close checks timed by requestId."""

    def __init__(self, path, scale=1.0):
        self.path = path
        self.scale = scale
        self.lock = threading.Lock()
        self.conns = {}
        self.leases = {}  # app -> (holder, expires)
        self.count = {"connections": 0, "hellos": 0, "begins": 0, "renews": 0, "ends": 0,
                      "late_renews": 0, "refused": 0, "violations": 0}
        self.first_violation = ""
        self.pending = {}  # requestId -> (sent at, expected result)
        self.latencies = []
        self.wrong = 0
        self.first_wrong = ""
        self.replies = 0
        self.renew_times = []
        self.stop = threading.Event()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(128)
        self.sock.settimeout(0.1)
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        self.stop.set()
        with self.lock:
            conns = list(self.conns.values())
        for c in conns:
            try:
                c.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            self.sock.close()
            os.unlink(self.path)
        except OSError:
            pass

    def violation(self, what):
        with self.lock:
            self.count["violations"] += 1
            if not self.first_violation:
                self.first_violation = what

    def _accept(self):
        while not self.stop.is_set():
            try:
                s, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            s.settimeout(None)
            with self.lock:
                self.count["connections"] += 1
                c = Conn(self.count["connections"], s)
                self.conns[c.id] = c
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        f = c.sock.makefile("rb")
        try:
            for raw in f:
                now = time.perf_counter()
                try:
                    msg = json.loads(raw)
                except ValueError:
                    msg = None
                if not isinstance(msg, dict):
                    self.violation("a line that is not a JSON object")
                    if c.holder is None:
                        break
                    continue
                action = msg.get("action")
                if c.holder is None:
                    if action != "session.hello":
                        c.send({"action": "session.error", "code": "invalid_handshake"})
                        break
                    if msg.get("protocolVersion") != 1:
                        c.send({"action": "session.error", "code": "unsupported_protocol_version"})
                        break
                    holder = msg.get("holderId")
                    if not isinstance(holder, str) or not holder:
                        c.send({"action": "session.error", "code": "invalid_handshake"})
                        break
                    c.holder = holder
                    with self.lock:
                        self.count["hellos"] += 1
                    c.send({"action": "session.ready", "protocolVersion": 1, "holderId": holder})
                elif action in ("lease.begin", "lease.renew", "lease.end"):
                    self._lease(c, action, msg, now)
                elif action == "lease.can_close.reply":
                    self._reply(c, msg, now)
                else:
                    self.violation(f"unknown action {action!r}")
                    c.send({"action": "lease.result", "requestId": msg.get("requestId"), "code": "unknown_action"})
        except OSError:
            pass
        finally:
            with self.lock:
                self.conns.pop(c.id, None)
            try:
                c.sock.close()
            except OSError:
                pass

    def _lease(self, c, action, msg, now):
        rid, app = msg.get("requestId"), msg.get("appKey")
        secs = msg.get("leaseSeconds")

        def result(code, **extra):
            c.send({"action": "lease.result", "requestId": rid, "code": code, **extra})

        if not isinstance(rid, str) or not rid or not isinstance(app, str) or not app:
            return result("invalid_payload")
        if msg.get("holderId") != c.holder:
            return result("holder_mismatch", appKey=app)
        if action != "lease.end" and not (isinstance(secs, int) and MIN_SECONDS <= secs <= MAX_SECONDS):
            with self.lock:
                self.count["refused"] += 1
            return result("invalid_payload", appKey=app)
        with self.lock:
            if action == "lease.end":
                self.count["ends"] += 1
                self.leases.pop(app, None)
            else:
                held = self.leases.get(app)
                if held and held[0] != c.holder and now < held[1]:
                    self.count["refused"] += 1
                    code = "lease_conflict"
                else:
                    code = "accepted"
                    if action == "lease.begin":
                        self.count["begins"] += 1
                    else:
                        self.count["renews"] += 1
                        self.renew_times.append(now)
                        if held is None:
                            self.violation(f"lease.renew for {app}, which it does not hold")
                        elif now > held[1]:
                            self.count["late_renews"] += 1
                    self.leases[app] = (c.holder, now + secs / self.scale)
        if action == "lease.end":
            return result("accepted", appKey=app)
        if code != "accepted":
            return result(code, appKey=app)
        return result("accepted", appKey=app, leaseSeconds=secs)

    def _reply(self, c, msg, now):
        rid = msg.get("requestId")
        with self.lock:
            entry = self.pending.pop(rid, None)
            if entry is None:
                self.count["violations"] += 1
                self.first_violation = self.first_violation or f"a reply to an unknown request {rid!r}"
                return
            sent, want_result, want_secs = entry
            self.replies += 1
            self.latencies.append(now - sent)
            ok = msg.get("result") == want_result and msg.get("leaseSeconds") == want_secs \
                and msg.get("holderId") == c.holder
            if not ok:
                self.wrong += 1
                if not self.first_wrong:
                    self.first_wrong = json.dumps(msg, separators=(",", ":"))

    def ready_conn(self):
        with self.lock:
            ready = [c for c in self.conns.values() if c.holder is not None]
        return max(ready, key=lambda c: c.id) if ready else None

    def can_close(self, c, rid, app, want_result, want_secs):
        msg = {"action": "lease.can_close.request", "requestId": rid, "holderId": c.holder, "appKey": app}
        with self.lock:
            self.pending[rid] = (time.perf_counter(), want_result, want_secs)
        c.send(msg)

    def counters(self):
        with self.lock:
            out = dict(self.count)
            out["first_violation"] = self.first_violation or "none"
            return out


def proc_cpu_s(pid):
    """utime+stime of a process, seconds (None when gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def proc_rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(d))
    return out


def cmd_closes(binary, sock_path, n_apps, n_closes, scale, interval_ms):
    apps = [f"com.bench.app{i:02d}" for i in range(n_apps)]
    srv = LeaseServer(sock_path, scale=float(scale))
    argv = [binary, "lease"]
    for a in apps:
        argv += ["--app", a]
    argv += ["--seconds", "60", "--socket", sock_path, "--", "sleep", "30"]
    env = dict(os.environ, AION_LEASE_TIME_SCALE=str(scale))
    errlog = open(sock_path + ".stderr", "wb")
    wrapper = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errlog)
    out = {}
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with srv.lock:
                held = len(srv.leases)
            if held >= n_apps or wrapper.poll() is not None:
                break
            time.sleep(0.01)
        out["leased_apps"] = held
        if wrapper.poll() is not None:
            out["early_exit"] = wrapper.returncode
        time.sleep(0.5)  # renewals settle into their rhythm
        conn = srv.ready_conn()
        cpu0 = proc_cpu_s(wrapper.pid)
        renews0 = srv.counters()["renews"]
        t0 = time.perf_counter()
        if conn is not None:
            step = interval_ms / 1000.0
            for i in range(n_closes):
                target = t0 + i * step
                delay = target - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                if i % 10 == 9:
                    srv.can_close(conn, f"close_{i}", "com.bench.not-held", "allow_close", None)
                else:
                    srv.can_close(conn, f"close_{i}", apps[i % n_apps], "extend_lease", 60)
        sent_for = time.perf_counter() - t0
        wait_until = time.perf_counter() + 3.0
        while time.perf_counter() < wait_until:
            with srv.lock:
                if not srv.pending:
                    break
            time.sleep(0.005)
        window = time.perf_counter() - t0
        cpu1 = proc_cpu_s(wrapper.pid)
        c = srv.counters()
        lat = list(srv.latencies)
        out.update({
            "closes_sent": n_closes if conn else 0,
            "closes_replied": srv.replies,
            "closes_unanswered": len(srv.pending),
            "closes_wrong": srv.wrong,
            "first_wrong": srv.first_wrong or "none",
            "closes_over_3s": sum(1 for v in lat if v >= 3.0),
            "send_seconds": f"{sent_for:.2f}",
            "p50_ms": ms(pct(lat, 50)),
            "p90_ms": ms(pct(lat, 90)),
            "p99_ms": ms(pct(lat, 99)),
            "max_ms": ms(max(lat) if lat else None),
            "renews_during": c["renews"] - renews0,
            "renews_per_s": f"{(c['renews'] - renews0) / window:.0f}",
            "late_renews": c["late_renews"],
            "wrapper_cpu_pct": "-" if cpu0 is None or cpu1 is None else f"{100 * (cpu1 - cpu0) / window:.1f}",
            "wrapper_rss_kb": proc_rss_kb(wrapper.pid) or "-",
        })
    finally:
        # Stop the wrapper: SIGTERM (forwarded to `sleep 30`), then SIGKILL.
        kids = children(wrapper.pid)
        t_stop = time.perf_counter()
        wrapper.send_signal(signal.SIGTERM)
        try:
            code = wrapper.wait(timeout=2)
            out["sigterm_exit"] = code
            out["sigterm_ms"] = f"{(time.perf_counter() - t_stop) * 1000:.0f}"
        except subprocess.TimeoutExpired:
            out["sigterm_exit"] = "none (killed after 2 s)"
            out["sigterm_ms"] = "-"
            wrapper.kill()
            wrapper.wait()
        for k in kids:
            try:
                os.killpg(k, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.05)
        c = srv.counters()
        out.update({f"srv_{k}": v for k, v in c.items()})
        with srv.lock:
            out["leases_left"] = len(srv.leases)
        srv.close()
        errlog.close()
    for k, v in out.items():
        print(f"{k}={v}")


def cmd_serve(sock_path, kv_path):
    srv = LeaseServer(sock_path)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print("ready", flush=True)
    done.wait(600)
    c = srv.counters()
    with srv.lock:
        c["leases_left"] = len(srv.leases)
    srv.close()
    with open(kv_path, "w") as f:
        for k, v in c.items():
            f.write(f"{k}={v}\n")


def stats(name, times_s):
    print(f"{name}_runs={len(times_s)}")
    print(f"{name}_median_ms={ms(pct(times_s, 50))}")
    print(f"{name}_p90_ms={ms(pct(times_s, 90))}")
    print(f"{name}_mean_ms={ms(sum(times_s) / len(times_s) if times_s else None)}")
    print(f"{name}_min_ms={ms(min(times_s) if times_s else None)}")
    print(f"{name}_max_ms={ms(max(times_s) if times_s else None)}")


def cmd_hyperfine(path, names):
    with open(path) as f:
        results = json.load(f)["results"]
    for name, r in zip(names, results):
        stats(name, r["times"])
        codes = [c for c in r.get("exit_codes", []) if c != 0]
        print(f"{name}_nonzero_exits={len(codes)}")


def cmd_loop(runs, name, argv):
    times = []
    bad = 0
    for _ in range(runs):
        t = time.perf_counter()
        code = subprocess.call(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
        bad += code != 0
    stats(name, times)
    print(f"{name}_nonzero_exits={bad}")


def main(argv):
    if len(argv) >= 7 and argv[0] == "closes":
        n_apps, n_closes, scale, interval = int(argv[3]), int(argv[4]), int(argv[5]), float(argv[6])
        if not (1 <= n_apps <= 500 and 1 <= n_closes <= 100000 and 1 <= scale <= 100000 and 0 < interval <= 1000):
            sys.exit("leasebench.py closes: a bound is out of range")
        cmd_closes(argv[1], argv[2], n_apps, n_closes, scale, interval)
    elif len(argv) == 3 and argv[0] == "serve":
        cmd_serve(argv[1], argv[2])
    elif len(argv) >= 3 and argv[0] == "hyperfine":
        cmd_hyperfine(argv[1], argv[2:])
    elif len(argv) >= 5 and argv[0] == "loop" and argv[3] == "--":
        runs = int(argv[1])
        if not 1 <= runs <= 10000:
            sys.exit("leasebench.py loop: RUNS must be 1-10000")
        cmd_loop(runs, argv[2], argv[4:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
